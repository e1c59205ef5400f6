"""Frozen VGG feature extractors for perceptual losses, with torchvision's ImageNet weights.

The weights come from torchvision's own weight files (the torch hub cache, downloaded when
missing). Without them a perceptual loss means nothing, so a missing file is one clear error that
names the file and where to put it.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from common.io import UserError, load_untrusted

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# torchvision's layer configurations ("D" = VGG16, "E" = VGG19) and weight files
ARCHS = {"vgg16": ("D", torchvision.models.VGG16_Weights.IMAGENET1K_V1),
         "vgg19": ("E", torchvision.models.VGG19_Weights.IMAGENET1K_V1)}


class WeightsUnavailable(UserError):
    """The ImageNet weight file is neither cached nor downloadable."""


def imagenet_weights_path(arch: str) -> Path:
    url = ARCHS[arch][1].url
    return Path(torch.hub.get_dir()) / "checkpoints" / url.rsplit("/", 1)[-1]


def imagenet_state_dict(arch: str) -> dict[str, torch.Tensor]:
    """torchvision's ImageNet weights for `arch`: from the hub cache, else downloaded into it."""
    path, url = imagenet_weights_path(arch), ARCHS[arch][1].url
    if not path.is_file():
        print(f"downloading {arch.upper()} ImageNet weights {url} -> {path}", flush=True)
        try:
            # torch writes its temporary file next to the destination: the folder must exist first
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(url, str(path), progress=False)
        except Exception as e:  # noqa: BLE001 - no network, a proxy, a full disk: all mean "not available"
            detail = str(e).strip().splitlines()[0] if str(e).strip() else "no detail"
            raise WeightsUnavailable(
                f"{arch.upper()} ImageNet weights unavailable: {path.name} could not be downloaded from {url} "
                f"({type(e).__name__}: {detail}); download it elsewhere and put it at {path} (or set TORCH_HOME), "
                f"or train without the VGG term (colorize: --perceptual 0; phaseformer: --perceptual none)") from None
    return load_untrusted(path)


class VGGFeatures(nn.Module):
    """Activations after the given `features` indices of a frozen, always-eval VGG.

    vgg16: relu1_2 = 3, relu2_2 = 8, relu3_3 = 15, relu4_3 = 22; vgg19: conv5_4 (before ReLU) = 34.
    Inputs are RGB in [0, 1]; `normalize` applies the ImageNet mean/std (buffers, not parameters),
    `resize` (H, W) resamples bilinearly after normalising. `weights=None`: random (for tests).
    """

    def __init__(self, arch: str = "vgg16", layers=(3, 8, 15), normalize: bool = True,
                 weights: str | None = "imagenet", resize: tuple[int, int] | None = None):
        super().__init__()
        if arch not in ARCHS:
            raise ValueError(f"arch must be one of {sorted(ARCHS)}")
        # the convolutional part only: the classifier would add 120 M parameters nobody uses
        features = torchvision.models.vgg.make_layers(torchvision.models.vgg.cfgs[ARCHS[arch][0]])
        if weights == "imagenet":
            sd = imagenet_state_dict(arch)
            features.load_state_dict({k.removeprefix("features."): v for k, v in sd.items()
                                      if k.startswith("features.")})
        elif weights is not None:
            raise ValueError("weights must be 'imagenet' or None")
        self.layers = tuple(sorted(set(layers)))
        if not self.layers or self.layers[0] < 0 or self.layers[-1] >= len(features):
            raise ValueError(f"layers must be indices into {arch}.features (0..{len(features) - 1})")
        self.features = features[: self.layers[-1] + 1]
        self.normalize, self.resize = normalize, resize
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        for p in self.parameters():
            p.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "VGGFeatures":
        return super().train(False)  # frozen: never dropout / batch statistics

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if self.normalize:
            x = (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)
        if self.resize is not None:
            x = F.interpolate(x, size=self.resize, mode="bilinear", align_corners=False)
        outs = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in self.layers:
                outs.append(x)
        return outs
