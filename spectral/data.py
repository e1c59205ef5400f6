"""CR_recon data: the raw .npy parts, the valid-row filter, the 2x2 cell layout, a leak-free split,
the 180-degree augmentation, and the built-in demo set.

Raw files (CR_recon's data_CR repository), any number of parts k = 0, 1, ...:
  binary_dataset_128_k.npy   (N,1,128,128) uint8 in {0,1}   the unit cell's structure
  spectra_latest_k.npy       (N,3,301) float32              R, G, B monitor spectra, 400-700 nm
                                                            at 1 nm, negative (flux direction)
Rows whose spectra are all zero were never simulated and are skipped.

Targets are (2,2,out_len): cell [0,0] = R, [0,1] = G, [1,0] = G, [1,1] = B (G appears twice),
point-sampled at np.linspace(0, 300, out_len, dtype=int) (400, 410, 420, 431, ... 700 nm for
out_len 30) and sign-flipped to positive values. CR_recon calls this layout "BGGR"; it is R,G / G,B.

A 180-degree rotation of the unit cell maps cell [0,0] onto [1,1] and [0,1] onto [1,0]: its
spectra are the original's with R and B swapped (G stays: both G cells hold the same spectrum).

Memory: the files are read row by row (a seek and a read per row or block); only the valid-row
index and the sampled targets (M x 3 x out_len floats, 38 MB for 105,601 rows) are held. Nothing
is mapped, so a process's resident memory does not grow with the rows it has read, while the
operating system's page cache (shared by the DataLoader workers, and given back under memory
pressure) keeps the data warm (CR_recon concatenated everything into RAM: about 5 GB).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from common.io import UserError, atomic_write_text

STRUCT_GLOB, SPECTRA_GLOB = "binary_dataset_128_*.npy", "spectra_latest_*.npy"
STRUCT_SHAPE = (1, 128, 128)
N_POINTS = 301
FIRST_NM = 400.0                      # CR_recon's assumption: index 0 is 400 nm, 1 nm steps
CELL_LAYOUT = (("R", "G"), ("G", "B"))
SPLIT_FORMAT = "cr-spectral-split/1"
BUILTIN_VERSION = "spectral-4"
SCAN_ROWS = 1024                      # spectra rows per chunk when scanning (4 MB)
STRUCT_SCAN_ROWS = 128                # structure rows per chunk when grouping them (2 MB)


def sample_indices(out_len: int) -> np.ndarray:
    """The 301-point indices CR_recon keeps (point sampling, no averaging)."""
    return np.linspace(0, N_POINTS - 1, out_len, dtype=int)


def wavelengths_nm(out_len: int) -> np.ndarray:
    """The wavelengths of the sampled points (400, 410, 420, 431, ... for out_len 30)."""
    return FIRST_NM + sample_indices(out_len).astype(np.float64)


def to_cells(rgb: np.ndarray) -> np.ndarray:
    """(..., 3, L) R,G,B -> (..., 2, 2, L) [[R,G],[G,B]]."""
    r, g, b = rgb[..., 0, :], rgb[..., 1, :], rgb[..., 2, :]
    return np.stack([np.stack([r, g], -2), np.stack([g, b], -2)], -3)


def rotate_cells(cells):
    """The targets of the 180-degree rotated structure: cells [0,0] and [1,1] (R and B) swap."""
    out = cells.copy() if isinstance(cells, np.ndarray) else cells.clone()
    out[..., 0, 0, :], out[..., 1, 1, :] = cells[..., 1, 1, :], cells[..., 0, 0, :]
    return out


def rotate_structure(s):
    """180 degrees about the cell centre: pixel (i, j) -> (H-1-i, W-1-j)."""
    return np.flip(s, axis=(-2, -1)) if isinstance(s, np.ndarray) else s.flip(-2, -1)


# ---------------------------------------------------------------- one .npy file, read by rows
class NpyRows:
    """Rows of a .npy file, read on demand. The header is checked here (no pickled objects, C
    order, the file long enough for its shape); each read is one seek and read into a new array.

    A memory map would do the same reads, but every page a process touched would count towards its
    resident memory (with 2 workers and random access on 2 x 100,000 rows the processes held 2.1 GB
    of mapped pages between releases); reads leave the data in the page cache only."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_file():
            raise UserError(f"{self.path}: file not found")
        try:
            with open(self.path, "rb") as f:
                version = np.lib.format.read_magic(f)
                shape, fortran, dtype = (np.lib.format.read_array_header_1_0(f) if version == (1, 0)
                                         else np.lib.format.read_array_header_2_0(f))
                self.offset = f.tell()
        except (ValueError, OSError, SyntaxError) as e:
            raise UserError(f"{self.path}: not a readable .npy file ({e})") from None
        if dtype.hasobject:
            raise UserError(f"{self.path}: holds Python objects, not numbers (refused)")
        if fortran:
            raise UserError(f"{self.path}: stored in Fortran order; save it with np.save(np.ascontiguousarray(a))")
        self.shape, self.dtype = tuple(int(n) for n in shape), dtype
        self.row_shape = self.shape[1:]
        self.row_bytes = int(np.prod(self.row_shape, dtype=np.int64)) * dtype.itemsize
        need = self.offset + (self.shape[0] if self.shape else 1) * self.row_bytes
        size = self.path.stat().st_size
        if size < need:
            raise UserError(f"{self.path}: file is truncated ({size} bytes, its header needs {need})")
        self._file = None
        self._pid = None
        self._lock = threading.Lock()

    @property
    def rows(self) -> int:
        return self.shape[0] if self.shape else 0

    def _open(self):
        if self._file is None or self._pid != os.getpid():   # a forked worker opens its own
            self._file, self._pid = open(self.path, "rb", buffering=0), os.getpid()
        return self._file

    def read(self, start: int, stop: int | None = None) -> np.ndarray:
        """Rows [start, stop) (one row without the leading axis when stop is None), as a new array."""
        n = 1 if stop is None else stop - start
        out = np.empty((n, *self.row_shape), self.dtype)
        buf, offset = memoryview(out.reshape(-1).view(np.uint8)), self.offset + start * self.row_bytes
        got = 0
        with self._lock:       # seek and read stay together
            f = self._open()
            f.seek(offset)
            while got < len(buf):
                k = f.readinto(buf[got:])
                if not k:
                    break
                got += k
        if got != len(buf):
            raise UserError(f"{self.path}: file ended at row {start} (was it truncated while in use?)")
        return out[0] if stop is None else out

    def release(self) -> None:
        """Close this process's file (the next read opens it again)."""
        if self._file is not None and self._pid == os.getpid():
            self._file.close()
        self._file = None

    def __getstate__(self):   # DataLoader workers started with spawn open the file themselves
        state = dict(self.__dict__)
        state["_file"], state["_pid"], state["_lock"] = None, None, None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()


