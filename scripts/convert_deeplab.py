"""Convert a pytorch-deeplab-xception DeepLab(backbone='drn') checkpoint into a plain state_dict.

    python scripts/convert_deeplab.py IN OUT [--task classify|segment]

IN is what that project's train.py writes ({'epoch', 'state_dict', 'optimizer', 'best_pred'}) or a
bare state_dict; 'module.' prefixes are stripped. It is read with torch.load(weights_only=True):
only tensors, plain containers and a numpy float64 scalar (best_pred) are accepted, never code.

--task classify (default): the 378 backbone.* + aspp.* tensors are written, the 20 decoder.* tensors
    are skipped. Load with battery_ct.model.load_converted(build_model('deeplabv3'), OUT): the
    classifier (Linear 256 -> 5) is not in the file and keeps its fresh initialisation.
--task segment: all 398 tensors; load strictly into build_model('deeplab_seg', num_classes=N)
    (N is read from decoder.last_conv.8.weight) with load_converted or load_state_dict.
OUT is written atomically; on any error nothing is written.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import sys
import torch

if __package__ in (None, ""):  # `python <folder>/<script>.py` from a checkout: import this checkout's packages
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from battery_ct.model import DeepLabClassifier, DeepLabSeg, describe_key_mismatch
from common.cli import ArgumentParser
from common.checkpoint import checkpoint_task
from common.io import (UserError, atomic_torch_save, check_output_file, load_untrusted, refuse_output_over_inputs,
                       run_cli)

try:  # numpy >= 2
    from numpy._core.multiarray import scalar as _numpy_scalar
except ImportError:  # numpy 1.x
    from numpy.core.multiarray import scalar as _numpy_scalar

# Exactly what unpickling one numpy float64 scalar (best_pred) needs, nothing more. Files written
# with numpy 1.x name the reconstructor numpy.core.multiarray.scalar: same function, older name.
NUMPY_SCALAR_GLOBALS = [
    _numpy_scalar,
    (_numpy_scalar, "numpy.core.multiarray.scalar"),
    np.dtype,
    np.dtypes.Float64DType,
]


def expected_state(task: str, num_classes: int) -> dict[str, torch.Tensor]:
    """Key -> meta tensor (shape, dtype) of the converted state_dict, without allocating weights."""
    with torch.device("meta"):
        if task == "segment":
            return DeepLabSeg(num_classes).state_dict()
        return {k: v for k, v in DeepLabClassifier().state_dict().items() if not k.startswith("classifier.")}


def extract_state_dict(obj, path) -> tuple[dict[str, torch.Tensor], dict]:
    """(state_dict without 'module.' prefixes, the checkpoint's other entries)."""
    meta = {}
    if isinstance(obj, dict) and "state_dict" in obj:
        meta = {k: v for k, v in obj.items() if k != "state_dict"}
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not obj:
        raise UserError(f"{path}: no state_dict found (expected a pytorch-deeplab-xception checkpoint "
                        f"with a 'state_dict' entry, or a bare state_dict)")
    bad = [str(k) for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise UserError(f"{path}: the state_dict holds {len(bad)} entries that are not named tensors "
                        f"({', '.join(bad[:5])})")
    return {k.removeprefix("module."): v for k, v in obj.items()}, meta


def convert(src: Path, dst: Path, task: str, overwrite: bool = False) -> dict:
    refuse_output_over_inputs([("IN", src)], files=[("OUT", dst)])
    check_output_file(dst, overwrite, flag="OUT")
    obj = load_untrusted(src, safe_globals=NUMPY_SCALAR_GLOBALS)
    held = checkpoint_task(obj)
    if held is not None:
        raise UserError(f"{src} is a {held} checkpoint of this project; convert_deeplab.py needs the original "
                        f"DeepLab weights (this project's checkpoints need no conversion)")
    sd, meta = extract_state_dict(obj, src)

    head = sd.get("decoder.last_conv.8.weight")
    num_classes = int(head.shape[0]) if head is not None and head.ndim == 4 else 4
    want = expected_state(task, num_classes)
    skipped = [k for k in sd if task == "classify" and k.startswith("decoder.")]
    missing = [k for k in want if k not in sd]
    unexpected = [k for k in sd if k not in want and k not in skipped]
    wrong = [f"{k} {tuple(sd[k].shape)} != {tuple(want[k].shape)}" for k in want
             if k in sd and tuple(sd[k].shape) != tuple(want[k].shape)]
    wrong += [f"{k} {sd[k].dtype} != {want[k].dtype}" for k in want
              if k in sd and sd[k].is_floating_point() != want[k].is_floating_point()]
    if missing or unexpected or wrong:
        hint = ""
        if task == "segment" and missing and all(k.startswith("decoder.") for k in missing):
            hint = " (no segmentation decoder in this file: use --task classify)"
        raise UserError(f"{src}: not a DeepLab DRN-D-54 (output stride 8) checkpoint for --task {task}: "
                        f"{describe_key_mismatch(missing, unexpected, wrong)}{hint}")

    out = {k: sd[k].to(want[k].dtype).contiguous().clone() for k in want}  # model order, plain tensors
    atomic_torch_save(out, dst)

    with torch.device("meta"):
        model = DeepLabSeg(num_classes) if task == "segment" else DeepLabClassifier()
    param_names = {n for n, _ in model.named_parameters()}
    return {
        "epoch": meta.get("epoch"),
        "best_pred": meta.get("best_pred"),
        "optimizer": "optimizer" in meta,
        "kept": len(out),
        "skipped": skipped,
        "params": sum(v.numel() for k, v in out.items() if k in param_names),
        "buffers": sum(v.numel() for k, v in out.items() if k not in param_names),
        "num_classes": num_classes,
    }


def _plain(v):
    if isinstance(v, torch.Tensor) and v.numel() == 1:
        return v.item()
    if isinstance(v, np.generic):
        return v.item()
    return v


def main(argv=None) -> None:
    ap = ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("input", type=Path, help="pytorch-deeplab-xception checkpoint (.pth.tar / .pt)")
    ap.add_argument("output", type=Path, help="converted state_dict to write")
    ap.add_argument("--task", choices=("classify", "segment"), default="classify")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    args = ap.parse_args(argv)

    r = convert(args.input, args.output, args.task, args.overwrite)
    epoch, best = _plain(r["epoch"]), _plain(r["best_pred"])
    print(f"read {args.input}: epoch {'n/a' if epoch is None else epoch}, best_pred "
          f"{'n/a' if best is None else (f'{best:.6f}' if isinstance(best, float) else best)}"
          f"{' (optimizer state ignored)' if r['optimizer'] else ''}")
    skipped = f" ({', '.join(sorted({k.split('.')[0] + '.*' for k in r['skipped']}))})" if r["skipped"] else ""
    print(f"kept {r['kept']} tensors ({r['params']:,} parameters, {r['buffers']:,} buffer values), "
          f"skipped {len(r['skipped'])}{skipped}")
    if args.task == "classify":
        print("classifier (Linear 256 -> 5) is not in the converted file: it keeps its fresh initialisation; "
              "load with battery_ct.model.load_converted(build_model('deeplabv3'), OUT)")
    else:
        print(f"segmentation model with {r['num_classes']} classes: "
              f"load_converted(build_model('deeplab_seg', num_classes={r['num_classes']}), OUT)")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    run_cli(main)
