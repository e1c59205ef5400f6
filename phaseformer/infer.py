"""Restore underwater images with a Phaseformer or a Spectroformer: a folder in, restored PNGs out.

  python phaseformer/infer.py --weights runs/phaseformer/.../best.pt photos/ --out restored/
  python phaseformer/infer.py --weights best.pt photos/ --gt references/ --metrics   # + PSNR/SSIM
  python phaseformer/infer.py --weights uieb.pth --preset official photos/           # release weights
  python phaseformer/infer.py --engine onnxruntime --onnx pf.onnx photos/ --out restored/   # scripts/export_onnx.py

--weights takes one of our checkpoints (best.pt / last.pt), a converted file
(scripts/convert_phaseformer.py), or an official release file / training-script state_dict
directly (read with the same allow-list; nothing in it is run). The model (phaseformer or
spectroformer) is detected from the file; --model names it instead.

Photographs: JPEG/PNG/... of any size (tiled, so memory stays bounded), names with spaces or
parentheses. EXIF-rotated JPEGs are restored in the orientation a viewer shows (and saved upright,
that size). Grayscale images are restored as RGB (R = G = B in). 16-bit PNGs are scaled to 8 bit
(65535 -> 255) and restored as 8-bit PNGs. An alpha channel is not restored: it is set aside and put
back unchanged, so an RGBA input gives an RGBA PNG. Outputs keep the input's name stem (.png).

Presets:
  ours (default): RGB in [0, 1] at the image's own size, the 1x head (or --head 2x for twice the
      size); images larger than --tile px on a side are processed in overlapping tiles blended
      with linear ramps, so memory stays bounded; sizes that are not multiples of 8 are padded
      by reflection and cropped back.
  official: what the release's test.py does, for its checkpoints: bicubic resize to 512x512,
      inputs in [-1, 1], saved as (x+1)/2*255 clipped and truncated to 8 bits. Phaseformer: the
      2x head (a 1024x1024 output); Spectroformer (its test.py): its one output, 512x512.
--engine onnxruntime --onnx FILE runs an exported graph (phaseformer/deploy.py, the `ours` preset,
the head it was exported with) through the same padding, tiling, blending and rounding. A file
exported with --dynamic-size takes every tile as the PyTorch engine does, and the PNGs equal that
engine's to one level (the engines' floats differ by ~1e-6). A file of one size (--size S S) is fed
tiles of exactly S x S (--tile is S): images and edge tiles smaller than that are padded up to it by
reflection and cropped back, which changes what the global phase attention sees, so those outputs
differ from the PyTorch engine's (equal where every tile is S x S).
--metrics with --gt DIR (reference images with the same names, the output's size) writes
metrics.csv and metrics.json: PSNR (RGB, data range 1) and SSIM (Gaussian window 11, sigma 1.5,
per channel), for the restored image and, as the baseline, for the input itself.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from tqdm import tqdm

if __package__ in (None, ""):  # `python phaseformer/infer.py` from a checkout: import this checkout's packages
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import cli
from common.data import IMAGE_SUFFIXES, list_images
from common.device import AMP_CHOICES, amp_dtype, autocast, select_device
from common.io import (UserError, atomic_write_text, check_output_dir, image_to_tensor, load_image,
                       refuse_output_over_inputs, run_cli, save_image)
from common.metrics import psnr, ssim
from common.onnx import OrtModel, add_engine_args, open_exported, resolve_engine
from phaseformer.deploy import HEADS, TASK
from phaseformer.model import DOWNSAMPLE_FACTOR, MODEL_NAMES, build_model
from phaseformer.official import read_weights

OFFICIAL_SIZE = 512
MIN_SIDE = DOWNSAMPLE_FACTOR
DEFAULT_TILE = 512


# ---------------------------------------------------------------- model application
def pad_to_multiple(x: torch.Tensor, multiple: int = DOWNSAMPLE_FACTOR,
                    at_least: tuple[int, int] = (0, 0)) -> tuple[torch.Tensor, int, int]:
    """Pad bottom/right to multiples of `multiple`, and to at least `at_least` (reflection where the
    image allows it)."""
    h, w = x.shape[-2:]
    ph, pw = max(-h % multiple, at_least[0] - h), max(-w % multiple, at_least[1] - w)
    if ph or pw:
        mode = "reflect" if ph < h and pw < w else "replicate"
        x = F.pad(x, (0, pw, 0, ph), mode=mode)
    return x, h, w


@torch.inference_mode()
def run_model(model, x: torch.Tensor, head: str, device: torch.device, dtype=None) -> torch.Tensor:
    """One forward of the chosen head on any size, on `device`; result float32 on the CPU."""
    scale = 2 if head == "2x" else 1
    padded, h, w = pad_to_multiple(x)
    with autocast(device, dtype):
        out = model(padded.to(device), head=head)
    return out[..., : scale * h, : scale * w].float().cpu()


class OrtRestorer:
    """An exported graph called as infer.py calls the model: restorer(x, head=...) -> output. A file
    of one size gets every input padded up to that size, and the output cropped back."""

    def __init__(self, graph: OrtModel, head: str, fixed: tuple[int, int] | None, path: Path):
        self.graph, self.head, self.fixed, self.path = graph, head, fixed, path

    def __call__(self, x: torch.Tensor, head: str) -> torch.Tensor:
        if head != self.head:
            raise UserError(f"{self.path}: exported with the {self.head} head, not {head}")
        if self.fixed is None:
            return self.graph(x)[0]
        padded, h, w = pad_to_multiple(x, at_least=self.fixed)
        s = 2 if head == "2x" else 1
        return self.graph(padded)[0][..., : s * h, : s * w]


def load_onnx(args) -> tuple[OrtRestorer, dict, int]:
    """(the exported graph as infer.py calls it, {'kind'}, the tile size); a file of another task,
    another head than --head, or one size that --tile contradicts, is refused."""
    sess, meta, head = open_exported(args, TASK, "[--head 2x] [--dynamic-size]", "head", HEADS, args.head)
    graph = OrtModel(sess)
    h, w = graph.shape[1:3]
    tile = args.tile or DEFAULT_TILE
    fixed = None
    if isinstance(h, int) and isinstance(w, int):
        if h != w or h < 64:
            raise UserError(f"{args.onnx}: takes {h}x{w} images only; infer.py feeds square tiles of at least "
                            f"64 px: export with --size S S or --dynamic-size")
        if args.tile is not None and args.tile != h:
            raise UserError(f"--tile {args.tile}: {args.onnx} takes {h}x{w} tiles only; leave --tile out, or export "
                            f"with --size {args.tile} {args.tile} or --dynamic-size")
        fixed, tile = (h, w), h
    return OrtRestorer(graph, head, fixed, args.onnx), \
        {"kind": f"ONNX Runtime, {args.onnx.name}", "model": meta.get("model", "phaseformer")}, tile


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    if length <= tile:
        return [0]
    starts = list(range(0, length - tile, tile - overlap)) + [length - tile]
    return sorted(set(starts))


def _ramp(length: int, fade: int, at_start: bool, at_end: bool) -> torch.Tensor:
    w = torch.ones(length)
    if fade:
        rise = (torch.arange(fade, dtype=torch.float32) + 0.5) / fade
        if at_start:
            w[:fade] = rise
        if at_end:
            w[-fade:] = torch.minimum(w[-fade:], rise.flip(0))
    return w


def restore(model, x: torch.Tensor, head: str = "1x", tile: int = 512, overlap: int = 32,
            device: torch.device = torch.device("cpu"), dtype=None) -> torch.Tensor:
    """(1, 3, H, W) -> (1, 3, sH, sW), s = 1 or 2 for the head; tiled when H or W exceeds `tile`.

    Tiles of `tile` px overlap by at least `overlap` px; each is weighted by linear ramps across
    the overlaps it shares with neighbours, and the weighted sum is normalised. Only one tile is on
    the device at a time; the output accumulates on the CPU.
    """
    h, w = x.shape[-2:]
    if h <= tile and w <= tile:
        return run_model(model, x, head, device, dtype)
    s = 2 if head == "2x" else 1
    out = torch.zeros(1, 3, s * h, s * w)
    total = torch.zeros(1, 1, s * h, s * w)
    ys, xs = tile_starts(h, tile, overlap), tile_starts(w, tile, overlap)
    for y0 in ys:
        for x0 in xs:
            th, tw = min(tile, h), min(tile, w)
            piece = run_model(model, x[..., y0:y0 + th, x0:x0 + tw], head, device, dtype)
            wy = _ramp(s * th, s * overlap, y0 > 0, y0 + th < h)
            wx = _ramp(s * tw, s * overlap, x0 > 0, x0 + tw < w)
            weight = wy[:, None] * wx[None, :]
            out[..., s * y0:s * (y0 + th), s * x0:s * (x0 + tw)] += piece * weight
            total[..., s * y0:s * (y0 + th), s * x0:s * (x0 + tw)] += weight
    return out / total


# ---------------------------------------------------------------- presets
def to_uint8(t: torch.Tensor) -> np.ndarray:
    """(1|_, 3, H, W) in [0, 1] -> HxWx3 uint8, rounded."""
    return (t[0].clamp(0, 1) * 255.0 + 0.5).to(torch.uint8).permute(1, 2, 0).numpy()


def official_preprocess(im: Image.Image) -> torch.Tensor:
    """test.py: bicubic 512x512, ToTensor, Normalize(0.5, 0.5) -> [-1, 1]."""
    return image_to_tensor(im.resize((OFFICIAL_SIZE, OFFICIAL_SIZE), Image.BICUBIC))[None] * 2.0 - 1.0


def official_postprocess(t: torch.Tensor) -> np.ndarray:
    """test.py's save_img: (x + 1) / 2 * 255, clipped, truncated (astype) to uint8."""
    a = (t[0].permute(1, 2, 0).numpy().astype(np.float64) + 1.0) / 2.0 * 255.0
    return a.clip(0, 255).astype(np.uint8)


