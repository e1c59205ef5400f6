"""Convert Keras CRBL / EfficientNetB0 weight files (.h5) into PyTorch state_dicts for crbl.model.

    python scripts/convert_h5.py IN.h5 OUT.pth [--model-type crop|full]

Reads the file with h5py only: no TensorFlow, no model config or Lambda code is ever executed.
Understood layouts (detected from the file):

* Keras 2 legacy ``save_weights('x.h5')``: root attr ``layer_names``, per-layer groups with attr
  ``weight_names`` (possibly split into ``weight_names0``, ``weight_names1``, ...); nested
  backbones are one group holding all their weights; inner names with or without the
  ``model1_``/``model2_`` prefix.
* legacy full-model files (``model.save('x.h5')``): the same under ``model_weights/``; also Keras 3's
  variant (no ``:0`` suffix, DepthwiseConv2D weight named ``kernel``).  ``optimizer_weights`` is skipped.
* the object-path layout of ``*.weights.h5`` (Keras >= 2.12 and Keras 3):
  ``layers/functional/layers/conv2d_7/vars/0``, numbered per layer class in ``model.layers``
  order; ``optimizer``/``metrics`` groups are skipped (the optimizer's slot count tells crop from full).

Content: a whole CRBL model (two EfficientNetB0 + Dense ``predictions``) -> ``crbl.model.CRBL``
state_dict; or a single EfficientNetB0 without top -> ``crbl.model.EfficientNetB0`` state_dict
(qubvel ``efficientnet`` files, e.g. its pretrained notop files, or ``keras.applications``
EfficientNetB0, whose Rescaling/Normalization(/imagenet Rescaling) input preprocessing is folded
into the backbone's ``input_scale``/``input_shift`` so that the converted model on [0,1] input
reproduces Keras on 0-255 input).

Mapping is by layer name (legacy) or by layer class order (object-path), never by "whatever fits":
every tensor in the file must map to exactly one model tensor of the right shape, and every model
tensor must be filled; otherwise the conversion fails and lists the offenders.  The output is a
plain state_dict (torch.load(weights_only=True) + strict load_state_dict), written atomically.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

try:
    import h5py
except ImportError:  # pragma: no cover - h5py is a project requirement
    h5py = None

import torch

if __package__ in (None, ""):  # `python <folder>/<script>.py` from a checkout: import this checkout's packages
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.cli import ArgumentParser  # noqa: E402
from common.io import (UserError, atomic_torch_save, check_output_file, refuse_output_over_inputs,  # noqa: E402
                       require_file, run_cli)
from crbl.model import CRBL, FEATURE_CHANNELS, FREEZE_INDEX, KERAS_LAYERS, MODEL_TYPES, EfficientNetB0  # noqa: E402

# ----------------------------------------------------------------------------- the B0 weight spec
# kind -> variable names in Keras weight order (= object-path vars/<i> order)
KIND_VARS = {
    "conv": ("kernel",),
    "conv_bias": ("kernel", "bias"),
    "dwconv": ("depthwise_kernel",),
    "bn": ("gamma", "beta", "moving_mean", "moving_variance"),
    "dense": ("kernel", "bias"),
    "norm": ("mean", "variance", "count"),
}
TORCH_VAR = {"bias": "bias", "gamma": "weight", "beta": "bias", "moving_mean": "running_mean",
             "moving_variance": "running_var"}
TRAINABLE_VARS = {"kernel", "bias", "depthwise_kernel", "gamma", "beta"}
CLASS_OF_KIND = {"conv": "conv2d", "conv_bias": "conv2d", "dwconv": "depthwise_conv2d",
                 "bn": "batch_normalization"}


def _kind(name: str, cls: str) -> str | None:
    if cls == "Conv2D":
        return "conv_bias" if name.endswith(("se_reduce", "se_expand")) else "conv"
    return {"DepthwiseConv2D": "dwconv", "BatchNormalization": "bn"}.get(cls)


# (Keras name, kind, index in KERAS_LAYERS) of the 130 layers with weights, in model.layers order
B0_WEIGHTED = [(n, _kind(n, c), i) for i, (n, c) in enumerate(KERAS_LAYERS) if _kind(n, c)]
B0_KIND = {n: k for n, k, _ in B0_WEIGHTED}
B0_INDEX = {n: i for n, _, i in B0_WEIGHTED}


def _object_path_names() -> dict[str, str]:
    """Object-path group name (class snake_case + per-class counter) -> Keras layer name."""
    counters: Counter = Counter()
    out = {}
    for name, kind, _ in B0_WEIGHTED:
        cls = CLASS_OF_KIND[kind]
        k = counters[cls]
        counters[cls] += 1
        out[cls if k == 0 else f"{cls}_{k}"] = name
    return out


B0_OBJECT_NAMES = _object_path_names()
DENSE_IN = FEATURE_CHANNELS * FEATURE_CHANNELS
IMAGENET_STD = (0.229, 0.224, 0.225)
NORM_RE = re.compile(r"^normalization(_\d+)?$")
RESCALE_RE = re.compile(r"^rescaling(_\d+)?$")
PREFIX_RE = re.compile(r"^model([12])_")
SKIPPED_GROUPS = ("optimizer", "metrics", "optimizer_weights")


def _torch_key(keras_name: str) -> str:
    if keras_name.startswith("block"):
        block, _, child = keras_name.partition("_")
        return f"{block}.{child}"
    return keras_name


def canon(name: str) -> tuple[str, str | None]:
    """Keras layer name -> (B0 / preprocessing layer name, backbone tag '1'/'2'/None).

    Strips the original code's ``model1_``/``model2_`` prefix and a TF name-uniquifying ``_<n>``
    suffix (B0 layer names never end in one).
    """
    m = PREFIX_RE.match(name)
    tag = m.group(1) if m else None
    base = name[m.end():] if m else name
    if base not in B0_KIND and not NORM_RE.match(base) and not RESCALE_RE.match(base):
        stripped = re.sub(r"_\d+$", "", base)
        if stripped in B0_KIND:
            base = stripped
    return base, tag


def _short(items, n: int = 4) -> str:
    items = list(items)
    s = ", ".join(str(i) for i in items[:n])
    return s + (f" (+{len(items) - n} more)" if len(items) > n else "")


def _decode(v) -> str:
    return v.decode("utf8") if isinstance(v, bytes) else str(v)


def read_str_list(attrs, name: str) -> list[str] | None:
    """A Keras string-list attribute, also when split into name0, name1, ... (> 64 KiB headers)."""
    if name in attrs:
        return [_decode(v) for v in np.asarray(attrs[name]).ravel()]
    if f"{name}0" not in attrs:
        return None
    out, i = [], 0
    while f"{name}{i}" in attrs:
        out += [_decode(v) for v in np.asarray(attrs[f"{name}{i}"]).ravel()]
        i += 1
    return out


def _datasets(group, prefix: str = "") -> list[str]:
    out = []

    def visit(name, obj):
        if isinstance(obj, h5py.Dataset):
            out.append(f"{prefix}{name}")
    group.visititems(visit)
    return out


# ----------------------------------------------------------------------------- collected content
@dataclass
class Backbone:
    label: str                                       # where it came from (group name)
    hint: str | None = None                          # '1' / '2' from names, if any
    vars: dict = field(default_factory=dict)         # (keras layer, var) -> (h5 path, h5 dataset)
    order: list = field(default_factory=list)        # [(layer, var)] in file order (legacy)
    norm: dict = field(default_factory=dict)         # Normalization var -> dataset (keras.applications)
    rescalings: list | None = None                   # [(scale, offset)] if known; None: unknown
    rescaling_count: int | None = None
    notes: list = field(default_factory=list)


@dataclass
class Content:
    layout: str
    backbones: list = field(default_factory=list)
    head: dict = field(default_factory=dict)         # var -> (path, dataset)
    head_label: str = ""
    unmapped: list = field(default_factory=list)     # h5 paths nobody claims
    missing: list = field(default_factory=list)      # model tensors the file does not provide
    mismatched: list = field(default_factory=list)   # shape mismatches
    problems: list = field(default_factory=list)     # other mapping errors
    skipped: dict = field(default_factory=dict)      # group -> tensor count
    model_type: str | None = None
    model_type_how: str = "the file does not record which weights were trainable"
    notes: list = field(default_factory=list)
    kind: str = ""
    per_backbone: list = field(default_factory=list)   # (index, Backbone, tensors, values)
    head_values: int = 0
    state: dict | None = None


def _add_var(bb: Backbone, layer: str, var: str, path: str, ds, content: Content) -> None:
    if var == "kernel" and B0_KIND.get(layer) == "dwconv":
        var = "depthwise_kernel"                    # Keras 3 names the depthwise weight "kernel"
    key = (layer, var)
    kind = B0_KIND.get(layer)
    if kind is None or var not in KIND_VARS[kind]:
        content.unmapped.append(path)
    elif key in bb.vars:
        content.problems.append(f"{layer}/{var} appears twice in {bb.label} ({bb.vars[key][0]}, {path})")
    else:
        bb.vars[key] = (path, ds)
        bb.order.append(key)


# ----------------------------------------------------------------------------- legacy layout
def parse_legacy(f, content: Content) -> None:
    root = f
    if read_str_list(f.attrs, "layer_names") is None:
        root = f["model_weights"]
        content.layout = "Keras legacy full-model file (model_weights/...)"
        for name in f:
            if name != "model_weights":
                n = len(_datasets(f[name])) if isinstance(f[name], h5py.Group) else 1
                if name in SKIPPED_GROUPS:
                    content.skipped[name] = n
                elif n:
                    content.unmapped += [f"{name}/{p}" for p in _datasets(f[name])] or [name]
    else:
        content.layout = "Keras legacy save_weights layout (layer_names / weight_names)"
    version = _decode(root.attrs.get("keras_version", f.attrs.get("keras_version", b"?")))
    content.layout += f", keras_version {version}"
    layer_names = read_str_list(root.attrs, "layer_names")
    listed = set()
    plain: dict[str | None, Backbone] = {}
    nested: list[Backbone] = []
    norm_layers, rescale_layers = [], []
    for ln in layer_names:
        cl, _ = canon(ln)
        if NORM_RE.match(cl):
            norm_layers.append(ln)
        elif RESCALE_RE.match(cl):
            rescale_layers.append(ln)
        if ln not in root:
            content.problems.append(f"layer {ln!r} is listed in layer_names but has no group")
            continue
        g = root[ln]
        wnames = read_str_list(g.attrs, "weight_names") or []
        entries = []
        for wn in wnames:
            path = f"{g.name}/{wn}"
            if wn not in g or not isinstance(g[wn], h5py.Dataset):
                content.problems.append(f"weight {path} is listed but missing")
                continue
            listed.add(g[wn].name)
            parts = wn.split("/")
            var = parts[-1].split(":")[0]
            layer = parts[-2] if len(parts) >= 2 else ln
            entries.append((layer, var, path, g[wn]))
        if not entries:
            continue
        inner = {e[0] for e in entries}
        if inner == {ln} or (len(inner) == 1 and canon(next(iter(inner)))[0] == cl):
            # a plain layer group: one layer's weights
            if cl in B0_KIND:
                tag = canon(ln)[1] or canon(next(iter(inner)))[1]
                bb = plain.setdefault(tag, Backbone(label="top-level layer groups", hint=tag))
                for layer, var, path, ds in entries:
                    _add_var(bb, cl, var, path, ds, content)
            elif NORM_RE.match(cl):
                bb = plain.setdefault(None, Backbone(label="top-level layer groups"))
                for layer, var, path, ds in entries:
                    if var in KIND_VARS["norm"] and var not in bb.norm:
                        bb.norm[var] = (path, ds)
                    else:
                        content.unmapped.append(path)
            elif {e[1] for e in entries} == {"kernel", "bias"} and len(entries) == 2 and not content.head:
                content.head = {var: (path, ds) for _l, var, path, ds in entries}
                content.head_label = ln
            else:
                content.unmapped += [e[2] for e in entries]
        else:
            # a nested model (a backbone) stored flat in one group
            hint = _name_hint(ln)
            bb = Backbone(label=f"group {ln!r}", hint=hint)
            tags = set()
            for layer, var, path, ds in entries:
                base, tag = canon(layer)
                tags.add(tag)
                if NORM_RE.match(base):
                    content.problems.append(f"{path}: keras.applications preprocessing inside a nested "
                                            f"model is not supported")
                    continue
                _add_var(bb, base, var, path, ds, content)
            tags.discard(None)
            if len(tags) > 1:
                content.problems.append(f"group {ln!r} mixes model1_ and model2_ layers")
            elif tags:
                prefix_hint = tags.pop()
                if hint and hint != prefix_hint:
                    content.problems.append(f"group {ln!r}: its name and its model{prefix_hint}_ "
                                            f"layer prefix disagree about which backbone it is")
                bb.hint = prefix_hint
            nested.append(bb)
    # every dataset under root must be listed in some weight_names
    for p in _datasets(root):
        full = f"{root.name.rstrip('/')}/{p}"
        if full not in listed:
            content.unmapped.append(full)
    if plain and nested:
        content.problems.append("the file mixes top-level EfficientNet layers with nested models")
    content.backbones = nested or [plain[k] for k in sorted(plain, key=lambda t: t or "")]
    if norm_layers:
        for bb in content.backbones:
            bb.rescaling_count = _rescalings_before_stem(layer_names)
            bb.rescalings = _rescalings_from_config(f, len(rescale_layers))
    if nested and content.head:
        content.model_type, content.model_type_how = _legacy_model_type(nested)


def _name_hint(name: str) -> str | None:
    low = name.lower()
    if "imagenet" in low and "noisy" not in low:
        return "1"
    if "noisy" in low and "imagenet" not in low:
        return "2"
    return None


def _rescalings_before_stem(layer_names: list[str]) -> int:
    """Rescaling layers between the input and stem_conv (keras.applications: 1, or 2 with imagenet)."""
    n = 0
    for ln in layer_names:
        base = canon(ln)[0]
        if base.startswith("stem_conv"):
            break
        if RESCALE_RE.match(base):
            n += 1
    return n


def _rescalings_from_config(f, expected: int):
    """(scale, offset) of the Rescaling layers from a full-model file's model_config (JSON only)."""
    raw = f.attrs.get("model_config")
    if raw is None:
        return None
    try:
        cfg = json.loads(_decode(raw))
        layers = cfg["config"]["layers"]
        out = [(l["config"]["scale"], l["config"].get("offset", 0.0))
               for l in layers if l.get("class_name") == "Rescaling"]
    except (ValueError, KeyError, TypeError):
        return None
    return out if len(out) == expected else None


