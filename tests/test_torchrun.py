"""Training under torchrun (2 CPU processes, gloo) and built-in data made by processes at once.

Each task's train.py runs under torchrun for one short epoch on a tiny dataset in its real format;
the Trainer's own check (common.distributed.check_replicas, a hash of every tensor gathered from
both processes) must report identical weights. The check itself is tested here on two forked
processes, where one of them changes a weight.
"""
from __future__ import annotations

import multiprocessing
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import common.data as D

REPO = Path(__file__).resolve().parents[1]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def _generate_slowly(folder):
    """A generator that takes long enough for the other process to arrive while it runs."""
    with open(os.environ["CALLS_LOG"], "a") as f:
        f.write(f"{os.getpid()}\n")
    for i in range(20):
        (folder / f"part_{i:02d}.txt").write_text(str(i))
        time.sleep(0.02)


def _ensure(queue):
    try:
        root = D.ensure_builtin("demo", "v1", _generate_slowly)
        queue.put(("ok", str(root), sorted(p.name for p in root.iterdir())))
    except BaseException as e:  # noqa: BLE001 - reported to the test
        queue.put(("error", repr(e), []))


def test_processes_generating_the_builtin_data_at_once_build_it_once(tmp_path, monkeypatch):
    monkeypatch.setenv(D.BUILTIN_ENV, str(tmp_path / "builtin"))
    monkeypatch.setenv("CALLS_LOG", str(tmp_path / "calls.log"))
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_ensure, args=(queue,)) for _ in range(3)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    assert all(r[0] == "ok" for r in results), results
    expected = [".builtin-version"] + [f"part_{i:02d}.txt" for i in range(20)]
    assert all(r[1] == str(tmp_path / "builtin" / "demo") and r[2] == expected for r in results), results
    assert len((tmp_path / "calls.log").read_text().split()) == 1   # one process generated, the others waited
    root = tmp_path / "builtin" / "demo"
    assert [(root / f"part_{i:02d}.txt").read_text() for i in range(20)] == [str(i) for i in range(20)]
    assert sorted(p.name for p in root.parent.iterdir()) == [".demo.lock", "demo"]   # no temporary folders left


