"""Colorization data: the competition's CSV layout, the original's 80/20 split, pair loading with
the damaged-region mask, geometric augmentation, and the built-in demo set.

Layout (DACON 236420): a folder with
  train.csv   input_image_path,gt_image_path   (./train_input/TRAIN_00000.png, ./train_gt/TRAIN_00000.png)
  test.csv    input_image_path                 (./test_input/TEST_000.png)
and the images, paths relative to the CSV. Inputs are grayscale photos with damaged regions filled
with a flat gray; targets are the colour originals, at the same size.

Loading follows the original: the input is read as RGB (a gray PNG becomes three equal channels)
and both images are resized to img_size x img_size with OpenCV-style bilinear interpolation
(INTER_LINEAR: half-pixel centres, no antialiasing), the target with the same interpolation as the
input (the original resized it as a mask, nearest-neighbour). The damaged region is
`input != gray(gt)` with a small tolerance, found at the original resolution.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch.utils.data import Dataset

from common.data import read_csv
from common.io import UserError, load_image

TASK = "colorize"
BUILTIN_VERSION = "colorize-1"
TRAIN_COLUMNS = ("input_image_path", "gt_image_path")
TEST_COLUMNS = ("input_image_path",)
MASK_TOLERANCE = 2  # gray levels; covers OpenCV's vs Pillow's gray formula (they differ by at most 1)


# ---------------------------------------------------------------- pixels
def gray_u8(rgb: np.ndarray) -> np.ndarray:
    """OpenCV's cvtColor(RGB2GRAY) for uint8: (9798 R + 19235 G + 3735 B + 2^14) >> 15 (Pillow's
    convert("L") uses 16-bit weights and differs by at most one level)."""
    c = rgb.astype(np.int32)
    return ((c[..., 0] * 9798 + c[..., 1] * 19235 + c[..., 2] * 3735 + (1 << 14)) >> 15).astype(np.uint8)


def damage_mask(inp: np.ndarray, gt: np.ndarray, tolerance: int = MASK_TOLERANCE) -> np.ndarray:
    """Bool (H, W): where the input is not the gray version of the ground truth (any channel
    further than `tolerance` levels from gray(gt))."""
    g = gray_u8(gt).astype(np.int16)
    x = inp.astype(np.int16)
    d = np.abs(x - g[..., None]).max(-1) if x.ndim == 3 else np.abs(x - g)
    return d > tolerance


def resize_tensor(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(..., C, H, W) float -> (..., C, size[0], size[1]) with OpenCV INTER_LINEAR's geometry
    (half-pixel centres, edge clamping, no antialiasing). Identity when the size already matches."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    lead = x.shape[:-3]
    y = F.interpolate(x.reshape(-1, *x.shape[-3:]).float(), size=size, mode="bilinear", align_corners=False)
    return y.reshape(*lead, *y.shape[-3:])


def resize_u8(img: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """uint8 (H, W[, C]) -> uint8 resized to size=(h, w) like cv2.resize(INTER_LINEAR): within one
    gray level (OpenCV uses 11-bit fixed-point weights; this rounds the exact result, halves up),
    and equal for exact 2x downscaling (where OpenCV averages 2x2 blocks)."""
    if img.shape[:2] == tuple(size):
        return img
    t = torch.from_numpy(np.array(img, dtype=np.float32))
    t = t[None] if t.dim() == 2 else t.permute(2, 0, 1)
    out = resize_tensor(t, size).add_(0.5).floor_().clamp_(0, 255).to(torch.uint8)  # halves up, as OpenCV
    return (out[0] if img.ndim == 2 else out.permute(1, 2, 0)).contiguous().numpy()


def to_tensor(img: np.ndarray) -> torch.Tensor:
    """uint8 (H, W, C) -> float (C, H, W) in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1))).float().div_(255.0)


def to_u8(t: torch.Tensor) -> np.ndarray:
    """float (C, H, W) in [0, 1] -> uint8 (H, W, C), rounded (the original truncated)."""
    return t.detach().float().mul(255.0).round_().clamp_(0, 255).to(torch.uint8).permute(1, 2, 0).cpu().numpy()


# ---------------------------------------------------------------- CSVs and the split
def _resolve(csv_path: Path, line: int, value: str | None, column: str) -> Path:
    rel = (value or "").strip()
    if not rel:
        raise UserError(f"{csv_path}, line {line}: empty {column}")
    path = Path(rel)
    return path if path.is_absolute() else (csv_path.parent / path)


def read_pairs(csv_path: str | Path) -> list[tuple[Path, Path]]:
    """(input, ground truth) per row of a train.csv; a missing file names the CSV line."""
    csv_path = Path(csv_path)
    pairs = []
    for line, row in read_csv(csv_path, TRAIN_COLUMNS):
        inp = _resolve(csv_path, line, row["input_image_path"], "input_image_path")
        gt = _resolve(csv_path, line, row["gt_image_path"], "gt_image_path")
        for p in (inp, gt):
            if not p.is_file():
                raise UserError(f"{csv_path}, line {line}: image not found: {p}")
        pairs.append((inp, gt))
    return pairs


