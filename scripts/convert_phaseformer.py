"""Convert official Phaseformer or Spectroformer weights into a plain state_dict for phaseformer.model.build_model(NAME).

    python scripts/convert_phaseformer.py IN OUT [--model phaseformer|spectroformer] [--overwrite]

The model is detected from IN (the pickled class, or the state_dict's keys); --model overrides.
IN is any of:
- an official release file (`checkpoints/UIEB/best.pth`, ...): a whole pickled model
  (`torch.save(model)`) of class model_with_eca.Restormer, or phaseformer.Restormer when saved from
  the training script's repository; usually saved on a GPU; zip or legacy format;
- an official Spectroformer file: a whole pickled model saved by its Train.py (class
  final_model.mymodel) or under the model file's name (final_model_AGSSF1.mymodel), on a GPU or
  not, zip or legacy format;
- a training-script state_dict (`netG_model_epoch_N.pth`), with or without a `module.` prefix.
Nothing in IN is run: state_dicts are read with torch.load(weights_only=True), whole models with an
unpickler that allows exactly the globals such a file needs (its module classes become inert
records whose parameters are read out; nothing is imported) and refuses any other global by name.
OUT is written atomically, only after the weights were checked against the model (every key and
shape); load it with torch.load(OUT, weights_only=True) and load_state_dict(strict=True).

Note: the Phaseformer release weights were trained on [-1, 1] inputs at 512 px and are meant for the 2x head
(phaseformer/infer.py --preset official does exactly that). Spectroformer's official files also
take [-1, 1] inputs and have one output (infer.py --preset official picks it).
"""
from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # `python <folder>/<script>.py` from a checkout: import this checkout's packages
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.cli import ArgumentParser
from common.io import atomic_torch_save, check_output_file, refuse_output_over_inputs, run_cli
from phaseformer.model import MODEL_NAMES, build_model
from phaseformer.official import read_weights


def convert(src: Path, dst: Path, overwrite: bool = False, model: str | None = None) -> dict:
    refuse_output_over_inputs([("IN", src)], files=[("OUT", dst)])
    check_output_file(dst, overwrite, flag="OUT")
    sd, info = read_weights(src, model)
    build_model(info["model"]).load_state_dict(sd, strict=True)  # the file we write is known to load
    atomic_torch_save(sd, dst)
    info["tensors"] = len(sd)
    info["parameters"] = sum(v.numel() for v in sd.values())
    return info


def main(argv=None) -> None:
    ap = ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("input", type=Path, help="official best.pth, or a netG_model_epoch_N.pth state_dict")
    ap.add_argument("output", type=Path, help="plain state_dict to write")
    ap.add_argument("--model", choices=MODEL_NAMES, default=None,
                    help="which model IN holds (default: detected from the file)")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    args = ap.parse_args(argv)
    info = convert(args.input, args.output, args.overwrite, args.model)
    where = ", ".join(sorted(info["locations"])) or "n/a"
    print(f"read {args.input}: {info['kind']}"
          + (f", {info['format']} format, storages saved on {where} (loaded on the CPU)" if info["format"] else "")
          + (f", prefix {' + '.join(info['stripped'])} removed" if info["stripped"] else ""))
    print(f"wrote {args.output}: {info['model']}, {info['tensors']} tensors, {info['parameters']:,} parameters; "
          f"load with build_model({info['model']!r})")


if __name__ == "__main__":
    run_cli(main)
