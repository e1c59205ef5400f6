"""Run CRBL models on images and write a CSV of path, probability, decision.

  python crbl/infer.py --model-type crop --weights best.pt images/ more.png
  python crbl/infer.py --weights runs/crbl/crop-*/best.pt --threshold val-f1 images/   # threshold from training
  python crbl/infer.py --model-type full --weights converted_full.pth labels.csv
  python crbl/infer.py --combined CROP.pt FULL.pt images/      # defect if crop > 0.01 or full > 0.5
  python crbl/infer.py --engine onnxruntime --onnx crbl_crop.onnx images/     # scripts/export_onnx.py
  python crbl/infer.py --weights best.pt val.csv --out review/preds.csv --explain --report   # maps + review page
  python crbl/infer.py --engine onnxruntime --combined crop.onnx full.onnx --providers DmlExecutionProvider,CPUExecutionProvider images/

Inputs are image files, folders (every .png/.jpg/.bmp/.tif inside), or CSVs with an image_path
column (relative to the CSV). When a CSV also has `impurity`, accuracy / F1 / ROC-AUC are printed.
Thresholds (defect if probability > threshold): a number, or `val-f1` / `val-youden`, the threshold
that maximised F1 / Youden's J on the validation set of the training run, stored in the checkpoint
by crbl/train.py (and copied into an exported ONNX file's metadata). Default: the original's 0.01
(crop) / 0.5 (full). --combined takes one for each model (--crop-threshold, --full-threshold; same
forms), each read from that model's own file; the pair flags an image when either model does, so it
flags at least what each model alone flags at its threshold.
--weights takes a training checkpoint (best.pt / last.pt) or a converted state_dict. Both engines
run the same graph (crbl/deploy.py) and write the same CSV.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

if __package__ in (None, ""):  # `python <folder>/<script>.py` from a checkout: import this checkout's packages
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.checkpoint import require_task
from common.cli import (BATCH_SIZE, ArgumentParser, add_max_pixels_arg, add_threads_arg, apply_runtime_args,
                        float_range)
from common.data import list_images
from common.device import AMP_CHOICES, amp_dtype, cpu_streams, select_device
from common.explain import add_explain_args
from common.io import (UserError, atomic_write_text, check_output_file, load_state_strict, load_untrusted,
                       refuse_output_over_inputs, run_cli, state_dict_from)
from common.metrics import classification_report, roc_auc
from common.onnx import OrtModel, add_engine_args, check_task, session
from crbl.data import preprocess, read_image_csv
from crbl.deploy import TASK, CRBLProbability
from crbl.explain import Review
from crbl.model import CRBL, DEFAULT_THRESHOLDS, MODEL_TYPES

PROBABILITY = float_range(0, 1, lo_open=True)
STORED = ("val-f1", "val-youden")   # --threshold names of the thresholds crbl/train.py stores


def threshold_arg(text: str):
    """--threshold: a probability in (0, 1), or val-f1 / val-youden (read from the model file)."""
    if text in STORED:
        return text
    try:
        return PROBABILITY(text)
    except argparse.ArgumentTypeError as e:
        raise argparse.ArgumentTypeError(f"{e}; or one of {', '.join(STORED)}") from None


def resolve_threshold(spec, stored: dict | None, model_type: str, path: Path, flag: str) -> tuple[float, str]:
    """(threshold, where it came from) for a --threshold value: None (the default), a number, or
    val-f1 / val-youden looked up in the thresholds `stored` with the model file at `path`."""
    if spec is None:
        return DEFAULT_THRESHOLDS[model_type], f"the default for a {model_type} model (the original's)"
    if not isinstance(spec, str):
        return float(spec), f"given with {flag}"
    key = spec.replace("-", "_")
    value = (stored or {}).get(key)
    if value is None or value != value:
        why = ("its validation set lacked a class" if value is not None else
               "it stores no validation thresholds (train it with crbl/train.py; converted weights have none)")
        raise UserError(f"{path}: {flag} {spec}: {why}; give a number instead")
    epoch = f", epoch {stored['epoch']}" if stored.get("epoch") is not None else ""
    crit = "F1" if key == "val_f1" else "Youden's J"
    return float(value), f"{spec}: maximised {crit} on the training run's {stored.get('n_val', '?')} validation " \
                         f"images{epoch}, stored in {path}"


def collect_inputs(inputs: list[Path]) -> tuple[list[Path], dict[Path, int]]:
    """Image paths in the order given, plus labels where a CSV provides them."""
    paths, labels = [], {}
    for item in inputs:
        if item.suffix.lower() == ".csv" and item.is_file():
            for path, label in read_image_csv(item, labels=False):
                paths.append(path)
                if label is not None:
                    labels[path] = label
        else:
            paths += list_images(item)
    return paths, labels


def load_model(weights: Path, expected_type: str | None, role: str) -> tuple[CRBL, str | None, dict | None]:
    """(model in eval mode, the model type stored with the weights or None for a converted file,
    the validation thresholds crbl/train.py stored or None).

    A training checkpoint knows whether it is a crop or a full model; running crop weights as full
    (or a swapped --combined pair) would give plausible-looking wrong probabilities."""
    model = CRBL()
    obj = load_untrusted(weights)
    require_task(obj, weights, "crbl", "a crbl/train.py checkpoint or weights converted by scripts/convert_h5.py")
    load_state_strict(model, state_dict_from(obj, weights), weights)
    obj = obj if isinstance(obj, dict) else {}
    cfg = obj.get("config") if isinstance(obj.get("config"), dict) else {}
    stored = cfg.get("model_type")
    if stored is not None and expected_type is not None and stored != expected_type:
        raise UserError(f"{weights}: holds a {stored} model, but {role} expects a {expected_type} model")
    extra = obj.get("extra") if isinstance(obj.get("extra"), dict) else {}
    thresholds = extra.get("thresholds") or None
    if thresholds is not None:
        thresholds = {**thresholds, "epoch": obj.get("epoch")}
    return model.eval(), stored, thresholds


def load_onnx(path: Path, expected_type: str | None, role: str, providers,
              threads: int) -> tuple[OrtModel, str, dict | None]:
    """(the exported graph, its model type, the validation thresholds copied from the checkpoint at
    export or None); a file of another task or model type is refused."""
    sess = session(path, providers, threads)
    meta = check_task(sess, path, TASK, "--model crop|full")
    stored = meta.get("model")
    if stored not in MODEL_TYPES:
        raise UserError(f"{path}: its metadata names no CRBL model type (model={stored!r})")
    if expected_type is not None and stored != expected_type:
        raise UserError(f"{path}: holds a {stored} model, but {role} expects a {expected_type} model")
    thresholds = json.loads(meta["val_thresholds"]) if meta.get("val_thresholds") else None
    return OrtModel(sess), stored, thresholds


@torch.inference_mode()
def predict(graph, model_type: str, paths: list[Path], device: torch.device, batch_size: int) -> torch.Tensor:
    """P(defect) per image; `graph` is CRBLProbability (PyTorch) or its exported OrtModel."""
    probs = []
    for i in tqdm(range(0, len(paths), batch_size), desc=f"{model_type} model", leave=False,
                  disable=len(paths) <= batch_size):
        x = torch.stack([preprocess(p, model_type) for p in paths[i:i + batch_size]]).to(device)
        probs.append(graph(x)[0].cpu())
    return torch.cat(probs)


def main(argv=None):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", type=Path, nargs="+", help="images, folders or CSVs")
    p.add_argument("--model-type", choices=MODEL_TYPES,
                   help="crop or full (read from a training checkpoint; needed for a converted file)")
    p.add_argument("--weights", type=Path)
    p.add_argument("--combined", type=Path, nargs=2, metavar=("CROP_WEIGHTS", "FULL_WEIGHTS"))
    p.add_argument("--threshold", type=threshold_arg,
                   help="defect if probability > this (single model): a number in (0, 1), or val-f1 / val-youden, the "
                        "threshold stored by crbl/train.py from its validation set (default 0.01 crop / 0.5 full)")
    p.add_argument("--crop-threshold", type=threshold_arg, help="--combined: the crop model's (same forms; default 0.01)")
    p.add_argument("--full-threshold", type=threshold_arg, help="--combined: the full model's (same forms; default 0.5)")
    p.add_argument("--out", type=Path, help="CSV to write (default runs/crbl/predictions-<time>.csv)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    p.add_argument("--batch-size", type=BATCH_SIZE, default=32)
    p.add_argument("--device", default="auto", help="PyTorch engine: auto | cpu | cuda[:N] | mps | directml")
    p.add_argument("--amp", default="off", choices=AMP_CHOICES,
                   help="PyTorch engine: the backbones under autocast (bf16 on CPUs with native bfloat16; the "
                        "bilinear head stays fp32; default off). Accuracy and speed vs fp32: README, Reduced precision")
    add_threads_arg(p)
    add_max_pixels_arg(p)
    add_engine_args(p, default_engine=None)
    add_explain_args(p)
    args = p.parse_args(argv)
    if args.engine is None:
        args.engine = "onnxruntime" if args.onnx is not None else "torch"
    ort = args.engine == "onnxruntime"
    single = args.onnx if ort else args.weights
    if ort and args.weights is not None:
        p.error("--engine onnxruntime runs an exported model: give --onnx FILE (or --combined CROP.onnx FULL.onnx), "
                "not --weights")
    if not ort and args.onnx is not None:
        p.error("--onnx needs --engine onnxruntime")
    if ort and args.amp != "off":
        p.error(f"--amp {args.amp}: PyTorch engine only (an exported file has its precision: export_onnx.py --int8)")
    if args.combined is None and single is None:
        p.error("give --onnx FILE (or --combined CROP.onnx FULL.onnx)" if ort else
                "give --weights (and --model-type for a converted file), or --combined CROP_WEIGHTS FULL_WEIGHTS")
    if args.combined is not None and (single is not None or args.threshold is not None
                                      or args.model_type is not None):
        p.error("--combined takes its own two model files and --crop-threshold / --full-threshold")
    if args.combined is None and (args.crop_threshold is not None or args.full_threshold is not None):
        p.error("--crop-threshold / --full-threshold are for --combined; give --threshold for one model")
    apply_runtime_args(args, reuse_memory=True)    # 1.03-1.2x for ~5 % more peak memory (common.device)
    out = check_output_file(args.out or Path("runs") / "crbl" / f"predictions-{time.strftime('%Y%m%d-%H%M%S')}.csv",
                            args.overwrite)

    paths, labels = collect_inputs(args.inputs)
    refuse_output_over_inputs([("inputs", [p for p in args.inputs if not p.is_dir()]), ("inputs", paths),
                               ("--weights", args.weights), ("--combined", args.combined), ("--onnx", args.onnx)],
                              files=[("--out", out)])
    review = Review(args, paths, labels, out.parent)    # --explain / --masks / --report: checked before any work
    if ort:
        def load(path, expected, role):
            return load_onnx(path, expected, role, args.providers, args.threads)
    else:
        device = select_device(args.device)
        streams = cpu_streams() if device.type == "cpu" else 1
        if streams > 1:
            print(f"CPU: {streams} streams (the two backbones at once) x {torch.get_num_threads()} thread(s)")
        dtype = amp_dtype(device, args.amp)
        if dtype is not None:
            print(f"autocast {str(dtype).removeprefix('torch.')} in the backbones (the head in fp32)")

        def load(path, expected, role):
            model, stored, thresholds = load_model(path, expected, role)
            return CRBLProbability(model, streams, dtype).eval(), stored, thresholds
    if args.combined:
        crop_m, _, crop_thr = load(args.combined[0], "crop", "--combined CROP_WEIGHTS FULL_WEIGHTS (first)")
        full_m, _, full_thr = load(args.combined[1], "full", "--combined CROP_WEIGHTS FULL_WEIGHTS (second)")
        t_crop, from_crop = resolve_threshold(args.crop_threshold, crop_thr, "crop", args.combined[0], "--crop-threshold")
        t_full, from_full = resolve_threshold(args.full_threshold, full_thr, "full", args.combined[1], "--full-threshold")
        print(f"thresholds: crop {t_crop:.4g} ({from_crop}); full {t_full:.4g} ({from_full}); "
              f"defect if crop > {t_crop:.4g} or full > {t_full:.4g}")
    else:
        model, stored, thresholds = load(single, args.model_type, f"--model-type {args.model_type}")
        if stored is None and args.model_type is None:
            raise UserError(f"{single}: converted weights do not say whether they are a crop or a full "
                            f"model: give --model-type")
        args.model_type = args.model_type or stored
        threshold, source = resolve_threshold(args.threshold, thresholds, args.model_type, single, "--threshold")
        print(f"threshold: defect if probability > {threshold:.4g} ({source})")
    if ort:
        device = torch.device("cpu")
    if args.combined:
        p_crop = predict(crop_m if ort else crop_m.to(device), "crop", paths, device, args.batch_size)
        p_full = predict(full_m if ort else full_m.to(device), "full", paths, device, args.batch_size)
        flags = (p_crop > t_crop) | (p_full > t_full)
        header = ["path", "prob_crop", "prob_full", "decision"]
        rows = [[str(q), f"{a:.6g}", f"{b:.6g}", "defect" if f else "normal"]
                for q, a, b, f in zip(paths, p_crop.tolist(), p_full.tolist(), flags.tolist())]
        score = torch.maximum(p_crop / t_crop, p_full / t_full)
        rule = (f"defect if crop > {t_crop:.4g} ({from_crop}) or full > {t_full:.4g} ({from_full}); score = "
                f"max(crop / {t_crop:.4g}, full / {t_full:.4g}), flagged above 1", 1.0)
    else:
        prob = predict(model if ort else model.to(device), args.model_type, paths, device, args.batch_size)
        flags = prob > threshold
        header = ["path", "probability", "decision"]
        rows = [[str(q), f"{v:.6g}", "defect" if f else "normal"] for q, v, f in zip(paths, prob.tolist(), flags.tolist())]
        score = prob
        rule = (f"probability > {threshold:.4g} ({source})", threshold)

    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(header)
    w.writerows(rows)
    atomic_write_text(out, buf.getvalue())
    which = (f"crop > {t_crop:.4g} or full > {t_full:.4g}" if args.combined else
             f"probability > {threshold:.4g}")
    print(f"{len(paths)} image(s): {int(flags.sum())} flagged as defect ({which})")
    if labels and len(labels) == len(paths):
        y = torch.tensor([labels[q] for q in paths])
        r = classification_report(y, flags.long(), 2)
        print(f"labels found: accuracy={r['accuracy']:.4f} f1={r['per_class']['f1'][1]:.4f} "
              f"roc_auc={roc_auc(y, score):.4f}")
    print(f"predictions written to {out}")
    if review.active:
        nets = {} if ort else {"crop": crop_m, "full": full_m} if args.combined else {args.model_type: model}
        review.finish(nets, device, score, flags, header, rows, rule)


if __name__ == "__main__":
    sys.exit(run_cli(main))
