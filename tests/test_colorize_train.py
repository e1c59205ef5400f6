"""colorize/train.py: short real runs on the built-in data (one thread, 32 px, width 16), the
per-step OneCycle, every validation image scored, sample grids, Ctrl-C in the first epoch and the
exact resume from there, the perceptual / style / damaged-region terms, --init from the original's checkpoint, and
bad input. The one-minute default demo itself is the slow test at the end."""
from __future__ import annotations

import csv
import functools
import os
import shlex
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

import colorize.train
import common.vgg
from colorize.data import BUILTIN_VERSION, make_builtin_dataset
from colorize.model import build_model
from colorize.train import main as train_main
import helpers
from common.data import ensure_builtin
from common.io import load_untrusted
from common.vgg import VGGFeatures, WeightsUnavailable

REPO = Path(__file__).resolve().parents[1]
# 60 pairs: 48 train (10 steps of 5, the last one of 3) and 12 validation images (batches 5, 5, 2)
SMALL = ["--epochs", 2, "--subset", 0.25, "--img-size", 32, "--batch-size", 5, "--threads", 1, "--perceptual", 0]


def call(*argv):
    return helpers.call(train_main, *argv)


def cli_error(capsys, *argv) -> str:
    return helpers.cli_error(train_main, *argv, capsys=capsys)


def read_log(folder: Path) -> list[dict]:
    with open(folder / "log.csv") as f:
        return list(csv.DictReader(f))


def model_state(path: Path) -> dict:
    return load_untrusted(path)["model"]


@functools.lru_cache(maxsize=None)
def run_a(tmp: str) -> tuple[Path, str]:
    out = Path(tmp) / "A"
    _, stdout = call(*SMALL, "--sample-every", 1, "--save-every", 1, "--no-progress", "--out", out)
    return out, stdout


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    return run_a(str(tmp_path_factory.mktemp("colorize-train")))


def test_short_run_writes_scores_samples_and_checkpoints(small_run):
    out, stdout = small_run
    assert "built-in demo data" in stdout and "returning the gray input = " in stdout
    for name in ("best.pt", "last.pt", "epoch_0001.pt", "log.csv", "loss_curve.png",
                 "samples/epoch_0001.png", "samples/epoch_0002.png"):
        assert (out / name).is_file(), name
    log = read_log(out)
    assert [int(r["epoch"]) for r in log] == [1, 2]
    # every validation image is scored, the last partial batch too (the original dropped it)
    assert all(int(r["val_images"]) == 12 for r in log)
    best = max(log, key=lambda r: float(r["val_score"]))
    ckpt = load_untrusted(out / "best.pt")
    assert ckpt["epoch"] == int(best["epoch"]) and ckpt["extra"]["trainer"]["monitor"] == "val_score"
    cfg = ckpt["config"]
    assert (cfg["model"], cfg["net_width"], cfg["net_img_size"], cfg["task"]) == ("improved_unet", 16, 32, "colorize")
    assert cfg["width"] is None and cfg["img_size"] == 32 and cfg["epochs"] == 2   # flags as given; settings apart
    from PIL import Image
    # input | restored | ground truth of 32 px images, enlarged to a grid a screen shows readably
    assert Image.open(out / "samples" / "epoch_0002.png").size[0] >= 768
    assert "summary: colorize, best.pt = epoch" in stdout and re.search(r"baseline: +returning the damaged gray", stdout)
    assert re.search(rf"val_score: +{float(best['val_score']):.4g} \(baseline {float(log[0]['val_score_input']):.4g}\)",
                     stdout)


def test_onecycle_is_stepped_every_batch(small_run):
    """10 steps per epoch: after epoch 1 the lr is OneCycle's value at step 10 of 20 (near the 1e-3
    peak), not at step 1 as the original's once-per-epoch step left it (4.0e-5 for the whole run)."""
    out, _ = small_run
    log = read_log(out)
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-3, total_steps=20, pct_start=0.3, div_factor=25,
                                                final_div_factor=1000)
    lrs = []
    for _ in range(20):
        opt.step()
        sched.step()
        lrs.append(sched.get_last_lr()[0])
    assert float(log[0]["lr"]) == pytest.approx(lrs[9], rel=1e-4)
    assert float(log[1]["lr"]) == pytest.approx(lrs[19], rel=1e-4)
    assert float(log[0]["lr"]) > 5e-4   # per-epoch stepping would give ~4.6e-5 here


