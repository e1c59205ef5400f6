"""CR_recon's two losses and the validation metrics, on (B,2,2,L) spectra.

  mse_pearson      w_mse * MSE + w_corr * mean(1 - r), r the Pearson correlation of each cell's
                   spectrum (per sample, along wavelength) with eps 1e-8 added to |p|*|t|
  weighted_smooth  mean(w_cell * err^2) + lambda1 * MSE of first differences
                   + lambda2 * MSE of second differences; w_cell = channel_weights as [[w0,w1],[w2,w3]]

Both compute in fp32 whatever the autocast state, and equal CR_recon's to float rounding.
`build_loss(name, **params)` mirrors CR_recon's `get_loss`. `channel_weights` follows the cell
layout of the targets: with CR_recon data, [R, G, G, B] (its comment says "B, G, G, R", but the
default [1.0, 0.8, 0.8, 1.2] gives R 1.0 and B 1.2).
"""
from __future__ import annotations

import contextlib
import math
import numbers

import torch
import torch.nn as nn
import torch.nn.functional as F

from common.io import UserError

PEARSON_EPS = 1e-8
CELL_NAMES = ("R", "G1", "G2", "B")   # cells [0,0], [0,1], [1,0], [1,1] in CR_recon's layout


def pearson_per_cell(pred: torch.Tensor, tgt: torch.Tensor, eps: float = PEARSON_EPS) -> torch.Tensor:
    """(B,2,2,L) x2 -> (B,4): r of each cell's spectrum along wavelength. A flat spectrum gives 0."""
    n, length = pred.shape[0], pred.shape[-1]
    p = pred.reshape(n, 4, length)
    t = tgt.reshape(n, 4, length)
    p = p - p.mean(-1, keepdim=True)
    t = t - t.mean(-1, keepdim=True)
    return (p * t).sum(-1) / (torch.linalg.vector_norm(p, dim=-1) * torch.linalg.vector_norm(t, dim=-1) + eps)


