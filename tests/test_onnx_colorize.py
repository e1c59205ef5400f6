"""ONNX deployment of the colorize U-Nets: scripts/export_onnx.py --task colorize, colorize/deploy.py
and colorize/infer.py --engine onnxruntime.

Two small random-weight models, each exported once per module by the CLI with a dynamic batch:
improved_unet (width 16; a colorize/train.py checkpoint trained at 32 px) with --dynamic-size, and
the first version's unet (width 4, BatchNorm statistics randomised; the original's best_model.pth
format, from a compiled model on a GPU) at a fixed non-square 32x48. ONNX Runtime runs them on the
CPU against the same graph in PyTorch at batch 1 and 3.

Tolerances: outputs are in [0, 1]; max |ONNX Runtime - PyTorch| <= 1e-4 for both models (the
export's own tolerance; measured ~1e-6 for improved_unet, ~6e-8 for unet). The PNGs of the two
infer.py engines: the same files, equal to within one gray level (a float difference of ~1e-6 x 255
moves about one value in 10^4 across a rounding boundary; PNGs are never bit-identical by design).
"""
from __future__ import annotations

import io
import json
import shutil
import warnings
import zipfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn as nn
from PIL import Image

from helpers import cli_error
from colorize.data import gray_u8, resize_u8, to_tensor
from colorize.deploy import ColorizeGraph
from colorize.infer import main as infer_main
from colorize.infer import restore_to_size
from colorize.model import build_model
from common.checkpoint import save_checkpoint
from common.io import UserError
from common.onnx import ExportSpec, export, write
from scripts.export_onnx import main as export_main
from tests.test_colorize_model import original_checkpoint, saved_as_cuda

TOL = 1e-4
UNET_SIZE = (32, 48)


pytestmark = pytest.mark.usefixtures("one_thread_for_module")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("onnx_colorize")
    torch.manual_seed(0)
    improved = build_model("improved_unet", 16).eval()
    save_checkpoint(root / "best.pt", model=improved, epoch=2,
                    config={"task": "colorize", "model": "improved_unet", "net_width": 16, "net_img_size": 32})
    torch.manual_seed(1)
    unet = build_model("unet", 4)
    for m in unet.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    unet.eval()
    with saved_as_cuda():
        torch.save(original_checkpoint(unet, compiled=True), root / "best_model.pth")
    export_main(["--task", "colorize", "--weights", str(root / "best.pt"), "--out", str(root / "improved.onnx"),
                 "--dynamic-batch", "--dynamic-size", "--threads", "1"])
    export_main(["--task", "colorize", "--weights", str(root / "best_model.pth"), "--model", "unet", "--size",
                 *map(str, UNET_SIZE), "--out", str(root / "unet.onnx"), "--dynamic-batch", "--threads", "1"])
    yield SimpleNamespace(root=root, improved=improved, unet=unet)
    shutil.rmtree(root, ignore_errors=True)


def run_ort(path: Path, x: torch.Tensor) -> np.ndarray:
    """ONNX Runtime directly (not common.onnx), CPU provider."""
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {"image": x.numpy()})[0]


def assert_parity(net: nn.Module, path: Path, x: torch.Tensor) -> float:
    with torch.inference_mode():
        ref = ColorizeGraph(net).eval()(x)[0]
    got = run_ort(path, x)
    assert got.shape == tuple(ref.shape)
    d = float(np.abs(got.astype(np.float64) - ref.double().numpy()).max())
    assert d <= TOL, f"max |ORT - torch| {d:.3g} > {TOL}"
    return d


def meta_of(path: Path) -> dict[str, str]:
    return {p.key: p.value for p in onnx.load(str(path)).metadata_props}


