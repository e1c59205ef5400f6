"""Shared helpers for the Keras reference scripts (imported by them only, never by torch code)."""
import json
import os

import numpy as np


def randomize(layers, rng):
    """Fill every weight of `layers` with non-trivial random values (fixed by `rng`).

    He-like conv/dense kernels, BN gamma ~ 1 +- 0.1, beta / moving mean ~ N(0, 0.1),
    moving variance in [0.5, 1.5], biases ~ N(0, 0.1), Normalization mean/variance near ImageNet's.
    """
    for layer in layers:
        ws = layer.weights
        if not ws:
            continue
        cls = type(layer).__name__
        new = []
        for w, v in zip(ws, layer.get_weights()):
            n = w.name.split("/")[-1].split(":")[0]
            shape = v.shape
            if n in ("kernel", "depthwise_kernel"):
                fan_in = int(np.prod(shape[:2])) if cls == "DepthwiseConv2D" else int(np.prod(shape[:-1]))
                v = rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)
            elif n == "gamma":
                v = 1.0 + 0.1 * rng.standard_normal(shape)
            elif n in ("beta", "moving_mean", "bias"):
                v = 0.1 * rng.standard_normal(shape)
            elif n == "moving_variance":
                v = rng.uniform(0.5, 1.5, shape)
            elif n == "mean":           # keras.applications Normalization
                v = np.array([0.485, 0.456, 0.406])[: shape[0]] + 0.05 * rng.standard_normal(shape)
            elif n == "variance":       # keras.applications stores the ImageNet std here (see #49930)
                v = np.array([0.229, 0.224, 0.225])[: shape[0]] + 0.02 * rng.standard_normal(shape)
            elif n == "count":
                pass
            else:
                raise RuntimeError(f"unexpected weight {w.name} in {layer.name}")
            new.append(np.asarray(v, dtype=v.dtype if n == "count" else np.float32))
        layer.set_weights(new)


def test_images(rng, h, w, kinds):
    """Deterministic, varied test images (NHWC float32 in [0,1]): 0 noise, 1 smooth colour field,
    2 dark high-contrast field, 3 bright low-contrast field with noise."""
    from scipy.ndimage import zoom

    out = []
    for kind in kinds:
        if kind == 0:
            im = rng.random((h, w, 3))
        else:
            g = rng.random((3 + 3 * kind, 3 + 3 * kind, 3))
            im = zoom(g, (h / g.shape[0], w / g.shape[1], 1), order=3)[:h, :w]
            im = (im - im.min()) / (im.max() - im.min())
            if kind == 2:
                im = im ** 3
            elif kind == 3:
                im = 0.7 + 0.25 * im + 0.05 * rng.random((h, w, 3))
        out.append(np.clip(im, 0, 1))
    return np.stack(out).astype(np.float32)


def write_inputs(path):
    """x128.npy (4 images 128x128) and xodd.npy (2 images 131x127), created once per directory."""
    x128, xodd = os.path.join(path, "x128.npy"), os.path.join(path, "xodd.npy")
    if not (os.path.exists(x128) and os.path.exists(xodd)):
        os.makedirs(path, exist_ok=True)
        rng = np.random.default_rng(20240401)
        np.save(x128, test_images(rng, 128, 128, kinds=(0, 1, 2, 3)))
        np.save(xodd, test_images(rng, 131, 127, kinds=(1, 3)))
    return np.load(x128), np.load(xodd)


def param_counts(model):
    tr = sum(int(np.prod(w.shape)) for w in model.trainable_weights)
    tot = sum(int(np.prod(w.shape)) for w in model.weights)
    return {"trainable": tr, "total": tot, "trainable_tensors": len(model.trainable_weights)}


class Out:
    def __init__(self, path):
        self.path = path
        os.makedirs(path, exist_ok=True)
        self.meta = {}

    def file(self, name):
        return os.path.join(self.path, name)

    def npy(self, name, array):
        np.save(self.file(name + ".npy"), np.asarray(array, dtype=np.float32))

    def write_meta(self, name):
        with open(self.file(name), "w") as f:
            json.dump(self.meta, f, indent=1)
