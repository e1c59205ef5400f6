"""Restore damaged grayscale images with a trained U-Net; write a submission-ready folder (and zip).

  python colorize/infer.py --weights runs/colorize/.../best.pt --input DATA/test.csv --out preds/ --zip
  python colorize/infer.py --weights best_model.pth --input test_input/ --out preds/ --size 128 --model improved_unet
  python colorize/infer.py --engine onnxruntime --onnx colorize.onnx --input DATA/test.csv --out preds/   # scripts/export_onnx.py

--weights takes a checkpoint of colorize/train.py (it knows its model, width and training size) or
one of the original's (`best_model.pth`, `model_epoch_N.pth`, `interrupted_model.pth`: a dict with
`model_state_dict`, saved on a GPU or not, with or without torch.compile's `_orig_mod.` prefix), or a
plain state_dict; the architecture is read from the weights and --model, when given, must agree.
--input is a folder of images, one image, or a test.csv (`input_image_path`, relative to the CSV).

Each input is read as RGB, resized to --size x --size (OpenCV INTER_LINEAR geometry, as the original
loaded it), restored, resized back to the input's own size, rounded to 8 bit and written as a PNG
with the input's file name (a .jpg input gives name.png). --zip also writes a flat zip of those
PNGs, the form the competition accepts (default OUT/submission.zip).

--engine onnxruntime --onnx FILE runs an exported model (the same graph, colorize/deploy.py, fed the
same resized images, with the same post-processing): its model and size come from the file (--size
only for a file exported with --dynamic-size). The PNGs equal the PyTorch engine's to one gray
level (the engines' floats differ by ~1e-6, which moves a few values across a rounding boundary).
"""
from __future__ import annotations

import argparse
import json
import sys
import zipfile
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

if __package__ in (None, ""):  # `python colorize/<script>.py` from a checkout: import this checkout's packages
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from colorize.data import TASK, load_rgb, read_inputs, resize_tensor, resize_u8, to_tensor, to_u8
from colorize.deploy import ColorizeGraph, check_size
from colorize.model import MODEL_NAMES, build_model, load_original_state
from common.checkpoint import require_task
from common.cli import (BATCH_SIZE, WORKERS, ArgumentParser, add_max_pixels_arg, add_threads_arg,
                        apply_runtime_args, int_range)
from common.data import list_images
from common.device import select_device
from common.io import (UserError, atomic_open, check_output_dir, check_output_file, load_state_strict, load_untrusted,
                       make_output_dir, refuse_output_over_inputs, run_cli, save_image)
from common.onnx import OrtModel, add_engine_args, open_exported, resolve_engine

ORIGINAL_SIZE = 128   # the original's default resolution


