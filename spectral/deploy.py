"""The deployed CR_recon graph: what spectral/infer.py runs (in PyTorch or ONNX Runtime) and what
scripts/export_onnx.py --task spectral writes. The mapping of the structure to the model's input is
inside, so an application feeds the structure as it is stored and reads the spectra:

    structure    (N, 1, H, W) float32, the binary unit cell, values 0 and 1, NCHW; 128x128 as
                 CR_recon's data (cnn_gru takes any size; cnn_xattn needs 16 feature tokens,
                 ceil(H/32) * ceil(W/32) == 16, and a square with enforce_diag_sym). The graph
                 maps it to structure*2-1 when the config's data.map_to_pm1 is true (`map_to_pm1`
                 in the metadata), else uses it as is.
    spectra      (N, 2, 2, out_len) float32, the model's raw output: cells [[R, G], [G, B]] of the
                 2x2 pixel block under the unit cell, spectra with CR_recon's sign flip (positive),
                 at `wavelengths_nm`.

The metadata also carries the model's constructor arguments (`model_params`) and the config's loss
(`loss`), so that infer.py --evaluate scores an exported model as it scores the checkpoint.
"""
from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from common.device import autocast, in_chunks, on_batch_halves
from common.io import UserError
from common.onnx import ExportSpec, data_rng
from spectral.data import CELL_LAYOUT, STRUCT_SHAPE, random_structures, wavelengths_nm
from spectral.model import MODEL_NAMES, SPATIAL_TOKENS

TASK = "spectral"
INPUT_NAMES = ["structure"]
OUTPUT_NAMES = ["spectra"]
INPUT_SIZE = STRUCT_SHAPE[1:]
DOWNSAMPLING = 32                 # five stride-2 stages: a side of n px gives ceil(n / 32) feature rows
CPU_CHUNK = 16                    # samples per micro-batch on the CPU: 1 MB of activation per sample
                                  # at the widest layer keeps each under malloc's mmap threshold


class SpectraGraph(nn.Module):
    """structure in {0, 1} -> (spectra,), exactly what spectral/infer.py computes per batch.

    streams=2 (CPU inference, common.device.cpu_streams): the two halves of the batch at once, in
    two threads; the same numbers as one call. CPU inference runs in micro-batches of CPU_CHUNK
    (common.device.in_chunks), also the same numbers.
    amp_dtype: the model under autocast (infer.py --amp; None: fp32, CR_recon's numbers); autocast
    is per thread, so each stream enters it."""

    def __init__(self, model: nn.Module, map_to_pm1: bool, streams: int = 1, amp_dtype: torch.dtype | None = None):
        super().__init__()
        self.model, self.map_to_pm1, self.amp_dtype = model, bool(map_to_pm1), amp_dtype
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="spectral") if streams > 1 else None

    def forward(self, structure: torch.Tensor) -> tuple[torch.Tensor]:
        x = structure * 2.0 - 1.0 if self.map_to_pm1 else structure    # CR_recon's map_to_pm1
        parallel = (self._pool is not None and x.device.type == "cpu" and not torch.is_grad_enabled()
                    and not torch.onnx.is_in_onnx_export() and not self.model.training)
        y = on_batch_halves(self._model, x, self._pool) if parallel else self._model(x)
        return (y.float(),)

    def _model(self, x: torch.Tensor) -> torch.Tensor:
        with autocast(x.device, self.amp_dtype):
            if x.device.type == "cpu" and not torch.is_grad_enabled() and not torch.onnx.is_in_onnx_export():
                return in_chunks(self.model, x, CPU_CHUNK)
            return self.model(x)


def feature_tokens(size: tuple[int, int]) -> int:
    return math.ceil(size[0] / DOWNSAMPLING) * math.ceil(size[1] / DOWNSAMPLING)


