"""ONNX export and ONNX Runtime inference, shared by scripts/export_onnx.py and every infer.py.

A task describes its deployed graph in `<task>/deploy.py` (an nn.Module taking the tensors infer.py
feeds and returning a tuple of the tensors it reads, plus the metadata of the contract); this module
exports it, checks the file, compares ONNX Runtime with PyTorch, and runs exported files.

Exporter: torch.onnx.export(dynamo=False), the TorchScript tracer (see README, "Deploy").
Metadata: every file carries string key/value pairs (ModelProto.metadata_props): `task`, `model`,
`inputs`, `outputs`, ... (lists and numbers as JSON text); infer.py refuses a file of another task
or model by them.
"""
from __future__ import annotations

import io
import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn as nn

from common.io import UserError, atomic_open, one_line

DEFAULT_OPSET = 17
MAX_OPSET = 20                  # the TorchScript exporter's newest opset
FORMAT_VERSION = "1"
PROVIDER_ORDER = ("CUDAExecutionProvider", "DmlExecutionProvider", "CoreMLExecutionProvider",
                  "CPUExecutionProvider")


def require_onnxruntime():
    try:
        import onnxruntime
    except ImportError:
        raise UserError("onnxruntime is not installed: pip install onnxruntime (CPU), onnxruntime-gpu (CUDA) "
                        "or onnxruntime-directml (Windows GPUs)") from None
    return onnxruntime


@dataclass
class ExportSpec:
    """What a task's deploy.export_spec() hands to scripts/export_onnx.py."""
    module: nn.Module                               # the deployed graph, eval mode: tensors -> tuple of tensors
    # (batch, generator[, (h, w)]) -> inputs, default: the export size. Inputs that look like the task's
    # data (its built-in generator, preprocessed as infer.py does): they trace the graph and check its
    # parity. Random noise is no test: far outside the data, a trained network's activations grow
    # large enough that float32 rounding alone moves the output (see README, Deploy)
    make_inputs: Callable[..., tuple]
    input_names: list[str]
    output_names: list[str]
    metadata: dict
    # parity, per output: max |ONNX Runtime - PyTorch| <= tolerance * (max |PyTorch| + scale_floor); the
    # floor keeps an output that is near zero everywhere from being held to a vanishing limit
    tolerance: float = 1e-4
    scale_floor: float = 0.1
    notes: list[str] = field(default_factory=list)  # printed after the export
    # inputs/outputs whose dims 2, 3 are height and width when the graph takes any size (--dynamic-size);
    # empty: the graph is traced for one size only
    spatial: tuple[str, ...] = ()
    size_multiple: int = 1                          # with --dynamic-size: H and W must be multiples of this


# ---------------------------------------------------------------- export
def export(spec: ExportSpec, *, batch: int, dynamic_batch: bool, opset: int = DEFAULT_OPSET,
           dynamic_size: bool = False) -> bytes:
    """The serialized ONNX model, checked by onnx.checker, with the spec's metadata."""
    import onnx

    if dynamic_size and not spec.spatial:
        raise UserError(f"--dynamic-size: the {spec.metadata.get('task')} {spec.metadata.get('model')} graph is "
                        f"exported for one input size only; give --size H W")
    module = spec.module.eval()   # the exporter restores the mode it found, recursively: never a wrapper in train mode
    example = spec.make_inputs(batch, torch.Generator().manual_seed(0))
    buf = io.BytesIO()
    axes = {n: {0: "batch"} if dynamic_batch else {} for n in (*spec.input_names, *spec.output_names)}
    if dynamic_size:
        for n in spec.spatial:
            axes[n].update({2: "height", 3: "width"})
    axes = {n: a for n, a in axes.items() if a} or None
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)   # nn.MultiheadAttention's fused eval kernel has no ONNX form
    try:
        with warnings.catch_warnings(), torch.no_grad():
            # the tracer's notes about Python ints and the exporter's deprecation notice are expected here
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.filterwarnings("ignore", message="Constant folding")   # ONNX Runtime folds what is left
            # GRU: the batch is dynamic and checked at 1 and 3 after the export anyway
            warnings.filterwarnings("ignore", message="Exporting a model to ONNX with a batch_size other than 1")
            # InstanceNormalization always uses each image's own statistics, as InstanceNorm2d
            # without running statistics does in eval mode too
            warnings.filterwarnings("ignore", message=r"ONNX export mode is set to TrainingMode\.EVAL, but operator "
                                                      r"'instance_norm'")
            torch.onnx.export(module, example, buf, dynamo=False, opset_version=opset, input_names=spec.input_names,
                              output_names=spec.output_names, dynamic_axes=axes, do_constant_folding=True)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    model = onnx.load_from_string(buf.getvalue())
    meta = {"format_version": FORMAT_VERSION, "producer": "industrial-vision scripts/export_onnx.py",
            "torch_version": torch.__version__, **spec.metadata}
    for key, value in meta.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value if isinstance(value, str) else json.dumps(value)
    data = model.SerializeToString()
    onnx.checker.check_model(data, full_check=True)
    return data


