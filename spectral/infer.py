"""Predict spectra of metasurface structures with a trained model: ours, or CR_recon's own checkpoints.

  python spectral/infer.py --weights runs/spectral/cnn_xattn-.../best.pt --structs S.npy --out P.npy
  python spectral/infer.py --config CR_recon/configs/default.yaml --weights cnn_xattn_best.pt \\
      --structs S.npy --out P.npy                    # a CR_recon checkpoint: its config names the model
  python spectral/infer.py --weights best.pt --structs pngs/ --out P.npy --csv P.csv --plot plots/
  python spectral/infer.py --weights best.pt --structs S.npy --out P.npy --evaluate spectra_latest_0.npy
  python spectral/infer.py --engine onnxruntime --onnx xattn.onnx --structs S.npy --out P.npy   # scripts/export_onnx.py

--structs: a .npy of shape (N,1,128,128) or (N,128,128) with values 0/1 (any integer, bool or float
type), or a folder (or file) of 128x128 black-and-white PNGs. The model sees structure*2-1 (CR_recon's
map_to_pm1; structure as is when the config sets it false).
--out: (N,2,2,out_len) float32, the model's raw output: cells [[R,G],[G,B]], the spectra with
CR_recon's sign flip (positive), at the wavelengths `--csv` lists (400, 410, 420, 431, ... nm).
--weights: our best.pt / last.pt (the model comes from the checkpoint), or a CR_recon checkpoint
({model, optimizer, epoch, val_loss, best_val_loss}, saved on a GPU or not) or bare state_dict,
with --config for the model (the config's data files need not exist).
--evaluate: ground truth, raw (N,3,301) spectra (rows that are all zero are skipped) or (N,2,2,out_len)
targets; writes the metrics (loss of the config, MSE, mean Pearson r, RMSE per colour) as JSON.
--engine onnxruntime --onnx FILE runs an exported model (the same graph, spectral/deploy.py, with the
same outputs and files); its model, input mapping and loss come from the file.
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
from tqdm import tqdm

if __package__ in (None, ""):  # `python spectral/infer.py` from a checkout: import this checkout's packages
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common.checkpoint import require_task
from common.cli import ArgumentParser, add_max_pixels_arg, add_threads_arg, apply_runtime_args, int_range
from common.data import IMAGE_SUFFIXES, list_images
from common.device import AMP_CHOICES, amp_dtype, cpu_streams, select_device
from common.io import (UserError, strip_wrapper_prefixes, atomic_open, atomic_write_text, check_output_dir, check_output_file, load_image,
                       load_untrusted, one_line, refuse_output_over_inputs, run_cli)
from common.onnx import OrtModel, add_engine_args, check_task, resolve_engine, session
from spectral.config import check_config, load_config
from spectral.dashboard import plot_spectra
from spectral.data import N_POINTS, STRUCT_SHAPE, sample_indices, to_cells, wavelengths_nm
from spectral.deploy import TASK, SpectraGraph
from spectral.losses import CELL_NAMES, build_loss, check_loss_params, finish_metrics, spectral_metrics
from spectral.model import MODEL_NAMES, build_model, check_model_params, describe_weights, load_state_dict_checked


def parse_args(argv=None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", type=Path, help="best.pt / last.pt, or a CR_recon checkpoint (PyTorch engine)")
    p.add_argument("--config", type=Path, help="YAML config with the model (needed for CR_recon checkpoints; "
                                               "with --onnx, checked against the file)")
    p.add_argument("--structs", type=Path, required=True, help=".npy of structures, or a folder of PNGs")
    p.add_argument("--out", type=Path, help="predictions .npy (default runs/spectral/predictions-<time>.npy)")
    p.add_argument("--csv", type=Path, help="also write the predictions as CSV (one row per structure and cell)")
    p.add_argument("--plot", type=Path, metavar="DIR", help="also write a PNG of each structure's spectra (the first "
                                                            "--plot-max structures), with the ground truth when known")
    p.add_argument("--plot-max", type=int_range(1, 100000), default=16,
                   help="plot at most this many structures (default 16; the run says when it stops before the last)")
    p.add_argument("--evaluate", type=Path, metavar="SPECTRA", help="ground-truth spectra: write metrics JSON")
    p.add_argument("--metrics", type=Path, help="metrics JSON path (default: OUT with .metrics.json)")
    p.add_argument("--batch-size", type=int_range(1, 65536), default=256)
    p.add_argument("--device", default="auto", help="PyTorch engine: auto | cpu | cuda[:N] | mps | directml")
    p.add_argument("--no-channels-last", action="store_true",
                   help="PyTorch engine: NCHW activations (channels_last is faster on CPUs)")
    p.add_argument("--amp", default="off", choices=AMP_CHOICES,
                   help="PyTorch engine: autocast dtype (default off: fp32, CR_recon's numbers; bf16 ran 1.7x as "
                        "fast on a CPU with native bfloat16, within 1.5%% of the largest spectrum value)")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    add_threads_arg(p)
    add_max_pixels_arg(p)
    add_engine_args(p, default_engine=None)
    args = p.parse_args(argv)
    resolve_engine(p, args)
    if args.engine == "onnxruntime" and args.amp != "off":
        p.error(f"--amp {args.amp}: PyTorch engine only (an exported graph runs in fp32)")
    return args


# ---------------------------------------------------------------- model
def load_model(weights: Path, config: Path | None) -> tuple[torch.nn.Module, dict]:
    """(model in eval mode, config). Our checkpoints carry their config; CR_recon's need --config."""
    obj = load_untrusted(weights)
    require_task(obj, weights, "spectral", "a spectral/train.py checkpoint, or CR_recon weights with --config")
    ours = isinstance(obj, dict) and "format_version" in obj and isinstance(obj.get("extra"), dict) \
        and isinstance(obj["extra"].get("spectral"), dict)
    if ours:
        cfg = check_config(obj["extra"]["spectral"]["config"], str(weights), training=False)
        if config is not None:
            given = load_config(config, training=False)
            if given["model"] != cfg["model"]:
                raise UserError(f"{weights}: holds {cfg['model']['name']} {cfg['model']['params']}, but {config} "
                                f"asks for {given['model']['name']} {given['model']['params']}")
            cfg = {**cfg, "data": {**cfg["data"], "map_to_pm1": given["data"]["map_to_pm1"]}}
    elif config is not None:
        cfg = load_config(config, training=False)
    else:
        held = describe_weights(obj.get("model", obj) if isinstance(obj, dict) else {})
        what = f"{held['model']} weights" if held["model"] else "weights"
        raise UserError(f"{weights}: {what} without a config of this project; give --config with the YAML "
                        f"of the run that wrote them (its model section sets nhead, padding and the rest)")
    sd = obj["model"] if isinstance(obj, dict) and isinstance(obj.get("model"), dict) else obj
    if not isinstance(sd, dict) or not sd or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                     for k, v in sd.items()):
        raise UserError(f"{weights}: no model weights found (expected a checkpoint with a 'model' entry "
                        f"or a state_dict)")
    name, params = cfg["model"]["name"], cfg["model"]["params"]
    model = build_model(name, **params)
    load_state_dict_checked(model, name, params, strip_wrapper_prefixes(sd)[0], weights)
    return model.eval(), cfg


