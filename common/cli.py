"""Command-line flags every task shares, their range checks, the resume rules, and the run setup.

The rules, in one place for every task:
  - every numeric flag has a checked range (`int_range` / `float_range` as argparse types);
  - a fresh run never writes into a folder that already holds files, unless --overwrite (which
    first removes the earlier run's checkpoints and logs);
  - every numeric flag also has an upper bound (what the task can do, what torch and numpy accept);
  - --resume continues exactly: flags not given take the checkpoint's values, and a flag given with
    another value than the checkpoint's is refused (a different --lr, --batch-size, --seed, --data
    ... would not be a continuation); a checkpoint of another task is refused first.
"""
from __future__ import annotations

import argparse
import fnmatch
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
# RESUME_KEEP still default to the checkpoint's value (threads: the count actually used, which
# changes the last bits, so a different --threads is allowed with a note that the run stays valid but
# is no longer bit-identical; workers: common.data.SeededSamples makes the data independent of it,
# measured bit-identical).
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
def int_range(lo: int | None = None, hi: int | None = None, why: str = ""):
    """argparse type: an integer in [lo, hi] (either end open when None); `why` explains the limit."""
    def parse(text) -> int:
        try:
            value = int(text)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"expected an integer, got {_clip(text)!r}") from None
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            raise argparse.ArgumentTypeError(f"must be {_describe(lo, hi, False, False)}"
                                             f"{f' ({why})' if why else ''} (got {_clip(str(value))})")
        return value
    parse.__name__ = "integer"
    return parse


def float_range(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False,
                hi_open: bool = False, why: str = ""):
    """argparse type: a finite number in [lo, hi]; `lo_open` / `hi_open` exclude the ends."""
    def parse(text) -> float:
        try:
            value = float(text)
        except (TypeError, ValueError, OverflowError):
            raise argparse.ArgumentTypeError(f"expected a number, got {_clip(text)!r}") from None
        bad = not math.isfinite(value)
        bad |= lo is not None and (value < lo or (lo_open and value == lo))
        bad |= hi is not None and (value > hi or (hi_open and value == hi))
        if bad:
            raise argparse.ArgumentTypeError(f"must be {_describe(lo, hi, lo_open, hi_open)}"
                                             f"{f' ({why})' if why else ''} (got {_clip(str(text))})")
        return value
    parse.__name__ = "number"
    return parse


def _describe(lo, hi, lo_open, hi_open) -> str:
    def n(x):
        return str(x) if isinstance(x, int) else f"{x:g}"
    if lo is not None and hi is not None:
        return f"in {'(' if lo_open else '['}{n(lo)}, {n(hi)}{')' if hi_open else ']'}"
    if lo is not None:
        return f"{'>' if lo_open else '>='} {n(lo)}"
    if hi is not None:
        return f"{'<' if hi_open else '<='} {n(hi)}"
    return "a finite number"


def _clip(text: str, n: int = 40) -> str:
    text = str(text)
    return text if len(text) <= n else text[:n] + "..."


def _cores() -> int:
    try:
        return max(len(os.sched_getaffinity(0)), os.cpu_count() or 1)
    except (AttributeError, OSError):
        return os.cpu_count() or 1


# Upper bounds: what torch, numpy and the tasks can do. A flag without a specific one below still
# stays within a 32-bit integer or these magnitudes.
CORES = _cores()
MAX_INT = 2**31 - 1
MAX_SEED = 2**32 - 1          # numpy's RandomState / default_rng seeds; torch takes 64 bits
MAX_EPOCHS = 100_000
MAX_BATCH = 65_536
MAX_PROCS = max(8, 4 * CORES)  # CPU threads or worker processes: a small multiple of the cores
POSITIVE_INT = int_range(1, MAX_INT)
NONNEG_INT = int_range(0, MAX_INT)
POSITIVE = float_range(0, 1e9, lo_open=True)
NONNEG = float_range(0, 1e9)
SEED = int_range(0, MAX_SEED, "what numpy accepts as a seed")
EPOCHS = int_range(1, MAX_EPOCHS)
NONNEG_EPOCHS = int_range(0, MAX_EPOCHS)
BATCH_SIZE = int_range(1, MAX_BATCH)
WORKERS = int_range(0, MAX_PROCS, f"4 per core of this machine's {CORES} cores, at least 8")
THREADS = int_range(0, MAX_PROCS, f"4 per core of this machine's {CORES} cores, at least 8")
LR = float_range(0, 10, lo_open=True)
WEIGHT_DECAY = float_range(0, 10)
LOSS_WEIGHT = float_range(0, 1e6)


