"""Safe file I/O: clear one-line errors for bad input, atomic writes, untrusted checkpoint loading."""
from __future__ import annotations

import contextlib
import errno
import io
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError


class UserError(Exception):
    """A problem with the user's input: reported as one line, exit status 2, no traceback."""


def run_cli(main: Callable[[], object]) -> None:
    """Run a script's main(); a UserError or OSError becomes one clear line on stderr and exit 2.

    On any failure the output folders this process created and left empty are removed again."""
    try:
        main()
    except UserError as e:
        _fail(user_message(e), 2)
    except OSError as e:  # a full disk, a read-only or missing folder, a path that is a folder...
        _fail(os_message(e), 2)
    except KeyboardInterrupt:
        _fail("interrupted", 130, prefix="")


def _fail(message: str, code: int, prefix: str = "error: ") -> None:
    remove_created_dirs_if_empty()
    print(f"{prefix}{one_line(message)}", file=sys.stderr)
    sys.exit(code)


_CONTROL = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|[\x00-\x08\x0b-\x1f\x7f]")


def one_line(text: str) -> str:
    """Terminal escape sequences and control characters removed, newlines folded into '; '."""
    lines = [ln.strip() for ln in _CONTROL.sub("", str(text).replace("\r", "\n")).split("\n")]
    return "; ".join(ln for ln in lines if ln)


_OS_ADVICE = {
    errno.ENOSPC: "free space on the disk that holds {folder}, or write the outputs somewhere else",
    errno.EDQUOT: "free some of your quota on the disk that holds {folder}, or write the outputs somewhere else",
    errno.EROFS: "{folder} is on a read-only file system: write the outputs somewhere else",
    errno.EACCES: "no permission to write in {folder}: write the outputs somewhere else or change its permissions",
    errno.EPERM: "not permitted in {folder}: write the outputs somewhere else or change its permissions",
}


def os_message(e: OSError) -> str:
    """One line: the file (or folder), the problem, and for a full disk, a read-only or forbidden
    folder, what to do about it."""
    what = e.strerror or type(e).__name__
    if e.filename is None:
        return (str(e) or what) + ("; free space on the output disk (df -h), or write the outputs somewhere else"
                                   if e.errno in (errno.ENOSPC, errno.EDQUOT) else "")
    target = f"{e.filename} -> {e.filename2}" if e.filename2 is not None else str(e.filename)
    advice = _OS_ADVICE.get(e.errno)
    if advice is None:
        return f"{target}: {what}"
    name = Path(os.fsdecode(e.filename))
    folder = name if name.is_dir() else name.parent
    return f"{target}: {what}; {advice.format(folder=folder)}"


def user_message(e: UserError) -> str:
    """The one-line message; a UserError raised in a DataLoader worker arrives wrapped with the
    worker's traceback ("Caught UserError in DataLoader worker ... Original Traceback ...")."""
    text = str(e).strip()
    if "Original Traceback" in text:
        last = text.splitlines()[-1].strip()
        return last.split("UserError: ", 1)[-1]
    return text


# ---------------------------------------------------------------- output locations
_created_dirs: list[Path] = []


def make_output_dir(folder: str | os.PathLike) -> Path:
    """mkdir -p that remembers which folders it created, so a failed run leaves no empty ones."""
    folder = Path(folder)
    missing = []
    p = folder
    while not p.exists() and p != p.parent:
        missing.append(p)
        p = p.parent
    folder.mkdir(parents=True, exist_ok=True)
    _created_dirs.extend(reversed(missing))
    return folder


def remove_created_dirs_if_empty() -> None:
    for d in reversed(_created_dirs):  # deepest first
        with contextlib.suppress(OSError):
            if [p.name for p in d.iterdir()] == [".unfinished"]:   # a run's start marker alone (common.cli)
                (d / ".unfinished").unlink()
            d.rmdir()  # only succeeds when empty
    _created_dirs.clear()


