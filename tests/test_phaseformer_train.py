"""phaseformer/train.py: a short run on LSUI-layout data with every output checked, exact resume
with the optimizer and schedule, NaN/inf updates skipped and counted, the loss weights really
trained, bad flags in one line; the one-minute demo (slow)."""
import contextlib
import copy
import csv
import io
import os
import shlex
import signal
import sys
from pathlib import Path

import pytest
import torch

from common.checkpoint import save_checkpoint
from common.io import UserError
from common.vgg import WeightsUnavailable
from phaseformer import train
from phaseformer.data import make_builtin_dataset
from phaseformer.losses import PhaseformerLoss
from phaseformer.model import build_model

sys.path.insert(0, str(Path(__file__).parent / "phaseformer_ref"))

FAST = ["--image-size", "32", "--batch-size", "4", "--workers", "0", "--no-progress", "--threads", "1",
        "--niter", "0", "--niter-decay", "2"]


def run_train(argv):
    """train.main as a user runs it, except that VGG ImageNet weights count as unavailable (as on a
    machine without network): the run leaves the perceptual term out, says so, and nothing is
    downloaded by the tests."""
    def unavailable(*a, **k):
        raise WeightsUnavailable("VGG19 ImageNet weights unavailable: vgg19-dcbb9e9d.pth (test)")

    with pytest.MonkeyPatch.context() as m:
        m.setattr(train, "PerceptualLoss", unavailable)
        return train.main(argv)


@pytest.fixture(scope="module")
def lsui(tmp_path_factory):
    root = tmp_path_factory.mktemp("lsui")
    make_builtin_dataset(root, n=10, size=48, seed=1)
    return root


@pytest.fixture(scope="module")
def straight(lsui, tmp_path_factory):
    """An uninterrupted 2-epoch run: checked in full, and the reference for the resume test."""
    out = tmp_path_factory.mktemp("straight") / "run"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        run_train([*_args(lsui), "--out", str(out), "--sampling", "crop"])
    (out.parent / "stdout.txt").write_text(printed.getvalue())
    return out


def _args(lsui):
    return ["--data", str(lsui), "--val-count", "2", "--epochs", "2", *FAST]


def _log(run: Path) -> list[dict]:
    with open(run / "log.csv") as f:
        return list(csv.DictReader(f))


def test_short_run_writes_everything_and_trains_the_loss_weights(straight):
    out = straight
    rows = _log(out)
    assert len(rows) == 2
    for key in ("val_psnr", "val_ssim", "val_psnr_2x", "val_psnr_input", "val_ssim_input", "skipped_steps",
                "w_1x_charbonnier", "w_2x_msssim", "train_1x_laplacian", "lr"):
        assert key in rows[0], key
    assert rows[0]["val_psnr_input"] == rows[1]["val_psnr_input"]            # the baseline, once
    # the learned weights are given to the optimizer (the original's never were): they move
    first, second = float(rows[0]["w_1x_msssim"]), float(rows[1]["w_1x_msssim"])
    assert first != 0.5 and second != first
    assert float(rows[0]["lr"]) == pytest.approx(1e-3) and float(rows[1]["lr"]) == pytest.approx(1e-3 * 2 / 3)
    assert (out / "samples" / "epoch_0002.png").is_file()
    split = (out / "split.txt").read_text().splitlines()
    assert sum(line.startswith("val\t") for line in split) == 2
    ckpt = torch.load(out / "last.pt", weights_only=True)
    model = build_model()
    model.load_state_dict(ckpt["model"], strict=True)                            # a plain Phaseformer
    assert ckpt["config"]["run_loss_terms"] == ["charbonnier", "laplacian", "msssim"]  # no VGG weights
    printed = (out.parent / "stdout.txt").read_text()
    assert "training without the perceptual term" in printed and "summary: phaseformer" in printed
    assert " dB (baseline " in printed and "the degraded input itself" in printed
    assert float(rows[1]["val_loss"]) > 0                                          # the loss curve's validation line
    assert ckpt["extra"]["phaseformer"]["loss_weighting"]["log_vars"].shape == (6,)
    groups = ckpt["optimizer"]["param_groups"]                                   # ups2 / attention.3: kept,
    assert len(groups[0]["params"]) == len(list(model.parameters())) - 2        # not trained (DDP-safe)
    assert len(groups[1]["params"]) == 1                                         # the loss weights


