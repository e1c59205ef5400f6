"""battery_ct/train.py: losses, optimiser recipes, and short real training runs on the built-in data.

The runs are cached per session (`trained(name)`) and shared with tests/test_battery_infer.py.
They run in this process with one thread (on a shared 2-core machine a second OpenMP thread
mostly waits) except the autoencoder run and the bad-input cases marked as subprocess ones,
which run the script exactly as a user does.
"""
from __future__ import annotations

import atexit
import csv
import functools
import math
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
import torch.nn as nn
import torch.nn.functional as F

from battery_ct.data import BUILTIN_VERSION, SplitDataset, make_builtin_dataset, read_split
from battery_ct.model import DEFECT_CLASSES, FocalLoss, build_model, load_converted
from battery_ct.train import (ae_loss, ae_terms, main as train_main, make_optimizer, make_scheduler, normalization,
                              param_groups, threshold_from_scores, to_unit)
from helpers import call, cli_error  # noqa: F401  (test_battery_infer imports them from here)
from common.checkpoint import load_checkpoint
from common.data import builtin_dir, ensure_builtin
from common.io import load_untrusted
from common.metrics import roc_auc, ssim, youden_threshold

REPO = Path(__file__).resolve().parents[1]
WORK = Path(tempfile.mkdtemp(prefix="battery-train-tests-"))
atexit.register(shutil.rmtree, WORK, True)
FAST = ["--image-size", 32, "--batch-size", 16, "--workers", 0, "--no-progress"]


def script(path, *argv, check=True) -> subprocess.CompletedProcess:
    res = subprocess.run([sys.executable, str(REPO / path), *map(str, argv)], capture_output=True, text=True,
                         timeout=600, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if check and res.returncode != 0:
        raise AssertionError(f"{path} {argv} failed ({res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    return res


def builtin_split(name: str) -> Path:
    """A split of the built-in data, generated first if no earlier test has (any test may run alone)."""
    return ensure_builtin("battery_ct", BUILTIN_VERSION, make_builtin_dataset) / f"{name}.txt"


# ---------------------------------------------------------------- cached runs
@functools.lru_cache(maxsize=None)
def deeplab_files() -> tuple[Path, Path]:
    """(random deeplab_seg state_dict, the same converted with scripts/convert_deeplab.py --task classify)."""
    seg, cls = WORK / "deeplab_seg_random.pt", WORK / "deeplab_classify_converted.pth"
    torch.manual_seed(3)
    torch.save(build_model("deeplab_seg").state_dict(), seg)
    script("scripts/convert_deeplab.py", seg, cls, "--task", "classify")
    return seg, cls


RUNS = {
    # two stages; --save-every 1 keeps epoch_0001.pt of each stage for the resume tests
    "resnet18": ["--epochs", 2, "--freeze-backbone", "--finetune-epochs", 2, "--finetune-lr", 1e-4,
                 "--save-every", 1],
    # a fast version of the built-in demo (which learns at 128 px): it must clearly beat the majority class
    "late_fusion": ["--epochs", 4, "--lr", 1e-3, "--loss", "ce", "--balanced-sampler"],
    "hdcnn": ["--epochs", 1, "--recipe", "deeplab", "--lr", 1e-3],
    "deeplabv3": ["--epochs", 1, "--batch-size", 1, "--freeze-backbone"],
}


@functools.lru_cache(maxsize=None)
def trained(name: str) -> tuple[Path, str]:
    """(run folder, stdout) of a short training run on the built-in data."""
    out = WORK / name
    extra = []
    if name == "deeplabv3":  # bs 1 through DRN-D-54: train on a 30-image subset of the built-in split
        subset = WORK / "train_subset.txt"
        subset.write_text("".join(line + "\n" for line in builtin_split("train").read_text().splitlines()[:30]))
        extra = ["--init", deeplab_files()[1], "--train-split", subset, "--val-split", builtin_split("val"),
                 "--root", builtin_dir("battery_ct")]
    _, stdout = call(train_main, "--model", name, *FAST, *RUNS[name], *extra, "--out", out)
    return out, stdout


@functools.lru_cache(maxsize=None)
def trained_ae() -> tuple[Path, str]:
    """The autoencoder, trained in-process like the others (the script as a process: the worker-error test)."""
    out = WORK / "ae"
    _, stdout = call(train_main, "--model", "ae", *FAST, "--epochs", 1, "--out", out)
    return out, stdout


# ---------------------------------------------------------------- focal loss
def test_focal_loss_without_focusing_is_cross_entropy():
    g = torch.Generator().manual_seed(0)
    logits, y = torch.randn(7, 5, generator=g) * 3, torch.randint(0, 5, (7,), generator=g)
    torch.testing.assert_close(FocalLoss(gamma=0.0)(logits, y), F.cross_entropy(logits, y))
    w = torch.tensor([1.5, 1.2, 0.8, 1.0, 8.0])
    # alpha weights every sample's term; the mean is over the batch (not F.cross_entropy's weighted mean)
    torch.testing.assert_close(FocalLoss(alpha=w, gamma=0.0)(logits, y),
                               (w[y] * F.cross_entropy(logits, y, reduction="none")).mean())


def test_focal_loss_hand_computed():
    """Two samples, 3 classes, gamma 2, eps 0.1, alpha (2, 1, 0.5), computed by hand."""
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 3.0]])
    y = torch.tensor([0, 1])
    alpha, eps, gamma = [2.0, 1.0, 0.5], 0.1, 2.0
    expected = []
    for row, label in zip(logits.tolist(), y.tolist()):
        z = sum(math.exp(v) for v in row)
        p = [math.exp(v) / z for v in row]
        t = [(1 - eps) * (c == label) + eps / 3 for c in range(3)]
        p_t = sum(pi * ti for pi, ti in zip(p, t))
        ce = -sum(ti * math.log(pi) for pi, ti in zip(p, t))
        expected.append(alpha[label] * (1 - p_t) ** gamma * ce)
    got = FocalLoss(alpha=alpha, gamma=gamma, label_smoothing=eps)(logits, y)
    assert got.item() == pytest.approx(sum(expected) / 2, rel=1e-6)
    assert expected[0] != pytest.approx(expected[1])  # both samples matter