def read_inputs(csv_path: str | Path) -> list[Path]:
    """The input images of a test.csv, in row order."""
    csv_path = Path(csv_path)
    paths = []
    for line, row in read_csv(csv_path, TEST_COLUMNS):
        p = _resolve(csv_path, line, row["input_image_path"], "input_image_path")
        if not p.is_file():
            raise UserError(f"{csv_path}, line {line}: image not found: {p}")
        paths.append(p)
    return paths


def split_indices(n: int, val_fraction: float = 0.2, subset: float = 1.0, seed: int = 42) -> tuple[list[int], list[int]]:
    """(train rows, val rows), the original's split: pandas `df.sample(frac=subset, random_state=seed)`,
    then `sample(frac=0.2, random_state=seed)` of that for validation and the rest for training.
    pandas draws `RandomState(seed).permutation(len)[:round(frac * len)]`, reproduced here, so the
    default seed 42 gives the original's exact rows."""
    rows = np.arange(n)
    if subset < 1.0:
        rows = rows[np.random.RandomState(seed).permutation(n)[:round(subset * n)]]
    n_val = round(val_fraction * len(rows))
    val_pos = np.random.RandomState(seed).permutation(len(rows))[:n_val]
    is_val = np.zeros(len(rows), bool)
    is_val[val_pos] = True
    return rows[~is_val].tolist(), rows[val_pos].tolist()


# ---------------------------------------------------------------- dataset
def load_rgb(path: Path) -> np.ndarray:
    return np.asarray(load_image(path, "RGB"))


def load_pair(inp_path: Path, gt_path: Path) -> tuple[np.ndarray, np.ndarray]:
    inp, gt = load_rgb(inp_path), load_rgb(gt_path)
    if inp.shape != gt.shape:
        raise UserError(f"{inp_path}: input is {inp.shape[1]}x{inp.shape[0]} but its ground truth {gt_path} "
                        f"is {gt.shape[1]}x{gt.shape[0]}")
    return inp, gt


