"""Training under torchrun (2 CPU processes, gloo) and built-in data made by processes at once."""
from __future__ import annotations

import multiprocessing
import os
import time

import pytest

import common.data as D


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