def _expected_legacy_orders() -> dict[str, list[tuple[str, str]]]:
    """weight_names order Keras writes for a nested backbone: trainable weights first, then the rest."""
    all_vars = [(n, v) for n, k, _ in B0_WEIGHTED for v in KIND_VARS[k]]
    out = {}
    for mtype in MODEL_TYPES:
        trainable = {n for n, _, i in B0_WEIGHTED if mtype == "crop" and i >= FREEZE_INDEX}
        first = [(n, v) for n, v in all_vars if n in trainable and v in TRAINABLE_VARS]
        rest = [(n, v) for n, v in all_vars if not (n in trainable and v in TRAINABLE_VARS)]
        out[mtype] = first + rest
    return out


def _legacy_model_type(nested: list[Backbone]) -> tuple[str | None, str]:
    orders = _expected_legacy_orders()
    found = []
    for bb in nested:
        found.append(next((t for t, o in orders.items() if bb.order == o), None))
    if found and all(t == found[0] for t in found) and found[0]:
        first = nested[0].order[0]
        return found[0], (f"from the weight order Keras wrote (trainable weights first; the backbone "
                          f"groups start with {first[0]}/{first[1]})")
    return None, ("the weight order in the backbone groups matches neither the crop nor the full "
                  "trainable set")


