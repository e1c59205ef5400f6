"""spectral/data.py: raw parts, valid rows, the cell layout and sampling against the transcription of
CR_recon's dataset code, the leak-free split (and the original's leak), split files, memory, bad input."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from common.io import UserError
from spectral import data as D
from spectral.losses import CELL_NAMES
from tests.spectral_ref import original

REPO = Path(__file__).resolve().parents[1]


def write_raw(folder: Path, rows=(10, 10), invalid_every=5, seed=0, physical=True) -> tuple[list[Path], list[Path]]:
    """Raw parts in CR_recon's format; every `invalid_every`-th row never simulated (all zero)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    structs, spectra = [], []
    for k, n in enumerate(rows):
        s = D.random_structures(n, rng) if physical else rng.integers(0, 2, (n, 1, 128, 128), dtype=np.uint8)
        t = D.physical_spectra(s) if physical else -rng.random((n, 3, 301), dtype=np.float32)
        t[np.arange(n) % invalid_every == invalid_every - 1] = 0
        structs.append(folder / f"binary_dataset_128_{k}.npy")
        spectra.append(folder / f"spectra_latest_{k}.npy")
        np.save(structs[-1], s)
        np.save(spectra[-1], t)
    return structs, spectra


def digest(a) -> bytes:
    a = np.asarray(a)
    return hashlib.blake2b(np.ascontiguousarray(a > 0).tobytes(), digest_size=16).digest()


def leaks(train_structures, val_structures) -> int:
    """How many validation structures reach training as they are or rotated by 180 degrees."""
    seen = {digest(s) for s in train_structures}
    return sum(digest(s) in seen or digest(D.rotate_structure(s)) in seen for s in val_structures)


# ---------------------------------------------------------------- layout and values
def test_sampling_and_wavelengths_are_crrecons():
    idx = D.sample_indices(30)
    assert idx.tolist()[:6] == [0, 10, 20, 31, 41, 51] and idx[-1] == 300 and len(idx) == 30
    assert np.array_equal(idx, np.linspace(0, 300, 30, dtype=int))
    assert D.wavelengths_nm(30)[:4].tolist() == [400.0, 410.0, 420.0, 431.0]
    assert D.wavelengths_nm(30)[-1] == 700.0


def test_cell_layout_is_named_for_what_it_is():
    """CR_recon calls the layout BGGR; its cell [0,0] is the R channel and [1,1] the B channel."""
    assert D.CELL_LAYOUT == (("R", "G"), ("G", "B"))
    assert CELL_NAMES == ("R", "G1", "G2", "B")
    rgb = np.stack([np.full(5, 1.0), np.full(5, 2.0), np.full(5, 3.0)])[None]   # R=1, G=2, B=3
    cells = D.to_cells(rgb)[0]
    assert cells[0, 0, 0] == 1 and cells[0, 1, 0] == 2 and cells[1, 0, 0] == 2 and cells[1, 1, 0] == 3


def test_items_equal_the_original_dataset(tmp_path):
    """Valid rows, sampling, sign flip, [-1,1] mapping and the 180-degree copies as CR_recon's
    CRDataset computes them (on the whole set in memory, in the transcription)."""
    sf, tf = write_raw(tmp_path, rows=(9, 7), invalid_every=4)
    raw = D.RawData(sf, tf, 30)
    s_all = np.concatenate([np.load(p) for p in sf])
    t_all = np.concatenate([np.load(p) for p in tf])
    valid = np.flatnonzero(np.any(t_all != 0, axis=(1, 2)))
    assert np.array_equal(raw.global_row, valid) and len(raw) == 16 - 2 - 1
    bayer = original.to_bayer(t_all[valid])
    rotated = original.rotate_bayer(bayer)
    ds = D.SpectralDataset(raw, np.arange(len(raw)), augment_180=True, map_to_pm1=True)
    assert len(ds) == 2 * len(raw)
    for v in range(len(raw)):
        x, y = ds[v]
        assert torch.equal(x, torch.from_numpy(s_all[valid[v]].astype(np.float32) * 2 - 1))
        assert torch.equal(y, torch.from_numpy(-bayer[v]))
        xr, yr = ds[len(raw) + v]
        assert torch.equal(xr, torch.from_numpy(np.flip(s_all[valid[v]], (1, 2)).astype(np.float32) * 2 - 1))
        assert torch.equal(yr, torch.from_numpy(-rotated[v]))
    x, _ = D.SpectralDataset(raw, [0], map_to_pm1=False)[0]
    assert set(x.unique().tolist()) <= {0.0, 1.0}


