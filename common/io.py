"""Safe file I/O: clear one-line errors for bad input, atomic writes, untrusted checkpoint loading."""
from __future__ import annotations

import contextlib
import io
import os
import pickle
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


def os_message(e: OSError) -> str:
    what = e.strerror or type(e).__name__
    if e.filename is not None:
        target = f"{e.filename} -> {e.filename2}" if e.filename2 is not None else str(e.filename)
        return f"{target}: {what}"
    return str(e) or what


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


def _writable_location(path: Path) -> None:
    """Refuse early when `path` could not be created: its nearest existing ancestor must be a
    writable folder."""
    p = path.parent
    while not p.exists() and p != p.parent:
        p = p.parent
    if not p.is_dir():
        raise UserError(f"{path}: cannot be created: {p} is not a folder")
    if not os.access(p, os.W_OK | os.X_OK):
        raise UserError(f"{path}: cannot be written: no write permission in {p}")


def check_output_file(path: str | os.PathLike, overwrite: bool, flag: str = "--out") -> Path:
    """Before any work: `path` must not hold earlier results (unless `overwrite`) and must be writable."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{flag} {path}: is a folder, expected a file name")
    if path.exists() and not overwrite:
        raise UserError(f"{path} already exists; choose another {flag} or pass --overwrite")
    if path.exists() and not os.access(path.parent, os.W_OK | os.X_OK):
        raise UserError(f"{path}: cannot be replaced: no write permission in {path.parent}")
    _writable_location(path)
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
        if not os.access(folder, os.W_OK | os.X_OK):
            raise UserError(f"{flag} {folder}: cannot be written: no write permission")
    else:
        _writable_location(folder / "x")
    return folder


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
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        if hasattr(os, "fchmod"):
            os.fchmod(fd, 0o666 & ~current_umask())
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_torch_save(obj, path: str | os.PathLike) -> None:
    buf = io.BytesIO()
    torch.save(obj, buf)
    with atomic_open(path, "wb") as f:
        f.write(buf.getbuffer())


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_open(path, "w") as f:
        f.write(text)


# ---------------------------------------------------------------- untrusted checkpoints
def load_untrusted(path: str | os.PathLike, safe_globals: Iterable = (), mmap: bool = False) -> object:
    """torch.load with weights_only=True: tensors and plain containers only, never code.

    `safe_globals` allowlists extra types (for example one numpy scalar type) for this call only.
    `mmap=True` maps the tensors instead of reading them (cheap look at a large checkpoint).
    """
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path}: is a folder, expected a checkpoint file")
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    if path.stat().st_size == 0:
        raise UserError(f"{path}: file is empty")
    with open(path, "rb") as f:
        head = f.read(8)
    kind = checkpoint_kind(head)
    if kind is None:
        raise UserError(f"{path}: not a PyTorch checkpoint ({describe_bytes(head)}, neither a zip archive "
                        f"nor a pickle)")
    try:
        with torch.serialization.safe_globals(list(safe_globals)):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap and kind == "zip")
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        if found or "weights_only" in str(e) or "Weights only" in str(e):
            what = f"it names {found.group(1)}, which is not allowed" if found else _first_line(e)
            raise UserError(f"{path}: refused to load: the file holds objects other than tensors "
                            f"and plain data ({what}); nothing in it was run") from None
        raise UserError(f"{path}: corrupt or truncated checkpoint ({_first_line(e)})") from None
    except Exception as e:  # noqa: BLE001 - a corrupt or foreign file fails in many ways in the unpickler
        raise UserError(f"{path}: corrupt or truncated checkpoint ({_first_line(e)})") from None


def checkpoint_kind(head: bytes) -> str | None:
    """'zip' (torch.save's format since 1.6), 'pickle' (the legacy format) or None."""
    if head.startswith(b"PK\x03\x04"):
        return "zip"
    if len(head) > 1 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return "pickle"
    return None


def describe_bytes(head: bytes) -> str:
    if head.startswith(b"\x89HDF"):
        return "an HDF5 file (Keras weights? see scripts/convert_h5.py)"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return "binary data"
    return "a text file" if text.isprintable() or text.strip() != text else "binary data"


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
