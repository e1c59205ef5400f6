"""battery_ct/infer.py: metrics against the per-image CSV, image predictions, plain state_dicts, the
autoencoder threshold, segmentation (sliding windows), bad input. Uses the runs of test_battery_train."""
from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

from battery_ct.data import SplitDataset, metadata, read_split
from battery_ct.infer import main as infer_main, sliding_logits, window_starts
from battery_ct.model import CLASS_NAMES, DEFECT_CLASSES, build_model, hdcnn_decision
from common.checkpoint import load_checkpoint
from common.metrics import youden_threshold
from test_battery_train import (builtin_split, call, cli_error, deeplab_files,  # noqa: F401
                                script, trained, trained_ae)

# deeplabv3 runs the same infer.py code as the others plus the BatchNorm folding that
# test_battery_models checks against the plain model: slow (25 s), so out of the default run
CLASSIFIERS = ["resnet18", "late_fusion", "hdcnn", pytest.param("deeplabv3", marks=pytest.mark.slow)]


def best_of(name: str) -> Path:
    out, _ = trained(name)
    return out / "finetune" / "best.pt" if name == "resnet18" else out / "best.pt"


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# ---------------------------------------------------------------- independent metric helpers
def _f1s(y, p, n):
    prec, rec, f1, sup = [], [], [], []
    for c in range(n):
        tp = sum(1 for a, b in zip(y, p) if a == c and b == c)
        pp, ap = sum(1 for b in p if b == c), sum(1 for a in y if a == c)
        pr, rc = (tp / pp if pp else 0.0), (tp / ap if ap else 0.0)
        prec.append(pr), rec.append(rc), sup.append(ap)
        f1.append(2 * pr * rc / (pr + rc) if pr + rc else 0.0)
    return prec, rec, f1, sup


def _auc(pos_scores, neg_scores):
    wins = sum((s > t) + 0.5 * (s == t) for s in pos_scores for t in neg_scores)
    return wins / (len(pos_scores) * len(neg_scores))


def _expected_probs(name: str, ckpt: Path, items) -> torch.Tensor:
    """The model rebuilt here from the checkpoint, run image by image."""
    model = build_model(name)
    model.load_state_dict(load_checkpoint(ckpt)["model"])
    model.eval()
    ds = SplitDataset(items, 32)
    out = []
    with torch.no_grad():
        for i, (path, _) in enumerate(items):
            x = ds[i][0][None]
            if name == "hdcnn":
                out.append(hdcnn_decision(*model(x))[1])
            elif name == "late_fusion":
                out.append(model(x, metadata(path)[None]).softmax(1))
            else:
                out.append(model(x).softmax(1))
    return torch.cat(out)


@pytest.mark.parametrize("name", CLASSIFIERS)
def test_split_metrics_agree_with_the_per_image_csv(name, tmp_path):
    weights = best_of(name)
    _, stdout = call(infer_main, "--weights", weights, "--out", tmp_path, "--workers", 0)  # built-in test split
    assert f"outputs written to {tmp_path}" in stdout
    rep = json.loads((tmp_path / "metrics.json").read_text())
    rows = read_csv(tmp_path / "predictions.csv")
    items = read_split(builtin_split("test"))
    assert [r["path"] for r in rows] == [str(p) for p, _ in items]
    y = [int(r["label"]) for r in rows]
    p = [int(r["pred"]) for r in rows]
    probs = np.array([[float(r[f"prob_{c}"]) for c in CLASS_NAMES] for r in rows])
    assert y == [lab for _, lab in items] and all(r["pred_name"] == CLASS_NAMES[int(r["pred"])] for r in rows)
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-6)
    assert (probs.argmax(1) == np.array(p)).all()
    np.testing.assert_allclose(probs, _expected_probs(name, weights, items).numpy(), atol=1e-5)

    m = rep["metrics"]
    assert rep["total_samples"] == len(rows) == 60 and rep["class_counts"] == [12] * 5
    assert m["accuracy"] == pytest.approx(np.mean(np.array(y) == np.array(p)))
    prec, rec, f1, sup = _f1s(y, p, 5)
    assert m["f1_macro"] == pytest.approx(np.mean(f1))
    assert m["f1_weighted"] == pytest.approx(np.dot(f1, sup) / sum(sup))
    for i, c in enumerate(CLASS_NAMES):
        pc = rep["per_class_metrics"][c]
        assert (pc["precision"], pc["recall"], pc["f1"], pc["support"]) == \
            pytest.approx((prec[i], rec[i], f1[i], sup[i]))
    cm = [[sum(1 for a, b in zip(y, p) if a == t and b == q) for q in range(5)] for t in range(5)]
    assert rep["confusion_matrix"] == cm
    aucs = [_auc(probs[np.array(y) == c, c], probs[np.array(y) != c, c]) for c in range(5)]
    assert m["roc_auc_ovr"] == pytest.approx(np.mean(aucs), abs=1e-6)
    is_def = np.isin(y, DEFECT_CLASSES)
    assert rep["binary_normal_vs_defect"]["accuracy"] == pytest.approx(np.mean(is_def == np.isin(p, DEFECT_CLASSES)))
    assert ("coarse_metrics" in rep) == (name == "hdcnn")
    with Image.open(tmp_path / "confusion_matrix.png") as im:
        assert im.format == "PNG" and im.width > 100


