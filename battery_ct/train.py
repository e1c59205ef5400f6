"""Train a battery CT classifier, or the RGB autoencoder anomaly detector.

  python battery_ct/train.py --model late_fusion                # built-in demo data, demo sizes
  python battery_ct/train.py --model resnet18 --data DIR        # DIR/train.txt and DIR/val.txt
  python battery_ct/train.py --model cbam --train-split a.txt --val-split b.txt --root /mnt/d/battery-512
  python battery_ct/train.py --model deeplabv3 --data DIR --init converted.pth --freeze-backbone \\
      --finetune-epochs 20 --finetune-lr 1e-5                  # stage 1 frozen, stage 2 in OUT/finetune/
  python battery_ct/train.py --model ae --data RGB_DIR          # normal images only; threshold from val
  python battery_ct/train.py --model resnet18 --resume runs/battery_ct/.../last.pt   # or .../finetune/last.pt

Split files: `path<TAB>label` per line (paths relative to the file, or to --root).
Classifiers: focal loss (gamma 2, label smoothing 0.1, alpha = --class-weights) or CE; AdamW +
CosineAnnealingWarmRestarts(10, 2, 1e-6) per epoch (--recipe adamw), or SGD + poly per step with 10x
lr on the head / ASPP / decoder (--recipe deeplab); early stopping on val_f1_macro (patience 7,
min_delta 0.001); gradient clipping 1.0. HD-CNN trains with HDCNNLoss and is scored through
hdcnn_decision; late_fusion reads (battery_type, axis) from the file names.
ae: trained on normal images (classes 0 and 2) with 0.7*MSE + 0.3*(1-SSIM), Adam 1e-3 (wd 1e-4),
ReduceLROnPlateau(0.5, 5, min 1e-6), early stop 15 on val_loss; afterwards the anomaly threshold
(Youden's J on the whole val split) and the val ROC-AUC are stored in best.pt for infer.py.
--epochs/--batch-size/--lr default per model (the original configs); with the built-in data they
default to a short demo (image size 128, or 64 for the DRN-D-54 / ResNet50 models).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision.transforms.v2 as T

if __package__ in (None, ""):  # `python <folder>/<script>.py` from a checkout: import this checkout's packages
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from battery_ct.data import BUILTIN_VERSION, SplitDataset, class_counts, make_builtin_dataset, read_split
from battery_ct.model import (CLASS_NAMES, DEFECT_CLASSES, MODEL_NAMES, NORMAL_CLASSES, FocalLoss,
                              HDCNNLoss, anomaly_score, build_model, hdcnn_decision, load_converted)
from common.checkpoint import load_checkpoint, require_task
from common import cli
from common.cli import add_common_args, float_range, int_range, setup_run
from common.data import BalancedSampler, ensure_builtin, eval_loader, train_loader
from common.distributed import DistInfo, all_gather_cat, cleanup, wrap_model
from common.io import (UserError, atomic_torch_save, atomic_write_text, load_untrusted, load_weights_into, require_file,
                       run_cli)
from common.metrics import classification_report, roc_auc, roc_auc_ovr, ssim, youden_threshold
from common.repro import seed_everything
from common.schedulers import poly
from common.trainer import Trainer, run_finished

TASK = "battery_ct"
TRAINABLE = tuple(n for n in MODEL_NAMES if n != "deeplab_seg")
DEFAULT_CLASS_WEIGHTS = (1.5, 1.2, 0.8, 1.0, 8.0)
# model -> (epochs, batch size, lr) of the original training configs (section 5.2 of the notes)
MODEL_DEFAULTS = {
    "resnet18": (50, 32, 5e-5), "efficientnet_b0": (50, 32, 1e-3), "convnext_tiny": (50, 16, 2e-4),
    "cbam": (50, 32, 5e-5), "hdcnn": (50, 32, 1e-4), "late_fusion": (100, 32, 1e-4),
    "drn_aspp": (100, 8, 1e-4), "deeplabv3": (50, 8, 1e-3), "ae": (100, 32, 1e-3),
}
HEAVY = ("drn_aspp", "deeplabv3")           # demo at 64 px
DEMO_EPOCHS = {"late_fusion": 10}
DEMO_LR = {"late_fusion": 1e-3}
DEMO_PLAIN = ("late_fusion",)
ROTATION = {"late_fusion": 90.0, "drn_aspp": 90.0, "hdcnn": 90.0}  # others 30
AE_MSE_WEIGHT, AE_SSIM_WEIGHT = 0.7, 0.3


# ---------------------------------------------------------------- arguments
def parse_args(argv=None) -> argparse.Namespace:
    p = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, choices=TRAINABLE)
    add_common_args(p, epochs=None, batch_size=None, lr=None, clip_grad=1.0)
    p.add_argument("--train-split", type=Path, help="split file for training (instead of --data)")
    p.add_argument("--val-split", type=Path, help="split file for validation (instead of --data)")
    p.add_argument("--root", type=Path, help="base folder for relative paths in the split files")
    p.add_argument("--image-size", type=int_range(32, 8192), default=None, help="square input size (default 512; demo 128)")
    p.add_argument("--loss", choices=("focal", "ce"), default=None, help="classifier loss (default focal)")
    p.add_argument("--gamma", type=float_range(0, 100), default=2.0, help="focal loss gamma")
    p.add_argument("--label-smoothing", type=float_range(0, 1, hi_open=True), default=0.1)
    p.add_argument("--class-weights", default=None,
                   help="5 comma-separated weights (focal alpha / CE weight / HD-CNN fine CE), or 'none' (default: the "
                        f"original's {','.join(map(str, DEFAULT_CLASS_WEIGHTS))}, made for its data's class "
                        "frequencies; none on the balanced built-in data)")
    p.add_argument("--balanced-sampler", action="store_true",
                   help="draw training images with probability 1/count(class), with replacement")
    p.add_argument("--recipe", choices=("adamw", "deeplab"), default=None,
                   help="adamw: AdamW + CosineAnnealingWarmRestarts(T_0=10, T_mult=2) per epoch (default); "
                        "deeplab: SGD(0.9) + poly per step, 10x lr on head/ASPP/decoder")
    p.add_argument("--weight-decay", type=cli.WEIGHT_DECAY, default=None,
                   help="default 0.03 (adamw), 5e-4 (deeplab), 1e-4 (ae)")
    p.add_argument("--patience", type=cli.EPOCHS, default=None, help="early stopping (default 7; ae 15)")
    p.add_argument("--min-delta", type=float_range(0, 1e6), default=None, help="default 0.001 (val_f1_macro); ae 1e-4 (val_loss)")
    p.add_argument("--dropout", type=float_range(0, 1, hi_open=True), default=None,
                   help="head dropout (default: the model's)")
    p.add_argument("--rotation", type=float_range(0, 180), default=None,
                   help="augmentation rotation in degrees (default 90 late_fusion/drn_aspp/hdcnn, 30 others, ae 10)")
    p.add_argument("--pretrained", action="store_true",
                   help="torchvision ImageNet weights from the local torch hub cache (nothing is downloaded)")
    p.add_argument("--init", type=Path, help="initial weights: a scripts/convert_deeplab.py file for the "
                                             "DeepLab models, else a checkpoint or state_dict of this model")
    p.add_argument("--freeze-backbone", action="store_true",
                   help="stage 1: train only the head (DeepLab: backbone + ASPP frozen; hdcnn: shared trunk)")
    p.add_argument("--finetune-epochs", type=cli.NONNEG_EPOCHS, default=0,
                   help="stage 2: continue from stage 1's best with everything unfrozen, in OUT/finetune/")
    p.add_argument("--finetune-lr", type=cli.LR, default=1e-5)
    return cli.parse_args(p, argv, task=TASK)


def parse_class_weights(spec: str) -> list[float] | None:
    if spec.strip().lower() == "none":
        return None
    try:
        w = [float(v) for v in spec.split(",")]
    except ValueError:
        w = []
    if len(w) != len(CLASS_NAMES) or not all(v > 0 and math.isfinite(v) for v in w):
        raise UserError(f"--class-weights {spec!r}: expected {len(CLASS_NAMES)} positive numbers "
                        f"'w0,...,w4' or 'none'")
    return w


def resolve_splits(args) -> tuple[Path, Path, bool]:
    """(train split, val split, built-in?)."""
    if args.train_split is not None or args.val_split is not None:
        if args.train_split is None or args.val_split is None:
            raise UserError("give both --train-split and --val-split")
        if args.data is not None:
            raise UserError("--data and --train-split/--val-split are alternatives; give one")
        return args.train_split, args.val_split, False
    if args.data is not None:
        if not args.data.is_dir():
            raise UserError(f"--data {args.data}: not a folder (expected train.txt and val.txt inside)")
        return args.data / "train.txt", args.data / "val.txt", False
    root = ensure_builtin(TASK, BUILTIN_VERSION, make_builtin_dataset)
    return root / "train.txt", root / "val.txt", True


def apply_defaults(args, builtin: bool) -> list[str]:
    """Fill the per-model and demo defaults the user did not give; returns what the demo chose."""
    epochs, batch, lr = MODEL_DEFAULTS[args.model]
    demo = []
    if builtin:
        size = 64 if args.model in HEAVY else 128
        if args.image_size is None:
            args.image_size = size
            demo.append(f"image size {size}")
        if args.epochs is None:
            # late_fusion, the README's demo, gets the 10 epochs of one cosine cycle it needs to learn the
            # built-in classes from random weights; the others a quick 3 (2 for the heavy ones)
            args.epochs = 2 if args.model in HEAVY else DEMO_EPOCHS.get(args.model, 3)
            demo.append(f"{args.epochs} epochs")
        if args.lr is None and args.model in DEMO_LR and not (args.pretrained or args.init):
            args.lr = DEMO_LR[args.model]   # the original's 1e-4 fine-tunes ImageNet weights; these start random
            demo.append(f"lr {args.lr:g}")
        if args.model in DEMO_PLAIN:
            # the built-in classes are balanced (the focal loss is made for rare ones) and the slices
            # need no rotation to tell apart: 10 epochs from random weights go to learning the classes
            if args.loss is None:
                args.loss = "ce"
                demo.append("cross-entropy")
            if args.rotation is None:
                args.rotation = 0.0
                demo.append("no rotation")
        if args.batch_size is None:
            args.batch_size = min(batch, 16)
            demo.append(f"batch size {args.batch_size}")
        if args.class_weights is None and args.model != "ae":
            # the original's weights (8x for resin overflow) counter the rarity of its classes; on these
            # balanced classes they would make the model answer resin_overflow for every normal module
            args.class_weights = "none"
            demo.append("no class weights (balanced classes)")
    if args.class_weights is None:
        args.class_weights = ",".join(map(str, DEFAULT_CLASS_WEIGHTS))
    args.image_size = 512 if args.image_size is None else args.image_size
    args.epochs = epochs if args.epochs is None else args.epochs
    args.batch_size = batch if args.batch_size is None else args.batch_size
    args.lr = lr if args.lr is None else args.lr
    ae = args.model == "ae"
    if ae:
        args.recipe = args.recipe or "adam"
        args.loss = args.loss or "mse+ssim"
    args.recipe = args.recipe or "adamw"
    args.loss = args.loss or ("hdcnn" if args.model == "hdcnn" else "focal")
    if args.weight_decay is None:
        args.weight_decay = {"adamw": 0.03, "deeplab": 5e-4, "adam": 1e-4}[args.recipe]
    args.patience = (15 if ae else 7) if args.patience is None else args.patience
    args.min_delta = (1e-4 if ae else 0.001) if args.min_delta is None else args.min_delta
    if args.rotation is None:
        args.rotation = 10.0 if ae else ROTATION.get(args.model, 30.0)
    return demo


def validate(args) -> None:
    if args.model == "ae":
        if args.image_size % 16:
            raise UserError(f"--image-size {args.image_size}: the autoencoder needs a multiple of 16")
        for flag, bad in (("--recipe deeplab", args.recipe == "deeplab"),
                          ("--loss", args.loss in ("focal", "ce")),
                          ("--freeze-backbone", args.freeze_backbone),
                          ("--finetune-epochs", args.finetune_epochs > 0),
                          ("--init", args.init is not None)):
            if bad:
                raise UserError(f"{flag} does not apply to --model ae (one stage, Adam, 0.7*MSE + 0.3*(1-SSIM))")
    if args.model == "hdcnn" and args.loss in ("focal", "ce"):
        raise UserError("--loss does not apply to --model hdcnn (it trains with HDCNNLoss)")
    if args.init is not None:   # another task's checkpoint is refused before the run folder is made
        require_file(args.init, "--init checkpoint file")
        require_task(load_untrusted(args.init, mmap=True), args.init, TASK,
                     "a battery_ct/train.py checkpoint or weights converted by scripts/convert_deeplab.py")


# ---------------------------------------------------------------- shared with infer.py
def normalization(model: str) -> str:
    """The autoencoder reconstructs through Tanh, so its inputs live in [-1, 1]; the rest are ImageNet."""
    return "tanh" if model == "ae" else "imagenet"


def classify(model: nn.Module, name: str, x: torch.Tensor, meta: torch.Tensor):
    """(probs (B,C) float, pred (B,), coarse probs (B,2) or None) for any classifier."""
    if name == "hdcnn":
        coarse, fine = model(x)
        pred, probs = hdcnn_decision(coarse, fine)
        return probs, pred, coarse.float().softmax(1)
    logits = model(x, meta) if name == "late_fusion" else model(x)
    probs = logits.float().softmax(1)
    return probs, probs.argmax(1), None


def to_unit(t: torch.Tensor) -> torch.Tensor:
    """[-1, 1] (the 'tanh' normalisation and the AE's Tanh output) -> [0, 1]."""
    return ((t.float() + 1.0) / 2.0).clamp(0.0, 1.0)


def ae_terms(x: torch.Tensor, recon: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image (MSE, SSIM). Both tensors are in the 'tanh' range [-1, 1]: MSE is taken there (it is
    the anomaly score), SSIM on both mapped to [0, 1] (data_range 1). The original compared the Tanh
    output with ImageNet-normalised inputs, which the decoder can never reproduce."""
    mse = anomaly_score(x, recon)
    s = ssim(to_unit(recon), to_unit(x), data_range=1.0, size_average=False)
    return mse, s


def ae_loss(x: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
    mse, s = ae_terms(x, recon)
    return AE_MSE_WEIGHT * mse.mean() + AE_SSIM_WEIGHT * (1.0 - s.mean())


# ---------------------------------------------------------------- building blocks
def ae_train_transforms(image_size: int, rotation: float) -> T.Compose:
    """The RGB AE's augmentation: H-flip, small rotation, colour jitter 0.1/0.1; output in [-1, 1]."""
    return T.Compose([T.ToImage(), T.ToDtype(torch.float32, scale=True),
                      T.Resize((image_size, image_size), antialias=True), T.RandomHorizontalFlip(),
                      T.RandomRotation(rotation), T.ColorJitter(0.1, 0.1),
                      T.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))])