def test_focal_loss_is_finite_for_confident_logits():
    logits = torch.tensor([[60.0, -60.0, 0.0, 0.0, 0.0]], requires_grad=True)
    loss = FocalLoss(gamma=2.0, label_smoothing=0.1)(logits, torch.tensor([0]))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()


# ---------------------------------------------------------------- autoencoder loss
def test_ae_loss_fix_inputs_are_in_the_tanh_range(tmp_path):
    """FIX of the original AE bug: it compared the Tanh output (in [-1, 1]) with ImageNet-normalised
    inputs (up to ~2.64), which no reconstruction can reach. Here the AE's inputs use the 'tanh'
    normalisation, so a perfect reconstruction has loss 0, and SSIM sees both mapped to [0, 1]."""
    assert normalization("ae") == "tanh" and normalization("resnet18") == "imagenet"
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    assert ae_loss(x, x.clone()).item() == pytest.approx(0.0, abs=1e-6)
    recon = (x + 0.2 * torch.randn(x.shape, generator=g)).clamp(-1, 1)
    mse, s = ae_terms(x, recon)
    torch.testing.assert_close(mse, (x - recon).pow(2).flatten(1).mean(1))
    torch.testing.assert_close(s, ssim((recon + 1) / 2, (x + 1) / 2, data_range=1.0, size_average=False))
    torch.testing.assert_close(ae_loss(x, recon), 0.7 * mse.mean() + 0.3 * (1 - s.mean()))
    torch.testing.assert_close(to_unit(torch.tensor([-1.0, 0.0, 1.0])), torch.tensor([0.0, 0.5, 1.0]))
    # a white image: 'tanh' input is exactly +1, which Tanh reaches; ImageNet-normalised it is ~2.25-2.64,
    # so even the best Tanh output (clamped to 1) leaves a large loss: the old pairing could not learn
    white = tmp_path / "CT_cell_pouch_1_x_1.png"
    Image.fromarray(np.full((32, 32, 3), 255, np.uint8)).save(white)
    tanh_in = SplitDataset([(white, 0)], 32, normalize="tanh")[0][0][None]
    imnet_in = SplitDataset([(white, 0)], 32, normalize="imagenet")[0][0][None]
    assert ae_loss(tanh_in, torch.tanh(torch.full_like(tanh_in, 20.0))).item() == pytest.approx(0.0, abs=1e-6)
    assert ae_loss(imnet_in, imnet_in.clamp(-1, 1)).item() > 1.0


