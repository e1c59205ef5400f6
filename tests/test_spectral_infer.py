"""spectral/infer.py on CR_recon's own checkpoints (written by the transcribed original classes and
its Trainer's checkpoint dict, storages claiming cuda:0), exactly as the acceptance check runs it,
plus PNG input, CSV, plots, --evaluate and bad input."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import helpers

from spectral.data import physical_spectra, random_structures, sample_indices, to_cells
from spectral.infer import main as infer_main
from tests.spectral_ref import original
from tests.spectral_ref.checkpoints import original_checkpoint, save_claiming_cuda

REPO = Path(__file__).resolve().parents[1]

MODELS = {   # (name, model.params as a CR_recon config writes them)
    "xattn_default": ("cnn_xattn", {"out_len": 30, "d_model": 256, "nhead": 8, "dec_layers": 4, "cnn_dropout": 0.05,
                                    "tr_dropout": 0.1, "head_dropout": 0.2, "use_circular_padding": True}),
    "xattn_small_zero": ("cnn_xattn", {"out_len": 20, "d_model": 64, "nhead": 4, "dec_layers": 2, "ff_mult": 2,
                                       "cnn_dropout": 0.0, "tr_dropout": 0.0, "head_dropout": 0.0,
                                       "enforce_diag_sym": True, "use_circular_padding": False}),
    "gru_default_zero": ("cnn_gru", {"out_len": 30, "d_model": 128, "gru_layers": 2, "cnn_dropout": 0.05,
                                     "head_dropout": 0.1, "use_circular_padding": False}),
    "gru_small": ("cnn_gru", {"out_len": 12, "d_model": 48, "gru_layers": 3, "cnn_dropout": 0.1,
                              "head_dropout": 0.0, "use_circular_padding": True}),
}


def crrecon_yaml(name: str, params: dict, loss: str = "mse_pearson", data_out_len: int | None = None) -> str:
    """A config in CR_recon's schema; its data paths do not exist here (inference does not need them).
    data.out_len is a key of its own in CR_recon, which users do not always keep equal to the model's."""
    lines = ["seed: 42", "data:", "  struct_files: ['../data_CR-main/binary_dataset_128_0.npy']",
             "  spectra_files: ['../data_CR-main/spectra_latest_0.npy']", f"  out_len: {data_out_len or params['out_len']}",
             "  map_to_pm1: true", "  augment_180: true", "  train_ratio: 0.95", "  batch_size: 400", "  num_workers: 0",
             "model:", f"  name: \"{name}\"", "  params:"]
    lines += [f"    {k}: {str(v).lower() if isinstance(v, bool) else v}" for k, v in params.items()]
    lines += ["loss:", f"  name: \"{loss}\"", "  params:",
              *(["    w_mse: 0.5", "    w_corr: 0.5"] if loss == "mse_pearson" else ["    lambda1: 0.1", "    lambda2: 0.05"]),
              "training:", "  epochs: 300", "  lr: 0.003", "  weight_decay: 0.005", "  grad_clip: 1.0", "  use_amp: true",
              "  warmup_ratio: 0.05", "  save_every: 10", "dashboard:", "  enabled: true", "  port: 8501",
              "output:", "  dir: \"outputs/\"", "  log_file: \"train_log.txt\""]
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def originals(tmp_path_factory):
    """Per model: (config, checkpoint, reference model in eval mode)."""
    root = tmp_path_factory.mktemp("crrecon")
    out = {}
    for key, (name, params) in MODELS.items():
        model, ckpt = original_checkpoint(name, params, seed=len(out))
        cfg = root / f"{key}.yaml"
        cfg.write_text(crrecon_yaml(name, params, data_out_len=30 if key == "gru_small" else None))
        path = root / key / f"{name}_best.pt"
        path.parent.mkdir()
        save_claiming_cuda(ckpt, path)
        out[key] = (cfg, path, model)
    return out


@pytest.fixture(scope="module")
def structs(tmp_path_factory):
    root = tmp_path_factory.mktemp("structs")
    s = random_structures(5, np.random.default_rng(7))
    np.save(root / "S.npy", s)
    return root / "S.npy", s


def call(*argv):
    return helpers.call(infer_main, *argv)


def cli_error(capsys, *argv) -> str:
    return helpers.cli_error(infer_main, *argv, capsys=capsys)


def reference(model, s: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(s.astype(np.float32)) * 2 - 1).numpy()