# ---------------------------------------------------------------- colorize: parameters DDP must not wait for
def test_improved_unet_names_exactly_the_parameters_its_forward_never_uses():
    """DDP (find_unused_parameters=False) fails at the second step on a trainable parameter that
    gets no gradient; colorize/train.py freezes model.unused_parameters(), so the list must be
    exactly the parameters without a gradient."""
    import torch
    import torch.nn.functional as F

    from colorize.model import build_model
    torch.manual_seed(0)
    model = build_model("improved_unet", 16)
    keys_before = list(model.state_dict())
    F.l1_loss(model(torch.rand(2, 3, 32, 32)), torch.rand(2, 3, 32, 32)).backward()
    no_grad = {n for n, p in model.named_parameters() if p.grad is None}
    names = {id(p): n for n, p in model.named_parameters()}
    unused = {names[id(p)] for p in model.unused_parameters()}
    assert unused == no_grad
    # what the speed-ups skip: the InstanceNorm-cancelled conv biases and the residual blocks' SE
    assert "res1.se.excitation.0.weight" in unused and "conv1.double_conv.0.bias" in unused
    assert "att1.psi.0.bias" in unused and "conv1.se.excitation.0.weight" not in unused
    assert "upconv1.bias" not in unused and "outconv.bias" not in unused
    assert build_model("unet", 16).unused_parameters() == []

    # frozen, they stay as loaded under AdamW's weight decay (no gradient, no update), and the
    # state_dict keeps every name of the original's checkpoints
    frozen = model.unused_parameters()
    for p in frozen:
        p.requires_grad_(False)
    before = [p.detach().clone() for p in frozen]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.5)
    for _ in range(2):
        F.l1_loss(model(torch.rand(2, 3, 32, 32)), torch.rand(2, 3, 32, 32)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    assert all(torch.equal(a, p) for a, p in zip(before, frozen))
    assert list(model.state_dict()) == keys_before


def test_replica_check_names_the_tensors_that_differ():
    import torch

    from common.distributed import disagreeing, tensor_digests
    a = {"w": torch.randn(3, 4), "n": torch.tensor(3), "h": torch.randn(2, 2, dtype=torch.bfloat16)}
    b = {**a, "w": a["w"].clone()}
    b["w"][1, 2] = torch.nextafter(b["w"][1, 2], torch.tensor(9.0))   # one ulp
    c = {**a, "w": a["w"].t().contiguous().t()}                       # same values, another layout
    d = {**a, "n": torch.tensor(3.0)}                                 # same value, another dtype
    da, db, dc, dd = map(tensor_digests, (a, b, c, d))
    assert disagreeing([da, da, dc]) == []
    assert disagreeing([da, db]) == ["w"] and disagreeing([da, dd]) == ["n"]
    assert disagreeing([da, {k: v for k, v in da.items() if k != "h"}]) == ["h"]


def _replica_worker(rank: int, init: str, change: bool, queue) -> None:
    import torch.distributed as dist

    from common.distributed import DistInfo, ReplicasDiverged, all_gather_cat, check_replicas, sync_buffers
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    info = DistInfo(rank, 2)
    try:
        # a validation set smaller than the number of processes leaves rank 1 without batches
        gathered = all_gather_cat([torch.arange(3.0), torch.ones(1)] if rank == 0 else [], info).tolist()
        if gathered != [0.0, 1.0, 2.0, 1.0]:
            queue.put((rank, False, f"all_gather_cat gave {gathered}"))
            return
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4))
        grid = (torch.arange(8.0) + rank).view(1, 2, 2, 2).to(memory_format=torch.channels_last)
        model.register_buffer("grid", grid)   # a channels_last buffer (not contiguous) is broadcast too
        extra = torch.nn.Parameter(torch.zeros(2))   # trained outside the model (phaseformer's loss weights)
        opt = torch.optim.SGD([*model.parameters(), extra], lr=0.1)
        model(torch.randn(8, 4) + rank)               # each process's own BatchNorm statistics
        before = model[1].running_mean.clone()
        sync_buffers(model, info)
        synced = torch.equal(model[1].running_mean, before) == (rank == 0)
        synced &= model.grid.flatten().tolist() == list(range(8)) and not model.grid.is_contiguous()
        if change and rank == 1:
            with torch.no_grad():
                extra[0] += 1e-6
        try:
            n = check_replicas(model, info, opt)
            queue.put((rank, synced, f"ok {n}"))
        except ReplicasDiverged as e:
            queue.put((rank, synced, str(e)))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("change", [False, True])
