"""scripts/convert_phaseformer.py and phaseformer.official: official-style files in, plain
state_dicts out, outputs equal to the original's; malicious pickles refused with nothing run."""
import io
import os
import pickle
import subprocess
import sys
import zipfile
from collections import OrderedDict
from pathlib import Path
from pickle import UnpicklingError

import pytest
import torch

import phaseformer
from common.io import UserError
from phaseformer.model import build_model
from phaseformer.official import read_weights
from phaseformer.safe_pickle import LEGACY_MAGIC, LEGACY_PROTOCOL, load_pickled

REF = Path(__file__).parent / "phaseformer_ref"
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REF))

MODULES = ("model_with_eca", "phaseformer")
GENUINE = ("whole_cuda_zip", "whole_cuda_legacy", "state_dict", "state_dict_module")
FIRST_ONLY = ("dataparallel", "state_dict_cuda_legacy")   # written for model_with_eca only
SPECTRO_MODULES = ("final_model", "final_model_AGSSF1")    # Spectroformer: Train.py's import, the model file


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Official-style files written by a separate process in which the transcription is registered
    as `model_with_eca` / `phaseformer` (this process never imports such a module)."""
    out = tmp_path_factory.mktemp("official")
    marker = out / "PWNED-nested"
    subprocess.run([sys.executable, str(REF / "make_official_files.py"), str(out), "--evil", str(marker), "--few",
                    "--spectro-modules", *SPECTRO_MODULES],
                   check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return out, marker


def _max_diff_to_reference(sd, reference_path):
    model = build_model().eval()
    model.load_state_dict(sd, strict=True)
    ref = torch.load(reference_path, weights_only=True)
    worst = 0.0
    with torch.no_grad():
        for x, r1, r2 in zip(ref["inputs"], ref["out_1x"], ref["out_2x"]):
            o1, o2 = model(x)
            worst = max(worst, (o1 - r1).abs().max().item(), (o2 - r2).abs().max().item())
    return worst


@pytest.mark.parametrize("module", MODULES)
def test_every_official_style_file_converts_with_output_parity(files, module):
    out, _ = files
    imported_before = set(sys.modules)
    for kind in GENUINE + (FIRST_ONLY if module == MODULES[0] else ()):
        sd, info = read_weights(out / f"{module}_{kind}.pth")
        assert _max_diff_to_reference(sd, out / f"{module}_reference.pt") <= 1e-4, kind
        if kind.startswith(("whole", "dataparallel")):
            assert info["kind"].startswith("whole pickled model") and f"{module}.Restormer" in info["kind"]
            assert info["format"] == ("legacy" if "legacy" in kind else "zip")
        if "cuda" in kind and kind.startswith("whole"):
            assert info["locations"] == {"cuda:0"}
        if kind in ("dataparallel", "state_dict_module"):
            assert info["stripped"] == ["module."]
    # nothing was imported to read them: no module of the original's name, nothing added to ours
    assert not {"model_with_eca"} & (set(sys.modules) - imported_before)
    assert not hasattr(phaseformer, "Restormer")


def test_the_gpu_files_really_claim_cuda(files):
    """The simulated release files are what a CPU-only user meets: a plain load fails on them."""
    out, _ = files
    with pytest.raises(RuntimeError, match="CUDA"):
        torch.load(out / "model_with_eca_state_dict_cuda_legacy.pth", weights_only=True)


def test_cli_converts_a_phaseformer_named_pickle_from_inside_the_repo(files, tmp_path, run_script):
    """cwd = the repo, where a plain torch.load would import *our* phaseformer package for the
    pickle's `phaseformer.Restormer`; the converter imports nothing of the file's."""
    out, _ = files
    dst = tmp_path / "converted.pth"
    res = run_script("scripts/convert_phaseformer.py", out / "phaseformer_whole_cuda_legacy.pth", dst,
                     env={"OMP_NUM_THREADS": "1"}, check=True)
    assert "whole pickled model (phaseformer.Restormer), legacy format, storages saved on cuda:0" in res.stdout
    assert "1,783,800 parameters" in res.stdout
    sd = torch.load(dst, weights_only=True)
    assert _max_diff_to_reference(sd, out / "phaseformer_reference.pt") <= 1e-4
    from scripts.convert_phaseformer import convert
    with pytest.raises(UserError, match="already exists"):
        convert(out / "phaseformer_state_dict.pth", dst)
    assert torch.equal(torch.load(dst, weights_only=True)["output.weight"], sd["output.weight"])


@pytest.mark.parametrize("module", SPECTRO_MODULES)
def test_spectroformer_files_are_detected_and_convert_with_output_parity(files, module, tmp_path):
    """Whole pickles of final_model.mymodel / final_model_AGSSF1.mymodel (CPU zip, cuda:0 legacy) and
    a module.-prefixed state_dict: detected as Spectroformer, outputs equal the original's."""
    out, _ = files
    imported_before = set(sys.modules)
    ref = torch.load(out / f"{module}_reference.pt", weights_only=True)
    first = module == SPECTRO_MODULES[0]
    kinds = ("whole_zip", "whole_cuda_legacy", "state_dict_module") if first else ("whole_cuda_legacy",)
    for kind in kinds:
        sd, info = read_weights(out / f"{module}_{kind}.pth")
        assert info["model"] == "spectroformer", kind
        model = build_model("spectroformer").eval()
        model.load_state_dict(sd, strict=True)
        with torch.no_grad():
            for x, r in zip(ref["inputs"], ref["out"]):
                assert (model(x) - r).abs().max() <= 1e-4, kind
        if kind.startswith("whole"):
            assert info["kind"] == f"whole pickled model ({module}.mymodel)"
            assert info["locations"] == ({"cuda:0"} if "cuda" in kind else {"cpu"})
            assert info["format"] == ("legacy" if "legacy" in kind else "zip")
    assert not set(SPECTRO_MODULES) & (set(sys.modules) - imported_before)
    # --model forces the other model: a one-line refusal saying what differs
    with pytest.raises(UserError, match=r"not Phaseformer \(model_with_eca.Restormer\) weights \(.*missing"):
        read_weights(out / f"{module}_whole_cuda_legacy.pth", "phaseformer")
    if first:
        from scripts.convert_phaseformer import main
        dst = tmp_path / "spectro.pth"
        main([str(out / f"{module}_whole_cuda_legacy.pth"), str(dst)])
        build_model("spectroformer").load_state_dict(torch.load(dst, weights_only=True), strict=True)
        with pytest.raises(UserError, match="names the global posix.system"):
            main([str(out / f"{module}_evil_nested_legacy.pth"), str(tmp_path / "evil_out.pth")])
        assert not (tmp_path / "evil_out.pth").exists()
        # a Spectroformer file into a built Phaseformer: refused, naming the right flag
        from phaseformer.official import load_weights
        with pytest.raises(UserError, match=r"holds Spectroformer .* \(use --model spectroformer\)"):
            load_weights(build_model(), dst)