# ---------------------------------------------------------------- the raw data set
def _part_number(path: Path, pattern: str) -> int | None:
    m = re.fullmatch(pattern.replace("*", r"(\d+)").replace(".", r"\."), path.name)
    return int(m.group(1)) if m else None


def find_parts(folder: str | os.PathLike) -> tuple[list[Path], list[Path]]:
    """The paired raw files in a folder, by part number."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"--data {folder}: not a folder (expected {STRUCT_GLOB} and {SPECTRA_GLOB} inside)")
    structs = {_part_number(p, STRUCT_GLOB): p for p in folder.glob(STRUCT_GLOB)}
    spectra = {_part_number(p, SPECTRA_GLOB): p for p in folder.glob(SPECTRA_GLOB)}
    structs.pop(None, None)
    spectra.pop(None, None)
    if not structs and not spectra:
        raise UserError(f"{folder}: no raw data files ({STRUCT_GLOB} with {SPECTRA_GLOB})")
    for k in sorted(set(structs) ^ set(spectra)):
        have, missing = (structs[k], SPECTRA_GLOB) if k in structs else (spectra[k], STRUCT_GLOB)
        raise UserError(f"{have}: no matching {missing.replace('*', str(k))} in {folder}")
    ks = sorted(structs)
    return [structs[k] for k in ks], [spectra[k] for k in ks]


class RawData:
    """The raw parts, opened and checked, with the valid rows and their sampled targets.

    valid row v is row `row[v]` of part `part[v]`; `targets[v]` is (3,out_len) R,G,B, sign-flipped.
    """

    def __init__(self, struct_files, spectra_files, out_len: int = 30):
        struct_files, spectra_files = [Path(p) for p in struct_files], [Path(p) for p in spectra_files]
        if not struct_files or len(struct_files) != len(spectra_files):
            raise UserError(f"data: {len(struct_files)} structure file(s) but {len(spectra_files)} spectra "
                            f"file(s); they pair up part by part")
        if not 2 <= out_len <= N_POINTS:
            raise UserError(f"data.out_len must be between 2 and {N_POINTS} (got {out_len})")
        self.out_len = out_len
        self.structs, self.spectra = [], []
        for sp, tp in zip(struct_files, spectra_files):
            s, t = NpyRows(sp), NpyRows(tp)
            if len(s.shape) != 4 or s.row_shape != STRUCT_SHAPE:
                raise UserError(f"{sp}: structures must have shape (N,1,128,128), found {s.shape}")
            if s.dtype not in (np.dtype(np.uint8), np.dtype(bool)):
                raise UserError(f"{sp}: structures must be uint8 0/1 masks, found dtype {s.dtype}")
            if len(t.shape) != 3 or t.row_shape != (3, N_POINTS):
                raise UserError(f"{tp}: spectra must have shape (N,3,{N_POINTS}), found {t.shape}")
            if t.dtype.kind != "f":
                raise UserError(f"{tp}: spectra must be floating point (float32), found dtype {t.dtype}")
            if s.rows != t.rows:
                raise UserError(f"{tp}: {t.rows} rows, but {sp} has {s.rows}; row i of one must be row i of the other")
            self.structs.append(s)
            self.spectra.append(t)
        self.part_rows = [s.rows for s in self.structs]
        self.offsets = np.concatenate([[0], np.cumsum(self.part_rows)]).astype(np.int64)
        self._scan_spectra()

    @property
    def files(self) -> list[dict]:
        return [{"structures": s.path.name, "spectra": t.path.name, "rows": s.rows}
                for s, t in zip(self.structs, self.spectra)]

    def _scan_spectra(self) -> None:
        """Valid rows (any non-zero spectrum value) and their targets; NaN/inf is an error."""
        idx = sample_indices(self.out_len)
        parts, rows, targets = [], [], []
        for k, t in enumerate(self.spectra):
            for start in range(0, t.rows, SCAN_ROWS):
                a = t.read(start, min(start + SCAN_ROWS, t.rows))
                bad = ~np.isfinite(a).all(axis=(1, 2))
                if bad.any():
                    r = start + int(np.argmax(bad))
                    raise UserError(f"{t.path}: row {r} holds NaN or inf spectrum values")
                valid = np.flatnonzero((a != 0).any(axis=(1, 2)))
                parts.append(np.full(len(valid), k, np.int32))
                rows.append(start + valid)
                targets.append(-a[valid][:, :, idx].astype(np.float32))
            t.release()
        self.part = np.concatenate(parts)
        self.row = np.concatenate(rows).astype(np.int64)
        self.targets = np.ascontiguousarray(np.concatenate(targets)) if targets else \
            np.zeros((0, 3, self.out_len), np.float32)
        self.global_row = self.offsets[self.part] + self.row

    def __len__(self) -> int:
        return len(self.row)

    def _check_structure(self, s: np.ndarray, k: int, row: int) -> None:
        if s.dtype != bool and s.size and s.max() > 1:
            hint = " (0/255 masks: divide by 255 first)" if s.max() == 255 else ""
            raise UserError(f"{self.structs[k].path}: row {row}: structure values must be 0 or 1, "
                            f"found {int(s.max())}{hint}")

    def structure(self, v: int) -> np.ndarray:
        """Valid row v's structure, uint8 (1,128,128), checked to be 0/1."""
        k, r = int(self.part[v]), int(self.row[v])
        s = self.structs[k].read(r)
        self._check_structure(s, k, r)
        return s.view(np.uint8) if s.dtype == bool else s

    def structure_groups(self) -> np.ndarray:
        """A group id per valid row: rows whose structures are equal, or equal after a 180-degree
        rotation, share one. Reads every structure once, a window of rows at a time (and checks the
        0/1 values on the way)."""
        keys: dict[bytes, int] = {}
        groups = np.empty(len(self), np.int64)
        for k, s in enumerate(self.structs):
            valid = np.flatnonzero(self.part == k)       # valid-row indices of this part, by row
            rows = self.row[valid]
            for lo in range(0, s.rows, STRUCT_SCAN_ROWS):
                hi = min(lo + STRUCT_SCAN_ROWS, s.rows)
                a, b = np.searchsorted(rows, [lo, hi])
                if a == b:
                    continue
                block = s.read(lo, hi)[rows[a:b] - lo]
                for i in range(b - a):
                    self._check_structure(block[i], k, int(rows[a + i]))
                plain = np.packbits(block.reshape(len(block), -1) != 0, axis=1)
                rotated = np.packbits(rotate_structure(block).reshape(len(block), -1) != 0, axis=1)
                for i in range(b - a):
                    key = min(hashlib.blake2b(plain[i].tobytes(), digest_size=16).digest(),
                              hashlib.blake2b(rotated[i].tobytes(), digest_size=16).digest())
                    groups[valid[a + i]] = keys.setdefault(key, len(keys))
            s.release()
        return groups

    def release(self) -> None:
        for m in self.structs + self.spectra:
            m.release()


