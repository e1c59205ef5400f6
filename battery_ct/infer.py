"""Evaluate a battery CT model on a split, predict images, or segment them.

  python battery_ct/infer.py --weights runs/.../best.pt --split test.txt --out eval/     # metrics
  python battery_ct/infer.py --weights runs/.../best.pt --data DIR                      # DIR/test.txt
  python battery_ct/infer.py --weights runs/.../best.pt                                 # built-in test split
  python battery_ct/infer.py --weights best.pt --images scans/ one.jpg --out preds/     # predictions only
  python battery_ct/infer.py --weights converted.pth --model resnet18 --image-size 512 --split test.txt
  python battery_ct/infer.py --weights seg.pth --task segment --crop slide --images scans/ --out masks/
  python battery_ct/infer.py --engine onnxruntime --onnx hdcnn.onnx --split test.txt     # scripts/export_onnx.py
  python battery_ct/infer.py --weights best.pt --explain --report --out review/   # maps, localisation, review page
  python battery_ct/infer.py --weights seg.pth --task segment --images scans/ --explain --report --out seg-review/

With labels (a split file) it writes metrics.json (accuracy, macro/weighted F1, per-class
precision/recall/F1/support, confusion matrix, one-vs-rest ROC-AUC, normal-vs-defect summary),
confusion_matrix.png and predictions.csv (per image: label, prediction, class probabilities);
with --images only predictions.csv. The model is rebuilt from the checkpoint's config; a plain
state_dict (a converted file) needs --model (and --image-size, default 512).
ae checkpoints: the anomaly score is the per-image MSE; an image is a defect when score >= the
threshold stored in the checkpoint by train.py (Youden's J on val), or --threshold.
--task segment runs a deeplab_seg state_dict (scripts/convert_deeplab.py --task segment) on
ImageNet-normalised RGB images at their own size: --crop slide averages the logits of --window px
windows every --stride px (images smaller than a window are padded with black), --crop whole runs
the image at once. Writes <name>_mask.png (class indices) and <name>_overlay.png per image, and
segments.csv (per image: each class's share of the pixels and the largest 1 - P(background)).
--engine onnxruntime --onnx FILE runs an exported model (the same graph, battery_ct/deploy.py, with
the same outputs and files); its size, model and threshold come from the file.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

if __package__ in (None, ""):  # `python <folder>/<script>.py` from a checkout: import this checkout's packages
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from battery_ct.data import BUILTIN_VERSION, SplitDataset, class_counts, make_builtin_dataset, read_split
from battery_ct.deploy import BatteryGraph
from battery_ct.model import (CLASS_NAMES, DEFECT_CLASSES, MODEL_NAMES, build_model,
                              fuse_for_inference)
from battery_ct.train import TASK, normalization
from common.checkpoint import require_task
from common.cli import (BATCH_SIZE, WORKERS, ArgumentParser, add_max_pixels_arg, add_threads_arg,
                        apply_runtime_args, float_range, int_range)
from common.data import ensure_builtin, list_images
from common.device import AMP_CHOICES, amp_dtype, select_device
from common.explain import add_explain_args
from common.io import (UserError, atomic_write_text, check_output_dir, image_to_tensor, load_image,
                       load_untrusted, load_weights_into, make_output_dir, refuse_output_over_inputs, run_cli,
                       save_image, state_dict_from)
from common.metrics import classification_report, roc_auc, roc_auc_ovr, youden_threshold
from common.report import plot_confusion
from common.onnx import OrtModel, add_engine_args, open_exported, resolve_engine

PALETTE = np.array([[0, 0, 0], [230, 25, 75], [60, 180, 75], [0, 130, 200], [255, 225, 25], [245, 130, 48],
                    [145, 30, 180], [70, 240, 240], [240, 50, 230]], dtype=np.uint8)


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", type=Path, help="best.pt / last.pt, or a plain state_dict (PyTorch engine)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--split", type=Path, help="labelled split file (path<TAB>label)")
    src.add_argument("--data", type=Path, help="folder with test.txt")
    src.add_argument("--images", type=Path, nargs="+", help="image files and/or folders (no labels)")
    p.add_argument("--root", type=Path, help="base folder for relative paths in the split file")
    p.add_argument("--model", choices=MODEL_NAMES, help="needed for a plain state_dict; checked against a checkpoint")
    p.add_argument("--image-size", type=int_range(32, 8192), default=None,
                   help="input size for a plain state_dict (default 512); overrides a checkpoint's size")
    p.add_argument("--threshold", type=float_range(0, 1e6), default=None, help="ae: override the stored anomaly threshold")
    p.add_argument("--task", choices=("classify", "segment"), default=None,
                   help="default: segment for deeplab_seg weights, else classify")
    p.add_argument("--crop", choices=("slide", "whole"), default="slide", help="segmentation: windows or whole image")
    p.add_argument("--window", type=int_range(16, 8192), default=640, help="segmentation window size (px)")
    p.add_argument("--stride", type=int_range(1, 8192), default=480, help="segmentation window stride (px, <= --window)")
    p.add_argument("--out", type=Path, default=None, help="output folder (default runs/battery_ct/infer-<time>)")
    p.add_argument("--overwrite", action="store_true", help="replace earlier outputs in --out")
    p.add_argument("--batch-size", type=BATCH_SIZE, default=32)
    p.add_argument("--workers", type=WORKERS, default=2)
    p.add_argument("--device", default="auto", help="PyTorch engine: auto | cpu | cuda[:N] | mps | directml")
    p.add_argument("--amp", default="off", choices=AMP_CHOICES,
                   help="PyTorch engine: the network under autocast (bf16 on CPUs with native bfloat16; softmax, "
                        "the AE's error and the outputs in fp32; default off)")
    add_threads_arg(p)
    add_max_pixels_arg(p)
    add_engine_args(p, default_engine=None)
    add_explain_args(p, CLASS_NAMES)
    args = p.parse_args(argv)
    resolve_engine(p, args)
    if args.engine == "onnxruntime" and args.amp != "off":
        p.error(f"--amp {args.amp}: PyTorch engine only (an exported file has its precision: export_onnx.py --int8)")
    if args.engine == "onnxruntime" and args.image_size is not None:
        p.error("--image-size: an ONNX model has its own input size (export another with --size)")
    return args


# ---------------------------------------------------------------- model
def load_model(args, fuse: bool = True) -> tuple[torch.nn.Module, dict, dict]:
    """(model in eval mode on CPU, config, extra) from a training checkpoint or a plain state_dict.
    `fuse`: the DRN-D-54 models with BN folded into the convolutions (fuse_for_inference)."""
    path = args.weights
    obj = load_untrusted(path)
    require_task(obj, path, TASK, "a battery_ct/train.py checkpoint or a converted state_dict")
    if isinstance(obj, dict) and "format_version" in obj and isinstance(obj.get("model"), dict):
        cfg, extra = obj.get("config") or {}, obj.get("extra") or {}
        name = cfg.get("model")
        if cfg.get("task") != TASK or name not in MODEL_NAMES:
            raise UserError(f"{path}: not a battery_ct checkpoint (its config names no battery_ct model)")
        if args.model is not None and args.model != name:
            raise UserError(f"{path}: checkpoint holds a {name} model, not --model {args.model}")
        if args.image_size is not None and args.image_size != cfg.get("image_size"):
            print(f"note: --image-size {args.image_size} overrides the training size {cfg.get('image_size')}")
        cfg = {"model": name, "num_classes": int(cfg.get("num_classes", len(CLASS_NAMES))),
               "image_size": int(args.image_size or cfg.get("image_size", 512)),
               "normalize": cfg.get("normalize", normalization(name)), "dropout": cfg.get("dropout")}
        model = build_model(name, num_classes=cfg["num_classes"], dropout=cfg["dropout"])
        try:
            model.load_state_dict(obj["model"])
        except RuntimeError as e:
            raise UserError(f"{path}: weights do not fit a {name} model ({str(e).strip().splitlines()[0]})") from None
    else:
        if args.model is None:
            raise UserError(f"{path}: a plain state_dict (no training config): give --model NAME")
        sd = state_dict_from(obj, path)
        name = args.model
        n = len(CLASS_NAMES)
        if name == "deeplab_seg":
            head = sd.get("decoder.last_conv.8.weight")
            n = int(head.shape[0]) if head is not None and head.ndim == 4 else 4
        cfg = {"model": name, "num_classes": n, "image_size": args.image_size or 512,
               "normalize": normalization(name), "dropout": None}
        extra = {}
        model = build_model(name, num_classes=None if name == "ae" else n)
        load_weights_into(model, path)
    if fuse and name in ("deeplabv3", "deeplab_seg"):  # the heavy DRN-D-54 models: BN folded, channels_last
        model = fuse_for_inference(model)
    return model.eval(), cfg, extra


def load_onnx(args) -> tuple[OrtModel, dict, dict]:
    """(the exported graph, config, extra) from an exported file; a file of another task or model is refused."""
    sess, meta, name = open_exported(args, TASK, "--model NAME", "model", MODEL_NAMES, args.model)
    graph = OrtModel(sess)
    h, w = graph.shape[1:3]
    dynamic = not isinstance(h, int)            # exported with --dynamic-size
    if dynamic:
        h, w = json.loads(meta.get("image_size", "[512, 512]"))
    if h != w:
        raise UserError(f"{args.onnx}: infer.py feeds square images, but the model takes {h}x{w} "
                        f"(export it with --size N N)")
    cfg = {"model": name, "image_size": h, "normalize": meta.get("normalization_in_graph"),
           "num_classes": int(meta.get("num_classes", len(CLASS_NAMES))), "dropout": None, "dynamic_size": dynamic}
    extra = {}
    if "threshold" in meta:
        extra = {"threshold": float(meta["threshold"]), "threshold_method": meta.get("threshold_method", "stored")}
    return graph, cfg, extra


# ---------------------------------------------------------------- inputs
def resolve_inputs(args) -> tuple[list[tuple[Path, int]], bool, str]:
    """(items, labelled?, source description)."""
    if args.images:
        return [(p, 0) for item in args.images for p in list_images(item)], False, "images"
    if args.split is not None:
        split = args.split
    elif args.data is not None:
        if not args.data.is_dir():
            raise UserError(f"--data {args.data}: not a folder (expected test.txt inside)")
        split = args.data / "test.txt"
    else:
        split = ensure_builtin(TASK, BUILTIN_VERSION, make_builtin_dataset) / "test.txt"
    return read_split(split, args.root), True, str(split)


# ---------------------------------------------------------------- classification / anomaly
@torch.inference_mode()
def run_classifier(graph, cfg, items, device, batch_size, workers):
    """probs (N,C), preds (N,), coarse probs or None; ae: scores (N,) as probs, preds None.
    `graph` is the deployed graph (BatteryGraph, or its exported OrtModel): images in [0, 1] in."""
    name = cfg["model"]
    ds = SplitDataset(items, cfg["image_size"], with_meta=name == "late_fusion", normalize="none")
    loader = DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=workers)
    probs, preds, coarse = [], [], []
    for x, meta, _ in tqdm(loader, desc=name, leave=False, disable=len(loader) <= 1):
        out = graph(x.to(device), meta.to(device)) if name == "late_fusion" else graph(x.to(device))
        probs.append(out[0].cpu())
        if name != "ae":
            preds.append(out[1].cpu())
        if len(out) > 2:
            coarse.append(out[2].cpu())
    return torch.cat(probs), (torch.cat(preds) if preds else None), (torch.cat(coarse) if coarse else None)


def write_csv(path: Path, header: list[str], rows: list[list]) -> None:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(header)
    w.writerows(rows)
    atomic_write_text(path, buf.getvalue())


def fmt(v: float) -> str:
    return f"{v:.9g}"


def classifier_report(cfg, items, probs, preds, coarse, source, weights) -> dict:
    y = torch.tensor([lab for _, lab in items])
    r = classification_report(y, preds, cfg["num_classes"])
    pc = r["per_class"]
    cm = r["confusion_matrix"]
    names = list(CLASS_NAMES[:cfg["num_classes"]])
    is_def = np.isin(y.numpy(), DEFECT_CLASSES)
    pred_def = np.isin(preds.numpy(), DEFECT_CLASSES)
    tp, fp = int((is_def & pred_def).sum()), int((~is_def & pred_def).sum())
    fn, tn = int((is_def & ~pred_def).sum()), int((~is_def & ~pred_def).sum())
    out = {
        "checkpoint": str(weights), "model": cfg["model"], "split": source, "image_size": cfg["image_size"],
        "timestamp": time.strftime("%Y-%m-%d %H:%M:%S"), "num_classes": cfg["num_classes"], "class_names": names,
        "total_samples": len(items), "class_counts": class_counts(items)[:cfg["num_classes"]],
        "metrics": {"accuracy": r["accuracy"], "f1_macro": r["f1_macro"], "f1_weighted": r["f1_weighted"],
                    "precision_macro": r["precision_macro"], "recall_macro": r["recall_macro"],
                    "precision_weighted": r["precision_weighted"], "recall_weighted": r["recall_weighted"],
                    "roc_auc_ovr": roc_auc_ovr(y, probs),
                    "loss": float(F.nll_loss(probs.clamp_min(1e-12).log(), y))},
        "per_class_metrics": {n: {"precision": float(pc["precision"][i]), "recall": float(pc["recall"][i]),
                                  "f1": float(pc["f1"][i]), "support": int(pc["support"][i])}
                              for i, n in enumerate(names)},
        "confusion_matrix": cm.tolist(),
        "binary_normal_vs_defect": {
            "accuracy": (tp + tn) / max(1, len(items)), "defect_recall": tp / max(1, tp + fn),
            "defect_precision": tp / max(1, tp + fp), "normal_recall": tn / max(1, tn + fp),
            "confusion_matrix": [[tn, fp], [fn, tp]]},
    }
    if coarse is not None:
        cy, cp = torch.from_numpy(is_def).long(), coarse.argmax(1)
        cr = classification_report(cy, cp, 2)
        out["coarse_metrics"] = {"accuracy": cr["accuracy"], "f1_macro": cr["f1_macro"]}
    return out


def ae_report(cfg, items, scores, threshold, source_thr, source, weights) -> dict:
    y = np.isin([lab for _, lab in items], DEFECT_CLASSES)
    s = scores.numpy().astype(np.float64)
    pred = s >= threshold
    r = classification_report(torch.from_numpy(y).long(), torch.from_numpy(pred).long(), 2)
    out = {"checkpoint": str(weights), "model": "ae", "split": source, "image_size": cfg["image_size"],
           "timestamp": time.strftime("%Y-%m-%d %H:%M:%S"), "threshold": threshold, "threshold_source": source_thr,
           "total_samples": len(items), "n_normal": int((~y).sum()), "n_defect": int(y.sum()),
           "metrics": {"roc_auc": roc_auc(y, s), "accuracy": r["accuracy"],
                       "defect_precision": float(r["per_class"]["precision"][1]),
                       "defect_recall": float(r["per_class"]["recall"][1]),
                       "defect_f1": float(r["per_class"]["f1"][1]), "f1_macro": r["f1_macro"]},
           "score_stats": {"normal_mean": float(s[~y].mean()) if (~y).any() else None,
                           "normal_std": float(s[~y].std(ddof=1)) if (~y).sum() > 1 else None,
                           "defect_mean": float(s[y].mean()) if y.any() else None,
                           "defect_std": float(s[y].std(ddof=1)) if y.sum() > 1 else None},
           "class_names": ["normal", "defect"], "confusion_matrix": r["confusion_matrix"].tolist()}
    if y.any() and (~y).any():
        out["optimal_threshold_on_this_split"] = youden_threshold(y, s)[0]
    return out


def refuse_over_inputs(args, items, out: Path, files: list[str]) -> None:
    refuse_output_over_inputs([("--weights", args.weights), ("--onnx", args.onnx), ("--split", args.split),
                               ("--data", args.data), ("--images", args.images), ("--images", [p for p, _ in items])],
                              folders=[("--out", out, files)])


def main_classify(args, model, cfg, extra, device):
    items, labelled, source = resolve_inputs(args)
    name = cfg["model"]
    out = args.out or Path("runs") / TASK / f"infer-{time.strftime('%Y%m%d-%H%M%S')}"
    files = ["predictions.csv"] + (["metrics.json", "confusion_matrix.png"] if labelled else [])
    refuse_over_inputs(args, items, out, files)
    check_output_dir(out, files, args.overwrite)
    threshold, thr_source = None, None
    if name == "ae":
        if args.threshold is not None:
            threshold, thr_source = args.threshold, "--threshold"
        elif extra.get("threshold") is not None:
            threshold = float(extra["threshold"])
            thr_source = f"checkpoint ({extra.get('threshold_method', 'stored')})"
        else:
            raise UserError(f"{args.weights or args.onnx}: no anomaly threshold stored (train.py writes it into best.pt); "
                            f"pass --threshold")
    if cfg["image_size"] < 32 or (name == "ae" and cfg["image_size"] % 16):
        raise UserError(f"image size {cfg['image_size']} does not suit {name}")

    probs, preds, coarse = run_classifier(model, cfg, items, device, args.batch_size, args.workers)
    make_output_dir(out)
    paths = [str(p) for p, _ in items]
    if name == "ae":
        flags = (probs.double() >= threshold).tolist()
        header = ["path"] + (["label", "label_name", "is_defect"] if labelled else []) + ["score", "pred", "decision"]
        rows = [[p] + ([lab, CLASS_NAMES[lab], int(lab in DEFECT_CLASSES)] if labelled else [])
                + [fmt(s), int(f), "defect" if f else "normal"]
                for (p, (_, lab), s, f) in zip(paths, items, probs.tolist(), flags)]
        header.append("threshold")
        rows = [r + [fmt(threshold)] for r in rows]
        print(f"{len(items)} image(s): {sum(flags)} flagged as defect (score >= {threshold:.6g}, {thr_source})")
    else:
        names = list(CLASS_NAMES[:cfg["num_classes"]])
        header = ["path"] + (["label", "label_name"] if labelled else []) + ["pred", "pred_name"] \
            + [f"prob_{n}" for n in names]
        rows = [[p] + ([lab, names[lab]] if labelled else []) + [int(k), names[int(k)]] + [fmt(v) for v in pr]
                for p, (_, lab), k, pr in zip(paths, items, preds.tolist(), probs.tolist())]
        if coarse is not None:  # HD-CNN: the coarse head's defect probability as well
            header.append("prob_coarse_defect")
            rows = [r + [fmt(c)] for r, c in zip(rows, coarse[:, 1].tolist())]
    write_csv(out / "predictions.csv", header, rows)
    if labelled:
        if name == "ae":
            rep = ae_report(cfg, items, probs, threshold, thr_source, source, args.weights or args.onnx)
            cm_names = ["normal", "defect"]
            auc = rep["metrics"]["roc_auc"]
            print(f"ROC-AUC {auc:.4f}, accuracy {rep['metrics']['accuracy']:.4f}, defect F1 "
                  f"{rep['metrics']['defect_f1']:.4f} on {len(items)} images ({rep['n_normal']} normal / "
                  f"{rep['n_defect']} defect)")
        else:
            rep = classifier_report(cfg, items, probs, preds, coarse, source, args.weights or args.onnx)
            cm_names = rep["class_names"]
            m = rep["metrics"]
            print(f"accuracy {m['accuracy']:.4f}, F1 macro {m['f1_macro']:.4f}, weighted {m['f1_weighted']:.4f}, "
                  f"ROC-AUC (ovr) {m['roc_auc_ovr']:.4f} on {len(items)} images")
            for n, v in rep["per_class_metrics"].items():
                print(f"  {n:22s} precision {v['precision']:.3f} recall {v['recall']:.3f} f1 {v['f1']:.3f} "
                      f"support {v['support']}")
        atomic_write_text(out / "metrics.json", json.dumps(rep, indent=2) + "\n")
        plot_confusion(out / "confusion_matrix.png", np.asarray(rep["confusion_matrix"]), cm_names,
                       f"{name} on {Path(source).name}", xlabel="predicted", ylabel="true")
    print(f"outputs written to {out}: {', '.join(files)}")
    return out


# ---------------------------------------------------------------- segmentation
def window_starts(n: int, window: int, stride: int) -> list[int]:
    """Window offsets covering 0..n (n >= window): every `stride`, plus one flush with the end."""
    starts = list(range(0, n - window + 1, stride))
    if starts[-1] != n - window:
        starts.append(n - window)
    return starts


def sliding_logits(model, x: torch.Tensor, window: int, stride: int, pad_value: torch.Tensor,
                   batch_size: int = 4) -> torch.Tensor:
    """Per-pixel logits (1,C,H,W) for one normalised image x (1,3,H,W): windows of `window` px every
    `stride` px; where windows overlap their logits are averaged. An image smaller than a window is
    padded at the bottom/right with `pad_value` (per channel) and the result cropped back."""
    _, c, h, w = x.shape
    hp, wp = max(h, window), max(w, window)
    if (hp, wp) != (h, w):
        xp = pad_value.view(1, c, 1, 1).to(x).expand(1, c, hp, wp).clone()
        xp[..., :h, :w] = x
        x = xp
    boxes = [(y0, x0) for y0 in window_starts(hp, window, stride) for x0 in window_starts(wp, window, stride)]
    acc, count = None, torch.zeros(1, 1, hp, wp, device=x.device)
    for i in range(0, len(boxes), batch_size):
        chunk = boxes[i:i + batch_size]
        out = model(torch.cat([x[..., y0:y0 + window, x0:x0 + window] for y0, x0 in chunk])).float()
        if acc is None:
            acc = torch.zeros(1, out.shape[1], hp, wp, device=x.device)
        for (y0, x0), o in zip(chunk, out):
            acc[0, :, y0:y0 + window, x0:x0 + window] += o
            count[0, :, y0:y0 + window, x0:x0 + window] += 1
    return (acc / count)[..., :h, :w]


def overlay(rgb: np.ndarray, mask: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Colour every non-background (class > 0) pixel with its class colour, blended over the image."""
    colours = PALETTE[mask % len(PALETTE)].astype(np.float32)
    out = rgb.astype(np.float32)
    fg = mask > 0
    out[fg] = (1 - alpha) * out[fg] + alpha * colours[fg]
    return np.clip(out, 0, 255).round().astype(np.uint8)


