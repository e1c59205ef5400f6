"""One checkpoint format for every task, written atomically and read with weights_only=True.

Contents: model, optimizer, scheduler, scaler, epoch (completed epochs), step (optimizer steps),
best metric, RNG states, the run's config, plus whatever small plain-typed extras a task adds.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import torch

from common.io import UserError, atomic_torch_save, load_untrusted
from common.repro import get_rng_state

FORMAT_VERSION = 1
# a fresh run's folder holds this until its first checkpoint: a rerun may replace such an unfinished start
UNFINISHED_MARKER = ".unfinished"
# the tasks of this project; a checkpoint's config names the one that wrote it (config["task"])
TASKS = ("crbl", "battery_ct", "spectral", "colorize", "phaseformer")


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain model inside DistributedDataParallel / DataParallel / torch.compile wrappers."""
    while True:
        if hasattr(model, "module"):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def plain_config(cfg) -> dict:
    """argparse.Namespace / dict -> dict of str/int/float/bool/None/lists (safe to unpickle)."""
    if not isinstance(cfg, dict):
        cfg = vars(cfg)
    out = {}
    for k, v in cfg.items():
        if isinstance(v, (list, tuple)):
            out[k] = [x if isinstance(x, (int, float, bool, str, type(None))) else str(x) for x in v]
        elif isinstance(v, (int, float, bool, str, type(None))):
            out[k] = v
        else:
            out[k] = str(v)
    return out


def save_checkpoint(path: str | os.PathLike, *, model, optimizer=None, scheduler=None, scaler=None,
                    epoch: int = 0, step: int = 0, best_metric: float | None = None,
                    config=None, extra: dict | None = None) -> Path:
    state = {
        "format_version": FORMAT_VERSION,
        "model": unwrap(model).state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else None,
        "epoch": int(epoch),
        "step": int(step),
        "best_metric": None if best_metric is None or math.isnan(best_metric) else float(best_metric),
        "rng": get_rng_state(),
        "config": plain_config(config or {}),
        "extra": extra or {},
    }
    atomic_torch_save(state, path)
    return Path(path)


# section -> type every training checkpoint has
SECTIONS = {"model": dict, "epoch": int, "step": int, "rng": dict, "config": dict, "extra": dict}


def check_checkpoint(ckpt, path) -> dict:
    """A training checkpoint of this project with every section a resume needs, else a UserError."""
    if not isinstance(ckpt, dict) or "format_version" not in ckpt:
        raise UserError(f"{path}: not a training checkpoint of this project "
                        f"(converted weights go to --init / --weights, not --resume)")
    bad = [k for k, t in SECTIONS.items() if not isinstance(ckpt.get(k), t)]
    if bad:
        raise UserError(f"{path}: incomplete training checkpoint: no valid {', '.join(bad)} section(s)")
    return ckpt


def checkpoint_task(obj) -> str | None:
    """The task that wrote a checkpoint of this project: its config's "task", else (files written
    before the tag) what its sections show; None for anything else (a converted or foreign
    state_dict, whose tensors the model's strict load then checks)."""
    if not isinstance(obj, dict):
        return None
    cfg, extra = obj.get("config"), obj.get("extra")
    if isinstance(cfg, dict) and cfg.get("task") in TASKS:
        return cfg["task"]
    if isinstance(extra, dict):   # spectral and phaseformer keep their own state under their name
        found = [t for t in TASKS if t in extra]
        if len(found) == 1:
            return found[0]
    if isinstance(cfg, dict) and "model_type" in cfg:
        return "crbl"
    return None


def require_task(obj, path, task: str, needs: str) -> None:
    """Refuse a checkpoint another task wrote, first, before anything else is compared:
    "PATH is a colorize checkpoint; spectral needs NEEDS". Untagged files pass."""
    found = checkpoint_task(obj)
    if found is not None and found != task:
        raise UserError(f"{path} is a {found} checkpoint; {task} needs {needs}")


def load_checkpoint(path: str | os.PathLike, task: str | None = None) -> dict:
    """A training checkpoint of this project; with `task`, one that this task wrote."""
    obj = load_untrusted(path)
    if task is not None:
        require_task(obj, path, task, f"its own {task}/train.py last.pt to resume from")
    return check_checkpoint(obj, path)


def restore_training_state(ckpt: dict, path, *, model, optimizer=None, scheduler=None,
                           scaler=None) -> None:
    """Load model/optimizer/scheduler/scaler states; a model mismatch is a UserError."""
    target = unwrap(model)
    try:
        target.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise UserError(f"{path}: checkpoint is for a different model ({first})") from None
    if optimizer is not None and ckpt.get("optimizer") is not None:
        try:
            optimizer.load_state_dict(ckpt["optimizer"])
        except (ValueError, KeyError) as e:
            raise UserError(f"{path}: optimizer state does not match this run ({e})") from None
    for name, obj in (("scheduler", scheduler), ("scaler", scaler)):
        if obj is not None and ckpt.get(name) is not None:
            try:
                obj.load_state_dict(ckpt[name])
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                raise UserError(f"{path}: {name} state does not match this run ({e})") from None
