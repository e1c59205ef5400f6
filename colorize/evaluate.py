"""Score restored images with the competition's metric, per image and overall.

  python colorize/evaluate.py --pred preds/ --gt DATA/test_gt --inputs DATA/test_input
  python colorize/evaluate.py --pred preds/ --gt gt/ --masks masks/ --out eval/

Images are matched by file name (pred/X.png with gt/X.png). The damaged region comes from --masks
(an image per name, damaged where not 0) or is derived from the damaged inputs as
input != gray(gt) (more than --mask-tolerance levels apart). Writes scores.csv (one row per image:
score, ssim, masked_ssim, hue_hist, damaged_pixels) and scores.json (the means, and how many images
had a scorable damaged region: at least 7 pixels), default into runs/colorize/eval-<time>/.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
from torch.utils.data import DataLoader, Dataset

if __package__ in (None, ""):  # `python colorize/<script>.py` from a checkout: import this checkout's packages
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from colorize.data import MASK_TOLERANCE, damage_mask, load_rgb
from colorize.metrics import competition_score, mean_scores
from common.cli import WORKERS, ArgumentParser, add_max_pixels_arg, apply_runtime_args, int_range
from common.data import IMAGE_SUFFIXES
from common.io import (UserError, atomic_write_text, check_output_dir, load_image, make_output_dir,
                       refuse_output_over_inputs, run_cli)

COLUMNS = ("name", "score", "ssim", "masked_ssim", "hue_hist", "damaged_pixels")


def parse_args(argv=None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pred", type=Path, required=True, help="folder of restored images")
    p.add_argument("--gt", type=Path, required=True, help="folder of ground-truth colour images")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--masks", type=Path, help="folder of damaged-region masks (not 0 = damaged)")
    src.add_argument("--inputs", type=Path, help="folder of the damaged gray inputs (masks derived from them)")
    p.add_argument("--mask-tolerance", type=int_range(0, 254), default=MASK_TOLERANCE,
                   help="gray levels an input may differ from gray(gt) and count as undamaged")
    p.add_argument("--out", type=Path, default=None, help="folder for scores.csv / scores.json "
                                                           "(default runs/colorize/eval-<time>)")
    p.add_argument("--overwrite", action="store_true", help="replace scores.csv / scores.json in --out")
    p.add_argument("--workers", type=WORKERS, default=0, help="processes reading and scoring images")
    add_max_pixels_arg(p)
    return p.parse_args(argv)


def images_by_name(folder: Path, flag: str) -> dict[str, Path]:
    if not folder.is_dir():
        raise UserError(f"{flag} {folder}: not a folder")
    found = {}
    for p in sorted(folder.iterdir()):
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES:
            if p.stem in found:
                raise UserError(f"{p}: two images named {p.stem} in {folder}")
            found[p.stem] = p
    if not found:
        raise UserError(f"{flag} {folder}: holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return found


def match(args) -> list[tuple[str, Path, Path, Path | None, bool]]:
    """(name, pred, gt, mask or input, is_mask) for every ground-truth image."""
    gt = images_by_name(args.gt, "--gt")
    pred = images_by_name(args.pred, "--pred")
    side = args.masks or args.inputs
    if side is None:
        raise UserError("give --masks DIR or --inputs DIR: the masked SSIM needs the damaged region")
    aux = images_by_name(side, "--masks" if args.masks else "--inputs")
    items = []
    for name, g in gt.items():
        if name not in pred:
            raise UserError(f"{args.pred}: no restored image for {g.name} (expected {name}.png)")
        if name not in aux:
            raise UserError(f"{side}: no {'mask' if args.masks else 'input'} for {g.name}")
        items.append((name, pred[name], g, aux[name], args.masks is not None))
    extra = sorted(set(pred) - set(gt))
    if extra:
        print(f"note: {len(extra)} image(s) in {args.pred} have no ground truth and are not scored (e.g. {extra[0]})")
    return items


class Scored(Dataset):
    """Reads one (pred, gt, mask/input) triple and scores it: the work a DataLoader can spread over processes."""

    def __init__(self, items, tolerance: int):
        self.items, self.tolerance = items, tolerance

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        name, pred_path, gt_path, aux_path, is_mask = self.items[i]
        gt, pred = load_rgb(gt_path), load_rgb(pred_path)
        if pred.shape != gt.shape:
            raise UserError(f"{pred_path}: {pred.shape[1]}x{pred.shape[0]}, but the ground truth {gt_path} is "
                            f"{gt.shape[1]}x{gt.shape[0]}")
        if is_mask:
            mask = np.asarray(load_image(aux_path, "L")) > 0
        else:
            mask = damage_mask(load_rgb(aux_path), gt, self.tolerance)
        if mask.shape != gt.shape[:2]:
            raise UserError(f"{aux_path}: {mask.shape[1]}x{mask.shape[0]}, but the ground truth {gt_path} is "
                            f"{gt.shape[1]}x{gt.shape[0]}")
        return {"name": name, **competition_score(pred, gt, mask), "damaged_pixels": int(mask.sum())}


def evaluate(items, tolerance: int = MASK_TOLERANCE, workers: int = 0) -> list[dict]:
    loader = DataLoader(Scored(items, tolerance), batch_size=None, num_workers=workers)
    return list(loader)


def write_results(out: Path, rows: list[dict], summary: dict) -> None:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(COLUMNS)
    for r in rows:
        w.writerow([r["name"]] + [("nan" if math.isnan(r[k]) else f"{r[k]:.6f}") for k in COLUMNS[1:5]]
                   + [r["damaged_pixels"]])
    atomic_write_text(out / "scores.csv", buf.getvalue())
    safe = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in summary.items()}
    atomic_write_text(out / "scores.json", json.dumps(safe, indent=2) + "\n")


def main(argv=None):
    args = parse_args(argv)
    apply_runtime_args(args)
    out = args.out or Path("runs") / "colorize" / f"eval-{time.strftime('%Y%m%d-%H%M%S')}"
    refuse_output_over_inputs([("--pred", args.pred), ("--gt", args.gt), ("--masks", args.masks),
                               ("--inputs", args.inputs)],
                              folders=[("--out", out, ("scores.csv", "scores.json"))], alongside=True)
    check_output_dir(out, ("scores.csv", "scores.json"), args.overwrite)
    items = match(args)
    t0 = time.perf_counter()
    rows = evaluate(items, args.mask_tolerance, args.workers)
    elapsed = time.perf_counter() - t0
    summary = {**mean_scores(rows), "pred": str(args.pred), "gt": str(args.gt),
               "masks_from": f"--masks {args.masks}" if args.masks else f"input != gray(gt), --inputs {args.inputs}"}
    make_output_dir(out)
    write_results(out, rows, summary)
    skipped = summary["images"] - summary["images_scored"]
    print(f"{len(rows)} image(s) scored in {elapsed:.1f} s: score {summary['score']:.4f} (ssim {summary['ssim']:.4f}, "
          f"masked ssim {summary['masked_ssim']:.4f}, hue histogram {summary['hue_hist']:.4f})")
    if skipped:
        print(f"note: {skipped} image(s) have fewer than 7 damaged pixels: no masked SSIM, so no score; "
              f"the means skip them")
    print(f"results written to {out / 'scores.csv'} and {out / 'scores.json'}")
    return summary


if __name__ == "__main__":
    sys.exit(run_cli(main))