# ---------------------------------------------------------------- dataset
class SpectralDataset(Dataset):
    """Valid rows `rows` of `raw` -> (structure (1,128,128) float32, targets (2,2,out_len) float32).

    With `augment_180` the set is twice as long: items n..2n-1 are the rows rotated by 180 degrees
    with R and B swapped.
    """

    def __init__(self, raw: RawData, rows, augment_180: bool = False, map_to_pm1: bool = True):
        self.raw, self.rows = raw, np.asarray(rows, dtype=np.int64)
        self.augment_180, self.map_to_pm1 = augment_180, map_to_pm1

    def __len__(self) -> int:
        return len(self.rows) * (2 if self.augment_180 else 1)

    def item(self, i: int) -> tuple[int, bool]:
        """(valid row, rotated?) of item i."""
        n = len(self.rows)
        return int(self.rows[i % n]), i >= n

    def __getitem__(self, i: int):
        v, rotated = self.item(i)
        s = self.raw.structure(v)
        cells = to_cells(self.raw.targets[v])
        if rotated:
            s, cells = rotate_structure(s), rotate_cells(cells)
        x = torch.from_numpy(np.ascontiguousarray(s, dtype=np.float32))
        if self.map_to_pm1:
            x = x * 2.0 - 1.0
        return x, torch.from_numpy(np.ascontiguousarray(cells))


