"""ONNX deployment of the spectral task: spectral/deploy.py, scripts/export_onnx.py --task spectral and
spectral/infer.py --engine onnxruntime.

Two small random-weight models with the full CNN backbone and circular (torus-wrap) padding, exported
by the CLI once per module with a dynamic batch, from the files users have: cnn_xattn from a CR_recon
checkpoint (saved on a "GPU") plus its YAML config, cnn_gru from one of our best.pt checkpoints
(map_to_pm1 false, and --dynamic-size). ONNX Runtime (CPU) is compared with the PyTorch graph and
with the transcription of the original (tests/spectral_ref/original.py) at batch 1 and 3; cnn_gru
also at two other sizes, one non-square; cnn_xattn at 64x256 (non-square with its 16 feature tokens).

Tolerance, both models: max |ONNX Runtime - PyTorch| <= 1e-4 * max(1, max |PyTorch|) (the export's
own check); measured here about 1e-7 for cnn_gru and 5e-7 for cnn_xattn.
"""
from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn as nn

from helpers import cli_error
from common.checkpoint import save_checkpoint
from common.io import UserError
from common.onnx import ExportSpec, export, write
from spectral.config import check_config
from spectral.data import physical_spectra, random_structures, wavelengths_nm
from spectral.deploy import SpectraGraph, graph_spec
from spectral.infer import load_model, main as infer_main
from spectral.model import build_model, wrap_pad
from scripts.export_onnx import main as export_main
from tests.spectral_ref import original
from tests.spectral_ref.checkpoints import original_checkpoint, save_claiming_cuda

# the TorchScript exporter warns about every GRU that a batch other than the traced one "can cause an
# error"; the cnn_gru file is run at batch 1 and 3 below (and by export_onnx.py before it writes)
pytestmark = [pytest.mark.filterwarnings("ignore:`torch.jit.trace` is deprecated")]   # the exporter's own tracer
REL_TOL = 1e-4
PARAMS = {
    "cnn_xattn": {"out_len": 20, "d_model": 64, "nhead": 4, "dec_layers": 2, "ff_mult": 2, "cnn_dropout": 0.05,
                  "tr_dropout": 0.1, "head_dropout": 0.2, "enforce_diag_sym": True, "use_circular_padding": True},
    "cnn_gru": {"out_len": 12, "d_model": 48, "gru_layers": 2, "cnn_dropout": 0.05, "head_dropout": 0.1,
                "use_circular_padding": True},
}
XATTN_YAML = """\
model:
  name: "cnn_xattn"
  params: {params}
data:
  map_to_pm1: true
loss:
  name: "weighted_smooth"
  params: {{lambda1: 0.2, lambda2: 0.1, channel_weights: [1.0, 0.5, 0.5, 2.0]}}
"""


pytestmark = pytest.mark.usefixtures("one_thread_for_module")


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    path = tmp_path_factory.mktemp("onnx_spectral")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def files(scratch):
    """model name -> (weights, config or None, exported .onnx, the original's model or None)."""
    out = {}
    ref, ckpt = original_checkpoint("cnn_xattn", PARAMS["cnn_xattn"], seed=1)
    weights, config = scratch / "cnn_xattn_best.pt", scratch / "xattn.yaml"
    save_claiming_cuda(ckpt, weights)
    config.write_text(XATTN_YAML.format(params=json.dumps(PARAMS["cnn_xattn"])))
    onnx_path = scratch / "xattn.onnx"
    export_main(["--task", "spectral", "--weights", str(weights), "--config", str(config), "--out", str(onnx_path),
                 "--dynamic-batch"])
    out["cnn_xattn"] = (weights, config, onnx_path, ref)

    torch.manual_seed(2)
    model = build_model("cnn_gru", **PARAMS["cnn_gru"])
    with torch.no_grad():
        model.spec_bias.normal_()                   # not zero, as after training
    cfg = check_config({"model": {"name": "cnn_gru", "params": PARAMS["cnn_gru"]}, "data": {"map_to_pm1": False}},
                       "test", training=False)
    weights = scratch / "gru" / "best.pt"
    save_checkpoint(weights, model=model, config={"task": "spectral", "model": "cnn_gru"},
                    extra={"spectral": {"config": cfg}})
    onnx_path = scratch / "gru.onnx"
    export_main(["--task", "spectral", "--weights", str(weights), "--out", str(onnx_path), "--dynamic-batch",
                 "--dynamic-size"])
    out["cnn_gru"] = (weights, None, onnx_path, None)
    return out