def load_onnx(args) -> tuple[OrtModel, dict]:
    """(the exported graph, the config it was exported with: model, data.map_to_pm1, loss) from an
    exported file; a file of another task, an unknown model or a size infer.py cannot feed is
    refused, and so is a --config that asks for another model or input mapping."""
    sess = session(args.onnx, args.providers, args.threads)
    meta = check_task(sess, args.onnx, TASK, "--weights best.pt")
    name = meta.get("model")
    if name not in MODEL_NAMES:
        raise UserError(f"{args.onnx}: its metadata names no spectral model (model={name!r})")
    try:
        params = check_model_params(name, json.loads(meta["model_params"]))
        loss = json.loads(meta["loss"])
        pm1 = json.loads(meta["map_to_pm1"])
        if not isinstance(pm1, bool):
            raise ValueError(f"map_to_pm1 {pm1!r}")
        cfg = {"model": {"name": name, "params": params}, "data": {"map_to_pm1": pm1},
               "loss": {"name": loss["name"], "params": check_loss_params(loss["name"], loss["params"])}}
    except (KeyError, TypeError, ValueError, UserError) as e:
        raise UserError(f"{args.onnx}: incomplete spectral metadata ({one_line(str(e))}); export it again with "
                        f"scripts/export_onnx.py") from None
    graph = OrtModel(sess)
    fixed = all(isinstance(d, int) for d in graph.shape[1:3])
    if fixed and tuple(graph.shape[1:3]) != STRUCT_SHAPE[1:]:
        raise UserError(f"{args.onnx}: the model takes {graph.shape[1]}x{graph.shape[2]} structures; infer.py reads "
                        f"128x128 ones (export it without --size)")
    out_len = sess.get_outputs()[0].shape[-1]
    if out_len != params["out_len"]:
        raise UserError(f"{args.onnx}: outputs {out_len} wavelengths, its metadata says out_len {params['out_len']}")
    if args.config is not None:
        given = load_config(args.config, training=False)
        if given["model"] != cfg["model"]:
            raise UserError(f"{args.onnx}: holds {name} {params}, but {args.config} asks for "
                            f"{given['model']['name']} {given['model']['params']}")
        if given["data"]["map_to_pm1"] != cfg["data"]["map_to_pm1"]:
            raise UserError(f"{args.onnx}: maps structures with map_to_pm1 {cfg['data']['map_to_pm1']}, but "
                            f"{args.config} sets {given['data']['map_to_pm1']} (export it again with that config)")
    return graph, cfg


