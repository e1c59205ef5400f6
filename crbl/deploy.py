"""The deployed CRBL graph: what crbl/infer.py runs (in PyTorch or ONNX Runtime) and what
scripts/export_onnx.py --task crbl writes.

    image        (N, 3, H, W) float32, RGB in [0, 1], NCHW: an image after crbl.data.preprocess
                 (crop model: the part's bounding box; full model: the image without its first
                 4 rows/columns; both resized to 128x128)
    probability  (N,) float32: P(defect) = sigmoid(logit); defect if probability > threshold
                 (infer.py's defaults: 0.01 for the crop model, 0.5 for the full model; combined:
                 defect if crop > 0.01 or full > 0.5)
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import torch.nn as nn

from common.device import autocast, in_chunks, in_inference_mode
from common.io import UserError
from common.onnx import ExportSpec, data_rng, image_batch
from crbl.data import INPUT_SIZE, _part_image, preprocess_crop, preprocess_full
from crbl.model import CRBL, DEFAULT_THRESHOLDS, MODEL_TYPES

TASK = "crbl"
CPU_CHUNK = 16    # images per backbone micro-batch on the CPU: 1.5 MB of activation per 128x128 image at
                  # the widest layer keeps each under malloc's mmap threshold (common.device.in_chunks)
INPUT_NAMES = ["image"]
OUTPUT_NAMES = ["probability"]


class CRBLProbability(nn.Module):
    """image in [0, 1] -> (probability,), exactly what crbl/infer.py computes per batch.

    streams=2 (CPU inference): the two backbones run at the same time in two threads, then the head
    on the two halves of the batch, each thread with torch.get_num_threads() intra-op threads
    (crbl/infer.py halves that number). The same arithmetic (identical outputs); the difference is
    that no core waits at a barrier after every operator for another one, which on a busy machine
    costs more than the operator (two intra-op threads on two loaded cores ran CRBL several times
    slower than one).

    amp_dtype (infer.py --amp bf16): the two backbones under autocast; the bilinear head (signed square
    root of values near 1e-12, L2 norm) and the sigmoid in fp32. Autocast is per thread, so each
    stream enters it."""

    def __init__(self, model: CRBL, streams: int = 1, amp_dtype: torch.dtype | None = None):
        super().__init__()
        self.model = model
        self.streams = streams
        self.amp_dtype = amp_dtype
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="crbl") if streams > 1 else None

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor]:
        parallel = (self._pool is not None and image.device.type == "cpu" and not torch.is_grad_enabled()
                    and not torch.onnx.is_in_onnx_export() and not self.model.training)
        if parallel:
            logits = self._two_streams(image)
        elif image.device.type == "cpu" and not torch.is_grad_enabled() and not torch.onnx.is_in_onnx_export():
            logits = in_chunks(self._one_stream, image, CPU_CHUNK)
        else:
            logits = self.model(image) if torch.onnx.is_in_onnx_export() else self._one_stream(image)
        return (torch.sigmoid(logits.float())[:, 0],)

    def _two_streams(self, image: torch.Tensor) -> torch.Tensor:
        m = self.model
        x = image.contiguous(memory_format=torch.channels_last)
        other = self._pool.submit(in_inference_mode(in_chunks), self._amp(m.backbone1.forward_channels_last), x,
                                  CPU_CHUNK)
        f2 = in_chunks(self._amp(m.backbone2.forward_channels_last), x, CPU_CHUNK)
        f1 = other.result()
        half = (x.shape[0] + 1) // 2
        first = self._pool.submit(in_inference_mode(m.forward_head), (f1[:half], f2[:half]))
        rest = [m.forward_head((f1[half:], f2[half:]))] if x.shape[0] > half else []
        return torch.cat([first.result(), *rest])

    def _amp(self, backbone):
        if self.amp_dtype is None:
            return backbone

        def run(x: torch.Tensor) -> torch.Tensor:
            with autocast(x.device, self.amp_dtype):
                return backbone(x).float()
        return run

    def _one_stream(self, image: torch.Tensor) -> torch.Tensor:
        if self.amp_dtype is None:
            return self.model(image)
        m, x = self.model, image.contiguous(memory_format=torch.channels_last)
        return m.forward_head((self._amp(m.backbone1.forward_channels_last)(x),
                               self._amp(m.backbone2.forward_channels_last)(x)))


def metadata(model_type: str, size: tuple[int, int], weights: Path) -> dict:
    return {
        "task": TASK, "model": model_type, "weights": Path(weights).name,
        "inputs": "image: float32 (N,3,H,W) NCHW, RGB in [0,1], after crbl.data.preprocess "
                  f"({'crop: part bounding box' if model_type == 'crop' else 'full: first 4 rows/columns dropped'}, "
                  f"resized to {size[0]}x{size[1]})",
        "outputs": "probability: float32 (N,) P(defect) = sigmoid(logit)",
        "image_size": list(size), "input_range": [0.0, 1.0], "input_layout": "NCHW RGB",
        "threshold": DEFAULT_THRESHOLDS[model_type],
        "decision": f"defect if probability > threshold; combined crop+full: defect if crop > "
                    f"{DEFAULT_THRESHOLDS['crop']} or full > {DEFAULT_THRESHOLDS['full']}",
    }


def export_spec(weights: Path, model: str | None = None, size: tuple[int, int] | None = None) -> ExportSpec:
    """The deployed graph of a training checkpoint or converted .pth; `model` is the model type
    (crop/full), read from a training checkpoint, needed for a converted file."""
    from crbl.infer import load_model  # infer imports this module

    if model is not None and model not in MODEL_TYPES:
        raise UserError(f"--model {model}: a CRBL model is one of {', '.join(MODEL_TYPES)}")
    net, stored, thresholds = load_model(weights, model, f"--model {model}")
    model_type = model or stored
    if model_type is None:
        raise UserError(f"{weights}: converted weights do not say whether they are a crop or a full model: "
                        f"give --model crop or --model full")
    size = tuple(size or (INPUT_SIZE, INPUT_SIZE))

    def make_inputs(batch: int, g: torch.Generator) -> tuple[torch.Tensor]:
        """Built-in parts (normal and defect in turn), preprocessed as infer.py does."""
        rng = data_rng(g)
        prep = preprocess_crop if model_type == "crop" else preprocess_full
        return (image_batch([prep(_part_image(rng, i % 2 == 1)) for i in range(batch)], size),)

    meta = metadata(model_type, size, weights)
    if thresholds:   # infer.py --engine onnxruntime --threshold val-f1|val-youden reads them from here
        meta["val_thresholds"] = {k: thresholds.get(k) for k in ("val_f1", "val_youden", "n_val", "epoch")}
    return ExportSpec(CRBLProbability(net), make_inputs, INPUT_NAMES, OUTPUT_NAMES, meta, tolerance=1e-5)
def calibration_set(path: Path, meta: dict):
    """--calib for --int8: a folder of images or a CSV (image_path[,impurity]) -> the preprocessed
    images (as infer.py feeds them) and their labels where the CSV has them all."""
    from common.quantize import CalibrationSet, check_count
    from crbl.data import preprocess
    from crbl.infer import collect_inputs

    paths, labels = collect_inputs([Path(path)])
    check_count(len(paths), str(path))
    images = torch.stack([preprocess(p, meta["model"]) for p in paths])
    if tuple(images.shape[-2:]) != tuple(meta["image_size"]):
        images = nn.functional.interpolate(images, size=tuple(meta["image_size"]), mode="bilinear",
                                           align_corners=False, antialias=True)
    y = torch.tensor([labels[p] for p in paths]) if len(labels) == len(paths) else None
    return CalibrationSet((images,), y, str(path))
