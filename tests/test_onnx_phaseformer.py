"""ONNX deployment of the Phaseformer: scripts/export_onnx.py --task phaseformer, phaseformer/deploy.py
and phaseformer/infer.py --engine onnxruntime.

One model (the official architecture, trained-looking random weights from the transcription of the
original, saved as a plain state_dict) exported twice by the CLI: the 1x head with --dynamic-batch
--dynamic-size traced at 32x48, and the 2x head at one size, 64x64, batch 1. The reference is the
PyTorch model's own rfft2 path (not the export-only DFT-matrix path), run by the test itself.

Tolerances: max |ONNX Runtime - PyTorch| <= 1e-4 (the export's tolerance; measured ~1e-6). PNGs of
the two infer.py engines: same names and sizes, within one level, in at most 0.1% of the values.
"""
from __future__ import annotations

import shutil
import sys
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
from common.io import UserError
from common.onnx import ExportSpec, export, write
from phaseformer import infer
from phaseformer.model import Phaseformer, rfft2_matmul
from scripts.export_onnx import main as export_main

sys.path.insert(0, str(Path(__file__).parent / "phaseformer_ref"))
import official_model as official  # noqa: E402

TOL = 1e-4
pytestmark = pytest.mark.usefixtures("one_thread_for_module")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("onnx_phaseformer")
    net = Phaseformer().eval()
    net.load_state_dict(official.trained_looking(official.Restormer(), seed=5).state_dict())
    torch.save(net.state_dict(), root / "weights.pth")
    export_main(["--task", "phaseformer", "--weights", str(root / "weights.pth"), "--out", str(root / "dyn.onnx"),
                 "--size", "32", "48", "--dynamic-batch", "--dynamic-size", "--threads", "1"])
    export_main(["--task", "phaseformer", "--weights", str(root / "weights.pth"), "--out", str(root / "fixed2x.onnx"),
                 "--size", "64", "64", "--head", "2x", "--threads", "1"])
    torch.set_num_threads(n)
    yield SimpleNamespace(root=root, net=net)
    shutil.rmtree(root, ignore_errors=True)


def run_ort(path: Path, x: torch.Tensor) -> np.ndarray:
    """ONNX Runtime directly (not common.onnx), CPU provider."""
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {"image": x.numpy()})[0]


def max_delta(net: nn.Module, path: Path, x: torch.Tensor, head: str) -> float:
    with torch.inference_mode():
        ref = net(x, head=head)
    got = run_ort(path, x)
    assert got.shape == tuple(ref.shape)
    assert ref.abs().max() > 0.1                        # a real signal, not ~0
    d = float(np.abs(got.astype(np.float64) - ref.double().numpy()).max())
    assert d <= TOL, f"max |ORT - torch| {d:.3g} > {TOL}"
    return d


def meta_of(path: Path) -> dict[str, str]:
    return {p.key: p.value for p in onnx.load(str(path)).metadata_props}


def test_dft_matrix_products_equal_rfft2_at_odd_and_even_sizes():
    g = torch.Generator().manual_seed(0)
    for hw in ((8, 8), (5, 7), (6, 3), (40, 56)):
        x = torch.randn(2, 3, *hw, generator=g)
        re, im = rfft2_matmul(x)
        want = torch.fft.rfft2(x.double())
        scale = float(want.abs().max())
        assert float((re.double() - want.real).abs().max()) / scale < 2e-6
        assert float((im.double() - want.imag).abs().max()) / scale < 2e-6


def test_dynamic_file_matches_pytorch_at_batch_1_and_3_and_other_sizes(files):
    path = files.root / "dyn.onnx"
    g = torch.Generator().manual_seed(3)
    deltas = [max_delta(files.net, path, torch.rand(b, 3, *hw, generator=g), "1x")
              for b, hw in ((1, (32, 48)), (3, (32, 48)), (1, (40, 24)), (2, (56, 40)))]   # 40x24, 56x40: odd 1/8 maps
    print(f"max |ORT - torch| dynamic 1x: {max(deltas):.2e}")
    model = onnx.load(str(path))
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param for d in dims] == ["batch", "", "height", "width"]
    ops = {n.op_type for n in model.graph.node}
    assert {"MatMul", "Cos", "Sin"} <= ops and not ops & {"DFT", "STFT"}
    meta = meta_of(path)
    assert meta["task"] == "phaseformer" and meta["head"] == "1x" and meta["size_multiple"] == "8"


def test_fixed_2x_file_matches_and_refuses_other_sizes(files):
    path = files.root / "fixed2x.onnx"
    d = max_delta(files.net, path, torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(4)), "2x")
    print(f"max |ORT - torch| fixed 2x: {d:.2e}")
    dims = onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in dims] == [1, 3, 64, 64] and meta_of(path)["head"] == "2x"
    with pytest.raises(Exception):
        run_ort(path, torch.rand(1, 3, 32, 32))


