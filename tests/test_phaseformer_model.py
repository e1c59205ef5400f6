"""Phaseformer model: official names and size, parity with a transcription of the original, the
fast phase-only arithmetic, fp32 spectra under autocast, size errors."""
import copy
import sys
from pathlib import Path

import pytest
import torch

from phaseformer.model import (UNUSED_MODULES, Phaseformer, build_model, phase_gram, phase_only,
                               phase_only_mean, unit_spectrum)

sys.path.insert(0, str(Path(__file__).parent / "phaseformer_ref"))
import official_model as official  # noqa: E402  (the transcription of model_with_eca.py)


@pytest.fixture(scope="module")
def pair():
    """(transcription of the original with trained-looking weights, ours with the same weights)."""
    ref = official.trained_looking(official.Restormer(), seed=3).eval()
    ours = Phaseformer().eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


def test_official_state_dict_names_and_parameter_count():
    ours, ref = build_model(), official.Restormer()
    assert sum(p.numel() for p in ours.parameters()) == 1_783_800
    assert [(k, tuple(v.shape)) for k, v in ours.state_dict().items()] == \
           [(k, tuple(v.shape)) for k, v in ref.state_dict().items()]
    sd = ours.state_dict()
    for key in ("attention.0.conv.weight", "ups1.body.0.weight", "ups2.body.0.weight", "outputl.weight",
                "output1.weight", "output.weight", "encoders.0.0.norm1.weight", "encoders.3.3.attn.temperature",
                "decoders.2.1.ffn.project_in.weight", "refinement.3.norm2.bias", "reduces.1.weight"):
        assert key in sd
    assert sd["encoders.3.0.attn.temperature"].shape == (1, 8, 1, 1)      # one value per head
    assert sd["encoders.0.0.norm1.weight"].shape == (16,)                  # LayerNorm(C) over channels
    assert sd["output.weight"].shape == (3, 8, 3, 3)                       # shared 8 -> 3 conv
    assert sum(p.numel() for p in ours.unused_parameters()) == 4_611       # ups2 + attention[3]
    assert set(UNUSED_MODULES) == {"ups2", "attention.3"}


@pytest.mark.parametrize("size", [(8, 8), (16, 24), (40, 32)])
def test_outputs_match_the_original_transcription(pair, size):
    ref, ours = pair
    x = torch.rand(2, 3, *size, generator=torch.Generator().manual_seed(sum(size)))
    with torch.no_grad():
        r1, r2 = ref(x)
        o1, o2 = ours(x)
    assert o1.shape == (2, 3, *size) and o2.shape == (2, 3, 2 * size[0], 2 * size[1])
    assert r1.abs().max() > 0.1                                            # a real signal, not ~0
    assert (o1 - r1).abs().max() < 1e-4 and (o2 - r2).abs().max() < 1e-4


def test_same_math_as_the_original_forward_and_backward_in_fp64(pair):
    """In fp64 both must agree to round-off: the same function and the same gradient. (In fp32 both
    gradients are ~0.2% off the fp64 truth: the phase of small spectral bins is ill-conditioned.)"""
    ref, ours = copy.deepcopy(pair[0]).double().train(), copy.deepcopy(pair[1]).double().train()
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 16, 24, generator=g, dtype=torch.float64)
    w1, w2 = torch.randn(2, 3, 16, 24, generator=g).double(), torch.randn(2, 3, 32, 48, generator=g).double()
    outs = {}
    for name, m in (("ref", ref), ("ours", ours)):
        a, b = m(x)
        ((a * w1).mean() + (b * w2).mean()).backward()
        outs[name] = (a.detach(), b.detach())
    for a, b in zip(outs["ours"], outs["ref"]):
        assert (a - b).abs().max() < 1e-8
    named = dict(ours.named_parameters())
    for name, p in ref.named_parameters():
        if name.startswith(UNUSED_MODULES):
            assert p.grad is None and named[name].grad is None
            continue
        assert (named[name].grad - p.grad).norm() <= 1e-6 * p.grad.norm() + 1e-12, name


