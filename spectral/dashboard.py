"""The live training view: TensorBoard, served from inside the training process.

The run folder's `tensorboard/<run folder name>/` holds one event stream, shown as one run of that name:
  loss/      training and validation loss per epoch (the same numbers as log.csv), the validation
             loss of predicting the training mean, and the per-step training loss
  metrics/   the validation metrics per epoch (MSE, Pearson r, RMSE per colour, ...)
  sample/    a figure per epoch of one fixed validation structure (its image, R/G/B spectra against
             the wavelengths of the sampled points, ground truth and prediction, absolute error,
             2x2 cell means)
  train/     learning rate, progress (epoch as a fraction, batch of the epoch), speed
and the model and loss configuration as text. TensorBoard sorts the groups by name, so its first
page opens on the loss charts. Everything is plotted against the optimizer step (the per-epoch
points at the step that ended the epoch), so that one resume point (purge_step) fits every chart.
The events are written whether or not the dashboard runs (`tensorboard --logdir RUN/tensorboard`
shows the same afterwards). `Dashboard` serves them live on host:port (127.0.0.1 by default), and
stops with the training.
"""
from __future__ import annotations

import contextlib
import errno
import io
import logging
import math
import socket
from pathlib import Path

import numpy as np

from common.io import UserError, atomic_open
from common.runlog import tb_tag, tensorboard_without_tensorflow
from spectral.data import CELL_LAYOUT, wavelengths_nm

DEFAULT_PORT = 8501
DEFAULT_HOST = "127.0.0.1"
# TensorBoard shows an image in a card of about 390 x 215 px: the spectra alone, in large type, read
# there; the whole figure reads with the card's "actual size" button, or as RUN/samples/epoch_NNNN.png
SPECTRA_TAG = "sample/spectra"
SAMPLE_TAG = "sample/structure_spectra_error"
COLOURS = {"R": "#d62728", "G": "#2ca02c", "B": "#1f77b4"}


def check_port(host: str, port: int) -> None:
    """Before any output is written: refuse an address this machine does not have, and a port that
    another program serves on (port 0, any free port, still checks the address)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as e:
        raise UserError(f"--dashboard-host {host}: unknown address ({getattr(e, 'strerror', None) or e}); give an "
                        f"address of this machine: 127.0.0.1 (this machine only) or 0.0.0.0 (every interface)") from None
    family, _, _, _, address = infos[0]
    with contextlib.closing(socket.socket(family, socket.SOCK_STREAM)) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(address)
        except OSError as e:
            reason = e.strerror or str(e)
            if e.errno in (errno.EADDRINUSE, errno.EACCES) and port != 0:
                raise UserError(f"--dashboard: cannot serve on {host}:{port} ({reason}); choose another port "
                                f"with --dashboard PORT (0 = any free one), or leave --dashboard out") from None
            raise UserError(f"--dashboard-host {host}: not an address of this machine ({reason}); use "
                            f"127.0.0.1 (this machine only) or 0.0.0.0 (every interface)") from None


class Dashboard:
    """TensorBoard on `host:port` over `logdir`, in a thread of this process. Port 0 picks a free one."""

    def __init__(self, logdir: Path, port: int = DEFAULT_PORT, host: str = DEFAULT_HOST, reload_s: int = 2):
        self.logdir, self.port, self.host, self.reload_s = Path(logdir), port, host, reload_s
        self.server = None
        self.url = None

    def start(self) -> str:
        tensorboard_without_tensorflow()
        from tensorboard import program

        self.logdir.mkdir(parents=True, exist_ok=True)
        servers = []

        def make_server(app, flags):   # one attempt at exactly this port, and keep a handle to stop it
            servers.append(program.WerkzeugServer(app, flags))
            return servers[-1]

        for name in ("werkzeug", "tensorboard"):   # no access log lines between the progress bars
            logging.getLogger(name).setLevel(logging.ERROR)
        tb = program.TensorBoard(server_class=make_server)
        tb.configure(logdir=str(self.logdir), host=self.host, port=self.port, reload_interval=self.reload_s,
                     load_fast="false", window_title="spectral training")
        try:
            tb.launch()
        except program.TensorBoardServerException as e:
            raise UserError(f"--dashboard: {e.msg} (choose another port with --dashboard PORT)") from None
        except OSError as e:
            raise UserError(f"--dashboard-host {self.host} / --dashboard {self.port}: cannot serve there "
                            f"({e.strerror or e}); give 127.0.0.1 or 0.0.0.0 and a free port (0 = any)") from None
        self.server = servers[-1]
        shown = "127.0.0.1" if self.host in ("0.0.0.0", "::") else self.host
        self.url = f"http://{shown}:{self.server.server_port}/"
        return self.url

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None


def run_name(logdir: Path) -> str:
    """RUN/tensorboard -> the run folder's name (as TensorBoard shows the run)."""
    return Path(logdir).resolve().parent.name or "run"


