"""Run CRBL models on images and write a CSV of path, probability, decision.

  python crbl/infer.py --model-type crop --weights best.pt images/ more.png
  python crbl/infer.py --model-type full --weights converted_full.pth labels.csv
  python crbl/infer.py --combined CROP.pt FULL.pt images/      # defect if crop > 0.01 or full > 0.5

Inputs are image files, folders (every .png/.jpg/.bmp/.tif inside), or CSVs with an image_path
column (relative to the CSV). When a CSV also has `impurity`, accuracy / F1 / ROC-AUC are printed.
--weights takes a training checkpoint (best.pt / last.pt) or a converted state_dict.
"""
from __future__ import annotations

import argparse
import csv
import io
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from common.data import list_images, read_csv
from common.device import select_device
from common.io import UserError, atomic_write_text, load_weights_into, run_cli
from common.metrics import classification_report, roc_auc
from crbl.data import preprocess
from crbl.model import CRBL, DEFAULT_THRESHOLDS, MODEL_TYPES

def collect_inputs(inputs: list[Path]) -> tuple[list[Path], dict[Path, int]]:
    """Image paths in the order given, plus labels where a CSV provides them."""
    paths, labels = [], {}
    for item in inputs:
        if item.suffix.lower() == ".csv" and item.is_file():
            for line, row in read_csv(item, ("image_path",)):
                path = (item.parent / (row["image_path"] or "").strip()).resolve()
                paths.append(path)
                label = (row.get("impurity") or "").strip()
                if label:
                    if label not in ("0", "1"):
                        raise UserError(f"{item}, line {line}: impurity must be 0 or 1 (got {label!r})")
                    labels[path] = int(label)
        else:
            paths += list_images(item)
    return paths, labels


def load_model(weights: Path, device: torch.device) -> CRBL:
    model = CRBL()
    load_weights_into(model, weights)
    return model.to(device).eval()


@torch.inference_mode()
def predict(model: CRBL, model_type: str, paths: list[Path], device: torch.device, batch_size: int) -> torch.Tensor:
    probs = []
    for i in tqdm(range(0, len(paths), batch_size), desc=f"{model_type} model", leave=False,
                  disable=len(paths) <= batch_size):
        x = torch.stack([preprocess(p, model_type) for p in paths[i:i + batch_size]]).to(device)
        probs.append(torch.sigmoid(model(x).float()).squeeze(1).cpu())
    return torch.cat(probs)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", type=Path, nargs="+", help="images, folders or CSVs")
    p.add_argument("--model-type", choices=MODEL_TYPES)
    p.add_argument("--weights", type=Path)
    p.add_argument("--combined", type=Path, nargs=2, metavar=("CROP_WEIGHTS", "FULL_WEIGHTS"))
    p.add_argument("--threshold", type=float, help="decision threshold (single model; default 0.01 crop / 0.5 full)")
    p.add_argument("--crop-threshold", type=float, default=DEFAULT_THRESHOLDS["crop"])
    p.add_argument("--full-threshold", type=float, default=DEFAULT_THRESHOLDS["full"])
    p.add_argument("--out", type=Path, help="CSV to write (default runs/crbl/predictions-<time>.csv)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)
    if args.combined is None and (args.model_type is None or args.weights is None):
        p.error("give --model-type and --weights, or --combined CROP_WEIGHTS FULL_WEIGHTS")
    if args.combined is not None and (args.weights is not None or args.threshold is not None):
        p.error("--combined takes its own two weight files and --crop-threshold / --full-threshold")
    out = args.out or Path("runs") / "crbl" / f"predictions-{time.strftime('%Y%m%d-%H%M%S')}.csv"
    if out.exists() and not args.overwrite:
        raise UserError(f"{out} already exists; choose another --out or pass --overwrite")

    paths, labels = collect_inputs(args.inputs)
    device = select_device(args.device)
    if args.combined:
        crop_w, full_w = args.combined
        p_crop = predict(load_model(crop_w, device), "crop", paths, device, args.batch_size)
        p_full = predict(load_model(full_w, device), "full", paths, device, args.batch_size)
        flags = (p_crop > args.crop_threshold) | (p_full > args.full_threshold)
        header = ["path", "prob_crop", "prob_full", "decision"]
        rows = [[str(q), f"{a:.6g}", f"{b:.6g}", "defect" if f else "normal"]
                for q, a, b, f in zip(paths, p_crop.tolist(), p_full.tolist(), flags.tolist())]
        score = torch.maximum(p_crop / args.crop_threshold, p_full / args.full_threshold)
    else:
        threshold = DEFAULT_THRESHOLDS[args.model_type] if args.threshold is None else args.threshold
        prob = predict(load_model(args.weights, device), args.model_type, paths, device,
                       args.batch_size)
        flags = prob > threshold
        header = ["path", "probability", "decision"]
        rows = [[str(q), f"{v:.6g}", "defect" if f else "normal"] for q, v, f in zip(paths, prob.tolist(), flags.tolist())]
        score = prob

    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(header)
    w.writerows(rows)
    atomic_write_text(out, buf.getvalue())
    print(f"{len(paths)} image(s): {int(flags.sum())} flagged as defect")
    if labels and len(labels) == len(paths):
        y = torch.tensor([labels[q] for q in paths])
        r = classification_report(y, flags.long(), 2)
        print(f"labels found: accuracy={r['accuracy']:.4f} f1={r['per_class']['f1'][1]:.4f} "
              f"roc_auc={roc_auc(y, score):.4f}")
    print(f"predictions written to {out}")


if __name__ == "__main__":
    sys.exit(run_cli(main))
