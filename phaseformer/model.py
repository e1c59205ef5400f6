"""Phaseformer (Khan et al., WACV 2025): a thin Restormer whose channel attention sees only phase.

The network is the official `model_with_eca.Restormer` (Mdraqibkhan/Phaseformer), with the same
state_dict names so official weights load strictly, including the two modules the official forward
never uses (`ups2`, `attention.3`): 1,783,800 parameters.

  embed 3->16 | enc 16/32/64/128 (2/3/3/4 blocks, 1/2/4/8 heads) | dec 64/32 + a 32-channel level
  (3/3/2 blocks) with ECA-gated skips | 4 refinement blocks | 1x head: 32->8->3,
  2x head: PixelShuffle 32->16, 16->8, then the SAME 8->3 conv.

The one unusual operation is the phase-only reconstruction Re(IFFT2(exp(i*angle(FFT2(x))))), used
on q and k of every attention block and before the ECA pooling. It is computed here without any
angle/exp/complex inverse FFT, with identical results:
- For real x the spectrum is Hermitian, so one real FFT (rfft2) holds all of it, and
  exp(i*angle(F)) is simply F/|F| (a bin with F = 0 has angle 0, i.e. the value 1).
- Attention only needs inner products <q_i, k_j> of the reconstructions over H*W. By Parseval these
  equal (1/HW) * sum over the spectrum of Re(Uq * conj(Uk)), which the half spectrum gives with
  weight 2 on the columns that stand for a conjugate pair. So the inverse FFTs are never computed,
  and the official F.normalize is a no-op (a unit-modulus spectrum has unit L2 norm, Parseval
  again), so it is left out.
- ECA averages the reconstruction over H*W: that is U(0,0)/(HW) = sign(sum of x)/(HW), no FFT at
  all. (So the official gate is sigmoid(~1e-4) ~= 0.5 on large maps; not on small ones.)
All spectral arithmetic runs in fp32 with autocast disabled: CUDA autocast would otherwise leave
the FFTs in half precision (cuFFT then only accepts power-of-two sizes) and CPU FFTs do not take
bfloat16 at all.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

MODEL_NAMES = ("phaseformer", "spectroformer")  # spectroformer: phaseformer/spectroformer.py
DOWNSAMPLE_FACTOR = 8                   # three 2x down-samplings
UNUSED_MODULES = ("ups2", "attention.3")  # hold parameters in official files; forward never uses them


# ---------------------------------------------------------------- phase-only arithmetic
def _fp32_or_wider(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.float64 else x.float()


def _exporting() -> bool:
    return torch.onnx.is_in_onnx_export() or torch.jit.is_tracing()


def _index(line: torch.Tensor) -> torch.Tensor:
    """0, 1, ..., n-1 (int64) for a 1-D tensor of length n, built from the tensor itself so that a
    traced graph keeps n as the input's size rather than the traced constant."""
    return torch.ones_like(line, dtype=torch.int64).cumsum(0) - 1