class LiveLog:
    """The run's TensorBoard events (RUN/tensorboard): per-step and per-epoch scalars, the per-epoch
    sample figure and the configuration text, all against the optimizer step."""

    def __init__(self, logdir: Path, cfg: dict, purge_step: int | None = None):
        tensorboard_without_tensorflow()
        from torch.utils.tensorboard import SummaryWriter

        # a subfolder named after the run folder: TensorBoard names a run by its folder below the
        # logdir, and events in the logdir itself would show as "."
        self.writer = SummaryWriter(str(Path(logdir) / run_name(logdir)), flush_secs=2, purge_step=purge_step)
        self.out_len = cfg["data"]["out_len"]
        self.writer.add_text("configuration", config_markdown(cfg), 0)
        self.writer.flush()

    def step(self, step: int, epoch_progress: float, batch: int, batches: int, loss: float, lr: float) -> None:
        w = self.writer
        if math.isfinite(loss):
            w.add_scalar("loss/train_step", loss, step)
        w.add_scalar("train/lr", lr, step)
        w.add_scalar("train/progress_epoch", epoch_progress, step)
        w.add_scalar("train/progress_batch_of_epoch", batch / batches, step)

    def epoch_scalars(self, row: dict, step: int) -> None:
        """One epoch's log.csv row, at the step that ended the epoch."""
        for k, v in row.items():   # lr: per step above
            if k not in ("epoch", "lr") and isinstance(v, (int, float)) and math.isfinite(v):
                self.writer.add_scalar(tb_tag(k), v, step)
        self.writer.add_scalar("train/epoch", row["epoch"], step)
        self.writer.flush()

    def epoch(self, epoch: int, step: int, structure: np.ndarray, target: np.ndarray, pred: np.ndarray, title: str,
              samples_dir: Path | None = None) -> None:
        """The sample figure, in TensorBoard and (full size, to open as a file) samples_dir/epoch_NNNN.png."""
        from PIL import Image

        waves = wavelengths_nm(self.out_len)
        png = sample_figure(structure, target, pred, waves, title)
        for tag, image in ((SPECTRA_TAG, spectra_card(target, pred, waves, title)), (SAMPLE_TAG, png)):
            self.writer.add_image(tag, np.asarray(Image.open(io.BytesIO(image)).convert("RGB")), step,
                                  dataformats="HWC")
        self.writer.flush()
        if samples_dir is not None:
            Path(samples_dir).mkdir(parents=True, exist_ok=True)
            with atomic_open(Path(samples_dir) / f"epoch_{epoch:04d}.png", "wb") as f:
                f.write(png)

    def close(self) -> None:
        self.writer.close()


def config_markdown(cfg: dict) -> str:
    m, l = cfg["model"], cfg["loss"]
    if l["name"] == "mse_pearson":
        p = l["params"]
        formula = f"L = {p['w_mse']} * MSE + {p['w_corr']} * mean(1 - r), r = Pearson r per cell along wavelength"
    else:
        p = l["params"]
        formula = (f"L = mean(w_cell * err^2) + {p['lambda1']} * MSE(diff) + {p['lambda2']} * MSE(diff2), "
                   f"w = {p['channel_weights'] or [1.0, 0.8, 0.8, 1.2]} for cells R, G, G, B")
    rows = [f"| model.{k} | {v} |" for k, v in [("name", m["name"])] + list(m["params"].items())]
    rows += [f"| loss.{k} | {v} |" for k, v in [("name", l["name"])] + list(l["params"].items())]
    rows += [f"| training.{k} | {v} |" for k, v in cfg["training"].items()]
    rows += [f"| data.{k} | {v} |" for k, v in cfg["data"].items() if k not in ("struct_files", "spectra_files")]
    return "\n".join([f"**{formula}**", "", "| key | value |", "|---|---|", *rows])


