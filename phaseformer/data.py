"""Paired underwater data: LSUI and the official a/b layout, split files, sampling, built-in demo set.

Layouts under --data (folder names case-insensitive):
  DIR/input + DIR/GT          LSUI as released (raw images, reference images with the same names)
  DIR/a + DIR/b               the official Phaseformer code's pairs (a = input, b = reference)
  DIR/train/<pair> + DIR/test/<pair> (or val/)   pre-split, e.g. trains.py's LSUI/{train,test}/{input,gt}
An input without its reference image, or a pair of different sizes, is an error naming the file.

LSUI has no official split (papers use a random 3,879 / 400 one): for a folder that is not split,
a seeded random split is written to the run folder (split.txt: `train<TAB>name` / `val<TAB>name`),
and a given --split file is used as is.

Sampling, per pair (always from the full-resolution images, inputs in [0, 1]):
  resize (trains.py): the whole image -> S x S input and 1x target; the 2x target is the
          full-resolution reference resized to 2S x 2S (trains.py upsampled the 1x target instead);
  crop:   a random square region of side min(2S, smaller image side) -> S x S input and 1x target,
          and the same region of the reference at 2S x 2S: native pixels when the image is large
          enough, never an upsampling of the 1x target.
Training adds random flips and 90-degree rotations, the same for input and both targets.
"""
from __future__ import annotations

import math
import random
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from common.data import IMAGE_SUFFIXES
from common.io import UserError, image_to_tensor, load_image, save_image

BUILTIN_VERSION = "phaseformer-1"
INPUT_DIRS = ("input", "a")
TARGET_DIRS = {"input": ("gt",), "a": ("b",)}
SPLIT_DIRS = ("train", ("val", "test"))
SAMPLINGS = ("resize", "crop")


# ---------------------------------------------------------------- finding pairs
def _subdir(folder: Path, names) -> Path | None:
    if not folder.is_dir():
        return None
    by_lower = {p.name.lower(): p for p in folder.iterdir() if p.is_dir()}
    for name in (names,) if isinstance(names, str) else names:
        if name in by_lower:
            return by_lower[name]
    return None


def pair_dirs(folder: Path) -> tuple[Path, Path] | None:
    """(input dir, reference dir) of a pair folder, or None."""
    for inp in INPUT_DIRS:
        d_in = _subdir(folder, inp)
        d_gt = _subdir(folder, TARGET_DIRS[inp])
        if d_in is not None and d_gt is not None:
            return d_in, d_gt
    return None


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def list_pairs(input_dir: Path, target_dir: Path) -> list[tuple[str, Path, Path]]:
    """(name, input path, reference path) by file name; a reference with the same stem but another
    extension also matches. An input without a reference is an error."""
    targets = _images(target_dir)
    by_name = {p.name: p for p in targets}
    by_stem: dict[str, list[Path]] = {}
    for p in targets:
        by_stem.setdefault(p.stem, []).append(p)
    pairs = []
    for inp in _images(input_dir):
        gt = by_name.get(inp.name)
        if gt is None and len(by_stem.get(inp.stem, [])) == 1:
            gt = by_stem[inp.stem][0]
        if gt is None:
            raise UserError(f"{inp}: no reference image for this input in {target_dir} "
                            f"(expected {target_dir / inp.name})")
        pairs.append((inp.name, inp, gt))
    if not pairs:
        raise UserError(f"{input_dir}: no images ({', '.join(IMAGE_SUFFIXES)})")
    return pairs


def describe_layouts() -> str:
    return "input/ + GT/, a/ + b/, or train/ and test/ (or val/) folders holding one of those"


# ---------------------------------------------------------------- splits
def random_split(names: list[str], val_count: int, seed: int) -> dict[str, str]:
    """name -> 'train' | 'val'; depends only on the sorted names and the seed."""
    if not 1 <= val_count < len(names):
        raise UserError(f"--val-count {val_count}: needs at least 1 validation and 1 training pair "
                        f"({len(names)} pairs found)")
    order = sorted(names)
    random.Random(seed).shuffle(order)
    val = set(order[:val_count])
    return {n: "val" if n in val else "train" for n in sorted(names)}


def split_text(split: dict[str, str], note: str) -> str:
    lines = [f"# {note}", "# <subset><TAB><file name in the input folder>; subsets: train, val"]
    lines += [f"{subset}\t{name}" for name, subset in sorted(split.items(), key=lambda kv: (kv[1] != "train", kv[0]))]
    return "\n".join(lines) + "\n"