# ---------------------------------------------------------------- structures
class NpyStructures:
    """Structures from a .npy, memory-mapped and read batch by batch."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self.array = np.load(path, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError, EOFError) as e:
            raise UserError(f"{path}: not a readable .npy file ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
        a = self.array
        if a.ndim == 3:
            a = a.reshape(a.shape[0], 1, *a.shape[1:])
        if a.ndim != 4 or tuple(a.shape[1:]) != STRUCT_SHAPE:
            raise UserError(f"{path}: structures must have shape (N,1,128,128) or (N,128,128), found {self.array.shape}")
        if a.dtype.kind not in "buif":
            raise UserError(f"{path}: structures must be numbers 0/1, found dtype {a.dtype}")
        if a.shape[0] == 0:
            raise UserError(f"{path}: holds no structures")
        self.array = a
        self.names = [str(i) for i in range(a.shape[0])]

    def __len__(self) -> int:
        return self.array.shape[0]

    def batch(self, start: int, stop: int) -> np.ndarray:
        a = np.asarray(self.array[start:stop])
        bad = ~((a == 0) | (a == 1))
        if bad.any():
            i = start + int(np.argmax(bad.reshape(len(a), -1).any(1)))
            v = a.reshape(len(a), -1)[i - start][bad.reshape(len(a), -1)[i - start]][0].item()
            raise UserError(f"{self.path}: structure {i} holds the value {v!r}; structures must be 0 or 1")
        return a.astype(np.float32)


class PngStructures:
    """Structures from 128x128 black-and-white images (0 / 255, or 0 / 1)."""

    def __init__(self, path: Path):
        self.paths = list_images(path)
        self.names = [p.name for p in self.paths]

    def __len__(self) -> int:
        return len(self.paths)

    def batch(self, start: int, stop: int) -> np.ndarray:
        out = []
        for p in self.paths[start:stop]:
            a = np.asarray(load_image(p, "L"))
            if a.shape != STRUCT_SHAPE[1:]:
                raise UserError(f"{p}: image is {a.shape[1]}x{a.shape[0]}, structures are 128x128")
            values = np.unique(a)
            if set(values.tolist()) <= {0, 255}:
                a = a // 255
            elif not set(values.tolist()) <= {0, 1}:
                raise UserError(f"{p}: not a black-and-white structure (values {values[:5].tolist()}...; "
                                f"expected only 0 and 255)")
            out.append(a[None].astype(np.float32))
        return np.stack(out)


def open_structures(path: Path):
    if path.is_file() and path.suffix.lower() == ".npy":
        return NpyStructures(path)
    if path.is_dir() or path.suffix.lower() in IMAGE_SUFFIXES:
        return PngStructures(path)
    if not path.exists():
        raise UserError(f"{path}: no such file or folder")
    raise UserError(f"{path}: expected a .npy file or a folder of PNG images")


@torch.inference_mode()
def predict(graph, structs, device: torch.device, batch_size: int, channels_last: bool) -> np.ndarray:
    """Spectra per structure; `graph` is SpectraGraph (PyTorch) or its exported OrtModel: structures
    in {0, 1} in."""
    out = []
    for start in tqdm(range(0, len(structs), batch_size), desc="predict", leave=False,
                      disable=len(structs) <= batch_size):
        x = torch.from_numpy(structs.batch(start, min(start + batch_size, len(structs)))).to(device)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        out.append(graph(x)[0].cpu().numpy())
    return np.concatenate(out)


# ---------------------------------------------------------------- outputs
def ground_truth(path: Path, n: int, out_len: int) -> tuple[np.ndarray, np.ndarray]:
    """(targets (M,2,2,out_len), indices of the structures they belong to)."""
    try:
        a = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise UserError(f"{path}: not a readable .npy file ({e})") from None
    if a.shape[:1] != (n,):
        raise UserError(f"{path}: {a.shape[0] if a.ndim else 0} rows of spectra for {n} structures")
    if a.dtype.kind != "f":
        raise UserError(f"{path}: spectra must be floating point, found dtype {a.dtype}")
    a = np.asarray(a, dtype=np.float32)
    if not np.isfinite(a).all():
        raise UserError(f"{path}: row {int(np.argmax(~np.isfinite(a).reshape(n, -1).all(1)))} holds NaN or inf")
    if a.shape[1:] == (3, N_POINTS):
        keep = np.flatnonzero((a != 0).any(axis=(1, 2)))
        return to_cells(-a[keep][:, :, sample_indices(out_len)]), keep
    if a.shape[1:] == (2, 2, out_len):
        return a, np.arange(n)
    raise UserError(f"{path}: expected raw spectra (N,3,{N_POINTS}) or targets (N,2,2,{out_len}), found {a.shape}")


def write_csv(path: Path, names: list[str], pred: np.ndarray) -> None:
    waves = wavelengths_nm(pred.shape[-1])
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["structure", "cell"] + [f"{v:g}nm" for v in waves])
    for name, p in zip(names, pred):
        for c, cell in enumerate(CELL_NAMES):
            w.writerow([name, cell] + [f"{v:.6g}" for v in p.reshape(4, -1)[c]])
    atomic_write_text(path, buf.getvalue())


def spectra_plot(structure: np.ndarray, pred: np.ndarray, truth: np.ndarray | None, title: str):
    """Figure (1000 x 420 px): the structure, and its R, G, B spectra against wavelength (nm), the
    prediction solid and, when known, the ground truth dashed."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with plt.rc_context({"font.size": 12}):
        fig, ax = plt.subplots(1, 2, figsize=(10, 4.2), dpi=100, gridspec_kw={"width_ratios": [1, 2.2]})
        ax[0].imshow(structure, cmap="gray", interpolation="nearest", vmin=0, vmax=1)
        ax[0].set_title("structure (128 x 128)")
        ax[0].axis("off")
        plot_spectra(ax[1], wavelengths_nm(pred.shape[-1]), pred, truth)
        ax[1].set_title(title + ("" if truth is not None else " (no ground truth given)"))
        fig.tight_layout()
    return fig


