"""CRBL data: CSV datasets, the two preprocessing paths (full / crop), and the built-in demo set.

CSV format (as in the original port): a header `image_path,impurity`, image paths relative to the
CSV file, impurity 0 (normal) or 1 (defect). A dataset folder holds `train.csv` and `val.csv`.

Preprocessing follows the original port with numpy/PIL instead of OpenCV:
  full: drop the first 4 rows and columns, bicubic resize to 128x128, /255.
  crop: gray mask of values 0-150, bounding box of the largest 8-connected region, bottom edge
        clipped at row 89 (the original's `if y+h > 89: h = 89-y`), trimmed by one pixel on each
        side, area-resize to 100x100, bicubic to 128x128, /255. Images where no region is found
        fall back to the whole image.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from common.data import read_csv
from common.io import UserError, load_image, save_image

INPUT_SIZE = 128
CROP_MAX_BOTTOM = 89
BUILTIN_VERSION = "crbl-2"   # 2: masks/<stem>.png (255 on defect pixels) per defective image


# ---------------------------------------------------------------- connected components
def largest_region_bbox(mask: np.ndarray) -> tuple[int, int, int, int] | None:
    """(x, y, w, h) of the largest 8-connected True region (by pixel count), None if empty.

    Union-find over horizontal runs instead of pixels: a few thousand runs even for large images.
    """
    m = np.pad(mask.astype(np.int8), ((0, 0), (1, 1)))
    d = np.diff(m, axis=1)
    rows, starts = np.nonzero(d == 1)
    _, ends = np.nonzero(d == -1)  # exclusive; row-major order pairs them with the starts
    n = len(rows)
    if n == 0:
        return None
    parent = np.arange(n)

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    row_first = np.searchsorted(rows, np.arange(mask.shape[0] + 1))
    for r in range(1, mask.shape[0]):
        a, a_end = row_first[r - 1], row_first[r]      # runs of the row above
        b, b_end = row_first[r], row_first[r + 1]      # runs of this row
        while a < a_end and b < b_end:
            # 8-connectivity: runs touch when they overlap or meet diagonally
            if starts[a] <= ends[b] and starts[b] <= ends[a]:
                ra, rb = find(a), find(b)
                if ra != rb:
                    parent[max(ra, rb)] = min(ra, rb)
            if ends[a] < ends[b]:
                a += 1
            else:
                b += 1
    roots = np.array([find(i) for i in range(n)])
    sizes = np.bincount(roots, weights=ends - starts)
    best = roots == int(np.argmax(sizes))
    y0, y1 = rows[best].min(), rows[best].max()
    x0, x1 = starts[best].min(), ends[best].max()
    return int(x0), int(y0), int(x1 - x0), int(y1 - y0 + 1)


# ---------------------------------------------------------------- preprocessing
def _resize(a: np.ndarray, size: int, resample) -> np.ndarray:
    return np.asarray(Image.fromarray(a).resize((size, size), resample))


def preprocess_full(rgb: np.ndarray) -> np.ndarray:
    """uint8 HxWx3 -> float32 128x128x3 in [0,1]."""
    a = rgb[4:, 4:] if rgb.shape[0] > 4 and rgb.shape[1] > 4 else rgb
    return _resize(np.ascontiguousarray(a), INPUT_SIZE, Image.BICUBIC).astype(np.float32) / 255.0


def crop_box(rgb: np.ndarray) -> tuple[int, int, int, int] | None:
    """(y0, y1, x0, x1) of the part region used by the crop path, or None."""
    gray = np.asarray(Image.fromarray(rgb).convert("L"))
    box = largest_region_bbox(gray <= 150)
    if box is None:
        return None
    x, y, w, h = box
    if y + h > CROP_MAX_BOTTOM:
        h = CROP_MAX_BOTTOM - y
    y0, y1, x0, x1 = y + 1, y + h - 1, x + 1, x + w - 1
    return (y0, y1, x0, x1) if y1 > y0 and x1 > x0 else None


def preprocess_crop(rgb: np.ndarray) -> np.ndarray:
    """uint8 HxWx3 -> float32 128x128x3 in [0,1]: the part's bounding box, area- then bicubic-resized."""
    box = crop_box(rgb)
    a = rgb if box is None else rgb[box[0]:box[1], box[2]:box[3]]
    a = _resize(np.ascontiguousarray(a), 100, Image.BOX)
    return _resize(a, INPUT_SIZE, Image.BICUBIC).astype(np.float32) / 255.0


def preprocess(path: str | Path, model_type: str) -> torch.Tensor:
    """Image file -> (3,128,128) float tensor for the `crop` or `full` model."""
    rgb = np.asarray(load_image(path, "RGB"))
    a = preprocess_crop(rgb) if model_type == "crop" else preprocess_full(rgb)
    return torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1)))


# ---------------------------------------------------------------- datasets
def parse_impurity(text: str, where: str) -> int:
    """The CSV label: 0 / 1 (also written 0.0 / 1.0 by pandas)."""
    label = (text or "").strip()
    if label not in ("0", "1", "0.0", "1.0"):
        raise UserError(f"{where}: impurity must be 0 or 1 (got {label!r})")
    return int(float(label))