def test_pickles_mixing_the_two_models_class_names_are_refused(tmp_path):
    """Each module name allows only its own model's classes."""
    for module, cls in (("final_model", "Restormer"), ("model_with_eca", "mymodel"), ("final_model", "ECA")):
        path = tmp_path / f"{module}_{cls}.pth"
        _torch_zip(path, f"c{module}\n{cls}\n)\x81.".encode())
        with pytest.raises(UserError, match=f"names the global {module}.{cls}"):
            read_weights(path)


# ---------------------------------------------------------------- malicious files
class Reduce:
    def __init__(self, fn, args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


def _torch_zip(path, data_pkl: bytes, records: dict | None = None):
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", data_pkl)
        for name, data in (records or {}).items():
            z.writestr(f"archive/{name}", data)
        z.writestr("archive/byteorder", "little")
        z.writestr("archive/version", "3\n")


def _legacy(path, body: bytes):
    head = b"".join(pickle.dumps(v, protocol=2) for v in
                    (LEGACY_MAGIC, LEGACY_PROTOCOL, {"protocol_version": 1001, "little_endian": True}))
    path.write_bytes(head + body)


def _malicious_files(tmp: Path, marker: Path) -> list[tuple[Path, str | None]]:
    """(file, global its refusal must name, or None when the file names only allowed globals)."""
    touch = f"touch {marker}"
    cases = []
    system = Reduce(os.system, (touch,))
    torch.save(system, tmp / "system.pth")
    cases.append((tmp / "system.pth", "posix.system"))
    torch.save({"weight": system}, tmp / "system_legacy.pth", _use_new_zipfile_serialization=False)
    cases.append((tmp / "system_legacy.pth", "posix.system"))
    torch.save(Reduce(eval, (f"open({str(marker)!r}, 'w')",)), tmp / "eval.pth", pickle_protocol=4)
    cases.append((tmp / "eval.pth", "builtins.eval"))              # protocol 4: STACK_GLOBAL
    # getattr(__import__('os'), 'system')(cmd), written by hand
    trick = (b"cbuiltins\ngetattr\n(cbuiltins\n__import__\n(Vos\ntRVsystem\ntR(V" + touch.encode()
             + b"\ntR.")
    _torch_zip(tmp / "getattr.pth", trick)
    cases.append((tmp / "getattr.pth", "builtins.getattr"))
    _legacy(tmp / "getattr_legacy.pth", trick)
    cases.append((tmp / "getattr_legacy.pth", "builtins.getattr"))
    # a nested reduce: an OrderedDict (allowed) whose value is os.system(...)
    nested = pickle.dumps(OrderedDict(weight=Reduce(OrderedDict, ([("x", system)],))), protocol=2)
    _torch_zip(tmp / "nested.pth", nested)
    cases.append((tmp / "nested.pth", "posix.system"))
    # an allowed class called with arguments (REDUCE instead of NEWOBJ)
    _torch_zip(tmp / "class_call.pth", b"cmodel_with_eca\nRestormer\n(V" + touch.encode() + b"\ntR.")
    cases.append((tmp / "class_call.pth", None))
    return cases


@pytest.mark.filterwarnings("ignore:Detected pickle protocol 4")
def test_malicious_pickles_are_refused_and_nothing_runs(files, tmp_path):
    out, nested_marker = files
    marker = tmp_path / "PWNED"
    cases = _malicious_files(tmp_path, marker)
    cases += [(out / "model_with_eca_evil_nested_zip.pth", "posix.system"),
              (out / "model_with_eca_evil_nested_legacy.pth", "posix.system")]
    for path, name in cases:
        with pytest.raises(UserError) as err:
            read_weights(path)
        msg = str(err.value)
        assert msg.startswith(str(path)) and "\n" not in msg
        if name is not None:
            assert f"names the global {name}" in msg and "nothing from the file was run" in msg, msg
        else:
            assert "corrupt or malformed checkpoint" in msg and "nothing from the file was run" in msg, msg
        assert not marker.exists() and not nested_marker.exists(), path


def test_converter_refuses_a_malicious_file_before_writing(files, tmp_path):
    out, marker = files
    from scripts.convert_phaseformer import main
    dst = tmp_path / "out.pth"
    with pytest.raises(UserError, match="names the global posix.system"):
        main([str(out / "model_with_eca_evil_nested_legacy.pth"), str(dst)])
    assert not dst.exists() and not marker.exists()


def test_other_models_corrupt_files_and_bad_outputs(files, tmp_path):
    out, _ = files
    other = tmp_path / "other.pth"
    torch.save(torch.nn.Conv2d(3, 8, 3).state_dict(), other)
    with pytest.raises(UserError, match=r"not Phaseformer \(model_with_eca.Restormer\) weights \(282 missing: .*2 unexpected: weight, bias"):
        read_weights(other)
    sd = torch.load(out / "model_with_eca_state_dict.pth", weights_only=True)
    sd["output.weight"] = torch.zeros(3, 16, 3, 3)
    torch.save(sd, tmp_path / "wrong_shape.pth")
    with pytest.raises(UserError, match=r"1 wrong: output.weight \(3, 16, 3, 3\) != \(3, 8, 3, 3\)"):
        read_weights(tmp_path / "wrong_shape.pth")
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(os.urandom(4096))
    with pytest.raises(UserError, match=r"not a PyTorch checkpoint \(binary data"):
        read_weights(corrupt)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes((out / "model_with_eca_whole_cuda_legacy.pth").read_bytes()[:200_000])
    with pytest.raises(UserError, match="corrupt or malformed checkpoint .*claims more data than the file holds"):
        read_weights(truncated)
    # a storage that claims more data than its record holds is refused before allocating it
    buf = io.BytesIO()
    torch.save(torch.zeros(4), buf)
    with zipfile.ZipFile(io.BytesIO(buf.getvalue())) as z:
        pkl = z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))
    _torch_zip(tmp_path / "huge.pth", pkl.replace(b"K\x04", b"J\x00\x00\x00\x40", 1), {"data/0": bytes(16)})
    with pytest.raises(UnpicklingError, match="does not hold 1073741824"):
        load_pickled(tmp_path / "huge.pth", ())
    with pytest.raises(UserError, match="corrupt or truncated checkpoint .*does not match expected size"):
        read_weights(tmp_path / "huge.pth")
    from scripts.convert_phaseformer import convert
    same = tmp_path / "same.pth"
    torch.save(sd, same)
    with pytest.raises(UserError, match="OUT .*same.pth is the input .*same.pth"):
        convert(same, same, overwrite=True)
