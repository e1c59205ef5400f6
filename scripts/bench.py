"""Benchmarks. Every number is a ratio against a reference measured in the same run.

  python scripts/bench.py common       # common Trainer vs a bare hand-written step loop
  python scripts/bench.py crbl         # CRBL vs Keras predict (own processes, alternating); EfficientNetB0 vs torchvision
  python scripts/bench.py onnx         # ONNX Runtime CPU vs PyTorch CPU for every exported model
  python scripts/bench.py battery_ct   # every battery model at 512x512, batch 1 and 8, + a train step
  python scripts/bench.py phaseformer  # vs a transcription of the official model; tiled 2048x2048 inference
  python scripts/bench.py spectroformer  # only the phaseformer section's Spectroformer rows (the old model)
  python scripts/bench.py spectral     # cnn_xattn train step and inference vs CR_recon; loader memory on 2 x 100,000 rows
  python scripts/bench.py int8         # battery models: ONNX Runtime int8 vs fp32 (CRBL int8 and bf16: the crbl section)
  python scripts/bench.py gpu          # CUDA: every model in fp32 vs fp16 / bf16 autocast, + the common loop
  python scripts/bench.py colorize     # improved_unet vs a transcription of the original; evaluate.py vs skimage/OpenCV
  python scripts/bench.py ddp          # colorize under torchrun (2 CPU processes): frozen unused params vs find_unused_parameters
  python scripts/bench.py explain      # crbl / battery_ct infer.py --explain vs plain, per image (goal <= 3x)
  python scripts/bench.py all          # the CPU sections

Options: --threads N (default: all cores), --repeats N, --quick (smaller sizes, for a smoke run).
Results are printed and written as JSON to --out (default runs/bench/<section>.json).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):  # `python scripts/bench.py`: import this checkout's packages (and tests/*_ref)
    sys.path.insert(0, str(REPO))


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, repeats: int, warmup: int = 1) -> float:
    """Median seconds per call (CUDA work included: the clock stops after a synchronize)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        _sync()
        t0 = time.perf_counter()
        fn()
        _sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def report(rows: list[dict], title: str) -> None:
    print(f"\n== {title}")
    for r in rows:
        print("  " + "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()))


# ---------------------------------------------------------------- common: loop overhead
def bench_common(args, device: torch.device = torch.device("cpu")) -> list[dict]:
    from torch.utils.data import DataLoader, TensorDataset

    from common.data import train_loader
    from common.distributed import DistInfo
    from common.trainer import Trainer

    n, bs, epochs = (512, 32, 2) if args.quick else (2048, 32, 3)
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g))

    def make():
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                              nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
                              nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))
        model = model.to(device)
        return model, torch.optim.AdamW(model.parameters(), 1e-3)

    def bare():
        model, opt = make()
        loader = DataLoader(data, batch_size=bs, shuffle=True)
        model.train()
        for _ in range(epochs):
            for x, y in loader:
                x, y = x.to(device), y.to(device)
                opt.zero_grad(set_to_none=True)
                F.cross_entropy(model(x), y).backward()
                opt.step()

    def common():
        model, opt = make()
        loader = train_loader(data, bs, seed=0, workers=0, info=DistInfo())
        with tempfile.TemporaryDirectory() as out:
            Trainer(model, opt, loader, lambda m, b: F.cross_entropy(m(b[0]), b[1]), out_dir=out,
                    epochs=epochs, device=device, progress=True).fit()

    t_bare, t_common = [], []
    for _ in range(args.repeats):  # interleaved, so drift in machine load hits both alike
        t_bare.append(timed(bare, 1, warmup=0))
        t_common.append(timed(common, 1, warmup=0))
    b, c = statistics.median(t_bare), statistics.median(t_common)
    steps = epochs * (n // bs)
    rows = [{"loop": "bare", "s": b, "steps_per_s": steps / b},
            {"loop": "common.Trainer", "s": c, "steps_per_s": steps / c, "ratio_vs_bare": c / b}]
    report(rows, f"common loop overhead on {device.type} ({epochs} epochs x {n // bs} steps, batch {bs}, "
                 "incl. checkpoints/log/plot)")
    return rows


# ---------------------------------------------------------------- crbl
CRBL_ENGINES = ("torch", "torch_one_stream", "onnxruntime", "torch_bf16", "onnxruntime_int8")


def crbl_worker(argv) -> None:
    """One side of `bench.py crbl` in its own process: crbl/infer.py's graph (PyTorch engine, or the
    exported file in ONNX Runtime) on a fixed random batch; prints one JSON line."""
    p = argparse.ArgumentParser()
    p.add_argument("engine", choices=CRBL_ENGINES)
    p.add_argument("--weights", type=Path)
    p.add_argument("--onnx", type=Path)
    p.add_argument("--onnx-int8", type=Path)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    a = p.parse_args(argv)
    from common.device import reuse_freed_memory
    reuse_freed_memory()                                # as crbl/infer.py sets up (common.cli.apply_runtime_args)
    torch.set_num_threads(a.threads)
    x = torch.rand(a.batch_size, 3, a.size, a.size, generator=torch.Generator().manual_seed(0))
    if a.engine.startswith("torch"):
        from crbl.deploy import CRBLProbability
        from common.device import cpu_streams
        from crbl.infer import load_model
        streams = cpu_streams() if a.engine != "torch_one_stream" else 1   # as crbl/infer.py sets it up
        amp = torch.bfloat16 if a.engine == "torch_bf16" else None          # crbl/infer.py --amp bf16
        graph = CRBLProbability(load_model(a.weights, None, "bench")[0], streams, amp).eval()
        run = torch.inference_mode()(lambda: graph(x))
    else:
        from common.onnx import OrtModel, session
        path = a.onnx_int8 if a.engine == "onnxruntime_int8" else a.onnx
        graph = OrtModel(session(path, ["CPUExecutionProvider"], threads=a.threads, verbose=False))
        run = lambda: graph(x)  # noqa: E731
    run()                                               # warm-up
    wall, cpu = [], []
    for _ in range(a.repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        run()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    print(json.dumps({"img_s": a.batch_size / statistics.median(wall),
                      "img_per_cpu_s": a.batch_size / statistics.median(cpu)}))


def _run_json(cmd: list[str], env: dict | None = None) -> dict:
    res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})})
    if res.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:3])} failed:\n{res.stdout[-2000:]}\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def _crbl_builtin_val() -> Path:
    from common.data import ensure_builtin
    from crbl.data import BUILTIN_VERSION, make_builtin_dataset
    return ensure_builtin("crbl", BUILTIN_VERSION, make_builtin_dataset) / "val.csv"


def bench_crbl(args) -> list[dict]:
    """CRBL crop-model inference (batch 32, 128x128) against the original Keras `predict`, each side
    in its own process (TensorFlow's thread pools slow torch down in a shared process), the sides
    alternating, --rounds rounds; per side the median over rounds of each process's median batch
    time. Both wall-clock images/s and images per CPU-second (CPU time of the whole process: on a
    shared machine it is far less disturbed by other programs than the wall clock)."""
    from crbl.model import EfficientNetB0
    import torchvision

    rows = []
    bs, size = (8, 128) if args.quick else (32, 128)
    threads = torch.get_num_threads()
    rounds = max(3, args.rounds)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        keras_cmd = [sys.executable, str(REPO / "tests" / "keras_ref" / "bench_predict.py"), str(tmp),
                     "--batch-size", str(bs), "--size", str(size), "--threads", str(threads), "--repeats",
                     str(args.repeats)]
        keras_env = {"TF_USE_LEGACY_KERAS": "1", "TF_CPP_MIN_LOG_LEVEL": "3"}
        results = {"keras": [_run_json(keras_cmd, keras_env)]}   # round 1 also writes crbl.h5 (random weights)
        for cmd in ([str(REPO / "scripts" / "convert_h5.py"), str(tmp / "crbl.h5"), str(tmp / "crbl.pth"),
                     "--model-type", "full"],
                    [str(REPO / "scripts" / "export_onnx.py"), "--task", "crbl", "--weights", str(tmp / "crbl.pth"),
                     "--model", "full", "--out", str(tmp / "crbl.onnx"), "--dynamic-batch"],
                    # int8 of the same random weights, calibrated on the built-in images; --force: random
                    # weights say nothing about accuracy (README: the guard's numbers on the demo checkpoint)
                    [str(REPO / "scripts" / "export_onnx.py"), "--task", "crbl", "--weights", str(tmp / "crbl.pth"),
                     "--model", "full", "--out", str(tmp / "crbl_int8.onnx"), "--dynamic-batch", "--int8",
                     "--calib", str(_crbl_builtin_val()), "--force", "--int8-recipe", args.int8_recipe]):
            res = subprocess.run([sys.executable, *cmd], capture_output=True, text=True)
            if res.returncode != 0:
                raise SystemExit(f"{cmd[0]} failed:\n{res.stderr[-3000:]}")
        worker = [sys.executable, str(REPO / "scripts" / "bench.py"), "_crbl_worker", "--weights", str(tmp / "crbl.pth"),
                  "--onnx", str(tmp / "crbl.onnx"), "--onnx-int8", str(tmp / "crbl_int8.onnx"),
                  "--batch-size", str(bs), "--size", str(size),
                  "--threads", str(threads), "--repeats", str(args.repeats)]
        engines = [e for e in CRBL_ENGINES if not args.models or e in args.models.split(",")]
        sides = {e: (lambda e=e: _run_json(worker[:3] + [e] + worker[3:])) for e in engines}
        sides["keras"] = lambda: _run_json(keras_cmd, keras_env)
        for r in range(rounds):
            order = [*engines, "keras"] if r % 2 == 0 else ["keras", *reversed(engines)]
            for side in order:
                if side == "keras" and r == 0:
                    continue                            # round 1 of Keras ran above
                results.setdefault(side, []).append(sides[side]())
                print(f"  round {r + 1}: {side} {results[side][-1]['img_s']:.1f} img/s", flush=True)
    med = {k: {m: statistics.median(v[m] for v in vals) for m in ("img_s", "img_per_cpu_s")}
           for k, vals in results.items()}
    names = {"torch": "CRBL torch (crbl/infer.py default: two streams)",
             "torch_one_stream": "CRBL torch (one stream, all threads per operator)",
             "onnxruntime": "CRBL ONNX Runtime CPU (exported)", "keras": "CRBL Keras predict (tf_keras + efficientnet)",
             "torch_bf16": "CRBL torch --amp bf16 (two streams; head fp32)",
             "onnxruntime_int8": f"CRBL ONNX Runtime int8 (export_onnx.py --int8, recipe {args.int8_recipe})"}
    for side in (*engines, "keras"):
        rows.append({"model": names[side], "batch": bs, "size": size, "img_s": med[side]["img_s"],
                     "vs_keras_predict": med[side]["img_s"] / med["keras"]["img_s"],
                     "img_per_cpu_s": med[side]["img_per_cpu_s"],
                     "cpu_vs_keras": med[side]["img_per_cpu_s"] / med["keras"]["img_per_cpu_s"],
                     "rounds_img_s": " ".join(f"{v['img_s']:.1f}" for v in results[side])})

    bs, size = (2, 224) if args.quick else (8, 224)
    x = torch.rand(bs, 3, size, size)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    tv = torchvision.models.efficientnet_b0().eval()
    ours = EfficientNetB0().eval()
    with torch.inference_mode():
        tv_t = {"contiguous": timed(lambda: tv(x), args.repeats)}
        tv_cl = tv.to(memory_format=torch.channels_last)
        tv_t["channels_last"] = timed(lambda: tv_cl(x_cl), args.repeats)
        ref_t = min(tv_t.values())  # against torchvision's faster layout
        for fmt, xx in (("contiguous", x), ("channels_last", x_cl)):
            m = ours.to(memory_format=torch.channels_last) if fmt == "channels_last" else ours
            t = timed(lambda: m(xx), args.repeats)
            rows.append({"model": f"EfficientNetB0 ({fmt})", "batch": bs, "size": size, "img_s": bs / t,
                         "vs_best_torchvision": ref_t / t})
    for fmt, t in tv_t.items():
        rows.append({"model": f"torchvision efficientnet_b0 ({fmt})", "batch": bs, "size": size,
                     "img_s": bs / t, "vs_best_torchvision": ref_t / t})
    report(rows, f"crbl inference, {threads} threads, median of {rounds} alternating rounds (own process per side)")
    return rows


