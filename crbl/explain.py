"""Where a CRBL model sees a defect: Grad-CAM family maps through both backbones, mapped back
through crbl's preprocessing into the image as read from disk (crbl/infer.py --explain).

The two EfficientNetB0 backbones meet only in the bilinear pooling, so the map takes both of
their last feature maps (1280 x 4 x 4 at 128 px) as target layers: pytorch-grad-cam computes a
map per backbone for the defect logit, scales each to [0, 1] and averages them. The crop model
saw the part's bounding box resized to 128 x 128: its map is resized back into that box, zero
outside it; the full model saw the image without its first 4 rows and columns, so those are 0.
--combined: the pixelwise maximum of the crop and full maps (its decision is crop OR full).
"""
from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from tqdm import tqdm

from common.data import builtin_dir
from common.explain import (Masks, MapWriter, cam_maps, check_explain_args, describe, make_cam, output_stems,
                            paste_map)
from common.io import atomic_write_text, check_output_dir, load_image, make_output_dir
from common.metrics import classification_report, roc_auc
from common.report import Row, check_report, write_report
from crbl.data import crop_box, preprocess_crop, preprocess_full
from crbl.deploy import CPU_CHUNK
from crbl.model import CRBL



def _no_grad(fn):
    """fn without autograd, for a worker thread (grad mode is per thread). Not inference mode: the
    features go on into the head's autograd graph."""
    def call(*args):
        with torch.no_grad():
            return fn(*args)
    return call


class DefectLogit(nn.Module):
    """CRBL's defect logit for the CAM. The two backbones run without autograd (on the CPU at the
    same time in two threads, as crbl/infer.py runs them); their feature maps then pass through
    `tap1` / `tap2`, the CAM's target layers, in a fixed order, and only the bilinear head keeps an
    autograd graph: Grad-CAM needs the gradient at the feature maps, nothing below them."""

    def __init__(self, model: CRBL, streams: int = 1):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.tap1, self.tap2 = nn.Identity(), nn.Identity()
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="crbl-cam") if streams > 1 else None

    def forward(self, x):
        m = self.model
        with torch.no_grad():
            x = x.contiguous(memory_format=torch.channels_last)
            if self._pool is not None and x.device.type == "cpu":
                other = self._pool.submit(_no_grad(m.backbone1.forward_channels_last), x)
                f2 = m.backbone2.forward_channels_last(x)
                f1 = other.result()
            else:
                f1, f2 = m.backbone1.forward_channels_last(x), m.backbone2.forward_channels_last(x)
        return m.forward_head((self.tap1(f1), self.tap2(f2)))


def explainer(model: CRBL, method: str, streams: int = 1):
    wrapped = DefectLogit(model, streams)
    return make_cam(wrapped, [wrapped.tap1, wrapped.tap2], method)


def image_map(cam, model_type: str, rgbs: list[np.ndarray], device) -> list[np.ndarray]:
    """Maps (HxW of each image) for a batch of images as read from disk."""
    if model_type == "crop":
        boxes = [crop_box(a) for a in rgbs]
        x = np.stack([preprocess_crop(a) for a in rgbs])
    else:
        boxes = [(4, a.shape[0], 4, a.shape[1]) if min(a.shape[:2]) > 4 else None for a in rgbs]
        x = np.stack([preprocess_full(a) for a in rgbs])
    x = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))).to(device)
    maps = cam_maps(cam, x)
    return [paste_map(m, b, a.shape[:2]) for m, b, a in zip(maps, boxes, rgbs)]


def explain(cams: dict, paths, stems, writer: MapWriter, device, titles: list[str], batch: int) -> None:
    """`cams`: {model type: CAM} (one, or crop and full for --combined). Writes a map per image.
    Only the head keeps an autograd graph, so a batch costs little more memory than inference."""
    for i in tqdm(range(0, len(paths), batch), desc="explain", leave=False, disable=len(paths) <= batch):
        rgbs = [np.asarray(load_image(p, "RGB")) for p in paths[i:i + batch]]
        per_model = [image_map(cam, t, rgbs, device) for t, cam in cams.items()]
        for j, rgb in enumerate(rgbs):
            heat = np.maximum.reduce([maps[j] for maps in per_model])
            writer.add(stems[i + j], rgb, heat, titles[i + j])