def metadata(cfg: dict, size: tuple[int, int], weights: Path) -> dict:
    """The file's contract; cfg as spectral.infer.load_model returns it."""
    name, params = cfg["model"]["name"], cfg["model"]["params"]
    out_len = params["out_len"]
    pm1 = cfg["data"]["map_to_pm1"]
    return {
        "task": TASK, "model": name, "weights": Path(weights).name, "model_params": params,
        "image_size": list(size), "input_layout": "NCHW", "input_range": [0.0, 1.0], "map_to_pm1": pm1,
        "inputs": f"structure: float32 (N,1,H,W) binary unit cell, 0 or 1 ({size[0]}x{size[1]}); the graph "
                  + ("maps it to structure*2-1 itself" if pm1 else "uses it as is (map_to_pm1 false)"),
        "outputs": f"spectra: float32 (N,2,2,{out_len}) cells [[R,G],[G,B]] of the 2x2 pixel block, spectra with "
                   f"CR_recon's sign flip (positive), at wavelengths_nm",
        "output_names": OUTPUT_NAMES, "out_len": out_len, "cell_layout": [list(r) for r in CELL_LAYOUT],
        "wavelengths_nm": [float(v) for v in wavelengths_nm(out_len)],
        "loss": {"name": cfg["loss"]["name"], "params": cfg["loss"]["params"]},
    }


def export_spec(weights: Path, model: str | None = None, size: tuple[int, int] | None = None,
                config: Path | None = None) -> ExportSpec:
    """The deployed graph of our checkpoint (best.pt / last.pt) or of a CR_recon checkpoint with
    its YAML `config`, as infer.py loads them; `model` (cnn_xattn / cnn_gru), if given, must be
    the one they hold."""
    from spectral.infer import load_model  # infer imports this module

    if model is not None and model not in MODEL_NAMES:
        raise UserError(f"--model {model}: a spectral model is one of {', '.join(MODEL_NAMES)}")
    net, cfg = load_model(weights, config)
    held = cfg["model"]["name"]
    if model is not None and model != held:
        raise UserError(f"{weights}: holds a {held} model, not --model {model}")
    return graph_spec(net, cfg, size, weights)


def graph_spec(net: nn.Module, cfg: dict, size: tuple[int, int] | None, weights: Path) -> ExportSpec:
    """The export of a loaded model (eval mode, NCHW)."""
    name = cfg["model"]["name"]
    size = tuple(size or INPUT_SIZE)
    if name == "cnn_xattn" and feature_tokens(size) != SPATIAL_TOKENS:
        raise UserError(f"--size {size[0]} {size[1]}: cnn_xattn has {SPATIAL_TOKENS} learned position embeddings, one "
                        f"per feature token, so ceil(H/32) * ceil(W/32) must be {SPATIAL_TOKENS} (128x128 as trained; "
                        f"also 64x256, 32x512), not {feature_tokens(size)}")
    if cfg["model"]["params"].get("enforce_diag_sym") and size[0] != size[1]:
        raise UserError(f"--size {size[0]} {size[1]}: this cnn_xattn averages the structure with its transpose "
                        f"(enforce_diag_sym), so it takes square structures only")

    def make_inputs(batch: int, g: torch.Generator, hw=size) -> tuple[torch.Tensor]:
        """Structures of the built-in generator (periodic patterns of ~10 px features, not pixel noise),
        cut to hw where it differs from the generator's square."""
        s = random_structures(batch, data_rng(g), size=max(hw))
        return (torch.from_numpy(s[:, :, :hw[0], :hw[1]].astype(np.float32)),)

    notes = []
    if size != INPUT_SIZE:
        notes.append(f"note: the model was trained on {INPUT_SIZE[0]}x{INPUT_SIZE[1]} structures; spectral/infer.py "
                     f"runs 128x128 files only (this one is for your own application)")
    # cnn_gru pools its features: any height and width trace; cnn_xattn adds one learned embedding per
    # feature token, so its size is fixed
    spatial = ("structure",) if name == "cnn_gru" else ()
    return ExportSpec(SpectraGraph(net, cfg["data"]["map_to_pm1"]).eval(), make_inputs, INPUT_NAMES, OUTPUT_NAMES,
                      metadata(cfg, size, weights), tolerance=1e-4, notes=notes, spatial=spatial)
