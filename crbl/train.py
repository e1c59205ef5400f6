"""Train a CRBL crop or full model.

  python crbl/train.py --model-type crop                       # built-in demo data
  python crbl/train.py --model-type full --data DIR --init converted_full.pth
  python crbl/train.py --model-type crop --data DIR --backbone-weights imagenet.pth noisy_student.pth

DIR holds train.csv and val.csv (`image_path,impurity`, paths relative to the CSV).
Every epoch scores the validation set at the decision threshold (--threshold, default the original's
0.01 crop / 0.5 full) and finds the thresholds that maximise F1 and Youden's J on it; best.pt and
last.pt store both (extra['thresholds']) for `infer.py --threshold val-f1|val-youden`.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

if __package__ in (None, ""):  # `python <folder>/<script>.py` from a checkout: import this checkout's packages
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import cli
from common.cli import add_common_args, float_range, setup_run
from common.data import ensure_builtin, eval_loader, train_loader
from common.checkpoint import load_checkpoint, require_task, unwrap
from common.distributed import all_gather_cat, cleanup, wrap_model
from common.io import UserError, load_state_strict, load_untrusted, load_weights_into, run_cli, state_dict_from
from common.metrics import best_threshold, classification_report, roc_auc
from common.trainer import Trainer
from crbl.data import BUILTIN_VERSION, CRBLDataset, make_builtin_dataset, read_labels
from crbl.model import DEFAULT_THRESHOLDS, MODEL_TYPES, build_model


DEMO_EPOCHS = 6


def parse_args(argv=None):
    p = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-type", required=True, choices=MODEL_TYPES,
                   help="crop: layers[150:] of both backbones + head train; full: head only")
    add_common_args(p, epochs=None, batch_size=32, lr=1e-4)
    p.add_argument("--weight-decay", type=cli.WEIGHT_DECAY, default=1e-6)
    p.add_argument("--init", type=Path, help="converted whole-CRBL weights (scripts/convert_h5.py)")
    p.add_argument("--backbone-weights", type=Path, nargs=2, metavar=("IMAGENET", "NOISY_STUDENT"),
                   help="two converted single-backbone notop files")
    p.add_argument("--label-smoothing", type=float_range(0, 1, hi_open=True), default=0.0,
                   help="Keras-style: y*(1-e) + e/2")
    p.add_argument("--class-weights", default="balanced",
                   help="'balanced' (n / (2 n_c)), 'none', or 'w0,w1'")
    p.add_argument("--threshold", type=float_range(0, 1, lo_open=True), default=None,
                   help="decision threshold for the metrics (default 0.01 crop / 0.5 full)")
    p.add_argument("--patience", type=cli.EPOCHS, default=10, help="early stopping on val_loss")
    p.add_argument("--plateau-patience", type=cli.NONNEG_EPOCHS, default=2, help="ReduceLROnPlateau(0.5) patience")
    return cli.parse_args(p, argv, task="crbl",
                          used=lambda ckpt: {"threshold": ckpt["config"].get("decision_threshold")})


def class_weights(spec: str, labels: torch.Tensor) -> torch.Tensor:
    if spec == "none":
        return torch.ones(2)
    if spec == "balanced":
        counts = torch.bincount(labels.long(), minlength=2).float()
        if (counts == 0).any():
            raise UserError("--class-weights balanced: the training set has only one class")
        return counts.sum() / (2 * counts)
    try:
        w = torch.tensor([float(v) for v in spec.split(",")])
    except ValueError:
        w = torch.tensor([])
    if w.numel() != 2 or not (w > 0).all() or not torch.isfinite(w).all():
        raise UserError(f"--class-weights {spec!r}: expected 'balanced', 'none' or two positive numbers 'w0,w1'")
    return w


def bce_loss(logits, targets, weights, smoothing: float):
    smoothed = targets * (1 - smoothing) + 0.5 * smoothing
    per_sample = F.binary_cross_entropy_with_logits(logits.float(), smoothed, reduction="none")
    return (per_sample * weights[targets.long()]).mean()


def read_init(args) -> dict | None:
    """The --init weights, read and checked before the run folder is made."""
    if args.init and args.backbone_weights:
        raise UserError("--init and --backbone-weights are alternatives; give one")
    if not args.init or args.resume is not None:
        return None
    obj = load_untrusted(args.init)
    require_task(obj, args.init, "crbl", "a crbl/train.py checkpoint or weights converted by scripts/convert_h5.py")
    return state_dict_from(obj, args.init)


def load_init_weights(model, args, init_sd: dict | None = None) -> None:
    if args.init and args.backbone_weights:
        raise UserError("--init and --backbone-weights are alternatives; give one")
    if args.resume is not None:
        return  # the checkpoint brings the weights
    if args.init:
        load_state_strict(model, init_sd if init_sd is not None else read_init(args), args.init)
        print(f"initialised from {args.init}")
    elif args.backbone_weights:
        for backbone, path in zip((model.backbone1, model.backbone2), args.backbone_weights):
            load_weights_into(backbone, path)
        print(f"backbones initialised from {args.backbone_weights[0]} and {args.backbone_weights[1]}")
    else:
        print("note: backbones start from random weights (give --init or --backbone-weights for real use)")


@torch.no_grad()
def calibrate_batchnorm(model, loader, device, max_batches: int = 8) -> int:
    """Set every BatchNorm's moving statistics to the mean/variance of its inputs over a few
    training batches. Only for backbones that start from random weights: a pretrained backbone
    brings meaningful statistics, a random one has mean 0 / variance 1, which frozen (inference-
    mode) layers would apply to activations of a very different scale."""
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    saved = [(m.momentum, m.training) for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None          # cumulative average over the calibration batches
        m.train()
    seen = 0
    for i, (x, _) in enumerate(loader):
        if i == max_batches:
            break
        model.forward_features(x.to(device))
        seen += len(x)
    for m, (momentum, training) in zip(bns, saved):
        m.momentum = momentum
        m.train(training)
    return seen


def binary_metrics(y: torch.Tensor, flags: torch.Tensor) -> dict:
    """accuracy, precision / recall / F1 of the defect class, fraction flagged."""
    r = classification_report(y.long(), flags.long(), 2)
    return {"accuracy": r["accuracy"], "precision": float(r["per_class"]["precision"][1]),
            "recall": float(r["per_class"]["recall"][1]), "f1": float(r["per_class"]["f1"][1]),
            "flagged": float(flags.float().mean())}


def validation_thresholds(y: torch.Tensor, prob: torch.Tensor, default: float, majority: int) -> dict:
    """The thresholds maximising F1 and Youden's J on these validation probabilities (defect if
    probability > threshold), and the metrics at the default threshold, at each of them and of the
    baseline that always answers the training set's majority class. A threshold is nan when the
    validation set lacks one of the classes."""
    out = {"default": default, "n_val": len(y), "roc_auc": roc_auc(y, prob), "majority": majority,
           "metrics": {"majority": binary_metrics(y, torch.full_like(y, majority, dtype=torch.bool))}}
    for name, criterion in (("val_f1", "f1"), ("val_youden", "youden")):
        out[name] = best_threshold(y, prob, criterion)[0]
    for name in ("default", "val_f1", "val_youden"):
        t = out[name]
        out["metrics"][name] = binary_metrics(y, prob > t) if t == t else None
    return out


def print_summary(out_dir: Path, threshold: float, n_val: int) -> None:
    """The best epoch's validation metrics at the default and the val-F1 threshold, next to the
    majority-class baseline, and where the outputs are."""
    best_path = out_dir / "best.pt"
    if not best_path.is_file():
        print(f"no best.pt in {out_dir}: no validation score improved")
        return
    ckpt = load_checkpoint(best_path)
    t = ckpt["extra"].get("thresholds") or {}
    if not t:
        print(f"{best_path}: no validation thresholds stored (a checkpoint from an older version)")
        return
    print(f"summary, validation set ({n_val} images) at best.pt (epoch {ckpt['epoch']}), ROC-AUC "
          f"{t['roc_auc']:.3f} (0.5 = chance):")
    print(f"  {'decision':<34} {'accuracy':>8} {'precision':>9} {'recall':>6} {'F1':>6} {'flagged':>7}")
    rows = [(f"probability > {threshold:g} (default)", t["metrics"]["default"])]
    if t["metrics"]["val_f1"] is not None:
        rows.append((f"probability > {t['val_f1']:.4g} (val-f1)", t["metrics"]["val_f1"]))
        rows.append((f"probability > {t['val_youden']:.4g} (val-youden)", t["metrics"]["val_youden"]))
    rows.append((f"majority class ({'defect' if t['majority'] else 'normal'}) always", t["metrics"]["majority"]))
    for name, m in rows:
        print(f"  {name:<34} {m['accuracy']:>8.3f} {m['precision']:>9.3f} {m['recall']:>6.3f} {m['f1']:>6.3f} "
              f"{m['flagged']:>7.1%}")
    if t["metrics"]["val_f1"] is not None:
        print("  (the val thresholds were chosen on these same images, so their scores are optimistic; "
              "judge them on other labelled images with crbl/infer.py)")
    print(f"outputs in {out_dir}: best.pt and last.pt (weights + the val thresholds), log.csv, loss_curve.png")
    print(f"use: python crbl/infer.py --weights {best_path} --threshold val-f1 IMAGES...   "
          f"(or --threshold val-youden, or a number; default {threshold:g})")


def main(argv=None):
    args = parse_args(argv)
    if args.epochs is None:  # the original's 30, or a one-minute demo on the built-in data
        args.epochs = 30 if args.data is not None else DEMO_EPOCHS
    init_sd = read_init(args)
    run = setup_run(args, "crbl", args.model_type)
    data_dir = args.data or ensure_builtin("crbl", BUILTIN_VERSION, make_builtin_dataset)
    if args.data is None and run.info.is_main:
        print(f"built-in demo: {args.epochs} epochs (give --epochs to change)")
    train_csv, val_csv = Path(data_dir) / "train.csv", Path(data_dir) / "val.csv"
    train_set = CRBLDataset(read_labels(train_csv), args.model_type, augment=True)
    val_set = CRBLDataset(read_labels(val_csv), args.model_type)
    if run.info.is_main:
        print(f"data: {len(train_set)} train / {len(val_set)} val images from {data_dir} "
              f"({int(train_set.labels.sum())} / {int(val_set.labels.sum())} with impurity)")

    model = build_model(args.model_type)
    load_init_weights(model, args, init_sd)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if run.info.is_main:
        print(f"model: CRBL {args.model_type}, {n_train:,} trainable parameters")
    model = wrap_model(model.to(run.device), run.device, run.info, channels_last=args.channels_last)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=args.lr, weight_decay=args.weight_decay)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=args.plateau_patience)
    weights = class_weights(args.class_weights, train_set.labels).to(run.device)
    threshold = DEFAULT_THRESHOLDS[args.model_type] if args.threshold is None else args.threshold
    loader = train_loader(train_set, args.batch_size, seed=args.seed, workers=args.workers, info=run.info)
    val_loader = eval_loader(val_set, args.batch_size, workers=args.workers, info=run.info)

    def loss_fn(m, batch):
        x, y = batch
        return bce_loss(m(x).squeeze(1), y, weights, args.label_smoothing)

    thresholds: dict = {}    # of the latest validation; saved with every checkpoint (extra_state)
    majority = int(torch.bincount(train_set.labels.long(), minlength=2).argmax())   # ties: normal

    def evaluate(m):
        logits, labels = [], []
        for x, y in val_loader:
            logits.append(m(x.to(run.device, non_blocking=True)).squeeze(1).float().cpu())
            labels.append(y)
        logits = all_gather_cat(logits, run.info)
        y = all_gather_cat(labels, run.info)
        prob = torch.sigmoid(logits)
        thresholds.clear()
        thresholds.update(validation_thresholds(y, prob, threshold, majority))
        at_default, at_f1 = thresholds["metrics"]["default"], thresholds["metrics"]["val_f1"]
        return {"val_loss": float(F.binary_cross_entropy_with_logits(logits, y)), "val_auc": roc_auc(y, prob),
                "val_acc": at_default["accuracy"], "val_f1": at_default["f1"], "val_flagged": at_default["flagged"],
                "val_thr_f1": thresholds["val_f1"], "val_acc_thr_f1": at_f1["accuracy"],
                "val_f1_thr_f1": at_f1["f1"], "val_thr_youden": thresholds["val_youden"]}

    if args.resume is None and not (args.init or args.backbone_weights):
        n = calibrate_batchnorm(unwrap(model), loader, run.device)
        if run.info.is_main:
            print(f"random backbones: BatchNorm statistics calibrated on {n} training images "
                  f"(a stand-in for pretrained weights)")

    trainer = Trainer(model, opt, loader, loss_fn, out_dir=run.out_dir, epochs=args.epochs, device=run.device,
                      info=run.info, evaluate=evaluate, scheduler=sched, monitor="val_loss", mode="min",
                      patience=args.patience, amp_dtype=run.amp_dtype, accum_steps=args.accum_steps,
                      clip_grad=args.clip_grad, channels_last=args.channels_last, save_every=args.save_every,
                      seed=args.seed, config={**vars(args), "task": "crbl", "decision_threshold": threshold},
                      progress=not args.no_progress, extra_state=lambda: {"thresholds": dict(thresholds)})
    result = trainer.fit(resume=args.resume)
    if run.info.is_main:
        print_summary(run.out_dir, threshold, len(val_set))
    cleanup(run.info)
    return result


if __name__ == "__main__":
    sys.exit(run_cli(main))
