"""Phaseformer data: LSUI / a-b / pre-split layouts, seeded split files, bad pairs, the 2x target
from the full-resolution reference, crops, augmentation, the built-in underwater images."""
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from common.io import UserError, image_to_tensor
from common.metrics import psnr
from phaseformer.data import (PairDataset, augment, list_pairs, make_builtin_dataset, read_split,
                              resolve_dataset, sample_pair)

sys.path.insert(0, str(Path(__file__).parent / "phaseformer_ref"))


def _image(path: Path, size=(12, 10), seed=0):
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)


def _pairs(root: Path, names, inp="input", gt="GT"):
    for i, name in enumerate(names):
        _image(root / inp / name, seed=i)
        _image(root / gt / name, seed=100 + i)


def test_lsui_layout_seeded_split_and_split_file_round_trip(tmp_path):
    names = [f"{i:03d}.jpg" for i in range(20)]
    _pairs(tmp_path, names)
    train, val, text, desc = resolve_dataset(tmp_path, None, None, split_seed=0)
    assert len(val) == 2 and len(train) == 18 and "input/ + GT/" in desc          # 10% by default
    again = resolve_dataset(tmp_path, None, None, split_seed=0)
    other = resolve_dataset(tmp_path, None, None, split_seed=1)
    assert [p[0] for p in again[1]] == [p[0] for p in val] != [p[0] for p in other[1]]
    split_file = tmp_path / "split.txt"
    split_file.write_text(text)
    assert read_split(split_file, set(names)) == {n: "val" if n in {p[0] for p in val} else "train" for n in names}
    given = resolve_dataset(tmp_path, split_file, None, split_seed=99)            # the file decides
    assert [p[0] for p in given[1]] == [p[0] for p in val]
    train, val, _, _ = resolve_dataset(tmp_path, None, 5, split_seed=0)
    assert len(val) == 5 and all(v[2].parent.name == "GT" and v[1].parent.name == "input" for v in val)
    with pytest.raises(UserError, match="--val-count 20: needs at least 1"):
        resolve_dataset(tmp_path, None, 20, split_seed=0)


def test_official_ab_and_presplit_layouts(tmp_path):
    _pairs(tmp_path / "ab", ["x.png", "y.png", "z.png"], inp="a", gt="b")
    train, val, _, desc = resolve_dataset(tmp_path / "ab", None, 1, split_seed=0)
    assert len(train) == 2 and len(val) == 1 and "a/ + b/" in desc
    root = tmp_path / "lsui"
    _pairs(root / "train", ["1.jpg", "2.jpg"], gt="gt")      # trains.py: LSUI/{train,test}/{input,gt}
    _pairs(root / "test", ["3.jpg"], gt="gt")
    train, val, text, _ = resolve_dataset(root, None, None, split_seed=0)
    assert [p[0] for p in train] == ["1.jpg", "2.jpg"] and [p[0] for p in val] == ["3.jpg"]
    assert "val\ttest/3.jpg" in text
    with pytest.raises(UserError, match="already split"):
        resolve_dataset(root, tmp_path / "split.txt", None, split_seed=0)
    with pytest.raises(UserError, match="no paired images found"):
        resolve_dataset(tmp_path / "ab" / "a", None, None, split_seed=0)


def test_bad_pairs_and_split_files_name_the_file(tmp_path):
    _pairs(tmp_path, ["a.jpg", "b.jpg"])
    _image(tmp_path / "input" / "c.jpg")
    with pytest.raises(UserError, match=r"c\.jpg: no reference image for this input"):
        list_pairs(tmp_path / "input", tmp_path / "GT")
    (tmp_path / "input" / "c.jpg").unlink()
    _image(tmp_path / "input" / "d.png")
    _image(tmp_path / "GT" / "d.jpg")                     # same stem, other extension: still a pair
    assert [p[0] for p in list_pairs(tmp_path / "input", tmp_path / "GT")] == ["a.jpg", "b.jpg", "d.png"]
    _image(tmp_path / "GT" / "a.jpg", size=(14, 10))
    with pytest.raises(UserError, match=r"GT/a\.jpg: reference is 14x10 but its input .*a\.jpg is 12x10"):
        PairDataset(list_pairs(tmp_path / "input", tmp_path / "GT"), 8)[0]
    (tmp_path / "input" / "b.jpg").write_bytes(b"not an image")
    with pytest.raises(UserError, match=r"input/b\.jpg: unreadable or corrupt image"):
        PairDataset(list_pairs(tmp_path / "input", tmp_path / "GT"), 8)[1]
    names = {"a.jpg", "b.jpg"}
    for content, problem in (("train a.jpg\nval\n", "line 2: expected"), ("train\ta.jpg\nval\tq.jpg\n", "'q.jpg' is not"),
                             ("train\ta.jpg\ntrain\ta.jpg\n", "listed twice"), ("train\ta.jpg\n", "no 'val' pairs")):
        (tmp_path / "s.txt").write_text(content)
        with pytest.raises(UserError, match=problem):
            read_split(tmp_path / "s.txt", names)


