"""The one training loop every task uses.

A task supplies the model, optimizer, loader and two functions:
  loss_fn(model, batch) -> loss, or (loss, {name: float})   for one training micro-batch
  evaluate(model) -> {metric: float}                        run once per epoch, in eval mode
The loop adds AMP, gradient accumulation and clipping, channels_last, per-step / per-epoch LR
schedules, tqdm bars, a CSV/TensorBoard/plot log, best/last/periodic checkpoints, early stopping,
a NaN/inf guard and exact resume.

Exact resume: `last.pt` is written at the end of every epoch with the RNG states; the shuffling
order and the workers' seeds depend only on (seed, epoch). A run killed at any point and resumed
from `last.pt` therefore replays the interrupted epoch and ends bit-identical (on CPU).
Ctrl-C (SIGINT) or SIGTERM stops at the next optimizer step instead and writes `last.pt` there,
mid-epoch; the resume then re-reads (without training on) the batches already done, so the data
order and augmentation stay exact. A second Ctrl-C stops at once.
"""
from __future__ import annotations

import contextlib
import math
import os
import shlex
import shutil
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import torch
from torch.optim.lr_scheduler import ReduceLROnPlateau
from tqdm import tqdm

from common.checkpoint import UNFINISHED_MARKER, load_checkpoint, restore_training_state, save_checkpoint, unwrap
from common.data import set_epoch
from common.device import autocast
from common.distributed import DistInfo, all_reduce_mean, any_rank, barrier, check_replicas, sync_buffers
from common.io import UserError
from common.repro import set_rng_state
from common.runlog import RunLog


def run_finished(ckpt: dict, epochs: int, patience: int | None) -> bool:
    """Whether a checkpoint's run already did all `epochs` or stopped early."""
    bad = ckpt.get("extra", {}).get("trainer", {}).get("bad_epochs", 0)
    return ckpt["epoch"] >= epochs or (patience is not None and bad >= patience)


def resume_command(last: Path, world_size: int = 1) -> str:
    """The command that continues a run: the script as it was started (under torchrun with as many
    processes: --batch-size is per process), and --resume alone (every other flag is taken from
    the checkpoint)."""
    script = sys.argv[0] if sys.argv and sys.argv[0].endswith(".py") else None
    if script is None:
        return f"--resume {shlex.quote(str(last))}"
    if world_size > 1:
        return " ".join(shlex.quote(part) for part in ("torchrun", "--nproc_per_node", str(world_size), script,
                                                        "--resume", str(last)))
    python = "python"   # the short name where it is this interpreter, else the full path
    found = shutil.which("python")
    if sys.executable and (found is None or os.path.abspath(found) != os.path.abspath(sys.executable)):
        python = sys.executable
    return " ".join(shlex.quote(part) for part in (python, script, "--resume", str(last)))


class TrainingDiverged(UserError):
    """The loss or the gradients became NaN/inf; training stopped before the update."""


def move_to(batch, device: torch.device, channels_last: bool = False):
    """Tensors in (nested) tuples/lists/dicts to `device`; 4-D float tensors optionally channels_last."""
    if isinstance(batch, torch.Tensor):
        fmt = torch.channels_last if channels_last and batch.dim() == 4 and batch.is_floating_point() \
            else torch.preserve_format
        return batch.to(device, non_blocking=True, memory_format=fmt)
    if isinstance(batch, dict):
        return {k: move_to(v, device, channels_last) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_to(v, device, channels_last) for v in batch)
    return batch


def batch_size_of(batch) -> int:
    if isinstance(batch, torch.Tensor):
        return batch.shape[0]
    if isinstance(batch, dict):
        return batch_size_of(next(iter(batch.values())))
    if isinstance(batch, (list, tuple)) and batch:
        return batch_size_of(batch[0])
    return 1


def split_batch(batch, rows: int) -> list:
    """A batch (tensors with a common first dimension, in nested tuples/lists/dicts) as micro-batches
    of `rows` samples; anything that is not a tensor goes to every micro-batch as it is."""
    def part(b, lo, hi):
        if isinstance(b, torch.Tensor):
            return b[lo:hi]
        if isinstance(b, dict):
            return {k: part(v, lo, hi) for k, v in b.items()}
        if isinstance(b, (list, tuple)):
            return type(b)(part(v, lo, hi) for v in b)
        return b
    n = batch_size_of(batch)
    return [part(batch, lo, min(lo + rows, n)) for lo in range(0, n, rows)]


