"""The DACON 236420 competition score, computed exactly as the organisers' baseline computes it with
scikit-image and OpenCV, in numpy only.

  score = 0.2 * SSIM(full RGB) + 0.4 * SSIM(damaged pixels) + 0.4 * correlation of hue histograms

Definitions (reference digest, section 6.1), for uint8 RGB `pred` and `gt` and the damaged region
`mask`:
  ssim         skimage.metrics.structural_similarity(gt, pred, channel_axis=-1,
               data_range=pred.max() - pred.min()): 7x7 uniform window, K1 = 0.01, K2 = 0.03,
               sample covariance (49/48), the mean over the windows that fit inside the image
               (skimage filters with reflection and then crops 3 pixels, which keeps exactly
               those), averaged over the three channels. The data range is the *prediction's*.
  masked_ssim  the same call on gt[mask] and pred[mask]: N x 3 arrays of the damaged pixels in
               row-major order, so each channel is a 1-D signal with a 7-tap window (covariance
               7/6); the data range is still the whole prediction's max - min.
  hue_hist     OpenCV's 8-bit RGB->HSV hue (0..179, integer table arithmetic), a 180-bin histogram
               over all pixels, L2-normalised in float32 (cv2.normalize), then Pearson correlation
               (cv2.compareHist HISTCMP_CORREL, which returns 1 when a histogram has no variance).

Window sums are taken over the integer pixel values (int32, exact), so means, variances and
covariances are exact integers before the final float64 division.

Cases the baseline does not define:
  * fewer than 7 damaged pixels (scikit-image raises "win_size exceeds image extent"): masked_ssim
    and score are NaN (an undamaged image has no restoration to score); ssim and hue_hist are
    still returned. Averages over images skip NaN (see `mean_scores`).
  * a constant prediction (data range 0, so the SSIM constants are 0): scikit-image divides 0 by 0
    there and returns NaN or rounding noise; here a window whose denominator is exactly 0 counts 1
    when the two windows are identical (same mean, both flat) and 0 otherwise.
"""
from __future__ import annotations

import math

import numpy as np

WIN = 7
K1, K2 = 0.01, 0.03
WEIGHTS = {"ssim": 0.2, "masked_ssim": 0.4, "hue_hist": 0.4}
HUE_BINS = 180
HSV_SHIFT = 12


# ---------------------------------------------------------------- SSIM
def _window_sums(a: np.ndarray, axis: int) -> np.ndarray:
    """Sums over every full WIN-long window along `axis` (a running sum of shifted views)."""
    n = a.shape[axis]

    def part(k):
        idx = [slice(None)] * a.ndim
        idx[axis] = slice(k, n - WIN + 1 + k)
        return a[tuple(idx)]
    s = part(0).copy()
    for k in range(1, WIN):
        s += part(k)
    return s


def _ssim(x: np.ndarray, y: np.ndarray, data_range: float) -> float:
    """skimage's SSIM of x (the reference) and y, both (C, *spatial) integer arrays with values
    0..255: the mean over channels of the mean over the windows that fit."""
    spatial = tuple(range(1, x.ndim))
    x = x.astype(np.int32)
    y = y.astype(np.int32)
    # x, y, x^2, y^2, xy stacked, so each window-sum pass runs once for all five (int32 is exact:
    # a 7x7 window sum of 255^2 is 3.2e6, and n * sum - sum^2 stays below 2^31)
    stack = np.empty((5,) + x.shape, np.int32)
    stack[0], stack[1] = x, y
    np.multiply(x, x, out=stack[2])
    np.multiply(y, y, out=stack[3])
    np.multiply(x, y, out=stack[4])
    for ax in spatial:
        stack = _window_sums(stack, ax + 1)
    sx, sy, sxx, syy, sxy = stack
    n = WIN ** len(spatial)
    # With S_* the window sums, the SSIM terms times n^2 (means) and n(n-1) (sample covariances):
    # exact integers up to the constants.
    lum_num = 2 * sx * sy
    lum_den = sx * sx + sy * sy
    cs_num = 2 * (n * sxy - sx * sy)
    cs_den = (n * sxx - sx * sx) + (n * syy - sy * sy)
    c1 = (K1 * data_range) ** 2 * n * n
    c2 = (K2 * data_range) ** 2 * n * (n - 1)
    num = (lum_num + c1) * (cs_num + c2)
    den = (lum_den + c1) * (cs_den + c2)
    with np.errstate(divide="ignore", invalid="ignore"):
        s = num / den
    zero = den == 0
    if zero.any():  # only with data_range 0 (a constant prediction): flat equal windows count 1
        s[zero] = ((sx == sy) & (cs_den == 0))[zero]
    return float(np.mean(s.mean(axis=spatial, dtype=np.float64)))


def ssim_full(gt: np.ndarray, pred: np.ndarray, data_range: float | None = None) -> float:
    """SSIM of two (H, W, 3) uint8 images as the competition computes it."""
    if gt.shape[0] < WIN or gt.shape[1] < WIN:
        raise ValueError(f"images must be at least {WIN}x{WIN} pixels for SSIM (got {gt.shape[1]}x{gt.shape[0]})")
    if data_range is None:
        data_range = float(pred.max()) - float(pred.min())
    return _ssim(gt.transpose(2, 0, 1), pred.transpose(2, 0, 1), data_range)


def ssim_masked(gt: np.ndarray, pred: np.ndarray, mask: np.ndarray, data_range: float | None = None) -> float:
    """SSIM of the damaged pixels (N x 3, row-major); NaN when N < 7."""
    if data_range is None:
        data_range = float(pred.max()) - float(pred.min())
    g, p = gt[mask], pred[mask]
    if g.shape[0] < WIN:
        return math.nan
    return _ssim(g.T, p.T, data_range)


