"""The live dashboard: TensorBoard served from the training process. One short training run with
--dashboard is read over HTTP while it trains (the scalars served equal log.csv), opened in a real
headless Chromium (the loss chart and the spectrum figure render), and stopped; a failing run
stops its server too."""
from __future__ import annotations

import contextlib
import csv
import io
import json
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from spectral import dashboard as dash
from spectral import data as D
from spectral.train import main as train_main
from tests.spectral_ref.browser import Browser, find_chromium
from tests.test_spectral_data import write_raw
from tests.test_spectral_train import TINY

REPO = Path(__file__).resolve().parents[1]


def no_infinity(text: str):
    """json.loads that fails on NaN / Infinity (CR_recon's dashboard sent a bare Infinity)."""
    def refuse(name):
        raise AssertionError(f"non-standard JSON constant {name}")
    return json.loads(text, parse_constant=refuse)


def get(url: str, timeout: float = 10.0):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return no_infinity(r.read().decode())


class Training:
    """train.py --dashboard 0 in a subprocess; stdout collected line by line."""

    def __init__(self, work: Path):
        cfg = work / "tiny.yaml"
        cfg.write_text(yaml.safe_dump({**TINY, "training": {**TINY["training"], "epochs": 2}}))
        self.run = work / "run"
        self.proc = subprocess.Popen(
            [sys.executable, "-u", str(REPO / "spectral" / "train.py"), "--config", str(cfg), "--data", str(work / "raw"),
             "--out", str(self.run), "--threads", "1", "--no-progress", "--dashboard", "0", "--dashboard-keep", "300"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO, start_new_session=True,
            # a process started in the background inherits an ignored SIGINT; a user's terminal does not
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        self.lines: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()
        self.url = self.wait_for("dashboard: http").split()[1].rstrip("/")

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def wait_for(self, text: str, timeout: float = 300.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            hit = next((ln for ln in self.lines if text in ln), None)
            if hit:
                return hit
            if self.proc.poll() is not None and not any(text in ln for ln in self.lines):
                time.sleep(0.5)
                raise AssertionError(f"train.py ended ({self.proc.returncode}) without '{text}':\n" + "\n".join(self.lines))
            time.sleep(0.2)
        raise AssertionError(f"no '{text}' within {timeout} s:\n" + "\n".join(self.lines))

    def finished(self) -> bool:
        return any("dashboard stays up" in ln for ln in self.lines)


@pytest.fixture(scope="module")
def training(tmp_path_factory):
    work = tmp_path_factory.mktemp("spectral-dashboard")
    write_raw(work / "raw", rows=(10, 10), invalid_every=5)
    t = Training(work)
    yield t
    if t.proc.poll() is None:
        t.proc.kill()
        t.proc.wait()


def port_open(url: str) -> bool:
    host, port = url.split("//")[1].split(":")
    with contextlib.closing(socket.socket()) as s:
        s.settimeout(1.0)
        return s.connect_ex((host, int(port))) == 0


RUN = "run"   # TensorBoard's name for the run: the run folder's name (Training's --out)


def test_http_api_while_training_and_scalars_equal_log_csv(training):
    assert training.url.startswith("http://127.0.0.1:")      # this machine only, by default
    seen_live = False
    while not training.finished():
        tags = get(f"{training.url}/data/plugin/scalars/tags")
        if "train/progress_epoch" in tags.get(RUN, {}):
            points = get(f"{training.url}/data/plugin/scalars/scalars?run={RUN}&tag=train/progress_epoch")
            if points and not training.finished():
                seen_live = True
                assert 0 < points[-1][2] <= 2                      # epochs done, as a fraction
                break
        time.sleep(0.5)
    assert seen_live, "no live progress served while training ran"
    training.wait_for("dashboard stays up")
    time.sleep(3)                                                  # one more reload of the event files
    with open(training.run / "log.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2
    tags = get(f"{training.url}/data/plugin/scalars/tags")
    assert list(tags) == [RUN]                                     # one run, named after the run folder
    epochs = get(f"{training.url}/data/plugin/scalars/scalars?run={RUN}&tag=train/epoch")
    assert [p[2] for p in epochs] == [1, 2]
    end_steps = [p[1] for p in epochs]                             # the optimizer step that ended each epoch
    for key, tag in (("train_loss", "loss/train"), ("val_loss", "loss/val"), ("val_baseline_loss", "loss/val_baseline"),
                     ("val_mse", "metrics/val_mse"), ("val_pearson_r", "metrics/val_pearson_r"),
                     ("val_rmse_R", "metrics/val_rmse_R"), ("val_rmse_B", "metrics/val_rmse_B")):
        assert tag in tags[RUN], tag
        served = get(f"{training.url}/data/plugin/scalars/scalars?run={RUN}&tag={tag}")
        assert [p[1] for p in served] == end_steps
        assert np.allclose([p[2] for p in served], [float(r[key]) for r in rows], rtol=2e-5, atol=0), key
    for tag in ("loss/train_step", "train/lr", "train/progress_batch_of_epoch"):
        assert tag in tags[RUN]
    # TensorBoard sorts its chart groups by name: the page opens on the losses
    groups = sorted({t.split("/")[0] for t in tags[RUN]})
    assert groups[0] == "loss" and groups.index("metrics") < groups.index("train")
    for tag in (dash.SPECTRA_TAG, dash.SAMPLE_TAG):
        images = get(f"{training.url}/data/plugin/images/images?run={RUN}&tag={tag}")
        assert [i["step"] for i in images] == end_steps
    assert sorted(p.name for p in (training.run / "samples").iterdir()) == ["epoch_0001.png", "epoch_0002.png"]
    assert "configuration/text_summary" in get(f"{training.url}/data/plugin/text/tags")[RUN]


@pytest.mark.skipif(find_chromium() is None, reason="Chromium is not installed (apt-get install chromium; .ci/run "
                                                     "installs it where apt is available)")
def test_page_renders_loss_chart_and_spectrum_figure_in_a_browser(training):
    training.wait_for("dashboard stays up")
    try:
        browser = Browser(find_chromium())
    except (OSError, RuntimeError, TimeoutError) as e:
        pytest.skip(f"{find_chromium()} is installed but does not start here ({e})")
    try:
        browser.goto(f"{training.url}/")                    # as a user opens it: the first chart is a loss
        browser.wait_for("document.querySelectorAll('scalar-card').length")
        first = browser.evaluate("document.querySelector('scalar-card').innerText.replace(/\\s/g, '')")
        assert first.startswith("loss/"), first
        browser.goto(f"{training.url}/?tagFilter=loss/val%24%7Csample/spectra#timeseries")
        browser.wait_for("document.querySelectorAll('scalar-card line-chart canvas').length")
        assert browser.wait_for("(() => { const i = document.querySelector('image-card img');"
                                " return i && i.complete && i.naturalWidth; })()") > 400
        title = browser.evaluate("document.querySelector('scalar-card').innerText.replace(/\\s/g, '')")
        assert title.startswith("loss/val"), title
        chart = json.loads(browser.evaluate(
            "JSON.stringify(document.querySelector('scalar-card line-chart').getBoundingClientRect())"))
        img = json.loads(browser.evaluate(
            "JSON.stringify(document.querySelector('image-card img').getBoundingClientRect())"))

        def crop(shot, r):
            return shot[int(r["top"]):int(r["bottom"]), int(r["left"]):int(r["right"])].astype(int)

        deadline = time.monotonic() + 30
        while True:   # the chart draws in a worker: wait until its line shows
            shot = browser.screenshot()
            c = crop(shot, chart)
            saturated = (c.max(-1) - c.min(-1)) > 25               # the run's colour (slate blue); grid, text grey
            if saturated.sum() > 40 or time.monotonic() > deadline:
                break
            time.sleep(1)
        assert saturated.sum() > 40, "no loss curve drawn in the loss/val chart"
        assert img["width"] >= 350, img        # the spectra card fills TensorBoard's image card (its type: 14-18 pt)
        f = crop(shot, img)
        r, g, b = f[..., 0], f[..., 1], f[..., 2]
        assert ((r > 150) & (g < 110) & (b < 110)).sum() > 10      # the R spectrum's red line
        assert ((g > 120) & (r < 120) & (b < 120)).sum() > 10      # G
        assert ((b > 130) & (r < 100)).sum() > 10                  # B
    finally:
        browser.close()


def test_server_stops_when_training_ends(training):
    training.wait_for("dashboard stays up")
    assert port_open(training.url)
    training.proc.send_signal(signal.SIGTERM)                     # ends the keep-alive period, like Ctrl-C
    try:
        code = training.proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        raise AssertionError("train.py did not stop after SIGINT:\n" + "\n".join(training.lines[-15:])) from None
    assert code == 0, "\n".join(training.lines[-15:])
    assert not port_open(training.url)
    assert "dashboard stopped" in training.lines
    summary = next(i for i, ln in enumerate(training.lines) if ln.startswith("summary: spectral"))
    assert "val_loss:" in training.lines[summary + 1] and "baseline" in training.lines[summary + 1]


def test_server_stops_when_training_fails(tmp_path):
    write_raw(tmp_path / "raw", rows=(8,), invalid_every=100)
    s = np.load(tmp_path / "raw" / "binary_dataset_128_0.npy")
    s[3] *= 7                                     # found by the loader during the first epoch
    np.save(tmp_path / "raw" / "binary_dataset_128_0.npy", s)
    raw = D.RawData(*D.find_parts(tmp_path / "raw"), 30)
    D.save_split(tmp_path / "split.json", raw, D.Split(np.array([0, 1, 2, 3, 4, 5]), np.array([6, 7]), ""), 1, 0.75)
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(TINY))
    buf = io.StringIO()
    n = torch.get_num_threads()
    try:
        with contextlib.redirect_stdout(buf), pytest.raises(Exception, match="row 3: structure values must be 0 or 1"):
            train_main([str(a) for a in ("--config", tmp_path / "tiny.yaml", "--data", tmp_path / "raw", "--split",
                                         tmp_path / "split.json", "--out", tmp_path / "run", "--dashboard", "0",
                                         "--threads", "1", "--no-progress")])
    finally:
        torch.set_num_threads(n)
    url = next(ln for ln in buf.getvalue().splitlines() if ln.startswith("dashboard: ")).split()[1].rstrip("/")
    assert not port_open(url)


def test_a_port_in_use_is_one_line_before_anything_is_written(tmp_path, capsys):
    from common.io import UserError, run_cli

    write_raw(tmp_path / "raw", rows=(6,), invalid_every=100)
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(TINY))
    with contextlib.closing(socket.socket()) as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        with pytest.raises(UserError, match=f"--dashboard: TensorBoard could not bind to port {port}"):
            dash.Dashboard(tmp_path / "tb", port).start()
        capsys.readouterr()
        with pytest.raises(SystemExit):
            run_cli(lambda: train_main([str(a) for a in ("--config", tmp_path / "tiny.yaml", "--data", tmp_path / "raw",
                                                         "--out", tmp_path / "run", "--dashboard", port)]))
        err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"cannot serve on 127.0.0.1:{port}" in err[0]
    assert not (tmp_path / "run").exists()


def test_figure_uses_the_wavelengths_of_the_sampled_points(monkeypatch):
    """CR_recon's dashboard labelled the points with bin means (404.5, 414.5, ...); they are the
    point samples 400, 410, 420, 431, ... 700 nm."""
    import matplotlib.axes

    xs = []
    real = matplotlib.axes.Axes.plot

    def spy(self, x, *args, **kw):
        xs.append(np.asarray(x))
        return real(self, x, *args, **kw)

    monkeypatch.setattr(matplotlib.axes.Axes, "plot", spy)
    y = np.random.default_rng(0).random((2, 2, 30))
    png = dash.sample_figure(np.zeros((1, 128, 128)), y, y, D.wavelengths_nm(30), "t")
    assert png[:4] == b"\x89PNG" and xs
    for x in xs:
        assert np.array_equal(x, 400 + np.linspace(0, 300, 30, dtype=int))


def bad_dashboard_run(tmp_path, capsys, *flags) -> str:
    """train.py with `flags`: the one error line; nothing may have been written."""
    from common.io import run_cli

    write_raw(tmp_path / "raw", rows=(6,), invalid_every=100)
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(TINY))
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        run_cli(lambda: train_main([str(a) for a in ("--config", tmp_path / "tiny.yaml", "--data", tmp_path / "raw",
                                                     "--out", tmp_path / "run", *flags)]))
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert not (tmp_path / "run").exists()
    return err[0]


@pytest.mark.parametrize("port", [0, 8765])
def test_a_host_that_cannot_be_bound_is_one_line_naming_the_flag_for_every_port(tmp_path, capsys, port):
    """Port 0 (any free port) skipped the check: TensorBoard's own text and a partial run folder."""
    err = bad_dashboard_run(tmp_path, capsys, "--dashboard", port, "--dashboard-host", "192.0.2.1")  # TEST-NET-1
    assert err.startswith("error: --dashboard-host 192.0.2.1: not an address of this machine") and "127.0.0.1" in err


def test_no_dashboard_with_dashboard_is_refused(tmp_path, capsys):
    err = bad_dashboard_run(tmp_path, capsys, "--dashboard", 0, "--no-dashboard")
    assert "--dashboard 0 and --no-dashboard contradict each other" in err