def main_segment(args, graph, cfg, device, review=None):
    source_file = args.weights or args.onnx
    if cfg["model"] != "deeplab_seg":
        raise UserError(f"{source_file}: --task segment needs deeplab_seg weights "
                        f"(scripts/convert_deeplab.py --task segment), not {cfg['model']}")
    fixed = args.engine == "onnxruntime" and not cfg.get("dynamic_size")
    if fixed and args.crop == "whole":
        raise UserError(f"{args.onnx}: the model was exported for {cfg['image_size']}px windows: use --crop slide "
                        f"--window {cfg['image_size']}, or export it with --dynamic-size")
    if fixed and args.window != cfg["image_size"]:
        raise UserError(f"--window {args.window}: {args.onnx} takes {cfg['image_size']}px windows: "
                        f"pass --window {cfg['image_size']} (or export it with --size {args.window} {args.window})")
    if args.stride > args.window:
        raise UserError(f"--stride {args.stride} must not exceed --window {args.window} (pixels would be skipped)")
    items, _, source = resolve_inputs(args)
    paths = [p for p, _ in items]
    out = args.out or Path("runs") / TASK / f"segment-{time.strftime('%Y%m%d-%H%M%S')}"
    stems = [p.stem for p in paths]
    if len(set(stems)) != len(stems):
        stems = [f"{i:05d}_{s}" for i, s in enumerate(stems)]
    files = [f"{s}_{kind}.png" for s in stems for kind in ("mask", "overlay")] + ["segments.csv"]
    refuse_over_inputs(args, items, out, files)
    check_output_dir(out, files, args.overwrite)
    pad = torch.zeros(3)  # black (the graph normalises)
    n = cfg["num_classes"]
    rows = []
    make_output_dir(out)
    writer = review.writer() if review is not None and args.explain else None
    for path, stem in tqdm(list(zip(paths, stems)), desc="segment", leave=False, disable=len(paths) <= 1):
        im = load_image(path, "RGB")
        rgb = np.asarray(im)
        x = image_to_tensor(im).unsqueeze(0).to(device)
        with torch.inference_mode():
            logits = graph(x)[0] if args.crop == "whole" else \
                sliding_logits(lambda b: graph(b)[0], x, args.window, args.stride, pad.to(device), args.batch_size)
        mask = logits.argmax(1)[0].cpu().numpy().astype(np.uint8)
        save_image(out / f"{stem}_mask.png", mask)
        save_image(out / f"{stem}_overlay.png", overlay(rgb, mask))
        if writer is not None:      # --explain: the defect-class probability map
            writer.add(stem, rgb, review.segment_map(logits), review.segment_title(path))
        frac = np.bincount(mask.ravel(), minlength=n)[:n] / mask.size
        peak = float(1 - logits.float().softmax(1)[0, 0].min())     # the largest P(not background)
        rows.append([str(path), f"{stem}_mask.png", f"{stem}_overlay.png"] + [f"{v:.6f}" for v in frac]
                    + [f"{peak:.6f}"])
    write_csv(out / "segments.csv", ["path", "mask", "overlay"] + [f"fraction_class{i}" for i in range(n)]
              + ["max_defect_probability"], rows)
    how = "whole image" if args.crop == "whole" else f"sliding window {args.window}, stride {args.stride}"
    print(f"{len(paths)} image(s) segmented ({how}; {n} classes, class 0 drawn as background) from {source}")
    print(f"outputs written to {out}: <name>_mask.png (class indices), <name>_overlay.png, segments.csv")
    return out


