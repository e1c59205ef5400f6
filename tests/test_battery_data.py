"""battery_ct.data and battery_ct/make_splits.py: split files, filename metadata, battery-grouped splits."""
from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from battery_ct.data import SplitDataset, metadata, parse_name, read_split
from battery_ct.make_splits import main as make_splits
from common.io import UserError, run_cli

REPO = Path(__file__).resolve().parents[1]
RATIOS = (0.70, 0.15)


def _jpg(path: Path, value: int = 128) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(path)
    return path


BATTERIES = {0: 10, 1: 7, 2: 10, 3: 4, 4: 3}  # majority class -> number of batteries


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    """images/ with 3 slices per battery (x slice labelled normal even in defective batteries, as in the
    real data) and all.txt listing them with relative paths."""
    root = tmp_path_factory.mktemp("labelled")
    lines, truth = [], {}
    for label, n in BATTERIES.items():
        kind, package = ("cell", "pouch") if label < 2 else ("module", "prismatic")
        normal = 0 if kind == "cell" else 2
        for b in range(n):
            bid = f"{kind}_{package}_{label}{b:02d}"
            truth[bid] = label
            for axis, y in (("x", normal), ("y", label), ("z", label)):
                rel = f"images/CT_{bid}_{axis}_1{b}.jpg"
                _jpg(root / rel)
                lines.append(f"{rel}\t{y}")
    (root / "all.txt").write_text("\n".join(lines) + "\n")
    return root, truth


def _read(out: Path) -> dict[str, list[tuple[Path, int]]]:
    return {s: read_split(out / f"{s}.txt") for s in ("train", "val", "test")}


def test_make_splits_groups_by_battery_with_per_class_floors(labelled, tmp_path, capsys):
    root, truth = labelled
    make_splits(["--labels", str(root / "all.txt"), "--out", str(tmp_path / "s")])
    assert "no battery is in two splits (checked)" in capsys.readouterr().out
    splits = _read(tmp_path / "s")
    owner = {}
    for name, items in splits.items():
        for path, _ in items:
            bid = parse_name(path)["battery_id"]
            assert owner.setdefault(bid, name) == name, f"{bid} in {owner[bid]} and {name}"
    # every image exactly once, with its label
    all_items = read_split(root / "all.txt")
    got = sorted((p.resolve(), y) for items in splits.values() for p, y in items)
    assert got == sorted((p.resolve(), y) for p, y in all_items)
    # per majority class: int(0.7 n) / int(0.15 n) batteries, the remainder in test
    per = defaultdict(Counter)
    for bid, name in owner.items():
        per[truth[bid]][name] += 1
    for label, n in BATTERIES.items():
        want = {"train": int(n * RATIOS[0]), "val": int(n * RATIOS[1])}
        want["test"] = n - want["train"] - want["val"]
        assert {k: per[label][k] for k in want} == want, label


def test_make_splits_is_deterministic_per_seed(labelled, tmp_path, capsys):
    root, _ = labelled
    texts = {}
    for name, seed in (("a", 42), ("b", 42), ("c", 7)):
        make_splits(["--labels", str(root / "all.txt"), "--out", str(tmp_path / name), "--seed", str(seed)])
        texts[name] = [(tmp_path / name / f"{s}.txt").read_text() for s in ("train", "val", "test")]
    capsys.readouterr()
    assert texts["a"] == texts["b"]
    assert texts["a"] != texts["c"]


def test_make_splits_refuses_to_overwrite(labelled, tmp_path, capsys):
    root, _ = labelled
    out = tmp_path / "s"
    out.mkdir()
    (out / "val.txt").write_text("keep me\n")
    with pytest.raises(UserError, match="val.txt already exists"):
        make_splits(["--labels", str(root / "all.txt"), "--out", str(out)])
    assert (out / "val.txt").read_text() == "keep me\n" and not (out / "train.txt").exists()
    make_splits(["--labels", str(root / "all.txt"), "--out", str(out), "--overwrite"])
    assert len(read_split(out / "val.txt")) > 0


