"""colorize/evaluate.py: per-image and overall competition scores from folders, masks given or
derived from the damaged inputs, CSV + JSON written, unscorable images reported, bad input."""
from __future__ import annotations

import contextlib
import csv
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from colorize.data import gray_u8
from colorize.evaluate import main as evaluate_main
from colorize.metrics import competition_score
import helpers



def make_set(root: Path, n: int = 4, size: int = 40) -> dict:
    """gt/, inputs/ (gray, a flat-filled rectangle), masks/, pred/ (noisy gt); image 3 undamaged."""
    rng = np.random.default_rng(0)
    for d in ("gt", "inputs", "masks", "pred"):
        (root / d).mkdir(parents=True, exist_ok=True)
    expected = {}
    for i in range(n):
        gt = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        inp = gray_u8(gt)
        mask = np.zeros((size, size), bool)
        if i != 3:
            mask[5:20 + i, 8:30] = True
        inp[mask] = 3
        mask &= np.abs(gray_u8(gt).astype(int) - 3) > 2          # what the derivation can see
        pred = np.clip(gt.astype(int) + rng.integers(-40, 41, gt.shape), 0, 255).astype(np.uint8)
        name = f"TEST_{i:03d}.png"
        Image.fromarray(gt).save(root / "gt" / name)
        Image.fromarray(inp).save(root / "inputs" / name)
        Image.fromarray(mask.astype(np.uint8) * 255).save(root / "masks" / name)
        Image.fromarray(pred).save(root / "pred" / name)
        expected[name[:-4]] = competition_score(pred, gt, mask)
    return expected


def run(*argv):
    with contextlib.redirect_stdout(io.StringIO()) as buf:
        summary = evaluate_main([str(a) for a in argv])
    return summary, buf.getvalue()


def test_scores_per_image_and_overall(tmp_path):
    expected = make_set(tmp_path)
    out = tmp_path / "eval"
    summary, stdout = run("--pred", tmp_path / "pred", "--gt", tmp_path / "gt", "--inputs", tmp_path / "inputs",
                          "--out", out)
    rows = list(csv.DictReader(open(out / "scores.csv")))
    assert [r["name"] for r in rows] == sorted(expected)
    for r in rows:
        e = expected[r["name"]]
        for k in ("score", "ssim", "masked_ssim", "hue_hist"):
            if math.isnan(e[k]):
                assert r[k] == "nan"
            else:
                assert float(r[k]) == pytest.approx(e[k], abs=1e-6)
    assert rows[3]["damaged_pixels"] == "0" and rows[3]["score"] == "nan"
    saved = json.loads((out / "scores.json").read_text())
    scored = [v["score"] for v in expected.values() if not math.isnan(v["score"])]
    assert saved["score"] == pytest.approx(np.mean(scored)) and saved["images"] == 4 and saved["images_scored"] == 3
    assert saved["ssim"] == pytest.approx(np.mean([v["ssim"] for v in expected.values()]))
    assert "1 image(s) have fewer than 7 damaged pixels" in stdout
    # masks given instead of derived: the same numbers
    summary2, _ = run("--pred", tmp_path / "pred", "--gt", tmp_path / "gt", "--masks", tmp_path / "masks",
                      "--out", tmp_path / "eval2")
    assert summary2["score"] == pytest.approx(summary["score"], abs=1e-12)


def cli_error(capsys, *argv) -> str:
    return helpers.cli_error(evaluate_main, *argv, capsys=capsys)


def test_bad_input_is_one_line(tmp_path, capsys):
    make_set(tmp_path, n=3)
    base = ["--gt", tmp_path / "gt", "--inputs", tmp_path / "inputs"]
    assert "give --masks DIR or --inputs DIR" in cli_error(capsys, "--pred", tmp_path / "pred", "--gt", tmp_path / "gt",
                                                           "--out", tmp_path / "e0")
    (tmp_path / "pred" / "TEST_002.png").unlink()
    assert "no restored image for TEST_002.png" in cli_error(capsys, "--pred", tmp_path / "pred", *base,
                                                             "--out", tmp_path / "e1")
    Image.fromarray(np.zeros((20, 40, 3), np.uint8)).save(tmp_path / "pred" / "TEST_002.png")
    msg = cli_error(capsys, "--pred", tmp_path / "pred", *base, "--out", tmp_path / "e2")
    assert "TEST_002.png: 40x20, but the ground truth" in msg and "is 40x40" in msg
    assert not (tmp_path / "e2").exists()
    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(tmp_path / "pred" / "TEST_002.png")
    run("--pred", tmp_path / "pred", *base, "--out", tmp_path / "e3")
    assert "scores.csv already exists" in cli_error(capsys, "--pred", tmp_path / "pred", *base, "--out", tmp_path / "e3")
