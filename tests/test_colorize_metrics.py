"""colorize.metrics: the competition score against values recorded from scikit-image + OpenCV
(tests/colorize_ref/metric_fixture.json, made by make_metric_fixture.py), live scikit-image (and
OpenCV when it is installed), and hand-computed cases."""
from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import zlib
from pathlib import Path

import numpy as np
import pytest

from colorize.data import gray_u8
from colorize.metrics import (competition_score, hist_correlation, hue_histogram, hue_u8, mean_scores,
                              ssim_full, ssim_masked)
from tests.colorize_ref.metric_cases import all_colours, checksum, make_cases

FIXTURE = json.loads((Path(__file__).parent / "colorize_ref" / "metric_fixture.json").read_text())
HAVE_SKIMAGE = importlib.util.find_spec("skimage") is not None
HAVE_CV2 = importlib.util.find_spec("cv2") is not None


@pytest.fixture(scope="module")
def cases():
    return make_cases()


def test_fixture_cases_are_the_recorded_ones(cases):
    assert [c[0] for c in cases] == [r["name"] for r in FIXTURE["cases"]]
    for (name, pred, gt, mask), rec in zip(cases, FIXTURE["cases"]):
        assert checksum(pred, gt, mask) == rec["checksum"], f"case {name} is generated differently now"


def test_score_equals_skimage_and_opencv_on_every_recorded_case(cases):
    """42 cases: 7..512 px, noisy / random / gray / blurred / tinted / near-constant predictions,
    rectangles, discs, scattered pixels, exactly 7 and 8 damaged pixels, fully damaged images."""
    for (name, pred, gt, mask), rec in zip(cases, FIXTURE["cases"]):
        ours = competition_score(pred, gt, mask)
        assert set(ours) == {"score", "ssim", "masked_ssim", "hue_hist"}
        for key in ("score", "ssim", "masked_ssim", "hue_hist"):
            if rec[key] is None:   # scikit-image raised: fewer than 7 damaged pixels
                assert math.isnan(ours[key]), (name, key)
            else:
                assert ours[key] == pytest.approx(rec[key], abs=1e-9), (name, key, ours[key], rec[key])


def test_fewer_than_seven_damaged_pixels_gives_nan_score_but_the_other_terms():
    rng = np.random.default_rng(1)
    gt = rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)
    pred = gt[::-1].copy()
    for n in (0, 1, 6):
        mask = np.zeros((20, 20), bool)
        mask.ravel()[:n] = True
        r = competition_score(pred, gt, mask)
        assert math.isnan(r["masked_ssim"]) and math.isnan(r["score"])
        assert r["ssim"] == pytest.approx(ssim_full(gt, pred)) and not math.isnan(r["hue_hist"])
    mask.ravel()[:7] = True
    assert not math.isnan(competition_score(pred, gt, mask)["score"])
    # averages skip the unscorable images and say so
    rows = [{"score": 0.5, "ssim": 0.6, "masked_ssim": 0.4, "hue_hist": 0.5},
            {"score": math.nan, "ssim": 0.8, "masked_ssim": math.nan, "hue_hist": 0.7}]
    m = mean_scores(rows)
    assert m["score"] == 0.5 and m["ssim"] == pytest.approx(0.7) and m["images"] == 2 and m["images_scored"] == 1


@pytest.mark.skipif(not HAVE_SKIMAGE, reason="scikit-image not installed")
def test_ssim_terms_equal_live_scikit_image():
    from skimage.metrics import structural_similarity

    rng = np.random.default_rng(7)
    for i in range(12):
        h, w = rng.integers(7, 70, 2)
        gt = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        pred = np.clip(gt.astype(int) + rng.integers(-60, 61, gt.shape), 0, 255).astype(np.uint8)
        mask = rng.random((h, w)) < rng.uniform(0.05, 0.9)
        dr = pred.max() - pred.min()
        assert ssim_full(gt, pred) == pytest.approx(structural_similarity(gt, pred, channel_axis=-1, data_range=dr), abs=1e-10)
        if mask.sum() >= 7:
            ref = structural_similarity(gt[mask], pred[mask], channel_axis=-1, data_range=dr)
            assert ssim_masked(gt, pred, mask) == pytest.approx(ref, abs=1e-10)
    with pytest.raises(ValueError):   # what the baseline does with < 7 damaged pixels
        structural_similarity(gt[:2, 0], pred[:2, 0], channel_axis=-1, data_range=dr)


@pytest.mark.skipif(not (HAVE_CV2 and HAVE_SKIMAGE), reason="OpenCV and scikit-image not both installed")
def test_score_equals_live_opencv_and_skimage():
    import cv2
    from skimage.metrics import structural_similarity

    rng = np.random.default_rng(11)
    for _ in range(6):
        gt = rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)
        pred = rng.integers(0, 256, (40, 56, 3), dtype=np.uint8)
        mask = rng.random((40, 56)) < 0.3
        dr = pred.max() - pred.min()
        hists = []
        for im in (gt, pred):
            hh = cv2.calcHist([cv2.cvtColor(im, cv2.COLOR_RGB2HSV)], [0], None, [180], [0, 180])
            hists.append(cv2.normalize(hh, hh).flatten())
        ref = (0.2 * structural_similarity(gt, pred, channel_axis=-1, data_range=dr)
               + 0.4 * structural_similarity(gt[mask], pred[mask], channel_axis=-1, data_range=dr)
               + 0.4 * cv2.compareHist(hists[0], hists[1], cv2.HISTCMP_CORREL))
        assert competition_score(pred, gt, mask)["score"] == pytest.approx(ref, abs=1e-9)