# ---------------------------------------------------------------- files
def collect_inputs(items: list[Path]) -> list[tuple[Path, str]]:
    """(image path, output name) for every input; two inputs with the same output name are an error."""
    found, names = [], {}
    for item in items:
        for path in list_images(item):
            rel = path.relative_to(item) if item.is_dir() else Path(path.name)
            name = str(rel.with_suffix(".png"))
            if name in names:
                raise UserError(f"{path}: its output {name} would overwrite that of {names[name]}")
            names[name] = path
            found.append((path, name))
    return found


def read_photo(path: Path) -> tuple[Image.Image, Image.Image | None]:
    """(RGB image as a viewer shows it, its alpha channel or None). EXIF orientation applied;
    grayscale to RGB; 16-bit scaled to 8 bit (common.io.load_image)."""
    im = ImageOps.exif_transpose(load_image(path, "RGB"))   # one clear error for a bad file
    with Image.open(path) as probe:                          # header only
        has_alpha = "A" in probe.getbands() or "transparency" in probe.info
    alpha = ImageOps.exif_transpose(load_image(path, "RGBA")).getchannel("A") if has_alpha else None
    return im, alpha


def find_reference(gt_dir: Path, name: str) -> Path:
    rel = Path(name)
    for suffix in (None, *IMAGE_SUFFIXES, *(s.upper() for s in IMAGE_SUFFIXES)):
        candidate = gt_dir / (rel if suffix is None else rel.with_suffix(suffix))
        if candidate.is_file():
            return candidate
    raise UserError(f"{gt_dir / rel.with_suffix('')}.*: no reference image for {name}")


