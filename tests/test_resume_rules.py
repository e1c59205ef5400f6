"""Resume rules (issue 23) and hardening round 2, classes 2, 3, 4 and 7 (issue 21).

- a flag left out on --resume means "as stored", for every flag and task; only a flag given with
  another value than the one the run used is refused, and the message shows both values;
- the command printed at Ctrl-C is exactly one that works (a seeded spectral run, here in-process;
  phaseformer and colorize in their own test files);
- --threads on resume: measured (spectral, 2 epochs, resumed from epoch 1: --threads 2 after a
  --threads 1 run changed 73 of 86 tensors by up to 1.2e-7; --workers 2 after 0 changed none), so a
  different count is allowed with a note that the run stays valid but not bit-identical;
- every numeric flag has an upper bound; a checkpoint of another task is refused first, wherever a
  checkpoint is read; inputs are read before the run folder gets its first file, and a run that
  failed before its first checkpoint does not block the rerun; YAML duplicate keys and empty configs.
"""
from __future__ import annotations

import contextlib
import io
import os
import shlex
import signal
import sys
from pathlib import Path

import pytest
import torch
import yaml

import helpers
from common import cli
from common.checkpoint import UNFINISHED_MARKER, checkpoint_task, load_checkpoint, save_checkpoint
from common.io import UserError

# the tiny spectral model of tests/test_spectral_train.py, one epoch of 2 steps of 6 structures
TINY = {"seed": 1, "data": {"out_len": 30, "batch_size": 6, "num_workers": 0, "train_ratio": 0.75,
                            "augment_180": False},
        "model": {"name": "cnn_xattn", "params": {"d_model": 32, "nhead": 4, "dec_layers": 1, "ff_mult": 1}},
        "loss": {"name": "mse_pearson", "params": {"w_mse": 0.5, "w_corr": 0.5}},
        "training": {"epochs": 1, "lr": 3e-4, "save_every": 0, "warmup_ratio": 0.2}}


def argparse_error(main, *argv) -> str:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()), \
            pytest.raises(SystemExit) as e:
        main([str(a) for a in argv])
    assert e.value.code == 2
    lines = err.getvalue().strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def user_error(main, *argv) -> str:
    with contextlib.redirect_stdout(io.StringIO()), pytest.raises(UserError) as e:
        main([str(a) for a in argv])
    assert "\n" not in str(e.value)
    return str(e.value)


# ---------------------------------------------------------------- the resume rules in common/cli.py
def _parser_with_task_defaults():
    """A parser like spectral's: set_defaults(None) for flags whose value the task decides."""
    p = cli.ArgumentParser()
    cli.add_common_args(p, epochs=None, batch_size=None, lr=None)
    p.set_defaults(seed=None, workers=None, clip_grad=None, save_every=None)
    return p


def test_a_flag_left_out_takes_the_stored_value_even_with_set_defaults(tmp_path):
    """The reported failure: argparse reports parser.set_defaults values as given, so a resume
    without --seed of a run started with --seed 5 was refused with '--seed (none)'."""
    p = _parser_with_task_defaults()
    started = p.parse_args(["--seed", "5", "--lr", "0.01", "--threads", "1"])
    path = save_checkpoint(tmp_path / "run" / "last.pt", model=torch.nn.Linear(2, 2), config=started)
    args = cli.parse_args(p, ["--resume", str(path)])
    assert (args.seed, args.lr, args.workers, args.threads) == (5, 0.01, None, 1)
    with pytest.raises(UserError) as e:
        cli.parse_args(p, ["--resume", str(path), "--seed", "6", "--lr", "0.02"])
    msg = str(e.value)
    assert "--seed 6 (the checkpoint has 5)" in msg and "--lr 0.02 (the checkpoint has 0.01)" in msg
    assert "(none)" not in msg and "--workers" not in msg


def test_a_given_flag_is_compared_with_the_value_the_run_used(tmp_path):
    """A flag the run left to the task's default is stored as None; `used` gives the value the run
    took, so the same value given again is accepted, and another is shown against it."""
    p = _parser_with_task_defaults()
    path = save_checkpoint(tmp_path / "last.pt", model=torch.nn.Linear(2, 2), config=p.parse_args([]))
    used = {"lr": 3e-4, "epochs": 7}
    args = cli.parse_args(p, ["--resume", str(path), "--lr", "0.0003"], used=lambda ckpt: used)
    assert args.lr == 3e-4
    with pytest.raises(UserError, match=r"--epochs 9 \(the checkpoint has 7\); --lr 0.1 \(the checkpoint "
                                        r"has 0.0003\)"):
        cli.parse_args(p, ["--resume", str(path), "--lr", "0.1", "--epochs", "9"], used=lambda ckpt: used)
    with pytest.raises(UserError, match=r"--batch-size 4 \(the run was started without it\)"):
        cli.parse_args(p, ["--resume", str(path), "--batch-size", "4"])