def test_builtin_physics_rotation_swaps_r_and_b_exactly():
    s = D.random_structures(6, np.random.default_rng(1))
    a = D.physical_spectra(s)
    b = D.physical_spectra(D.rotate_structure(s).copy())
    assert np.array_equal(b[:, 0], a[:, 2]) and np.array_equal(b[:, 2], a[:, 0])
    assert np.array_equal(b[:, 1], a[:, 1])
    assert (a < 0).all() and a.min() > -0.7                      # negative, CR_recon's range
    assert np.abs(a[:, 0] - a[:, 2]).max() > 0.01                 # R and B differ: the swap matters


def test_builtin_dataset_format(tmp_path):
    D.make_builtin_dataset(tmp_path, rows_per_part=20, invalid_every=5)
    sf, tf = D.find_parts(tmp_path)
    assert [p.name for p in sf] == ["binary_dataset_128_0.npy", "binary_dataset_128_1.npy"]
    s, t = np.load(sf[1]), np.load(tf[1])
    assert s.shape == (20, 1, 128, 128) and s.dtype == np.uint8 and set(np.unique(s)) <= {0, 1}
    assert t.shape == (20, 3, 301) and t.dtype == np.float32
    assert (~t.any(axis=(1, 2))).sum() == 4                     # not-simulated rows
    assert np.array_equal(s[-1], s[0]) and np.array_equal(s[-2], np.flip(s[1], (1, 2)))


# ---------------------------------------------------------------- split
def test_split_has_no_leak_and_the_originals_split_does(tmp_path):
    """No validation structure, nor its 180-degree rotation, reaches training - even when the raw
    data holds a repeated structure and a rotated copy (both kept on one side). The check itself is
    shown to work: CR_recon's split trains on every validation structure."""
    D.make_builtin_dataset(tmp_path, rows_per_part=40, invalid_every=7)
    raw = D.RawData(*D.find_parts(tmp_path), 30)
    split = D.make_split(raw, 0.75, seed=3)
    assert len(split.train) + len(split.val) == len(raw) and len(np.intersect1d(split.train, split.val)) == 0
    train = D.SpectralDataset(raw, split.train, augment_180=True)
    val = D.SpectralDataset(raw, split.val)
    assert leaks([train[i][0].numpy() for i in range(len(train))], [val[i][0].numpy() for i in range(len(val))]) == 0
    # the copies in the raw data are why the split groups structures
    groups = raw.structure_groups()
    assert len(np.unique(groups)) == len(raw) - 2
    # CR_recon's bookkeeping on the same rows: train indices into [originals; rotated], val from random_split
    aug = D.SpectralDataset(raw, np.arange(len(raw)), augment_180=True)
    o_train, o_val = original.original_split(len(raw), 0.75, 3, augment=True)
    assert leaks([aug[i][0].numpy() for i in o_train], [aug[i][0].numpy() for i in o_val]) == len(o_val)


def test_split_sizes_follow_train_ratio_and_seed(tmp_path):
    sf, tf = write_raw(tmp_path, rows=(30, 30), invalid_every=100, physical=False)
    raw = D.RawData(sf, tf, 30)
    a, b, c = D.make_split(raw, 0.9, 1), D.make_split(raw, 0.9, 1), D.make_split(raw, 0.9, 2)
    assert len(a.val) == 60 - int(60 * 0.9) == 6
    assert np.array_equal(a.val, b.val) and not np.array_equal(a.val, c.val)
    with pytest.raises(UserError, match="train_ratio 0.01: 60 valid rows would leave no training rows"):
        D.make_split(raw, 0.01, 1)


