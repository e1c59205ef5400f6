"""CR_recon models: spectra of a metasurface unit cell from its 128x128 binary structure.

Both models share a CNN backbone (a 5x5 stride-2 stem and four stages of two GroupNorm residual
blocks, 128 -> 4 px, 256 channels) with periodic (torus-wrap) or zero padding, and differ in the
decoder that turns the features into 4 spectra of `out_len` points:

  cnn_xattn  30 learned wavelength queries, shifted by a projection of the pooled features, go
             through `dec_layers` pre-norm Transformer decoder blocks that cross-attend the 16
             spatial tokens (8,881,980 parameters at the defaults)
  cnn_gru    the pooled features, repeated `out_len` times, through a GRU (4,632,892 parameters)

Input (B,1,128,128) in [-1,1] (structure*2-1); output (B,2,2,out_len): cell [i][j] of the 2x2 pixel
block under the unit cell, [[R,G],[G,B]] with the CR_recon data layout (spectral/data.py).

The module tree, the parameter names and the constructor arguments are CR_recon's
(MetaSpec_CNNXAttn / MetaSpec_CNNGRU), so its checkpoints load unchanged and ours load there. The
arithmetic is the same too; only how it is computed differs: the convolutions pad themselves
(`padding_mode="circular"` is the same torus wrap as the original's two concatenations, in one
copy), and attention runs batch-first so that PyTorch's fused kernels apply.
"""
from __future__ import annotations

import inspect

import torch
import torch.nn as nn
import torch.nn.functional as F

from common.io import UserError, strip_wrapper_prefixes

INPUT_SIZE = 128
BACKBONE_CHANNELS = (64, 96, 128, 192, 256)
SPATIAL_TOKENS = 16     # the 4x4 feature map of a 128x128 input


def group_norm(channels: int, groups: int = 16) -> nn.GroupNorm:
    """GroupNorm with the largest group count <= `groups` that divides `channels` (16 for every
    width used here)."""
    g = min(groups, channels)
    while channels % g:
        g -= 1
    return nn.GroupNorm(g, channels)


class _WrapPad(torch.autograd.Function):
    """Torus-wrap padding by p on every side (the corners get the diagonally opposite pixels).

    The forward is one F.pad(mode="circular"); the backward folds the border gradients back onto
    the opposite edges with a handful of strip additions. Autograd's own backward of the circular
    pad (or of CR_recon's two concatenations) takes several times longer, which matters because
    every convolution of the backbone pads.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, p: int) -> torch.Tensor:
        ctx.p = p
        return _wrap_pad_forward(x, p)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        p = ctx.p
        rows = g[:, :, p:-p].clone()            # fold rows: top pad came from the bottom, and back
        rows[:, :, -p:] += g[:, :, :p]
        rows[:, :, :p] += g[:, :, -p:]
        out = rows[..., p:-p].clone()           # then columns of the row-folded gradient
        out[..., -p:] += rows[..., :p]
        out[..., :p] += rows[..., -p:]
        return out, None


def _wrap_pad_forward(x: torch.Tensor, p: int) -> torch.Tensor:
    if x.is_contiguous():
        return F.pad(x, (p, p, p, p), mode="circular")
    # channels_last: F.pad would return a contiguous tensor and every convolution would then
    # convert it back; fill a channels_last tensor instead (centre, rows, then whole columns)
    n, c, h, w = x.shape
    out = torch.empty((n, c, h + 2 * p, w + 2 * p), dtype=x.dtype, device=x.device,
                      memory_format=torch.channels_last)
    out[:, :, p:-p, p:-p] = x
    out[:, :, :p, p:-p] = x[:, :, -p:]
    out[:, :, -p:, p:-p] = x[:, :, :p]
    out[..., :p] = out[..., -2 * p:-p]
    out[..., -p:] = out[..., p:2 * p]
    return out


def wrap_pad(x: torch.Tensor, p: int) -> torch.Tensor:
    if torch.jit.is_tracing():
        # ONNX export: the circular pad as Slice + Concat, the same numbers; a graph must hold plain
        # operators, not a Python autograd node, nor the in-place channels_last fill
        return F.pad(x, (p, p, p, p), mode="circular")
    if not (x.requires_grad and torch.is_grad_enabled()):
        return _wrap_pad_forward(x, p)       # no gradient wanted: no autograd node either
    return _WrapPad.apply(x, p)


class PeriodicConv2d(nn.Conv2d):
    """A bias-free 'same' convolution (odd kernel, padding k//2) whose padding is the torus wrap
    of a periodic unit cell, or zeros."""

    def __init__(self, cin: int, cout: int, k: int, stride: int, circular: bool):
        super().__init__(cin, cout, k, stride=stride, padding=0 if circular else k // 2, bias=False)
        self.wrap = k // 2 if circular else 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(wrap_pad(x, self.wrap) if self.wrap else x)


def conv(cin: int, cout: int, k: int, stride: int, circular: bool) -> nn.Conv2d:
    return PeriodicConv2d(cin, cout, k, stride, circular)


class ResBlockGN(nn.Module):
    """conv3x3(stride) - GN - SiLU - Dropout2d - conv3x3 - GN - Dropout2d, plus a 1x1 strided
    projection on the skip path when the shape changes; SiLU after the sum."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1, dropout: float = 0.05, circular: bool = True):
        super().__init__()
        self.conv1 = conv(in_ch, out_ch, 3, stride, circular)
        self.gn1 = group_norm(out_ch)
        self.drop1 = nn.Dropout2d(dropout)
        self.conv2 = conv(out_ch, out_ch, 3, 1, circular)
        self.gn2 = group_norm(out_ch)
        self.drop2 = nn.Dropout2d(dropout)
        self.skip = nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False) if stride != 1 or in_ch != out_ch else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.drop1(F.silu(self.gn1(self.conv1(x))))
        h = self.drop2(self.gn2(self.conv2(h)))
        return F.silu(h + (x if self.skip is None else self.project(x)))

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """The strided 1x1 skip convolution reads every s-th pixel; taking those first and running
        a plain 1x1 convolution is the same sum and faster on CPUs. They are taken by a 1x1 average
        pool (exactly x[::s, ::s]) rather than by slicing: the backward of a slice is a contiguous
        tensor, which would turn the whole previous block's backward into mixed-layout arithmetic
        under channels_last."""
        s = self.skip.stride[0]
        if s == 1:
            return self.skip(x)
        return F.conv2d(F.avg_pool2d(x, 1, s), self.skip.weight)