def write_plots(folder: Path, names: list[str], structs, pred: np.ndarray, limit: int,
                truth: tuple[np.ndarray, np.ndarray] | None = None) -> int:
    """spectra_00000.png, ... for the first `limit` structures; `truth` = (targets, their structure indices)."""
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    rows = {int(i): k for k, i in enumerate(truth[1])} if truth is not None else {}
    n = min(limit, len(names))
    for i in range(n):
        target = truth[0][rows[i]] if i in rows else None
        fig = spectra_plot(structs.batch(i, i + 1)[0, 0], pred[i], target, f"structure {names[i]}")
        with atomic_open(folder / f"spectra_{i:05d}.png", "wb") as f:
            fig.savefig(f, format="png")
        plt.close(fig)
    return n


def sibling_truth(structs: Path) -> Path | None:
    """CR_recon's layout (and the built-in data): binary_dataset_128_K.npy next to spectra_latest_K.npy."""
    if structs.suffix != ".npy" or not structs.name.startswith("binary_dataset_128_"):
        return None
    found = structs.with_name(structs.name.replace("binary_dataset_128_", "spectra_latest_"))
    return found if found.is_file() else None


def main(argv=None):
    args = parse_args(argv)
    apply_runtime_args(args, reuse_memory=True)
    out = args.out or Path("runs") / "spectral" / f"predictions-{time.strftime('%Y%m%d-%H%M%S')}.npy"
    metrics_path = (args.metrics or out.with_suffix(".metrics.json")) if args.evaluate else None
    plots = [f"spectra_{i:05d}.png" for i in range(args.plot_max)]
    refuse_output_over_inputs(
        [("--weights", args.weights), ("--onnx", args.onnx), ("--config", args.config), ("--structs", args.structs),
         ("--evaluate", args.evaluate)],
        files=[("--out", out), ("--csv", args.csv), ("--metrics", metrics_path)],
        folders=[("--plot", args.plot, plots)])
    check_output_file(out, args.overwrite)
    if args.csv:
        check_output_file(args.csv, args.overwrite, "--csv")
    if metrics_path:
        check_output_file(metrics_path, args.overwrite, "--metrics")
    if args.plot:
        check_output_dir(args.plot, plots, args.overwrite, "--plot")

    if args.engine == "onnxruntime":
        graph, cfg = load_onnx(args)
        device, channels_last = torch.device("cpu"), False   # ONNX Runtime takes host memory; the provider picks
    else:
        model, cfg = load_model(args.weights, args.config)
        device = select_device(args.device)
        channels_last = not args.no_channels_last and device.type == "cpu"
        model.to(device)
        if channels_last:
            model.to(memory_format=torch.channels_last)
        streams = cpu_streams() if device.type == "cpu" else 1
        if streams > 1:
            print(f"CPU: {streams} streams (the two halves of each batch at once) x {torch.get_num_threads()} thread(s)")
        dtype = amp_dtype(device, args.amp)
        if dtype is not None:
            print(f"autocast {str(dtype).removeprefix('torch.')}: predictions differ from fp32 in about the "
                  f"third digit (--amp off for CR_recon's numbers)")
        graph = SpectraGraph(model, cfg["data"]["map_to_pm1"], streams, dtype).eval()
    structs = open_structures(args.structs)
    out_len = cfg["model"]["params"]["out_len"]
    truth = ground_truth(args.evaluate, len(structs), out_len) if args.evaluate else None
    t0 = time.perf_counter()
    pred = predict(graph, structs, device, args.batch_size, channels_last)
    seconds = time.perf_counter() - t0

    buf = io.BytesIO()
    np.save(buf, pred.astype(np.float32))
    with atomic_open(out, "wb") as f:
        f.write(buf.getbuffer())
    print(f"{len(pred)} structure(s) in {seconds:.2f} s ({len(pred) / seconds:.1f}/s) with {cfg['model']['name']}"
          f"{' (onnxruntime)' if args.engine == 'onnxruntime' else ''}; "
          f"predictions {tuple(pred.shape)} written to {out}")
    if args.csv:
        write_csv(args.csv, structs.names, pred)
        print(f"CSV written to {args.csv}")
    if args.plot:
        shown, source = truth, args.evaluate
        if shown is None and (source := sibling_truth(args.structs)) is not None:
            shown = ground_truth(source, len(structs), out_len)
        n = write_plots(args.plot, structs.names, structs, pred, args.plot_max, shown)
        more = (f" (the first {n} of {len(pred)}: --plot-max {len(pred)} for all)" if n < len(pred) else "")
        print(f"{n} plot(s) written to {args.plot}{more}, "
              + (f"ground truth (dashed) from {source}" if shown is not None else
                 "predictions only (--evaluate SPECTRA adds the ground truth)"))
    if truth is not None:
        tgt, keep = truth
        p, t = torch.from_numpy(pred[keep]), torch.from_numpy(np.ascontiguousarray(tgt))
        loss = build_loss(cfg["loss"]["name"], **cfg["loss"]["params"])
        metrics = {"loss_name": cfg["loss"]["name"], "loss": float(loss(p, t)),
                   **{k.removeprefix("val_"): v for k, v in finish_metrics(spectral_metrics(p, t)).items()},
                   "structures": len(pred), "evaluated": int(len(keep)),
                   "skipped_not_simulated": int(len(pred) - len(keep)),
                   "weights": str(args.weights or args.onnx), "ground_truth": str(args.evaluate)}
        atomic_write_text(metrics_path, json.dumps(metrics, indent=2, allow_nan=False) + "\n")
        print(f"metrics on {len(keep)} structure(s): loss {metrics['loss']:.4g}, mse {metrics['mse']:.4g}, "
              f"pearson r {metrics['pearson_r']:.3f}; written to {metrics_path}")
    return pred


if __name__ == "__main__":
    sys.exit(run_cli(main))
