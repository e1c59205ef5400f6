"""Static int8 quantisation of exported models (ONNX Runtime, QDQ), with an accuracy guard.

scripts/export_onnx.py --int8 --calib DATA calls quantize_with_guard(): the task's deploy module
reads DATA (images with labels where the task has them), the images are split into a calibration
half and a held-out half (alternating within each class), the fp32 graph is quantised by each
recipe in turn on the calibration half, and the first recipe whose outputs on the held-out half
pass the guard against the fp32 graph is written:

    scores (crbl probability, ae score): Spearman rank correlation >= 0.99, |AUC int8 - AUC fp32|
        <= 0.01 where the data has both labels, the same decision at the stored threshold for >= 99 %
    classifiers: the same top-1 class for >= 99 % of the held-out images

Why recipes and not "quantise everything": CRBL's bilinear head (outer product of two feature maps,
signed square root, L2 normalisation) and its sigmoid near the 0.01 threshold do not survive int8
(the whole graph quantised, measured on a demo model:
Spearman with fp32 -0.80, AUC 0.95 -> 0.09). Everything after
the last convolution (pooling, bilinear head, dense layers, softmax / sigmoid, the AE's error)
stays fp32 in every recipe but `all`; it is a small share of the arithmetic.
The recipe, calibration method, weight granularity and the guard's numbers go into the file's
metadata (`precision`, `quantization`, `int8_guard`), which infer.py prints.
"""
from __future__ import annotations

import json
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from common.io import UserError

MIN_IMAGES = 32                 # 16 to calibrate, 16 held out: fewer say nothing about the guard
MAX_IMAGES = 256                # Percentile / Entropy hold every activation of the calibration half
GUARD = {"spearman": 0.99, "auc_delta": 0.01, "decisions": 0.99, "top1": 0.99}
CALIB_BATCH = 8


@dataclass(frozen=True)
class Recipe:
    name: str
    op_types: tuple[str, ...] | None    # None: every operator type ONNX Runtime quantises
    features_only: bool                 # leave every node that no Conv follows in fp32 (the head)
    per_channel: bool = True            # one weight scale per output channel (else per tensor)
    method: str = "MinMax"              # calibration: MinMax | Entropy | Percentile
    about: str = ""
    # convolutions also kept fp32: "se" (squeeze-excitation convs on pooled 1x1 maps: no time to
    # save, measurable error), "depthwise" (grouped convs), "edges" (the first and the last convs)
    keep_fp32: tuple[str, ...] = ()


RECIPES = {r.name: r for r in (
    Recipe("features", None, True, method="Percentile",
           about="every quantisable operator up to the last convolution in int8 (convolutions, activations, "
                 "SE blocks), activation ranges clipped at the 99.999th percentile; the head after it in fp32"),
    Recipe("features-minmax", None, True, about="as features, with activation ranges from their min and max"),
    Recipe("conv", ("Conv",), True, method="Percentile", keep_fp32=("se", "depthwise", "edges"),
           about="the full convolutions in int8 but the first and last ones (depthwise and SE convs, activations "
                 "and the head fp32): the most accurate, 4x smaller weights, barely faster than fp32"),
    Recipe("all", None, False, about="the whole graph naively, head included (MinMax): for comparison; fails the "
                                     "guard on CRBL"),
)}
DEFAULT_ORDER = ("features", "conv")


# ---------------------------------------------------------------- calibration data
@dataclass
class CalibrationSet:
    inputs: tuple[torch.Tensor, ...]    # every image, as the graph's inputs (N, ...)
    labels: torch.Tensor | None         # binary (1 = defect) for the AUC check, class indices for classifiers
    source: str

    def __len__(self) -> int:
        return int(self.inputs[0].shape[0])


def check_count(n: int, source: str) -> None:
    if n < MIN_IMAGES:
        raise UserError(f"--calib {source}: {n} image(s); int8 calibration needs at least {MIN_IMAGES} "
                        f"(half calibrate, half check the accuracy guard)")


