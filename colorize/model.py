"""The two U-Nets of the original colorization project, with the original's parameter names.

  unet           the first version (commit e203923): DoubleConv = [conv3x3 -> BatchNorm -> ReLU] x2,
                 widths 64..1024, transposed-conv upsampling, 1x1 conv `out` + sigmoid. 31.04 M params.
  improved_unet  main HEAD: InstanceNorm + LeakyReLU(0.2) DoubleConvs each ending in an SE block, a
                 residual block after every encoder level and the bottleneck, attention gates on the
                 four skips, 1x1 conv `outconv` + sigmoid. 56.92 M params.

Both take (B, 3, H, W) in [0, 1] (the gray input repeated to 3 channels, as the original loaded it)
and return RGB in [0, 1]; H and W must be multiples of 16 (four 2x poolings). `width` scales every
level (64 = the original; 16 makes the one-minute demo model). State dicts load strictly from the
original's checkpoints (see `load_original_state`).

The modules are laid out exactly as the original's, so the state_dict keys match; ImprovedUNet's
forward runs a fused version of the same math (see `_conv_norm`): the conv bias in front of an
InstanceNorm is skipped (the norm subtracts the per-channel mean, so the bias cancels exactly),
InstanceNorm is computed as GroupNorm with one channel per group (the same statistics; faster on
the CPU than F.instance_norm, and it keeps channels_last tensors channels_last), InstanceNorm +
LeakyReLU keep only their output for the backward pass (see _InstanceNormLeakyReLU: one feature map
less per convolution), and the residual blocks' SE, which always scales by exactly 0.5 (see
ResidualBlock), is a scaled addition.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from common.io import UserError, strip_wrapper_prefixes

MODEL_NAMES = ("unet", "improved_unet")
ORIGINAL_WIDTH = 64
LEAKY_SLOPE = 0.2
IN_EPS = 1e-5  # nn.InstanceNorm2d's default


def check_input(x: torch.Tensor, in_channels: int) -> None:
    if x.dim() != 4 or x.shape[1] != in_channels:
        raise ValueError(f"expected a (B, {in_channels}, H, W) tensor, got shape {tuple(x.shape)}")
    h, w = x.shape[-2:]
    if h % 16 or w % 16 or h == 0 or w == 0:
        raise ValueError(f"image height and width must be positive multiples of 16 (four 2x poolings); "
                         f"got {h}x{w}")


def _widths(width: int) -> tuple[int, ...]:
    return tuple(width * m for m in (1, 2, 4, 8, 16))


# ---------------------------------------------------------------- plain U-Net
class PlainDoubleConv(nn.Module):
    """[conv3x3 -> BatchNorm -> ReLU] x2 (the first version's DoubleConv)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.double_conv = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 3, padding=1), nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, 3, padding=1), nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))

    def forward(self, x):
        return self.double_conv(x)


class UNet(nn.Module):
    def __init__(self, in_channels: int = 3, out_channels: int = 3, width: int = ORIGINAL_WIDTH):
        super().__init__()
        if width < 4:
            raise ValueError(f"width must be at least 4 (got {width})")
        w = _widths(width)
        self.in_channels, self.width = in_channels, width
        self.conv1, self.pool1 = PlainDoubleConv(in_channels, w[0]), nn.MaxPool2d(2)
        self.conv2, self.pool2 = PlainDoubleConv(w[0], w[1]), nn.MaxPool2d(2)
        self.conv3, self.pool3 = PlainDoubleConv(w[1], w[2]), nn.MaxPool2d(2)
        self.conv4, self.pool4 = PlainDoubleConv(w[2], w[3]), nn.MaxPool2d(2)
        self.bottleneck = PlainDoubleConv(w[3], w[4])
        self.upconv4, self.dconv4 = nn.ConvTranspose2d(w[4], w[3], 2, stride=2), PlainDoubleConv(w[4], w[3])
        self.upconv3, self.dconv3 = nn.ConvTranspose2d(w[3], w[2], 2, stride=2), PlainDoubleConv(w[3], w[2])
        self.upconv2, self.dconv2 = nn.ConvTranspose2d(w[2], w[1], 2, stride=2), PlainDoubleConv(w[2], w[1])
        self.upconv1, self.dconv1 = nn.ConvTranspose2d(w[1], w[0], 2, stride=2), PlainDoubleConv(w[1], w[0])
        self.out = nn.Conv2d(w[0], out_channels, 1)          # the original's name for the output layer
        self.activation = nn.Sigmoid()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.in_channels)
        c1 = self.conv1(x)
        c2 = self.conv2(self.pool1(c1))
        c3 = self.conv3(self.pool2(c2))
        c4 = self.conv4(self.pool3(c3))
        b = self.bottleneck(self.pool4(c4))
        d = self.dconv4(torch.cat([self.upconv4(b), c4], 1))
        d = self.dconv3(torch.cat([self.upconv3(d), c3], 1))
        d = self.dconv2(torch.cat([self.upconv2(d), c2], 1))
        return self.dconv1(torch.cat([self.upconv1(d), c1], 1))

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.out(features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def unused_parameters(self) -> list[nn.Parameter]:
        return []   # every parameter takes part in the forward


# ---------------------------------------------------------------- ImprovedUNet
def _instance_norm_(x: torch.Tensor) -> torch.Tensor:
    """InstanceNorm2d(affine=False) as GroupNorm with a group per channel: the same per-(image,
    channel) mean and biased variance, and it keeps the memory format. In an ONNX export it is
    F.instance_norm, one InstanceNormalization node (the tracer would make GroupNorm's group count
    a shape computation, which its symbolic refuses, and wrap it in reshapes)."""
    if torch.onnx.is_in_onnx_export():
        return F.instance_norm(x, eps=IN_EPS)
    return F.group_norm(x, x.shape[1], eps=IN_EPS)


class _InstanceNormLeakyReLU(torch.autograd.Function):
    """LeakyReLU(InstanceNorm(x)) that keeps only its output for the backward pass.

    LeakyReLU with a positive slope is invertible, so the normalised input is recovered from the
    output (y / slope where y < 0) and the norm's input need not be kept: one feature map less in
    memory per convolution. Backward: dx = rstd * (dz - mean(dz) - xhat * mean(dz * xhat)).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, slope: float) -> torch.Tensor:
        if x.dtype in (torch.float16, torch.bfloat16):
            x = x.float()   # as autocast runs norms: in float32
        n, c, h, w = x.shape
        y, _, rstd = torch.native_group_norm(x, None, None, n, c, h * w, c, IN_EPS)
        F.leaky_relu_(y, slope)
        ctx.save_for_backward(y, rstd)
        ctx.slope = slope
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        y, rstd = ctx.saved_tensors
        positive = y > 0
        dz = torch.where(positive, dy, dy * ctx.slope)
        xhat = torch.where(positive, y, y * (1.0 / ctx.slope))
        mean_dz = dz.mean((2, 3), keepdim=True)
        mean_dzx = (dz * xhat).mean((2, 3), keepdim=True)
        dx = dz.sub_(mean_dz).sub_(xhat.mul_(mean_dzx)).mul_(rstd[:, :, None, None])
        return dx, None


def _conv_norm(conv: nn.Conv2d, x: torch.Tensor, act: bool) -> torch.Tensor:
    """conv -> InstanceNorm [-> LeakyReLU(0.2)]; the conv bias cancels in the norm, so it is skipped."""
    y = F.conv2d(x, conv.weight, None, conv.stride, conv.padding)
    if act:
        # the autograd.Function only where a backward may follow; inference and ONNX export
        # (which must not trace a Python function) run the plain ops
        if torch.is_grad_enabled() and not torch.onnx.is_in_onnx_export():
            return _InstanceNormLeakyReLU.apply(y, LEAKY_SLOPE)
        return F.leaky_relu_(_instance_norm_(y), LEAKY_SLOPE)
    return _instance_norm_(y)


class SEBlock(nn.Module):
    """Squeeze-and-excitation: per-channel scale from the global average (linears without bias)."""

    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        hidden = channels // reduction
        if hidden < 1:
            raise ValueError(f"SEBlock needs at least {reduction} channels (got {channels})")
        self.squeeze = nn.AdaptiveAvgPool2d(1)
        self.excitation = nn.Sequential(nn.Linear(channels, hidden, bias=False), nn.ReLU(inplace=True),
                                        nn.Linear(hidden, channels, bias=False), nn.Sigmoid())

    def scale(self, x: torch.Tensor) -> torch.Tensor:
        return self.excitation(self.squeeze(x).flatten(1))[:, :, None, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale(x)


class DoubleConv(nn.Module):
    """[conv3x3 -> InstanceNorm -> LeakyReLU(0.2)] x2, then SE."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        # The Sequential fixes the parameter names (double_conv.0 / double_conv.3); forward runs
        # the same layers through _conv_norm.
        self.double_conv = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 3, padding=1), nn.InstanceNorm2d(out_channels),
            nn.LeakyReLU(LEAKY_SLOPE, inplace=True),
            nn.Conv2d(out_channels, out_channels, 3, padding=1), nn.InstanceNorm2d(out_channels),
            nn.LeakyReLU(LEAKY_SLOPE, inplace=True))
        self.se = SEBlock(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _conv_norm(self.double_conv[0], x, act=True)
        return self.se(_conv_norm(self.double_conv[3], y, act=True))


class ResidualBlock(nn.Module):
    """x + SE([conv3x3 -> IN -> LeakyReLU -> conv3x3 -> IN](x)); no activation after the addition.

    The SE here squeezes an InstanceNorm output, whose spatial mean is 0 in every channel; its
    linears have no bias, so the excitation is sigmoid(0) = 0.5 whatever the weights: the block is
    x + 0.5 * IN(...) (exactly; the original computes the same up to rounding). The SE module stays
    for the original's parameter names and is skipped in forward (its weights never mattered).
    """

    def __init__(self, channels: int):
        super().__init__()
        self.block = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1), nn.InstanceNorm2d(channels),
            nn.LeakyReLU(LEAKY_SLOPE, inplace=True),
            nn.Conv2d(channels, channels, 3, padding=1), nn.InstanceNorm2d(channels))
        self.se = SEBlock(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _conv_norm(self.block[3], _conv_norm(self.block[0], x, act=True), act=False)
        return torch.add(x, y, alpha=0.5)


class AttentionGate(nn.Module):
    """Gate the skip x with psi = sigmoid(IN(conv1x1(relu(IN(W_g g) + IN(W_x x))))), a map in (0, 1).

    g is the upsampled decoder feature at the skip's resolution. The InstanceNorm on the single psi
    channel re-standardises the logits per image (the original's design, kept for its weights).
    """

    def __init__(self, F_g: int, F_l: int, F_int: int):  # noqa: N803 - the original's argument names
        super().__init__()
        self.W_g = nn.Sequential(nn.Conv2d(F_g, F_int, 1), nn.InstanceNorm2d(F_int))
        self.W_x = nn.Sequential(nn.Conv2d(F_l, F_int, 1), nn.InstanceNorm2d(F_int))
        self.psi = nn.Sequential(nn.Conv2d(F_int, 1, 1), nn.InstanceNorm2d(1), nn.Sigmoid())
        self.relu = nn.ReLU(inplace=True)

    def forward(self, g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        a = _conv_norm(self.W_g[0], g, act=False).add_(_conv_norm(self.W_x[0], x, act=False))
        psi = torch.sigmoid(_conv_norm(self.psi[0], torch.relu_(a), act=False))
        return x * psi


class ImprovedUNet(nn.Module):
    def __init__(self, in_channels: int = 3, out_channels: int = 3, width: int = ORIGINAL_WIDTH):
        super().__init__()
        if width < 16 or width % 2:
            raise ValueError(f"width must be an even number of at least 16 (SE reduction 16; got {width})")
        w = _widths(width)
        self.in_channels, self.width = in_channels, width
        self.conv1, self.pool1, self.res1 = DoubleConv(in_channels, w[0]), nn.MaxPool2d(2), ResidualBlock(w[0])
        self.conv2, self.pool2, self.res2 = DoubleConv(w[0], w[1]), nn.MaxPool2d(2), ResidualBlock(w[1])
        self.conv3, self.pool3, self.res3 = DoubleConv(w[1], w[2]), nn.MaxPool2d(2), ResidualBlock(w[2])
        self.conv4, self.pool4, self.res4 = DoubleConv(w[2], w[3]), nn.MaxPool2d(2), ResidualBlock(w[3])
        self.bottleneck, self.res_bottleneck = DoubleConv(w[3], w[4]), ResidualBlock(w[4])
        self.upconv4, self.att4 = nn.ConvTranspose2d(w[4], w[3], 2, stride=2), AttentionGate(w[3], w[3], w[3] // 2)
        self.dconv4 = DoubleConv(w[4], w[3])
        self.upconv3, self.att3 = nn.ConvTranspose2d(w[3], w[2], 2, stride=2), AttentionGate(w[2], w[2], w[2] // 2)
        self.dconv3 = DoubleConv(w[3], w[2])
        self.upconv2, self.att2 = nn.ConvTranspose2d(w[2], w[1], 2, stride=2), AttentionGate(w[1], w[1], w[1] // 2)
        self.dconv2 = DoubleConv(w[2], w[1])
        self.upconv1, self.att1 = nn.ConvTranspose2d(w[1], w[0], 2, stride=2), AttentionGate(w[0], w[0], w[0] // 2)
        self.dconv1 = DoubleConv(w[1], w[0])
        self.outconv = nn.Conv2d(w[0], out_channels, 1)      # the original's name for the output layer
        self.final_act = nn.Sigmoid()

    def _up(self, upconv: nn.ConvTranspose2d, gate: AttentionGate, dconv: DoubleConv,
            x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        u = upconv(x)
        return dconv(torch.cat([u, gate(u, skip)], 1))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        check_input(x, self.in_channels)
        c1 = self.res1(self.conv1(x))
        c2 = self.res2(self.conv2(self.pool1(c1)))
        c3 = self.res3(self.conv3(self.pool2(c2)))
        c4 = self.res4(self.conv4(self.pool3(c3)))
        b = self.res_bottleneck(self.bottleneck(self.pool4(c4)))
        d = self._up(self.upconv4, self.att4, self.dconv4, b, c4)
        d = self._up(self.upconv3, self.att3, self.dconv3, d, c3)
        d = self._up(self.upconv2, self.att2, self.dconv2, d, c2)
        return self._up(self.upconv1, self.att1, self.dconv1, d, c1)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.outconv(features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def unused_parameters(self) -> list[nn.Parameter]:
        """Parameters the forward never uses (kept for the original's checkpoints): the bias of every
        convolution in front of an InstanceNorm, and the residual blocks' SE. train.py freezes them, so
        DistributedDataParallel need not look for gradients that never come."""
        unused = []
        for m in self.modules():
            if isinstance(m, DoubleConv):
                convs = [m.double_conv[0], m.double_conv[3]]
            elif isinstance(m, ResidualBlock):
                convs = [m.block[0], m.block[3]]
                unused += list(m.se.parameters())
            elif isinstance(m, AttentionGate):
                convs = [m.W_g[0], m.W_x[0], m.psi[0]]
            else:
                continue
            unused += [c.bias for c in convs if c.bias is not None]
        return unused


def build_model(name: str, width: int = ORIGINAL_WIDTH, in_channels: int = 3, out_channels: int = 3) -> nn.Module:
    if name == "unet":
        return UNet(in_channels, out_channels, width)
    if name == "improved_unet":
        return ImprovedUNet(in_channels, out_channels, width)
    raise ValueError(f"unknown model {name!r} (choose from {', '.join(MODEL_NAMES)})")


# ---------------------------------------------------------------- original checkpoints
# Keys that tell the two architectures apart (the output layer is `out` in one, `outconv` in the other).
_SIGNATURE = {"unet": "out.weight", "improved_unet": "outconv.weight"}


def detect_architecture(sd: dict) -> tuple[str, int] | None:
    """(model name, width) of a U-Net state_dict, or None if it is neither."""
    for name, key in _SIGNATURE.items():
        first = sd.get("conv1.double_conv.0.weight")
        if key in sd and isinstance(first, torch.Tensor) and first.dim() == 4:
            return name, int(first.shape[0])
    return None


def load_original_state(obj, path, model: str | None = None) -> tuple[dict, str, int]:
    """(state_dict, model name, width) from what the original saved: a dict with `model_state_dict`
    (best_model.pth / model_epoch_N.pth / interrupted_model.pth), or a bare state_dict, with or
    without `_orig_mod.` / `module.` prefixes. `model`, when given, must match what the keys show."""
    sd = obj.get("model_state_dict", obj) if isinstance(obj, dict) else obj
    if not isinstance(sd, dict) or not sd or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                     for k, v in sd.items()):
        raise UserError(f"{path}: no U-Net weights found (expected the original's checkpoint with "
                        f"'model_state_dict', a state_dict, or a checkpoint of colorize/train.py)")
    sd, _ = strip_wrapper_prefixes(sd)
    found = detect_architecture(sd)
    if found is None:
        raise UserError(f"{path}: the weights are not a colorize U-Net (no conv1.double_conv.0.weight "
                        f"with out.weight or outconv.weight)")
    name, width = found
    if model is not None and model != name:
        raise UserError(f"{path}: the checkpoint holds a {name} model, not --model {model}")
    return sd, name, width