# ----------------------------------------------------------------------------- object-path layout
def _vars_datasets(g, content: Content) -> list[tuple[int, str, object]]:
    out = []
    if "vars" not in g:
        return out
    for k in g["vars"]:
        obj = g["vars"][k]
        if isinstance(obj, h5py.Dataset) and k.isdigit():
            out.append((int(k), obj.name, obj))
        else:
            content.unmapped += [obj.name] if isinstance(obj, h5py.Dataset) else \
                [f"{obj.name}/{p}" for p in _datasets(obj)]
    return sorted(out)


def _counter_key(name: str) -> tuple[str, int]:
    m = re.match(r"^(.*?)(?:_(\d+))?$", name)
    return m.group(1), int(m.group(2) or 0)


def parse_object_path(f, content: Content) -> None:
    content.layout = "Keras object-path layout (layers/.../vars, *.weights.h5 of Keras >= 2.12 / Keras 3)"
    for name in f:
        if name in SKIPPED_GROUPS:
            content.skipped[name] = len(_datasets(f[name])) if isinstance(f[name], h5py.Group) else 1
        elif name not in ("layers", "vars"):
            obj = f[name]
            content.unmapped += [obj.name] if isinstance(obj, h5py.Dataset) else \
                [f"{obj.name}/{p}" for p in _datasets(obj)]
    if "vars" in f:
        content.unmapped += [f"/vars/{p}" for p in _datasets(f["vars"])]
    L = f["layers"]
    children = sorted(L.keys(), key=_counter_key)
    nested = [c for c in children if isinstance(L[c], h5py.Group) and "layers" in L[c]]
    if nested:
        for c in nested:
            g = L[c]
            name_attr = _decode(g["vars"].attrs["name"]) if "vars" in g and "name" in g["vars"].attrs else None
            bb = Backbone(label=f"layers/{c}" + (f" ({name_attr})" if name_attr else ""),
                          hint=_name_hint(name_attr) if name_attr else None)
            if "vars" in g:
                content.unmapped += [f"{g['vars'].name}/{p}" for p in _datasets(g["vars"])]
            _parse_object_backbone(g["layers"], bb, content)
            content.backbones.append(bb)
        for c in children:
            if c in nested:
                continue
            dsets = _vars_datasets(L[c], content)
            if not dsets:
                content.unmapped += [f"{L[c].name}/{p}" for p in _datasets(L[c])]
                continue
            if _counter_key(c)[0] == "dense" and [i for i, _, _ in dsets] == [0, 1] and not content.head:
                content.head = {"kernel": dsets[0][1:], "bias": dsets[1][1:]}
                content.head_label = f"layers/{c}"
            else:
                content.unmapped += [p for _, p, _ in dsets]
        if content.head and "optimizer" in f:
            content.model_type, content.model_type_how = _optimizer_model_type(f["optimizer"], content)
        elif content.head:
            content.model_type_how = "the file has no optimizer state (weights alone do not record the trainable set)"
    else:
        bb = Backbone(label="layers/ (the file's root model)")
        _parse_object_backbone(L, bb, content)
        content.backbones.append(bb)