def _dft_cos_sin(n_idx: torch.Tensor, k_idx: torch.Tensor, n: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of 2*pi*n*k/N, (len(n_idx), len(k_idx)). The product is reduced mod N in integers
    first, so the angle stays in [0, 2*pi) and fp32 keeps its full precision at any N."""
    angle = ((n_idx[:, None] * k_idx[None, :]) % n).to(dtype) * (2.0 * math.pi) / n.to(dtype)
    return torch.cos(angle), torch.sin(angle)


def rfft2_matmul(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(Re, Im) of torch.fft.rfft2(x), each (..., H, W//2+1), as three matrix products with cos/sin
    DFT matrices: the ONNX form (see unit_spectrum). The matrices are computed from x's own H and W
    in the graph (integer index products, Cos, Sin), so an exported graph takes any size; O(N^2)
    per line instead of the FFT's O(N log N), which plain BLAS products make up for at tile sizes."""
    h_idx, w_idx = _index(x[(0,) * (x.dim() - 2) + (slice(None), 0)]), _index(x[(0,) * (x.dim() - 1)])
    h, w = h_idx[-1:] + 1, w_idx[-1:] + 1
    k_idx = w_idx[: x.shape[-1] // 2 + 1]                     # the one-sided spectrum's columns
    cos_w, sin_w = _dft_cos_sin(w_idx, k_idx, w, x.dtype)     # (W, W//2+1)
    cos_h, sin_h = _dft_cos_sin(h_idx, h_idx, h, x.dtype)     # (H, H), symmetric
    # along W (real input): x @ [cos | -sin] -> [re | im]; along H (complex): e^{-i t}(re + i im)
    rows = x @ torch.cat([cos_w, -sin_w], 1)                  # (..., H, 2K)
    by_cos, by_sin = cos_h @ rows, sin_h @ rows
    k = k_idx.shape[0]
    re = by_cos[..., :k] + by_sin[..., k:]
    im = by_cos[..., k:] - by_sin[..., :k]
    return re, im


def _pixels(x: torch.Tensor) -> torch.Tensor:
    """H*W of a (B, C, H, W) map as a (1, 1, 1, 1) fp32 tensor that a traced graph computes from its input."""
    return torch.ones_like(x[:1, :1], dtype=torch.float32).sum((-2, -1), keepdim=True)


def unit_spectrum(x: torch.Tensor) -> torch.Tensor:
    """F/|F| of the real 2-D FFT of x over its last two dims (F = 0 -> 1), as a real tensor
    (..., H, W//2+1, 2) in fp32 (fp64 for fp64 inputs).

    While exported (traced), the FFT is rfft2_matmul's DFT-matrix products and F/|F| is real
    arithmetic: the TorchScript ONNX exporter has no rfft2 (nor complex tensors), and ONNX's DFT
    operator ran 10x (power-of-two sizes) to 70x (others) slower than PyTorch's FFT in ONNX Runtime
    1.32, with 6e-5 relative error off powers of two (naive DFT); the matrix products agree with
    rfft2 to ~1e-6 relative at any size.
    """
    with torch.autocast(x.device.type, enabled=False):
        if _exporting():
            re, im = rfft2_matmul(_fp32_or_wider(x))
            mag = torch.sqrt(re * re + im * im)
            zero = mag == 0                                    # angle(0) = 0: the value 1
            safe = torch.where(zero, torch.ones_like(mag), mag)
            return torch.stack([torch.where(zero, torch.ones_like(re), re / safe), im / safe], -1)
        spec = torch.fft.rfft2(_fp32_or_wider(x))
        unit = torch.sgn(spec)                          # F/|F|, and 0 where F == 0 ...
        unit = unit + (spec == 0).to(unit.dtype)        # ... where angle(0) = 0 means the value 1
        return torch.view_as_real(unit)


def phase_only(x: torch.Tensor) -> torch.Tensor:
    """Re(IFFT2(exp(i*angle(FFT2(x))))) per channel, in fp32 (the official `inv_mag`)."""
    h, w = x.shape[-2:]
    with torch.autocast(x.device.type, enabled=False):
        return torch.fft.irfft2(torch.view_as_complex(unit_spectrum(x)), s=(h, w))


def phase_gram(qk: torch.Tensor, heads: int) -> torch.Tensor:
    """<phase_only(q_i), phase_only(k_j)> over H*W for the channels of each head: (B, heads, c, c).

    qk is (B, 2C, H, W): q's C channels, then k's (C = heads * c). One rfft2 of both, in fp32.
    Over the half spectrum (columns 0..W//2) every column but 0 (and W/2 for even W) stands for
    itself and its mirror image, so the full-spectrum sum is 2 * (all columns) - (those columns).
    """
    b, c2, h, w = qk.shape
    c = c2 // 2
    with torch.autocast(qk.device.type, enabled=False):
        unit_q, unit_k = unit_spectrum(qk).chunk(2, 1)                     # (B, C, H, W//2+1, 2)

        def gram(uq, uk):
            return uq.reshape(b, heads, c // heads, -1) @ uk.reshape(b, heads, c // heads, -1).transpose(-2, -1)

        if _exporting():
            # the column weights and H*W from the input itself: a traced Python `w % 2` or `h * w`
            # would fix them to the traced size (and odd widths occur at the 1/8 level)
            col = _index(unit_q[0, 0, 0, :, 0])
            width = _index(qk[0, 0, 0])[-1:] + 1
            weight = (2 - (col == 0).to(torch.int64) - (2 * col == width).to(torch.int64)).to(unit_q.dtype)
            return gram(unit_q * weight[:, None], unit_k) / _pixels(qk)
        total = 2.0 * gram(unit_q, unit_k) - gram(unit_q[..., 0, :], unit_k[..., 0, :])
        if w % 2 == 0:
            total = total - gram(unit_q[..., -1, :], unit_k[..., -1, :])
        return total / (h * w)


def phase_only_mean(x: torch.Tensor) -> torch.Tensor:
    """Spatial mean of phase_only(x), (B, C, 1, 1): the DC bin's unit value over H*W."""
    h, w = x.shape[-2:]
    with torch.autocast(x.device.type, enabled=False):
        total = _fp32_or_wider(x.detach()).sum((-2, -1), keepdim=True)
        if _exporting():
            return torch.where(total >= 0, 1.0, -1.0) / _pixels(x)
        return torch.where(total >= 0, 1.0, -1.0) / (h * w)


# ---------------------------------------------------------------- building blocks
class ECA(nn.Module):
    """Skip-connection gate: sigmoid(Conv1d over channels of the pooled phase-only map) * x.

    k = |log2(C)/gamma + b/gamma| made odd (3 for C = 16, 32, 64). The official model builds these
    with ch = [16, 16, 32, 64] but applies them to 64, 32 and 16 channels; k is 3 either way.
    """

    def __init__(self, channels: int, b: int = 1, gamma: int = 2):
        super().__init__()
        k = int(abs(math.log2(channels) / gamma + b / gamma))
        k = k if k % 2 else k + 1
        self.conv = nn.Conv1d(1, 1, kernel_size=k, padding=(k - 1) // 2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = phase_only_mean(x).flatten(1).unsqueeze(1)          # (B, 1, C)
        gate = torch.sigmoid(self.conv(pooled.to(self.conv.weight.dtype)))
        return x * gate.transpose(1, 2).unsqueeze(-1).to(x.dtype)


class MDTA(nn.Module):
    """Transposed (channel) attention where q and k are phase-only reconstructions."""

    def __init__(self, channels: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.temperature = nn.Parameter(torch.ones(1, num_heads, 1, 1))
        self.qkv = nn.Conv2d(channels, channels * 3, kernel_size=1, bias=False)
        self.qkv_conv = nn.Conv2d(channels * 3, channels * 3, kernel_size=3, padding=1, groups=channels * 3,
                                  bias=False)
        self.project_out = nn.Conv2d(channels, channels, kernel_size=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        qkv = self.qkv_conv(self.qkv(x))
        v = qkv[:, 2 * c:]
        gram = phase_gram(qkv[:, :2 * c], self.num_heads)
        logits = gram * self.temperature.to(gram.dtype)
        attn = torch.softmax(logits, dim=-1)
        out = attn.to(v.dtype) @ v.reshape(b, self.num_heads, c // self.num_heads, h * w)
        return self.project_out(out.reshape(b, c, h, w))


class GDFN(nn.Module):
    """Gated depthwise feed-forward network (as Restormer)."""

    def __init__(self, channels: int, expansion_factor: float):
        super().__init__()
        hidden = int(channels * expansion_factor)
        self.project_in = nn.Conv2d(channels, hidden * 2, kernel_size=1, bias=False)
        self.conv = nn.Conv2d(hidden * 2, hidden * 2, kernel_size=3, padding=1, groups=hidden * 2, bias=False)
        self.project_out = nn.Conv2d(hidden, channels, kernel_size=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = self.conv(self.project_in(x)).chunk(2, dim=1)
        return self.project_out(F.gelu(x1) * x2)


def check_image_batch(x: torch.Tensor, model: str) -> None:
    """ValueError unless x is a (B, 3, H, W) batch with H and W divisible by DOWNSAMPLE_FACTOR."""
    if x.dim() != 4 or x.shape[1] != 3:
        raise ValueError(f"{model} takes (B, 3, H, W) RGB batches; got shape {tuple(x.shape)}")
    h, w = x.shape[-2:]
    if h % DOWNSAMPLE_FACTOR or w % DOWNSAMPLE_FACTOR or h == 0 or w == 0:
        raise ValueError(f"{model} needs a height and width divisible by {DOWNSAMPLE_FACTOR} "
                         f"(three 2x down-samplings); got {h}x{w}")


def channel_layer_norm(norm: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    """nn.LayerNorm(C) over the channels of a (B, C, H, W) map, without the official transposes."""
    return F.layer_norm(x.permute(0, 2, 3, 1), norm.normalized_shape, norm.weight, norm.bias,
                        norm.eps).permute(0, 3, 1, 2)


class TransformerBlock(nn.Module):
    def __init__(self, channels: int, num_heads: int, expansion_factor: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(channels)
        self.attn = MDTA(channels, num_heads)
        self.norm2 = nn.LayerNorm(channels)
        self.ffn = GDFN(channels, expansion_factor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(channel_layer_norm(self.norm1, x))
        return x + self.ffn(channel_layer_norm(self.norm2, x))


class UpSample(nn.Module):
    """Conv C -> 2C, PixelShuffle(2): half the channels, twice the size."""

    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(channels, channels * 2, kernel_size=3, padding=1, bias=False),
                                  nn.PixelShuffle(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class DownSample(nn.Module):
    """Conv C -> C/2, PixelUnshuffle(2): twice the channels, half the size."""

    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(channels, channels // 2, kernel_size=3, padding=1, bias=False),
                                  nn.PixelUnshuffle(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def _stage(n: int, channels: int, heads: int, expansion: float) -> nn.Sequential:
    return nn.Sequential(*[TransformerBlock(channels, heads, expansion) for _ in range(n)])


# ---------------------------------------------------------------- the model
class Phaseformer(nn.Module):
    """model(x) -> (out_1x (B,3,H,W), out_2x (B,3,2H,2W)); H and W divisible by 8.

    No global residual, no output activation: outputs live in the range the training data used
    ([0, 1] here, [-1, 1] for the official release weights).
    """

    def __init__(self, num_blocks=(2, 3, 3, 4), num_heads=(1, 2, 4, 8), channels=(16, 32, 64, 128),
                 num_refinement: int = 4, expansion_factor: float = 2.66, eca_channels=(16, 16, 32, 64)):
        super().__init__()
        c1, c2, c3, _ = channels
        self.attention = nn.ModuleList([ECA(c) for c in eca_channels])   # [3] is unused (official)
        self.embed_conv_rgb = nn.Conv2d(3, c1, kernel_size=3, padding=1, bias=False)
        self.ups1 = UpSample(c2)                                          # 2x head
        self.encoders = nn.ModuleList([_stage(n, c, h, expansion_factor)
                                       for n, h, c in zip(num_blocks, num_heads, channels)])
        self.downs = nn.ModuleList([DownSample(c) for c in channels[:-1]])
        self.ups = nn.ModuleList([UpSample(c) for c in reversed(channels[1:])])
        self.reduces = nn.ModuleList([nn.Conv2d(channels[i], channels[i - 1], kernel_size=1, bias=False)
                                      for i in reversed(range(2, len(channels)))])
        # the last decoder level keeps the concatenated 2*c1 = c2 channels (as Restormer)
        self.decoders = nn.ModuleList([_stage(num_blocks[2], c3, num_heads[2], expansion_factor),
                                       _stage(num_blocks[1], c2, num_heads[1], expansion_factor),
                                       _stage(num_blocks[0], c2, num_heads[0], expansion_factor)])
        self.refinement = _stage(num_refinement, c2, num_heads[0], expansion_factor)
        self.output = nn.Conv2d(8, 3, kernel_size=3, padding=1, bias=False)      # shared by both heads
        self.output1 = nn.Conv2d(c1, 8, kernel_size=3, padding=1, bias=False)    # 2x head
        self.ups2 = UpSample(c1)                                                  # unused (official)
        self.outputl = nn.Conv2d(c2, 8, kernel_size=3, padding=1, bias=False)    # 1x head

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> refined features (B, 32, H, W)."""
        check_image_batch(x, "Phaseformer")
        enc1 = self.encoders[0](self.embed_conv_rgb(x))
        enc2 = self.encoders[1](self.downs[0](enc1))
        enc3 = self.encoders[2](self.downs[1](enc2))
        latent = self.encoders[3](self.downs[2](enc3))
        dec3 = self.decoders[0](self.reduces[0](torch.cat([self.ups[0](latent), self.attention[0](enc3)], 1)))
        dec2 = self.decoders[1](self.reduces[1](torch.cat([self.ups[1](dec3), self.attention[1](enc2)], 1)))
        dec1 = self.decoders[2](torch.cat([self.ups[2](dec2), self.attention[2](enc1)], 1))
        return self.refinement(dec1)

    def forward_head(self, features: torch.Tensor, head: str = "both"):
        """head '1x' -> (B,3,H,W); '2x' -> (B,3,2H,2W); 'both' -> the pair (1x, 2x)."""
        if head not in ("1x", "2x", "both"):
            raise ValueError(f"head must be '1x', '2x' or 'both' (got {head!r})")
        out_1x = self.output(self.outputl(features)) if head != "2x" else None
        out_2x = self.output(self.output1(self.ups1(features))) if head != "1x" else None
        return (out_1x, out_2x) if head == "both" else (out_1x if head == "1x" else out_2x)

    def forward(self, x: torch.Tensor, head: str = "both"):
        return self.forward_head(self.forward_features(x), head)

    def unused_parameters(self) -> list[nn.Parameter]:
        """Parameters of the modules the forward never uses (kept for strict official loading)."""
        return [p for name in UNUSED_MODULES for p in self.get_submodule(name).parameters()]


def init_weights(model: nn.Module) -> nn.Module:
    """The training script's initialisation: Xavier-uniform Conv2d weights; LayerNorm 1/0; the ECA
    Conv1d keeps PyTorch's default."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    return model


def build_model(name: str = "phaseformer", **kwargs) -> nn.Module:
    """'phaseformer': the official Phaseformer (1,783,800 parameters), initialised as the training
    script does. 'spectroformer': the old model final_model_AGSSF1.mymodel (2,530,193 parameters),
    with PyTorch's default initialisation, as the official Spectroformer Train.py builds it."""
    if name not in MODEL_NAMES:
        raise ValueError(f"unknown model {name!r} (choose from {', '.join(MODEL_NAMES)})")
    if name == "spectroformer":
        from phaseformer.spectroformer import Spectroformer  # imports this module's blocks
        return Spectroformer(**kwargs)
    return init_weights(Phaseformer(**kwargs))


def model_name(model: nn.Module) -> str:
    """The build_model name of a built model (unwrapping DataParallel/DDP)."""
    model = getattr(model, "module", model)
    return "phaseformer" if isinstance(model, Phaseformer) else "spectroformer"
