"""Spectroformer's FFTs in the form the ONNX export traces: real cos/sin DFT-matrix products built
from the input's own size (as phaseformer.model.rfft2_matmul does for Phaseformer), real arithmetic
for |F| and angle(F), no complex tensors. Used only while exporting (torch.onnx / tracing); the
PyTorch forward uses torch.fft (phaseformer/spectroformer.py).

Notation per image channel: X (H, W); Ch, Sh (H, H) and Cw, Sw (W, W) with C[n, k] = cos(2 pi n k / N),
S[n, k] = sin(2 pi n k / N) (symmetric). FFT2: Re = Ch X Cw - Sh X Sw, Im = -(Sh X Cw + Ch X Sw).
"""
from __future__ import annotations

import math

import torch

from phaseformer.model import _fp32_or_wider, _index


def _cos_sin(x: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(C, S) for the size of x's dim (-2 or -1), from the tensor itself (a traced graph keeps the
    size symbolic). n*k is reduced mod N in integers; sin is exactly 0 where 2nk = 0 mod N (so the
    self-conjugate bins' imaginary parts are exact zeros, as torch.fft's are, and angle() agrees there)."""
    line = x[(0,) * (x.dim() - 2) + ((slice(None), 0) if dim == -2 else (0, slice(None)))]
    idx = _index(line)
    n = idx[-1:] + 1
    m = (idx[:, None] * idx[None, :]) % n
    angle = m.to(x.dtype) * (2.0 * math.pi) / n.to(x.dtype)
    sin = torch.where((2 * m) % n == 0, torch.zeros_like(angle), torch.sin(angle))
    return torch.cos(angle), sin


def _pixels(x: torch.Tensor) -> torch.Tensor:
    return torch.ones_like(x[:1, :1], dtype=x.dtype).sum((-2, -1), keepdim=True)


def _atan2(im: torch.Tensor, re: torch.Tensor) -> torch.Tensor:
    """torch.angle for re + i*im from Atan and comparisons (ONNX has no Atan2); im = -0 counts as +0,
    as torch.fft's exact zeros are +0."""
    safe = torch.where(re == 0, torch.ones_like(re), re)
    base = torch.atan(im / safe)
    up = im >= 0
    pi = torch.full_like(re, math.pi)
    left = torch.where(up, base + pi, base - pi)
    axis = torch.where(im > 0, pi / 2, torch.where(im < 0, -pi / 2, torch.zeros_like(re)))
    return torch.where(re > 0, base, torch.where(re < 0, left, axis))


def real_spectrum_filter_matmul(x: torch.Tensor, f) -> torch.Tensor:
    """Re(IFFT2(f(Re(FFT2(x))))) with f per bin; Re(IFFT2(Y)) of a real Y is (Ch Y Cw - Sh Y Sw)/(HW)."""
    x = _fp32_or_wider(x)
    ch, sh = _cos_sin(x, -2)
    cw, sw = _cos_sin(x, -1)
    y = f(ch @ x @ cw - sh @ x @ sw)
    return (ch @ y @ cw - sh @ y @ sw) / _pixels(x)


def fourier_upsample_core_matmul(x: torch.Tensor, amp_fuse, pha_fuse) -> torch.Tensor:
    """|IFFT2(amp_fuse(|F|) * exp(i * pha_fuse(angle F)))|, F = FFT2(x), all at H x W."""
    x = _fp32_or_wider(x)
    ch, sh = _cos_sin(x, -2)
    cw, sw = _cos_sin(x, -1)
    p, q = x @ cw, x @ sw
    re = ch @ p - sh @ q
    im = -(sh @ p + ch @ q)
    mag = amp_fuse(torch.sqrt(re * re + im * im))
    pha = pha_fuse(_atan2(im, re))
    yr, yi = mag * torch.cos(pha), mag * torch.sin(pha)
    a, b, c, d = yr @ cw, yr @ sw, yi @ cw, yi @ sw
    out_re = ch @ (a - d) - sh @ (b + c)
    out_im = sh @ (a - d) + ch @ (b + c)
    return torch.sqrt(out_re * out_re + out_im * out_im) / _pixels(x)