def structures(batch: int, size=(128, 128), seed: int = 0) -> torch.Tensor:
    if size == (128, 128):
        return torch.from_numpy(random_structures(batch, np.random.default_rng(seed))).float()
    return torch.randint(0, 2, (batch, 1, *size), generator=torch.Generator().manual_seed(seed)).float()


def ort_run(path, x: torch.Tensor) -> np.ndarray:
    """ONNX Runtime directly (not common.onnx), CPU provider."""
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]


def max_rel_diff(got: np.ndarray, ref: torch.Tensor) -> float:
    assert got.shape == tuple(ref.shape)
    return float(np.abs(got.astype(np.float64) - ref.double().numpy()).max()) / max(1.0, float(ref.abs().max()))


def metadata(path) -> dict:
    return {p.key: p.value for p in onnx.load(str(path)).metadata_props}


# ---------------------------------------------------------------- parity
@pytest.mark.parametrize("name", ["cnn_xattn", "cnn_gru"])
def test_export_parity_at_batch_1_and_3(files, name):
    weights, config, path, ref = files[name]
    net, cfg = load_model(weights, config)
    graph = SpectraGraph(net, cfg["data"]["map_to_pm1"]).eval()
    sizes = [(128, 128)] + ([(96, 160), (64, 64)] if name == "cnn_gru" else [])   # gru: --dynamic-size
    worst = 0.0
    for size in sizes:
        for batch in (1, 3):
            x = structures(batch, size, seed=batch)
            with torch.inference_mode():
                expected = graph(x)[0]
            got = ort_run(path, x)
            worst = max(worst, max_rel_diff(got, expected))
            if ref is not None and size == (128, 128):          # the original, fed structure*2-1 by hand
                with torch.no_grad():
                    assert max_rel_diff(got, ref(x * 2 - 1)) <= REL_TOL
    print(f"{name}: max |ONNX Runtime - PyTorch| / max(1, max |PyTorch|) = {worst:.2e}")
    assert worst <= REL_TOL, f"{name}: max |ORT - torch| {worst:.3g}"
    if name == "cnn_xattn":                         # a fixed-size graph: another size is refused by ORT
        with pytest.raises(Exception):
            ort_run(path, structures(1, (96, 96)))


