"""Build the genuine original CRBL model (tf_keras + qubvel efficientnet) and write reference files.

Run as ``TF_USE_LEGACY_KERAS=1 python make_tf2_refs.py OUTDIR`` in its own process (tests do this
with sys.executable); TensorFlow never shares a process with torch.  Writes into OUTDIR:

  crop.h5 / crop.weights.h5      CRBL crop model, save_weights: legacy layout / object-path layout
  full.h5 / full.weights.h5      the same weights, saved from the full-configured model
  full_trained.weights.h5        full model after compile + one Adam step (has an optimizer group)
  crop_trained.weights.h5        crop model after compile + one Adam step (has an optimizer group)
  qubvel_notop.h5 / .weights.h5  a single qubvel EfficientNetB0(include_top=False) (other weights)
  other.h5 / other.weights.h5    a small MobileNetV2: an h5 file of another architecture
  x128.npy, xodd.npy             inputs, NHWC float32 in [0,1] (made by _common.write_inputs)
  *.npy                          Keras outputs (features NHWC, probabilities), see meta.json
  meta.json                      versions, layer names, parameter counts, Keras load behaviour
"""
import os
import sys
import time

if os.environ.get("TF_USE_LEGACY_KERAS") != "1":
    sys.exit("run with TF_USE_LEGACY_KERAS=1 (the original model only runs on Keras 2 / tf_keras)")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import efficientnet.tfkeras as efn  # noqa: E402
import tf_keras  # noqa: E402
from tensorflow import keras  # noqa: E402  (tf_keras, because of TF_USE_LEGACY_KERAS)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import Out, param_counts, randomize, write_inputs  # noqa: E402
from original_crbl import build_crbl, set_trainable  # noqa: E402

t_start = time.time()
out = Out(sys.argv[1])
out.meta["keras_version"] = tf_keras.__version__
out.meta["tf_version"] = tf.__version__
x128, xodd = write_inputs(out.path)
rng = np.random.default_rng(20240402)


def discriminative_dense(model, dense):
    """Random Dense weights whose logits actually vary between the test inputs.

    The pooled vectors of different images share a large common component, so a plain random
    kernel gives nearly the same probability for every input.  Project the common direction out of
    a random kernel and scale it so the logits differ between inputs by ~0.05-0.1.  (Much more is
    not possible at a 1e-5 probability tolerance: the signed square root amplifies float32 noise
    of near-zero products, so |z_torch - z_keras| is ~1e-3 of |z_a - z_b| between images.)
    """
    z = np.concatenate([model.pooled(x128), model.pooled(xodd)]).astype(np.float64)
    zbar = z.mean(0)
    r = rng.standard_normal(z.shape[1])
    r -= (r @ zbar) / (zbar @ zbar) * zbar
    logits = z @ r
    c = 0.05 / logits.std()
    dense.set_weights([(c * r)[:, None].astype(np.float32), np.array([-c * logits.mean()], np.float32)])


def run(model, x):
    return model(x, training=False).numpy()


def save_outputs(tag, model, model_odd, b1, b2, odd=True):
    out.npy(f"{tag}_feat1_128", run(b1, x128))
    out.npy(f"{tag}_feat2_128", run(b2, x128))
    out.npy(f"{tag}_prob_128", run(model, x128))
    if odd:
        out.npy(f"{tag}_feat1_odd", run(b1, xodd))
        out.npy(f"{tag}_feat2_odd", run(b2, xodd))
        out.npy(f"{tag}_prob_odd", run(model_odd, xodd))


def train_one_step(model):
    model.compile(optimizer=keras.optimizers.Adam(1e-4), loss="binary_crossentropy", run_eagerly=True)
    model.train_on_batch(x128[:2], np.array([[1.0], [0.0]], dtype=np.float32))


# ---------------------------------------------------------------- the CRBL model
model, model_odd, b1, b2, dense = build_crbl(is_crop=True, odd_shape=xodd.shape[1:])
randomize(b1.layers, rng)
randomize(b2.layers, rng)
discriminative_dense(model, dense)
out.meta["crop_params"] = param_counts(model)
out.meta["crop_backbone_layer_150"] = b1.layers[150].name
model.save_weights(out.file("crop.h5"))
model.save_weights(out.file("crop.weights.h5"))
save_outputs("crbl", model, model_odd, b1, b2)

set_trainable((b1, b2), is_crop=False)
out.meta["full_params"] = param_counts(model)
model.save_weights(out.file("full.h5"))
model.save_weights(out.file("full.weights.h5"))

# one training step each, so that the object-path files carry an optimizer group
train_one_step(model)                             # full: only the Dense layer trains
model.save_weights(out.file("full_trained.weights.h5"))
out.npy("full_trained_prob_128", run(model, x128))
set_trainable((b1, b2), is_crop=True)
train_one_step(model)                             # crop: layers[150:] + Dense train, BN stats move
model.save_weights(out.file("crop_trained.weights.h5"))
save_outputs("crop_trained", model, model_odd, b1, b2, odd=False)

# ---------------------------------------------------------------- one qubvel backbone (notop)
q = efn.EfficientNetB0(include_top=False, weights=None)
randomize(q.layers, rng)
out.meta["qubvel_layers"] = [[layer.name, type(layer).__name__] for layer in q.layers]
out.meta["qubvel_params"] = param_counts(q)
q.save_weights(out.file("qubvel_notop.h5"))
q.save_weights(out.file("qubvel_notop.weights.h5"))
out.npy("qubvel_feat_128", run(q, x128))
out.npy("qubvel_feat_odd", run(q, xodd))

# ---------------------------------------------------------------- another architecture
other = keras.applications.MobileNetV2(alpha=0.35, include_top=False, weights=None, input_shape=(32, 32, 3))
other.save_weights(out.file("other.h5"))
other.save_weights(out.file("other.weights.h5"))

# ---------------------------------------------------------------- Keras's own loading of legacy files
# (positional): does a crop-saved legacy .h5 load into the full-configured model?  The same model,
# configured as full again (set_trainable is all that tells the two apart; a second build costs ~12 s).
# Last, because a failed load may leave the model half-assigned.
set_trainable((b1, b2), is_crop=False)
try:
    model.load_weights(out.file("crop.h5"))
    out.meta["keras_loads_crop_h5_into_full"] = "loaded"
except Exception as e:  # noqa: BLE001 - we record whatever Keras does
    out.meta["keras_loads_crop_h5_into_full"] = f"error: {type(e).__name__}: {str(e).splitlines()[0][:200]}"

out.meta["seconds"] = round(time.time() - t_start, 1)
out.write_meta("tf2_meta.json")
print("done", out.meta["seconds"])
