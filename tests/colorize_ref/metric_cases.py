"""Deterministic (pred, gt, mask) cases for the competition-score fixture.

Used twice: by make_metric_fixture.py (with OpenCV + scikit-image installed) to record reference
values, and by tests/test_colorize_metrics.py to recompute them with colorize.metrics. Only numpy
here. Each case carries a checksum in the fixture, so a change in how the cases are generated shows
up as such and not as a metric mismatch.
"""
from __future__ import annotations

import hashlib

import numpy as np


def _scene(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Colour image with structure: two gradients, a disc, a bar, mild noise."""
    yy, xx = np.mgrid[:h, :w].astype(np.float64)
    base = np.stack([255 * yy / max(1, h - 1), 255 * xx / max(1, w - 1),
                     127 + 100 * np.sin(xx / rng.uniform(3, 9) + yy / rng.uniform(4, 11))], -1)
    cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(2, max(3, min(h, w) / 3))
    base[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = rng.integers(0, 256, 3)
    y0 = int(rng.integers(0, max(1, h - 3)))
    base[y0:y0 + 3] = rng.integers(0, 256, 3)
    return np.clip(base + rng.normal(0, 6, base.shape), 0, 255).round().astype(np.uint8)


def _gray3(rgb: np.ndarray) -> np.ndarray:
    c = rgb.astype(np.int32)
    g = ((c[..., 0] * 9798 + c[..., 1] * 19235 + c[..., 2] * 3735 + (1 << 14)) >> 15).astype(np.uint8)
    return np.repeat(g[..., None], 3, -1)


def _mask(rng: np.random.Generator, h: int, w: int, kind: str) -> np.ndarray:
    m = np.zeros((h, w), bool)
    if kind == "rect":
        y, x = rng.integers(0, h // 2), rng.integers(0, w // 2)
        m[y:y + rng.integers(3, h // 2 + 3), x:x + rng.integers(3, w // 2 + 3)] = True
    elif kind == "disc":
        yy, xx = np.mgrid[:h, :w]
        m[(yy - h / 2) ** 2 / (h / 3) ** 2 + (xx - w / 3) ** 2 / (w / 4) ** 2 <= 1] = True
    elif kind == "scatter":
        m = rng.random((h, w)) < 0.1
    elif kind.startswith("pixels"):          # exactly n damaged pixels, scattered
        n = int(kind[6:])
        m.ravel()[rng.choice(h * w, n, replace=False)] = True
    elif kind == "all":
        m[:] = True
    return m


def make_cases() -> list[tuple[str, np.ndarray, np.ndarray, np.ndarray]]:
    """[(name, pred, gt, mask)]: uint8 (H, W, 3) RGB pred and gt, bool (H, W) mask."""
    rng = np.random.default_rng(236420)
    cases = []
    sizes = [(16, 16), (23, 37), (48, 64), (64, 64), (100, 75), (7, 40)]
    masks = ["rect", "disc", "scatter", "pixels7", "pixels8", "all"]
    preds = ["noisy", "random", "gray_input", "blurred", "tinted", "near_constant"]
    for i, (h, w) in enumerate(sizes):
        for j, kind in enumerate(preds):
            gt = _scene(rng, h, w)
            if kind == "noisy":
                pred = np.clip(gt.astype(int) + rng.integers(-25, 26, gt.shape), 0, 255).astype(np.uint8)
            elif kind == "random":
                pred = rng.integers(0, 256, gt.shape, dtype=np.uint8)
            elif kind == "gray_input":   # the "return the gray input" baseline
                pred = _gray3(gt)
            elif kind == "blurred":
                p = gt.astype(np.float64)
                p = (p + np.roll(p, 1, 0) + np.roll(p, -1, 0) + np.roll(p, 1, 1) + np.roll(p, -1, 1)) / 5
                pred = p.round().astype(np.uint8)
            elif kind == "tinted":       # hue shifted: swap channels
                pred = gt[..., [1, 2, 0]].copy()
            else:                        # data range of 1 gray level
                pred = rng.integers(120, 122, gt.shape, dtype=np.uint8)
            mask = _mask(rng, h, w, masks[(i + j) % len(masks)])
            cases.append((f"{h}x{w}_{kind}_{masks[(i + j) % len(masks)]}", pred, gt, mask))
    # hue corner cases: pure gray images (hue 0 everywhere), saturated primaries and secondaries
    gt = _scene(rng, 32, 32)
    cases.append(("gray_vs_gray", _gray3(gt), _gray3(gt[::-1]), _mask(rng, 32, 32, "rect")))
    prim = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0], [0, 255, 255], [255, 0, 255],
                     [255, 1, 0], [255, 0, 1], [1, 0, 255], [0, 1, 255]], np.uint8)
    tiles = np.repeat(np.repeat(prim[None], 8, 0), 4, 1)          # (8, 40, 3)
    cases.append(("primaries", tiles[:, ::-1].copy(), tiles, _mask(rng, 8, 40, "scatter") | _mask(rng, 8, 40, "pixels8")))
    # fewer than 7 damaged pixels: scikit-image raises, colorize.metrics returns NaN
    gt = _scene(rng, 24, 24)
    cases.append(("pixels6", gt[::-1].copy(), gt, _mask(rng, 24, 24, "pixels6")))
    cases.append(("pixels0", gt[::-1].copy(), gt, _mask(rng, 24, 24, "none")))
    # two at the competition's size
    for k in range(2):
        gt = _scene(rng, 512, 512)
        pred = np.clip(gt.astype(int) + rng.integers(-40, 41, gt.shape), 0, 255).astype(np.uint8)
        if k:
            pred = _gray3(gt)
        cases.append((f"512x512_{'gray' if k else 'noisy'}", pred, gt, _mask(rng, 512, 512, "disc")))
    return cases


def checksum(pred: np.ndarray, gt: np.ndarray, mask: np.ndarray) -> str:
    h = hashlib.sha1()
    for a in (pred, gt, mask.astype(np.uint8)):
        h.update(str(a.shape).encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def all_colours() -> np.ndarray:
    """Every 8-bit RGB colour once, as a (256, 65536, 3) image: row r holds red = r."""
    r = np.arange(256, dtype=np.uint8)
    return np.stack(np.meshgrid(r, r, r, indexing="ij"), -1).reshape(256, 65536, 3)


def resize_source() -> np.ndarray:
    """A 90x70 structured RGB image for the resize comparison with OpenCV."""
    return _scene(np.random.default_rng(5), 90, 70)


RESIZE_SIZES = [(45, 35), (64, 64), (32, 16), (96, 72), (90, 70)]   # (h, w), down, up and same
SPLIT_CASES = [(100, 1.0), (37, 1.0), (250, 0.3), (29603, 0.02)]      # (rows, subset fraction)
