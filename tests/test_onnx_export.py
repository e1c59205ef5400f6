"""ONNX deployment: scripts/export_onnx.py, common/onnx.py and infer.py --engine onnxruntime.

Every model is built with random weights (BatchNorm statistics randomised too, so that folding them
matters), exported once per module with a dynamic batch, run by ONNX Runtime on the CPU at batch 1
and 3 and compared with the same graph in PyTorch. Battery models are exported at 64x96 (non-square;
the ones infer.py runs in the CLI tests at 64x64, as infer.py feeds square images), CRBL at its
deployed 128x128 and its backbone at an odd non-square size.

Tolerances (max |ONNX Runtime - PyTorch|): probabilities 1e-5 absolute (CRBL: 1e-6, measured
~6e-8); scores and logits 1e-4 relative to their largest magnitude (measured <= 2e-6); predicted
labels equal.
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
import torch.nn.functional as F

from helpers import cli_error
from battery_ct.deploy import BatteryGraph, graph_spec, names
from battery_ct.model import MODEL_NAMES, _adaptive_avg_pool_export, build_model
from battery_ct.train import normalization
from common.io import UserError
from common.onnx import ExportSpec, OrtModel, compare, export, parse_providers, session
from crbl.deploy import CRBLProbability
from crbl.model import CRBL, EfficientNetB0
from battery_ct.infer import main as battery_infer
from crbl.infer import main as crbl_infer
from scripts.export_onnx import main as export_main

PROB_TOL = 1e-5
REL_TOL = 1e-4
SIZE = (64, 96)


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    path = tmp_path_factory.mktemp("onnx")
    yield path
    shutil.rmtree(path, ignore_errors=True)          # state_dicts and .onnx files of up to 160 MB


def randomize_bn(model: nn.Module, seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            m.running_mean.copy_(0.1 * torch.randn(n, generator=g))
            m.running_var.copy_(0.5 + torch.rand(n, generator=g))
            m.weight.data.copy_(1 + 0.1 * torch.randn(n, generator=g))
            m.bias.data.copy_(0.1 * torch.randn(n, generator=g))
    return model.eval()


def battery_net(name: str) -> nn.Module:
    torch.manual_seed(MODEL_NAMES.index(name))
    return randomize_bn(build_model(name), MODEL_NAMES.index(name))


def ort_outputs(data: bytes | Path, inputs) -> list[np.ndarray]:
    """ONNX Runtime directly (not common.onnx), CPU provider."""
    sess = ort.InferenceSession(data if isinstance(data, bytes) else str(data), providers=["CPUExecutionProvider"])
    return sess.run(None, {i.name: t.numpy() for i, t in zip(sess.get_inputs(), inputs)})


def assert_parity(graph: nn.Module, data: bytes | Path, inputs, output_names) -> dict[str, float]:
    with torch.inference_mode():
        ref = graph(*inputs)
    got = ort_outputs(data, inputs)
    assert len(got) == len(ref) == len(output_names)
    diffs = {}
    for name, r, o in zip(output_names, ref, got):
        assert o.shape == tuple(r.shape), name
        if not r.dtype.is_floating_point:
            assert np.array_equal(o, r.numpy()), name
            continue
        d = float(np.abs(o.astype(np.float64) - r.double().numpy()).max())
        diffs[name] = d
        tol = PROB_TOL if "probabilit" in name else REL_TOL * max(1.0, float(r.abs().max()))
        assert d <= tol, f"{name}: max |ORT - torch| {d:.3g} > {tol:.3g}"
    return diffs


def battery_inputs(name: str, batch: int, size=SIZE, seed=0):
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(batch, 3, *size, generator=g)
    if name != "late_fusion":
        return (image,)
    return image, torch.stack([torch.randint(0, 2, (batch,), generator=g),
                               torch.randint(0, 3, (batch,), generator=g)], 1).float()


# ---------------------------------------------------------------- every battery model
@pytest.mark.parametrize("name", [n for n in MODEL_NAMES if n not in ("deeplabv3", "deeplab_seg", "hdcnn")] +
                         [pytest.param("deeplabv3", marks=pytest.mark.slow)])
def test_battery_model_exports_with_parity(name):
    """Dynamic batch 1 and 3 at a non-square size. hdcnn and deeplab_seg: test_cli_exports_with_parity
    (square, as infer.py runs them). deeplabv3 is slow: its DRN-D-54 + ASPP are covered by
    deeplab_seg, its GAP classifier head by the other classifiers."""
    net = battery_net(name)
    cfg = {"model": name, "num_classes": 4 if name == "deeplab_seg" else 5, "image_size": SIZE[0],
           "normalize": normalization(name)}
    spec = graph_spec(net, cfg, {"threshold": 0.25} if name == "ae" else {}, SIZE, Path("w.pth"))
    data = export(spec, batch=2, dynamic_batch=True)
    model = onnx.load_from_string(data)
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["task"] == "battery_ct" and meta["model"] == name and json.loads(meta["image_size"]) == list(SIZE)
    assert [i.name for i in model.graph.input] == names(name)[0]
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    for batch in (1, 3):
        assert_parity(spec.module, data, battery_inputs(name, batch, seed=batch), names(name)[1])
    if name == "ae":
        assert float(meta["threshold"]) == 0.25
    if name not in ("ae", "deeplab_seg"):
        assert json.loads(meta["class_names"])[1] == "cell_porosity"


def test_graph_normalises_like_the_dataset():
    """BatteryGraph on [0, 1] images = the model on the dataset's normalised images (what
    infer.py computed before), bit for bit; the autoencoder maps to [-1, 1] first."""
    from torchvision.transforms.v2 import Normalize

    x = torch.rand(2, 3, 32, 32)
    for name, mean, std in (("resnet18", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)), ("ae", (0.5,) * 3, (0.5,) * 3)):
        net = battery_net(name)
        graph = BatteryGraph(net, name, normalization(name)).eval()
        xn = Normalize(mean, std)(x)
        with torch.inference_mode():
            if name == "ae":
                expected = (xn - net(xn)[0]).pow(2).flatten(1).mean(1)
                assert torch.equal(graph(x)[0], expected)
            else:
                probs = net(xn).softmax(1)
                out = graph(x)
                assert torch.equal(out[0], probs) and torch.equal(out[1], probs.argmax(1))


@pytest.mark.parametrize("h,w", [(6, 4), (6, 6), (5, 7), (4, 4)])
def test_adaptive_pool_export_matches_torch(h, w):
    x = torch.randn(2, 3, h, w)
    torch.testing.assert_close(_adaptive_avg_pool_export(x, 4), F.adaptive_avg_pool2d(x, 4), atol=1e-6, rtol=1e-6)


# ---------------------------------------------------------------- crbl
def crbl_parts(n: int, seed: int) -> torch.Tensor:
    """Built-in parts (normal, defect, ...) preprocessed for the crop model, as infer.py feeds them."""
    from crbl.data import _part_image, preprocess_crop
    rng = np.random.default_rng(seed)
    return torch.stack([torch.from_numpy(preprocess_crop(_part_image(rng, i % 2 == 1)).transpose(2, 0, 1).copy())
                        for i in range(n)])


@pytest.fixture(scope="module")
def crbl_files(scratch):
    """A CRBL crop model like the demo's best.pt (random backbones whose BatchNorm statistics are
    calibrated on built-in parts, as crbl/train.py does; a head that separates defect from normal
    parts by 4 in the logit, as a trained one does), saved as a converted .pth and exported by the
    CLI (128x128, --dynamic-batch) as README says."""
    from crbl.model import bilinear_pool
    from crbl.train import calibrate_batchnorm
    torch.manual_seed(5)
    model = CRBL().train()
    parts = crbl_parts(8, 1)
    calibrate_batchnorm(model, [(parts, None)], torch.device("cpu"))
    model.eval()
    with torch.no_grad():
        y = bilinear_pool(*model.forward_features(parts))
        d = y[1::2].mean(0) - y[0::2].mean(0)                        # defect minus normal
        model.predictions.weight.copy_(4.0 * d / d.dot(d))
        model.predictions.bias.fill_(-float(model.predictions.weight[0].dot(y.mean(0))))
    weights = scratch / "crbl.pth"
    torch.save(model.state_dict(), weights)
    out = scratch / "crbl_crop.onnx"
    export_main(["--task", "crbl", "--weights", str(weights), "--model", "crop", "--out", str(out), "--dynamic-batch"])
    return weights, out, model.eval()


def test_crbl_export_parity_and_metadata(crbl_files, capsys):
    weights, path, model = crbl_files
    graph = CRBLProbability(model).eval()
    x = crbl_parts(4, 3)
    with torch.inference_mode():
        p = graph(x)[0]
    assert float(p[1::2].min()) > float(p[0::2].max())      # the head tells the defect parts apart
    for batch in (1, 3):
        d = assert_parity(graph, path, (x[:batch],), ["probability"])
        assert d["probability"] <= 1e-6
    # why the check feeds data and not noise: through BatchNorm statistics taken on the parts, noise
    # drives the backbone's activations orders of magnitude beyond the data's, where float32 rounding
    # alone (a different summation order at another batch size) moves the output
    noise = torch.rand(2, 3, 128, 128, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        f_data, f_noise = model.backbone1(x[::2]), model.backbone1(noise)
    assert float(f_noise.abs().max()) > 100 * float(f_data.abs().max())
    meta = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    assert meta["task"] == "crbl" and meta["model"] == "crop" and float(meta["threshold"]) == 0.01
    assert "RGB in [0,1]" in meta["inputs"] and "P(defect)" in meta["outputs"]


def test_crbl_export_head_is_the_original_math():
    """The exported head (row blocks, sign as a clipped multiply) against the original's formula in
    float64, with exact zeros and negative values in phi; the eager inference head too."""
    from crbl.model import _bilinear_logits_export, _bilinear_logits_inference, bilinear_pool

    g = torch.Generator().manual_seed(0)
    f1 = torch.randn(3, 1280, 2, 3, generator=g)
    f2 = torch.randn(3, 1280, 2, 3, generator=g)
    f1[:, :7] = 0.0                                  # phi == 0 in whole rows
    f2[0, 100:110] = 0.0
    w = 1e-3 * torch.randn(1, 1280 * 1280, generator=g)
    b = torch.tensor([0.25])
    ref = F.linear(bilinear_pool(f1.double(), f2.double()), w.double(), b.double())
    assert (bilinear_pool(f1, f2) == 0).any()
    torch.testing.assert_close(_bilinear_logits_export(f1, f2, w, b).double(), ref, atol=2e-7, rtol=0)
    torch.testing.assert_close(_bilinear_logits_inference(f1, f2, w, b).double(), ref, atol=2e-7, rtol=0)


def test_crbl_two_streams_give_identical_outputs():
    """crbl/infer.py's CPU default (backbones in two threads in micro-batches of CPU_CHUNK, head on
    two halves) = one stream, exactly."""
    from crbl.deploy import CPU_CHUNK
    torch.manual_seed(3)
    model = randomize_bn(CRBL(), 3)
    x = torch.rand(CPU_CHUNK + 3, 3, 128, 128)
    with torch.inference_mode():
        one = CRBLProbability(model)(x)[0]
        for batch in (1, 2, 3, CPU_CHUNK + 3):
            assert torch.equal(CRBLProbability(model, streams=2)(x[:batch])[0], one[:batch])


def test_multihead_attention_exports():
    """The fused eval kernel of nn.MultiheadAttention has no ONNX form: export() turns it off (and back on)."""
    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.mha = nn.MultiheadAttention(16, 4, batch_first=True)

        def forward(self, t):
            return (self.mha(t, t, t, need_weights=False)[0],)

    spec = ExportSpec(Attention().eval(), lambda b, g: (torch.rand(b, 5, 16, generator=g),), ["tokens"], ["out"],
                      {"task": "test", "model": "mha", "image_size": [5, 16]})
    assert torch.backends.mha.get_fastpath_enabled()
    data = export(spec, batch=2, dynamic_batch=True)
    assert torch.backends.mha.get_fastpath_enabled()
    assert_parity(spec.module, data, (torch.rand(3, 5, 16),), ["out"])


def test_efficientnet_exports_at_odd_non_square_size():
    """TF-SAME padding becomes constant (asymmetric) pads in the exported graph: odd and even sizes."""
    torch.manual_seed(0)
    net = randomize_bn(EfficientNetB0(), 0)

    class Features(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net

        def forward(self, x):
            return (self.net(x),)

    spec = ExportSpec(Features().eval(), lambda b, g: (torch.rand(b, 3, 97, 130, generator=g),), ["image"],
                      ["features"], {"task": "test", "model": "b0", "image_size": [97, 130]})
    data = export(spec, batch=2, dynamic_batch=True)
    x = torch.rand(3, 3, 97, 130)
    d = assert_parity(spec.module, data, (x,), ["features"])
    assert d["features"] < 1e-4
    with pytest.raises(Exception):                  # the pads are for 97x130 only: another size is refused
        ort_outputs(data, (torch.rand(1, 3, 96, 130),))


def read_rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def crbl_images(scratch):
    from crbl.data import _part_image
    from common.io import save_image

    rng = np.random.default_rng(0)
    folder = scratch / "parts"
    for i in range(5):
        save_image(folder / f"part{i}.png", _part_image(rng, bool(i % 2)))
    return folder


def call(main, *args):
    main([str(a) for a in args])


def test_crbl_infer_engines_agree(crbl_files, crbl_images, scratch, capsys):
    weights, path, _ = crbl_files
    a, b = scratch / "torch.csv", scratch / "ort.csv"
    call(crbl_infer, crbl_images, "--weights", weights, "--model-type", "crop", "--out", a, "--batch-size", "2",
         "--threads", "1")
    capsys.readouterr()
    call(crbl_infer, crbl_images, "--engine", "onnxruntime", "--onnx", path, "--out", b, "--batch-size", "2",
         "--threads", "1", "--providers", "DmlExecutionProvider,CUDAExecutionProvider,CPUExecutionProvider")
    assert "onnxruntime " in capsys.readouterr().out    # the provider in use is printed
    ra, rb = read_rows(a), read_rows(b)
    assert list(ra[0]) == list(rb[0]) == ["path", "probability", "decision"]
    assert [r["path"] for r in ra] == [r["path"] for r in rb] and len(ra) == 5
    for x, y in zip(ra, rb):
        assert abs(float(x["probability"]) - float(y["probability"])) <= PROB_TOL
        assert x["decision"] == y["decision"]


def test_crbl_infer_refuses_wrong_files(crbl_files, crbl_images, scratch, capsys):
    """One UserError each (run_cli prints it as one line, exit 2: tests/test_hardening.py)."""
    _, path, _ = crbl_files
    never = scratch / "never.csv"

    def err(*args):                            # one line, exit status 2, nothing written
        message = cli_error(crbl_infer, crbl_images, "--out", never, *args, capsys=capsys)
        assert not never.exists()
        return message

    assert "holds a crop model, but --model-type full expects a full model" in err("--onnx", path, "--model-type", "full")
    assert "expects a full model" in err("--engine", "onnxruntime", "--combined", path, path)
    not_onnx = scratch / "not.onnx"
    not_onnx.write_bytes(b"\x08\x01garbage")
    assert "not a loadable ONNX model" in err("--onnx", not_onnx)
    assert "none of them is available" in err("--onnx", path, "--providers", "DmlExecutionProvider")
    assert "--onnx needs --engine onnxruntime" in err("--engine", "torch", "--onnx", path)


# ---------------------------------------------------------------- battery_ct through the CLIs
@pytest.fixture(scope="module")
def battery_files(scratch):
    """hdcnn and deeplab_seg as converted state_dicts, exported by the CLI at 64x64 (deeplab_seg
    with --dynamic-size: the CLI also compares at 96x48)."""
    files = {}
    for name in ("hdcnn", "deeplab_seg"):
        weights = scratch / f"{name}.pth"
        torch.save(battery_net(name).state_dict(), weights)
        out = scratch / f"{name}.onnx"
        export_main(["--task", "battery_ct", "--weights", str(weights), "--model", name, "--size", "64", "64",
                     "--out", str(out), "--dynamic-batch"] + (["--dynamic-size"] if name == "deeplab_seg" else []))
        files[name] = (weights, out)
    return files


@pytest.mark.parametrize("name", ["hdcnn", "deeplab_seg"])
def test_cli_exports_with_parity(battery_files, name):
    weights, path = battery_files[name]
    net = battery_net(name)                         # the same seed: the weights of the file
    graph = BatteryGraph(net, name, normalization(name)).eval()
    for batch in (1, 3):
        assert_parity(graph, path, battery_inputs(name, batch, size=(64, 64), seed=batch), names(name)[1])
    if name == "deeplab_seg":                       # --dynamic-size: any height and width
        assert_parity(graph, path, battery_inputs(name, 2, size=(40, 72)), names(name)[1])
    meta = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert meta["model"] == name and json.loads(meta["image_size"]) == [64, 64]


def test_battery_classify_engines_agree(battery_files, scratch, capsys):
    weights, path = battery_files["hdcnn"]
    a, b = scratch / "eval_torch", scratch / "eval_ort"
    call(battery_infer, "--weights", weights, "--model", "hdcnn", "--image-size", "64", "--out", a, "--workers", "0",
         "--threads", "1")
    capsys.readouterr()
    call(battery_infer, "--engine", "onnxruntime", "--onnx", path, "--out", b, "--workers", "0", "--threads", "1")
    assert "CPUExecutionProvider" in capsys.readouterr().out
    ra, rb = read_rows(a / "predictions.csv"), read_rows(b / "predictions.csv")
    assert list(ra[0]) == list(rb[0]) and "prob_coarse_defect" in ra[0] and len(ra) == len(rb) > 10
    for x, y in zip(ra, rb):
        assert x["path"] == y["path"] and x["pred"] == y["pred"]
        for k in x:
            if k.startswith("prob_"):
                assert abs(float(x[k]) - float(y[k])) <= PROB_TOL, k
    ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (a, b))
    assert ma["confusion_matrix"] == mb["confusion_matrix"]
    assert ma["metrics"]["roc_auc_ovr"] == pytest.approx(mb["metrics"]["roc_auc_ovr"], abs=1e-6)


def test_battery_segment_engines_agree(battery_files, scratch):
    from PIL import Image

    weights, path = battery_files["deeplab_seg"]
    rng = np.random.default_rng(1)
    images = scratch / "slices"
    images.mkdir(exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (80, 100, 3), dtype=np.uint8)).save(images / "a.png")
    Image.fromarray(rng.integers(0, 256, (50, 70, 3), dtype=np.uint8)).save(images / "b.png")   # smaller than a window
    for crop in (["--crop", "slide", "--window", "64", "--stride", "48"], ["--crop", "whole"]):
        common = ["--task", "segment", *crop, "--images", images, "--threads", "1", "--overwrite"]
        call(battery_infer, "--weights", weights, "--model", "deeplab_seg", "--out", scratch / "seg_torch", *common)
        call(battery_infer, "--onnx", path, "--out", scratch / "seg_ort", *common)
        for stem in ("a", "b"):
            ma = np.asarray(Image.open(scratch / "seg_torch" / f"{stem}_mask.png"))
            mb = np.asarray(Image.open(scratch / "seg_ort" / f"{stem}_mask.png"))
            assert ma.shape == mb.shape and (ma == mb).mean() > 0.999   # argmax of logits equal within 1e-4
        assert read_rows(scratch / "seg_torch" / "segments.csv")[0].keys() == \
            read_rows(scratch / "seg_ort" / "segments.csv")[0].keys()


def test_battery_infer_refuses_a_crbl_model(crbl_files, battery_files, scratch):
    _, crbl_onnx, _ = crbl_files
    with pytest.raises(UserError, match=r"not a battery_ct model \(it was exported for crbl\)"):
        call(battery_infer, "--onnx", crbl_onnx, "--out", scratch / "x")
    _, hdcnn_onnx = battery_files["hdcnn"]
    with pytest.raises(UserError, match="holds a hdcnn model, not --model resnet18"):
        call(battery_infer, "--onnx", hdcnn_onnx, "--model", "resnet18", "--out", scratch / "x")
    assert not (scratch / "x").exists()


# ---------------------------------------------------------------- export_onnx refusals and helpers
def test_export_refuses_beyond_tolerance_and_writes_nothing(crbl_files, battery_files, scratch):
    weights, _ = battery_files["hdcnn"]
    out = scratch / "refused.onnx"
    with pytest.raises(UserError, match="not written: ONNX Runtime disagrees with PyTorch beyond the tolerance 1e-12"):
        export_main(["--task", "battery_ct", "--weights", str(weights), "--model", "hdcnn", "--size", "32", "32",
                     "--out", str(out), "--tolerance", "1e-12"])
    assert not out.exists() and not list(scratch.glob(".refused.onnx.*"))
    with pytest.raises(UserError, match="already exists"):            # checked before any work
        export_main(["--task", "crbl", "--weights", str(weights), "--out", str(battery_files["hdcnn"][1])])
    with pytest.raises(UserError, match="crop or a full model"):
        export_main(["--task", "crbl", "--weights", str(scratch / "crbl.pth"), "--out", str(out)])
    with pytest.raises(UserError, match="exported for one input size only"):   # TF-SAME pads are constants
        export_main(["--task", "crbl", "--weights", str(scratch / "crbl.pth"), "--model", "crop", "--out", str(out),
                     "--dynamic-size"])
    with pytest.raises(SystemExit):
        export_main(["--task", "battery_ct", "--weights", str(weights), "--out", str(out), "--opset", "9"])


def test_fixed_batch_file_takes_any_batch(scratch):
    """Exported without --dynamic-batch (batch 2): OrtModel chunks and pads, outputs equal the module's."""
    net = battery_net("resnet18")
    spec = graph_spec(net, {"model": "resnet18", "num_classes": 5, "image_size": 32, "normalize": "imagenet"}, {},
                      (32, 32), Path("w.pth"))
    data = export(spec, batch=2, dynamic_batch=False)
    runner = OrtModel(session(data, ["CPUExecutionProvider"], verbose=False))
    assert runner.batch == 2
    x = torch.rand(5, 3, 32, 32)
    with torch.inference_mode():
        ref = spec.module(x)
    got = runner(x)
    torch.testing.assert_close(got[0], ref[0], atol=PROB_TOL, rtol=0)
    assert torch.equal(got[1], ref[1])
    diff, scale = compare(data, spec, (2,))["probabilities"]
    assert diff < PROB_TOL and 0 < scale <= 1


