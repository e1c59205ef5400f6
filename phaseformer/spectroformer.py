"""Spectroformer (Khan et al., WACV 2024): the "old model" `final_model_AGSSF1.mymodel` of the
phaseformer seed. One output, at the input's size.

Same skeleton as Phaseformer (16/32/64/128 channels, 2/3/3/4 blocks, 4 refinement blocks), with
- plain transposed channel attention (no phase-only q/k) plus a frequency branch;
- SFCA skip attention: a spatial branch and a frequency branch (1x1 convs on Re(FFT)), fused, then
  the AGSSF gate (Phaseformer's ECA on the phase-only map);
- UpS up-sampling: a frequency up-sampler (amplitude and phase fused, spectrum tiled 2x2, inverse
  FFT at twice the size) next to a PixelShuffle one, fused by a 1x1 conv.
State_dict names and shapes are the original's (strict loading of official files), 2,530,193
parameters, including modules the original builds and never uses for its output: `ups_4`,
`ups2`, `output1`, `attention.3`, `q1X1_2` of every block, and `ups1` (the original computes
`ups1(fr)` at the end of its forward and discards it).

Computed cheaply, with the original's results (exact in real arithmetic; fp32 round-off differs):
- Attention: the original also builds a "frequency query" qf (FFT, GELU, 1x1, inverse FFT) and its
  attention map `attnf`, then never uses them; it outputs project_outf(attn @ vf) with vf the
  second half of kv_conv(kv(project_out(attn @ v))). Here only that: the two bias-free 1x1 convs
  project_out and kv's second half are one 1x1 conv (their weights multiplied), and only the vf half
  of the depthwise kv_conv runs. q/k normalisation is applied to the small c x c Gram matrix.
- SFCA frequency branch: Re(IFFT(f(Re(FFT(x))))) with f per-bin (1x1 convs, GELU). Re(FFT(x)) of a
  real x is even in frequency, so f of it is real and even, so its inverse FFT is real: the whole
  branch is irfft2(f(Re(rfft2(x)))), on the half spectrum.
- UpS: the inverse FFT of a spectrum tiled 2x2 at size 2Hx2W is the H x W inverse FFT placed on the
  even rows and columns and exactly 0 elsewhere. So |IFFT| runs at HxW, the post 1x1 and the reduce
  1x1 are folded (the odd positions carry only post's bias), and the PixelShuffle branch's conv
  absorbs the reduce too: one 3x3 conv at HxW, the frequency part added to the (even, even) sub-pixel.
- AGSSF: the spatial mean of the phase-only map is sign(sum of x)/(HW) (Phaseformer's ECA).
- `ups1(fr)` is not computed (its result is discarded by the original).
Memory layout: between a stage's entry and exit the blocks keep their maps in (B, H, W, C) memory
(run_stage): the layer norms need no transposes, the 1x1 convs are matrix products and oneDNN's
depthwise convs run on channels-last views (NCHW took 2.5-3x as long per 256x256 GDFN map, forward
and backward). The ONNX export runs the NCHW forward() of the blocks.
Gradients are those of the original (the skipped work never reaches the output). Parameters that
get no gradient in the original get none here.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from phaseformer.model import (ECA, GDFN, DownSample, UpSample, _exporting, _fp32_or_wider, channel_layer_norm,
                               check_image_batch)

# modules the forward never uses for its output (kept: official files hold their parameters)
UNUSED_MODULES = ("ups_4", "ups1", "ups2", "output1", "attention.3")


# ---------------------------------------------------------------- spectral helpers (ONNX forms in spectral_export)
def real_spectrum_filter(x: torch.Tensor, f) -> torch.Tensor:
    """Re(IFFT2(f(Re(FFT2(x))))) for a per-frequency-bin f, on the half spectrum."""
    h, w = x.shape[-2:]
    if _exporting():
        from phaseformer.spectral_export import real_spectrum_filter_matmul
        return real_spectrum_filter_matmul(x, f)
    with torch.autocast(x.device.type, enabled=False):
        spec = torch.fft.rfft2(_fp32_or_wider(x)).real
        return torch.fft.irfft2(_fp32_or_wider(f(spec)), s=(h, w))


def _self_conjugate(x: torch.Tensor) -> torch.Tensor:
    """(H, W) bool: the bins of a real x's 2-D spectrum that equal their own conjugate."""
    h, w = x.shape[-2:]
    rows = torch.zeros(h, dtype=torch.bool, device=x.device)
    cols = torch.zeros(w, dtype=torch.bool, device=x.device)
    rows[0], cols[0] = True, True
    if h % 2 == 0:
        rows[h // 2] = True
    if w % 2 == 0:
        cols[w // 2] = True
    return rows[:, None] & cols[None, :]


def fourier_upsample_core(x: torch.Tensor, amp_fuse: nn.Module, pha_fuse: nn.Module) -> torch.Tensor:
    """|IFFT2(amp_fuse(|F|) * exp(i * pha_fuse(angle F)))| at HxW, F = FFT2(x) (fp32 or wider)."""
    if _exporting():
        from phaseformer.spectral_export import fourier_upsample_core_matmul
        return fourier_upsample_core_matmul(x, amp_fuse, pha_fuse)
    with torch.autocast(x.device.type, enabled=False):
        x = _fp32_or_wider(x)
        spec = torch.fft.fft2(x)
        # The bins at rows {0, H/2} x columns {0, W/2} are real for a real x; fp32 FFTs leave ~1e-7
        # there (at some sizes), and where the real part is negative that noise decides between
        # angle +pi and -pi, which pha_fuse maps to different outputs. They are made exactly real
        # (angle pi, as torch.fft's exact zeros and a float64 FFT give).
        spec = torch.complex(spec.real, spec.imag.masked_fill(_self_conjugate(x), 0.0))
        mag = _fp32_or_wider(amp_fuse(spec.abs()))
        pha = _fp32_or_wider(pha_fuse(spec.angle()))
        return torch.fft.ifft2(torch.complex(mag * torch.cos(pha), mag * torch.sin(pha))).abs()


# ---------------------------------------------------------------- building blocks
def depthwise_nhwc(t: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """A 3x3 depthwise conv (padding 1, no bias) of a (B, H, W, C) map, returned (B, H, W, C). On a
    channels-last view oneDNN's kernel ran this 2.5x faster (forward and backward) than on NCHW."""
    out = F.conv2d(t.permute(0, 3, 1, 2), weight, padding=1, groups=weight.shape[0])
    return out.permute(0, 2, 3, 1)


def pointwise_nhwc(t: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """A bias-free 1x1 conv of a (B, H, W, C) map: one matrix product over the channels."""
    return t @ weight.reshape(weight.shape[0], -1).t()


class SpectroMDTA(nn.Module):
    """Channel attention as the original computes its output (see the module docstring)."""

    def __init__(self, channels: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.temperature = nn.Parameter(torch.ones(1, num_heads, 1, 1))
        self.qkv = nn.Conv2d(channels, channels * 3, kernel_size=1, bias=False)
        self.qkv_conv = nn.Conv2d(channels * 3, channels * 3, kernel_size=3, padding=1, groups=channels * 3,
                                  bias=False)
        self.project_out = nn.Conv2d(channels, channels, kernel_size=1, bias=False)
        self.kv = nn.Conv2d(channels, channels * 2, kernel_size=1, bias=False)
        self.q1X1_1 = nn.Conv2d(channels, channels, kernel_size=1, bias=False)   # only in the unused qf
        self.q1X1_2 = nn.Conv2d(channels, channels, kernel_size=1, bias=False)   # never used
        self.kv_conv = nn.Conv2d(channels * 2, channels * 2, kernel_size=3, padding=1, groups=channels * 2,
                                 bias=False)
        self.project_outf = nn.Conv2d(channels, channels, kernel_size=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """On (B, C, H, W), with the modules' own kernels: the ONNX export's form (run_stage)."""
        b, c, h, w = x.shape
        heads = self.num_heads
        q, k, v = self.qkv_conv(self.qkv(x)).reshape(b, 3, heads, c // heads, h * w).unbind(1)
        gram = q @ k.transpose(-2, -1)
        norm_q = q.norm(dim=-1).clamp_min(1e-12)            # F.normalize's eps
        norm_k = k.norm(dim=-1).clamp_min(1e-12)
        attn = torch.softmax(gram / (norm_q[..., :, None] * norm_k[..., None, :]) * self.temperature, dim=-1)
        mixed = (attn @ v).reshape(b, c, h, w)
        vf = F.conv2d(self.project_out(mixed), self.kv.weight[c:])    # only kv's vf half
        vf = F.conv2d(vf, self.kv_conv.weight[c:], padding=1, groups=c)
        return self.project_outf((attn @ vf.reshape(b, heads, c // heads, h * w)).reshape(b, c, h, w))

    def forward_nhwc(self, t: torch.Tensor) -> torch.Tensor:
        """forward() on a (B, H, W, C) map, returned (B, H, W, C), with project_out and kv's vf half as one
        matrix (two bias-free 1x1 convs)."""
        b, h, w, c = t.shape
        heads, d = self.num_heads, c // self.num_heads
        qkv = depthwise_nhwc(pointwise_nhwc(t, self.qkv.weight), self.qkv_conv.weight).reshape(b, h * w, 3, heads, d)
        q, k, v = qkv.unbind(2)                                       # (B, HW, heads, d) each
        gram = q.permute(0, 2, 3, 1) @ k.permute(0, 2, 1, 3)          # (B, heads, d, d)
        # norms over HW as sums of squares across rows of contiguous d-vectors: Tensor.norm here, or
        # over the (d, HW) view, took 2-4x as long. sqrt(max(s, eps^2)) = max(|q|, eps), F.normalize's
        # eps, with a finite gradient where s = 0.
        norm_q = (q * q).sum(1).clamp_min(1e-24).sqrt()
        norm_k = (k * k).sum(1).clamp_min(1e-24).sqrt()
        v = v.transpose(1, 2)                                          # (B, heads, HW, d)
        attn_t = torch.softmax(gram / (norm_q[..., :, None] * norm_k[..., None, :]) * self.temperature,
                               dim=-1).transpose(-2, -1)
        mixed = (v @ attn_t).transpose(1, 2).reshape(b, h, w, c)
        fused = self.kv.weight[c:, :, 0, 0] @ self.project_out.weight[:, :, 0, 0]
        vf = depthwise_nhwc(pointwise_nhwc(mixed, fused), self.kv_conv.weight[c:])
        out = (vf.reshape(b, h * w, heads, d).transpose(1, 2) @ attn_t).transpose(1, 2).reshape(b, h, w, c)
        return pointwise_nhwc(out, self.project_outf.weight)


def gdfn_nhwc(ffn: GDFN, t: torch.Tensor, multiple: int = 8) -> torch.Tensor:
    """GDFN's forward on a (B, H, W, C) map, returned (B, H, W, C).

    The hidden width (int(2.66 C): 42, 85, 170, 340) is padded with zero channels to a multiple of 8:
    with rows of 170 floats the (HW, C) x (C, 2 * 85) product ran at half the speed of 176 (MKL,
    misaligned rows). A zero channel stays exactly 0 through the depthwise conv and gelu(0) * 0, and
    meets zero columns of project_out: only exact zero terms are added; the padding gets no gradient."""
    hidden = ffn.project_out.weight.shape[1]
    pad = -hidden % multiple
    w_in, w_dw, w_out = ffn.project_in.weight, ffn.conv.weight, ffn.project_out.weight
    if pad:
        def pad_halves(w):          # (2 * hidden, ...) -> (2 * (hidden + pad), ...): zeros after each half
            zeros = w.new_zeros(pad, *w.shape[1:])
            return torch.cat([w[:hidden], zeros, w[hidden:], zeros])
        w_in, w_dw = pad_halves(w_in), pad_halves(w_dw)
        w_out = F.pad(w_out, (0, 0, 0, 0, 0, pad))
    x1, x2 = depthwise_nhwc(pointwise_nhwc(t, w_in), w_dw).chunk(2, dim=-1)
    return pointwise_nhwc(F.gelu(x1) * x2, w_out)


class SpectroBlock(nn.Module):
    def __init__(self, channels: int, num_heads: int, expansion_factor: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(channels)
        self.attn = SpectroMDTA(channels, num_heads)
        self.norm2 = nn.LayerNorm(channels)
        self.ffn = GDFN(channels, expansion_factor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(channel_layer_norm(self.norm1, x))
        return x + self.ffn(channel_layer_norm(self.norm2, x))

    def forward_nhwc(self, t: torch.Tensor) -> torch.Tensor:
        """forward() on a (B, H, W, C) map: LayerNorm over the last dim needs no transposes, 1x1 convs are
        matrix products, depthwise convs run on channels-last views."""
        t = t + self.attn.forward_nhwc(F.layer_norm(t, self.norm1.normalized_shape, self.norm1.weight,
                                                    self.norm1.bias, self.norm1.eps))
        return t + gdfn_nhwc(self.ffn, F.layer_norm(t, self.norm2.normalized_shape, self.norm2.weight,
                                                    self.norm2.bias, self.norm2.eps))


class SFCA(nn.Module):
    """Spatial-frequency skip attention, then the AGSSF (phase-only ECA) gate."""

    def __init__(self, channels: int, relu_slope: float = 0.2):
        super().__init__()
        self.identity1 = nn.Conv2d(channels, channels, 1)
        self.identity2 = nn.Conv2d(channels, channels, 1)
        self.conv_1 = nn.Conv2d(channels, 2 * channels, kernel_size=1, bias=True)
        self.relu_1 = nn.LeakyReLU(relu_slope)
        self.conv_2 = nn.Conv2d(2 * channels, channels, kernel_size=3, padding=1, groups=channels, bias=True)
        self.relu_2 = nn.LeakyReLU(relu_slope)
        self.conv_f1 = nn.Conv2d(channels, 2 * channels, kernel_size=1)
        self.conv_f2 = nn.Conv2d(2 * channels, channels, kernel_size=1)
        self.con2X1 = nn.Conv2d(2 * channels, channels, kernel_size=1)
        self.agssf = ECA(channels)

    def _bins(self, spec: torch.Tensor) -> torch.Tensor:
        w1, b1 = self.conv_f1.weight.to(spec.dtype), self.conv_f1.bias.to(spec.dtype)
        w2, b2 = self.conv_f2.weight.to(spec.dtype), self.conv_f2.bias.to(spec.dtype)
        return F.conv2d(F.gelu(F.conv2d(spec, w1, b1)), w2, b2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        spatial = self.relu_2(self.conv_2(self.relu_1(self.conv_1(x))))
        freq = real_spectrum_filter(x, self._bins).to(x.dtype)
        if _exporting():   # the exporter needs conv kernels of known shape: the original's order
            return self.agssf(self.con2X1(torch.cat([spatial + self.identity1(x), freq + self.identity2(x)], 1)))
        # identity1 and identity2 both read x and are summed inside con2X1: one 1x1 conv
        c = x.shape[1]
        wa, wb = self.con2X1.weight[:, :c, 0, 0], self.con2X1.weight[:, c:, 0, 0]
        skip_w = wa @ self.identity1.weight[:, :, 0, 0] + wb @ self.identity2.weight[:, :, 0, 0]
        bias = self.con2X1.bias + wa @ self.identity1.bias + wb @ self.identity2.bias
        weight = torch.cat([wa, wb, skip_w], 1)[:, :, None, None]
        return self.agssf(F.conv2d(torch.cat([spatial, freq, x], 1), weight, bias))


class FourierUpSample(nn.Module):
    """The original's `UpSample(C, True)`: parameters only; UpS.forward applies it (folded)."""

    def __init__(self, channels: int):
        super().__init__()
        self.amp_fuse = nn.Sequential(nn.Conv2d(channels, channels, 1), nn.LeakyReLU(0.1),
                                      nn.Conv2d(channels, channels, 1))
        self.pha_fuse = nn.Sequential(nn.Conv2d(channels, channels, 1), nn.LeakyReLU(0.1),
                                      nn.Conv2d(channels, channels, 1))
        self.post = nn.Conv2d(channels, channels // 2, 1)


class UpS(nn.Module):
    """C -> C/2 channels at twice the size: reduce(cat[Fups(x), Sups(x)]), computed at HxW."""

    def __init__(self, channels: int):
        super().__init__()
        self.Fups = FourierUpSample(channels)
        self.Sups = UpSample(channels)
        self.reduce = nn.Conv2d(channels, channels // 2, kernel_size=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        half = c // 2
        if _exporting():
            return self._export_forward(x)
        red_f, red_s = self.reduce.weight[:, :half, 0, 0], self.reduce.weight[:, half:, 0, 0]
        post = self.Fups.post
        freq_w = red_f @ post.weight[:, :, 0, 0]                          # (C/2, C)
        const = red_f @ post.bias                                          # post's bias, everywhere
        # PixelShuffle input channel j*4 + s becomes channel j at sub-pixel s: reduce acts per s
        conv_w = self.Sups.body[0].weight.reshape(half, 4, c, 3, 3)
        conv_w = torch.einsum("oj,jsk->osk", red_s, conv_w.flatten(2)).reshape(2 * c, c, 3, 3)
        pre = F.conv2d(x, conv_w, const.repeat_interleave(4), padding=1).reshape(b, half, 4, h, w)
        core = fourier_upsample_core(x, self.Fups.amp_fuse, self.Fups.pha_fuse).to(x.dtype)
        even = pre[:, :, :1] + F.conv2d(core, freq_w[:, :, None, None]).unsqueeze(2)
        return F.pixel_shuffle(torch.cat([even, pre[:, :, 1:]], 2).reshape(b, 2 * c, h, w), 2)

    def _export_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The same result with the modules' own kernels (the exporter needs kernels of known shape):
        post(|IFFT|) on the (even, even) sub-pixels, post's bias elsewhere, then reduce."""
        post = self.Fups.post
        core = post(fourier_upsample_core(x, self.Fups.amp_fuse, self.Fups.pha_fuse).to(x.dtype))
        bias = (core * 0 + post.bias[None, :, None, None]).unsqueeze(2)
        fups = F.pixel_shuffle(torch.cat([core.unsqueeze(2), bias, bias, bias], 2).flatten(1, 2), 2)
        return self.reduce(torch.cat([fups, self.Sups(x)], 1))


def _stage(n: int, channels: int, heads: int, expansion: float) -> nn.Sequential:
    return nn.Sequential(*[SpectroBlock(channels, heads, expansion) for _ in range(n)])


def run_stage(stage: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """The blocks of a stage on (B, C, H, W), in channels-last (B, H, W, C) memory in between."""
    if _exporting():
        return stage(x)
    t = x.permute(0, 2, 3, 1).contiguous()
    for block in stage:
        t = block.forward_nhwc(t)
    return t.permute(0, 3, 1, 2).contiguous()


# ---------------------------------------------------------------- the model
class Spectroformer(nn.Module):
    """model(x) -> (B, 3, H, W); H and W divisible by 8. No global residual, no output activation."""

    def __init__(self, num_blocks=(2, 3, 3, 4), num_heads=(1, 2, 4, 8), channels=(16, 32, 64, 128),
                 num_refinement: int = 4, expansion_factor: float = 2.66, sfca_channels=(64, 32, 16, 64)):
        super().__init__()
        c1, c2, c3, c4 = channels
        self.attention = nn.ModuleList([SFCA(c) for c in sfca_channels])    # [3] is unused (official)
        self.embed_conv_rgb = nn.Conv2d(3, c1, kernel_size=3, padding=1, bias=False)
        self.encoders = nn.ModuleList([_stage(n, c, h, expansion_factor)
                                       for n, h, c in zip(num_blocks, num_heads, channels)])
        self.down1, self.down2, self.down3 = DownSample(c1), DownSample(c2), DownSample(c3)
        self.ups_1, self.ups_2, self.ups_3 = UpS(c4), UpS(c3), UpS(c2)
        self.ups_4 = UpS(3)                                                   # unused (official)
        self.ups1 = UpSample(c2)                                              # result discarded (official)
        self.reduces2 = nn.Conv2d(c3, c2, kernel_size=1, bias=False)
        self.reduces1 = nn.Conv2d(c4, c3, kernel_size=1, bias=False)
        self.decoders = nn.ModuleList([_stage(num_blocks[2], c3, num_heads[2], expansion_factor),
                                       _stage(num_blocks[1], c2, num_heads[1], expansion_factor),
                                       _stage(num_blocks[0], c2, num_heads[0], expansion_factor)])
        self.refinement = _stage(num_refinement, c2, num_heads[0], expansion_factor)
        self.output = nn.Conv2d(8, 3, kernel_size=3, padding=1, bias=False)
        self.output1 = nn.Conv2d(c1, 8, kernel_size=3, padding=1, bias=False)   # unused (official)
        self.ups2 = UpSample(c1)                                                  # unused (official)
        self.outputl = nn.Conv2d(c2, 8, kernel_size=3, padding=1, bias=False)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> refined features (B, 32, H, W)."""
        check_image_batch(x, "Spectroformer")
        enc1 = run_stage(self.encoders[0], self.embed_conv_rgb(x))
        enc2 = run_stage(self.encoders[1], self.down1(enc1))
        enc3 = run_stage(self.encoders[2], self.down2(enc2))
        latent = run_stage(self.encoders[3], self.down3(enc3))
        dec3 = run_stage(self.decoders[0], self.reduces1(torch.cat([self.ups_1(latent), self.attention[0](enc3)], 1)))
        dec2 = run_stage(self.decoders[1], self.reduces2(torch.cat([self.ups_2(dec3), self.attention[1](enc2)], 1)))
        dec1 = run_stage(self.decoders[2], torch.cat([self.ups_3(dec2), self.attention[2](enc1)], 1))
        return run_stage(self.refinement, dec1)

    def forward_head(self, features: torch.Tensor, head: str = "1x") -> torch.Tensor:
        if head != "1x":
            raise ValueError(f"Spectroformer has one output, at the input's size (head '1x'); got {head!r}")
        return self.output(self.outputl(features))

    def forward(self, x: torch.Tensor, head: str = "1x") -> torch.Tensor:
        return self.forward_head(self.forward_features(x), head)

    def unused_parameters(self) -> list[nn.Parameter]:
        """Parameters the output never depends on (kept for strict official loading)."""
        unused = [p for name in UNUSED_MODULES for p in self.get_submodule(name).parameters()]
        return unused + [m.q1X1_1.weight for m in self.modules() if isinstance(m, SpectroMDTA)] + \
            [m.q1X1_2.weight for m in self.modules() if isinstance(m, SpectroMDTA)]