def test_images_mode_writes_predictions_only(tmp_path):
    imgs = [p for p, _ in read_split(builtin_split("test"))[:3]]
    folder = tmp_path / "in"
    folder.mkdir()
    for p in imgs[:2]:
        shutil.copy(p, folder / p.name)
    out = tmp_path / "out"
    call(infer_main, "--weights", best_of("late_fusion"), "--images", folder, imgs[2], "--out", out, "--workers", 0)
    rows = read_csv(out / "predictions.csv")
    assert [Path(r["path"]).name for r in rows] == sorted(p.name for p in imgs[:2]) + [imgs[2].name]
    assert "label" not in rows[0] and "prob_module_resin_overflow" in rows[0]
    assert not (out / "metrics.json").exists()


def test_plain_state_dict_needs_model_and_gives_the_same_predictions(tmp_path, capsys):
    ckpt = best_of("resnet18")
    plain = tmp_path / "converted.pth"
    torch.save(load_checkpoint(ckpt)["model"], plain)
    imgs = [str(p) for p, _ in read_split(builtin_split("test"))[:4]]
    call(infer_main, "--weights", ckpt, "--images", *imgs, "--out", tmp_path / "a", "--workers", 0)
    call(infer_main, "--weights", plain, "--model", "resnet18", "--image-size", 32, "--images", *imgs,
         "--out", tmp_path / "b", "--workers", 0)
    assert read_csv(tmp_path / "a" / "predictions.csv") == read_csv(tmp_path / "b" / "predictions.csv")
    msg = cli_error(infer_main, "--weights", plain, "--images", *imgs, "--out", tmp_path / "c", capsys=capsys)
    assert msg == f"error: {plain}: a plain state_dict (no training config): give --model NAME"


def test_autoencoder_infer_uses_the_stored_threshold(tmp_path, capsys):
    out, _ = trained_ae()
    stored = load_checkpoint(out / "best.pt")["extra"]["threshold"]
    call(infer_main, "--weights", out / "best.pt", "--split", builtin_split("val"), "--out", tmp_path / "v",
         "--workers", 0)
    rep = json.loads((tmp_path / "v" / "metrics.json").read_text())
    rows = read_csv(tmp_path / "v" / "predictions.csv")
    assert rep["threshold"] == stored and rep["threshold_source"].startswith("checkpoint")
    scores = np.array([float(r["score"]) for r in rows])
    # the CSV holds 9 significant digits: a score that prints like the threshold may be either side
    clear = [r for r in rows if r["score"] != r["threshold"]]
    assert len(clear) >= len(rows) - 1 and all(float(r["threshold"]) == pytest.approx(stored, rel=1e-8) for r in rows)
    assert [int(r["pred"]) for r in clear] == [int(float(r["score"]) >= stored) for r in clear]
    assert {r["decision"] for r in rows} <= {"normal", "defect"}
    is_def = np.array([int(r["is_defect"]) for r in rows], bool)
    assert is_def.tolist() == [y in DEFECT_CLASSES for _, y in read_split(builtin_split("val"))]
    # the stored threshold is Youden's J on exactly these val scores
    assert youden_threshold(is_def, scores)[0] == pytest.approx(stored, rel=1e-5)
    assert rep["metrics"]["roc_auc"] == pytest.approx(
        np.mean([(a > b) + 0.5 * (a == b) for a in scores[is_def] for b in scores[~is_def]]), abs=1e-6)
    # --threshold overrides; a checkpoint without a threshold (last.pt) is refused
    call(infer_main, "--weights", out / "best.pt", "--split", builtin_split("val"), "--out", tmp_path / "w",
         "--threshold", 0.0, "--workers", 0)
    assert {r["decision"] for r in read_csv(tmp_path / "w" / "predictions.csv")} == {"defect"}
    msg = cli_error(infer_main, "--weights", out / "last.pt", "--out", tmp_path / "x", capsys=capsys)
    assert msg.startswith(f"error: {out / 'last.pt'}: no anomaly threshold stored")