def add_threads_arg(p: argparse.ArgumentParser, training: bool = False) -> None:
    p.add_argument("--threads", type=THREADS, default=0,
                   help="CPU threads for PyTorch (default 0: one per core that other programs leave idle at start"
                        + ("; a resume keeps the run's count: another count continues the run validly, but not "
                           "bit-identically)" if training else ")"))


def add_max_pixels_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-image-pixels", type=int_range(0, 2**40), default=PILLOW_DEFAULT_MAX_PIXELS,
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
    g.add_argument("--epochs", type=EPOCHS, default=epochs, help=per_model if epochs is None else None)
    g.add_argument("--batch-size", type=BATCH_SIZE, default=batch_size,
                   help="per process" + (f"; {per_model}" if batch_size is None else ""))
    g.add_argument("--lr", type=LR, default=lr, help=per_model if lr is None else None)
    g.add_argument("--device", default="auto", help="auto | cpu | cuda[:N] | mps | directml")
    g.add_argument("--amp", default="auto", choices=AMP_CHOICES,
                   help="mixed precision: auto = fp16 on CUDA, off on CPU; bf16 works on both")
    g.add_argument("--resume", type=Path, default=None,
                   help="continue exactly from a last.pt checkpoint (other flags default to the checkpoint's)")
    g.add_argument("--seed", type=SEED, default=42)
    g.add_argument("--workers", type=WORKERS, default=workers, help="DataLoader worker processes")
    g.add_argument("--accum-steps", type=int_range(1, 4096), default=1, help="gradient accumulation micro-batches")
    g.add_argument("--clip-grad", type=float_range(0, 1e6), default=clip_grad,
                   help=f"max gradient norm ({'off' if not clip_grad else clip_grad} by default; 0 = off)")
    g.add_argument("--channels-last", action="store_true", help="NHWC memory format (faster on GPUs)")
    g.add_argument("--deterministic", action="store_true", help="deterministic algorithms only")
    g.add_argument("--save-every", type=NONNEG_EPOCHS, default=0, help="also keep epoch_NNNN.pt every N epochs")
    g.add_argument("--no-progress", action="store_true", help="no tqdm bars (for log files)")
    add_threads_arg(g, training=True)
    add_max_pixels_arg(g)


# ---------------------------------------------------------------- parsing and --resume
def explicit_dests(parser: argparse.ArgumentParser, argv=None) -> set[str]:
    """The destinations of the flags actually given on the command line (defaults excluded, also
    those set with parser.set_defaults, which argparse would otherwise report as given)."""
    saved = [(a, a.default) for a in parser._actions]
    saved_defaults = parser._defaults
    try:
        for a, _ in saved:
            a.default = argparse.SUPPRESS
        parser._defaults = {}
        given, _ = parser.parse_known_args(argv)
    finally:
        for a, d in saved:
            a.default = d
        parser._defaults = saved_defaults
    return set(vars(given))