# ---------------------------------------------------------------- battery_ct
def _battery_inputs(name: str, x: torch.Tensor):
    return (x, torch.zeros(x.shape[0], 2, device=x.device)) if name == "late_fusion" else (x,)


def _battery_loss(name: str, out, y: torch.Tensor) -> torch.Tensor:
    if name == "hdcnn":
        from battery_ct.model import HDCNNLoss
        return HDCNNLoss().to(y.device)(out, y)
    if name in ("ae",):
        return F.mse_loss(out[0], torch.zeros_like(out[0]))
    if name == "deeplab_seg":
        return F.cross_entropy(out, torch.zeros(out.shape[0], *out.shape[2:], dtype=torch.long, device=out.device))
    return F.cross_entropy(out, y)


def bench_battery(args) -> list[dict]:
    """Forward images/s of every model (batch 1 and 8) and one training step, at 512x512 (--quick:
    128). Each model in both memory layouts; the DeepLab models also as a BN-folded channels_last
    copy (fuse_for_inference) against the straightforward port (plain eval, contiguous)."""
    from battery_ct.model import MODEL_NAMES, build_model, fuse_for_inference

    size = 128 if args.quick else 512
    rows = []
    for name in MODEL_NAMES:
        model = build_model(name).eval()
        heavy = name in ("deeplabv3", "deeplab_seg", "drn_aspp")
        reps = 1 if heavy and not args.quick else args.repeats
        for bs in (1, 8):
            x = torch.rand(bs, 3, size, size)
            x_cl = x.contiguous(memory_format=torch.channels_last)
            variants = [("contiguous", model, x), ("channels_last", model, x_cl)]
            if name in ("deeplabv3", "deeplab_seg"):
                variants.append(("fused_bn+channels_last", fuse_for_inference(model), x_cl))
            base = None
            for layout, m, xx in variants:
                m = m.to(memory_format=torch.channels_last) if layout == "channels_last" else \
                    (m.to(memory_format=torch.contiguous_format) if layout == "contiguous" else m)
                with torch.inference_mode():
                    t = timed(lambda: m(*_battery_inputs(name, xx)), reps)
                base = base or t
                rows.append({"model": name, "what": "forward", "batch": bs, "layout": layout,
                             "img_s": bs / t, "vs_contiguous": base / t})
                print(f"  {name} b{bs} {layout}: {bs / t:.3g} img/s", flush=True)
        # one training step (forward, backward, AdamW), batch 8 (2 for the DRN-D-54 models)
        bs = 2 if name in ("deeplabv3", "deeplab_seg") and not args.quick else 8 if not args.quick else 2
        train_model = build_model(name).train()
        opt = torch.optim.AdamW([p for p in train_model.parameters() if p.requires_grad], 1e-4)
        y = torch.randint(0, 5, (bs,))
        for layout in ("contiguous", "channels_last"):
            fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
            train_model.to(memory_format=fmt)
            x = torch.rand(bs, 3, size, size).contiguous(memory_format=fmt)

            def step():
                opt.zero_grad(set_to_none=True)
                _battery_loss(name, train_model(*_battery_inputs(name, x)), y).backward()
                opt.step()
            t = timed(step, 1 if heavy else max(1, args.repeats // 2))
            rows.append({"model": name, "what": "train_step", "batch": bs, "layout": layout, "img_s": bs / t})
            print(f"  {name} train step b{bs} {layout}: {bs / t:.3g} img/s", flush=True)
    report(rows, f"battery_ct models at {size}x{size}, {torch.get_num_threads()} threads")
    return rows


# ---------------------------------------------------------------- onnx
def bench_onnx(args) -> list[dict]:
    """ONNX Runtime (CPU provider, same thread count) against PyTorch on the CPU for the graphs
    infer.py runs (pre/post-processing included; the DRN-D-54 models BN-folded as infer.py loads
    them), at each model's usual batch and size: CRBL 32 x 128^2, battery classifiers 8 x 512^2,
    deeplab_seg 4 windows of 640^2, spectral 256 structures of 128^2 (infer.py's default batch;
    PyTorch channels_last as infer.py runs it), the colorize U-Nets (width 64, the original's)
    8 x 128^2, the Phaseformer 1x head (random weights) 1 x 256^2, a tile as infer.py feeds it
    (--quick: 128^2, batch 2). Alternating, median per engine."""
    import copy

    from battery_ct.deploy import BatteryGraph, graph_spec
    from battery_ct.model import MODEL_NAMES, build_model, fuse_for_inference
    from battery_ct.train import normalization
    from colorize.deploy import export_spec as colorize_spec
    from colorize.model import MODEL_NAMES as COLORIZE_MODELS, build_model as build_colorize
    from common.onnx import OrtModel, export, session
    from crbl.deploy import CRBLProbability, export_spec as crbl_spec
    from common.device import cpu_streams
    from crbl.model import CRBL
    from phaseformer.deploy import graph_spec as phaseformer_spec
    from phaseformer.model import build_model as build_phaseformer
    from spectral.config import check_config
    from spectral.deploy import SpectraGraph, graph_spec as spectral_spec
    from spectral.model import build_model as build_spectral

    threads = torch.get_num_threads()
    cases = [("crbl_crop", 32, 128)] + [(n, 4 if n == "deeplab_seg" else 8, 640 if n == "deeplab_seg" else 512)
                                        for n in MODEL_NAMES]
    cases += [(f"colorize_{n}", 8, 128) for n in COLORIZE_MODELS]     # colorize/infer.py's batch, the original's size
    cases += [(f"spectral_{n}", 256, 128) for n in ("cnn_xattn", "cnn_gru")]
    cases += [("phaseformer_1x", 1, 256)]                             # one image or tile, as infer.py runs it
    if args.quick:
        cases = [(n, 2, 128) for n, _, _ in cases]
    if args.models:
        cases = [c for c in cases if c[0] in args.models.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, bs, size in cases:
            torch.set_num_threads(threads)
            if name == "crbl_crop":
                torch.save(CRBL().state_dict(), Path(tmp) / "crbl.pth")
                spec = crbl_spec(Path(tmp) / "crbl.pth", "crop", (size, size))
                graph = CRBLProbability(spec.module.model, cpu_streams()).eval()   # as crbl/infer.py runs it
            elif name.startswith("colorize_"):
                torch.save(build_colorize(name[len("colorize_"):]).state_dict(), Path(tmp) / "colorize.pth")
                spec = colorize_spec(Path(tmp) / "colorize.pth", None, (size, size))
                graph = spec.module                                 # as colorize/infer.py runs it
            elif name.startswith("spectral_"):
                model_name = name.removeprefix("spectral_")
                torch.manual_seed(0)
                model = build_spectral(model_name).eval()
                cfg = check_config({"model": {"name": model_name}}, "bench", training=False)
                spec = spectral_spec(model, cfg, (size, size), Path("random"))
                graph = SpectraGraph(copy.deepcopy(model).to(memory_format=torch.channels_last), True).eval()
            elif name == "phaseformer_1x":
                torch.manual_seed(0)
                spec = phaseformer_spec(build_phaseformer().eval(), "1x", (size, size), Path("random"))
                graph = spec.module                                 # the rfft2 path; the file: DFT matrices
            else:
                model = build_model(name).eval()
                cfg = {"model": name, "num_classes": 4 if name == "deeplab_seg" else 5, "image_size": size,
                       "normalize": normalization(name)}
                spec = graph_spec(model, cfg, {}, (size, size), Path("random"))
                graph = spec.module
                if name in ("deeplabv3", "deeplab_seg"):  # as battery_ct/infer.py runs them
                    graph = BatteryGraph(fuse_for_inference(model), name, cfg["normalize"]).eval()
            runner = OrtModel(session(export(spec, batch=2, dynamic_batch=True), ["CPUExecutionProvider"],
                                      threads=threads, verbose=False))
            inputs = spec.make_inputs(bs, torch.Generator().manual_seed(0))
            torch_inputs = tuple(t.contiguous(memory_format=torch.channels_last) for t in inputs) \
                if name.startswith("spectral_") else inputs
            heavy = (name in ("deeplabv3", "deeplab_seg", "drn_aspp", "convnext_tiny")
                     or name.startswith(("spectral_", "colorize_", "phaseformer"))) and not args.quick
            reps = 1 if heavy else args.repeats
            with torch.inference_mode():
                ref = graph(*torch_inputs)
                got = runner(*inputs)
                diff = max(float((g.double() - r.double()).abs().max()) for g, r in zip(got, ref)
                           if r.dtype.is_floating_point)
                t_torch, t_ort = [], []
                for _ in range(2 if heavy else 3):       # alternating rounds
                    t_torch.append(timed(lambda: graph(*torch_inputs), reps))
                    t_ort.append(timed(lambda: runner(*inputs), reps))
            tt, to = statistics.median(t_torch), statistics.median(t_ort)
            rows.append({"model": name, "batch": bs, "size": size, "torch_img_s": bs / tt, "onnxruntime_img_s": bs / to,
                         "ort_vs_torch": tt / to, "max_abs_diff": diff})
            print(f"  {name} b{bs} {size}: torch {bs / tt:.3g} img/s, onnxruntime {bs / to:.3g} img/s "
                  f"({tt / to:.2f}x), max |diff| {diff:.1e}", flush=True)
    torch.set_num_threads(threads)
    report(rows, f"ONNX Runtime CPU vs PyTorch CPU, {threads} threads")
    return rows


# ---------------------------------------------------------------- int8
def bench_int8(args) -> list[dict]:
    """Battery CT models (random weights): ONNX Runtime int8 (export_onnx.py --int8's code, recipe
    --int8-recipe, calibrated on the built-in test split) against the fp32 file, batch 8 at 256^2
    (--quick 2 at 128^2), CPU provider, same threads; alternating rounds in one process (one
    library, one thread pool each), median. The guard's numbers on random weights say nothing about
    accuracy and are not reported (README: trained checkpoints)."""
    from battery_ct.data import BUILTIN_VERSION, make_builtin_dataset
    from battery_ct.deploy import calibration_set, graph_spec
    from battery_ct.model import build_model
    from battery_ct.train import normalization
    from common.data import ensure_builtin
    from common.onnx import OrtModel, export, session
    from common.quantize import quantize_with_guard

    threads = torch.get_num_threads()
    bs, size = (2, 128) if args.quick else (8, 256)
    names = args.models.split(",") if args.models else ["resnet18", "efficientnet_b0", "ae"]
    split = ensure_builtin("battery_ct", BUILTIN_VERSION, make_builtin_dataset) / "test.txt"
    rows = []
    for name in names:
        torch.manual_seed(0)
        cfg = {"model": name, "num_classes": 5, "image_size": size, "normalize": normalization(name)}
        spec = graph_spec(build_model(name, num_classes=None if name == "ae" else 5).eval(), cfg, {}, (size, size),
                          Path("random"))
        fp32 = export(spec, batch=2, dynamic_batch=True)
        int8 = quantize_with_guard(fp32, calibration_set(split, spec.metadata), spec.input_names, spec.output_names,
                                   spec.metadata, None, [args.int8_recipe], force=True)
        runners = {k: OrtModel(session(d, ["CPUExecutionProvider"], threads=threads, verbose=False))
                   for k, d in (("fp32", fp32), ("int8", int8))}
        inputs = spec.make_inputs(bs, torch.Generator().manual_seed(0))
        t = {k: [] for k in runners}
        for _ in range(3):
            for k, run in runners.items():
                t[k].append(timed(lambda: run(*inputs), args.repeats))
        t32, t8 = statistics.median(t["fp32"]), statistics.median(t["int8"])
        rows.append({"model": name, "batch": bs, "size": size, "fp32_img_s": bs / t32, "int8_img_s": bs / t8,
                     "int8_vs_fp32": t32 / t8, "recipe": args.int8_recipe})
        print(f"  {name}: fp32 {bs / t32:.3g} img/s, int8 {bs / t8:.3g} img/s ({t32 / t8:.2f}x)", flush=True)
    report(rows, f"ONNX Runtime int8 vs fp32 (CPU), {threads} threads")
    return rows


# ---------------------------------------------------------------- gpu
def bench_gpu(args) -> list[dict]:
    """CUDA throughput of every model, channels_last, fp32 (the reference) against fp16 and bf16
    autocast: forward (inference_mode) and a training step (AdamW; GradScaler for fp16). The
    common loop's overhead is measured on the GPU too."""
    if not torch.cuda.is_available():
        raise SystemExit("the gpu section needs a CUDA device")
    from battery_ct.model import MODEL_NAMES, build_model as build_battery
    from crbl.model import build_model as build_crbl

    dev = torch.device("cuda")
    torch.backends.cudnn.benchmark = True
    size = 128 if args.quick else 512
    cases = [(f"crbl_{t}", lambda t=t: build_crbl(t), 32, 128) for t in ("crop", "full")]
    cases += [(n, lambda n=n: build_battery(n), 8, size) for n in MODEL_NAMES]
    if args.models:
        cases = [c for c in cases if c[0] in args.models.split(",")]
    rows = []
    for name, build, bs, sz in cases:
        model = build().to(dev, memory_format=torch.channels_last)
        x = torch.rand(bs, 3, sz, sz, device=dev).contiguous(memory_format=torch.channels_last)
        y = torch.randint(0, 5, (bs,), device=dev)
        inputs = _battery_inputs(name, x)
        if name.startswith("crbl"):
            loss_fn = lambda out, y: F.binary_cross_entropy_with_logits(out, (y[:, None] > 2).float())  # noqa: E731
        else:
            loss_fn = lambda out, y, n=name: _battery_loss(n, out, y)  # noqa: E731
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], 1e-5)
        ref = {}
        for prec, dtype in (("fp32", None), ("bf16", torch.bfloat16), ("fp16", torch.float16)):
            ctx = (lambda: torch.autocast("cuda", dtype=dtype)) if dtype else contextlib.nullcontext
            scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
            model.eval()

            def forward():
                with torch.inference_mode(), ctx():
                    model(*inputs)

            def step():
                opt.zero_grad(set_to_none=True)
                with ctx():
                    loss = loss_fn(model(*inputs), y)
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
            t_fwd = timed(forward, args.repeats, warmup=3)
            model.train()
            t_step = timed(step, args.repeats, warmup=3)
            ref = ref or {"fwd": t_fwd, "step": t_step}
            rows.append({"model": name, "precision": prec, "batch": bs, "size": sz,
                         "forward_img_s": bs / t_fwd, "fwd_vs_fp32": ref["fwd"] / t_fwd,
                         "train_img_s": bs / t_step, "train_vs_fp32": ref["step"] / t_step})
            print(f"  {name} {prec}: forward {bs / t_fwd:.4g} img/s, train step {bs / t_step:.4g} img/s", flush=True)
        del model, opt
        torch.cuda.empty_cache()
    report(rows, f"models on {torch.cuda.get_device_name()} (channels_last)")
    return rows + bench_common(args, dev)


# ---------------------------------------------------------------- phaseformer
PROFILE_GROUPS = (  # group -> op names (or, for fft / conv / layer_norm / gelu, name fragments)
    ("fft", ("fft",)),
    ("conv", ("conv",)),
    ("matmul", ("aten::bmm", "aten::mm", "aten::addmm", "aten::matmul")),
    ("layernorm+gelu", ("layer_norm", "gelu")),
    ("phase arithmetic", ("aten::angle", "aten::exp", "aten::sgn", "aten::abs", "aten::real", "aten::eq",
                          "aten::where", "aten::linalg_vector_norm", "aten::view_as_real", "aten::complex")),
    ("copies", ("aten::copy_", "aten::cat", "aten::clone", "aten::contiguous", "aten::_to_copy")),
)


def _profile_split(fn) -> dict:
    """Share of CPU self-time per group of ops in one call of fn."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    groups = {g: 0.0 for g, _ in PROFILE_GROUPS} | {"other": 0.0}
    for e in prof.key_averages():
        if not e.key.startswith("aten::"):
            continue
        group = next((g for g, parts in PROFILE_GROUPS
                      if any(e.key == p or (not p.startswith("aten::") and p in e.key) for p in parts)), "other")
        groups[group] += e.self_cpu_time_total
    total = sum(groups.values()) or 1.0
    return {k: v / total for k, v in groups.items()}


def _phaseformer_tiled_memory(size: int, tile: int, head: str, model: str = "phaseformer") -> dict:
    """Peak resident memory of a tiled restore of a size x size image, in a fresh process."""
    # VmHWM (peak RSS of this process's memory map), not ru_maxrss: Linux carries the parent's
    # ru_maxrss over fork + exec
    code = f"""
import re, time, torch
torch.set_num_threads({torch.get_num_threads()})
from phaseformer.model import build_model
from phaseformer.infer import restore
hwm = lambda: int(re.search(r"VmHWM:\\s+(\\d+)", open("/proc/self/status").read()).group(1))
model = build_model("{model}").eval()
x = torch.rand(1, 3, {size}, {size})
before = hwm()
t0 = time.perf_counter()
y = restore(model, x, "{head}", tile={tile}, overlap=32)
print(before, hwm(), time.perf_counter() - t0, tuple(y.shape))
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    if res.returncode != 0:
        raise SystemExit(f"tiled inference failed:\n{res.stderr[-3000:]}")
    before, peak, seconds, shape = res.stdout.strip().splitlines()[-1].split(" ", 3)
    return {"what": f"{model} tiled {head} inference {size}x{size}, tile {tile}", "peak_rss_gb": int(peak) / 2**20,
            "rss_before_gb": int(before) / 2**20, "s": float(seconds), "output": shape}


def bench_phaseformer(args) -> list[dict]:
    """Forward and training step at 256x256, batch 2: ours vs a direct transcription of the official
    model (angle + exp + complex ifft2), same weights, outputs compared; where the time goes; tiled
    inference of a 2048x2048 image (peak memory) and the seam error of tiling on a smaller one."""
    sys.path.insert(0, str(REPO / "tests" / "phaseformer_ref"))
    import official_model as official
    from phaseformer.infer import restore
    from phaseformer.model import Phaseformer

    size, bs = (64, 2) if args.quick else (256, 2)
    reference = official.trained_looking(official.Restormer(), seed=0)
    ours = Phaseformer()
    ours.load_state_dict(reference.state_dict())
    ours_cl = Phaseformer().to(memory_format=torch.channels_last)
    ours_cl.load_state_dict(reference.state_dict())
    x = torch.rand(bs, 3, size, size, generator=torch.Generator().manual_seed(0))
    x_cl = x.contiguous(memory_format=torch.channels_last)
    variants = {"official transcription": (reference, x), "ours": (ours, x), "ours channels_last": (ours_cl, x_cl)}
    with torch.no_grad():
        want = reference.eval()(x)
        diffs = {k: max((a - b).abs().max().item() for a, b in zip(m.eval()(xx), want)) for k, (m, xx) in variants.items()}
    rows = []
    for what in ("forward", "train step"):
        def call(m, xx, what=what):
            if what == "forward":
                with torch.no_grad():
                    m.eval()(xx)
            else:
                m.train().zero_grad(set_to_none=True)
                a, b = m(xx)
                (a.square().mean() + b.square().mean()).backward()
        best = {k: float("inf") for k in variants}
        for _ in range(args.repeats):  # interleaved: drift in machine load hits all alike
            for k, (m, xx) in variants.items():
                best[k] = min(best[k], timed(lambda: call(m, xx), 1, warmup=0))
        for k, (m, xx) in variants.items():
            split = _profile_split(lambda: call(m, xx))
            rows.append({"what": what, "model": k, "size": size, "batch": bs, "s": best[k],
                         "speedup_vs_official": best["official transcription"] / best[k],
                         "max_abs_diff_vs_official": diffs[k],
                         **{f"time_{g}": v for g, v in split.items()}})
            print(f"  {what} {k}: {best[k]:.3f} s, x{best['official transcription'] / best[k]:.2f}; time: "
                  + ", ".join(f"{g} {v:.0%}" for g, v in split.items()), flush=True)

    # seams: tiled vs untiled on a synthetic underwater image small enough for both, with the
    # weights given (--weights, e.g. the demo's best.pt) or the trained-looking random ones
    import numpy as np
    from phaseformer.data import clean_scene, underwater
    from phaseformer.official import load_weights
    seam_size, seam_tile = (192, 64) if args.quick else (512, 256)
    rng = np.random.default_rng(0)
    img = torch.from_numpy(underwater(*clean_scene(rng, seam_size), rng).astype(np.float32)).permute(2, 0, 1)[None]
    if args.weights:
        load_weights(ours, args.weights)
    ours.eval()
    for head in ("1x", "2x"):
        whole = restore(ours, img, head, tile=seam_size).clamp(0, 1)
        tiled = restore(ours, img, head, tile=seam_tile, overlap=32).clamp(0, 1)
        delta = (whole - tiled).abs()
        rows.append({"what": f"seam {head}", "size": seam_size, "tile": seam_tile, "overlap": 32,
                     "weights": str(args.weights or "trained-looking random"),
                     "max_abs_diff": delta.max().item(), "mean_abs_diff": delta.mean().item(),
                     "psnr_tiled_vs_untiled": float(-10 * torch.log10(delta.square().mean()))})
        print(f"  tiled vs untiled {head} ({seam_size} px, tile {seam_tile}, [0,1] outputs): max |d| "
              f"{delta.max():.3g}, mean |d| {delta.mean():.3g}", flush=True)
    big = 512 if args.quick else 2048
    for head in ("1x", "2x"):
        row = _phaseformer_tiled_memory(big, 256 if args.quick else 512, head)
        rows.append(row)
        print(f"  {row['what']}: peak RSS {row['peak_rss_gb']:.2f} GB ({row['s']:.0f} s)", flush=True)
    rows += bench_spectroformer(args)
    if torch.cuda.is_available():
        rows += _phaseformer_gpu(args, reference.state_dict())
    report(rows, f"phaseformer, {torch.get_num_threads()} threads")
    return rows


def spectroformer_worker(argv) -> None:
    """One side of `bench.py spectroformer` in its own process: the forward (batch 2) and the training
    step (batch 1, as the official Train.py) of the transcription or of ours, same weights; prints one
    JSON line with the best CPU and wall seconds of each and this process's peak RSS."""
    from common.device import reuse_freed_memory

    p = argparse.ArgumentParser()
    p.add_argument("side", choices=("transcription", "ours"))
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--malloc", choices=("default", "reuse"), default="default")
    a = p.parse_args(argv)
    if a.malloc == "reuse":
        reuse_freed_memory()
    torch.set_num_threads(a.threads)
    sys.path.insert(0, str(REPO / "tests" / "phaseformer_ref"))
    import official_spectroformer as official
    from phaseformer.spectroformer import Spectroformer

    model = official.trained_looking(official.mymodel(), seed=0)
    if a.side == "ours":
        ours = Spectroformer()
        ours.load_state_dict(model.state_dict())
        model = ours
    x = torch.rand(2, 3, a.size, a.size, generator=torch.Generator().manual_seed(0))

    def forward():
        with torch.no_grad():
            model.eval()(x)

    def train_step():
        model.train().zero_grad(set_to_none=True)
        model(x[:1]).square().mean().backward()

    out = {}
    for what, fn in (("forward", forward), ("train step", train_step)):
        fn()                                          # warm-up
        wall, cpu = [], []
        for _ in range(a.repeats):
            c0, t0 = time.process_time(), time.perf_counter()
            fn()
            cpu.append(time.process_time() - c0)
            wall.append(time.perf_counter() - t0)
        out[what] = {"s": min(wall), "cpu_s": min(cpu)}
    status = Path("/proc/self/status").read_text()       # VmHWM: this process image's peak (Linux)
    out["peak_rss_gb"] = int(status.split("VmHWM:")[1].split()[0]) / 2**20
    print(json.dumps(out))


def bench_spectroformer(args) -> list[dict]:
    """Spectroformer (final_model_AGSSF1) forward (batch 2) and training step (batch 1) at 256x256: ours vs
    our transcription of the original's arithmetic (tests/phaseformer_ref/official_spectroformer.py),
    same weights. Each side in its own process, alternating, median of max(3, --rounds) rounds, under
    glibc malloc's defaults and with common.device.reuse_freed_memory (as phaseformer/train.py and
    infer.py run), the same setting on both sides. Outputs compared with the float64 transcription;
    tiled 2048x2048 inference (peak memory, own process)."""
    sys.path.insert(0, str(REPO / "tests" / "phaseformer_ref"))
    import copy

    import official_spectroformer as official
    from phaseformer.spectroformer import Spectroformer

    size = 64 if args.quick else 256
    threads = torch.get_num_threads()
    reference = official.trained_looking(official.mymodel(), seed=0)
    ours = Spectroformer()
    ours.load_state_dict(reference.state_dict())
    x = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        truth = copy.deepcopy(reference).double().eval()(x.double())
        diffs = {"transcription": (reference.eval()(x).double() - truth).abs().max().item(),
                 "ours": (ours.eval()(x).double() - truth).abs().max().item()}
    del reference, ours, truth
    worker = [sys.executable, str(REPO / "scripts" / "bench.py"), "_spectroformer_worker"]
    rows = []
    for malloc in ("default", "reuse"):
        runs = {}
        for r in range(max(3, args.rounds)):   # each side its own process, alternating
            for side in ("transcription", "ours"):
                res = _run_json(worker + [side, "--size", str(size), "--threads", str(threads),
                                          "--repeats", str(min(args.repeats, 3)), "--malloc", malloc])
                runs.setdefault(side, []).append(res)
                print(f"  malloc {malloc}, round {r + 1}, {side}: forward CPU {res['forward']['cpu_s']:.2f} s, "
                      f"train step CPU {res['train step']['cpu_s']:.2f} s, peak RSS {res['peak_rss_gb']:.2f} GB",
                      flush=True)
        for what in ("forward", "train step"):
            med = {side: {k: statistics.median(run[what][k] for run in runs[side]) for k in ("s", "cpu_s")}
                   for side in runs}
            base = med["transcription"]
            for side in runs:
                rows.append({"what": what, "model": f"spectroformer {side}", "malloc": malloc, "size": size,
                             "batch": 2 if what == "forward" else 1, "s": med[side]["s"], "cpu_s": med[side]["cpu_s"],
                             "speedup_vs_official": base["s"] / med[side]["s"],
                             "cpu_speedup_vs_official": base["cpu_s"] / med[side]["cpu_s"],
                             "rounds_cpu_s": " ".join(f"{run[what]['cpu_s']:.2f}" for run in runs[side]),
                             "peak_rss_gb": statistics.median(run["peak_rss_gb"] for run in runs[side]),
                             "max_abs_diff_vs_float64_original": diffs[side]})
                print(f"  {what} {side} (malloc {malloc}): {med[side]['s']:.3f} s, x{base['s'] / med[side]['s']:.2f}; "
                      f"CPU {med[side]['cpu_s']:.3f} s, x{base['cpu_s'] / med[side]['cpu_s']:.2f}; "
                      f"max |d| vs float64 original {diffs[side]:.1e}", flush=True)
    big = 512 if args.quick else 2048
    row = _phaseformer_tiled_memory(big, 256 if args.quick else 512, "1x", "spectroformer")
    rows.append(row)
    print(f"  {row['what']}: peak RSS {row['peak_rss_gb']:.2f} GB ({row['s']:.0f} s)", flush=True)
    return rows


def bench_spectroformer_only(args) -> list[dict]:
    """The Spectroformer rows of the phaseformer section alone."""
    rows = bench_spectroformer(args)
    report(rows, f"spectroformer, {torch.get_num_threads()} threads")
    return rows


def _phaseformer_gpu(args, state) -> list[dict]:
    """CUDA: fp32 vs bf16 / fp16 autocast (the FFTs stay fp32), forward and training step."""
    from phaseformer.model import Phaseformer

    dev = torch.device("cuda")
    rows = []
    for size, bs in ((256, 8), (512, 2)):
        model = Phaseformer().to(dev)
        model.load_state_dict(state)
        x = torch.rand(bs, 3, size, size, device=dev)
        opt = torch.optim.Adam(model.parameters(), 1e-4, betas=(0.5, 0.999))
        ref = {}
        for prec, dtype in (("fp32", None), ("bf16", torch.bfloat16), ("fp16", torch.float16)):
            ctx = (lambda: torch.autocast("cuda", dtype=dtype)) if dtype else contextlib.nullcontext
            scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)

            def forward():
                with torch.inference_mode(), ctx():
                    model.eval()(x)

            def step():
                model.train()
                opt.zero_grad(set_to_none=True)
                with ctx():
                    a, b = model(x)
                    loss = a.float().square().mean() + b.float().square().mean()
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
            t_fwd, t_step = timed(forward, args.repeats, warmup=3), timed(step, args.repeats, warmup=3)
            ref = ref or {"fwd": t_fwd, "step": t_step}
            rows.append({"what": "gpu", "precision": prec, "size": size, "batch": bs,
                         "forward_img_s": bs / t_fwd, "fwd_vs_fp32": ref["fwd"] / t_fwd,
                         "train_img_s": bs / t_step, "train_vs_fp32": ref["step"] / t_step})
