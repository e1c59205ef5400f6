"""Safe file I/O: clear one-line errors for bad input, atomic writes, untrusted checkpoint loading."""
from __future__ import annotations

import contextlib
import errno
import io
import os
import pickle
import pickletools
import re
import sys
import tempfile
import warnings
import zipfile
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
             `alongside` (a few result files next to their inputs: then only a name clash counts)."""
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
                refuse(flag, folder, f"would write over {hit}, a file in the input folder {ipath} ({iflag})", "folder")
        targets = set().union(*(_identity(Path(folder) / n) for n in names)) if names is not None else set()
        for iflag, ipath, iident in in_files:
            if iident & targets:
                refuse(flag, folder, f"would write over the input {ipath} ({iflag})", "folder")
            entry = os.path.join(os.path.realpath(ipath.parent), ipath.name)
            if (_is_under(entry, d) if names is None else not alongside and os.path.dirname(entry) == d):
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
class RefusedContent(UserError):
    """load_untrusted refused what a file holds (`global_name`, where known); nothing from it was run.
    `torch_format`: the file is in torch.save's format (an allow-list reader may look further)."""

    def __init__(self, message: str, global_name: str | None = None, torch_format: bool = True):
        super().__init__(message)
        self.global_name, self.torch_format = global_name, torch_format


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


def load_untrusted(path: str | os.PathLike, safe_globals: Iterable = (), mmap: bool = False) -> object:
    """torch.load with weights_only=True: tensors and plain containers only, never code. Every way a
    file can fail is one UserError naming the file (RefusedContent where the file holds more than
    tensors and plain data, naming the global); torch's own advice and warnings never reach the user.

    `safe_globals` allowlists extra types (for example one numpy scalar type) for this call only.
    `mmap=True` maps the tensors instead of reading them (cheap look at a large checkpoint).
    """
    path = require_file(path, "checkpoint file")
    if path.stat().st_size == 0:
        raise UserError(f"{path}: file is empty")
    with open(path, "rb") as f:
        head = f.read(64)
    kind = checkpoint_kind(head)
    if kind is None:
        plain = plain_pickle(path)
        if plain is not None and plain[1]:
            raise RefusedContent(f"{path}: refused to load: a plain Python pickle (not a PyTorch checkpoint) that "
                                 f"names the global {shown_global(plain[1][0])}; nothing from the file was run",
                                 plain[1][0], torch_format=False)
        what = f"a plain Python pickle of protocol {plain[0]}, not torch.save's format" if plain is not None else \
            f"{describe_bytes(head)}, neither a zip archive nor a pickle"
        raise UserError(f"{path}: not a PyTorch checkpoint ({what})")
    if kind == "zip":
        try:
            with zipfile.ZipFile(path) as z:
                torch_zip = any(n.endswith("data.pkl") for n in z.namelist())
        except (zipfile.BadZipFile, OSError, ValueError):
            raise UserError(f"{path}: corrupt or truncated checkpoint (a damaged or cut-short zip archive)") from None
        if not torch_zip:
            raise UserError(f"{path}: not a PyTorch checkpoint (a zip archive without the data.pkl of torch.save)")
    try:
        with torch.serialization.safe_globals(list(safe_globals)), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's notes on pickle protocols and storages are not the user's
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap and kind == "zip")
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        if found:
            raise RefusedContent(f"{path}: refused to load: the file names the global {shown_global(found.group(1))}"
                                 f", which a checkpoint of tensors and plain data never holds; nothing from the "
                                 f"file was run", found.group(1)) from None
        if "weights_only" in str(e) or "Weights only" in str(e):
            raise RefusedContent(f"{path}: refused to load: {_weights_only_reason(str(e))}; nothing from the file "
                                 f"was run") from None
        raise UserError(f"{path}: corrupt or truncated checkpoint ({_torch_reason(e)})") from None
    except Exception as e:  # noqa: BLE001 - a corrupt or foreign file fails in many ways in the unpickler
        raise UserError(f"{path}: corrupt or truncated checkpoint ({_torch_reason(e)})") from None


LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # the number torch.save's legacy format pickles first


def checkpoint_kind(head: bytes) -> str | None:
    """'zip' (torch.save's format since 1.6), 'legacy' (the older format: a pickled magic number
    first, any protocol) or None (not torch.save's: a plain pickle, text or anything else)."""
    if head.startswith(b"PK\x03\x04"):
        return "zip"
    if len(head) > 1 and head[0] == 0x80 and 2 <= head[1] <= 5:
        with contextlib.suppress(Exception):
            for op, arg, _ in pickletools.genops(io.BytesIO(head)):
                if op.name == "STOP":
                    break
                if op.name in ("LONG", "LONG1", "LONG4"):
                    return "legacy" if arg == LEGACY_MAGIC else None
    return None


def plain_pickle(path: Path, limit: int = 64 << 20) -> tuple[int, list[str]] | None:
    """(protocol, globals it names) if the file is one plain pickle, else None. Read with
    pickletools, which parses opcodes and runs nothing."""
    if path.stat().st_size > limit:
        return None
    names, strings, proto = [], [], 0
    try:
        with open(path, "rb") as f:
            for op, arg, _ in pickletools.genops(f):
                if op.name == "PROTO":
                    proto = arg
                elif op.name in ("GLOBAL", "INST"):
                    names.append(arg.replace(" ", "."))
                elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                    names.append(f"{strings[-2]}.{strings[-1]}")
                elif isinstance(arg, str):
                    strings.append(arg)
                elif op.name == "STOP":
                    return (proto, names) if not f.read(1) else None
    except Exception:  # noqa: BLE001 - not a pickle
        return None
    return None


def describe_bytes(head: bytes) -> str:
    if head.startswith(b"\x89HDF"):
        return "an HDF5 file (Keras weights? see scripts/convert_h5.py)"
    for cut in range(4):  # the read may end inside a multi-byte character
        with contextlib.suppress(UnicodeDecodeError):
            text = head[:len(head) - cut].decode("utf-8")
            return "a text file" if text.isprintable() or text.strip() != text or "\n" in text else "binary data"
    return "binary data"


def _weights_only_reason(text: str) -> str:
    """What torch's weights-only unpickler refused, in words (it says "Unsupported operand 149")."""
    found = re.search(r"WeightsUnpickler error:\s*(.+)", text)
    detail = found.group(1).strip() if found else ""
    op = re.fullmatch(r"Unsupported operand (\d+)", detail)
    if op:
        name = next((o.name for o in pickletools.opcodes if ord(o.code) == int(op.group(1))), None)
        return (f"the file uses the pickle instruction {name or 'number ' + op.group(1)}, which the safe loader "
                f"(weights only) does not read (legacy torch.save with a pickle protocol above 2?)")
    if detail and "weights_only" not in detail and not re.search(r"\(\d+\)$", detail):
        return f"the file holds objects other than tensors and plain data ({_first_line(Exception(detail))})"
    return "the file holds objects other than tensors and plain data"


def shown_global(name: str) -> str:
    """posix.system is how os.system is pickled (nt.system on Windows): show both names."""
    module, _, attr = name.rpartition(".")
    return f"{name} (os.{attr})" if module in ("posix", "nt") else name


def _torch_reason(e: Exception) -> str:
    """The first sentence of torch's complaint, without its internal codes or advice."""
    text = re.sub(r"\[enforce fail at [^\]]*\]\s*", "", str(e))
    if "PytorchStreamReader" in text or "central directory" in text:
        return "a damaged or cut-short zip archive"
    text = _first_line(Exception(text))
    if re.fullmatch(r"\W*\d*\W*", text) or "weights_only" in text:
        return type(e).__name__
    return text


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