def test_split_file_round_trip_and_errors(tmp_path):
    sf, tf = write_raw(tmp_path / "d", rows=(12, 8), invalid_every=5, physical=False)
    raw = D.RawData(sf, tf, 30)
    split = D.make_split(raw, 0.8, 0)
    D.save_split(tmp_path / "split.json", raw, split, 0, 0.8)
    again = D.load_split(tmp_path / "split.json", raw)
    assert np.array_equal(again.train, split.train) and np.array_equal(again.val, split.val)
    doc = json.loads((tmp_path / "split.json").read_text())
    assert doc["parts"][0] == {"structures": "binary_dataset_128_0.npy", "spectra": "spectra_latest_0.npy", "rows": 12}
    bad = dict(doc, val=doc["val"] + [doc["train"][0]])
    (tmp_path / "overlap.json").write_text(json.dumps(bad))
    with pytest.raises(UserError, match="in both train and val"):
        D.load_split(tmp_path / "overlap.json", raw)
    (tmp_path / "invalid.json").write_text(json.dumps(dict(doc, val=[4])))      # row 4 was never simulated
    with pytest.raises(UserError, match="val row 4 is not a valid row"):
        D.load_split(tmp_path / "invalid.json", raw)
    other = D.RawData(sf[:1], tf[:1], 30)
    with pytest.raises(UserError, match=r"made for parts with \[12, 8\] rows"):
        D.load_split(tmp_path / "split.json", other)


# ---------------------------------------------------------------- memory
MEASURE_PEAK = r"""
import json, sys, tracemalloc
from pathlib import Path
from spectral import data as D
from tests.test_spectral_data import write_raw

def peak(folder, rows):
    sf, tf = write_raw(Path(folder), rows=rows, invalid_every=3, physical=False)
    tracemalloc.start()
    try:
        raw = D.RawData(sf, tf, 30)
        split = D.make_split(raw, 0.9, 0)
        ds = D.SpectralDataset(raw, split.train, augment_180=True)
        for i in range(0, len(ds), 7):
            ds[i]
        return tracemalloc.get_traced_memory()[1], sum(p.stat().st_size for p in sf)
    finally:
        tracemalloc.stop()

root = Path(sys.argv[1])
peak(root / "warm", (20, 20))          # lazy imports and first-call caches are not the data set
print(json.dumps([peak(root / "small", (500, 500)), peak(root / "large", (2000, 2000))]))
"""


def test_never_materialises_the_data_set(tmp_path):
    """Building, splitting and reading every item allocates far less than the structures' size, and
    the peak hardly grows with the number of rows (CR_recon's np.concatenate allocates all of it,
    twice with the rotated copy). Measured in a fresh interpreter: tracemalloc counts every thread's
    allocations, and other tests' threads would be counted too."""
    out = subprocess.run([sys.executable, "-c", MEASURE_PEAK, str(tmp_path)], capture_output=True, text=True,
                         cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=300)
    assert out.returncode == 0, out.stderr
    (small_peak, small_bytes), (large_peak, large_bytes) = json.loads(out.stdout.splitlines()[-1])
    assert large_bytes > 64e6
    assert large_peak < 0.3 * large_bytes, f"peak {large_peak / 1e6:.1f} MB for {large_bytes / 1e6:.1f} MB of structures"
    # 4x the rows: the targets, split and group ids grow (~0.8 kB a row, 5% of a 16 kB structure);
    # reading the structures into memory would grow it by 100% or more
    growth = (large_peak - small_peak) / (large_bytes - small_bytes)
    assert growth < 0.1, f"peak grew by {growth:.2f} bytes per structure byte"