def write_inputs(folder: Path) -> None:
    rng = np.random.default_rng(0)
    folder.mkdir()
    yy, xx = np.mgrid[:90, :70]
    scene = np.stack([xx * 3, yy * 2, 128 + 100 * np.sin(xx / 5.0)], -1) + rng.normal(0, 8, (90, 70, 3))
    Image.fromarray(np.clip(scene, 0, 255).astype(np.uint8)).save(folder / "b.png")
    Image.fromarray(rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)).save(folder / "a.png")


def png(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path)).astype(np.int16)


def test_infer_engines_write_the_same_pngs(files, tmp_path, capsys):
    """The dynamic file through infer.py (padding to 8, tiles of 64 with overlap 16 on the 90x70
    image) against the PyTorch engine with the same weights and flags."""
    write_inputs(tmp_path / "in")
    common = ["--tile", "64", "--overlap", "16", "--threads", "1"]
    infer.main([str(tmp_path / "in"), "--weights", str(files.root / "weights.pth"), "--out", str(tmp_path / "t"),
                *common])
    infer.main([str(tmp_path / "in"), "--engine", "onnxruntime", "--onnx", str(files.root / "dyn.onnx"),
                "--out", str(tmp_path / "o"), *common])
    assert "CPUExecutionProvider" in capsys.readouterr().out
    for n in ("a.png", "b.png"):
        a, b = png(tmp_path / "t" / n), png(tmp_path / "o" / n)
        assert a.shape == b.shape == png(tmp_path / "in" / n).shape
        assert np.abs(a - b).max() <= 1 and (a != b).mean() <= 1e-3, n


def test_infer_fixed_file_feeds_tiles_of_its_size(files, tmp_path, capsys):
    """64x64 2x file: --tile becomes 64; the 37x53 image is padded by reflection to 40x56 (multiples
    of 8, as for the PyTorch engine), then up to 64x64, and cropped back: the test computes that
    with the PyTorch model."""
    write_inputs(tmp_path / "in")
    infer.main([str(tmp_path / "in"), "--onnx", str(files.root / "fixed2x.onnx"), "--out", str(tmp_path / "o"),
                "--overlap", "16", "--threads", "1"])
    assert "2x head, tiles of 64 px" in capsys.readouterr().out
    x = infer.image_to_tensor(Image.open(tmp_path / "in" / "a.png").convert("RGB"))[None]
    padded, h, w = infer.pad_to_multiple(infer.pad_to_multiple(x)[0], at_least=(64, 64))
    h, w = x.shape[-2:]
    assert padded.shape[-2:] == (64, 64)
    with torch.inference_mode():
        want = infer.to_uint8(files.net(padded, head="2x")[..., : 2 * h, : 2 * w]).astype(np.int16)
    got = png(tmp_path / "o" / "a.png")
    assert got.shape == (74, 106, 3) and np.abs(got - want).max() <= 1 and (got != want).mean() <= 1e-3
    assert png(tmp_path / "o" / "b.png").shape == (180, 140, 3)


def tiny_file(path: Path, task: str) -> Path:
    class Identity(nn.Module):
        def forward(self, x):
            return (x * 1.0,)

    spec = ExportSpec(Identity().eval(), lambda b, g: (torch.rand(b, 3, 64, 64, generator=g),), ["image"], ["out"],
                      {"task": task, "model": "unet", "image_size": [64, 64]})
    write(export(spec, batch=1, dynamic_batch=True), path)
    return path


