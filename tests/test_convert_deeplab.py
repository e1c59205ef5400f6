"""scripts/convert_deeplab.py: pytorch-deeplab-xception DRN-D-54 checkpoints -> battery_ct models.

Checkpoints are synthesised from the original key manifest (written out below from the architecture
and, when available, checked against the reference JSON) with realistic values, in the format the
original train.py saves. Numerical parity is checked against an independent functional forward
(F.conv2d / F.batch_norm / F.interpolate straight from the checkpoint dict).
"""
from __future__ import annotations

import json
import math
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from battery_ct.model import build_model, load_converted
from common.io import UserError, load_untrusted, run_cli
from scripts.convert_deeplab import NUMPY_SCALAR_GLOBALS, main as convert_main

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "convert_deeplab.py"
REFERENCE_JSON = ROOT / "tests" / "data" / "deeplab_drn_d54_os8_c4_keys.json"  # from the original checkpoint
BLOCKS = ((3, 64, 3, 2, 1), (4, 128, 4, 2, 1), (5, 256, 6, 1, 2), (6, 512, 3, 1, 4))  # layer, planes, n, stride, dil
TOL = 1e-5


# ---------------------------------------------------------------- the original key manifest
def original_manifest(num_classes: int = 4) -> list[tuple[str, list[int], str]]:
    """Keys of DeepLab(backbone='drn', output_stride=8, num_classes) in state_dict order."""
    out = []

    def conv(p, cout, cin, k, bias=False):
        out.append((f"{p}.weight", [cout, cin, k, k], "float32"))
        if bias:
            out.append((f"{p}.bias", [cout], "float32"))

    def bn(p, c):
        out.extend((f"{p}.{s}", [c], "float32") for s in ("weight", "bias", "running_mean", "running_var"))
        out.append((f"{p}.num_batches_tracked", [], "int64"))

    for i, (cin, cout, k) in enumerate(((3, 16, 7), (16, 16, 3), (16, 32, 3))):
        conv(f"backbone.layer{i}.0", cout, cin, k)
        bn(f"backbone.layer{i}.1", cout)
    inplanes = 32
    for layer, planes, n, _, _ in BLOCKS:
        for b in range(n):
            p = f"backbone.layer{layer}.{b}"
            conv(f"{p}.conv1", planes, inplanes, 1); bn(f"{p}.bn1", planes)
            conv(f"{p}.conv2", planes, planes, 3); bn(f"{p}.bn2", planes)
            conv(f"{p}.conv3", planes * 4, planes, 1); bn(f"{p}.bn3", planes * 4)
            if b == 0:
                conv(f"{p}.downsample.0", planes * 4, inplanes, 1); bn(f"{p}.downsample.1", planes * 4)
            inplanes = planes * 4
    conv("backbone.layer7.0", 512, 2048, 3); bn("backbone.layer7.1", 512)
    conv("backbone.layer8.0", 512, 512, 3); bn("backbone.layer8.1", 512)
    for i, k in enumerate((1, 3, 3, 3), 1):
        conv(f"aspp.aspp{i}.atrous_conv", 256, 512, k); bn(f"aspp.aspp{i}.bn", 256)
    conv("aspp.global_avg_pool.1", 256, 512, 1); bn("aspp.global_avg_pool.2", 256)
    conv("aspp.conv1", 256, 1280, 1); bn("aspp.bn1", 256)
    conv("decoder.conv1", 48, 256, 1); bn("decoder.bn1", 48)
    conv("decoder.last_conv.0", 256, 304, 3); bn("decoder.last_conv.1", 256)
    conv("decoder.last_conv.4", 256, 256, 3); bn("decoder.last_conv.5", 256)
    conv("decoder.last_conv.8", num_classes, 256, 1, bias=True)
    return out