def test_threads_on_resume_keeps_the_count_and_says_when_another_is_not_bit_identical(tmp_path, capsys):
    p = _parser_with_task_defaults()
    path = save_checkpoint(tmp_path / "last.pt", model=torch.nn.Linear(2, 2),
                           config=p.parse_args(["--threads", "1", "--workers", "0"]))
    assert cli.parse_args(p, ["--resume", str(path)]).threads == 1
    assert "note" not in capsys.readouterr().out
    assert cli.parse_args(p, ["--resume", str(path), "--threads", "2", "--workers", "2"]).threads == 2
    out = capsys.readouterr().out
    assert "--threads 2 differs from the 1 thread(s) the run used" in out and "not bit-identically" in out
    assert "--workers" not in out      # measured bit-identical: no note


def test_threads_help_mentions_resume_only_for_training():
    from spectral.infer import parse_args as spectral_infer
    from colorize.train import parse_args as colorize_train
    for parse, resume in ((spectral_infer, False), (colorize_train, True)):
        out = io.StringIO()
        with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
            parse(["--help"])
        text = " ".join(out.getvalue().split())
        assert "CPU threads for PyTorch" in text and ("a resume keeps" in text) == resume


# ---------------------------------------------------------------- a seeded spectral run, Ctrl-C, the printed command
@pytest.fixture(scope="module")
def spectral_work(tmp_path_factory):
    from tests.test_spectral_data import write_raw
    root = tmp_path_factory.mktemp("resume-rules")
    write_raw(root / "raw", rows=(10, 10), invalid_every=5)
    (root / "tiny.yaml").write_text(yaml.safe_dump(TINY))
    return root


@pytest.fixture()
def small_micro_batches(monkeypatch):
    import spectral.dashboard
    import spectral.train
    monkeypatch.setattr(spectral.train, "TRAIN_MICRO_BATCH", 8)
    # the per-epoch sample figure (matplotlib, 1-2 s a run) is not what these tests look at
    monkeypatch.setattr(spectral.dashboard.LiveLog, "epoch", lambda self, *a, **k: None)


def test_spectral_seeded_run_resumes_with_the_printed_command(spectral_work, small_micro_batches, monkeypatch,
                                                              capsys):
    from spectral.train import main, parse_args
    root = spectral_work
    start = ["--config", root / "tiny.yaml", "--data", root / "raw", "--seed", 5, "--threads", 1, "--no-progress"]
    helpers.call(main, *start, "--out", root / "straight")

    import spectral.train as st
    real_step = st.Trainer._optimizer_step
    calls = {"n": 0}

    def step_then_ctrl_c(self, *a):
        done = real_step(self, *a)
        calls["n"] += 1
        if calls["n"] == 1:                     # after the first of the 2 steps
            os.kill(os.getpid(), signal.SIGINT)
        return done
    monkeypatch.setattr(sys, "argv", ["spectral/train.py"])
    with monkeypatch.context() as m:
        m.setattr(st.Trainer, "_optimizer_step", step_then_ctrl_c)
        capsys.readouterr()
        with pytest.raises(KeyboardInterrupt):
            main([str(a) for a in (*start, "--out", root / "cut")])
    err = capsys.readouterr().err
    printed = err.split("continue with: ")[1].strip().splitlines()[0]
    command = shlex.split(printed)
    assert command[1:] == ["spectral/train.py", "--resume", str(root / "cut" / "last.pt")], printed
    mid = load_checkpoint(root / "cut" / "last.pt")
    assert mid["epoch"] == 0 and mid["extra"]["trainer"]["mid_epoch"]["batch"] == 1
    assert mid["config"]["threads"] == 1 and mid["config"]["seed"] == 5   # the count used, stored

    # a flag given with the value the run used is accepted; another is refused showing both values
    # (the run took its lr from the config: "the checkpoint has (none)" before)
    resume = ["--resume", str(root / "cut" / "last.pt")]
    args = parse_args([*resume, "--seed", "5", "--lr", "0.0003"])
    assert (args.seed, args.lr, args.threads) == (5, 3e-4, 1)
    msg = user_error(main, *resume, "--lr", 0.1, "--seed", 6)
    assert "--lr 0.1 (the checkpoint has 0.0003); --seed 6 (the checkpoint has 5)" in msg and "(none)" not in msg
    # the printed command, as printed (it failed before: "--seed (none) (the checkpoint has 5)")
    helpers.call(main, *command[2:])
    a, b = load_checkpoint(root / "straight" / "last.pt"), load_checkpoint(root / "cut" / "last.pt")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert a["step"] == b["step"] == 2 and b["epoch"] == 1
    assert not any((root / run / UNFINISHED_MARKER).exists() for run in ("straight", "cut"))   # runs now


