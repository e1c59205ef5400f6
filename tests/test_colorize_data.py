"""colorize.data: the original's split (against pandas), OpenCV-style resizing (against recorded
cv2.resize), the damaged-region mask, augmentations that keep input and target consistent, the CSV
layout and its errors, and the built-in demo set."""
from __future__ import annotations

import base64
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from colorize.data import (BUILTIN_VERSION, PairDataset, augment_geometric, damage_mask, gray_u8,
                           make_builtin_dataset, read_inputs, read_pairs, resize_u8, split_indices)
from common.data import ensure_builtin
from common.io import UserError
from tests.colorize_ref.metric_cases import RESIZE_SIZES, resize_source

FIXTURE = json.loads((Path(__file__).parent / "colorize_ref" / "metric_fixture.json").read_text())



@pytest.fixture(scope="module")
def builtin():
    return ensure_builtin("colorize", BUILTIN_VERSION, make_builtin_dataset)


def write_pair(folder: Path, name: str, gt: np.ndarray, inp: np.ndarray) -> tuple[Path, Path]:
    (folder / "in").mkdir(parents=True, exist_ok=True)
    (folder / "gt").mkdir(parents=True, exist_ok=True)
    Image.fromarray(inp).save(folder / "in" / name)
    Image.fromarray(gt).save(folder / "gt" / name)
    return folder / "in" / name, folder / "gt" / name


def damaged_pair(rng, h=64, w=64, fill=None):
    """(gt, gray input with a flat-filled rectangle, the rectangle's mask)."""
    gt = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    inp = gray_u8(gt)
    mask = np.zeros((h, w), bool)
    mask[10:30, 20:50] = True
    inp[mask] = 7 if fill is None else fill
    return gt, inp, mask


def test_split_is_the_originals_pandas_sample():
    for case in FIXTURE["split"]:
        train, val = split_indices(case["rows"], 0.2, case["subset"], seed=42)
        assert val == case["val"] and train == case["train"]
    train, val = split_indices(100, 0.2, 1.0, seed=7)
    assert sorted(train + val) == list(range(100)) and len(val) == 20 and not set(train) & set(val)


def test_resize_matches_opencv_inter_linear_within_one_level():
    src = resize_source()
    for (h, w), rec in zip(RESIZE_SIZES, FIXTURE["resize"]):
        ref = np.frombuffer(base64.b64decode(rec["uint8_b64"]), np.uint8).reshape(h, w, 3)
        ours = resize_u8(src, (h, w))
        diff = np.abs(ours.astype(int) - ref.astype(int))
        assert diff.max() <= 1, (h, w)
        # OpenCV rounds its weights to 11-bit fixed point; exact halving is bit-exact here
        assert (diff == 0).mean() > (0.999 if (h, w) == (45, 35) else 0.8), (h, w)
    assert resize_u8(src, src.shape[:2]) is src   # same size: untouched


def test_damage_mask_is_input_differing_from_gray_of_gt():
    rng = np.random.default_rng(0)
    gt, inp, mask = damaged_pair(rng)
    found = damage_mask(inp, gt)
    # inside the rectangle only pixels whose gray is within 2 levels of the fill escape detection
    near_fill = np.abs(gray_u8(gt).astype(int) - 7) <= 2
    assert (found == (mask & ~near_fill)).all()
    # three equal channels, Pillow's gray formula (off by one from OpenCV's): same mask
    pil_gray = np.asarray(Image.fromarray(gt).convert("L")).copy()
    pil_gray[mask] = 7
    assert (damage_mask(np.repeat(pil_gray[..., None], 3, -1), gt) == found).all()