def _parse_object_backbone(L, bb: Backbone, content: Content) -> None:
    children = list(L.keys())
    rescale = [c for c in children if RESCALE_RE.match(c)]
    for c in children:
        g = L[c]
        if not isinstance(g, h5py.Group):
            content.unmapped.append(g.name)
            continue
        if "layers" in g:
            content.problems.append(f"{g.name}: unexpected nested model inside a backbone")
            continue
        dsets = _vars_datasets(g, content)
        extra = [p for p in _datasets(g) if not p.startswith("vars/")]
        content.unmapped += [f"{g.name}/{p}" for p in extra]
        if not dsets:
            continue
        name_attr = _decode(g["vars"].attrs["name"]) if "name" in g["vars"].attrs else None
        if NORM_RE.match(c):
            for i, path, ds in dsets:
                if i < 3:
                    bb.norm[KIND_VARS["norm"][i]] = (path, ds)
                else:
                    content.unmapped.append(path)
            continue
        layer = B0_OBJECT_NAMES.get(c)
        if layer is None:
            content.unmapped += [p for _, p, _ in dsets]
            continue
        if name_attr is not None and canon(name_attr)[0] != layer:
            content.problems.append(f"{g.name} is named {name_attr!r} in the file but the EfficientNetB0 "
                                    f"layer order says {layer!r}")
            continue
        names = KIND_VARS[B0_KIND[layer]]
        for i, path, ds in dsets:
            if i < len(names):
                _add_var(bb, layer, names[i], path, ds, content)
            else:
                content.unmapped.append(path)
    if bb.norm:
        bb.rescaling_count = len(rescale) if rescale else None
        bb.rescalings = None