class _Backbone(nn.Module):
    """The shared CNN. Its modules sit at the top level of the model (stem_conv, stage1, ...), where
    CR_recon's checkpoints have them."""

    def _build_backbone(self, cnn_dropout: float, circular: bool) -> None:
        c = BACKBONE_CHANNELS
        self.stem_conv = conv(1, c[0], 5, 2, circular)
        self.stem_gn = group_norm(c[0])
        self.stem_dropout = nn.Dropout2d(cnn_dropout)
        for i in range(4):
            setattr(self, f"stage{i + 1}", nn.Sequential(
                ResBlockGN(c[i], c[i + 1], 2, cnn_dropout, circular),
                ResBlockGN(c[i + 1], c[i + 1], 1, cnn_dropout, circular)))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B,1,128,128) -> (B,256,4,4)."""
        f = self.stem_dropout(F.silu(self.stem_gn(self.stem_conv(x))))
        return self.stage4(self.stage3(self.stage2(self.stage1(f))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _head(d_model: int, dropout: float) -> nn.Sequential:
    """Shared by the 4 cells: Linear - SiLU - Dropout - Linear(d, 4)."""
    return nn.Sequential(nn.Linear(d_model, d_model), nn.SiLU(), nn.Dropout(dropout), nn.Linear(d_model, 4))


def _context(d_model: int, dropout: float) -> nn.Sequential:
    """Pooled features -> z: Flatten - Linear(256, d) - SiLU - Dropout."""
    return nn.Sequential(nn.Flatten(1), nn.Linear(BACKBONE_CHANNELS[-1], d_model), nn.SiLU(), nn.Dropout(dropout))


def attend(mha: nn.MultiheadAttention, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
    """nn.MultiheadAttention's arithmetic on its own parameters (x attends `context`, or itself),
    batch-first (B,L,D) throughout: the module itself would transpose to sequence-first and back."""
    d, h = mha.embed_dim, mha.num_heads
    w, b = mha.in_proj_weight, mha.in_proj_bias
    if context is None:
        q, k, v = F.linear(x, w, b).chunk(3, dim=-1)
    else:
        q = F.linear(x, w[:d], b[:d])
        k, v = F.linear(context, w[d:], b[d:]).chunk(2, dim=-1)
    n, lq, lk = x.shape[0], x.shape[1], k.shape[1]
    q = q.reshape(n, lq, h, d // h).transpose(1, 2)
    k = k.reshape(n, lk, h, d // h).transpose(1, 2)
    v = v.reshape(n, lk, h, d // h).transpose(1, 2)
    o = F.scaled_dot_product_attention(q, k, v, dropout_p=mha.dropout if mha.training else 0.0)
    return mha.out_proj(o.transpose(1, 2).reshape(n, lq, d))


class XAttnDecoderBlock(nn.Module):
    """Pre-norm: self-attention over the wavelength tokens, cross-attention to the spatial tokens
    (which are not normalised), then a GELU feed-forward; a residual around each."""

    def __init__(self, d_model: int = 256, nhead: int = 8, ff_mult: int = 4, dropout: float = 0.1):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout, batch_first=True)
        self.cross_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout, batch_first=True)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.norm3 = nn.LayerNorm(d_model)
        self.ff = nn.Sequential(nn.Linear(d_model, ff_mult * d_model), nn.GELU(), nn.Dropout(dropout),
                                nn.Linear(ff_mult * d_model, d_model), nn.Dropout(dropout))

    def forward(self, tgt: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
        """tgt (B,L,D), memory (B,16,D)."""
        tgt = tgt + attend(self.self_attn, self.norm1(tgt))
        tgt = tgt + attend(self.cross_attn, self.norm2(tgt), memory)
        return tgt + self.ff(self.norm3(tgt))


class CNNXAttn(_Backbone):
    """CR_recon's MetaSpec_CNNXAttn."""

    def __init__(self, out_len: int = 30, d_model: int = 256, nhead: int = 8, dec_layers: int = 4,
                 ff_mult: int = 4, cnn_dropout: float = 0.05, tr_dropout: float = 0.1,
                 head_dropout: float = 0.2, enforce_diag_sym: bool = False, use_circular_padding: bool = True):
        super().__init__()
        self.out_len, self.d_model = out_len, d_model
        self.enforce_diag_sym, self.use_circular_padding = enforce_diag_sym, use_circular_padding
        self._build_backbone(cnn_dropout, use_circular_padding)
        self.s_proj = nn.Conv2d(BACKBONE_CHANNELS[-1], d_model, 1, bias=False)
        self.s_pos = nn.Parameter(torch.randn(SPATIAL_TOKENS, 1, d_model) * 0.02)   # (16,1,D) as stored
        self.pool = nn.AdaptiveAvgPool2d((1, 1))
        self.to_z = _context(d_model, head_dropout)
        self.q_film = nn.Linear(d_model, d_model)   # a shift of the queries by the global context
        self.query = nn.Parameter(torch.randn(out_len, d_model) * 0.02)
        self.w_pos = nn.Parameter(torch.randn(out_len, 1, d_model) * 0.02)        # (L,1,D) as stored
        self.dec = nn.ModuleList(XAttnDecoderBlock(d_model, nhead, ff_mult, tr_dropout) for _ in range(dec_layers))
        self.head = _head(d_model, head_dropout)
        self.spec_bias = nn.Parameter(torch.zeros(1, 4, out_len))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        if self.enforce_diag_sym:   # symmetric about the main diagonal
            x = 0.5 * (x + x.transpose(-1, -2))
        return super().forward_features(x)

    def forward_head(self, f: torch.Tensor) -> torch.Tensor:
        """(B,256,4,4) -> (B,2,2,out_len)."""
        b = f.shape[0]
        memory = self.s_proj(f).flatten(2).transpose(1, 2) + self.s_pos.squeeze(1)          # (B,16,D)
        z = self.to_z(self.pool(f))                                                           # (B,D)
        q = (self.query + self.w_pos.squeeze(1)).unsqueeze(0) + self.q_film(z).unsqueeze(1)   # (B,L,D)
        for block in self.dec:
            q = block(q, memory)
        return (self.head(q).transpose(1, 2) + self.spec_bias).reshape(b, 2, 2, self.out_len)