# ---------------------------------------------------------------- crbl/infer.py --explain / --masks / --report
class Review:
    """What crbl/infer.py adds for --explain, --masks and --report: every check before the work,
    the maps, metrics.json and report.html after it, all in the folder that holds the CSV."""

    def __init__(self, args, paths: list[Path], labels: dict[Path, int], out: Path):
        check_explain_args(args, args.engine)
        self.args, self.paths, self.labels, self.out = args, paths, labels, Path(out)
        self.active = args.explain or args.report
        self.stems = output_stems(paths)
        self.masks = None
        if args.explain:
            check_output_dir(self.out / "explain", [f"{s}.{e}" for s in self.stems for e in ("npy", "png")],
                             args.overwrite)
            folder = args.masks
            builtin = builtin_dir("crbl")
            if folder is None and paths and (builtin / "masks").is_dir() and \
                    all(p.resolve().is_relative_to(builtin.resolve()) for p in paths):
                folder = builtin / "masks"
                print(f"built-in data: scoring the maps against its masks in {folder}")
            if folder is not None:
                known = len(labels) == len(paths)
                self.masks = Masks(folder, paths, self.stems, [labels[p] == 1 for p in paths] if known else None)
                check_output_dir(self.out, ["metrics.json"], args.overwrite)
        if args.report:
            check_report(self.out, args.overwrite)

    def finish(self, models: dict, device, score: torch.Tensor, flags: torch.Tensor, header: list[str],
               rows: list[list[str]], threshold: tuple[str, float]) -> None:
        """`threshold`: (the decision rule with where its numbers came from, the score it flags above)."""
        a, out = self.args, self.out
        metrics = {}
        if a.explain:
            make_output_dir(out / "explain")
            writer = MapWriter(out / "explain", self.masks)
            cams = {t: explainer(g.model, a.explain_method, g.streams) for t, g in models.items()}
            titles = [f"{a.explain_method} | " + " | ".join(f"{h} {v}" for h, v in zip(header[1:], r[1:]))
                      for r in rows]
            # chunks of CPU_CHUNK images on the CPU, as inference runs them (malloc keeps reusing the memory)
            batch = min(a.batch_size, CPU_CHUNK) if device.type == "cpu" else a.batch_size
            explain(cams, self.paths, self.stems, writer, device, titles, batch)
            print(f"explanation maps ({a.explain_method}, both backbones) written to {out / 'explain'}: "
                  f"<stem>.npy, <stem>.png")
            if self.masks is not None:
                metrics["localisation"] = writer.loc.summary()
                metrics["localisation"]["method"] = a.explain_method
                metrics["localisation"]["masks"] = str(self.masks.folder)
                print(describe(metrics["localisation"]))
        y = np.array([self.labels[p] for p in self.paths], bool) if self.labels and \
            len(self.labels) == len(self.paths) else None
        s, f = score.double().numpy(), flags.numpy().astype(bool)
        if y is not None:
            r = classification_report(torch.from_numpy(y).long(), torch.from_numpy(f).long(), 2)
            metrics["classification"] = {"accuracy": r["accuracy"], "defect_f1": float(r["per_class"]["f1"][1]),
                                         "roc_auc": roc_auc(y, s), "images": len(y), "defective": int(y.sum())}
        if metrics and self.masks is not None:
            atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2) + "\n")
            print(f"metrics written to {out / 'metrics.json'}")
        if a.report:
            text, thr = threshold
            report_rows = [Row(p, st, float(v), "defect" if fl else "normal", bool(fl),
                               None if y is None else ("defect" if y[i] else "normal"),
                               None if y is None else bool(fl) != bool(y[i]),
                               f"explain/{st}.png" if a.explain else None)
                           for i, (p, st, v, fl) in enumerate(zip(self.paths, self.stems, s.tolist(), f.tolist()))]
            summary = {"images": str(len(s)), "flagged": str(int(f.sum()))}
            for group in metrics.values():
                summary.update({k: f"{v:.4g}" for k, v in group.items() if isinstance(v, float)})
            if "localisation" in metrics and metrics["localisation"]["random_map"]["pointing_game"] is not None:
                summary["random-map pointing game"] = f"{metrics['localisation']['random_map']['pointing_game']:.4g}"
            cm = None
            if y is not None:
                cm = (np.array([[(~y & ~f).sum(), (~y & f).sum()], [(y & ~f).sum(), (y & f).sum()]]),
                      ["normal", "defect"])
            kind = "combined crop + full" if a.combined else a.model_type
            page = write_report(out, report_rows, f"CRBL {kind}", text, summary, y, s, thr, cm,
                                notes=[f"maps: {a.explain_method} over both backbones (mean of the two scaled maps)"]
                                if a.explain else [])
            print(f"review page written to {page} (open it in a browser; works offline)")
