"""Checkpoints a user brings: one loader (torch.load(weights_only=True)) for every script, and the
same one line for the same bad file everywhere. Nothing from a file is ever run; torch's advice to
load a refused file with weights_only=False and its warnings never reach the user.

Scripts import these names from common.io, as before."""
from __future__ import annotations

import contextlib
import io
import os
import pickle
import pickletools
import re
import warnings
import zipfile
from pathlib import Path
from typing import Iterable

import torch

from common.io import UserError, _first_line, require_file


class RefusedContent(UserError):
    """load_untrusted refused what a file holds (`global_name`, where known); nothing from it was run.
    `torch_format`: the file is in torch.save's format (an allow-list reader may look further)."""

    def __init__(self, message: str, global_name: str | None = None, torch_format: bool = True):
        super().__init__(message)
        self.global_name, self.torch_format = global_name, torch_format


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
