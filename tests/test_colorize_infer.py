"""colorize/infer.py end to end, as the acceptance check runs it: checkpoints in the original's
format (made from the transcription of the original modules, with `_orig_mod.` prefixes and cuda:0
storages), every output pixel compared with the original model's output x 255; outputs named like
the inputs at the inputs' sizes, rounded; --zip; test.csv; our own checkpoints; bad input."""
from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from colorize.data import gray_u8, resize_tensor, resize_u8
from colorize.infer import main as infer_main
from colorize.infer import restore_to_size
from colorize.model import build_model
import helpers
from common.checkpoint import save_checkpoint

from tests.colorize_ref.original_unet import OriginalImprovedUNet, OriginalUNet
from tests.test_colorize_model import original_checkpoint, saved_as_cuda

REPO = Path(__file__).resolve().parents[1]


def scene(seed: int, h: int, w: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w]
    img = np.stack([xx * 255 / w, yy * 255 / h, 128 + 100 * np.sin(xx / 5.0)], -1)
    return np.clip(img + rng.normal(0, 8, img.shape), 0, 255).astype(np.uint8)


def write_inputs(folder: Path) -> dict[str, np.ndarray]:
    """128x128 inputs as the competition's: gray (mode L) and a damaged one saved as RGB."""
    folder.mkdir(parents=True, exist_ok=True)
    g0 = gray_u8(scene(0, 128, 128))
    g1 = gray_u8(scene(1, 128, 128))
    g1[30:70, 40:90] = 17
    Image.fromarray(g0).save(folder / "TEST_000.png")
    Image.fromarray(np.repeat(g1[..., None], 3, -1)).save(folder / "TEST_001.png")
    return {n: np.repeat(g[..., None], 3, -1) for n, g in (("TEST_000.png", g0), ("TEST_001.png", g1))}


def reference_output(net: torch.nn.Module, rgb: np.ndarray, size: int = 128) -> np.ndarray:
    """The original's pipeline: resize to size (cv2 INTER_LINEAR), /255, model, x255 (float), here
    resized back to the input's size when it differs."""
    x = torch.from_numpy(np.array(resize_u8(rgb, (size, size)))).permute(2, 0, 1)[None].float() / 255
    with torch.no_grad():
        y = net(x)[0]
    y = resize_tensor(y, rgb.shape[:2])
    return (y.permute(1, 2, 0).numpy() * 255).astype(np.float64)


def compare(out_dir: Path, refs: dict[str, np.ndarray]) -> list[float]:
    diffs = []
    for name, ref in refs.items():
        got = np.asarray(Image.open(out_dir / name))
        assert got.shape == ref.shape and got.dtype == np.uint8, name
        d = got.astype(np.float64) - ref
        assert np.abs(d).max() <= 1.0, (name, np.abs(d).max())
        diffs.append(d)
    return diffs


