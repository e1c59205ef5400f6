"""The shared training loop, driven through tests/tiny_train.py as real processes."""
import csv
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from common.checkpoint import load_checkpoint

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "tests" / "tiny_train.py"
# 8 steps per epoch; one thread: the model is tiny, and with two, OpenMP barriers stall while other
# processes keep the second core busy
FAST = ["--no-progress", "--samples", "64", "--batch-size", "8", "--epochs", "4", "--threads", "1"]


def tiny(*args, check=True, cmd_prefix=None):
    cmd = (cmd_prefix or [sys.executable]) + [str(TINY), *map(str, args)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO)
    if check and res.returncode != 0:
        raise AssertionError(f"{cmd} failed:\n{res.stdout[-2000:]}\n{res.stderr[-3000:]}")
    return res


def model_state(path):
    return load_checkpoint(path)["model"]


def assert_bit_identical(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs"


def csv_rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished FAST run with 0 workers, read (never changed) by the tests that need one."""
    out = tmp_path_factory.mktemp("tiny") / "run"
    tiny(*FAST, "--workers", 0, "--out", out)
    return out


# workers=2: slow (18 s); test_hardening resumes a mid-epoch checkpoint with 2 workers bit-identically
@pytest.mark.parametrize("workers", [0, pytest.param(2, marks=pytest.mark.slow)])
def test_sigkill_at_random_step_then_resume_is_bit_identical(tmp_path, workers, request):
    cut = tmp_path / "cut"
    if workers == 0:
        ref = request.getfixturevalue("finished_run")
    else:
        ref = tmp_path / "ref"
        tiny(*FAST, "--workers", workers, "--out", ref)

    kill_step = random.Random().randint(9, 31)  # after the first checkpoint, before the end
    proc = subprocess.Popen([sys.executable, str(TINY), *FAST, "--workers", str(workers), "--out", str(cut)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=REPO)
    for line in proc.stdout:
        if line.strip() == f"STEP {kill_step}":
            os.kill(proc.pid, signal.SIGKILL)
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, f"run ended before step {kill_step}"
    interrupted = load_checkpoint(cut / "last.pt")
    assert interrupted["epoch"] < 4

    res = tiny(*FAST, "--workers", workers, "--out", cut, "--resume", cut / "last.pt")
    assert f"resumed from {cut / 'last.pt'}" in res.stdout
    final_ref, final_cut = load_checkpoint(ref / "last.pt"), load_checkpoint(cut / "last.pt")
    assert_bit_identical(final_ref["model"], final_cut["model"])
    for s_ref, s_cut in zip(final_ref["optimizer"]["state"].values(), final_cut["optimizer"]["state"].values()):
        assert torch.equal(s_ref["exp_avg"], s_cut["exp_avg"])
    assert final_ref["scheduler"]["last_epoch"] == final_cut["scheduler"]["last_epoch"] == 32
    # the log is rebuilt from the checkpoint: one row per epoch, same losses as the reference
    rows_ref, rows_cut = csv_rows(ref / "log.csv"), csv_rows(cut / "log.csv")
    assert [r["epoch"] for r in rows_cut] == ["1", "2", "3", "4"]
    assert [r["train_loss"] for r in rows_cut] == [r["train_loss"] for r in rows_ref]


def test_refuses_to_overwrite_an_existing_run(finished_run):
    out = finished_run
    before = (out / "last.pt").read_bytes()
    res = tiny(*FAST, "--epochs", 1, "--out", out, check=False)
    assert res.returncode != 0
    assert "already holds a run" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert (out / "last.pt").read_bytes() == before


def test_nan_loss_stops_with_message_and_keeps_last_good_checkpoint(tmp_path):
    out = tmp_path / "run"
    res = tiny(*FAST, "--out", out, "--nan-at-epoch", 3, check=False)
    assert res.returncode == 2
    err = res.stderr.strip().splitlines()
    assert len(err) == 1 and "loss became nan at epoch 3" in err[0] and "last.pt" in err[0]
    ckpt = load_checkpoint(out / "last.pt")
    assert ckpt["epoch"] == 2
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


def test_outputs_checkpoint_contents_and_periodic_files(tmp_path):
    out = tmp_path / "run"
    tiny(*FAST, "--out", out, "--save-every", 2, "--accum-steps", 2, "--clip-grad", 1.0)
    assert sorted(p.name for p in out.glob("*.pt")) == ["best.pt", "epoch_0002.pt", "epoch_0004.pt", "last.pt"]
    ckpt = torch.load(out / "last.pt", weights_only=True)  # plain types only
    assert ckpt["epoch"] == 4 and ckpt["step"] == 16  # 8 micro-batches / 2 accumulation steps x 4 epochs
    assert ckpt["config"]["accum_steps"] == 2 and ckpt["config"]["clip_grad"] == 1.0
    assert set(ckpt["rng"]) >= {"python", "numpy", "torch"}
    rows = csv_rows(out / "log.csv")
    assert len(rows) == 4 and float(rows[-1]["val_acc"]) >= 0.9  # it actually learned
    best = load_checkpoint(out / "best.pt")
    assert best["best_metric"] == pytest.approx(min(float(r["val_loss"]) for r in rows), rel=1e-5)
    png = (out / "loss_curve.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    # TensorBoard (installed by requirements.txt) got the same per-epoch numbers as log.csv
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    # tags grouped so that TensorBoard shows the losses first (common.runlog.tb_tag)
    for key, tag in (("train_loss", "loss/train"), ("val_loss", "loss/val"), ("val_acc", "metrics/val_acc"),
                     ("lr", "train/lr")):
        logged = [(e.step, e.value) for e in events.Scalars(tag)]
        assert logged == [(int(r["epoch"]), pytest.approx(float(r[key]), rel=1e-5)) for r in rows], key


def test_two_gloo_processes_match_one_process_on_the_same_global_batch(tmp_path):
    common = ["--no-progress", "--samples", "64", "--epochs", "2", "--norm", "none", "--no-dropout",
              "--no-augment", "--device", "cpu", "--threads", "1"]
    tiny(*common, "--batch-size", 8, "--out", tmp_path / "single", "--save-every", 1)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    res = tiny(*common, "--batch-size", 4, "--out", tmp_path / "ddp", cmd_prefix=torchrun)
    assert res.stdout.count("run folder:") == 1  # rank 0 only
    single, ddp = model_state(tmp_path / "single" / "last.pt"), model_state(tmp_path / "ddp" / "last.pt")
    assert single.keys() == ddp.keys()
    for k in single:
        assert (single[k] - ddp[k]).abs().max() <= 1e-6, k
    # training moved the weights between epochs, so this compares trained models
    epoch1 = model_state(tmp_path / "single" / "epoch_0001.pt")
    assert max((single[k] - epoch1[k]).abs().max() for k in single) > 1e-3
    # validation metrics are all-reduced: identical to the single process's
    assert csv_rows(tmp_path / "ddp" / "log.csv")[-1]["val_acc"] == csv_rows(tmp_path / "single" / "log.csv")[-1]["val_acc"]


def _loader(n=16, bs=4):
    from torch.utils.data import TensorDataset

    from common.data import train_loader
    from common.distributed import DistInfo
    g = torch.Generator().manual_seed(0)
    ds = TensorDataset(torch.randn(n, 3, 8, 8, generator=g), torch.randint(0, 2, (n,), generator=g))
    return train_loader(ds, bs, seed=0, workers=0, info=DistInfo())


def _ce(m, batch):
    x, y = batch
    return torch.nn.functional.cross_entropy(m(x), y)


def test_plateau_scheduler_and_early_stopping_in_process(tmp_path):
    from common.trainer import Trainer
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(192, 2))
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=0)
    trainer = Trainer(model, opt, _loader(), _ce, out_dir=tmp_path, epochs=10, device=torch.device("cpu"),
                      evaluate=lambda m: {"val_loss": 1.0}, scheduler=sched, patience=2, progress=False)
    result = trainer.fit()
    assert result["stopped_early"] and trainer.epoch == 3 and result["best_epoch"] == 1
    assert [r["lr"] for r in result["history"]] == [1.0, 1.0, 0.5]
    assert opt.param_groups[0]["lr"] == 0.25
    # resuming a run that stopped early trains nothing more
    again = Trainer(model, opt, _loader(), _ce, out_dir=tmp_path, epochs=10, device=torch.device("cpu"),
                    evaluate=lambda m: {"val_loss": 1.0}, scheduler=sched, patience=2, progress=False)
    before = (tmp_path / "last.pt").read_bytes()
    again.fit(resume=tmp_path / "last.pt")
    assert again.epoch == 3 and (tmp_path / "last.pt").read_bytes() == before


def test_bf16_autocast_and_channels_last_on_cpu(tmp_path):
    from common.trainer import Trainer
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                torch.nn.Linear(4, 2))
    seen = {}

    def loss_fn(m, batch):
        x, y = batch
        seen["channels_last"] = x.is_contiguous(memory_format=torch.channels_last)
        out = m(x)
        seen["dtype"] = out.dtype
        return torch.nn.functional.cross_entropy(out.float(), y)

    before = model[0].weight.detach().clone()
    trainer = Trainer(model, torch.optim.SGD(model.parameters(), lr=0.1), _loader(), loss_fn, out_dir=tmp_path,
                      epochs=1, device=torch.device("cpu"), amp_dtype=torch.bfloat16, channels_last=True,
                      progress=False)
    trainer.fit()
    assert seen == {"channels_last": True, "dtype": torch.bfloat16}
    assert model[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert model[0].weight.dtype == torch.float32 and not torch.equal(model[0].weight, before)


def test_micro_batches_give_the_same_training_as_whole_batches(tmp_path):
    """micro_batch=3 on batches of 8: forward/backward on parts of 3, 3, 2, the same updates, losses
    and logs as whole batches (a model without BatchNorm and a mean loss); a NaN part still stops."""
    from common.trainer import Trainer, split_batch

    parts = split_batch({"x": torch.arange(8), "y": (torch.arange(8) * 2, "tag")}, 3)
    assert [p["x"].tolist() for p in parts] == [[0, 1, 2], [3, 4, 5], [6, 7]]
    assert parts[2]["y"][0].tolist() == [12, 14] and parts[2]["y"][1] == "tag"

    def run(micro, out, poison=False):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.GroupNorm(2, 4), torch.nn.SiLU(),
                                    torch.nn.Flatten(), torch.nn.Linear(144, 2))
        sizes = []

        def loss_fn(m, batch):
            x, y = batch
            sizes.append(len(x))
            logits = m(x)
            loss = torch.nn.functional.cross_entropy(logits, y)
            if poison and len(sizes) == 5:
                loss = loss * float("nan")
            return loss, {"mean_logit": float(logits.detach().mean())}

        opt = torch.optim.SGD(model.parameters(), lr=0.5)     # updates linear in the gradient
        trainer = Trainer(model, opt, _loader(n=32, bs=8), loss_fn, out_dir=out, epochs=2, device=torch.device("cpu"),
                          progress=False, accum_steps=2, micro_batch=micro)
        return model, trainer.fit(), sizes

    whole, h_whole, s_whole = run(None, tmp_path / "whole")
    parts_model, h_parts, s_parts = run(3, tmp_path / "parts")
    assert s_whole == [8] * 8 and s_parts == [3, 3, 2] * 8
    for a, b in zip(whole.parameters(), parts_model.parameters()):
        assert (a - b).abs().max() <= 1e-6
    for a, b in zip(h_whole["history"], h_parts["history"]):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-6)
        assert a["train_mean_logit"] == pytest.approx(b["train_mean_logit"], rel=1e-5, abs=1e-7)
    from common.trainer import TrainingDiverged
    with pytest.raises(TrainingDiverged, match="batch 2"):
        run(3, tmp_path / "nan", poison=True)


def test_nonfinite_skip_drops_only_those_updates_and_counts_them(tmp_path):
    from common.trainer import Trainer
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(192, 2))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    calls = {"n": 0}

    def loss_fn(m, batch):
        calls["n"] += 1
        loss = _ce(m, batch)
        return loss * float("nan") if calls["n"] % 4 == 2 else loss  # the 2nd of every 4 batches

    trainer = Trainer(model, opt, _loader(), loss_fn, out_dir=tmp_path, epochs=3, device=torch.device("cpu"),
                      progress=False, nonfinite="skip")
    result = trainer.fit()
    assert [r["skipped_steps"] for r in result["history"]] == [1, 1, 1]
    assert trainer.step == 9 and opt.state[model[1].weight]["step"] == 9  # Adam saw only the good ones
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert all(np.isfinite(r["train_loss"]) for r in result["history"])


def test_any_worker_count_gives_the_same_run(tmp_path):
    """Augmentation is drawn per (seed, epoch, index): --workers may change, also on a resume."""
    tiny(*FAST, "--epochs", 2, "--workers", 0, "--out", tmp_path / "w0")
    tiny(*FAST, "--epochs", 2, "--workers", 2, "--out", tmp_path / "w2")
    assert_bit_identical(model_state(tmp_path / "w0" / "last.pt"), model_state(tmp_path / "w2" / "last.pt"))


def test_metrics_are_full_precision_under_autocast():
    from common.metrics import psnr, ssim
    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(2, 3, 32, 32, generator=g), torch.rand(2, 3, 32, 32, generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = ssim(a, b), psnr(a, b)
    assert torch.equal(inside[0], ssim(a, b)) and torch.equal(inside[1], psnr(a, b))
