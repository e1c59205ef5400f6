"""LR schedules against hand-computed values, read back from a real optimizer."""
import math

import pytest
import torch

from common.schedulers import constant_then_linear_decay, poly, warmup_cosine


def lrs(make, steps, base=(1.0,)):
    params = [torch.nn.Parameter(torch.zeros(1)) for _ in base]
    opt = torch.optim.SGD([{"params": [p], "lr": lr} for p, lr in zip(params, base)])
    sched = make(opt)
    out = []
    for _ in range(steps):
        out.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    return out, sched


def test_warmup_cosine_hand_computed():
    out, _ = lrs(lambda o: warmup_cosine(o, total_steps=10, warmup_steps=2), 11)
    got = [v[0] for v in out]
    assert got[0] == pytest.approx(0.5) and got[1] == pytest.approx(1.0)
    assert got[2] == pytest.approx(1.0)                       # cosine starts at its peak
    assert got[6] == pytest.approx(0.5)                       # half way: (6-2)/8
    assert got[4] == pytest.approx(0.5 * (1 + math.cos(math.pi * 2 / 8)))
    assert got[10] == pytest.approx(0.0, abs=1e-12)


def test_poly_keeps_the_10x_head_ratio():
    out, _ = lrs(lambda o: poly(o, total_steps=10, power=0.9), 11, base=(0.01, 0.1))
    assert out[5] == pytest.approx([0.01 * 0.5 ** 0.9, 0.1 * 0.5 ** 0.9])
    assert out[10] == pytest.approx([0.0, 0.0], abs=1e-12)


def test_constant_then_linear_decay_matches_trains_py_numbers():
    # trains.py: lr 1e-3, niter 50, niter_decay 500 -> 9.98e-4 at 51, 5.01e-4 at 300, 2.0e-6 at 550
    out, _ = lrs(lambda o: constant_then_linear_decay(o, niter=50, niter_decay=500), 551, base=(1e-3,))
    got = [v[0] for v in out]
    assert got[0] == got[50] == pytest.approx(1e-3)
    assert got[51] == pytest.approx(1e-3 * (1 - 1 / 501))
    assert got[300] == pytest.approx(1e-3 * (1 - 250 / 501))
    assert got[550] == pytest.approx(1e-3 * (1 - 500 / 501))
    assert f"{got[51]:.3g} {got[300]:.3g} {got[550]:.2g}" == "0.000998 0.000501 2e-06"


def test_scheduler_state_resumes_exactly():
    """As the trainer resumes: optimizer and scheduler states through a weights_only round trip."""
    import io

    full, _ = lrs(lambda o: warmup_cosine(o, total_steps=20, warmup_steps=3), 20)
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=1.0)
    sched = warmup_cosine(opt, total_steps=20, warmup_steps=3)
    for _ in range(7):
        opt.step()
        sched.step()
    buf = io.BytesIO()
    torch.save({"opt": opt.state_dict(), "sched": sched.state_dict()}, buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    opt2 = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    resumed = warmup_cosine(opt2, total_steps=20, warmup_steps=3)
    opt2.load_state_dict(state["opt"])
    resumed.load_state_dict(state["sched"])
    rest = []
    for _ in range(13):
        rest.append(opt2.param_groups[0]["lr"])
        opt2.step()
        resumed.step()
    assert [v[0] for v in full[7:]] == pytest.approx(rest)