def test_the_checkpoints_claim_a_gpu(originals):
    _, path, _ = originals["gru_small"]
    with pytest.raises(RuntimeError, match="CUDA"):
        torch.load(path, weights_only=True)
    ckpt = torch.load(path, weights_only=True, map_location="cpu")
    assert set(ckpt) == {"model", "optimizer", "epoch", "val_loss", "best_val_loss"}


def test_acceptance_command_line(originals, structs, tmp_path):
    """Exactly as the acceptance check runs it: a CR_recon config, the original's checkpoint."""
    cfg, weights, model = originals["xattn_default"]
    s_path, s = structs
    out = tmp_path / "P.npy"
    res = subprocess.run([sys.executable, str(REPO / "spectral" / "infer.py"), "--config", str(cfg), "--weights",
                          str(weights), "--structs", str(s_path), "--out", str(out)], capture_output=True, text=True,
                         cwd=tmp_path, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr
    pred = np.load(out)
    assert pred.dtype == np.float32 and pred.shape == (5, 2, 2, 30)
    assert np.abs(pred - reference(model, s)).max() <= 1e-5


def test_two_cpu_streams_give_the_same_spectra(originals, structs, tmp_path):
    """--threads 2 on the CPU: the two halves of each batch run at once in two threads (one intra-op
    thread each); the spectra equal the reference and the one-stream run's."""
    cfg, weights, model = originals["xattn_default"]
    s_path, s = structs
    outs = {}
    for threads in (1, 2):
        out = tmp_path / f"P{threads}.npy"
        res = subprocess.run([sys.executable, str(REPO / "spectral" / "infer.py"), "--config", str(cfg), "--weights",
                              str(weights), "--structs", str(s_path), "--out", str(out), "--threads", str(threads)],
                             capture_output=True, text=True, cwd=tmp_path, timeout=300)
        assert res.returncode == 0, res.stderr
        assert ("CPU: 2 streams" in res.stdout) == (threads == 2), res.stdout
        outs[threads] = np.load(out)
    assert np.abs(outs[2] - reference(model, s)).max() <= 1e-5
    assert np.abs(outs[2] - outs[1]).max() <= 1e-6

    # a batch of several micro-batches per stream, channels_last, as infer.py runs it
    from spectral.deploy import CPU_CHUNK, SpectraGraph
    from spectral.infer import load_model
    ours, _ = load_model(weights, cfg)
    big = random_structures(2 * CPU_CHUNK + 5, np.random.default_rng(3))
    x = torch.from_numpy(big.astype(np.float32)).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        pred = SpectraGraph(ours.to(memory_format=torch.channels_last), True, streams=2).eval()(x)[0].numpy()
    assert np.abs(pred - reference(model, big)).max() <= 1e-5


def test_amp_bf16_in_both_streams(originals, structs, tmp_path, capsys):
    """--amp bf16 on the CPU: both halves of the batch (two threads; autocast is per thread) run in
    bfloat16, close to the original model under the same autocast; an exported graph refuses --amp."""
    cfg, weights, model = originals["xattn_default"]
    s_path, s = structs
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected = model(torch.from_numpy(s.astype(np.float32)) * 2 - 1).float().numpy()
    exact = reference(model, s)
    res = subprocess.run([sys.executable, str(REPO / "spectral" / "infer.py"), "--config", str(cfg), "--weights",
                          str(weights), "--structs", str(s_path), "--out", str(tmp_path / "P.npy"), "--threads", "2",
                          "--amp", "bf16"], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "CPU: 2 streams" in res.stdout and "autocast bfloat16" in res.stdout, res.stdout
    pred = np.load(tmp_path / "P.npy")
    scale = np.abs(exact).max()
    assert np.abs(pred - expected).max() <= 5e-2 * scale   # two bf16 roundings of 4 decoder layers
    for half in (slice(0, 3), slice(3, 5)):      # each stream's rows moved off the fp32 numbers
        assert np.abs(pred[half] - exact[half]).max() > 1e-4 * scale
    assert "PyTorch engine only" in cli_error(capsys, "--engine", "onnxruntime", "--onnx", tmp_path / "m.onnx",
                                              "--structs", s_path, "--amp", "bf16")


def test_on_batch_halves_runs_the_second_half_in_the_worker():
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from common.device import on_batch_halves

    seen = []

    def fn(x):
        seen.append((len(x), threading.current_thread() is threading.main_thread(), torch.is_inference_mode_enabled()))
        return x * 2

    x = torch.arange(5.0)[:, None]
    with ThreadPoolExecutor(1) as pool, torch.inference_mode():
        y = on_batch_halves(fn, x, pool)
        assert torch.equal(y, x * 2)
        assert sorted(seen) == [(2, False, True), (3, True, True)]
        seen.clear()
        assert torch.equal(on_batch_halves(fn, x[:1], pool), x[:1] * 2) and seen == [(1, True, True)]

    from spectral.deploy import SpectraGraph

    class Recorder(torch.nn.Module):
        def forward(self, x):
            return fn(x)

    seen.clear()
    graph = SpectraGraph(Recorder(), map_to_pm1=True, streams=2).eval()
    with torch.inference_mode():
        assert torch.equal(graph(x)[0], (x * 2 - 1) * 2)
    assert sorted(seen) == [(2, False, True), (3, True, True)]
    seen.clear()
    with torch.no_grad():                       # not in inference mode: one stream, as before
        SpectraGraph(Recorder(), map_to_pm1=True, streams=1).eval()(x)
    assert seen == [(5, True, False)]

    # a large batch: micro-batches of CPU_CHUNK in each stream, concatenated in order
    from spectral.deploy import CPU_CHUNK
    big = torch.arange(2.0 * CPU_CHUNK + 8)[:, None]
    seen.clear()
    with torch.inference_mode():
        assert torch.equal(SpectraGraph(Recorder(), map_to_pm1=False, streams=1).eval()(big)[0], big * 2)
        assert [n for n, _, _ in seen] == [CPU_CHUNK, CPU_CHUNK, 8]
        seen.clear()
        assert torch.equal(graph(big)[0], (big * 2 - 1) * 2)
    half = CPU_CHUNK + 4
    assert sorted(seen) == sorted([(CPU_CHUNK, True, True), (half - CPU_CHUNK, True, True),
                                   (CPU_CHUNK, False, True), (half - CPU_CHUNK, False, True)])


@pytest.mark.parametrize("key", ["xattn_small_zero", "gru_default_zero", "gru_small"])
def test_other_models_paddings_and_sizes(originals, structs, tmp_path, key):
    cfg, weights, model = originals[key]
    s_path, s = structs
    pred, _ = call("--config", cfg, "--weights", weights, "--structs", s_path, "--out", tmp_path / "P.npy")
    assert pred.shape == (5, 2, 2, MODELS[key][1]["out_len"])
    assert np.abs(np.load(tmp_path / "P.npy") - reference(model, s)).max() <= 1e-5


def test_png_folder_csv_plots_and_evaluate(originals, tmp_path):
    cfg, weights, model = originals["gru_small"]
    s = random_structures(3, np.random.default_rng(1))
    folder = tmp_path / "pngs"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(s[i, 0] * 255).save(folder / f"cell_{i}.png")
    spectra = physical_spectra(s)
    spectra[1] = 0                                          # a row never simulated: skipped
    np.save(tmp_path / "gt.npy", spectra)
    pred, text = call("--config", cfg, "--weights", weights, "--structs", folder, "--out", tmp_path / "P.npy",
                      "--csv", tmp_path / "P.csv", "--plot", tmp_path / "plots", "--evaluate", tmp_path / "gt.npy")
    assert np.abs(pred - reference(model, s)).max() <= 1e-5
    rows = (tmp_path / "P.csv").read_text().splitlines()
    assert rows[0].split(",")[:4] == ["structure", "cell", "400nm", "427nm"]   # 12 points: 0, 27, 54, ...
    assert rows[1].split(",")[:2] == ["cell_0.png", "R"] and rows[4].split(",")[:2] == ["cell_0.png", "B"]
    assert np.allclose([float(v) for v in rows[4].split(",")[2:]], pred[0, 1, 1], rtol=1e-5)
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == [f"spectra_0000{i}.png" for i in range(3)]
    metrics = json.loads((tmp_path / "P.metrics.json").read_text())
    keep = [0, 2]
    tgt = to_cells(-spectra[keep][:, :, sample_indices(12)])
    loss = original.get_loss("mse_pearson", w_mse=0.5, w_corr=0.5)(torch.from_numpy(pred[keep]), torch.from_numpy(tgt))
    assert metrics["evaluated"] == 2 and metrics["skipped_not_simulated"] == 1
    assert math.isclose(metrics["loss"], float(loss), rel_tol=1e-6)
    assert math.isclose(metrics["mse"], float(((pred[keep] - tgt) ** 2).mean()), rel_tol=1e-5)
    assert "Infinity" not in (tmp_path / "P.metrics.json").read_text()


def test_bad_input_is_one_line_and_overwrites_nothing(originals, structs, tmp_path, capsys):
    s_path, s = structs
    xcfg, xw, _ = originals["xattn_small_zero"]
    gcfg, gw, _ = originals["gru_small"]
    out = tmp_path / "P.npy"
    out.write_bytes(b"keep me")
    err = cli_error(capsys, "--config", xcfg, "--weights", xw, "--structs", s_path, "--out", out)
    assert "P.npy already exists" in err and out.read_bytes() == b"keep me"
    new = tmp_path / "new.npy"
    err = cli_error(capsys, "--config", xcfg, "--weights", gw, "--structs", s_path, "--out", new)
    assert "holds cnn_gru weights, but the config asks for cnn_xattn" in err and not new.exists()
    cfg40 = tmp_path / "gru40.yaml"
    cfg40.write_text(crrecon_yaml("cnn_gru", {**MODELS["gru_small"][1], "out_len": 40}))
    err = cli_error(capsys, "--config", cfg40, "--weights", gw, "--structs", s_path, "--out", new)
    assert "with out_len 12, but the config asks for cnn_gru (out_len 40" in err
    err = cli_error(capsys, "--weights", gw, "--structs", s_path, "--out", new)
    assert "cnn_gru weights without a config of this project; give --config" in err
    bad = s.copy()
    bad[2, 0, 5, 5] = 2
    np.save(tmp_path / "bad.npy", bad)
    err = cli_error(capsys, "--config", gcfg, "--weights", gw, "--structs", tmp_path / "bad.npy", "--out", new)
    assert "bad.npy: structure 2 holds the value 2" in err
    np.save(tmp_path / "shape.npy", s[:, :, :64])
    err = cli_error(capsys, "--config", gcfg, "--weights", gw, "--structs", tmp_path / "shape.npy", "--out", new)
    assert "must have shape (N,1,128,128) or (N,128,128), found (5, 1, 64, 128)" in err
    grey = tmp_path / "grey"
    grey.mkdir()
    Image.fromarray((np.arange(128 * 128) % 200).astype(np.uint8).reshape(128, 128)).save(grey / "a.png")
    err = cli_error(capsys, "--config", gcfg, "--weights", gw, "--structs", grey, "--out", new)
    assert "a.png: not a black-and-white structure" in err
    (tmp_path / "junk.pt").write_bytes(b"junk")
    err = cli_error(capsys, "--config", gcfg, "--weights", tmp_path / "junk.pt", "--structs", s_path, "--out", new)
    assert "junk.pt: not a PyTorch checkpoint" in err
    assert not new.exists()


def test_plots_have_labels_units_and_the_ground_truth_when_known(originals, tmp_path, monkeypatch):
    """--plot figures: axis labels with units, the truth dashed where --evaluate or CR_recon's sibling
    spectra file gives it, and a line saying when --plot-max stops before the last structure."""
    import spectral.infer as infer

    figures = []
    real = infer.spectra_plot
    monkeypatch.setattr(infer, "spectra_plot", lambda *a, **k: figures.append(real(*a, **k)) or figures[-1])
    cfg, weights, _ = originals["gru_small"]
    s = random_structures(3, np.random.default_rng(2))
    spectra = physical_spectra(s)
    spectra[1] = 0                                          # never simulated: no truth for structure 1
    np.save(tmp_path / "binary_dataset_128_0.npy", s)       # CR_recon's layout: the truth sits next to it
    np.save(tmp_path / "spectra_latest_0.npy", spectra)
    _, text = call("--config", cfg, "--weights", weights, "--structs", tmp_path / "binary_dataset_128_0.npy",
                   "--out", tmp_path / "P.npy", "--plot", tmp_path / "plots", "--plot-max", 2)
    assert "2 plot(s) written to" in text and "the first 2 of 3: --plot-max 3 for all" in text
    assert f"ground truth (dashed) from {tmp_path / 'spectra_latest_0.npy'}" in text
    assert len(figures) == 2
    for fig, with_truth in zip(figures, (True, False)):
        ax = fig.axes[1]
        assert ax.get_xlabel() == "wavelength (nm)" and "response" in ax.get_ylabel()
        styles = [ln.get_linestyle() for ln in ax.get_lines()]
        assert styles.count("-") == 3 and styles.count("--") == (3 if with_truth else 0)
        x = ax.get_lines()[0].get_xdata()
        assert x[0] == 400 and x[-1] == 700
    truth_r = [ln for ln in figures[0].axes[1].get_lines() if ln.get_label() == "R truth"][0].get_ydata()
    assert np.allclose(truth_r, to_cells(-spectra[:1][:, :, sample_indices(12)])[0, 0, 0])
    assert Image.open(tmp_path / "plots" / "spectra_00000.png").size == (1000, 420)
