"""common/vgg.py fetches torchvision's ImageNet VGG weights into the torch hub cache: faked downloads, no network."""
import os
import urllib.error

import pytest
import torch
import torchvision

import common.vgg as vgg
from common.vgg import VGGFeatures, WeightsUnavailable


def test_download_creates_the_cache_folder_and_the_file_is_used(tmp_path, monkeypatch):
    hub = tmp_path / "fresh" / "hub"                          # nothing of it exists yet, as on a new machine
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(hub))
    torch.manual_seed(0)
    features = torchvision.models.vgg.make_layers(torchvision.models.vgg.cfgs["D"])
    weights = {f"features.{k}": v for k, v in features.state_dict().items()}
    calls = []

    def fake_download(url, dst, hash_prefix=None, progress=True):
        calls.append((url, dst))
        # as torch does: a temporary file next to the destination, which needs the folder
        with open(dst + ".partial", "wb") as f:
            torch.save(weights, f)
        os.replace(dst + ".partial", dst)

    monkeypatch.setattr(torch.hub, "download_url_to_file", fake_download)
    model = VGGFeatures("vgg16", layers=(3,))
    path = hub / "checkpoints" / "vgg16-397923af.pth"
    assert calls == [(torchvision.models.VGG16_Weights.IMAGENET1K_V1.url, str(path))] and path.is_file()
    assert torch.equal(model.features[0].weight, weights["features.0.weight"])
    assert torch.equal(model.features[2].bias, weights["features.2.bias"])
    VGGFeatures("vgg16", layers=(3,))                           # cached now: no second download
    assert len(calls) == 1


def test_a_failed_download_is_one_line_naming_file_url_and_place(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))

    def no_network(url, dst, hash_prefix=None, progress=True):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    with pytest.raises(WeightsUnavailable) as e:
        vgg.imagenet_state_dict("vgg19")
    msg = str(e.value)
    path = tmp_path / "hub" / "checkpoints" / "vgg19-dcbb9e9d.pth"
    assert "\n" not in msg and "vgg19-dcbb9e9d.pth could not be downloaded from" in msg
    assert torchvision.models.VGG19_Weights.IMAGENET1K_V1.url in msg and f"put it at {path}" in msg
    assert "URLError" in msg and "--perceptual 0" in msg and "--perceptual none" in msg
    assert path.parent.is_dir() and not path.exists()