def param_groups(model: nn.Module, lr: float, head_factor: float) -> list[dict]:
    """[backbone params at lr, everything else (head, ASPP, decoder) at lr*head_factor] (one group when
    head_factor is 1), trainable parameters only, empty groups dropped."""
    base_prefixes = tuple(f"{b}." for b in model.BACKBONE if b != "aspp")
    base, head = [], []
    for n, p in model.named_parameters():
        if p.requires_grad:
            (base if n.startswith(base_prefixes) else head).append(p)
    parts = ((base, 1.0), (head, head_factor)) if head_factor != 1.0 else ((base + head, 1.0),)
    groups = [{"params": ps, "lr": lr * f} for ps, f in parts if ps]
    if not groups:
        raise UserError("nothing to train: every parameter is frozen")
    return groups


def make_optimizer(model: nn.Module, args, lr: float) -> torch.optim.Optimizer:
    if args.recipe == "adam":
        return torch.optim.Adam(param_groups(model, lr, 1.0), lr=lr, weight_decay=args.weight_decay)
    if args.recipe == "deeplab":
        return torch.optim.SGD(param_groups(model, lr, 10.0), lr=lr, momentum=0.9,
                               weight_decay=args.weight_decay)
    return torch.optim.AdamW(param_groups(model, lr, 1.0), lr=lr, weight_decay=args.weight_decay)


