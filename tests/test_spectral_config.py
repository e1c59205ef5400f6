"""spectral/config.py: CR_recon's YAML schema, the shipped configs, one-line errors, data paths."""
from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from common.io import UserError
from spectral.config import CONFIG_DIR, load_config, resolve_data_files

# CR_recon's configs/default_no_dashboard.yaml as its users have it (comments translated)
CR_RECON_NO_DASHBOARD = """\
# Test Config: MetaSpec_CNNXAttn + MSE_Pearson Loss (5 epoch, Dashboard OFF)
seed: 42

data:
  struct_files:
    - "../data_CR-main/binary_dataset_128_0.npy"
    - "../data_CR-main/binary_dataset_128_1.npy"
  spectra_files:
    - "../data_CR-main/spectra_latest_0.npy"
    - "../data_CR-main/spectra_latest_1.npy"
  out_len: 30
  map_to_pm1: true
  augment_180: true
  train_ratio: 0.95
  batch_size: 64
  num_workers: 0

model:
  name: "cnn_xattn"
  params:
    out_len: 30
    d_model: 256
    nhead: 8
    dec_layers: 4
    cnn_dropout: 0.05
    tr_dropout: 0.1
    head_dropout: 0.2
    use_circular_padding: true

loss:
  name: "mse_pearson"
  params:
    w_mse: 1.0
    w_corr: 0.2

training:
  epochs: 5
  lr: 0.001
  weight_decay: 0.005
  grad_clip: 1.0
  use_amp: true
  warmup_ratio: 0.05
  save_every: 1

dashboard:
  enabled: false
  port: 8501

output:
  dir: "outputs/"
  log_file: "train_log.txt"
"""


def write(tmp_path: Path, text: str, name: str = "cfg.yaml") -> Path:
    p = tmp_path / name
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(textwrap.dedent(text))
    return p


def test_shipped_configs_are_crrecons():
    default = load_config(CONFIG_DIR / "default.yaml")
    assert default["model"] == {"name": "cnn_xattn", "params": {
        "out_len": 30, "d_model": 256, "nhead": 8, "dec_layers": 4, "ff_mult": 4, "cnn_dropout": 0.05,
        "tr_dropout": 0.1, "head_dropout": 0.2, "enforce_diag_sym": False, "use_circular_padding": True}}
    assert default["loss"] == {"name": "mse_pearson", "params": {"w_mse": 0.5, "w_corr": 0.5}}
    assert default["training"]["lr"] == 0.003 and default["data"]["batch_size"] == 400
    gru = load_config(CONFIG_DIR / "cnn_gru.yaml")
    assert gru["model"]["name"] == "cnn_gru" and gru["model"]["params"]["gru_layers"] == 2
    assert gru["loss"]["params"]["channel_weights"] == [1.0, 0.8, 0.8, 1.2]
    weighted = load_config(CONFIG_DIR / "weighted_smooth.yaml")
    assert weighted["model"]["name"] == "cnn_xattn" and weighted["loss"]["name"] == "weighted_smooth"


def test_a_crrecon_config_loads_unchanged(tmp_path):
    cfg = load_config(write(tmp_path, CR_RECON_NO_DASHBOARD))
    assert cfg["loss"]["params"] == {"w_mse": 1.0, "w_corr": 0.2}
    assert cfg["output"]["dir"] == "outputs/" and cfg["dashboard"]["enabled"] is False


def test_missing_sections_take_crrecons_defaults(tmp_path):
    cfg = load_config(write(tmp_path, "model:\n  name: cnn_gru\n"))
    assert cfg["model"]["params"]["d_model"] == 128 and cfg["data"]["out_len"] == 30
    assert cfg["loss"] == {"name": "mse_pearson", "params": {"w_mse": 1.0, "w_corr": 0.2}}


@pytest.mark.parametrize("text,message", [
    ("training:\n  lrr: 0.1\n", r"cfg.yaml: unknown key 'training.lrr' \(valid in training: epochs, lr,"),
    ("trainig:\n  lr: 0.1\n", r"cfg.yaml: unknown key 'trainig'"),
    ("training:\n  lr: fast\n", r"cfg.yaml: training.lr must be a number in \(0.0, 10.0\] \(got 'fast'\)"),
    ("training:\n  epochs: 2.5\n", r"training.epochs must be an integer in \[1, 100000\] \(got 2.5\)"),
    ("data:\n  augment_180: 'yes'\n", r"data.augment_180 must be true or false"),
    ("data:\n  train_ratio: 1.0\n", r"data.train_ratio must be a number in \(0.0, 1.0\)"),
    ("data:\n  struct_files: a.npy\n", r"data.struct_files must be a list of file paths"),
    ("model:\n  name: cnn_gru\n  params:\n    nhead: 8\n", r"cfg.yaml: model.params.nhead: cnn_gru has no parameter 'nhead'"),
    ("model:\n  name: transformer\n", r"cfg.yaml: model.name 'transformer': unknown model"),
    ("loss:\n  name: weighted_smooth\n  params:\n    w_mse: 1\n", r"loss.params.w_mse: weighted_smooth has no parameter"),
    ("loss:\n  name: weighted_smooth\n  params:\n    channel_weights: {R: 1, G: 1, B: 1}\n",
     r"loss.params.channel_weights: a mapping is not accepted"),
    ("model:\n  params:\n    out_len: 20\n", r"model.params.out_len 20 differs from data.out_len 30"),
    ("seed: [1]\n", r"seed must be an integer"),
    ("- a\n- b\n", r"expected a YAML mapping at the top level"),
    ("training: {lr: 0.1\n", r"cfg.yaml: not valid YAML at line"),
])
def test_bad_configs_are_one_line_errors_naming_the_key(tmp_path, text, message):
    with pytest.raises(UserError, match=message) as e:
        load_config(write(tmp_path, text))
    assert "\n" not in str(e.value)


def test_numbers_written_with_an_exponent_are_numbers(tmp_path):
    cfg = load_config(write(tmp_path, "training:\n  lr: 1e-3\n  weight_decay: 5e-3\n"))   # YAML 1.1 reads text
    assert cfg["training"]["lr"] == 0.001 and cfg["training"]["weight_decay"] == 0.005


def test_data_paths_next_to_the_config_or_in_the_crrecon_layout(tmp_path):
    """CR_recon keeps configs in CR_recon/configs/ and resolves ../data_CR-main/... against CR_recon/;
    a path next to the config is taken first."""
    cfg_path = write(tmp_path, "data:\n  struct_files: [../d/s.npy]\n  spectra_files: [../d/t.npy]\n",
                     "CR_recon/configs/x.yaml")
    cfg = load_config(cfg_path)
    with pytest.raises(UserError, match="data.struct_files file ../d/s.npy not found .*--data DIR"):
        resolve_data_files(cfg, cfg_path)
    for folder in (tmp_path / "d", tmp_path / "CR_recon" / "d"):
        folder.mkdir()
        for n in ("s.npy", "t.npy"):
            (folder / n).write_bytes(b"")
        s, t = resolve_data_files(cfg, cfg_path)
        assert s == [(folder / "s.npy").resolve()] and t == [(folder / "t.npy").resolve()]
