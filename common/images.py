"""Sample grids for image-to-image tasks: rows of (input | output | ground truth ...) as one PNG."""
from __future__ import annotations

import os

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from common.io import atomic_open

GAP, HEADER = 4, 16


def to_uint8(t: torch.Tensor) -> np.ndarray:
    """(3,H,W) or (1,H,W) float in [0,1] -> HxWx3 uint8, rounded."""
    t = t.detach().float().cpu().clamp(0, 1)
    if t.shape[0] == 1:
        t = t.expand(3, -1, -1)
    return (t.permute(1, 2, 0).numpy() * 255.0 + 0.5).astype(np.uint8)


def save_image_grid(path: str | os.PathLike, columns: list[torch.Tensor], titles: list[str],
                    max_rows: int = 4) -> None:
    """One row per sample, one column per tensor (B,C,H,W) in [0,1], a title above each column.
    Columns of another size (a 2x output, say) are resized to the first column's size."""
    if len(columns) != len(titles):
        raise ValueError("one title per column")
    h, w = columns[0].shape[-2:]
    cols = [c if c.shape[-2:] == (h, w) else F.interpolate(c.float(), size=(h, w), mode="bilinear",
                                                           align_corners=False, antialias=True)
            for c in columns]
    rows = min(max_rows, min(c.shape[0] for c in cols))
    grid = np.full((HEADER + rows * (h + GAP), len(cols) * (w + GAP) - GAP, 3), 255, np.uint8)
    for j, c in enumerate(cols):
        for i in range(rows):
            y, x = HEADER + i * (h + GAP), j * (w + GAP)
            grid[y:y + h, x:x + w] = to_uint8(c[i])
    im = Image.fromarray(grid)
    draw = ImageDraw.Draw(im)
    for j, title in enumerate(titles):
        draw.text((j * (w + GAP) + 2, 2), title, fill=(0, 0, 0))
    with atomic_open(path, "wb") as f:
        im.save(f, format="PNG")