def test_resume_with_another_setting_is_refused(small_run, capsys):
    out, _ = small_run
    msg = cli_error(capsys, "--resume", out / "last.pt", "--lr", 0.01)
    assert "--lr 0.01 (the checkpoint has 0.001)" in msg


def test_ctrl_c_in_the_first_epoch_saves_a_checkpoint_that_resumes_exactly(small_run, tmp_path):
    """The original's KeyboardInterrupt handler used variables the first epoch had not set yet, so a
    Ctrl-C there saved nothing. Here: SIGINT while epoch 1 runs, a mid-epoch last.pt, and the resumed
    run ends bit-identical to the uninterrupted one."""
    a_out, _ = small_run
    c = tmp_path / "C"
    stdout_file = tmp_path / "stdout.txt"
    with open(stdout_file, "w") as stdout_sink:    # stderr has one reader, the watcher below
        proc = subprocess.Popen([sys.executable, str(REPO / "colorize" / "train.py"), *map(str, SMALL), "--seed", "42",
                                 "--out", str(c)],
                                stdout=stdout_sink, stderr=subprocess.PIPE, text=True, cwd=REPO,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
    seen = threading.Event()
    err_chunks = []

    def watch():
        while True:
            ch = proc.stderr.read(1)
            if not ch:
                return
            err_chunks.append(ch)
            if not seen.is_set() and "epoch 1/2" in "".join(err_chunks[-200:]):
                seen.set()
    t = threading.Thread(target=watch, daemon=True)
    t.start()
    assert seen.wait(300), "training never started:\n" + "".join(err_chunks)
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=300)
    t.join(10)
    stdout, err = stdout_file.read_text(), "".join(err_chunks)
    assert proc.returncode == 130, (stdout, err)
    assert "interrupted in epoch 1 after batch" in err
    ckpt = load_untrusted(c / "last.pt")
    assert ckpt["epoch"] == 0 and ckpt["extra"]["trainer"]["mid_epoch"]["batch"] >= 1
    printed = err.split("continue with: ")[1].splitlines()[0]   # the command printed at Ctrl-C, as printed
    command = shlex.split(printed)
    assert command[1].endswith("colorize/train.py") and command[2:] == ["--resume", str(c / "last.pt")], printed
    call(*command[2:])
    a_state, c_state = model_state(a_out / "last.pt"), model_state(c / "last.pt")
    assert all(torch.equal(a_state[k], c_state[k]) for k in a_state)


def test_perceptual_style_and_damaged_region_terms(tmp_path, monkeypatch):
    """With VGG16 weights at hand (random here: no download in tests) the loss has every term."""
    monkeypatch.setattr(colorize.train, "ensure_vgg_weights", lambda: None)
    monkeypatch.setattr(common.vgg, "VGGFeatures", lambda *a, **k: VGGFeatures(*a, **{**k, "weights": None}))
    _, stdout = call("--epochs", 1, "--subset", 0.1, "--img-size", 32, "--batch-size", 6, "--style", 10,
                     "--mask-weight", 1, "--sample-every", 0, "--no-progress", "--out", tmp_path / "D")
    assert "loss 1*L1 + 0.2*perceptual + 10*style + 1*mask_L1" in stdout
    row = read_log(tmp_path / "D")[0]
    assert float(row["train_perceptual"]) > 0 and float(row["train_style"]) > 0 and float(row["train_mask_l1"]) > 0


def test_missing_vgg_weights_fall_back_only_for_the_builtin_demo(tmp_path, monkeypatch, capsys):
    def unavailable():
        raise WeightsUnavailable("VGG16 ImageNet weights unavailable: vgg16-397923af.pth could not be downloaded; "
                                 "put it at /x/vgg16-397923af.pth")
    monkeypatch.setattr(colorize.train, "ensure_vgg_weights", unavailable)
    data = ensure_builtin("colorize", BUILTIN_VERSION, make_builtin_dataset)
    msg = cli_error(capsys, "--data", data, "--epochs", 1, "--out", tmp_path / "E")
    assert msg.startswith("error: VGG16 ImageNet weights unavailable: vgg16-397923af.pth")
    assert not (tmp_path / "E").exists()   # the run folder it had created is gone again
    _, stdout = call("--epochs", 1, "--subset", 0.05, "--img-size", 32, "--sample-every", 0, "--no-progress",
                     "--out", tmp_path / "E2")
    assert "note: VGG16 ImageNet weights unavailable: vgg16-397923af.pth" in stdout
    assert "built-in demo: training without the VGG terms" in stdout and "loss 1*L1;" not in stdout
    assert "; loss 1*L1\n" in stdout and (tmp_path / "E2" / "best.pt").is_file()


