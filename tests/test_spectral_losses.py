"""spectral/losses.py against the transcription of CR_recon's losses, and the validation metrics."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from common.io import UserError
from spectral.losses import LOSS_NAMES, build_loss, finish_metrics, spectral_metrics
from tests.spectral_ref import original

CASES = [("mse_pearson", {}), ("mse_pearson", {"w_mse": 0.5, "w_corr": 0.5}), ("mse_pearson", {"w_mse": 0, "w_corr": 2}),
         ("weighted_smooth", {}), ("weighted_smooth", {"lambda1": 0.3, "lambda2": 0.0}),
         ("weighted_smooth", {"channel_weights": [1.0, 0.8, 0.8, 1.2]}),
         ("weighted_smooth", {"channel_weights": (0.1, 2, 3, 0.5), "lambda1": 1, "lambda2": 2})]


def tensors(n=5, length=30, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 2, 2, length, generator=g).to(dtype), torch.rand(n, 2, 2, length, generator=g).to(dtype))


@pytest.mark.parametrize("name,params", CASES)
@pytest.mark.parametrize("length", [30, 7])
def test_equal_to_the_original_in_fp32(name, params, length):
    pred, tgt = tensors(length=length)
    ours = build_loss(name, **params)(pred, tgt)
    ref = original.get_loss(name, **params)(pred, tgt)
    assert ours.dtype == torch.float32
    assert abs(float(ours) - float(ref)) <= 1e-6


@pytest.mark.parametrize("name,params", CASES[:4])
def test_fp32_under_autocast_and_for_half_inputs(name, params):
    pred, tgt = tensors(dtype=torch.bfloat16)
    ref = original.get_loss(name, **params)(pred, tgt)      # the original casts to float32 first
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = build_loss(name, **params)(pred, tgt)
    assert ours.dtype == torch.float32
    assert abs(float(ours) - float(ref)) <= 1e-6


def test_pearson_term_by_hand():
    """A row proportional to its target scores r=1, a negated one r=-1, a flat one r=0 (the eps)."""
    t = torch.linspace(0, 1, 30)
    tgt = t.expand(1, 2, 2, 30).clone()
    pred = torch.stack([3 * t + 1, -t, torch.full_like(t, 0.5), t]).reshape(1, 2, 2, 30)
    loss = build_loss("mse_pearson", w_mse=0.0, w_corr=1.0)(pred, tgt)
    assert math.isclose(float(loss), ((1 - 1) + (1 + 1) + (1 - 0) + (1 - 1)) / 4, abs_tol=1e-6)


def test_weighted_smooth_by_hand():
    """Cell B (weight 1.2 by default) has the target (0, 1, 0, 0), the prediction is 0: the value
    term is 1.2 * 1 / 16 elements, the first differences (1, -1, 0) give 2 / 12, the second
    differences (-2, 1) give 5 / 8."""
    pred = torch.zeros(1, 2, 2, 4)
    tgt = torch.zeros(1, 2, 2, 4)
    tgt[0, 1, 1] = torch.tensor([0.0, 1.0, 0.0, 0.0])
    loss = build_loss("weighted_smooth", lambda1=0.5, lambda2=0.25)(pred, tgt)
    assert math.isclose(float(loss), 1.2 / 16 + 0.5 * 2 / 12 + 0.25 * 5 / 8, rel_tol=1e-6)


def test_a_dict_of_channel_weights_is_refused():
    """CR_recon's docstring offers a dict; its code would then fail inside the loss (or, with a
    tensor-like mapping, weigh cells in an unknown order)."""
    with pytest.raises(UserError, match="channel_weights: a mapping is not accepted"):
        build_loss("weighted_smooth", channel_weights={"R": 1.0, "G": 0.8, "B": 1.2})
    with pytest.raises(UserError, match="expected a list of 4 non-negative numbers"):
        build_loss("weighted_smooth", channel_weights=[1.0, 0.8, 1.2])
    with pytest.raises(UserError, match="expected a list of 4"):
        build_loss("weighted_smooth", channel_weights=[1.0, float("nan"), 1.0, 1.0])


def test_unknown_names_and_params():
    with pytest.raises(UserError, match="unknown loss.*mse_pearson, weighted_smooth"):
        build_loss("huber_pearson")
    with pytest.raises(UserError, match=r"loss.params.lambda1: mse_pearson has no parameter"):
        build_loss("mse_pearson", lambda1=0.1)
    with pytest.raises(UserError, match="non-negative number"):
        build_loss("mse_pearson", w_mse="a lot")
    assert LOSS_NAMES == ("mse_pearson", "weighted_smooth")


def test_metrics_against_numpy():
    pred, tgt = tensors(n=7, seed=3)
    m = finish_metrics(spectral_metrics(pred, tgt))
    p, t = pred.double().numpy(), tgt.double().numpy()
    assert math.isclose(m["val_mse"], ((p - t) ** 2).mean(), rel_tol=1e-6)
    rs = [np.corrcoef(p[i].reshape(4, -1)[c], t[i].reshape(4, -1)[c])[0, 1] for i in range(7) for c in range(4)]
    assert math.isclose(m["val_pearson_r"], float(np.mean(rs)), rel_tol=1e-5)
    assert math.isclose(m["val_rmse_R"], math.sqrt(((p[:, 0, 0] - t[:, 0, 0]) ** 2).mean()), rel_tol=1e-6)
    assert math.isclose(m["val_rmse_B"], math.sqrt(((p[:, 1, 1] - t[:, 1, 1]) ** 2).mean()), rel_tol=1e-6)
    g = np.concatenate([p[:, 0, 1] - t[:, 0, 1], p[:, 1, 0] - t[:, 1, 0]])
    assert math.isclose(m["val_rmse_G"], math.sqrt((g ** 2).mean()), rel_tol=1e-6)
