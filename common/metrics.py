"""Metrics: image quality (PSNR, SSIM, MS-SSIM), classification, ROC-AUC, Youden's J, Pearson.

Classification metrics take integer labels / predictions as arrays or tensors and return plain
floats and numpy arrays; they follow scikit-learn's definitions (0 where a ratio is 0/0).
"""
from __future__ import annotations

import functools

import numpy as np
import torch
from pytorch_msssim import ms_ssim as _ms_ssim
from pytorch_msssim import ssim as _ssim


def _np(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().float().cpu().numpy() if x.is_floating_point() else x.detach().cpu().numpy()
    return np.asarray(x)


# ---------------------------------------------------------------- images
def _fp32(fn):
    """Metrics in full precision even when called under autocast (validation runs inside it)."""
    @functools.wraps(fn)
    def wrapper(pred, target, *args, **kw):
        with torch.autocast(pred.device.type, enabled=False):
            return fn(pred.float(), target.float(), *args, **kw)
    return wrapper


@_fp32
def psnr(pred: torch.Tensor, target: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Per-image PSNR in dB, shape (B,); pred/target (B,C,H,W). Identical images give inf."""
    mse = (pred - target).pow(2).flatten(1).mean(1)
    return 10.0 * torch.log10(data_range ** 2 / mse)


@_fp32
def ssim(pred: torch.Tensor, target: torch.Tensor, data_range: float = 1.0, size_average: bool = True):
    """SSIM with an 11x11 Gaussian window (sigma 1.5), via pytorch-msssim."""
    return _ssim(pred, target, data_range=data_range, size_average=size_average)


@_fp32
def ms_ssim(pred: torch.Tensor, target: torch.Tensor, data_range: float = 1.0, size_average: bool = True, **kw):
    """MS-SSIM via pytorch-msssim (needs images larger than 160 px with the default 5 scales)."""
    return _ms_ssim(pred, target, data_range=data_range, size_average=size_average, **kw)


# ---------------------------------------------------------------- classification
def confusion_matrix(y_true, y_pred, num_classes: int) -> np.ndarray:
    """Rows = true class, columns = predicted class."""
    t, p = _np(y_true).astype(np.int64).ravel(), _np(y_pred).astype(np.int64).ravel()
    return np.bincount(t * num_classes + p, minlength=num_classes ** 2).reshape(num_classes, num_classes)


def _div(a, b):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return np.divide(a, b, out=np.zeros_like(a), where=b != 0)


def classification_report(y_true, y_pred, num_classes: int) -> dict:
    """Accuracy; precision/recall/F1 per class, macro and support-weighted; confusion matrix."""
    cm = confusion_matrix(y_true, y_pred, num_classes)
    tp = np.diag(cm).astype(np.float64)
    support = cm.sum(1)
    precision = _div(tp, cm.sum(0))
    recall = _div(tp, support)
    f1 = _div(2 * precision * recall, precision + recall)
    weights = _div(support, support.sum())
    return {
        "accuracy": float(_div(tp.sum(), cm.sum())),
        "precision_macro": float(precision.mean()),
        "recall_macro": float(recall.mean()),
        "f1_macro": float(f1.mean()),
        "precision_weighted": float((precision * weights).sum()),
        "recall_weighted": float((recall * weights).sum()),
        "f1_weighted": float((f1 * weights).sum()),
        "per_class": {"precision": precision, "recall": recall, "f1": f1, "support": support},
        "confusion_matrix": cm,
    }


# ---------------------------------------------------------------- ROC
def roc_curve(y_true, scores):
    """(fpr, tpr, thresholds), thresholds descending; a sample is positive when score >= threshold."""
    y, s = _np(y_true).astype(bool).ravel(), _np(scores).astype(np.float64).ravel()
    order = np.argsort(-s, kind="mergesort")
    y, s = y[order], s[order]
    last_of_run = np.r_[np.nonzero(np.diff(s))[0], len(s) - 1]  # keep one point per distinct score
    tps = np.cumsum(y)[last_of_run]
    fps = (last_of_run + 1) - tps
    pos, neg = max(1, y.sum()), max(1, (~y).sum())
    return (np.r_[0.0, fps / neg], np.r_[0.0, tps / pos], np.r_[np.inf, s[last_of_run]])


def roc_auc(y_true, scores) -> float:
    """Binary ROC-AUC (Mann-Whitney U with average ranks for ties); nan when one class is absent."""
    y, s = _np(y_true).astype(bool).ravel(), _np(scores).astype(np.float64).ravel()
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s), dtype=np.float64)
    sorted_s = s[order]
    starts = np.r_[0, np.nonzero(np.diff(sorted_s))[0] + 1]
    ends = np.r_[starts[1:], len(s)]
    for a, b in zip(starts, ends):  # tied scores share their average rank (1-based)
        ranks[order[a:b]] = (a + b + 1) / 2.0
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def roc_auc_ovr(y_true, probs) -> float:
    """One-vs-rest macro ROC-AUC over the classes present with both positives and negatives."""
    y, p = _np(y_true).astype(np.int64).ravel(), _np(probs)
    aucs = [roc_auc(y == c, p[:, c]) for c in range(p.shape[1])]
    aucs = [a for a in aucs if not np.isnan(a)]
    return float(np.mean(aucs)) if aucs else float("nan")


def youden_threshold(y_true, scores) -> tuple[float, float]:
    """(threshold, J) maximising J = TPR - FPR; positive means score >= threshold."""
    fpr, tpr, thr = roc_curve(y_true, scores)
    j = tpr - fpr
    best = int(np.argmax(j[1:])) + 1  # skip the (0,0) point whose threshold is +inf
    return float(thr[best]), float(j[best])


# ---------------------------------------------------------------- regression
def pearson(x: torch.Tensor, y: torch.Tensor, dim: int = -1, eps: float = 1e-8) -> torch.Tensor:
    """Pearson correlation along `dim` (e.g. per spectrum)."""
    x = x - x.mean(dim, keepdim=True)
    y = y - y.mean(dim, keepdim=True)
    return (x * y).sum(dim) / (x.pow(2).sum(dim).sqrt() * y.pow(2).sum(dim).sqrt() + eps)


def best_threshold(y_true, scores, criterion: str = "f1") -> tuple[float, float]:
    """(threshold, value) of the cut of `scores` that maximises `criterion`: 'f1' (F1 of the positive
    class) or 'youden' (J = TPR - FPR). The threshold lies halfway between two adjacent distinct
    scores (below the lowest one when flagging everything is best: at 3/4 of it for positive scores),
    so `score > threshold` and `score >= threshold` make the same decisions. Ties go to the highest threshold. nan when one
    class is absent."""
    if criterion not in ("f1", "youden"):
        raise ValueError("criterion must be 'f1' or 'youden'")
    y, s = _np(y_true).astype(bool).ravel(), _np(scores).astype(np.float64).ravel()
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan"), float("nan")
    fpr, tpr, thr = roc_curve(y, s)          # cut k flags the scores >= thr[k]; thr[0] = inf flags none
    tp = tpr[1:] * n_pos
    if criterion == "f1":
        value = 2 * tp / (tp + fpr[1:] * n_neg + n_pos)
    else:
        value = tpr[1:] - fpr[1:]
    k = int(np.argmax(value))
    flagged = thr[1:]                        # distinct scores, descending
    if k + 1 < len(flagged):
        below = flagged[k + 1]
    else:                                    # everything flagged: a cut under the lowest score
        below = flagged[k] / 2.0 if flagged[k] > 0 else flagged[k] - 1.0
    cut = (flagged[k] + below) / 2.0
    if not below < cut < flagged[k]:         # adjacent floats: no number between them; `score > cut` holds
        cut = below
    return float(cut), float(value[k])
