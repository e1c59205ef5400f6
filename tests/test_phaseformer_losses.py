"""Phaseformer losses: hand-computed Charbonnier / Laplacian, MS-SSIM against pytorch-msssim with
the window chosen from the size, 1 - MS-SSIM (not +MS-SSIM), weights that learn and stay bounded."""
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import pytorch_msssim
import torch

import torch.nn.functional as F

from phaseformer.losses import (FIXED_WEIGHTS, LOG_VAR_BOUND, CharbonnierLoss, FixedWeighting, LaplacianLoss,
                                MSSSIMLoss, PerceptualLoss, PhaseformerLoss, UncertaintyWeighting, ms_ssim,
                                msssim_window)

sys.path.insert(0, str(Path(__file__).parent / "phaseformer_ref"))


def test_charbonnier_by_hand():
    pred = torch.tensor([0.0, 0.5, 1.0]).view(1, 1, 1, 3)
    target = torch.tensor([0.3, 0.5, 0.0]).view(1, 1, 1, 3)
    want = (math.sqrt(0.09 + 1e-6) + 1e-3 + math.sqrt(1.0 + 1e-6)) / 3
    assert CharbonnierLoss()(pred, target).item() == pytest.approx(want, rel=1e-6)
    assert CharbonnierLoss()(target, target).item() == pytest.approx(1e-3)     # the eps floor


def test_laplacian_by_hand():
    g = torch.Generator().manual_seed(0)
    pred, target = torch.rand(2, 3, 9, 7, generator=g), torch.rand(2, 3, 9, 7, generator=g)

    def lap(a):  # valid 4-neighbour Laplacian, numpy
        a = a.numpy()
        return a[..., :-2, 1:-1] + a[..., 2:, 1:-1] + a[..., 1:-1, :-2] + a[..., 1:-1, 2:] - 4 * a[..., 1:-1, 1:-1]

    want = np.abs(lap(pred) - lap(target)).mean()
    assert LaplacianLoss()(pred, target).item() == pytest.approx(float(want), rel=1e-5)


