"""Train a CR_recon model: metasurface structure (128x128) -> R, G, G, B spectra.

  python spectral/train.py                                            # built-in demo data, about a minute
  python spectral/train.py --config spectral/configs/default.yaml --data DIR
  python spectral/train.py --config CR_recon/configs/default.yaml     # a CR_recon config and its data paths
  python spectral/train.py --config spectral/configs/cnn_gru.yaml --builtin-data --epochs 2
  python spectral/train.py --resume runs/spectral/cnn_xattn-.../last.pt
  python spectral/train.py --dashboard [PORT]                          # live TensorBoard, http://127.0.0.1:8501

DIR holds CR_recon's raw parts, binary_dataset_128_k.npy with spectra_latest_k.npy (k = 0, 1, ...).
The config (CR_recon's YAML schema) gives the model, the loss, the data options and the training
recipe: AdamW (betas 0.9/0.95), linear warm-up then cosine to 0 per step, gradient clipping, fp16
autocast on CUDA (`training.use_amp`; the losses stay fp32). The common options override it
(--epochs -> training.epochs, --batch-size -> data.batch_size, --lr -> training.lr, --workers ->
data.num_workers, --seed, --clip-grad -> training.grad_clip, --save-every -> training.save_every).

The split is by structure, made before the 180-degree augmentation, which only the training part
gets; it is saved as RUN/split.json (reuse it with --split). Validation reports the loss, MSE, mean
per-cell Pearson r and per-colour RMSE, and the loss of predicting the training mean for scale.
"""
from __future__ import annotations

import argparse
import copy
import signal
import sys
import threading
import time
from pathlib import Path

import torch

if __package__ in (None, ""):  # `python <folder>/<script>.py` from a checkout: import this checkout's packages
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import cli
from common.checkpoint import load_checkpoint, plain_config
from common.cli import add_common_args, float_range, int_range, setup_run
from common.data import ensure_builtin, eval_loader, train_loader
from common.distributed import all_gather_cat, cleanup, wrap_model
from common.io import UserError, atomic_write_text, run_cli
from common.schedulers import warmup_cosine
from common.summary import Metric, format_summary
from common.trainer import Trainer, run_finished
from spectral.config import DEFAULT_CONFIG, check_config, load_config, resolve_data_files, to_yaml
from spectral.dashboard import DEFAULT_HOST, DEFAULT_PORT, Dashboard, LiveLog, check_port
from spectral.data import (BUILTIN_VERSION, RawData, SpectralDataset, find_parts, load_split, make_builtin_dataset,
                           make_split, save_split, to_cells)
from spectral.losses import build_loss, finish_metrics, spectral_metrics
from spectral.model import build_model

TASK = "spectral"
# On the CPU each batch is computed in micro-batches of this many samples (the same gradient:
# GroupNorm and both losses are per sample), which keeps most activations under malloc's mmap
# threshold (common.device.in_chunks). Measured on cnn_xattn at batch 64 against the original step,
# two interleaved runs: 16 -> 1.28x / 1.34x, 32 -> 1.34x / 1.43x; whole batches 1.09x (first run).
TRAIN_MICRO_BATCH = 32
# The built-in demo: CR_recon's default model and loss, a recipe that learns in about a minute on a CPU
DEMO = {"data": {"batch_size": 8, "train_ratio": 0.9, "num_workers": 0},
        "training": {"epochs": 3, "lr": 3e-4, "warmup_ratio": 0.1, "save_every": 0},
        "dashboard": {"enabled": False}}
# (flag, config section, key): common flags that override the config
OVERRIDES = [("epochs", "training", "epochs"), ("batch_size", "data", "batch_size"), ("lr", "training", "lr"),
             ("workers", "data", "num_workers"), ("seed", None, "seed"), ("clip_grad", "training", "grad_clip"),
             ("save_every", "training", "save_every")]
# config keys a resumed run may change: they do not alter what is computed
RESUME_FREE = {"data.num_workers", "data.struct_files", "data.spectra_files", "dashboard.enabled",
               "dashboard.port", "output.dir", "output.log_file"}