def split_indices(n: int, labels: torch.Tensor | None) -> tuple[list[int], list[int]]:
    """(calibration, held-out): alternate images within each class, so both halves see every class."""
    order = sorted(range(n), key=lambda i: (int(labels[i]) if labels is not None else 0, i))
    return order[0::2], order[1::2]


def feeds(inputs: tuple[torch.Tensor, ...], names: list[str], batch: int | None,
          size: int = CALIB_BATCH) -> list[dict[str, np.ndarray]]:
    """Input dicts for ONNX Runtime in batches of `size` (a graph with a fixed batch: that batch, the
    last one padded by repeats)."""
    size = batch or size
    n = int(inputs[0].shape[0])
    out = []
    for i in range(0, n, size):
        parts = [t[i:i + size].numpy().astype(np.float32) for t in inputs]
        short = size - parts[0].shape[0] if batch else 0
        if short:
            parts = [np.concatenate([p, np.repeat(p[-1:], short, 0)]) for p in parts]
        out.append(dict(zip(names, parts)))
    return out


# ---------------------------------------------------------------- quantisation
def prepare(data: bytes, workdir: Path) -> Path:
    """ONNX Runtime's recommended pre-processing (shape inference, graph optimisation) for quantisation."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    src, dst = workdir / "fp32.onnx", workdir / "prepared.onnx"
    src.write_bytes(data)
    quant_pre_process(str(src), str(dst))
    return dst


def excluded_after_last_conv(model) -> list[str]:
    """Names of the nodes that no Conv follows (the head: CRBL's bilinear pooling and what comes after it,
    the dense layers, softmax / sigmoid, the AE's error). Found from the graph's edges, not from the
    position of the last Conv in the node list: in a two-branch graph (CRBL) the sorted list may place
    one branch's final activation before the other branch's last Conv."""
    nodes = list(model.graph.node)
    used_by: dict[str, list] = {}
    for n in nodes:
        for i in n.input:
            used_by.setdefault(i, []).append(n)
    conv_after: dict[str, bool] = {}
    for n in reversed(nodes):               # topologically sorted: a node's consumers come after it
        conv_after[n.name] = any(m.op_type == "Conv" or conv_after[m.name] for o in n.output
                                 for m in used_by.get(o, []))
    return [n.name for n in nodes if n.op_type != "Conv" and not conv_after[n.name]]


def kept_convs(model, rules: tuple[str, ...]) -> list[str]:
    """Names of the Conv nodes that Recipe.keep_fp32's rules keep in fp32."""
    nodes, convs = list(model.graph.node), [n for n in model.graph.node if n.op_type == "Conv"]
    weights = {t.name for t in model.graph.initializer}
    keep = set()
    if "se" in rules:                   # convs whose input derives from a GlobalAveragePool alone
        pooled = set()
        for n in nodes:
            if n.op_type == "GlobalAveragePool" or (n.input and all(i in pooled or i in weights for i in n.input if i)):
                pooled.update(n.output)
        keep |= {n.name for n in convs if n.input[0] in pooled}
    if "depthwise" in rules:
        keep |= {n.name for n in convs if any(a.name == "group" and a.i > 1 for a in n.attribute)}
    if "edges" in rules:                # no Conv before it, or none after it
        made_by = {o: n for n in nodes for o in n.output}
        used_by: dict[str, list] = {}
        for n in nodes:
            for i in n.input:
                used_by.setdefault(i, []).append(n)

        def convs_beyond(start, step) -> bool:
            seen, todo = set(), [start]
            while todo:
                for m in step(todo.pop()):
                    if m.name not in seen:
                        if m.op_type == "Conv":
                            return True
                        seen.add(m.name)
                        todo.append(m)
            return False
        keep |= {n.name for n in convs
                 if not convs_beyond(n, lambda k: [made_by[i] for i in k.input if i in made_by])
                 or not convs_beyond(n, lambda k: [m for o in k.output for m in used_by.get(o, [])])}
    return sorted(keep)


def quantize(prepared: Path, recipe: Recipe, calib: list[dict[str, np.ndarray]], workdir: Path) -> tuple[bytes, str]:
    """(the QDQ int8 model of a prepared fp32 file (uint8 activations, int8 symmetric weights), the
    calibration method used: the recipe's, or MinMax where ONNX Runtime's histogram of a tensor failed)."""
    import inspect

    import onnx
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          create_calibrator, quantize_static, save_tensors_data)

    class Reader(CalibrationDataReader):
        def __init__(self, start: int, end: int):
            self.it = iter(calib[start:end])

        def get_next(self):
            return next(self.it, None)

    if "calibration_cache_path" not in inspect.signature(quantize_static).parameters:
        import onnxruntime
        raise UserError(f"--int8 needs a newer onnxruntime (quantize_static with calibration_cache_path; installed: "
                        f"{onnxruntime.__version__}): pip install -U onnxruntime")
    model = onnx.load(str(prepared))
    for i, node in enumerate(model.graph.node):     # exclusion and the metadata need every node named
        node.name = node.name or f"node_{i}_{node.op_type}"
    named = workdir / "named.onnx"
    onnx.save(model, str(named))
    head = excluded_after_last_conv(model) if recipe.features_only else []
    exclude = head + kept_convs(model, recipe.keep_fp32)
    op_types = list(recipe.op_types) if recipe.op_types else None
    method = getattr(CalibrationMethod, recipe.method)
    # Calibration here rather than inside quantize_static: the fp32 head's own tensors are left out
    # of the histograms (CRBL's exact sign is Clip(phi * 2^127), whose product is inf for |phi| > 2,
    # and a histogram of inf fails), and a few images at a time, the ranges / histograms merged
    # (ONNX Runtime's CalibMaxIntermediateOutputs drops the data it clears).
    def calibrate(method):
        calibrator = create_calibrator(named, op_types, augmented_model_path=str(workdir / "augmented.onnx"),
                                       calibrate_method=method)
        if getattr(calibrator, "tensors_to_calibrate", None):
            calibrator.tensors_to_calibrate -= {o for n in model.graph.node if n.name in set(head) for o in n.output}
        for start in range(0, len(calib), 4):
            calibrator.collect_data(Reader(start, start + 4))
        return calibrator.compute_data()

    try:
        tensors = calibrate(method)
    except ValueError as e:             # numpy: "Too many bins for data range" on a near-constant tensor
        if method == CalibrationMethod.MinMax:
            raise
        print(f"  note: {recipe.method} calibration failed in ONNX Runtime ({str(e)[:80]}); MinMax ranges used")
        method = CalibrationMethod.MinMax
        tensors = calibrate(method)
    ranges = workdir / f"{recipe.name}.ranges.json"
    save_tensors_data(tensors, ranges)
    out = workdir / f"{recipe.name}.onnx"
    quantize_static(str(named), str(out), None, quant_format=QuantFormat.QDQ, per_channel=recipe.per_channel,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, op_types_to_quantize=op_types,
                    nodes_to_exclude=exclude, calibrate_method=method, calibration_cache_path=str(ranges))
    return out.read_bytes(), method.name


