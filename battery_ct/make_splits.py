"""Split a labelled CT image set 70/15/15 by battery, so no battery is in two splits.

  python battery_ct/make_splits.py --labels all.txt --out splits/      # path<TAB>label list
  python battery_ct/make_splits.py --images DIR --out splits/          # DIR/<class_name>/*.jpg

Batteries are grouped by the ID in their file names (CT_{type}_{package}_{id}_{axis}_{slice}),
given their majority class, shuffled per class with --seed (42) and cut with floors; the result
is checked for leaks before anything is written.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

if __package__ in (None, ""):  # `python <folder>/<script>.py` from a checkout: import this checkout's packages
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from battery_ct.data import (CLASS_NAMES, class_counts, parse_name, read_split, split_by_battery,
                             write_split)
from common.data import IMAGE_SUFFIXES
from common.cli import SEED, ArgumentParser
from common.io import UserError, check_output_dir, make_output_dir, refuse_output_over_inputs, run_cli



def items_from_folders(root: Path) -> list[tuple[Path, int]]:
    items = []
    for label, name in enumerate(CLASS_NAMES):
        folder = root / name
        if folder.is_dir():
            items += [(p.resolve(), label) for p in sorted(folder.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES]
    if not items:
        raise UserError(f"{root}: no images in class folders ({', '.join(CLASS_NAMES)})")
    return items


def main(argv=None):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--labels", type=Path, help="split-format file listing every image")
    src.add_argument("--images", type=Path, help="folder with one sub-folder per class")
    p.add_argument("--root", type=Path, help="base for relative paths in --labels")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--seed", type=SEED, default=42)
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)

    targets = [args.out / f"{s}.txt" for s in ("train", "val", "test")]
    refuse_output_over_inputs([("--labels", args.labels), ("--images", args.images)],
                              folders=[("--out", args.out, [t.name for t in targets])], alongside=True)
    check_output_dir(args.out, [t.name for t in targets], args.overwrite)
    items = read_split(args.labels, args.root) if args.labels else items_from_folders(args.images)
    splits = split_by_battery([(p.resolve(), y) for p, y in items], seed=args.seed)
    make_output_dir(args.out)
    out = args.out.resolve()
    for name, files in splits.items():
        inside = all(str(f).startswith(str(out) + os.sep) for f, _ in files)
        write_split(out / f"{name}.txt", files, relative_to=out if inside else None)
    batteries = {n: len({parse_name(f)['battery_id'] for f, _ in files}) for n, files in splits.items()}
    print(f"{len(items)} images, seed {args.seed}; no battery is in two splits (checked)")
    for name, files in splits.items():
        print(f"  {name:5s} {len(files):6d} images, {batteries[name]:4d} batteries, per class {class_counts(files)}")
    for name, files in splits.items():
        if not files:
            print(f"warning: {name} split is empty: too few batteries per class for a 70/15/15 cut by battery")
    print(f"splits written to {', '.join(str(t) for t in targets)}")


if __name__ == "__main__":
    sys.exit(run_cli(main))