def make_scheduler(opt, args, epochs: int, steps_per_epoch: int):
    """(scheduler, interval)."""
    if args.recipe == "adam":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="min", factor=0.5, patience=5,
                                                          min_lr=1e-6), "epoch"
    if args.recipe == "deeplab":
        return poly(opt, total_steps=epochs * steps_per_epoch), "step"
    return torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(opt, T_0=10, T_mult=2, eta_min=1e-6), "epoch"


def make_criterion(args, weights):
    if args.model == "hdcnn":
        return HDCNNLoss(class_weights=weights, label_smoothing=args.label_smoothing)
    w = None if weights is None else torch.tensor(weights)
    if args.loss == "focal":
        return FocalLoss(alpha=w, gamma=args.gamma, label_smoothing=args.label_smoothing)
    return nn.CrossEntropyLoss(weight=w, label_smoothing=args.label_smoothing)


def load_initial_weights(model: nn.Module, args, is_main: bool) -> None:
    if args.init is None:
        if is_main and not args.pretrained:
            print("note: the model starts from random weights (--pretrained for ImageNet weights from the "
                  "local torch cache, --init for converted ones)")
        return
    if args.model == "deeplabv3":
        r = load_converted(model, args.init)
        if is_main:
            kept = f", {len(r['kept_init'])} kept their fresh initialisation (the classifier)" if r["kept_init"] else ""
            ignored = f", {len(r['ignored'])} decoder tensors ignored" if r["ignored"] else ""
            print(f"initialised from {args.init}: {len(r['loaded'])} tensors loaded{kept}{ignored}")
    else:
        load_weights_into(model, args.init)
        if is_main:
            print(f"initialised from {args.init}")


