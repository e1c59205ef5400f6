"""common.vgg's ImageNet weights: downloaded into a hub cache that does not exist yet (faked download)."""
import os

import pytest
import torch

from common import vgg


def test_download_creates_the_hub_cache_folder_and_loads_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "fresh" / "torch"))
    urls = []

    def fake_download(url, dst, progress=True):  # as torch.hub's: a temporary file in dst's folder, renamed
        urls.append(url)
        torch.save({"features.0.bias": torch.arange(3.0)}, dst + ".partial")
        os.replace(dst + ".partial", dst)

    monkeypatch.setattr(torch.hub, "download_url_to_file", fake_download)
    sd = vgg.imagenet_state_dict("vgg16")
    assert urls == [torchvision_url("vgg16")] and torch.equal(sd["features.0.bias"], torch.arange(3.0))
    assert (tmp_path / "fresh" / "torch" / "hub" / "checkpoints" / "vgg16-397923af.pth").is_file()
    assert vgg.imagenet_state_dict("vgg16").keys() == sd.keys() and len(urls) == 1   # cached now


def test_failed_download_is_one_line_naming_file_and_place(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))

    def offline(url, dst, progress=True):
        raise OSError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(vgg.WeightsUnavailable, match=r"vgg19-dcbb9e9d\.pth could not be downloaded from https://.*"
                                                     r"name resolution.*put it at .*checkpoints"):
        vgg.imagenet_state_dict("vgg19")


def torchvision_url(arch):
    return vgg.ARCHS[arch][1].url
