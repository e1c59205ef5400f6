"""Straightforward transcription of the two original U-Nets, written from the reference digest
(shared/reference/colorize.md, sections 1.1 and 1.2) for parity tests and the bench baseline.

Deliberately plain: nn.Sequential blocks called in order, every conv with its bias, InstanceNorm
and LeakyReLU as separate modules, NCHW. Attribute names are the original's, so a state_dict of
these classes is exactly what the original training script saved (before any `_orig_mod.` prefix).
"""
from __future__ import annotations

import torch
import torch.nn as nn


# ---------------------------------------------------------------- plain U-Net (commit e203923)
class PlainDoubleConv(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.double_conv = nn.Sequential(
            nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))

    def forward(self, x):
        return self.double_conv(x)


class OriginalUNet(nn.Module):
    def __init__(self, in_channels: int = 3, out_channels: int = 3):
        super().__init__()
        w = (64, 128, 256, 512, 1024)
        self.conv1, self.pool1 = PlainDoubleConv(in_channels, w[0]), nn.MaxPool2d(2)
        self.conv2, self.pool2 = PlainDoubleConv(w[0], w[1]), nn.MaxPool2d(2)
        self.conv3, self.pool3 = PlainDoubleConv(w[1], w[2]), nn.MaxPool2d(2)
        self.conv4, self.pool4 = PlainDoubleConv(w[2], w[3]), nn.MaxPool2d(2)
        self.bottleneck = PlainDoubleConv(w[3], w[4])
        self.upconv4, self.dconv4 = nn.ConvTranspose2d(w[4], w[3], 2, stride=2), PlainDoubleConv(w[4], w[3])
        self.upconv3, self.dconv3 = nn.ConvTranspose2d(w[3], w[2], 2, stride=2), PlainDoubleConv(w[3], w[2])
        self.upconv2, self.dconv2 = nn.ConvTranspose2d(w[2], w[1], 2, stride=2), PlainDoubleConv(w[2], w[1])
        self.upconv1, self.dconv1 = nn.ConvTranspose2d(w[1], w[0], 2, stride=2), PlainDoubleConv(w[1], w[0])
        self.out = nn.Conv2d(w[0], out_channels, 1)
        self.activation = nn.Sigmoid()

    def forward(self, x):
        c1 = self.conv1(x)
        c2 = self.conv2(self.pool1(c1))
        c3 = self.conv3(self.pool2(c2))
        c4 = self.conv4(self.pool3(c3))
        b = self.bottleneck(self.pool4(c4))
        d4 = self.dconv4(torch.cat([self.upconv4(b), c4], 1))
        d3 = self.dconv3(torch.cat([self.upconv3(d4), c3], 1))
        d2 = self.dconv2(torch.cat([self.upconv2(d3), c2], 1))
        d1 = self.dconv1(torch.cat([self.upconv1(d2), c1], 1))
        return self.activation(self.out(d1))


# ---------------------------------------------------------------- ImprovedUNet (main HEAD)
class SEBlock(nn.Module):
    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        self.squeeze = nn.AdaptiveAvgPool2d(1)
        self.excitation = nn.Sequential(
            nn.Linear(channels, channels // reduction, bias=False), nn.ReLU(inplace=True),
            nn.Linear(channels // reduction, channels, bias=False), nn.Sigmoid())

    def forward(self, x):
        b, c = x.shape[:2]
        s = self.excitation(self.squeeze(x).view(b, c)).view(b, c, 1, 1)
        return x * s.expand_as(x)


class ResidualBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.block = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1), nn.InstanceNorm2d(channels),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(channels, channels, 3, padding=1), nn.InstanceNorm2d(channels))
        self.se = SEBlock(channels)

    def forward(self, x):
        return x + self.se(self.block(x))  # no activation after the addition


class DoubleConv(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.double_conv = nn.Sequential(
            nn.Conv2d(cin, cout, 3, padding=1), nn.InstanceNorm2d(cout), nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(cout, cout, 3, padding=1), nn.InstanceNorm2d(cout), nn.LeakyReLU(0.2, inplace=True))
        self.se = SEBlock(cout)

    def forward(self, x):
        return self.se(self.double_conv(x))


class AttentionGate(nn.Module):
    def __init__(self, f_g: int, f_l: int, f_int: int):
        super().__init__()
        self.W_g = nn.Sequential(nn.Conv2d(f_g, f_int, 1), nn.InstanceNorm2d(f_int))
        self.W_x = nn.Sequential(nn.Conv2d(f_l, f_int, 1), nn.InstanceNorm2d(f_int))
        self.psi = nn.Sequential(nn.Conv2d(f_int, 1, 1), nn.InstanceNorm2d(1), nn.Sigmoid())
        self.relu = nn.ReLU(inplace=True)

    def forward(self, g, x):
        return x * self.psi(self.relu(self.W_g(g) + self.W_x(x)))


class OriginalImprovedUNet(nn.Module):
    def __init__(self, in_channels: int = 3, out_channels: int = 3):
        super().__init__()
        self.conv1, self.pool1, self.res1 = DoubleConv(in_channels, 64), nn.MaxPool2d(2), ResidualBlock(64)
        self.conv2, self.pool2, self.res2 = DoubleConv(64, 128), nn.MaxPool2d(2), ResidualBlock(128)
        self.conv3, self.pool3, self.res3 = DoubleConv(128, 256), nn.MaxPool2d(2), ResidualBlock(256)
        self.conv4, self.pool4, self.res4 = DoubleConv(256, 512), nn.MaxPool2d(2), ResidualBlock(512)
        self.bottleneck, self.res_bottleneck = DoubleConv(512, 1024), ResidualBlock(1024)
        self.upconv4, self.att4 = nn.ConvTranspose2d(1024, 512, 2, stride=2), AttentionGate(512, 512, 256)
        self.dconv4 = DoubleConv(1024, 512)
        self.upconv3, self.att3 = nn.ConvTranspose2d(512, 256, 2, stride=2), AttentionGate(256, 256, 128)
        self.dconv3 = DoubleConv(512, 256)
        self.upconv2, self.att2 = nn.ConvTranspose2d(256, 128, 2, stride=2), AttentionGate(128, 128, 64)
        self.dconv2 = DoubleConv(256, 128)
        self.upconv1, self.att1 = nn.ConvTranspose2d(128, 64, 2, stride=2), AttentionGate(64, 64, 32)
        self.dconv1 = DoubleConv(128, 64)
        self.outconv = nn.Conv2d(64, out_channels, 1)
        self.final_act = nn.Sigmoid()

    def forward(self, x):
        c1 = self.res1(self.conv1(x))
        c2 = self.res2(self.conv2(self.pool1(c1)))
        c3 = self.res3(self.conv3(self.pool2(c2)))
        c4 = self.res4(self.conv4(self.pool3(c3)))
        b = self.res_bottleneck(self.bottleneck(self.pool4(c4)))
        u = self.upconv4(b)
        u = self.dconv4(torch.cat([u, self.att4(u, c4)], 1))  # gate g = the upsampled feature
        u2 = self.upconv3(u)
        u = self.dconv3(torch.cat([u2, self.att3(u2, c3)], 1))
        u2 = self.upconv2(u)
        u = self.dconv2(torch.cat([u2, self.att2(u2, c2)], 1))
        u2 = self.upconv1(u)
        u = self.dconv1(torch.cat([u2, self.att1(u2, c1)], 1))
        return self.final_act(self.outconv(u))