def realistic_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """Conv weights ~ N(0, sqrt(2/n)) (the original DRN init, n = k*k*out), BN weight ~1, small
    biases, int64 num_batches_tracked. BN running statistics are set like a trained network's:
    from one pass over random images, then mean + N(0, 0.1*std) and var * U[0.5, 1.5] - so
    the activations stay O(1) through the 54 layers (uncalibrated stats blow them up to ~1e3)."""
    global _CALIBRATE
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for key, shape, dtype in original_manifest():
        leaf = key.rsplit(".", 1)[1]
        if dtype == "int64":
            t = torch.tensor(123456, dtype=torch.int64)
        elif len(shape) == 4:
            t = torch.randn(shape, generator=g) * math.sqrt(2.0 / (shape[0] * shape[2] * shape[3]))
        elif leaf == "weight":
            t = 1 + 0.1 * torch.randn(shape, generator=g)
        elif leaf == "bias":
            t = 0.05 * torch.randn(shape, generator=g)
        elif leaf == "running_mean":
            t = torch.zeros(shape)
        else:  # running_var
            t = torch.ones(shape)
        sd[key] = t
    _CALIBRATE = g
    try:
        with torch.no_grad():
            ref_segment(torch.randn(4, 3, 64, 64, generator=g), sd)
    finally:
        _CALIBRATE = None
    return sd


def train_py_checkpoint(sd: dict) -> dict:
    """{'epoch', 'state_dict', 'optimizer', 'best_pred'} like pytorch-deeplab-xception's Saver."""
    params = [k for k, v in sd.items() if v.dtype.is_floating_point and "running_" not in k]
    backbone = [i for i, k in enumerate(params) if k.startswith("backbone.")]
    heads = [i for i, k in enumerate(params) if not k.startswith("backbone.")]
    g = torch.Generator().manual_seed(1)
    state = {i: {"momentum_buffer": 1e-3 * torch.randn(sd[k].shape, generator=g)} for i, k in enumerate(params)}
    group = dict(momentum=0.9, dampening=0, weight_decay=5e-4, nesterov=False, maximize=False,
                 foreach=None, differentiable=False, fused=None)
    optimizer = {"state": state, "param_groups": [dict(group, lr=0.007, initial_lr=0.007, params=backbone),
                                                   dict(group, lr=0.07, initial_lr=0.07, params=heads)]}
    return {"epoch": 31, "state_dict": sd, "optimizer": optimizer, "best_pred": np.float64(0.7312345678)}


@pytest.fixture(scope="module")
def work():
    with tempfile.TemporaryDirectory(prefix="convert_deeplab_") as d:  # big files: removed at once
        d = Path(d)
        sd = realistic_state_dict()
        torch.save(train_py_checkpoint(sd), d / "checkpoint.pth.tar")
        yield d, sd


# ---------------------------------------------------------------- independent functional forward
_CALIBRATE: torch.Generator | None = None  # set while realistic_state_dict calibrates BN statistics


def _bn(x, sd, p):
    if _CALIBRATE is not None:
        mean, var = x.mean((0, 2, 3)), x.var((0, 2, 3))
        sd[f"{p}.running_mean"] = mean + 0.1 * var.sqrt() * torch.randn(mean.shape, generator=_CALIBRATE)
        sd[f"{p}.running_var"] = var * (0.5 + torch.rand(var.shape, generator=_CALIBRATE))
    return F.batch_norm(x, sd[f"{p}.running_mean"], sd[f"{p}.running_var"], sd[f"{p}.weight"], sd[f"{p}.bias"],
                        training=False, momentum=0.0, eps=1e-5)


def _cbr(x, sd, conv, bn, stride=1, padding=0, dilation=1, relu=True):
    x = _bn(F.conv2d(x, sd[f"{conv}.weight"], sd.get(f"{conv}.bias"), stride, padding, dilation), sd, bn)
    return F.relu(x) if relu else x


def ref_backbone(x, sd):
    x = _cbr(x, sd, "backbone.layer0.0", "backbone.layer0.1", padding=3)
    x = _cbr(x, sd, "backbone.layer1.0", "backbone.layer1.1", padding=1)
    x = _cbr(x, sd, "backbone.layer2.0", "backbone.layer2.1", stride=2, padding=1)
    low = None
    for layer, _, n, stride, dil in BLOCKS:
        for b in range(n):
            p = f"backbone.layer{layer}.{b}"
            s = stride if b == 0 else 1
            out = _cbr(x, sd, f"{p}.conv1", f"{p}.bn1")
            out = _cbr(out, sd, f"{p}.conv2", f"{p}.bn2", stride=s, padding=dil, dilation=dil)
            out = _cbr(out, sd, f"{p}.conv3", f"{p}.bn3", relu=False)
            if f"{p}.downsample.0.weight" in sd:
                x = _cbr(x, sd, f"{p}.downsample.0", f"{p}.downsample.1", stride=s, relu=False)
            x = F.relu(out + x)
        if layer == 3:
            low = x
    x = _cbr(x, sd, "backbone.layer7.0", "backbone.layer7.1", padding=2, dilation=2)
    x = _cbr(x, sd, "backbone.layer8.0", "backbone.layer8.1", padding=1)
    return x, low