def parse_args(argv=None) -> argparse.Namespace:
    p = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, help="CR_recon YAML config (default: spectral/configs/default.yaml "
                                               "with a short demo recipe on the built-in data)")
    add_common_args(p, epochs=None, batch_size=None, lr=None)
    # None = not given: the config decides
    p.set_defaults(seed=None, workers=None, clip_grad=None, save_every=None, channels_last=None)
    p.add_argument("--no-channels-last", dest="channels_last", action="store_false",
                   help="keep NCHW activations (channels_last is the default on the CPU, where it is faster)")
    p.add_argument("--builtin-data", action="store_true",
                   help="train on the built-in demo data instead of the config's data files")
    p.add_argument("--split", type=Path, help="a split.json of an earlier run: the same train/val rows")
    p.add_argument("--dashboard", nargs="?", type=int_range(0, 65535), const=-1, default=None, metavar="PORT",
                   help=f"serve a live TensorBoard while training (port {DEFAULT_PORT} or the config's "
                        f"dashboard.port; 0 = any free port)")
    p.add_argument("--no-dashboard", action="store_true", help="ignore dashboard.enabled of the config")
    p.add_argument("--dashboard-host", default=DEFAULT_HOST,
                   help="address to serve on (default 127.0.0.1, this machine only; 0.0.0.0 = every interface)")
    p.add_argument("--dashboard-keep", type=float_range(0, 86400), default=0.0, metavar="SECONDS",
                   help="keep serving this long after training ends (Ctrl-C stops it)")
    # the config travels in the checkpoint; how the dashboard is served changes nothing computed
    return cli.parse_args(p, argv, resume_free=("config", "dashboard", "no_dashboard", "dashboard_host",
                                                "dashboard_keep"), task=TASK, used=values_used)


def values_used(ckpt: dict) -> dict:
    """The values a run took from its config for the common flags it was started without."""
    stored = ckpt.get("extra", {}).get(TASK, {}).get("config")
    if not isinstance(stored, dict):
        return {}
    out = {}
    for flag, section, key in OVERRIDES:
        holder = stored if section is None else stored.get(section, {})
        if isinstance(holder, dict) and key in holder:
            out[flag] = holder[key]
    return out


# ---------------------------------------------------------------- configuration
def apply_overrides(cfg: dict, args) -> list[str]:
    """Common flags given on the command line replace the config's values; returns what changed."""
    changed = []
    for flag, section, key in OVERRIDES:
        value = getattr(args, flag)
        if value is None:
            continue
        holder = cfg if section is None else cfg[section]
        if holder[key] != value:
            changed.append(f"{key if section is None else section + '.' + key}={value}")
        holder[key] = value
    return changed


