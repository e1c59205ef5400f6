"""Explanation maps for the inspection models: where a model sees a defect.

Class-activation maps come from the pytorch-grad-cam package (`grad-cam` on PyPI): Grad-CAM,
Grad-CAM++ and the gradient-free Eigen-CAM. This module holds what every task shares: the
command-line flags, running a CAM over a batch, drawing an overlay with a colour bar, mapping a
map back through a crop, and the localisation metrics against ground-truth masks (pointing game,
pixel ROC-AUC, and what a random map scores).

A map is float32 HxW of the image as read from disk, finite, larger = more evidence of a defect.
"""
from __future__ import annotations

import argparse
import functools
import io
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from common.data import IMAGE_SUFFIXES
from common.io import UserError

METHODS = ("gradcam", "gradcam++", "eigencam")
DILATION_PX = 5          # the pointing game counts a hit within this distance of the mask
PANEL = 256              # the overlay picture shows image and map at least this many pixels high


# ---------------------------------------------------------------- command line
def add_explain_args(p: argparse.ArgumentParser, classes: tuple[str, ...] = ()) -> None:
    g = p.add_argument_group("explain and review")
    g.add_argument("--explain", action="store_true",
                   help="write OUT/explain/<stem>.npy (the map, HxW of the image) and <stem>.png (overlay)")
    g.add_argument("--explain-method", choices=METHODS, default="gradcam",
                   help="classifiers: gradcam (default), gradcam++ or eigencam (no gradients)")
    if classes:
        g.add_argument("--explain-class", metavar="NAME",
                       help=f"explain this class instead of the predicted one ({', '.join(classes)})")
    g.add_argument("--masks", type=Path, metavar="DIR",
                   help="ground-truth masks DIR/<stem>.png (non-zero = defect): localisation metrics into "
                        "metrics.json (automatic on the built-in data)")
    g.add_argument("--report", action="store_true", help="write OUT/report.html, a review page that works offline")


def check_explain_args(args, engine: str) -> None:
    """The combinations that cannot work, before any work is done."""
    if engine == "onnxruntime" and args.explain:
        raise UserError("--explain needs the PyTorch engine (maps need gradients and inner layers): "
                        "run with --weights instead of --engine onnxruntime")
    if args.masks is not None and not args.explain:
        raise UserError("--masks scores explanation maps: add --explain")
    if args.masks is not None and not args.masks.is_dir():
        raise UserError(f"--masks {args.masks}: not a folder")


# ---------------------------------------------------------------- class-activation maps
def _graph_starts_here(module, inputs, output):
    """Forward hook: the layer's output becomes a leaf that needs a gradient, so everything before it
    runs without autograd (and a frozen network takes its inference fast path) and the backward pass
    runs only through the layers after it: Grad-CAM needs the gradient at this layer, not below."""
    if torch.is_grad_enabled() and isinstance(output, torch.Tensor):
        return output.detach().requires_grad_(True)
    return None


def make_cam(model: torch.nn.Module, target_layers: list[torch.nn.Module], method: str):
    """A pytorch-grad-cam object; with several target layers, each layer's map is scaled to [0, 1]
    and the maps are averaged (the package's aggregation), then scaled to [0, 1] again. The model's
    parameters should not need gradients (model.requires_grad_(False))."""
    from pytorch_grad_cam import EigenCAM, GradCAM, GradCAMPlusPlus
    cls = {"gradcam": GradCAM, "gradcam++": GradCAMPlusPlus, "eigencam": EigenCAM}[method]
    for layer in target_layers:     # registered before the package's own hooks, which then see the leaf
        layer.register_forward_hook(_graph_starts_here)
    return cls(model=model, target_layers=target_layers)


def cam_maps(cam, x: torch.Tensor, classes: list[int] | None = None) -> np.ndarray:
    """(B, H, W) float32 in [0, 1] at the model's input size, for class index `classes[i]` of
    image i (None: output 0, a single-logit model's defect logit)."""
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    targets = [ClassifierOutputTarget(int(c)) for c in (classes if classes is not None else [0] * len(x))]
    with torch.enable_grad():
        maps = cam(input_tensor=x, targets=targets)
    cam.outputs = None    # the package keeps the last outputs (and their graph) alive otherwise
    return np.nan_to_num(np.asarray(maps, np.float32))


