"""Issue 21, classes 1, 5 and 6: what a hostile new user broke in the scripts' file handling.

1. an output that is one of the inputs (any spelling: ./, .., a symlink, a hard link) is refused
   before any work, even with --overwrite, and the input is left as it was;
2. every script reads checkpoints through one loader (common.io.load_untrusted) and says the same
   one line for the same bad file, never torch's advice to load unsafely nor its warnings;
3. a full disk or a read-only folder names the file being written and what to do.

All run the scripts' main() in this process: each refusal comes before any model is built or run.
"""
from __future__ import annotations

import argparse
import errno
import importlib
import os
import pickle
import re
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import helpers
from common import io as cio
from common.io import RefusedContent, UserError, load_untrusted

PNG = np.zeros((64, 64, 3), np.uint8)


def main_of(module: str):
    return importlib.import_module(module).main


def refused(capsys, module: str, *argv) -> str:
    return helpers.cli_error(main_of(module), *argv, capsys=capsys)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def images(folder: Path, n: int = 2) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(PNG + i).save(folder / f"im{i}.png")
    return folder


# ---------------------------------------------------------------- 1. an output never replaces an input
def test_spectral_output_that_is_an_input_is_refused_in_every_spelling(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    np.save("S.npy", np.zeros((2, 1, 8, 8), np.float32))
    Path("w.pt").write_bytes(b"a 106 MB checkpoint")
    os.symlink("S.npy", "link.npy")
    os.link("S.npy", "hard.npy")
    Path("sub").mkdir()
    before = snapshot(tmp_path)
    base = ["--weights", "w.pt", "--structs", "S.npy", "--overwrite"]
    for argv, expected in [
            (["--out", "S.npy"], "--out S.npy is the input S.npy (--structs); choose another path"),
            (["--out", "./sub/../S.npy"], "--out sub/../S.npy is the input S.npy (--structs)"),
            (["--out", "link.npy"], "--out link.npy is the input S.npy (--structs)"),
            (["--out", "hard.npy"], "--out hard.npy is the input S.npy (--structs)"),
            (["--out", str(tmp_path / "S.npy")], "is the input S.npy (--structs)"),
            (["--out", "w.pt"], "--out w.pt is the input w.pt (--weights)"),
            (["--out", "p.npy", "--csv", "S.npy"], "--csv S.npy is the input S.npy (--structs)"),
            (["--out", "p.npy", "--csv", "./p.npy"], "--csv p.npy is also --out p.npy"),
            (["--out", "p.npy", "--evaluate", "S.npy", "--metrics", "hard.npy"], "--metrics hard.npy is the input"),
            (["--out", "p.npy", "--plot", "."], "--plot . holds the input")]:
        line = refused(capsys, "spectral.infer", *base, *argv)
        assert expected in line, line
    assert snapshot(tmp_path) == before  # nothing replaced, nothing written


@pytest.mark.parametrize("spelling", ["same", "symlink"])
def test_restoration_into_its_own_input_folder_is_refused(tmp_path, capsys, spelling):
    """colorize --input DIR --out DIR and phaseformer DIR --out DIR replaced every input image."""
    src = images(tmp_path / "in")
    out = src if spelling == "same" else tmp_path / "alias"
    if spelling == "symlink":
        out.symlink_to(src, target_is_directory=True)
    (tmp_path / "w.pt").write_bytes(b"weights")
    before = snapshot(src)
    line = refused(capsys, "colorize.infer", "--weights", tmp_path / "w.pt", "--input", src, "--out", out,
                   "--overwrite")
    assert line.startswith(f"error: --out {out} ") and "(--input); choose another folder" in line, line
    line = refused(capsys, "phaseformer.infer", src, "--weights", tmp_path / "w.pt", "--out", out, "--overwrite")
    assert line.startswith(f"error: --out {out} ") and "(inputs); choose another folder" in line, line
    line = refused(capsys, "battery_ct.infer", "--weights", tmp_path / "w.pt", "--images", src, "--out", out,
                   "--overwrite")
    assert line.startswith(f"error: --out {out} ") and "(--images)" in line, line
    assert snapshot(src) == before


def test_a_csv_of_inputs_is_not_an_output(tmp_path, capsys):
    """crbl: --out names the CSV the images were listed in, or one of the images."""
    images(tmp_path)
    (tmp_path / "w.pt").write_bytes(b"weights")
    line = refused(capsys, "crbl.infer", "--weights", tmp_path / "w.pt", "--model-type", "crop",
                   tmp_path / "im0.png", "--out", tmp_path / "im0.png", "--overwrite")
    assert "is the input" in line and "(inputs)" in line
    assert Image.open(tmp_path / "im0.png").size == (64, 64)


def test_export_and_converters_never_write_over_their_input(tmp_path, capsys):
    best = tmp_path / "best.pt"
    best.write_bytes(b"the checkpoint")
    os.link(best, tmp_path / "same.pt")
    line = refused(capsys, "scripts.export_onnx", "--task", "spectral", "--weights", best, "--out", best, "--overwrite")
    assert line == f"error: --out {best} is the input {best} (--weights); choose another path"
    for script in ("convert_deeplab", "convert_phaseformer", "convert_h5"):
        line = refused(capsys, f"scripts.{script}", best, tmp_path / "same.pt", "--overwrite")
        assert line == f"error: OUT {tmp_path / 'same.pt'} is the input {best} (IN); choose another path", line
    assert best.read_bytes() == b"the checkpoint"
    line = refused(capsys, "scripts.convert_phaseformer", best, os.devnull, "--overwrite")
    assert line == f"error: OUT {os.devnull}: is not a regular file (a device or a pipe); choose a file name"


def test_evaluate_and_splits_may_write_next_to_their_inputs_but_not_over_them(tmp_path, capsys):
    pred, gt = images(tmp_path / "pred"), images(tmp_path / "gt")
    (pred / "scores.csv").write_text("an earlier evaluation")
    before = snapshot(pred)
    helpers.call(main_of("colorize.evaluate"), "--pred", pred, "--gt", gt, "--inputs", gt, "--out", pred,
                 "--overwrite")
    assert (pred / "scores.json").is_file() and (pred / "scores.csv").read_text().startswith("name")
    assert {k: v for k, v in snapshot(pred).items() if k.endswith(".png")} == \
        {k: v for k, v in before.items() if k.endswith(".png")}
    labels = tmp_path / "splits" / "train.txt"
    labels.parent.mkdir()
    labels.write_text("a.png\t0\n")
    line = refused(capsys, "battery_ct.make_splits", "--labels", labels, "--out", labels.parent, "--overwrite")
    assert line == f"error: --out {labels.parent} would write over the input {labels} (--labels); choose another folder"
    assert labels.read_text() == "a.png\t0\n"


def test_a_training_run_folder_never_holds_its_inputs(tmp_path, capsys):
    """--overwrite clears the run folder: before, `--init RUN/best.pt --out RUN --overwrite` deleted
    the weights it was about to start from, then failed on the missing file."""
    run = tmp_path / "run"
    run.mkdir()
    torch.save({"w": torch.zeros(1)}, run / "best.pt")
    before = snapshot(run)
    line = refused(capsys, "crbl.train", "--model-type", "crop", "--init", run / "best.pt", "--out", run, "--overwrite")
    assert line == f"error: --out {run} holds the input {run / 'best.pt'} (--init); choose another folder"
    data = tmp_path / "data"
    images(data / "input"), images(data / "GT")
    line = refused(capsys, "phaseformer.train", "--data", data, "--out", tmp_path, "--overwrite")
    assert line == f"error: --out {tmp_path} contains the input folder {data} (--data); choose another folder"
    # a run folder inside the data: new or an earlier run is fine; the images' own folder is not
    # (before, --overwrite wrote best.pt, loss_curve.png ... among the training images)
    line = refused(capsys, "phaseformer.train", "--data", data, "--out", data / "input" / ".." / "input", "--overwrite")
    assert line == (f"error: --out {data / 'input' / '..' / 'input'} is inside the input folder {data} (--data) and "
                    f"holds files that are not a run (im0.png, im1.png); choose another folder")
    (data / "runs" / "old").mkdir(parents=True)
    (data / "runs" / "old" / "log.csv").write_text("epoch\n")
    for out in (data / "runs" / "new", data / "runs" / "old"):
        cio.refuse_run_over_inputs(out, argparse.Namespace(data=data, out=out, resume=None))
    os.symlink(run / "best.pt", tmp_path / "link.pt")
    line = refused(capsys, "crbl.train", "--model-type", "crop", "--init", tmp_path / "link.pt", "--out", run,
                   "--overwrite")
    assert line == f"error: --out {run} holds the input {tmp_path / 'link.pt'} (--init); choose another folder"
    assert snapshot(run) == before


# ---------------------------------------------------------------- 2. one loader, one message per kind of file
class _System:
    def __reduce__(self):
        return (os.system, ("true",))


def bad_files(folder: Path) -> dict[str, tuple[Path, str]]:
    """name -> (file, the message after '<file>: ')."""
    folder.mkdir()
    files = {
        "random bytes": (os.urandom(4096), r"not a PyTorch checkpoint \(binary data, neither a zip archive nor a pickle\)"),
        "protocol 0 pickle": (pickle.dumps({"a": 1}, protocol=0),
                              r"not a PyTorch checkpoint \(a plain Python pickle of protocol 0, not torch.save's format\)"),
        "protocol 4 pickle": (pickle.dumps({"a": 1}, protocol=4),
                              r"not a PyTorch checkpoint \(a plain Python pickle of protocol 4, not torch.save's format\)"),
        "pickled os.system": (pickle.dumps(_System(), protocol=4),
                              r"refused to load: a plain Python pickle \(not a PyTorch checkpoint\) that names the global "
                              r"posix.system \(os.system\); nothing from the file was run"),
        "text": (b"epoch,loss\n1,0.5\n", r"not a PyTorch checkpoint \(a text file, neither a zip archive nor a pickle\)"),
        "empty": (b"", "file is empty"),
        "foreign zip": (None, r"not a PyTorch checkpoint \(a zip archive without the data.pkl of torch.save\)"),
    }
    out = {}
    for name, (data, message) in files.items():
        path = folder / (name.replace(" ", "_").replace(".", "_") + ".pt")
        if data is None:
            with zipfile.ZipFile(path, "w") as z:
                z.writestr("notes.txt", "hello")
        else:
            path.write_bytes(data)
        out[name] = (path, message)
    torch.save({"model": {"w": torch.zeros(1)}, "x": _System()}, folder / "evil.pt")
    out["checkpoint naming os.system"] = (folder / "evil.pt", r"refused to load: the file names the global "
                                          r"posix.system \(os.system\), which a checkpoint of tensors and plain data "
                                          r"never holds; nothing from the file was run")
    torch.save({"w": torch.zeros(1)}, folder / "legacy4.pt", _use_new_zipfile_serialization=False, pickle_protocol=4)
    out["legacy protocol 4"] = (folder / "legacy4.pt", r"refused to load: the file uses the pickle instruction FRAME")
    (folder / "a_folder.pt").mkdir()
    out["folder"] = (folder / "a_folder.pt", "is a folder, expected a checkpoint file")
    out["missing"] = (folder / "missing.pt", "checkpoint file not found")
    return out


BAD_ADVICE = re.compile(r"weights_only|Re-running|will likely succeed|\(\d+\)|Unsupported operand|enforce fail")


def test_the_loader_says_what_each_bad_file_is(tmp_path, capsys):
    for name, (path, message) in bad_files(tmp_path / "bad").items():
        with pytest.raises(UserError) as e:
            load_untrusted(path)
        text = str(e.value)
        assert re.fullmatch(re.escape(str(path)) + ": " + message + ".*", text), (name, text)
        assert not BAD_ADVICE.search(text) and "\n" not in text, (name, text)
        assert isinstance(e.value, RefusedContent) == ("refused" in message), name
    assert capsys.readouterr().err == ""  # torch's protocol warnings stay inside


def test_every_script_gives_the_same_line_for_the_same_bad_file(tmp_path, capsys):
    src = images(tmp_path / "imgs", 1)
    np.save(tmp_path / "S.npy", np.zeros((1, 1, 8, 8), np.float32))
    scripts = {
        "spectral.infer": lambda w: ["--weights", w, "--structs", tmp_path / "S.npy", "--out", tmp_path / "p.npy"],
        "colorize.infer": lambda w: ["--weights", w, "--input", src, "--out", tmp_path / "c"],
        "phaseformer.infer": lambda w: [src / "im0.png", "--weights", w, "--out", tmp_path / "r"],
        "scripts.export_onnx": lambda w: ["--task", "colorize", "--weights", w, "--out", tmp_path / "x.onnx"],
        "scripts.convert_phaseformer": lambda w: [w, tmp_path / "out.pth"],
    }
    for name, (path, message) in bad_files(tmp_path / "bad").items():
        lines = {script: refused(capsys, script, *argv(path)) for script, argv in scripts.items()}
        # phaseformer's allow-list reader has the last word on torch files the shared loader refuses
        if name == "checkpoint naming os.system":
            assert "names the global posix.system (os.system), which no Phaseformer or Spectroformer checkpoint holds; nothing from " \
                   "the file was run" in lines.pop("phaseformer.infer") == lines.pop("scripts.convert_phaseformer")
        if name == "legacy protocol 4":  # harmless: it reads the tensors, which are not a Phaseformer's
            assert "not Phaseformer (model_with_eca.Restormer) weights" in lines.pop("phaseformer.infer") == lines.pop("scripts.convert_phaseformer")
        assert len(set(lines.values())) == 1, (name, lines)
        for script, line in lines.items():
            assert re.match("error: " + re.escape(str(path)) + ": " + message, line), (script, name, line)
            assert not BAD_ADVICE.search(line), (script, line)
    assert not any(tmp_path.glob("*.onnx")) and not (tmp_path / "out.pth").exists()


def test_a_folder_or_a_missing_file_reads_the_same_for_resume_and_init(tmp_path, capsys):
    (tmp_path / "dir.pt").mkdir()
    data = tmp_path / "data"
    images(data / "input"), images(data / "GT")
    for script, argv in (("colorize.train", ["--resume"]), ("spectral.train", ["--resume"]),
                         ("phaseformer.train", ["--data", data, "--init"]),
                         ("battery_ct.train", ["--model", "resnet18", "--init"])):
        line = refused(capsys, script, *argv, tmp_path / "dir.pt", "--out", tmp_path / "run")
        assert line.startswith(f"error: {tmp_path / 'dir.pt'}: is a folder, expected a "), (script, line)
        line = refused(capsys, script, *argv, tmp_path / "nothing.pt", "--out", tmp_path / "run")
        assert line.startswith(f"error: {tmp_path / 'nothing.pt'}: ") and "not found" in line, (script, line)
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------- 3. a full disk names the file
class _FullDisk:
    """A file whose writes fail as on a full disk (or a read-only file system)."""

    def __init__(self, f, code):
        self.f, self.code = f, code

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()

    def write(self, data):
        raise OSError(self.code, os.strerror(self.code))

    def __getattr__(self, name):
        return getattr(self.f, name)


@pytest.fixture
def full_disk(monkeypatch):
    def make(code=errno.ENOSPC):
        real = os.fdopen
        monkeypatch.setattr(cio.os, "fdopen", lambda fd, mode="r", *a, **k: _FullDisk(real(fd, mode, *a, **k), code))
    return make


def test_a_full_disk_names_the_file_and_what_to_do(tmp_path, capsys, full_disk):
    pred, gt = images(tmp_path / "pred"), images(tmp_path / "gt")
    full_disk(errno.ENOSPC)
    out = tmp_path / "scores"
    line = refused(capsys, "colorize.evaluate", "--pred", pred, "--gt", gt, "--inputs", gt, "--out", out)
    assert line == (f"error: {out / 'scores.csv'}: No space left on device; free space on the disk that holds {out}, "
                    f"or write the outputs somewhere else")
    classes = tmp_path / "classes"
    for label in ("cell_normal", "cell_porosity"):
        for i, p in enumerate(sorted(images(classes / label, 3).glob("*.png"))):
            p.rename(p.with_name(f"CT_cell_p{label[5]}_{i:03d}_x_0001.png"))
    full_disk(errno.EROFS)
    line = refused(capsys, "battery_ct.make_splits", "--images", classes, "--out", tmp_path / "splits")
    assert re.fullmatch(rf"error: {re.escape(str(tmp_path / 'splits'))}/\w+\.txt: Read-only file system; "
                        rf"{re.escape(str(tmp_path / 'splits'))} is on a read-only file system: write the outputs "
                        r"somewhere else", line), line
    assert not list(tmp_path.rglob("*.tmp")) and not list(tmp_path.rglob(".*.tmp"))
    assert not out.exists()  # the folder this run created is removed again


def test_writers_name_their_file_when_the_disk_is_full(tmp_path, full_disk):
    full_disk()
    for write in (lambda p: cio.save_image(p, PNG), lambda p: cio.atomic_torch_save({"w": torch.zeros(1)}, p),
                  lambda p: cio.atomic_write_text(p, "x")):
        with pytest.raises(OSError) as e:
            write(tmp_path / "f.out")
        assert e.value.errno == errno.ENOSPC and e.value.filename == str(tmp_path / "f.out")
        assert cio.os_message(e.value).startswith(f"{tmp_path / 'f.out'}: No space left on device; free space on the disk "
                                                  f"that holds {tmp_path}")
    assert list(tmp_path.iterdir()) == []


def test_a_read_only_output_folder_is_named_before_any_work(tmp_path, capsys, monkeypatch):
    class ReadOnly:
        f_flag = os.ST_RDONLY
    ro = tmp_path / "ro"
    ro.mkdir()
    np.save(tmp_path / "S.npy", np.zeros((1, 1, 8, 8), np.float32))
    monkeypatch.setattr(os, "access", lambda p, mode: Path(p) != ro)   # as on a read-only mount, as root too
    monkeypatch.setattr(os, "statvfs", lambda p: ReadOnly())
    line = refused(capsys, "spectral.infer", "--weights", "w.pt", "--structs", tmp_path / "S.npy",
                   "--out", ro / "sub" / "p.npy")
    assert line == (f"error: --out {ro / 'sub' / 'p.npy'}: cannot be created: {ro} is on a read-only "
                    f"file system; choose another location")


def test_a_dashboard_host_that_is_not_this_machine_names_the_flag():
    from spectral.dashboard import check_port
    with pytest.raises(UserError) as e:
        check_port("203.0.113.1", 8600)  # TEST-NET-3: never an address of this machine
    assert str(e.value).startswith("--dashboard-host 203.0.113.1: not an address of this machine ("), str(e.value)
