"""CRBL preprocessing, training and inference scripts, run as a user runs them."""
import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage

from common.io import UserError
from crbl.data import (CROP_MAX_BOTTOM, _part_image, crop_box, largest_region_bbox, preprocess_full,
                       read_labels)
from crbl.model import CRBL, EfficientNetB0, build_model


# ---------------------------------------------------------------- preprocessing
def test_largest_region_matches_scipy_8_connectivity():
    rng = np.random.default_rng(0)
    checked = 0
    for _ in range(200):
        mask = rng.random((rng.integers(1, 50), rng.integers(1, 50))) < rng.uniform(0.2, 0.7)
        labels, n = ndimage.label(mask, structure=np.ones((3, 3)))
        if n == 0:
            assert largest_region_bbox(mask) is None
            continue
        sizes = np.bincount(labels.ravel())[1:]
        if (sizes == sizes.max()).sum() > 1:
            continue  # a tie: either region is a right answer
        ys, xs = np.nonzero(labels == np.argmax(sizes) + 1)
        expected = (xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1)
        assert largest_region_bbox(mask) == tuple(int(v) for v in expected)
        checked += 1
    assert checked > 150
    diagonal = np.eye(6, dtype=bool)  # touching only at corners is still one region
    assert largest_region_bbox(diagonal) == (0, 0, 6, 6)


def test_crop_box_trims_and_clips_like_the_original():
    img = np.full((120, 120, 3), 240, np.uint8)
    img[10:40, 20:70] = 100                   # the part: y=10, h=30, x=20, w=50
    img[60:62, 90:92] = 10                    # a smaller dark speck is ignored
    assert crop_box(img) == (11, 39, 21, 69)  # [y+1 : y+h-1, x+1 : x+w-1]
    tall = np.full((120, 120, 3), 240, np.uint8)
    tall[50:110, 20:70] = 100                 # bottom past row 89 is clipped: h = 89 - y
    assert crop_box(tall) == (51, CROP_MAX_BOTTOM - 1, 21, 69)
    assert crop_box(np.full((50, 50, 3), 255, np.uint8)) is None


def test_full_path_drops_the_first_four_rows_and_columns():
    img = np.zeros((132, 132, 3), np.uint8)
    img[:, :, 2] = 200
    img[:4, :, 0] = img[:, :4, 0] = 255       # a red border the full path must drop
    out = preprocess_full(img)
    assert out.shape == (128, 128, 3) and out.dtype == np.float32
    assert out[..., 0].max() == 0 and np.allclose(out[..., 2], 200 / 255, atol=1e-6)


def test_label_file_errors_name_file_and_line(tmp_path):
    Image.fromarray(_part_image(np.random.default_rng(0), False)).save(tmp_path / "a.png")
    csv_path = tmp_path / "train.csv"
    csv_path.write_text("image_path,impurity\na.png,0\na.png,2\n")
    with pytest.raises(UserError, match=r"train.csv, line 3: impurity must be 0 or 1"):
        read_labels(csv_path)
    csv_path.write_text("image_path,impurity\na.png,1\nmissing.png,0\n")
    with pytest.raises(UserError, match=r"train.csv, line 3: image not found"):
        read_labels(csv_path)


# ---------------------------------------------------------------- train / infer scripts
@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    """4+4 training and 2+2 validation parts in the real CSV + PNG format."""
    root = tmp_path_factory.mktemp("crbl_data")
    from crbl.data import make_builtin_dataset
    make_builtin_dataset(root, n_train=8, n_val=4, seed=3)
    return root


def train_argv(data, out, model_type, *extra):
    return ("--model-type", model_type, "--data", data, "--out", out, "--epochs", 1, "--batch-size", 4,
            "--workers", 0, "--no-progress", *extra)


def run_train(run_script, data, out, model_type, *extra):
    """crbl/train.py in a subprocess, as a user runs it (once per file: the rest runs main(argv) in-process).
    One thread: with two, OpenMP barriers stall while other processes keep the second core busy."""
    return run_script("crbl/train.py", *train_argv(data, out, model_type, "--threads", 1, *extra))


def train(data, out, model_type, *extra) -> str:
    """crbl/train.py's main(argv) in the test process (one thread, no interpreter start): what it printed."""
    from crbl.train import main
    from helpers import call
    return call(main, *train_argv(data, out, model_type, "--threads", 1, *extra))[1]


def rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_train_then_infer_crop_and_full(run_script, tiny_data, tmp_path, capsys):
    from crbl.infer import main as infer_main
    from helpers import call, cli_error
    for model_type in ("crop", "full"):
        if model_type == "crop":   # as a user runs it; the full model in-process
            res = run_train(run_script, tiny_data, tmp_path / model_type, model_type)
            assert res.returncode == 0, res.stderr[-2000:]
            stdout = res.stdout
        else:
            stdout = train(tiny_data, tmp_path / model_type, model_type)
        log = rows(tmp_path / model_type / "log.csv")
        assert len(log) == 1 and {"val_loss", "val_f1", "val_auc", "val_acc"} <= set(log[0])
        ckpt = torch.load(tmp_path / model_type / "best.pt", weights_only=True)
        assert ckpt["config"]["model_type"] == model_type
        assert ckpt["config"]["decision_threshold"] == {"crop": 0.01, "full": 0.5}[model_type]
        last = torch.load(tmp_path / model_type / "last.pt", weights_only=True)
        for c in (ckpt, last):   # both files carry the validation thresholds, the log shows them
            t = c["extra"]["thresholds"]
            assert t["default"] == ckpt["config"]["decision_threshold"] and t["n_val"] == 4
            assert 0 < t["val_f1"] < 1 and 0 < t["val_youden"] < 1
            assert float(log[0]["val_thr_f1"]) == pytest.approx(t["val_f1"], rel=1e-3)
        assert {"val_acc_thr_f1", "val_f1_thr_f1", "val_thr_youden"} <= set(log[0])
        assert "majority class (normal) always" in stdout and "(val-f1)" in stdout

    out = tmp_path / "preds.csv"
    res = run_script("crbl/infer.py", "--model-type", "full", "--weights", tmp_path / "full" / "best.pt",
                     tiny_data / "val.csv", "--out", out, "--device", "cpu", "--threads", 1)
    assert res.returncode == 0, res.stderr[-2000:]
    assert f"predictions written to {out}" in res.stdout and "labels found: accuracy=" in res.stdout
    preds = rows(out)
    assert len(preds) == 4
    for r in preds:
        p = float(r["probability"])
        assert 0.0 <= p <= 1.0 and r["decision"] == ("defect" if p > 0.5 else "normal")
    assert "threshold: defect if probability > 0.5 (the default for a full model" in res.stdout

    # --threshold val-f1: the threshold stored in best.pt, which is the F1-optimal cut of these val scores
    from common.metrics import best_threshold
    stored = torch.load(tmp_path / "full" / "best.pt", weights_only=True)["extra"]["thresholds"]
    labels = {r["image_path"]: int(r["impurity"]) for r in rows(tiny_data / "val.csv")}
    y = [labels[str(Path(r["path"]).relative_to(tiny_data))] for r in preds]
    expected_thr = best_threshold(y, [float(r["probability"]) for r in preds], "f1")[0]
    assert stored["val_f1"] == pytest.approx(expected_thr, rel=1e-4)
    out_f1 = tmp_path / "preds_f1.csv"
    _, stdout = call(infer_main, "--weights", tmp_path / "full" / "best.pt", "--threshold", "val-f1",
                     tiny_data / "val.csv", "--out", out_f1, "--device", "cpu", "--threads", 1)
    assert f"probability > {stored['val_f1']:.4g} (val-f1: maximised F1 on the training run's 4 validation" in stdout
    for r in rows(out_f1):
        assert r["decision"] == ("defect" if float(r["probability"]) > stored["val_f1"] else "normal")
    # same weights through the API give the same probabilities
    model = CRBL()
    model.load_state_dict(torch.load(tmp_path / "full" / "best.pt", weights_only=True)["model"])
    from crbl.data import preprocess
    with torch.inference_mode():
        x = torch.stack([preprocess(Path(r["path"]), "full") for r in preds])
        expected = torch.sigmoid(model.eval()(x)).squeeze(1)
    np.testing.assert_allclose([float(r["probability"]) for r in preds], expected.numpy(), rtol=1e-4, atol=1e-6)

    combined = tmp_path / "combined.csv"
    _, stdout = call(infer_main, "--combined", tmp_path / "crop" / "best.pt", tmp_path / "full" / "best.pt",
                     tiny_data / "images", "--out", combined, "--device", "cpu", "--crop-threshold", "val-youden",
                     "--threads", 1)
    t_crop = torch.load(tmp_path / "crop" / "best.pt", weights_only=True)["extra"]["thresholds"]["val_youden"]
    for r in rows(combined):   # each model's own threshold: the crop one stored, the full one the default
        flagged = float(r["prob_crop"]) > t_crop or float(r["prob_full"]) > 0.5
        assert r["decision"] == ("defect" if flagged else "normal")
    assert f"defect if crop > {t_crop:.4g} or full > 0.5" in stdout
    before = combined.read_bytes()
    again = cli_error(infer_main, "--combined", tmp_path / "crop" / "best.pt", tmp_path / "full" / "best.pt",
                      tiny_data / "images", "--out", combined, "--device", "cpu", capsys=capsys)
    assert "already exists" in again and combined.read_bytes() == before  # never overwritten silently