@pytest.mark.parametrize("name", ["improved_unet", "unet"])
def test_export_parity_at_batch_1_and_3(files, name):
    net = getattr(files, "improved" if name == "improved_unet" else "unet")
    path = files.root / ("improved.onnx" if name == "improved_unet" else "unet.onnx")
    size = (32, 32) if name == "improved_unet" else UNET_SIZE
    g = torch.Generator().manual_seed(3)
    for batch in (1, 3):
        assert_parity(net, path, torch.rand(batch, 3, *size, generator=g))
    model = onnx.load(str(path))
    dims = model.graph.input[0].type.tensor_type.shape.dim
    meta = meta_of(path)
    assert meta["task"] == "colorize" and meta["model"] == name and json.loads(meta["image_size"]) == list(size)
    assert json.loads(meta["width"]) == (16 if name == "improved_unet" else 4)
    assert "cv2.resize INTER_LINEAR" in meta["inputs"] and "round half to even" in meta["postprocessing"]
    assert dims[0].dim_param == "batch"
    if name == "improved_unet":        # --dynamic-size: any multiple of 16, non-square, gray inputs as infer.py feeds
        assert [d.dim_param for d in dims[2:]] == ["height", "width"]
        gray = torch.randint(0, 256, (2, 1, 64, 32), generator=g).float().div(255).expand(-1, 3, -1, -1).contiguous()
        assert_parity(net, path, gray)
    else:                              # fixed 32x48: another size is refused by ONNX Runtime itself
        assert [d.dim_value for d in dims[2:]] == list(UNET_SIZE)
        with pytest.raises(Exception):
            run_ort(path, torch.rand(1, 3, 32, 32))


def test_export_traces_plain_ops_even_in_grad_mode(files):
    """InstanceNorm is one InstanceNormalization node (not GroupNorm's reshapes, whose traced group
    count the exporter refuses), and the training-only autograd.Function (_InstanceNormLeakyReLU) is
    never what the export traces, even where grad mode is on."""
    ops = {n.op_type for n in onnx.load(str(files.root / "improved.onnx")).graph.node}
    assert "InstanceNormalization" in ops and "LeakyRelu" in ops
    buf = io.BytesIO()
    with torch.enable_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(ColorizeGraph(files.improved), (torch.rand(1, 3, 32, 32),), buf, dynamo=False,
                          opset_version=17, input_names=["image"], output_names=["restored"])
    model = onnx.load_from_string(buf.getvalue())
    onnx.checker.check_model(model)
    assert {n.op_type for n in model.graph.node} == ops and all(n.domain == "" for n in model.graph.node)


def write_inputs(folder: Path) -> None:
    """Gray inputs as the competition's (one with a flat damaged block, one saved as RGB) and a colour photo."""
    rng = np.random.default_rng(0)
    folder.mkdir()
    yy, xx = np.mgrid[:100, :72]
    photo = np.stack([xx * 3, yy * 2, 128 + 100 * np.sin(xx / 5.0)], -1) + rng.normal(0, 8, (100, 72, 3))
    photo = np.clip(photo, 0, 255).astype(np.uint8)
    g = gray_u8(photo)
    g[30:60, 20:50] = 17
    Image.fromarray(g).save(folder / "TEST_000.png")
    Image.fromarray(np.repeat(gray_u8(photo[:48, :48])[..., None], 3, -1)).save(folder / "TEST_001.png")
    Image.fromarray(photo[:64, :40]).save(folder / "TEST_002.png")


def read_png(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path)).astype(np.int16)


def test_infer_engines_write_the_same_pngs(files, tmp_path, capsys):
    """improved_unet: its training size (the file's traced size) and --size 64 (dynamic size); the
    same PNG names and sizes, values within one gray level, the same zip entries."""
    write_inputs(tmp_path / "in")
    for extra in ([], ["--size", "64"]):
        outs = {}
        for engine, model in (("torch", ["--weights", files.root / "best.pt"]),
                              ("onnxruntime", ["--engine", "onnxruntime", "--onnx", files.root / "improved.onnx"])):
            out = tmp_path / f"{engine}{''.join(extra)}"
            infer_main([str(a) for a in [*model, "--input", tmp_path / "in", "--out", out, "--zip", "--threads", "1",
                                         "--batch-size", "2", *extra]])
            outs[engine] = out
        log = capsys.readouterr().out
        assert "CPUExecutionProvider" in log and log.count(f"at {extra[1] if extra else 32}x") == 2
        names = sorted(p.name for p in outs["torch"].iterdir())
        assert names == sorted(p.name for p in outs["onnxruntime"].iterdir()) == \
            ["TEST_000.png", "TEST_001.png", "TEST_002.png", "submission.zip"]
        for n in names[:3]:
            a, b = read_png(outs["torch"] / n), read_png(outs["onnxruntime"] / n)
            assert a.shape == b.shape == read_png(tmp_path / "in" / n).shape[:2] + (3,)
            assert np.abs(a - b).max() <= 1 and (a != b).mean() < 1e-3, n
        with zipfile.ZipFile(outs["onnxruntime"] / "submission.zip") as z:
            assert sorted(z.namelist()) == names[:3]