class CNNGRU(_Backbone):
    """CR_recon's MetaSpec_CNNGRU."""

    def __init__(self, out_len: int = 30, d_model: int = 128, gru_layers: int = 2, cnn_dropout: float = 0.05,
                 head_dropout: float = 0.1, use_circular_padding: bool = True):
        super().__init__()
        self.out_len, self.d_model, self.use_circular_padding = out_len, d_model, use_circular_padding
        self._build_backbone(cnn_dropout, use_circular_padding)
        self.pool = nn.AdaptiveAvgPool2d((1, 1))
        self.to_z = _context(d_model, head_dropout)
        self.gru = nn.GRU(d_model, d_model, num_layers=gru_layers, batch_first=True,
                          dropout=head_dropout if gru_layers > 1 else 0.0)
        self.head = _head(d_model, head_dropout)
        self.spec_bias = nn.Parameter(torch.zeros(1, 4, out_len))

    def forward_head(self, f: torch.Tensor) -> torch.Tensor:
        b = f.shape[0]
        z = self.to_z(self.pool(f))
        seq, _ = self.gru(z.unsqueeze(1).expand(-1, self.out_len, -1).contiguous())   # same input every step
        return (self.head(seq).transpose(1, 2) + self.spec_bias).reshape(b, 2, 2, self.out_len)


