"""Battery CT data: split files, filename metadata, battery-grouped splits, built-in demo slices.

Split file: one `path<TAB>label` per line, no header; relative paths are resolved against the
split file's folder, or against --root when given. A label is an index into CLASS_NAMES or the class name itself.
Filenames carry metadata: CT_{cell|module}_{package}_{batteryid}_{x|y|z}_{slice}.jpg, e.g.
CT_cell_pouch_102_x_141.jpg; the battery ID is type_package_batteryid (cell_pouch_102).
"""
from __future__ import annotations

import random
import re
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms.v2 as T
from torch.utils.data import Dataset

from battery_ct.model import CLASS_NAMES, DEFECT_CLASSES
from common.io import UserError, atomic_write_text, load_image, save_image

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
BUILTIN_VERSION = "battery-ct-2"   # 2: masks/<stem>.png (255 on defect pixels) per defective image
_NAME = re.compile(r"^CT_(cell|module)_([A-Za-z0-9-]+)_([A-Za-z0-9-]+)_([xyz])_(\d+)$")


# ---------------------------------------------------------------- names and split files
def parse_name(path: str | Path) -> dict | None:
    """Metadata from CT_{type}_{package}_{id}_{axis}_{slice}; None if the name does not follow it."""
    m = _NAME.match(Path(path).stem)
    if m is None:
        return None
    kind, package, number, axis, _slice = m.groups()
    return {"battery_type": 0 if kind == "cell" else 1, "axis": "xyz".index(axis),
            "battery_id": f"{kind}_{package}_{number}"}


def metadata(path: Path) -> torch.Tensor:
    """The two raw floats late fusion uses: battery_type (0 cell / 1 module), axis (0 x / 1 y / 2 z)."""
    meta = parse_name(path)
    if meta is None:
        raise UserError(f"{path}: file name does not follow CT_{{cell|module}}_{{package}}_{{id}}_{{x|y|z}}_{{slice}} "
                        f"(needed for late-fusion metadata)")
    return torch.tensor([meta["battery_type"], meta["axis"]], dtype=torch.float32)


def read_split(split: str | Path, root: str | Path | None = None, num_classes: int = len(CLASS_NAMES),
               check_files: bool = True) -> list[tuple[Path, int]]:
    split = Path(split)
    if not split.is_file():
        raise UserError(f"{split}: split file not found")
    base = Path(root) if root is not None else split.parent
    try:  # utf-8-sig: split files saved by Windows editors start with a byte-order mark
        lines = split.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError as e:
        raise UserError(f"{split}: not a UTF-8 text file ({e.reason} at byte {e.start})") from None
    items = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        parts = line.rstrip().split("\t")
        if len(parts) != 2:
            found = "no tab" if len(parts) < 2 else f"{len(parts)} tab-separated fields"
            raise UserError(f"{split}, line {n}: expected 'path<TAB>label', found {found}")
        if "\0" in parts[0]:
            raise UserError(f"{split}, line {n}: the path contains a NUL byte")
        label = parts[1].strip()
        if label in CLASS_NAMES[:num_classes]:
            label = CLASS_NAMES.index(label)
        else:
            try:
                label = int(label)
            except ValueError:
                raise UserError(f"{split}, line {n}: label {parts[1]!r} is neither a class index nor one of "
                                f"{', '.join(CLASS_NAMES[:num_classes])}") from None
        if not 0 <= label < num_classes:
            raise UserError(f"{split}, line {n}: label {label} out of range 0..{num_classes - 1}")
        path = Path(parts[0])
        path = path if path.is_absolute() else base / path
        if check_files and not path.is_file():
            raise UserError(f"{split}, line {n}: image not found: {path}")
        items.append((path, label))
    if not items:
        raise UserError(f"{split}: no samples")
    return items


def write_split(path: Path, items: list[tuple[Path, int]], relative_to: Path | None = None) -> None:
    lines = [f"{p.relative_to(relative_to) if relative_to else p}\t{y}" for p, y in items]
    atomic_write_text(path, "\n".join(lines) + "\n")


