"""CRBL: two EfficientNetB0 backbones + bilinear pooling, a PyTorch twin of the original Keras model.

The original (Keras 2 / tf_keras, qubvel ``efficientnet`` 1.1.1) is::

    b1 = efn.EfficientNetB0(weights="imagenet", include_top=False)       # renamed model1_*
    b2 = efn.EfficientNetB0(weights="noisy-student", include_top=False)  # renamed model2_*
    layers[:150] frozen, layers[150:] trainable = isCrop (for both backbones)
    Lambda(outer_product)([b1(x), b2(x)]) -> Dropout(0.5) -> Dense(1, sigmoid, name="predictions")

Everything here reproduces that model numerically (see tests/test_convert_h5.py):

* TF "SAME" padding: stride-1 convs pad k//2 on every side; the five stride-2 convs pad
  asymmetrically (the extra row/column goes bottom/right), computed from the actual input size at
  forward time, so odd input sizes match Keras too.  (``keras.applications.EfficientNetB0`` uses
  ZeroPadding2D layers that equal TF SAME for even sizes and for odd sizes when the Keras model was
  built with a static input shape; built with ``input_shape=None`` it pads odd sizes differently
  and produces a different output size - this model follows TF SAME.)
* BatchNorm eps 1e-3 (momentum 0.01 = 1 - Keras 0.99), swish = SiLU, squeeze-excitation with bias
  and reduce width ``max(1, int(block_input_filters * 0.25))``.
* Stochastic depth (qubvel ``FixedDropout``, rate 0.2 * block_num / 16, one draw per sample, kept
  samples scaled by 1/(1-rate)) in training mode only, in the 9 blocks where qubvel has a ``drop``
  layer.
* Keras semantics for frozen BatchNorm: a BN layer whose parameters are frozen runs in inference
  mode (moving statistics, never updated) even while the model trains; ``train()`` keeps such BN
  modules in eval mode.  Dropout and drop-path stay active in training mode, as in Keras.

Module names map 1:1 to Keras layer names: Keras ``block5c_se_expand`` is ``block5c.se_expand``,
``stem_conv`` is ``stem_conv``; :data:`KERAS_LAYERS` lists all 230 Keras layers of qubvel's B0 in
``model.layers`` order, so ``layers[150:]`` means what it means in Keras.

Speed (CPU): the computation always runs in channels_last memory format (outputs come back in the
input's format); without autograd, eval-mode BatchNorm is folded into the conv weights on the fly,
activations/SE/residual run in place, and the bilinear head is evaluated in cache-sized blocks
without materialising the 1,638,400-wide vectors.  With autograd the plain differentiable path runs.

Input convention (timm style): (B,3,H,W) RGB float in [0,1] (the CRBL code fed x/255).  Each
backbone has an input affine ``x * input_scale + input_shift`` (identity by default) so that weights
converted from ``keras.applications.EfficientNetB0`` (which normalises 0-255 input inside the model)
reproduce Keras on the same image; the buffers exist in every EfficientNetB0 so the state_dict
layout never changes.
"""
from __future__ import annotations

import contextlib
import math
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["EfficientNetB0", "CRBL", "build_model", "MODEL_TYPES", "DEFAULT_THRESHOLDS",
           "KERAS_LAYERS", "KERAS_LAYER_NAMES", "FREEZE_INDEX", "BN_EPS", "BN_MOMENTUM",
           "FEATURE_CHANNELS"]

BN_EPS = 1e-3
BN_MOMENTUM = 0.01          # torch momentum = 1 - Keras momentum (0.99)
DROP_CONNECT_RATE = 0.2
SE_RATIO = 0.25
FEATURE_CHANNELS = 1280
FREEZE_INDEX = 150          # Keras: backbone.layers[:150] always frozen, layers[150:] trainable = isCrop
MODEL_TYPES = ("crop", "full")
DEFAULT_THRESHOLDS = {"crop": 0.01, "full": 0.5}   # anomaly if sigmoid(logit) > threshold


class BlockArgs(NamedTuple):
    name: str
    kernel: int
    stride: int
    in_ch: int
    out_ch: int
    expand: int
    drop_rate: float        # 0.0 where qubvel has no `drop` layer

    @property
    def has_skip(self) -> bool:
        return self.stride == 1 and self.in_ch == self.out_ch


