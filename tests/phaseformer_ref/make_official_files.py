"""Write files that look like the official Phaseformer's, from the transcription in official_model.py.

    python make_official_files.py OUT_DIR [--seed 0] [--sizes 16x24 32x40]

For each module name the originals used (`model_with_eca` for the release, `phaseformer` for the
training script's copy) the transcription is registered under that name, so pickles record exactly
the globals a genuine file records, and this process never imports our `phaseformer` package.
Files, per module name M:
  M_whole_zip.pth / M_whole_legacy.pth        torch.save(model), zip and legacy formats
  M_whole_cuda_zip.pth / M_whole_cuda_legacy.pth   same, storages recorded as saved from cuda:0
  M_dataparallel.pth                          torch.save(DataParallel(model))
  M_state_dict.pth / M_state_dict_module.pth  state_dicts without / with DataParallel's module. prefix
  M_state_dict_cuda_legacy.pth                legacy-format state_dict from cuda:0
  M_reference.pt                              inputs and both outputs of the model (plain tensors)
With --evil MARKER, also M_evil_nested_{zip,legacy}.pth: a genuine-looking whole model with one
extra attribute whose unpickling would run os.system("touch MARKER").

With --spectro-modules NAME..., Spectroformer files from official_spectroformer.py registered under
each NAME (`final_model`, what the official Train.py imports; `final_model_AGSSF1`, the model file):
  S_whole_zip.pth (saved on the CPU; with --few for the first name only), S_whole_cuda_legacy.pth
  (cuda:0, legacy format),
  S_reference.pt (inputs and outputs, sizes --spectro-sizes); for the first name also
  S_state_dict_module.pth and, with --evil, S_evil_nested_legacy.pth.
"""
import argparse
import importlib.util
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def register_transcription(module_name, source="official_model.py"):
    spec = importlib.util.spec_from_file_location(module_name, HERE / source)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module


class RunsACommand:
    """Pickles as os.system(command): what a malicious checkpoint hides inside a model."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        import os
        return os.system, (self.command,)


def save_as_if_on_gpu(obj, path, legacy):
    """torch.save with every storage's location recorded as cuda:0 (what a release file holds)."""
    real = torch.serialization.location_tag
    torch.serialization.location_tag = lambda storage: "cuda:0"
    try:
        torch.save(obj, path, _use_new_zipfile_serialization=not legacy)
    finally:
        torch.serialization.location_tag = real


def main():
    p = argparse.ArgumentParser()
    p.add_argument("out", type=Path)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sizes", nargs="+", default=["16x24", "32x40"])
    p.add_argument("--modules", nargs="*", default=["model_with_eca", "phaseformer"])
    p.add_argument("--evil", default=None, help="marker file the nested-evil pickles would create")
    p.add_argument("--few", action="store_true",
                   help="the tests' set: both formats from cuda:0 and both state_dict prefixes per module name; "
                        "DataParallel, the legacy cuda:0 state_dict and the evil files for the first only")
    p.add_argument("--spectro-modules", nargs="*", default=[])
    p.add_argument("--spectro-sizes", nargs="+", default=["16x16", "32x24"])
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(args.modules):
        official = register_transcription(name)
        model = official.trained_looking(official.Restormer(), args.seed + i).eval()
        assert type(model).__module__ == name
        out, every = args.out, not args.few or i == 0
        if not args.few:
            torch.save(model, out / f"{name}_whole_zip.pth")
            torch.save(model, out / f"{name}_whole_legacy.pth", _use_new_zipfile_serialization=False)
        save_as_if_on_gpu(model, out / f"{name}_whole_cuda_zip.pth", legacy=False)
        save_as_if_on_gpu(model, out / f"{name}_whole_cuda_legacy.pth", legacy=True)
        sd = model.state_dict()
        torch.save(sd, out / f"{name}_state_dict.pth")
        torch.save({f"module.{k}": v for k, v in sd.items()}, out / f"{name}_state_dict_module.pth")
        if every:
            torch.save(torch.nn.DataParallel(model), out / f"{name}_dataparallel.pth")
            save_as_if_on_gpu(sd, out / f"{name}_state_dict_cuda_legacy.pth", legacy=True)
        g = torch.Generator().manual_seed(100 + i)
        inputs = [torch.rand(2, 3, *map(int, s.split("x")), generator=g) for s in args.sizes]
        with torch.no_grad():
            outs = [model(x) for x in inputs]
        torch.save({"inputs": inputs, "out_1x": [o[0] for o in outs], "out_2x": [o[1] for o in outs]},
                   out / f"{name}_reference.pt")
        if args.evil and every:
            model.hooks_config = RunsACommand(f"touch {args.evil}")
            torch.save(model, out / f"{name}_evil_nested_zip.pth")
            torch.save(model, out / f"{name}_evil_nested_legacy.pth", _use_new_zipfile_serialization=False)
        del sys.modules[name]
    for i, name in enumerate(args.spectro_modules):
        official = register_transcription(name, "official_spectroformer.py")
        model = official.trained_looking(official.mymodel(), args.seed + 10 + i).eval()
        assert type(model).__module__ == name
        out = args.out
        if i == 0 or not args.few:
            torch.save(model, out / f"{name}_whole_zip.pth")
        save_as_if_on_gpu(model, out / f"{name}_whole_cuda_legacy.pth", legacy=True)
        if i == 0:
            torch.save({f"module.{k}": v for k, v in model.state_dict().items()},
                       out / f"{name}_state_dict_module.pth")
        g = torch.Generator().manual_seed(200 + i)
        inputs = [torch.rand(1, 3, *map(int, s.split("x")), generator=g) for s in args.spectro_sizes]
        with torch.no_grad():
            outs = [model(x) for x in inputs]
        torch.save({"inputs": inputs, "out": outs}, out / f"{name}_reference.pt")
        if args.evil and i == 0:
            model.hooks_config = RunsACommand(f"touch {args.evil}")
            torch.save(model, out / f"{name}_evil_nested_legacy.pth", _use_new_zipfile_serialization=False)
        del sys.modules[name]
    print("ok")


if __name__ == "__main__":
    main()
