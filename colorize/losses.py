"""Training loss: L1 + lambda * VGG16 perceptual (the original's), plus two options it lacked.

  total = l1 * L1(pred, gt)
        + perceptual * sum_l w_l * L1(phi_l(pred), phi_l(gt))          phi = VGG16 relu1_2 / relu2_2 / relu3_3
        + style * sum_l w_l * L1(Gram(phi_l(pred)), Gram(phi_l(gt)))   the README's promised style loss
        + mask_weight * L1 over the damaged pixels only                 the metric weighs that region 40%

with layer weights w = 0.5 / 0.7 / 1.0 and, by default, l1 = 1, perceptual = 0.2, style = 0,
mask_weight = 0 (the original's loss). VGG16 is frozen and always in eval mode; its ImageNet
normalisation constants are buffers (the original made them trainable nn.Parameters).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

VGG_LAYERS = (3, 8, 15)            # relu1_2, relu2_2, relu3_3 in torchvision's vgg16().features
LAYER_WEIGHTS = (0.5, 0.7, 1.0)


def gram(f: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, C) Gram matrices normalised by C*H*W, in float32."""
    b, c, h, w = f.shape
    f = f.float().reshape(b, c, h * w)
    return torch.bmm(f, f.transpose(1, 2)) / (c * h * w)


def masked_l1(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean absolute error over the pixels where mask (B, 1, H, W) is 1; 0 when nothing is masked."""
    m = mask.to(pred.dtype)
    total = m.sum() * pred.shape[1]
    return ((pred - target).abs() * m).sum() / total.clamp_min(1.0)


class ColorizeLoss(nn.Module):
    def __init__(self, l1: float = 1.0, perceptual: float = 0.2, style: float = 0.0, mask_weight: float = 0.0,
                 vgg_weights: str | None = "imagenet"):
        super().__init__()
        self.w_l1, self.w_perceptual, self.w_style, self.w_mask = l1, perceptual, style, mask_weight
        self.vgg = None
        if perceptual > 0 or style > 0:
            from common.vgg import VGGFeatures   # torchvision (seconds to import) only when a VGG term is on
            # it raises WeightsUnavailable (one line, naming the file) when the ImageNet weights cannot be had
            self.vgg = VGGFeatures("vgg16", layers=VGG_LAYERS, normalize=True, weights=vgg_weights)

    def forward(self, pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None):
        """(total loss, {term: detached value}) for predictions and targets in [0, 1]."""
        parts = {"l1": F.l1_loss(pred, target)}
        total = self.w_l1 * parts["l1"]
        if self.w_mask > 0 and mask is not None:
            parts["mask_l1"] = masked_l1(pred, target, mask)
            total = total + self.w_mask * parts["mask_l1"]
        if self.vgg is not None:
            feats_p = self.vgg(pred)
            with torch.no_grad():
                feats_t = self.vgg(target)
            if self.w_perceptual > 0:
                parts["perceptual"] = sum(w * F.l1_loss(p, t) for w, p, t in zip(LAYER_WEIGHTS, feats_p, feats_t))
                total = total + self.w_perceptual * parts["perceptual"]
            if self.w_style > 0:
                with torch.autocast(pred.device.type, enabled=False):
                    parts["style"] = sum(w * F.l1_loss(gram(p), gram(t))
                                         for w, p, t in zip(LAYER_WEIGHTS, feats_p, feats_t))
                total = total + self.w_style * parts["style"]
        return total, {k: v.detach() for k, v in parts.items()}