# qubvel DEFAULT_BLOCKS_ARGS for B0 (width/depth coefficient 1.0): kernel, repeats, in, out, expand, stride
_STAGES = ((3, 1, 32, 16, 1, 1), (3, 2, 16, 24, 6, 2), (5, 2, 24, 40, 6, 2), (3, 3, 40, 80, 6, 2),
           (5, 3, 80, 112, 6, 1), (5, 4, 112, 192, 6, 2), (3, 1, 192, 320, 6, 1))


def _block_table() -> tuple[BlockArgs, ...]:
    total = sum(s[1] for s in _STAGES)
    out, num = [], 0
    for stage, (k, repeats, cin, cout, expand, stride) in enumerate(_STAGES, start=1):
        for r in range(repeats):
            b_in, b_stride = (cin, stride) if r == 0 else (cout, 1)
            rate = DROP_CONNECT_RATE * num / total
            args = BlockArgs(f"block{stage}{'abcdefgh'[r]}", k, b_stride, b_in, cout, expand, 0.0)
            out.append(args._replace(drop_rate=rate if args.has_skip and rate > 0 else 0.0))
            num += 1
    return tuple(out)


BLOCKS = _block_table()


def _keras_layers() -> tuple[tuple[str, str], ...]:
    """(name, Keras class) of every layer of qubvel's EfficientNetB0(include_top=False)."""
    L = [("input_1", "InputLayer"), ("stem_conv", "Conv2D"), ("stem_bn", "BatchNormalization"),
         ("stem_activation", "Activation")]
    for b in BLOCKS:
        p = b.name + "_"
        if b.expand != 1:
            L += [(p + "expand_conv", "Conv2D"), (p + "expand_bn", "BatchNormalization"),
                  (p + "expand_activation", "Activation")]
        L += [(p + "dwconv", "DepthwiseConv2D"), (p + "bn", "BatchNormalization"),
              (p + "activation", "Activation"), (p + "se_squeeze", "GlobalAveragePooling2D"),
              (p + "se_reshape", "Reshape"), (p + "se_reduce", "Conv2D"), (p + "se_expand", "Conv2D"),
              (p + "se_excite", "Multiply"), (p + "project_conv", "Conv2D"),
              (p + "project_bn", "BatchNormalization")]
        if b.has_skip:
            if b.drop_rate > 0:
                L.append((p + "drop", "FixedDropout"))
            L.append((p + "add", "Add"))
    L += [("top_conv", "Conv2D"), ("top_bn", "BatchNormalization"), ("top_activation", "Activation")]
    return tuple(L)


KERAS_LAYERS = _keras_layers()                      # 230 entries, Keras model.layers order
KERAS_LAYER_NAMES = tuple(n for n, _ in KERAS_LAYERS)