def test_make_splits_from_class_folders(tmp_path, capsys):
    for label, name in enumerate(("cell_normal", "cell_porosity")):
        for b in range(7):  # 7 batteries per class: 4 / 1 / 2
            _jpg(tmp_path / "in" / name / f"CT_cell_pouch_{label}{b}_y_1.jpg")
    make_splits(["--images", str(tmp_path / "in"), "--out", str(tmp_path / "s")])
    splits = _read(tmp_path / "s")
    assert [len(splits[s]) for s in ("train", "val", "test")] == [8, 2, 4]
    assert {y for v in splits.values() for _, y in v} == {0, 1}
    assert all(p.is_file() for v in splits.values() for p, _ in v)


def test_make_splits_warns_about_an_empty_split(tmp_path, capsys):
    for b in range(4):  # int(4 * 0.15) = 0 batteries for val
        _jpg(tmp_path / "in" / "cell_normal" / f"CT_cell_pouch_{b}_y_1.jpg")
    make_splits(["--images", str(tmp_path / "in"), "--out", str(tmp_path / "s")])
    assert "warning: val split is empty" in capsys.readouterr().out
    assert (tmp_path / "s" / "val.txt").is_file()


BAD_LINES = [
    ("images/CT_cell_pouch_000_x_1.jpg 0", "line 2: expected 'path<TAB>label', found no tab"),
    ("images/CT_cell_pouch_000_x_1.jpg\t7", "line 2: label 7 out of range 0..4"),
    ("images/CT_cell_pouch_000_x_1.jpg\tone", "line 2: label 'one' is neither a class index nor one of cell_normal, "),
    ("images/missing.jpg\t0", "line 2: image not found"),
]


def _bad_labels(tmp_path: Path, line: str) -> Path:
    good = _jpg(tmp_path / "images" / "CT_cell_pouch_000_y_1.jpg")
    _jpg(tmp_path / "images" / "CT_cell_pouch_000_x_1.jpg")
    labels = tmp_path / "all.txt"
    labels.write_text(f"{good.relative_to(tmp_path)}\t0\n{line}\n")
    return labels


@pytest.mark.parametrize("line, expect", BAD_LINES)
def test_make_splits_bad_lines_one_error_line(tmp_path, capsys, line, expect):
    labels = _bad_labels(tmp_path, line)
    with pytest.raises(SystemExit) as e:
        run_cli(lambda: make_splits(["--labels", str(labels), "--out", str(tmp_path / "out")]))
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code != 0 and len(err) == 1, err
    assert err[0].startswith(f"error: {labels}, ") and expect in err[0]
    assert not (tmp_path / "out").exists()