def _vm_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads VmRSS from /proc (Linux)")
def test_reading_rows_does_not_grow_resident_memory(tmp_path):
    """Random rows of a 64 MB file, as the shuffled loader reads them: the process's resident memory
    stays flat (a memory map counted every page it touched: 2.1 GB over 2 workers on the full set),
    and the rows are the file's."""
    rows = np.random.default_rng(0).integers(0, 2, (4096, 1, 128, 128), dtype=np.uint8)
    np.save(tmp_path / "s.npy", rows)
    f = D.NpyRows(tmp_path / "s.npy")
    order = np.random.default_rng(1).permutation(4096)[:3000]
    f.read(0)
    base = peak = _vm_rss()
    for n, i in enumerate(order):
        assert np.array_equal(f.read(int(i)), rows[i]) if n % 500 == 0 else f.read(int(i)).shape == (1, 128, 128)
        if n % 100 == 0:
            peak = max(peak, _vm_rss())
    assert np.array_equal(f.read(10, 20), rows[10:20])
    assert peak - base < 8 << 20, f"resident memory grew by {(peak - base) / 2**20:.0f} MiB over 3000 rows of 16 kB"


# ---------------------------------------------------------------- bad input
def test_bad_raw_files_are_one_line_errors(tmp_path):
    sf, tf = write_raw(tmp_path / "ok", rows=(6,), physical=False)
    s, t = np.load(sf[0]), np.load(tf[0])
    cases = {
        "rows": (s, t[:5], r"spectra_latest_0.npy: 5 rows, but .*binary_dataset_128_0.npy has 6"),
        "dtype": (s.astype(np.float32), t, "structures must be uint8 0/1 masks, found dtype float32"),
        "shape": (s[:, 0], t, r"structures must have shape \(N,1,128,128\), found \(6, 128, 128\)"),
        "spectra_shape": (s, t[:, :, :300], r"spectra must have shape \(N,3,301\)"),
        "spectra_dtype": (s, (t * 100).astype(np.int16), "spectra must be floating point"),
    }
    nan = t.copy()
    nan[3, 1, 7] = np.nan
    cases["nan"] = (s, nan, "spectra_latest_0.npy: row 3 holds NaN or inf")
    for name, (a, b, message) in cases.items():
        folder = tmp_path / name
        folder.mkdir()
        np.save(folder / "binary_dataset_128_0.npy", a)
        np.save(folder / "spectra_latest_0.npy", b)
        with pytest.raises(UserError, match=message):
            D.RawData(*D.find_parts(folder), 30)


def test_structure_values_outside_0_1_are_caught_by_the_split_and_by_the_loader(tmp_path):
    sf, tf = write_raw(tmp_path, rows=(8,), invalid_every=100, physical=False)
    s = np.load(sf[0])
    s[5] *= 255
    np.save(sf[0], s)
    raw = D.RawData(sf, tf, 30)
    with pytest.raises(UserError, match=r"binary_dataset_128_0.npy: row 5: structure values must be 0 or 1, found 255 "
                                        r"\(0/255 masks: divide by 255 first\)"):
        D.make_split(raw, 0.5, 0)
    with pytest.raises(UserError, match="row 5: structure values must be 0 or 1"):
        D.SpectralDataset(raw, [5])[0]


def test_truncated_foreign_and_unpaired_files(tmp_path):
    sf, tf = write_raw(tmp_path / "a", rows=(4,), physical=False)
    data = sf[0].read_bytes()
    cut = tmp_path / "cut" / "binary_dataset_128_0.npy"
    cut.parent.mkdir()
    cut.write_bytes(data[:-100])
    with pytest.raises(UserError, match="file is truncated"):
        D.NpyRows(cut)
    obj = tmp_path / "obj.npy"
    np.save(obj, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(UserError, match="holds Python objects"):
        D.NpyRows(obj)
    text = tmp_path / "text.npy"
    text.write_text("not numpy")
    with pytest.raises(UserError, match="not a readable .npy file"):
        D.NpyRows(text)
    lonely = tmp_path / "lonely"
    lonely.mkdir()
    (lonely / "binary_dataset_128_3.npy").write_bytes(data)
    with pytest.raises(UserError, match="no matching spectra_latest_3.npy"):
        D.find_parts(lonely)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no raw data files"):
        D.find_parts(tmp_path / "empty")
    with pytest.raises(UserError, match="not a folder"):
        D.find_parts(tmp_path / "missing")