def test_threshold_from_scores_is_youden_and_falls_back_without_defects():
    scores = torch.tensor([0.1, 0.2, 0.5, 0.3, 0.8, 0.9, 0.95])  # J: 0.75 at 0.8, 0.67 at 0.3
    is_def = torch.tensor([False, False, False, True, True, True, True])
    info = threshold_from_scores(scores, is_def)
    assert info["threshold"] == pytest.approx(0.8) and info["threshold_method"] == "youden_j_val"
    assert info["roc_auc"] == pytest.approx(roc_auc(is_def, scores))
    only_normal = threshold_from_scores(scores[:3], is_def[:3])
    assert only_normal["roc_auc"] is None
    assert only_normal["threshold"] == pytest.approx(float(scores[:3].mean() + 2.5 * scores[:3].std()))


# ---------------------------------------------------------------- recipes
def _ns(**kw):
    from argparse import Namespace
    return Namespace(**{"weight_decay": 5e-4, **kw})


@pytest.mark.parametrize("freeze", [False, True])
def test_deeplab_recipe_gives_head_aspp_ten_times_the_lr(freeze):
    model = build_model("deeplabv3", freeze_backbone=freeze)
    groups = param_groups(model, 0.01, 10.0)
    opt = make_optimizer(model, _ns(recipe="deeplab"), 0.01)
    assert isinstance(opt, torch.optim.SGD) and opt.defaults["momentum"] == 0.9
    head = {id(p) for m in (model.aspp, model.classifier) for p in m.parameters() if p.requires_grad}
    if freeze:  # only the classifier trains, at 10x
        assert len(groups) == 1 and groups[0]["lr"] == pytest.approx(0.1)
        assert {id(p) for p in groups[0]["params"]} == {id(p) for p in model.classifier.parameters()}
    else:
        assert [g["lr"] for g in opt.param_groups] == pytest.approx([0.01, 0.1])
        assert {id(p) for p in opt.param_groups[0]["params"]} == {id(p) for p in model.backbone.parameters()}
        assert {id(p) for p in opt.param_groups[1]["params"]} == head
    sched, interval = make_scheduler(opt, _ns(recipe="deeplab"), epochs=2, steps_per_epoch=5)
    assert interval == "step"
    base = [g["lr"] for g in opt.param_groups]
    for step in range(1, 8):
        opt.step()
        sched.step()
        factor = (1 - step / 10) ** 0.9
        assert [g["lr"] for g in opt.param_groups] == pytest.approx([b * factor for b in base])


def test_adamw_recipe_and_schedule():
    model = build_model("resnet18")
    opt = make_optimizer(model, _ns(recipe="adamw", weight_decay=0.03), 1e-4)
    assert isinstance(opt, torch.optim.AdamW) and len(opt.param_groups) == 1
    assert opt.param_groups[0]["weight_decay"] == 0.03
    sched, interval = make_scheduler(opt, _ns(recipe="adamw"), epochs=50, steps_per_epoch=3)
    assert interval == "epoch" and isinstance(sched, torch.optim.lr_scheduler.CosineAnnealingWarmRestarts)
    assert (sched.T_0, sched.T_mult, sched.eta_min) == (10, 2, 1e-6)