# ---------------------------------------------------------------- the guard
def ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n, ties sharing their mean rank."""
    order = np.argsort(x, kind="mergesort")
    r = np.empty(len(x))
    r[order] = np.arange(1, len(x) + 1)
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=r)
    return sums[inverse] / counts[inverse]


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = ranks(np.asarray(a, np.float64)), ranks(np.asarray(b, np.float64))
    if ra.std() == 0 or rb.std() == 0:
        return 1.0 if np.array_equal(ra, rb) else 0.0
    return float(np.corrcoef(ra, rb)[0, 1])


def close_pairs(scores: np.ndarray, gap: float) -> float:
    """The share of the pairs of `scores` that lie less than `gap` apart: near-ties whose order an error
    of that size can swap (a Spearman failure with many of them is int8 noise among near-equal scores,
    e.g. the normal images of a weak model, rather than a changed ranking of distinct ones)."""
    s = np.sort(np.asarray(scores, np.float64))
    n = len(s)
    if n < 2 or not gap > 0:
        return 0.0
    closer = np.searchsorted(s, s + gap, side="left") - np.arange(n) - 1   # partners above each score
    return float(closer.sum() / (n * (n - 1) / 2))


def guard(ref: dict[str, np.ndarray], got: dict[str, np.ndarray], labels: torch.Tensor | None,
          threshold: float | None, strict: bool = True) -> tuple[dict, list[str]]:
    """(metrics, failures) of the int8 outputs `got` against the fp32 outputs `ref` on held-out images.
    A classifier (a `label` output) is judged by top-1 agreement; a score output (probability or
    score) by rank correlation, AUC and decisions at `threshold` (defect: score > threshold, or >=
    with strict=False)."""
    from common.metrics import roc_auc

    m, fails = {"images": int(next(iter(ref.values())).shape[0])}, []
    if "label" in ref:
        m["top1"] = float((ref["label"] == got["label"]).mean())
        if m["top1"] < GUARD["top1"]:
            fails.append(f"top-1 agreement {m['top1']:.1%} < {GUARD['top1']:.0%}")
        return m, fails
    key = next(k for k in ("probability", "score") if k in ref)
    a, b = ref[key].astype(np.float64), got[key].astype(np.float64)
    m["spearman"] = spearman(a, b)
    m["median_abs_diff"] = float(np.median(np.abs(a - b)))
    m["close_pairs"] = close_pairs(a, m["median_abs_diff"])
    if m["spearman"] < GUARD["spearman"]:
        fails.append(f"Spearman {m['spearman']:.4f} < {GUARD['spearman']} (int8 moves a score by "
                     f"{m['median_abs_diff']:.2g} (median), more than the gap between {m['close_pairs']:.0%} of the "
                     f"pairs of fp32 scores)")
    if labels is not None and int(labels.max()) == 1 and 0 < int(labels.sum()) < len(labels):
        m["auc_fp32"] = float(roc_auc(labels, torch.from_numpy(a)))
        m["auc_int8"] = float(roc_auc(labels, torch.from_numpy(b)))
        m["auc_delta"] = m["auc_int8"] - m["auc_fp32"]
        if abs(m["auc_delta"]) > GUARD["auc_delta"]:
            fails.append(f"|AUC {m['auc_int8']:.4f} - fp32 {m['auc_fp32']:.4f}| = {abs(m['auc_delta']):.4f} "
                         f"> {GUARD['auc_delta']}")
    if threshold is not None:
        flag_a, flag_b = (a > threshold, b > threshold) if strict else (a >= threshold, b >= threshold)
        m["threshold"] = threshold
        m["decisions"] = float((flag_a == flag_b).mean())
        if m["decisions"] < GUARD["decisions"]:
            fails.append(f"same decision at threshold {threshold:g} for {m['decisions']:.1%} "
                         f"< {GUARD['decisions']:.0%}")
    m["max_abs_diff"] = float(np.abs(a - b).max())
    return m, fails


def describe(m: dict) -> str:
    parts = [f"{m['images']} held-out images"]
    if "top1" in m:
        parts.append(f"top-1 agreement {m['top1']:.1%}")
    if "spearman" in m:
        parts.append(f"Spearman {m['spearman']:.4f}")
    if "auc_fp32" in m:
        parts.append(f"AUC {m['auc_fp32']:.4f} -> {m['auc_int8']:.4f}")
    if "decisions" in m:
        parts.append(f"same decision at {m['threshold']:g}: {m['decisions']:.1%}")
    return ", ".join(parts)


# ---------------------------------------------------------------- the export step
def run_outputs(model: bytes | str, feeds_: list[dict[str, np.ndarray]], output_names: list[str], n: int,
                threads: int = 0) -> dict[str, np.ndarray]:
    from common.onnx import session
    sess = session(model, ["CPUExecutionProvider"], threads=threads, verbose=False, name="int8 model")
    outs = [sess.run(output_names, f) for f in feeds_]
    return {name: np.concatenate([o[k] for o in outs])[:n] for k, name in enumerate(output_names)}


def quantize_with_guard(data: bytes, calib: CalibrationSet, input_names: list[str], output_names: list[str],
                        metadata: dict, batch: int | None, recipes: list[str] | None = None,
                        force: bool = False, threads: int = 0, out_name: str = "the int8 model") -> bytes:
    """The int8 model of the fp32 export `data`, with its metadata, from the first recipe that passes the
    guard; a UserError naming each failed check unless `force` (then the last recipe tried is returned)."""
    import onnx

    check_count(len(calib), calib.source)
    if len(calib) > MAX_IMAGES:
        keep = torch.linspace(0, len(calib) - 1, MAX_IMAGES).round().long()
        calib = CalibrationSet(tuple(t[keep] for t in calib.inputs),
                               None if calib.labels is None else calib.labels[keep], calib.source)
    cal_idx, held_idx = split_indices(len(calib), calib.labels)
    # one image per run: ONNX Runtime's histogram calibration stacks the runs (they must have one size)
    cal_feeds = feeds(tuple(t[cal_idx] for t in calib.inputs), input_names, batch, size=1)
    held_feeds = feeds(tuple(t[held_idx] for t in calib.inputs), input_names, batch)
    held_labels = None if calib.labels is None else calib.labels[held_idx]
    binary = held_labels if "label" not in output_names else None   # score models: 1 = defect
    threshold = metadata.get("threshold")
    strict = metadata.get("model") != "ae"
    names = recipes or list(DEFAULT_ORDER)
    for r in names:
        if r not in RECIPES:
            raise UserError(f"--int8-recipe {r}: choose from {', '.join(RECIPES)}")
    ref = run_outputs(data, held_feeds, output_names, len(held_idx), threads)
    if "label" not in output_names and (binary is None or int(binary.max()) != 1
                                         or not 0 < int(binary.sum()) < len(binary)):
        print("note: the held-out images lack labels of both kinds (normal / defect): the AUC check is skipped")
    with tempfile.TemporaryDirectory(prefix="int8-") as tmp:
        tmp = Path(tmp)
        prepared = prepare(data, tmp)
        failed = []
        for name in names:
            recipe = RECIPES[name]
            qdata, method = quantize(prepared, recipe, cal_feeds, tmp)
            metrics, fails = guard(ref, run_outputs(qdata, held_feeds, output_names, len(held_idx), threads),
                                   binary, threshold, strict)
            print(f"  int8 recipe {name}: {describe(metrics)}: {'FAILS ' + '; '.join(fails) if fails else 'passes'}")
            if not fails:
                break
            failed.append(f"{name}: {', '.join(fails)}")
    if fails and not force:
        raise UserError(f"{out_name}: not written: no int8 recipe passes the accuracy guard against fp32 on "
                        f"{metrics['images']} held-out images ({'; '.join(failed)}; --force writes the last one "
                        f"anyway)")
    model = onnx.load_from_string(qdata)
    info = {"format": "QDQ", "recipe": name, "about": recipe.about, "activations": "uint8 asymmetric",
            "weights": "int8 symmetric, " + ("per channel" if recipe.per_channel else "per tensor"),
            "calibration_method": method, "calibration_images": len(cal_idx),
            "calibration_source": calib.source, "tried": names[:names.index(name) + 1],
            **{k: v for k, v in asdict(recipe).items() if k in ("op_types", "features_only", "keep_fp32")}}
    meta = {**{p.key: p.value for p in model.metadata_props},
            **{k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()},
            "precision": "int8", "quantization": json.dumps(info),
            "int8_guard": json.dumps({**metrics, "passed": not fails, "failures": fails,
                                      "limits": GUARD})}
    del model.metadata_props[:]
    for key, value in meta.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    return model.SerializeToString()


def precision_note(meta: dict[str, str]) -> str | None:
    """One line about a reduced-precision file's metadata for infer.py, None for an fp32 file."""
    if meta.get("precision") != "int8":
        return None
    try:
        info, g = json.loads(meta.get("quantization", "{}")), json.loads(meta.get("int8_guard", "{}"))
    except json.JSONDecodeError:
        return "int8 model (QDQ); its quantization metadata is unreadable"
    state = "passed" if g.get("passed") else "FAILED (written with --force)"
    return (f"int8 model (QDQ, recipe {info.get('recipe')}, {info.get('calibration_method')} calibration on "
            f"{info.get('calibration_images')} images); accuracy guard vs fp32 {state}: {describe(g)}"
            if "images" in g else f"int8 model (QDQ, recipe {info.get('recipe')})")