def test_parity_inputs_look_like_the_data(crbl_files):
    """The export check feeds each task's built-in data, preprocessed as infer.py does, not noise."""
    from common.onnx import data_rng, parity_limit
    from crbl.data import _part_image, preprocess_crop
    from crbl.deploy import export_spec
    spec = export_spec(crbl_files[0], "crop")
    (x,) = spec.make_inputs(2, torch.Generator().manual_seed(4))
    rng = data_rng(torch.Generator().manual_seed(4))   # the same draws: a normal and a defect part, crop-preprocessed
    expected = [preprocess_crop(_part_image(rng, defect)).transpose(2, 0, 1) for defect in (False, True)]
    torch.testing.assert_close(x, torch.from_numpy(np.stack(expected)), atol=1e-6, rtol=0)

    spec = graph_spec(battery_net("late_fusion"), {"model": "late_fusion", "num_classes": 5, "image_size": 48,
                                                   "normalize": "imagenet"}, {}, (48, 48), Path("w.pth"))
    image, meta = spec.make_inputs(5, torch.Generator().manual_seed(0))
    assert image.shape == (5, 3, 48, 48) and 0 <= float(image.min()) and float(image.max()) <= 1
    assert torch.equal(image[:, 0], image[:, 2])                     # gray CT slices
    assert float((image[:, 0] < 0.15).float().mean()) > 0.3          # dark air around the part, not uniform noise
    assert meta[:, 0].tolist() == [0.0, 0.0, 1.0, 1.0, 1.0] and set(meta[:, 1].tolist()) <= {0.0, 1.0, 2.0}
    assert parity_limit(0.5, 1e-5, 0.1) == pytest.approx(6e-6)


def test_parse_providers():
    assert parse_providers("dml, cuda,CPUExecutionProvider") == ["DmlExecutionProvider", "CUDAExecutionProvider",
                                                                 "CPUExecutionProvider"]
    with pytest.raises(UserError):
        parse_providers(" , ")
