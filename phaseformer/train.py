"""Train Phaseformer (or Spectroformer: --model spectroformer) for underwater image restoration (LSUI-style pairs).

  python phaseformer/train.py                                  # built-in synthetic underwater demo, ~1 min
  python phaseformer/train.py --data LSUI --val-count 400      # input/ + GT/: seeded split -> run/split.txt
  python phaseformer/train.py --data LSUI --split split.txt    # a given split
  python phaseformer/train.py --data uw_data                   # train/{a,b} + test/{a,b} (official layout)
  python phaseformer/train.py --data LSUI --init uieb.pth      # start from official / converted weights
  python phaseformer/train.py --resume runs/phaseformer/.../last.pt

The recipe of the LSUI training script (trains.py), with its defects fixed: 256x256 inputs
(--sampling resize; or random crops with flips and 90-degree rotations), batch 8, Adam lr 1e-3
betas (0.5, 0.999), the lr constant for --niter epochs then decaying linearly over --niter-decay
(50 + 500, i.e. 551 epochs), gradient clipping 1.0. Loss per head: Charbonnier + perceptual (VGG19
features[:35], or the official VGG16 four-layer variant) + Laplacian L1 + (1 - MS-SSIM), combined
with --loss-weights learned (uncertainty weighting that really trains; the original's softmax
weights never did) or fixed (Spectroformer's 0.03/0.025/0.02/0.01); the 2x head against the
full-resolution reference at twice the size. A NaN/inf loss skips the batch's update (weights and
Adam state untouched) and is counted in log.csv (skipped_steps). Validation every epoch: PSNR and
SSIM of the 1x output (clamped to [0, 1]) next to the same numbers for the input itself; the loss
weights are logged every epoch; samples/epoch_NNNN.png shows input / 1x output / ground truth.
Without --data: a generated LSUI-layout set of synthetic underwater images, trained on 32 px crops.

--model spectroformer trains the old model (final_model_AGSSF1, one output) with the Spectroformer
Train.py's loss as its default: fixed 0.03 Charbonnier + 0.025 perceptual (VGG16 four-layer) +
0.02 Laplacian + 0.01 (1 - MS-SSIM) on its one output (--loss-weights learned / --perceptual
vgg19 to change). Data, schedule, resume, samples, metrics and demo are the same. (The official
Train.py used Adam lr 3e-5, batch 1 and 1500 + 1500 epochs: --lr 3e-5 --batch-size 1 --niter 1500
--niter-decay 1500.)
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

if __package__ in (None, ""):  # `python <folder>/<script>.py` from a checkout: import this checkout's packages
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import cli
from common.checkpoint import load_checkpoint, unwrap
from common.cli import POSITIVE_INT, add_common_args, float_range, int_range, setup_run
from common.data import ensure_builtin, eval_loader, train_loader
from common.distributed import DistInfo, all_gather_cat, cleanup, wrap_model
from common.images import save_image_grid
from common.summary import Metric, format_summary
from common.io import UserError, atomic_write_text, require_file, run_cli
from common.metrics import psnr, ssim
from common.schedulers import constant_then_linear_decay
from common.trainer import Trainer
from common.vgg import WeightsUnavailable
from phaseformer.data import BUILTIN_VERSION, SAMPLINGS, PairDataset, make_builtin_dataset, resolve_dataset
from phaseformer.losses import TERMS, PERCEPTUAL_VARIANTS, PerceptualLoss, PhaseformerLoss
from phaseformer.model import DOWNSAMPLE_FACTOR, MODEL_NAMES, build_model
from phaseformer.official import read_weights

TASK = "phaseformer"
# trains.py: 256 px, batch 8, niter 50 + niter_decay 500
RECIPE = {"image_size": 256, "sampling": "resize", "batch_size": 8, "niter": 50, "niter_decay": 500}
# the built-in demo: about a minute on 2 CPU cores
DEMO = {"image_size": 32, "sampling": "crop", "batch_size": 8, "niter": 3, "niter_decay": 2}
RUN_OUTPUTS = ("split.txt", "samples")


# ---------------------------------------------------------------- arguments
def parse_args(argv=None) -> argparse.Namespace:
    p = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p, epochs=None, batch_size=None, lr=1e-3, clip_grad=1.0)
    g = p.add_argument_group("phaseformer options")
    g.add_argument("--model", choices=MODEL_NAMES, default="phaseformer",
                   help="phaseformer (two outputs) or spectroformer (the old model, one output)")
    g.add_argument("--image-size", type=int_range(32, 4096), default=None,
                   help="training input size, a multiple of 8 (default 256; demo 32)")
    g.add_argument("--sampling", choices=SAMPLINGS, default=None,
                   help="resize: whole images (trains.py, default); crop: random regions (demo)")
    g.add_argument("--val-size", type=int_range(32, 4096), default=None,
                   help="validation input size, a multiple of 8 (default: --image-size)")
    g.add_argument("--niter", type=cli.NONNEG_EPOCHS, default=None, help="epochs at the initial lr (default 50; demo 3)")
    g.add_argument("--niter-decay", type=cli.NONNEG_EPOCHS, default=None,
                   help="epochs of linear lr decay after --niter (default 500; demo 2); "
                        "--epochs defaults to niter + niter_decay + 1")
    g.add_argument("--beta1", type=float_range(0, 1, hi_open=True), default=0.5, help="Adam beta1")
    g.add_argument("--loss-weights", choices=("learned", "fixed"), default=None,
                   help="learned: uncertainty weighting (Kendall et al. 2018); fixed: 0.03/0.025/0.02/0.01 "
                        "(default: learned for phaseformer, fixed for spectroformer)")
    g.add_argument("--perceptual", choices=(*PERCEPTUAL_VARIANTS, "none"), default=None,
                   help="vgg19: features[:35] (trains.py; phaseformer's default); vgg16: relu1_2..relu4_3 at "
                        "224 px (the official repos; spectroformer's default); "
                        "without cached / downloadable ImageNet weights the term is left out, with a note")
    g.add_argument("--split", type=Path, default=None, help="split file (train<TAB>name / val<TAB>name lines)")
    g.add_argument("--val-count", type=POSITIVE_INT, default=None,
                   help="validation pairs of a seeded random split (default 10%%; LSUI papers use 400)")
    g.add_argument("--split-seed", type=cli.SEED, default=0, help="seed of the random split")
    g.add_argument("--sample-every", type=cli.NONNEG_EPOCHS, default=1,
                   help="write samples/epoch_NNNN.png (input / 1x output / ground truth) every N epochs; 0 = never")
    g.add_argument("--init", type=Path, default=None,
                   help="initial weights: an official release file, a converted file or a checkpoint "
                        "(the release weights expect [-1, 1] inputs; training here uses [0, 1])")
    return cli.parse_args(p, argv, resume_free=("sample_every",), task=TASK,
                          used=lambda ckpt: {k[4:]: v for k, v in ckpt["config"].items() if k.startswith("run_")})


def plan_run(args, stored: dict | None) -> dict:
    """The values a run uses: given flags, else the recipe (or the demo without --data). Kept apart
    from args, whose values --resume compares with the checkpoint's."""
    base = DEMO if args.data is None else RECIPE
    plan = {k: getattr(args, k) if getattr(args, k) is not None else base[k] for k in base}
    plan["epochs"] = args.epochs if args.epochs is not None else plan["niter"] + plan["niter_decay"] + 1
    plan["val_size"] = args.val_size or plan["image_size"]
    for flag, value in (("--image-size", plan["image_size"]), ("--val-size", plan["val_size"])):
        if value % DOWNSAMPLE_FACTOR:
            raise UserError(f"{flag} {value}: must be a multiple of {DOWNSAMPLE_FACTOR} (three 2x down-samplings)")
    if plan["epochs"] > plan["niter"] + plan["niter_decay"] + 1:
        raise UserError(f"--epochs {plan['epochs']}: more than niter + niter_decay + 1 = "
                        f"{plan['niter'] + plan['niter_decay'] + 1}, after which the lr would be 0 or negative")
    if args.split is not None and args.val_count is not None:
        raise UserError("--split and --val-count are alternatives; give one")
    if args.init is not None and args.resume is not None:
        raise UserError("--init starts a new run; a --resume continues one with its own weights")
    plan["terms"] = list(stored["run_loss_terms"]) if stored else None
    spectro = args.model == "spectroformer"
    plan["loss_weights"] = args.loss_weights or ("fixed" if spectro else "learned")
    plan["perceptual"] = args.perceptual or ("vgg16" if spectro else "vgg19")
    plan["heads"] = ("1x",) if spectro else ("1x", "2x")
    return plan


