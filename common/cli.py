"""Command-line flags every task shares, their range checks, the resume rules, and the run setup.

The rules, in one place for every task:
  - every numeric flag has a checked range (`int_range` / `float_range` as argparse types);
  - a fresh run never writes into a folder that already holds files, unless --overwrite (which
    first removes the earlier run's checkpoints and logs);
  - --resume continues exactly: flags not given take the checkpoint's values, and a flag given with
    another value than the checkpoint's is refused (a different --lr, --batch-size, --seed, --data
    ... would not be a continuation).
"""
from __future__ import annotations

import argparse
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from common.device import AMP_CHOICES, amp_dtype, reuse_freed_memory, select_device
from common.distributed import DistInfo, init_distributed, local_device
from common.io import (UserError, load_untrusted, make_output_dir, refuse_run_over_inputs, remove_stale_temp_files,
                       require_file, set_max_image_pixels)
from common.repro import seed_everything

# Flags that do not change what a run computes: they may differ on --resume. Those of them in
# RESUME_KEEP still default to the checkpoint's value (threads: the count actually used, which can
# change the last bits; workers: common.data.SeededSamples makes the data independent of it).
RESUME_FREE = ("resume", "out", "device", "workers", "threads", "no_progress", "overwrite", "save_every",
               "max_image_pixels")
RESUME_KEEP = ("workers", "threads", "no_progress", "save_every", "max_image_pixels")
# What the common Trainer writes into a run folder (removed by --overwrite before a fresh run).
RUN_OUTPUTS = ("last.pt", "best.pt", "epoch_*.pt", "log.csv", "loss_curve.png", "tensorboard")
PILLOW_DEFAULT_MAX_PIXELS = 89_478_485


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the project's error style: one line naming the flag, exit status 2 (the usage
    text stays in --help)."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


# ---------------------------------------------------------------- ranged argparse types
def int_range(lo: int | None = None, hi: int | None = None):
    """argparse type: an integer in [lo, hi] (either end open when None)."""
    def parse(text) -> int:
        try:
            value = int(text)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            raise argparse.ArgumentTypeError(f"must be {_describe(lo, hi, False, False)} (got {value})")
        return value
    parse.__name__ = "integer"
    return parse


def float_range(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False,
                hi_open: bool = False):
    """argparse type: a finite number in [lo, hi]; `lo_open` / `hi_open` exclude the ends."""
    def parse(text) -> float:
        try:
            value = float(text)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        bad = not math.isfinite(value)
        bad |= lo is not None and (value < lo or (lo_open and value == lo))
        bad |= hi is not None and (value > hi or (hi_open and value == hi))
        if bad:
            raise argparse.ArgumentTypeError(f"must be {_describe(lo, hi, lo_open, hi_open)} (got {text})")
        return value
    parse.__name__ = "number"
    return parse


def _describe(lo, hi, lo_open, hi_open) -> str:
    if lo is not None and hi is not None:
        return f"in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
    if lo is not None:
        return f"{'>' if lo_open else '>='} {lo:g}"
    if hi is not None:
        return f"{'<' if hi_open else '<='} {hi:g}"
    return "a finite number"


POSITIVE_INT = int_range(1)
NONNEG_INT = int_range(0)
POSITIVE = float_range(0, lo_open=True)
NONNEG = float_range(0)


def add_threads_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=NONNEG_INT, default=0,
                   help="CPU threads for PyTorch (default 0: one per core that other programs leave idle "
                        "at start; a resume keeps the run's count)")


def add_max_pixels_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-image-pixels", type=NONNEG_INT, default=PILLOW_DEFAULT_MAX_PIXELS,
                   help="refuse images larger than this many pixels (a decompression-bomb guard; 0 = no limit)")


def _cpu_times(cpus) -> dict[int, tuple[int, int]]:
    """{cpu: (total, idle)} jiffies from /proc/stat (Linux)."""
    times = {}
    with open("/proc/stat") as f:
        for line in f:
            name, *vals = line.split()
            if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus:
                v = [int(x) for x in vals[:8]]
                times[int(name[3:])] = (sum(v), v[3] + v[4])  # idle + iowait
    return times


def auto_threads(sample_s: float = 0.2, read=_cpu_times) -> tuple[int, str]:
    """(threads, why): one per core that other programs leave idle right now, at most PyTorch's
    default. With every core free this is PyTorch's default; when another program keeps a core
    busy, fewer threads are much faster (measured: CRBL inference on 2 cores under load, 1 thread
    41-88 img/s against 9-18 with 2), because every parallel region waits for its slowest thread.
    An OMP_NUM_THREADS setting (a cluster allocation, say) is taken as it is."""
    default = torch.get_num_threads()
    if os.environ.get("OMP_NUM_THREADS"):
        return default, "OMP_NUM_THREADS"
    try:
        cpus = set(os.sched_getaffinity(0))
        before = read(cpus)
        time.sleep(sample_s)
        after = read(cpus)
        busy = sum(1 - (after[c][1] - before[c][1]) / max(1, after[c][0] - before[c][0]) for c in after)
    except (OSError, AttributeError, ValueError, KeyError):
        return default, "PyTorch's default"
    idle = max(1, int(len(cpus) - busy + 0.5))
    if idle >= default:
        return default, "PyTorch's default"
    return idle, f"other programs keep {len(cpus) - idle} of {len(cpus)} cores busy"