# ---------------------------------------------------------------- scripts/export_onnx.py
def add_int8_args(p) -> None:
    g = p.add_argument_group("int8 (ONNX Runtime static quantisation, QDQ)")
    g.add_argument("--int8", action="store_true",
                   help="write a statically quantised int8 model, calibrated on --calib and checked against fp32 "
                        "on its held-out half (Spearman >= 0.99, |dAUC| <= 0.01, same decisions >= 99%%; "
                        "classifiers: top-1 agreement >= 99%%); crbl and battery_ct")
    g.add_argument("--calib", type=Path, metavar="DATA",
                   help="calibration images: crbl a folder or a CSV (image_path[,impurity]); battery_ct a split "
                        f"file, a split folder (its train.txt) or a folder of images; at least {MIN_IMAGES}")
    g.add_argument("--int8-recipe", choices=list(RECIPES), action="append",
                   help="what to quantise (repeatable; default: " + ", ".join(DEFAULT_ORDER) + ", the first that "
                        "passes the guard): " + "; ".join(f"{r.name}: {r.about}" for r in RECIPES.values()))
    g.add_argument("--force", action="store_true", help="write the int8 model even if it fails the accuracy guard")


def check_int8_args(p, args, supported: tuple[str, ...] = ("crbl", "battery_ct")) -> None:
    if not args.int8:
        for flag, given in (("--calib", args.calib), ("--int8-recipe", args.int8_recipe), ("--force", args.force)):
            if given:
                p.error(f"{flag} needs --int8")
        return
    if args.task not in supported:
        p.error(f"--int8: --task {args.task} has no int8 export (only {', '.join(supported)})")
    if args.calib is None:
        p.error("--int8 needs --calib DATA (images to calibrate on and to check the int8 model with)")


def load_calibration(args, deploy, spec) -> CalibrationSet:
    """export_onnx.py --int8: the --calib images, read before the export so that bad data fails fast."""
    if spec.metadata.get("model") == "deeplab_seg":
        raise UserError("--int8: deeplab_seg has no int8 export (its guard would need per-pixel checks)")
    try:
        calib = deploy.calibration_set(args.calib, spec.metadata)
    except UserError as e:
        text = str(e)
        raise UserError(text if text.startswith("--calib") else f"--calib: {text}") from None
    print(f"int8: {len(calib)} images from {calib.source}: half calibrate, half check the guard")
    return calib


def int8_from_args(args, spec, data: bytes, calib: CalibrationSet) -> bytes:
    """The int8 model of the checked fp32 export `data` (export_onnx.py --int8)."""
    return quantize_with_guard(data, calib, spec.input_names, spec.output_names, spec.metadata,
                               None if args.dynamic_batch else args.batch_size, args.int8_recipe, args.force,
                               out_name=str(args.out))