def read_image_csv(csv_path: str | Path, labels: bool = True) -> list[tuple[Path, int | None]]:
    """(absolute image path, label) per row of an `image_path[,impurity]` CSV; without `labels` the
    impurity column is optional (label None where absent or empty). Every problem names the file
    and line."""
    csv_path = Path(csv_path)
    items = []
    rows = read_csv(csv_path, ("image_path", "impurity") if labels else ("image_path",))
    for line, row in rows:
        where = f"{csv_path}, line {line}"
        rel = (row["image_path"] or "").strip()
        if not rel:
            raise UserError(f"{where}: empty image_path")
        if "\0" in rel:
            raise UserError(f"{where}: image_path contains a NUL byte")
        label = row.get("impurity")
        label = parse_impurity(label, where) if labels or (label or "").strip() else None
        path = (csv_path.parent / rel).resolve()
        if not path.is_file():
            raise UserError(f"{where}: image not found: {path}")
        items.append((path, label))
    return items


def read_labels(csv_path: str | Path) -> list[tuple[Path, int]]:
    return read_image_csv(csv_path, labels=True)


class CRBLDataset(Dataset):
    """Preprocessed once into memory (128x128 inputs are small); augmentation on the fly."""

    def __init__(self, items: list[tuple[Path, int]], model_type: str, augment: bool = False):
        self.paths = [p for p, _ in items]
        self.labels = torch.tensor([y for _, y in items], dtype=torch.float32)
        self.images = torch.stack([preprocess(p, model_type) for p in self.paths])
        self.augment = augment

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        x = self.images[i]
        if self.augment:
            if torch.rand(()) < 0.5:
                x = x.flip(-1)
            if torch.rand(()) < 0.5:
                x = x.flip(-2)
            gain = 1.0 + 0.2 * (torch.rand(()) - 0.5)   # +-10% brightness
            x = (x * gain).clamp(0.0, 1.0)
        return x, self.labels[i]


# ---------------------------------------------------------------- built-in demo data
def _part_image(rng: np.random.Generator, defect: bool, size: int = 120, with_mask: bool = False):
    """The image, or (image, defect mask) `with_mask`: a bright background with a darker machined
    part in the upper area; defects are dark inclusions or bright scratches on the part. The mask
    is True where a defect changed a pixel."""
    img = np.full((size, size, 3), 235, np.float32) + rng.normal(0, 4, (size, size, 1))
    y0, x0 = rng.integers(8, 20), rng.integers(8, 30)
    h, w = rng.integers(55, 70), rng.integers(60, 80)
    yy, xx = np.mgrid[:size, :size]
    cy, cx = y0 + h / 2, x0 + w / 2
    part = ((np.abs(yy - cy) / (h / 2)) ** 4 + (np.abs(xx - cx) / (w / 2)) ** 4) <= 1.0  # rounded box
    defect_px = np.zeros((size, size), bool)
    base = rng.uniform(95, 130)
    shade = base + 10 * np.sin(xx / rng.uniform(4, 9)) + rng.normal(0, 3, (size, size))
    img[part] = np.stack([shade, shade * 0.97, shade * 0.93], -1)[part]
    if defect:
        for _ in range(rng.integers(1, 4)):
            py, px = rng.integers(int(cy - h / 3), int(cy + h / 3)), rng.integers(int(cx - w / 3), int(cx + w / 3))
            if rng.random() < 0.6:   # dark inclusion
                r = rng.uniform(3, 7)
                blob = (yy - py) ** 2 + (xx - px) ** 2 <= r * r
                img[blob & part] = rng.uniform(10, 35)
                defect_px |= blob & part
            else:                    # bright scratch
                ang = rng.uniform(0, np.pi)
                length = rng.uniform(12, 25)
                t = np.linspace(-length / 2, length / 2, 80)
                ys = np.clip((py + t * np.sin(ang)).astype(int), 0, size - 1)
                xs = np.clip((px + t * np.cos(ang)).astype(int), 0, size - 1)
                for dy in (0, 1):
                    img[np.clip(ys + dy, 0, size - 1), xs] = rng.uniform(200, 240)
                    defect_px[np.clip(ys + dy, 0, size - 1), xs] = True
    img = np.clip(img, 0, 255).astype(np.uint8)
    return (img, defect_px) if with_mask else img


def make_builtin_dataset(root: Path, n_train: int = 192, n_val: int = 64, seed: int = 0) -> None:
    """Write images/*.png plus train.csv and val.csv (balanced classes) under `root`, and
    masks/<stem>.png (255 on defect pixels) for every defective image."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(exist_ok=True)
    for split, n in (("train", n_train), ("val", n_val)):
        lines = ["image_path,impurity"]
        for i in range(n):
            label = i % 2
            name = f"images/{split}_{i:04d}_{'defect' if label else 'normal'}.png"
            img, defect_px = _part_image(rng, bool(label), with_mask=True)
            save_image(root / name, img)
            if label:
                save_image(root / "masks" / Path(name).name, defect_px.astype(np.uint8) * 255)
            lines.append(f"{name},{label}")
        (root / f"{split}.csv").write_text("\n".join(lines) + "\n")
