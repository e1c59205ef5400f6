"""A minimal task built on common/, for tests that need a real training process.

It has everything that makes exact resume hard: shuffling, random augmentation in the dataset,
dropout, Adam state, a per-step schedule, and DataLoader workers.
Usage: python tests/tiny_train.py --out DIR [--resume DIR/last.pt] [common flags]
"""
import sys
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import Dataset

# run as a script, sys.path[0] is tests/: import this checkout's packages, not an installed copy's
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.cli import ArgumentParser, add_common_args, parse_args, setup_run
from common.data import eval_loader, train_loader
from common.distributed import all_gather_cat, cleanup, wrap_model
from common.io import run_cli
from common.schedulers import warmup_cosine
from common.trainer import Trainer


class Blobs(Dataset):
    """Two classes of 16x16 images; random flips + noise drawn from torch's RNG (augmentation)."""

    def __init__(self, n: int, augment: bool):
        g = torch.Generator().manual_seed(0)
        self.y = torch.randint(0, 2, (n,), generator=g)
        self.x = torch.randn(n, 3, 16, 16, generator=g) * 0.5
        self.x[self.y == 1, :, 4:12, 4:12] += 1.0
        self.augment = augment

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        x = self.x[i]
        if self.augment:
            if torch.rand(()) < 0.5:
                x = x.flip(-1)
            x = x + 0.05 * torch.randn_like(x)
        return x, self.y[i]


def make_model(norm: str) -> nn.Module:
    layers = [nn.Conv2d(3, 8, 3, padding=1)]
    if norm == "bn":
        layers.append(nn.BatchNorm2d(8))
    layers += [nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(),
               nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.2), nn.Linear(16, 2)]
    return nn.Sequential(*layers)


def main():
    p = ArgumentParser()
    add_common_args(p, epochs=4, batch_size=8, lr=1e-2, workers=0)
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--norm", default="bn", choices=["bn", "none"])
    p.add_argument("--no-dropout", action="store_true")
    p.add_argument("--no-augment", action="store_true")
    p.add_argument("--nan-at-epoch", type=int, default=0, help="make the loss NaN in this epoch (tests)")
    args = parse_args(p)
    run = setup_run(args, "tiny", "tiny")

    model = make_model(args.norm)
    if args.no_dropout:
        model[-2].p = 0.0
    model = wrap_model(model.to(run.device), run.device, run.info, channels_last=args.channels_last)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    loader = train_loader(Blobs(args.samples, not args.no_augment), args.batch_size, seed=args.seed,
                          workers=args.workers, info=run.info)
    steps = args.epochs * len(loader) // args.accum_steps
    sched = warmup_cosine(opt, steps, warmup_steps=3)
    val = eval_loader(Blobs(32, False), 16, workers=0, info=run.info)

    def loss_fn(m, batch):
        x, y = batch
        loss = F.cross_entropy(m(x), y)
        if args.nan_at_epoch and trainer.epoch + 1 >= args.nan_at_epoch:
            loss = loss * float("nan")
        return loss

    def evaluate(m):
        preds, ys, losses = [], [], []
        for x, y in val:
            logits = m(x.to(run.device))
            losses.append(F.cross_entropy(logits, y.to(run.device), reduction="sum"))
            preds.append(logits.argmax(1).cpu())
            ys.append(y)
        pred, y = all_gather_cat(preds, run.info), all_gather_cat(ys, run.info)
        loss = all_gather_cat(torch.stack(losses).sum().view(1).cpu(), run.info).sum() / len(y)
        return {"val_loss": float(loss), "val_acc": float((pred == y).float().mean())}

    def on_step(t, logs):
        print(f"STEP {logs['step']}", flush=True)

    trainer = Trainer(model, opt, loader, loss_fn, out_dir=run.out_dir, epochs=args.epochs,
                      device=run.device, info=run.info, evaluate=evaluate, scheduler=sched,
                      scheduler_interval="step", amp_dtype=run.amp_dtype, accum_steps=args.accum_steps,
                      clip_grad=args.clip_grad, channels_last=args.channels_last,
                      save_every=args.save_every, seed=args.seed, config=args, on_step=on_step,
                      progress=not args.no_progress)
    trainer.fit(resume=args.resume)
    cleanup(run.info)


if __name__ == "__main__":
    sys.exit(run_cli(main))
