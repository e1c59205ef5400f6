"""scripts/convert_h5.py and crbl.model against the genuine Keras models.

The Keras side runs in subprocesses (tests/keras_ref/*.py), once per test session: tf_keras + qubvel
``efficientnet`` build the original CRBL model (and a single qubvel backbone), Keras 3 builds
keras.applications.EfficientNetB0 (and qubvel's B0 on Keras 3).  They fill the weights with fixed
random values, save them in every layout Keras writes, and store Keras's own outputs.  Here the
files are converted and the torch model must reproduce those outputs.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from common.io import UserError, load_weights_into, run_cli
from crbl.model import FREEZE_INDEX, KERAS_LAYER_NAMES, KERAS_LAYERS, EfficientNetB0, build_model
from scripts.convert_h5 import convert, main

ROOT = Path(__file__).resolve().parents[1]
KERAS_REF = Path(__file__).resolve().parent / "keras_ref"
CONVERTER = ROOT / "scripts" / "convert_h5.py"
FEAT_TOL = 1e-4
PROB_TOL = 1e-5
MEASURED: dict[str, float] = {}


def _have(*mods: str) -> bool:
    return all(importlib.util.find_spec(m) is not None for m in mods)


def _keras3_available() -> bool:
    try:
        return _have("keras") and int(importlib.metadata.version("keras").split(".")[0]) >= 3
    except importlib.metadata.PackageNotFoundError:
        return False


class Refs:
    def __init__(self, path: Path, tf2: dict, k3: dict | None):
        self.path, self.tf2, self.k3 = path, tf2, k3
        self.x128 = self.nchw(np.load(path / "x128.npy"))
        self.xodd = self.nchw(np.load(path / "xodd.npy"))
        self._converted: dict = {}

    @staticmethod
    def nchw(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(a).permute(0, 3, 1, 2)      # a channels_last view, no copy

    def npy(self, name: str) -> np.ndarray:
        return np.load(self.path / f"{name}.npy")

    def file(self, name: str) -> Path:
        p = self.path / name
        if not p.exists():
            pytest.skip(f"{name} was not produced by the Keras reference scripts")
        return p

    def converted(self, name: str, model_type: str | None = None):
        """(state_dict loaded back with weights_only=True, summary lines) of one conversion."""
        key = (name, model_type)
        if key not in self._converted:
            out = self.path / "converted" / f"{name}.{model_type}.pth"
            lines: list[str] = []
            convert(self.file(name), out, model_type, log=lines.append)
            self._converted[key] = (torch.load(out, map_location="cpu", weights_only=True), lines)
        return self._converted[key]


def _run_ref_scripts(path: Path) -> tuple[dict, dict | None]:
    spec = importlib.util.spec_from_file_location("keras_ref_common", KERAS_REF / "_common.py")
    common = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(common)
    common.write_inputs(str(path))                      # shared inputs, before both scripts start
    quiet = {"TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": "", "PYTHONWARNINGS": "ignore"}
    base = {k: v for k, v in os.environ.items() if k != "TF_USE_LEGACY_KERAS"}
    jobs = {"tf2": subprocess.Popen(
        [sys.executable, str(KERAS_REF / "make_tf2_refs.py"), str(path)],
        env={**base, **quiet, "TF_USE_LEGACY_KERAS": "1"}, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True)}
    if _keras3_available():
        jobs["k3"] = subprocess.Popen(
            [sys.executable, str(KERAS_REF / "make_keras3_refs.py"), str(path)],
            env={**base, **quiet}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for name, p in jobs.items():
        out, _ = p.communicate(timeout=900)
        if p.returncode != 0:
            pytest.fail(f"Keras reference script {name} failed (rc {p.returncode}):\n{out[-3000:]}")
    tf2 = json.loads((path / "tf2_meta.json").read_text())
    k3 = json.loads((path / "k3_meta.json").read_text()) if "k3" in jobs else None
    return tf2, k3


@pytest.fixture(scope="session")
def refs(tmp_path_factory):
    if not _have("tensorflow", "tf_keras", "efficientnet"):
        pytest.skip("tensorflow, tf_keras and efficientnet (qubvel) are needed to build the Keras reference")
    path = tmp_path_factory.mktemp("keras_ref")
    tf2, k3 = _run_ref_scripts(path)
    yield Refs(path, tf2, k3)
    if MEASURED:
        print("\nmax |torch - keras|: " + ", ".join(f"{k} {v:.2e}" for k, v in MEASURED.items()))
    shutil.rmtree(path, ignore_errors=True)             # ~0.5 GB of .h5 files


@pytest.fixture
def scratch(tmp_path):
    """tmp_path, removed afterwards (the tests copy .h5 files of up to 40 MB)."""
    yield tmp_path
    shutil.rmtree(tmp_path, ignore_errors=True)


def _maxdiff(tag: str, torch_out: torch.Tensor, keras_out: np.ndarray, nhwc: bool = False) -> float:
    t = torch_out.detach()
    if nhwc:
        t = t.permute(0, 2, 3, 1)
    assert tuple(t.shape) == keras_out.shape, tag
    d = float(np.abs(t.numpy() - keras_out).max())
    MEASURED[tag] = max(d, MEASURED.get(tag, 0.0))
    return d


def _crbl(sd: dict, model_type: str):
    m = build_model(model_type)
    m.load_state_dict(sd)                               # strict
    return m.eval()


def _check_crbl(refs: Refs, m, feat_tag: str, prob_tag: str, sizes=("128", "odd"), label=""):
    for size in sizes:
        x = refs.x128 if size == "128" else refs.xodd
        with torch.inference_mode():
            f1, f2 = m.forward_features(x)
            prob = torch.sigmoid(m(x))
            prob_features = torch.sigmoid(m.forward_head((f1, f2)))
        assert _maxdiff(f"{label} feat1@{size}", f1, refs.npy(f"{feat_tag}_feat1_{size}"), True) <= FEAT_TOL
        assert _maxdiff(f"{label} feat2@{size}", f2, refs.npy(f"{feat_tag}_feat2_{size}"), True) <= FEAT_TOL
        assert _maxdiff(f"{label} prob@{size}", prob, refs.npy(f"{prob_tag}_prob_{size}")) <= PROB_TOL
        torch.testing.assert_close(prob_features, prob, atol=1e-6, rtol=0)
        # the probabilities really differ between the inputs, so the check is not trivially met
        assert np.ptp(refs.npy(f"{prob_tag}_prob_{size}")) > 100 * PROB_TOL


# ============================================================================= Keras facts
def test_param_counts_and_layer_names_match_keras(refs):
    crop, full = build_model("crop"), build_model("full")
    n_tr = lambda m: sum(p.numel() for p in m.parameters() if p.requires_grad)  # noqa: E731
    stats = sum(b.numel() for n, b in crop.named_buffers() if n.endswith(("running_mean", "running_var")))
    assert n_tr(crop) == refs.tf2["crop_params"]["trainable"] == 8_139_833
    assert n_tr(full) == refs.tf2["full_params"]["trainable"] == 1_638_401
    assert sum(p.numel() for p in crop.parameters()) + stats == refs.tf2["crop_params"]["total"] == 9_737_529
    assert sum(1 for p in crop.parameters() if p.requires_grad) == refs.tf2["crop_params"]["trainable_tensors"]
    # the layer list: names, classes and what layers[150] is in Keras
    # (the input layer's auto-generated name depends on how many models the session built before)
    assert [n for n, _ in refs.tf2["qubvel_layers"]][1:] == list(KERAS_LAYER_NAMES)[1:]
    assert [c for _, c in refs.tf2["qubvel_layers"]] == [c for _, c in KERAS_LAYERS]
    assert refs.tf2["crop_backbone_layer_150"] == "model1_" + KERAS_LAYER_NAMES[FREEZE_INDEX]
    assert KERAS_LAYER_NAMES[FREEZE_INDEX] == "block5c_se_expand"
    b0 = EfficientNetB0()
    assert sum(p.numel() for p in b0.parameters()) + stats // 2 == refs.tf2["qubvel_params"]["total"]


# ============================================================================= parity
CRBL_CASES = [  # file, model type, reference features, reference probabilities, input sizes
    ("crop.h5", "crop", "crbl", "crbl", ("128", "odd")),
    ("crop.weights.h5", "crop", "crbl", "crbl", ("128", "odd")),
    ("full.h5", "full", "crbl", "crbl", ("128", "odd")),
    ("full.weights.h5", "full", "crbl", "crbl", ("128",)),
    ("crop_trained.weights.h5", "crop", "crop_trained", "crop_trained", ("128",)),
    ("full_trained.weights.h5", "full", "crbl", "full_trained", ("128",)),   # frozen backbones
]


@pytest.mark.parametrize("name,model_type,feat_tag,prob_tag,sizes", CRBL_CASES)
def test_crbl_parity(refs, name, model_type, feat_tag, prob_tag, sizes):
    sd, _ = refs.converted(name, model_type)
    _check_crbl(refs, _crbl(sd, model_type), feat_tag, prob_tag, sizes, label=name)


def test_cli_subprocess_converts_like_a_user(refs, scratch):
    out = scratch / "crbl_crop.pth"
    r = subprocess.run([sys.executable, str(CONVERTER), str(refs.file("crop.h5")), str(out),
                        "--model-type", "crop"], capture_output=True, text=True, cwd=scratch)
    assert r.returncode == 0, r.stderr
    assert "legacy save_weights layout" in r.stdout and "model type: crop" in r.stdout
    assert "backbone1 (imagenet) <- group 'EfficientNetB0_imagenetWeight': 309 tensors" in r.stdout
    assert "9,737,529 weight values" in r.stdout
    m = build_model("crop")
    load_weights_into(m, out)                           # common.io: weights_only + strict
    _check_crbl(refs, m.eval(), "crbl", "crbl", ("128",), label="cli crop.h5")
    # the in-process conversion of the same file gives the same tensors
    sd, _ = refs.converted("crop.h5", "crop")
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in sd.items())


BACKBONE_CASES = [  # file, reference tag, input sizes
    ("qubvel_notop.h5", "qubvel", ("128", "odd")),
    ("qubvel_notop.weights.h5", "qubvel", ("128", "odd")),
    ("k3_qubvel.weights.h5", "k3_qubvel", ("128",)),
    ("k3_qubvel.h5", "k3_qubvel", ("128",)),
    ("k3_apps.weights.h5", "k3_apps", ("128", "odd")),
    ("k3_apps.h5", "k3_apps", ("128", "odd")),
    ("k3_apps_imagenet.weights.h5", "k3_apps_imagenet", ("128",)),
    ("k3_apps_imagenet.h5", "k3_apps_imagenet", ("128",)),
]


@pytest.mark.parametrize("name,tag,sizes", BACKBONE_CASES)
def test_backbone_parity(refs, name, tag, sizes):
    if name.startswith("k3_") and refs.k3 is None:
        pytest.skip("Keras 3 is not installed")
    sd, lines = refs.converted(name)
    assert any("single EfficientNetB0" in line for line in lines)
    m = EfficientNetB0()
    m.load_state_dict(sd)
    m.eval()
    for size in sizes:
        x = refs.x128 if size == "128" else refs.xodd
        with torch.inference_mode():
            y = m(x)
        assert _maxdiff(f"{name} feat@{size}", y, refs.npy(f"{tag}_feat_{size}"), True) <= FEAT_TOL
    if tag.startswith("k3_apps"):
        assert not torch.equal(sd["input_scale"], torch.ones(3))    # preprocessing folded in
        assert any("imagenet Rescaling" in line for line in lines) == tag.endswith("imagenet")


def test_keras_applications_preprocessing_matters(refs):
    """Dropping the imagenet Rescaling (or the Normalization) must break parity: the test can fail."""
    if refs.k3 is None:
        pytest.skip("Keras 3 is not installed")
    plain, _ = refs.converted("k3_apps.weights.h5")
    inet, _ = refs.converted("k3_apps_imagenet.weights.h5")
    ref = refs.npy("k3_apps_imagenet_feat_128")
    for scale, shift in ((plain["input_scale"], plain["input_shift"]), (torch.ones(3), torch.zeros(3))):
        m = EfficientNetB0()
        m.load_state_dict({**inet, "input_scale": scale, "input_shift": shift})
        with torch.inference_mode():
            y = m.eval()(refs.x128).permute(0, 2, 3, 1).numpy()
        assert np.abs(y - ref).max() > 100 * FEAT_TOL
    # the imagenet file carries a group for the weightless extra Rescaling layer; that is how it is told apart
    with h5py.File(refs.file("k3_apps_imagenet.weights.h5"), "r") as f:
        assert "rescaling_1" in f["layers"] and len(f["layers/rescaling_1/vars"]) == 0


def test_keras_applications_odd_sizes(refs):
    """keras.applications pads like TF SAME only for a static input shape: built with input_shape=None,
    an odd-sized image gets the even-size padding and a different output size.  The torch model
    follows TF SAME (= the static-shape Keras model, checked in test_backbone_parity)."""
    if refs.k3 is None:
        pytest.skip("Keras 3 is not installed")
    with torch.inference_mode():
        ours = EfficientNetB0().eval()(refs.xodd)
    assert list(ours.shape) == [2, 1280, 5, 4]
    assert refs.k3["apps_dynamic_odd_shape"] != [2, 5, 4, 1280]
    assert list(refs.npy("k3_apps_feat_odd").shape) == [2, 5, 4, 1280]


# ============================================================================= crop / full detection
def test_legacy_weight_order_reveals_model_type(refs):
    """Verify in the Keras-written files that legacy weight_names list trainable weights first."""
    trainable = [(n, v) for i, (n, c) in enumerate(KERAS_LAYERS) if i >= FREEZE_INDEX
                 for v in {"Conv2D": ("kernel", "bias") if n.endswith(("se_reduce", "se_expand")) else
                           ("kernel",), "DepthwiseConv2D": ("depthwise_kernel",),
                           "BatchNormalization": ("gamma", "beta")}.get(c, ())]
    per_backbone = (refs.tf2["crop_params"]["trainable_tensors"] - 2) // 2
    assert len(trainable) == per_backbone == 73
    for fname, expect_first in (("crop.h5", trainable), ("full.h5", [("stem_conv", "kernel")])):
        with h5py.File(refs.file(fname), "r") as f:
            for group in ("EfficientNetB0_imagenetWeight", "EfficientNetB0_noisy-studentWeight"):
                names = _strs(f[group].attrs["weight_names"])
                assert [tuple(n[:-2].split("/")) for n in names[:len(expect_first)]] == expect_first
    # Keras itself loads legacy files by position: a crop-saved file does not fit the full model
    assert refs.tf2["keras_loads_crop_h5_into_full"].startswith("error")
    for fname, mtype, other in (("crop.h5", "crop", "full"), ("full.h5", "full", "crop")):
        _, lines = refs.converted(fname)
        assert any(line.startswith(f"model type: {mtype} (from the weight order") for line in lines)
        with pytest.raises(UserError, match=f"saved from the {mtype} model.*--model-type {other}"):
            convert(refs.file(fname), refs.path / "never.pth", other, log=lambda s: None)
        assert not (refs.path / "never.pth").exists()


def test_object_layout_model_type(refs):
    _, lines = refs.converted("crop.weights.h5", "full")      # the weights alone cannot tell
    assert any("model type: cannot be determined" in line and "using --model-type full" in line
               for line in lines)
    for fname, mtype, other in (("crop_trained.weights.h5", "crop", "full"),
                                ("full_trained.weights.h5", "full", "crop")):
        _, lines = refs.converted(fname, mtype)
        assert any(line.startswith(f"model type: {mtype} (from the optimizer state") for line in lines)
        assert any(line.startswith("skipped: group 'optimizer'") for line in lines)
        with pytest.raises(UserError, match=f"saved from the {mtype} model"):
            convert(refs.file(fname), refs.path / "never.pth", other, log=lambda s: None)


# ============================================================================= layout variants
def _strs(values) -> list[str]:
    """An h5py string-array attribute (Keras writes bytes or variable-length str, by version)."""
    return [v.decode() if isinstance(v, bytes) else str(v) for v in values]


def _copy(refs: Refs, name: str, scratch: Path) -> Path:
    dst = scratch / name
    shutil.copyfile(refs.file(name), dst)
    return dst


def _same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_split_name_attributes(refs, scratch):
    """Keras splits attributes over 64 KiB into layer_names0/1.., weight_names0/1..; both forms read."""
    path = _copy(refs, "crop.h5", scratch)
    with h5py.File(path, "r+") as f:
        for obj, attr in [(f, "layer_names")] + [(f[g], "weight_names") for g in f]:
            vals = obj.attrs[attr]
            del obj.attrs[attr]
            for i, chunk in enumerate(np.array_split(vals, 3)):
                obj.attrs[f"{attr}{i}"] = chunk
    sd = convert(path, scratch / "split.pth", "crop", log=lambda s: None)
    assert _same_state(sd, refs.converted("crop.h5", "crop")[0])


def _prefix_inner_names(f, group: str, prefix: str) -> None:
    g = f[group]
    names = _strs(g.attrs["weight_names"])
    new = [prefix + n for n in names]
    for old, nw in zip(names, new):
        g.require_group(nw.rsplit("/", 1)[0])
        g.move(old, nw)
    g.attrs["weight_names"] = np.array([n.encode() for n in new])


def test_prefixed_inner_names(refs, scratch):
    path = _copy(refs, "full.h5", scratch)
    with h5py.File(path, "r+") as f:
        _prefix_inner_names(f, "EfficientNetB0_imagenetWeight", "model1_")
        _prefix_inner_names(f, "EfficientNetB0_noisy-studentWeight", "model2_")
    sd = convert(path, scratch / "prefixed.pth", "full", log=lambda s: None)
    assert _same_state(sd, refs.converted("full.h5", "full")[0])
    # a prefix that contradicts the group name is an error, not a guess
    (scratch / "contradicting").mkdir()
    path2 = _copy(refs, "full.h5", scratch / "contradicting")
    with h5py.File(path2, "r+") as f:
        _prefix_inner_names(f, "EfficientNetB0_imagenetWeight", "model2_")
    with pytest.raises(UserError, match="disagree"):
        convert(path2, scratch / "bad.pth", None, log=lambda s: None)
    assert not (scratch / "bad.pth").exists()


@pytest.mark.parametrize("edit,message", [
    ("extra", "map to nothing: /stem_conv/stem_conv/extra:0"),
    ("unlisted", "map to nothing: /stem_bn/stem_bn/unlisted:0"),
    ("shape", r"stem_bn/gamma:0: shape \(31,\) does not fit stem_bn.weight \(32,\)"),
    ("missing", "1 model tensor.s. missing: block7a_project_bn/moving_variance"),
])
def test_every_tensor_is_accounted_for(refs, scratch, edit, message):
    path = _copy(refs, "qubvel_notop.h5", scratch)
    with h5py.File(path, "r+") as f:
        if edit == "extra":          # listed in weight_names, but no such variable in a Conv2D
            f["stem_conv/stem_conv/extra:0"] = np.zeros(3, np.float32)
            f["stem_conv"].attrs["weight_names"] = np.array([b"stem_conv/kernel:0", b"stem_conv/extra:0"])
        elif edit == "unlisted":     # in the file but not in weight_names
            f["stem_bn/stem_bn/unlisted:0"] = np.zeros(3, np.float32)
        elif edit == "shape":
            del f["stem_bn/stem_bn/gamma:0"]
            f["stem_bn/stem_bn/gamma:0"] = np.ones(31, np.float32)
        else:
            g = f["block7a_project_bn"]
            del g["block7a_project_bn/moving_variance:0"]
            g.attrs["weight_names"] = g.attrs["weight_names"][:-1]
    with pytest.raises(UserError, match=message):
        convert(path, scratch / "out.pth", None, log=lambda s: None)
    assert not (scratch / "out.pth").exists()


# ============================================================================= bad input
def _cli(argv, capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as e:
        run_cli(lambda: main([str(a) for a in argv]))
    captured = capsys.readouterr()
    return e.value.code, captured.out, captured.err


def _bad_inputs(refs: Refs, scratch: Path) -> dict[str, tuple[list, str, str]]:
    text = scratch / "notes.h5"
    text.write_text("this is not a Keras file\n")
    trunc = scratch / "truncated.h5"
    data = refs.file("qubvel_notop.h5").read_bytes()
    trunc.write_bytes(data[: len(data) // 2])
    trunc_new = scratch / "truncated.weights.h5"
    data = refs.file("crop.weights.h5").read_bytes()
    trunc_new.write_bytes(data[: len(data) // 3])
    empty = scratch / "empty.h5"
    empty.write_bytes(b"")
    out = scratch / "out.pth"
    return {  # name: (argv, path named in the message, message pattern)
        "not hdf5": ([text, out], str(text), "not an HDF5 file"),
        "truncated legacy": ([trunc, out], str(trunc), "truncated or corrupt"),
        "truncated object-path": ([trunc_new, out], str(trunc_new), "truncated or corrupt"),
        "empty": ([empty, out], str(empty), "empty"),
        "missing": ([scratch / "nope.h5", out], "nope.h5", "not found"),
        "other architecture (legacy)": ([refs.file("other.h5"), out], "other.h5", "no EfficientNetB0 / CRBL weights"),
        "other architecture (object-path)": ([refs.file("other.weights.h5"), out], "other.weights.h5",
                                             "does not match single EfficientNetB0"),
        "wrong model type": ([refs.file("crop.h5"), out, "--model-type", "full"], "crop.h5",
                             "saved from the crop model"),
        "model type for a backbone": ([refs.file("qubvel_notop.h5"), out, "--model-type", "crop"],
                                      "qubvel_notop.h5", "applies to whole CRBL files"),
        "output is a directory": ([refs.file("qubvel_notop.h5"), scratch], str(scratch), "is a folder"),
    }


def test_bad_inputs_give_one_clear_line(refs, scratch, capsys):
    for case, (argv, named, pattern) in _bad_inputs(refs, scratch).items():
        code, out, err = _cli(argv, capsys)
        assert code == 2, case
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), (case, err)
        assert named in lines[0] and pattern in lines[0], (case, lines[0])
        assert not (scratch / "out.pth").exists(), case
        assert not any(p.name.endswith(".tmp") for p in scratch.iterdir()), case


def test_failed_conversion_keeps_existing_output(refs, scratch, capsys):
    out = scratch / "model.pth"
    out.write_bytes(b"previous good file")
    code, _, err = _cli([refs.file("qubvel_notop.h5"), out], capsys)  # refused without --overwrite
    assert code == 2 and "already exists" in err and out.read_bytes() == b"previous good file"
    code, _, err = _cli([refs.file("other.weights.h5"), out, "--overwrite"], capsys)
    assert code == 2 and err.count("\n") == 1
    assert out.read_bytes() == b"previous good file"
    # ... and a successful one replaces it atomically
    code = run_cli(lambda: main([str(refs.file("qubvel_notop.h5")), str(out), "--overwrite"]))
    assert code is None
    assert set(torch.load(out, weights_only=True)) == set(EfficientNetB0().state_dict())


def test_bad_input_subprocess(refs, scratch):
    bad = scratch / "truncated.weights.h5"
    data = refs.file("full.weights.h5").read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    out = scratch / "out.pth"
    r = subprocess.run([sys.executable, str(CONVERTER), str(bad), str(out)], capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and r.stderr.startswith(f"error: {bad}:"), r.stderr
    assert not out.exists()