# ---------------------------------------------------------------- main
def main(argv=None):
    args = parse_args(argv)
    train_split, val_split, builtin = resolve_splits(args)
    demo = apply_defaults(args, builtin)
    validate(args)
    weights = parse_class_weights(args.class_weights)
    train_items = read_split(train_split, args.root)
    val_items = read_split(val_split, args.root)
    ae = args.model == "ae"

    # --resume: which stage, and is it this model?
    resume_stage, resume_ckpt = None, None
    if args.resume is not None:
        resume_ckpt = load_checkpoint(args.resume, TASK)
        cfg = resume_ckpt.get("config", {})
        if cfg.get("task") != TASK or cfg.get("model") != args.model:
            held = f"a {cfg['model']} model" if cfg.get("task") == TASK else "no battery_ct model"
            raise UserError(f"{args.resume}: checkpoint holds {held}, not --model {args.model}")
        resume_stage = int(cfg.get("stage", 1))
        if resume_stage == 2:
            if args.finetune_epochs < 1:
                raise UserError(f"{args.resume}: a fine-tuning (stage 2) checkpoint: give --finetune-epochs")
            if args.out is None:
                args.out = args.resume.parent.parent
    stage1_done = resume_stage == 2 or (resume_stage == 1 and run_finished(resume_ckpt, args.epochs, args.patience))
    planned = args.out if args.out is not None else (args.resume.parent if args.resume is not None else None)
    finetune_dir = None if planned is None else planned / "finetune"
    if (args.finetune_epochs and finetune_dir is not None and resume_stage != 2 and not stage1_done
            and (finetune_dir / "last.pt").exists()):
        raise UserError(f"{finetune_dir / 'last.pt'}: stage 2 already started from an earlier stage-1 result; "
                        f"continue it with --resume {finetune_dir / 'last.pt'}")

    norm = normalization(args.model)
    if ae:
        train_fit = [(p, y) for p, y in train_items if y in NORMAL_CLASSES]
        val_fit = [(p, y) for p, y in val_items if y in NORMAL_CLASSES]
        for what, items, split in (("training", train_fit, train_split), ("validation", val_fit, val_split)):
            if not items:
                raise UserError(f"{split}: no normal images (classes {NORMAL_CLASSES}) for autoencoder {what}")
        train_set = SplitDataset(train_fit, args.image_size, normalize=norm)
        train_set.tf = ae_train_transforms(args.image_size, args.rotation)
        val_set = SplitDataset(val_fit, args.image_size, normalize=norm)
    else:
        meta = args.model == "late_fusion"  # file names are parsed here: a bad name stops before any output
        train_set = SplitDataset(train_items, args.image_size, train=True, rotation=args.rotation,
                                 with_meta=meta, normalize=norm)
        val_set = SplitDataset(val_items, args.image_size, with_meta=meta, normalize=norm)

    run = setup_run(args, TASK, args.model)
    main_rank = run.info.is_main
    finetune_dir = run.out_dir / "finetune"
    if main_rank:
        if demo:
            print(f"built-in demo data: {', '.join(demo)} (demo defaults; give --image-size / --epochs / "
                  f"--batch-size to change them)")
        print(f"data: {len(train_set)} train / {len(val_set)} val images"
              + (" (normal only)" if ae else "") + f" from {train_split} and {val_split}")
        print(f"  train per class {class_counts(train_set.items)}, val per class {class_counts(val_set.items)}")

    sampler = BalancedSampler(train_set.labels, args.seed, run.info) if args.balanced_sampler else None
    # a last batch of a single image breaks BatchNorm in training mode (late_fusion's BatchNorm1d)
    per_step = args.batch_size * run.info.world_size
    drop_last = len(train_set) > per_step and len(train_set) % per_step == 1
    loader = train_loader(train_set, args.batch_size, seed=args.seed, workers=args.workers, info=run.info,
                          sampler=sampler, drop_last=drop_last)
    if drop_last and main_rank:
        print(f"note: {len(train_set)} images leave a last batch of 1; it is dropped each epoch")
    val_loader = eval_loader(val_set, args.batch_size, workers=args.workers, info=run.info)
    criterion = None if ae else make_criterion(args, weights).to(run.device)
    steps_per_epoch = math.ceil(len(loader) / args.accum_steps)

    # from random weights, the BatchNorm moving averages lag behind the weights: re-estimate them on the
    # training images before each validation (and so in every checkpoint); see recalibrate_batchnorm
    precise_bn = args.model == "late_fusion" and not (args.pretrained or args.init)
    if precise_bn and main_rank:
        print("random weights: BatchNorm statistics are re-estimated on the training images before each "
              "validation (precise BN)")

    def loss_fn(m, batch):
        x, meta, y = batch
        if ae:
            recon, _ = m(x)
            return ae_loss(x, recon)
        out = m(x, meta) if args.model == "late_fusion" else m(x)
        return criterion(out, y)

    def evaluate(m):
        if ae:
            mses, ssims = [], []
            for x, _, _ in val_loader:
                x = x.to(run.device, non_blocking=True)
                mse, s = ae_terms(x, m(x)[0])
                mses.append(mse.cpu())
                ssims.append(s.float().cpu())
            mse, s = all_gather_cat(mses, run.info), all_gather_cat(ssims, run.info)
            loss = AE_MSE_WEIGHT * mse.mean() + AE_SSIM_WEIGHT * (1.0 - s.mean())
            return {"val_loss": float(loss), "val_mse": float(mse.mean()), "val_ssim": float(s.mean())}
        if precise_bn:
            recalibrate_batchnorm(m, loader, lambda net, b: net(b[0].to(run.device, non_blocking=True),
                                                                 b[1].to(run.device)))
        probs, preds, ys = [], [], []
        for x, meta, y in val_loader:
            p, pred, _ = classify(m, args.model, x.to(run.device, non_blocking=True), meta.to(run.device))
            probs.append(p.cpu())
            preds.append(pred.cpu())
            ys.append(y)
        probs = all_gather_cat(probs, run.info)
        pred = all_gather_cat(preds, run.info)
        y = all_gather_cat(ys, run.info)
        r = classification_report(y, pred, len(CLASS_NAMES))
        log_p = probs.clamp_min(1e-12).log()
        nll = float(F.nll_loss(log_p, y))
        # val_loss is the training loss on the validation images (log-probabilities are logits up to a
        # constant per row), so the two curves compare; HD-CNN's two-level loss needs the raw heads: NLL
        val_loss = nll if args.model == "hdcnn" else float(criterion(log_p.to(run.device), y.to(run.device)))
        return {"val_loss": val_loss, "val_nll": nll, "val_acc": r["accuracy"],
                "val_f1_macro": r["f1_macro"], "val_f1_weighted": r["f1_weighted"],
                "val_auc": roc_auc_ovr(y, probs)}

    base_config = {**vars(args), "task": TASK, "num_classes": len(CLASS_NAMES), "class_names": list(CLASS_NAMES),
                   "normalize": norm, "train_split_file": str(train_split), "val_split_file": str(val_split),
                   "builtin_data": builtin}
    monitor, mode = ("val_loss", "min") if ae else ("val_f1_macro", "max")

    def run_stage(stage: int, model: nn.Module, out_dir: Path, epochs: int, lr: float, resume: Path | None):
        model = model.to(run.device)
        opt = make_optimizer(model, args, lr)  # on the plain model: param groups use its BACKBONE names
        model = wrap_model(model, run.device, run.info, channels_last=args.channels_last)
        sched, interval = make_scheduler(opt, args, epochs, steps_per_epoch)
        # the stage's own values under their own names: the argument keys stay what the user gave,
        # which is what a --resume compares against and takes over
        config = {**base_config, "stage": stage, "stage_epochs": epochs, "stage_lr": lr,
                  "stage_frozen": args.freeze_backbone if stage == 1 else False}
        trainer = Trainer(model, opt, loader, loss_fn, out_dir=out_dir, epochs=epochs, device=run.device,
                          info=run.info, evaluate=evaluate, scheduler=sched, scheduler_interval=interval,
                          monitor=monitor, mode=mode, min_delta=args.min_delta, patience=args.patience,
                          amp_dtype=run.amp_dtype, accum_steps=args.accum_steps, clip_grad=args.clip_grad,
                          channels_last=args.channels_last, save_every=args.save_every, seed=args.seed,
                          config=config, progress=not args.no_progress)
        if resume is not None and run_finished(load_checkpoint(resume), epochs, args.patience):
            if main_rank:
                print(f"stage {stage} in {out_dir} is complete (all epochs run or stopped early); nothing to do")
            return None
        if main_rank:
            n = sum(p.numel() for p in model.parameters() if p.requires_grad)
            print(f"stage {stage}: {args.model}, {n:,} trainable parameters, {epochs} epoch(s) at lr {lr:g} "
                  f"({args.recipe}), checkpoints in {out_dir}")
        return trainer.fit(resume=resume)

    # ---- stage 1
    if stage1_done:
        if main_rank:
            print(f"stage 1 in {run.out_dir} is complete" + (" (resuming stage 2)" if resume_stage == 2 else ""))
    else:
        model = build_model(args.model, pretrained=args.pretrained and args.resume is None, dropout=args.dropout,
                            freeze_backbone=args.freeze_backbone)
        if args.resume is None:
            load_initial_weights(model, args, main_rank)
        run_stage(1, model, run.out_dir, args.epochs, args.lr, args.resume)
    final = run.out_dir

    # ---- stage 2: everything unfrozen, from stage 1's best
    if args.finetune_epochs:
        resume2 = args.resume if resume_stage == 2 else None
        if resume2 is None and (finetune_dir / "last.pt").exists():
            resume2 = finetune_dir / "last.pt"  # stage 1 was complete already: pick stage 2 up where it was
            if main_rank:
                print(f"continuing stage 2 from {resume2}")
        model = build_model(args.model, dropout=args.dropout)
        if resume2 is None:
            start = run.out_dir / "best.pt"
            if not start.is_file():
                start = run.out_dir / "last.pt"
            model.load_state_dict(load_checkpoint(start)["model"])
            seed_everything(args.seed + 1, args.deterministic)  # stage 2 does not depend on how stage 1 ran
            if main_rank:
                print(f"stage 2 starts from {start}")
        run_stage(2, model, finetune_dir, args.finetune_epochs, args.finetune_lr, resume2)
        final = finetune_dir

    if ae and main_rank:
        calibrate_threshold(args, val_items, val_split, final / "best.pt", run.device)
    if main_rank and not ae:
        test_split = val_split.parent / "test.txt" if args.train_split is None else None
        splits = {"val": val_items}
        if test_split is not None and test_split.is_file():
            splits["test"] = read_split(test_split, args.root)
        print_summary(args, final / "best.pt", train_items, splits, run.device)
    if main_rank:
        weights_path = final / "best.pt"
        print(f"outputs in {run.out_dir}: best.pt, last.pt, log.csv, loss_curve.png"
              + (f"; stage 2 in {finetune_dir}" if args.finetune_epochs else "")
              + ("; threshold.json" if ae else ""))
        test_hint = "" if builtin else f"--data {args.data}" if args.data is not None else "--split TEST.txt"
        print(f"evaluate: python battery_ct/infer.py --weights {weights_path} {test_hint}".rstrip())
    cleanup(run.info)
    return final