def _writable_location(path: Path, flag: str) -> None:
    """Refuse early when `path` could not be created: its nearest existing ancestor must be a
    writable folder."""
    p = path.parent
    while not p.exists() and p != p.parent:
        p = p.parent
    if not p.is_dir():
        raise UserError(f"{flag} {path}: cannot be created: {p} is not a folder")
    _writable_folder(p, f"{flag} {path}: cannot be created")


def _writable_folder(folder: Path, what: str) -> None:
    if not os.access(folder, os.W_OK | os.X_OK):
        why = f"{folder} is on a read-only file system" if _read_only(folder) else f"no write permission in {folder}"
        raise UserError(f"{what}: {why}; choose another location")


def _read_only(folder: Path) -> bool:
    with contextlib.suppress(OSError, AttributeError):
        return bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
    return False


def check_output_file(path: str | os.PathLike, overwrite: bool, flag: str = "--out") -> Path:
    """Before any work: `path` must not hold earlier results (unless `overwrite`) and must be writable."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{flag} {path}: is a folder, expected a file name")
    if path.exists() and not path.is_file():  # an atomic write would replace /dev/null itself
        raise UserError(f"{flag} {path}: is not a regular file (a device or a pipe); choose a file name")
    if path.exists() and not overwrite:
        raise UserError(f"{path} already exists; choose another {flag} or pass --overwrite")
    if path.exists():
        _writable_folder(path.parent, f"{flag} {path}: cannot be replaced")
    _writable_location(path, flag)
    return path


def check_output_dir(folder: str | os.PathLike, names: Iterable[str], overwrite: bool, flag: str = "--out") -> Path:
    """Before any work: none of `names` may exist in `folder` (unless `overwrite`), and the folder
    must be creatable and writable."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{flag} {folder}: exists and is not a folder")
    if not overwrite:
        for n in names:
            if (folder / n).exists():
                raise UserError(f"{folder / n} already exists; choose another {flag} or pass --overwrite")
    if folder.is_dir():
        _writable_folder(folder, f"{flag} {folder}: cannot be written")
    else:
        _writable_location(folder, flag)
    return folder


def refuse_output_over_inputs(inputs: Iterable[tuple[str, object]], *, files: Iterable[tuple[str, object]] = (),
                              folders: Iterable[tuple[str, object, Iterable[str] | None]] = (),
                              alongside: bool = False) -> None:
    """Before any work: no output may be, or be written over, an input of the same run, whatever the
    spelling (symlinks, ./ and .., hard links). --overwrite replaces earlier outputs, never inputs.

    inputs:  (flag, path or list of paths or None) the run reads; list the files behind a folder
             where the script knows them.
    files:   (flag, path or None) it writes.
    folders: (flag, folder or None, names) it writes into; names None: any name (a run folder, which
             --overwrite clears), so the folder may hold no input at all. With names, the folder may
             hold no input file directly (the next run would read its outputs as inputs) unless
             `alongside` (a few result files next to their inputs: then only a name clash with an
             input file counts; a file already in an input folder is taken for an earlier output).
    A hard link is caught where the output names it, not inside a folder."""
    in_files, in_dirs = [], []
    for flag, value in inputs:
        for p in ([value] if isinstance(value, (str, os.PathLike)) else value or ()):
            (in_dirs if os.path.isdir(p) else in_files).append((flag, Path(p), _identity(p)))

    def refuse(flag, path, what, noun="path"):
        raise UserError(f"{flag} {path} {what}; choose another {noun}")

    written = []
    for flag, path in files:
        if path is None:
            continue
        ident = _identity(path)
        for iflag, ipath, iident in in_files:
            if ident & iident:
                refuse(flag, path, f"is the input {ipath} ({iflag})")
        for iflag, ipath, _ in in_dirs:
            if os.path.realpath(path) == os.path.realpath(ipath):
                refuse(flag, path, f"is the input folder {ipath} ({iflag})")
        for wflag, wpath, wident in written:
            if ident & wident:
                refuse(flag, path, f"is also {wflag} {wpath}")
        written.append((flag, path, ident))
    for flag, folder, names in folders:
        if folder is None:
            continue
        d = os.path.realpath(folder)
        existing = [Path(folder) / n for n in names if (Path(folder) / n).is_file()] if names is not None else []
        for iflag, ipath, _ in in_dirs:
            i = os.path.realpath(ipath)
            if names is None or not alongside:
                if d == i:
                    refuse(flag, folder, f"is the input folder {ipath} ({iflag})", "folder")
                if _is_under(i, d):
                    refuse(flag, folder, f"contains the input folder {ipath} ({iflag})", "folder")
                hit = next((e for e in existing if _is_under(os.path.realpath(e), i)), None)
                if hit is not None:
                    refuse(flag, folder, f"would write over {hit}, a file in the input folder {ipath} ({iflag})",
                           "folder")
        targets = set().union(*(_identity(Path(folder) / n) for n in names)) if names is not None else set()
        for iflag, ipath, iident in in_files:
            if iident & targets:
                refuse(flag, folder, f"would write over the input {ipath} ({iflag})", "folder")
            places = [p for p in iident if isinstance(p, str)]
            if any(_is_under(p, d) for p in places) if names is None else \
                    not alongside and any(os.path.dirname(p) == d for p in places):
                refuse(flag, folder, f"holds the input {ipath} ({iflag})", "folder")
        for wflag, wpath, _ in written:
            if os.path.realpath(wpath) == d:
                refuse(flag, folder, f"is also {wflag} {wpath}", "folder")