# ---------------------------------------------------------------- split
@dataclass
class Split:
    train: np.ndarray      # valid-row indices
    val: np.ndarray
    source: str            # how it was made, for the log


def make_split(raw: RawData, train_ratio: float, seed: int) -> Split:
    """Validation = whole structure groups (a structure, its copies and its 180-degree rotations)
    drawn in a seeded order until val holds len - int(len * train_ratio) rows; training = the rest.
    The 180-degree augmentation is applied to the training rows only, afterwards."""
    m = len(raw)
    want_val = m - int(m * train_ratio)
    if want_val < 1 or want_val >= m:
        raise UserError(f"data.train_ratio {train_ratio}: {m} valid rows would leave "
                        f"{'no validation' if want_val < 1 else 'no training'} rows")
    groups = raw.structure_groups()
    order = np.random.default_rng(seed).permutation(int(groups.max()) + 1)   # groups in drawn order
    sizes = np.bincount(groups)[order]
    n_groups_val = int(np.searchsorted(np.cumsum(sizes), want_val))  # first groups reaching want_val
    val_groups = set(order[:n_groups_val + 1].tolist())
    is_val = np.fromiter((g in val_groups for g in groups), bool, count=m)
    val, train = np.sort(np.flatnonzero(is_val)), np.sort(np.flatnonzero(~is_val))
    if len(train) == 0:
        raise UserError(f"data.train_ratio {train_ratio}: every valid row landed in validation")
    dupes = m - len(np.unique(groups))
    note = f", {dupes} duplicate or rotated structure(s) kept with their group" if dupes else ""
    return Split(train, val, f"split by structure with seed {seed}, train_ratio {train_ratio}{note}")


