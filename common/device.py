"""Device selection and mixed-precision settings shared by every task."""
from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import os
import sys

import torch

from common.io import UserError

DEVICE_CHOICES = ("auto", "cpu", "cuda", "mps", "directml")
AMP_CHOICES = ("auto", "off", "fp16", "bf16")


def _directml_device():
    if importlib.util.find_spec("torch_directml") is None:
        return None
    try:
        import torch_directml
        return torch_directml.device() if torch_directml.is_available() else None
    except Exception:  # a broken driver install must not stop CPU users
        return None


def _mps_available() -> bool:
    return getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()


def select_device(name: str = "auto", verbose: bool = True) -> torch.device:
    """`auto` picks CUDA, then DirectML, then MPS, then CPU. An unavailable explicit choice is an error."""
    name = (name or "auto").lower()
    kind = name.split(":")[0]
    if kind not in DEVICE_CHOICES:
        raise UserError(f"--device {name}: unknown device (choose from {', '.join(DEVICE_CHOICES)})")
    if kind == "auto":
        if torch.cuda.is_available():
            dev = torch.device("cuda")
        elif (dml := _directml_device()) is not None:
            dev = dml
        elif _mps_available():
            dev = torch.device("mps")
        else:
            dev = torch.device("cpu")
    elif kind == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {name}: CUDA is not available on this machine "
                            f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'no'})")
        dev = torch.device(name)
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UserError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) present")
    elif kind == "directml":
        dev = _directml_device()
        if dev is None:
            raise UserError("--device directml: torch_directml is not installed or finds no adapter "
                            "(pip install torch-directml, Windows only)")
    elif kind == "mps":
        if not _mps_available():
            raise UserError("--device mps: Apple MPS is not available on this machine")
        dev = torch.device("mps")
    else:
        dev = torch.device("cpu")
    if verbose:
        extra = f" ({torch.cuda.get_device_name(dev)})" if dev.type == "cuda" else ""
        print(f"device: {dev}{extra}")
    return dev


def amp_dtype(device: torch.device, amp: str = "auto") -> torch.dtype | None:
    """The autocast dtype for `--amp`, or None for full fp32.

    auto: fp16 on CUDA (with a GradScaler), off elsewhere. CPU supports bf16 on request only.
    """
    amp = (amp or "auto").lower()
    if amp not in AMP_CHOICES:
        raise UserError(f"--amp {amp}: choose from {', '.join(AMP_CHOICES)}")
    if amp == "off":
        return None
    if device.type == "cuda":
        if amp == "bf16" and not torch.cuda.is_bf16_supported():
            raise UserError("--amp bf16: this GPU does not support bfloat16")
        return torch.bfloat16 if amp == "bf16" else torch.float16
    if device.type == "cpu":
        if amp == "fp16":
            raise UserError("--amp fp16 needs CUDA; on the CPU use --amp bf16")
        return torch.bfloat16 if amp == "bf16" else None
    if amp == "auto":
        return None
    raise UserError(f"--amp {amp}: mixed precision is not supported on {device.type}")


def autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


# ---------------------------------------------------------------- CPU inference in two streams
# Every intra-op parallel operator ends at a barrier where each core waits for the slowest; on a
# machine where another program keeps a core busy that wait costs more than the operator (two
# intra-op threads ran CRBL several times slower than one there). Two streams of one thread each,
# on independent work, never wait for each other: the same arithmetic, and the same numbers.
def cpu_streams() -> int:
    """2 streams with half of the intra-op threads each (set here) when there are at least 2, else 1."""
    threads = torch.get_num_threads()
    if threads < 2:
        return 1
    torch.set_num_threads(threads // 2)
    return 2


def in_inference_mode(fn):
    """fn under inference mode, for a worker thread (grad mode is per thread)."""
    def call(*args):
        with torch.inference_mode():
            return fn(*args)
    return call


# glibc's malloc gives every block above 32 MB (its largest mmap threshold) fresh pages from the
# kernel, so a large CPU batch pays a page fault and a zeroed page for every 4 kB of every
# activation, every time; blocks below it are reused from the heap. Running a batch as micro-batches
# whose activations stay under that (the same per-sample arithmetic) made spectral inference 1.3x
# and a CRBL backbone 1.2x faster on one core.
def in_chunks(fn, x: torch.Tensor, rows: int) -> torch.Tensor:
    """fn(x) for a per-sample fn, computed `rows` samples at a time and concatenated along dim 0."""
    if x.shape[0] <= rows:
        return fn(x)
    return torch.cat([fn(part) for part in x.split(rows)])


# The same page faults hit blocks of exactly 32 MB and more (a micro-batch of 32 spectral structures
# at the stem) and the heaps of worker threads, which glibc shrinks whenever their free top exceeds
# the trim threshold. With malloc told to take every block from the heap and to keep up to 1 GiB of
# freed memory there, freed activations are reused: measured on 2 cores in pairs of processes with
# and without it, the spectral training step 1.09-1.15x faster (peak RSS 1.62 -> 1.67 GiB) and CRBL
# inference 1.03-1.23x (0.67 -> 0.70 GiB). Not for every script: a colorize training step at
# 512x512 was 1.28x faster but its peak grew 5.3 -> 6.9 GiB (freed blocks of 100+ MB stay in the heap,
# fragmented), so scripts opt in (common.cli.apply_runtime_args / setup_run, reuse_memory=True).
KEEP_FREED_BYTES = 1 << 30
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4      # glibc's mallopt parameters (malloc.h)


def reuse_freed_memory() -> bool:
    """Have glibc's malloc serve every block from the heap (no mmap) and keep up to KEEP_FREED_BYTES
    of freed memory for reuse instead of returning it to the kernel. True when set; False (nothing
    changed) off Linux, with another C library, or when the user set MALLOC_* / GLIBC_TUNABLES."""
    if sys.platform != "linux" or "GLIBC_TUNABLES" in os.environ or any(k.startswith("MALLOC_") for k in os.environ):
        return False
    try:
        libc = ctypes.CDLL(None)              # the C library this process already runs on
        libc.gnu_get_libc_version             # glibc only: mallopt's parameters differ elsewhere
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, KEEP_FREED_BYTES))


def on_batch_halves(fn, x: torch.Tensor, pool) -> torch.Tensor:
    """fn(x) for a per-sample fn without gradients: the second half of the batch in `pool`'s worker
    thread while this thread computes the first, concatenated along dim 0."""
    half = (x.shape[0] + 1) // 2
    if x.shape[0] < 2:
        return fn(x)
    rest = pool.submit(in_inference_mode(fn), x[half:])
    return torch.cat([fn(x[:half]), rest.result()])