def make_criterion(args, plan, info, device) -> PhaseformerLoss:
    terms = plan["terms"]
    perceptual = None
    if terms is None:
        terms = [t for t in TERMS if t != "perceptual" or plan["perceptual"] != "none"]
    if "perceptual" in terms:
        try:
            perceptual = PerceptualLoss(plan["perceptual"], weights="imagenet")
        except WeightsUnavailable as e:
            if plan["terms"] is not None:
                raise UserError(f"{args.resume}: the run uses the perceptual loss, but {e}") from None
            if info.is_main:
                print(f"note: {e}\nnote: training without the perceptual term (the other three terms remain)")
            terms = [t for t in terms if t != "perceptual"]
    plan["terms"] = terms

    def mean_over_processes(t: torch.Tensor) -> torch.Tensor:
        if not info.enabled:
            return t
        t = t.clone()
        torch.distributed.all_reduce(t)
        return t / info.world_size

    return PhaseformerLoss(plan["loss_weights"], terms, perceptual, mean_over_processes,
                           heads=plan["heads"]).to(device)


# ---------------------------------------------------------------- main
def main(argv=None):
    args = parse_args(argv)
    resumed = load_checkpoint(args.resume, TASK) if args.resume is not None else None
    stored = resumed["config"] if resumed is not None else None
    if stored is not None and stored.get("task") != TASK:
        raise UserError(f"{args.resume}: not a phaseformer training checkpoint "
                        f"(its config names task {stored.get('task')!r})")
    plan = plan_run(args, stored)
    data_dir = args.data
    if data_dir is None:
        data_dir = ensure_builtin(TASK, BUILTIN_VERSION, make_builtin_dataset)
    train_pairs, val_pairs, split_text, data_desc = resolve_dataset(Path(data_dir), args.split, args.val_count,
                                                                    args.split_seed)
    if args.init is not None:
        require_file(args.init, "--init checkpoint file")
    init = read_weights(args.init, args.model) if args.init is not None else None   # read and checked before any output

    run = setup_run(args, TASK, "phaseformer", outputs=RUN_OUTPUTS,
                    reuse_memory=True)   # 2x the CPU step for ~27 % more peak memory (README: Memory reuse)
    main_rank = run.info.is_main
    if main_rank:
        atomic_write_text(run.out_dir / "split.txt", split_text)
        print(f"data: {data_desc}; split written to {run.out_dir / 'split.txt'}")
        if args.data is None:
            print(f"built-in demo: synthetic underwater images, {plan['image_size']} px {plan['sampling']}s, "
                  f"{plan['epochs']} epochs (give --data for real data; --image-size / --epochs to change)")

    model = build_model(args.model)
    two_heads = args.model == "phaseformer"
    for p in model.unused_parameters():  # modules official files hold but the output never uses
        p.requires_grad_(False)
    if init is not None:
        model.load_state_dict(init[0], strict=True)
        if main_rank:
            print(f"initialised from {args.init} ({init[1]['kind']})")
    criterion = make_criterion(args, plan, run.info, run.device)
    model = wrap_model(model.to(run.device), run.device, run.info, channels_last=args.channels_last)
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": trainable}] + ([{"params": list(criterion.parameters())}] if
                                        list(criterion.parameters()) else [])
    opt = torch.optim.Adam(groups, lr=args.lr, betas=(args.beta1, 0.999))
    sched = constant_then_linear_decay(opt, plan["niter"], plan["niter_decay"])

    train_set = PairDataset(train_pairs, plan["image_size"], plan["sampling"], train=True)
    val_set = PairDataset(val_pairs, plan["val_size"], "resize")
    loader = train_loader(train_set, plan["batch_size"], seed=args.seed, workers=args.workers, info=run.info)
    val_loader = eval_loader(val_set, plan["batch_size"], workers=args.workers, info=run.info)
    if main_rank:
        print(f"model: {args.model.capitalize()}, {sum(p.numel() for p in trainable):,} trainable parameters; "
              f"loss: {' + '.join(plan['terms'])} {'per head' if two_heads else 'on its one output'}, "
              f"{plan['loss_weights']} weights; "
              f"Adam lr {args.lr:g} betas ({args.beta1:g}, 0.999), lr constant for {plan['niter']} epoch(s) "
              f"then decaying over {plan['niter_decay']}")

    if resumed is not None:
        state = resumed["extra"].get(TASK, {})
        if state.get("loss_weighting"):
            criterion.weighting.load_state_dict(state["loss_weighting"])

    def loss_fn(m, batch):
        x, target_1x, target_2x = batch
        if not two_heads:
            return criterion(m(x), None, target_1x, None)
        out_1x, out_2x = m(x)
        return criterion(out_1x, out_2x, target_1x, target_2x)

    def metrics(pred, target):
        with torch.autocast(run.device.type, enabled=False):  # evaluate() runs under the training autocast
            pred = pred.float().clamp(0, 1)
            return psnr(pred, target), ssim(pred, target.float(), size_average=False)

    baseline = {}

    def val_loss(out_1x, out_2x, target_1x, target_2x) -> float:
        """The training loss on a validation batch, from this process's batch alone: the learned
        weighting's mean over processes is a collective, and processes may hold unequal batch counts."""
        pairs = {"1x": (out_1x, target_1x), "2x": (out_2x, target_2x)}
        losses = {(head, term): value
                  for head in criterion.heads
                  for term, value in criterion.term_losses(*pairs[head]).items()}
        weighting = criterion.weighting
        shared = getattr(weighting, "mean_over_processes", None)
        weighting.mean_over_processes = None
        try:
            return float(weighting(losses))
        finally:
            if shared is not None:
                weighting.mean_over_processes = shared

    def evaluate(m):
        psnrs, ssims, psnrs_2x, inputs = [], [], [], []
        loss_sum = torch.zeros(1, 2, dtype=torch.float64)   # (sum of batch loss x batch size, images)
        for x, target_1x, target_2x in val_loader:
            x, target_1x, target_2x = (t.to(run.device, non_blocking=True) for t in (x, target_1x, target_2x))
            out_1x, out_2x = m(x) if two_heads else (m(x), None)
            loss_sum += torch.tensor([[val_loss(out_1x, out_2x, target_1x, target_2x) * len(x), len(x)]],
                                     dtype=torch.float64)
            p, s = metrics(out_1x, target_1x)
            psnrs.append(p.cpu())
            ssims.append(s.cpu())
            if two_heads:
                psnrs_2x.append(metrics(out_2x, target_2x)[0].cpu())
            if not baseline:
                inputs.append(torch.stack(metrics(x, target_1x), 1).cpu())
        if not baseline:  # the "return the input" restoration, once
            both = all_gather_cat(inputs, run.info)
            baseline.update(val_psnr_input=float(both[:, 0].mean()), val_ssim_input=float(both[:, 1].mean()))
        totals = all_gather_cat(loss_sum, run.info).sum(0)
        row = {"val_loss": float(totals[0] / totals[1]),
               "val_psnr": float(all_gather_cat(psnrs, run.info).mean()),
               "val_ssim": float(all_gather_cat(ssims, run.info).mean())}
        if two_heads:
            row["val_psnr_2x"] = float(all_gather_cat(psnrs_2x, run.info).mean())
        return {**row, **baseline}

    samples = next(iter(eval_loader(val_set, 4, workers=0, info=DistInfo()))) if main_rank else None

    def on_epoch(t, row):
        row.update({k: float(v) for k, v in criterion.weights().items()})
        if main_rank:
            shown = " ".join(f"{k[2:]}={v:.3g}" for k, v in criterion.weights().items())
            print(f"  val PSNR {row['val_psnr']:.2f} dB, SSIM {row['val_ssim']:.4f} (input itself: "
                  f"{row['val_psnr_input']:.2f} dB, {row['val_ssim_input']:.4f}); loss weights {shown}"
                  + (f"; {row['skipped_steps']} update(s) skipped (non-finite loss)" if row["skipped_steps"] else ""))
        if main_rank and args.sample_every and t.epoch % args.sample_every == 0:
            save_samples(unwrap(t.model), samples, run.out_dir / "samples" / f"epoch_{t.epoch:04d}.png", run.device)

    def extra_state():
        return {TASK: {"loss_weighting": {k: v.detach().cpu() for k, v in criterion.weighting.state_dict().items()}}}

    config = {**vars(args), "task": TASK, "builtin_data": args.data is None,
              **{f"run_{k}": v for k, v in plan.items() if k != "terms"}, "run_loss_terms": plan["terms"]}
    trainer = Trainer(model, opt, loader, loss_fn, out_dir=run.out_dir, epochs=plan["epochs"], device=run.device,
                      info=run.info, evaluate=evaluate, scheduler=sched, scheduler_interval="epoch",
                      monitor="val_psnr", mode="max", amp_dtype=run.amp_dtype, accum_steps=args.accum_steps,
                      clip_grad=args.clip_grad, channels_last=args.channels_last, save_every=args.save_every,
                      seed=args.seed, config=config, on_epoch=on_epoch, extra_state=extra_state,
                      progress=not args.no_progress, nonfinite="skip")
    result = trainer.fit(resume=args.resume)
    if main_rank and result["best_epoch"]:
        print(summary(result, run.out_dir, Path(data_dir), args.data is None, args.sample_every, args.model))
    cleanup(run.info)
    return result