def test_interrupted_run_resumes_exactly_with_optimizer_and_schedule(lsui, straight, tmp_path, monkeypatch, capsys):
    """Ctrl-C in epoch 2 saves a mid-epoch last.pt; the resume with the command printed at Ctrl-C (of
    a run started with --seed) ends bit-identical to the straight run (the original reloaded the
    weights only and restarted the lr schedule)."""
    split = tmp_path / "split"
    common = [*_args(lsui), "--sampling", "crop"]

    real_forward = PhaseformerLoss.forward
    calls = {"n": 0}

    def forward(self, *a):
        calls["n"] += 1
        if calls["n"] == 3:                      # epoch 2, batch 1 of 2
            os.kill(os.getpid(), signal.SIGINT)
        return real_forward(self, *a)

    with monkeypatch.context() as m:
        m.setattr(PhaseformerLoss, "forward", forward)
        m.setattr(sys, "argv", ["phaseformer/train.py"])
        with pytest.raises(KeyboardInterrupt):
            run_train([*common, "--seed", "42", "--out", str(split)])   # 42: the straight run's default
    command = shlex.split(capsys.readouterr().err.split("continue with: ")[1].splitlines()[0])
    assert command[1:] == ["phaseformer/train.py", "--resume", str(split / "last.pt")], command
    interrupted = torch.load(split / "last.pt", weights_only=True)
    assert interrupted["epoch"] == 1 and interrupted["extra"]["trainer"]["mid_epoch"]["batch"] == 1
    with pytest.raises(UserError, match="--lr 0.002 \\(the checkpoint has 0.001\\)"):
        train.main(["--resume", str(split / "last.pt"), "--lr", "0.002"])
    train.main(command[2:])
    a, b = torch.load(straight / "last.pt", weights_only=True), torch.load(split / "last.pt", weights_only=True)
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert torch.equal(a["extra"]["phaseformer"]["loss_weighting"]["log_vars"],
                       b["extra"]["phaseformer"]["loss_weighting"]["log_vars"])
    assert b["scheduler"]["last_epoch"] == 2 and b["optimizer"]["state"]              # schedule and Adam moments
    assert [r["val_psnr"] for r in _log(split)] == [r["val_psnr"] for r in _log(straight)]


def test_non_finite_losses_are_skipped_and_counted(lsui, straight, tmp_path, monkeypatch, capsys):
    """Every loss of epoch 1 is NaN: no update happens (the weights after it are the initial ones),
    the count is logged, and epoch 2 trains normally. (Under bf16 autocast and channels_last, with
    the validation metrics still computed in fp32.)"""
    real_forward = PhaseformerLoss.forward
    calls = {"n": 0}

    def forward(self, *a):
        total, logs = real_forward(self, *a)
        calls["n"] += 1
        return (total * float("nan"), logs) if calls["n"] <= 2 else (total, logs)  # 8 pairs / batch 4

    initial = {}
    real_build = train.build_model

    def build(name="phaseformer"):
        model = real_build(name)
        initial.update(copy.deepcopy(model.state_dict()))
        return model

    monkeypatch.setattr(PhaseformerLoss, "forward", forward)
    monkeypatch.setattr(train, "build_model", build)
    out = tmp_path / "run"
    run_train(["--data", str(lsui), "--out", str(out), "--epochs", "2", "--val-count", "2", "--save-every", "1",
               "--sample-every", "0", "--amp", "bf16", "--channels-last", *FAST])
    rows = _log(out)
    assert [r["skipped_steps"] for r in rows] == ["2", "0"]
    assert rows[0]["val_ssim_input"] == _log(straight)[0]["val_ssim_input"]     # fp32 metrics under autocast
    first = torch.load(out / "epoch_0001.pt", weights_only=True)
    assert all(torch.equal(first["model"][k], initial[k]) for k in initial)
    assert not first["optimizer"]["state"]                            # no Adam moments either
    second = torch.load(out / "epoch_0002.pt", weights_only=True)
    assert not torch.equal(second["model"]["output.weight"], initial["output.weight"])
    assert [r["skipped_steps"] for r in second["extra"]["trainer"]["history"]] == [2, 0]
    assert "warning: 2 update(s) skipped in epoch 1: the loss or the gradients were NaN/inf" in capsys.readouterr().out


def test_bad_flags_and_data_in_one_line(lsui, tmp_path, capsys):
    for bad in (["--image-size", "abc"], ["--image-size", "16"], ["--beta1", "1.0"], ["--loss-weights", "softmax"]):
        with pytest.raises(SystemExit) as e:
            train.parse_args(bad)
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.count("\n") == 1 and bad[0] in err, err
    for argv, message in ((["--image-size", "36"], "--image-size 36: must be a multiple of 8"),
                          (["--epochs", "9", "--niter", "2", "--niter-decay", "3"], "more than niter"),
                          (["--split", "s.txt", "--val-count", "3"], "alternatives"),
                          (["--data", str(tmp_path)], "no paired images found")):
        with pytest.raises(UserError, match=message):
            run_train([*argv, "--out", str(tmp_path / "never")] + ([] if "--data" in argv else ["--data", str(lsui)]))
    other = tmp_path / "other.pt"
    save_checkpoint(other, model=torch.nn.Linear(2, 2), config={"task": "crbl", "lr": 1e-3})
    with pytest.raises(UserError, match="other.pt is a crbl checkpoint; phaseformer needs"):
        train.main(["--resume", str(other)])
    assert not (tmp_path / "never").exists()


@pytest.mark.slow
def test_default_demo_learns(tmp_path, run_script):
    """`python phaseformer/train.py` as the README shows it: val PSNR ends above the input's."""
    res = run_script("phaseformer/train.py", "--out", tmp_path / "demo", "--no-progress", check=True)
    rows = _log(tmp_path / "demo")
    assert float(rows[-1]["val_psnr"]) > float(rows[-1]["val_psnr_input"])
    assert "built-in demo" in res.stdout and "the degraded input itself" in res.stdout