def resize_map(m: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize of a float map (PIL mode F)."""
    if m.shape == (height, width):
        return m.astype(np.float32, copy=False)
    return np.asarray(Image.fromarray(m.astype(np.float32)).resize((width, height), Image.BILINEAR), np.float32)


def paste_map(m: np.ndarray, box: tuple[int, int, int, int] | None, shape: tuple[int, int]) -> np.ndarray:
    """A map of a crop back into the full image: `box` (y0, y1, x0, x1) gets `m` resized to it,
    everything outside is 0; box None means the whole image."""
    h, w = shape
    if box is None:
        return resize_map(m, h, w)
    y0, y1, x0, x1 = box
    out = np.zeros((h, w), np.float32)
    out[y0:y1, x0:x1] = resize_map(m, y1 - y0, x1 - x0)
    return out


def smooth(m: np.ndarray, sigma: float) -> np.ndarray:
    from scipy.ndimage import gaussian_filter
    return gaussian_filter(m.astype(np.float32), sigma).astype(np.float32)


# ---------------------------------------------------------------- overlay pictures
_LUT = None


def colour(m01: np.ndarray) -> np.ndarray:
    """HxW in [0, 1] -> HxWx3 uint8 through matplotlib's 'jet' colour map (the CAM convention)."""
    global _LUT
    if _LUT is None:
        import matplotlib
        _LUT = (matplotlib.colormaps["jet"](np.linspace(0, 1, 256))[:, :3] * 255).round().astype(np.uint8)
    return _LUT[(np.clip(m01, 0, 1) * 255).round().astype(np.uint8)]


@functools.lru_cache(maxsize=8)
def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:    # Pillow < 10.1: the fixed bitmap font
        return ImageFont.load_default()


def overlay_picture(rgb: np.ndarray, heat: np.ndarray, title: str, vmax: float | None = None,
                    alpha: float = 0.45) -> np.ndarray:
    """The image and the image with `heat` blended over it, side by side, with a labelled colour bar
    (0 .. vmax, default the map's maximum) and a title line. Small images are enlarged (nearest) so
    the picture reads at a glance; large ones are reduced to at most 1024 px high."""
    h, w = heat.shape
    vmax = float(vmax if vmax is not None else max(float(heat.max()), 1e-12))
    blend = (1 - alpha) * rgb.astype(np.float32) + alpha * colour(heat / vmax).astype(np.float32)
    scale = max(PANEL / h, 1.0) if h < PANEL else min(1.0, 1024 / h)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    resample = Image.NEAREST if scale > 1 else Image.BILINEAR
    left = Image.fromarray(rgb).resize(size, resample)
    right = Image.fromarray(blend.round().astype(np.uint8)).resize(size, resample)
    fs = max(12, size[1] // 22)
    font = _font(fs)
    top, gap, bar_w, label_w = fs + 12, 8, max(14, size[1] // 20), fs * 5
    canvas = Image.new("RGB", (2 * size[0] + 3 * gap + bar_w + label_w, size[1] + top + gap), "white")
    canvas.paste(left, (gap, top))
    canvas.paste(right, (2 * gap + size[0], top))
    bar = colour(np.linspace(1, 0, size[1])[:, None].repeat(bar_w, 1))
    bx = 3 * gap + 2 * size[0]
    canvas.paste(Image.fromarray(bar), (bx, top))
    d = ImageDraw.Draw(canvas)
    d.text((gap, 4), title, fill="black", font=font)
    for frac in (0.0, 0.5, 1.0):
        y = top + round((1 - frac) * (size[1] - 1))
        d.line([(bx + bar_w, y), (bx + bar_w + 4, y)], fill="black")
        d.text((bx + bar_w + 6, min(max(y - fs // 2, top), top + size[1] - fs)), f"{frac * vmax:.3g}",
               fill="black", font=font)
    return np.asarray(canvas)


def write_quick(path: Path, data: bytes) -> None:
    """Per-image outputs (maps, pictures, thumbnails): written next to `path` and renamed into place,
    so no half-written file shows, but without the two fsyncs of common.io.atomic_open, which cost
    more than the map itself for thousands of small files. These files are re-made by a rerun."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def png_bytes(a: np.ndarray, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format=fmt, **kw)
    return buf.getvalue()


class MapWriter:
    """Writes OUT/explain/<stem>.npy and <stem>.png per image, scores them against masks when
    given, and keeps nothing but the per-image numbers: memory does not grow with the images."""

    def __init__(self, folder: Path, masks: "Masks | None" = None, vmax: float | None = 1.0):
        self.folder, self.masks, self.vmax = Path(folder), masks, vmax
        self.loc = Localisation()

    def add(self, stem: str, rgb: np.ndarray, heat: np.ndarray, title: str) -> None:
        heat = np.nan_to_num(heat.astype(np.float32))
        if heat.shape != rgb.shape[:2]:
            raise ValueError(f"map {heat.shape} does not match the image {rgb.shape[:2]}")
        buf = io.BytesIO()
        np.save(buf, heat)
        write_quick(self.folder / f"{stem}.npy", buf.getvalue())
        picture = overlay_picture(rgb, heat, title, self.vmax)
        write_quick(self.folder / f"{stem}.png", png_bytes(picture, compress_level=1))
        if self.masks is not None:
            mask = self.masks.get(stem)
            if mask is not None:
                self.loc.add(heat, mask)


# ---------------------------------------------------------------- ground truth and localisation
def output_stems(paths: list[Path]) -> list[str]:
    """File stems for per-image outputs; numbered when two inputs share a stem."""
    stems = [p.stem for p in paths]
    return stems if len(set(stems)) == len(stems) else [f"{i:05d}_{s}" for i, s in enumerate(stems)]


def _find_mask(folder: Path, stem: str) -> Path | None:
    for suffix in (".png",) + tuple(s for s in IMAGE_SUFFIXES if s != ".png"):
        if (folder / f"{stem}{suffix}").is_file():
            return folder / f"{stem}{suffix}"
    return None


class Masks:
    """Ground-truth masks DIR/<image stem>.png (non-zero = defect), checked before any work: every
    image labelled defective needs one, and a mask must have its image's size."""

    def __init__(self, folder: Path, paths: list[Path], stems: list[str], defective: list[bool] | None):
        self.folder = Path(folder)
        self.files: dict[str, Path] = {}
        missing = []
        for i, (path, stem) in enumerate(zip(paths, stems)):
            found = _find_mask(self.folder, path.stem)
            if found is None:
                if defective is not None and defective[i]:
                    missing.append(path.name)
                continue
            with Image.open(found) as m, Image.open(path) as im:
                if m.size != im.size:
                    raise UserError(f"--masks: {found} is {m.size[0]}x{m.size[1]} but its image {path} is "
                                    f"{im.size[0]}x{im.size[1]}")
            self.files[stem] = found
        if missing:
            more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
            raise UserError(f"--masks {self.folder}: no mask for {len(missing)} defective image(s): "
                            f"{', '.join(missing[:3])}{more} (expected <stem>.png)")
        if not self.files:
            raise UserError(f"--masks {self.folder}: no mask matches any input image (expected <image stem>.png)")

    def get(self, stem: str) -> np.ndarray | None:
        f = self.files.get(stem)
        if f is None:
            return None
        with Image.open(f) as m:
            return np.asarray(m.convert("L")) > 0


def dilate(mask: np.ndarray, radius: int = DILATION_PX) -> np.ndarray:
    """The mask grown by a disk of `radius` pixels."""
    from scipy.ndimage import binary_dilation
    yy, xx = np.mgrid[-radius:radius + 1, -radius:radius + 1]
    return binary_dilation(mask, structure=yy ** 2 + xx ** 2 <= radius ** 2)


def pixel_auc(heat: np.ndarray, mask: np.ndarray) -> float:
    """ROC-AUC of the map's values as a defect-pixel detector (ties share their average rank)."""
    from scipy.stats import rankdata
    y = mask.ravel().astype(bool)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(heat.ravel().astype(np.float64))
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


class Localisation:
    """Pointing game (is the map's maximum on the mask dilated by 5 px?) and pixel ROC-AUC per image
    with a non-empty mask, averaged over those images; the random map's expected scores beside them:
    its maximum falls anywhere with equal chance (hit rate = the dilated mask's share of the image)
    and its pixel ROC-AUC is 0.5."""

    def __init__(self):
        self.hits: list[bool] = []
        self.aucs: list[float] = []
        self.chance: list[float] = []

    def add(self, heat: np.ndarray, mask: np.ndarray) -> None:
        if not mask.any():
            return
        grown = dilate(mask)
        top = np.flatnonzero(heat == heat.max())      # a flat map points everywhere: count it by its share
        self.hits.append(float(grown.ravel()[top].mean()))
        self.chance.append(float(grown.mean()))
        auc = pixel_auc(heat, mask)
        if not np.isnan(auc):
            self.aucs.append(auc)

    def summary(self) -> dict:
        n = len(self.hits)
        return {"images_with_defect_masks": n, "dilation_px": DILATION_PX,
                "pointing_game": float(np.mean(self.hits)) if n else None,
                "pixel_roc_auc": float(np.mean(self.aucs)) if self.aucs else None,
                "random_map": {"pointing_game": float(np.mean(self.chance)) if n else None,
                               "pixel_roc_auc": 0.5 if self.aucs else None},
                "how": "per image with a non-empty mask, averaged; pixel ROC-AUC per image (all its pixels); "
                       "random_map = the expected score of a map of independent random values"}


def describe(summary: dict) -> str:
    if not summary.get("images_with_defect_masks"):
        return "localisation: no image with a non-empty mask"
    r = summary["random_map"]
    return (f"localisation on {summary['images_with_defect_masks']} defective image(s): pointing game "
            f"{summary['pointing_game']:.3f} (random map {r['pointing_game']:.3f}), pixel ROC-AUC "
            f"{summary['pixel_roc_auc']:.3f} (random map 0.5)")