# ---------------------------------------------------------------- real runs
def _log(out: Path) -> list[dict]:
    with open(out / "log.csv") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("name", list(RUNS))
def test_training_run_writes_checkpoints_with_the_config_infer_needs(name):
    out, stdout = trained(name)
    final = out / "finetune" if name == "resnet18" else out
    for folder in {out, final}:
        assert (folder / "best.pt").is_file() and (folder / "last.pt").is_file() and (folder / "log.csv").is_file()
        rows = _log(folder)
        assert rows and all(0.0 <= float(r["val_f1_macro"]) <= 1.0 for r in rows)
    ckpt = load_checkpoint(final / "best.pt")
    cfg = ckpt["config"]
    assert (cfg["task"], cfg["model"], cfg["num_classes"], cfg["image_size"], cfg["normalize"]) == \
        ("battery_ct", name, 5, 32, "imagenet")
    assert cfg["builtin_data"] is (name != "deeplabv3") and cfg["clip_grad"] == 1.0
    assert ckpt["extra"]["trainer"]["monitor"] == "val_f1_macro" and ckpt["extra"]["trainer"]["mode"] == "max"
    assert f"run folder: {out}" in stdout and f"--weights {final / 'best.pt'}" in stdout


def test_two_stage_resnet18():
    out, stdout = trained("resnet18")
    assert "2,565 trainable parameters" in stdout and "11,179,077 trainable parameters" in stdout
    s1_first, s1_last = load_checkpoint(out / "epoch_0001.pt"), load_checkpoint(out / "last.pt")
    s2 = load_checkpoint(out / "finetune" / "last.pt")
    assert s1_last["config"]["stage"] == 1 and s1_last["config"]["stage_frozen"] is True
    assert s2["config"]["stage"] == 2 and s2["config"]["stage_frozen"] is False
    assert s2["config"]["stage_lr"] == 1e-4 and s2["config"]["stage_epochs"] == 2
    trunk = [k for k in s1_last["model"] if k.startswith("model.layer")]
    # stage 1: trunk (weights and BN statistics) frozen, head trained; stage 2: all trained
    assert all(torch.equal(s1_first["model"][k], s1_last["model"][k]) for k in trunk)
    assert not torch.equal(s1_first["model"]["model.fc.1.weight"], s1_last["model"]["model.fc.1.weight"])
    start = load_checkpoint(out / "best.pt")["model"]
    assert not torch.equal(start["model.layer1.0.conv1.weight"], s2["model"]["model.layer1.0.conv1.weight"])
    assert f"stage 2 starts from {out / 'best.pt'}" in stdout


def _same_weights(a: Path, b: Path):
    sa, sb = load_checkpoint(a)["model"], load_checkpoint(b)["model"]
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_resume_in_stage_1_continues_then_runs_stage_2_bit_identically(tmp_path):
    ref, _ = trained("resnet18")
    cut = tmp_path / "cut"
    cut.mkdir()
    for f in ("last.pt", "best.pt"):  # as if killed after epoch 1 of stage 1
        shutil.copy(ref / "epoch_0001.pt", cut / f)
    _, stdout = call(train_main, "--model", "resnet18", *FAST, *RUNS["resnet18"], "--resume", cut / "last.pt")
    assert "resumed from" in stdout and "stage 2 starts from" in stdout
    _same_weights(ref / "last.pt", cut / "last.pt")
    _same_weights(ref / "finetune" / "last.pt", cut / "finetune" / "last.pt")