def test_resize_sampling_takes_the_2x_target_from_the_full_resolution_reference(tmp_path):
    _image(tmp_path / "in.png", size=(40, 30), seed=1)
    _image(tmp_path / "gt.png", size=(40, 30), seed=2)
    a, b = Image.open(tmp_path / "in.png").convert("RGB"), Image.open(tmp_path / "gt.png").convert("RGB")
    x, t1, t2 = sample_pair(a, b, 8, "resize")
    assert x.shape == t1.shape == (3, 8, 8) and t2.shape == (3, 16, 16)
    assert torch.equal(x, image_to_tensor(a.resize((8, 8), Image.BICUBIC)))
    assert torch.equal(t2, image_to_tensor(b.resize((16, 16), Image.BICUBIC)))
    upsampled_1x = F.interpolate(t1[None], scale_factor=2, mode="bilinear", align_corners=False)[0]  # trains.py
    assert (t2 - upsampled_1x).abs().mean() > 0.05


def test_crop_sampling_uses_native_pixels_for_the_2x_target(tmp_path):
    _image(tmp_path / "in.png", size=(48, 40), seed=3)
    _image(tmp_path / "gt.png", size=(48, 40), seed=4)
    a, b = Image.open(tmp_path / "in.png").convert("RGB"), Image.open(tmp_path / "gt.png").convert("RGB")
    torch.manual_seed(0)
    x, t1, t2 = sample_pair(a, b, 16, "crop")
    full = image_to_tensor(b)
    hits = [(y, x0) for y in range(40 - 32 + 1) for x0 in range(48 - 32 + 1)
            if torch.equal(full[:, y:y + 32, x0:x0 + 32], t2)]
    assert len(hits) == 1                                  # an exact 32x32 window of the reference
    y, x0 = hits[0]
    assert torch.equal(x, image_to_tensor(a.crop((x0, y, x0 + 32, y + 32)).resize((16, 16), Image.BICUBIC)))
    small = sample_pair(a, b, 32, "crop")                  # image smaller than 2S: the largest square
    assert small[0].shape == (3, 32, 32) and small[2].shape == (3, 64, 64)


def test_augmentation_is_the_same_for_input_and_targets():
    base = torch.rand(3, 8, 8)
    seen = set()
    for seed in range(64):
        g = torch.Generator().manual_seed(seed)
        x, t1, t2 = augment((base, base.clone(), F.interpolate(base[None], scale_factor=2)[0]), g)
        assert torch.equal(x, t1) and torch.equal(F.interpolate(x[None], scale_factor=2)[0], t2)
        seen.add(tuple(x.flatten()[:4].tolist()))
    assert len(seen) == 8                                  # 4 rotations x 2 flips all occur


def test_builtin_underwater_images(tmp_path):
    make_builtin_dataset(tmp_path, n=6, size=32, seed=0)
    pairs = list_pairs(tmp_path / "input", tmp_path / "GT")
    assert len(pairs) == 6
    data = PairDataset(pairs, 16, "resize")
    x = torch.stack([data[i][0] for i in range(6)])
    y = torch.stack([data[i][1] for i in range(6)])
    assert psnr(x, y).mean() < 22                           # visibly degraded ...
    assert (x[:, 0].mean() < y[:, 0].mean()) and (x[:, 2].mean() > x[:, 0].mean())   # red lost, blue-green cast