def parse_args(argv=None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", type=Path, help="best.pt / last.pt, or the original's best_model.pth (PyTorch engine)")
    p.add_argument("--input", type=Path, required=True, help="folder of images, an image, or test.csv")
    p.add_argument("--out", type=Path, required=True, help="folder for the restored PNGs")
    p.add_argument("--model", choices=MODEL_NAMES, help="architecture, checked against the weights")
    p.add_argument("--size", type=int_range(16, 4096), default=None,
                   help="model input size, a multiple of 16 (default: the checkpoint's training size; "
                        f"{ORIGINAL_SIZE} for the original's checkpoints; an ONNX file's own size)")
    p.add_argument("--zip", nargs="?", const="", default=None, metavar="PATH",
                   help="also write a flat zip of the PNGs (default OUT/submission.zip)")
    p.add_argument("--overwrite", action="store_true", help="replace PNGs / a zip already in the way")
    p.add_argument("--batch-size", type=BATCH_SIZE, default=8)
    p.add_argument("--workers", type=WORKERS, default=0, help="DataLoader processes reading the images")
    p.add_argument("--device", default="auto", help="PyTorch engine: auto | cpu | cuda[:N] | mps | directml")
    add_threads_arg(p)
    add_max_pixels_arg(p)
    add_engine_args(p, default_engine=None)
    args = p.parse_args(argv)
    resolve_engine(p, args)
    return args


# ---------------------------------------------------------------- model
def load_model(path: Path, model: str | None) -> tuple[torch.nn.Module, dict]:
    """(model in eval mode, {'model', 'width', 'img_size' or None, 'source'})."""
    # mapped, not read: the original's files carry AdamW state, three times the weights' size
    obj = load_untrusted(path, mmap=True)
    require_task(obj, path, TASK, "a colorize/train.py checkpoint or the original's weights")
    if isinstance(obj, dict) and "format_version" in obj and isinstance(obj.get("model"), dict):
        cfg = obj.get("config") or {}
        if cfg.get("task") != TASK or cfg.get("model") not in MODEL_NAMES:
            raise UserError(f"{path}: not a colorize checkpoint (its config names no colorize model)")
        name, width = cfg["model"], int(cfg.get("net_width", 64))
        if model is not None and model != name:
            raise UserError(f"{path}: the checkpoint holds a {name} model, not --model {model}")
        sd, info = obj["model"], {"img_size": cfg.get("net_img_size"), "source": f"colorize/train.py, epoch {obj.get('epoch')}"}
    else:
        sd, name, width = load_original_state(obj, path, model)
        info = {"img_size": None, "source": "original-format weights"}
    net = build_model(name, width)
    load_state_strict(net, sd, path)
    return net.eval(), {"model": name, "width": width, **info}


def traced_size(meta: dict[str, str], path: Path) -> tuple[int, int]:
    """The size a --dynamic-size file was exported at (the checkpoint's training size by default)."""
    try:
        h, w = (int(v) for v in json.loads(meta["image_size"]))
    except (KeyError, ValueError, TypeError):
        raise UserError(f"{path}: its metadata has no valid image_size: give --size") from None
    return h, w


def load_onnx(args) -> tuple[OrtModel, dict, tuple[int, int]]:
    """(the exported graph, {'model', 'width', 'source'}, the input size infer.py feeds it); a file of
    another task or model, or a --size the file cannot take, is refused."""
    sess, meta, name = open_exported(args, TASK, "--model NAME", "model", MODEL_NAMES, args.model)
    graph = OrtModel(sess)
    h, w = graph.shape[1:3]
    if isinstance(h, int) and isinstance(w, int):
        if args.size is not None and (args.size, args.size) != (h, w):
            raise UserError(f"--size {args.size}: {args.onnx} takes {h}x{w} images; leave --size out, or export "
                            f"with --size {args.size} {args.size} or --dynamic-size")
        size = (h, w)
    else:                                       # exported with --dynamic-size: any multiple of 16
        size = (args.size, args.size) if args.size else traced_size(meta, args.onnx)
    check_size(name, size, f"--size {args.size}" if args.size else str(args.onnx))
    return graph, {"model": name, "width": meta.get("width", "?"), "source": f"ONNX Runtime, {args.onnx.name}"}, size


# ---------------------------------------------------------------- inputs
def collect_inputs(item: Path) -> list[Path]:
    if item.suffix.lower() == ".csv" and item.is_file():
        return read_inputs(item)
    return list_images(item)


def output_names(paths: list[Path]) -> list[str]:
    """name.png per input; two inputs with the same name cannot share the flat output folder."""
    names, seen = [], {}
    for p in paths:
        name = p.stem + ".png"
        if name in seen:
            raise UserError(f"{p}: same output name {name} as {seen[name]} (the output folder and the zip are flat)")
        seen[name] = p
        names.append(name)
    return names


class InputImages(Dataset):
    """(image resized to `size` = (h, w) in [0, 1], the image's own (h, w))."""

    def __init__(self, paths: list[Path], size: tuple[int, int]):
        self.paths, self.size = paths, size

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        rgb = load_rgb(self.paths[i])
        return to_tensor(resize_u8(rgb, self.size)), torch.tensor(rgb.shape[:2])


# ---------------------------------------------------------------- output
def restore_to_size(pred: torch.Tensor, hw: tuple[int, int]) -> np.ndarray:
    """(3, S, S) model output -> uint8 (H, W, 3) at the input's size, bilinear, rounded."""
    return to_u8(resize_tensor(pred.float(), hw).clamp_(0, 1))


def write_zip(path: Path, folder: Path, names: list[str]) -> None:
    with atomic_open(path, "wb") as f, zipfile.ZipFile(f, "w", compression=zipfile.ZIP_DEFLATED) as z:
        for n in names:
            z.write(folder / n, arcname=n)


def main(argv=None):
    args = parse_args(argv)
    apply_runtime_args(args)
    if args.size is not None and args.size % 16:
        raise UserError(f"--size {args.size}: must be a multiple of 16 (the U-Nets pool four times)")
    paths = collect_inputs(args.input)
    names = output_names(paths)
    zip_path = None
    if args.zip is not None:
        zip_path = Path(args.zip) if args.zip else args.out / "submission.zip"
        if zip_path.suffix.lower() != ".zip":
            raise UserError(f"--zip {zip_path}: expected a .zip file name")
    # every check before any work: no input is ever replaced, nor an earlier output without --overwrite
    refuse_output_over_inputs([("--weights", args.weights), ("--onnx", args.onnx), ("--input", args.input),
                               ("--input", paths)],
                              files=[("--zip", zip_path)], folders=[("--out", args.out, names)])
    check_output_dir(args.out, names, args.overwrite)
    if zip_path is not None:
        check_output_file(zip_path, args.overwrite, flag="--zip")
    if args.engine == "onnxruntime":
        graph, info, size = load_onnx(args)
        device, layout = torch.device("cpu"), torch.contiguous_format   # ONNX Runtime takes host memory
    else:
        net, info = load_model(args.weights, args.model)
        side = args.size or info["img_size"] or ORIGINAL_SIZE
        if args.size is None and info["img_size"] is None:
            print(f"note: the weights do not record their training size: using {ORIGINAL_SIZE} (the original's "
                  f"default); give --size to match how they were trained")
        size = (side, side)
        check_size(info["model"], size, f"--size {side}")
        device = select_device(args.device)
        # NHWC suits cuDNN; on the CPU both layouts run at about the same speed
        layout = torch.channels_last if device.type == "cuda" else torch.contiguous_format
        graph = ColorizeGraph(net).to(device, memory_format=layout).eval()
    print(f"{info['model']} width {info['width']} ({info['source']}) at {size[0]}x{size[1]}: {len(paths)} image(s) "
          f"from {args.input}")

    make_output_dir(args.out)
    loader = DataLoader(InputImages(paths, size), batch_size=args.batch_size, num_workers=args.workers)
    done = 0
    with torch.inference_mode():
        for x, hw in tqdm(loader, desc="restoring", leave=False, disable=len(loader) < 2):
            pred = graph(x.to(device).contiguous(memory_format=layout))[0].cpu()
            for p, (h, w) in zip(pred, hw.tolist()):
                save_image(args.out / names[done], restore_to_size(p, (h, w)))
                done += 1
    print(f"{done} restored image(s) written to {args.out}")
    if zip_path is not None:
        write_zip(zip_path, args.out, names)
        print(f"submission zip ({len(names)} PNGs, no folders): {zip_path}")


if __name__ == "__main__":
    sys.exit(run_cli(main))
