"""The deployed battery CT graphs: what battery_ct/infer.py runs (in PyTorch or ONNX Runtime) and
what scripts/export_onnx.py --task battery_ct writes. Normalisation and post-processing are inside,
so an application feeds the resized image in [0, 1] and reads the answer:

    image        (N, 3, H, W) float32, RGB in [0, 1], NCHW, resized (bilinear, antialiased) to the
                 model's size; grey CT slices are replicated to 3 channels
    metadata     late_fusion only: (N, 2) float32 [battery_type (0 cell / 1 module), axis (0 x / 1 y / 2 z)]
  classifiers:
    probabilities  (N, C) float32 softmax over the classes in `class_names`
    label          (N,) int64 predicted class index
    coarse_probabilities  hdcnn only: (N, 2) [normal, defect] from the coarse head
                 (hdcnn's label and probabilities follow its two-level rule, battery_ct.model.hdcnn_decision)
  ae:
    score        (N,) float32 mean squared reconstruction error; defect if score >= threshold
  deeplab_seg:
    logits       (N, C, H, W) float32 per-pixel class logits (argmax = class; infer.py averages the
                 logits of overlapping windows first)
"""
from __future__ import annotations

from argparse import Namespace
from pathlib import Path

import torch
import torch.nn as nn

from battery_ct.data import IMAGENET_MEAN, IMAGENET_STD, _slice_image
from battery_ct.model import CLASS_NAMES, DEFECT_CLASSES, MODEL_NAMES, anomaly_score
from battery_ct.train import TASK, classify
from common.device import autocast
from common.io import UserError
from common.onnx import ExportSpec, data_rng, image_batch

SEGMENT_SIZE = 640           # infer.py's default sliding window
NORMALIZATION = {"imagenet": (IMAGENET_MEAN, IMAGENET_STD), "tanh": ((0.5,) * 3, (0.5,) * 3)}


def names(model: str) -> tuple[list[str], list[str]]:
    """(input names, output names) of a model's deployed graph."""
    inputs = ["image", "metadata"] if model == "late_fusion" else ["image"]
    if model == "ae":
        return inputs, ["score"]
    if model == "deeplab_seg":
        return inputs, ["logits"]
    return inputs, ["probabilities", "label"] + (["coarse_probabilities"] if model == "hdcnn" else [])