# ---------------------------------------------------------------- segmentation
class WindowMean(nn.Module):
    """Position-independent: every pixel of a window gets the window's per-channel mean (+ a class
    that depends on nothing but the content), so the expected overlap average is easy to compute."""

    def forward(self, x):
        m = x.mean((2, 3), keepdim=True)
        return torch.cat([m, -m], 1).expand(-1, -1, *x.shape[-2:])


def _starts(n, w, s):
    out = list(range(0, n - w + 1, s))
    return out if out[-1] == n - w else out + [n - w]


@pytest.mark.parametrize("h, w, window, stride", [(40, 50, 16, 12), (30, 30, 16, 7), (20, 12, 16, 8)])
def test_sliding_windows_average_overlapping_logits(h, w, window, stride):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 3, h, w, generator=g)
    pad = torch.tensor([-1.0, -2.0, -3.0])
    got = sliding_logits(WindowMean(), x, window, stride, pad, batch_size=3)
    hp, wp = max(h, window), max(w, window)
    xp = pad.view(1, 3, 1, 1).expand(1, 3, hp, wp).clone()
    xp[..., :h, :w] = x
    acc, cnt = torch.zeros(1, 6, hp, wp), torch.zeros(hp, wp)
    for y0 in _starts(hp, window, stride):
        for x0 in _starts(wp, window, stride):
            m = xp[0, :, y0:y0 + window, x0:x0 + window].mean((1, 2))
            acc[0, :, y0:y0 + window, x0:x0 + window] += torch.cat([m, -m]).view(6, 1, 1)
            cnt[y0:y0 + window, x0:x0 + window] += 1
    assert cnt.min() >= 1
    torch.testing.assert_close(got, (acc / cnt)[..., :h, :w])
    assert window_starts(hp, window, stride) == _starts(hp, window, stride)


def test_sliding_with_a_window_of_the_image_size_is_whole_image_inference():
    model = build_model("deeplab_seg").eval()
    x = torch.randn(1, 3, 40, 40, generator=torch.Generator().manual_seed(1))
    pad = torch.zeros(3)
    with torch.no_grad():
        whole = model(x)
        torch.testing.assert_close(sliding_logits(model, x, 40, 30, pad), whole, rtol=0, atol=0)
        # a larger window pads the image (bottom/right) and crops the result back
        padded = torch.zeros(1, 3, 48, 48)
        padded[..., :40, :40] = x
        torch.testing.assert_close(sliding_logits(model, x, 48, 30, pad), model(padded)[..., :40, :40])