def _optimizer_model_type(opt, content: Content) -> tuple[str | None, str]:
    """Crop vs full from the optimizer's slot variables: k slots (Adam: m, v) per trainable tensor."""
    shapes = [opt[p].shape for p in _datasets(opt)]
    slots = Counter(s for s in shapes if len(s) > 0)
    k = slots.get((DENSE_IN, 1), 0)
    if k == 0:
        return None, ("the optimizer group holds no per-weight slot variables (e.g. plain SGD), so the "
                      "trainable set is not recorded")
    expect = {}
    for mtype in MODEL_TYPES:
        c = Counter()
        for bb in content.backbones:
            for (layer, var), (_p, ds) in bb.vars.items():
                if mtype == "crop" and B0_INDEX[layer] >= FREEZE_INDEX and var in TRAINABLE_VARS:
                    c[ds.shape] += k
        for _p, ds in content.head.values():
            c[ds.shape] += k
        expect[mtype] = c
    for mtype, c in expect.items():
        if c == slots:
            n = sum(c.values()) // k
            return mtype, (f"from the optimizer state: {len(shapes)} variables = {k} slot(s) for each of "
                           f"{n} trainable tensors")
    return None, (f"the optimizer's {sum(slots.values())} slot variables match neither the crop nor "
                  f"the full trainable set")