def test_resume_in_stage_2_continues_stage_2_bit_identically(tmp_path):
    ref, _ = trained("resnet18")
    cut = tmp_path / "cut"
    (cut / "finetune").mkdir(parents=True)
    for f in ("last.pt", "best.pt"):
        shutil.copy(ref / f, cut / f)
    shutil.copy(ref / "finetune" / "epoch_0001.pt", cut / "finetune" / "last.pt")
    stage1 = (cut / "last.pt").read_bytes()
    _, stdout = call(train_main, "--model", "resnet18", *FAST, *RUNS["resnet18"],
                     "--resume", cut / "finetune" / "last.pt")
    assert "stage 1 in" in stdout and "is complete (resuming stage 2)" in stdout
    assert (cut / "last.pt").read_bytes() == stage1  # stage 1 untouched
    _same_weights(ref / "finetune" / "last.pt", cut / "finetune" / "last.pt")
    assert load_checkpoint(cut / "finetune" / "last.pt")["epoch"] == 2


def test_deeplabv3_frozen_from_converted_weights():
    out, stdout = trained("deeplabv3")
    assert "378 tensors loaded" in stdout and "1,285 trainable parameters" in stdout
    best = load_checkpoint(out / "best.pt")["model"]
    converted = load_untrusted(deeplab_files()[1])
    assert set(best) - set(converted) == {"classifier.weight", "classifier.bias"}
    for k, v in converted.items():  # backbone + ASPP (and their BN statistics) stay as converted
        assert torch.equal(best[k], v), k
    model = build_model("deeplabv3")
    assert load_converted(model, deeplab_files()[1])["kept_init"] == ["classifier.weight", "classifier.bias"]


def test_hdcnn_with_the_deeplab_recipe():
    out, _ = trained("hdcnn")
    ckpt = load_checkpoint(out / "last.pt")
    groups = ckpt["optimizer"]["param_groups"]
    assert [g["initial_lr"] for g in groups] == pytest.approx([1e-3, 1e-2])  # trunk 1x, branches + heads 10x
    assert [g["lr"] for g in groups] == pytest.approx([0.0, 0.0])  # poly stepped per step to the end
    assert groups[0]["momentum"] == 0.9 and groups[0]["weight_decay"] == 5e-4
    assert ckpt["config"]["loss"] == "hdcnn" and ckpt["config"]["recipe"] == "deeplab"
    assert {"val_acc", "val_f1_macro", "val_auc"} <= set(_log(out)[0])


def test_late_fusion_with_ce_and_balanced_sampler():
    out, stdout = trained("late_fusion")
    cfg = load_checkpoint(out / "best.pt")["config"]
    assert cfg["loss"] == "ce" and cfg["balanced_sampler"] is True
    assert cfg["rotation"] == 0.0                    # the built-in demo default (the original: 90)
    assert cfg["class_weights"] == "none"          # balanced built-in classes: not the original's 8x resin weight


def test_builtin_demo_learns_beyond_the_majority_baseline():
    """The summary's numbers, recomputed: best.pt on the built-in val and test splits against always
    answering the training set's majority class (0.2 on these balanced classes)."""
    out, stdout = trained("late_fusion")
    assert "against always answering the training set's majority class (cell_normal)" in stdout
    lines = {ln.split()[0]: ln.split() for ln in stdout.splitlines() if ln.startswith(("  val ", "  test "))}
    for split in ("val", "test"):
        _, n, acc, f1, base_acc, base_f1 = lines[split]
        assert float(base_acc) == pytest.approx(0.2) and float(base_f1) == pytest.approx(1 / 15, abs=1e-3)
        assert float(acc) >= 0.4 and float(f1) > 3 * float(base_f1), lines[split]
    # the printed val accuracy is best.pt's, recomputed here
    ckpt = load_checkpoint(out / "best.pt")
    model = build_model("late_fusion")
    model.load_state_dict(ckpt["model"])
    model.eval()
    ds = SplitDataset(read_split(builtin_split("val")), 32, with_meta=True)
    x, meta, y = (torch.stack([ds[i][k] for i in range(len(ds))]) if k < 2 else torch.tensor([ds[i][2] for i in range(len(ds))])
                  for k in range(3))
    with torch.no_grad():
        acc = float((model(x, meta).argmax(1) == y).float().mean())
    assert float(lines["val"][2]) == pytest.approx(acc, abs=1e-3)


