"""Our transcription of the Spectroformer model (`final_model_AGSSF1.mymodel`, Mdraqibkhan/Spectroformer,
WACV 2024), written from the reference digest (/work/shared/reference/phaseformer.md, section 1.6) and
from reading the original for facts, for parity tests and as the bench baseline.

It does the original's arithmetic step by step, including the work whose result is thrown away or
constant: the full complex FFTs and their real parts, the frequency query `qf` and `attnf` of every
attention block (computed, never used), the `kf` half of `kv`, `ups1(fr)` at the end of the forward
(computed, discarded), the 2x2-tiled spectrum inverted at twice the size in `UpS`. Class and
attribute names are the original's, so a pickle of this model looks like an official file when the
module is registered as `final_model` (what the official Train.py imports) or `final_model_AGSSF1`.
Nothing here is optimised; works in any float dtype (float64 for the parity tests).
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def inv_mag(x):
    """Phase-only reconstruction: unit amplitude, phase kept."""
    return torch.fft.ifft2(torch.exp(1j * torch.fft.fft2(x).angle())).real


def _channel_norm(norm, x):
    b, c, h, w = x.shape
    tokens = x.reshape(b, c, h * w).transpose(-2, -1).contiguous()
    return norm(tokens).transpose(-2, -1).contiguous().reshape(b, c, h, w)


class AGSSF(nn.Module):
    def __init__(self, channels, b=1, gamma=2):
        super().__init__()
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.channels, self.b, self.gamma = channels, b, gamma
        k = int(abs(math.log2(channels) / gamma + b / gamma))
        k = k if k % 2 else k + 1
        self.conv = nn.Conv1d(1, 1, kernel_size=k, padding=(k - 1) // 2, bias=False)
        self.sigmoid = nn.Sigmoid()

    def forward(self, x):
        pooled = self.avg_pool(inv_mag(x))
        gate = self.conv(pooled.squeeze(-1).transpose(-1, -2)).transpose(-1, -2).unsqueeze(-1)
        return x * self.sigmoid(gate).expand_as(x)


class SFCA(nn.Module):
    def __init__(self, channels, relu_slope=0.2, gamma=2):
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
        self.agssf = AGSSF(channels)

    def forward(self, x):
        first, second = self.conv_1(x).chunk(2, dim=1)
        spatial = self.relu_2(self.conv_2(self.relu_1(torch.cat([first, second], dim=1))))
        spatial = spatial + self.identity1(x)
        spectrum = torch.fft.fftn(x, dim=(-2, -1)).real
        spectrum = self.conv_f2(F.gelu(self.conv_f1(spectrum)))
        freq = torch.fft.ifftn(spectrum, dim=(-2, -1)).real + self.identity2(x)
        return self.agssf(self.con2X1(torch.cat([spatial, freq], dim=1)))


class MDTA(nn.Module):
    def __init__(self, channels, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.temperature = nn.Parameter(torch.ones(1, num_heads, 1, 1))
        self.qkv = nn.Conv2d(channels, channels * 3, kernel_size=1, bias=False)
        self.qkv_conv = nn.Conv2d(channels * 3, channels * 3, kernel_size=3, padding=1, groups=channels * 3,
                                  bias=False)
        self.project_out = nn.Conv2d(channels, channels, kernel_size=1, bias=False)
        self.kv = nn.Conv2d(channels, channels * 2, kernel_size=1, bias=False)
        self.q1X1_1 = nn.Conv2d(channels, channels, kernel_size=1, bias=False)
        self.q1X1_2 = nn.Conv2d(channels, channels, kernel_size=1, bias=False)
        self.kv_conv = nn.Conv2d(channels * 2, channels * 2, kernel_size=3, padding=1, groups=channels * 2,
                                 bias=False)
        self.project_outf = nn.Conv2d(channels, channels, kernel_size=1, bias=False)

    def _heads(self, t):
        b, c, h, w = t.shape
        return t.reshape(b, self.num_heads, c // self.num_heads, h * w)

    def forward(self, x):
        b, c, h, w = x.shape
        q, k, v = (self._heads(t) for t in self.qkv_conv(self.qkv(x)).chunk(3, dim=1))
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        attn = torch.softmax((q @ k.transpose(-2, -1)) * self.temperature, dim=-1)
        out = self.project_out((attn @ v).reshape(b, c, h, w))
        # the frequency query: computed as the original does, its attention map is never used
        qf = torch.fft.ifftn(self.q1X1_1(F.gelu(torch.fft.fftn(x, dim=(-2, -1)).real)), dim=(-2, -1)).real
        kf, vf = (self._heads(t) for t in self.kv_conv(self.kv(out)).chunk(2, dim=1))
        qf, kf = F.normalize(self._heads(qf), dim=-1), F.normalize(kf, dim=-1)
        attnf = torch.softmax((qf @ k.transpose(-2, -1)) * self.temperature, dim=-1)  # noqa: F841 (unused, as in the original)
        return self.project_outf((attn @ vf).reshape(b, c, h, w))


class GDFN(nn.Module):
    def __init__(self, channels, expansion_factor):
        super().__init__()
        hidden = int(channels * expansion_factor)
        self.project_in = nn.Conv2d(channels, hidden * 2, kernel_size=1, bias=False)
        self.conv = nn.Conv2d(hidden * 2, hidden * 2, kernel_size=3, padding=1, groups=hidden * 2, bias=False)
        self.project_out = nn.Conv2d(hidden, channels, kernel_size=1, bias=False)

    def forward(self, x):
        x1, x2 = self.conv(self.project_in(x)).chunk(2, dim=1)
        return self.project_out(F.gelu(x1) * x2)


class TransformerBlock(nn.Module):
    def __init__(self, channels, num_heads, expansion_factor):
        super().__init__()
        self.norm1 = nn.LayerNorm(channels)
        self.attn = MDTA(channels, num_heads)
        self.norm2 = nn.LayerNorm(channels)
        self.ffn = GDFN(channels, expansion_factor)

    def forward(self, x):
        x = x + self.attn(_channel_norm(self.norm1, x))
        return x + self.ffn(_channel_norm(self.norm2, x))


class DownSample(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(channels, channels // 2, kernel_size=3, padding=1, bias=False),
                                  nn.PixelUnshuffle(2))

    def forward(self, x):
        return self.body(x)


class UpSample(nn.Module):
    """Frequency up-sampling: amplitude and phase each through 1x1 -> LeakyReLU(0.1) -> 1x1, the
    spectrum tiled 2x2, |inverse FFT| at twice the size, a 1x1 post conv."""

    def __init__(self, channels, channel_red):
        super().__init__()
        self.amp_fuse = nn.Sequential(nn.Conv2d(channels, channels, 1, 1, 0), nn.LeakyReLU(0.1, inplace=False),
                                      nn.Conv2d(channels, channels, 1, 1, 0))
        self.pha_fuse = nn.Sequential(nn.Conv2d(channels, channels, 1, 1, 0), nn.LeakyReLU(0.1, inplace=False),
                                      nn.Conv2d(channels, channels, 1, 1, 0))
        self.post = nn.Conv2d(channels, channels // 2 if channel_red else channels, 1, 1, 0)

    def forward(self, x):
        spectrum = torch.fft.fft2(x)
        amplitude = torch.tile(self.amp_fuse(torch.abs(spectrum)), (2, 2))
        phase = torch.tile(self.pha_fuse(torch.angle(spectrum)), (2, 2))
        tiled = torch.complex(amplitude * torch.cos(phase), amplitude * torch.sin(phase))
        return self.post(torch.abs(torch.fft.ifft2(tiled)))


class UpSample1(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(channels, channels * 2, kernel_size=3, padding=1, bias=False),
                                  nn.PixelShuffle(2))

    def forward(self, x):
        return self.body(x)


class UpS(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.Fups = UpSample(channels, True)
        self.Sups = UpSample1(channels)
        self.reduce = nn.Conv2d(channels, channels // 2, kernel_size=1, bias=False)

    def forward(self, x):
        return self.reduce(torch.cat([self.Fups(x), self.Sups(x)], dim=1))


def _blocks(n, channels, heads, expansion):
    return nn.Sequential(*[TransformerBlock(channels, heads, expansion) for _ in range(n)])


class mymodel(nn.Module):  # noqa: N801 (the original's class name)
    def __init__(self, num_blocks=(2, 3, 3, 4), num_heads=(1, 2, 4, 8), channels=(16, 32, 64, 128),
                 num_refinement=4, expansion_factor=2.66, ch=(64, 32, 16, 64)):
        super().__init__()
        self.attention = nn.ModuleList([SFCA(c) for c in ch])
        self.embed_conv_rgb = nn.Conv2d(3, channels[0], kernel_size=3, padding=1, bias=False)
        self.encoders = nn.ModuleList([_blocks(n, c, h, expansion_factor)
                                       for n, h, c in zip(num_blocks, num_heads, channels)])
        self.down1 = DownSample(channels[0])
        self.down2 = DownSample(channels[1])
        self.down3 = DownSample(channels[2])
        self.ups_1 = UpS(128)
        self.ups_2 = UpS(64)
        self.ups_3 = UpS(32)
        self.ups_4 = UpS(3)
        self.ups1 = UpSample1(32)
        self.reduces2 = nn.Conv2d(64, 32, kernel_size=1, bias=False)
        self.reduces1 = nn.Conv2d(128, 64, kernel_size=1, bias=False)
        self.decoders = nn.ModuleList([_blocks(num_blocks[2], channels[2], num_heads[2], expansion_factor),
                                       _blocks(num_blocks[1], channels[1], num_heads[1], expansion_factor),
                                       _blocks(num_blocks[0], channels[1], num_heads[0], expansion_factor)])
        self.refinement = _blocks(num_refinement, channels[1], num_heads[0], expansion_factor)
        self.output = nn.Conv2d(8, 3, kernel_size=3, padding=1, bias=False)
        self.output1 = nn.Conv2d(16, 8, kernel_size=3, padding=1, bias=False)
        self.ups2 = UpSample1(16)
        self.outputl = nn.Conv2d(32, 8, kernel_size=3, padding=1, bias=False)

    def forward(self, rgb):
        enc1 = self.encoders[0](self.embed_conv_rgb(rgb))
        enc2 = self.encoders[1](self.down1(enc1))
        enc3 = self.encoders[2](self.down2(enc2))
        enc4 = self.encoders[3](self.down3(enc3))
        dec3 = self.decoders[0](self.reduces1(torch.cat([self.ups_1(enc4), self.attention[0](enc3)], dim=1)))
        dec2 = self.decoders[1](self.reduces2(torch.cat([self.ups_2(dec3), self.attention[1](enc2)], dim=1)))
        dec1 = self.decoders[2](torch.cat([self.ups_3(dec2), self.attention[2](enc1)], dim=1))
        refined = self.refinement(dec1)
        self.ups1(refined)  # computed and discarded, as in the original
        return self.output(self.outputl(refined))


def trained_looking(model, seed=0):
    """Weights that look trained: every tensor perturbed, temperatures in [0.3, 3], LayerNorm
    affines away from 1/0, biases non-zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("temperature"):
                p.copy_(0.3 + 2.7 * torch.rand(p.shape, generator=g))
            elif ".norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            else:
                fan_in = max(1, p[0].numel()) if p.dim() > 1 else 1
                p.copy_(torch.randn(p.shape, generator=g) * (0.7 / math.sqrt(fan_in)))
    return model