def apply_runtime_args(args: argparse.Namespace, reuse_memory: bool = False) -> None:
    """--threads and --max-image-pixels: call once at the start of any script that has them.
    `reuse_memory`: the script's CPU work is faster with `reuse_freed_memory` (it trades some memory).

    --threads 0 picks `auto_threads()`. The count used is written back into args, so a training
    checkpoint records it and a resume uses it again (it can change the last bits of the results)."""
    if reuse_memory:
        reuse_freed_memory()
    if hasattr(args, "threads"):
        n, why = (args.threads, "--threads") if args.threads else auto_threads()
        torch.set_num_threads(n)
        args.threads = n
        print(f"threads: {n} ({why}; --threads N to choose)")
    if hasattr(args, "max_image_pixels"):
        set_max_image_pixels(args.max_image_pixels)


def add_common_args(p: argparse.ArgumentParser, *, epochs: int | None, batch_size: int | None,
                    lr: float | None, workers: int = 2, clip_grad: float | None = None) -> None:
    """The shared flags. A default of None means the task picks one per model after parsing."""
    per_model = "default: depends on the model"
    g = p.add_argument_group("common options")
    g.add_argument("--data", type=Path, default=None,
                   help="dataset location (default: generate and use the built-in demo dataset)")
    g.add_argument("--out", type=Path, default=None,
                   help="run folder (default: runs/<task>/<name>-<time>; must be new or empty)")
    g.add_argument("--overwrite", action="store_true",
                   help="start a fresh run in an --out that holds files (the earlier run's checkpoints and logs "
                        "are removed first)")
    g.add_argument("--epochs", type=POSITIVE_INT, default=epochs, help=per_model if epochs is None else None)
    g.add_argument("--batch-size", type=POSITIVE_INT, default=batch_size,
                   help="per process" + (f"; {per_model}" if batch_size is None else ""))
    g.add_argument("--lr", type=POSITIVE, default=lr, help=per_model if lr is None else None)
    g.add_argument("--device", default="auto", help="auto | cpu | cuda[:N] | mps | directml")
    g.add_argument("--amp", default="auto", choices=AMP_CHOICES,
                   help="mixed precision: auto = fp16 on CUDA, off on CPU; bf16 works on both")
    g.add_argument("--resume", type=Path, default=None,
                   help="continue exactly from a last.pt checkpoint (other flags default to the checkpoint's)")
    g.add_argument("--seed", type=NONNEG_INT, default=42)
    g.add_argument("--workers", type=NONNEG_INT, default=workers, help="DataLoader worker processes")
    g.add_argument("--accum-steps", type=POSITIVE_INT, default=1, help="gradient accumulation micro-batches")
    g.add_argument("--clip-grad", type=NONNEG, default=clip_grad,
                   help=f"max gradient norm ({'off' if not clip_grad else clip_grad} by default; 0 = off)")
    g.add_argument("--channels-last", action="store_true", help="NHWC memory format (faster on GPUs)")
    g.add_argument("--deterministic", action="store_true", help="deterministic algorithms only")
    g.add_argument("--save-every", type=NONNEG_INT, default=0, help="also keep epoch_NNNN.pt every N epochs")
    g.add_argument("--no-progress", action="store_true", help="no tqdm bars (for log files)")
    add_threads_arg(g)
    add_max_pixels_arg(g)


# ---------------------------------------------------------------- parsing and --resume
def explicit_dests(parser: argparse.ArgumentParser, argv=None) -> set[str]:
    """The destinations of the flags actually given on the command line (defaults excluded)."""
    saved = [(a, a.default) for a in parser._actions]
    try:
        for a, _ in saved:
            a.default = argparse.SUPPRESS
        given, _ = parser.parse_known_args(argv)
    finally:
        for a, d in saved:
            a.default = d
    return set(vars(given))