def test_refusals_in_one_line_and_nothing_written(files, tmp_path, capsys):
    write_inputs(tmp_path / "in")
    never = tmp_path / "never"

    def err(*args):                            # one line, exit status 2, nothing written
        message = cli_error(infer.main, tmp_path / "in", "--out", never, "--threads", 1, *args, capsys=capsys)
        assert not never.exists() and "\n" not in message.strip()
        return message

    dyn, fixed = files.root / "dyn.onnx", files.root / "fixed2x.onnx"
    assert "not a phaseformer model (it was exported for colorize)" in err("--onnx", tiny_file(tmp_path / "c.onnx",
                                                                                                 "colorize"))
    assert "give --onnx FILE" in err("--engine", "onnxruntime")
    assert "--onnx needs --engine onnxruntime" in err("--engine", "torch", "--onnx", dyn)
    assert "not --weights" in err("--onnx", dyn, "--weights", files.root / "weights.pth")
    assert "--tile 128: " in err("--onnx", fixed, "--tile", "128") and "takes 64x64 tiles only" in \
        err("--onnx", fixed, "--tile", "128")
    assert "holds a 2x head, not --head 1x" in err("--onnx", fixed, "--head", "1x")
    assert "runs in PyTorch only" in err("--onnx", dyn, "--preset", "official")
    assert "none of them is available" in err("--onnx", dyn, "--providers", "DmlExecutionProvider")
    out = tmp_path / "x.onnx"

    def refused(*args):
        with pytest.raises(UserError) as e:
            export_main(["--task", "phaseformer", "--weights", str(files.root / "weights.pth"), "--out", str(out),
                         "--threads", "1", *map(str, args)])
        assert not out.exists()
        return str(e.value)

    assert "multiples of 8" in refused("--size", 36, 40)
    assert "the phaseformer task's models are phaseformer, spectroformer" in refused("--model", "unet")
    other = tmp_path / "other.pth"
    torch.save(nn.Linear(2, 2).state_dict(), other)
    with pytest.raises(UserError, match=r"other.pth: not Phaseformer \(model_with_eca.Restormer\) weights"):
        export_main(["--task", "phaseformer", "--weights", str(other), "--out", str(out)])
    with pytest.raises(UserError, match="--head: --task colorize has one output head"):
        export_main(["--task", "colorize", "--weights", str(other), "--out", str(out), "--head", "2x"])


def test_spectroformer_export_forms_equal_its_ffts(monkeypatch):
    """The traced forms (DFT-matrix products, angle from Atan) of UpS and SFCA against the
    torch.fft forward, at even and odd map sizes (the full export is the slow test below)."""
    import official_spectroformer
    from phaseformer import spectroformer
    g = torch.Generator().manual_seed(8)
    for module, seed in ((spectroformer.UpS(8), 1), (spectroformer.SFCA(8), 2)):
        module.load_state_dict(official_spectroformer.trained_looking(
            type(module)(8) if isinstance(module, spectroformer.SFCA) else spectroformer.UpS(8), seed).state_dict())
        for hw in ((6, 4), (5, 8), (4, 6)):
            x = torch.randn(2, 8, *hw, generator=g)
            with torch.no_grad():
                want = module(x)
                with monkeypatch.context() as m:
                    m.setattr(spectroformer, "_exporting", lambda: True)
                    got = module(x)
            assert (got - want).abs().max() <= 1e-5 * max(1.0, float(want.abs().max())), (type(module), hw)


@pytest.mark.slow
def test_spectroformer_exports_with_its_ffts_and_runs_in_infer(tmp_path):
    """--model detected from the weights: UpS's complex FFT, |F| and angle(F) and SFCA's real
    spectra as DFT-matrix products; ORT equals PyTorch at the traced and other sizes (an odd 1/8
    map at 32x40), and infer.py --engine onnxruntime writes what the PyTorch engine writes."""
    import official_spectroformer
    from phaseformer.model import build_model
    net = build_model("spectroformer").eval()
    net.load_state_dict(official_spectroformer.trained_looking(official_spectroformer.mymodel(), seed=6).state_dict())
    weights, path = tmp_path / "spectro.pth", tmp_path / "spectro.onnx"
    torch.save(net.state_dict(), weights)
    export_main(["--task", "phaseformer", "--weights", str(weights), "--out", str(path), "--size", "16", "24",
                 "--dynamic-batch", "--dynamic-size", "--threads", "1"])
    g = torch.Generator().manual_seed(7)
    deltas = [max_delta(net, path, torch.rand(b, 3, *hw, generator=g), "1x") for b, hw in ((1, (16, 24)), (2, (32, 40)))]
    print(f"max |ORT - torch| spectroformer: {max(deltas):.2e}")
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert {"MatMul", "Cos", "Sin", "Atan"} <= ops and not ops & {"DFT", "STFT"}
    assert meta_of(path)["model"] == "spectroformer"
    with pytest.raises(UserError, match="one output"):
        export_main(["--task", "phaseformer", "--weights", str(weights), "--out", str(tmp_path / "x.onnx"),
                     "--head", "2x"])
    folder = tmp_path / "in"
    folder.mkdir()
    rng = np.random.default_rng(3)
    Image.fromarray(rng.integers(0, 256, (30, 41, 3), dtype=np.uint8)).save(folder / "a b.png")
    infer.main([str(folder), "--weights", str(weights), "--out", str(tmp_path / "pt")])
    infer.main([str(folder), "--engine", "onnxruntime", "--onnx", str(path), "--out", str(tmp_path / "ort")])
    a = np.asarray(Image.open(tmp_path / "pt" / "a b.png")).astype(int)
    b = np.asarray(Image.open(tmp_path / "ort" / "a b.png")).astype(int)
    assert a.shape == b.shape == (30, 41, 3) and np.abs(a - b).max() <= 1
