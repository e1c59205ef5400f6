"""Safe I/O, device choice, RNG capture and built-in data conventions in common/."""
import os
import random
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from common import data as D
from common import device as dev
from common.io import (UserError, atomic_open, load_image, load_untrusted, load_weights_into)
from common.repro import get_rng_state, set_rng_state


# ---------------------------------------------------------------- images
def test_load_image_errors_name_the_file(tmp_path):
    with pytest.raises(UserError, match="missing.png: image not found"):
        load_image(tmp_path / "missing.png")
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(UserError, match="empty.png: image file is empty"):
        load_image(tmp_path / "empty.png")
    (tmp_path / "junk.png").write_bytes(os.urandom(300))
    with pytest.raises(UserError, match="junk.png: unreadable or corrupt image"):
        load_image(tmp_path / "junk.png")
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "ok.png")
    data = (tmp_path / "ok.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="cut.png: unreadable or corrupt image"):
        load_image(tmp_path / "cut.png")


def test_load_image_converts_modes(tmp_path):
    Image.new("RGBA", (5, 4), (10, 20, 30, 128)).save(tmp_path / "a.png")
    im = load_image(tmp_path / "a.png")
    assert im.mode == "RGB" and im.getpixel((0, 0)) == (10, 20, 30)
    Image.fromarray(np.full((4, 4), 65535, dtype=np.uint16)).save(tmp_path / "16.png")
    assert load_image(tmp_path / "16.png", "L").getpixel((0, 0)) == 255  # scaled, not clipped garbage


# ---------------------------------------------------------------- atomic writes / untrusted loads
def test_atomic_write_failure_keeps_the_old_file(tmp_path):
    target = tmp_path / "ckpt.pt"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_open(target) as f:
            f.write(b"half of the new")
            raise RuntimeError("crash mid-write")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]  # no temp file left behind


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    torch.save({"model": {"w": torch.zeros(1)}, "x": _Payload(marker)}, evil)
    with pytest.raises(UserError, match="evil.pt: refused to load"):
        load_untrusted(evil)
    assert not marker.exists()
    # the payload is real: an unsafe load (in a throwaway process) does run it
    subprocess.run([sys.executable, "-c", f"import torch; torch.load({str(evil)!r}, weights_only=False)"],
                   capture_output=True, cwd=os.path.dirname(__file__))
    assert marker.exists()


def test_load_weights_into_lists_mismatches(tmp_path):
    torch.save({"weight": torch.zeros(3, 2), "extra": torch.zeros(1)}, tmp_path / "w.pt")
    with pytest.raises(UserError) as e:
        load_weights_into(torch.nn.Linear(2, 2), tmp_path / "w.pt")
    msg = str(e.value)
    assert "1 missing: bias" in msg and "1 unexpected: extra" in msg and "1 wrong shape: weight" in msg
    (tmp_path / "t.pt").write_bytes(b"PK\x03\x04 truncated zip")
    with pytest.raises(UserError, match="t.pt: corrupt or truncated checkpoint"):
        load_untrusted(tmp_path / "t.pt")


def test_user_error_from_a_dataloader_worker_is_one_line():
    from torch.utils.data import DataLoader, Dataset

    from common.io import user_message

    class Broken(Dataset):
        def __len__(self):
            return 2

        def __getitem__(self, i):
            raise UserError(f"img{i}.png: unreadable or corrupt image")

    with pytest.raises(UserError) as e:
        next(iter(DataLoader(Broken(), num_workers=1)))
    assert "Original Traceback" in str(e.value)          # how torch re-raises it
    assert user_message(e.value) == "img0.png: unreadable or corrupt image"


# ---------------------------------------------------------------- device
def test_device_choice(monkeypatch):
    assert dev.select_device("cpu", verbose=False).type == "cpu"
    with pytest.raises(UserError, match="unknown device"):
        dev.select_device("tpu", verbose=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match="CUDA is not available"):
        dev.select_device("cuda", verbose=False)
    with pytest.raises(UserError, match="directml"):
        dev.select_device("directml", verbose=False)
    monkeypatch.setattr(dev, "_directml_device", lambda: "dml-sentinel")
    assert dev.select_device("auto", verbose=False) == "dml-sentinel"  # DirectML before MPS and CPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert dev.select_device("auto", verbose=False).type == "cuda"