def _metrics(out: np.ndarray, ref: np.ndarray) -> tuple[float, float]:
    a = image_to_tensor(Image.fromarray(out))[None]
    b = image_to_tensor(Image.fromarray(ref))[None]
    return float(psnr(a, b)), float(ssim(a, b))


def parse_args(argv=None):
    p = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", type=Path, nargs="+", help="image files and/or folders")
    p.add_argument("--weights", type=Path,
                   help="our checkpoint, a converted file, or an official release file (PyTorch engine)")
    p.add_argument("--out", type=Path, default=None, help="output folder (default runs/phaseformer/infer-<time>)")
    p.add_argument("--model", choices=MODEL_NAMES, default=None,
                   help="which model --weights holds (default: detected from the file)")
    p.add_argument("--preset", choices=("ours", "official"), default="ours")
    p.add_argument("--head", choices=("1x", "2x"), default=None,
                   help="output head (default 1x; official Phaseformer: 2x; Spectroformer has only 1x)")
    p.add_argument("--tile", type=cli.int_range(64, 16384), default=None,
                   help=f"tile size in px for large images (a multiple of 8; default {DEFAULT_TILE}, or the size "
                        f"of an ONNX file exported for one size)")
    p.add_argument("--overlap", type=cli.int_range(0, 4096), default=32, help="tile overlap in px (at most a quarter tile)")
    p.add_argument("--gt", type=Path, default=None, help="reference images (same names) for --metrics")
    p.add_argument("--metrics", action="store_true", help="PSNR / SSIM against --gt into metrics.csv/json")
    p.add_argument("--device", default="auto")
    p.add_argument("--amp", default="off", choices=AMP_CHOICES, help="autocast dtype (the FFTs stay fp32)")
    p.add_argument("--overwrite", action="store_true", help="replace earlier outputs in --out")
    cli.add_threads_arg(p)
    cli.add_max_pixels_arg(p)
    add_engine_args(p, default_engine=None)
    args = p.parse_args(argv)
    resolve_engine(p, args)
    return args