def test_metadata_documents_the_contract(files):
    _, _, xattn, _ = files["cnn_xattn"]
    meta = metadata(xattn)
    assert meta["task"] == "spectral" and meta["model"] == "cnn_xattn"
    assert json.loads(meta["model_params"]) == {**PARAMS["cnn_xattn"]}
    assert json.loads(meta["map_to_pm1"]) is True and "structure*2-1" in meta["inputs"]
    assert json.loads(meta["image_size"]) == [128, 128] and json.loads(meta["out_len"]) == 20
    assert json.loads(meta["wavelengths_nm"]) == wavelengths_nm(20).tolist()
    assert json.loads(meta["cell_layout"]) == [["R", "G"], ["G", "B"]]
    assert json.loads(meta["loss"]) == {"name": "weighted_smooth", "params": {
        "lambda1": 0.2, "lambda2": 0.1, "channel_weights": [1.0, 0.5, 0.5, 2.0]}}
    sess = ort.InferenceSession(str(xattn), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["structure"] and [o.name for o in sess.get_outputs()] == ["spectra"]
    assert sess.get_outputs()[0].shape[1:] == [2, 2, 20]
    gru = metadata(files["cnn_gru"][2])
    assert json.loads(gru["map_to_pm1"]) is False and "as is" in gru["inputs"]
    gru_in = ort.InferenceSession(str(files["cnn_gru"][2]), providers=["CPUExecutionProvider"]).get_inputs()[0]
    assert gru_in.shape == ["batch", 1, "height", "width"]


@pytest.fixture(scope="module")
def xattn_wide(scratch):
    """cnn_xattn exported at 64x256: 2x8 = 16 feature tokens, as many as its position embeddings (no
    enforce_diag_sym, which needs a square; zero padding)."""
    params = {**PARAMS["cnn_xattn"], "enforce_diag_sym": False, "use_circular_padding": False}
    cfg = check_config({"model": {"name": "cnn_xattn", "params": params}}, "test", training=False)
    torch.manual_seed(3)
    spec = graph_spec(build_model("cnn_xattn", **params).eval(), cfg, (64, 256), Path("random.pt"))
    path = scratch / "xattn_64x256.onnx"
    write(export(spec, batch=2, dynamic_batch=True), path)
    return spec, path


def test_xattn_exports_at_a_non_square_size(xattn_wide):
    spec, path = xattn_wide
    for batch in (1, 3):
        x = structures(batch, (64, 256), seed=batch)
        with torch.inference_mode():
            expected = spec.module(x)[0]
        assert max_rel_diff(ort_run(path, x), expected) <= REL_TOL
    cfg = check_config({"model": {"name": "cnn_xattn", "params": PARAMS["cnn_xattn"]}}, "test", training=False)
    with pytest.raises(UserError, match=r"ceil\(H/32\) \* ceil\(W/32\) must be 16 .* not 9"):
        graph_spec(spec.module.model, cfg, (96, 96), Path("w.pt"))
    with pytest.raises(UserError, match="enforce_diag_sym"):
        graph_spec(spec.module.model, cfg, (64, 256), Path("w.pt"))


def test_wrap_pad_is_plain_ops_when_traced():
    """The periodic padding's custom backward (an autograd.Function) is for training only: without a
    gradient it is a plain function, and a traced graph holds one circular pad, the same numbers as
    CR_recon's two concatenations."""
    x = torch.randn(2, 3, 9, 7)
    traced = torch.jit.trace(lambda t: wrap_pad(t, 2), (x,))
    kinds = {n.kind() for n in traced.graph.nodes()}
    assert "prim::PythonOp" not in kinds
    y = torch.randn(1, 3, 6, 5)
    assert torch.equal(traced(y), original.wrap_pad(y, 2))
    assert wrap_pad(y, 1).grad_fn is None
    assert type(wrap_pad(y.requires_grad_(), 1).grad_fn).__name__ == "_WrapPadBackward"


# ---------------------------------------------------------------- infer.py, both engines
def read_csv(path: Path) -> list[list[str]]:
    with open(path, newline="") as f:
        return list(csv.reader(f))


@pytest.mark.parametrize("name", ["cnn_xattn", "cnn_gru"])
def test_infer_engines_agree(files, scratch, name, capsys):
    weights, config, path, _ = files[name]
    s = random_structures(4, np.random.default_rng(3))
    np.save(scratch / "S.npy", s)
    spectra = physical_spectra(s)
    spectra[2] = 0                                  # never simulated: skipped by --evaluate
    np.save(scratch / "gt.npy", spectra)
    outs = {}
    for engine in ("torch", "onnxruntime"):
        d = scratch / f"{name}_{engine}"
        given = ["--config", config] if config else []          # the ONNX engine checks it against the file
        model = ["--weights", weights, *given] if engine == "torch" else \
            ["--engine", engine, "--onnx", path, "--providers", "dml,cuda,cpu", *given]
        infer_main([str(a) for a in model + ["--structs", scratch / "S.npy", "--out", d / "P.npy", "--csv",
                                             d / "P.csv", "--plot", d / "plots", "--plot-max", "1", "--evaluate",
                                             scratch / "gt.npy", "--batch-size", "3", "--threads", "1"]])
        outs[engine] = d
    printed = capsys.readouterr().out
    assert "onnxruntime 1." in printed and "CPUExecutionProvider" in printed and f"with {name} (onnxruntime)" in printed
    a, b = (np.load(outs[e] / "P.npy") for e in ("torch", "onnxruntime"))
    assert a.dtype == b.dtype == np.float32 and a.shape == b.shape == (4, 2, 2, PARAMS[name]["out_len"])
    assert np.abs(a - b).max() <= REL_TOL * max(1.0, float(np.abs(a).max()))
    ca, cb = (read_csv(outs[e] / "P.csv") for e in ("torch", "onnxruntime"))
    assert ca[0] == cb[0] and [r[:2] for r in ca] == [r[:2] for r in cb] and len(ca) == 1 + 4 * 4
    np.testing.assert_allclose(np.array([r[2:] for r in cb[1:]], float), np.array([r[2:] for r in ca[1:]], float),
                               rtol=2e-5, atol=1e-6)
    assert [p.name for p in (outs["onnxruntime"] / "plots").iterdir()] == ["spectra_00000.png"]
    ma, mb = (json.loads((outs[e] / "P.metrics.json").read_text()) for e in ("torch", "onnxruntime"))
    assert ma.keys() == mb.keys() and ma["loss_name"] == mb["loss_name"] and mb["evaluated"] == 3
    assert mb["loss_name"] == ("weighted_smooth" if name == "cnn_xattn" else "mse_pearson")   # the file's loss
    assert mb["weights"] == str(path)
    for k in ("loss", "mse", "pearson_r"):
        assert mb[k] == pytest.approx(ma[k], rel=1e-4, abs=1e-7), k


# ---------------------------------------------------------------- refusals
def other_task_file(scratch) -> Path:
    """A file exported by common.onnx for another task (a one-layer graph carrying battery_ct metadata:
    infer.py refuses it by its metadata, whatever the graph)."""
    path = scratch / "battery.onnx"
    if not path.exists():
        spec = ExportSpec(nn.Sequential(nn.Flatten(1)).eval(), lambda b, g: (torch.rand(b, 1, 128, 128, generator=g),),
                          ["image"], ["flat"], {"task": "battery_ct", "model": "resnet18", "image_size": [128, 128]})
        write(export(spec, batch=1, dynamic_batch=True), path)
    return path


def test_infer_refuses_wrong_files(files, xattn_wide, scratch, capsys):
    _, xcfg, xattn, _ = files["cnn_xattn"]
    never = scratch / "never.npy"
    np.save(scratch / "S2.npy", random_structures(2, np.random.default_rng(0)))

    def err(*args):                            # one line, exit status 2, nothing written
        message = cli_error(infer_main, "--structs", scratch / "S2.npy", "--out", never, *args, capsys=capsys)
        assert not never.exists()
        return message

    assert "not a spectral model (it was exported for battery_ct)" in err("--onnx", other_task_file(scratch))
    gru_cfg = scratch / "gru.yaml"
    gru_cfg.write_text(f"model:\n  name: cnn_gru\n  params: {json.dumps(PARAMS['cnn_gru'])}\n")
    message = err("--onnx", xattn, "--config", gru_cfg)
    assert "holds cnn_xattn" in message and "asks for cnn_gru" in message
    pm1_off = scratch / "xattn_raw.yaml"
    pm1_off.write_text(xcfg.read_text().replace("map_to_pm1: true", "map_to_pm1: false"))
    assert "maps structures with map_to_pm1 True" in err("--onnx", xattn, "--config", pm1_off)
    _, wide = xattn_wide
    assert "takes 64x256 structures; infer.py reads 128x128" in err("--onnx", wide)
    assert "--onnx needs --engine onnxruntime" in err("--engine", "torch", "--onnx", xattn)
    assert "not --weights" in err("--onnx", xattn, "--weights", files["cnn_gru"][0])
    assert "give --weights" in err()
    assert "none of them is available" in err("--onnx", xattn, "--providers", "DmlExecutionProvider")


def test_export_refuses_and_writes_nothing(files, scratch):
    xw, xcfg, _, _ = files["cnn_xattn"]
    gw = files["cnn_gru"][0]
    out = scratch / "refused.onnx"
    cases = [
        (["--weights", gw, "--model", "cnn_xattn"], "holds a cnn_gru model, not --model cnn_xattn"),
        (["--weights", gw, "--model", "unet"], "a spectral model is one of cnn_xattn, cnn_gru"),
        (["--weights", xw], "cnn_xattn weights without a config of this project; give --config"),
        (["--weights", xw, "--config", xcfg, "--dynamic-size"], "exported for one input size only"),
        (["--weights", xw, "--config", xcfg, "--size", "96", "96"], "must be 16"),
    ]
    for args, message in cases:
        with pytest.raises(UserError, match=message.replace("(", r"\(")):
            export_main([str(a) for a in ["--task", "spectral", "--out", out, *args]])
    with pytest.raises(UserError, match="--config: --task crbl reads its model from --weights"):
        export_main([str(a) for a in ["--task", "crbl", "--weights", gw, "--config", xcfg, "--out", out]])
    assert not out.exists() and not list(scratch.glob(".refused.onnx.*"))