@pytest.mark.parametrize("side,window", [(256, 11), (161, 11), (160, 9), (128, 7), (96, 5), (64, 3), (48, 3)])
def test_ms_ssim_matches_pytorch_msssim_with_the_window_the_size_allows(side, window):
    assert msssim_window(side) == window
    g = torch.Generator().manual_seed(side)
    x = torch.rand(2, 3, side, side + 8, generator=g)
    y = (x + 0.2 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    want = pytorch_msssim.ms_ssim(x, y, data_range=1.0, size_average=False, win_size=window)
    assert torch.allclose(ms_ssim(x, y), want, atol=1e-5)
    with pytest.raises(AssertionError):          # the original's fixed window 11 crashes below 161 px
        if side <= 160:
            pytorch_msssim.ms_ssim(x, y, data_range=1.0, win_size=11)
        else:
            raise AssertionError


def test_small_images_fall_back_to_ssim():
    assert msssim_window(32) is None
    g = torch.Generator().manual_seed(1)
    x, y = torch.rand(1, 3, 32, 24, generator=g), torch.rand(1, 3, 32, 24, generator=g)
    want = pytorch_msssim.ssim(x, y, data_range=1.0, size_average=False, win_size=11)
    assert torch.allclose(ms_ssim(x, y), want, atol=1e-6)
    assert torch.allclose(ms_ssim(x[..., :8, :8], y[..., :8, :8]),
                          pytorch_msssim.ssim(x[..., :8, :8], y[..., :8, :8], data_range=1.0,
                                              size_average=False, win_size=7), atol=1e-6)


def test_loss_is_one_minus_ms_ssim_and_falls_as_images_get_closer():
    """The official script added +MS-SSIM: that term grows as the prediction improves."""
    g = torch.Generator().manual_seed(2)
    target = torch.rand(1, 3, 96, 96, generator=g)
    noise = torch.randn(target.shape, generator=g)
    losses = [MSSSIMLoss()((target + s * noise).clamp(0, 1), target).item() for s in (0.5, 0.2, 0.05, 0.0)]
    assert losses == sorted(losses, reverse=True) and losses[-1] == pytest.approx(0.0, abs=1e-6)
    plus = [1.0 - v for v in losses]             # the official term, MS-SSIM itself
    assert plus == sorted(plus)                  # rewarded dissimilarity


def test_fixed_weights_are_spectroformers_with_equal_heads():
    keys = [(h, t) for h in ("1x", "2x") for t in FIXED_WEIGHTS]
    values = {k: torch.tensor(float(i + 1)) for i, k in enumerate(keys)}
    want = sum(0.5 * FIXED_WEIGHTS[t] * values[(h, t)].item() for h, t in keys)
    assert FixedWeighting(keys)(values).item() == pytest.approx(want)
    assert FIXED_WEIGHTS == {"charbonnier": 0.03, "perceptual": 0.025, "laplacian": 0.02, "msssim": 0.01}


def _train_weights(combine, params, steps=400):
    """Minimise combine(terms(theta)) over theta and the weights; the three terms differ in scale by
    1e4 and pull theta different ways."""
    theta = torch.zeros(2, requires_grad=True)
    opt = torch.optim.Adam([theta, *params], lr=0.05, betas=(0.5, 0.999))
    for _ in range(steps):
        terms = {("1x", "a"): 100.0 * ((theta - 1) ** 2).sum() + 50.0,
                 ("1x", "b"): 1.0 * ((theta + 1) ** 2).sum() + 0.5,
                 ("2x", "c"): 0.01 * (theta ** 2).sum() + 0.005}
        opt.zero_grad()
        combine(terms).backward()
        opt.step()
    return {k: float(v.detach()) for k, v in terms.items()}


def test_learned_weights_move_balance_and_stay_bounded():
    keys = [("1x", "a"), ("1x", "b"), ("2x", "c")]
    learned = UncertaintyWeighting(keys)
    start = learned.weights()
    assert all(w == pytest.approx(0.5) for w in start.values())
    final_terms = _train_weights(learned, list(learned.parameters()))
    weights = learned.weights()
    assert all(abs(weights[k] - start[k]) > 0.1 for k in keys)                   # they moved
    lo, hi = 0.5 * math.exp(-LOG_VAR_BOUND), 0.5 * math.exp(LOG_VAR_BOUND)
    assert all(lo <= w <= hi for w in weights.values())                          # and stay bounded
    assert weights[("2x", "c")] > weights[("1x", "b")] > weights[("1x", "a")]   # small terms weigh more
    scaled = [weights[k] * final_terms[k] for k in keys]                          # each ~0.5 (1/(2L) * L)
    assert max(scaled) / min(scaled) < 3


def test_naive_softmax_weights_collapse_onto_the_smallest_term():
    """What 'just give the original's softmax weights to the optimizer' does (the defect to avoid)."""
    logits = torch.zeros(3, requires_grad=True)
    keys = [("1x", "a"), ("1x", "b"), ("2x", "c")]
    _train_weights(lambda t: (torch.softmax(logits, 0) * torch.stack([t[k] for k in keys])).sum(), [logits])
    assert torch.softmax(logits, 0)[2] > 0.95


def test_phaseformer_loss_both_heads_terms_and_learnable_weights():
    g = torch.Generator().manual_seed(3)
    out_1x, t_1x = torch.rand(2, 3, 32, 32, generator=g), torch.rand(2, 3, 32, 32, generator=g)
    out_2x, t_2x = torch.rand(2, 3, 64, 64, generator=g), torch.rand(2, 3, 64, 64, generator=g)
    terms = ("charbonnier", "laplacian", "msssim")
    fixed = PhaseformerLoss("fixed", terms=terms)
    total, logs = fixed(out_1x, out_2x, t_1x, t_2x)
    assert set(logs) == {f"{h}_{t}" for h in ("1x", "2x") for t in terms}
    assert logs["2x_charbonnier"] == pytest.approx(CharbonnierLoss()(out_2x, t_2x).item(), rel=1e-6)
    assert logs["1x_msssim"] == pytest.approx(1 - ms_ssim(out_1x, t_1x).mean().item(), rel=1e-6)
    assert total.item() == pytest.approx(sum(0.5 * FIXED_WEIGHTS[k.split("_", 1)[1]] * v for k, v in logs.items()),
                                         rel=1e-5)
    assert list(fixed.parameters()) == []
    learned = PhaseformerLoss("learned", terms=terms)
    assert [p.shape for p in learned.parameters()] == [torch.Size([6])]       # an optimizer can train them
    total, _ = learned(out_1x, out_2x, t_1x, t_2x)
    total.backward()
    assert learned.weighting.log_vars.grad.abs().min() > 0
    assert set(learned.weights()) == {f"w_{h}_{t}" for h in ("1x", "2x") for t in terms}
    with pytest.raises(ValueError, match="needs a PerceptualLoss"):
        PhaseformerLoss("fixed")


IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)


@pytest.fixture(scope="module")
def vgg19_loss():
    torch.manual_seed(0)
    return PerceptualLoss("vgg19", weights=None)   # random weights: no network here