def split_by_battery(items: list[tuple[Path, int]], seed: int = 42,
                     ratios: tuple[float, float] = (0.70, 0.15)) -> dict[str, list[tuple[Path, int]]]:
    """70/15/15 by battery: batteries grouped by their majority class, shuffled per class with
    `seed`, cut with floors (the remainder goes to test); files shuffled within each split."""
    by_battery: dict[str, list] = defaultdict(list)
    for path, label in items:
        meta = parse_name(path)
        if meta is None:
            raise UserError(f"{path}: cannot tell its battery: the name does not follow "
                            f"CT_{{cell|module}}_{{package}}_{{id}}_{{x|y|z}}_{{slice}}")
        by_battery[meta["battery_id"]].append((path, label))
    by_class: dict[int, list[str]] = defaultdict(list)
    for bid, files in sorted(by_battery.items()):
        by_class[Counter(y for _, y in files).most_common(1)[0][0]].append(bid)
    rng = random.Random(seed)
    splits = {"train": [], "val": [], "test": []}
    for label in sorted(by_class):
        ids = by_class[label]
        rng.shuffle(ids)
        n_train, n_val = int(len(ids) * ratios[0]), int(len(ids) * ratios[1])
        for name, chunk in (("train", ids[:n_train]), ("val", ids[n_train:n_train + n_val]),
                            ("test", ids[n_train + n_val:])):
            for bid in chunk:
                splits[name] += by_battery[bid]
    for files in splits.values():
        rng.shuffle(files)
    check_no_battery_leak(splits)
    return splits


def check_no_battery_leak(splits: dict[str, list[tuple[Path, int]]]) -> None:
    owner: dict[str, str] = {}
    for name, files in splits.items():
        for path, _ in files:
            bid = parse_name(path)["battery_id"]
            if owner.setdefault(bid, name) != name:
                raise UserError(f"battery {bid} appears in both {owner[bid]} and {name} ({path})")


# ---------------------------------------------------------------- datasets
def transforms(image_size: int, train: bool, rotation: float, normalize: str) -> T.Compose:
    """CT configs: flips, rotation (90 for late fusion / DRN+ASPP / HD-CNN, 30 for the others),
    affine translate 0.1 and scale 0.9-1.1; no colour jitter. Validation: resize only."""
    ops = [T.ToImage(), T.ToDtype(torch.float32, scale=True), T.Resize((image_size, image_size), antialias=True)]
    if train:
        ops += [T.RandomHorizontalFlip(), T.RandomVerticalFlip(), T.RandomRotation(rotation),
                T.RandomAffine(degrees=0, translate=(0.1, 0.1), scale=(0.9, 1.1))]
    if normalize == "imagenet":
        ops.append(T.Normalize(IMAGENET_MEAN, IMAGENET_STD))
    elif normalize == "tanh":  # [-1, 1], the range of the autoencoder's Tanh output
        ops.append(T.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)))
    return T.Compose(ops)


class SplitDataset(Dataset):
    """Items (path, label) -> (image, metadata, label); metadata is zeros unless `with_meta`."""

    def __init__(self, items, image_size: int, train: bool = False, rotation: float = 30.0,
                 with_meta: bool = False, normalize: str = "imagenet"):
        self.items = list(items)
        self.tf = transforms(image_size, train, rotation, normalize)
        self.meta = [metadata(p) for p, _ in self.items] if with_meta else None

    def __len__(self):
        return len(self.items)

    @property
    def labels(self) -> torch.Tensor:
        return torch.tensor([y for _, y in self.items])

    def __getitem__(self, i):
        path, label = self.items[i]
        x = self.tf(load_image(path, "RGB"))
        meta = self.meta[i] if self.meta is not None else torch.zeros(2)
        return x, meta, label