# ---------------------------------------------------------------- summary
def recalibrate_batchnorm(model: nn.Module, batches, forward) -> int:
    """Set the moving statistics of every trainable BatchNorm to the mean / variance of its inputs
    over `batches` (cumulative, the model otherwise in eval mode: dropout off, as at inference);
    returns the number of images seen. Why: from random weights at lr 1e-3 the weights move faster
    than the moving averages (momentum 0.1, ~10 steps an epoch on the built-in data) follow, and the
    eval-mode network answered one class for every image (val accuracy 0.2 for 5 epochs) while the
    same weights with statistics re-estimated on the training images scored 0.67. Frozen layers
    (requires_grad False) keep their statistics."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
           and m.track_running_stats and all(p.requires_grad for p in m.parameters())]
    if not bns:
        return 0
    saved = [(m.momentum, m.training) for m in bns]
    was_training = model.training
    model.eval()
    for m in bns:
        m.reset_running_stats()
        m.momentum = None          # cumulative average over the batches
        m.train()
    seen = 0
    with torch.no_grad():
        for batch in batches:
            if len(batch[0]) > 1:  # a batch of one has no variance (BatchNorm1d refuses it)
                forward(model, batch)
                seen += len(batch[0])
    for m, (momentum, training) in zip(bns, saved):
        m.momentum = momentum
        m.train(training)
    model.train(was_training)
    return seen


@torch.no_grad()
def predict_split(model: nn.Module, args, items, device: torch.device) -> torch.Tensor:
    ds = SplitDataset(items, args.image_size, with_meta=args.model == "late_fusion", normalize="imagenet")
    model.eval()
    preds = []
    for x, meta, _ in eval_loader(ds, args.batch_size, workers=args.workers, info=DistInfo()):
        preds.append(classify(model, args.model, x.to(device), meta.to(device))[1].cpu())
    return torch.cat(preds)


def print_summary(args, best: Path, train_items, splits: dict, device: torch.device) -> dict:
    """best.pt's accuracy and F1-macro on each split next to always answering the training set's
    majority class, and the per-class F1 of both; returns the numbers."""
    if not best.is_file():
        print(f"no {best}: no epoch improved {args.model}'s validation score")
        return {}
    ckpt = load_checkpoint(best)
    model = build_model(args.model, dropout=args.dropout)
    model.load_state_dict(ckpt["model"])
    model.to(device)
    majority = max(range(len(CLASS_NAMES)), key=lambda c: (class_counts(train_items)[c], -c))
    print(f"summary: {best} (epoch {ckpt['epoch']}, chosen by val_f1_macro) against always answering the training "
          f"set's majority class ({CLASS_NAMES[majority]}):")
    print(f"  {'split':<6} {'images':>6} {'accuracy':>9} {'F1-macro':>9} {'baseline acc':>13} {'baseline F1':>12}")
    out = {}
    for name, items in splits.items():
        y = torch.tensor([label for _, label in items])
        r = classification_report(y, predict_split(model, args, items, device), len(CLASS_NAMES))
        b = classification_report(y, torch.full_like(y, majority), len(CLASS_NAMES))
        out[name] = {"model": r, "baseline": b}
        print(f"  {name:<6} {len(items):>6} {r['accuracy']:>9.3f} {r['f1_macro']:>9.3f} {b['accuracy']:>13.3f} "
              f"{b['f1_macro']:>12.3f}")
    last = list(splits)[-1]
    r, b = out[last]["model"], out[last]["baseline"]
    print(f"  per-class F1 on {last} (baseline): " + ", ".join(
        f"{n} {f:.2f} ({fb:.2f})" for n, f, fb in zip(CLASS_NAMES, r["per_class"]["f1"], b["per_class"]["f1"])))
    return out


# ---------------------------------------------------------------- AE threshold
@torch.no_grad()
def ae_scores(model: nn.Module, items, image_size: int, batch_size: int, workers: int,
              device: torch.device) -> torch.Tensor:
    ds = SplitDataset(items, image_size, normalize="tanh")
    loader = eval_loader(ds, batch_size, workers=workers, info=DistInfo())
    model.eval()
    out = []
    for x, _, _ in loader:
        x = x.to(device)
        out.append(anomaly_score(x, model(x)[0]).cpu())
    return torch.cat(out)


def threshold_from_scores(scores: torch.Tensor, is_defect: torch.Tensor) -> dict:
    """Youden's J threshold (defect when score >= threshold) and ROC-AUC; without both classes,
    the original's fallback mean + 2.5 std of the normal scores."""
    normal, defect = scores[~is_defect], scores[is_defect]
    info = {"normal_mean": float(normal.mean()) if len(normal) else None,
            "normal_std": float(normal.std()) if len(normal) > 1 else None,
            "defect_mean": float(defect.mean()) if len(defect) else None,
            "defect_std": float(defect.std()) if len(defect) > 1 else None,
            "n_normal": len(normal), "n_defect": len(defect)}
    if len(normal) and len(defect):
        thr, j = youden_threshold(is_defect, scores)
        info.update(threshold=thr, youden_j=j, roc_auc=roc_auc(is_defect, scores),
                    threshold_method="youden_j_val")
    else:
        std = float(normal.std()) if len(normal) > 1 else 0.0
        info.update(threshold=float(normal.mean()) + 2.5 * std, youden_j=None, roc_auc=None,
                    threshold_method="normal_mean+2.5std (val has no defect images)")
    return info