# ---------------------------------------------------------------- colorize
_COLORIZE_MEM_CHILD = """
import resource, sys, torch
sys.path.insert(0, {repo!r})

def high_water_kib():
    # VmHWM belongs to this process image (ru_maxrss would carry the parent's over exec)
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

torch.set_num_threads({threads})
from colorize.model import ImprovedUNet
from tests.colorize_ref.original_unet import OriginalImprovedUNet
torch.manual_seed(0)
variant, size, bs = {variant!r}, {size}, {bs}
model = OriginalImprovedUNet() if variant == "transcription" else ImprovedUNet()
fmt = torch.channels_last if variant == "ours_channels_last" else torch.contiguous_format
model = model.to(memory_format=fmt)
x = torch.rand(bs, 3, size, size).contiguous(memory_format=fmt)
y = torch.rand(bs, 3, size, size)
opt = torch.optim.AdamW(model.parameters(), 1e-3, weight_decay=0.01)
before = high_water_kib()
opt.zero_grad(set_to_none=True)
torch.nn.functional.l1_loss(model(x), y).backward()
opt.step()
print(before, high_water_kib())
"""


def _colorize_eval_set(folder: Path, n: int, size: int) -> None:
    """n (pred, gt, input) triples of size x size PNGs: structured colour images, gray inputs with a
    flat-filled rectangle, predictions = noisy ground truth."""
    import numpy as np
    from PIL import Image

    from colorize.data import gray_u8
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:size, :size]
    for d in ("gt", "pred", "inputs"):
        (folder / d).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        gt = np.stack([xx * 255 / size, yy * 255 / size, 128 + 100 * np.sin(xx / (5.0 + i))], -1)
        gt = np.clip(gt + rng.normal(0, 10, gt.shape), 0, 255).astype(np.uint8)
        inp = gray_u8(gt)
        y0, x0 = rng.integers(0, size // 2, 2)
        inp[y0:y0 + size // 4, x0:x0 + size // 3] = rng.integers(0, 256)
        pred = np.clip(gt.astype(int) + rng.integers(-30, 31, gt.shape), 0, 255).astype(np.uint8)
        name = f"TEST_{i:03d}.png"
        Image.fromarray(gt).save(folder / "gt" / name)
        Image.fromarray(inp).save(folder / "inputs" / name)
        Image.fromarray(pred).save(folder / "pred" / name)


def bench_colorize(args) -> list[dict]:
    """improved_unet (fused, channels_last or not) against a straightforward transcription of the
    original module (tests/colorize_ref/original_unet.py, the same math): forward and an AdamW
    training step at 256x256, batch 4 (--quick: 64, batch 2), outputs compared; peak memory (RSS)
    of one training step at 512x512, batch 2 (--quick: 128), each variant in a fresh process;
    colorize/evaluate.py on 512x512 PNGs against scikit-image (+ OpenCV: the baseline's own scoring
    loop, run by the Python in $COLORIZE_BENCH_REF_PYTHON, default this one, when it has cv2 and
    skimage). On CUDA also fp32 / bf16 / fp16 autocast, eager and torch.compile(mode="reduce-overhead")."""
    import numpy as np

    from colorize.model import ImprovedUNet
    from tests.colorize_ref.original_unet import OriginalImprovedUNet

    threads = torch.get_num_threads()
    rows = []
    size, bs = (64, 2) if args.quick else (256, 4)
    torch.manual_seed(0)
    ref = OriginalImprovedUNet()
    variants = {"transcription": (ref, torch.contiguous_format)}
    ref_cl = OriginalImprovedUNet()
    ref_cl.load_state_dict(ref.state_dict())
    variants["transcription_channels_last"] = (ref_cl.to(memory_format=torch.channels_last), torch.channels_last)
    for name, fmt in (("ours", torch.contiguous_format), ("ours_channels_last", torch.channels_last)):
        m = ImprovedUNet()
        m.load_state_dict(ref.state_dict())
        variants[name] = (m.to(memory_format=fmt), fmt)
    x = torch.rand(bs, 3, size, size, generator=torch.Generator().manual_seed(1))
    target = torch.rand(bs, 3, size, size, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        expected = ref(x)
        max_diff = {n: float((m(x.contiguous(memory_format=f)) - expected).abs().max()) for n, (m, f) in variants.items()}
    opts = {n: torch.optim.AdamW(m.parameters(), 1e-3, weight_decay=0.01) for n, (m, _) in variants.items()}

    def forward(n):
        m, f = variants[n]
        with torch.inference_mode():
            m(x.contiguous(memory_format=f))

    def step(n):
        m, f = variants[n]
        opts[n].zero_grad(set_to_none=True)
        F.l1_loss(m(x.contiguous(memory_format=f)), target).backward()
        opts[n].step()

    reps = max(1, args.repeats // 2) if not args.quick else args.repeats
    times = {n: {"forward": [], "step": []} for n in variants}
    for n in variants:  # warm-up (allocations, oneDNN primitive caches, optimizer state)
        forward(n)
        step(n)
    for _ in range(reps):  # interleaved, so drift in machine load hits every variant alike
        for n in variants:
            times[n]["forward"].append(timed(lambda: forward(n), 1, warmup=0))
            times[n]["step"].append(timed(lambda: step(n), 1, warmup=0))
    base = {k: statistics.median(v) for k, v in times["transcription"].items()}
    for n in variants:
        fwd, stp = statistics.median(times[n]["forward"]), statistics.median(times[n]["step"])
        rows.append({"what": f"improved_unet {n}", "size": size, "batch": bs, "forward_img_s": bs / fwd,
                     "forward_speedup": base["forward"] / fwd, "train_img_s": bs / stp,
                     "train_speedup": base["step"] / stp, "max_abs_diff_vs_transcription": max_diff[n]})
        print(f"  {n}: forward {bs / fwd:.3g} img/s, train step {bs / stp:.3g} img/s", flush=True)
    del variants, opts, ref, ref_cl

    # peak memory of one training step, each variant alone in a fresh process
    msize, mbs = (128, 2) if args.quick else (512, 2)
    mem = {}
    for variant in ("transcription", "ours", "ours_channels_last"):
        code = _COLORIZE_MEM_CHILD.format(repo=str(REPO), threads=threads, variant=variant, size=msize, bs=mbs)
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        if res.returncode != 0:
            raise SystemExit(f"memory child {variant} failed:\n{res.stderr[-3000:]}")
        before, peak = (int(v) for v in res.stdout.split()[-2:])
        mem[variant] = (before / 1024, peak / 1024)
        print(f"  {variant}: peak RSS {peak / 1024:.0f} MiB ({before / 1024:.0f} MiB before the step)", flush=True)
    for variant, (before, peak) in mem.items():
        rows.append({"what": f"train step peak RSS {variant}", "size": msize, "batch": mbs, "peak_mib": peak,
                     "step_mib": peak - before, "vs_transcription": peak / mem["transcription"][1]})

    # evaluate.py throughput on 512x512 PNGs
    from colorize.evaluate import evaluate
    from colorize.metrics import hue_similarity
    n_img, esize = (6, 128) if args.quick else (24, 512)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        _colorize_eval_set(folder, n_img, esize)
        items = [(p.stem, folder / "pred" / p.name, p, folder / "inputs" / p.name, False)
                 for p in sorted((folder / "gt").iterdir())]
        t_ours = timed(lambda: evaluate(items), max(1, args.repeats // 2))
        ours_score = float(np.mean([r["score"] for r in evaluate(items)]))
        rows.append({"what": "evaluate.py (numpy)", "size": esize, "images": n_img, "img_s": n_img / t_ours,
                     "vs_reference": 1.0, "mean_score": ours_score})
        try:
            from skimage.metrics import structural_similarity

            from colorize.data import damage_mask, load_rgb

            def skimage_loop():
                for _, pred_p, gt_p, inp_p, _ in items:
                    gt, pred, inp = load_rgb(gt_p), load_rgb(pred_p), load_rgb(inp_p)
                    mask = damage_mask(inp, gt)
                    dr = pred.max() - pred.min()
                    structural_similarity(gt, pred, channel_axis=-1, data_range=dr)
                    structural_similarity(gt[mask], pred[mask], channel_axis=-1, data_range=dr)
                    hue_similarity(gt, pred)
            t_sk = timed(skimage_loop, max(1, args.repeats // 2))
            rows.append({"what": "scikit-image SSIM terms (+ this hue histogram)", "size": esize, "images": n_img,
                         "img_s": n_img / t_sk, "ours_speedup": t_sk / t_ours})
        except ImportError:
            print("  scikit-image not installed: no scikit-image row")
        ref_python = os.environ.get("COLORIZE_BENCH_REF_PYTHON", sys.executable)
        res = subprocess.run([ref_python, str(REPO / "tests" / "colorize_ref" / "bench_metric_ref.py"), str(folder),
                              "--repeats", str(max(1, args.repeats // 2))], capture_output=True, text=True)
        if res.returncode == 0:
            ref_row = json.loads(res.stdout.strip().splitlines()[-1])
            rows.append({"what": f"baseline scoring loop (OpenCV {ref_row['opencv']} + scikit-image)", "size": esize,
                         "images": n_img, "img_s": ref_row["img_s"], "ours_speedup": (n_img / t_ours) / ref_row["img_s"],
                         "mean_score": ref_row["score"], "score_diff": abs(ref_row["score"] - ours_score)})
        else:
            print(f"  OpenCV + scikit-image reference skipped ({ref_python} lacks them; set "
                  f"COLORIZE_BENCH_REF_PYTHON to a Python that has them)")

    if torch.cuda.is_available():
        rows += _bench_colorize_cuda(args)
    report(rows, f"colorize, {threads} threads")
    return rows


def _bench_colorize_cuda(args) -> list[dict]:
    """improved_unet on CUDA, channels_last: fp32 / bf16 / fp16 autocast, eager and
    torch.compile(mode='reduce-overhead') (the original's), forward and AdamW training step."""
    from colorize.model import ImprovedUNet

    dev = torch.device("cuda")
    torch.backends.cudnn.benchmark = True
    size, bs = (64, 2) if args.quick else (256, 4)
    rows, ref = [], {}
    for compiled in (False, True):
        for prec, dtype in (("fp32", None), ("bf16", torch.bfloat16), ("fp16", torch.float16)):
            torch.manual_seed(0)
            model = ImprovedUNet().to(dev, memory_format=torch.channels_last)
            run = torch.compile(model, mode="reduce-overhead") if compiled else model
            x = torch.rand(bs, 3, size, size, device=dev).contiguous(memory_format=torch.channels_last)
            y = torch.rand(bs, 3, size, size, device=dev)
            opt = torch.optim.AdamW(model.parameters(), 1e-3, weight_decay=0.01)
            scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
            ctx = (lambda: torch.autocast("cuda", dtype=dtype)) if dtype else contextlib.nullcontext

            def forward():
                with torch.no_grad(), ctx():
                    run(x)

            def step():
                opt.zero_grad(set_to_none=True)
                with ctx():
                    loss = F.l1_loss(run(x).float(), y)
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
            model.eval()
            t_fwd = timed(forward, args.repeats, warmup=3)
            model.train()
            t_step = timed(step, args.repeats, warmup=3)
            ref = ref or {"fwd": t_fwd, "step": t_step}
            name = f"{prec}{' compiled' if compiled else ''}"
            rows.append({"what": f"cuda improved_unet {name}", "size": size, "batch": bs, "forward_img_s": bs / t_fwd,
                         "fwd_vs_fp32_eager": ref["fwd"] / t_fwd, "train_img_s": bs / t_step,
                         "train_vs_fp32_eager": ref["step"] / t_step})
            print(f"  cuda {name}: forward {bs / t_fwd:.4g} img/s, train step {bs / t_step:.4g} img/s", flush=True)
            del model, run, opt
            torch.cuda.empty_cache()
    return rows


# ---------------------------------------------------------------- spectral
SPECTRAL_OP_GROUPS = {   # profiler op name -> where the time goes
    "convolution": ("aten::mkldnn_convolution", "aten::convolution_backward", "aten::_convolution",
                    "aten::thnn_conv2d", "aten::_slow_conv2d_forward", "aten::_slow_conv2d_backward"),
    "padding and copies": ("aten::cat", "aten::copy_", "aten::_pad_circular", "aten::constant_pad_nd",
                           "aten::fill_", "aten::zero_", "aten::narrow_copy", "aten::clone", "aten::contiguous"),
    "group norm": ("aten::native_group_norm", "aten::native_group_norm_backward"),
    "attention and linear": ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm",
                             "aten::_scaled_dot_product_flash_attention_for_cpu",
                             "aten::_scaled_dot_product_flash_attention_for_cpu_backward",
                             "aten::_softmax", "aten::_softmax_backward_data"),
}


SPECTRAL_ELEMENTWISE = {"aten::silu", "aten::silu_backward", "aten::mul", "aten::mul_", "aten::add", "aten::add_",
                        "aten::bernoulli_", "aten::div_", "aten::div", "aten::gelu", "aten::gelu_backward", "aten::sub",
                        "aten::native_layer_norm", "aten::native_layer_norm_backward", "aten::sum", "aten::mean",
                        "aten::addcmul_", "aten::addcdiv_", "aten::lerp_", "aten::sqrt", "aten::linalg_vector_norm",
                        "aten::norm", "aten::pow", "aten::clamp", "aten::empty_like", "aten::where", "aten::neg"}


def _spectral_profile(fn) -> dict:
    """Self CPU time of one call of `fn`, in ms, per group of operators."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    groups = {k: 0.0 for k in (*SPECTRAL_OP_GROUPS, "elementwise (SiLU, dropout, adds)", "optimizer", "other")}
    for e in prof.key_averages():
        if not e.key.startswith("aten::"):
            continue
        group = next((g for g, names in SPECTRAL_OP_GROUPS.items() if e.key in names), None)
        if group is None:
            group = ("optimizer" if "foreach" in e.key or "adam" in e.key else
                     "elementwise (SiLU, dropout, adds)" if e.key in SPECTRAL_ELEMENTWISE else "other")
        groups[group] += e.self_cpu_time_total / 1000.0
    return groups


def cpu_has_native_bf16() -> bool:
    """Whether the CPU has bfloat16 dot-product instructions (AVX512-BF16 or AMX; read from
    /proc/cpuinfo, so Linux only): where they are missing, oneDNN emulates bf16 and --amp bf16 gains
    little or nothing."""
    try:
        flags = Path("/proc/cpuinfo").read_text().split()
    except OSError:
        return False
    return ("avx512_bf16" in flags or "amx_bf16" in flags) and torch.backends.mkldnn.is_available()


def _spectral_models(params: dict):
    from spectral.model import build_model
    from tests.spectral_ref import original

    torch.manual_seed(0)
    ref = original.get_model("cnn_xattn", **params)
    ours = build_model("cnn_xattn", **params)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def _spectral_steps(ref, ours, x, y, device, amp: torch.dtype | None = None):
    """The original Trainer's step (transcribed: AdamW 0.9/0.95, clip 1.0, LambdaLR per step, fp32
    on the CPU) and ours as train.py runs it through common's Trainer (channels_last and micro-batches
    of TRAIN_MICRO_BATCH on the CPU, fused AdamW, the same clipping and schedule; `amp`: the forward under
    autocast, as --amp bf16, the loss in fp32)."""
    from common.device import autocast
    from common.schedulers import warmup_cosine
    from spectral.losses import build_loss
    from spectral.train import TRAIN_MICRO_BATCH
    from tests.spectral_ref import original

    orig_step = original.OriginalStep(ref, original.get_loss("mse_pearson", w_mse=0.5, w_corr=0.5), lr=1e-4,
                                      weight_decay=0.005, grad_clip=1.0, total_steps=10_000)
    cl = device.type == "cpu"
    model = ours.to(memory_format=torch.channels_last) if cl else ours
    xx = x.contiguous(memory_format=torch.channels_last) if cl else x
    criterion = build_loss("mse_pearson", w_mse=0.5, w_corr=0.5)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.005, betas=(0.9, 0.95), eps=1e-8, fused=True)
    sched = warmup_cosine(opt, 10_000, 500)

    chunk = TRAIN_MICRO_BATCH if cl else len(x)    # train.py's micro-batches on the CPU (Trainer(micro_batch=...))

    def ours_step():
        model.train()
        for xs, ys in zip(xx.split(chunk), y.split(chunk)):
            with autocast(device, amp):
                loss = criterion(model(xs), ys)
            (loss * (len(xs) / len(xx))).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()

    return (lambda: orig_step(x, y)), ours_step


def spectral_step_worker(argv) -> None:
    """One side of `bench.py spectral`'s training step in its own process: the original step, or ours
    as spectral/train.py runs it (with its process setup, common.cli.apply_runtime_args); prints one
    JSON line."""
    from common.device import reuse_freed_memory

    p = argparse.ArgumentParser()
    p.add_argument("side", choices=("original", "ours", "ours_bf16"))
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    a = p.parse_args(argv)
    if a.side != "original":
        reuse_freed_memory()
    torch.set_num_threads(a.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    ref, ours = _spectral_models({})
    g = torch.Generator().manual_seed(0)
    x = (torch.randint(0, 2, (a.batch_size, 1, 128, 128), generator=g).float() * 2 - 1).to(device)
    y = torch.rand(a.batch_size, 2, 2, 30, generator=g).to(device)
    orig_step, ours_step = _spectral_steps(ref.to(device), ours.to(device), x, y, device,
                                           torch.bfloat16 if a.side == "ours_bf16" else None)
    t = timed(orig_step if a.side == "original" else ours_step, a.repeats, warmup=1)
    print(json.dumps({"samples_s": a.batch_size / t}))


def _proc_tree_memory(pid: int) -> tuple[int, dict[int, int]]:
    """(RSS of `pid`, {pid: PSS} of `pid` and its descendants), bytes (Linux)."""
    def kids(p):
        out = []
        try:
            for t in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{t}/children") as f:
                    out += [int(c) for c in f.read().split()]
        except OSError:
            pass
        return out

    def field(path, name):
        try:
            with open(path) as f:
                for line in f:
                    if line.startswith(name):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        return 0

    rss = field(f"/proc/{pid}/status", "VmRSS:")
    todo, pss = [pid], {}
    while todo:
        p = todo.pop()
        if p not in pss:
            pss[p] = field(f"/proc/{p}/smaps_rollup", "Pss:")
            todo += kids(p)
    return rss, pss


def _spectral_loader_child(root: str, batch: int, workers: int, out_len: int = 30) -> None:
    """Build the training loader over the raw parts in `root` as train.py does (valid rows, split by
    structure, the 180-degree copies) and iterate one epoch; prints one JSON line."""
    from common.data import train_loader
    from common.distributed import DistInfo
    from spectral.data import RawData, SpectralDataset, find_parts, make_split

    t0 = time.perf_counter()
    raw = RawData(*find_parts(root), out_len)
    split = make_split(raw, 0.95, 42)
    ds = SpectralDataset(raw, split.train, augment_180=True)
    loader = train_loader(ds, batch, seed=42, workers=workers, info=DistInfo())
    built = time.perf_counter() - t0
    n, t1 = 0, time.perf_counter()
    for x, y in loader:
        n += len(x)
    epoch = time.perf_counter() - t1
    print(json.dumps({"valid_rows": len(raw), "train_samples": len(ds), "build_s": built, "epoch_s": epoch,
                      "samples": n}), flush=True)


def _write_synthetic_raw(root: Path, parts: int, rows: int, seed: int = 0) -> int:
    """CR_recon-format parts of `rows` rows, about half of them simulated; every structure unique.
    Returns the bytes written."""
    import numpy as np

    rng = np.random.default_rng(seed)
    pool = rng.integers(0, 2, (512, 1, 128, 128), dtype=np.uint8)
    chunk = 4096
    for k in range(parts):
        s = np.lib.format.open_memmap(root / f"binary_dataset_128_{k}.npy", "w+", np.uint8, (rows, 1, 128, 128))
        t = np.lib.format.open_memmap(root / f"spectra_latest_{k}.npy", "w+", np.float32, (rows, 3, 301))
        for a in range(0, rows, chunk):
            b = min(a + chunk, rows)
            idx = np.arange(a, b) + k * rows
            block = pool[idx % len(pool)].copy()
            block[:, 0, 0, :24] = (idx[:, None] >> np.arange(24)) & 1     # the row number: no two alike
            s[a:b] = block
            spec = -rng.random((b - a, 3, 301), dtype=np.float32) * 0.6
            spec[rng.random(b - a) < 0.47] = 0.0                           # not simulated yet
            t[a:b] = spec
        s.flush()
        t.flush()
        del s, t
    return sum(p.stat().st_size for p in root.iterdir())


def _spectral_data(args, batch: int, step_rate: float | None) -> list[dict]:
    """Peak memory and speed of building the training loader and iterating one epoch over a
    synthetic full-size raw set (2 x 100,000 rows), in a child process."""
    rows = []
    # data: a full-size raw set written once to a temporary folder
    parts, per_part = (2, 5000) if args.quick else (2, 100_000)
    workers = 2
    with tempfile.TemporaryDirectory(prefix="spectral-bench-") as tmp:
        t0 = time.perf_counter()
        size = _write_synthetic_raw(Path(tmp), parts, per_part)
        os.sync()   # measure reading settled files, not pages still being written back
        print(f"  wrote {parts} x {per_part} raw rows ({size / 2 ** 30:.2f} GiB) in {time.perf_counter() - t0:.0f} s",
              flush=True)
        code = (f"import sys; sys.path.insert(0, {str(REPO)!r}); from scripts.bench import _spectral_loader_child; "
                f"_spectral_loader_child({tmp!r}, {batch}, {workers})")
        proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
        peak_rss = peak_pss = 0
        peak_at, t_start = {}, time.perf_counter()
        while proc.poll() is None:
            rss, per_process = _proc_tree_memory(proc.pid)
            peak_rss = max(peak_rss, rss)
            if sum(per_process.values()) > peak_pss:
                peak_pss = sum(per_process.values())
                peak_at = {"t_s": round(time.perf_counter() - t_start, 1),
                           "pss_MiB": [v >> 20 for v in per_process.values()]}
            time.sleep(0.05)
        out = proc.stdout.read()
        if proc.returncode != 0:
            raise SystemExit(f"loader benchmark failed ({proc.returncode}):\n{out}")
        res = json.loads(out.strip().splitlines()[-1])
    struct_bytes = res["valid_rows"] * 128 * 128
    original_peak = 4 * struct_bytes   # valid rows + rotated copy + [valid; rotated] (CR_recon dataset.py)
    loader_rate = res["samples"] / res["epoch_s"]
    rows.append({"what": "loader: build + one epoch", "raw_rows": parts * per_part, "valid_rows": res["valid_rows"],
                 "train_samples": res["train_samples"], "build_s": res["build_s"], "epoch_s": res["epoch_s"],
                 "peak_rss_main_GiB": peak_rss / 2 ** 30, "peak_pss_all_processes_GiB": peak_pss / 2 ** 30,
                 "original_peak_GiB_computed": original_peak / 2 ** 30, "workers": workers,
                 "pss_peak_at": str(peak_at)})
    if step_rate:
        rows.append({"what": "loader throughput vs train step", "loader_samples_s": loader_rate,
                     "train_step_samples_s": step_rate, "ratio": loader_rate / step_rate})
    print(f"  loader: {res['valid_rows']} valid rows, built in {res['build_s']:.1f} s, epoch of {res['samples']} "
          f"samples in {res['epoch_s']:.1f} s ({loader_rate:.0f}/s"
          + (f", {loader_rate / step_rate:.0f}x the train step" if step_rate else "") + "); "
          f"peak RSS {peak_rss / 2 ** 30:.2f} GiB (all processes: PSS {peak_pss / 2 ** 30:.2f} GiB) against "
          f"{original_peak / 2 ** 30:.1f} GiB computed for CR_recon", flush=True)
    report(rows, "spectral data loader")
    return rows


def bench_spectral(args) -> list[dict]:
    """CR_recon's cnn_xattn: a training step (batch 64) and inference (batch 256) against the
    transcription of the original (tests/spectral_ref/original.py, the same weights), where the time
    goes, and the data loader's peak memory and throughput on a synthetic full-size raw set."""
    from spectral.deploy import SpectraGraph

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = []
    bs_train, bs_infer = (8, 32) if args.quick else (64, 256)
    if args.part == "data":
        return _spectral_data(args, bs_train, None)
    bf16 = device.type == "cpu" and cpu_has_native_bf16()
    # --amp bf16: CR_recon has no CPU autocast (its use_amp is CUDA-only); against the same fp32 original
    sides = ["original", "ours", *(["ours_bf16"] if bf16 else [])]
    worker = [sys.executable, str(REPO / "scripts" / "bench.py"), "_spectral_step_worker", "--batch-size",
              str(bs_train), "--threads", str(torch.get_num_threads()), "--repeats", str(args.repeats)]
    rates = {}
    for r in range(max(3, args.rounds)):   # each side its own process (malloc's state is per process), alternating
        for side in (sides if r % 2 == 0 else sides[::-1]):
            rates.setdefault(side, []).append(_run_json(worker[:3] + [side] + worker[3:])["samples_s"])
            print(f"  train step b{bs_train}, round {r + 1}: {side} {rates[side][-1]:.3g}/s", flush=True)
    med = {k: statistics.median(v) for k, v in rates.items()}
    step_rate = med["ours"]
    rows.append({"what": "train step (original)", "batch": bs_train, "samples_s": med["original"],
                 "rounds": " ".join(f"{v:.1f}" for v in rates["original"])})
    for side, what in (("ours", "ours"), ("ours_bf16", "ours, --amp bf16")):
        if side in med:
            rows.append({"what": f"train step ({what})", "batch": bs_train, "samples_s": med[side],
                         "speedup": med[side] / med["original"], "rounds": " ".join(f"{v:.1f}" for v in rates[side])})
            print(f"  train step b{bs_train} ({what}): original {med['original']:.3g}/s, {med[side]:.3g}/s "
                  f"({med[side] / med['original']:.2f}x)", flush=True)
    ref, ours = _spectral_models({})
    ref, ours = ref.to(device), ours.to(device)
    g = torch.Generator().manual_seed(0)
    x = (torch.randint(0, 2, (bs_train, 1, 128, 128), generator=g).float() * 2 - 1).to(device)
    y = torch.rand(bs_train, 2, 2, 30, generator=g).to(device)

    if device.type == "cpu":   # where the time goes, on a smaller batch
        xs, ys = x[:16], y[:16]
        po, pu = _spectral_steps(ref, ours, xs, ys, device)
        for name, fn in (("original", po), ("ours", pu)):
            prof = _spectral_profile(fn)
            total = sum(prof.values())
            rows.append({"what": f"train step b16 profile ({name})", "total_ms": total,
                         **{f"{k} %": 100.0 * v / total for k, v in prof.items()}})
            print(f"  profile {name}: " + ", ".join(f"{k} {100 * v / total:.0f}%" for k, v in prof.items()), flush=True)

    ours.load_state_dict(ref.state_dict())   # the steps above moved both apart
    ref.eval()
    ours.eval()
    xi = (torch.randint(0, 2, (bs_infer, 1, 128, 128), generator=g).float() * 2 - 1).to(device)
    xi_cl = xi.contiguous(memory_format=torch.channels_last)
    ours_cl = ours.to(memory_format=torch.channels_last)
    # as spectral/infer.py runs it on the CPU: two streams (batch halves) of half the threads each
    total = torch.get_num_threads()
    streams = 2 if device.type == "cpu" and total >= 2 else 1
    graph = SpectraGraph(ours_cl, map_to_pm1=False, streams=streams).eval()
    graph_one = SpectraGraph(ours_cl, map_to_pm1=False, streams=1).eval()   # infer.py --threads 1, all threads
    variants = {"original": (ref, xi, total), "ours, one stream": (lambda v: graph_one(v)[0], xi_cl, total),
                "ours": (lambda v: graph(v)[0], xi_cl, total // streams)}
    if bf16:   # infer.py --amp bf16
        graph_bf16 = SpectraGraph(ours_cl, map_to_pm1=False, streams=streams, amp_dtype=torch.bfloat16).eval()
        variants["ours, --amp bf16"] = (lambda v: graph_bf16(v)[0], xi_cl, total // streams)
    if device.type != "cpu" or streams == 1:
        variants.pop("ours, one stream")
    times = {k: [] for k in variants}
    reps = max(1, args.repeats // 2 + 1)
    with torch.inference_mode():
        for _ in range(reps):   # interleaved
            for k, (fn, inp, threads) in variants.items():
                torch.set_num_threads(threads)
                times[k].append(timed(lambda: fn(inp if device.type == "cpu" else xi), 1, warmup=1 if not times[k] else 0))
        torch.set_num_threads(total // streams)
        expected = ref(xi[:8])
        err = float((expected - graph(xi_cl[:8])[0]).abs().max())
        err_bf16 = float((expected - graph_bf16(xi_cl[:8])[0]).abs().max() / expected.abs().max()) if bf16 else None
        torch.set_num_threads(total)
    a = statistics.median(times["original"])
    rows.append({"what": "inference (original, eval + no_grad)", "batch": bs_infer, "structures_s": bs_infer / a})
    for k in variants:
        if k == "original":
            continue
        b = statistics.median(times[k])
        what = f"inference ({k}: channels_last + inference_mode + micro-batches{f', {streams} streams' if k != 'ours, one stream' and streams > 1 else ''})"
        rows.append({"what": what, "batch": bs_infer, "structures_s": bs_infer / b, "speedup": a / b,
                     **({"max_abs_diff": err} if k == "ours" else {}),
                     **({"max_diff_relative_to_max_output": err_bf16} if k == "ours, --amp bf16" else {})})
        print(f"  inference b{bs_infer}: original {bs_infer / a:.3g}/s, {k} {bs_infer / b:.3g}/s ({a / b:.2f}x)", flush=True)
    print(f"  inference max |diff| {err:.2g}", flush=True)

    if device.type == "cuda":   # untested here: no GPU on the machine this was written on
        for name, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
            with torch.inference_mode(), torch.autocast("cuda", dtype=dtype):
                t = timed(lambda: ours(xi), args.repeats, warmup=2)
            rows.append({"what": f"inference (ours, {name} autocast)", "batch": bs_infer, "structures_s": bs_infer / t})

    rows += _spectral_data(args, bs_train, step_rate)
    report(rows, f"spectral (cnn_xattn) on {device.type}, {torch.get_num_threads()} threads")
    return rows


def ddp_step_worker(argv) -> None:
    """One side of `bench.py ddp`, run by torchrun: an improved_unet training step under DDP (gloo),
    its never-used parameters frozen (as colorize/train.py does) or left trainable with DDP's
    find_unused_parameters=True (the alternative); rank 0 prints one JSON line."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from colorize.model import build_model
    p = argparse.ArgumentParser()
    p.add_argument("side", choices=("frozen", "find_unused"))
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--repeats", type=int, default=10)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    torch.manual_seed(0)
    model = build_model("improved_unet", a.width)
    if a.side == "frozen":
        for q in model.unused_parameters():
            q.requires_grad_(False)
    ddp = DDP(model, find_unused_parameters=a.side == "find_unused")
    opt = torch.optim.AdamW(ddp.parameters(), lr=1e-4, weight_decay=0.01)
    g = torch.Generator().manual_seed(dist.get_rank())
    x = torch.rand(a.batch_size, 3, a.size, a.size, generator=g)
    y = torch.rand(a.batch_size, 3, a.size, a.size, generator=g)

    def step():
        F.l1_loss(ddp(x), y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    t = timed(step, a.repeats, warmup=2)
    if dist.get_rank() == 0:
        print(json.dumps({"step_s": t}))
    dist.destroy_process_group()


def bench_ddp(args) -> list[dict]:
    """colorize's improved_unet under torchrun, 2 CPU processes (gloo, 1 thread each): a training step
    with the never-used parameters frozen (what colorize/train.py does) against DDP's
    find_unused_parameters=True, each side in its own torchrun, alternating, median of --rounds."""
    sizes = [(16, 32, 4)] if args.quick else [(16, 64, 4), (32, 128, 4)]
    rows = []
    for width, size, batch in sizes:
        times: dict[str, list[float]] = {"frozen": [], "find_unused": []}
        for _ in range(max(3, args.rounds)):
            for side in times:
                cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                       str(Path(__file__).resolve()), "_ddp_step_worker", side, "--width", str(width),
                       "--size", str(size), "--batch-size", str(batch), "--repeats", str(args.repeats)]
                times[side].append(_run_json(cmd, env={"OMP_NUM_THREADS": "1"})["step_s"])
        frozen, found = statistics.median(times["frozen"]), statistics.median(times["find_unused"])
        rows.append({"what": f"improved_unet width {width}, {size}x{size}, batch {batch} per process",
                     "frozen_step_s": frozen, "find_unused_step_s": found, "find_unused_over_frozen": found / frozen,
                     "rounds_frozen": [round(v, 4) for v in times["frozen"]],
                     "rounds_find_unused": [round(v, 4) for v in times["find_unused"]]})
    report(rows, "DDP step, 2 processes x 1 thread (gloo): unused parameters frozen vs find_unused_parameters")
    return rows


# ---------------------------------------------------------------- infer.py --explain
def explain_worker(argv) -> None:
    """One side (plain or --explain) in its own process: the script's main() in process on N/4 images
    (warm-up), then timed on N/4 and on N images, --repeats times; prints the median seconds."""
    import shutil
    script, explain, small, big, repeats, *cli = argv
    if script == "crbl":
        from crbl.infer import main
    else:
        from battery_ct.infer import main
    out_arg = cli.index("--out") + 1
    base = Path(cli[out_arg])
    times = {small: [], big: []}

    def run(folder: str) -> float:
        argv = [a.replace("{N}", folder) for a in cli] + (["--explain"] if explain == "1" else [])
        shutil.rmtree(base, ignore_errors=True)
        with contextlib.redirect_stdout(open(os.devnull, "w")), contextlib.redirect_stderr(open(os.devnull, "w")):
            t0 = time.perf_counter()
            main(argv)
            return time.perf_counter() - t0

    run(small)
    for _ in range(int(repeats)):
        for n in (small, big):
            times[n].append(run(n))
    print(json.dumps({n: statistics.median(v) for n, v in times.items()}))


def bench_explain(args) -> list[dict]:
    """crbl/infer.py and battery_ct/infer.py with and without --explain (Grad-CAM maps, .npy + .png per
    image), each side its own process (main() in process, warmed up), the sides alternating over
    --rounds rounds. The per-image cost is the difference between a run on N and on N/4 images
    (model loading cancels out); the goal is --explain <= 3x the plain per-image cost."""
    import numpy as np
    from battery_ct.data import _slice_image
    from battery_ct.model import build_model as battery_model
    from common.io import save_image
    from crbl.data import _part_image
    from crbl.model import build_model as crbl_model

    big = 16 if args.quick else 64
    small = big // 4
    rows = []
    threads = str(torch.get_num_threads())
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        rng = np.random.default_rng(0)
        for n in (small, big):
            (tmp / f"crbl{n}").mkdir()
            (tmp / f"bat{n}").mkdir()
        for i in range(big):
            a = _part_image(rng, bool(i % 2))
            b = _slice_image(rng, "cell", i % 2, "x")
            for n in (small, big):
                if i < n:
                    save_image(tmp / f"crbl{n}" / f"p{i:03d}.png", a)
                    save_image(tmp / f"bat{n}" / f"CT_cell_pouch_{i:03d}_x_100.png", b)
        torch.manual_seed(0)
        torch.save(crbl_model("crop").state_dict(), tmp / "crop.pth")
        torch.save(battery_model("resnet18").state_dict(), tmp / "resnet18.pth")
        cases = {"crbl crop (batch 32, 120x120 images)":
                 ["crbl", "--model-type", "crop", "--weights", str(tmp / "crop.pth"), str(tmp / "crbl{N}"),
                  "--out", str(tmp / "out" / "p.csv"), "--overwrite"],
                 "battery_ct resnet18 (128x128)":
                 ["battery_ct", "--model", "resnet18", "--weights", str(tmp / "resnet18.pth"), "--image-size", "128",
                  "--images", str(tmp / "bat{N}"), "--out", str(tmp / "out"), "--workers", "0", "--overwrite"]}
        for name, (script, *cli) in cases.items():
            per = {False: [], True: []}
            for r in range(max(3, args.rounds)):
                for explain in ((False, True) if r % 2 == 0 else (True, False)):
                    res = _run_json([sys.executable, str(REPO / "scripts" / "bench.py"), "_explain_worker", script,
                                     str(int(explain)), str(small), str(big), str(args.repeats), *cli,
                                     "--threads", threads])
                    per[explain].append((res[str(big)] - res[str(small)]) / (big - small))
                    print(f"  {name}: {'explain' if explain else 'plain'} {per[explain][-1] * 1000:.0f} ms/img",
                          flush=True)
            ms = {k: statistics.median(v) * 1000 for k, v in per.items()}
            rows.append({"model": name, "images": f"{big} - {small}", "plain_ms_per_img": ms[False],
                         "explain_ms_per_img": ms[True], "explain_vs_plain": ms[True] / ms[False], "goal": "<= 3",
                         "rounds_ms": " / ".join(" ".join(f"{v * 1000:.0f}" for v in per[k]) for k in (False, True))})
    report(rows, f"infer.py --explain (gradcam) vs plain, per image, {threads} threads, own processes, alternating")
    return rows


SECTIONS = {"common": bench_common, "crbl": bench_crbl, "battery_ct": bench_battery, "spectral": bench_spectral,
            "colorize": bench_colorize, "phaseformer": bench_phaseformer, "onnx": bench_onnx, "gpu": bench_gpu,
            "ddp": bench_ddp, "spectroformer": bench_spectroformer_only, "explain": bench_explain, "int8": bench_int8}
CPU_SECTIONS = ["common", "crbl", "battery_ct", "spectral", "colorize", "phaseformer", "onnx", "explain", "int8"]


def main():
    if sys.argv[1:2] == ["_crbl_worker"]:
        return crbl_worker(sys.argv[2:])
    if sys.argv[1:2] == ["_explain_worker"]:
        return explain_worker(sys.argv[2:])
    if sys.argv[1:2] == ["_spectral_step_worker"]:
        return spectral_step_worker(sys.argv[2:])
    if sys.argv[1:2] == ["_ddp_step_worker"]:
        return ddp_step_worker(sys.argv[2:])
    if sys.argv[1:2] == ["_spectroformer_worker"]:
        return spectroformer_worker(sys.argv[2:])
    from common.cli import ArgumentParser, int_range, MAX_PROCS
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("section", choices=[*SECTIONS, "all"])
    p.add_argument("--threads", type=int_range(1, MAX_PROCS), default=None)
    p.add_argument("--repeats", type=int_range(1, 10_000), default=5)
    p.add_argument("--rounds", type=int_range(1, 1000), default=3, help="crbl, spectral, spectroformer, ddp: alternating rounds of the processes of each side (>= 3)")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--models", help="gpu, onnx, int8 sections: only these models (comma-separated, e.g. crbl_crop,deeplabv3); "
                                    "crbl: only these sides (torch,torch_one_stream,onnxruntime,torch_bf16,onnxruntime_int8; Keras always)")
    p.add_argument("--weights", type=Path, default=None,
                   help="phaseformer section: weights for the tiling seam test (e.g. a demo run's best.pt)")
    p.add_argument("--part", choices=("all", "data"), default="all", help="spectral section: only the data loader")
    p.add_argument("--int8-recipe", default="features", help="crbl, int8 sections: the export_onnx.py --int8-recipe timed")
    p.add_argument("--out", type=Path, default=Path("runs") / "bench")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{os.cpu_count()} cores, cuda={torch.cuda.is_available()}")
    names = CPU_SECTIONS if args.section == "all" else [args.section]
    args.out.mkdir(parents=True, exist_ok=True)
    for name in names:
        rows = SECTIONS[name](args)
        path = args.out / f"{name}.json"
        path.write_text(json.dumps({"torch": torch.__version__, "threads": torch.get_num_threads(),
                                    "rows": rows}, indent=1))
        print(f"results written to {path}")


if __name__ == "__main__":
    main()
