"""Read PyTorch files that hold whole pickled models (`torch.save(model)`) without running them.

A whole-model pickle names the model's classes (e.g. `model_with_eca.Restormer`) and asks the
unpickler to import and instantiate them. `torch.load(weights_only=True)` rightly refuses such
files; a plain `torch.load` would import whatever module of that name is importable (for a file
saved from a script called `phaseformer`, that is *our* package) and run code the file chooses.

This reader does neither. Its unpickler (Python's reference unpickler with a restricted opcode
table) resolves only the globals on an allow-list, each to a harmless stand-in:
- module classes -> `InertModule`, which records the class name and the attribute dict it is given
  and has no behaviour at all (its parameters and buffers are read out afterwards);
- `collections.OrderedDict`, `set`, `torch.device` -> plain containers / a string;
- `torch._utils._rebuild_tensor_v2` / `_rebuild_parameter[_with_state]` -> our own functions that
  build a CPU tensor view of a storage after checking every argument;
- `torch.<Type>Storage` -> a dtype marker, only meaningful inside a storage reference.
Any other global is refused before anything is called (`RefusedGlobal` names it), as are the
opcodes genuine files never use (INST, OBJ, EXT*), BUILD on anything but a stand-in module, and
storages whose declared size disagrees with the data. Storages are read from the zip records
(torch >= 1.6 format) or from the data section of the legacy format, always onto the CPU (release
files were saved from `cuda:0`).
"""
from __future__ import annotations

import io
import os
import pickle
import struct
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001
MAX_PICKLE_BYTES = 256 << 20

STORAGE_DTYPES = {
    "FloatStorage": torch.float32, "DoubleStorage": torch.float64, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}


class RefusedGlobal(pickle.UnpicklingError):
    """The file names a global that is not on the allow-list; nothing from the file was run."""

    def __init__(self, name: str):
        super().__init__(f"refused global {name}")
        self.name = name


