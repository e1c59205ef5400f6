"""An independent transcription of CR_recon (hyoseokp/CR_DL_auto, HEAD 60c36ae) from the reference
digest `shared/reference/spectral.md`: the two models, the two losses, the data conversion and the
original Trainer's training step. It reproduces the original's module tree (so its state_dict keys
are the original's), its arithmetic (circular padding by two concatenations, explicit F.pad for zero
padding, sequence-first attention) and its defects where they matter for a comparison (the split).

Used only by tests and scripts/bench.py as "the original"; nothing in spectral/ imports it.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


# ---------------------------------------------------------------- building blocks
def gn(channels: int, groups: int = 16) -> nn.GroupNorm:
    g = min(groups, channels)
    while channels % g and g > 1:
        g -= 1
    return nn.GroupNorm(g, channels)


def wrap_pad(x: torch.Tensor, p: int) -> torch.Tensor:
    """Rows first (last p rows on top, first p at the bottom), then columns of the result."""
    x = torch.cat([x[:, :, -p:, :], x, x[:, :, :p, :]], dim=2)
    return torch.cat([x[:, :, :, -p:], x, x[:, :, :, :p]], dim=3)


def pad(x: torch.Tensor, p: int, circular: bool) -> torch.Tensor:
    return wrap_pad(x, p) if circular else F.pad(x, (p, p, p, p), mode="constant", value=0.0)


def maybe_dropout(p: float, two_d: bool = False) -> nn.Module:
    if p > 0:
        return nn.Dropout2d(p) if two_d else nn.Dropout(p)
    return nn.Identity()


class ResBlockGN(nn.Module):
    def __init__(self, cin, cout, stride=1, dropout=0.05, use_circular=True):
        super().__init__()
        self.use_circular = use_circular
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=0, bias=False)
        self.gn1 = gn(cout)
        self.drop1 = maybe_dropout(dropout, True)
        self.conv2 = nn.Conv2d(cout, cout, 3, stride=1, padding=0, bias=False)
        self.gn2 = gn(cout)
        self.drop2 = maybe_dropout(dropout, True)
        self.skip = nn.Conv2d(cin, cout, 1, stride=stride, bias=False) if (stride != 1 or cin != cout) else None

    def forward(self, x):
        h = self.drop1(F.silu(self.gn1(self.conv1(pad(x, 1, self.use_circular)))))
        h = self.drop2(self.gn2(self.conv2(pad(h, 1, self.use_circular))))
        return F.silu(h + (x if self.skip is None else self.skip(x)))


def build_backbone(owner: nn.Module, cnn_dropout: float, circular: bool) -> None:
    """The stem and four stages as attributes of `owner` (the original keeps them at top level)."""
    owner.stem_conv = nn.Conv2d(1, 64, 5, stride=2, padding=0, bias=False)
    owner.stem_gn = gn(64)
    owner.stem_dropout = maybe_dropout(cnn_dropout, True)
    chans = [64, 96, 128, 192, 256]
    for i in range(4):
        setattr(owner, f"stage{i + 1}", nn.Sequential(
            ResBlockGN(chans[i], chans[i + 1], 2, cnn_dropout, circular),
            ResBlockGN(chans[i + 1], chans[i + 1], 1, cnn_dropout, circular)))


def run_backbone(owner: nn.Module, x: torch.Tensor) -> torch.Tensor:
    f = owner.stem_dropout(F.silu(owner.stem_gn(owner.stem_conv(pad(x, 2, owner.use_circular_padding)))))
    for i in range(4):
        f = getattr(owner, f"stage{i + 1}")(f)
    return f


class XAttnDecoderBlock(nn.Module):
    def __init__(self, d_model=256, nhead=8, ff_mult=4, dropout=0.1):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout, batch_first=False)
        self.cross_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout, batch_first=False)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(d_model), nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.ff = nn.Sequential(nn.Linear(d_model, ff_mult * d_model), nn.GELU(), nn.Dropout(dropout),
                                nn.Linear(ff_mult * d_model, d_model), nn.Dropout(dropout))

    def forward(self, tgt, memory):
        h = self.norm1(tgt)
        tgt = tgt + self.self_attn(h, h, h, need_weights=False)[0]
        h = self.norm2(tgt)
        tgt = tgt + self.cross_attn(h, memory, memory, need_weights=False)[0]
        return tgt + self.ff(self.norm3(tgt))


class MetaSpec_CNNXAttn(nn.Module):
    def __init__(self, out_len=30, d_model=256, nhead=8, dec_layers=4, ff_mult=4, cnn_dropout=0.05,
                 tr_dropout=0.1, head_dropout=0.2, enforce_diag_sym=False, use_circular_padding=True):
        super().__init__()
        self.out_len, self.d_model = out_len, d_model
        self.enforce_diag_sym, self.use_circular_padding = enforce_diag_sym, use_circular_padding
        build_backbone(self, cnn_dropout, use_circular_padding)
        self.s_proj = nn.Conv2d(256, d_model, 1, bias=False)
        self.s_pos = nn.Parameter(torch.randn(16, 1, d_model) * 0.02)
        self.pool = nn.AdaptiveAvgPool2d((1, 1))
        self.to_z = nn.Sequential(nn.Flatten(1), nn.Linear(256, d_model), nn.SiLU(), maybe_dropout(head_dropout))
        self.q_film = nn.Linear(d_model, d_model)
        self.query = nn.Parameter(torch.randn(out_len, d_model) * 0.02)
        self.w_pos = nn.Parameter(torch.randn(out_len, 1, d_model) * 0.02)
        self.dec = nn.ModuleList(XAttnDecoderBlock(d_model, nhead, ff_mult, tr_dropout) for _ in range(dec_layers))
        self.head = nn.Sequential(nn.Linear(d_model, d_model), nn.SiLU(), maybe_dropout(head_dropout),
                                  nn.Linear(d_model, 4))
        self.spec_bias = nn.Parameter(torch.zeros(1, 4, out_len))

    def forward(self, x):
        if self.enforce_diag_sym:
            x = 0.5 * (x + x.transpose(-1, -2))
        f = run_backbone(self, x)
        b = f.shape[0]
        s = self.s_proj(f).flatten(2).permute(2, 0, 1).contiguous() + self.s_pos   # (16, B, D)
        z = self.to_z(self.pool(f))
        q = self.query.unsqueeze(1).expand(self.out_len, b, -1) + self.w_pos + self.q_film(z).unsqueeze(0)
        for blk in self.dec:
            q = blk(q, s)
        y = self.head(q).permute(1, 2, 0) + self.spec_bias
        return y.view(b, 2, 2, self.out_len)


class MetaSpec_CNNGRU(nn.Module):
    def __init__(self, out_len=30, d_model=128, gru_layers=2, cnn_dropout=0.05, head_dropout=0.1,
                 use_circular_padding=True):
        super().__init__()
        self.out_len, self.d_model, self.use_circular_padding = out_len, d_model, use_circular_padding
        build_backbone(self, cnn_dropout, use_circular_padding)
        self.pool = nn.AdaptiveAvgPool2d((1, 1))
        self.to_z = nn.Sequential(nn.Flatten(1), nn.Linear(256, d_model), nn.SiLU(), maybe_dropout(head_dropout))
        self.gru = nn.GRU(d_model, d_model, num_layers=gru_layers, batch_first=True,
                          dropout=head_dropout if gru_layers > 1 else 0)
        self.head = nn.Sequential(nn.Linear(d_model, d_model), nn.SiLU(), maybe_dropout(head_dropout),
                                  nn.Linear(d_model, 4))
        self.spec_bias = nn.Parameter(torch.zeros(1, 4, out_len))

    def forward(self, x):
        f = run_backbone(self, x)
        z = self.to_z(self.pool(f))
        seq, _ = self.gru(z.unsqueeze(1).expand(-1, self.out_len, -1))
        y = self.head(seq).permute(0, 2, 1) + self.spec_bias
        return y.view(-1, 2, 2, self.out_len)


MODELS = {"cnn_xattn": MetaSpec_CNNXAttn, "cnn_gru": MetaSpec_CNNGRU}


def get_model(name, **params):
    return MODELS[name](**params)


# ---------------------------------------------------------------- losses
def get_mse_pearson_loss(w_mse=1.0, w_corr=0.2):
    def loss(pred, tgt):
        pred, tgt = pred.float(), tgt.float()
        n, length = pred.shape[0], pred.shape[-1]
        p = pred.reshape(n * 4, length)
        t = tgt.reshape(n * 4, length)
        p = p - p.mean(-1, keepdim=True)
        t = t - t.mean(-1, keepdim=True)
        r = (p * t).sum(-1) / (p.norm(dim=-1) * t.norm(dim=-1) + 1e-8)
        return w_mse * F.mse_loss(pred, tgt) + w_corr * (1.0 - r).mean()
    return loss


def get_weighted_smooth_loss(lambda1=0.1, lambda2=0.05, channel_weights=None):
    weights = [1.0, 0.8, 0.8, 1.2] if channel_weights is None else channel_weights

    def loss(pred, tgt):
        pred, tgt = pred.float(), tgt.float()
        w = torch.tensor(weights, dtype=torch.float32, device=pred.device) \
            if isinstance(weights, (list, tuple)) else weights
        value = ((pred - tgt) ** 2 * w.view(1, 2, 2, 1)).mean()
        d1p, d1t = torch.diff(pred, dim=-1), torch.diff(tgt, dim=-1)
        d2p, d2t = torch.diff(d1p, dim=-1), torch.diff(d1t, dim=-1)
        return value + lambda1 * ((d1p - d1t) ** 2).mean() + lambda2 * ((d2p - d2t) ** 2).mean()
    return loss


LOSSES = {"mse_pearson": get_mse_pearson_loss, "weighted_smooth": get_weighted_smooth_loss}


def get_loss(name, **params):
    return LOSSES[name](**params)


# ---------------------------------------------------------------- data conversion
def to_bayer(spectra: np.ndarray, out_len: int = 30) -> np.ndarray:
    """(M,3,301) R,G,B -> (M,2,2,out_len) [[R,G],[G,B]], point-sampled, per row as the original loops."""
    idx = np.linspace(0, 300, out_len, dtype=int)
    out = np.zeros((len(spectra), 2, 2, out_len), np.float32)
    for i in range(len(spectra)):
        s = spectra[i].astype(np.float32)
        full = np.zeros((2, 2, 301), np.float32)
        full[0, 0], full[0, 1], full[1, 0], full[1, 1] = s[0], s[1], s[1], s[2]
        out[i] = full[:, :, idx]
    return out


def rotate_bayer(bayer: np.ndarray) -> np.ndarray:
    out = bayer.copy()
    out[:, 0, 0], out[:, 1, 1] = bayer[:, 1, 1], bayer[:, 0, 0]
    return out


def original_split(m: int, train_ratio: float, seed: int, augment: bool):
    """The original create_dataloaders' index bookkeeping: (train indices into [originals; rotated]
    of length 2m, val indices into the originals). Its defect: train covers every original."""
    train_size = int(m * train_ratio)
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(m, generator=g).tolist()      # what random_split draws
    val = perm[train_size:]
    train = list(range(train_size)) + (list(range(train_size, 2 * train_size)) if augment else [])
    return train, val


# ---------------------------------------------------------------- the original Trainer's step
def lr_factor(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / max(1, warmup)
    return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


class OriginalStep:
    """AdamW(0.9, 0.95, eps 1e-8), LambdaLR per batch, clip_grad_norm_, optional fp16 autocast+scaler."""

    def __init__(self, model, loss_fn, lr=1e-3, weight_decay=0.005, grad_clip=1.0, total_steps=1000,
                 warmup_ratio=0.05, use_amp=False):
        self.model, self.loss_fn, self.grad_clip = model, loss_fn, grad_clip
        self.opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay, betas=(0.9, 0.95), eps=1e-8)
        warmup = int(warmup_ratio * total_steps)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: lr_factor(s, total_steps, warmup))
        self.use_amp = use_amp
        self.scaler = torch.amp.GradScaler("cuda") if use_amp else None

    def __call__(self, x, y) -> float:
        self.model.train()
        self.opt.zero_grad(set_to_none=True)
        if self.use_amp:
            with torch.autocast("cuda", dtype=torch.float16):
                loss = self.loss_fn(self.model(x), y)
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.opt)
            if self.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
            self.scaler.step(self.opt)
            self.scaler.update()
        else:
            loss = self.loss_fn(self.model(x), y)
            loss.backward()
            if self.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
            self.opt.step()
        self.sched.step()
        return float(loss.item())

    def checkpoint(self, epoch: int, val_loss: float, best_val_loss: float) -> dict:
        """The original's checkpoint dict (no scheduler, scaler, config or RNG)."""
        return {"model": self.model.state_dict(), "optimizer": self.opt.state_dict(), "epoch": epoch,
                "val_loss": val_loss, "best_val_loss": best_val_loss}