def validate(args) -> None:
    if args.tile is not None and args.tile % DOWNSAMPLE_FACTOR:
        raise UserError(f"--tile {args.tile}: must be a multiple of {DOWNSAMPLE_FACTOR}")
    tile = args.tile or DEFAULT_TILE
    if args.overlap > tile // 4:
        raise UserError(f"--overlap {args.overlap}: must be between 0 and a quarter of --tile ({tile // 4})")
    if args.metrics and args.gt is None:
        raise UserError("--metrics needs --gt DIR (reference images with the same names)")
    if args.gt is not None and not args.gt.is_dir():
        raise UserError(f"--gt {args.gt}: not a folder")
    if args.engine == "onnxruntime":
        if args.preset == "official":
            raise UserError("--preset official ([-1, 1] inputs, bicubic 512x512) runs in PyTorch only: give "
                            "--weights; exported graphs are the ours preset")
        if args.amp != "off":
            raise UserError(f"--amp {args.amp}: PyTorch engine only (an exported graph runs in fp32)")


def main(argv=None):
    args = parse_args(argv)
    validate(args)
    cli.apply_runtime_args(args)
    out_dir = args.out or Path("runs") / "phaseformer" / f"infer-{time.strftime('%Y%m%d-%H%M%S')}"
    items = collect_inputs(args.inputs)
    written = [name for _, name in items] + (["metrics.csv", "metrics.json"] if args.metrics else [])
    refuse_output_over_inputs([("inputs", args.inputs), ("inputs", [path for path, _ in items]),
                               ("--weights", args.weights), ("--onnx", args.onnx), ("--gt", args.gt)],
                              folders=[("--out", out_dir, written)])
    check_output_dir(out_dir, written, args.overwrite)
    references = {name: find_reference(args.gt, name) for _, name in items} if args.metrics else {}

    if args.engine == "onnxruntime":
        model, info, tile = load_onnx(args)
        head, kind = model.head, info.get("model", "phaseformer")
        device, dtype = torch.device("cpu"), None         # ONNX Runtime takes host memory
        source = args.onnx
    else:
        device = select_device(args.device)
        dtype = amp_dtype(device, args.amp)
        state, info = read_weights(args.weights, args.model)
        kind = info["model"]
        head = args.head or ("2x" if args.preset == "official" and kind == "phaseformer" else "1x")
        if kind == "spectroformer" and head != "1x":
            raise UserError(f"--head {head}: Spectroformer ({args.weights}) has one output, at the input's size")
        if kind == "phaseformer" and args.preset == "official" and head == "1x":
            raise UserError("--preset official uses Phaseformer's 2x head, as the release's test.py does")
        model = build_model(kind)
        model.load_state_dict(state, strict=True)
        model = model.to(device).eval()
        tile, source = args.tile or DEFAULT_TILE, args.weights
    print(f"weights: {source} ({kind}, {info['kind']}); preset {args.preset}, {head} head"
          + (f", tiles of {tile} px (overlap {args.overlap})" if args.preset == "ours" else ""))

    rows = []
    for path, name in tqdm(items, desc="restoring", unit="image"):
        im, alpha = read_photo(path)
        if min(im.size) < MIN_SIDE:
            raise UserError(f"{path}: {im.size[0]}x{im.size[1]} px is too small for the model "
                            f"(at least {MIN_SIDE} px per side)")
        if args.preset == "official":
            result = official_postprocess(run_model(model, official_preprocess(im), head, device, dtype))
        else:
            x = image_to_tensor(im)[None]
            result = to_uint8(restore(model, x, head, tile, args.overlap, device, dtype))
        if alpha is not None and alpha.size == (result.shape[1], result.shape[0]):
            result = np.dstack([result, np.asarray(alpha)])
        save_image(out_dir / name, result)
        result = result[..., :3]
        if args.metrics:
            ref_path = references[name]
            ref = np.asarray(load_image(ref_path, "RGB"))
            if ref.shape != result.shape:
                raise UserError(f"{ref_path}: reference is {ref.shape[1]}x{ref.shape[0]} but the output for {path} "
                                f"is {result.shape[1]}x{result.shape[0]}")
            p_out, s_out = _metrics(result, ref)
            inp = np.asarray(im) if im.size == (ref.shape[1], ref.shape[0]) else \
                np.asarray(im.resize((ref.shape[1], ref.shape[0]), Image.BICUBIC))
            p_in, s_in = _metrics(inp, ref)
            rows.append({"image": name, "psnr": p_out, "ssim": s_out, "psnr_input": p_in, "ssim_input": s_in})
    print(f"{len(items)} image(s) restored into {out_dir}")

    if args.metrics:
        keys = ("psnr", "ssim", "psnr_input", "ssim_input")
        mean = {k: float(np.mean([r[k] for r in rows])) for k in keys}
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=["image", *keys])
        w.writeheader()
        for r in rows:
            w.writerow({"image": r["image"], **{k: f"{r[k]:.6f}" for k in keys}})
        atomic_write_text(out_dir / "metrics.csv", buf.getvalue())
        atomic_write_text(out_dir / "metrics.json", json.dumps(
            {"weights": str(source), "engine": args.engine, "preset": args.preset, "head": head, "mean": mean, "images": rows,
             "definitions": "PSNR on RGB in [0,1] (data range 1); SSIM: Gaussian window 11, sigma 1.5, "
                            "per channel, averaged; *_input: the input image itself as the restoration"},
            indent=2) + "\n")
        print(f"PSNR {mean['psnr']:.2f} dB, SSIM {mean['ssim']:.4f} over {len(rows)} image(s) "
              f"(input itself: {mean['psnr_input']:.2f} dB, {mean['ssim_input']:.4f}); "
              f"written to {out_dir / 'metrics.csv'} and {out_dir / 'metrics.json'}")


if __name__ == "__main__":
    sys.exit(run_cli(main))
