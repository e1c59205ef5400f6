"""Phaseformer and Spectroformer weights from any file a user brings, read without running code from it.

Accepted:
- the official Phaseformer release's `checkpoints/*/best.pth`: a whole pickled model
  (`torch.save(model)`) of class `model_with_eca.Restormer`, or `phaseformer.Restormer` when saved
  from the training script's repository (a name a plain torch.load would resolve to *this*
  package); saved on a GPU; legacy or zip format;
- the official Spectroformer's files: whole pickled models saved by its Train.py
  (`torch.save(net_g)` of `final_model.mymodel`) or with the model file's own name
  (`final_model_AGSSF1.mymodel`), GPU-saved or not, zip or legacy.
  Whole models are read with `safe_pickle` and an allow-list of exactly the classes such files hold;
- a training-script state_dict (`netG_model_epoch_N.pth`), with or without DataParallel's
  `module.` (or torch.compile's `_orig_mod.`) prefix;
- a converted file (scripts/convert_phaseformer.py) or one of our training checkpoints.
"""
from __future__ import annotations

import os
import pickle
from pathlib import Path

import torch

from common.checkpoint import require_task
from common.io import (RefusedContent, UserError, load_untrusted, one_line, require_file, shown_global,
                       strip_wrapper_prefixes)
from phaseformer.model import MODEL_NAMES, build_model
from phaseformer.safe_pickle import InertModule, RefusedGlobal, load_pickled

OFFICIAL_MODULES = ("model_with_eca", "phaseformer")
OFFICIAL_CLASSES = ("Restormer", "ECA", "MDTA", "GDFN", "TransformerBlock", "DownSample", "UpSample", "UpSample1")
# Spectroformer: its Train.py does `from final_model import mymodel`; the model file is final_model_AGSSF1.py
SPECTRO_MODULES = ("final_model", "final_model_AGSSF1")
SPECTRO_CLASSES = ("mymodel", "SFCA", "AGSSF", "MDTA", "GDFN", "TransformerBlock", "DownSample", "UpSample",
                   "UpSample1", "UpS")
ROOT_CLASS = {"Restormer": "phaseformer", "mymodel": "spectroformer"}    # pickled root class -> our model
TORCH_CLASSES = (
    "torch.nn.modules.container.ModuleList", "torch.nn.modules.container.Sequential",
    "torch.nn.modules.conv.Conv1d", "torch.nn.modules.conv.Conv2d",
    "torch.nn.modules.normalization.LayerNorm", "torch.nn.modules.pooling.AdaptiveAvgPool2d",
    "torch.nn.modules.activation.Sigmoid", "torch.nn.modules.activation.LeakyReLU",
    "torch.nn.modules.pixelshuffle.PixelShuffle",
    "torch.nn.modules.pixelshuffle.PixelUnshuffle",
    "torch.nn.parallel.data_parallel.DataParallel",  # torch.save(net_g) of a DataParallel-wrapped model
)
ALLOWED_CLASSES = frozenset([f"{m}.{c}" for m in OFFICIAL_MODULES for c in OFFICIAL_CLASSES]
                            + [f"{m}.{c}" for m in SPECTRO_MODULES for c in SPECTRO_CLASSES] + list(TORCH_CLASSES))
TITLES = {"phaseformer": "Phaseformer (model_with_eca.Restormer)",
          "spectroformer": "Spectroformer (final_model_AGSSF1.mymodel)"}


def expected_state(name: str = "phaseformer") -> dict[str, torch.Tensor]:
    """Key -> meta tensor (shape, dtype) of the state_dict of build_model(name), nothing allocated."""
    with torch.device("meta"):
        return build_model(name).state_dict()


def _shown(keys: list[str]) -> str:
    return ", ".join(keys[:3]) + (f" (+{len(keys) - 3} more)" if len(keys) > 3 else "")


