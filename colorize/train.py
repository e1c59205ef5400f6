"""Train a U-Net that restores damaged grayscale images to colour (DACON 236420).

  python colorize/train.py                                     # built-in demo data (about a minute on 2 CPU cores)
  python colorize/train.py --data DIR                          # DIR/train.csv: the competition layout
  python colorize/train.py --data DIR --img-size 256 --batch-size 16 --mask-weight 1 --style 1
  python colorize/train.py --data DIR --init best_model.pth    # start from the original's checkpoint
  python colorize/train.py --resume runs/colorize/improved_unet-.../last.pt

The original's recipe: improved_unet (width 64), 128 px, batch 32 (16 at 256, 8 at 512), 30 epochs,
AdamW lr 1e-3 weight decay 0.01, OneCycle (pct_start 0.3, div 25 / 1000) -- stepped every batch,
as it was configured; the original stepped it once per epoch, so its lr stayed near 4e-5 --, loss
L1 + 0.2 * VGG16 perceptual, rows split 80/20 exactly as the original's (seed 42), flips and 90-degree
rotations applied to input and target alike. Every epoch the validation split is scored with the
competition's metric (colorize.metrics), next to the score of simply returning the gray input;
best.pt is the epoch with the best score (--best-by loss for the lowest loss). Sample grids
(input / restored / ground truth) of a fixed validation batch go to samples/ every --sample-every
epochs. Ctrl-C saves a resumable last.pt.

The built-in demo trains a narrower model (--width 16) at 64 px; without ImageNet VGG16 weights
(no network) it trains without the perceptual term and says so.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

if __package__ in (None, ""):  # `python colorize/<script>.py` from a checkout: import this checkout's packages
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from colorize.data import (BUILTIN_VERSION, MASK_TOLERANCE, TASK, PairDataset, make_builtin_dataset, read_pairs,
                           split_indices, to_u8)
from colorize.losses import ColorizeLoss
from colorize.metrics import competition_score, mean_scores
from colorize.model import MODEL_NAMES, ORIGINAL_WIDTH, build_model, load_original_state
from common import cli
from common.checkpoint import require_task, unwrap
from common.cli import add_common_args, float_range, int_range, setup_run
from common.data import ensure_builtin, eval_loader, train_loader
from common.distributed import all_gather_cat, cleanup, wrap_model
from common.images import save_image_grid
from common.summary import Metric, format_summary
from common.io import UserError, load_state_strict, load_untrusted, run_cli
from common.trainer import Trainer

ORIGINAL_EPOCHS, ORIGINAL_IMG_SIZE = 30, 128
ORIGINAL_BATCH = {128: 32, 256: 16, 512: 8}         # the original's suggestions per resolution
DEMO = {"width": 16, "img_size": 64, "epochs": 8, "batch_size": 4, "workers": 0}
SAMPLE_ROWS = 4


def parse_args(argv=None) -> argparse.Namespace:
    p = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=MODEL_NAMES, default="improved_unet",
                   help="improved_unet (the original's final model) or unet (its first version)")
    p.add_argument("--width", type=int_range(4, 512), default=None,
                   help="channels of the first level, doubling per level (default 64, the original's; demo 16)")
    add_common_args(p, epochs=None, batch_size=None, lr=1e-3, workers=None)
    p.add_argument("--img-size", type=int_range(32, 4096), default=None,
                   help="train at this square size, a multiple of 16 (default 128, the original's; demo 64)")
    p.add_argument("--subset", type=float_range(0, 1, lo_open=True), default=1.0,
                   help="fraction of train.csv to use (the original asked for a percentage)")
    p.add_argument("--val-fraction", type=float_range(0, 1, lo_open=True, hi_open=True), default=0.2,
                   help="held out for validation (the original: 0.2)")
    p.add_argument("--no-augment", action="store_true",
                   help="no random flips / 90-degree rotations (applied to input and target alike)")
    p.add_argument("--weight-decay", type=cli.WEIGHT_DECAY, default=0.01, help="AdamW weight decay")
    p.add_argument("--scheduler", choices=("onecycle", "cosine", "none"), default="onecycle",
                   help="onecycle: OneCycle every batch (pct_start 0.3, div 25, final div 1000); cosine: "
                        "CosineAnnealingWarmRestarts(T_0=10, T_mult=2, eta_min=1e-6) every epoch")
    p.add_argument("--perceptual", type=cli.LOSS_WEIGHT, default=0.2, help="weight of the VGG16 perceptual term (0 = off)")
    p.add_argument("--style", type=cli.LOSS_WEIGHT, default=0.0, help="weight of the Gram-matrix style term (0 = off)")
    p.add_argument("--mask-weight", type=cli.LOSS_WEIGHT, default=0.0,
                   help="extra weight of the L1 over the damaged region (the metric gives it 40%%)")
    p.add_argument("--mask-tolerance", type=int_range(0, 254), default=MASK_TOLERANCE,
                   help="gray levels by which the input may differ from gray(target) and still count as undamaged")
    p.add_argument("--best-by", choices=("score", "loss"), default="score",
                   help="best.pt = the epoch with the highest validation competition score, or the lowest loss")
    p.add_argument("--sample-every", type=cli.NONNEG_EPOCHS, default=5,
                   help="write a sample grid every N epochs and after the last (0 = never)")
    p.add_argument("--init", type=Path,
                   help="initial weights: the original's best_model.pth (with or without _orig_mod.) or a "
                        "checkpoint of this script")
    return cli.parse_args(p, argv, resume_free=("sample_every",), task=TASK, used=settings_used)


# flag -> the config key holding the value a run used where the flag was left to its default
SETTING_OF = {"width": "net_width", "img_size": "net_img_size", "batch_size": "run_batch_size",
              "epochs": "run_epochs", "workers": "run_workers"}


def settings_used(ckpt: dict) -> dict:
    return {flag: ckpt["config"][key] for flag, key in SETTING_OF.items() if key in ckpt["config"]}


def resolve_settings(args, builtin: bool) -> dict:
    """The values this run uses where a flag was left at its default (kept apart from the flags, so
    that a resume sees the flags exactly as given)."""
    demo = DEMO if builtin else {}
    img = args.img_size or demo.get("img_size", ORIGINAL_IMG_SIZE)
    if img % 16:
        raise UserError(f"--img-size {img}: must be a multiple of 16 (the U-Nets pool four times)")
    width = args.width or demo.get("width", ORIGINAL_WIDTH)
    if args.model == "improved_unet" and (width < 16 or width % 2):
        raise UserError(f"--width {width}: improved_unet needs an even width of at least 16 (SE blocks reduce by 16)")
    batch = args.batch_size or demo.get("batch_size") or ORIGINAL_BATCH.get(img, max(1, round(32 * (128 / img) ** 2)))
    workers = args.workers if args.workers is not None else demo.get("workers", 2)
    return {"net_width": width, "net_img_size": img, "run_batch_size": batch,
            "run_epochs": args.epochs or demo.get("epochs", ORIGINAL_EPOCHS), "run_workers": workers}


def find_train_csv(data: Path) -> Path:
    csv_path = data / "train.csv" if data.is_dir() else data
    if not csv_path.is_file():
        raise UserError(f"--data {data}: no train.csv there (expected the competition layout: train.csv with "
                        f"input_image_path,gt_image_path)")
    return csv_path


def read_init(path: Path, name: str, width: int) -> dict:
    """The --init weights for a `name` model of `width`, checked (read before the run folder is made)."""
    obj = load_untrusted(path)
    require_task(obj, path, TASK, "a colorize/train.py checkpoint or the original's weights for --init")
    if isinstance(obj, dict) and "format_version" in obj and isinstance(obj.get("model"), dict):
        cfg = obj.get("config") or {}
        if cfg.get("task") != TASK:
            raise UserError(f"{path}: not a colorize checkpoint")
        sd = obj["model"]
        found = (cfg.get("model"), cfg.get("net_width"))
        if found != (name, width):
            raise UserError(f"{path}: holds a {found[0]} of width {found[1]}, not --model {name} --width {width}")
    else:
        sd, _, found_width = load_original_state(obj, path, model=name)
        if found_width != width:
            raise UserError(f"{path}: weights of width {found_width}, but this run builds width {width} (give --width)")
    return sd


def ensure_vgg_weights() -> None:
    """Download torchvision's VGG16 ImageNet file into the torch hub cache if it is not there, or
    raise WeightsUnavailable (before building a 138 M-parameter VGG16 only to find no weights)."""
    from common.vgg import imagenet_state_dict, imagenet_weights_path   # imports torchvision: only when needed
    if not imagenet_weights_path("vgg16").is_file():
        imagenet_state_dict("vgg16")


def build_loss(args, builtin: bool, is_main: bool) -> ColorizeLoss:
    from common.vgg import WeightsUnavailable
    try:
        if args.perceptual > 0 or args.style > 0:
            ensure_vgg_weights()
        return ColorizeLoss(perceptual=args.perceptual, style=args.style, mask_weight=args.mask_weight)
    except WeightsUnavailable as e:
        if not builtin:
            raise
        if is_main:
            print(f"note: {e}")
            print("built-in demo: training without the VGG terms (perceptual / style) instead; with --data "
                  "this is an error")
        return ColorizeLoss(perceptual=0.0, style=0.0, mask_weight=args.mask_weight)


def make_scheduler(opt, args, epochs: int, steps_per_epoch: int):
    """(scheduler, interval) or (None, 'epoch')."""
    if args.scheduler == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=args.lr, total_steps=epochs * steps_per_epoch, pct_start=0.3, div_factor=25,
            final_div_factor=1000), "step"
    if args.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(opt, T_0=10, T_mult=2, eta_min=1e-6), "epoch"
    return None, "epoch"


def score_batch(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> list[dict]:
    """Competition scores of a batch: predictions rounded to 8 bit as a submission PNG would be."""
    return [competition_score(to_u8(p), to_u8(t), m[0].bool().cpu().numpy())
            for p, t, m in zip(pred.float().clamp(0, 1), target, mask)]


SCORE_KEYS = ("score", "ssim", "masked_ssim", "hue_hist")


def gather_scores(rows: list[dict], info) -> dict:
    """Mean competition scores over the images of every process."""
    local = torch.tensor([[r[k] for k in SCORE_KEYS] for r in rows], dtype=torch.float64).reshape(-1, len(SCORE_KEYS))
    return mean_scores([dict(zip(SCORE_KEYS, r.tolist())) for r in all_gather_cat(local, info)])


def gray_input_baseline(loader, info) -> dict:
    """The score of returning the (damaged, gray) input unchanged."""
    rows = []
    for x, y, m in loader:
        rows += score_batch(x, y, m)
    return gather_scores(rows, info)


def summary(result: dict, baseline: dict, out_dir: Path, csv_path: Path, builtin: bool, monitor: str,
            sample_every: int) -> str:
    history = result["history"]
    best = history[result["best_epoch"] - 1] if result["best_epoch"] else history[-1]
    test_csv = csv_path.parent / "test.csv"
    target = f"--input {test_csv}" if test_csv.is_file() else "--input TEST_DIR"
    steps = [f"python colorize/infer.py --weights {out_dir / 'best.pt'} {target} --out {out_dir / 'predictions'} --zip"]
    if builtin and (csv_path.parent / "test_gt").is_dir():
        steps.append(f"python colorize/evaluate.py --pred {out_dir / 'predictions'} --gt {csv_path.parent / 'test_gt'} "
                     f"--inputs {csv_path.parent / 'test_input'}")
    chosen = "highest val_score" if monitor == "val_score" else "lowest val_loss"
    return format_summary(
        f"colorize, best.pt = epoch {best['epoch']} of {len(history)} ({chosen})",
        [Metric("val_score", best["val_score"], baseline["score"], higher_is_better=True),
         Metric("val_ssim", best["val_ssim"], baseline["ssim"], higher_is_better=True),
         Metric("val_masked_ssim", best["val_masked_ssim"], baseline["masked_ssim"], higher_is_better=True),
         Metric("val_hue_hist", best["val_hue_hist"], baseline["hue_hist"], higher_is_better=True)],
        "returning the damaged gray input as it is (score = 0.2 SSIM + 0.4 SSIM of the damaged pixels + 0.4 hue "
        "histogram correlation, the competition's)",
        out_dir, ["best.pt", "last.pt", "log.csv", "loss_curve.png"] + (["samples/"] if sample_every else []),
        f"built-in demo data in {csv_path.parent} (train.csv, test.csv, train_input/, train_gt/, test_input/, "
        f"test_gt/)" if builtin else str(csv_path), steps,
        notes=[f"val_score after epoch 1: {history[0]['val_score']:.4f}"] if len(history) > 1 else ())


def main(argv=None):
    args = parse_args(argv)
    builtin = args.data is None
    settings = resolve_settings(args, builtin)
    width, img_size = settings["net_width"], settings["net_img_size"]
    epochs, batch_size, workers = settings["run_epochs"], settings["run_batch_size"], settings["run_workers"]

    csv_path = find_train_csv(args.data) if args.data is not None else None
    if builtin and not args.threads and args.resume is None:
        # The demo model's operations are small: a second thread gains little, and when another
        # program keeps a core busy it makes each step about 3x slower (measured on 2 cores).
        args.threads = 1
        print("built-in demo: 1 CPU thread (give --threads to change)")
    init_sd = read_init(args.init, args.model, width) if args.init is not None and args.resume is None else None
    run = setup_run(args, TASK, args.model, outputs=("samples",))
    main_rank = run.info.is_main
    if csv_path is None:
        csv_path = ensure_builtin(TASK, BUILTIN_VERSION, make_builtin_dataset) / "train.csv"
    pairs = read_pairs(csv_path)
    train_rows, val_rows = split_indices(len(pairs), args.val_fraction, args.subset, args.seed)
    if not train_rows or not val_rows:
        raise UserError(f"{csv_path}: {len(pairs)} pair(s) leave {len(train_rows)} for training and {len(val_rows)} "
                        f"for validation (--subset {args.subset:g}, --val-fraction {args.val_fraction:g}); need both")
    train_set = PairDataset([pairs[i] for i in train_rows], img_size, augment=not args.no_augment,
                            tolerance=args.mask_tolerance)
    val_set = PairDataset([pairs[i] for i in val_rows], img_size, tolerance=args.mask_tolerance)

    try:
        model = build_model(args.model, width)
    except ValueError as e:
        raise UserError(f"--model {args.model} --width {width}: {e}") from None
    if init_sd is not None:
        load_state_strict(model, init_sd, args.init)
    for p in model.unused_parameters():   # InstanceNorm-cancelled biases, residual SE: never in the forward
        p.requires_grad_(False)
    criterion = build_loss(args, builtin, main_rank).to(run.device)
    model = wrap_model(model.to(run.device), run.device, run.info, channels_last=args.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    loader = train_loader(train_set, batch_size, seed=args.seed, workers=workers, info=run.info)
    val_loader = eval_loader(val_set, batch_size, workers=workers, info=run.info)   # every image, no drop_last
    steps_per_epoch = math.ceil(len(loader) / args.accum_steps)
    sched, interval = make_scheduler(opt, args, epochs, steps_per_epoch)

    baseline = gray_input_baseline(val_loader, run.info)
    terms = " + ".join([f"{criterion.w_l1:g}*L1"]
                       + [f"{w:g}*{n}" for n, w in (("perceptual", criterion.w_perceptual), ("style", criterion.w_style),
                                                    ("mask_L1", criterion.w_mask)) if w > 0])
    if main_rank:
        n_params = sum(p.numel() for p in model.parameters())
        print(f"{'built-in demo data' if builtin else 'data'}: {csv_path} -> {len(train_set)} train / {len(val_set)} "
              f"val pairs at {img_size}x{img_size}" + (f" (subset {args.subset:g})" if args.subset < 1 else "")
              + f", augmentation {'off' if args.no_augment else 'flips + 90-degree rotations'}")
        print(f"model: {args.model} width {width} ({n_params:,} parameters); {epochs} epochs x {steps_per_epoch} "
              f"steps of batch {batch_size}; AdamW lr {args.lr:g} wd {args.weight_decay:g}, scheduler "
              f"{args.scheduler}" + (" per step" if interval == "step" and sched else "") + f"; loss {terms}")
        print(f"validation: competition score of returning the gray input = {baseline['score']:.4f} "
              f"(ssim {baseline['ssim']:.3f}, masked ssim {baseline['masked_ssim']:.3f}, hue {baseline['hue_hist']:.3f}); "
              f"best.pt by {'highest val_score' if args.best_by == 'score' else 'lowest val_loss'}")

    def loss_fn(m, batch):
        x, y, mask = batch
        total, parts = criterion(m(x).float(), y, mask)
        return total, {k: float(v) for k, v in parts.items()}

    def evaluate(m):
        loss_sum, l1_sum, n, rows = 0.0, 0.0, 0, []
        for x, y, mask in val_loader:
            x, y, mask = x.to(run.device), y.to(run.device), mask.to(run.device)
            pred = m(x).float()
            total, parts = criterion(pred, y, mask)
            loss_sum += float(total) * len(x)
            l1_sum += float(parts["l1"]) * len(x)
            n += len(x)
            rows += score_batch(pred, y, mask)
        s = gather_scores(rows, run.info)
        totals = all_gather_cat(torch.tensor([[loss_sum, l1_sum, n]], dtype=torch.float64), run.info).sum(0)
        return {"val_loss": float(totals[0] / totals[2]), "val_l1": float(totals[1] / totals[2]),
                "val_score": s["score"], "val_ssim": s["ssim"], "val_masked_ssim": s["masked_ssim"],
                "val_hue_hist": s["hue_hist"], "val_images": s["images"],
                "val_score_input": baseline["score"]}   # the gray input's score: the loss curve's dashed line

    fixed = [val_set[i] for i in range(min(SAMPLE_ROWS, len(val_set)))]
    fixed_x, fixed_y = torch.stack([f[0] for f in fixed]), torch.stack([f[1] for f in fixed])

    def on_epoch(trainer, row):
        done = trainer.epoch
        if not (main_rank and args.sample_every and (done % args.sample_every == 0 or done == epochs)):
            return
        net = unwrap(trainer.model)
        was_training = net.training
        net.eval()
        with torch.no_grad(), trainer.autocast():
            restored = net(fixed_x.to(run.device)).float().cpu()
        net.train(was_training)
        path = run.out_dir / "samples" / f"epoch_{done:04d}.png"
        save_image_grid(path, [fixed_x, restored, fixed_y], ["input", "restored", "ground truth"], max_rows=SAMPLE_ROWS)

    monitor, mode = ("val_score", "max") if args.best_by == "score" else ("val_loss", "min")
    config = {**vars(args), **settings, "task": TASK, "builtin_data": builtin, "train_csv": str(csv_path),
              "val_score_gray_input": baseline["score"], "loss_terms": terms}
    trainer = Trainer(model, opt, loader, loss_fn, out_dir=run.out_dir, epochs=epochs, device=run.device,
                      info=run.info, evaluate=evaluate, scheduler=sched, scheduler_interval=interval,
                      monitor=monitor, mode=mode, amp_dtype=run.amp_dtype, accum_steps=args.accum_steps,
                      clip_grad=args.clip_grad, channels_last=args.channels_last, save_every=args.save_every,
                      seed=args.seed, config=config, on_epoch=on_epoch, progress=not args.no_progress)
    result = trainer.fit(resume=args.resume)
    if main_rank and result["history"]:
        print(summary(result, baseline, run.out_dir, csv_path, builtin, monitor, args.sample_every))
    cleanup(run.info)
    return result


if __name__ == "__main__":
    sys.exit(run_cli(main))
