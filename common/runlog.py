"""Per-epoch run log: log.csv, TensorBoard events (if tensorboard is installed), loss_curve.png."""
from __future__ import annotations

import csv
import importlib.util
import io
import math
import sys
import types
from pathlib import Path

from common.io import atomic_open, atomic_write_text


def tensorboard_without_tensorflow() -> None:
    """Call before importing tensorboard: otherwise it imports all of TensorFlow when that is
    installed (ours is, for the Keras tests): 4 s and a screen of TF log lines, after which torch's
    first import of triton crashes the process. Writing and serving events needs only tensorboard's
    own TF stub, which this module name selects."""
    sys.modules.setdefault("tensorboard.compat.notf", types.ModuleType("tensorboard.compat.notf"))


def tb_tag(key: str) -> str:
    """TensorBoard tag of a log.csv column. TensorBoard groups charts by the part before the first
    '/' and sorts the groups by name, so the losses come first ("loss/"), then the validation
    metrics ("metrics/"), then the bookkeeping (lr, speed, loss terms: "train/")."""
    if key in ("train_loss", "val_loss"):
        return f"loss/{key[:-5]}"
    if key.startswith("val_baseline_") and key.endswith("loss"):
        return f"loss/val_baseline{key[len('val_baseline_loss'):]}"
    if key.startswith("val_"):
        return f"metrics/{key}"
    return f"train/{key[6:] if key.startswith('train_') else key}"


class RunLog:
    """Holds the epoch history; rewrites log.csv and loss_curve.png from it after every epoch.

    Rewriting from the history (restored from the checkpoint on --resume) keeps the CSV consistent
    with the checkpoint even when a run was killed between logging and saving.
    """

    def __init__(self, out_dir: str | Path, history: list[dict] | None = None, tensorboard: bool = True,
                 monitor: str | None = None, mode: str = "min"):
        self.out_dir = Path(out_dir)
        self.history = list(history or [])
        self.monitor, self.mode = monitor, mode   # the metric that chose best.pt, marked on the plot
        self.best_epoch = None                     # as the trainer decided it (min_delta included)
        self.tb = None
        if tensorboard and importlib.util.find_spec("tensorboard") is not None:
            tensorboard_without_tensorflow()
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(str(self.out_dir / "tensorboard"), purge_step=len(self.history) + 1)

    def log_epoch(self, row: dict, best_epoch: int | None = None) -> None:
        self.history.append(dict(row))
        if best_epoch is not None:
            self.best_epoch = best_epoch
        self._write_csv()
        self._plot()
        if self.tb is not None:
            for k, v in row.items():
                if k != "epoch" and isinstance(v, (int, float)) and math.isfinite(v):
                    self.tb.add_scalar(tb_tag(k), v, row["epoch"])
            self.tb.flush()

    def _write_csv(self) -> None:
        fields = []
        for row in self.history:
            fields += [k for k in row if k not in fields]
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=fields)
        w.writeheader()
        for row in self.history:
            w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
        atomic_write_text(self.out_dir / "log.csv", buf.getvalue())

    def best_row(self) -> dict | None:
        """The epoch that best.pt holds: the first best value of the monitored metric."""
        rows = [r for r in self.history if _finite(r.get(self.monitor))] if self.monitor else []
        if self.best_epoch is not None:
            rows = [r for r in rows if r["epoch"] == self.best_epoch]
        if not rows:
            return None
        pick = min if self.mode == "min" else max
        return pick(rows, key=lambda r: r[self.monitor])

    def _plot(self) -> None:
        fig = loss_figure(self.history, self.monitor, self.mode, self.best_row())
        with atomic_open(self.out_dir / "loss_curve.png", "wb") as f:
            fig.savefig(f, format="png")
        import matplotlib.pyplot as plt
        plt.close(fig)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def baseline_key(history: list[dict], key: str) -> str | None:
    """The history column holding a trivial baseline for `key`, if the task logs one:
    `<key>_input` (the input returned as it is), `<key>_baseline`, or `val_baseline_<name>`."""
    name = key[4:] if key.startswith("val_") else key
    for k in (f"{key}_input", f"{key}_baseline", f"val_baseline_{name}"):
        if any(_finite(r.get(k)) for r in history):
            return k
    return None


def loss_figure(history: list[dict], monitor: str | None = None, mode: str = "min", best: dict | None = None):
    """Training and validation loss per epoch; the epoch kept as best.pt marked with the metric that
    chose it, and (when that metric is not the loss) a second panel with that metric per epoch.
    Baselines the history holds (`val_baseline_loss`, `val_psnr_input`, ...) are dashed grey lines."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in history]

    def column(k):
        return [r.get(k, float("nan")) if _finite(r.get(k)) else float("nan") for r in history]

    keys = [k for k in ("train_loss", "val_loss") if any(_finite(r.get(k)) for r in history)]
    separate = monitor is not None and monitor not in keys and any(_finite(r.get(monitor)) for r in history)
    fig, axes = plt.subplots(1, 2 if separate else 1, figsize=(12 if separate else 7, 4.5), dpi=100, squeeze=False)
    ax = axes[0, 0]
    dash = "_" if len(epochs) == 1 else None   # a one-epoch baseline is a point: a dashed line alone would not show
    labels = {"train_loss": "training loss", "val_loss": "validation loss"}
    for k in keys:
        ax.plot(epochs, column(k), marker="o", ms=4, label=labels[k])
    ref = baseline_key(history, "val_loss")
    if ref:
        ax.plot(epochs, column(ref), "--", marker=dash, ms=20, color="grey", label="validation loss of the baseline")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.set_title("loss per epoch")
    metric_ax = axes[0, 1] if separate else ax
    if separate:
        metric_ax.plot(epochs, column(monitor), marker="o", ms=4, color="tab:green", label=monitor)
        ref = baseline_key(history, monitor)
        if ref:
            metric_ax.plot(epochs, column(ref), "--", marker=dash, ms=20, color="grey", label=f"{ref} (baseline)")
        metric_ax.set_xlabel("epoch")
        metric_ax.set_ylabel(f"{monitor} (dB)" if "psnr" in monitor else monitor)   # PSNR's unit; the others have none
        metric_ax.set_title(f"{monitor} per epoch ({'higher' if mode == 'max' else 'lower'} is better)")
    if best is not None and monitor is not None:
        word = "highest" if mode == "max" else "lowest"
        metric_ax.plot([best["epoch"]], [best[monitor]], marker="*", ms=16, color="gold", markeredgecolor="black",
                       linestyle="none", label=f"best.pt: epoch {best['epoch']}, {word} {monitor} {best[monitor]:.4g}")
        for a in axes[0]:
            a.axvline(best["epoch"], color="gold", lw=1, zorder=0)
    for a in axes[0]:
        a.grid(alpha=0.3)
        if len(epochs) < 12:
            a.set_xticks(epochs)
        if a.get_legend_handles_labels()[0]:
            a.legend(fontsize=9)
    fig.tight_layout()
    return fig
