"""A direct transcription of the official Phaseformer (`model_with_eca.py` of Mdraqibkhan/Phaseformer),
written from the reference digest (/work/shared/reference/phaseformer.md, section 1), for parity tests
and as the bench baseline. Same math as the original: complex fft2, angle, exp, complex ifft2, real
part, F.normalize, the transposes around nn.LayerNorm. Same class and attribute names, so that a
pickle of this model looks like an official release file when the module is registered as
`model_with_eca` (or `phaseformer`, the training script's name for it).

Nothing here is optimised: it is the reference our phaseformer/model.py must reproduce.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def inv_mag(x):
    """Phase-only reconstruction: unit amplitude, phase kept."""
    spectrum = torch.fft.fft2(x)
    return torch.fft.ifft2(torch.exp(1j * spectrum.angle())).real


class ECA(nn.Module):
    def __init__(self, channels, b=1, gamma=2):
        super().__init__()
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.channels, self.b, self.gamma = channels, b, gamma
        k = int(abs(math.log2(channels) / gamma + b / gamma))
        k = k if k % 2 else k + 1
        self.conv = nn.Conv1d(1, 1, kernel_size=k, padding=(k - 1) // 2, bias=False)
        self.sigmoid = nn.Sigmoid()

    def forward(self, x):
        pooled = self.avg_pool(inv_mag(x))                                   # (B, C, 1, 1)
        y = self.conv(pooled.squeeze(-1).transpose(-1, -2)).transpose(-1, -2).unsqueeze(-1)
        return x * self.sigmoid(y).expand_as(x)


class MDTA(nn.Module):
    def __init__(self, channels, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.temperature = nn.Parameter(torch.ones(1, num_heads, 1, 1))
        self.qkv = nn.Conv2d(channels, channels * 3, kernel_size=1, bias=False)
        self.qkv_conv = nn.Conv2d(channels * 3, channels * 3, kernel_size=3, padding=1, groups=channels * 3,
                                  bias=False)
        self.project_out = nn.Conv2d(channels, channels, kernel_size=1, bias=False)

    def forward(self, x):
        b, c, h, w = x.shape
        q, k, v = self.qkv_conv(self.qkv(x)).chunk(3, dim=1)
        q, k = inv_mag(q), inv_mag(k)
        q = q.reshape(b, self.num_heads, -1, h * w)
        k = k.reshape(b, self.num_heads, -1, h * w)
        v = v.reshape(b, self.num_heads, -1, h * w)
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        attn = torch.softmax(torch.matmul(q, k.transpose(-2, -1).contiguous()) * self.temperature, dim=-1)
        return self.project_out(torch.matmul(attn, v).reshape(b, -1, h, w))


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


def _norm_over_channels(norm, x):
    b, c, h, w = x.shape
    tokens = x.reshape(b, c, -1).transpose(-2, -1).contiguous()              # (B, HW, C)
    return norm(tokens).transpose(-2, -1).contiguous().reshape(b, c, h, w)


class TransformerBlock(nn.Module):
    def __init__(self, channels, num_heads, expansion_factor):
        super().__init__()
        self.norm1 = nn.LayerNorm(channels)
        self.attn = MDTA(channels, num_heads)
        self.norm2 = nn.LayerNorm(channels)
        self.ffn = GDFN(channels, expansion_factor)

    def forward(self, x):
        x = x + self.attn(_norm_over_channels(self.norm1, x))
        return x + self.ffn(_norm_over_channels(self.norm2, x))


class DownSample(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(channels, channels // 2, kernel_size=3, padding=1, bias=False),
                                  nn.PixelUnshuffle(2))

    def forward(self, x):
        return self.body(x)


class UpSample(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(channels, channels * 2, kernel_size=3, padding=1, bias=False),
                                  nn.PixelShuffle(2))

    def forward(self, x):
        return self.body(x)


class UpSample1(UpSample):
    """A second name for the same up-sampler (the original defines both)."""


class Restormer(nn.Module):
    def __init__(self, num_blocks=(2, 3, 3, 4), num_heads=(1, 2, 4, 8), channels=(16, 32, 64, 128),
                 num_refinement=4, expansion_factor=2.66, ch=(16, 16, 32, 64)):
        super().__init__()
        self.attention = nn.ModuleList([ECA(c) for c in ch])
        self.embed_conv_rgb = nn.Conv2d(3, channels[0], kernel_size=3, padding=1, bias=False)
        self.ups1 = UpSample1(32)
        self.encoders = nn.ModuleList([
            nn.Sequential(*[TransformerBlock(c, h, expansion_factor) for _ in range(n)])
            for n, h, c in zip(num_blocks, num_heads, channels)])
        self.downs = nn.ModuleList([DownSample(c) for c in channels[:-1]])
        self.ups = nn.ModuleList([UpSample(c) for c in list(reversed(channels))[:-1]])
        self.reduces = nn.ModuleList([nn.Conv2d(channels[i], channels[i - 1], kernel_size=1, bias=False)
                                      for i in reversed(range(2, len(channels)))])
        self.decoders = nn.ModuleList([
            nn.Sequential(*[TransformerBlock(channels[2], num_heads[2], expansion_factor)
                            for _ in range(num_blocks[2])]),
            nn.Sequential(*[TransformerBlock(channels[1], num_heads[1], expansion_factor)
                            for _ in range(num_blocks[1])]),
            nn.Sequential(*[TransformerBlock(channels[1], num_heads[0], expansion_factor)
                            for _ in range(num_blocks[0])])])
        self.refinement = nn.Sequential(*[TransformerBlock(channels[1], num_heads[0], expansion_factor)
                                          for _ in range(num_refinement)])
        self.output = nn.Conv2d(8, 3, kernel_size=3, padding=1, bias=False)
        self.output1 = nn.Conv2d(16, 8, kernel_size=3, padding=1, bias=False)
        self.ups2 = UpSample1(16)
        self.outputl = nn.Conv2d(32, 8, kernel_size=3, padding=1, bias=False)

    def forward(self, rgb):
        enc1 = self.encoders[0](self.embed_conv_rgb(rgb))
        enc2 = self.encoders[1](self.downs[0](enc1))
        enc3 = self.encoders[2](self.downs[1](enc2))
        enc4 = self.encoders[3](self.downs[2](enc3))
        dec3 = self.decoders[0](self.reduces[0](torch.cat([self.ups[0](enc4), self.attention[0](enc3)], dim=1)))
        dec2 = self.decoders[1](self.reduces[1](torch.cat([self.ups[1](dec3), self.attention[1](enc2)], dim=1)))
        dec1 = self.decoders[2](torch.cat([self.ups[2](dec2), self.attention[2](enc1)], dim=1))
        refined = self.refinement(dec1)
        return self.output(self.outputl(refined)), self.output(self.output1(self.ups1(refined)))


def trained_looking(model, seed=0):
    """Weights that look trained rather than freshly initialised: every tensor perturbed, the
    temperatures spread over [0.3, 3] and the LayerNorm affines away from 1/0."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("temperature"):
                p.copy_(0.3 + 2.7 * torch.rand(p.shape, generator=g))
            elif ".norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif ".norm" in name and name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            else:
                fan_in = max(1, p[0].numel()) if p.dim() > 1 else 1
                p.copy_(torch.randn(p.shape, generator=g) * (0.7 / math.sqrt(fan_in)))
    return model