def ref_aspp(x, sd):
    branches = [_cbr(x, sd, "aspp.aspp1.atrous_conv", "aspp.aspp1.bn")]
    for i, d in ((2, 12), (3, 24), (4, 36)):
        branches.append(_cbr(x, sd, f"aspp.aspp{i}.atrous_conv", f"aspp.aspp{i}.bn", padding=d, dilation=d))
    pooled = _cbr(x.mean((2, 3), keepdim=True), sd, "aspp.global_avg_pool.1", "aspp.global_avg_pool.2")
    branches.append(F.interpolate(pooled, size=x.shape[-2:], mode="bilinear", align_corners=True))
    return _cbr(torch.cat(branches, 1), sd, "aspp.conv1", "aspp.bn1")


def ref_segment(img, sd):
    x, low = ref_backbone(img, sd)
    x = ref_aspp(x, sd)
    low = _cbr(low, sd, "decoder.conv1", "decoder.bn1")
    x = torch.cat([F.interpolate(x, size=low.shape[-2:], mode="bilinear", align_corners=True), low], 1)
    x = _cbr(x, sd, "decoder.last_conv.0", "decoder.last_conv.1", padding=1)
    x = _cbr(x, sd, "decoder.last_conv.4", "decoder.last_conv.5", padding=1)
    x = F.conv2d(x, sd["decoder.last_conv.8.weight"], sd["decoder.last_conv.8.bias"])
    return F.interpolate(x, size=img.shape[-2:], mode="bilinear", align_corners=True)


def _maxdiff(a, b):
    assert a.shape == b.shape
    return (a - b).abs().max().item()


def _image():
    return torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(7))


def _assert_parity(model, sd, ref_head):
    """Our backbone, ASPP (forward_features) and logits against the functional reference applied
    to the checkpoint's tensors; ref_head(x, ref_aspp_map) gives the reference logits."""
    model.eval()
    x = _image()
    with torch.no_grad():
        feat, low = model.backbone(x)
        aspp = model.forward_features(x)
        logits = model(x)
        rfeat, rlow = ref_backbone(x, sd)
        raspp = ref_aspp(rfeat, sd)
        rlogits = ref_head(x, raspp)
    assert feat.shape == (2, 512, 8, 8) and low.shape == (2, 256, 16, 16) and aspp.shape == (2, 256, 8, 8)
    diffs = {"backbone x": _maxdiff(feat, rfeat), "low_level_feat": _maxdiff(low, rlow),
             "aspp": _maxdiff(aspp, raspp), "logits": _maxdiff(logits, rlogits)}
    print(f"{type(model).__name__} parity max|diff|:", diffs, "max|logit|:", rlogits.abs().max().item())
    assert max(diffs.values()) <= TOL, diffs
    return logits, rlogits


def _cli(argv, capsys):
    """Run the converter like the command line does (run_cli): (exit code, stdout, stderr)."""
    code = 0
    try:
        run_cli(lambda: convert_main([str(a) for a in argv]))
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


# ---------------------------------------------------------------- key layout
def test_manifest_matches_reference_json_and_model():
    manifest = [list(m) for m in original_manifest()]
    assert len(manifest) == 398
    assert sum(k.startswith(("backbone.", "aspp.")) for k, _, _ in manifest) == 378
    assert json.loads(REFERENCE_JSON.read_text()) == manifest
    seg = build_model("deeplab_seg", num_classes=4).state_dict()
    assert [[k, list(v.shape), str(v.dtype).removeprefix("torch.")] for k, v in seg.items()] == manifest
    cls = build_model("deeplabv3").state_dict()
    assert list(cls) == [k for k, _, _ in manifest[:378]] + ["classifier.weight", "classifier.bias"]
    assert tuple(cls["classifier.weight"].shape) == (5, 256)