class InertModule:
    """Stand-in for a pickled nn.Module: its class name and attribute dict, no behaviour."""

    class_name = "?"

    def __new__(cls, *args, **kwargs):
        if args or kwargs:  # genuine module pickles are rebuilt with NEWOBJ and no arguments
            raise pickle.UnpicklingError(f"{cls.class_name} rebuilt with arguments")
        return object.__new__(cls)

    def __init__(self):
        self.state: dict = {}

    def set_state(self, state) -> None:
        if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
            raise pickle.UnpicklingError(f"{self.class_name}: module state is not an attribute dict")
        self.state = state

    def named_tensors(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """state_dict(): parameters, then persistent buffers, then children in registration order."""
        out = {}
        params = self.state.get("_parameters", {})
        buffers = self.state.get("_buffers", {})
        skip = self.state.get("_non_persistent_buffers_set", set())
        children = self.state.get("_modules", {})
        for what, table in (("_parameters", params), ("_buffers", buffers), ("_modules", children)):
            if not isinstance(table, dict):
                raise pickle.UnpicklingError(f"{self.class_name}.{what} is not a dict")
        for name, t in list(params.items()) + [(n, b) for n, b in buffers.items() if n not in skip]:
            if t is None:
                continue
            if not isinstance(t, torch.Tensor):
                raise pickle.UnpicklingError(f"{prefix}{name}: not a tensor")
            out[prefix + name] = t
        for name, child in children.items():
            if child is None:
                continue
            if not isinstance(child, InertModule):
                raise pickle.UnpicklingError(f"{prefix}{name}: not a module")
            out.update(child.named_tensors(f"{prefix}{name}."))
        return out

    def __repr__(self):
        return f"<inert {self.class_name}>"


# ---------------------------------------------------------------- safe stand-ins for allowed callables
class _StorageType:
    def __init__(self, name: str):
        self.name, self.dtype = name, STORAGE_DTYPES[name]


class _Storage:
    def __init__(self, dtype: torch.dtype, numel: int):
        self.dtype, self.numel = dtype, numel
        self.flat = torch.empty(numel, dtype=dtype)


def _ints(values, what: str) -> tuple[int, ...]:
    if not isinstance(values, (tuple, list)) or not all(type(v) is int and v >= 0 for v in values):
        raise pickle.UnpicklingError(f"tensor {what} is not a tuple of non-negative ints")
    return tuple(values)


def _rebuild_tensor(storage, offset, size, stride, requires_grad=False, hooks=None, metadata=None):
    if not isinstance(storage, _Storage):
        raise pickle.UnpicklingError("tensor data does not come from a storage record")
    if type(offset) is not int or offset < 0:
        raise pickle.UnpicklingError("tensor offset is not a non-negative int")
    size, stride = _ints(size, "size"), _ints(stride, "stride")
    if len(size) != len(stride):
        raise pickle.UnpicklingError("tensor size and stride differ in length")
    if all(size):
        last = offset + sum((n - 1) * s for n, s in zip(size, stride))
        if last >= storage.numel:
            raise pickle.UnpicklingError("tensor extends past the end of its storage")
    return torch.as_strided(storage.flat, size, stride, offset)


def _rebuild_parameter(data, requires_grad=False, hooks=None, state=None):
    if not isinstance(data, torch.Tensor):
        raise pickle.UnpicklingError("parameter without tensor data")
    return data


def _ordered_dict(*args):
    if args:
        raise pickle.UnpicklingError("OrderedDict rebuilt with arguments")
    return OrderedDict()


def _set(items=()):
    if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
        raise pickle.UnpicklingError("set of something other than names")
    return set(items)


def _device(kind, index=None):
    if not isinstance(kind, str) or not (index is None or type(index) is int):
        raise pickle.UnpicklingError("malformed device")
    return kind if index is None else f"{kind}:{index}"


SAFE_CALLABLES = {
    "collections.OrderedDict": _ordered_dict,
    "builtins.set": _set,
    "__builtin__.set": _set,  # protocol-2 pickles use the Python 2 name
    "torch._utils._rebuild_tensor_v2": _rebuild_tensor,
    "torch._utils._rebuild_parameter": _rebuild_parameter,
    "torch._utils._rebuild_parameter_with_state": _rebuild_parameter,
    "torch.device": _device,
}


# ---------------------------------------------------------------- the unpickler
class _RestrictedUnpickler(pickle._Unpickler):
    """Python's reference unpickler (pure Python, so its opcode table can be restricted)."""

    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, file, module_classes: frozenset[str], storage_loader=None):
        super().__init__(file, encoding="utf-8")
        self.module_classes = module_classes
        self.storage_loader = storage_loader
        self.storages: dict[str, _Storage] = {}
        self.locations: set[str] = set()      # where the storages lived when saved (e.g. cuda:0)
        self.inert_types: dict[str, type] = {}

    def find_class(self, module, name):
        full = f"{module}.{name}"
        if full in SAFE_CALLABLES:
            return SAFE_CALLABLES[full]
        if module == "torch" and name in STORAGE_DTYPES and self.storage_loader is not None:
            return _StorageType(name)
        if full in self.module_classes:
            if full not in self.inert_types:
                self.inert_types[full] = type(name, (InertModule,), {"class_name": full, "__slots__": ()})
            return self.inert_types[full]
        raise RefusedGlobal(full)

    def persistent_load(self, pid):
        if self.storage_loader is None:
            raise pickle.UnpicklingError("unexpected storage reference")
        if isinstance(pid, tuple) and len(pid) == 4 and pid[0] == "module":
            # the legacy format refers to module classes as ('module', class, source file, source)
            if not (isinstance(pid[1], type) and issubclass(pid[1], InertModule)):
                raise pickle.UnpicklingError("malformed module reference")
            return pid[1]
        if not (isinstance(pid, tuple) and len(pid) in (5, 6) and pid[0] == "storage"):
            raise pickle.UnpicklingError("malformed storage reference")
        storage_type, key, location, numel = pid[1:5]
        if len(pid) == 6 and pid[5] is not None:
            raise pickle.UnpicklingError("storage views are not supported")
        if not (isinstance(storage_type, _StorageType) and isinstance(key, str) and isinstance(location, str)
                and type(numel) is int and numel >= 0):
            raise pickle.UnpicklingError("malformed storage reference")
        self.locations.add(location)
        if key not in self.storages:
            self.storages[key] = self.storage_loader(key, storage_type.dtype, numel)
        storage = self.storages[key]
        if storage.dtype != storage_type.dtype or storage.numel != numel:
            raise pickle.UnpicklingError(f"storage {key} referenced with two different types or sizes")
        return storage

    def load_build(self):
        state = self.stack.pop()
        target = self.stack[-1]
        if isinstance(target, InertModule):
            target.set_state(state)
        elif isinstance(target, dict) and isinstance(state, dict):
            pass  # an OrderedDict's instance attributes (a state_dict's `_metadata`): not needed
        else:
            raise pickle.UnpicklingError(f"BUILD on a {type(target).__name__}")

    def refuse_opcode(self):
        raise pickle.UnpicklingError("pickle opcode that PyTorch files never use")

    dispatch[pickle.BUILD[0]] = load_build
    for _op in (pickle.INST, pickle.OBJ, pickle.EXT1, pickle.EXT2, pickle.EXT4):
        dispatch[_op[0]] = refuse_opcode
    del _op


def _plain_load(f) -> object:
    """A pickle of plain data only (the legacy format's header and key list)."""
    return _RestrictedUnpickler(f, frozenset()).load()