def flat(cfg: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in cfg.items():
        if isinstance(v, dict) and k != "params":
            out.update(flat(v, f"{prefix}{k}."))
        elif k == "params":
            out.update({f"{prefix}params.{pk}": pv for pk, pv in v.items()})
        else:
            out[f"{prefix}{k}"] = v
    return out


def check_resume_config(cfg: dict, stored: dict, path: Path) -> None:
    """A resumed run computes what the interrupted one would have: no setting that changes that may differ."""
    now, then = flat(cfg), flat(stored)
    for key in sorted(set(now) | set(then)):
        if key not in RESUME_FREE and now.get(key) != then.get(key):
            raise UserError(f"{path}: {key} is {now.get(key)!r} here but {then.get(key)!r} in the run being "
                            f"resumed; a resumed run keeps its settings (start a new run to change them)")


def resolve_config(args) -> tuple[dict, dict | None, str]:
    """(config, checkpoint or None, where the config came from)."""
    ckpt = None
    if args.resume is not None:
        ckpt = load_checkpoint(args.resume, TASK)
        stored = ckpt.get("extra", {}).get(TASK)
        if not isinstance(stored, dict) or "config" not in stored:
            raise UserError(f"{args.resume}: not a checkpoint of spectral/train.py (CR_recon's own checkpoints "
                            f"cannot be resumed exactly: they lack the scheduler, scaler and RNG states; use them "
                            f"with spectral/infer.py)")
        stored_cfg = check_config(stored["config"], str(args.resume))
        cfg = load_config(args.config) if args.config else copy.deepcopy(stored_cfg)
        apply_overrides(cfg, args)
        check_resume_config(cfg, stored_cfg, args.resume)
        return cfg, ckpt, f"{args.resume} (resumed)"
    if args.config is not None:
        cfg = load_config(args.config)
        source = str(args.config)
    else:
        cfg = load_config(DEFAULT_CONFIG)
        source = f"{DEFAULT_CONFIG}"
        if args.data is None:
            for section, values in DEMO.items():
                cfg[section].update(values)
            source += " with the built-in demo recipe"
    changed = apply_overrides(cfg, args)
    if changed:
        source += f", overridden: {', '.join(changed)}"
    return check_config(cfg, source), None, source


def data_files(args, cfg: dict, ckpt: dict | None) -> tuple[list[Path], list[Path], bool]:
    """(structure files, spectra files, built-in?)."""
    if args.data is not None and args.builtin_data:
        raise UserError("--data and --builtin-data are alternatives; give one")
    if args.data is not None:
        s, t = find_parts(args.data)
        return s, t, False
    if ckpt is not None:
        stored = ckpt["extra"][TASK]
        if stored.get("builtin"):
            root = ensure_builtin(TASK, BUILTIN_VERSION, make_builtin_dataset)
            return sorted(root.glob("binary_dataset_128_*.npy")), sorted(root.glob("spectra_latest_*.npy")), True
        return [Path(p) for p in stored["struct_files"]], [Path(p) for p in stored["spectra_files"]], False
    if args.builtin_data or args.config is None:
        root = ensure_builtin(TASK, BUILTIN_VERSION, make_builtin_dataset)
        s, t = find_parts(root)
        return s, t, True
    s, t = resolve_data_files(cfg, args.config)
    return s, t, False


# ---------------------------------------------------------------- pieces of the run
def mean_baseline(mean: torch.Tensor, val_targets: torch.Tensor, criterion) -> float:
    """The validation loss of predicting the mean training spectrum for every structure."""
    return float(criterion(mean.expand_as(val_targets), val_targets))


def start_at_the_mean(model: torch.nn.Module, mean: torch.Tensor) -> None:
    """A fresh model starts as the predict-the-mean baseline: spec_bias = the mean training spectrum
    per cell, and the last head layer zero (its gradient is not, so it learns the deviations from
    the first step). CR_recon starts from spec_bias 0 and a random head, hundreds of steps away from
    the data's level (about 0.6)."""
    with torch.no_grad():
        model.spec_bias.copy_(mean.reshape(1, 4, -1))
        model.head[-1].weight.zero_()
        model.head[-1].bias.zero_()


def mean_cells(train_set: SpectralDataset) -> torch.Tensor:
    """The mean (2,2,L) training target, the 180-degree copies included."""
    mean = torch.from_numpy(to_cells(train_set.raw.targets[train_set.rows])).double().mean(0)
    if train_set.augment_180:   # the rotated copies have R and B swapped
        mean = 0.5 * (mean + mean.flip(0).flip(1))
    return mean.float()


class EpochTextLog:
    """CR_recon's train_log.txt lines, `[time] [EPOCH] e/E train_loss=... val_loss=... best_val=... lr=...`,
    so tools written for its log keep working. Rewritten whole every epoch; the lines travel in the
    checkpoint, so a resumed run continues the same file."""

    def __init__(self, path: Path, lines: list[str]):
        self.path, self.lines = path, list(lines)

    def add(self, text: str) -> None:
        self.lines.append(f"[{time.strftime('%Y-%m-%d %H:%M:%S')}] {text}")
        atomic_write_text(self.path, "\n".join(self.lines) + "\n")


def summary(result: dict, out_dir: Path, baseline: float, baseline_mse: float, builtin: bool, struct_files,
            dashboard) -> str:
    best = result["history"][result["best_epoch"] - 1]
    data = (f"built-in demo data in {struct_files[0].parent} (binary_dataset_128_*.npy structures, "
            f"spectra_latest_*.npy spectra)" if builtin else f"{struct_files[0].parent}")
    files = ["best.pt", "last.pt", "log.csv", "loss_curve.png", "samples/ (a validation structure per epoch)",
             "train_log.txt", "split.json", "config.yaml", "tensorboard/"]
    structs = struct_files[0]
    truth = structs.parent / structs.name.replace("binary_dataset_128_", "spectra_latest_")
    evaluate = f" --evaluate {truth}" if truth != structs and truth.is_file() else ""
    steps = [f"python spectral/infer.py --weights {out_dir / 'best.pt'} --structs {structs} --out predictions.npy"
             f"{evaluate} --plot plots/" + (" (all rows of the part: training and validation)" if evaluate else ""),
             f"tensorboard --logdir {out_dir / 'tensorboard'}" + (" (the same charts as the dashboard)" if dashboard else "")]
    return format_summary(
        f"spectral, best.pt = epoch {best['epoch']} of {len(result['history'])} (lowest val_loss)",
        [Metric("val_loss", best["val_loss"], baseline, higher_is_better=False, relative=True),
         Metric("val_mse", best["val_mse"], baseline_mse, higher_is_better=False, relative=True)],
        "predicting the mean training spectrum for every structure",
        out_dir, files, data, steps,
        notes=[f"val_pearson_r {best['val_pearson_r']:.4f}, val_rmse R/G/B {best['val_rmse_R']:.3g}/"
               f"{best['val_rmse_G']:.3g}/{best['val_rmse_B']:.3g}"])


def keep_serving(dashboard, seconds: float) -> None:
    """Serve `seconds` more; Ctrl-C or SIGTERM ends it early (the summary is already printed)."""
    print(f"dashboard stays up for {seconds:g} s at {dashboard.url} (Ctrl-C to stop)", flush=True)

    def stop(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, stop) if threading.current_thread() is threading.main_thread() else None
    # short sleeps: Ctrl-C may be delivered to one of TensorBoard's threads, and Python then runs
    # its handler only when the main thread wakes up (one long sleep would ignore it to the end)
    deadline = time.monotonic() + seconds
    try:
        while (left := deadline - time.monotonic()) > 0:
            time.sleep(min(left, 0.2))
    except KeyboardInterrupt:
        print("dashboard stopped", flush=True)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def main(argv=None):
    args = parse_args(argv)
    cfg, ckpt, source = resolve_config(args)
    struct_files, spectra_files, builtin = data_files(args, cfg, ckpt)
    model_name = cfg["model"]["name"]
    resolved = argparse.Namespace(**vars(args))   # numbers for setup_run; args itself stays as typed
    resolved.epochs, resolved.batch_size = cfg["training"]["epochs"], cfg["data"]["batch_size"]
    resolved.lr, resolved.workers, resolved.seed = cfg["training"]["lr"], cfg["data"]["num_workers"], cfg["seed"]
    resolved.amp = args.amp if args.amp != "auto" or cfg["training"]["use_amp"] else "off"
    if args.resume is None and args.out is None:
        resolved.out = Path(cfg["output"]["dir"]) / f"{model_name}-{time.strftime('%Y%m%d-%H%M%S')}"

    if args.no_dashboard and args.dashboard is not None:
        given = "--dashboard" + ("" if args.dashboard == -1 else f" {args.dashboard}")
        raise UserError(f"{given} and --no-dashboard contradict each other: --dashboard serves one (0 = on any "
                        f"free port), --no-dashboard turns off the config's dashboard.enabled; give one of them")
    port = args.dashboard if args.dashboard not in (None, -1) else cfg["dashboard"]["port"]
    want_dashboard = not args.no_dashboard and (args.dashboard is not None or cfg["dashboard"]["enabled"])
    if want_dashboard:
        check_port(args.dashboard_host, port)   # every port, 0 too: a bad host is one line, before any file

    # everything that reads user files comes before the run folder is made
    raw = RawData(struct_files, spectra_files, cfg["data"]["out_len"])
    if len(raw) < 2:
        raise UserError(f"{struct_files[0].parent}: {len(raw)} valid row(s) (rows whose spectra are not all zero); "
                        f"at least 2 are needed")
    split_from = None
    if args.resume is not None:
        split_from = args.resume.parent / "split.json"
    elif args.split is not None:
        split_from = args.split
    split = load_split(split_from, raw) if split_from is not None else \
        make_split(raw, cfg["data"]["train_ratio"], cfg["seed"])

    run = setup_run(resolved, TASK, model_name, outputs=("split.json", "config.yaml", cfg["output"]["log_file"], "samples"),
                    reuse_memory=True)      # 1.1x the step for ~4 % more peak memory (common.device)
    main_rank = run.info.is_main
    channels_last = run.device.type == "cpu" if args.channels_last is None else args.channels_last
    micro_batch = TRAIN_MICRO_BATCH if run.device.type == "cpu" else None
    if main_rank:
        print(f"config: {source}")
        if builtin:
            print("using the built-in demo data (thin-film spectra of generated structures; give --data DIR "
                  "or a config with data files for real data)")
        n_raw = int(raw.offsets[-1])
        print(f"data: {len(raw)} valid rows of {n_raw} in {len(struct_files)} part(s) "
              f"({n_raw - len(raw)} never simulated, skipped) from {struct_files[0].parent}")
        aug = " x2 with the 180-degree rotation" if cfg["data"]["augment_180"] else ""
        print(f"split: {len(split.train)} train{aug} / {len(split.val)} val structures ({split.source})")
        if args.resume is None or not (run.out_dir / "split.json").is_file():   # a resume into a new --out too
            save_split(run.out_dir / "split.json", raw, split, cfg["seed"], cfg["data"]["train_ratio"])
            atomic_write_text(run.out_dir / "config.yaml", to_yaml(cfg))

    train_set = SpectralDataset(raw, split.train, cfg["data"]["augment_180"], cfg["data"]["map_to_pm1"])
    val_set = SpectralDataset(raw, split.val, False, cfg["data"]["map_to_pm1"])
    bs, workers = cfg["data"]["batch_size"], cfg["data"]["num_workers"]
    loader = train_loader(train_set, bs, seed=cfg["seed"], workers=workers, info=run.info,
                          pin_memory=run.device.type == "cuda")
    val_loader = eval_loader(val_set, bs, workers=workers, info=run.info)
    criterion = build_loss(cfg["loss"]["name"], **cfg["loss"]["params"]).to(run.device)
    val_targets = torch.from_numpy(to_cells(raw.targets[split.val]))
    train_mean = mean_cells(train_set)
    baseline = mean_baseline(train_mean, val_targets, criterion.cpu())
    baseline_mse = float(((train_mean - val_targets) ** 2).mean())
    criterion.to(run.device)

    model = build_model(model_name, **cfg["model"]["params"])
    if args.resume is None:
        start_at_the_mean(model, train_mean)
    model = model.to(run.device)
    n_params = sum(p.numel() for p in model.parameters())
    model = wrap_model(model, run.device, run.info, channels_last=channels_last)
    tr = cfg["training"]
    opt = torch.optim.AdamW(model.parameters(), lr=tr["lr"], weight_decay=tr["weight_decay"], betas=(0.9, 0.95),
                            eps=1e-8, fused=run.device.type in ("cuda", "cpu"))
    steps_per_epoch = -(-len(loader) // args.accum_steps)
    total_steps = tr["epochs"] * steps_per_epoch
    sched = warmup_cosine(opt, total_steps, int(tr["warmup_ratio"] * total_steps))

    live = LiveLog(run.out_dir / "tensorboard", cfg, purge_step=ckpt["step"] + 1 if ckpt else None) \
        if main_rank else None
    sample_x, sample_y = val_set[0]
    stored = (ckpt or {}).get("extra", {}).get(TASK, {})
    text_log = EpochTextLog(run.out_dir / cfg["output"]["log_file"], stored.get("log_lines", [])) if main_rank else None

    def loss_fn(m, batch):
        x, y = batch
        return criterion(m(x), y)

    def evaluate(m):
        preds, targets = [], []
        for x, y in val_loader:
            x = x.to(run.device, non_blocking=True)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            preds.append(m(x).float().cpu())
            targets.append(y)
        pred, tgt = all_gather_cat(preds, run.info), all_gather_cat(targets, run.info)
        out = {"val_loss": float(criterion.cpu()(pred, tgt)), **finish_metrics(spectral_metrics(pred, tgt))}
        criterion.to(run.device)
        if main_rank:
            out["val_baseline_loss"], out["val_baseline_mse"] = baseline, baseline_mse
            structure = ((sample_x + 1) / 2 if cfg["data"]["map_to_pm1"] else sample_x).numpy()
            live.epoch(trainer.epoch + 1, trainer.step, structure, sample_y.numpy(), pred[0].numpy(),
                       f"epoch {trainer.epoch + 1}: validation structure 0 (row {int(raw.global_row[split.val[0]])})",
                       run.out_dir / "samples")
        return out

    def on_step(t, logs):
        if live is not None:
            done = (t.step - 1) % steps_per_epoch + 1
            live.step(t.step, t.epoch + done / steps_per_epoch, done, steps_per_epoch, logs["loss"], t.lr())

    def on_epoch(t, row):
        if live is not None:
            live.epoch_scalars(row, t.step)
        if text_log is not None:
            best = min([r.get("val_loss", float("inf")) for r in t.log.history] + [row["val_loss"]])
            text_log.add(f"[EPOCH] {row['epoch']}/{t.epochs} train_loss={row['train_loss']:.6e} "
                         f"val_loss={row['val_loss']:.6e} best_val={best:.6e} lr={row['lr']:.2e}")

    def extra_state():
        return {TASK: {"config": cfg, "builtin": builtin, "struct_files": [str(p.resolve()) for p in struct_files],
                       "spectra_files": [str(p.resolve()) for p in spectra_files], "baseline_val_loss": baseline,
                       "log_lines": text_log.lines if text_log is not None else []}}

    # the thread count and memory format actually used: a resume keeps them (they change the last bits)
    config = {**plain_config(args), "threads": resolved.threads, "channels_last": channels_last,
              "task": TASK, "model": model_name}
    trainer = Trainer(model, opt, loader, loss_fn, out_dir=run.out_dir, epochs=tr["epochs"], device=run.device,
                      info=run.info, evaluate=evaluate, scheduler=sched, scheduler_interval="step",
                      monitor="val_loss", mode="min", amp_dtype=run.amp_dtype, accum_steps=args.accum_steps,
                      clip_grad=tr["grad_clip"] or None, channels_last=channels_last,
                      save_every=tr["save_every"], seed=cfg["seed"], config=config, on_step=on_step,
                      on_epoch=on_epoch, extra_state=extra_state, progress=not args.no_progress,
                      micro_batch=micro_batch, tensorboard=False)   # LiveLog writes the run's one event stream
    if ckpt is not None and run_finished(ckpt, tr["epochs"], None):
        if main_rank:
            print(f"{args.resume}: the run already did all {tr['epochs']} epochs; nothing to do")
        cleanup(run.info)
        return {"out_dir": run.out_dir, "history": ckpt["extra"]["trainer"]["history"]}

    dashboard = None
    if main_rank and want_dashboard:
        dashboard = Dashboard(run.out_dir / "tensorboard", port, args.dashboard_host)
        print(f"dashboard: {dashboard.start()} (TensorBoard: the loss charts first, then the validation metrics, "
              f"the figure of one validation structure under sample/, lr and progress under train/)", flush=True)
        if args.dashboard_host not in ("127.0.0.1", "localhost", "::1"):
            print(f"note: the dashboard listens on {args.dashboard_host}: other machines can reach it")
    if main_rank:
        amp = {None: "off", torch.float16: "fp16", torch.bfloat16: "bf16"}[run.amp_dtype]
        print(f"model: {model_name}, {n_params:,} parameters; loss: {cfg['loss']['name']} {cfg['loss']['params']}")
        print(f"training: {tr['epochs']} epoch(s) x {steps_per_epoch} step(s) of {bs}, AdamW lr {tr['lr']:g} "
              f"(warm-up {int(tr['warmup_ratio'] * total_steps)} steps, cosine), weight decay {tr['weight_decay']:g}, "
              f"clip {tr['grad_clip']:g}, amp {amp}, channels_last {channels_last}"
              + (f", micro-batches of {micro_batch}" if micro_batch and bs > micro_batch else ""))
        print(f"baseline: predicting the mean training spectrum gives val_loss {baseline:.4g} (val_mse {baseline_mse:.4g})")
    try:
        result = trainer.fit(resume=args.resume)
        if main_rank and result["best_epoch"]:
            print(summary(result, run.out_dir, baseline, baseline_mse, builtin, struct_files, dashboard), flush=True)
        if dashboard is not None and args.dashboard_keep > 0:
            keep_serving(dashboard, args.dashboard_keep)
    finally:
        if dashboard is not None:
            dashboard.stop()
        if live is not None:
            live.close()
    cleanup(run.info)
    return result


if __name__ == "__main__":
    sys.exit(run_cli(main))
