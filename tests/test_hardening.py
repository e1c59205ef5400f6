"""What a hostile new user tried (issue 11): each class of finding, reproduced and checked fixed.

Most checks run the scripts' main() in this process (argument errors, refusals before any work);
the signal and resume checks run real training processes through tests/tiny_train.py.
"""
import argparse
import contextlib
import io
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from common import cli
from common.checkpoint import load_checkpoint, save_checkpoint
from common.io import (UserError, atomic_write_text, check_output_dir, check_output_file, load_image,
                       load_untrusted, make_output_dir, run_cli, set_max_image_pixels)

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "tests" / "tiny_train.py"
FAST = ["--no-progress", "--samples", "64", "--batch-size", "8", "--epochs", "3"]  # 8 steps per epoch


def argparse_error(main, *argv) -> str:
    """The stderr of a script whose arguments are refused; asserts exit status 2 and one line."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as e:
        main([str(a) for a in argv])
    assert e.value.code == 2
    lines = err.getvalue().strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def run_cli_error(main, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        run_cli(main)
    assert e.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def tiny(*args, check=True, **kw):
    res = subprocess.run([sys.executable, str(TINY), *map(str, args)], capture_output=True, text=True,
                         timeout=300, cwd=REPO, **kw)
    if check and res.returncode != 0:
        raise AssertionError(f"tiny_train failed:\n{res.stdout[-2000:]}\n{res.stderr[-2000:]}")
    return res


# ---------------------------------------------------------------- 1. every numeric flag has a range
@pytest.mark.parametrize("argv, flag", [
    (["--model-type", "crop", "--clip-grad", "-1"], "--clip-grad"),    # flipped the gradients before
    (["--model-type", "crop", "--weight-decay", "-0.1"], "--weight-decay"),  # a torch traceback before
    (["--model-type", "crop", "--patience", "0"], "--patience"),        # trained nothing, exit 0 before
    (["--model-type", "crop", "--lr", "nan"], "--lr"),
    (["--model-type", "crop", "--epochs", "0"], "--epochs"),
    (["--model-type", "crop", "--label-smoothing", "1"], "--label-smoothing"),
    (["--model-type", "crop", "--threads", "-2"], "--threads"),
])
def test_crbl_train_flags_out_of_range_are_one_line(argv, flag):
    from crbl.train import parse_args
    line = argparse_error(parse_args, *argv)
    assert line.startswith(f"error: argument {flag}") and "must be" in line


@pytest.mark.parametrize("argv, flag", [
    (["--weights", "x.pt", "--batch-size", "0", "img.png"], "--batch-size"),  # a traceback before
    (["--weights", "x.pt", "--threshold", "inf", "img.png"], "--threshold"),
    (["--combined", "a.pt", "b.pt", "--crop-threshold", "-0.5", "img.png"], "--crop-threshold"),
])
def test_crbl_infer_flags_out_of_range_are_one_line(argv, flag):
    from crbl.infer import main
    assert argparse_error(main, *argv).startswith(f"error: argument {flag}")


@pytest.mark.parametrize("argv, flag", [
    (["--model", "resnet18", "--gamma", "-1"], "--gamma"),
    (["--model", "resnet18", "--rotation", "400"], "--rotation"),
    (["--model", "resnet18", "--finetune-epochs", "-1"], "--finetune-epochs"),
    (["--model", "resnet18", "--image-size", "8"], "--image-size"),
])
def test_battery_flags_out_of_range_are_one_line(argv, flag):
    from battery_ct.train import parse_args
    assert argparse_error(parse_args, *argv).startswith(f"error: argument {flag}")


def test_ranged_types():
    assert cli.float_range(0, 1, hi_open=True)("0.5") == 0.5
    for bad in ("1", "-0.1", "nan", "inf", "x"):
        with pytest.raises(argparse.ArgumentTypeError):
            cli.float_range(0, 1, hi_open=True)(bad)
    assert cli.int_range(1)("3") == 3
    with pytest.raises(argparse.ArgumentTypeError):
        cli.int_range(1)("2.5")


# ---------------------------------------------------------------- 2. one overwrite rule everywhere
def test_fresh_run_refuses_a_folder_with_results_even_without_last_pt(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "best.pt").write_bytes(b"earlier best")
    (out / "log.csv").write_text("epoch\n1\n")
    res = tiny(*FAST, "--out", out, check=False)
    assert res.returncode == 2 and "already holds files" in res.stderr and "--overwrite" in res.stderr
    assert (out / "best.pt").read_bytes() == b"earlier best" and (out / "log.csv").read_text() == "epoch\n1\n"


def test_resume_refuses_to_write_over_another_run(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    tiny(*FAST, "--epochs", 1, "--out", a)
    b.mkdir()
    (b / "last.pt").write_bytes(b"another run's checkpoint")   # prepare_run_dir looks at the files, not inside
    before = (b / "last.pt").read_bytes()
    res = tiny("--no-progress", "--resume", a / "last.pt", "--out", b, check=False)
    assert res.returncode == 2 and "already holds files" in res.stderr
    assert (b / "last.pt").read_bytes() == before


def test_overwrite_replaces_the_earlier_run_only(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    for name in ("best.pt", "epoch_0007.pt", "log.csv"):
        (out / name).write_bytes(b"old")
    (out / "notes.txt").write_text("mine")
    cli.prepare_run_dir(out, resume=None, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == [".unfinished", "notes.txt"]   # the marker: until a checkpoint


@pytest.mark.parametrize("script", ["convert_deeplab", "convert_h5"])
def test_converters_refuse_an_existing_output(tmp_path, script, capsys):
    import importlib
    main = importlib.import_module(f"scripts.{script}").main
    src, dst = tmp_path / "in.bin", tmp_path / "out.pth"
    src.write_bytes(b"whatever")
    dst.write_bytes(b"converted earlier")
    line = run_cli_error(lambda: main([str(src), str(dst)]), capsys)
    assert "already exists" in line and "--overwrite" in line
    assert dst.read_bytes() == b"converted earlier"
    # with --overwrite the output check passes and the (bad) input is what is reported
    line = run_cli_error(lambda: main([str(src), str(dst), "--overwrite"]), capsys)
    assert str(src) in line and dst.read_bytes() == b"converted earlier"


# ---------------------------------------------------------------- 3. a resume is an exact continuation
def _stored_run(tmp_path, **overrides):
    p = cli.ArgumentParser()
    cli.add_common_args(p, epochs=5, batch_size=8, lr=1e-3)
    args = p.parse_args(["--data", str(tmp_path / "data"), "--lr", "0.002", "--seed", "3"])
    for k, v in overrides.items():
        setattr(args, k, v)
    path = tmp_path / "run" / "last.pt"
    save_checkpoint(path, model=torch.nn.Linear(2, 2), config=args)
    return p, path


@pytest.mark.parametrize("flag, value", [("--lr", "0.01"), ("--batch-size", "16"), ("--seed", "4"),
                                         ("--data", "elsewhere"), ("--epochs", "9")])
def test_resume_refuses_changed_flags(tmp_path, flag, value):
    p, path = _stored_run(tmp_path)
    with pytest.raises(UserError) as e:
        cli.parse_args(p, ["--resume", str(path), flag, value])
    assert f"{flag} {value} (the checkpoint has" in str(e.value)


def test_resume_takes_the_stored_values_and_allows_free_flags(tmp_path):
    p, path = _stored_run(tmp_path)
    args = cli.parse_args(p, ["--resume", str(path), "--device", "cpu", "--workers", "0", "--lr", "0.002"])
    assert (args.lr, args.seed, args.batch_size, args.data) == (0.002, 3, 8, tmp_path / "data")
    assert isinstance(args.data, Path) and args.workers == 0


def test_resume_of_an_incomplete_checkpoint_names_the_missing_sections(tmp_path):
    p, path = _stored_run(tmp_path)
    ckpt = torch.load(path, weights_only=True)
    del ckpt["rng"], ckpt["extra"]
    torch.save(ckpt, path)
    with pytest.raises(UserError, match="incomplete training checkpoint: no valid rng, extra"):
        cli.parse_args(p, ["--resume", str(path)])


# ---------------------------------------------------------------- 4. crbl infer trusts the checkpoint's model type
@pytest.fixture(scope="module")
def crbl_checkpoints(tmp_path_factory):
    from crbl.model import build_model
    from crbl.data import make_builtin_dataset
    root = tmp_path_factory.mktemp("crbl")
    make_builtin_dataset(root / "data")
    paths = {}
    for kind in ("crop", "full"):
        paths[kind] = save_checkpoint(root / f"{kind}.pt", model=build_model(kind),
                                      config={"model_type": kind, "task": "crbl"})
    return root, paths


def test_crbl_infer_refuses_weights_of_the_other_model_type(crbl_checkpoints, capsys):
    from crbl.infer import main
    root, ck = crbl_checkpoints
    img = next((root / "data").rglob("*.png"))
    line = run_cli_error(lambda: main(["--model-type", "full", "--weights", str(ck["crop"]), str(img),
                                       "--out", str(root / "p.csv")]), capsys)
    assert "holds a crop model" in line
    line = run_cli_error(lambda: main(["--combined", str(ck["full"]), str(ck["crop"]), str(img),
                                       "--out", str(root / "p.csv")]), capsys)
    assert "holds a full model" in line and "CROP_WEIGHTS" in line
    assert not (root / "p.csv").exists()


def test_crbl_infer_reads_the_model_type_and_labels_like_train(crbl_checkpoints, capsys):
    from crbl.infer import main
    root, ck = crbl_checkpoints
    imgs = sorted((root / "data").rglob("*.png"))[:2]
    csv = root / "labels.csv"
    csv.write_text("image_path,impurity\n" + "".join(f"{p},{v}\n" for p, v in zip(imgs, ("0.0", "1.0"))))
    main(["--weights", str(ck["crop"]), str(csv), "--out", str(root / "p.csv"), "--threads", "1"])
    out = capsys.readouterr().out
    assert "labels found" in out and (root / "p.csv").read_text().count("\n") == 3


# ---------------------------------------------------------------- 5. images, CSV and split files
def test_float_tiff_loads_with_its_values(tmp_path):
    a = np.linspace(0, 1, 64 * 48, dtype=np.float32).reshape(48, 64)
    Image.fromarray(a, mode="F").save(tmp_path / "f.tif")
    got = np.asarray(load_image(tmp_path / "f.tif", "L"))
    assert np.array_equal(got, np.round(a * 255).astype(np.uint8))  # was all black
    Image.fromarray(a * 1000, mode="F").save(tmp_path / "big.tif")
    with pytest.raises(UserError, match="32-bit float image with values in"):
        load_image(tmp_path / "big.tif")


def test_decompression_bomb_is_one_line_with_the_flag_to_raise_it(tmp_path):
    Image.new("L", (100, 100)).save(tmp_path / "big.png")
    try:
        set_max_image_pixels(1000)  # Pillow refuses at twice the limit
        with pytest.raises(UserError, match="--max-image-pixels"):
            load_image(tmp_path / "big.png")
        set_max_image_pixels(0)
        assert load_image(tmp_path / "big.png").size == (100, 100)
    finally:
        set_max_image_pixels(cli.PILLOW_DEFAULT_MAX_PIXELS)


def test_csv_rows_and_split_lines_with_extra_fields_or_nul_bytes_are_refused(tmp_path):
    from battery_ct.data import read_split
    from crbl.data import read_labels
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    (tmp_path / "x.csv").write_text("image_path,impurity\na.png,1,oops\n")
    with pytest.raises(UserError, match=r"x.csv, line 2: 3 fields, but the header has 2"):
        read_labels(tmp_path / "x.csv")
    (tmp_path / "n.csv").write_text("image_path,impurity\na\x00.png,1\n")
    with pytest.raises(UserError, match="NUL byte"):
        read_labels(tmp_path / "n.csv")
    (tmp_path / "s.txt").write_text("a.png\t1\textra\n")
    with pytest.raises(UserError, match="line 1: expected 'path<TAB>label', found 3 tab-separated fields"):
        read_split(tmp_path / "s.txt")
    (tmp_path / "s.txt").write_text("a\x00.png\t1\n")
    with pytest.raises(UserError, match="NUL byte"):
        read_split(tmp_path / "s.txt")


# ---------------------------------------------------------------- 6. output locations, checked before the work
def test_output_locations_are_checked_first(tmp_path, capsys, monkeypatch):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(UserError, match="is a folder"):
        check_output_file(tmp_path, overwrite=True)
    with pytest.raises(UserError, match="not a folder"):
        check_output_file(tmp_path / "afile" / "out.csv", overwrite=False)
    with pytest.raises(UserError, match="exists and is not a folder"):
        check_output_dir(tmp_path / "afile", ["x"], overwrite=False)
    # a read-only folder (checked through os.access: these tests may run as root)
    monkeypatch.setattr(os, "access", lambda p, mode: Path(p) != tmp_path)
    with pytest.raises(UserError, match="no write permission"):
        check_output_file(tmp_path / "new.csv", overwrite=False)


def test_crbl_infer_checks_its_output_before_computing(tmp_path, capsys):
    from crbl.infer import main
    line = run_cli_error(lambda: main(["--weights", "missing.pt", "img.png", "--out", str(tmp_path)]), capsys)
    assert "is a folder" in line  # found before the (missing) weights are even read


def test_os_errors_are_one_line_and_leave_no_empty_folders(tmp_path, capsys):
    def main():
        make_output_dir(tmp_path / "a" / "b")
        raise OSError(28, "No space left on device", str(tmp_path / "a" / "b" / "best.pt"))
    line = run_cli_error(main, capsys)
    assert line == (f"error: {tmp_path / 'a' / 'b' / 'best.pt'}: No space left on device; free space on the disk that "
                    f"holds {tmp_path / 'a' / 'b'}, or write the outputs somewhere else")
    assert not (tmp_path / "a").exists()


# ---------------------------------------------------------------- 7. written files respect the umask
@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_atomic_writes_respect_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        atomic_write_text(tmp_path / "f.txt", "x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "f.txt").stat().st_mode) == mode  # mkstemp alone gives 0600


# ---------------------------------------------------------------- 8. temp files of interrupted writes
def test_stale_temp_files_are_removed_when_a_run_starts_or_resumes(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    stale = out / ".last.pt.abc_1234.tmp"
    stale.write_bytes(b"half a checkpoint")
    keep = out / ".hidden.tmp"
    keep.write_text("not ours")
    cli.prepare_run_dir(out, resume=out / "last.pt", overwrite=False)
    assert not stale.exists() and keep.exists()


# ---------------------------------------------------------------- 9. messages
def test_checkpoint_messages_say_what_the_file_is(tmp_path):
    (tmp_path / "r.pt").write_bytes(os.urandom(256))
    (tmp_path / "t.pt").write_text("epoch,loss\n1,0.5\n")
    with pytest.raises(UserError, match=r"not a PyTorch checkpoint \(binary data"):
        load_untrusted(tmp_path / "r.pt")
    with pytest.raises(UserError, match=r"not a PyTorch checkpoint \(a text file"):
        load_untrusted(tmp_path / "t.pt")


def test_messages_are_one_line_without_terminal_escapes(capsys):
    def main():
        raise UserError("\x1b[31mred\x1b[0m path\nsecond line")
    assert run_cli_error(main, capsys) == "error: red path; second line"


def test_resume_does_not_claim_random_backbones(capsys):
    from crbl.train import load_init_weights
    load_init_weights(None, argparse.Namespace(init=None, backbone_weights=None, resume=Path("x/last.pt")))
    assert "random weights" not in capsys.readouterr().out


# ---------------------------------------------------------------- 10. threads; Ctrl-C saves a resumable checkpoint
# workers=0: slow (14 s); test_colorize_train checks the same Ctrl-C mid-epoch resume with 0 workers
@pytest.mark.parametrize("workers", [pytest.param(0, marks=pytest.mark.slow), 2])
def test_ctrl_c_saves_mid_epoch_and_resume_is_bit_identical(tmp_path, workers):
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    tiny(*FAST, "--workers", workers, "--out", ref, "--threads", 1)
    # a new process group, as a terminal gives: Ctrl-C reaches the DataLoader workers too
    proc = subprocess.Popen([sys.executable, str(TINY), *FAST, "--workers", str(workers), "--out", str(cut),
                             "--threads", "1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=REPO, start_new_session=True)
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if line.strip() == "STEP 3":  # inside the first epoch: the original saved nothing here
            os.killpg(proc.pid, signal.SIGINT)
            break
    out, err = proc.communicate(timeout=120)
    assert "threads: 1 (--threads" in "".join(seen)  # --threads is applied and printed
    assert proc.returncode == 130, err
    assert "resumable checkpoint" in err
    mid = load_checkpoint(cut / "last.pt")
    assert mid["epoch"] == 0 and mid["extra"]["trainer"]["mid_epoch"]["batch"] >= 3
    res = tiny(*FAST, "--workers", workers, "--out", cut, "--resume", cut / "last.pt", "--threads", 1)
    assert "re-reading the" in res.stdout
    a, b = load_checkpoint(ref / "last.pt"), load_checkpoint(cut / "last.pt")
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert a["extra"]["trainer"]["history"][0]["train_loss"] == pytest.approx(
        b["extra"]["trainer"]["history"][0]["train_loss"], rel=1e-12)


def test_auto_threads_leaves_busy_cores_alone(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert cli.auto_threads(0, lambda cpus: 1 / 0) == (torch.get_num_threads(), "OMP_NUM_THREADS")  # not sampled
    monkeypatch.delenv("OMP_NUM_THREADS")
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        def fake(busy):  # jiffies: 100 elapsed per CPU; `busy` of them spent by other programs
            samples = iter([{0: (0, 0), 1: (0, 0)}, {c: (100, 100 - busy[c]) for c in (0, 1)}])
            return lambda cpus: next(samples)
        assert cli.auto_threads(0, fake({0: 3, 1: 5}))[0] == 2          # idle machine: all cores
        n, why = cli.auto_threads(0, fake({0: 97, 1: 10}))               # one core kept busy
        assert n == 1 and "1 of 2 cores busy" in why
        assert cli.auto_threads(0, fake({0: 100, 1: 100}))[0] == 1       # never fewer than one
    finally:
        torch.set_num_threads(old)


_REUSE = """
import resource, sys, torch
from common.device import reuse_freed_memory
print(reuse_freed_memory())
def step(i):   # activations above glibc's largest mmap threshold (32 MB), written to the last page
    for mb in (40 if i % 3 else 24, 36):
        torch.empty(mb << 20, dtype=torch.uint8).fill_(1)
