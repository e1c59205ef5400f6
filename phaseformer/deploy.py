"""The deployed Phaseformer (or Spectroformer) graph: what phaseformer/infer.py runs per image or tile (in PyTorch or
ONNX Runtime) with the `ours` preset, and what scripts/export_onnx.py --task phaseformer writes.

    image     (N, 3, H, W) float32, RGB in [0, 1], NCHW; H and W multiples of 8 (three 2x
              down-samplings). infer.py pads an image's bottom/right edge by reflection to the next
              multiple of 8 and cuts the output back; images larger than --tile px are restored in
              overlapping tiles blended with linear ramps (the same code for both engines).
    restored  (N, 3, H, W) float32 (the 1x head) or (N, 3, 2H, 2W) (--head 2x): the restored image,
              nominally in [0, 1] (no output activation; infer.py clamps before rounding to 8 bit)

The phase-only attention's FFT is exported as cos/sin DFT-matrix products computed in the graph
from the input's size (phaseformer.model.rfft2_matmul), so the graph takes any multiple of 8 with
--dynamic-size; its cost grows as N^2 per image line instead of the FFT's N log N.
Spectroformer (--model spectroformer, or detected from --weights; the 1x head only) exports its
FFTs the same way (phaseformer/spectral_export.py): SFCA's Re(FFT) / Re(IFFT) as cosine/sine
products, UpS's full complex FFT, |F| and angle(F) (Atan with quadrant fixes: ONNX has no Atan2)
and its complex inverse as real products.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from common.io import UserError
from common.onnx import ExportSpec, data_rng, image_batch
from phaseformer.data import clean_scene, underwater
from phaseformer.model import DOWNSAMPLE_FACTOR, MODEL_NAMES

TASK = "phaseformer"
INPUT_NAMES = ["image"]
OUTPUT_NAMES = ["restored"]
HEADS = ("1x", "2x")
DEFAULT_SIZE = (256, 256)       # a tile of the usual inference; --dynamic-size takes any multiple of 8


class PhaseformerGraph(nn.Module):
    """image in [0, 1] -> (restored,) of one head, exactly what phaseformer/infer.py computes per tile."""

    def __init__(self, model: nn.Module, head: str = "1x"):
        super().__init__()
        if head not in HEADS:
            raise ValueError(f"head must be one of {HEADS} (got {head!r})")
        self.model, self.head = model, head

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor]:
        return (self.model(image, head=self.head).float(),)


def check_size(size: tuple[int, int], what: str) -> None:
    h, w = size
    if h % DOWNSAMPLE_FACTOR or w % DOWNSAMPLE_FACTOR:
        raise UserError(f"{what}: height and width must be multiples of {DOWNSAMPLE_FACTOR} "
                        f"(the Phaseformer down-samples three times)")


def metadata(head: str, size: tuple[int, int], weights: Path, kind: str, model: str = "phaseformer") -> dict:
    h, w = size
    s = 2 if head == "2x" else 1
    fft = ("phase-only attention: rfft2 exported as cos/sin DFT-matrix MatMuls built from the input size"
           if model == "phaseformer" else
           "SFCA and UpS FFTs and the AGSSF gate exported as cos/sin DFT-matrix MatMuls built from the input size; "
           "angle(F) from Atan with quadrant fixes")
    return {
        "task": TASK, "model": model, "head": head, "weights": Path(weights).name, "weights_kind": kind,
        "image_size": [h, w], "input_range": [0.0, 1.0], "input_layout": "NCHW RGB",
        "size_multiple": DOWNSAMPLE_FACTOR, "output_scale": s,
        "inputs": f"image: float32 (N,3,H,W) NCHW RGB in [0,1], H and W multiples of {DOWNSAMPLE_FACTOR} "
                  f"(exported at {h}x{w})",
        "outputs": f"restored: float32 (N,3,{s}H,{s}W) RGB, nominally [0,1] (no output activation), the {head} head",
        "tiling": "phaseformer/infer.py: pad bottom/right by reflection to multiples of 8 and crop back; images "
                  "larger than --tile (default 512) are restored in tiles overlapping by --overlap (32) px, "
                  "blended with linear ramps; clamp to [0,1], x 255, +0.5, truncate: 8-bit RGB PNG",
        "fft": fft,
    }


def export_spec(weights: Path, model: str | None = None, size: tuple[int, int] | None = None,
                head: str | None = None) -> ExportSpec:
    """The deployed graph of any weights infer.py reads (our checkpoints, converted or official
    files); `head` 1x (default) or 2x; default size 256x256."""
    from phaseformer.model import build_model
    from phaseformer.official import read_weights

    if model is not None and model not in MODEL_NAMES:
        raise UserError(f"--model {model}: the phaseformer task's models are {', '.join(MODEL_NAMES)}")
    head = head or "1x"
    if head not in HEADS:
        raise UserError(f"--head {head}: one of {', '.join(HEADS)}")
    size = tuple(size or DEFAULT_SIZE)
    check_size(size, f"--size {size[0]} {size[1]}")
    state, info = read_weights(weights, model)
    if info["model"] == "spectroformer" and head != "1x":
        raise UserError(f"--head {head}: Spectroformer ({weights}) has one output, the 1x head")
    net = build_model(info["model"])
    net.load_state_dict(state, strict=True)
    return graph_spec(net.eval(), head, size, weights, info["kind"])


def graph_spec(net: nn.Module, head: str, size: tuple[int, int], weights: Path, kind: str = "random") -> ExportSpec:
    """The export of a loaded model (eval mode)."""
    def make_inputs(batch: int, g: torch.Generator, hw: tuple[int, int] = size) -> tuple[torch.Tensor]:
        """Underwater scenes of the built-in generator (degraded inputs), at the graph's input size."""
        rng = data_rng(g)
        return (image_batch([underwater(*clean_scene(rng, max(hw)), rng) for _ in range(batch)], hw),)

    notes = ["the graph takes images (or tiles) whose sides are multiples of 8; phaseformer/infer.py pads, tiles "
             "and blends as its PyTorch engine does (the file's metadata says how)"]
    from phaseformer.model import model_name
    return ExportSpec(PhaseformerGraph(net, head).eval(), make_inputs, INPUT_NAMES, OUTPUT_NAMES,
                      metadata(head, size, weights, kind, model_name(net)), tolerance=1e-4, notes=notes,
                      spatial=tuple(INPUT_NAMES), size_multiple=DOWNSAMPLE_FACTOR)