def test_init_from_the_originals_checkpoint_with_orig_mod(tmp_path):
    torch.manual_seed(9)
    src = build_model("improved_unet", 16)
    sd = {f"_orig_mod.{k}": v for k, v in src.state_dict().items()}
    torch.save({"epoch": 29, "model_state_dict": sd, "optimizer_state_dict": {}, "train_loss": 0.1, "val_loss": 0.1},
               tmp_path / "best_model.pth")
    _, stdout = call("--epochs", 1, "--subset", 0.1, "--img-size", 32, "--batch-size", 6, "--lr", 1e-12,
                     "--weight-decay", 0, "--sample-every", 0, "--no-progress", "--init", tmp_path / "best_model.pth",
                     "--out", tmp_path / "F")
    trained = model_state(tmp_path / "F" / "last.pt")
    for k, v in src.state_dict().items():
        torch.testing.assert_close(trained[k], v, atol=1e-6, rtol=0)


def test_bad_input_is_one_line(tmp_path, capsys):
    data = ensure_builtin("colorize", BUILTIN_VERSION, make_builtin_dataset)
    assert "--img-size 40: must be a multiple of 16" in cli_error(capsys, "--img-size", 40, "--out", tmp_path / "a")
    assert "no train.csv there" in cli_error(capsys, "--data", tmp_path, "--out", tmp_path / "b")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "train.csv").write_text("input,target\na.png,b.png\n")
    assert "missing column(s) input_image_path, gt_image_path" in cli_error(capsys, "--data", bad, "--out", tmp_path / "c")
    # a pair whose input and ground truth differ in size, found when the images are read
    sized = tmp_path / "sized"
    shutil.copytree(data, sized, ignore=shutil.ignore_patterns("test_*"))
    from PIL import Image
    Image.open(sized / "train_gt" / "TRAIN_00001.png").resize((64, 64)).save(sized / "train_gt" / "TRAIN_00001.png")
    rows = (sized / "train.csv").read_text().splitlines()
    (sized / "train.csv").write_text("\n".join(rows[:11]) + "\n")   # 10 pairs, so validation reads this one
    msg = cli_error(capsys, "--data", sized, "--epochs", 1, "--img-size", 32, "--width", 16, "--val-fraction", 0.9, "--workers", 0,
                    "--perceptual", 0, "--out", tmp_path / "d")
    assert "TRAIN_00001.png: input is 128x128 but its ground truth" in msg and "is 64x64" in msg
    # weights of the other architecture
    torch.save({"model_state_dict": build_model("unet", 8).state_dict()}, tmp_path / "unet.pth")
    msg = cli_error(capsys, "--init", tmp_path / "unet.pth", "--epochs", 1, "--out", tmp_path / "e")
    assert "unet.pth: the checkpoint holds a unet model, not --model improved_unet" in msg


def test_an_existing_run_is_not_overwritten(small_run, capsys):
    out, _ = small_run
    before = (out / "last.pt").stat().st_mtime_ns
    msg = cli_error(capsys, *SMALL, "--out", out)
    assert "already holds a run" in msg and (out / "last.pt").stat().st_mtime_ns == before


@pytest.mark.slow
def test_default_demo_learns_within_about_a_minute(tmp_path):
    """`python colorize/train.py` exactly as a user runs it: the validation competition score ends
    above the score of returning the gray input."""
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, str(REPO / "colorize" / "train.py"), "--out", str(tmp_path / "demo"),
                          "--no-progress"], capture_output=True, text=True, cwd=REPO, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    elapsed = time.perf_counter() - t0
    log = read_log(tmp_path / "demo")
    baseline = load_untrusted(tmp_path / "demo" / "best.pt")["config"]["val_score_gray_input"]
    best = max(float(r["val_score"]) for r in log)
    assert best > baseline + 0.05, (best, baseline)
    print(f"demo: {elapsed:.0f} s, best val score {best:.3f} vs gray input {baseline:.3f}")