RESPONSE_LABEL = "response (fraction of light)"   # the targets: the detected fraction, sign-flipped to positive
CELLS = {"R": (0, 0), "G": (0, 1), "B": (1, 1)}


def plot_spectra(ax, waves: np.ndarray, pred: np.ndarray, truth: np.ndarray | None = None) -> None:
    """R, G, B spectra of one structure against wavelength: prediction solid, ground truth dashed."""
    for name, (i, j) in CELLS.items():
        if truth is not None:
            ax.plot(waves, truth[i, j], "--", color=COLOURS[name], lw=1.6, label=f"{name} truth")
        ax.plot(waves, pred[i, j], "-", color=COLOURS[name], lw=1.8, label=f"{name} prediction")
    ax.set_xlabel("wavelength (nm)")
    ax.set_ylabel(RESPONSE_LABEL)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=9, ncol=3 if truth is not None else 1)


def spectra_card(target: np.ndarray, pred: np.ndarray, waves: np.ndarray, title: str = "") -> bytes:
    """PNG, 780 x 430 px in large type: the R, G, B spectra of the sample, truth dashed, prediction solid."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with plt.rc_context({"font.size": 18, "lines.linewidth": 3}):
        fig, ax = plt.subplots(figsize=(7.8, 4.3), dpi=100)
        plot_spectra(ax, waves, pred, target)
        ax.set_ylabel("response")
        from matplotlib.lines import Line2D
        ax.legend([Line2D([], [], color=COLOURS[n]) for n in CELLS], list(CELLS), fontsize=14)   # colours only
        ax.set_title(title.split(":")[0] + ": truth dashed, prediction solid", fontsize=18)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        plt.close(fig)
    return buf.getvalue()


def sample_figure(structure: np.ndarray, target: np.ndarray, pred: np.ndarray, waves: np.ndarray,
                  title: str = "") -> bytes:
    """PNG, 1100 x 800 px (large enough to read where TensorBoard shows it scaled down): structure;
    R, G, B spectra (ground truth dashed, prediction solid) against wavelength; absolute error;
    2x2 cell means of ground truth and prediction."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with plt.rc_context({"font.size": 13}):
        fig, axes = plt.subplots(2, 2, figsize=(11, 8), dpi=100, gridspec_kw={"width_ratios": [1, 1.9]})
        ax = [axes[0, 0], axes[0, 1], axes[1, 1], axes[1, 0]]
        ax[0].imshow(np.asarray(structure).reshape(structure.shape[-2:]), cmap="gray", interpolation="nearest")
        ax[0].set_title("structure")
        ax[0].axis("off")
        plot_spectra(ax[1], waves, pred, target)
        ax[1].set_title("spectra: truth dashed, prediction solid")
        for name, (i, j) in CELLS.items():
            ax[2].plot(waves, np.abs(pred[i, j] - target[i, j]), color=COLOURS[name], label=name)
        ax[2].set_title("absolute error")
        ax[2].set_xlabel("wavelength (nm)")
        ax[2].set_ylabel("|prediction - truth|")
        ax[2].grid(alpha=0.3)
        ax[2].legend(fontsize=10)
        means = np.concatenate([target.mean(-1), np.full((2, 1), np.nan), pred.mean(-1)], axis=1)
        ax[3].imshow(means, cmap="viridis")
        for i in range(2):
            for j, k in enumerate((0, 1, None, 0, 1)):
                if k is None:
                    continue
                ax[3].text(j, i, f"{CELL_LAYOUT[i][k]}\n{means[i, j]:.3f}", ha="center", va="center", fontsize=12,
                           color="white")
        ax[3].set_title("cell means: truth | prediction")
        ax[3].axis("off")
        fig.suptitle(title, fontsize=14)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        plt.close(fig)
    return buf.getvalue()