# ---------------------------------------------------------------- hue histogram
def _hue_table() -> np.ndarray:
    i = np.arange(256, dtype=np.float64)
    # OpenCV: hdiv_table[i] = saturate_cast<int>((180 << 12) / (6. * i)), rounding half to even
    table = np.rint((HUE_BINS << HSV_SHIFT) / (6.0 * np.maximum(i, 1.0)))
    table[0] = 0
    return table.astype(np.int32)


_HDIV = _hue_table()


def hue_u8(rgb: np.ndarray) -> np.ndarray:
    """OpenCV's cvtColor(RGB2HSV) hue channel for uint8 RGB: integers 0..179 (integer arithmetic,
    the same tables and rounding as OpenCV's RGB2HSV_b, so it matches on all 2^24 colours)."""
    if rgb.dtype != np.uint8 or rgb.shape[-1] != 3:
        raise ValueError(f"expected uint8 RGB (..., 3), got {rgb.dtype} {rgb.shape}")
    c = rgb.astype(np.int32)
    r, g, b = c[..., 0], c[..., 1], c[..., 2]
    v = np.maximum(np.maximum(r, g), b)
    diff = v - np.minimum(np.minimum(r, g), b)
    # OpenCV checks v == r first, then v == g
    h = np.where(v == r, g - b, np.where(v == g, b - r + 2 * diff, r - g + 4 * diff))
    h = (h * _HDIV[diff] + (1 << (HSV_SHIFT - 1))) >> HSV_SHIFT
    h += np.where(h < 0, HUE_BINS, 0)
    return h.astype(np.uint8)


def hue_histogram(rgb: np.ndarray) -> np.ndarray:
    """cv2.calcHist of the hue channel, 180 bins over [0, 180), then cv2.normalize (L2), float32."""
    counts = np.bincount(hue_u8(rgb).ravel(), minlength=HUE_BINS)[:HUE_BINS].astype(np.float32)
    norm = math.sqrt(float(np.dot(counts.astype(np.float64), counts.astype(np.float64))))
    return counts * np.float32(1.0 / norm) if norm > 0 else counts


def hist_correlation(h1: np.ndarray, h2: np.ndarray) -> float:
    """cv2.compareHist(h1, h2, HISTCMP_CORREL), double accumulation, 1.0 when the denominator is ~0."""
    a, b = h1.astype(np.float64), h2.astype(np.float64)
    n = a.size
    s1, s2 = a.sum(), b.sum()
    num = float((a * b).sum() - s1 * s2 / n)
    den2 = float(((a * a).sum() - s1 * s1 / n) * ((b * b).sum() - s2 * s2 / n))
    return num / math.sqrt(den2) if abs(den2) > np.finfo(np.float64).eps else 1.0


def hue_similarity(gt: np.ndarray, pred: np.ndarray) -> float:
    return hist_correlation(hue_histogram(gt), hue_histogram(pred))


# ---------------------------------------------------------------- score
def _as_rgb_u8(a, name: str) -> np.ndarray:
    a = np.asarray(a)
    if a.dtype != np.uint8:
        raise ValueError(f"{name} must be uint8 RGB (the competition scores 8-bit PNGs); got {a.dtype}")
    if a.ndim != 3 or a.shape[-1] != 3:
        raise ValueError(f"{name} must have shape (H, W, 3); got {a.shape}")
    return a


def competition_score(pred, gt, mask) -> dict:
    """{'score', 'ssim', 'masked_ssim', 'hue_hist'} for one image.

    pred, gt: (H, W, 3) uint8 RGB; mask: (H, W) (or (H, W, 1)), damaged where > 0 / True.
    masked_ssim and score are NaN when fewer than 7 pixels are damaged (see the module notes).
    """
    pred, gt = _as_rgb_u8(pred, "pred"), _as_rgb_u8(gt, "gt")
    if pred.shape != gt.shape:
        raise ValueError(f"pred and gt differ in size: {pred.shape} vs {gt.shape}")
    mask = np.asarray(mask)
    if mask.ndim == 3 and mask.shape[-1] == 1:
        mask = mask[..., 0]
    if mask.shape != gt.shape[:2]:
        raise ValueError(f"mask must have shape {gt.shape[:2]}; got {mask.shape}")
    mask = mask > 0
    data_range = float(pred.max()) - float(pred.min())
    s_full = ssim_full(gt, pred, data_range)
    s_mask = ssim_masked(gt, pred, mask, data_range)
    hue = hue_similarity(gt, pred)
    score = WEIGHTS["ssim"] * s_full + WEIGHTS["masked_ssim"] * s_mask + WEIGHTS["hue_hist"] * hue
    return {"score": score, "ssim": s_full, "masked_ssim": s_mask, "hue_hist": hue}


def mean_scores(rows: list[dict]) -> dict:
    """Mean of each score over images, skipping NaN (images without a scorable damaged region);
    'images' and 'images_scored' say how many there were and how many counted for 'score'."""
    out = {}
    for key in ("score", "ssim", "masked_ssim", "hue_hist"):
        vals = np.array([r[key] for r in rows], dtype=np.float64)
        ok = ~np.isnan(vals)
        out[key] = float(vals[ok].mean()) if ok.any() else math.nan
    out["images"] = len(rows)
    out["images_scored"] = int(sum(not math.isnan(r["score"]) for r in rows))
    return out
