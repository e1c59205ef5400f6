"""Record the competition score's reference values with the libraries the DACON baseline uses.

Needs OpenCV, scikit-image and pandas, which are not project requirements; run it in a separate
environment:

  python3 -m venv /tmp/cvenv && /tmp/cvenv/bin/pip install opencv-python-headless scikit-image pandas numpy
  PYTHONPATH=. /tmp/cvenv/bin/python tests/colorize_ref/make_metric_fixture.py

Writes tests/colorize_ref/metric_fixture.json:
  cases    per case of metric_cases.make_cases(): its checksum and score / ssim / masked_ssim /
           hue_hist from skimage.metrics.structural_similarity + cv2 (the baseline's functions,
           baseline_metric.py); masked_ssim is null where scikit-image raises (< 7 damaged pixels)
  hue      OpenCV's 8-bit RGB->HSV hue of all 2^24 colours: sha256 of the whole table and a crc32
           per red value (so a mismatch says where), plus the same for cv2 RGB2GRAY
  resize   cv2.resize(INTER_LINEAR) of a test image to several sizes (uint8 bytes, base64)
  split    the rows pandas' df.sample(frac=..., random_state=42) gives the original's ImageDataset
"""
from __future__ import annotations

import base64
import hashlib
import json
import sys
import zlib
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import skimage

sys.path.insert(0, str(Path(__file__).resolve().parent))
from baseline_metric import baseline_hue_similarity, baseline_masked_ssim, baseline_ssim  # noqa: E402
from metric_cases import RESIZE_SIZES, SPLIT_CASES, all_colours, checksum, make_cases, resize_source  # noqa: E402

OUT = Path(__file__).resolve().parent / "metric_fixture.json"


def reference(pred, gt, mask) -> dict:
    s = float(baseline_ssim(gt, pred))
    try:
        m = float(baseline_masked_ssim(gt, pred, mask.astype(np.uint8)))
    except ValueError:   # win_size exceeds image extent
        m = None
    h = float(baseline_hue_similarity(gt, pred))
    return {"score": None if m is None else 0.2 * s + 0.4 * m + 0.4 * h, "ssim": s, "masked_ssim": m,
            "hue_hist": h}


def table_hashes(table: np.ndarray) -> dict:
    return {"sha256": hashlib.sha256(table.tobytes()).hexdigest(),
            "crc32_per_red": [zlib.crc32(table[r].tobytes()) for r in range(256)]}


def main():
    fixture = {"versions": {"opencv": cv2.__version__, "scikit-image": skimage.__version__,
                            "numpy": np.__version__, "pandas": pd.__version__}, "cases": []}
    for name, pred, gt, mask in make_cases():
        fixture["cases"].append({"name": name, "checksum": checksum(pred, gt, mask), **reference(pred, gt, mask)})
    colours = all_colours()
    fixture["hue"] = table_hashes(cv2.cvtColor(colours, cv2.COLOR_RGB2HSV)[..., 0])
    fixture["gray"] = table_hashes(cv2.cvtColor(colours, cv2.COLOR_RGB2GRAY))
    src = resize_source()
    fixture["resize"] = [{"size": [h, w], "uint8_b64": base64.b64encode(
        cv2.resize(src, (w, h), interpolation=cv2.INTER_LINEAR).tobytes()).decode()} for h, w in RESIZE_SIZES]
    fixture["split"] = []
    for n, frac in SPLIT_CASES:
        df = pd.DataFrame({"row": np.arange(n)})
        if frac < 1.0:   # the original ImageDataset: subset, then 20 % of it for validation, the rest training
            df = df.sample(frac=frac, random_state=42)
        val = df.sample(frac=0.2, random_state=42)
        train = df.drop(val.index)
        fixture["split"].append({"rows": n, "subset": frac, "val": val["row"].tolist(), "train": train["row"].tolist()})
    OUT.write_text(json.dumps(fixture, indent=None, separators=(",", ":")) + "\n")
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes, {len(fixture['cases'])} cases)")


if __name__ == "__main__":
    main()
