"""spectral/train.py: a short real run (outputs, metrics recomputed with the transcribed original,
checkpoints on every epoch they are due), exact resume, the built-in default run, bad input.

Runs happen in this process with one thread and a small decoder (the CNN backbone is CR_recon's);
the dashboard tests start the script as a user does (tests/test_spectral_dashboard.py)."""
from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import re
import shutil
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import helpers
from common.checkpoint import load_checkpoint
from common.data import BUILTIN_ENV
from common.io import run_cli
from spectral import data as D
from spectral.train import main as train_main
from tests.spectral_ref import original
from tests.test_spectral_data import write_raw

# batch 20 in micro-batches of 8 (see small_micro_batches): the runs and the exact resume go through them
TINY = {"seed": 1, "data": {"out_len": 30, "batch_size": 20, "num_workers": 0, "train_ratio": 0.75},
        "model": {"name": "cnn_xattn", "params": {"d_model": 32, "nhead": 4, "dec_layers": 1, "ff_mult": 1}},
        "loss": {"name": "mse_pearson", "params": {"w_mse": 0.5, "w_corr": 0.5}},
        "training": {"epochs": 2, "lr": 3e-4, "save_every": 1, "warmup_ratio": 0.2}}
FAST = ["--threads", 1, "--no-progress"]


def call(*argv):
    return helpers.call(train_main, *argv)


def cli_error(capsys, *argv) -> str:
    return helpers.cli_error(train_main, *argv, capsys=capsys)


@pytest.fixture(scope="module", autouse=True)
def small_micro_batches():
    import spectral.train
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(spectral.train, "TRAIN_MICRO_BATCH", 8)
        yield


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("spectral-train")
    write_raw(root / "raw", rows=(10, 10), invalid_every=5)
    (root / "tiny.yaml").write_text(yaml.safe_dump(TINY))
    return root


@pytest.fixture(scope="module")
def trained(work):
    n = torch.get_num_threads()
    try:
        result, out = call("--config", work / "tiny.yaml", "--data", work / "raw", "--out", work / "run", *FAST)
    finally:
        torch.set_num_threads(n)
    return work / "run", result, out


def read_log(run: Path) -> list[dict]:
    with open(run / "log.csv") as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


def test_outputs_and_validation_metrics_recomputed_with_the_original(trained, work):
    run, result, out = trained
    assert "micro-batches of 8" in out
    for name in ("best.pt", "last.pt", "epoch_0001.pt", "epoch_0002.pt", "split.json", "config.yaml",
                 "train_log.txt", "log.csv", "loss_curve.png"):
        assert (run / name).is_file(), name
    assert list((run / "tensorboard" / run.name).glob("events.out.tfevents.*"))   # one run, named as the folder
    log = read_log(run)
    assert [r["epoch"] for r in log] == [1, 2]
    for key in ("val_loss", "val_mse", "val_pearson_r", "val_rmse_R", "val_rmse_G", "val_rmse_B",
                "val_baseline_loss", "val_baseline_mse"):
        assert key in log[0]
    # the best checkpoint in the transcribed original model, evaluated on the validation rows the
    # split file names, read straight from the raw files
    ckpt = load_checkpoint(run / "best.pt")
    params = {**TINY["model"]["params"]}
    ref = original.get_model("cnn_xattn", **params)
    ref.load_state_dict(ckpt["model"])
    ref.eval()
    split = json.loads((run / "split.json").read_text())
    s = np.concatenate([np.load(work / "raw" / f"binary_dataset_128_{k}.npy") for k in (0, 1)])[split["val"]]
    t = np.concatenate([np.load(work / "raw" / f"spectra_latest_{k}.npy") for k in (0, 1)])[split["val"]]
    tgt = torch.from_numpy(-original.to_bayer(t))
    with torch.no_grad():
        pred = ref(torch.from_numpy(s.astype(np.float32)) * 2 - 1)
    best = log[ckpt["extra"]["trainer"]["best_epoch"] - 1]
    loss = original.get_loss("mse_pearson", w_mse=0.5, w_corr=0.5)(pred, tgt)
    assert math.isclose(best["val_loss"], float(loss), rel_tol=1e-4)
    assert math.isclose(best["val_mse"], float(((pred - tgt) ** 2).mean()), rel_tol=1e-4)
    train_rows = np.array(split["train"])
    t_train = np.concatenate([np.load(work / "raw" / f"spectra_latest_{k}.npy") for k in (0, 1)])[train_rows]
    mean = -original.to_bayer(t_train).mean(0)
    mean = 0.5 * (mean + original.rotate_bayer(mean[None])[0])          # the training set holds both
    assert math.isclose(best["val_baseline_mse"], float(((torch.from_numpy(mean) - tgt) ** 2).mean()), rel_tol=1e-4)
    assert f"  val_loss: {best['val_loss']:.4g} (baseline {best['val_baseline_loss']:.4g}): " in out
    assert "  baseline: predicting the mean training spectrum for every structure" in out
    lines = (run / "train_log.txt").read_text().splitlines()
    assert len(lines) == 2 and re.fullmatch(
        r"\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\] \[EPOCH\] 2/2 train_loss=\S+ val_loss=\S+ best_val=\S+ lr=\S+", lines[1])
    assert ckpt["extra"]["spectral"]["config"] == yaml.safe_load((run / "config.yaml").read_text())