def parse_args(parser: argparse.ArgumentParser, argv=None, *, resume_free=(), task: str | None = None,
               used=None) -> argparse.Namespace:
    """parser.parse_args, plus the resume rule: with --resume, every flag not given on the command
    line takes the value stored in the checkpoint's config (RESUME_FREE ones only when they are in
    RESUME_KEEP), and a given flag whose value differs from the one the run used is refused (except
    the flags in RESUME_FREE and `resume_free`).

    `task`: a checkpoint written by another task is refused first. `used(ckpt) -> {dest: value}`:
    the values the run actually used for flags it stored as None (left to the task's default), so
    that a flag given with that same value is accepted and a different one is shown against it."""
    args = parser.parse_args(argv)
    if getattr(args, "resume", None) is None:
        return args
    ckpt = resume_checkpoint(args.resume, task)
    stored = ckpt["config"]
    defaults = dict(used(ckpt)) if used is not None else {}
    given = explicit_dests(parser, argv)
    free = set(RESUME_FREE) | set(resume_free)
    actions = {a.dest: a for a in parser._actions}
    changed, notes = [], []
    for dest, value in vars(args).items():
        if dest in RESUME_KEEP and dest in stored and dest not in given:
            setattr(args, dest, _from_stored(actions[dest], stored[dest]))
        if dest == "threads" and dest in given and dest in stored and stored[dest] and value != stored[dest]:
            notes.append(f"note: --threads {value}{' (one per idle core)' if value == 0 else ''} differs from the "
                         f"{stored[dest]} thread(s) the run used: it continues validly, but not bit-identically (the "
                         f"thread count changes the order of the sums); leave --threads out to keep the run's count")
        if dest in free or dest not in stored:
            continue
        if dest in given:
            then = stored[dest] if stored[dest] is not None else defaults.get(dest)
            if _plain(value) != _plain(then):
                flag = actions[dest].option_strings[-1] if actions[dest].option_strings else dest
                had = "the run was started without it" if then is None else f"the checkpoint has {_show(then)}"
                changed.append(f"{flag} {_show(value)} ({had})")
        else:
            setattr(args, dest, _from_stored(actions[dest], stored[dest]))
    if changed:
        raise UserError(f"{args.resume}: a resume continues the run exactly, but "
                        f"{'; '.join(changed)}; drop the flag(s), or start a new run (--init where the task has it)")
    if os.environ.get("RANK", "0") == "0":
        for note in notes:
            print(note)
    return args


def resume_checkpoint(path: Path, task: str | None = None) -> dict:
    """The checkpoint a --resume names (tensors memory-mapped): a training checkpoint, of `task`."""
    require_file(path, "--resume checkpoint file (the run's last.pt)")
    from common.checkpoint import check_checkpoint, require_task  # here, to keep the import graph acyclic
    obj = load_untrusted(path, mmap=True)
    if task is not None:
        require_task(obj, path, task, f"a {task}/train.py last.pt to resume from")
    return check_checkpoint(obj, path)


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


def _unfinished_start(out: Path, held: list[str], outputs) -> bool:
    """Whether `out` holds only what a run wrote before it failed, ahead of its first checkpoint: the
    marker a run leaves in its new or empty folder until then, no checkpoint, only run outputs."""
    from common.checkpoint import UNFINISHED_MARKER
    patterns = (*RUN_OUTPUTS, *outputs)
    return ((out / UNFINISHED_MARKER).is_file() and not any(out.glob("*.pt"))
            and all(any(fnmatch.fnmatch(name, p) for p in patterns) for name in held))


def prepare_run_dir(out: Path, *, resume: Path | None, overwrite: bool, outputs=()) -> None:
    """The folder rules (rank 0 only): a fresh run needs a new or empty folder, or --overwrite; a
    resume may write only into its own folder or into a new or empty one. A folder that holds only
    the unfinished start of a run that failed before its first checkpoint counts as empty."""
    from common.checkpoint import UNFINISHED_MARKER
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: exists and is not a folder")
    held = sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) if out.is_dir() else []
    if held and _unfinished_start(out, held, outputs):
        for p in _run_files(out, outputs):
            shutil.rmtree(p) if p.is_dir() else p.unlink()
        print(f"--out {out}: removed the unfinished start of an earlier run there ({', '.join(held[:4])}; it "
              f"stopped before its first checkpoint)")
        held = []
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
    if not any(out.glob("*.pt")):
        (out / UNFINISHED_MARKER).touch()
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