# ---------------------------------------------------------------- built-in demo data
def _slice_image(rng: np.random.Generator, kind: str, label: int, axis: str, size: int = 128,
                 with_mask: bool = False):
    """The image, or (image, defect mask) `with_mask`: a CT-like grey slice, a cell (layered
    electrode stack) or a module (cells in a casing). Porosity: dark voids in the material. Resin
    overflow: a bright spill past the casing. The mask is True on the pixels a defect changed."""
    yy, xx = np.mgrid[:size, :size].astype(np.float32)
    img = rng.normal(18, 4, (size, size)).astype(np.float32)        # air is dark in CT
    period = rng.uniform(3.0, 5.0)
    layers = 150 + 35 * np.sin((yy if axis != "y" else xx) * 2 * np.pi / period)
    if axis == "z":
        layers = 150 + 35 * np.sin(np.hypot(yy - size / 2, xx - size / 2) * 2 * np.pi / period)
    material = np.zeros((size, size), bool)
    defect_px = np.zeros((size, size), bool)
    if kind == "cell":
        h, w = rng.integers(size // 4, size // 3), rng.integers(size // 2, int(size * 0.8))
        y0, x0 = (size - h) // 2 + rng.integers(-6, 7), (size - w) // 2 + rng.integers(-6, 7)
        material[y0:y0 + h, x0:x0 + w] = True
        img[material] = layers[material]
    else:
        m = size // 10
        y0, y1, x0, x1 = m + rng.integers(0, 4), size - m - rng.integers(0, 4), m, size - m
        frame = np.zeros((size, size), bool)
        frame[y0:y1, x0:x1] = True
        frame[y0 + 3:y1 - 3, x0 + 3:x1 - 3] = False
        img[frame] = 230
        n_cells = rng.integers(3, 5)
        edges = np.linspace(x0 + 6, x1 - 6, n_cells + 1).astype(int)
        for a, b in zip(edges[:-1], edges[1:]):
            material[y0 + 6:y1 - 6, a + 1:b - 1] = True
        img[material] = layers[material] * 0.9
    if label in (1, 3):   # porosity: dark voids inside the material
        ys, xs = np.nonzero(material)
        for _ in range(rng.integers(3, 7)):
            k = rng.integers(len(ys))
            r = rng.uniform(2.0, 4.5)
            void = ((yy - ys[k]) / r) ** 2 + ((xx - xs[k]) / (r * rng.uniform(0.6, 1.6))) ** 2 <= 1
            img[void & material] = rng.uniform(25, 50)
            defect_px |= void & material
    if label == 4:        # resin overflow: a bright blob spilling over the casing edge
        cy, cx = (y1 if rng.random() < 0.5 else y0), rng.uniform(x0 + 10, x1 - 10)
        r = rng.uniform(6, 10)
        blob = ((yy - cy) / (r * 0.7)) ** 2 + ((xx - cx) / (r * 1.6)) ** 2 <= 1 + 0.3 * np.sin(xx)
        img[blob] = rng.uniform(240, 255)
        defect_px |= blob
    img += rng.normal(0, 6, img.shape)
    g = np.clip(img, 0, 255).astype(np.uint8)
    return (np.stack([g, g, g], -1), defect_px) if with_mask else np.stack([g, g, g], -1)


def make_builtin_dataset(root: Path, batteries_per_class: int = 8, slices_per_axis: int = 2,
                         size: int = 128, seed: int = 0) -> None:
    """images/CT_*.jpg for every class, train/val/test split files made by battery, and
    masks/<stem>.png (255 on defect pixels) for every defective slice."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(exist_ok=True)
    items = []
    for label, name in enumerate(CLASS_NAMES):
        kind = name.split("_")[0]
        package = "pouch" if kind == "cell" else "prismatic"
        for b in range(batteries_per_class):
            number = f"{label}{b:02d}"
            for axis in "xyz":
                for s in range(slices_per_axis):
                    path = root / "images" / f"CT_{kind}_{package}_{number}_{axis}_{100 + s}.jpg"
                    img, defect_px = _slice_image(rng, kind, label, axis, size, with_mask=True)
                    save_image(path, img)
                    if label in DEFECT_CLASSES:
                        save_image(root / "masks" / f"{path.stem}.png", defect_px.astype(np.uint8) * 255)
                    items.append((path, label))
    for split, files in split_by_battery(items).items():
        write_split(root / f"{split}.txt", files, relative_to=root)


def class_counts(items) -> list[int]:
    counts = Counter(y for _, y in items)
    return [counts.get(c, 0) for c in range(len(CLASS_NAMES))]