def save_split(path: str | os.PathLike, raw: RawData, split: Split, seed: int, train_ratio: float) -> None:
    """JSON: the parts (names, row counts) and the rows of each side as row numbers of the parts
    concatenated in order (row i of part k is offset_k + i)."""
    doc = {"format": SPLIT_FORMAT, "seed": seed, "train_ratio": train_ratio, "parts": raw.files,
           "train": raw.global_row[split.train].tolist(), "val": raw.global_row[split.val].tolist()}
    atomic_write_text(path, json.dumps(doc) + "\n")


def load_split(path: str | os.PathLike, raw: RawData) -> Split:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: split file not found")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: not a split file ({e})") from None
    if not isinstance(doc, dict) or doc.get("format") != SPLIT_FORMAT:
        raise UserError(f"{path}: not a split file of this project (format {SPLIT_FORMAT})")
    rows = [p.get("rows") for p in doc.get("parts", []) if isinstance(p, dict)]
    if rows != raw.part_rows:
        raise UserError(f"{path}: made for parts with {rows} rows, but the data has {raw.part_rows}")
    position = {int(g): v for v, g in enumerate(raw.global_row)}
    sides = {}
    for side in ("train", "val"):
        ids = doc.get(side)
        if not isinstance(ids, list) or not ids or not all(isinstance(g, int) and not isinstance(g, bool) for g in ids):
            raise UserError(f"{path}: '{side}' must be a non-empty list of row numbers")
        missing = [g for g in ids if g not in position]
        if missing:
            raise UserError(f"{path}: {side} row {missing[0]} is not a valid row of the data "
                            f"(out of range, or its spectra are all zero)")
        sides[side] = np.array(sorted(position[g] for g in ids), np.int64)
        if len(np.unique(sides[side])) != len(sides[side]):
            raise UserError(f"{path}: {side} lists a row twice")
    both = np.intersect1d(sides["train"], sides["val"])
    if len(both):
        raise UserError(f"{path}: row {int(raw.global_row[both[0]])} is in both train and val")
    return Split(sides["train"], sides["val"], f"split file {path}")


# ---------------------------------------------------------------- built-in demo data
FILM_NM = 50.0           # film thickness
SUBSTRATE_INDEX = 1.46   # glass
EFFICIENCY = 0.65        # detected fraction of the transmitted light (sets the scale, as in the real data)
SIGMA_PX = 18.0          # radius of the region above a pixel that sets its film's effective index


def film_index(wavelength_nm: np.ndarray) -> np.ndarray:
    """An absorbing, silicon-like film: n - ik with n about 4 and an absorption that falls from the
    blue to the red."""
    x = (wavelength_nm - 400.0)
    return (3.9 + 0.6 * np.exp(-x / 120.0)) - 1j * (1.6 * np.exp(-x / 70.0) + 0.03)


def thin_film_transmission(fill: np.ndarray, wavelength_nm: np.ndarray) -> np.ndarray:
    """Normal-incidence transmission into glass through a film (air / film / glass, Airy formula)
    whose permittivity is the effective medium of `fill` (0..1) film material and air; (N,) x (L,) -> (N, L)."""
    n_film = film_index(wavelength_nm)[None, :]
    n1 = np.sqrt(fill[:, None] * n_film ** 2 + (1.0 - fill[:, None]))
    n0, n2 = 1.0, SUBSTRATE_INDEX
    r01, r12 = (n0 - n1) / (n0 + n1), (n1 - n2) / (n1 + n2)
    t01, t12 = 2 * n0 / (n0 + n1), 2 * n1 / (n1 + n2)
    phase = np.exp(-1j * 2 * np.pi * n1 * FILM_NM / wavelength_nm[None, :])
    t = t01 * t12 * phase / (1.0 + r01 * r12 * phase ** 2)
    return (n2 / n0) * np.abs(t) ** 2