def test_phase_only_equals_angle_exp_ifft_including_zero_bins():
    x = torch.randn(2, 4, 12, 10, generator=torch.Generator().manual_seed(1))
    x[0, 0] = 0.0                                   # every bin F = 0: angle 0, i.e. unit value everywhere
    x[1, 1] = 0.0
    x[1, 1, 0, 0] = -2.0                            # a single negative impulse: all bins -2, angle pi
    assert torch.allclose(phase_only(x), official.inv_mag(x), atol=1e-6)
    delta = torch.zeros(12, 10)
    delta[0, 0] = 1.0                               # IFFT of an all-ones spectrum
    assert torch.allclose(phase_only(x)[0, 0], delta, atol=1e-6)


def test_phase_gram_and_mean_are_the_reconstructions_inner_products_and_mean():
    g = torch.Generator().manual_seed(2)
    for h, w in ((12, 10), (9, 7), (16, 15)):     # even and odd widths (the Nyquist column)
        qk = torch.randn(3, 8, h, w, generator=g)
        q, k = official.inv_mag(qk).chunk(2, 1)
        want = q.reshape(3, 2, 2, -1) @ k.reshape(3, 2, 2, -1).transpose(-2, -1)
        assert torch.allclose(phase_gram(qk, heads=2), want, atol=1e-6)
        # unit L2 norm per channel (Parseval): the official F.normalize of q and k is a no-op
        assert torch.allclose(official.inv_mag(qk).flatten(2).norm(dim=-1), torch.ones(3, 8), atol=1e-5)
        assert torch.allclose(phase_only_mean(qk), official.inv_mag(qk).mean((-2, -1), keepdim=True), atol=1e-7)


def test_eca_gate_is_half_on_large_maps_but_not_on_small_ones(pair):
    ref, ours = pair
    for size, far_from_half in ((4, True), (128, False)):
        x = torch.randn(1, 64, size, size, generator=torch.Generator().manual_seed(size))
        with torch.no_grad():
            gate_ours = ours.attention[0](x) / x
            gate_ref = ref.attention[0](x) / x
        assert torch.allclose(gate_ours, gate_ref, atol=1e-6)
        assert ((gate_ours - 0.5).abs().max() > 1e-3) == far_from_half


def test_spectra_stay_fp32_under_bf16_autocast_at_any_size():
    m = build_model().eval()
    x = torch.rand(1, 3, 24, 40)                    # not a power of two
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert unit_spectrum(torch.rand(1, 2, 24, 40).bfloat16()).dtype == torch.float32
        with torch.no_grad():
            low = m(x)
    with torch.no_grad():
        full = m(x)
    for a, b in zip(low, full):
        assert a.dtype == torch.bfloat16 and torch.isfinite(a).all()
        assert (a.float() - b).abs().max() < 0.05 * b.abs().max()
    with pytest.raises(RuntimeError):               # what the spectra would hit without the fp32 cast
        torch.fft.rfft2(torch.rand(1, 1, 24, 40).bfloat16())


def test_heads_and_bad_sizes():
    m = build_model().eval()
    x = torch.rand(1, 3, 16, 24)
    with torch.no_grad():
        both = m(x)
        assert torch.equal(m(x, head="1x"), both[0]) and torch.equal(m(x, head="2x"), both[1])
    with pytest.raises(ValueError, match="divisible by 8.*got 20x24"):
        m(torch.rand(1, 3, 20, 24))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        m(torch.rand(1, 1, 16, 16))
    with pytest.raises(ValueError, match="unknown model"):
        build_model("restormer")


def test_initialisation_is_the_training_scripts():
    m = build_model()
    conv = m.encoders[0][0].ffn.project_in.weight
    bound = (6.0 / (conv.shape[0] + conv.shape[1])) ** 0.5              # xavier_uniform, 1x1 kernel
    assert conv.abs().max() <= bound and conv.abs().max() > 0.9 * bound
    assert torch.equal(m.encoders[0][0].norm1.weight, torch.ones(16))
    assert torch.equal(m.encoders[2][1].attn.temperature, torch.ones(1, 4, 1, 1))
