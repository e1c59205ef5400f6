"""Command-line flags every task's train.py shares, and the run setup behind them."""
from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from common.device import AMP_CHOICES, amp_dtype, select_device
from common.distributed import DistInfo, init_distributed, local_device
from common.io import UserError
from common.repro import seed_everything


def add_common_args(p: argparse.ArgumentParser, *, epochs: int | None, batch_size: int | None,
                    lr: float | None, workers: int = 2, clip_grad: float | None = None) -> None:
    """The shared flags. A default of None means the task picks one per model after parsing."""
    per_model = "default: depends on the model"
    g = p.add_argument_group("common options")
    g.add_argument("--data", type=Path, default=None,
                   help="dataset location (default: generate and use the built-in demo dataset)")
    g.add_argument("--out", type=Path, default=None, help="run folder (default: runs/<task>/<name>-<time>)")
    g.add_argument("--epochs", type=int, default=epochs, help=per_model if epochs is None else None)
    g.add_argument("--batch-size", type=int, default=batch_size,
                   help="per process" + (f"; {per_model}" if batch_size is None else ""))
    g.add_argument("--lr", type=float, default=lr, help=per_model if lr is None else None)
    g.add_argument("--device", default="auto", help="auto | cpu | cuda[:N] | mps | directml")
    g.add_argument("--amp", default="auto", choices=AMP_CHOICES,
                   help="mixed precision: auto = fp16 on CUDA, off on CPU; bf16 works on both")
    g.add_argument("--resume", type=Path, default=None, help="continue exactly from a last.pt checkpoint")
    g.add_argument("--seed", type=int, default=42)
    g.add_argument("--workers", type=int, default=workers, help="DataLoader worker processes")
    g.add_argument("--accum-steps", type=int, default=1, help="gradient accumulation micro-batches")
    g.add_argument("--clip-grad", type=float, default=clip_grad,
                   help=f"max gradient norm ({'off' if not clip_grad else clip_grad} by default; 0 = off)")
    g.add_argument("--channels-last", action="store_true", help="NHWC memory format (faster on GPUs)")
    g.add_argument("--deterministic", action="store_true", help="deterministic algorithms only")
    g.add_argument("--save-every", type=int, default=0, help="also keep epoch_NNNN.pt every N epochs")
    g.add_argument("--no-progress", action="store_true", help="no tqdm bars (for log files)")


@dataclass
class Run:
    device: torch.device
    info: DistInfo
    amp_dtype: torch.dtype | None
    out_dir: Path


def setup_run(args: argparse.Namespace, task: str, name: str) -> Run:
    """Validate the common flags, pick the device, join torchrun's group, seed, choose the run folder.

    A fresh run refuses a folder that already holds a run, so nothing written before is overwritten.
    """
    for flag, value in (("--epochs", args.epochs), ("--batch-size", args.batch_size),
                        ("--accum-steps", args.accum_steps)):
        if value < 1:
            raise UserError(f"{flag} must be at least 1 (got {value})")
    if not args.lr > 0:
        raise UserError(f"--lr must be positive (got {args.lr})")
    if args.workers < 0:
        raise UserError(f"--workers must be 0 or more (got {args.workers})")
    if args.resume is not None and not args.resume.is_file():
        raise UserError(f"{args.resume}: checkpoint to resume from not found")
    device = select_device(args.device)
    info = init_distributed(device)
    device = local_device(device, info)
    dtype = amp_dtype(device, args.amp)
    seed_everything(args.seed, args.deterministic)

    if args.out is not None:
        out = args.out
    elif args.resume is not None:
        out = args.resume.parent
    else:
        out = Path("runs") / task / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"
        if info.enabled:  # every process must agree on the folder rank 0 named
            holder = [str(out)]
            torch.distributed.broadcast_object_list(holder, src=0)
            out = Path(holder[0])
    if args.resume is None and (out / "last.pt").exists():
        raise UserError(f"{out} already holds a run (last.pt); continue it with --resume {out / 'last.pt'} "
                        f"or choose another --out")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: exists and is not a folder")
    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        print(f"run folder: {out}")
    return Run(device, info, dtype, out)