def test_pairs_are_resized_alike_and_augmented_alike(tmp_path):
    """The original resized the target as a mask (nearest) and changed brightness/contrast/blur/noise
    of the input only. Here, after resizing and any flip/rotation, the input is still gray(target)
    wherever it is not damaged, and the mask still marks the fill."""
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[:96, :96]
    gt = np.stack([xx * 2.6, yy * 2.6, (xx + yy) * 1.3], -1).astype(np.uint8)   # smooth: resizing is linear
    gt = np.clip(gt.astype(int) + rng.integers(-3, 4, gt.shape), 0, 255).astype(np.uint8)
    inp = gray_u8(gt)
    inp[20:50, 30:70] = 200
    pair = write_pair(tmp_path, "a.png", gt, inp)
    ds = PairDataset([pair], img_size=48, augment=True)

    def check(x, y, m):
        x8 = (x * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        y8 = (y * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        assert (x8[..., 0] == x8[..., 1]).all() and (x8[..., 1] == x8[..., 2]).all()
        keep = ~torch.nn.functional.max_pool2d(m[None], 3, 1, 1)[0, 0].bool().numpy()   # away from the fill's edge
        err = np.abs(x8[..., 0].astype(int) - gray_u8(y8).astype(int))[keep]
        assert err.max() <= 2
        assert (x8[..., 0][m[0].bool().numpy()] >= 195).mean() > 0.9
        return err

    seen = set()
    torch.manual_seed(0)
    for _ in range(24):
        x, y, m = ds[0]
        check(x, y, m)
        seen.add(tuple(x[0].flatten()[:3].tolist()))
    assert len(seen) > 3   # augmentation really ran
    # the original's way, target resized nearest-neighbour, breaks exactly this consistency
    x, y, m = PairDataset([pair], img_size=48)[0]
    y_nearest = torch.nn.functional.interpolate(torch.from_numpy(gt).permute(2, 0, 1)[None].float(), size=(48, 48),
                                                mode="nearest")[0] / 255
    with pytest.raises(AssertionError):
        check(x, y_nearest, m)


def test_augment_geometric_moves_every_tensor_the_same_way():
    t = torch.arange(2 * 4 * 4, dtype=torch.float32).view(2, 4, 4)
    torch.manual_seed(3)
    for _ in range(10):
        a, b = augment_geometric((t, t.clone()))
        assert torch.equal(a, b) and sorted(a.flatten().tolist()) == sorted(t.flatten().tolist())


def test_csv_layout_and_its_errors(tmp_path):
    rng = np.random.default_rng(2)
    gt, inp, _ = damaged_pair(rng, 32, 32)
    write_pair(tmp_path, "TRAIN_00000.png", gt, inp)
    (tmp_path / "train.csv").write_text("input_image_path,gt_image_path\n./in/TRAIN_00000.png,./gt/TRAIN_00000.png\n")
    pairs = read_pairs(tmp_path / "train.csv")
    assert pairs == [(tmp_path / "in" / "TRAIN_00000.png", tmp_path / "gt" / "TRAIN_00000.png")]
    (tmp_path / "test.csv").write_text("input_image_path\n./in/TRAIN_00000.png\n")
    assert read_inputs(tmp_path / "test.csv") == [tmp_path / "in" / "TRAIN_00000.png"]

    bad = tmp_path / "bad.csv"
    bad.write_text("input,gt\na.png,b.png\n")
    with pytest.raises(UserError, match=r"bad.csv: missing column\(s\) input_image_path, gt_image_path"):
        read_pairs(bad)
    bad.write_text("input_image_path,gt_image_path\n./in/TRAIN_00000.png,./gt/nope.png\n")
    with pytest.raises(UserError, match=r"bad.csv, line 2: image not found: .*nope.png"):
        read_pairs(bad)
    # a corrupt image and a size mismatch: one line naming the file, raised when the pair is loaded
    (tmp_path / "gt" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(UserError, match="broken.png: unreadable or corrupt image"):
        PairDataset([(tmp_path / "in" / "TRAIN_00000.png", tmp_path / "gt" / "broken.png")], 32)[0]
    Image.fromarray(gt[:16]).save(tmp_path / "gt" / "small.png")
    with pytest.raises(UserError, match=r"TRAIN_00000.png: input is 32x32 but its ground truth .*small.png is 32x16"):
        PairDataset([(tmp_path / "in" / "TRAIN_00000.png", tmp_path / "gt" / "small.png")], 32)[0]


def test_builtin_data_is_in_the_competition_layout(builtin):
    lines = (builtin / "train.csv").read_text().splitlines()
    assert lines[0] == "input_image_path,gt_image_path" and lines[1] == "./train_input/TRAIN_00000.png,./train_gt/TRAIN_00000.png"
    assert (builtin / "test.csv").read_text().splitlines()[1] == "./test_input/TEST_000.png"
    pairs = read_pairs(builtin / "train.csv")
    assert len(pairs) == 240 and len(read_inputs(builtin / "test.csv")) == 16
    inp = np.asarray(Image.open(pairs[0][0]))
    gt = np.asarray(Image.open(pairs[0][1]))
    assert inp.ndim == 2 and gt.shape == (128, 128, 3)    # gray inputs, colour targets
    fractions = [damage_mask(np.asarray(Image.open(a).convert("RGB")), np.asarray(Image.open(b))).mean()
                 for a, b in pairs[:20]]
    assert all(0.002 < f < 0.4 for f in fractions)
    # colour that follows the gray content: the sky (top rows) is blue, so a gray input is not enough
    assert gt[:5, :, 2].mean() > gt[:5, :, 0].mean() + 60