def test_amp_rules():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert dev.amp_dtype(cpu, "auto") is None
    assert dev.amp_dtype(cpu, "bf16") is torch.bfloat16
    assert dev.amp_dtype(cuda, "auto") is torch.float16
    assert dev.amp_dtype(cuda, "off") is None
    with pytest.raises(UserError, match="fp16 needs CUDA"):
        dev.amp_dtype(cpu, "fp16")


# ---------------------------------------------------------------- RNG / seeding
def test_rng_state_roundtrips_through_weights_only_load(tmp_path):
    state = get_rng_state()
    torch.save(state, tmp_path / "rng.pt")
    a = (random.random(), float(np.random.rand()), float(torch.rand(())))
    set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert (random.random(), float(np.random.rand()), float(torch.rand(()))) == a


def test_seed_everything_and_deterministic_mode(monkeypatch):
    from common.repro import seed_everything
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    try:
        seed_everything(5, deterministic=True)
        a = (random.random(), float(np.random.rand()), float(torch.rand(())))
        assert torch.are_deterministic_algorithms_enabled() and not torch.backends.cudnn.benchmark
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
        seed_everything(5)
        assert (random.random(), float(np.random.rand()), float(torch.rand(()))) == a
    finally:
        torch.use_deterministic_algorithms(False)


# ---------------------------------------------------------------- built-in data / CSV
def test_builtin_data_is_generated_atomically_and_versioned(tmp_path, monkeypatch):
    monkeypatch.setenv(D.BUILTIN_ENV, str(tmp_path))
    calls = []

    def broken(d):
        (d / "half.txt").write_text("x")
        raise RuntimeError("generator crashed")

    with pytest.raises(RuntimeError):
        D.ensure_builtin("demo", "v1", broken)
    assert [p.name for p in tmp_path.iterdir()] == [".demo.lock"]  # nothing half-made left to be picked up

    def good(d):
        calls.append(d)
        (d / "a.txt").write_text("v")

    root = D.ensure_builtin("demo", "v1", good)
    assert root == tmp_path / "demo" and (root / "a.txt").read_text() == "v"
    D.ensure_builtin("demo", "v1", good)
    assert len(calls) == 1  # reused
    D.ensure_builtin("demo", "v2", good)
    assert len(calls) == 2  # regenerated for a new generator version


def test_read_csv_errors(tmp_path):
    p = tmp_path / "labels.csv"
    p.write_text("image_path,label\na.png,1\n")
    with pytest.raises(UserError, match="labels.csv: missing column"):
        D.read_csv(p, ("image_path", "impurity"))
    p.write_text("image_path,impurity\n")
    with pytest.raises(UserError, match="no data rows"):
        D.read_csv(p, ("image_path", "impurity"))
    p.write_text("image_path,impurity\na.png,1\nb.png,0\n")
    assert [(n, r["image_path"]) for n, r in D.read_csv(p, ("image_path", "impurity"))] == [(2, "a.png"), (3, "b.png")]


def test_balanced_sampler_balances_and_replays_per_epoch():
    from common.distributed import DistInfo
    labels = torch.tensor([0] * 90 + [1] * 10)
    s = D.BalancedSampler(labels, seed=1, info=DistInfo())
    s.set_epoch(3)
    a = list(s)
    assert len(a) == 100 and list(s) == a          # same epoch, same draw
    s.set_epoch(4)
    assert list(s) != a
    draws = torch.cat([torch.tensor(list(s)) for e in range(20) if s.set_epoch(e) is None])
    share_minority = (labels[draws] == 1).float().mean()
    assert 0.45 < float(share_minority) < 0.55   # 10% of the data, half of the draws
    half = D.BalancedSampler(labels, seed=1, info=DistInfo(rank=1, world_size=2))
    assert len(half) == 50