def test_checkpoints_are_written_on_every_epoch_they_are_due(trained):
    """CR_recon writes last.pt and the periodic epoch_NNNN.pt only on epochs that did not improve;
    epoch 1 always improves, so with save_every 1 it would have neither."""
    run, _, _ = trained
    assert load_checkpoint(run / "epoch_0001.pt")["epoch"] == 1
    assert load_checkpoint(run / "epoch_0002.pt")["epoch"] == 2
    assert load_checkpoint(run / "last.pt")["epoch"] == 2
    assert (run / "best.pt").is_file()


def test_resume_continues_exactly_with_schedule_and_state(trained, work, capsys):
    """Resuming from the epoch-1 checkpoint ends bit-identical to the uninterrupted run: the LR
    schedule continues (CR_recon rebuilt it and re-warmed from step 0) with the optimizer state."""
    run, _, _ = trained
    again = work / "resumed"
    again.mkdir()
    shutil.copy(run / "epoch_0001.pt", again / "last.pt")
    shutil.copy(run / "split.json", again / "split.json")
    n = torch.get_num_threads()
    _, out = call("--resume", again / "last.pt", *FAST)
    torch.set_num_threads(n)
    assert "resumed from" in out
    a, b = load_checkpoint(run / "last.pt"), load_checkpoint(again / "last.pt")
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert a["scheduler"] == b["scheduler"] and a["step"] == b["step"]
    assert read_log(again)[1]["lr"] == read_log(run)[1]["lr"]
    err = cli_error(capsys, "--resume", again / "last.pt", "--lr", 0.1, *FAST)
    assert "a resume continues the run exactly, but --lr 0.1" in err
    other = work / "other.yaml"
    other.write_text(yaml.safe_dump({**TINY, "training": {**TINY["training"], "lr": 1e-3}}))
    err = cli_error(capsys, "--resume", again / "last.pt", "--config", other, *FAST)
    assert "training.lr is 0.001 here but 0.0003 in the run being resumed" in err


def test_infer_reads_our_checkpoint_without_a_config(trained, work, tmp_path, capsys):
    from spectral.infer import main as infer_main

    run, _, _ = trained
    s = np.load(work / "raw" / "binary_dataset_128_1.npy")[:3]
    np.save(tmp_path / "S.npy", s)
    with contextlib.redirect_stdout(io.StringIO()):
        pred = infer_main([str(a) for a in ("--weights", run / "best.pt", "--structs", tmp_path / "S.npy",
                                            "--out", tmp_path / "P.npy", "--threads", 1)])
    ref = original.get_model("cnn_xattn", **TINY["model"]["params"])
    ref.load_state_dict(load_checkpoint(run / "best.pt")["model"])
    with torch.no_grad():
        expected = ref.eval()(torch.from_numpy(s.astype(np.float32)) * 2 - 1).numpy()
    assert np.abs(np.load(tmp_path / "P.npy") - expected).max() <= 1e-5 and pred.shape == (3, 2, 2, 30)
    gru = tmp_path / "gru.yaml"
    gru.write_text("model:\n  name: cnn_gru\n")
    capsys.readouterr()
    with pytest.raises(SystemExit):
        run_cli(lambda: infer_main([str(a) for a in ("--weights", run / "best.pt", "--config", gru, "--structs",
                                                      tmp_path / "S.npy", "--out", tmp_path / "Q.npy")]))
    assert "best.pt: holds cnn_xattn" in capsys.readouterr().err and not (tmp_path / "Q.npy").exists()


