"""Export a trained or converted model to ONNX, checked against PyTorch before it is written.

  python scripts/export_onnx.py --task crbl --weights runs/crbl/crop-*/best.pt --out crbl_crop.onnx --dynamic-batch
  python scripts/export_onnx.py --task crbl --weights runs/crbl/crop-*/best.pt --out crop_int8.onnx --dynamic-batch --int8 --calib val.csv
  python scripts/export_onnx.py --task crbl --weights converted_full.pth --model full --out crbl_full.onnx
  python scripts/export_onnx.py --task battery_ct --weights runs/battery_ct/hdcnn-*/best.pt --out hdcnn.onnx
  python scripts/export_onnx.py --task battery_ct --weights deeplab_seg.pth --model deeplab_seg --size 640 640 --out seg.onnx
  python scripts/export_onnx.py --task colorize --weights runs/colorize/improved_unet-*/best.pt --out colorize.onnx --dynamic-size
  python scripts/export_onnx.py --task spectral --weights runs/spectral/cnn_xattn-*/best.pt --out xattn.onnx
  python scripts/export_onnx.py --task spectral --weights cnn_gru_best.pt --config gru.yaml --out gru.onnx
  python scripts/export_onnx.py --task phaseformer --weights runs/phaseformer/*/best.pt --out pf.onnx --dynamic-size
  python scripts/export_onnx.py --task phaseformer --weights uieb.pth --head 2x --size 512 512 --out pf_2x.onnx
  python scripts/export_onnx.py --task phaseformer --weights final_model_AGSSF1.pth --model spectroformer --out sf.onnx --dynamic-size

The file holds the same graph infer.py runs, pre- and post-processing included (the input is the
image in [0, 1]; normalisation, softmax / sigmoid / decision rules are inside), and metadata that
documents it (input layout and range, output meaning, class names, thresholds). It is checked with
onnx.checker, run with ONNX Runtime on the CPU on inputs that look like the task's data (images of
its built-in generator, preprocessed as infer.py does; spectral: its structures) and compared with
PyTorch; it is written (atomically) only if max |ONNX Runtime - PyTorch| <= tolerance * (max |PyTorch|
+ 0.1) for every output. Run it with
`infer.py --engine onnxruntime --onnx FILE`, or from any ONNX Runtime application.
"""
from __future__ import annotations

import argparse
import importlib
import inspect
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # `python <folder>/<script>.py` from a checkout: import this checkout's packages
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.cli import BATCH_SIZE, ArgumentParser, add_threads_arg, apply_runtime_args, float_range, int_range
from common.io import UserError, check_output_file, refuse_output_over_inputs, run_cli
from common.onnx import DEFAULT_OPSET, MAX_OPSET, compare, export, parity_limit, write
from common.quantize import add_int8_args, check_int8_args, int8_from_args, load_calibration