def _from_inert(root: InertModule, path: Path) -> dict[str, torch.Tensor]:
    name = root.class_name
    if name.endswith(".DataParallel"):
        inner = root.state.get("_modules", {}).get("module")
        if not isinstance(inner, InertModule):
            raise UserError(f"{path}: a pickled DataParallel without a model inside")
        name = inner.class_name
    if name.rsplit(".", 1)[-1] not in ROOT_CLASS:
        raise UserError(f"{path}: a pickled {name}, not a Phaseformer (model_with_eca.Restormer) "
                        f"nor a Spectroformer (final_model_AGSSF1.mymodel)")
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
    raise UserError(f"{path}: no Phaseformer/Spectroformer weights found (expected a whole pickled model, a state_dict, "
                    f"or a checkpoint with a 'model' entry)")


def detect_model(sd: dict[str, torch.Tensor], root_class: str | None = None) -> str:
    """The build_model name whose state_dict keys sd holds (the pickled root class decides when
    there is one); for a file of neither, the closest by shared keys (the error then lists what differs)."""
    if root_class in ROOT_CLASS:
        return ROOT_CLASS[root_class]
    keys = set(sd)
    return max(MODEL_NAMES, key=lambda n: (keys == set(expected_state(n)), len(keys & set(expected_state(n)))))


def _root_class(obj) -> str | None:
    if not isinstance(obj, InertModule):
        return None
    inner = obj.state.get("_modules", {}).get("module") if obj.class_name.endswith("DataParallel") else None
    return (inner if isinstance(inner, InertModule) else obj).class_name.rsplit(".", 1)[-1]


def read_weights(path: str | os.PathLike, model: str | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """(fp32 state_dict in build_model(name) key order, description) from any accepted file;
    info["model"] is the name: `model` if given, else detected from the file.

    Errors are one-line UserErrors naming the file: a foreign global (nothing was run), a file of
    another model (which keys differ), an unreadable file.
    """
    path = require_file(path, "checkpoint file")
    if path.stat().st_size == 0:
        raise UserError(f"{path}: file is empty")
    obj, info = _load_any(path)
    require_task(obj, path, "phaseformer", "a phaseformer/train.py checkpoint or Phaseformer weights")
    sd, info["stripped"] = strip_wrapper_prefixes(_as_state_dict(obj, path))
    if model is not None and model not in MODEL_NAMES:
        raise UserError(f"unknown model {model!r} (choose from {', '.join(MODEL_NAMES)})")
    info["model"] = model or detect_model(sd, _root_class(obj))
    want = expected_state(info["model"])
    missing = [k for k in want if k not in sd]
    unexpected = [k for k in sd if k not in want]
    wrong = [f"{k} {tuple(sd[k].shape)} != {tuple(want[k].shape)}" for k in want
             if k in sd and tuple(sd[k].shape) != tuple(want[k].shape)]
    wrong += [f"{k} is {sd[k].dtype}" for k in want if k in sd and not sd[k].is_floating_point()]
    if missing or unexpected or wrong:
        parts = [f"{len(v)} {what}: {_shown(v)}" for what, v in
                 (("missing", missing), ("unexpected", unexpected), ("wrong", wrong)) if v]
        raise UserError(f"{path}: not {TITLES[info['model']]} weights ({'; '.join(parts)})")
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
                        f"Phaseformer or Spectroformer checkpoint holds; nothing from the file was run") from None
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
    """Load any accepted file strictly into a built model (either kind); returns the description.
    A file of the other model is refused with a line saying which model it holds."""
    from phaseformer.model import model_name
    target = model.module if hasattr(model, "module") else model
    name = model_name(target)
    sd, info = read_weights(path)
    if info["model"] != name:
        raise UserError(f"{path}: holds {TITLES[info['model']]} weights, but the model is {TITLES[name]}"
                        f" (use --model {info['model']})")
    target.load_state_dict(sd, strict=True)
    return info