# ---------------------------------------------------------------- file formats
def _element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _fill(storage: _Storage, raw: bytearray, big_endian: bool) -> None:
    if not storage.numel:
        return
    size = _element_size(storage.dtype)
    values = torch.frombuffer(raw, dtype=torch.uint8)
    if big_endian and size > 1:
        values = values.view(-1, size).flip(1).reshape(-1)
    storage.flat.copy_(values.view(storage.dtype))


def _load_zip(path: Path, module_classes: frozenset[str]) -> "Pickled":
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
        tops = [n[: -len("/data.pkl")] for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(tops) != 1:
            raise pickle.UnpicklingError("zip file is not a PyTorch checkpoint (no single data.pkl)")
        prefix = tops[0]
        infos = {i.filename: i for i in z.infolist()}
        big_endian = False
        if f"{prefix}/byteorder" in infos:
            order = z.read(f"{prefix}/byteorder").strip()
            if order not in (b"little", b"big"):
                raise pickle.UnpicklingError("unknown byte order record")
            big_endian = order == b"big"

        def load_storage(key: str, dtype: torch.dtype, numel: int) -> _Storage:
            info = infos.get(f"{prefix}/data/{key}")
            if info is None:
                raise pickle.UnpicklingError(f"storage record data/{key} is missing")
            if info.compress_type != zipfile.ZIP_STORED or info.file_size != numel * _element_size(dtype):
                raise pickle.UnpicklingError(f"storage record data/{key} does not hold {numel} {dtype} values")
            storage = _Storage(dtype, numel)
            _fill(storage, bytearray(z.read(info)), big_endian)
            return storage

        data = infos[f"{prefix}/data.pkl"]
        if data.file_size > MAX_PICKLE_BYTES:
            raise pickle.UnpicklingError("data.pkl is implausibly large")
        unpickler = _RestrictedUnpickler(io.BytesIO(z.read(data)), module_classes, load_storage)
        return Pickled(unpickler.load(), "zip", unpickler.locations)


def _load_legacy(path: Path, module_classes: frozenset[str]) -> "Pickled":
    size = path.stat().st_size
    with open(path, "rb") as f:
        if _plain_load(f) != LEGACY_MAGIC:
            raise pickle.UnpicklingError("not a PyTorch file (bad magic number)")
        if _plain_load(f) != LEGACY_PROTOCOL:
            raise pickle.UnpicklingError("unsupported legacy protocol version")
        sys_info = _plain_load(f)
        if not isinstance(sys_info, dict):
            raise pickle.UnpicklingError("malformed header")
        endian = "<" if sys_info.get("little_endian", True) else ">"
        claimed = [0]

        def new_storage(key: str, dtype: torch.dtype, numel: int) -> _Storage:
            claimed[0] += numel * _element_size(dtype)
            if claimed[0] > size:
                raise pickle.UnpicklingError(f"storage {key} claims more data than the file holds")
            return _Storage(dtype, numel)

        unpickler = _RestrictedUnpickler(f, module_classes, new_storage)
        result = unpickler.load()
        keys = _plain_load(f)
        if not isinstance(keys, list) or set(keys) != set(unpickler.storages):
            raise pickle.UnpicklingError("storage key list does not match the references")
        for key in keys:
            storage = unpickler.storages[key]
            header = f.read(8)
            if len(header) != 8 or struct.unpack(f"{endian}q", header)[0] != storage.numel:
                raise pickle.UnpicklingError(f"storage {key}: size record does not match")
            nbytes = storage.numel * _element_size(storage.dtype)
            raw = bytearray(f.read(nbytes))
            if len(raw) != nbytes:
                raise pickle.UnpicklingError(f"storage {key}: file is truncated")
            _fill(storage, raw, endian == ">")
    return Pickled(result, "legacy", unpickler.locations)


@dataclass
class Pickled:
    obj: object
    format: str                 # "zip" (torch >= 1.6) or "legacy"
    locations: set[str]         # devices the storages were saved from


def load_pickled(path: str | os.PathLike, module_classes) -> Pickled:
    """Unpickle a torch.save file (zip or legacy format) allowing only `module_classes` (full
    names such as 'model_with_eca.Restormer', which become InertModule objects) besides tensors
    and plain containers. Raises RefusedGlobal or pickle.UnpicklingError; runs nothing from the file."""
    path = Path(path)
    module_classes = frozenset(module_classes)
    if zipfile.is_zipfile(path):
        return _load_zip(path, module_classes)
    with open(path, "rb") as f:
        head = f.read(2)
    if len(head) < 2 or head[0] != pickle.PROTO[0]:
        raise pickle.UnpicklingError("neither a zip nor a legacy PyTorch file")
    return _load_legacy(path, module_classes)