# ----------------------------------------------------------------------------- to torch
def _array(ds) -> np.ndarray:
    return np.asarray(ds[()])


def _convert_backbone(bb: Backbone, prefix: str, template: dict, sd: dict, content: Content) -> int:
    n_values = 0
    for name, kind, _ in B0_WEIGHTED:
        for var in KIND_VARS[kind]:
            if (name, var) not in bb.vars:
                content.missing.append(f"{name}/{var} in {bb.label}")
    for (name, var), (path, ds) in bb.vars.items():
        kind = B0_KIND[name]
        mod = prefix + _torch_key(name)
        a = _array(ds)
        n_values += a.size
        if kind in ("conv", "conv_bias") and var == "kernel":
            key, t = f"{mod}.weight", a.transpose(3, 2, 0, 1) if a.ndim == 4 else a
        elif kind == "dwconv":
            # (kh, kw, C, M) -> (C*M, 1, kh, kw); TF output channel = c*M + m
            key = f"{mod}.weight"
            t = a.reshape(a.shape[0], a.shape[1], -1).transpose(2, 0, 1)[:, None] if a.ndim == 4 else a
        else:
            key, t = f"{mod}.{TORCH_VAR[var]}", a
        _put(sd, template, key, t, path, content)
    scale, shift = np.ones(3), np.zeros(3)
    if bb.norm:
        scale, shift = _input_affine(bb, content)
    _put(sd, template, prefix + "input_scale", scale, "(input preprocessing)", content)
    _put(sd, template, prefix + "input_shift", shift, "(input preprocessing)", content)
    return n_values


def _input_affine(bb: Backbone, content: Content) -> tuple[np.ndarray, np.ndarray]:
    """Fold keras.applications' Rescaling(1/255) -> Normalization -> [Rescaling(1/sqrt(std))] into
    y = x * scale + shift for x = pixel/255."""
    missing = [v for v in ("mean", "variance") if v not in bb.norm]
    if missing:
        content.problems.append(f"Normalization layer without {', '.join(missing)}")
        return np.ones(3), np.zeros(3)
    mean = _array(bb.norm["mean"][1]).astype(np.float64).reshape(-1)
    var = _array(bb.norm["variance"][1]).astype(np.float64).reshape(-1)
    if mean.size != 3 or var.size != 3:
        content.problems.append(f"Normalization mean/variance have {mean.size}/{var.size} values, expected 3")
        return np.ones(3), np.zeros(3)
    d = np.maximum(np.sqrt(var), 1e-7)                   # Keras: (x - mean) / max(sqrt(var), epsilon)
    resc = bb.rescalings
    if resc is None:
        count = bb.rescaling_count
        if count is None:
            bb.notes.append("no Rescaling layers recorded in the file: assuming keras.applications' "
                            "Rescaling(1/255) and no imagenet Rescaling")
            count = 1
        if count not in (1, 2):
            content.problems.append(f"{count} Rescaling layers before the stem (keras.applications has 1, "
                                    f"or 2 when built with weights='imagenet')")
            return np.ones(3), np.zeros(3)
        resc = [(1.0 / 255.0, 0.0)] + ([([1.0 / math.sqrt(s) for s in IMAGENET_STD], 0.0)] if count == 2 else [])
        how = "scales assumed from keras.applications (not stored in weight files)"
    else:
        how = "scales read from model_config"
    s1, o1 = (np.asarray(v, np.float64) for v in resc[0])
    s2, o2 = (np.asarray(v, np.float64) for v in resc[1]) if len(resc) > 1 else (np.ones(3), np.zeros(3))
    scale = 255.0 * s1 * s2 / d * np.ones(3)
    shift = (o1 - mean) * s2 / d + o2
    bb.notes.append(f"keras.applications input preprocessing folded in: Rescaling + Normalization"
                    f"{' + imagenet Rescaling' if len(resc) > 1 else ''} ({how}); the converted model "
                    f"takes [0,1] input where Keras took 0-255")
    return scale, shift