def main(argv=None):
    args = parse_args(argv)
    apply_runtime_args(args)
    refuse_over_inputs(args, [], args.out, [])   # before the model is read; the output names are checked later
    if args.engine == "onnxruntime":
        graph, cfg, extra = load_onnx(args)
        device = torch.device("cpu")     # ONNX Runtime takes and returns host memory; the provider picks the device
    else:
        model, cfg, extra = load_model(args)
        device = select_device(args.device)
        graph = BatteryGraph(model, cfg["model"], cfg["normalize"], amp_dtype(device, args.amp)).to(device).eval()
    task = args.task or ("segment" if cfg["model"] == "deeplab_seg" else "classify")
    if task == "classify" and cfg["model"] == "deeplab_seg":
        raise UserError(f"{args.weights or args.onnx}: deeplab_seg is a segmentation model: use --task segment")
    review = None
    if args.explain or args.report:     # checked before any work; the maps and the page come after
        from battery_ct.explain import Review
        kind = "segment" if task == "segment" else "infer"
        args.out = args.out or Path("runs") / TASK / f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}"
        review = Review(args, cfg, *resolve_inputs(args)[:2], task, extra)
    if task == "segment":
        out = main_segment(args, graph, cfg, device, review)
        if review is not None:
            review.finish_segment()
        return out
    out = main_classify(args, graph, cfg, extra, device)
    if review is not None:
        unfused = load_model(args, fuse=False)[0].to(device) if args.explain and cfg["model"] == "deeplabv3" else None
        review.finish(unfused or (None if args.engine == "onnxruntime" else model), device)
    return out


if __name__ == "__main__":
    sys.exit(run_cli(main))