def test_infer_onnx_non_square_model(files, tmp_path, capsys):
    """A file exported at 32x48: infer.py feeds every image resized to 32x48 (its own size, read from
    the file) and resizes the output back; the same as the PyTorch graph through the same steps."""
    write_inputs(tmp_path / "in")
    infer_main([str(a) for a in ["--onnx", files.root / "unet.onnx", "--input", tmp_path / "in", "--out",
                                 tmp_path / "o", "--threads", "1"]])
    assert "unet width 4 (ONNX Runtime, unet.onnx) at 32x48" in capsys.readouterr().out
    for n in ("TEST_000.png", "TEST_002.png"):
        rgb = np.asarray(Image.open(tmp_path / "in" / n).convert("RGB"))
        with torch.inference_mode():
            pred = ColorizeGraph(files.unet)(to_tensor(resize_u8(rgb, UNET_SIZE))[None])[0][0]
        expected = restore_to_size(pred, rgb.shape[:2]).astype(np.int16)
        got = read_png(tmp_path / "o" / n)
        assert got.shape == expected.shape and np.abs(got - expected).max() <= 1


def tiny_file(path: Path, task: str | None) -> Path:
    """A valid ONNX file of another task (its metadata), or with no metadata at all."""
    class Identity(nn.Module):
        def forward(self, x):
            return (x * 1.0,)

    spec = ExportSpec(Identity().eval(), lambda b, g: (torch.rand(b, 3, 32, 32, generator=g),), ["image"], ["out"],
                      {"task": task or "", "model": "crop", "image_size": [32, 32]})
    data = export(spec, batch=1, dynamic_batch=True)
    if task is None:
        model = onnx.load_from_string(data)
        del model.metadata_props[:]
        data = model.SerializeToString()
    write(data, path)
    return path


def test_infer_refuses_wrong_files_and_flags(files, tmp_path, capsys):
    """One UserError (or argparse's one line, exit 2) each; no output folder is made."""
    write_inputs(tmp_path / "in")
    never = tmp_path / "never"

    def err(*args):                            # one line, exit status 2, nothing written
        message = cli_error(infer_main, "--input", tmp_path / "in", "--out", never, "--threads", 1, *args, capsys=capsys)
        assert not never.exists()
        return message

    improved, unet = files.root / "improved.onnx", files.root / "unet.onnx"
    assert "not a colorize model (it was exported for crbl)" in err("--onnx", tiny_file(tmp_path / "c.onnx", "crbl"))
    assert "it has no metadata from scripts/export_onnx.py" in err("--onnx", tiny_file(tmp_path / "n.onnx", None))
    assert "holds a improved_unet model, not --model unet" in err("--onnx", improved, "--model", "unet")
    assert "--size 64: " in err("--onnx", unet, "--size", "64") and "takes 32x48 images" in err("--onnx", unet,
                                                                                                  "--size", "64")
    assert "improved_unet needs at least 16x32" in err("--onnx", improved, "--size", "16")
    assert "improved_unet needs at least 16x32" in err("--weights", files.root / "best.pt", "--size", "16")
    assert "not --weights" in err("--engine", "onnxruntime", "--onnx", improved, "--weights", files.root / "best.pt")
    assert "--onnx needs --engine onnxruntime" in err("--engine", "torch", "--onnx", improved)
    assert "none of them is available" in err("--onnx", improved, "--providers", "DmlExecutionProvider")


def test_export_refusals_write_nothing(files, tmp_path):
    out = tmp_path / "x.onnx"

    def refused(*args):
        with pytest.raises(UserError) as e:
            export_main(["--task", "colorize", "--out", str(out), "--threads", "1", *map(str, args)])
        assert not out.exists() and not list(tmp_path.iterdir())
        return str(e.value)

    ckpt = files.root / "best.pt"
    assert "multiples of 16" in refused("--weights", ckpt, "--size", 40, 40)
    assert "improved_unet needs at least 16x32" in refused("--weights", ckpt, "--size", 16, 16)
    assert "holds a improved_unet model, not --model unet" in refused("--weights", ckpt, "--model", "unet")
    assert "a colorize model is one of" in refused("--weights", ckpt, "--model", "crop")
    other = files.root / "other.pth"
    torch.save({"model_state_dict": {"fc.weight": torch.zeros(2, 2)}}, other)
    assert "not a colorize U-Net" in refused("--weights", other)
