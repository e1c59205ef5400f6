"""Where a battery CT model sees a defect (battery_ct/infer.py --explain / --masks / --report).

  classifiers   Grad-CAM family (pytorch-grad-cam) on the last feature map of the network (both
                branches' last layers for hdcnn), for the predicted class or --explain-class; the
                target is the log of the class probability the model reports (hdcnn: its two-level rule)
  ae            the per-pixel squared reconstruction error (mean over the colour channels), Gaussian
                smoothed (sigma 2 px at the model's input size); no gradients
  deeplab_seg   the probability that a pixel is not background (1 - P(class 0)), or of the
                --explain-class index

Every map is resized from the model's square input back to the image as read from disk.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from tqdm import tqdm

from battery_ct.data import metadata
from battery_ct.deploy import NORMALIZATION
from battery_ct.model import CLASS_NAMES, DEFECT_CLASSES
from battery_ct.train import TASK, classify
from common.data import builtin_dir
from common.explain import (Masks, MapWriter, cam_maps, check_explain_args, describe, make_cam, output_stems,
                            resize_map, smooth)
from common.io import UserError, atomic_write_text, check_output_dir, load_image, make_output_dir
from common.report import Row, check_report, write_report

def target_layers(model: nn.Module, name: str) -> list[nn.Module]:
    """The last feature map(s) before global pooling."""
    if name in ("resnet18",):
        return [model.model.layer4]
    if name in ("efficientnet_b0", "convnext_tiny"):
        return [model.model.features]
    return {"cbam": lambda: [model.cbam4], "hdcnn": lambda: [model.layer4_c, model.layer4_f],
            "late_fusion": lambda: [model.backbone.layer4], "drn_aspp": lambda: [model.decoder],
            "deeplabv3": lambda: [model.aspp]}[name]()


class LogProbability(nn.Module):
    """image in [0, 1] -> log class probabilities, as infer.py decides (metadata set per batch)."""

    def __init__(self, model: nn.Module, name: str, normalize: str):
        super().__init__()
        self.model, self.name = model.eval().requires_grad_(False), name
        mean, std = NORMALIZATION[normalize]
        self.register_buffer("mean", torch.tensor(mean).view(3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(3, 1, 1), persistent=False)
        self.meta = None

    def forward(self, x):
        probs = classify(self.model, self.name, (x - self.mean) / self.std, self.meta)[0]
        return probs.clamp_min(1e-12).log()


def _batch(paths, size: int, device):
    from battery_ct.data import transforms
    tf = transforms(size, False, 0.0, "none")
    rgbs = [np.array(load_image(p, "RGB")) for p in paths]
    return rgbs, torch.stack([tf(a) for a in rgbs]).to(device)


def ae_maps(model: nn.Module, normalize: str, x: torch.Tensor) -> np.ndarray:
    mean, std = (torch.tensor(v, device=x.device).view(3, 1, 1) for v in NORMALIZATION[normalize])
    with torch.inference_mode():
        xn = (x - mean) / std
        err = (xn.float() - model(xn)[0].float()).pow(2).mean(1)
    return np.stack([smooth(e, 2.0) for e in err.cpu().numpy()])


def resolve_class(args, num_classes: int, model: str) -> int | None:
    """--explain-class NAME (a class name, or for deeplab_seg a class index) -> index; None = default."""
    name = getattr(args, "explain_class", None)
    if name is None:
        return None
    if model == "ae":
        raise UserError("--explain-class: the autoencoder has no classes (its map is the reconstruction error)")
    if model == "deeplab_seg":
        if name.isdigit() and 0 < int(name) < num_classes:
            return int(name)
        raise UserError(f"--explain-class {name!r}: deeplab_seg takes a class index 1..{num_classes - 1}")
    names = CLASS_NAMES[:num_classes]
    if name not in names:
        raise UserError(f"--explain-class {name!r} is not a class: choose one of {', '.join(names)}")
    return names.index(name)


class Review:
    """Checks before any work (outputs, masks, class), then the maps, metrics.json's localisation
    and report.html after infer.py has written predictions.csv."""

    def __init__(self, args, cfg: dict, items: list[tuple[Path, int]], labelled: bool, task: str, extra: dict):
        check_explain_args(args, args.engine)
        self.args, self.cfg, self.items, self.labelled, self.task, self.extra = args, cfg, items, labelled, task, extra
        self.cls = resolve_class(args, cfg["num_classes"], cfg["model"])
        self.paths = [p for p, _ in items]
        self.stems = output_stems(self.paths)
        self.out = Path(args.out)
        self.masks = None
        if args.explain:
            check_output_dir(self.out / "explain", [f"{s}.{e}" for s in self.stems for e in ("npy", "png")],
                             args.overwrite)
            folder = args.masks
            builtin = builtin_dir(TASK).resolve()
            if folder is None and (builtin / "masks").is_dir() and self.paths and \
                    all(p.resolve().is_relative_to(builtin) for p in self.paths):
                folder = builtin / "masks"
                print(f"built-in data: scoring the maps against its masks in {folder}")
            if folder is not None:
                defective = [lab in DEFECT_CLASSES for _, lab in items] if labelled else None
                self.masks = Masks(folder, self.paths, self.stems, defective)
                if not labelled:
                    check_output_dir(self.out, ["metrics.json"], args.overwrite)
        if args.report:
            check_report(self.out, args.overwrite)

    # ------------------------------------------------------------ maps
    def writer(self) -> MapWriter:
        make_output_dir(self.out / "explain")
        self.maps = MapWriter(self.out / "explain", self.masks, vmax=None if self.cfg["model"] == "ae" else 1.0)
        return self.maps

    def finish_segment(self) -> None:
        """--task segment: the localisation of the probability maps into metrics.json (--explain
        --masks), and the review page (--report) from segments.csv."""
        local = None
        if self.args.explain:
            what = "1 - P(background)" if self.cls is None else f"P(class {self.cls})"
            print(f"probability maps ({what}) written to {self.out / 'explain'}: <stem>.npy, <stem>.png")
        if self.masks is not None and getattr(self, "maps", None) is not None:
            local = {**self.maps.loc.summary(), "method": "segmentation probability", "masks": str(self.masks.folder)}
            atomic_write_text(self.out / "metrics.json", json.dumps({"localisation": local}, indent=2) + "\n")
            print(describe(local))
        if self.args.report:
            self.segment_report(local)

    def segment_report(self, local: dict | None) -> None:
        """One row per image: score = the largest 1 - P(background) over its pixels; decision = the
        segment path's own rule (defect when the written mask has a non-background pixel); true
        label = the split's class, else with --masks whether the mask has a defect pixel."""
        a, out = self.args, self.out
        with open(out / "segments.csv", newline="") as f:
            table = list(csv.DictReader(f))
        scores = [float(r["max_defect_probability"]) for r in table]
        shares = [1.0 - float(r["fraction_class0"]) for r in table]
        flagged = [s > 0 for s in shares]
        truth, label_text, source = None, [None] * len(table), None
        if self.labelled:
            truth = [lab in DEFECT_CLASSES for _, lab in self.items]
            label_text = [CLASS_NAMES[lab] for _, lab in self.items]
            source = "the split's class labels"
        elif self.masks is not None:
            masks = [self.masks.get(st) for st in self.stems]
            truth = [m is not None and bool(m.any()) for m in masks]
            label_text = ["defect (mask)" if t else "normal (no defect pixel in --masks)" for t in truth]
            source = f"--masks {self.masks.folder} (a defect pixel in the mask = defect)"
        rows = []
        for i, (p, st) in enumerate(zip(self.paths, self.stems)):
            decision = f"defect ({100 * shares[i]:.2f}% of pixels)" if flagged[i] else "normal"
            rows.append(Row(p, st, scores[i], decision, flagged[i], label_text[i],
                            None if truth is None else flagged[i] != truth[i],
                            f"explain/{st}.png" if a.explain else table[i]["overlay"]))
        summary = {"images": str(len(rows)), "flagged as defect": str(sum(flagged))}
        y = s = cm = None
        if truth is not None:
            y, pred, s = np.array(truth), np.array(flagged), np.array(scores)
            tp, fp = int((y & pred).sum()), int((~y & pred).sum())
            fn, tn = int((y & ~pred).sum()), int((~y & ~pred).sum())
            summary.update({"true labels": source, "accuracy (defect vs normal)": f"{(tp + tn) / len(y):.4g}",
                            "defect recall": f"{tp / max(1, tp + fn):.4g}",
                            "defect precision": f"{tp / max(1, tp + fp):.4g}"})
            if y.any() and (~y).any():
                from common.metrics import roc_auc
                summary["ROC-AUC of the score"] = f"{roc_auc(y, s):.4g}"
            cm = (np.array([[tn, fp], [fn, tp]]), ["normal", "defect"])
        if local and local["pointing_game"] is not None:
            summary["pointing game"] = f"{local['pointing_game']:.3f} (random map {local['random_map']['pointing_game']:.3f})"
            summary["pixel ROC-AUC"] = f"{local['pixel_roc_auc']:.3f} (random map 0.5)"
        text = ("defect when any pixel's most probable class is not background (class 0), the rule of the "
                "written <name>_mask.png; no tunable threshold (argmax of the deeplab_seg logits)")
        notes = ["score = the largest defect probability 1 - P(background) over the image's pixels "
                 "(every flagged image scores > 0.5); the decision column gives the share of defect pixels"]
        how = "whole image" if a.crop == "whole" else f"sliding window {a.window}, stride {a.stride}"
        what = ("1 - P(background)" if self.cls is None else f"P(class {self.cls}) (--explain-class)") \
            + " over the image" if a.explain else "the segmentation overlay (class colours)"
        notes.append(f"segmentation: {how}; map column: {what}" + (f"; {describe(local)}" if local else ""))
        page = write_report(out, rows, "battery CT deeplab_seg segmentation", text, summary, y, s, None, cm,
                            notes=notes)
        print(f"review page written to {page} (open it in a browser; works offline)")

    def explain_classifier(self, model: nn.Module, device, preds: list[int], scores: list[float]) -> MapWriter:
        a, name = self.args, self.cfg["model"]
        writer = self.writer()
        net = LogProbability(model, name, self.cfg["normalize"]).to(device)
        cam = None if name == "ae" else make_cam(net, target_layers(net.model, name), a.explain_method)
        size = self.cfg["image_size"]
        bs = a.batch_size      # only the layers after the target keep an autograd graph
        for i in tqdm(range(0, len(self.paths), bs), desc="explain", leave=False, disable=len(self.paths) <= bs):
            paths = self.paths[i:i + bs]
            rgbs, x = _batch(paths, size, device)
            if name == "ae":
                maps = ae_maps(net.model, self.cfg["normalize"], x)
                titles = [f"reconstruction error | score {s:.4g}" for s in scores[i:i + bs]]
            else:
                net.meta = torch.stack([metadata(p) for p in paths]).to(device) if name == "late_fusion" else None
                classes = [self.cls if self.cls is not None else k for k in preds[i:i + bs]]
                maps = cam_maps(cam, x, classes)
                titles = [f"{a.explain_method} for {CLASS_NAMES[c]} | predicted {CLASS_NAMES[k]} "
                          f"| P(defect) {s:.3g}" for c, k, s in zip(classes, preds[i:i + bs], scores[i:i + bs])]
            for j, rgb in enumerate(rgbs):
                writer.add(self.stems[i + j], rgb, resize_map(maps[j], *rgb.shape[:2]), titles[j])
        return writer

    def segment_title(self, path: Path) -> str:
        return f"{'P(not background)' if self.cls is None else f'P(class {self.cls})'} | {path.name}"

    def segment_map(self, logits: torch.Tensor) -> np.ndarray:
        p = logits.float().softmax(1)[0]
        return (p[self.cls] if self.cls is not None else 1 - p[0]).cpu().numpy()

    # ------------------------------------------------------------ after predictions.csv
    def finish(self, model: nn.Module | None, device) -> None:
        a, name, out = self.args, self.cfg["model"], self.out
        with open(out / "predictions.csv", newline="") as f:
            table = list(csv.DictReader(f))
        if name == "ae":
            scores = [float(r["score"]) for r in table]
            preds = [int(r["pred"]) for r in table]
            flagged = [bool(k) for k in preds]
            decisions = [r["decision"] for r in table]
        else:
            names = CLASS_NAMES[:self.cfg["num_classes"]]
            preds = [int(r["pred"]) for r in table]
            scores = [sum(float(r[f"prob_{names[c]}"]) for c in DEFECT_CLASSES if c < len(names)) for r in table]
            flagged = [k in DEFECT_CLASSES for k in preds]
            decisions = [names[k] for k in preds]
        local = None
        if a.explain:
            writer = self.explain_classifier(model, device, preds, scores)
            print(f"explanation maps ({'reconstruction error' if name == 'ae' else a.explain_method}) written to "
                  f"{out / 'explain'}: <stem>.npy, <stem>.png")
            if self.masks is not None:
                local = {**writer.loc.summary(), "method": "reconstruction error" if name == "ae" else a.explain_method,
                         "masks": str(self.masks.folder)}
                print(describe(local))
                path = out / "metrics.json"
                rep = json.loads(path.read_text()) if self.labelled else {}
                rep["localisation"] = local
                atomic_write_text(path, json.dumps(rep, indent=2) + "\n")
        if a.report:
            self.report(scores, flagged, decisions, preds, local)

    def report(self, scores, flagged, decisions, preds, local) -> None:
        a, name, out = self.args, self.cfg["model"], self.out
        labels = [lab for _, lab in self.items] if self.labelled else None
        names = list(CLASS_NAMES[:self.cfg["num_classes"]])
        rows = []
        for i, (p, st) in enumerate(zip(self.paths, self.stems)):
            lab = None if labels is None else names[labels[i]]
            wrong = None if labels is None else (
                flagged[i] != (labels[i] in DEFECT_CLASSES) if name == "ae" else preds[i] != labels[i])
            rows.append(Row(p, st, scores[i], decisions[i], flagged[i], lab, wrong,
                            f"explain/{st}.png" if a.explain else None))
        summary = {"images": str(len(rows)), "flagged as defect": str(sum(flagged))}
        y = s = cm = None
        if self.labelled:
            rep = json.loads((out / "metrics.json").read_text())
            summary.update({k: f"{v:.4g}" for k, v in rep["metrics"].items() if isinstance(v, float)})
            y = np.array([lab in DEFECT_CLASSES for lab in labels])
            s = np.array(scores)
            cm = (np.asarray(rep["confusion_matrix"]), rep["class_names"])
        if local and local["pointing_game"] is not None:
            chance = local["random_map"]["pointing_game"]
            summary["pointing game"] = f"{local['pointing_game']:.3f} (random map {chance:.3f})"
            summary["pixel ROC-AUC"] = f"{local['pixel_roc_auc']:.3f} (random map 0.5)"
        if name == "ae":
            thr = float(a.threshold if a.threshold is not None else self.extra["threshold"])
            src = "--threshold" if a.threshold is not None else \
                f"stored in the checkpoint by train.py ({self.extra.get('threshold_method', 'validation')})"
            text = f"score >= {thr:.6g}, {src}"
        else:
            thr = None
            text = ("no threshold: the class with the highest probability (hdcnn: its two-level rule); "
                    "score = P(defect classes)")
        notes = []
        if a.explain:
            what = "per-pixel reconstruction error, smoothed" if name == "ae" else \
                f"{a.explain_method} for " + (CLASS_NAMES[self.cls] + " (--explain-class)" if self.cls is not None
                                              else "the predicted class")
            notes.append(f"maps: {what}" + (f"; {describe(local)}" if local else ""))
        page = write_report(out, rows, f"battery CT {name}", text, summary, y, s, thr, cm, notes=notes)
        print(f"review page written to {page} (open it in a browser; works offline)")