def test_default_run_uses_the_builtin_data(tmp_path, monkeypatch):
    """`python spectral/train.py` with nothing else: CR_recon's default model on the built-in data with
    the demo recipe (here on a smaller built-in set and one epoch)."""
    monkeypatch.setenv(BUILTIN_ENV, str(tmp_path / "builtin"))
    root = tmp_path / "builtin" / "spectral"
    D.make_builtin_dataset(root, rows_per_part=10, invalid_every=5)
    (root / ".builtin-version").write_text(D.BUILTIN_VERSION)
    n = torch.get_num_threads()
    result, out = call("--epochs", 1, "--out", tmp_path / "run", *FAST)
    torch.set_num_threads(n)
    assert "using the built-in demo data" in out and "with the built-in demo recipe" in out
    assert "model: cnn_xattn, 8,881,980 parameters" in out
    assert "summary: spectral, best.pt = epoch 1 of 1 (lowest val_loss)" in out
    assert re.search(r"  val_loss: \S+ \(baseline \S+\): [\d.]+% (lower|higher), (better|WORSE) than the baseline", out)
    assert f"  data:     built-in demo data in {root} " in out                 # where the files are, named
    cfg = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert cfg["training"]["lr"] == 3e-4 and cfg["data"]["batch_size"] == 8 and cfg["training"]["epochs"] == 1


@pytest.mark.slow
def test_the_default_demo_learns(tmp_path, run_script):
    """The real default run (about a minute on 2 cores): val loss and MSE well below the
    predict-the-training-mean baseline."""
    res = run_script("spectral/train.py", "--out", tmp_path / "demo", "--no-progress", check=True)
    log = read_log(tmp_path / "demo")
    assert log[-1]["val_loss"] < 0.7 * log[-1]["val_baseline_loss"]
    assert log[-1]["val_mse"] < 0.7 * log[-1]["val_baseline_mse"]
    assert "lower" in res.stdout


def test_bad_input_is_one_line_and_writes_nothing(work, trained, tmp_path, capsys):
    s, t = np.load(work / "raw" / "binary_dataset_128_0.npy"), np.load(work / "raw" / "spectra_latest_0.npy")
    bad = tmp_path / "bad"
    bad.mkdir()
    np.save(bad / "binary_dataset_128_0.npy", s)
    np.save(bad / "spectra_latest_0.npy", t[:-1])
    out = tmp_path / "never"
    err = cli_error(capsys, "--config", work / "tiny.yaml", "--data", bad, "--out", out, *FAST)
    assert "spectra_latest_0.npy: 9 rows, but" in err and not out.exists()
    cfg = tmp_path / "c.yaml"
    cfg.write_text(textwrap.dedent("""\
        model:
          name: cnn_xattn
          params:
            d_model: 32
            gru_layers: 2
        """))
    err = cli_error(capsys, "--config", cfg, "--data", work / "raw", "--out", out, *FAST)
    assert "c.yaml: model.params.gru_layers: cnn_xattn has no parameter 'gru_layers'" in err and not out.exists()
    err = cli_error(capsys, "--config", Path(__file__).parents[1] / "spectral/configs/default.yaml", "--out", out, *FAST)
    assert "default.yaml: data.struct_files file ../data_CR-main/binary_dataset_128_0.npy not found" in err
    assert "give --data DIR with the raw files, or --builtin-data" in err and not out.exists()
    err = cli_error(capsys, "--config", work / "tiny.yaml", "--data", work / "raw", "--builtin-data", *FAST)
    assert "--data and --builtin-data are alternatives" in err
    err = cli_error(capsys, "--config", work / "tiny.yaml", "--data", work / "raw", "--out", work / "run", *FAST)
    assert "already holds a run" in err
    err = cli_error(capsys, "--config", work / "tiny.yaml", "--data", work / "raw", "--dashboard", 70000, *FAST)
    assert "--dashboard" in err and "65535" in err
