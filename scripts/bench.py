"""Benchmarks. Every number is a ratio against a reference measured in the same run.

  python scripts/bench.py common       # common Trainer vs a bare hand-written step loop
  python scripts/bench.py crbl         # CRBL vs Keras predict (own processes, alternating); EfficientNetB0 vs torchvision
  python scripts/bench.py onnx         # ONNX Runtime CPU vs PyTorch CPU for every exported model
  python scripts/bench.py battery_ct   # every battery model at 512x512, batch 1 and 8, + a train step
  python scripts/bench.py gpu          # CUDA: every model in fp32 vs fp16 / bf16 autocast, + the common loop
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
CRBL_ENGINES = ("torch", "torch_one_stream", "onnxruntime")


def crbl_worker(argv) -> None:
    """One side of `bench.py crbl` in its own process: crbl/infer.py's graph (PyTorch engine, or the
    exported file in ONNX Runtime) on a fixed random batch; prints one JSON line."""
    p = argparse.ArgumentParser()
    p.add_argument("engine", choices=CRBL_ENGINES)
    p.add_argument("--weights", type=Path)
    p.add_argument("--onnx", type=Path)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    x = torch.rand(a.batch_size, 3, a.size, a.size, generator=torch.Generator().manual_seed(0))
    if a.engine.startswith("torch"):
        from crbl.deploy import CRBLProbability
        from crbl.infer import cpu_streams, load_model
        streams = cpu_streams() if a.engine == "torch" else 1   # as crbl/infer.py sets it up
        graph = CRBLProbability(load_model(a.weights, None, "bench")[0], streams).eval()
        run = torch.inference_mode()(lambda: graph(x))
    else:
        from common.onnx import OrtModel, session
        graph = OrtModel(session(a.onnx, ["CPUExecutionProvider"], threads=a.threads, verbose=False))
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
                     "--model", "full", "--out", str(tmp / "crbl.onnx"), "--dynamic-batch"]):
            res = subprocess.run([sys.executable, *cmd], capture_output=True, text=True)
            if res.returncode != 0:
                raise SystemExit(f"{cmd[0]} failed:\n{res.stderr[-3000:]}")
        worker = [sys.executable, str(REPO / "scripts" / "bench.py"), "_crbl_worker", "--weights", str(tmp / "crbl.pth"),
                  "--onnx", str(tmp / "crbl.onnx"), "--batch-size", str(bs), "--size", str(size),
                  "--threads", str(threads), "--repeats", str(args.repeats)]
        sides = {e: (lambda e=e: _run_json(worker[:3] + [e] + worker[3:])) for e in CRBL_ENGINES}
        sides["keras"] = lambda: _run_json(keras_cmd, keras_env)
        for r in range(rounds):
            order = [*CRBL_ENGINES, "keras"] if r % 2 == 0 else ["keras", *reversed(CRBL_ENGINES)]
            for side in order:
                if side == "keras" and r == 0:
                    continue                            # round 1 of Keras ran above
                results.setdefault(side, []).append(sides[side]())
                print(f"  round {r + 1}: {side} {results[side][-1]['img_s']:.1f} img/s", flush=True)
    med = {k: {m: statistics.median(v[m] for v in vals) for m in ("img_s", "img_per_cpu_s")}
           for k, vals in results.items()}
    names = {"torch": "CRBL torch (crbl/infer.py default: two streams)",
             "torch_one_stream": "CRBL torch (one stream, all threads per operator)",
             "onnxruntime": "CRBL ONNX Runtime CPU (exported)", "keras": "CRBL Keras predict (tf_keras + efficientnet)"}
    for side in (*CRBL_ENGINES, "keras"):
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
    deeplab_seg 4 windows of 640^2 (--quick: 128^2, batch 2). Alternating, median per engine."""
    from battery_ct.deploy import BatteryGraph, graph_spec
    from battery_ct.model import MODEL_NAMES, build_model, fuse_for_inference
    from battery_ct.train import normalization
    from common.onnx import OrtModel, export, session
    from crbl.deploy import CRBLProbability, export_spec as crbl_spec
    from crbl.infer import cpu_streams
    from crbl.model import CRBL

    threads = torch.get_num_threads()
    cases = [("crbl_crop", 32, 128)] + [(n, 4 if n == "deeplab_seg" else 8, 640 if n == "deeplab_seg" else 512)
                                        for n in MODEL_NAMES]
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
            heavy = name in ("deeplabv3", "deeplab_seg", "drn_aspp", "convnext_tiny") and not args.quick
            reps = 1 if heavy else args.repeats
            with torch.inference_mode():
                ref = graph(*inputs)
                got = runner(*inputs)
                diff = max(float((g.double() - r.double()).abs().max()) for g, r in zip(got, ref)
                           if r.dtype.is_floating_point)
                t_torch, t_ort = [], []
                for _ in range(2 if heavy else 3):       # alternating rounds
                    t_torch.append(timed(lambda: graph(*inputs), reps))
                    t_ort.append(timed(lambda: runner(*inputs), reps))
            tt, to = statistics.median(t_torch), statistics.median(t_ort)
            rows.append({"model": name, "batch": bs, "size": size, "torch_img_s": bs / tt, "onnxruntime_img_s": bs / to,
                         "ort_vs_torch": tt / to, "max_abs_diff": diff})
            print(f"  {name} b{bs} {size}: torch {bs / tt:.3g} img/s, onnxruntime {bs / to:.3g} img/s "
                  f"({tt / to:.2f}x), max |diff| {diff:.1e}", flush=True)
    torch.set_num_threads(threads)
    report(rows, f"ONNX Runtime CPU vs PyTorch CPU, {threads} threads")
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


SECTIONS = {"common": bench_common, "crbl": bench_crbl, "battery_ct": bench_battery, "onnx": bench_onnx,
            "gpu": bench_gpu}
CPU_SECTIONS = ["common", "crbl", "battery_ct", "onnx"]


def main():
    if sys.argv[1:2] == ["_crbl_worker"]:
        return crbl_worker(sys.argv[2:])
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("section", choices=[*SECTIONS, "all"])
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--rounds", type=int, default=3, help="crbl: alternating rounds of the Keras / torch processes (>= 3)")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--models", help="gpu and onnx sections: only these (comma-separated, e.g. crbl_crop,deeplabv3)")
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