def data_rng(g: torch.Generator) -> np.random.Generator:
    """A numpy generator seeded from `g`: the tasks' built-in data generators draw with numpy."""
    return np.random.default_rng(int(torch.randint(0, 2**31 - 1, (1,), generator=g)))


def image_batch(images: Sequence[np.ndarray], hw: tuple[int, int]) -> torch.Tensor:
    """HxWxC images (uint8 0-255 or float in [0, 1]) -> (N, C, H, W) float32 in [0, 1], each resized
    (bilinear, antialiased) to hw where it differs."""
    out = []
    for a in images:
        t = torch.from_numpy(np.ascontiguousarray(a)).permute(2, 0, 1).float()
        t = t / 255.0 if a.dtype == np.uint8 else t
        if tuple(t.shape[1:]) != tuple(hw):
            t = torch.nn.functional.interpolate(t[None], size=tuple(hw), mode="bilinear", align_corners=False,
                                                antialias=True)[0]
        out.append(t.clamp(0.0, 1.0))
    return torch.stack(out)


def compare(data: bytes, spec: ExportSpec, batches: Sequence[int], seed: int = 0,
            sizes: Sequence[tuple[int, int] | None] = (None,)) -> dict[str, tuple[float, float]]:
    """Run the file on the ONNX Runtime CPU provider and the module in PyTorch on spec.make_inputs
    (data-like inputs) of each batch size (and each input size; None: the export size);
    {output name: (max |difference|, max |PyTorch output|)} over all of them. An integer output (a
    predicted class) has difference inf where any element disagrees, else 0."""
    sess = session(data, ["CPUExecutionProvider"], verbose=False, name="exported model")
    ort_model = OrtModel(sess)
    g = torch.Generator().manual_seed(seed)
    worst = {n: (0.0, 0.0) for n in spec.output_names}
    for batch, size in ((b, s) for s in sizes for b in batches):
        inputs = spec.make_inputs(batch, g) if size is None else spec.make_inputs(batch, g, size)
        with torch.inference_mode():
            ref = spec.module(*inputs)
        got = ort_model(*inputs)
        for name, r, o in zip(spec.output_names, ref, got):
            if tuple(r.shape) != tuple(o.shape):
                raise UserError(f"exported model: output {name} has shape {tuple(o.shape)} in ONNX Runtime, "
                                f"{tuple(r.shape)} in PyTorch")
            if r.dtype.is_floating_point:
                d, scale = float((o.double() - r.double()).abs().max()), float(r.double().abs().max())
            else:
                d, scale = (float("inf") if bool((o != r).any()) else 0.0), 1.0
            worst[name] = (max(worst[name][0], d), max(worst[name][1], scale))
    return worst


