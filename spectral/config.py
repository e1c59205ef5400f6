"""CR_recon's YAML config schema: reading, checking, defaults, and where the data files are.

  seed: 42
  data:     {struct_files: [...], spectra_files: [...], out_len, map_to_pm1, augment_180,
             train_ratio, batch_size, num_workers}
  model:    {name: cnn_xattn | cnn_gru, params: {constructor arguments}}
  loss:     {name: mse_pearson | weighted_smooth, params: {...}}
  training: {epochs, lr, weight_decay, grad_clip, use_amp, warmup_ratio, save_every}
  dashboard: {enabled, port}
  output:   {dir, log_file}

A CR_recon config runs unchanged. Missing keys take CR_recon's defaults; an unknown key, a key
given twice, a value of the wrong type or out of range is one error line naming the file and the
key. An empty file is refused (it would mean CR_recon's defaults throughout, which differ from
configs/default.yaml). YAML 1.1 reads `1e-3` as text, so numbers written that way are accepted for
number fields.
"""
from __future__ import annotations

import copy
import math
import os
from pathlib import Path

import yaml

from common.cli import MAX_BATCH, MAX_EPOCHS, MAX_SEED
from common.io import UserError
from spectral.data import N_POINTS
from spectral.losses import check_loss_params
from spectral.model import check_model_params

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
DEFAULT_CONFIG = CONFIG_DIR / "default.yaml"


class _Int:
    def __init__(self, lo: int, hi: int | None = None):
        self.lo, self.hi = lo, hi

    def __call__(self, v, key):
        if isinstance(v, bool) or not isinstance(v, int) or v < self.lo or (self.hi is not None and v > self.hi):
            rng = f"an integer >= {self.lo}" if self.hi is None else f"an integer in [{self.lo}, {self.hi}]"
            raise ValueError(f"{key} must be {rng} (got {v!r})")
        return v


class _Float:
    def __init__(self, lo: float, hi: float | None = None, lo_open: bool = False, hi_open: bool = False):
        self.lo, self.hi, self.lo_open, self.hi_open = lo, hi, lo_open, hi_open

    def __call__(self, v, key):
        x = v
        if isinstance(v, str):
            try:
                x = float(v)
            except ValueError:
                x = None
        if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(x) \
                or (x <= self.lo if self.lo_open else x < self.lo) \
                or (self.hi is not None and (x >= self.hi if self.hi_open else x > self.hi)):
            lo = f"{'(' if self.lo_open else '['}{self.lo}"
            hi = f"{self.hi if self.hi is not None else 'inf'}{')' if self.hi_open or self.hi is None else ']'}"
            raise ValueError(f"{key} must be a number in {lo}, {hi} (got {v!r})")
        return float(x)


def _bool(v, key):
    if not isinstance(v, bool):
        raise ValueError(f"{key} must be true or false (got {v!r})")
    return v


def _str(v, key):
    if not isinstance(v, str) or not v:
        raise ValueError(f"{key} must be a non-empty text (got {v!r})")
    return v


def _paths(v, key):
    if not isinstance(v, list) or not v or not all(isinstance(p, str) and p for p in v):
        raise ValueError(f"{key} must be a list of file paths (got {v!r})")
    return v


def _mapping(v, key):
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise ValueError(f"{key} must be a mapping of parameter: value (got {v!r})")
    return v


SCHEMA = {
    "seed": _Int(0, MAX_SEED),
    "data": {"struct_files": _paths, "spectra_files": _paths, "out_len": _Int(3, N_POINTS),
             "map_to_pm1": _bool, "augment_180": _bool, "train_ratio": _Float(0.0, 1.0, True, True),
             "batch_size": _Int(1, MAX_BATCH), "num_workers": _Int(0, 256)},
    "model": {"name": _str, "params": _mapping},
    "loss": {"name": _str, "params": _mapping},
    "training": {"epochs": _Int(1, MAX_EPOCHS), "lr": _Float(0.0, 10.0, lo_open=True), "weight_decay": _Float(0.0, 10.0),
                 "grad_clip": _Float(0.0, 1e6), "use_amp": _bool, "warmup_ratio": _Float(0.0, 1.0, hi_open=True),
                 "save_every": _Int(0, MAX_EPOCHS)},
    "dashboard": {"enabled": _bool, "port": _Int(1, 65535)},
    "output": {"dir": _str, "log_file": _str},
}

# CR_recon's defaults where its code has one (dataset.py, trainer.py, the model and loss factories)
DEFAULTS = {
    "seed": 42,
    "data": {"struct_files": [f"../data_CR-main/binary_dataset_128_{k}.npy" for k in (0, 1)],
             "spectra_files": [f"../data_CR-main/spectra_latest_{k}.npy" for k in (0, 1)],
             "out_len": 30, "map_to_pm1": True, "augment_180": True, "train_ratio": 0.95,
             "batch_size": 64, "num_workers": 0},
    "model": {"name": "cnn_xattn", "params": {}},
    "loss": {"name": "mse_pearson", "params": {}},
    "training": {"epochs": 300, "lr": 1e-3, "weight_decay": 0.005, "grad_clip": 1.0, "use_amp": True,
                 "warmup_ratio": 0.05, "save_every": 10},
    "dashboard": {"enabled": False, "port": 8501},
    "output": {"dir": "runs/spectral", "log_file": "train_log.txt"},
}


