"""common.images.save_image_grid: readable sample grids (issue 18: 104-288 px wide, clipped titles)."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from common.images import MIN_WIDTH, save_image_grid


def test_small_images_are_enlarged_by_whole_factors_with_titles_above(tmp_path):
    a = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    b = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))   # a 2x output: resized to 32
    size = save_image_grid(tmp_path / "g.png", [a, a.mean(1, keepdim=True), b], ["input", "gray", "2x output"],
                           max_rows=2)
    im = np.asarray(Image.open(tmp_path / "g.png").convert("RGB"))
    assert size == (im.shape[1], im.shape[0]) and im.shape[1] >= MIN_WIDTH
    scale = 8                                     # ceil((768 - 2 gaps) / (3 x 32))
    cell = (im.shape[1] + 6) // 3 - 6
    assert cell == 32 * scale
    header = im.shape[0] - 2 * (cell + 6)
    # each source pixel is a scale x scale block of exactly its colour (nearest neighbour, no blur)
    first = im[header:header + cell, :cell]
    expect = (a[0].permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8).repeat(scale, 0).repeat(scale, 1)
    assert np.array_equal(first, expect)
    # a title is drawn above each column, centred, inside its column (dark pixels in the header)
    for j in range(3):
        band = im[:header, j * (cell + 6):j * (cell + 6) + cell]
        dark = np.argwhere(band.min(-1) < 100)
        assert len(dark) > 30, j
        assert dark[:, 1].min() > 4 and dark[:, 1].max() < cell - 4   # not clipped at the column's edges


def test_a_title_too_long_for_its_column_is_shrunk_or_shortened_not_clipped(tmp_path):
    x = torch.zeros(1, 3, 300, 300)
    save_image_grid(tmp_path / "g.png", [x, x, x], ["input", "a very long column title " * 4, "truth"])
    im = np.asarray(Image.open(tmp_path / "g.png").convert("RGB"))
    header = im.shape[0] - 300 - 6
    band = im[:header, 306:606]
    dark = np.argwhere(band.min(-1) < 100)
    assert dark[:, 1].min() >= 1 and dark[:, 1].max() <= 298
    assert (im[:header, 300:306].min(-1) > 200).all()                  # the gap between columns stays blank