def read_split(path: Path, names: set[str]) -> dict[str, str]:
    if not path.is_file():
        raise UserError(f"{path}: split file not found")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a UTF-8 text file") from None
    split = {}
    for i, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split("\t") if "\t" in line else line.split(None, 1)
        if len(parts) != 2 or parts[0] not in ("train", "val"):
            raise UserError(f"{path}, line {i}: expected 'train<TAB>name' or 'val<TAB>name' (got {line!r})")
        subset, name = parts[0], parts[1].strip()
        if name not in names:
            raise UserError(f"{path}, line {i}: {name!r} is not an input image of this dataset")
        if name in split:
            raise UserError(f"{path}, line {i}: {name!r} is listed twice")
        split[name] = subset
    for subset in ("train", "val"):
        if subset not in split.values():
            raise UserError(f"{path}: no '{subset}' pairs")
    return split


def resolve_dataset(data: Path, split_file: Path | None, val_count: int | None, split_seed: int):
    """(train pairs, val pairs, split.txt text, description) for a --data folder."""
    if not data.is_dir():
        raise UserError(f"--data {data}: not a folder")
    train_dir = _subdir(data, SPLIT_DIRS[0])
    val_dir = _subdir(data, SPLIT_DIRS[1])
    if train_dir is not None and val_dir is not None and pair_dirs(train_dir) and pair_dirs(val_dir):
        if split_file is not None:
            raise UserError(f"--split {split_file}: {data} is already split into {train_dir.name}/ and "
                            f"{val_dir.name}/")
        train = list_pairs(*pair_dirs(train_dir))
        val = list_pairs(*pair_dirs(val_dir))
        split = {**{f"{train_dir.name}/{n}": "train" for n, _, _ in train},
                 **{f"{val_dir.name}/{n}": "val" for n, _, _ in val}}
        return train, val, split_text(split, f"pre-split folders of {data}"), \
            f"{data} ({train_dir.name}/ {len(train)} pairs, {val_dir.name}/ {len(val)} pairs)"
    dirs = pair_dirs(data)
    if dirs is None:
        raise UserError(f"--data {data}: no paired images found (expected {describe_layouts()})")
    pairs = list_pairs(*dirs)
    names = [n for n, _, _ in pairs]
    if split_file is not None:
        split = read_split(split_file, set(names))
        pairs = [p for p in pairs if p[0] in split]
        note = f"given split {split_file}"
    else:
        count = val_count if val_count is not None else max(1, round(0.1 * len(names)))
        split = random_split(names, count, split_seed)
        note = f"random split of {data}, seed {split_seed}, {count} val pairs"
    train = [p for p in pairs if split[p[0]] == "train"]
    val = [p for p in pairs if split[p[0]] == "val"]
    desc = f"{data} ({dirs[0].name}/ + {dirs[1].name}/, {len(train)} train / {len(val)} val pairs, {note})"
    return train, val, split_text(split, note), desc


# ---------------------------------------------------------------- sampling
def load_pair(inp: Path, gt: Path) -> tuple[Image.Image, Image.Image]:
    a, b = load_image(inp, "RGB"), load_image(gt, "RGB")
    if a.size != b.size:
        raise UserError(f"{gt}: reference is {b.size[0]}x{b.size[1]} but its input {inp} is "
                        f"{a.size[0]}x{a.size[1]}; pairs must have the same size")
    return a, b


def sample_pair(a: Image.Image, b: Image.Image, size: int, sampling: str, rng: torch.Generator | None = None):
    """(input S x S, 1x target S x S, 2x target 2S x 2S) tensors in [0, 1] from one full-resolution pair."""
    w, h = a.size
    if sampling == "crop":
        side = min(2 * size, w, h)
        x0 = int(torch.randint(0, w - side + 1, (), generator=rng))
        y0 = int(torch.randint(0, h - side + 1, (), generator=rng))
        box = (x0, y0, x0 + side, y0 + side)
    else:
        box = (0, 0, w, h)
    region_a, region_b = a.crop(box), b.crop(box)
    resized = lambda im, s: im if im.size == (s, s) else im.resize((s, s), Image.BICUBIC)  # noqa: E731
    return (image_to_tensor(resized(region_a, size)), image_to_tensor(resized(region_b, size)),
            image_to_tensor(resized(region_b, 2 * size)))


def augment(tensors, rng: torch.Generator | None = None):
    """The same random flip and 90-degree rotation for every tensor (all square)."""
    k = int(torch.randint(0, 4, (), generator=rng))
    flip = bool(torch.randint(0, 2, (), generator=rng))
    out = []
    for t in tensors:
        t = torch.rot90(t, k, (-2, -1)) if k else t
        out.append(t.flip(-1) if flip else t)
    return tuple(t.contiguous() for t in out)