def parity_limit(scale: float, tolerance: float, floor: float) -> float:
    """The largest |ONNX Runtime - PyTorch| accepted for an output whose largest |value| is `scale`."""
    return tolerance * (scale + floor)


def write(data: bytes, path: str | os.PathLike) -> None:
    with atomic_open(path, "wb") as f:
        f.write(data)


# ---------------------------------------------------------------- running exported files
def session(model: str | os.PathLike | bytes, providers: Sequence[str] | None = None, threads: int = 0,
            verbose: bool = True, name: str | None = None):
    """An ONNX Runtime session on the first available provider of `providers` (default: CUDA,
    DirectML, CoreML, CPU); prints the one in use. Missing, corrupt or foreign files are UserErrors."""
    ort = require_onnxruntime()
    if isinstance(model, (str, os.PathLike)):
        path = Path(model)
        name = name or str(path)
        if path.is_dir():
            raise UserError(f"{path}: is a folder, expected an .onnx file")
        if not path.is_file():
            raise UserError(f"{path}: ONNX model not found")
        if path.stat().st_size == 0:
            raise UserError(f"{path}: file is empty")
        model = str(path)
    available = ort.get_available_providers()
    wanted = list(providers) if providers else [p for p in PROVIDER_ORDER if p in available]
    usable = [p for p in wanted if p in available]
    if not usable:
        raise UserError(f"--providers {','.join(wanted)}: none of them is available in onnxruntime {ort.__version__} "
                        f"(available: {', '.join(available)}); DirectML needs onnxruntime-directml, CUDA "
                        f"onnxruntime-gpu")
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    # idle worker threads sleep instead of spinning: on a machine that runs other programs, spinning
    # threads take the cores the working ones need (CRBL at batch 32 on two busy cores ran at half speed)
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads:
        opts.intra_op_num_threads = threads
    try:
        sess = ort.InferenceSession(model, opts, providers=usable)
    except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types for bad files
        raise UserError(f"{name}: not a loadable ONNX model ({one_line(str(e))[:300]})") from None
    used = sess.get_providers()[0]
    if verbose:
        fell_back = f" ({usable[0]} could not start)" if used != usable[0] else ""
        print(f"onnxruntime {ort.__version__}: {used}{fell_back}")
    return sess


def read_metadata(sess) -> dict[str, str]:
    return dict(sess.get_modelmeta().custom_metadata_map)


def check_task(sess, path, task: str, hint: str) -> dict[str, str]:
    """The file's metadata, or one UserError if it was not exported for `task` by export_onnx.py."""
    meta = read_metadata(sess)
    if meta.get("task") != task:
        made = f"it was exported for {meta['task']}" if "task" in meta else \
            "it has no metadata from scripts/export_onnx.py"
        raise UserError(f"{path}: not a {task} model ({made}); export one with "
                        f"scripts/export_onnx.py --task {task} {hint}")
    if meta.get("precision", "fp32") != "fp32":         # scripts/export_onnx.py --int8 (common.quantize)
        from common.quantize import precision_note
        print(f"{path}: {precision_note(meta) or meta['precision']}")
    return meta