def refuse_run_over_inputs(out: Path, args) -> None:
    """A training run folder (which --overwrite clears) may hold none of the files and folders its
    flags read (--data, --init, --config, split files ...): every Path-valued flag but --out and
    --resume. A resume into its own folder replaces only its own files and reads what is there."""
    resume = getattr(args, "resume", None)
    if resume is not None and os.path.realpath(out) == os.path.realpath(Path(resume).parent):
        return
    inputs = [("--" + k.replace("_", "-"), v) for k, v in vars(args).items() if k not in ("out", "resume") and (
        isinstance(v, Path) or (isinstance(v, (list, tuple)) and v and all(isinstance(x, Path) for x in v)))]
    refuse_output_over_inputs(inputs, folders=[("--out", out, None)])
    # a run folder inside a --data folder is fine while it is new or holds an earlier run; one that
    # already holds other files there holds data (--overwrite would then mix the run into it)
    d = os.path.realpath(out)
    held = [p.name for p in Path(out).iterdir() if not p.name.startswith(".")] if Path(out).is_dir() else []
    if held and not any(n in held for n in _RUN_MARKERS):
        for flag, value in inputs:
            for p in ([value] if isinstance(value, Path) else value):
                if p.is_dir() and _is_under(d, os.path.realpath(p)):
                    raise UserError(f"--out {out} is inside the input folder {p} ({flag}) and holds files that are "
                                    f"not a run ({', '.join(sorted(held)[:3])}); choose another folder")


_RUN_MARKERS = ("last.pt", "best.pt", "log.csv")  # what every training run writes first


def _identity(path) -> set:
    """What a path names: its directory entry (folders resolved, the name itself not), the file it
    finally resolves to, and that file's device and inode (a hard link is the same file)."""
    path = Path(path)
    ident = {os.path.join(os.path.realpath(path.parent), path.name), os.path.realpath(path)}
    with contextlib.suppress(OSError):
        st = os.stat(path)
        ident.add((st.st_dev, st.st_ino))
    return ident


def _is_under(path: str, folder: str) -> bool:
    return path != folder and path.startswith(folder.rstrip(os.sep) + os.sep)


