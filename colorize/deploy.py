"""The deployed colorize graph: what colorize/infer.py runs (in PyTorch or ONNX Runtime) and what
scripts/export_onnx.py --task colorize writes.

    image     (N, 3, H, W) float32, RGB in [0, 1], NCHW: the damaged grayscale image read as RGB
              (a gray PNG gives three equal channels), resized to the model's H x W like OpenCV's
              cv2.resize(INTER_LINEAR) (half-pixel centres, no antialiasing; colorize.data.resize_u8),
              kept in 8 bit, then / 255
    restored  (N, 3, H, W) float32, RGB in [0, 1]: the restored colour image at the model's size

The resizing stays outside the graph, because every image has its own size and a batch has one:
infer.py does it in the same code for both engines, before the graph (to H x W, 8 bit) and after
it (back to the input's size: bilinear, half-pixel centres, no antialiasing, clamped to [0, 1],
x 255, rounded half to even, 8-bit PNG; colorize.infer.restore_to_size).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from colorize.data import TASK, _damage, _scene, gray_u8
from colorize.model import MODEL_NAMES
from common.io import UserError
from common.onnx import ExportSpec, data_rng, image_batch

INPUT_NAMES = ["image"]
OUTPUT_NAMES = ["restored"]
SIZE_MULTIPLE = 16          # four 2x poolings


class ColorizeGraph(nn.Module):
    """image in [0, 1] at the model size -> (restored,), exactly what colorize/infer.py computes per batch."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor]:
        return (self.model(image).float(),)


def check_size(name: str, size: tuple[int, int], what: str) -> None:
    """H and W multiples of 16; improved_unet's bottleneck InstanceNorm needs more than one value
    per channel (PyTorch refuses a 1x1 bottleneck, where ONNX Runtime would silently output zeros)."""
    h, w = size
    if h % SIZE_MULTIPLE or w % SIZE_MULTIPLE:
        raise UserError(f"{what}: height and width must be multiples of {SIZE_MULTIPLE} (the U-Nets pool four times)")
    if name == "improved_unet" and h * w < 2 * SIZE_MULTIPLE ** 2:
        raise UserError(f"{what}: improved_unet needs at least 16x32 (its bottleneck normalises over H/16 x W/16 "
                        f"positions, and one is not enough)")


def metadata(info: dict, size: tuple[int, int], weights: Path) -> dict:
    h, w = size
    return {
        "task": TASK, "model": info["model"], "width": info["width"], "weights": Path(weights).name,
        "image_size": [h, w], "input_range": [0.0, 1.0], "input_layout": "NCHW RGB",
        "size_multiple": SIZE_MULTIPLE,
        "inputs": f"image: float32 (N,3,{h},{w}) NCHW RGB in [0,1]: the damaged grayscale image read as RGB, "
                  f"resized to {h}x{w} like cv2.resize INTER_LINEAR (half-pixel centres, no antialiasing), "
                  f"8-bit, / 255",
        "outputs": f"restored: float32 (N,3,{h},{w}) RGB in [0,1] at the model size",
        "postprocessing": "colorize/infer.py: resize back to the input's size (bilinear, half-pixel centres, "
                          "no antialiasing), clamp to [0,1], x 255, round half to even, 8-bit RGB PNG",
    }


def export_spec(weights: Path, model: str | None = None, size: tuple[int, int] | None = None) -> ExportSpec:
    """The deployed graph of a colorize/train.py checkpoint or an original checkpoint (best_model.pth
    and the like; the architecture is read from its keys, --model must agree). Default size: the
    checkpoint's training size, or 128 (the original's) for the original's files."""
    from colorize.infer import ORIGINAL_SIZE, load_model  # infer imports this module

    if model is not None and model not in MODEL_NAMES:
        raise UserError(f"--model {model}: a colorize model is one of {', '.join(MODEL_NAMES)}")
    notes = []
    net, info = load_model(Path(weights), model)
    if size is None:
        if info["img_size"] is None:
            notes.append(f"note: the weights do not record their training size: exported at {ORIGINAL_SIZE}x"
                         f"{ORIGINAL_SIZE} (the original's default); give --size H W to match how they were trained")
        size = (int(info["img_size"] or ORIGINAL_SIZE),) * 2
    size = tuple(size)
    check_size(info["model"], size, f"--size {size[0]} {size[1]}")

    def make_inputs(batch: int, g: torch.Generator, hw: tuple[int, int] = size) -> tuple[torch.Tensor]:
        """Damaged grayscale scenes of the built-in generator, as infer.py feeds them (RGB, resized)."""
        rng = data_rng(g)
        gray = [_damage(rng, gray_u8(_scene(rng, max(hw)))) for _ in range(batch)]
        return (image_batch([np.repeat(a[..., None], 3, 2) for a in gray], hw),)

    notes.append("the graph takes images already resized to the model size and returns them at that size; "
                 "infer.py resizes to and from each image's own size (the file's metadata says how)")
    return ExportSpec(ColorizeGraph(net).eval(), make_inputs, INPUT_NAMES, OUTPUT_NAMES,
                      metadata(info, size, weights), tolerance=1e-4, notes=notes,
                      spatial=(*INPUT_NAMES, *OUTPUT_NAMES), size_multiple=SIZE_MULTIPLE)
