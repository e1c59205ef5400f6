"""loss_curve.png (common.runlog): both loss curves, the epoch best.pt holds marked with the metric
that chose it, and that metric's own panel with its baseline when it is not the loss."""
from __future__ import annotations

import matplotlib.pyplot as plt
from PIL import Image

from common.runlog import RunLog, loss_figure, tb_tag

HISTORY = [{"epoch": e, "train_loss": 1.0 / e, "val_loss": 0.8 / e + (0.3 if e == 3 else 0), "val_psnr": p,
            "val_psnr_input": 18.5, "lr": 1e-3} for e, p in ((1, 19.0), (2, 21.5), (3, 20.0))]


def labels(ax):
    return [ln.get_label() for ln in ax.get_lines()]


def test_a_metric_that_is_not_the_loss_gets_its_panel_baseline_and_best_mark():
    fig = loss_figure(HISTORY, "val_psnr", "max", HISTORY[1])
    loss_ax, metric_ax = fig.axes
    assert labels(loss_ax)[:2] == ["training loss", "validation loss"]
    assert loss_ax.get_xlabel() == "epoch" and loss_ax.get_ylabel() == "loss"
    assert metric_ax.get_ylabel() == "val_psnr (dB)" and "higher is better" in metric_ax.get_title()
    star = [ln for ln in metric_ax.get_lines() if ln.get_label().startswith("best.pt")][0]
    assert star.get_label() == "best.pt: epoch 2, highest val_psnr 21.5" and list(star.get_xdata()) == [2]
    assert "val_psnr_input (baseline)" in labels(metric_ax)
    plt.close(fig)


def test_run_log_marks_the_trainers_best_epoch_on_the_loss(tmp_path):
    log = RunLog(tmp_path, tensorboard=False, monitor="val_loss", mode="min")
    for row in HISTORY:
        log.log_epoch(row, best_epoch=2)
    assert log.best_row()["epoch"] == 2
    fig = loss_figure(log.history, "val_loss", "min", log.best_row())
    assert len(fig.axes) == 1 and "best.pt: epoch 2, lowest val_loss 0.4" in labels(fig.axes[0])
    plt.close(fig)
    assert Image.open(tmp_path / "loss_curve.png").size == (700, 450)
    assert (tmp_path / "log.csv").read_text().count("\n") == 4


def test_tensorboard_tags_put_the_losses_first():
    tags = {k: tb_tag(k) for k in ("train_loss", "val_loss", "val_baseline_loss", "val_psnr", "lr", "train_l1")}
    assert tags == {"train_loss": "loss/train", "val_loss": "loss/val", "val_baseline_loss": "loss/val_baseline",
                    "val_psnr": "metrics/val_psnr", "lr": "train/lr", "train_l1": "train/l1"}
    assert sorted({t.split("/")[0] for t in tags.values()})[0] == "loss"


def test_summary_compares_with_the_baseline_honestly():
    from common.summary import Metric, format_summary, verdict

    assert verdict(Metric("val_loss", 0.0023, 0.0063, higher_is_better=False, relative=True)) == \
        "63% lower, better than the baseline"
    assert verdict(Metric("val_loss", 0.007279, 0.007262, higher_is_better=False, relative=True)) == \
        "0.2% higher, WORSE than the baseline"
    assert verdict(Metric("val_psnr", 20.74, 18.49, higher_is_better=True, unit=" dB")) == \
        "+2.25 dB, better than the baseline"
    text = format_summary("t", [Metric("val_score", 0.5, 0.6, higher_is_better=True)], "the gray input", "RUN",
                          ["best.pt"], "DATA", ["python x.py"])
    assert text.splitlines() == ["summary: t", "  val_score: 0.5 (baseline 0.6): -0.1, WORSE than the baseline",
                                 "  baseline:  the gray input", "  data:      DATA", "  outputs:   RUN/ (best.pt)",
                                 "  next:      python x.py"]


def test_a_one_epoch_baseline_is_drawn_as_a_mark():
    fig = loss_figure([{**HISTORY[0], "val_baseline_loss": 0.9}], "val_psnr", "max", HISTORY[0])
    for ax in fig.axes:
        base = [ln for ln in ax.get_lines() if "baseline" in ln.get_label()][0]
        assert base.get_marker() == "_" and len(base.get_xdata()) == 1
    plt.close(fig)
