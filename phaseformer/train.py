"""Train Phaseformer for underwater image restoration (LSUI-style pairs).

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
from common.cli import NONNEG_INT, POSITIVE_INT, add_common_args, float_range, int_range, setup_run
from common.data import ensure_builtin, eval_loader, train_loader
from common.distributed import DistInfo, all_gather_cat, cleanup, wrap_model
from common.images import save_image_grid
from common.io import UserError, atomic_write_text, require_file, run_cli
from common.metrics import psnr, ssim
from common.schedulers import constant_then_linear_decay
from common.trainer import Trainer
from common.vgg import WeightsUnavailable
from phaseformer.data import BUILTIN_VERSION, SAMPLINGS, PairDataset, make_builtin_dataset, resolve_dataset
from phaseformer.losses import TERMS, PERCEPTUAL_VARIANTS, PerceptualLoss, PhaseformerLoss
from phaseformer.model import DOWNSAMPLE_FACTOR, build_model
from phaseformer.official import load_weights

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
    g.add_argument("--image-size", type=int_range(32, 4096), default=None,
                   help="training input size, a multiple of 8 (default 256; demo 32)")
    g.add_argument("--sampling", choices=SAMPLINGS, default=None,
                   help="resize: whole images (trains.py, default); crop: random regions (demo)")
    g.add_argument("--val-size", type=int_range(32, 4096), default=None,
                   help="validation input size, a multiple of 8 (default: --image-size)")
    g.add_argument("--niter", type=NONNEG_INT, default=None, help="epochs at the initial lr (default 50; demo 3)")
    g.add_argument("--niter-decay", type=NONNEG_INT, default=None,
                   help="epochs of linear lr decay after --niter (default 500; demo 2); "
                        "--epochs defaults to niter + niter_decay + 1")
    g.add_argument("--beta1", type=float_range(0, 1, hi_open=True), default=0.5, help="Adam beta1")
    g.add_argument("--loss-weights", choices=("learned", "fixed"), default="learned",
                   help="learned: uncertainty weighting (Kendall et al. 2018); fixed: 0.03/0.025/0.02/0.01")
    g.add_argument("--perceptual", choices=(*PERCEPTUAL_VARIANTS, "none"), default="vgg19",
                   help="vgg19: features[:35] (trains.py); vgg16: relu1_2..relu4_3 at 224 px (official); "
                        "without cached / downloadable ImageNet weights the term is left out, with a note")
    g.add_argument("--split", type=Path, default=None, help="split file (train<TAB>name / val<TAB>name lines)")
    g.add_argument("--val-count", type=POSITIVE_INT, default=None,
                   help="validation pairs of a seeded random split (default 10%%; LSUI papers use 400)")
    g.add_argument("--split-seed", type=NONNEG_INT, default=0, help="seed of the random split")
    g.add_argument("--sample-every", type=NONNEG_INT, default=1,
                   help="write samples/epoch_NNNN.png (input / 1x output / ground truth) every N epochs; 0 = never")
    g.add_argument("--init", type=Path, default=None,
                   help="initial weights: an official release file, a converted file or a checkpoint "
                        "(the release weights expect [-1, 1] inputs; training here uses [0, 1])")
    return cli.parse_args(p, argv, resume_free=("sample_every",))


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
    return plan


def make_criterion(args, plan, info, device) -> PhaseformerLoss:
    terms = plan["terms"]
    perceptual = None
    if terms is None:
        terms = [t for t in TERMS if t != "perceptual" or args.perceptual != "none"]
    if "perceptual" in terms:
        try:
            perceptual = PerceptualLoss(args.perceptual, weights="imagenet")
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

    return PhaseformerLoss(args.loss_weights, terms, perceptual, mean_over_processes).to(device)


# ---------------------------------------------------------------- main
def main(argv=None):
    args = parse_args(argv)
    resumed = load_checkpoint(args.resume) if args.resume is not None else None
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

    run = setup_run(args, TASK, "phaseformer", outputs=RUN_OUTPUTS)
    main_rank = run.info.is_main
    if main_rank:
        atomic_write_text(run.out_dir / "split.txt", split_text)
        print(f"data: {data_desc}; split written to {run.out_dir / 'split.txt'}")
        if args.data is None:
            print(f"built-in demo: synthetic underwater images, {plan['image_size']} px {plan['sampling']}s, "
                  f"{plan['epochs']} epochs (give --data for real data; --image-size / --epochs to change)")

    model = build_model()
    for p in model.unused_parameters():  # ups2 and attention[3] hold weights but are never used
        p.requires_grad_(False)
    if args.init is not None:
        info = load_weights(model, args.init)
        if main_rank:
            print(f"initialised from {args.init} ({info['kind']})")
    criterion = make_criterion(args, plan, run.info, run.device)
    model = wrap_model(model.to(run.device), run.device, run.info)
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
        print(f"model: Phaseformer, {sum(p.numel() for p in trainable):,} trainable parameters; "
              f"loss: {' + '.join(plan['terms'])} per head, {args.loss_weights} weights; "
              f"Adam lr {args.lr:g} betas ({args.beta1:g}, 0.999), lr constant for {plan['niter']} epoch(s) "
              f"then decaying over {plan['niter_decay']}")

    if resumed is not None:
        state = resumed["extra"].get(TASK, {})
        if state.get("loss_weighting"):
            criterion.weighting.load_state_dict(state["loss_weighting"])

    def loss_fn(m, batch):
        x, target_1x, target_2x = batch
        out_1x, out_2x = m(x)
        return criterion(out_1x, out_2x, target_1x, target_2x)

    def metrics(pred, target):
        with torch.autocast(run.device.type, enabled=False):  # evaluate() runs under the training autocast
            pred = pred.float().clamp(0, 1)
            return psnr(pred, target), ssim(pred, target.float(), size_average=False)

    baseline = {}

    def evaluate(m):
        psnrs, ssims, psnrs_2x, inputs = [], [], [], []
        for x, target_1x, target_2x in val_loader:
            x, target_1x, target_2x = (t.to(run.device, non_blocking=True) for t in (x, target_1x, target_2x))
            out_1x, out_2x = m(x)
            p, s = metrics(out_1x, target_1x)
            psnrs.append(p.cpu())
            ssims.append(s.cpu())
            psnrs_2x.append(metrics(out_2x, target_2x)[0].cpu())
            if not baseline:
                inputs.append(torch.stack(metrics(x, target_1x), 1).cpu())
        if not baseline:  # the "return the input" restoration, once
            both = all_gather_cat(torch.cat(inputs), run.info)
            baseline.update(val_psnr_input=float(both[:, 0].mean()), val_ssim_input=float(both[:, 1].mean()))
        return {"val_psnr": float(all_gather_cat(torch.cat(psnrs), run.info).mean()),
                "val_ssim": float(all_gather_cat(torch.cat(ssims), run.info).mean()),
                "val_psnr_2x": float(all_gather_cat(torch.cat(psnrs_2x), run.info).mean()), **baseline}

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
        best = result["history"][result["best_epoch"] - 1]
        skipped = sum(int(r.get("skipped_steps", 0)) for r in result["history"])
        gain = best["val_psnr"] - best["val_psnr_input"]
        print(f"best epoch {result['best_epoch']}: val PSNR {best['val_psnr']:.2f} dB, SSIM {best['val_ssim']:.4f}; "
              f"the input itself scores {best['val_psnr_input']:.2f} dB, {best['val_ssim_input']:.4f} "
              f"({'+' if gain >= 0 else ''}{gain:.2f} dB)"
              + (f"; {skipped} update(s) skipped for non-finite losses" if skipped else ""))
        print(f"restore images: python phaseformer/infer.py --weights {run.out_dir / 'best.pt'} IMAGES... --out DIR")
    cleanup(run.info)
    return result


@torch.no_grad()
def save_samples(model, batch, path: Path, device: torch.device) -> None:
    x, target_1x, _ = batch
    was_training = model.training
    model.eval()
    out_1x = model(x.to(device), head="1x").float().cpu()
    model.train(was_training)
    save_image_grid(path, [x, out_1x, target_1x], ["input", "1x output", "ground truth"])


if __name__ == "__main__":
    sys.exit(run_cli(main))