def _bn(ch: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(ch, eps=BN_EPS, momentum=BN_MOMENTUM)


def _conv2d(x, weight, bias, stride, padding, groups, swish: bool):
    """conv2d, optionally followed by an in-place swish (only called without autograd)."""
    y = F.conv2d(x, weight, bias, stride, padding, 1, groups)
    return F.silu(y, inplace=True) if swish else y


class Conv2dSame(nn.Conv2d):
    """Conv2d with TensorFlow "SAME" padding.

    Stride 1 (odd kernel): symmetric k//2, static.  Stride > 1: pad_total = max((ceil(n/s)-1)*s + k - n, 0)
    per spatial dim, floor half before and the rest after, from the input's actual size.
    """

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int = 1, groups: int = 1,
                 bias: bool = False):
        super().__init__(in_ch, out_ch, kernel, stride=stride, padding=kernel // 2 if stride == 1 else 0,
                         groups=groups, bias=bias)
        self._dynamic = stride != 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x, self.weight, self.bias)

    def conv(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
             swish: bool = False) -> torch.Tensor:
        if not self._dynamic:
            return _conv2d(x, weight, bias, self.stride, self.padding, self.groups, swish)
        k, s = self.kernel_size[0], self.stride[0]
        h, w = x.shape[-2], x.shape[-1]
        exporting = torch.onnx.is_in_onnx_export()
        if exporting:
            # an exported graph has a fixed input size: constant pads, which ONNX Runtime folds
            # into the Conv node (ONNX Conv takes asymmetric pads)
            h, w = int(h), int(w)
        oh, ow = -(-h // s), -(-w // s)                 # TF SAME output size: ceil(n / s)
        ph, pw = max((oh - 1) * s + k - h, 0), max((ow - 1) * s + k - w, 0)
        th, tw = ph % 2, pw % 2
        if not (th or tw):
            return _conv2d(x, weight, bias, self.stride, (ph // 2, pw // 2), self.groups, swish)
        # TF puts the odd pixel of the padding after (bottom/right).
        if self.in_channels * h * w <= self.out_channels * oh * ow or exporting:
            # small input (the stem: 3 channels): pad it the TF way
            x = F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))
            return _conv2d(x, weight, bias, self.stride, (0, 0), self.groups, swish)
        # large input (depthwise convs): rather than copying it into an asymmetrically padded
        # tensor, pad symmetrically by pad_before + s along the asymmetric dims.  That samples the
        # same grid shifted by one output row/column, which is sliced off.
        y = _conv2d(x, weight, bias, self.stride, (ph // 2 + s * th, pw // 2 + s * tw), self.groups, swish)
        return y[:, :, th:th + oh, tw:tw + ow]


def _conv_bn(conv: Conv2dSame, bn: nn.BatchNorm2d, x: torch.Tensor, fold: bool,
             swish: bool = False) -> torch.Tensor:
    """[swish](bn(conv(x))).  With `fold` (no autograd) and bn in eval mode, BN is folded into the
    conv weights on the fly (nothing cached, so never stale) and swish runs in place."""
    if not fold or bn.training:
        y = bn(conv(x))
        return F.silu(y, inplace=fold) if swish else y
    scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
    shift = bn.bias - bn.running_mean * scale
    if conv.bias is not None:
        shift = shift + conv.bias * scale
    return conv.conv(x, conv.weight * scale[:, None, None, None], shift, swish)


def _drop_path(x: torch.Tensor, rate: float) -> torch.Tensor:
    """Keras FixedDropout with noise_shape (None,1,1,1): drop whole samples, scale kept by 1/(1-rate)."""
    keep = 1.0 - rate
    mask = torch.empty((x.shape[0], 1, 1, 1), dtype=x.dtype, device=x.device).bernoulli_(keep)
    return x * mask.div_(keep)


class MBConvBlock(nn.Module):
    """qubvel ``mb_conv_block``; child names are the Keras layer-name suffixes."""

    def __init__(self, a: BlockArgs):
        super().__init__()
        mid = a.in_ch * a.expand
        self.args = a
        if a.expand != 1:
            self.expand_conv = Conv2dSame(a.in_ch, mid, 1)
            self.expand_bn = _bn(mid)
        else:
            self.expand_conv = self.expand_bn = None
        self.dwconv = Conv2dSame(mid, mid, a.kernel, a.stride, groups=mid, bias=False)
        self.bn = _bn(mid)
        rd = max(1, int(a.in_ch * SE_RATIO))
        self.se_reduce = nn.Conv2d(mid, rd, 1, bias=True)
        self.se_expand = nn.Conv2d(rd, mid, 1, bias=True)
        self.project_conv = Conv2dSame(mid, a.out_ch, 1)
        self.project_bn = _bn(a.out_ch)
        self.has_skip = a.has_skip
        self.drop_rate = a.drop_rate

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        fast = not torch.is_grad_enabled()    # inference: fold eval-mode BN, in-place activations
        x = inputs
        if self.expand_conv is not None:
            x = _conv_bn(self.expand_conv, self.expand_bn, x, fast, swish=True)
        x = _conv_bn(self.dwconv, self.bn, x, fast, swish=True)
        if torch.onnx.is_in_onnx_export():
            # squeeze-excitation as the 1x1 convs they are: ONNX Runtime then keeps the block in
            # its blocked (NCHWc) layout instead of reordering around Flatten/Gemm
            s = F.silu(self.se_reduce(F.adaptive_avg_pool2d(x, 1)))
            x = _conv_bn(self.project_conv, self.project_bn, x * torch.sigmoid(self.se_expand(s)), fast)
            return x + inputs if self.has_skip else x
        # squeeze-excitation; 1x1 convs on a 1x1 map computed as linear layers (same weights)
        s = F.adaptive_avg_pool2d(x, 1).flatten(1)
        s = F.silu(F.linear(s, self.se_reduce.weight.flatten(1), self.se_reduce.bias), inplace=True)
        s = torch.sigmoid(F.linear(s, self.se_expand.weight.flatten(1), self.se_expand.bias))
        x = x.mul_(s[:, :, None, None]) if fast else x * s[:, :, None, None]
        x = _conv_bn(self.project_conv, self.project_bn, x, fast)
        if self.has_skip:
            if self.drop_rate > 0 and self.training:
                x = _drop_path(x, self.drop_rate)
            x = x.add_(inputs) if fast else x + inputs
        return x


class EfficientNetB0(nn.Module):
    """qubvel EfficientNetB0(include_top=False) in PyTorch: (B,3,H,W) in [0,1] -> (B,1280,h,w)."""

    def __init__(self):
        super().__init__()
        # input affine (identity unless converted from keras.applications, see module docstring)
        self.register_buffer("input_scale", torch.ones(3))
        self.register_buffer("input_shift", torch.zeros(3))
        self.stem_conv = Conv2dSame(3, 32, 3, 2)
        self.stem_bn = _bn(32)
        self.block_names = tuple(b.name for b in BLOCKS)
        for b in BLOCKS:
            self.add_module(b.name, MBConvBlock(b))
        self.top_conv = Conv2dSame(320, FEATURE_CHANNELS, 1)
        self.top_bn = _bn(FEATURE_CHANNELS)
        self.num_features = FEATURE_CHANNELS
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """qubvel's initialisation: conv kernels N(0, 2 / fan_out) with Keras's fan_out (kh*kw*out,
        kh*kw for depthwise), zero biases, BN gamma 1 / beta 0.  (torch's default conv init lets the
        activations of this BN-in-eval-mode network vanish to ~1e-12 at the top.)"""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                kh, kw = m.kernel_size
                depthwise = m.groups == m.in_channels == m.out_channels and m.groups > 1
                fan_out = kh * kw * (1 if depthwise else m.out_channels)
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    # ------------------------------------------------------------------ Keras correspondence
    def keras_layers(self) -> list[tuple[str, nn.Module | None]]:
        """All 230 Keras layers in ``model.layers`` order: (Keras name, module or None if weightless)."""
        out = []
        for name, _cls in KERAS_LAYERS:
            out.append((name, self.keras_module(name)))
        return out

    def keras_module(self, name: str) -> nn.Module | None:
        """The module holding the weights of Keras layer `name` (None for weightless layers)."""
        if name.startswith("block"):
            block, _, child = name.partition("_")
            m = getattr(getattr(self, block), child, None)
        else:
            m = getattr(self, name, None)
        return m if isinstance(m, (nn.Conv2d, nn.BatchNorm2d)) else None

    # ------------------------------------------------------------------ Keras BN semantics
    def train(self, mode: bool = True):
        super().train(mode)
        if mode:
            for m in self.modules():
                if isinstance(m, nn.BatchNorm2d) and not m.weight.requires_grad:
                    m.eval()    # frozen Keras BN = inference mode, moving stats never updated
        return self

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B,3,H,W) in [0,1] -> (B,1280,ceil(H/32),ceil(W/32)), in the input's memory format."""
        y = self.forward_channels_last(x)
        return y if x.is_contiguous(memory_format=torch.channels_last) else y.contiguous()

    def forward_channels_last(self, x: torch.Tensor) -> torch.Tensor:
        """The computation, always in channels_last memory format (markedly faster on CPU)."""
        x = x.contiguous(memory_format=torch.channels_last)
        x = torch.addcmul(self.input_shift[:, None, None], x, self.input_scale[:, None, None])
        # Frozen leading layers (Keras layers[:150], or all of a 'full' backbone) need no autograd
        # graph when the input needs none; running them under no_grad takes the inference fast path.
        frozen = not x.requires_grad
        with torch.no_grad() if frozen and not self.stem_conv.weight.requires_grad else contextlib.nullcontext():
            x = _conv_bn(self.stem_conv, self.stem_bn, x, not torch.is_grad_enabled(), swish=True)
        for name in self.block_names:
            block = self._modules[name]
            frozen = frozen and not any(p.requires_grad for p in block.parameters())
            with torch.no_grad() if frozen else contextlib.nullcontext():
                x = block(x)
        with torch.no_grad() if frozen and not self.top_conv.weight.requires_grad else contextlib.nullcontext():
            return _conv_bn(self.top_conv, self.top_bn, x, not torch.is_grad_enabled(), swish=True)

    forward_features = forward


def bilinear_pool(f1: torch.Tensor, f2: torch.Tensor) -> torch.Tensor:
    """The original Lambda(outer_product): (B,C1,H,W),(B,C2,H,W) -> (B, C1*C2), index i*C2 + j.

    phi = sum over positions of f1_i * f2_j / (H*W); y = sign(phi) * sqrt(|phi| + 1e-12);
    L2-normalised over the C1*C2 vector.
    """
    B, C1, H, W = f1.shape
    C2 = f2.shape[1]
    a = f1.reshape(B, C1, H * W)
    b = f2.reshape(B, C2, H * W)
    phi = torch.bmm(a, b.transpose(1, 2)).div_(H * W).reshape(B, C1 * C2)
    y = torch.sign(phi) * torch.sqrt(phi.abs() + 1e-12)
    return F.normalize(y, dim=1, eps=1e-12)


def _bilinear_logits_inference(f1: torch.Tensor, f2: torch.Tensor, weight: torch.Tensor,
                               bias: torch.Tensor, rows: int = 32) -> torch.Tensor:
    """Linear(bilinear_pool(f1, f2)) without autograd, in cache-sized row blocks.

    Same math as the training path; it never materialises the (B, 1,638,400) tensors (at batch 32
    that is 210 MB per temporary, and allocating and touching them dominates the head's run time).
    logit = (w . y) / max(||y||, 1e-12) + b with y = sign(phi) * sqrt(|phi| + 1e-12).
    """
    B, C1, H, W = f1.shape
    C2 = f2.shape[1]
    a = f1.reshape(B, C1, H * W)
    bt = f2.reshape(B, C2, H * W).transpose(1, 2)
    w = weight.reshape(C1, C2)                  # flat index i*C2 + j
    rows = min(rows, C1)
    phi = f1.new_empty((B, rows, C2))
    y = f1.new_empty((B, rows, C2))
    dot = f1.new_zeros(B, dtype=torch.float64)
    sq = f1.new_zeros(B, dtype=torch.float64)
    for r0 in range(0, C1, rows):
        r1 = min(r0 + rows, C1)
        p, q = phi[:, : r1 - r0], y[:, : r1 - r0]
        torch.baddbmm(p, a[:, r0:r1], bt, beta=0, alpha=1.0 / (H * W), out=p)
        torch.abs(p, out=q).add_(1e-12)
        sq += q.sum((1, 2))                     # ||y||^2 = sum(|phi| + 1e-12)
        torch.copysign(q.sqrt_(), p, out=q)
        dot += q.reshape(B, -1) @ w[r0:r1].reshape(-1)
    return (dot / sq.sqrt().clamp_min(1e-12)).to(f1.dtype)[:, None] + bias


def _bilinear_logits_export(f1: torch.Tensor, f2: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                            rows: int = 128) -> torch.Tensor:
    """_bilinear_logits_inference in plain ONNX operators (MatMul, Abs, Sqrt, Clip, ReduceSum; no
    out=, float64 or copysign), still in row blocks so that ONNX Runtime never holds a
    (B, 1,638,400) tensor.  sign(phi) is Clip(phi * 2^127, -1, 1): exact for +-0 and every normal
    float32 (a subnormal phi, which TensorFlow flushes to zero, gives |sign| < 1 on a term below
    1e-6); ONNX Runtime's Sign and Where kernels are several times slower than a multiply.
    1/(H*W) scales the small operand (exact for the power-of-two H*W of 128x128 inputs, one
    rounding otherwise)."""
    B, C1, H, W = f1.shape
    C2 = f2.shape[1]
    a = f1.reshape(B, C1, H * W) / (H * W)
    bt = f2.reshape(B, C2, H * W).transpose(1, 2)
    w = weight.reshape(C1, C2)
    dot = sq = None
    for r0 in range(0, C1, rows):
        r1 = min(r0 + rows, C1)
        phi = torch.matmul(a[:, r0:r1], bt)
        q = phi.abs() + 1e-12
        y = torch.clamp(phi * 2.0 ** 127, -1.0, 1.0) * torch.sqrt(q)
        d = torch.matmul(y.reshape(B, -1), w[r0:r1].reshape(-1, 1))
        n = q.sum((1, 2))
        dot, sq = (d, n) if dot is None else (dot + d, sq + n)
    return dot / sq.sqrt().clamp_min(1e-12)[:, None] + bias


_BIT = torch.arange(8, dtype=torch.uint8)


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """(..., C) bool -> (..., C/8) uint8, bit k of byte i = mask[8i + k]."""
    return (mask.reshape(*mask.shape[:-1], -1, 8).to(torch.uint8) << _BIT.to(mask.device)).sum(-1, dtype=torch.uint8)


def unpack_mask(bits: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Inverse of pack_mask, as 0/1 values of `dtype`."""
    return ((bits[..., None] >> _BIT.to(bits.device)) & 1).reshape(*bits.shape[:-1], -1).to(dtype)


def dropout_bits(shape: tuple[int, ...], keep: float, device) -> torch.Tensor:
    """A packed Bernoulli(keep) mask.  For keep = 0.5 (the model's Dropout) the random bytes are
    the mask: 8x cheaper than bernoulli_ on 52 M elements."""
    *lead, c = shape
    if keep == 0.5:
        return torch.randint(0, 256, (*lead, c // 8), dtype=torch.uint8, device=device)
    return pack_mask(torch.rand(shape, device=device) < keep)


class _BilinearHead(torch.autograd.Function):
    """logits = Linear(Dropout(bilinear_pool(f1, f2))) with autograd, in row blocks.

    Training at batch 32 through the plain path creates a dozen (B, 1,638,400) temporaries
    (210 MB each); this computes the same function and the same gradients blockwise, keeping only
    the features, the dropout mask (1 bit per element) and two scalars per sample, and recomputes
    the pooled features in backward.  With y = sign(phi) sqrt(|phi| + 1e-12), n = ||y|| and the
    kept-unit mask m scaled by 1/keep:  logit = (sum y*m*w) / (keep * n) + b.
    (n >= sqrt(1280*1280*1e-12) > 1e-12, so F.normalize's clamp never applies.)
    """

    @staticmethod
    def forward(ctx, f1, f2, weight, bias, mask, keep: float, rows: int = 64):
        B, C1, HW = f1.shape
        C2 = f2.shape[1]
        w = weight.reshape(C1, C2)
        bt = f2.transpose(1, 2)
        dot = f1.new_zeros(B, dtype=torch.float64)
        sq = f1.new_zeros(B, dtype=torch.float64)
        for r0 in range(0, C1, rows):
            r1 = min(r0 + rows, C1)
            phi = torch.baddbmm(f1.new_empty(()), f1[:, r0:r1], bt, beta=0, alpha=1.0 / HW)
            q = phi.abs().add_(1e-12)
            sq += q.sum((1, 2), dtype=torch.float64)
            y = torch.copysign(q.sqrt_(), phi)
            if mask is not None:
                y.mul_(unpack_mask(mask[:, r0:r1], y.dtype))
            dot += (y.reshape(B, -1) @ w[r0:r1].reshape(-1)).double()
        n = sq.sqrt()
        ctx.save_for_backward(f1, f2, weight, mask, dot, n)
        ctx.keep, ctx.rows = keep, rows
        return ((dot / (keep * n)).to(f1.dtype) + bias)[:, None]

    @staticmethod
    def backward(ctx, grad_out):
        f1, f2, weight, mask, dot, n = ctx.saved_tensors
        keep, rows = ctx.keep, ctx.rows
        B, C1, HW = f1.shape
        C2 = f2.shape[1]
        w = weight.reshape(C1, C2)
        g = grad_out.reshape(B).double()
        coef = (g / (keep * n)).to(f1.dtype)[:, None, None]            # dlogit/d(y*m*w) per sample
        proj = (dot / (n * n)).to(f1.dtype)[:, None, None]              # z.dz = coef * proj * n ...
        need_f1, need_f2, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        d1 = torch.zeros_like(f1) if need_f1 else None
        d2 = torch.zeros_like(f2) if need_f2 else None
        dw = torch.zeros_like(w) if need_w else None
        bt = f2.transpose(1, 2)
        for r0 in range(0, C1, rows):
            r1 = min(r0 + rows, C1)
            phi = torch.baddbmm(f1.new_empty(()), f1[:, r0:r1], bt, beta=0, alpha=1.0 / HW)
            s = phi.abs().add_(1e-12).sqrt_()
            y = torch.copysign(s, phi)
            m = unpack_mask(mask[:, r0:r1], f1.dtype) if mask is not None else None
            ym = y * m if m is not None else y
            if need_w:
                dw[r0:r1] = (ym * coef).sum(0)
            if need_f1 or need_f2:
                # dy = coef * (w*m - y * dot / n^2); dphi = dy / (2 s) where phi != 0 (autograd's sign' = 0)
                wm = w[r0:r1] * m if m is not None else w[r0:r1].expand_as(y)
                dphi = (wm - y * proj).mul_(coef).div_(2 * s).mul_(phi != 0).div_(HW)
                if need_f1:
                    d1[:, r0:r1] = torch.bmm(dphi, f2)
                if need_f2:
                    d2 += torch.bmm(dphi.transpose(1, 2), f1[:, r0:r1])
        db = grad_out.sum().reshape(1) if ctx.needs_input_grad[3] else None
        return d1, d2, (dw.reshape_as(weight) if need_w else None), db, None, None, None


class CRBL(nn.Module):
    """Dual EfficientNetB0 + bilinear pooling + Dropout(0.5) + Linear(1,638,400 -> 1).

    forward(x) returns logits (B,1); sigmoid(logits) is the Keras model's probability.
    """

    def __init__(self):
        super().__init__()
        self.backbone1 = EfficientNetB0()       # Keras EfficientNetB0_imagenetWeight (model1_*)
        self.backbone2 = EfficientNetB0()       # Keras EfficientNetB0_noisy-studentWeight (model2_*)
        self.dropout = nn.Dropout(0.5)
        self.predictions = nn.Linear(FEATURE_CHANNELS * FEATURE_CHANNELS, 1)
        nn.init.xavier_uniform_(self.predictions.weight)      # Keras Dense default (glorot_uniform)
        nn.init.zeros_(self.predictions.bias)
        self.num_features = FEATURE_CHANNELS * FEATURE_CHANNELS
        self.model_type: str | None = None

    def set_model_type(self, model_type: str) -> "CRBL":
        """Keras freezing: layers[:150] frozen; layers[150:] trainable iff crop; the head always trainable."""
        _check_model_type(model_type)
        for bb in (self.backbone1, self.backbone2):
            bb.requires_grad_(False)
            if model_type == "crop":
                for _name, mod in bb.keras_layers()[FREEZE_INDEX:]:
                    if mod is not None:
                        mod.requires_grad_(True)
        self.predictions.requires_grad_(True)
        self.model_type = model_type
        self.train(self.training)      # re-apply the frozen-BN rule
        return self

    def forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.backbone1(x), self.backbone2(x)

    def forward_head(self, features, pre_logits: bool = False, dropout_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Bilinear pooling -> Dropout(0.5) -> Linear.  `dropout_mask` (B,1280,1280 bool) replaces
        the random mask in training mode (for tests)."""
        f1, f2 = features
        if pre_logits:
            return bilinear_pool(f1, f2)
        dropping = self.training and self.dropout.p > 0
        if torch.onnx.is_in_onnx_export():
            return _bilinear_logits_export(f1, f2, self.predictions.weight, self.predictions.bias)
        if not torch.is_grad_enabled() and not dropping:
            return _bilinear_logits_inference(f1, f2, self.predictions.weight, self.predictions.bias)
        B, C1, H, W = f1.shape
        keep = 1.0 - self.dropout.p if dropping else 1.0
        mask = None
        if dropping:
            mask = pack_mask(dropout_mask) if dropout_mask is not None else \
                dropout_bits((B, C1, f2.shape[1]), keep, f1.device)
        with torch.autocast(f1.device.type, enabled=False):  # sqrt of tiny values: keep the head fp32
            return _BilinearHead.apply(f1.reshape(B, C1, H * W).float(), f2.reshape(B, -1, H * W).float(),
                                       self.predictions.weight.float(), self.predictions.bias.float(),
                                       mask, keep)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous(memory_format=torch.channels_last)
        return self.forward_head((self.backbone1.forward_channels_last(x),
                                  self.backbone2.forward_channels_last(x)))


def _check_model_type(model_type) -> None:
    if model_type not in MODEL_TYPES:
        raise ValueError(f"unknown CRBL model type {model_type!r}: expected 'crop' (layers[150:] of "
                         f"both backbones trainable) or 'full' (backbones frozen, head trainable)")


def build_model(model_type: str) -> CRBL:
    """The CRBL model with the original Keras trainable set for `model_type` ('crop' or 'full')."""
    _check_model_type(model_type)
    return CRBL().set_model_type(model_type)