def _periodic_gaussian(center: tuple[float, float], size: int = 128, sigma: float = SIGMA_PX) -> np.ndarray:
    ii, jj = np.mgrid[:size, :size].astype(np.float64)
    di = np.abs(ii - center[0])
    dj = np.abs(jj - center[1])
    di, dj = np.minimum(di, size - di), np.minimum(dj, size - dj)   # distance on the torus
    w = np.exp(-(di ** 2 + dj ** 2) / (2 * sigma ** 2))
    return w / w.sum()


_W_TOP_LEFT = _periodic_gaussian((31.5, 31.5))
_W_TOP_RIGHT = _periodic_gaussian((31.5, 95.5))


def physical_spectra(structs: np.ndarray) -> np.ndarray:
    """(N,1,128,128) {0,1} -> (N,3,301) float32, negative like CR_recon's monitors.

    The unit cell sits over a 2x2 pixel block: pixel [0,0] (R) under the top-left quarter, [1,1]
    (B) under the bottom-right, the two G pixels under the other two. Each pixel sees a film whose
    index is the effective medium of the structure's fill around the centre of its quarter
    (Gaussian weights on the torus); G is the mean of its two pixels. The bottom-right and
    bottom-left fills are computed as the top-left and top-right fills of the rotated structure,
    so rotating a structure by 180 degrees swaps its R and B spectra bit for bit.
    """
    s = structs[:, 0].astype(np.float64)
    rot = rotate_structure(s)
    fill = lambda w, a: np.einsum("nij,ij->n", a, w)            # noqa: E731
    lam = FIRST_NM + np.arange(N_POINTS, dtype=np.float64)
    t = lambda f: EFFICIENCY * thin_film_transmission(f, lam)   # noqa: E731
    r = t(fill(_W_TOP_LEFT, s))
    b = t(fill(_W_TOP_LEFT, rot))
    g = 0.5 * (t(fill(_W_TOP_RIGHT, s)) + t(fill(_W_TOP_RIGHT, rot)))
    return -np.stack([r, g, b], 1).astype(np.float32)


def random_structures(n: int, rng: np.random.Generator, size: int = 128) -> np.ndarray:
    """Periodic binary patterns: low-pass filtered noise (periodic by construction, features of
    ~10 px) plus a random bias per quarter, cut at a random level around its median, so that the
    fill of the cell (about 0.2 to 0.8) and of each quarter vary."""
    k = np.fft.fftfreq(size)
    lowpass = np.exp(-(k[:, None] ** 2 + k[None, :] ** 2) / (2 * 0.04 ** 2))
    bumps = [_periodic_gaussian(c, size, 20.0) for c in ((31.5, 31.5), (31.5, 95.5), (95.5, 31.5), (95.5, 95.5))]
    bumps = [b / b.max() for b in bumps]
    out = np.empty((n, 1, size, size), np.uint8)
    for i in range(n):
        field = np.fft.ifft2(np.fft.fft2(rng.standard_normal((size, size))) * lowpass).real
        field = field / field.std() + sum(a * b for a, b in zip(rng.uniform(-1.0, 1.0, 4), bumps))
        out[i, 0] = field > np.median(field) + rng.uniform(-0.8, 0.8)
    return out


def make_builtin_dataset(root: Path, rows_per_part: int = 112, parts: int = 2, invalid_every: int = 9,
                         seed: int = 0) -> None:
    """Raw parts in CR_recon's format. Every `invalid_every`-th row has all-zero spectra (not
    simulated yet, as in the real files); the last part repeats one structure and holds the
    180-degree rotation of another, as a real collection can."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for k in range(parts):
        s = random_structures(rows_per_part, rng)
        if k == parts - 1 and rows_per_part >= 8:
            s[-1] = s[0]                              # an exact repeat
            s[-2] = rotate_structure(s[1])            # a rotated copy
        spectra = physical_spectra(s)
        spectra[np.arange(rows_per_part) % invalid_every == invalid_every - 1] = 0.0
        np.save(root / f"binary_dataset_128_{k}.npy", s)
        np.save(root / f"spectra_latest_{k}.npy", spectra)