def test_hue_equals_opencv_on_all_2_24_colours():
    hue = hue_u8(all_colours())
    bad = [r for r in range(256) if zlib.crc32(hue[r].tobytes()) != FIXTURE["hue"]["crc32_per_red"][r]]
    assert not bad, f"hue differs from OpenCV for red values {bad[:10]}"
    assert hashlib.sha256(hue.tobytes()).hexdigest() == FIXTURE["hue"]["sha256"]


def test_gray_equals_opencv_on_all_2_24_colours():
    gray = gray_u8(all_colours())
    bad = [r for r in range(256) if zlib.crc32(gray[r].tobytes()) != FIXTURE["gray"]["crc32_per_red"][r]]
    assert not bad, f"gray differs from OpenCV for red values {bad[:10]}"


def test_hue_hand_computed_where_float_rounding_differs():
    """RGB (0, 1, 58): the float hue is 239.0/2 = 119.48, which rounds to 119; OpenCV's integer path
    gives 120: v = b = 58, diff = 58, h = r - g + 4 * diff = 231, hdiv[58] = round(737280 / 348) = 2119,
    (231 * 2119 + 2048) >> 12 = 120."""
    px = np.array([[[0, 1, 58], [0, 0, 0], [255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 0, 1]]], np.uint8)
    # (255, 0, 1): v = r, h = g - b = -1, hdiv[255] = 482, (-482 + 2048) >> 12 = 0 (not 180)
    assert hue_u8(px).tolist() == [[120, 0, 0, 60, 120, 0]]


def test_hue_histogram_correlation_hand_computed():
    gray = np.full((4, 4, 3), 90, np.uint8)          # every hue 0
    h = hue_histogram(gray)
    assert h[0] == pytest.approx(1.0) and h[1:].sum() == 0
    red_green = np.zeros((2, 2, 3), np.uint8)
    red_green[0] = (255, 0, 0)                        # hue 0
    red_green[1] = (0, 255, 0)                        # hue 60
    h2 = hue_histogram(red_green)
    assert h2[0] == pytest.approx(2 ** -0.5) and h2[60] == pytest.approx(2 ** -0.5)
    # Pearson over 180 bins of [1, 0, ...] and [a, 0, .., a, ...]: by hand
    a = np.zeros(180)
    a[0] = 1
    b = np.zeros(180)
    b[0] = b[60] = 2 ** -0.5
    expected = np.corrcoef(a, b)[0, 1]
    assert hist_correlation(h, h2) == pytest.approx(expected, abs=1e-6)
    assert hist_correlation(np.ones(180, np.float32), h2) == 1.0   # OpenCV: no variance -> 1


def test_ssim_hand_computed_single_window():
    """One 7x7 window (a 7x7 image): SSIM from the textbook formula with sample covariance."""
    rng = np.random.default_rng(3)
    gt = rng.integers(0, 256, (7, 7, 3), dtype=np.uint8)
    pred = rng.integers(0, 256, (7, 7, 3), dtype=np.uint8)
    dr = float(pred.max()) - float(pred.min())
    c1, c2 = (0.01 * dr) ** 2, (0.03 * dr) ** 2
    vals = []
    for c in range(3):
        x, y = gt[..., c].astype(float).ravel(), pred[..., c].astype(float).ravel()
        mx, my = x.mean(), y.mean()
        vx, vy, cxy = x.var(ddof=1), y.var(ddof=1), np.cov(x, y, ddof=1)[0, 1]
        vals.append((2 * mx * my + c1) * (2 * cxy + c2) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2)))
    assert ssim_full(gt, pred) == pytest.approx(np.mean(vals), abs=1e-12)
    assert ssim_full(gt, gt) == 1.0


def test_constant_prediction_is_defined():
    gt = np.full((16, 16, 3), 77, np.uint8)
    mask = np.zeros((16, 16), bool)
    mask[4:10, 4:10] = True
    r = competition_score(gt.copy(), gt, mask)          # identical flat images: windows count 1
    assert r["ssim"] == 1.0 and r["masked_ssim"] == 1.0
    other = np.full((16, 16, 3), 10, np.uint8)
    r = competition_score(other, gt, mask)               # flat but different: 0
    assert r["ssim"] == 0.0 and all(math.isfinite(v) for v in r.values())


def test_bad_arguments_raise():
    a = np.zeros((16, 16, 3), np.uint8)
    with pytest.raises(ValueError, match="uint8"):
        competition_score(a.astype(np.float32), a, np.ones((16, 16)))
    with pytest.raises(ValueError, match="differ in size"):
        competition_score(a, np.zeros((16, 8, 3), np.uint8), np.ones((16, 16)))
    with pytest.raises(ValueError, match="mask"):
        competition_score(a, a, np.ones((8, 8)))