def test_replica_check_across_two_processes(tmp_path, change):
    """Rank 0's BatchNorm statistics go to rank 1; then identical replicas pass (the model's
    tensors and the optimizer's parameter outside it: 8 + 1), and one changed value in rank 1's
    optimizer-only parameter is found on both ranks, by name."""
    torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)   # the first optimizer imports a lot: once, here
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    init = f"file://{tmp_path / 'store'}"
    procs = [ctx.Process(target=_replica_worker, args=(r, init, change, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict((r, (synced, msg)) for r, synced, msg in (queue.get(timeout=60) for _ in procs))
    for p in procs:
        p.join(timeout=60)
    assert results[0][0] and results[1][0]   # rank 1's buffers replaced by rank 0's, rank 0's kept
    for _, msg in results.values():
        if change:
            assert msg.startswith("the 2 processes ended training with different values in 1 of 9 tensors "
                                  "(optimizer.param_groups.0.params.4)"), msg
        else:
            assert msg == "ok 9"


# ---------------------------------------------------------------- each task's train.py under torchrun
@pytest.fixture(scope="module")
def tiny_sets(tmp_path_factory):
    """Small datasets in each task's real format, made by the tasks' own built-in generators."""
    import yaml

    import battery_ct.data
    import colorize.data
    import crbl.data
    import phaseformer.data
    from tests.test_spectral_data import write_raw
    root = tmp_path_factory.mktemp("torchrun-data")
    crbl.data.make_builtin_dataset(root / "crbl", n_train=8, n_val=4, seed=3)
    colorize.data.make_builtin_dataset(root / "colorize", n_train=12, n_test=2, size=32)
    phaseformer.data.make_builtin_dataset(root / "phaseformer", n=10, size=32)
    battery_ct.data.make_builtin_dataset(root / "battery_ct", batteries_per_class=4, slices_per_axis=1, size=64)
    lines = (root / "battery_ct" / "train.txt").read_text().splitlines()
    (root / "battery_ct" / "train_part.txt").write_text("\n".join(lines[:20]) + "\n")
    (root / "battery_ct" / "val_part.txt").write_text("\n".join(lines[20:]) + "\n")
    write_raw(root / "spectral", rows=(10, 10), invalid_every=5)
    (root / "spectral.yaml").write_text(yaml.safe_dump({
        "seed": 1, "data": {"out_len": 30, "batch_size": 8, "num_workers": 0, "train_ratio": 0.75},
        "model": {"name": "cnn_xattn", "params": {"d_model": 32, "nhead": 4, "dec_layers": 1, "ff_mult": 1}},
        "loss": {"name": "mse_pearson", "params": {"w_mse": 0.5, "w_corr": 0.5}},
        "training": {"epochs": 1, "lr": 3e-4, "save_every": 0, "warmup_ratio": 0.2}}))
    return root


RUNS = {   # one epoch of 1-3 steps per process
    "crbl": lambda d: ["--data", d / "crbl", "--model-type", "crop", "--epochs", 1, "--batch-size", 2],
    "battery_ct": lambda d: ["--train-split", d / "battery_ct" / "train_part.txt", "--val-split",
                             d / "battery_ct" / "val_part.txt", "--model", "resnet18", "--image-size", 32,
                             "--batch-size", 4, "--epochs", 1],
    "spectral": lambda d: ["--config", d / "spectral.yaml", "--data", d / "spectral"],
    # width 16 (the demo's; 64 with --data): the same layers and unused parameters, 1/16 of the 31 M
    "colorize": lambda d: ["--data", d / "colorize", "--epochs", 1, "--img-size", 32, "--batch-size", 2,
                           "--width", 16, "--perceptual", 0, "--sample-every", 0],
    # one validation image: the second process evaluates none (all_gather_cat of an empty list)
    "phaseformer": lambda d: ["--data", d / "phaseformer", "--val-count", 1, "--image-size", 32, "--batch-size", 2,
                              "--niter", 0, "--niter-decay", 1, "--epochs", 1, "--perceptual", "none",
                              "--sample-every", 0],
}


# Each run costs about 20 s of CPU (three interpreters importing torch, two of them training). crbl's
# and battery_ct's runs are in the slow set: what they add under DDP is covered by the default ones
# (BatchNorm buffers from rank 0 by the two-process test above, frozen layers by colorize, the
# Trainer's DDP step and end check by all three).
SLOW_RUNS = ("crbl", "battery_ct")


@pytest.mark.parametrize("task", [pytest.param(t, marks=pytest.mark.slow) if t in SLOW_RUNS else t for t in RUNS])
def test_train_py_under_torchrun_ends_with_identical_weights_on_both_processes(task, tiny_sets, tmp_path):
    out = tmp_path / "run"
    cmd = [*TORCHRUN, str(REPO / task / "train.py"), *map(str, RUNS[task](tiny_sets)), "--out", str(out),
           "--workers", "0", "--threads", "1", "--no-progress"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, f"{res.stdout[-2000:]}\n{res.stderr[-4000:]}"
    found = re.findall(r"torchrun: all 2 processes end with identical weights \((\d+) tensors compared\)", res.stdout)
    model = torch.load(out / "last.pt", weights_only=True)["model"]
    assert len(found) == 1 and int(found[0]) >= len(model) > 0
    assert res.stdout.count("run folder:") == 1 and "Traceback" not in res.stderr   # rank 0 reports