# ---------------------------------------------------------------- conversions
def test_segment_via_cli_matches_functional_reference(work):
    d, sd = work
    out = d / "seg.pt"
    r = subprocess.run([sys.executable, str(SCRIPT), str(d / "checkpoint.pth.tar"), str(out), "--task", "segment"],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "epoch 31" in r.stdout and "best_pred 0.731235" in r.stdout
    assert "kept 398 tensors" in r.stdout and "skipped 0" in r.stdout
    converted = torch.load(out, weights_only=True)  # a plain state_dict: no allowlist needed
    assert list(converted) == [k for k, _, _ in original_manifest()]
    assert all(torch.equal(converted[k], sd[k]) for k in sd)

    model = build_model("deeplab_seg")
    report = load_converted(model, out)
    assert len(report["loaded"]) == 398 and not report["kept_init"] and not report["ignored"]
    logits, rlogits = _assert_parity(model, sd, lambda x, raspp: ref_segment(x, sd))
    assert logits.shape == (2, 4, 64, 64)
    assert rlogits.std() > 1e-3  # the comparison is not between two constant maps
    # a segment file also loads into the classifier: decoder ignored, classifier kept fresh
    report = load_converted(build_model("deeplabv3"), out)
    assert len(report["ignored"]) == 20 and report["kept_init"] == ["classifier.weight", "classifier.bias"]


def test_classify_keeps_backbone_and_aspp(work, capsys):
    d, sd = work
    out = d / "cls.pt"
    code, stdout, err = _cli([d / "checkpoint.pth.tar", out], capsys)  # --task classify is the default
    assert code == 0, err
    assert "kept 378 tensors" in stdout and "skipped 20 (decoder.*)" in stdout
    assert "fresh initialisation" in stdout
    n_params = sum(math.prod(s) for k, s, t in original_manifest()[:378] if t == "float32" and "running_" not in k)
    assert f"({n_params:,} parameters" in stdout  # 39,429,301 - 1,285 (classifier)
    converted = torch.load(out, weights_only=True)
    assert list(converted) == [k for k, _, _ in original_manifest()[:378]]

    missing, unexpected = build_model("deeplabv3").load_state_dict(converted, strict=False)
    assert missing == ["classifier.weight", "classifier.bias"] and unexpected == []
    model = build_model("deeplabv3", freeze_backbone=True)
    fresh = {k: v.clone() for k, v in model.classifier.state_dict().items()}
    report = load_converted(model, out)
    assert report["kept_init"] == ["classifier.weight", "classifier.bias"] and len(report["loaded"]) == 378
    assert all(torch.equal(fresh[k], v) for k, v in model.classifier.state_dict().items())
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 256 * 5 + 5
    _assert_parity(model, sd, lambda x, raspp: F.linear(raspp.mean((2, 3)), model.classifier.weight,
                                                         model.classifier.bias))


def test_bare_module_prefixed_state_dict(work, capsys):
    d, sd = work
    src, out = d / "bare.pth", d / "bare_seg.pt"
    torch.save({f"module.{k}": v for k, v in sd.items()}, src)
    code, stdout, err = _cli([src, out, "--task", "segment"], capsys)
    assert code == 0, err
    assert "epoch n/a, best_pred n/a" in stdout and "kept 398 tensors" in stdout
    converted = torch.load(out, weights_only=True)
    assert list(converted) == list(sd) and all(torch.equal(converted[k], sd[k]) for k in sd)
    build_model("deeplab_seg").load_state_dict(converted)  # strict
    src.unlink()
    out.unlink()


# ---------------------------------------------------------------- refusals
def _assert_failed(code, out_path, err, *needles, old: bytes | None = None):
    assert code != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for n in needles:
        assert n in lines[0], lines[0]
    if old is None:
        assert not out_path.exists()
    else:
        assert out_path.read_bytes() == old
    assert not [p for p in out_path.parent.iterdir() if p.name.endswith(".tmp")]


def test_wrong_task_segment_without_decoder(work, capsys):
    d, sd = work
    src, out = d / "no_decoder.pth", d / "wrong_task.pt"
    torch.save({k: v for k, v in sd.items() if not k.startswith("decoder.")}, src)
    out.write_bytes(b"previous output")
    code, _, err = _cli([src, out, "--task", "segment", "--overwrite"], capsys)
    _assert_failed(code, out, err, str(src), "20 missing", "decoder.conv1.weight", "use --task classify",
                   old=b"previous output")
    src.unlink()


def test_missing_and_misshaped_keys_are_listed(work, capsys):
    d, sd = work
    src, out = d / "broken.pth", d / "broken_out.pt"
    broken = {k: v for k, v in sd.items() if k not in ("aspp.conv1.weight", "backbone.layer5.2.bn2.running_var")}
    broken["backbone.layer0.0.weight"] = torch.zeros(16, 1, 7, 7)  # a grey-scale stem
    torch.save({"epoch": 3, "state_dict": broken, "best_pred": 0.5}, src)
    code, _, err = _cli([src, out], capsys)
    _assert_failed(code, out, err, str(src), "2 missing", "aspp.conv1.weight", "backbone.layer5.2.bn2.running_var",
                   "1 wrong shape", "backbone.layer0.0.weight (16, 1, 7, 7) != (16, 3, 7, 7)")
    src.unlink()


def test_other_models_checkpoint_is_refused(tmp_path, capsys):
    src, out = tmp_path / "resnet18.pt", tmp_path / "out.pt"
    torch.save({"epoch": 1, "state_dict": build_model("resnet18").state_dict(), "best_pred": 0.9}, src)
    code, _, err = _cli([src, out, "--task", "classify"], capsys)
    _assert_failed(code, out, err, str(src), "not a DeepLab DRN-D-54", "378 missing", "unexpected")


def test_truncated_file_via_cli(work, tmp_path, capfd):
    """In this process, but capturing the file descriptors: nothing from torch's C++ side either."""
    d, _ = work
    src, out = tmp_path / "truncated.pth.tar", tmp_path / "out.pt"
    with open(d / "checkpoint.pth.tar", "rb") as f:
        src.write_bytes(f.read(1 << 20))
    capfd.readouterr()
    code, stdout, err = _cli([src, out], capfd)
    assert code == 2 and stdout == "" and "Traceback" not in err
    _assert_failed(code, out, err, str(src), "corrupt or truncated checkpoint")


def test_not_a_torch_file(tmp_path, capsys):
    src, out = tmp_path / "notes.txt", tmp_path / "out.pt"
    src.write_text("this is not a checkpoint\n")
    code, _, err = _cli([src, out], capsys)
    _assert_failed(code, out, err, str(src))
    code, _, err = _cli([tmp_path / "absent.pth", out], capsys)
    _assert_failed(code, out, err, "absent.pth", "not found")


class _Payload:
    """Unpickling this calls open(marker, 'w'): code execution that leaves a visible trace."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_malicious_pickle_is_refused_and_nothing_runs(tmp_path, capsys):
    marker = tmp_path / "pwned"
    src, out = tmp_path / "evil.pth.tar", tmp_path / "out.pt"
    sd = {"backbone.layer0.0.weight": torch.zeros(16, 3, 7, 7)}
    torch.save({"epoch": 1, "state_dict": sd, "optimizer": _Payload(marker), "best_pred": np.float64(0.5)}, src)
    code, _, err = _cli([src, out], capsys)
    _assert_failed(code, out, err, str(src), "refused to load")
    assert not marker.exists()
    # the payload is real: an unsafe load would have run it
    torch.load(src, weights_only=False)
    assert marker.exists()


def test_numpy_allowlist_is_exactly_float64_scalars(tmp_path):
    names = {n if isinstance(n, str) else f"{n.__module__}.{n.__qualname__}"
             for g in NUMPY_SCALAR_GLOBALS for n in ([g[1]] if isinstance(g, tuple) else [g])}
    assert names == {"numpy._core.multiarray.scalar", "numpy.core.multiarray.scalar", "numpy.dtype",
                     "numpy.dtypes.Float64DType"}
    ok = tmp_path / "ok.pt"
    torch.save({"best_pred": np.float64(0.25), "epoch": 2}, ok)
    assert load_untrusted(ok, safe_globals=NUMPY_SCALAR_GLOBALS)["best_pred"] == 0.25
    with pytest.raises(UserError, match="refused to load"):
        load_untrusted(ok)  # without the allowlist the numpy scalar is refused
    # a file written with numpy 1.x names the reconstructor numpy.core.multiarray.scalar
    old = tmp_path / "numpy1.pt"
    zin = zipfile.ZipFile(ok)
    with zipfile.ZipFile(old, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            data = zin.read(info.filename)
            if info.filename.endswith("data.pkl"):
                data = data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
            zout.writestr(info, data)
    assert load_untrusted(old, safe_globals=NUMPY_SCALAR_GLOBALS)["best_pred"] == 0.25
    # other numpy objects stay refused
    arr = tmp_path / "array.pt"
    torch.save({"best_pred": np.float32(0.25), "hist": np.zeros(3)}, arr)
    with pytest.raises(UserError, match="refused to load"):
        load_untrusted(arr, safe_globals=NUMPY_SCALAR_GLOBALS)