class BatteryGraph(nn.Module):
    """image in [0, 1] (+ metadata for late_fusion) -> the tuple of outputs named by names(model)."""

    def __init__(self, model: nn.Module, name: str, normalize: str, amp_dtype: torch.dtype | None = None):
        super().__init__()
        self.amp_dtype = amp_dtype          # infer.py --amp: the network under autocast, its outputs back in fp32
        if normalize not in NORMALIZATION:
            raise UserError(f"unknown input normalisation {normalize!r} (expected one of {', '.join(NORMALIZATION)})")
        mean, std = NORMALIZATION[normalize]
        self.model, self.name = model, name
        self.register_buffer("mean", torch.tensor(mean).view(3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(3, 1, 1), persistent=False)

    def forward(self, image: torch.Tensor, *metadata: torch.Tensor) -> tuple[torch.Tensor, ...]:
        x = (image - self.mean) / self.std              # torchvision Normalize's arithmetic
        net = self.model if self.amp_dtype is None or torch.onnx.is_in_onnx_export() else self._low_precision
        if self.name == "ae":
            return (anomaly_score(x, net(x)[0]),)
        if self.name == "deeplab_seg":
            return (net(x).float(),)
        probs, pred, coarse = classify(net, self.name, x, metadata[0] if metadata else None)
        return (probs, pred) if coarse is None else (probs, pred, coarse)

    def _low_precision(self, *inputs):
        with autocast(inputs[0].device, self.amp_dtype):
            out = self.model(*inputs)
        return tuple(t.float() for t in out) if isinstance(out, (tuple, list)) else out.float()


def metadata(cfg: dict, extra: dict, size: tuple[int, int], weights: Path) -> dict:
    name = cfg["model"]
    inputs, outputs = names(name)
    meta = {"task": TASK, "model": name, "weights": Path(weights).name, "image_size": list(size),
            "input_layout": "NCHW RGB", "input_range": [0.0, 1.0], "normalization_in_graph": cfg["normalize"],
            "inputs": "image: float32 (N,3,H,W) RGB in [0,1], resized to the model size"
                      + ("; metadata: float32 (N,2) [battery_type 0 cell/1 module, axis 0 x/1 y/2 z]"
                         if "metadata" in inputs else ""),
            "output_names": outputs}
    if name == "ae":
        meta["outputs"] = "score: float32 (N,) mean squared reconstruction error; defect if score >= threshold"
        if extra.get("threshold") is not None:
            meta["threshold"] = float(extra["threshold"])
            meta["threshold_method"] = str(extra.get("threshold_method", "stored"))
    elif name == "deeplab_seg":
        meta["outputs"] = "logits: float32 (N,C,H,W) per-pixel class logits; class = argmax over C"
        meta["num_classes"] = cfg["num_classes"]
    else:
        meta["outputs"] = ("probabilities: float32 (N,C) softmax over class_names; label: int64 (N,) predicted class"
                           + ("; coarse_probabilities: float32 (N,2) [normal, defect]" if name == "hdcnn" else ""))
        meta["class_names"] = list(CLASS_NAMES[:cfg["num_classes"]])
        meta["num_classes"] = cfg["num_classes"]
    return meta


def export_spec(weights: Path, model: str | None = None, size: tuple[int, int] | None = None) -> ExportSpec:
    """The deployed graph of a battery_ct training checkpoint or a converted state_dict (--model)."""
    from battery_ct.infer import load_model  # infer imports this module

    if model is not None and model not in MODEL_NAMES:
        raise UserError(f"--model {model}: unknown battery_ct model; choose one of {', '.join(MODEL_NAMES)}")
    net, cfg, extra = load_model(Namespace(weights=weights, model=model, image_size=None), fuse=False)
    return graph_spec(net, cfg, extra, size, weights)


def graph_spec(net: nn.Module, cfg: dict, extra: dict, size: tuple[int, int] | None, weights: Path) -> ExportSpec:
    """The export of a loaded model; cfg as battery_ct.infer.load_model returns it."""
    name = cfg["model"]
    if size is None:
        size = (SEGMENT_SIZE, SEGMENT_SIZE) if name == "deeplab_seg" else (cfg["image_size"],) * 2
    if name == "ae" and (size[0] % 16 or size[1] % 16):
        raise UserError(f"--size {size[0]} {size[1]}: the autoencoder needs multiples of 16")
    inputs, outputs = names(name)

    def make_inputs(batch: int, g: torch.Generator, hw=size) -> tuple[torch.Tensor, ...]:
        """Built-in CT slices of every class in turn (and their metadata), at the graph's input size."""
        rng = data_rng(g)
        labels = [i % len(CLASS_NAMES) for i in range(batch)]
        kinds = [CLASS_NAMES[y].split("_")[0] for y in labels]
        axes = ["xyz"[int(rng.integers(3))] for _ in labels]
        image = image_batch([_slice_image(rng, k, y, a, size=max(hw)) for k, y, a in zip(kinds, labels, axes)], hw)
        if name != "late_fusion":
            return (image,)
        meta = torch.tensor([[float(k == "module"), float("xyz".index(a))] for k, a in zip(kinds, axes)])
        return image, meta

    notes = []
    if name == "deeplab_seg":
        notes.append(f"segment with: battery_ct/infer.py --onnx FILE --task segment --window {size[0]} (a model "
                     f"exported with --dynamic-size also takes --crop whole and any --window)")
    # any size traces except the autoencoder (its pooling matrices are built for one size)
    spatial = () if name == "ae" else tuple(inputs[:1]) + (("logits",) if name == "deeplab_seg" else ())
    return ExportSpec(BatteryGraph(net, name, cfg["normalize"]).eval(), make_inputs, inputs, outputs,
                      metadata(cfg, extra, tuple(size), weights), tolerance=1e-4, notes=notes, spatial=spatial,
                      size_multiple=32 if name in ("convnext_tiny", "drn_aspp") else 8)


def calibration_set(path: Path, meta: dict):
    """--calib for --int8: a split file (path<TAB>label), a split folder (its train.txt: calibration
    data should look like what the model sees) or a folder of images (no labels) -> the images resized
    as infer.py feeds them (+ late-fusion metadata) and their labels."""
    from battery_ct.data import SplitDataset, read_split
    from common.data import list_images
    from common.quantize import CalibrationSet, check_count

    path = Path(path)
    split = path / "train.txt" if path.is_dir() and (path / "train.txt").is_file() else path
    labelled = split.is_file() and split.suffix.lower() == ".txt"
    items = read_split(split, num_classes=int(meta.get("num_classes", len(CLASS_NAMES)))) if labelled \
        else [(p, 0) for p in list_images(path)]
    check_count(len(items), str(split))
    h, w = meta["image_size"]
    if h != w:
        raise UserError(f"--size {h} {w}: --int8 calibrates square models only (battery_ct/infer.py feeds squares)")
    ds = SplitDataset(items, h, with_meta=meta["model"] == "late_fusion", normalize="none")
    samples = [ds[i] for i in range(len(ds))]
    inputs = (torch.stack([s[0] for s in samples]),)
    if meta["model"] == "late_fusion":
        inputs += (torch.stack([s[1] for s in samples]),)
    labels = torch.tensor([s[2] for s in samples]) if labelled else None
    if labels is not None and meta["model"] == "ae":
        labels = torch.isin(labels, torch.tensor(DEFECT_CLASSES)).long()     # the AUC of defect vs normal
    return CalibrationSet(inputs, labels, str(split))