def _put(sd: dict, template: dict, key: str, value: np.ndarray, source: str, content: Content) -> None:
    if key not in template:
        content.problems.append(f"{source} maps to unknown model tensor {key}")
        return
    ref = template[key]
    t = torch.from_numpy(np.ascontiguousarray(value)).to(ref.dtype)
    if tuple(t.shape) != tuple(ref.shape):
        content.mismatched.append(f"{source}: shape {tuple(value.shape)} does not fit {key} "
                                  f"{tuple(ref.shape)}")
        return
    sd[key] = t


def _assign_backbones(content: Content) -> list[tuple[int, Backbone]]:
    bbs = content.backbones
    hints = [bb.hint for bb in bbs]
    if all(hints) and sorted(hints) == ["1", "2"]:
        how = "by name"
        ordered = sorted(bbs, key=lambda b: b.hint)
    elif not any(hints):
        how = "by order in the file"
        ordered = bbs
    else:
        content.problems.append(f"cannot tell which backbone is which: name hints {hints}")
        return []
    content.notes.append(f"backbones assigned {how}")
    return list(enumerate(ordered, start=1))


# ----------------------------------------------------------------------------- main entry points
def read_content(path: Path) -> Content:
    if h5py is None:
        raise UserError("h5py is not installed")
    require_file(path, "Keras .h5 file")
    if path.stat().st_size == 0:
        raise UserError(f"{path}: file is empty")
    if not h5py.is_hdf5(path):
        raise UserError(f"{path}: not an HDF5 file (Keras .h5 weights expected)")
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise UserError(f"{path}: unreadable HDF5 file, truncated or corrupt ({_first_line(e)})") from None
    content = Content(layout="")
    with f:
        try:
            if read_str_list(f.attrs, "layer_names") is not None or "model_weights" in f:
                parse_legacy(f, content)
            elif "layers" in f:
                parse_object_path(f, content)
            else:
                raise UserError(f"{path}: not a Keras weights file (no layer_names attribute, no "
                                f"model_weights or layers group)")
            state = _to_state_dict(path, content)
        except UserError:
            raise
        except (OSError, RuntimeError, KeyError, ValueError) as e:
            raise UserError(f"{path}: unreadable HDF5 content, truncated or corrupt "
                            f"({type(e).__name__}: {_first_line(e)})") from None
    content.state = state
    return content


def _first_line(e: BaseException) -> str:
    s = str(e).strip()
    return s.splitlines()[0] if s else type(e).__name__


def _to_state_dict(path: Path, content: Content) -> dict:
    nb = len(content.backbones)
    if content.head or nb == 2:
        if nb != 2 or not content.head:
            raise UserError(f"{path}: not a CRBL weight file: found {nb} EfficientNetB0 backbone(s) and "
                            f"{'a' if content.head else 'no'} Dense head (expected 2 and 1)"
                            + _unmapped_suffix(content))
        template = CRBL().state_dict()
        sd: dict = {}
        content.kind = "CRBL (2 x EfficientNetB0 + Dense 'predictions')"
        content.per_backbone = []
        for idx, bb in _assign_backbones(content):
            n = _convert_backbone(bb, f"backbone{idx}.", template, sd, content)
            content.per_backbone.append((idx, bb, len(bb.vars), n))
        k = _array(content.head["kernel"][1])
        b = _array(content.head["bias"][1])
        _put(sd, template, "predictions.weight", k.T if k.ndim == 2 else k, content.head["kernel"][0], content)
        _put(sd, template, "predictions.bias", b, content.head["bias"][0], content)
        content.head_values = k.size + b.size
    elif nb == 1:
        template = EfficientNetB0().state_dict()
        sd = {}
        content.kind = "single EfficientNetB0 backbone (no top)"
        bb = content.backbones[0]
        if bb.hint:
            bb.notes.append(f"layer names carry the model{bb.hint}_ prefix")
        n = _convert_backbone(bb, "", template, sd, content)
        content.per_backbone = [(0, bb, len(bb.vars), n)]
    else:
        raise UserError(f"{path}: no EfficientNetB0 / CRBL weights found" + _unmapped_suffix(content))
    for key, ref in template.items():
        if key.endswith("num_batches_tracked") and key not in sd:
            sd[key] = torch.zeros_like(ref)
    if content.unmapped or content.missing or content.mismatched or content.problems:
        parts = []
        if content.problems:
            parts.append(f"{_short(content.problems, 2)}")
        if content.mismatched:
            parts.append(f"{len(content.mismatched)} tensor(s) of the wrong shape: {_short(content.mismatched, 2)}")
        if content.unmapped:
            parts.append(f"{len(content.unmapped)} tensor(s) that map to nothing: {_short(content.unmapped, 3)}")
        if content.missing:
            parts.append(f"{len(content.missing)} model tensor(s) missing: {_short(content.missing, 3)}")
        raise UserError(f"{path}: does not match {content.kind}: {'; '.join(parts)}")
    missing = [k for k in template if k not in sd]
    if missing:  # pragma: no cover - every model tensor is produced above or reported as a problem
        raise UserError(f"{path}: {len(missing)} model tensor(s) not filled: {_short(missing)}")
    return sd