for i in range(10):
    step(i)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for i in range(10, 15):
    step(i)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_reuse_freed_memory_reuses_large_blocks_instead_of_faulting_in_new_pages(tmp_path, monkeypatch):
    """reuse_freed_memory: after a few steps, steps that allocate 24-40 MB blocks cost no page
    faults, where glibc's default maps fresh pages for every block (~90,000 faults in five steps).
    A MALLOC_* setting of the user's is left alone. The scripts measured faster with it (spectral
    train / infer, CRBL infer) opt in; the others keep malloc's defaults (colorize at 512x512 peaked
    1.5 GiB higher with it)."""
    def run(**env):
        clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
        res = subprocess.run([sys.executable, "-c", _REUSE], capture_output=True, text=True, timeout=120, cwd=REPO,
                             env={**clean, "PYTHONPATH": str(REPO), **env})
        assert res.returncode == 0, res.stderr[-2000:]
        applied, faults = res.stdout.split()
        return applied == "True", int(faults)

    applied, faults = run()
    assert applied and faults < 2_000, faults
    applied, faults = run(MALLOC_ARENA_MAX="2")           # the user's own malloc tuning: untouched
    assert not applied and faults > 5 * (60 << 20) // 4096, faults

    class Called(Exception):
        pass

    def record():
        raise Called

    monkeypatch.setattr(cli, "reuse_freed_memory", record)
    cli.apply_runtime_args(argparse.Namespace())                      # the default: malloc untouched
    with pytest.raises(Called):
        cli.apply_runtime_args(argparse.Namespace(), reuse_memory=True)
    from crbl.infer import main as crbl_infer
    from spectral.infer import main as spectral_infer
    from spectral.train import main as spectral_train
    from phaseformer.train import main as phaseformer_train
    for main, argv in ((crbl_infer, ["img.png", "--weights", "w.pt"]),
                       (spectral_infer, ["--weights", "w.pt", "--structs", "s.npy"]),
                       (spectral_train, ["--out", str(tmp_path / "run"), "--epochs", "1"]),
                       (phaseformer_train, ["--out", str(tmp_path / "run"), "--epochs", "1"])):
        with pytest.raises(Called):
            main(argv)
    assert not (tmp_path / "run").exists()


def test_a_resume_keeps_the_runs_thread_count_and_save_every(tmp_path):
    p, path = _stored_run(tmp_path, threads=1, save_every=5)
    args = cli.parse_args(p, ["--resume", str(path)])
    assert (args.threads, args.save_every) == (1, 5)
    assert cli.parse_args(p, ["--resume", str(path), "--threads", "2"]).threads == 2  # free to change