MODELS = {"cnn_xattn": CNNXAttn, "cnn_gru": CNNGRU}
MODEL_NAMES = tuple(MODELS)


def model_defaults(name: str) -> dict:
    """The constructor arguments of `name` with their defaults."""
    return {k: p.default for k, p in inspect.signature(MODELS[name].__init__).parameters.items() if k != "self"}


def check_model_params(name: str, params: dict, where: str = "model.params") -> dict:
    """All constructor arguments of `name` (defaults filled in); an unknown name or parameter, a
    wrong type or an impossible value is one UserError naming it."""
    if name not in MODELS:
        raise UserError(f"model.name {name!r}: unknown model (choose from {', '.join(MODEL_NAMES)})")
    defaults = model_defaults(name)
    for k in params:
        if k not in defaults:
            raise UserError(f"{where}.{k}: {name} has no parameter {k!r} (valid: {', '.join(defaults)})")
    out = {**defaults, **params}
    for k, v in out.items():
        default = defaults[k]
        if isinstance(default, bool):
            if not isinstance(v, bool):
                raise UserError(f"{where}.{k}: expected true or false (got {v!r})")
        elif isinstance(default, int):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise UserError(f"{where}.{k}: expected a positive integer (got {v!r})")
        elif isinstance(default, float):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v < 1.0:
                raise UserError(f"{where}.{k}: expected a dropout probability in [0, 1) (got {v!r})")
            out[k] = float(v)
    if name == "cnn_xattn" and out["d_model"] % out["nhead"]:
        raise UserError(f"{where}.nhead: d_model {out['d_model']} is not divisible by nhead {out['nhead']}")
    if out["out_len"] < 3:
        raise UserError(f"{where}.out_len: at least 3 wavelengths are needed (got {out['out_len']})")
    return out


def build_model(name: str, **params) -> nn.Module:
    """`cnn_xattn` or `cnn_gru` with CR_recon's constructor arguments (model.params of a config)."""
    params = check_model_params(name, params)
    return MODELS[name](**params)


# ---------------------------------------------------------------- reading weights
def describe_weights(sd: dict) -> dict:
    """What a state_dict holds, read from its keys and shapes: model name, out_len, d_model and the
    layer count (None where it cannot be told)."""
    info = {"model": None, "out_len": None, "d_model": None, "layers": None}
    if "spec_bias" in sd and sd["spec_bias"].dim() == 3:
        info["out_len"] = int(sd["spec_bias"].shape[-1])
    if any(k.startswith("gru.") for k in sd):
        info["model"] = "cnn_gru"
        info["layers"] = len({k.split("_l")[-1] for k in sd if k.startswith("gru.weight_ih_l")})
        if "gru.weight_hh_l0" in sd:
            info["d_model"] = int(sd["gru.weight_hh_l0"].shape[1])
    elif any(k.startswith("dec.") for k in sd):
        info["model"] = "cnn_xattn"
        info["layers"] = len({k.split(".")[1] for k in sd if k.startswith("dec.")})
        if "query" in sd:
            info["d_model"] = int(sd["query"].shape[-1])
    return info


def load_state_dict_checked(model: nn.Module, name: str, params: dict, sd: dict, path) -> None:
    """Load strictly; any mismatch is one line that says what the file holds and what was asked for."""
    sd, _ = strip_wrapper_prefixes(sd)
    own = model.state_dict()
    held = describe_weights(sd)
    asked = f"{name} (out_len {params['out_len']}, d_model {params['d_model']})"
    if held["model"] is not None and held["model"] != name:
        raise UserError(f"{path}: holds {held['model']} weights, but the config asks for {asked}")
    for key in ("out_len", "d_model"):
        if held[key] is not None and held[key] != params[key]:
            raise UserError(f"{path}: holds {held['model'] or 'model'} weights with {key} {held[key]}, "
                            f"but the config asks for {asked}")
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    wrong = sorted(k for k in set(own) & set(sd) if tuple(own[k].shape) != tuple(sd[k].shape))
    if missing or unexpected or wrong:
        parts = []
        for what, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
            if keys:
                parts.append(f"{len(keys)} {what}: {', '.join(keys[:3])}" + (" ..." if len(keys) > 3 else ""))
        raise UserError(f"{path}: weights do not fit {asked} ({'; '.join(parts)}); check model.params "
                        f"(dec_layers / gru_layers / ff_mult) against the run that wrote them")
    bad = [k for k, v in sd.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise UserError(f"{path}: weights contain NaN or inf ({', '.join(bad[:3])})")
    model.load_state_dict(sd)
