"""Benchmarks. Every number is a ratio against a reference measured in the same run.

  python scripts/bench.py common       # common Trainer vs a bare hand-written step loop
  python scripts/bench.py crbl         # CRBL vs Keras predict; EfficientNetB0 vs torchvision
  python scripts/bench.py battery_ct   # every battery model at 512x512, batch 1 and 8, + a train step
  python scripts/bench.py spectral     # cnn_xattn train step and inference vs CR_recon; loader memory on 2 x 100,000 rows
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
def bench_crbl(args) -> list[dict]:
    from crbl.model import CRBL, EfficientNetB0
    import torchvision

    rows = []
    bs, size = (8, 128) if args.quick else (32, 128)
    threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        # Keras original with random weights, saved and converted with our converter
        ref = subprocess.run([sys.executable, str(REPO / "tests" / "keras_ref" / "bench_predict.py"), str(tmp),
                              "--batch-size", str(bs), "--size", str(size), "--threads", str(threads),
                              "--repeats", str(args.repeats)],
                             capture_output=True, text=True, env={**os.environ, "TF_USE_LEGACY_KERAS": "1",
                                                                  "TF_CPP_MIN_LOG_LEVEL": "3"})
        if ref.returncode != 0:
            raise SystemExit(f"Keras reference failed:\n{ref.stderr[-3000:]}")
        keras = json.loads(ref.stdout.strip().splitlines()[-1])
        conv = subprocess.run([sys.executable, str(REPO / "scripts" / "convert_h5.py"), str(tmp / "crbl.h5"),
                               str(tmp / "crbl.pth"), "--model-type", "full"], capture_output=True, text=True)
        if conv.returncode != 0:
            raise SystemExit(f"conversion failed:\n{conv.stderr}")
        model = CRBL()
        model.load_state_dict(torch.load(tmp / "crbl.pth", weights_only=True))
        model.eval()
        x = torch.rand(bs, 3, size, size)
        for fmt in ("contiguous", "channels_last"):
            m, xx = model, x
            if fmt == "channels_last":
                m, xx = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
            with torch.inference_mode():
                t = timed(lambda: m(xx), args.repeats)
            rows.append({"model": f"CRBL torch ({fmt})", "batch": bs, "size": size, "img_s": bs / t,
                         "vs_keras_predict": (bs / t) / keras["img_s"]})
        rows.append({"model": "CRBL Keras predict (tf_keras + efficientnet)", "batch": bs, "size": size,
                     "img_s": keras["img_s"], "vs_keras_predict": 1.0})

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
    report(rows, f"crbl inference, {threads} threads")
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


def _spectral_models(params: dict):
    from spectral.model import build_model
    from tests.spectral_ref import original

    torch.manual_seed(0)
    ref = original.get_model("cnn_xattn", **params)
    ours = build_model("cnn_xattn", **params)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def _spectral_steps(ref, ours, x, y, device):
    """The original Trainer's step (transcribed: AdamW 0.9/0.95, clip 1.0, LambdaLR per step, fp32
    on the CPU) and ours as train.py runs it through common's Trainer (channels_last on the CPU,
    fused AdamW, the same clipping and schedule)."""
    from common.schedulers import warmup_cosine
    from spectral.losses import build_loss
    from tests.spectral_ref import original

    orig_step = original.OriginalStep(ref, original.get_loss("mse_pearson", w_mse=0.5, w_corr=0.5), lr=1e-4,
                                      weight_decay=0.005, grad_clip=1.0, total_steps=10_000)
    cl = device.type == "cpu"
    model = ours.to(memory_format=torch.channels_last) if cl else ours
    xx = x.contiguous(memory_format=torch.channels_last) if cl else x
    criterion = build_loss("mse_pearson", w_mse=0.5, w_corr=0.5)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.005, betas=(0.9, 0.95), eps=1e-8, fused=True)
    sched = warmup_cosine(opt, 10_000, 500)

    def ours_step():
        model.train()
        loss = criterion(model(xx), y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()

    return (lambda: orig_step(x, y)), ours_step


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
    sys.path.insert(0, str(REPO))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = []
    bs_train, bs_infer = (8, 32) if args.quick else (64, 256)
    if args.part == "data":
        return _spectral_data(args, bs_train, None)
    ref, ours = _spectral_models({})
    ref, ours = ref.to(device), ours.to(device)
    g = torch.Generator().manual_seed(0)
    x = (torch.randint(0, 2, (bs_train, 1, 128, 128), generator=g).float() * 2 - 1).to(device)
    y = torch.rand(bs_train, 2, 2, 30, generator=g).to(device)
    orig_step, ours_step = _spectral_steps(ref, ours, x, y, device)
    t_orig, t_ours = [], []
    for _ in range(args.repeats):   # interleaved, so drift in machine load hits both alike
        t_orig.append(timed(orig_step, 1, warmup=1 if not t_orig else 0))
        t_ours.append(timed(ours_step, 1, warmup=1 if not t_ours else 0))
    a, b = statistics.median(t_orig), statistics.median(t_ours)
    step_rate = bs_train / b
    rows.append({"what": "train step (original)", "batch": bs_train, "samples_s": bs_train / a})
    rows.append({"what": "train step (ours)", "batch": bs_train, "samples_s": step_rate, "speedup": a / b})
    print(f"  train step b{bs_train}: original {bs_train / a:.3g}/s, ours {step_rate:.3g}/s ({a / b:.2f}x)", flush=True)

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
    reps = max(1, args.repeats // 2 + 1)
    t_ref, t_our = [], []
    with torch.inference_mode():
        for _ in range(reps):
            t_ref.append(timed(lambda: ref(xi), 1, warmup=1 if not t_ref else 0))
            t_our.append(timed(lambda: ours_cl(xi_cl if device.type == "cpu" else xi), 1, warmup=1 if not t_our else 0))
        err = float((ref(xi[:8]) - ours_cl(xi_cl[:8])).abs().max())
    a, b = statistics.median(t_ref), statistics.median(t_our)
    rows.append({"what": "inference (original, eval + no_grad)", "batch": bs_infer, "structures_s": bs_infer / a})
    rows.append({"what": "inference (ours, channels_last + inference_mode)", "batch": bs_infer,
                 "structures_s": bs_infer / b, "speedup": a / b, "max_abs_diff": err})
    print(f"  inference b{bs_infer}: original {bs_infer / a:.3g}/s, ours {bs_infer / b:.3g}/s ({a / b:.2f}x), "
          f"max |diff| {err:.2g}", flush=True)

    if device.type == "cuda":   # untested here: no GPU on the machine this was written on
        for name, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
            with torch.inference_mode(), torch.autocast("cuda", dtype=dtype):
                t = timed(lambda: ours(xi), args.repeats, warmup=2)
            rows.append({"what": f"inference (ours, {name} autocast)", "batch": bs_infer, "structures_s": bs_infer / t})

    rows += _spectral_data(args, bs_train, step_rate)
    report(rows, f"spectral (cnn_xattn) on {device.type}, {torch.get_num_threads()} threads")
    return rows


SECTIONS = {"common": bench_common, "crbl": bench_crbl, "battery_ct": bench_battery, "spectral": bench_spectral,
            "gpu": bench_gpu}
CPU_SECTIONS = ["common", "crbl", "battery_ct", "spectral"]


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("section", choices=[*SECTIONS, "all"])
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--models", help="gpu section: only these (comma-separated, e.g. crbl_crop,deeplabv3)")
    p.add_argument("--part", choices=("all", "data"), default="all", help="spectral section: only the data loader")
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