class Trainer:
    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, train_loader,
                 loss_fn: Callable, *, out_dir: str | Path, epochs: int, device: torch.device,
                 info: DistInfo | None = None, evaluate: Callable | None = None,
                 scheduler=None, scheduler_interval: str = "epoch",
                 monitor: str = "val_loss", mode: str = "min", min_delta: float = 0.0,
                 patience: int | None = None, amp_dtype: torch.dtype | None = None,
                 accum_steps: int = 1, clip_grad: float | None = None, channels_last: bool = False,
                 save_every: int = 0, seed: int = 0, config=None,
                 on_step: Callable | None = None, on_epoch: Callable | None = None,
                 extra_state: Callable[[], dict] | None = None, progress: bool = True,
                 nonfinite: str = "stop", micro_batch: int | None = None, tensorboard: bool = True):
        if scheduler_interval not in ("step", "epoch"):
            raise ValueError("scheduler_interval must be 'step' or 'epoch'")
        if mode not in ("min", "max"):
            raise ValueError("mode must be 'min' or 'max'")
        if nonfinite not in ("stop", "skip"):
            raise ValueError("nonfinite must be 'stop' or 'skip'")
        if micro_batch is not None and micro_batch < 1:
            raise ValueError("micro_batch must be a positive number of samples, or None")
        self.nonfinite = nonfinite  # a NaN/inf loss or gradient: stop the run, or skip that update
        # forward and backward of each batch in micro-batches of this many samples (the same gradient
        # for a model whose samples do not interact, no BatchNorm, and a loss that is a mean over
        # samples; on the CPU it keeps activations small: see common.device.in_chunks)
        self.micro_batch = micro_batch
        self.tensorboard = tensorboard  # False: the task writes its own TensorBoard events (spectral's dashboard)
        self.model, self.optimizer, self.loader, self.loss_fn = model, optimizer, train_loader, loss_fn
        self.out_dir, self.epochs, self.device = Path(out_dir), epochs, device
        self.info = info or DistInfo()
        self.evaluate, self.scheduler, self.scheduler_interval = evaluate, scheduler, scheduler_interval
        self.monitor = monitor if evaluate is not None else "train_loss"
        self.mode, self.min_delta, self.patience = mode if evaluate is not None else "min", min_delta, patience
        self.amp_dtype, self.accum_steps, self.clip_grad = amp_dtype, max(1, accum_steps), clip_grad
        self.channels_last, self.save_every, self.seed, self.config = channels_last, save_every, seed, config
        self.on_step, self.on_epoch, self.extra_state, self.progress = on_step, on_epoch, extra_state, progress
        self.scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
        if channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.epoch = 0          # completed epochs
        self.step = 0           # optimizer steps
        self.best = math.inf if self.mode == "min" else -math.inf
        self.best_epoch = 0
        self.bad_epochs = 0
        self.log = None
        self._stop = False         # Ctrl-C / SIGTERM: stop at the next optimizer step
        self._resume_at = None     # mid-epoch resume point (from an interrupted run's last.pt)

    # ------------------------------------------------------------------ helpers
    @property
    def last_path(self) -> Path:
        return self.out_dir / "last.pt"

    @property
    def best_path(self) -> Path:
        return self.out_dir / "best.pt"

    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def autocast(self):
        return autocast(self.device, self.amp_dtype)

    def _improved(self, value: float) -> bool:
        if value is None or not math.isfinite(value):
            return False
        if self.mode == "min":
            return value < self.best - self.min_delta
        return value > self.best + self.min_delta

    def _save(self, path: Path, history: list[dict], mid_epoch: dict | None = None) -> None:
        extra = {"trainer": {"best_epoch": self.best_epoch, "bad_epochs": self.bad_epochs,
                             "monitor": self.monitor, "mode": self.mode, "history": history}}
        if mid_epoch is not None:
            extra["trainer"]["mid_epoch"] = mid_epoch
        if self.extra_state is not None:
            extra.update(self.extra_state())
        save_checkpoint(path, model=self.model, optimizer=self.optimizer, scheduler=self.scheduler,
                        scaler=self.scaler, epoch=self.epoch, step=self.step,
                        best_metric=self.best if math.isfinite(self.best) else None,
                        config=self.config, extra=extra)
        (self.out_dir / UNFINISHED_MARKER).unlink(missing_ok=True)   # a run now, no longer an unfinished start

    def resume(self, path: str | Path) -> None:
        ckpt = load_checkpoint(path)
        restore_training_state(ckpt, path, model=self.model, optimizer=self.optimizer,
                               scheduler=self.scheduler, scaler=self.scaler)
        state = ckpt["extra"].get("trainer", {})
        self.epoch, self.step = ckpt["epoch"], ckpt["step"]
        if ckpt["best_metric"] is not None:
            self.best = ckpt["best_metric"]
        self.best_epoch = state.get("best_epoch", 0)
        self.bad_epochs = state.get("bad_epochs", 0)
        self._history = list(state.get("history", []))
        mid = state.get("mid_epoch")
        if mid:  # the RNG state belongs after the batches already done, which the epoch re-reads first
            self._resume_at = {**mid, "rng": ckpt["rng"]}
        else:
            set_rng_state(ckpt["rng"])
        if self.info.is_main:
            where = f" and {mid['batch']} batch(es) of epoch {self.epoch + 1}" if mid else ""
            print(f"resumed from {path}: {self.epoch} epoch(s){where}, {self.step} step(s) done")

    # ------------------------------------------------------------------ loop
    def fit(self, resume: str | Path | None = None) -> dict:
        self._history = []
        if resume:
            self.resume(resume)
        if self.info.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            self.log = RunLog(self.out_dir, self._history, tensorboard=self.tensorboard, monitor=self.monitor,
                              mode=self.mode)
        previous = self._catch_stop_signals()
        try:
            while not self._stop_early() and self.epoch < self.epochs:
                row = self._run_epoch()
                if self.info.is_main:
                    self.log.log_epoch(row, best_epoch=self.best_epoch)
                    print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                   for k, v in row.items()), flush=True)
                if self._stop_early():
                    if self.info.is_main:
                        print(f"early stopping: no {self.monitor} improvement in {self.patience} epoch(s)")
                    break
                if self._stop_requested() and self.epoch < self.epochs:
                    self._interrupted(f"after epoch {self.epoch}")
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            if self.log is not None:
                self.log.close()
        check_replicas(self.model, self.info, self.optimizer)   # under torchrun: every process ends as rank 0
        if self.info.is_main:
            print(f"best {self.monitor}={self.best:.6g} at epoch {self.best_epoch}; "
                  f"checkpoints in {self.out_dir} (best.pt, last.pt), log in {self.out_dir / 'log.csv'}")
        return {"best": self.best, "best_epoch": self.best_epoch, "stopped_early": self._stop_early(),
                "history": self.log.history if self.log else [], "out_dir": self.out_dir}

    def _stop_early(self) -> bool:
        return self.patience is not None and self.bad_epochs >= self.patience

    # ------------------------------------------------------------------ Ctrl-C / SIGTERM
    def _catch_stop_signals(self) -> dict:
        if threading.current_thread() is not threading.main_thread():
            return {}
        previous = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.getsignal(sig)
            signal.signal(sig, self._on_stop_signal)
        return previous

    def _on_stop_signal(self, signum, frame) -> None:
        if self._stop:
            raise KeyboardInterrupt  # the second one: stop at once (last.pt stays the previous one)
        self._stop = True
        if self.info.is_main:
            print(f"\n{signal.Signals(signum).name}: stopping after this step and saving a resumable "
                  f"checkpoint (Ctrl-C again to stop at once)", file=sys.stderr, flush=True)

    def _stop_requested(self, agreed: bool | None = None) -> bool:
        """Under torchrun every process must stop at the same step: use the flag agreed in _guard."""
        return agreed if self.info.enabled and agreed is not None else self._stop

    def _interrupted(self, where: str):
        if self.info.is_main:
            print(f"interrupted {where}: resumable checkpoint {self.last_path}; continue with: "
                  f"{resume_command(self.last_path, self.info.world_size)}", file=sys.stderr, flush=True)
        raise KeyboardInterrupt

    def _run_epoch(self) -> dict:
        epoch = self.epoch
        set_epoch(self.loader, epoch, self.seed)
        self.model.train()
        t0 = time.perf_counter()
        loss_sum, n_batches, n_samples = torch.zeros((), dtype=torch.float64), 0, 0
        extra_sums: dict[str, float] = {}
        skip, resume_at, skipped, window_bad = 0, self._resume_at, 0, False
        if resume_at is not None:
            self._resume_at = None
            skip = int(resume_at["batch"])
            loss_sum += resume_at["loss_sum"]
            n_batches, n_samples = int(resume_at["n_batches"]), int(resume_at["n_samples"])
            skipped = int(resume_at.get("skipped", 0))
            extra_sums = dict(resume_at["extra_sums"])
            if self.info.is_main:
                print(f"epoch {epoch + 1}: re-reading the {skip} batch(es) done before the interruption "
                      f"(no training on them)")
        n_micro = len(self.loader)
        bar = tqdm(self.loader, desc=f"epoch {epoch + 1}/{self.epochs}", leave=False, dynamic_ncols=True,
                   disable=not (self.progress and self.info.is_main))
        self.optimizer.zero_grad(set_to_none=True)
        batches = iter(bar)
        agreed_stop = False
        for i in range(n_micro):
            try:
                batch = next(batches)
            except StopIteration:
                break
            except Exception:
                # a Ctrl-C from the terminal also ends the DataLoader workers; the state is still
                # at the last step boundary, so save there
                if self._stop and i > skip and i % self.accum_steps == 0:
                    bar.close()
                    self._save_mid_epoch(i, loss_sum, n_batches, n_samples, extra_sums, skipped)
                    self._interrupted(f"in epoch {epoch + 1} after batch {i}/{n_micro}")
                raise
            if i < skip:
                if i + 1 == skip:
                    set_rng_state(resume_at["rng"])
                continue
            batch = move_to(batch, self.device, self.channels_last)
            last_micro = (i + 1) % self.accum_steps == 0 or i + 1 == n_micro
            sync = self.info.enabled and not last_micro and hasattr(self.model, "no_sync")
            ctx = self.model.no_sync() if sync else contextlib.nullcontext()
            with ctx:
                if self.micro_batch and batch_size_of(batch) > self.micro_batch:
                    loss, logs = self._forward_backward_in_parts(batch)
                    agreed_stop, bad = self._guard(loss, epoch, i)   # a bad window's gradients are dropped
                else:
                    with self.autocast():
                        out = self.loss_fn(self.model, batch)
                    loss, logs = out if isinstance(out, tuple) else (out, {})
                    agreed_stop, bad = self._guard(loss, epoch, i)
                    if not bad:
                        self.scaler.scale(loss / self.accum_steps).backward()
            window_bad |= bad
            if last_micro:
                if window_bad or not self._optimizer_step(epoch, i):
                    self.optimizer.zero_grad(set_to_none=True)  # nonfinite="skip": this update is dropped
                    skipped += 1
                window_bad = False
            n_samples += batch_size_of(batch)
            if not bad:
                loss_sum += loss.detach().double().cpu()
                n_batches += 1
                for k, v in logs.items():
                    extra_sums[k] = extra_sums.get(k, 0.0) + float(v)
            if last_micro:
                if self.on_step is not None:
                    self.on_step(self, {"epoch": epoch + 1, "step": self.step, "loss": loss.item(), **logs})
                if bar.disable is False and (self.step % 5 == 0 or i + 1 == n_micro):
                    rate = n_samples * self.info.world_size / (time.perf_counter() - t0)
                    bar.set_postfix(loss=f"{float(loss_sum) / n_batches:.4g}", lr=f"{self.lr():.3g}",
                                    img_s=f"{rate:.1f}")
                if i + 1 < n_micro and self._stop_requested(agreed_stop):
                    bar.close()
                    self._save_mid_epoch(i + 1, loss_sum, n_batches, n_samples, extra_sums, skipped)
                    self._interrupted(f"in epoch {epoch + 1} after batch {i + 1}/{n_micro}")
        bar.close()
        elapsed = time.perf_counter() - t0
        sync_buffers(self.model, self.info)   # evaluate and save the same model on every process
        row = {"epoch": epoch + 1, "train_loss": all_reduce_mean(loss_sum / max(1, n_batches), self.info)}
        row.update({f"train_{k}": all_reduce_mean(v / max(1, n_batches), self.info) for k, v in extra_sums.items()})
        if self.nonfinite == "skip":
            row["skipped_steps"] = skipped
            if skipped and self.info.is_main:
                print(f"warning: {skipped} update(s) skipped in epoch {epoch + 1}: the loss or the gradients "
                      f"were NaN/inf", flush=True)
        row["lr"] = self.lr()
        row["samples_per_s"] = n_samples * self.info.world_size / elapsed
        if self.evaluate is not None:
            model = unwrap(self.model)  # no DDP collectives inside evaluation
            model.eval()
            with torch.no_grad(), self.autocast():
                row.update(self.evaluate(model))
            model.train()
        value = row.get(self.monitor)
        if self.evaluate is not None and value is None:
            raise KeyError(f"evaluate() returned no '{self.monitor}' (got {sorted(row)})")
        if self.scheduler is not None:
            if isinstance(self.scheduler, ReduceLROnPlateau):
                self.scheduler.step(value)
            elif self.scheduler_interval == "epoch":
                self.scheduler.step()
        self.epoch += 1
        improved = self._improved(value)
        if improved:
            self.best, self.best_epoch, self.bad_epochs = value, self.epoch, 0
        else:
            self.bad_epochs += 1
        row["time_s"] = time.perf_counter() - t0
        if self.on_epoch is not None:
            self.on_epoch(self, row)
        if self.info.is_main:
            history = self.log.history + [row]
            if improved:
                self._save(self.best_path, history)
            if self.save_every and self.epoch % self.save_every == 0:
                self._save(self.out_dir / f"epoch_{self.epoch:04d}.pt", history)
            self._save(self.last_path, history)
        barrier(self.info)
        return row

    def _save_mid_epoch(self, done: int, loss_sum, n_batches: int, n_samples: int, extra_sums: dict,
                        skipped: int) -> None:
        if self.info.is_main:
            self._save(self.last_path, list(self.log.history),
                       mid_epoch={"batch": done, "loss_sum": float(loss_sum), "n_batches": n_batches,
                                  "n_samples": n_samples, "extra_sums": dict(extra_sums), "skipped": skipped})
        barrier(self.info)

    def _forward_backward_in_parts(self, batch) -> tuple[torch.Tensor, dict]:
        """Backward of the batch's mean loss, one micro-batch at a time (each part's loss weighted by
        its share of the batch); returns that loss and the logs, weighted alike."""
        n = batch_size_of(batch)
        parts = split_batch(batch, self.micro_batch)
        total, logs = 0.0, {}
        for j, part in enumerate(parts):
            share = batch_size_of(part) / n
            quiet = j + 1 < len(parts) and self.info.enabled and hasattr(self.model, "no_sync")
            with self.model.no_sync() if quiet else contextlib.nullcontext():   # one all-reduce per batch
                with self.autocast():
                    out = self.loss_fn(self.model, part)
                loss, part_logs = out if isinstance(out, tuple) else (out, {})
                self.scaler.scale(loss * (share / self.accum_steps)).backward()
            total = total + loss.detach() * share
            for k, v in part_logs.items():
                logs[k] = logs.get(k, 0.0) + float(v) * share
        return total, logs

    def _guard(self, loss: torch.Tensor, epoch: int, i: int) -> tuple[bool, bool]:
        """(stop, bad): whether any process was asked to stop (Ctrl-C), so that all of them stop at
        the same step, and whether the loss is NaN/inf on any process. A bad loss stops the run
        before the update, or (nonfinite="skip") drops this update on every process."""
        bad = not bool(torch.isfinite(loss.detach()).all())
        stop = self._stop
        if self.info.enabled:
            bad, stop = any_rank([bad, stop], self.info)
        if bad and self.nonfinite == "stop":
            raise TrainingDiverged(
                f"loss became {loss.detach().float().item():g} at epoch {epoch + 1}, batch {i + 1}: training stopped "
                f"before the update; the last good checkpoint is {self.last_path}"
                + ("" if self.last_path.exists() else " (none written yet)"))
        return stop, bad

    def _optimizer_step(self, epoch: int, i: int) -> bool:
        """One update; False when nonfinite="skip" dropped it for NaN/inf gradients."""
        if self.clip_grad:
            self.scaler.unscale_(self.optimizer)
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
            norm = torch.nn.utils.clip_grad_norm_(params, self.clip_grad)
            if not torch.isfinite(norm) and not self.scaler.is_enabled():
                if self.nonfinite == "skip":
                    return False
                raise TrainingDiverged(
                    f"gradient norm became {float(norm):g} at epoch {epoch + 1}, batch {i + 1}: training "
                    f"stopped before the update; the last good checkpoint is {self.last_path}")
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        if self.scheduler is not None and self.scheduler_interval == "step" \
                and not isinstance(self.scheduler, ReduceLROnPlateau):
            self.scheduler.step()
        return True