def _unmapped_suffix(content: Content) -> str:
    if content.unmapped:
        return f"; {len(content.unmapped)} tensor(s) map to nothing: {_short(content.unmapped)}"
    return ""


def convert(in_path, out_path, model_type: str | None = None, log=print, overwrite: bool = False) -> dict:
    """Convert IN (Keras .h5) to OUT (state_dict .pth). Returns the state_dict. Raises UserError.
    An existing OUT is replaced only with `overwrite`."""
    in_path, out_path = Path(in_path), Path(out_path)
    if model_type is not None and model_type not in MODEL_TYPES:
        raise UserError(f"--model-type must be one of {', '.join(MODEL_TYPES)}, got {model_type!r}")
    refuse_output_over_inputs([("IN", in_path)], files=[("OUT", out_path)])
    check_output_file(out_path, overwrite, flag="OUT")
    content = read_content(in_path)
    is_crbl = content.kind.startswith("CRBL")
    if model_type is not None and not is_crbl:
        raise UserError(f"{in_path}: --model-type applies to whole CRBL files, but this file holds a "
                        f"{content.kind}")
    if is_crbl:
        if content.model_type and model_type and content.model_type != model_type:
            raise UserError(f"{in_path}: the file was saved from the {content.model_type} model "
                            f"({content.model_type_how}), but --model-type {model_type} was given")
        if content.model_type:
            mt_line = f"model type: {content.model_type} ({content.model_type_how})"
        else:
            mt_line = (f"model type: cannot be determined from this file ({content.model_type_how})"
                       + (f"; using --model-type {model_type}" if model_type else
                          "; weights are the same for crop and full, pick with build_model()"))
    sd = content.state
    log(f"input: {in_path}")
    log(f"layout: {content.layout}")
    log(f"content: {content.kind}")
    for idx, bb, nt, nv in content.per_backbone:
        name = {0: "EfficientNetB0", 1: "backbone1 (imagenet)", 2: "backbone2 (noisy-student)"}[idx]
        log(f"{name} <- {bb.label}: {nt} tensors, {nv:,} values"
            + (f" + Normalization ({len(bb.norm)} tensors)" if bb.norm else ""))
        for note in bb.notes:
            log(f"  note: {note}")
    if is_crbl:
        log(f"head: predictions <- {content.head_label}: 2 tensors, {content.head_values:,} values")
        for note in content.notes:
            log(f"note: {note}")
        log(mt_line)
    for g, n in content.skipped.items():
        log(f"skipped: group {g!r} ({n} tensors; not model weights)")
    n_params = sum(v.numel() for k, v in sd.items()
                   if v.is_floating_point() and not k.endswith(("input_scale", "input_shift")))
    atomic_torch_save(sd, out_path)
    log(f"wrote {out_path}: {len(sd)} tensors, {n_params:,} weight values "
        f"(load strictly into {'crbl.model.build_model(...)' if is_crbl else 'crbl.model.EfficientNetB0()'})")
    return sd


def main(argv=None) -> None:
    p = ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input", help="Keras weights file (.h5 / .weights.h5)")
    p.add_argument("output", help="output PyTorch state_dict (.pth)")
    p.add_argument("--model-type", choices=MODEL_TYPES, default=None,
                   help="CRBL files: the model the file must come from (checked where the file tells)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    a = p.parse_args(argv)
    convert(a.input, a.output, a.model_type, overwrite=a.overwrite)


if __name__ == "__main__":
    run_cli(main)
