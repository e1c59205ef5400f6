"""Phaseformer weights from any file a user brings, read without running code from it.

Accepted:
- the official release's `checkpoints/*/best.pth`: a whole pickled model (`torch.save(model)`) of
  class `model_with_eca.Restormer`, or `phaseformer.Restormer` when saved from the training
  script's repository (a name a plain torch.load would resolve to *this* package); saved on a GPU;
  legacy or zip format. Read with `safe_pickle` and an allow-list of exactly the classes such a
  file holds;
- a training-script state_dict (`netG_model_epoch_N.pth`), with or without DataParallel's
  `module.` (or torch.compile's `_orig_mod.`) prefix;
- a converted file (scripts/convert_phaseformer.py) or one of our training checkpoints.
"""
from __future__ import annotations

import os
import pickle
from pathlib import Path

import torch

from common.io import (RefusedContent, UserError, load_untrusted, one_line, shown_global,
                       strip_wrapper_prefixes)
from phaseformer.model import Phaseformer
from phaseformer.safe_pickle import InertModule, RefusedGlobal, load_pickled

OFFICIAL_MODULES = ("model_with_eca", "phaseformer")
OFFICIAL_CLASSES = ("Restormer", "ECA", "MDTA", "GDFN", "TransformerBlock", "DownSample", "UpSample", "UpSample1")
TORCH_CLASSES = (
    "torch.nn.modules.container.ModuleList", "torch.nn.modules.container.Sequential",
    "torch.nn.modules.conv.Conv1d", "torch.nn.modules.conv.Conv2d",
    "torch.nn.modules.normalization.LayerNorm", "torch.nn.modules.pooling.AdaptiveAvgPool2d",
    "torch.nn.modules.activation.Sigmoid", "torch.nn.modules.pixelshuffle.PixelShuffle",
    "torch.nn.modules.pixelshuffle.PixelUnshuffle",
    "torch.nn.parallel.data_parallel.DataParallel",  # torch.save(net_g) of a DataParallel-wrapped model
)
ALLOWED_CLASSES = frozenset([f"{m}.{c}" for m in OFFICIAL_MODULES for c in OFFICIAL_CLASSES] + list(TORCH_CLASSES))


def expected_state() -> dict[str, torch.Tensor]:
    """Key -> meta tensor (shape, dtype) of a Phaseformer state_dict, nothing allocated."""
    with torch.device("meta"):
        return Phaseformer().state_dict()


def _shown(keys: list[str]) -> str:
    return ", ".join(keys[:3]) + (f" (+{len(keys) - 3} more)" if len(keys) > 3 else "")


def _from_inert(root: InertModule, path: Path) -> dict[str, torch.Tensor]:
    name = root.class_name
    if name.endswith(".DataParallel"):
        inner = root.state.get("_modules", {}).get("module")
        if not isinstance(inner, InertModule):
            raise UserError(f"{path}: a pickled DataParallel without a model inside")
        name = inner.class_name
    if name.rsplit(".", 1)[-1] != "Restormer":
        raise UserError(f"{path}: a pickled {name}, not a Phaseformer (model_with_eca.Restormer)")
    try:
        return root.named_tensors()
    except pickle.UnpicklingError as e:
        raise UserError(f"{path}: malformed pickled model ({e})") from None


def _as_state_dict(obj, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, InertModule):
        return _from_inert(obj, path)
    if isinstance(obj, dict):
        for key in ("model", "state_dict", "netG", "net_g"):  # ours; common wrappers of others
            if isinstance(obj.get(key), (dict, InertModule)) and obj[key]:
                return _as_state_dict(obj[key], path)
        if obj and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
            return dict(obj)
    raise UserError(f"{path}: no Phaseformer weights found (expected a whole pickled model, a state_dict, "
                    f"or a checkpoint with a 'model' entry)")


def read_weights(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """(fp32 state_dict in Phaseformer key order, description) from any accepted file.

    Errors are one-line UserErrors naming the file: a foreign global (nothing was run), a file of
    another model (which keys differ), an unreadable file.
    """
    obj, info = _load_any(Path(path))
    sd, info["stripped"] = strip_wrapper_prefixes(_as_state_dict(obj, path))
    want = expected_state()
    missing = [k for k in want if k not in sd]
    unexpected = [k for k in sd if k not in want]
    wrong = [f"{k} {tuple(sd[k].shape)} != {tuple(want[k].shape)}" for k in want
             if k in sd and tuple(sd[k].shape) != tuple(want[k].shape)]
    wrong += [f"{k} is {sd[k].dtype}" for k in want if k in sd and not sd[k].is_floating_point()]
    if missing or unexpected or wrong:
        parts = [f"{len(v)} {what}: {_shown(v)}" for what, v in
                 (("missing", missing), ("unexpected", unexpected), ("wrong", wrong)) if v]
        raise UserError(f"{path}: not Phaseformer weights ({'; '.join(parts)})")
    return {k: sd[k].detach().to(torch.float32).contiguous().clone() for k in want}, info


def _load_any(path: Path) -> tuple[object, dict]:
    """The shared loader (common.io.load_untrusted) for tensors-and-containers files; the allow-list
    reader for whole pickled models (which the shared loader refuses), whose verdict then names
    the problem."""
    info = {"kind": "state_dict", "format": None, "locations": set(), "stripped": []}
    try:
        return load_untrusted(path), info
    except RefusedContent as e:
        if not e.torch_format:
            raise
        refused = e
    try:
        loaded = load_pickled(path, ALLOWED_CLASSES)
    except RefusedGlobal as e:
        raise UserError(f"{path}: refused to load: the file names the global {shown_global(e.name)}, which no "
                        f"Phaseformer checkpoint holds; nothing from the file was run") from None
    except pickle.UnpicklingError as e:  # the allow-list reader names what is malformed; nothing ran
        if not str(e).strip():
            raise refused from None
        raise UserError(f"{path}: corrupt or malformed checkpoint ({one_line(str(e))}); nothing from the file "
                        f"was run") from None
    except Exception:  # noqa: BLE001 - malformed pickles fail in many ways; none of them runs code
        raise refused from None
    info.update(format=loaded.format, locations=loaded.locations)
    if isinstance(loaded.obj, InertModule):
        info["kind"] = f"whole pickled model ({_root_name(loaded.obj)})"
    return loaded.obj, info


def _root_name(obj: InertModule) -> str:
    inner = obj.state.get("_modules", {}).get("module") if obj.class_name.endswith("DataParallel") else None
    return f"{obj.class_name} of {inner.class_name}" if isinstance(inner, InertModule) else obj.class_name


def load_weights(model: torch.nn.Module, path: str | os.PathLike) -> dict:
    """Load any accepted file into a Phaseformer strictly; returns the description."""
    sd, info = read_weights(path)
    target = model.module if hasattr(model, "module") else model
    target.load_state_dict(sd, strict=True)
    return info