class PairDataset(Dataset):
    """(input, 1x target, 2x target) per pair; decoded per access (LSUI does not fit in memory).

    Training crops and flips come from torch's RNG, which common.data.train_loader seeds per
    (seed, epoch, index): the same samples whatever the number of DataLoader workers, so a resumed
    run (even with another --workers) sees exactly the samples an uninterrupted one would.
    """

    def __init__(self, pairs, size: int, sampling: str = "resize", train: bool = False):
        if sampling not in SAMPLINGS:
            raise ValueError(f"sampling must be one of {SAMPLINGS}")
        self.pairs, self.size, self.sampling, self.train = list(pairs), size, sampling, train

    def __len__(self):
        return len(self.pairs)

    def __getitem__(self, i):
        _, inp, gt = self.pairs[i]
        a, b = load_pair(inp, gt)
        if not self.train:
            return sample_pair(a, b, self.size, "resize")
        return augment(sample_pair(a, b, self.size, self.sampling))


# ---------------------------------------------------------------- built-in synthetic underwater data
def _smooth_field(rng: np.random.Generator, h: int, w: int, waves: int = 4) -> np.ndarray:
    """A smooth random field in [0, 1] (a sum of a few random plane waves)."""
    yy, xx = np.mgrid[:h, :w].astype(np.float32)
    f = np.zeros((h, w), np.float32)
    for _ in range(waves):
        fy, fx = rng.uniform(-3, 3, 2) * 2 * math.pi / max(h, w)
        f += rng.uniform(0.3, 1.0) * np.sin(fy * yy + fx * xx + rng.uniform(0, 2 * math.pi))
    return (f - f.min()) / (np.ptp(f) + 1e-6)


def clean_scene(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(clean RGB image in [0,1], depth map in metres): a sea floor fading into the distance, with
    textured rocks, and fish-like ellipses nearer the camera."""
    h = w = size
    yy, xx = np.mgrid[:h, :w].astype(np.float32)
    base = rng.uniform(0.35, 0.8, 3).astype(np.float32)
    img = base * (0.6 + 0.4 * _smooth_field(rng, h, w)[..., None])
    img *= (0.85 + 0.15 * np.sin(xx / rng.uniform(2, 5) + yy / rng.uniform(3, 7)))[..., None]   # sand ripples
    depth = rng.uniform(1.0, 3.0) + rng.uniform(3.0, 8.0) * (1.0 - yy / h) ** 1.5 + _smooth_field(rng, h, w)
    for _ in range(rng.integers(3, 8)):
        cy, cx = rng.uniform(0.2, 1.0) * h, rng.uniform(0, 1) * w
        ry, rx = rng.uniform(0.05, 0.2) * h, rng.uniform(0.05, 0.3) * w
        angle = rng.uniform(0, math.pi)
        u = ((xx - cx) * math.cos(angle) + (yy - cy) * math.sin(angle)) / rx
        v = (-(xx - cx) * math.sin(angle) + (yy - cy) * math.cos(angle)) / ry
        mask = u ** 2 + v ** 2 <= 1.0
        colour = rng.uniform(0.05, 1.0, 3).astype(np.float32)
        texture = 0.75 + 0.25 * np.sign(np.sin(u * rng.uniform(3, 9)) * np.sin(v * rng.uniform(3, 9)))
        img[mask] = (colour * texture[..., None])[mask]
        depth[mask] = np.minimum(depth[mask], rng.uniform(0.5, 3.0))
    return np.clip(img, 0.0, 1.0), depth.astype(np.float32)


def underwater(clean: np.ndarray, depth: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The underwater image-formation model: I = J*exp(-beta*d) + B*(1 - exp(-beta*d)), per channel,
    with red attenuated most (beta per metre) and a blue-green backscatter B; plus sensor noise."""
    beta = np.array([rng.uniform(0.25, 0.5), rng.uniform(0.05, 0.12), rng.uniform(0.03, 0.1)], np.float32)
    backscatter = np.array([rng.uniform(0.02, 0.15), rng.uniform(0.3, 0.55), rng.uniform(0.4, 0.7)], np.float32)
    transmission = np.exp(-beta * depth[..., None])
    img = clean * transmission + backscatter * (1.0 - transmission)
    return np.clip(img + rng.normal(0, 0.01, img.shape), 0.0, 1.0)


def make_builtin_dataset(root: Path, n: int = 96, size: int = 96, seed: int = 0) -> None:
    """LSUI layout: root/input/*.png (degraded) and root/GT/*.png (clean)."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        clean, depth = clean_scene(rng, size)
        degraded = underwater(clean, depth, rng)
        to8 = lambda a: (a * 255.0 + 0.5).astype(np.uint8)  # noqa: E731
        save_image(root / "input" / f"{i:04d}.png", to8(degraded))
        save_image(root / "GT" / f"{i:04d}.png", to8(clean))