class PairDataset(Dataset):
    """(input, target, mask) tensors at img_size x img_size: input/target (3, S, S) in [0, 1], mask
    (1, S, S) in {0, 1}. `augment`: random flips and 90-degree rotations, the same for all three."""

    def __init__(self, pairs: list[tuple[Path, Path]], img_size: int, augment: bool = False,
                 tolerance: int = MASK_TOLERANCE):
        self.pairs, self.size, self.augment, self.tolerance = pairs, img_size, augment, tolerance

    def __len__(self):
        return len(self.pairs)

    def load(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """uint8 input, uint8 target and bool mask at the training size (no augmentation)."""
        inp, gt = load_pair(*self.pairs[i])
        mask = damage_mask(inp, gt, self.tolerance)
        size = (self.size, self.size)
        m = resize_tensor(torch.from_numpy(mask)[None].float(), size)[0] >= 0.5
        return resize_u8(inp, size), resize_u8(gt, size), m.numpy()

    def __getitem__(self, i):
        inp, gt, mask = self.load(i)
        x, y, m = to_tensor(inp), to_tensor(gt), torch.from_numpy(mask)[None].float()
        if self.augment:
            x, y, m = augment_geometric((x, y, m))
        return x, y, m


def augment_geometric(tensors: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """Horizontal flip, vertical flip, 90-degree rotation, each with p = 0.5 (the original's
    geometric set), drawn once from torch's RNG and applied identically to every tensor."""
    hflip, vflip, rot = (torch.rand(3) < 0.5).tolist()
    out = []
    for t in tensors:
        if hflip:
            t = t.flip(-1)
        if vflip:
            t = t.flip(-2)
        if rot:
            t = t.rot90(1, (-2, -1))
        out.append(t.contiguous())
    return tuple(out)


# ---------------------------------------------------------------- built-in demo data
def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Value noise in [0, 1]: a coarse random grid, bilinearly upsampled."""
    grid = torch.from_numpy(rng.random((1, 1, cells, cells)).astype(np.float32))
    return F.interpolate(grid, size=(size, size), mode="bilinear", align_corners=True)[0, 0].numpy()


def _scene(rng: np.random.Generator, size: int) -> np.ndarray:
    """A colour landscape whose colours follow from what the gray image shows: a blue sky graded
    towards the horizon, grass (fine texture) or sand (smooth ripples), a yellow sun, red houses
    with dark roofs, dark green trees."""
    yy, xx = np.mgrid[:size, :size].astype(np.float32)
    img = np.zeros((size, size, 3), np.float32)
    horizon = int(size * rng.uniform(0.35, 0.6))
    t = (yy / max(1, horizon))[..., None]
    top = np.array([30, 80, 190]) + rng.uniform(-15, 15, 3)
    low = np.array([160, 205, 240]) + rng.uniform(-10, 10, 3)
    img[:] = top * (1 - t) + low * t
    ground = yy >= horizon
    if rng.random() < 0.6:   # grass: fine, high-contrast texture
        tex = _smooth_noise(rng, size, size // 4) * 0.6 + rng.random((size, size)) * 0.4
        grass = np.stack([40 + 50 * tex, 110 + 80 * tex, 30 + 30 * tex], -1)
        img[ground] = grass[ground]
    else:                    # sand: smooth diagonal ripples
        ripple = 0.5 + 0.5 * np.sin((xx + 0.5 * yy) / rng.uniform(3, 6))
        sand = np.stack([200 + 30 * ripple, 170 + 30 * ripple, 110 + 20 * ripple], -1)
        img[ground] = sand[ground]
    if rng.random() < 0.7:   # sun
        cy, cx, r = rng.uniform(0.1, 0.3) * size, rng.uniform(0.15, 0.85) * size, rng.uniform(0.06, 0.12) * size
        img[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = (250, 205, 60)
    for _ in range(rng.integers(0, 3)):   # houses: red walls, dark roof
        w, h = rng.uniform(0.12, 0.22) * size, rng.uniform(0.1, 0.18) * size
        x0, base = rng.uniform(0, size - w), rng.uniform(horizon + h, size)
        wall = (xx >= x0) & (xx < x0 + w) & (yy >= base - h) & (yy < base)
        img[wall] = (190, 45, 40)
        roof = (yy < base - h) & (yy >= base - h - 0.6 * h) & (np.abs(xx - (x0 + w / 2)) <= (yy - (base - h - 0.6 * h)) / (0.6 * h) * w / 2)
        img[roof] = (70, 40, 35)
    for _ in range(rng.integers(0, 4)):   # trees: dark green triangles on brown trunks
        w, h = rng.uniform(0.08, 0.14) * size, rng.uniform(0.15, 0.3) * size
        cx, base = rng.uniform(0, size), rng.uniform(horizon, size)
        tri = (yy <= base) & (yy >= base - h) & (np.abs(xx - cx) <= (yy - (base - h)) / h * w / 2)
        img[tri] = (25, 90, 40)
        trunk = (np.abs(xx - cx) <= w / 8) & (yy > base) & (yy <= base + 0.2 * h)
        img[trunk] = (100, 70, 40)
    img += rng.normal(0, 2.0, img.shape)
    return np.clip(img, 0, 255).round().astype(np.uint8)


def _damage(rng: np.random.Generator, gray: np.ndarray) -> np.ndarray:
    """1-2 random polygons (3-8 vertices, at least a fifth of the side across) filled with one
    random gray each, as the competition's inputs and its public baseline's masks look."""
    size = gray.shape[0]
    im = Image.fromarray(gray)
    draw = ImageDraw.Draw(im)
    for _ in range(rng.integers(1, 3)):
        n = int(rng.integers(3, 9))
        cx, cy = rng.uniform(0.2, 0.8, 2) * size
        radius = rng.uniform(0.1, 0.25) * size
        angles = np.sort(rng.uniform(0, 2 * math.pi, n))
        radii = radius * rng.uniform(0.5, 1.0, n)
        pts = [(float(cx + r * math.cos(a)), float(cy + r * math.sin(a))) for a, r in zip(angles, radii)]
        draw.polygon(pts, fill=int(rng.integers(0, 256)))
    return np.asarray(im)


def make_builtin_dataset(root: Path, n_train: int = 240, n_test: int = 16, size: int = 128, seed: int = 0) -> None:
    """Write train_input/, train_gt/, test_input/ (+ test_gt/, for colorize/evaluate.py), train.csv
    and test.csv under `root`, in the competition's layout."""
    rng = np.random.default_rng(seed)
    for split, prefix, n, digits in (("train", "TRAIN", n_train, 5), ("test", "TEST", n_test, 3)):
        rows = []
        for sub in ("input", "gt"):
            (root / f"{split}_{sub}").mkdir(parents=True, exist_ok=True)
        for i in range(n):
            name = f"{prefix}_{i:0{digits}d}.png"
            rgb = _scene(rng, size)
            # plain writes: ensure_builtin moves the finished folder into place in one rename
            Image.fromarray(_damage(rng, gray_u8(rgb))).save(root / f"{split}_input" / name)
            Image.fromarray(rgb).save(root / f"{split}_gt" / name)
            rows.append((f"./{split}_input/{name}", f"./{split}_gt/{name}"))
        if split == "train":
            text = "input_image_path,gt_image_path\n" + "".join(f"{a},{b}\n" for a, b in rows)
        else:
            text = "input_image_path\n" + "".join(f"{a}\n" for a, _ in rows)
        (root / f"{split}.csv").write_text(text)