def test_spectral_nan_at_the_first_batch_leaves_a_folder_the_rerun_accepts(spectral_work, small_micro_batches,
                                                                            monkeypatch):
    import spectral.train as st
    from common.trainer import TrainingDiverged
    root = spectral_work
    out = root / "nan"
    monkeypatch.setattr(st.Trainer, "_optimizer_step", lambda self, *a: (_ for _ in ()).throw(
        TrainingDiverged("loss became nan at epoch 1, batch 1")))
    with pytest.raises(TrainingDiverged), contextlib.redirect_stdout(io.StringIO()):
        st.main([str(a) for a in ("--config", root / "tiny.yaml", "--data", root / "raw", "--threads", 1,
                                  "--no-progress", "--out", out)])
    left = sorted(p.name for p in out.iterdir())
    assert UNFINISHED_MARKER in left and "split.json" in left and not list(out.glob("*.pt"))
    (out / "notes.txt").write_text("mine")          # something the run did not write: the folder is a user's
    with pytest.raises(UserError, match="already holds files"):
        cli.prepare_run_dir(out, resume=None, overwrite=False, outputs=("split.json", "config.yaml", "train_log.txt"))
    (out / "notes.txt").unlink()
    cli.prepare_run_dir(out, resume=None, overwrite=False, outputs=("split.json", "config.yaml", "train_log.txt"))
    assert sorted(p.name for p in out.iterdir()) == [UNFINISHED_MARKER]


# ---------------------------------------------------------------- class 2: upper bounds
@pytest.mark.parametrize("script, argv, expect", [
    ("spectral.train", ["--epochs", "100000000000000000000"], "--epochs: must be in [1, 100000]"),
    ("colorize.train", ["--threads", "100000"], "--threads: must be in [0, "),
    ("phaseformer.train", ["--seed", "1e24"], "--seed: expected an integer"),
    ("phaseformer.train", ["--seed", str(2**32)], "--seed: must be in [0, 4294967295]"),
    ("crbl.train", ["--model-type", "crop", "--batch-size", "100000"], "--batch-size: must be in [1, 65536]"),
    ("battery_ct.train", ["--model", "resnet18", "--lr", "1e30"], "--lr: must be in (0, 10]"),
    ("phaseformer.train", ["--niter", "10000000"], "--niter: must be in [0, 100000]"),
    ("colorize.infer", ["--workers", "100000", "--weights", "x.pt"], "--workers: must be in [0, "),
    ("crbl.infer", ["--batch-size", "10000000000", "--weights", "x.pt", "x.png"], "--batch-size: must be in [1, 65536]"),
    ("battery_ct.infer", ["--batch-size", "10000000000", "--weights", "x.pt"], "--batch-size: must be in [1, 65536]"),
    ("phaseformer.infer", ["--threads", "100000", "x.png"], "--threads: must be in [0, "),
])
def test_numeric_flags_have_upper_bounds(script, argv, expect):
    import importlib
    main = importlib.import_module(script).main
    line = argparse_error(main, *argv)
    assert expect in line, line


# ---------------------------------------------------------------- class 3: another task's checkpoint
@pytest.fixture(scope="module")
def foreign(tmp_path_factory):
    """Training checkpoints as each task writes them (config tagged with its task)."""
    root = tmp_path_factory.mktemp("foreign")
    paths = {}
    for task, cfg in (("colorize", {"model": "improved_unet", "img_size": "not-a-number", "net_width": 16}),
                      ("spectral", {"model": "cnn_xattn", "data": "/elsewhere"}),
                      ("phaseformer", {"image_size": 33, "sampling": "sideways", "batch_size": "x"})):
        paths[task] = save_checkpoint(root / task / "last.pt", model=torch.nn.Linear(2, 2),
                                      config={**cfg, "task": task, "seed": 1}, extra={task: {}})
    return paths


@pytest.mark.parametrize("script, held, argv", [
    ("spectral.train", "colorize", ["--resume"]),
    ("colorize.train", "spectral", ["--resume"]),
    ("colorize.train", "phaseformer", ["--resume"]),      # an ArgumentTypeError traceback before
    ("spectral.infer", "colorize", ["--structs", "s.npy", "--weights"]),
    ("colorize.infer", "spectral", ["--input", "IMAGE", "--weights"]),
    ("crbl.infer", "phaseformer", ["IMAGE", "--weights"]),
])
def test_another_tasks_checkpoint_is_named_first(foreign, script, held, argv, tmp_path):
    import importlib
    from PIL import Image
    main = importlib.import_module(script).main
    Image.new("RGB", (32, 32)).save(tmp_path / "x.png")
    argv = [tmp_path / "x.png" if a == "IMAGE" else a for a in argv]
    task = script.split(".")[0]
    msg = user_error(main, *argv, foreign[held], "--out", tmp_path / "out")
    assert msg.startswith(f"{foreign[held]} is a {held} checkpoint; {task} needs "), msg
    assert not (tmp_path / "out").exists()