def test_late_fusion_logits_start_near_uniform():
    """FIX: the original's Kaiming fan_out init on the output layer (fan_out = 5 classes) started the
    logits at a std of ~5 and the loss at ~7 instead of log(5) = 1.6."""
    torch.manual_seed(0)
    model = build_model("late_fusion").train()
    g = torch.Generator().manual_seed(0)
    x, meta = torch.randn(32, 3, 32, 32, generator=g), torch.randint(0, 2, (32, 2), generator=g).float()
    y = torch.randint(0, 5, (32,), generator=g)
    with torch.no_grad():
        logits = model(x, meta)
    assert float(logits.std()) < 1.5
    assert 1.3 < float(F.cross_entropy(logits, y)) < 2.2


def test_autoencoder_trains_on_normal_images_and_stores_the_val_youden_threshold():
    out, stdout = trained_ae()
    assert "data: 60 train / 12 val images (normal only)" in stdout
    ckpt = load_checkpoint(out / "best.pt")
    extra, cfg = ckpt["extra"], ckpt["config"]
    assert cfg["normalize"] == "tanh" and cfg["model"] == "ae"
    assert ckpt["extra"]["trainer"]["monitor"] == "val_loss"
    thr = extra["threshold"]
    assert isinstance(thr, float) and math.isfinite(thr)  # FIX: the original stored NaN here
    # recompute the val scores independently: per-image MSE of best.pt's reconstruction, whole val split
    model = build_model("ae")
    model.load_state_dict(ckpt["model"])
    model.eval()
    items = read_split(builtin_split("val"))
    ds = SplitDataset(items, 32, normalize="tanh")
    with torch.no_grad():
        x = torch.stack([ds[i][0] for i in range(len(ds))])
        scores = (model(x)[0] - x).pow(2).mean((1, 2, 3))
    is_def = torch.tensor([y in DEFECT_CLASSES for _, y in items])
    assert is_def.any() and (~is_def).any()
    want, _ = youden_threshold(is_def, scores)
    assert thr == pytest.approx(want, rel=1e-5)
    assert extra["val_roc_auc"] == pytest.approx(roc_auc(is_def, scores), abs=1e-9)
    import json
    assert json.loads((out / "threshold.json").read_text())["threshold"] == thr
    assert "anomaly threshold" in stdout and str(out / "best.pt") in stdout


# ---------------------------------------------------------------- bad input
def _split(tmp_path: Path, lines: list[str]) -> Path:
    p = tmp_path / "bad.txt"
    p.write_text("\n".join(lines) + "\n")
    return p


def _good_lines(n=3) -> list[str]:
    return [f"{p}\t{y}" for p, y in read_split(builtin_split("train"))[:n]]


@pytest.mark.parametrize("case, bad_line, expect", [
    ("missing image", "/nonexistent/CT_cell_pouch_1_x_1.jpg\t0", "line 4: image not found"),
    ("label out of range", "{img}\t5", "line 4: label 5 out of range 0..4"),
    ("no tab", "{img} 1", "line 4: expected 'path<TAB>label', found no tab"),
])
def test_train_bad_split_line_is_one_error_naming_file_and_line(tmp_path, capsys, case, bad_line, expect):
    img = read_split(builtin_split("train"))[0][0]
    split = _split(tmp_path, _good_lines() + [bad_line.format(img=img)])
    out = tmp_path / "run"
    msg = cli_error(train_main, "--model", "resnet18", *FAST, "--train-split", split,
                    "--val-split", builtin_split("val"), "--out", out, capsys=capsys)
    assert msg.startswith(f"error: {split}, ") and expect in msg
    assert not out.exists()


