"""Explain and review: masks in the built-in data, maps, localisation metrics, the review page."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from common.explain import Localisation, dilate, pixel_auc


def test_builtin_crbl_masks_mark_the_defect_pixels(tmp_path):
    from crbl.data import make_builtin_dataset
    make_builtin_dataset(tmp_path, n_train=6, n_val=2)
    images = sorted((tmp_path / "images").glob("*.png"))
    masks = {p.name for p in (tmp_path / "masks").glob("*.png")}
    assert masks == {p.name for p in images if "defect" in p.name}
    for name in masks:
        m = np.asarray(Image.open(tmp_path / "masks" / name))
        g = np.asarray(Image.open(tmp_path / "images" / name).convert("L"))
        assert m.shape == g.shape and set(np.unique(m)) == {0, 255}
        # defects are dark inclusions (10-35) or bright scratches (200-240) on a part of 95-140
        assert ((g[m > 0] < 45) | (g[m > 0] > 190)).all()


def test_builtin_battery_masks_only_for_defect_classes(tmp_path):
    from battery_ct.data import make_builtin_dataset
    from battery_ct.model import DEFECT_CLASSES
    make_builtin_dataset(tmp_path, batteries_per_class=1, slices_per_axis=1, size=64)
    images = sorted((tmp_path / "images").glob("*.jpg"))
    assert len(images) == 15
    for path in images:
        label = int(path.stem.split("_")[3][0])      # battery number = label then battery index
        mask = tmp_path / "masks" / f"{path.stem}.png"
        assert mask.is_file() == (label in DEFECT_CLASSES), path.name
        if mask.is_file():
            m = np.asarray(Image.open(mask))
            assert m.shape == (64, 64) and (m > 0).sum() > 5