def parse_providers(text: str) -> list[str]:
    """--providers A,B,C -> [A, B, C]; short names (cuda, dml, directml, cpu, coreml) accepted."""
    short = {"cuda": "CUDAExecutionProvider", "dml": "DmlExecutionProvider", "directml": "DmlExecutionProvider",
             "cpu": "CPUExecutionProvider", "coreml": "CoreMLExecutionProvider",
             "openvino": "OpenVINOExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}
    names = [short.get(p.strip().lower(), p.strip()) for p in text.split(",") if p.strip()]
    if not names:
        raise UserError("--providers: empty list")
    return names


def add_engine_args(p, default_engine: str | None = "torch") -> None:
    """--engine torch|onnxruntime, --onnx FILE, --providers LIST."""
    g = p.add_argument_group("ONNX Runtime")
    g.add_argument("--engine", choices=("torch", "onnxruntime"), default=default_engine,
                   help="torch (default) or onnxruntime (needs --onnx, from scripts/export_onnx.py)")
    g.add_argument("--onnx", type=Path, help="the exported model for --engine onnxruntime")
    g.add_argument("--providers", type=parse_providers, default=None,
                   help="execution providers in order of preference, e.g. DmlExecutionProvider,CPUExecutionProvider "
                        "(default: CUDA, DirectML, CoreML, CPU, whichever are installed); the first available is used")


def resolve_engine(p, args) -> None:
    """The engine a parsed command line asks for (--onnx alone means onnxruntime), and a usage error
    for --weights with --engine onnxruntime, --onnx without it, or neither file. For infer.py
    scripts with one --weights file and add_engine_args(p, default_engine=None)."""
    if args.engine is None:
        args.engine = "onnxruntime" if args.onnx is not None else "torch"
    if args.engine == "onnxruntime":
        if args.onnx is None or args.weights is not None:
            p.error("--engine onnxruntime runs an exported model: give --onnx FILE (from scripts/export_onnx.py), "
                    "not --weights")
    elif args.onnx is not None:
        p.error("--onnx needs --engine onnxruntime")
    elif args.weights is None:
        p.error("give --weights (or --engine onnxruntime --onnx FILE)")


def open_exported(args, task: str, export_hint: str, key: str, valid, wanted=None):
    """(session, metadata, metadata[key]) of args.onnx, refused in one line unless it was exported for
    `task` with a `key` (model, head) in `valid` that equals `wanted` when the user gave one."""
    sess = session(args.onnx, args.providers, args.threads)
    meta = check_task(sess, args.onnx, task, export_hint)
    value = meta.get(key)
    if value not in valid:
        raise UserError(f"{args.onnx}: its metadata names no {task} {key} ({key}={value!r})")
    if wanted is not None and wanted != value:
        raise UserError(f"{args.onnx}: holds a {value} {key}, not --{key} {wanted}")
    return sess, meta, value


class OrtModel:
    """An ONNX Runtime session called like the PyTorch graph it was exported from: tensors in, a
    tuple of CPU tensors out. A file exported with a fixed batch size takes any batch (chunks; the
    last one padded by repeating its last sample, then cut)."""

    def __init__(self, sess):
        self.sess = sess
        self.inputs = sess.get_inputs()
        self.output_names = [o.name for o in sess.get_outputs()]
        first = self.inputs[0].shape
        self.batch = first[0] if isinstance(first[0], int) else None
        self.shape = tuple(first[1:])

    def __call__(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        arrays = [np.ascontiguousarray(t.detach().cpu().numpy(), dtype=np.float32) for t in tensors]
        n = arrays[0].shape[0]
        if self.batch is None or n == self.batch:
            return tuple(torch.from_numpy(o) for o in self._run(arrays))
        outs = []
        for i in range(0, n, self.batch):
            chunk = [a[i:i + self.batch] for a in arrays]
            short = self.batch - chunk[0].shape[0]
            if short:
                chunk = [np.concatenate([c, np.repeat(c[-1:], short, 0)]) for c in chunk]
            outs.append([o[:self.batch - short] for o in self._run(chunk)])
        return tuple(torch.from_numpy(np.concatenate(parts)) for parts in zip(*outs))

    def _run(self, arrays):
        for a, spec in zip(arrays, self.inputs):
            fixed = [d for d in spec.shape[1:]]
            if all(isinstance(d, int) for d in fixed) and list(a.shape[1:]) != fixed:
                raise UserError(f"the ONNX model takes {spec.name} of shape (N, {', '.join(map(str, fixed))}), "
                                f"got {tuple(a.shape)}")
        return self.sess.run(self.output_names, {s.name: a for s, a in zip(self.inputs, arrays)})
