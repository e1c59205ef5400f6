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


class RunLog:
    """Holds the epoch history; rewrites log.csv and loss_curve.png from it after every epoch.

    Rewriting from the history (restored from the checkpoint on --resume) keeps the CSV consistent
    with the checkpoint even when a run was killed between logging and saving.
    """

    def __init__(self, out_dir: str | Path, history: list[dict] | None = None, tensorboard: bool = True):
        self.out_dir = Path(out_dir)
        self.history = list(history or [])
        self.tb = None
        if tensorboard and importlib.util.find_spec("tensorboard") is not None:
            tensorboard_without_tensorflow()
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(str(self.out_dir / "tensorboard"), purge_step=len(self.history) + 1)

    def log_epoch(self, row: dict) -> None:
        self.history.append(dict(row))
        self._write_csv()
        self._plot()
        if self.tb is not None:
            for k, v in row.items():
                if k != "epoch" and isinstance(v, (int, float)) and math.isfinite(v):
                    self.tb.add_scalar(k, v, row["epoch"])
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

    def _plot(self) -> None:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        epochs = [r["epoch"] for r in self.history]
        keys = [k for k in ("train_loss", "val_loss") if any(k in r for r in self.history)]
        fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
        for k in keys:
            ax.plot(epochs, [r.get(k, float("nan")) for r in self.history], marker="o", ms=3, label=k)
        ax.set_xlabel("epoch")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
        if keys:
            ax.legend()
        fig.tight_layout()
        with atomic_open(self.out_dir / "loss_curve.png", "wb") as f:
            fig.savefig(f, format="png")
        plt.close(fig)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