def test_train_unreadable_image_is_one_error_line_from_a_worker(tmp_path):
    """Subprocess with DataLoader workers: the worker's UserError comes back as one line."""
    bad = tmp_path / "CT_cell_pouch_9_x_1.jpg"
    bad.write_bytes(b"this is not a jpeg")
    split = _split(tmp_path, _good_lines(20) + [f"{bad}\t0"])
    out = tmp_path / "run"
    res = script("battery_ct/train.py", "--model", "resnet18", "--image-size", 32, "--batch-size", 4,
                 "--workers", 2, "--no-progress", "--epochs", 1, "--train-split", split,
                 "--val-split", split, "--out", out, check=False)
    lines = res.stderr.strip().splitlines()
    assert res.returncode != 0 and len(lines) == 1, res.stderr
    assert lines[0].startswith(f"error: {bad}: unreadable or corrupt image")
    assert not (out / "last.pt").exists() and not (out / "best.pt").exists()


def test_train_resume_from_another_models_checkpoint(tmp_path, capsys):
    ref, _ = trained("late_fusion")
    before = (ref / "last.pt").read_bytes()
    msg = cli_error(train_main, "--model", "resnet18", *FAST, "--resume", ref / "last.pt", capsys=capsys)
    assert msg.startswith(f"error: {ref / 'last.pt'}: a resume continues the run exactly, but "
                          f"--model resnet18 (the checkpoint has late_fusion)")
    assert (ref / "last.pt").read_bytes() == before
    plain = tmp_path / "plain.pt"
    torch.save(load_checkpoint(ref / "best.pt")["model"], plain)
    msg = cli_error(train_main, "--model", "resnet18", *FAST, "--init", plain, "--out", tmp_path / "r", capsys=capsys)
    assert msg.startswith(f"error: {plain}: weights do not fit")
    assert not (tmp_path / "r" / "last.pt").exists()


@pytest.mark.parametrize("argv, expect", [
    (["--model", "ae", "--freeze-backbone"], "--freeze-backbone does not apply to --model ae"),
    (["--model", "hdcnn", "--loss", "focal"], "--loss does not apply to --model hdcnn"),
    (["--model", "resnet18", "--class-weights", "1,2"], "--class-weights '1,2': expected 5 positive numbers"),
    (["--model", "ae", "--image-size", 40], "the autoencoder needs a multiple of 16"),
    (["--model", "resnet18", "--train-split", "x.txt"], "give both --train-split and --val-split"),
])
def test_train_rejects_bad_options(tmp_path, capsys, argv, expect):
    msg = cli_error(train_main, *argv, "--out", tmp_path / "run", capsys=capsys)
    assert expect in msg
    assert not (tmp_path / "run").exists()


def test_recalibrate_batchnorm_sets_the_statistics_of_the_given_batches():
    """FIX (demo answered one class in eval mode): the moving BatchNorm statistics are re-estimated on
    training batches, dropout off as at inference; frozen BatchNorms and the modes are kept."""
    from battery_ct.train import recalibrate_batchnorm
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.Dropout(0.5), nn.BatchNorm1d(6), nn.BatchNorm1d(6)).train()
    frozen = net[3]
    for p in frozen.parameters():
        p.requires_grad_(False)
    before = frozen.running_mean.clone()
    g = torch.Generator().manual_seed(1)
    batches = [(3 + 2 * torch.randn(8, 4, generator=g),) for _ in range(3)] + [(torch.randn(1, 4),)]
    seen = recalibrate_batchnorm(net, batches, lambda m, b: m(b[0]))
    assert seen == 24                                           # the batch of one is skipped
    with torch.no_grad():
        h = [net[0](b[0]) for b in batches[:3]]                 # no dropout: the inputs seen at inference
    torch.testing.assert_close(net[2].running_mean, torch.stack([t.mean(0) for t in h]).mean(0))
    torch.testing.assert_close(net[2].running_var, torch.stack([t.var(0) for t in h]).mean(0))
    assert torch.equal(frozen.running_mean, before) and net[2].momentum == 0.1
    assert net.training and net[1].training and net[2].training