def test_perceptual_vgg19_is_the_training_scripts_features_35_on_normalised_inputs(vgg19_loss):
    """trains.py: l1(vgg19.features[:35](x), vgg19.features[:35](y)), here on ImageNet-normalised
    inputs (the script fed raw [0,1] images)."""
    loss = vgg19_loss
    features = loss.features.features
    assert len(features) == 35 and isinstance(features[34], torch.nn.Conv2d)      # conv5_4, before its ReLU
    g = torch.Generator().manual_seed(1)
    x, y = torch.rand(2, 3, 48, 40, generator=g), torch.rand(2, 3, 48, 40, generator=g)
    norm = lambda t: (t - IMAGENET_MEAN) / IMAGENET_STD  # noqa: E731
    want = F.l1_loss(features(norm(x)), features(norm(y)))
    assert loss(x, y).item() == pytest.approx(want.item(), rel=1e-5)
    assert loss(x, x).item() == 0.0


def test_perceptual_vgg16_is_the_official_four_layer_variant():
    """utils.VGGPerceptualLoss: ImageNet normalisation, bilinear resize to 224, blocks [:4], [4:9],
    [9:16], [16:23] of VGG16 (relu1_2 ... relu4_3), the L1 of each summed."""
    torch.manual_seed(0)
    loss = PerceptualLoss("vgg16", weights=None)
    vgg = loss.features.features
    blocks = [vgg[:4], vgg[4:9], vgg[9:16], vgg[16:23]]
    g = torch.Generator().manual_seed(2)
    x, y = torch.rand(1, 3, 40, 56, generator=g), torch.rand(1, 3, 40, 56, generator=g)

    def official(a, b):
        a, b = (a - IMAGENET_MEAN) / IMAGENET_STD, (b - IMAGENET_MEAN) / IMAGENET_STD
        a = F.interpolate(a, mode="bilinear", size=(224, 224), align_corners=False)
        b = F.interpolate(b, mode="bilinear", size=(224, 224), align_corners=False)
        total = 0.0
        for block in blocks:
            a, b = block(a), block(b)
            total += F.l1_loss(a, b)
        return total

    assert loss(x, y).item() == pytest.approx(official(x, y).item(), rel=1e-5)


def test_perceptual_network_is_frozen_and_stays_in_eval_mode(vgg19_loss):
    loss = vgg19_loss.train()
    assert not loss.features.training and not any(p.requires_grad for p in loss.parameters())
    pred = torch.rand(1, 3, 32, 32, requires_grad=True)
    loss(pred, torch.rand(1, 3, 32, 32)).backward()
    assert pred.grad.abs().sum() > 0


def test_ssim_metric_is_per_channel_gaussian_not_the_removed_multichannel_flag():
    """Validation and infer.py report common.metrics.ssim: Gaussian window 11, sigma 1.5, per
    channel, averaged (independent numpy reference below). trains.py called skimage with the removed
    `multichannel=True, win_size=3`, which current skimage swallows silently and computes as a 3-D
    volume with a 3x3x3 window: a different number."""
    from scipy.ndimage import uniform_filter
    from scipy.signal import convolve2d

    from common.metrics import ssim

    from phaseformer.data import clean_scene, underwater

    rng = np.random.default_rng(0)
    clean, depth = clean_scene(rng, 48)
    a, b = underwater(clean, depth, rng).transpose(2, 0, 1), clean.transpose(2, 0, 1).astype(np.float64)
    x, y = torch.from_numpy(a)[None].float(), torch.from_numpy(b)[None].float()
    k = np.exp(-((np.arange(11) - 5) ** 2) / (2 * 1.5 ** 2))
    w = np.outer(k, k) / np.outer(k, k).sum()
    c1, c2 = 0.01 ** 2, 0.03 ** 2

    def per_channel(p, q):
        f = lambda t: convolve2d(t, w, mode="valid")  # noqa: E731
        mp, mq = f(p), f(q)
        vp, vq, cov = f(p * p) - mp ** 2, f(q * q) - mq ** 2, f(p * q) - mp * mq
        return (((2 * mp * mq + c1) * (2 * cov + c2)) / ((mp ** 2 + mq ** 2 + c1) * (vp + vq + c2))).mean()

    want = np.mean([per_channel(a[c], b[c]) for c in range(3)])
    assert float(ssim(x, y)) == pytest.approx(want, abs=1e-5)

    def volume_3x3x3(p, q):  # skimage semantics of the removed flag: one 3-D image, uniform 3x3x3
        f = lambda t: uniform_filter(t, size=3)  # noqa: E731
        mp, mq = f(p), f(q)
        n = 27 / 26                                 # skimage's sample covariance
        vp, vq, cov = n * (f(p * p) - mp ** 2), n * (f(q * q) - mq ** 2), n * (f(p * q) - mp * mq)
        s = ((2 * mp * mq + c1) * (2 * cov + c2)) / ((mp ** 2 + mq ** 2 + c1) * (vp + vq + c2))
        return s[1:-1, 1:-1, 1:-1].mean()

    assert abs(volume_3x3x3(a, b) - want) > 0.01
