"""The DACON 236420 baseline's score functions with scikit-image and OpenCV, as participants' metric.py
files use them (reference digest, section 6.1). Needs cv2 and skimage: used only by the fixture
generator and the bench reference, never by the project."""
from __future__ import annotations

import cv2
from skimage.metrics import structural_similarity


def baseline_ssim(true, pred):
    return structural_similarity(true, pred, channel_axis=-1, data_range=pred.max() - pred.min())


def baseline_masked_ssim(true, pred, mask):
    return structural_similarity(true[mask > 0], pred[mask > 0], channel_axis=-1,
                                 data_range=pred.max() - pred.min())


def baseline_hue_similarity(true, pred):
    ht = cv2.calcHist([cv2.cvtColor(true, cv2.COLOR_RGB2HSV)], [0], None, [180], [0, 180])
    hp = cv2.calcHist([cv2.cvtColor(pred, cv2.COLOR_RGB2HSV)], [0], None, [180], [0, 180])
    ht = cv2.normalize(ht, ht).flatten()
    hp = cv2.normalize(hp, hp).flatten()
    return cv2.compareHist(ht, hp, cv2.HISTCMP_CORREL)


def baseline_score(true, pred, mask):
    return (0.2 * baseline_ssim(true, pred) + 0.4 * baseline_masked_ssim(true, pred, mask)
            + 0.4 * baseline_hue_similarity(true, pred))