def test_untagged_checkpoints_are_recognised_by_their_sections():
    assert checkpoint_task({"config": {}, "extra": {"spectral": {"config": {}}, "trainer": {}}}) == "spectral"
    assert checkpoint_task({"config": {"model_type": "crop"}, "extra": {}}) == "crbl"
    assert checkpoint_task({"conv.weight": torch.zeros(1)}) is None      # converted weights: the strict load decides


# ---------------------------------------------------------------- class 4: inputs before the run folder
@pytest.fixture(scope="module")
def lsui(tmp_path_factory):
    from phaseformer.data import make_builtin_dataset
    root = tmp_path_factory.mktemp("lsui")
    make_builtin_dataset(root, n=6, size=48, seed=1)
    return root


@pytest.mark.parametrize("bad", ["random", "foreign"])
def test_phaseformer_init_is_read_before_the_run_folder(lsui, foreign, bad, tmp_path):
    from phaseformer.train import main
    init = tmp_path / "bad.pt"
    init.write_bytes(os.urandom(64))
    if bad == "foreign":
        init = foreign["colorize"]
    out = tmp_path / "run"
    msg = user_error(main, "--data", lsui, "--val-count", 2, "--init", init, "--out", out)
    assert str(init) in msg
    assert not out.exists()          # split.txt was written before --init was read


# ---------------------------------------------------------------- class 7: configs
def test_config_duplicate_keys_and_empty_files_are_refused(tmp_path):
    from spectral.config import load_config
    dup = tmp_path / "dup.yaml"
    dup.write_text("seed: 1\ntraining:\n  lr: 0.001\n  epochs: 3\n  lr: 0.01\n")
    with pytest.raises(UserError, match=r"dup.yaml: key 'lr' appears twice, at line 3 and line 5"):
        load_config(dup)
    from spectral.config import _UniqueKeyLoader   # a merge key's values may be overridden: not a duplicate
    merged = yaml.load("base: &b {lr: 0.001, epochs: 3}\ntraining:\n  <<: *b\n  lr: 0.01\n", Loader=_UniqueKeyLoader)
    assert merged["training"] == {"lr": 0.01, "epochs": 3}
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing here\n")
    with pytest.raises(UserError, match="empty.yaml: the config is empty"):
        load_config(empty)
    big = tmp_path / "big.yaml"
    big.write_text("seed: 1000000000000000000000000\n")
    with pytest.raises(UserError, match=r"seed must be an integer in \[0, 4294967295\]"):
        load_config(big)


def test_the_printed_command_names_the_script_and_torchrun(monkeypatch):
    from common.trainer import resume_command
    monkeypatch.setattr(sys, "argv", ["colorize/train.py", "--seed", "5", "--lr", "0.01"])
    command = shlex.split(resume_command(Path("runs/a b/last.pt")))
    assert command[1:] == ["colorize/train.py", "--resume", "runs/a b/last.pt"]    # the flags come from the checkpoint
    assert resume_command(Path("r/last.pt"), 2) == "torchrun --nproc_per_node 2 colorize/train.py --resume r/last.pt"


# ---------------------------------------------------------------- the dashboard flags (issue 23, point 3)
def test_dashboard_host_is_checked_for_port_0_too(spectral_work, tmp_path):
    """Port 0 skipped the host check: a bad --dashboard-host ended in TensorBoard's own text after
    the run folder was made."""
    from spectral.dashboard import check_port
    from spectral.train import main
    check_port("127.0.0.1", 0)                       # any free port on a good host: accepted
    with pytest.raises(UserError, match=r"--dashboard-host 192.0.2.1: not an address of this machine"):
        check_port("192.0.2.1", 0)                   # TEST-NET-1: no address of this machine
    root, out = spectral_work, tmp_path / "run"
    start = ["--config", root / "tiny.yaml", "--data", root / "raw", "--out", out]
    msg = user_error(main, *start, "--dashboard", 0, "--dashboard-host", "192.0.2.1")
    assert msg.startswith("--dashboard-host 192.0.2.1: ") and not out.exists()
    msg = user_error(main, *start, "--dashboard", 0, "--no-dashboard")
    assert "and --no-dashboard contradict each other" in msg and not out.exists()