def remove_stale_temp_files(folder: str | os.PathLike) -> int:
    """Delete the temporary files of atomic writes that a killed process left in `folder`."""
    n = 0
    for p in Path(folder).glob(".*.tmp"):
        if p.is_file() and _TEMP_NAME.fullmatch(p.name):
            with contextlib.suppress(OSError):
                p.unlink()
                n += 1
    return n


# ---------------------------------------------------------------- atomic writes
def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # not every filesystem lets you open a directory
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


_TEMP_NAME = re.compile(r"\..+\.[A-Za-z0-9_]{8}\.tmp")
def current_umask() -> int:
    try:  # Linux reports it without changing it
        with open("/proc/self/status") as f:
            return next(int(ln.split()[1], 8) for ln in f if ln.startswith("Umask:"))
    except (OSError, StopIteration, ValueError):
        old = os.umask(0o022)
        os.umask(old)
        return old


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb"):
    """Write to a temporary file next to `path`, fsync, then rename over it.

    A crash at any moment leaves either the old file or the new one, never a partial file. The file
    gets the permissions a plain open() would give it (0666 minus the umask); mkstemp's 0600 would
    hide results from the rest of the team.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise _naming(e, path) from None
    try:
        if hasattr(os, "fchmod"):
            os.fchmod(fd, 0o666 & ~current_umask())
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(e, OSError):
            raise _naming(e, path) from None  # a full disk says which file it was writing
        raise


def _naming(e: OSError, path: Path) -> OSError:
    """`e` with the file being written as its filename (a write, flush or fsync error names none;
    a temporary file's name means nothing to the user)."""
    if e.errno is None or e.filename is not None and not str(e.filename).endswith(".tmp"):
        return e
    return OSError(e.errno, e.strerror, str(path))


def atomic_torch_save(obj, path: str | os.PathLike) -> None:
    buf = io.BytesIO()
    torch.save(obj, buf)
    with atomic_open(path, "wb") as f:
        f.write(buf.getbuffer())


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_open(path, "w") as f:
        f.write(text)


# ---------------------------------------------------------------- untrusted checkpoints
_UNTRUSTED = ("RefusedContent", "load_untrusted", "checkpoint_kind", "plain_pickle", "describe_bytes", "shown_global")


def __getattr__(name: str):
    """The loader lives in common/untrusted.py; `from common.io import load_untrusted` keeps working."""
    if name in _UNTRUSTED:
        from common import untrusted
        return getattr(untrusted, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def require_file(path: str | os.PathLike, what: str = "file") -> Path:
    """`path` as a Path if it is an existing regular file; else the same UserError in every script."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path}: is a folder, expected a {what}")
    if not path.exists():
        raise UserError(f"{path}: {what} not found")
    if not path.is_file():
        raise UserError(f"{path}: not a regular file, expected a {what}")
    return path


def _first_line(e: Exception) -> str:
    """The first sentence of an exception's message."""
    text = one_line(str(e).strip().split("\n")[0]).split(". ")[0].rstrip(".")
    return text if text else type(e).__name__


WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DataParallel / DDP, torch.compile


def strip_wrapper_prefixes(sd: dict) -> tuple[dict, list[str]]:
    """(keys without the prefixes that wrapped models put in front of them, in any nesting; the
    prefixes found). The originals saved their models wrapped as often as not."""
    found, out = [], {}
    for k, v in sd.items():
        while k.startswith(WRAPPER_PREFIXES):
            prefix = next(p for p in WRAPPER_PREFIXES if k.startswith(p))
            found += [] if prefix in found else [prefix]
            k = k[len(prefix):]
        out[k] = v
    return out, found


def state_dict_from(obj: object, path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The model weights in a training checkpoint (key 'model') or a plain state_dict."""
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]
    if not isinstance(obj, dict) or not obj or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise UserError(f"{path}: no model weights found (expected a state_dict or a checkpoint "
                        f"with a 'model' entry)")
    return obj


def load_weights_into(model: torch.nn.Module, path: str | os.PathLike) -> dict:
    """Load weights from a checkpoint or plain state_dict strictly; mismatches are a UserError.
    Returns the file's dict (a checkpoint's config and extras), {} for a bare state_dict."""
    from common.untrusted import load_untrusted
    obj = load_untrusted(path)
    load_state_strict(model, state_dict_from(obj, path), path)
    return obj if isinstance(obj, dict) else {}


def load_state_strict(model: torch.nn.Module, sd: dict, path) -> None:
    """model.load_state_dict(sd) (strict), the first mismatches of each kind named in one line."""
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    wrong = sorted(k for k in set(own) & set(sd) if own[k].shape != sd[k].shape)
    if missing or unexpected or wrong:
        parts = []
        for name, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)):
            if keys:
                shown = ", ".join(keys[:3]) + (f" (+{len(keys) - 3} more)" if len(keys) > 3 else "")
                parts.append(f"{len(keys)} {name}: {shown}")
        raise UserError(f"{path}: weights do not fit {type(model).__name__} ({'; '.join(parts)})")
    model.load_state_dict(sd)


# ---------------------------------------------------------------- images
def set_max_image_pixels(n: int | None) -> None:
    """Pillow's decompression-bomb guard (None or 0: no limit); the --max-image-pixels flag."""
    Image.MAX_IMAGE_PIXELS = n or None


def load_image(path: str | os.PathLike, mode: str = "RGB") -> Image.Image:
    """Open an image fully; a missing, empty, corrupt, oversized or unconvertible file is one UserError."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: image not found")
    if path.stat().st_size == 0:
        raise UserError(f"{path}: image file is empty")
    try:
        with Image.open(path) as im:
            im.load()
            if mode is not None and im.mode != mode:
                try:
                    im = _to_mode(im, mode, path)
                except ValueError:
                    raise UserError(f"{path}: cannot convert image mode {im.mode} to {mode}") from None
            return im
    except UserError:
        raise
    except Image.DecompressionBombError:
        raise UserError(f"{path}: the image has more pixels than the limit of {Image.MAX_IMAGE_PIXELS:,} "
                        f"(a guard against decompression bombs); pass --max-image-pixels N to allow it") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise UserError(f"{path}: unreadable or corrupt image ({_first_line(e)})") from None


def _to_mode(im: Image.Image, mode: str, path: Path) -> Image.Image:
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F") and mode in ("L", "RGB"):
        # 16-bit and 32-bit scans: scale to 8 bit instead of clipping everything above 255 to white;
        # float images in [0, 1] scale by 255 (Pillow's own conversion would make them black)
        a = np.asarray(im, dtype=np.float64)
        if not np.isfinite(a).all():
            raise UserError(f"{path}: {im.mode} image holds NaN or infinite values")
        lo, hi = float(a.min()), float(a.max())
        if im.mode == "F":
            if lo < 0 or hi > 255:
                raise UserError(f"{path}: 32-bit float image with values in [{lo:g}, {hi:g}]; expected [0, 1] "
                                f"or [0, 255]")
            scale = 255.0 if hi <= 1.0 else 1.0
        else:
            scale = 255.0 / 65535.0 if im.mode.startswith("I;16") or hi > 255 else 1.0
        im = Image.fromarray(np.clip(a * scale, 0, 255).round().astype(np.uint8), "L")
    return im.convert(mode)


def image_to_tensor(im: Image.Image) -> torch.Tensor:
    """PIL image -> float tensor (C,H,W) in [0,1]."""
    a = np.asarray(im, dtype=np.float32) / 255.0
    if a.ndim == 2:
        a = a[:, :, None]
    return torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1)))


def save_image(path: str | os.PathLike, array: np.ndarray) -> None:
    """Write a uint8 HxW or HxWx3 array as PNG/JPG atomically."""
    path = Path(path)
    fmt = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG"}.get(path.suffix.lower(), "PNG")
    with atomic_open(path, "wb") as f:
        Image.fromarray(array).save(f, format=fmt)