def test_acceptance_command_improved_unet_original_checkpoint(tmp_path):
    """python colorize/infer.py --weights best_model.pth --input DIR --out DIR --size 128 --model improved_unet
    on the original's best_model.pth (saved on a GPU by a torch.compile'd model)."""
    torch.manual_seed(0)
    ref = OriginalImprovedUNet().eval()
    with saved_as_cuda():
        torch.save(original_checkpoint(ref, compiled=True), tmp_path / "best_model.pth")
    inputs = write_inputs(tmp_path / "in")
    res = subprocess.run([sys.executable, str(REPO / "colorize" / "infer.py"), "--weights", "best_model.pth",
                          "--input", "in", "--out", "out", "--size", "128", "--model", "improved_unet"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=600,
                         env={**{k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr
    assert sorted(os.listdir(tmp_path / "out")) == sorted(inputs)
    diffs = compare(tmp_path / "out", {n: reference_output(ref, rgb) for n, rgb in inputs.items()})
    # rounded, not truncated: truncation would sit half a level below on average
    assert abs(np.mean(np.concatenate([d.ravel() for d in diffs]))) < 0.05


def test_plain_unet_original_checkpoint_any_input_size_and_names(tmp_path):
    """--model unet (the first version, BatchNorm in eval mode), inputs of other sizes and formats:
    outputs at each input's own size, named like it (.png), in a flat --zip."""
    torch.manual_seed(1)
    ref = OriginalUNet()
    for m in ref.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    ref.eval()
    torch.save(original_checkpoint(ref), tmp_path / "best_model.pth")
    folder = tmp_path / "in"
    folder.mkdir()
    odd = scene(2, 100, 72)
    Image.fromarray(gray_u8(odd)).save(folder / "TEST_010.png")
    Image.fromarray(scene(3, 128, 128)).save(folder / "TEST_011.jpg", quality=95)
    refs = {"TEST_010.png": reference_output(ref, np.repeat(gray_u8(odd)[..., None], 3, -1)),
            "TEST_011.png": reference_output(ref, np.asarray(Image.open(folder / "TEST_011.jpg").convert("RGB")))}
    with contextlib.redirect_stdout(io.StringIO()):
        infer_main(["--weights", str(tmp_path / "best_model.pth"), "--input", str(folder), "--out", str(tmp_path / "out"),
                    "--size", "128", "--model", "unet", "--zip"])
    compare(tmp_path / "out", refs)
    assert Image.open(tmp_path / "out" / "TEST_010.png").size == (72, 100)
    with zipfile.ZipFile(tmp_path / "out" / "submission.zip") as z:
        assert sorted(z.namelist()) == ["TEST_010.png", "TEST_011.png"]      # flat: no folders
        assert z.read("TEST_010.png") == (tmp_path / "out" / "TEST_010.png").read_bytes()


def test_rounding_and_resizing_back():
    p = torch.full((3, 16, 16), 127.6 / 255)
    assert (restore_to_size(p, (16, 16)) == 128).all()       # the original's astype(uint8) gave 127
    ramp = torch.linspace(0, 1, 16).view(1, 1, 16).expand(3, 16, 16)
    out = restore_to_size(ramp, (32, 40))
    assert out.shape == (32, 40, 3) and out[0, 0, 0] == 0 and out[0, -1, 0] == 255


@pytest.fixture(scope="module")
def own_checkpoint(tmp_path_factory):
    """A colorize/train.py checkpoint (width 16, trained at 32 px) and a test.csv pointing at inputs."""
    root = tmp_path_factory.mktemp("own")
    torch.manual_seed(2)
    net = build_model("improved_unet", 16)
    save_checkpoint(root / "best.pt", model=net, epoch=3, config={"task": "colorize", "model": "improved_unet",
                                                                   "net_width": 16, "net_img_size": 32})
    (root / "test_input").mkdir()
    for i in range(3):
        Image.fromarray(gray_u8(scene(10 + i, 48, 48))).save(root / "test_input" / f"TEST_00{i}.png")
    (root / "test.csv").write_text("input_image_path\n" + "".join(f"./test_input/TEST_00{i}.png\n" for i in range(3)))
    return root, net.eval()


def test_own_checkpoint_uses_its_width_and_training_size_and_reads_test_csv(own_checkpoint, tmp_path):
    root, net = own_checkpoint
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        infer_main(["--weights", str(root / "best.pt"), "--input", str(root / "test.csv"), "--out", str(tmp_path / "o")])
    assert "improved_unet width 16" in buf.getvalue() and "at 32x32" in buf.getvalue()
    rgb = np.asarray(Image.open(root / "test_input" / "TEST_001.png").convert("RGB"))
    compare(tmp_path / "o", {"TEST_001.png": reference_output(net, rgb, size=32)})


def test_nothing_is_overwritten_without_overwrite(own_checkpoint, tmp_path, capsys):
    root, _ = own_checkpoint
    argv = ["--weights", str(root / "best.pt"), "--input", str(root / "test_input"), "--out", str(tmp_path / "o")]
    with contextlib.redirect_stdout(io.StringIO()):
        infer_main(argv)
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "o").iterdir()}
    msg = cli_error(capsys, *argv)
    assert "TEST_000.png already exists; choose another --out or pass --overwrite" in msg
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "o").iterdir()} == before
    with contextlib.redirect_stdout(io.StringIO()):
        infer_main(argv + ["--overwrite", "--zip", str(tmp_path / "sub.zip")])
    assert (tmp_path / "sub.zip").is_file()


def cli_error(capsys, *argv) -> str:
    return helpers.cli_error(infer_main, *argv, capsys=capsys)


def test_bad_input_is_one_line(own_checkpoint, tmp_path, capsys):
    root, _ = own_checkpoint
    w = ["--weights", str(root / "best.pt")]
    folder = tmp_path / "in"
    folder.mkdir()
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(folder / "a.png")
    (folder / "b.png").write_bytes(b"\x89PNG\r\n\x1a\ntruncated")
    msg = cli_error(capsys, *w, "--input", folder, "--out", tmp_path / "o1")
    assert "b.png: unreadable or corrupt image" in msg
    assert "--size 40: must be a multiple of 16" in cli_error(capsys, *w, "--input", folder, "--out", tmp_path / "o2",
                                                               "--size", 40)
    assert "holds a improved_unet model, not --model unet" in cli_error(
        capsys, *w, "--input", folder, "--out", tmp_path / "o3", "--model", "unet")
    (tmp_path / "junk.pth").write_bytes(os.urandom(2000))
    assert "junk.pth" in cli_error(capsys, "--weights", tmp_path / "junk.pth", "--input", folder, "--out", tmp_path / "o4")
    torch.save({"model_state_dict": {"fc.weight": torch.zeros(2, 2)}}, tmp_path / "other.pth")
    assert "not a colorize U-Net" in cli_error(capsys, "--weights", tmp_path / "other.pth", "--input", folder,
                                                "--out", tmp_path / "o5")
    (folder / "b.png").unlink()
    (folder / "sub").mkdir()
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(folder / "sub" / "a.jpg")
    assert "same output name a.png" in cli_error(capsys, *w, "--input", folder, "--out", tmp_path / "o6")
    assert not any((tmp_path / f"o{i}").exists() for i in range(2, 7))
