"""Explain and review: masks in the built-in data, maps, localisation metrics, the review page."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from common.explain import Localisation, dilate, pixel_auc


def test_builtin_crbl_masks_mark_the_defect_pixels(tmp_path):
    from crbl.data import make_builtin_dataset
    make_builtin_dataset(tmp_path, n_train=6, n_val=2)
    images = sorted((tmp_path / "images").glob("*.png"))
    masks = {p.name for p in (tmp_path / "masks").glob("*.png")}
    assert masks == {p.name for p in images if "defect" in p.name}
    for name in masks:
        m = np.asarray(Image.open(tmp_path / "masks" / name))
        g = np.asarray(Image.open(tmp_path / "images" / name).convert("L"))
        assert m.shape == g.shape and set(np.unique(m)) == {0, 255}
        # defects are dark inclusions (10-35) or bright scratches (200-240) on a part of 95-140
        assert ((g[m > 0] < 45) | (g[m > 0] > 190)).all()


def test_builtin_battery_masks_only_for_defect_classes(tmp_path):
    from battery_ct.data import make_builtin_dataset
    from battery_ct.model import DEFECT_CLASSES
    make_builtin_dataset(tmp_path, batteries_per_class=1, slices_per_axis=1, size=64)
    images = sorted((tmp_path / "images").glob("*.jpg"))
    assert len(images) == 15
    for path in images:
        label = int(path.stem.split("_")[3][0])      # battery number = label then battery index
        mask = tmp_path / "masks" / f"{path.stem}.png"
        assert mask.is_file() == (label in DEFECT_CLASSES), path.name
        if mask.is_file():
            m = np.asarray(Image.open(mask))
            assert m.shape == (64, 64) and (m > 0).sum() > 5


# ---------------------------------------------------------------- localisation metrics, by hand
def test_pointing_game_and_pixel_auc_against_hand_computed_values():
    mask = np.zeros((30, 30), bool)
    mask[10:13, 10:13] = True                          # a 3x3 defect
    heat = np.zeros((30, 30), np.float32)
    heat[12, 17] = 1.0                                 # 4 px right of the mask's edge (12,12): inside the 5 px disk
    loc = Localisation()
    loc.add(heat, mask)
    heat2 = np.zeros((30, 30), np.float32)
    heat2[12, 18] = 1.0                                # 6 px away: a miss
    loc.add(heat2, mask)
    loc.add(heat, np.zeros((30, 30), bool))           # no defect: not counted
    s = loc.summary()
    assert s["images_with_defect_masks"] == 2
    assert s["pointing_game"] == 0.5
    # the 3x3 square grown by a radius-5 disk: count it independently, row by row
    grown = sum(1 for y in range(30) for x in range(30)
                if min((y - yy) ** 2 + (x - xx) ** 2 for yy in range(10, 13) for xx in range(10, 13)) <= 25)
    assert dilate(mask).sum() == grown and s["random_map"]["pointing_game"] == pytest.approx(grown / 900)
    # pixel AUC: 9 defect pixels all 0, one normal pixel 1, 890 normal pixels 0 ->
    # P(defect > normal) + 0.5 P(tie) = (0 + 0.5 * 890/891)
    assert pixel_auc(heat, mask) == pytest.approx(0.5 * 890 / 891)
    ramp = np.zeros((30, 30), np.float32)
    ramp[mask] = 2.0
    ramp[0, 0] = 3.0                                   # one normal pixel above every defect pixel
    assert pixel_auc(ramp, mask) == pytest.approx(890 / 891)
    assert s["pixel_roc_auc"] == pytest.approx(0.5 * 890 / 891)


def test_a_flat_map_scores_as_chance_in_the_pointing_game():
    mask = np.zeros((20, 20), bool)
    mask[0:2, 0:2] = True
    loc = Localisation()
    loc.add(np.ones((20, 20), np.float32), mask)
    assert loc.summary()["pointing_game"] == pytest.approx(dilate(mask).mean())


# ---------------------------------------------------------------- maps through crbl's preprocessing
class DarkSpots(torch.nn.Module):
    """A known model: its only feature map is 'how dark is this pixel', its logit the feature sum,
    so every CAM method must peak where the image is darkest."""

    def __init__(self):
        super().__init__()
        conv = torch.nn.Conv2d(3, 2, 3, padding=1)
        with torch.no_grad():
            conv.weight.zero_()
            conv.weight[:, :, 1, 1] = -1.0 / 3
            conv.bias.fill_(0.6)
        # 4x4 pooling: a 32x32 feature map, like a real network's coarse last layer
        self.feat = torch.nn.Sequential(conv, torch.nn.ReLU(), torch.nn.AvgPool2d(4))

    def forward(self, x):
        return self.feat(x).pow(2).sum((1, 2, 3))[:, None]


@pytest.mark.parametrize("method", ["gradcam", "gradcam++", "eigencam"])
def test_crbl_map_peaks_at_a_defect_pasted_at_a_known_place_and_is_zero_outside_the_crop(method):
    from common.explain import make_cam
    from crbl.data import _part_image, crop_box
    from crbl.explain import image_map
    rgb = _part_image(np.random.default_rng(3), False).copy()
    y0, y1, x0, x1 = crop_box(rgb)
    cy, cx = y0 + (y1 - y0) * 2 // 3, x0 + (x1 - x0) // 4       # off-centre, inside the part
    rgb[cy - 3:cy + 4, cx - 3:cx + 4] = 5                        # a dark inclusion, 7x7
    model = DarkSpots()
    heat, = image_map(make_cam(model, [model.feat], method), "crop", [rgb], torch.device("cpu"))
    assert heat.shape == rgb.shape[:2] and heat.dtype == np.float32 and np.isfinite(heat).all()
    py, px = np.unravel_index(np.argmax(heat), heat.shape)
    assert abs(py - cy) <= 4 and abs(px - cx) <= 4, (py, px, cy, cx)
    outside = np.ones_like(heat, bool)
    outside[y0:y1, x0:x1] = False
    assert heat[outside].max() == 0 and heat.max() > 0.5
    full, = image_map(make_cam(model, [model.feat], method), "full", [rgb], torch.device("cpu"))
    fy, fx = np.unravel_index(np.argmax(full), full.shape)
    assert abs(fy - cy) <= 4 and abs(fx - cx) <= 4, (fy, fx, cy, cx)
    assert full[:4].max() == 0 and full[:, :4].max() == 0        # the full model never saw them


# ---------------------------------------------------------------- crbl/infer.py --explain --masks --report
@pytest.fixture(scope="module")
def crbl_review(tmp_path_factory):
    """crbl/infer.py --explain --masks --report on 3 generated parts (2 defective) with an untrained
    crop model, in process."""
    from common.io import save_image
    from crbl.data import _part_image
    from crbl.infer import main
    from crbl.model import build_model
    root = tmp_path_factory.mktemp("crbl_review")
    (root / "images").mkdir()
    (root / "masks").mkdir()
    rng = np.random.default_rng(7)
    lines = ["image_path,impurity"]
    for i, label in enumerate((1, 0, 1)):
        img, mask = _part_image(rng, bool(label), with_mask=True)
        save_image(root / "images" / f"p{i}.png", img)
        if label:
            save_image(root / "masks" / f"p{i}.png", mask.astype(np.uint8) * 255)
        lines.append(f"images/p{i}.png,{label}")
    (root / "labels.csv").write_text("\n".join(lines) + "\n")
    torch.manual_seed(0)
    torch.save(build_model("crop").state_dict(), root / "crop.pth")
    argv = ["--model-type", "crop", "--weights", str(root / "crop.pth"), str(root / "labels.csv"),
            "--out", str(root / "out" / "preds.csv"), "--explain", "--masks", str(root / "masks"), "--report"]
    main(argv)
    return root, argv


def test_crbl_explain_writes_maps_of_the_image_size_metrics_and_a_report(crbl_review):
    import json
    from crbl.data import crop_box
    root, _ = crbl_review
    out = root / "out"
    for i in range(3):
        rgb = np.asarray(Image.open(root / "images" / f"p{i}.png").convert("RGB"))
        heat = np.load(out / "explain" / f"p{i}.npy")
        assert heat.dtype == np.float32 and heat.shape == rgb.shape[:2] and np.isfinite(heat).all()
        y0, y1, x0, x1 = crop_box(rgb)
        inside = np.zeros(heat.shape, bool)
        inside[y0:y1, x0:x1] = True
        assert heat[~inside].max() == 0 and heat[inside].max() > 0       # the crop model saw only the box
        picture = Image.open(out / "explain" / f"p{i}.png")
        assert picture.height >= 256 and picture.width > 2 * picture.height  # image, overlay, colour bar
    m = json.loads((out / "metrics.json").read_text())["localisation"]
    # recompute from the written maps and masks
    loc = Localisation()
    for i in (0, 2):
        loc.add(np.load(out / "explain" / f"p{i}.npy"), np.asarray(Image.open(root / "masks" / f"p{i}.png")) > 0)
    assert m["images_with_defect_masks"] == 2 and m["pointing_game"] == loc.summary()["pointing_game"]
    assert m["pixel_roc_auc"] == pytest.approx(loc.summary()["pixel_roc_auc"])
    assert 0 < m["random_map"]["pointing_game"] < 0.5 and m["random_map"]["pixel_roc_auc"] == 0.5
    page = (out / "report.html").read_text()
    assert page.count('<tr class="') == 3 and "the default for a crop model (the original&#x27;s)" in page
    for f in ("roc.png", "confusion.png", "p0.jpg"):
        assert (out / "report_files" / f).stat().st_size > 500


def run_cli_main(main, argv, capsys):
    from common.io import run_cli
    with pytest.raises(SystemExit) as e:
        run_cli(lambda: main(argv))
    assert e.value.code != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_crbl_bad_explain_input_is_one_clear_line(crbl_review, capsys, tmp_path):
    from crbl.infer import main
    root, argv = crbl_review
    before = (root / "out" / "report.html").read_bytes()
    other = argv[:5] + ["--out", str(root / "out" / "other.csv"), "--report"]
    assert "report.html already exists" in run_cli_main(main, other, capsys)
    assert (root / "out" / "report.html").read_bytes() == before
    missing = tmp_path / "masks"
    missing.mkdir()
    Image.fromarray(np.zeros((120, 120), np.uint8)).save(missing / "p0.png")
    bad = argv[:argv.index("--masks") + 1] + [str(missing)] + argv[argv.index("--masks") + 2:-1]
    bad[bad.index("--out") + 1] = str(tmp_path / "o" / "p.csv")
    line = run_cli_main(main, bad, capsys)
    assert "no mask for 1 defective image(s): p2.png" in line
    Image.fromarray(np.zeros((60, 120), np.uint8)).save(missing / "p2.png")
    line = run_cli_main(main, bad, capsys)
    assert "p2.png is 120x60 but its image" in line and "is 120x120" in line
    line = run_cli_main(main, ["--engine", "onnxruntime", "--onnx", str(tmp_path / "m.onnx"), str(root / "labels.csv"),
                               "--out", str(tmp_path / "x.csv"), "--explain"], capsys)
    assert "--explain needs the PyTorch engine" in line
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------- battery_ct/infer.py --explain
@pytest.fixture(scope="module")
def battery_data(tmp_path_factory):
    """15 generated 64 px slices (one per battery and class) with masks, a split of 4 of them, and
    untrained resnet18 / ae state_dicts."""
    from battery_ct.data import make_builtin_dataset
    from battery_ct.model import build_model
    root = tmp_path_factory.mktemp("battery_review")
    make_builtin_dataset(root, batteries_per_class=1, slices_per_axis=1, size=64)
    names = {int(p.stem.split("_")[3][0]): p.name for p in sorted((root / "images").glob("*_x_*.jpg"))}
    (root / "four.txt").write_text("".join(f"images/{names[c]}\t{c}\n" for c in (0, 1, 2, 4)))
    torch.manual_seed(0)
    for name in ("resnet18", "ae", "hdcnn", "late_fusion"):
        torch.save(build_model(name).state_dict(), root / f"{name}.pth")
    return root


@pytest.mark.parametrize("model", ["resnet18", "ae", "hdcnn", "late_fusion"])   # two target layers; metadata
def test_battery_explain_maps_metrics_and_report(battery_data, model, tmp_path):
    import json
    from battery_ct.infer import main
    out = tmp_path / "out"
    extra = ["--threshold", "0.5"] if model == "ae" else ["--explain-class", "cell_porosity"]
    main(["--weights", str(battery_data / f"{model}.pth"), "--model", model, "--image-size", "64",
          "--split", str(battery_data / "four.txt"), "--out", str(out), "--workers", "0", "--explain",
          "--masks", str(battery_data / "masks"), "--report"] + extra)
    stems = [line.split("\t")[0][7:-4] for line in (battery_data / "four.txt").read_text().splitlines()]
    for stem in stems:
        heat = np.load(out / "explain" / f"{stem}.npy")
        assert heat.shape == (64, 64) and heat.dtype == np.float32 and np.isfinite(heat).all() and heat.min() >= 0
        # an untrained network may have no positive evidence for a class: Grad-CAM's ReLU leaves 0 then
        assert heat.max() > 0 or model in ("hdcnn", "late_fusion")
        assert Image.open(out / "explain" / f"{stem}.png").height >= 256
    rep = json.loads((out / "metrics.json").read_text())
    assert "metrics" in rep and rep["localisation"]["images_with_defect_masks"] == 2
    if model == "ae":   # the map is the smoothed per-pixel reconstruction error: its mean tracks the score
        import csv
        scores = {Path(r["path"]).stem: float(r["score"]) for r in csv.DictReader(open(out / "predictions.csv"))}
        means = [np.load(out / "explain" / f"{s}.npy").mean() for s in stems]
        assert np.corrcoef(means, [scores[s] for s in stems])[0, 1] > 0.9
    else:
        assert "maps: gradcam for cell_porosity (--explain-class)" in (out / "report.html").read_text()
    assert (out / "report.html").read_text().count('<tr class="') == 4


def test_battery_bad_explain_class_is_one_clear_line(battery_data, capsys, tmp_path):
    from battery_ct.infer import main
    line = run_cli_main(main, ["--weights", str(battery_data / "resnet18.pth"), "--model", "resnet18",
                               "--split", str(battery_data / "four.txt"), "--out", str(tmp_path / "o"),
                               "--explain", "--explain-class", "cell_crack"], capsys)
    assert "--explain-class 'cell_crack' is not a class: choose one of cell_normal" in line
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------- the review page in a real browser
def _browser():
    from tests.spectral_ref.browser import Browser, find_chromium
    if find_chromium() is None:
        pytest.skip("Chromium is not installed (apt-get install chromium; .ci/run installs it where apt is available)")
    try:
        return Browser(find_chromium(), width=1300, height=1000)
    except (OSError, RuntimeError, TimeoutError) as e:
        pytest.skip(f"{find_chromium()} is installed but does not start here ({e})")


def test_report_with_2000_rows_sorts_filters_and_loads_lazily_in_chromium(tmp_path, crbl_review):
    from common.report import Row, write_report
    src = tmp_path / "img.png"
    Image.fromarray(np.full((16, 16, 3), 120, np.uint8)).save(src)
    rng = np.random.default_rng(0)
    scores = rng.random(2000)
    labels = rng.random(2000) < 0.3
    flags = scores > 0.5
    rows = [Row(src, f"r{i:04d}", float(s), "defect" if f else "normal", bool(f), "defect" if y else "normal",
                bool(f != y)) for i, (s, f, y) in enumerate(zip(scores, flags, labels))]
    page = write_report(tmp_path, rows, "synthetic", "score > 0.5 (test)", {"images": "2000"}, labels, scores, 0.5)
    b = _browser()
    try:
        b.goto(page.as_uri())
        b.wait_for("document.getElementById('count').textContent.length")
        assert b.evaluate("document.querySelectorAll('table.rows tbody tr').length") == 2000
        first = float(b.evaluate("document.querySelector('table.rows tbody tr').dataset.score"))
        assert first == pytest.approx(scores.max())                      # highest score first
        b.evaluate("document.getElementById('sort').click()")
        first = float(b.evaluate("document.querySelector('table.rows tbody tr').dataset.score"))
        assert first == pytest.approx(scores.min())
        visible = "Array.from(document.querySelectorAll('table.rows tbody tr')).filter(r => !r.hidden).length"
        for value, expected in (("flagged", flags.sum()), ("notflagged", (~flags).sum()), ("wrong", (flags != labels).sum())):
            b.evaluate(f"(() => {{ const s = document.getElementById('filter'); s.value = '{value}';"
                       f" s.dispatchEvent(new Event('change')); }})()")
            assert b.evaluate(visible) == expected
        assert b.evaluate("document.getElementById('count').textContent") == f"{(flags != labels).sum()} of 2000 images shown"
        b.wait_for("document.querySelector('.plots img').complete")
        loaded = "Array.from(document.querySelectorAll('td.thumb img')).filter(i => i.complete && i.naturalWidth).length"
        assert 0 < b.wait_for(loaded) < 200                             # lazy: only the rows near the screen
        # the CRBL review page: relative thumbnails and overlays load from file://
        b.goto((crbl_review[0] / "out" / "report.html").as_uri())
        b.wait_for("document.querySelectorAll('td.map img').length === 3")
        assert b.wait_for("Array.from(document.querySelectorAll('td.map img, td.thumb img, .plots img'))"
                          ".every(i => i.complete && i.naturalWidth > 0)")
        shot = b.screenshot()
        Image.fromarray(shot).save(tmp_path / "report.png")
        assert shot.shape[0] > 500 and shot.std() > 20                   # a drawn page, not a blank one
    finally:
        b.close()


# ---------------------------------------------------------------- battery_ct/infer.py --task segment
class _BrightIsDefect(torch.nn.Module):
    """A hand-made 4-class segmenter: one 1x1 convolution on the normalised image; class 1 (defect)
    grows with the brightness, class 2 is a constant, class 3 unlikely. Its map is known in closed form."""
    W = [[0.0, 0.0, 0.0], [1.0, 1.0, 1.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]
    B = [0.0, 0.0, -2.0, -5.0]

    def __init__(self, num_classes=4, **_):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor(self.W).view(4, 3, 1, 1))
            self.conv.bias.copy_(torch.tensor(self.B))

    def forward(self, x):
        return self.conv(x)


def _expected_probs(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 4) class probabilities of _BrightIsDefect, computed here in float64."""
    x = (rgb / 255.0 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
    z = x @ np.array(_BrightIsDefect.W).T + np.array(_BrightIsDefect.B)
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


@pytest.fixture
def segment_data(tmp_path, monkeypatch):
    """Three 40x56 dark noisy slices, two with a bright 8x10 square pasted at rows 8:16, cols 36:46;
    a split labelling the first square defective, the plain one normal and the second square normal
    (a wrong decision); the square's mask; the hand-made segmenter as a plain state_dict."""
    import battery_ct.infer
    monkeypatch.setattr(battery_ct.infer, "build_model", lambda name, **kw: _BrightIsDefect())
    rng = np.random.default_rng(0)
    (tmp_path / "masks").mkdir()
    lines = []
    for stem, square, label in (("with_square", True, 1), ("plain", False, 0), ("square_called_normal", True, 0)):
        rgb = rng.integers(20, 60, (40, 56, 3)).astype(np.uint8)
        if square:
            rgb[8:16, 36:46] = 250
            mask = np.zeros((40, 56), np.uint8)
            mask[8:16, 36:46] = 255
            if label:
                Image.fromarray(mask).save(tmp_path / "masks" / f"{stem}.png")
        Image.fromarray(rgb).save(tmp_path / f"{stem}.png")
        lines.append(f"{tmp_path / stem}.png\t{label}\n")
    (tmp_path / "split.txt").write_text("".join(lines))
    torch.save(_BrightIsDefect().state_dict(), tmp_path / "seg.pth")
    return tmp_path


def test_segment_map_is_the_defect_probability_and_peaks_on_the_pasted_square(segment_data):
    from battery_ct.infer import main
    root = segment_data
    common = ["--weights", str(root / "seg.pth"), "--model", "deeplab_seg", "--task", "segment",
              "--images", str(root / "with_square.png"), str(root / "plain.png"), "--explain"]
    main(common + ["--crop", "slide", "--window", "32", "--stride", "24", "--out", str(root / "out")])
    main(common + ["--crop", "whole", "--explain-class", "2", "--out", str(root / "class2")])
    for stem in ("with_square", "plain"):
        rgb = np.asarray(Image.open(root / f"{stem}.png").convert("RGB")).astype(np.float64)
        probs = _expected_probs(rgb)
        heat = np.load(root / "out" / "explain" / f"{stem}.npy")
        assert heat.shape == (40, 56) and heat.dtype == np.float32 and np.isfinite(heat).all()
        np.testing.assert_allclose(heat, 1 - probs[..., 0], atol=1e-5)        # 1 - P(background)
        np.testing.assert_allclose(np.load(root / "class2" / "explain" / f"{stem}.npy"), probs[..., 2], atol=1e-5)
        assert Image.open(root / "out" / "explain" / f"{stem}.png").height >= 256
    heat = np.load(root / "out" / "explain" / "with_square.npy")
    y, x = np.unravel_index(heat.argmax(), heat.shape)
    assert 8 <= y < 16 and 36 <= x < 46 and heat[8:16, 36:46].min() > 0.99
    assert np.load(root / "out" / "explain" / "plain.npy").max() < 0.5    # nothing flagged on the plain slice


def test_segment_report_rows_rule_and_labels(segment_data, capsys):
    import json
    from battery_ct.infer import main
    root = segment_data
    main(["--weights", str(root / "seg.pth"), "--model", "deeplab_seg", "--task", "segment", "--crop", "whole",
          "--split", str(root / "split.txt"), "--out", str(root / "out"), "--explain", "--masks",
          str(root / "masks"), "--report"])
    page = (root / "out" / "report.html").read_text()
    assert page.count('<tr class="') == 3
    assert page.count('data-flagged="1"') == 2 and page.count('data-wrong="1"') == 1
    assert "defect when any pixel&#x27;s most probable class is not background" in page
    assert "score = the largest defect probability 1 - P(background)" in page
    assert "defect (3.57% of pixels)" in page                       # 80 of 40x56 pixels
    assert "cell_porosity" in page and "cell_normal" in page          # true labels from the split
    assert 'src="explain/with_square.png"' in page
    assert (root / "out" / "report_files" / "confusion.png").is_file()
    loc = json.loads((root / "out" / "metrics.json").read_text())["localisation"]
    assert loc["images_with_defect_masks"] == 1 and loc["pointing_game"] == 1.0
    # without --explain the map column shows the segmentation overlay; labels from the masks
    main(["--weights", str(root / "seg.pth"), "--model", "deeplab_seg", "--task", "segment", "--crop", "whole",
          "--images", str(root / "with_square.png"), str(root / "plain.png"), "--out", str(root / "o2"), "--report"])
    page = (root / "o2" / "report.html").read_text()
    assert page.count('<tr class="') == 2 and 'src="with_square_overlay.png"' in page
    assert "&ndash;" in page                                          # no true label known
    capsys.readouterr()
    line = run_cli_main(main, ["--weights", str(root / "seg.pth"), "--model", "deeplab_seg", "--task", "segment",
                               "--images", str(root / "plain.png"), "--out", str(root / "o2"), "--report"], capsys)
    assert "report.html already exists" in line


@pytest.mark.parametrize("index", ["4", "0", "crack"])
def test_segment_explain_class_out_of_range_is_one_clear_line(segment_data, capsys, index):
    from battery_ct.infer import main
    root = segment_data
    line = run_cli_main(main, ["--weights", str(root / "seg.pth"), "--model", "deeplab_seg", "--task", "segment",
                               "--images", str(root / "plain.png"), "--out", str(root / "o"), "--explain",
                               "--explain-class", index], capsys)
    assert line == f"error: --explain-class {index!r}: deeplab_seg takes a class index 1..3"
    assert not (root / "o").exists()
