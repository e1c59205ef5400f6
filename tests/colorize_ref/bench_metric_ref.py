"""Bench reference for `scripts/bench.py colorize`: the baseline's scoring loop with OpenCV and
scikit-image over a folder of (pred, gt, input) PNGs, as a participant scores a validation set:
cv2.imread each file, the mask as input != gray(gt) (more than 2 levels), the three terms.
Prints one JSON line {"img_s": ..., "score": ...}. Run with a Python that has cv2 and skimage:

  python tests/colorize_ref/bench_metric_ref.py FOLDER --repeats 3
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from baseline_metric import baseline_score  # noqa: E402


def read_rgb(path: Path) -> np.ndarray:
    return cv2.cvtColor(cv2.imread(str(path), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


def score_folder(folder: Path) -> tuple[int, float]:
    names = sorted(p.name for p in (folder / "gt").iterdir())
    total = 0.0
    for n in names:
        gt, pred, inp = read_rgb(folder / "gt" / n), read_rgb(folder / "pred" / n), read_rgb(folder / "inputs" / n)
        gray = cv2.cvtColor(gt, cv2.COLOR_RGB2GRAY).astype(np.int16)
        mask = (np.abs(inp.astype(np.int16) - gray[..., None]).max(-1) > 2).astype(np.uint8)
        total += baseline_score(gt, pred, mask)
    return len(names), total / len(names)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("folder", type=Path)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    cv2.setNumThreads(1)
    score_folder(args.folder)   # warm-up
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        n, score = score_folder(args.folder)
        times.append(time.perf_counter() - t0)
    print(json.dumps({"img_s": n / sorted(times)[len(times) // 2], "score": score, "opencv": cv2.__version__}))


if __name__ == "__main__":
    main()
