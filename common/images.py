"""Sample grids for image-to-image tasks: rows of (input | output | ground truth ...) as one PNG."""
from __future__ import annotations

import math
import os

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

from common.io import atomic_open

GAP = 6
MIN_WIDTH = 768        # a grid narrower than this is too small to judge on a screen
TITLE_PX = 20          # title font size; shrunk (down to 11) only where a column is too narrow


def to_uint8(t: torch.Tensor) -> np.ndarray:
    """(3,H,W) or (1,H,W) float in [0,1] -> HxWx3 uint8, rounded."""
    t = t.detach().float().cpu().clamp(0, 1)
    if t.shape[0] == 1:
        t = t.expand(3, -1, -1)
    return (t.permute(1, 2, 0).numpy() * 255.0 + 0.5).astype(np.uint8)


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)   # Pillow's bundled TrueType font (needs FreeType)
    except (TypeError, OSError, ImportError):
        return ImageFont.load_default()


def _fitted_title(draw: ImageDraw.ImageDraw, title: str, width: int) -> tuple[str, ImageFont.ImageFont]:
    """The title at the largest size up to TITLE_PX that fits `width`; shortened with '...' if none does."""
    for size in range(TITLE_PX, 10, -1):
        font = _font(size)
        if draw.textlength(title, font=font) <= width:
            return title, font
    text = title
    while len(text) > 1 and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "...", font


def save_image_grid(path: str | os.PathLike, columns: list[torch.Tensor], titles: list[str],
                    max_rows: int = 4, min_width: int = MIN_WIDTH) -> tuple[int, int]:
    """One row per sample, one column per tensor (B,C,H,W) in [0,1], a title above each column.

    Columns of another size (a 2x output, say) are resized to the first column's size. Small images
    are enlarged by a whole factor (nearest neighbour, so every pixel stays visible as a block) until
    the grid is at least `min_width` pixels wide. Returns the grid's (width, height)."""
    if len(columns) != len(titles):
        raise ValueError("one title per column")
    h, w = columns[0].shape[-2:]
    cols = [c if c.shape[-2:] == (h, w) else F.interpolate(c.float(), size=(h, w), mode="bilinear",
                                                           align_corners=False, antialias=True)
            for c in columns]
    scale = max(1, math.ceil((min_width - GAP * (len(cols) - 1)) / (len(cols) * w)))
    h, w = h * scale, w * scale
    header = TITLE_PX + 12
    rows = min(max_rows, min(c.shape[0] for c in cols))
    grid = np.full((header + rows * (h + GAP), len(cols) * (w + GAP) - GAP, 3), 255, np.uint8)
    for j, c in enumerate(cols):
        for i in range(rows):
            y, x = header + i * (h + GAP), j * (w + GAP)
            cell = to_uint8(c[i])
            if scale > 1:
                cell = cell.repeat(scale, axis=0).repeat(scale, axis=1)
            grid[y:y + h, x:x + w] = cell
    im = Image.fromarray(grid)
    draw = ImageDraw.Draw(im)
    for j, title in enumerate(titles):
        text, font = _fitted_title(draw, title, w - 4)
        x = j * (w + GAP) + (w - draw.textlength(text, font=font)) / 2
        draw.text((x, header / 2), text, fill=(0, 0, 0), font=font, anchor="lm")
    with atomic_open(path, "wb") as f:
        im.save(f, format="PNG")
    return im.size
