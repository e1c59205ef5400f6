"""common.metrics against hand-computed cases and independent formulas."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from common import metrics as M


def test_psnr_hand_computed():
    target = torch.full((2, 3, 8, 8), 0.1)
    pred = torch.zeros(2, 3, 8, 8)
    pred[1] = 0.1 - 0.05  # mse 0.0025 -> 26.0206 dB
    np.testing.assert_allclose(M.psnr(pred, target).numpy(), [20.0, 10 * math.log10(1 / 0.0025)], rtol=1e-5)
    assert M.psnr(target, target).isinf().all()
    assert float(M.psnr(pred * 255, target * 255, data_range=255.0)[0]) == pytest.approx(20.0, rel=1e-5)


def _ssim_reference(x: np.ndarray, y: np.ndarray, data_range=1.0) -> float:
    """Wang et al. 2004: 11x11 Gaussian (sigma 1.5), valid window, mean over channels and pixels."""
    g = np.exp(-((np.arange(11) - 5) ** 2) / (2 * 1.5 ** 2))
    g /= g.sum()
    w = torch.tensor(np.outer(g, g), dtype=torch.float64)[None, None]

    def filt(a):
        return F.conv2d(torch.tensor(a, dtype=torch.float64)[:, None], w)[:, 0].numpy()

    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mx, my = filt(x), filt(y)
    vx, vy, cxy = filt(x * x) - mx ** 2, filt(y * y) - my ** 2, filt(x * y) - mx * my
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))
    return float(s.mean())


def test_ssim_matches_the_formula_and_ms_ssim_is_bounded():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(1, 3, 48, 48, generator=g)
    y = (x + 0.1 * torch.randn(1, 3, 48, 48, generator=g)).clamp(0, 1)
    ref = _ssim_reference(x[0].numpy(), y[0].numpy())
    assert float(M.ssim(x, y)) == pytest.approx(ref, abs=1e-5)
    assert float(M.ssim(x, x)) == pytest.approx(1.0, abs=1e-6)
    big_x = torch.rand(1, 3, 176, 176, generator=g)
    big_y = (big_x + 0.2 * torch.randn(1, 3, 176, 176, generator=g)).clamp(0, 1)
    v = float(M.ms_ssim(big_x, big_y))
    assert 0.0 < v < 1.0 and float(M.ms_ssim(big_x, big_x)) == pytest.approx(1.0, abs=1e-5)


def test_classification_report_hand_computed():
    y_true = [0, 0, 1, 1, 2, 2, 2, 2]
    y_pred = [0, 1, 1, 1, 2, 0, 2, 2]
    r = M.classification_report(y_true, y_pred, 4)  # class 3 never occurs: all its ratios are 0
    np.testing.assert_array_equal(r["confusion_matrix"][:3, :3], [[1, 1, 0], [0, 2, 0], [1, 0, 3]])
    p = np.array([1 / 2, 2 / 3, 1.0, 0.0])
    rec = np.array([1 / 2, 1.0, 3 / 4, 0.0])
    f1 = np.array([0.5, 0.8, 2 * 0.75 / 1.75, 0.0])
    np.testing.assert_allclose(r["per_class"]["precision"], p)
    np.testing.assert_allclose(r["per_class"]["recall"], rec)
    np.testing.assert_allclose(r["per_class"]["f1"], f1)
    assert r["accuracy"] == pytest.approx(6 / 8)
    assert r["f1_macro"] == pytest.approx(f1.mean())
    assert r["f1_weighted"] == pytest.approx((2 * 0.5 + 2 * 0.8 + 4 * (1.5 / 1.75)) / 8)
    assert r["precision_weighted"] == pytest.approx((2 * 0.5 + 2 * 2 / 3 + 4 * 1.0) / 8)
    np.testing.assert_array_equal(r["per_class"]["support"], [2, 2, 4, 0])


def test_roc_auc_binary_with_and_without_ties():
    assert M.roc_auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.75)
    assert M.roc_auc([0, 1], [0.5, 0.5]) == pytest.approx(0.5)
    # one tie between a positive and a negative counts 1/2: pairs won 5.5 of 6
    assert M.roc_auc([0, 0, 0, 1, 1], [0.1, 0.2, 0.7, 0.7, 0.9]) == pytest.approx(5.5 / 6)
    assert math.isnan(M.roc_auc([1, 1], [0.2, 0.3]))


def test_roc_auc_ovr_macro_hand_computed():
    y = [0, 1, 2, 0, 1, 2]
    probs = np.array([[0.8, 0.1, 0.1], [0.3, 0.6, 0.1], [0.2, 0.2, 0.6],
                      [0.4, 0.5, 0.1], [0.5, 0.4, 0.1], [0.1, 0.3, 0.6]])
    # class 0: pos {0.8,0.4} vs neg {0.3,0.2,0.5,0.1}: 4 + 3 = 7 of 8
    # class 1: pos {0.6,0.4} vs neg {0.1,0.2,0.5,0.3}: 4 + 3 = 7 of 8
    # class 2: pos {0.6,0.6} vs neg {0.1,0.1,0.1,0.1}: 8 of 8
    assert M.roc_auc_ovr(y, probs) == pytest.approx((7 / 8 + 7 / 8 + 1) / 3)


def test_roc_curve_and_youden_threshold():
    fpr, tpr, thr = M.roc_curve([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8])
    np.testing.assert_allclose(fpr, [0, 0, 0.5, 0.5, 1])
    np.testing.assert_allclose(tpr, [0, 0.5, 0.5, 1, 1])
    np.testing.assert_allclose(thr[1:], [0.8, 0.4, 0.35, 0.1])
    t, j = M.youden_threshold([0, 0, 0, 1, 1, 1], [0.1, 0.2, 0.65, 0.25, 0.6, 0.7])
    assert (t, j) == (pytest.approx(0.25), pytest.approx(2 / 3))


def test_pearson_matches_numpy():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(4, 30, generator=g), torch.randn(4, 30, generator=g)
    b = b + a
    ref = [np.corrcoef(a[i].numpy(), b[i].numpy())[0, 1] for i in range(4)]
    np.testing.assert_allclose(M.pearson(a, b).numpy(), ref, rtol=1e-5)


def test_best_threshold_hand_computed():
    """Scores 0.9 0.8 0.7 0.6 0.2 0.1, labels 1 0 1 1 0 0 (P=3, N=3).
    Flag > 0.65 (0.9 0.8 0.7): tp 2 fp 1 -> F1 = 4/6 = 0.667, J = 2/3 - 1/3 = 0.333
    Flag > 0.4 (the top four): tp 3 fp 1 -> F1 = 6/7 = 0.857, J = 1 - 1/3 = 0.667 (best of both)
    Flag > 0.85 (0.9 only): F1 = 2/4 = 0.5; flag everything: F1 = 6/9 = 0.667, J = 0."""
    y, s = [1, 0, 1, 1, 0, 0], [0.9, 0.8, 0.7, 0.6, 0.2, 0.1]
    thr, f1 = M.best_threshold(y, s, "f1")
    assert thr == pytest.approx(0.4) and f1 == pytest.approx(6 / 7)
    thr, j = M.best_threshold(y, s, "youden")
    assert thr == pytest.approx(0.4) and j == pytest.approx(2 / 3)
    # all positives at the lowest scores: flagging everything is best; the cut lies under the lowest score
    thr, f1 = M.best_threshold([0, 1, 1], [0.5, 0.2, 0.2], "f1")
    assert thr == pytest.approx(0.15) and f1 == pytest.approx(0.8)
    assert all(math.isnan(v) for v in M.best_threshold([1, 1], [0.3, 0.4]))
    with pytest.raises(ValueError):
        M.best_threshold(y, s, "accuracy")


def test_best_threshold_matches_brute_force_over_every_cut():
    rng = np.random.default_rng(0)
    for trial in range(20):
        n = int(rng.integers(5, 40))
        y = rng.integers(0, 2, n)
        y[:2] = [0, 1]
        s = np.round(rng.random(n) * 0.2 + 0.3 * y * rng.random(n), 2)   # ties included
        cuts = np.unique(np.r_[s, (s[:, None] + s[None, :]).ravel() / 2, s.min() / 2])
        f1s, js = [], []
        for c in cuts:
            r = M.classification_report(y, (s > c).astype(int), 2)
            f1s.append(r["per_class"]["f1"][1])
            js.append(r["per_class"]["recall"][1] - (1 - r["per_class"]["recall"][0]))
        for criterion, values in (("f1", f1s), ("youden", js)):
            thr, value = M.best_threshold(y, s, criterion)
            assert value == pytest.approx(max(values)), (trial, criterion)
            r = M.classification_report(y, (s > thr).astype(int), 2)
            got = r["per_class"]["f1"][1] if criterion == "f1" else \
                r["per_class"]["recall"][1] - (1 - r["per_class"]["recall"][0])
            assert got == pytest.approx(value)
            assert np.array_equal(s > thr, s >= thr)           # the cut never sits on a score