# task -> module with export_spec(weights, model, size) -> common.onnx.ExportSpec
TASKS = {"crbl": "crbl.deploy", "battery_ct": "battery_ct.deploy", "spectral": "spectral.deploy",
         "colorize": "colorize.deploy", "phaseformer": "phaseformer.deploy"}


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", required=True, choices=sorted(TASKS))
    p.add_argument("--weights", type=Path, required=True, help="a training checkpoint (best.pt) or a converted .pth")
    p.add_argument("--out", type=Path, required=True, help="the .onnx file to write")
    p.add_argument("--model", help="crbl: crop | full; battery_ct: the model name (read from a training "
                                   "checkpoint; needed for a converted file); spectral, colorize: checked against the "
                                   "weights; phaseformer: phaseformer | spectroformer (detected from "
                                   "the weights)")
    p.add_argument("--config", type=Path,
                   help="spectral: the YAML config of a CR_recon checkpoint (as infer.py --config)")
    p.add_argument("--head", choices=("1x", "2x"),
                   help="phaseformer: the output head the graph returns (default 1x, as infer.py's default)")
    p.add_argument("--size", type=int_range(16, 8192), nargs=2, metavar=("H", "W"),
                   help="input height and width (default: the model's size: crbl 128x128, battery_ct the "
                        "checkpoint's --image-size, deeplab_seg 640x640, the default segmentation window; "
                        "spectral 128x128; phaseformer 256x256, multiples of 8)")
    p.add_argument("--dynamic-batch", action="store_true", help="any batch size (default: fixed, --batch-size)")
    p.add_argument("--batch-size", type=BATCH_SIZE, default=1, help="the fixed batch size without --dynamic-batch")
    p.add_argument("--dynamic-size", action="store_true",
                   help="any input height and width (battery_ct deeplab_seg and the classifiers, spectral cnn_gru, "
                        "colorize, phaseformer (multiples of 8); not "
                        "crbl, ae or cnn_xattn, whose graphs hold size-dependent constants)")
    p.add_argument("--opset", type=int_range(13, MAX_OPSET), default=DEFAULT_OPSET)
    p.add_argument("--tolerance", type=float_range(0, 1, lo_open=True), default=None,
                   help="relative tolerance: refuse to write if max |ONNX Runtime - PyTorch| exceeds this times "
                        "(max |PyTorch| + 0.1), per output (default: the model's, 1e-5 for CRBL probabilities, 1e-4 "
                        "for the others)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    add_threads_arg(p)
    add_int8_args(p)
    args = p.parse_args(argv)
    check_int8_args(p, args)
    return args


def main(argv=None):
    args = parse_args(argv)
    apply_runtime_args(args)
    refuse_output_over_inputs([("--weights", args.weights), ("--config", args.config), ("--calib", args.calib)],
                              files=[("--out", args.out)])
    out = check_output_file(args.out, args.overwrite)
    deploy = importlib.import_module(TASKS[args.task])
    extra = {k: v for k, v in (("config", args.config), ("head", args.head)) if v is not None}
    takes = inspect.signature(deploy.export_spec).parameters
    if "config" in extra and "config" not in takes:
        raise UserError(f"--config: --task {args.task} reads its model from --weights (and --model), not a config")
    if "head" in extra and "head" not in takes:
        raise UserError(f"--head: --task {args.task} has one output head (phaseformer has two)")
    spec = deploy.export_spec(args.weights, args.model, tuple(args.size) if args.size else None, **extra)
    calib = load_calibration(args, deploy, spec) if args.int8 else None
    tolerance = args.tolerance or spec.tolerance
    batch = 2 if args.dynamic_batch else args.batch_size   # 2: a traced batch of 1 can hide batch-size bugs
    t0 = time.perf_counter()
    data = export(spec, batch=batch, dynamic_batch=args.dynamic_batch, opset=args.opset, dynamic_size=args.dynamic_size)
    h, w = spec.metadata["image_size"]
    print(f"exported {args.task} {spec.metadata['model']} (opset {args.opset}, "
          f"{'dynamic batch' if args.dynamic_batch else f'batch {args.batch_size}'}, "
          f"input {'any size, traced at ' if args.dynamic_size else ''}{h}x{w}) in {time.perf_counter() - t0:.1f} s; "
          f"onnx.checker: ok")
    batches = (1, 3) if args.dynamic_batch else (args.batch_size,)
    step = max(spec.size_multiple, 16)          # a second, non-square size for a --dynamic-size graph
    sizes = (None, (h + 2 * step, w - step if w > step else w + step)) if args.dynamic_size else (None,)
    worst = compare(data, spec, batches, sizes=sizes)
    shown = " and ".join(f"{s[0]}x{s[1]}" for s in sizes[1:])
    limits = {n: parity_limit(scale, tolerance, spec.scale_floor) for n, (_, scale) in worst.items()}
    for name, (d, scale) in worst.items():
        print(f"  {name}: max |ONNX Runtime - PyTorch| {d:.2e}, limit {limits[name]:.2e} = {tolerance:g} x "
              f"(max |PyTorch| {scale:.3g} + {spec.scale_floor:g}) (batch {', '.join(map(str, batches))}"
              f"{'; also at ' + shown if shown else ''}; data-like inputs)")
    bad = {n: d for n, (d, _) in worst.items() if not d <= limits[n]}
    if bad:
        raise UserError(f"{out}: not written: ONNX Runtime disagrees with PyTorch beyond the tolerance {tolerance:g} "
                        f"({', '.join(f'{n} {d:.2e} > {limits[n]:.2e}' for n, d in bad.items())})")
    if args.int8:
        data = int8_from_args(args, spec, data, calib)
    write(data, out)
    for note in spec.notes:
        print(note)
    print(f"ONNX model written to {out} ({len(data) / 2**20:.1f} MB; {'int8, ' if args.int8 else ''}"
          f"fp32 export within tolerance {tolerance:g}); run it with "
          f"python {args.task}/infer.py --engine onnxruntime --onnx {out} ...")


if __name__ == "__main__":
    sys.exit(run_cli(main))