def test_init_and_backbone_weights_are_loaded_and_frozen_parts_kept(tiny_data, tmp_path):
    torch.manual_seed(7)
    init = build_model("crop").state_dict()
    torch.save(init, tmp_path / "init.pth")
    train(tiny_data, tmp_path / "run", "crop", "--init", tmp_path / "init.pth")
    trained = torch.load(tmp_path / "run" / "last.pt", weights_only=True)["model"]
    # Keras layers[:150] are frozen, including BatchNorm statistics; layers[150:] trained
    assert torch.equal(trained["backbone1.stem_conv.weight"], init["backbone1.stem_conv.weight"])
    assert torch.equal(trained["backbone2.block3a.bn.running_var"], init["backbone2.block3a.bn.running_var"])
    assert not torch.equal(trained["backbone1.top_conv.weight"], init["backbone1.top_conv.weight"])
    assert not torch.equal(trained["predictions.weight"], init["predictions.weight"])

    torch.manual_seed(8)
    b1, b2 = EfficientNetB0().state_dict(), EfficientNetB0().state_dict()
    torch.save(b1, tmp_path / "imagenet.pth")
    torch.save(b2, tmp_path / "noisy.pth")
    train(tiny_data, tmp_path / "run2", "full", "--backbone-weights", tmp_path / "imagenet.pth", tmp_path / "noisy.pth")
    trained = torch.load(tmp_path / "run2" / "last.pt", weights_only=True)["model"]
    for k in b1:  # the full model never changes its backbones
        assert torch.equal(trained[f"backbone1.{k}"], b1[k]) and torch.equal(trained[f"backbone2.{k}"], b2[k])


def test_bad_inputs_give_one_line_and_nonzero_exit(run_script, tiny_data, tmp_path, capsys):
    from crbl.train import main as train_main
    from helpers import cli_error
    # training errors in-process (cli_error: exit status 2, exactly one line); the infer one below as a user sees it
    torch.save({"conv.weight": torch.zeros(3, 3)}, tmp_path / "other.pth")
    msg = cli_error(train_main, *train_argv(tiny_data, tmp_path / "r1", "crop", "--init", tmp_path / "other.pth"),
                    capsys=capsys)
    assert "other.pth: weights do not fit CRBL" in msg

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "train.csv").write_text("image_path,impurity\nnope.png,1\n")
    (bad / "val.csv").write_text("image_path,impurity\nnope.png,1\n")
    msg = cli_error(train_main, *train_argv(bad, tmp_path / "r2", "full", "--threads", 1), capsys=capsys)
    assert "train.csv, line 2: image not found" in msg

    (bad / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    torch.save(CRBL().state_dict(), tmp_path / "crbl.pth")
    res = run_script("crbl/infer.py", "--model-type", "full", "--weights", tmp_path / "crbl.pth",
                     bad / "broken.png", "--out", tmp_path / "p.csv", "--device", "cpu")
    assert res.returncode == 2 and res.stderr.strip().count("\n") == 0
    assert "broken.png: unreadable or corrupt image" in res.stderr
    assert not (tmp_path / "p.csv").exists()
    # converted weights carry no validation thresholds: one line, before any image is read (in-process)
    from crbl.infer import main as infer_main
    msg = cli_error(infer_main, "--model-type", "full", "--weights", tmp_path / "crbl.pth", "--threshold", "val-f1",
                    bad / "broken.png", "--out", tmp_path / "p.csv", "--device", "cpu", capsys=capsys)
    assert "crbl.pth: --threshold val-f1: it stores no validation thresholds" in msg


def test_batchnorm_calibration_for_random_backbones():
    from crbl.train import calibrate_batchnorm
    torch.manual_seed(0)
    model = build_model("full").train()
    x = torch.rand(8, 3, 64, 64)
    loader = [(x[:4], None), (x[4:], None)]
    assert calibrate_batchnorm(model, loader, torch.device("cpu")) == 8
    bb = model.backbone1
    with torch.no_grad():
        stem = bb.stem_conv(torch.addcmul(bb.input_shift[:, None, None], x, bb.input_scale[:, None, None]))
    # the stem BN now holds the mean of its inputs over all calibration images
    torch.testing.assert_close(bb.stem_bn.running_mean, stem.mean((0, 2, 3)), rtol=1e-4, atol=1e-5)
    assert bb.stem_bn.momentum == 0.01 and not bb.stem_bn.training   # Keras momentum, frozen = eval again
