"""The live training view: TensorBoard, served from inside the training process.

The run folder's `tensorboard/` holds two event streams, read by TensorBoard as two runs:
  .      per-epoch scalars written by common's run log (train_loss, val_loss, val metrics, lr) -
         the same numbers as log.csv
  live   per-step loss, learning rate and progress (epoch as a fraction, batch of the epoch), a
         figure per epoch of one fixed validation structure (its image, R/G/B spectra against the
         wavelengths of the sampled points, ground truth and prediction, absolute error, 2x2 cell
         means), and the model and loss configuration as text
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

from common.io import UserError
from common.runlog import tensorboard_without_tensorflow
from spectral.data import CELL_LAYOUT, wavelengths_nm

DEFAULT_PORT = 8501
DEFAULT_HOST = "127.0.0.1"
COLOURS = {"R": "#d62728", "G": "#2ca02c", "B": "#1f77b4"}


def check_port(host: str, port: int) -> None:
    """Before any output is written: refuse a port that another program serves on."""
    if port == 0:
        return
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise UserError(f"--dashboard-host {host}: unknown address ({e.strerror})") from None
    family, _, _, _, address = infos[0]
    with contextlib.closing(socket.socket(family, socket.SOCK_STREAM)) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(address)
        except OSError as e:
            if e.errno == errno.EADDRNOTAVAIL:  # the host, not the port, is the problem
                raise UserError(f"--dashboard-host {host}: not an address of this machine ({e.strerror}); use "
                                f"127.0.0.1, 0.0.0.0 (every interface) or one of this machine's addresses") from None
            raise UserError(f"--dashboard: cannot serve on {host}:{port} ({e.strerror or e}); choose another port "
                            f"with --dashboard PORT, or --no-dashboard") from None


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
            raise UserError(f"--dashboard: cannot serve on {self.host}:{self.port} ({e.strerror or e})") from None
        self.server = servers[-1]
        shown = "127.0.0.1" if self.host in ("0.0.0.0", "::") else self.host
        self.url = f"http://{shown}:{self.server.server_port}/"
        return self.url

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None


class LiveLog:
    """Per-step scalars, per-epoch sample figure and the configuration text, in RUN/tensorboard/live."""

    def __init__(self, logdir: Path, cfg: dict, purge_step: int | None = None):
        tensorboard_without_tensorflow()
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(Path(logdir) / "live"), flush_secs=2, purge_step=purge_step)
        self.out_len = cfg["data"]["out_len"]
        self.writer.add_text("configuration", config_markdown(cfg), 0)
        self.writer.flush()

    def step(self, step: int, epoch_progress: float, batch: int, batches: int, loss: float, lr: float) -> None:
        w = self.writer
        if math.isfinite(loss):
            w.add_scalar("step/loss", loss, step)
        w.add_scalar("step/lr", lr, step)
        w.add_scalar("progress/epoch", epoch_progress, step)
        w.add_scalar("progress/batch_of_epoch", batch / batches, step)

    def epoch(self, epoch: int, structure: np.ndarray, target: np.ndarray, pred: np.ndarray, title: str) -> None:
        png = sample_figure(structure, target, pred, wavelengths_nm(self.out_len), title)
        from PIL import Image
        img = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
        self.writer.add_image("validation_sample", img, epoch, dataformats="HWC")
        self.writer.flush()

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


def sample_figure(structure: np.ndarray, target: np.ndarray, pred: np.ndarray, waves: np.ndarray,
                  title: str = "") -> bytes:
    """PNG: structure; R, G, B spectra (ground truth dashed, prediction solid) against wavelength;
    absolute error; 2x2 cell means of ground truth and prediction."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = {"R": (0, 0), "G": (0, 1), "B": (1, 1)}
    fig, ax = plt.subplots(1, 4, figsize=(15, 3.6), dpi=80, gridspec_kw={"width_ratios": [1, 1.6, 1.6, 1.1]})
    ax[0].imshow(np.asarray(structure).reshape(structure.shape[-2:]), cmap="gray", interpolation="nearest")
    ax[0].set_title("structure")
    ax[0].axis("off")
    for name, (i, j) in cells.items():
        ax[1].plot(waves, target[i, j], "--", color=COLOURS[name], label=f"{name} truth")
        ax[1].plot(waves, pred[i, j], "-", color=COLOURS[name], label=f"{name} prediction")
        ax[2].plot(waves, np.abs(pred[i, j] - target[i, j]), color=COLOURS[name], label=name)
    ax[1].set_title("spectra")
    ax[1].set_xlabel("wavelength (nm)")
    ax[1].legend(fontsize=6, ncol=3)
    ax[2].set_title("absolute error")
    ax[2].set_xlabel("wavelength (nm)")
    ax[2].legend(fontsize=7)
    means = np.concatenate([target.mean(-1), np.full((2, 1), np.nan), pred.mean(-1)], axis=1)
    ax[3].imshow(means, cmap="viridis")
    for i in range(2):
        for j, k in enumerate((0, 1, None, 0, 1)):
            if k is None:
                continue
            ax[3].text(j, i, f"{CELL_LAYOUT[i][k]}\n{means[i, j]:.3f}", ha="center", va="center", fontsize=8,
                       color="white")
    ax[3].set_title("cell means: truth | prediction")
    ax[3].axis("off")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()
