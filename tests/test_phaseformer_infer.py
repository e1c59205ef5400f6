"""phaseformer/infer.py: tiling that blends exactly, outputs at the input's size, the official
preset as the release's test.py computes it, metrics files, bad input in one line."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from common.io import UserError, image_to_tensor
from common.metrics import psnr, ssim
from phaseformer import infer
from phaseformer.model import Phaseformer

sys.path.insert(0, str(Path(__file__).parent / "phaseformer_ref"))
import official_model as official  # noqa: E402


class Pointwise(nn.Module):
    """A per-pixel stand-in for the model (tiling must then be exact) with both heads."""

    def forward(self, x, head="both"):
        out_1x = torch.tanh(2 * x) * x.mean(1, keepdim=True)
        out_2x = F.interpolate(out_1x, scale_factor=2, mode="nearest")
        return {"1x": out_1x, "2x": out_2x, "both": (out_1x, out_2x)}[head]


@pytest.mark.parametrize("head", ["1x", "2x"])
def test_tiles_blend_to_exactly_the_untiled_result_for_a_local_operator(head):
    x = torch.rand(1, 3, 150, 101, generator=torch.Generator().manual_seed(0))
    whole = infer.restore(Pointwise(), x, head, tile=200)
    tiled = infer.restore(Pointwise(), x, head, tile=64, overlap=16)
    s = 2 if head == "2x" else 1
    assert tiled.shape == whole.shape == (1, 3, 150 * s, 101 * s)
    assert torch.allclose(tiled, whole, atol=1e-6)
    assert infer.tile_starts(150, 64, 16) == [0, 48, 86] and infer.tile_starts(60, 64, 16) == [0]


def test_real_model_any_size_and_tiling():
    model = official.trained_looking(official.Restormer(), seed=1)
    ours = Phaseformer().eval()
    ours.load_state_dict(model.state_dict())
    x = torch.rand(1, 3, 37, 53, generator=torch.Generator().manual_seed(1))
    one, two = infer.restore(ours, x, "1x"), infer.restore(ours, x, "2x")
    assert one.shape == (1, 3, 37, 53) and two.shape == (1, 3, 74, 106)
    padded = F.pad(x, (0, 3, 0, 3), mode="reflect")                 # 40 x 56
    with torch.no_grad():
        want = ours(padded)
    assert torch.equal(one, want[0][..., :37, :53]) and torch.equal(two, want[1][..., :74, :106])
    big = torch.rand(1, 3, 96, 72, generator=torch.Generator().manual_seed(2))
    tiled = infer.restore(ours, big, "1x", tile=64, overlap=16)
    assert tiled.shape == big.shape and torch.isfinite(tiled).all()


def test_official_preset_is_the_release_test_script(monkeypatch):
    """test.py: PIL bicubic resize, ToTensor, Normalize(0.5, 0.5), model(x)[1], save_img:
    (x+1)/2*255, clip, astype(uint8). At a small size here (the release uses 512)."""
    import torchvision.transforms as T

    monkeypatch.setattr(infer, "OFFICIAL_SIZE", 32)
    ref = official.trained_looking(official.Restormer(), seed=2).eval()
    ours = Phaseformer().eval()
    ours.load_state_dict(ref.state_dict())
    rng = np.random.default_rng(0)
    im = Image.fromarray(rng.integers(0, 256, (30, 45, 3), dtype=np.uint8))
    x = T.Compose([T.ToTensor(), T.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))])(im.resize((32, 32), Image.BICUBIC))
    with torch.no_grad():
        out = ref(x[None])[1][0].numpy()
    want = ((np.transpose(out, (1, 2, 0)) + 1) / 2.0 * 255.0).clip(0, 255).astype(np.uint8)
    got = infer.official_postprocess(infer.run_model(ours, infer.official_preprocess(im), "2x", torch.device("cpu")))
    assert got.shape == (64, 64, 3)
    assert np.abs(got.astype(int) - want.astype(int)).max() <= 1    # truncation at a 1e-6 difference


def _write(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def test_cli_restores_writes_metrics_and_refuses_bad_input(tmp_path, run_script):
    weights = tmp_path / "weights.pth"
    torch.save(official.trained_looking(official.Restormer(), seed=4).state_dict(), weights)
    rng = np.random.default_rng(1)
    images = {"a.png": rng.integers(0, 256, (37, 53, 3), dtype=np.uint8),
              "sub/b.jpg": rng.integers(0, 256, (72, 80, 3), dtype=np.uint8)}
    for name, a in images.items():
        _write(tmp_path / "in" / name, a)
        _write(tmp_path / "gt" / Path(name).with_suffix(".png"), rng.integers(0, 256, a.shape, dtype=np.uint8))
    out = tmp_path / "out"
    env = {"OMP_NUM_THREADS": "1"}
    res = run_script("phaseformer/infer.py", tmp_path / "in", "--weights", weights, "--out", out, "--tile", "64",
                     "--overlap", "16", "--gt", tmp_path / "gt", "--metrics", env=env, check=True)
    assert "2 image(s) restored" in res.stdout
    report = json.loads((out / "metrics.json").read_text())
    for row in report["images"]:
        restored = np.asarray(Image.open(out / row["image"]))
        ref = np.asarray(Image.open(tmp_path / "gt" / row["image"]))
        given = np.asarray(Image.open(tmp_path / "in" / [n for n in images if Path(n).stem == Path(row["image"]).stem][0]))
        assert restored.shape == ref.shape == given.shape                     # the input's own size
        t = lambda a: image_to_tensor(Image.fromarray(a))[None]  # noqa: E731
        assert row["psnr"] == pytest.approx(float(psnr(t(restored), t(ref))), abs=1e-4)
        assert row["ssim"] == pytest.approx(float(ssim(t(restored), t(ref))), abs=1e-5)
        assert row["psnr_input"] == pytest.approx(float(psnr(t(given), t(ref))), abs=1e-4)
    assert (out / "metrics.csv").read_text().splitlines()[0] == "image,psnr,ssim,psnr_input,ssim_input"
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}

    def fails(*args, message):
        with pytest.raises(UserError, match=message) as e:
            infer.main([str(a) for a in args])
        assert "\n" not in str(e.value)

    fails(tmp_path / "in", "--weights", weights, "--out", out, message="already exists")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "broken.png").write_bytes(b"\x89PNG not really")
    fails(tmp_path / "bad", "--weights", weights, "--out", tmp_path / "o2", message="broken.png: unreadable or corrupt")
    other = tmp_path / "other.pth"
    torch.save(nn.Linear(2, 2).state_dict(), other)
    fails(tmp_path / "in", "--weights", other, "--out", tmp_path / "o3", message="other.pth: not Phaseformer")
    _write(tmp_path / "tiny" / "t.png", np.zeros((5, 40, 3), np.uint8))
    fails(tmp_path / "tiny", "--weights", weights, "--out", tmp_path / "o4", message="40x5 px is too small")
    fails(tmp_path / "in", "--weights", weights, "--metrics", "--out", tmp_path / "o5", message="--metrics needs --gt")
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == before
    assert not any((tmp_path / f"o{i}").exists() for i in (2, 3, 4, 5))