def summary(result: dict, out_dir: Path, data_dir: Path, builtin: bool, sample_every: int,
            model: str = "phaseformer") -> str:
    history = result["history"]
    best = history[result["best_epoch"] - 1]
    skipped = sum(int(r.get("skipped_steps", 0)) for r in history)
    val_inputs = f"{data_dir / 'input'}/" if builtin else "IMAGES..."
    notes = [f"val_psnr_2x {best['val_psnr_2x']:.2f} dB (the 2x head)"] if "val_psnr_2x" in best else []
    if skipped:
        notes.append(f"{skipped} update(s) skipped for non-finite losses")
    return format_summary(
        f"{model}, best.pt = epoch {best['epoch']} of {len(history)} (highest val_psnr)",
        [Metric("val_psnr", best["val_psnr"], best["val_psnr_input"], higher_is_better=True, unit=" dB"),
         Metric("val_ssim", best["val_ssim"], best["val_ssim_input"], higher_is_better=True)],
        "the degraded input itself, returned unrestored", out_dir,
        ["best.pt", "last.pt", "log.csv", "loss_curve.png", "split.txt"] + (["samples/"] if sample_every else []),
        f"built-in demo data in {data_dir} (input/ degraded, GT/ clean; the validation images are listed in "
        f"{out_dir / 'split.txt'})" if builtin else str(data_dir),
        [f"python phaseformer/infer.py --weights {out_dir / 'best.pt'} {val_inputs} --out {out_dir / 'restored'}"],
        notes)


@torch.no_grad()
def save_samples(model, batch, path: Path, device: torch.device) -> None:
    x, target_1x, _ = batch
    was_training = model.training
    model.eval()
    out_1x = model(x.to(device), head="1x").float().cpu()
    model.train(was_training)
    save_image_grid(path, [x, out_1x, target_1x], ["input", "output", "ground truth"])


if __name__ == "__main__":
    sys.exit(run_cli(main))