def test_segment_cli_writes_masks_and_overlays(tmp_path):
    seg, _ = deeplab_files()
    src = read_split(builtin_split("test"))[0][0]
    img = tmp_path / "scan.png"
    Image.open(src).convert("RGB").resize((48, 48)).save(img)
    outs = {}
    for crop, extra in (("whole", []), ("slide", ["--window", 48, "--stride", 40]),
                        ("small", ["--window", 32, "--stride", 24])):
        out = tmp_path / crop
        call(infer_main, "--weights", seg, "--model", "deeplab_seg", "--task", "segment",
             "--crop", "whole" if crop == "whole" else "slide", *extra, "--images", img, "--out", out)
        mask = np.asarray(Image.open(out / "scan_mask.png"))
        over = np.asarray(Image.open(out / "scan_overlay.png"))
        assert mask.shape == (48, 48) and mask.dtype == np.uint8 and mask.max() < 4
        assert over.shape == (48, 48, 3)
        row = read_csv(out / "segments.csv")[0]
        assert sum(float(row[f"fraction_class{i}"]) for i in range(4)) == pytest.approx(1.0, abs=1e-4)
        outs[crop] = mask
    assert (outs["whole"] == outs["slide"]).all()  # one window = the whole image


# ---------------------------------------------------------------- bad input
def _sentinel(out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    s = out / "predictions.csv"
    s.write_text("written earlier\n")
    return s


@pytest.mark.parametrize("case", ["missing image", "unreadable image", "label out of range", "no tab"])
def test_bad_split_is_one_error_line_and_overwrites_nothing(tmp_path, capsys, case):
    items = read_split(builtin_split("test"))[:3]
    lines = [f"{p}\t{y}" for p, y in items]
    bad = tmp_path / "CT_cell_pouch_9_x_1.jpg"
    bad.write_bytes(b"\xff\xd8 not really a jpeg")
    lines.append({"missing image": f"{tmp_path / 'gone.jpg'}\t0", "unreadable image": f"{bad}\t0",
                  "label out of range": f"{items[0][0]}\t9", "no tab": f"{items[0][0]} 0"}[case])
    split = tmp_path / "test.txt"
    split.write_text("\n".join(lines) + "\n")
    sentinel = _sentinel(tmp_path / "out")
    msg = cli_error(infer_main, "--weights", best_of("late_fusion"), "--split", split, "--out", tmp_path / "out",
                    "--overwrite", "--workers", 2 if case == "unreadable image" else 0, capsys=capsys)
    want = {"missing image": f"error: {split}, line 4: image not found: {tmp_path / 'gone.jpg'}",
            "unreadable image": f"error: {bad}: unreadable or corrupt image",
            "label out of range": f"error: {split}, line 4: label 9 out of range 0..4",
            "no tab": f"error: {split}, line 4: expected 'path<TAB>label', found no tab"}[case]
    assert msg.startswith(want), msg
    assert sentinel.read_text() == "written earlier\n"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["predictions.csv"]


def test_checkpoint_of_another_model(tmp_path, capsys):
    weights = best_of("late_fusion")
    sentinel = _sentinel(tmp_path / "out")
    msg = cli_error(infer_main, "--weights", weights, "--model", "resnet18", "--out", tmp_path / "out",
                    "--overwrite", capsys=capsys)
    assert msg == f"error: {weights}: checkpoint holds a late_fusion model, not --model resnet18"
    plain = tmp_path / "plain.pth"
    torch.save(load_checkpoint(weights)["model"], plain)
    msg = cli_error(infer_main, "--weights", plain, "--model", "resnet18", "--out", tmp_path / "out",
                    "--overwrite", capsys=capsys)
    assert msg.startswith(f"error: {plain}: weights do not fit TorchvisionClassifier")
    msg = cli_error(infer_main, "--weights", best_of("resnet18"), "--task", "segment", "--out", tmp_path / "out",
                    "--overwrite", capsys=capsys)
    assert msg.startswith(f"error: {best_of('resnet18')}: --task segment needs deeplab_seg weights")
    assert sentinel.read_text() == "written earlier\n"


def test_checkpoint_of_another_model_as_a_process(tmp_path):
    weights = best_of("hdcnn")
    sentinel = _sentinel(tmp_path / "out")
    res = script("battery_ct/infer.py", "--weights", weights, "--model", "late_fusion", "--out", tmp_path / "out",
                 "--overwrite", check=False)
    lines = res.stderr.strip().splitlines()
    assert res.returncode != 0
    assert lines == [f"error: {weights}: checkpoint holds a hdcnn model, not --model late_fusion"]
    assert sentinel.read_text() == "written earlier\n"
