"""Safe file I/O: clear one-line errors for bad input, atomic writes, untrusted checkpoint loading."""
from __future__ import annotations

import contextlib
import io
import os
import pickle
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
    """Run a script's main(); turn UserError into one clear line on stderr and a non-zero exit."""
    try:
        main()
    except UserError as e:
        print(f"error: {user_message(e)}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


def user_message(e: UserError) -> str:
    """The one-line message; a UserError raised in a DataLoader worker arrives wrapped with the
    worker's traceback ("Caught UserError in DataLoader worker ... Original Traceback ...")."""
    text = str(e).strip()
    if "Original Traceback" in text:
        last = text.splitlines()[-1].strip()
        return last.split("UserError: ", 1)[-1]
    return text


# ---------------------------------------------------------------- atomic writes
def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # not every filesystem lets you open a directory
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb"):
    """Write to a temporary file next to `path`, fsync, then rename over it.

    A crash at any moment leaves either the old file or the new one, never a partial file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
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
def load_untrusted(path: str | os.PathLike, safe_globals: Iterable = ()) -> object:
    """torch.load with weights_only=True: tensors and plain containers only, never code.

    `safe_globals` allowlists extra types (for example one numpy scalar type) for this call only.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    if path.stat().st_size == 0:
        raise UserError(f"{path}: file is empty")
    try:
        with torch.serialization.safe_globals(list(safe_globals)):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise UserError(f"{path}: refused to load: the file holds objects other than tensors "
                        f"and plain data ({_first_line(e)})") from None
    except Exception as e:  # noqa: BLE001 - a corrupt or foreign file fails in many ways in the unpickler
        raise UserError(f"{path}: not a readable PyTorch checkpoint ({_first_line(e)})") from None


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


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
    """Load weights from a checkpoint or plain state_dict strictly; mismatches are a UserError."""
    obj = load_untrusted(path)
    sd = state_dict_from(obj, path)
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
    return obj if isinstance(obj, dict) else {}


# ---------------------------------------------------------------- images
def load_image(path: str | os.PathLike, mode: str = "RGB") -> Image.Image:
    """Open an image fully; a missing, empty, corrupt or unconvertible file is one UserError."""
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
                    im = _to_mode(im, mode)
                except ValueError:
                    raise UserError(f"{path}: cannot convert image mode {im.mode} to {mode}") from None
            return im
    except UserError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise UserError(f"{path}: unreadable or corrupt image ({e})") from None


def _to_mode(im: Image.Image, mode: str) -> Image.Image:
    if im.mode in ("I;16", "I") and mode in ("L", "RGB"):
        # 16-bit scans: scale to 8 bit instead of clipping everything above 255 to white
        a = np.asarray(im, dtype=np.float64)
        hi = 65535.0 if im.mode == "I;16" or a.max() > 255 else 255.0
        im = Image.fromarray(np.clip(a * (255.0 / hi), 0, 255).round().astype(np.uint8), "L")
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