def test_make_splits_bad_line_as_a_process(tmp_path):
    labels = _bad_labels(tmp_path, BAD_LINES[0][0])
    res = subprocess.run([sys.executable, str(REPO / "battery_ct" / "make_splits.py"), "--labels", str(labels),
                          "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    lines = res.stderr.strip().splitlines()
    assert res.returncode != 0 and len(lines) == 1, res.stderr
    assert lines[0] == f"error: {labels}, {BAD_LINES[0][1]}"
    assert not (tmp_path / "out").exists()


def test_make_splits_needs_battery_names(tmp_path):
    _jpg(tmp_path / "images" / "scan_01.jpg")
    (tmp_path / "all.txt").write_text("images/scan_01.jpg\t0\n")
    with pytest.raises(UserError, match="scan_01.jpg: cannot tell its battery"):
        make_splits(["--labels", str(tmp_path / "all.txt"), "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- split files, metadata, dataset
def test_read_split_relative_to_file_or_root(tmp_path):
    img = _jpg(tmp_path / "data" / "images" / "CT_module_prismatic_7_z_3.jpg")
    (tmp_path / "data" / "s.txt").write_text("images/CT_module_prismatic_7_z_3.jpg\t3\n\n")
    assert read_split(tmp_path / "data" / "s.txt") == [(img, 3)]
    (tmp_path / "elsewhere.txt").write_text("images/CT_module_prismatic_7_z_3.jpg\t3\n")
    assert read_split(tmp_path / "elsewhere.txt", root=tmp_path / "data") == [(img, 3)]
    with pytest.raises(UserError, match=r"elsewhere.txt, line 1: image not found"):
        read_split(tmp_path / "elsewhere.txt")
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(UserError, match="empty.txt: no samples"):
        read_split(tmp_path / "empty.txt")


def test_read_split_takes_windows_files_and_class_names(tmp_path):
    img = _jpg(tmp_path / "images" / "CT_module_prismatic_7_z_3.jpg")
    other = _jpg(tmp_path / "images" / "CT_cell_pouch_2_x_1.jpg")
    # Notepad: byte-order mark and CRLF; a class name instead of its index
    (tmp_path / "s.txt").write_bytes("images/CT_module_prismatic_7_z_3.jpg\t3\r\n"
                                     "images/CT_cell_pouch_2_x_1.jpg\tcell_porosity\r\n\r\n".encode("utf-8-sig"))
    assert read_split(tmp_path / "s.txt") == [(img, 3), (other, 1)]
    (tmp_path / "latin1.txt").write_bytes("images/caf\xe9.jpg\t0\n".encode("latin-1"))
    with pytest.raises(UserError, match=r"latin1.txt: not a UTF-8 text file"):
        read_split(tmp_path / "latin1.txt")


@pytest.mark.parametrize("name, meta", [
    ("CT_cell_pouch_102_x_141.jpg", {"battery_type": 0, "axis": 0, "battery_id": "cell_pouch_102"}),
    ("CT_module_prismatic_0136_y_7.png", {"battery_type": 1, "axis": 1, "battery_id": "module_prismatic_0136"}),
    ("CT_module_cylindrical_9_z_0.jpg", {"battery_type": 1, "axis": 2, "battery_id": "module_cylindrical_9"}),
    ("RGB_cell_pouch_102_141.png", None),
    ("CT_cell_pouch_102_w_141.jpg", None),
])
def test_filename_metadata(name, meta):
    assert parse_name(name) == meta
    if meta is None:
        with pytest.raises(UserError, match="file name does not follow"):
            metadata(Path(name))
    else:
        assert metadata(Path(name)).tolist() == [meta["battery_type"], meta["axis"]]


def test_dataset_items_and_normalisation(tmp_path):
    a = _jpg(tmp_path / "CT_module_prismatic_1_z_1.jpg", 255)
    b = _jpg(tmp_path / "CT_cell_pouch_2_y_1.jpg", 0)
    ds = SplitDataset([(a, 4), (b, 1)], image_size=16, with_meta=True, normalize="tanh")
    x, meta, y = ds[0]
    assert x.shape == (3, 16, 16) and y == 4 and meta.tolist() == [1.0, 2.0]
    torch.testing.assert_close(x, torch.ones_like(x))                 # white -> +1
    torch.testing.assert_close(ds[1][0], -torch.ones_like(x))         # black -> -1
    assert ds[1][1].tolist() == [0.0, 1.0]
    assert ds.labels.tolist() == [4, 1]
    x_in = SplitDataset([(a, 4)], image_size=16)[0][0]                # ImageNet: white -> (1 - mean) / std
    torch.testing.assert_close(x_in[:, 0, 0], torch.tensor([(1 - 0.485) / 0.229, (1 - 0.456) / 0.224,
                                                            (1 - 0.406) / 0.225]))
    assert SplitDataset([(a, 4)], image_size=16)[0][1].tolist() == [0.0, 0.0]  # no metadata unless asked