def calibrate_threshold(args, val_items, val_split: Path, best: Path, device: torch.device) -> dict:
    """Score the whole val split (normal + defect) with best.pt, choose the threshold, store it in
    best.pt (extra['threshold'], rewritten atomically) and in threshold.json next to it."""
    ckpt = load_checkpoint(best)
    model = build_model("ae", dropout=args.dropout)
    model.load_state_dict(ckpt["model"])
    model.to(device)
    scores = ae_scores(model, val_items, args.image_size, args.batch_size, args.workers, device)
    is_defect = torch.tensor([y in DEFECT_CLASSES for _, y in val_items])
    info = threshold_from_scores(scores, is_defect)
    info.update(val_split=str(val_split), checkpoint_epoch=ckpt["epoch"])
    ckpt["extra"].update(threshold=info["threshold"], threshold_method=info["threshold_method"],
                         val_roc_auc=info["roc_auc"], threshold_info=info)
    atomic_torch_save(ckpt, best)
    atomic_write_text(best.parent / "threshold.json", json.dumps(info, indent=2) + "\n")
    auc = "n/a" if info["roc_auc"] is None else f"{info['roc_auc']:.4f}"
    print(f"anomaly threshold {info['threshold']:.6g} ({info['threshold_method']}) on {len(scores)} val images "
          f"({info['n_normal']} normal / {info['n_defect']} defect), val ROC-AUC {auc}; stored in {best} "
          f"and {best.parent / 'threshold.json'}")
    if info["roc_auc"] is None:
        print("warning: the val split has no defect images, so the threshold is a fallback; add defect images "
              "to val for Youden's J")
    return info


if __name__ == "__main__":
    sys.exit(run_cli(main))