def parse_args(parser: argparse.ArgumentParser, argv=None, *, resume_free=()) -> argparse.Namespace:
    """parser.parse_args, plus the resume rule: with --resume, every flag not given on the command
    line takes the value stored in the checkpoint's config (RESUME_FREE ones only when they are in
    RESUME_KEEP), and a given flag whose value differs from the stored one is refused (except the
    flags in RESUME_FREE and `resume_free`)."""
    args = parser.parse_args(argv)
    if getattr(args, "resume", None) is None:
        return args
    stored = resume_config(args.resume)
    given = explicit_dests(parser, argv)
    free = set(RESUME_FREE) | set(resume_free)
    actions = {a.dest: a for a in parser._actions}
    changed = []
    for dest, value in vars(args).items():
        if dest in RESUME_KEEP and dest in stored and dest not in given:
            setattr(args, dest, _from_stored(actions[dest], stored[dest]))
        if dest in free or dest not in stored:
            continue
        if dest in given:
            if _plain(value) != stored[dest]:
                flag = actions[dest].option_strings[-1] if actions[dest].option_strings else dest
                changed.append(f"{flag} {_show(value)} (the checkpoint has {_show(stored[dest])})")
        else:
            setattr(args, dest, _from_stored(actions[dest], stored[dest]))
    if changed:
        raise UserError(f"{args.resume}: a resume continues the run exactly, but "
                        f"{'; '.join(changed)}; drop the flag(s), or start a new run (--init where the task has it)")
    return args


def resume_config(path: Path) -> dict:
    require_file(path, "--resume checkpoint file")
    from common.checkpoint import check_checkpoint  # here, to keep the import graph acyclic
    ckpt = check_checkpoint(load_untrusted(path, mmap=True), path)
    return ckpt["config"]


def _plain(v):
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    return str(v)


def _show(v) -> str:
    v = _plain(v)
    if isinstance(v, list):
        return " ".join(map(str, v))
    return "(none)" if v is None else str(v)


def _from_stored(action: argparse.Action, value):
    convert = action.type if callable(action.type) else None
    if convert is None or value is None:
        return value
    if isinstance(value, list):
        return [convert(v) if isinstance(v, str) else v for v in value]
    return convert(value) if isinstance(value, str) else value


# ---------------------------------------------------------------- the run folder
@dataclass
class Run:
    device: torch.device
    info: DistInfo
    amp_dtype: torch.dtype | None
    out_dir: Path


def _run_files(folder: Path, extra=()) -> list[Path]:
    return sorted({p for pattern in (*RUN_OUTPUTS, *extra) for p in folder.glob(pattern)})


def prepare_run_dir(out: Path, *, resume: Path | None, overwrite: bool, outputs=()) -> None:
    """The folder rules (rank 0 only): a fresh run needs a new or empty folder, or --overwrite; a
    resume may write only into its own folder or into a new or empty one."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: exists and is not a folder")
    held = sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) if out.is_dir() else []
    # a resume writes into its checkpoint's own folder, or into the run whose later stage it is
    # (battery_ct: RUN/last.pt for stage 1, RUN/finetune/last.pt for stage 2)
    rp = Path(resume).resolve() if resume is not None else None
    own = rp is not None and (out.resolve() == rp.parent
                              or (out.resolve() == rp.parent.parent and (out / "last.pt").is_file()))
    if held and not own:
        if not overwrite:
            if resume is not None:
                raise UserError(f"--out {out}: already holds files ({', '.join(held[:4])}); a resume writes into "
                                f"its own folder {Path(resume).parent}, a new or empty one, or (--overwrite) "
                                f"replaces what is there")
            hint = f"continue it with --resume {out / 'last.pt'}, " if (out / "last.pt").exists() else ""
            raise UserError(f"--out {out}: already holds {'a run' if hint else 'files'} ({', '.join(held[:4])}); "
                            f"{hint}choose another --out, or pass --overwrite to replace it")
        old = _run_files(out, outputs)
        for p in old:
            shutil.rmtree(p) if p.is_dir() else p.unlink()
        if old:
            print(f"--overwrite: removed {len(old)} output(s) of the earlier run in {out}")
    make_output_dir(out)
    if not os.access(out, os.W_OK | os.X_OK):
        raise UserError(f"--out {out}: cannot be written: no write permission")
    stale = remove_stale_temp_files(out)
    if stale:
        print(f"removed {stale} temporary file(s) left by an interrupted write in {out}")


def setup_run(args: argparse.Namespace, task: str, name: str, outputs=(), reuse_memory: bool = False) -> Run:
    """Validate the common flags, pick the device, join torchrun's group, seed, choose the run folder.

    `outputs` names task-specific files or folders (glob patterns) that --overwrite also removes;
    `reuse_memory` goes to apply_runtime_args.
    """
    if args.resume is not None:
        require_file(args.resume, "--resume checkpoint file")
    apply_runtime_args(args, reuse_memory)
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
    if info.is_main:
        refuse_run_over_inputs(out, args)
        prepare_run_dir(out, resume=args.resume, overwrite=getattr(args, "overwrite", False), outputs=outputs)
        print(f"run folder: {out}")
    return Run(device, info, dtype, out)