def check_config(cfg: dict, source: str, training: bool = True) -> dict:
    """Defaults filled in, every value checked, model and loss params completed from their
    constructors. Errors: one UserError naming `source` and the key. For training, the model's
    out_len must equal data.out_len (the targets' length); inference needs only the model's."""
    if cfg is None:
        cfg = {}
    if not isinstance(cfg, dict):
        raise UserError(f"{source}: expected a YAML mapping at the top level (seed, data, model, ...)")
    out = copy.deepcopy(DEFAULTS)
    try:
        for key, value in cfg.items():
            if key not in SCHEMA:
                raise ValueError(f"unknown key '{key}' (valid: {', '.join(SCHEMA)})")
            spec = SCHEMA[key]
            if not isinstance(spec, dict):
                out[key] = spec(value, key)
                continue
            if value is None:
                continue
            if not isinstance(value, dict):
                raise ValueError(f"{key} must be a mapping (got {value!r})")
            for sub, v in value.items():
                if sub not in spec:
                    raise ValueError(f"unknown key '{key}.{sub}' (valid in {key}: {', '.join(spec)})")
                out[key][sub] = spec[sub](v, f"{key}.{sub}")
    except ValueError as e:
        raise UserError(f"{source}: {e}") from None
    if len(out["data"]["struct_files"]) != len(out["data"]["spectra_files"]):
        raise UserError(f"{source}: data.struct_files lists {len(out['data']['struct_files'])} file(s) but "
                        f"data.spectra_files {len(out['data']['spectra_files'])}; they pair up part by part")
    try:
        out["model"]["params"] = check_model_params(out["model"]["name"], out["model"]["params"])
        out["loss"]["params"] = check_loss_params(out["loss"]["name"], out["loss"]["params"])
    except UserError as e:
        raise UserError(f"{source}: {e}") from None
    if training and out["model"]["params"]["out_len"] != out["data"]["out_len"]:
        raise UserError(f"{source}: model.params.out_len {out['model']['params']['out_len']} differs from "
                        f"data.out_len {out['data']['out_len']} (the two must be equal)")
    return out


class DuplicateKey(yaml.YAMLError):
    def __init__(self, key, line: int, first: int):
        super().__init__(f"key '{key}' appears twice, at line {first} and line {line}")
        self.key, self.line, self.first = key, line, first


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a mapping with a key given twice (PyYAML keeps the last)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen = {}
            for key_node, _ in node.value:   # the keys written here; merged ones (<<: *x) may be overridden
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=deep)
                try:
                    first = seen.setdefault(key, key_node.start_mark.line)
                except TypeError:          # an unhashable key: SafeLoader's own error follows
                    continue
                if first != key_node.start_mark.line:
                    raise DuplicateKey(key, key_node.start_mark.line + 1, first + 1)
        return super().construct_mapping(node, deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _UniqueKeyLoader.construct_mapping)


def load_config(path: str | os.PathLike, training: bool = True) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: config file not found")
    try:
        raw = yaml.load(path.read_text(encoding="utf-8-sig"), Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not a UTF-8 text file ({e.reason})") from None
    except DuplicateKey as e:
        raise UserError(f"{path}: {e}; give each key once (YAML would silently keep the last)") from None
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where is not None else ""
        raise UserError(f"{path}: not valid YAML{at} ({getattr(e, 'problem', None) or e})") from None
    if raw is None:
        raise UserError(f"{path}: the config is empty; give the settings to change (a copy of {DEFAULT_CONFIG.name} "
                        f"in spectral/configs/ is a start), or leave --config out for the default")
    return check_config(raw, str(path), training)


def resolve_data_files(cfg: dict, config_path: Path | None) -> tuple[list[Path], list[Path]]:
    """The config's data files. Relative paths are taken from the config's folder; when a file is not
    there and the config sits in a `configs/` folder, from that folder's parent (CR_recon resolves
    them against CR_recon/, the parent of its configs/)."""
    base = config_path.resolve().parent if config_path is not None else Path.cwd()
    bases = [base] + ([base.parent] if base.name == "configs" else [])
    found = []
    for key in ("struct_files", "spectra_files"):
        files = []
        for name in cfg["data"][key]:
            p = Path(name).expanduser()
            candidates = [p] if p.is_absolute() else [b / p for b in bases]
            hit = next((c.resolve() for c in candidates if c.is_file()), None)
            if hit is None:
                tried = " or ".join(str(c) for c in candidates)
                raise UserError(f"{config_path or 'config'}: data.{key} file {name} not found (looked for {tried}); "
                                f"give --data DIR with the raw files, or --builtin-data")
            files.append(hit)
        found.append(files)
    return found[0], found[1]


def to_yaml(cfg: dict) -> str:
    return yaml.safe_dump(cfg, sort_keys=False, default_flow_style=None)
