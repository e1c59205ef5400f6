"""Keras 3 reference files: keras.applications.EfficientNetB0 (+ qubvel's B0 built on Keras 3).

Run as ``python make_keras3_refs.py OUTDIR`` WITHOUT TF_USE_LEGACY_KERAS, in its own process.
Writes into OUTDIR (inputs x128.npy / xodd.npy, NHWC in [0,1], shared with make_tf2_refs.py):

  k3_apps.weights.h5 / k3_apps.h5     keras.applications B0 (weights=None, random incl. Normalization):
                                      save_weights (object-path) / model.save (legacy full-model file)
  k3_apps_imagenet.weights.h5 / .h5   the same built with weights='imagenet' (extra Rescaling layer;
                                      the download is replaced by the file above)
  k3_qubvel.weights.h5 / k3_qubvel.h5 qubvel efficientnet.keras B0 on Keras 3 (if it builds)
  *_feat_*.npy                        Keras features (NHWC) for the inputs (x 255 for keras.applications)
  k3_meta.json                        versions, layer names, odd-size behaviour
"""
import os
import sys
import time

if os.environ.get("TF_USE_LEGACY_KERAS") == "1":
    sys.exit("run without TF_USE_LEGACY_KERAS (this script needs Keras 3)")

import numpy as np  # noqa: E402
import keras  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import Out, param_counts, randomize, write_inputs  # noqa: E402

t_start = time.time()
out = Out(sys.argv[1])
out.meta["keras_version"] = keras.__version__
rng = np.random.default_rng(31415)
x128, xodd = write_inputs(out.path)


def run(model, x):
    return keras.ops.convert_to_numpy(model(x, training=False))


# ---------------------------------------------------------------- keras.applications, weights=None
apps = keras.applications.EfficientNetB0(include_top=False, weights=None)
randomize(apps.layers, rng)
out.meta["apps_layers"] = [layer.name for layer in apps.layers]
out.meta["apps_params"] = param_counts(apps)
apps.save_weights(out.file("k3_apps.weights.h5"))
apps.save(out.file("k3_apps.h5"))
# Outputs come from fresh models that load the saved file, as a user would: Normalization.set_weights
# does not refresh the mean/variance its call() uses (only loading / adapt() run finalize_state()).
apps = keras.applications.EfficientNetB0(include_top=False, weights=None)
apps.load_weights(out.file("k3_apps.weights.h5"))
out.npy("k3_apps_feat_128", run(apps, x128 * 255.0))
out.meta["apps_dynamic_odd_shape"] = list(run(apps, xodd * 255.0).shape)
# built with a static odd input shape, keras.applications pads like TF SAME
apps_odd = keras.applications.EfficientNetB0(include_top=False, weights=None, input_shape=xodd.shape[1:])
apps_odd.load_weights(out.file("k3_apps.weights.h5"))
out.npy("k3_apps_feat_odd", run(apps_odd, xodd * 255.0))

# ---------------------------------------------------------------- keras.applications, weights='imagenet'
# weights='imagenet' adds the extra Rescaling(1/sqrt(std)) layer; no download: get_file is replaced
from keras.src.applications import efficientnet as _apps_module  # noqa: E402

_real_get_file = _apps_module.file_utils.get_file
_apps_module.file_utils.get_file = lambda *a, **k: out.file("k3_apps.h5")
try:
    inet = keras.applications.EfficientNetB0(include_top=False, weights="imagenet")
finally:
    _apps_module.file_utils.get_file = _real_get_file
assert all(np.array_equal(a, b) for a, b in zip(inet.get_weights(), apps.get_weights()))
out.meta["apps_imagenet_layers"] = [layer.name for layer in inet.layers]
inet.save_weights(out.file("k3_apps_imagenet.weights.h5"))
inet.save(out.file("k3_apps_imagenet.h5"))
out.npy("k3_apps_imagenet_feat_128", run(inet, x128 * 255.0))

# ---------------------------------------------------------------- qubvel's B0 on Keras 3
try:
    import efficientnet.keras as efn3

    # qubvel's swish falls back to keras.backend.sigmoid, which Keras 3 no longer has
    if not hasattr(keras.backend, "sigmoid"):
        keras.backend.sigmoid = keras.ops.sigmoid
    q = efn3.EfficientNetB0(include_top=False, weights=None)
    randomize(q.layers, rng)
    q.save_weights(out.file("k3_qubvel.weights.h5"))
    q.save(out.file("k3_qubvel.h5"))
    out.npy("k3_qubvel_feat_128", run(q, x128))
    out.meta["qubvel_k3"] = "ok"
except Exception as e:  # noqa: BLE001 - record, the tests skip these files then
    out.meta["qubvel_k3"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"

out.meta["seconds"] = round(time.time() - t_start, 1)
out.write_meta("k3_meta.json")
print("done", out.meta["seconds"])
