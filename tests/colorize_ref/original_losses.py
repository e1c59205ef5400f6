"""Transcription of the original's loss (reference digest, section 2) for parity tests.

Kept as the original had it, including its defect: the ImageNet mean/std are nn.Parameters (created
after the freezing loop, so they require gradients). The VGG16 comes in as an argument (the
original called torchvision's vgg16(pretrained=True)), so tests can pass random weights.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class OriginalVGGPerceptualLoss(nn.Module):
    def __init__(self, vgg_features: nn.Sequential):
        super().__init__()
        self.slice1 = vgg_features[:4]     # ends at relu1_2
        self.slice2 = vgg_features[4:9]    # ends at relu2_2
        self.slice3 = vgg_features[9:16]   # ends at relu3_3
        for p in self.parameters():
            p.requires_grad = False
        self.mean = nn.Parameter(torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1))
        self.std = nn.Parameter(torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))

    def forward(self, x, y):
        x = (x - self.mean) / self.std
        y = (y - self.mean) / self.std
        x1, y1 = self.slice1(x), self.slice1(y)
        x2, y2 = self.slice2(x1), self.slice2(y1)
        x3, y3 = self.slice3(x2), self.slice3(y2)
        return 0.5 * F.l1_loss(x1, y1) + 0.7 * F.l1_loss(x2, y2) + 1.0 * F.l1_loss(x3, y3)


class OriginalCombinedLoss(nn.Module):
    def __init__(self, vgg_features: nn.Sequential, lambda_perceptual: float = 0.2, lambda_l1: float = 1.0):
        super().__init__()
        self.perceptual = OriginalVGGPerceptualLoss(vgg_features)
        self.lambda_perceptual, self.lambda_l1 = lambda_perceptual, lambda_l1

    def forward(self, x, y):
        return self.lambda_l1 * F.l1_loss(x, y) + self.lambda_perceptual * self.perceptual(x, y)