def _fp32_region(device: torch.device):
    """Autocast off (the losses run in fp32 even inside an autocast region)."""
    if device.type in ("cuda", "cpu", "mps"):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def _fp32(pred: torch.Tensor, tgt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if pred.shape != tgt.shape or pred.dim() != 4 or tuple(pred.shape[1:3]) != (2, 2):
        raise ValueError(f"expected prediction and target of shape (B,2,2,L), got {tuple(pred.shape)} "
                         f"and {tuple(tgt.shape)}")
    return pred.float(), tgt.float()


class MSEPearsonLoss(nn.Module):
    def __init__(self, w_mse: float = 1.0, w_corr: float = 0.2):
        super().__init__()
        self.w_mse, self.w_corr = w_mse, w_corr

    def forward(self, pred: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
        with _fp32_region(pred.device):
            pred, tgt = _fp32(pred, tgt)
            corr = (1.0 - pearson_per_cell(pred, tgt)).mean()
            return self.w_mse * F.mse_loss(pred, tgt) + self.w_corr * corr

    def extra_repr(self) -> str:
        return f"w_mse={self.w_mse}, w_corr={self.w_corr}"


class WeightedSmoothLoss(nn.Module):
    def __init__(self, lambda1: float = 0.1, lambda2: float = 0.05, channel_weights=None):
        super().__init__()
        self.lambda1, self.lambda2 = lambda1, lambda2
        w = [1.0, 0.8, 0.8, 1.2] if channel_weights is None else channel_weights
        self.register_buffer("channel_weights", torch.as_tensor(w, dtype=torch.float32).reshape(1, 2, 2, 1),
                             persistent=False)

    def forward(self, pred: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
        with _fp32_region(pred.device):
            pred, tgt = _fp32(pred, tgt)
            if pred.shape[-1] < 3:
                raise ValueError(f"weighted_smooth needs at least 3 wavelengths (got {pred.shape[-1]})")
            w = self.channel_weights.to(pred.device)
            value = ((pred - tgt) ** 2 * w).mean()
            d1p, d1t = torch.diff(pred, dim=-1), torch.diff(tgt, dim=-1)
            d2p, d2t = torch.diff(d1p, dim=-1), torch.diff(d1t, dim=-1)
            return value + self.lambda1 * ((d1p - d1t) ** 2).mean() + self.lambda2 * ((d2p - d2t) ** 2).mean()

    def extra_repr(self) -> str:
        return f"lambda1={self.lambda1}, lambda2={self.lambda2}, channel_weights={self.channel_weights.flatten().tolist()}"


LOSSES = {"mse_pearson": MSEPearsonLoss, "weighted_smooth": WeightedSmoothLoss}
LOSS_NAMES = tuple(LOSSES)
LOSS_DEFAULTS = {"mse_pearson": {"w_mse": 1.0, "w_corr": 0.2},
                 "weighted_smooth": {"lambda1": 0.1, "lambda2": 0.05, "channel_weights": None}}


def _number(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(float(v))


def check_loss_params(name: str, params: dict, where: str = "loss.params") -> dict:
    """All parameters of loss `name` (defaults filled in), checked; a problem is one UserError naming it."""
    if name not in LOSSES:
        raise UserError(f"loss.name {name!r}: unknown loss (choose from {', '.join(LOSS_NAMES)})")
    defaults = LOSS_DEFAULTS[name]
    for k in params:
        if k not in defaults:
            raise UserError(f"{where}.{k}: {name} has no parameter {k!r} (valid: {', '.join(defaults)})")
    out = {**defaults, **params}
    for k, v in out.items():
        if k == "channel_weights":
            if v is None:
                continue
            if isinstance(v, dict):
                raise UserError(f"{where}.channel_weights: a mapping is not accepted (its order would decide "
                                f"which cell gets which weight); give a list of 4 numbers for the cells "
                                f"[0,0], [0,1], [1,0], [1,1] (R, G, G, B)")
            if isinstance(v, torch.Tensor):
                v = v.detach().cpu().flatten().tolist()
            if not isinstance(v, (list, tuple)) or len(v) != 4 or not all(_number(x) and x >= 0 for x in v):
                raise UserError(f"{where}.channel_weights: expected a list of 4 non-negative numbers "
                                f"(cells R, G, G, B), got {v!r}")
            out[k] = [float(x) for x in v]
        elif not _number(v) or v < 0:
            raise UserError(f"{where}.{k}: expected a non-negative number (got {v!r})")
        else:
            out[k] = float(v)
    return out


def build_loss(name: str, **params) -> nn.Module:
    """`mse_pearson` or `weighted_smooth` with CR_recon's parameters; callable as loss(pred, tgt)."""
    params = check_loss_params(name, params)
    return LOSSES[name](**params)


@torch.no_grad()
def spectral_metrics(pred: torch.Tensor, tgt: torch.Tensor) -> dict:
    """Sums over a batch, to be divided by the sample count (see `finish_metrics`): squared error,
    Pearson r per cell, squared error per cell."""
    pred, tgt = pred.float(), tgt.float()
    err = (pred - tgt) ** 2
    return {"n": pred.shape[0], "sq_err": err.sum().double(),
            "r_sum": pearson_per_cell(pred, tgt).sum().double(),
            "cell_sq_err": err.sum(dim=(0, 3)).reshape(4).double(), "length": pred.shape[-1]}


def finish_metrics(total: dict) -> dict:
    """val_mse, val_pearson_r (mean over samples and cells) and val_rmse_{R,G,B} (G: both G cells)."""
    n, length = total["n"], total["length"]
    cell_mse = total["cell_sq_err"] / (n * length)
    return {"val_mse": float(total["sq_err"] / (n * 4 * length)),
            "val_pearson_r": float(total["r_sum"] / (n * 4)),
            "val_rmse_R": float(cell_mse[0].sqrt()),
            "val_rmse_G": float(((cell_mse[1] + cell_mse[2]) / 2).sqrt()),
            "val_rmse_B": float(cell_mse[3].sqrt())}


def add_metrics(total: dict | None, part: dict) -> dict:
    if total is None:
        return dict(part)
    return {k: (total[k] if k == "length" else total[k] + part[k]) for k in total}
