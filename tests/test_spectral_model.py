"""spectral/model.py against the transcription of CR_recon's classes (tests/spectral_ref/original.py):
parameter counts, state_dict keys, initialisation, outputs and gradients, periodic padding."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn

from common.io import UserError
from spectral.model import MODEL_NAMES, build_model, describe_weights, load_state_dict_checked, wrap_pad
from tests.spectral_ref import original

CONFIGS = [
    ("cnn_xattn", {}),
    ("cnn_xattn", {"use_circular_padding": False}),
    ("cnn_xattn", {"out_len": 20, "d_model": 64, "nhead": 4, "dec_layers": 2, "ff_mult": 2, "cnn_dropout": 0.0,
                   "tr_dropout": 0.0, "head_dropout": 0.0, "enforce_diag_sym": True}),
    ("cnn_gru", {}),
    ("cnn_gru", {"use_circular_padding": False, "out_len": 12, "d_model": 32, "gru_layers": 1, "cnn_dropout": 0.0,
                 "head_dropout": 0.0}),
]


@pytest.fixture(autouse=True)
def _threads():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def pair(name, params, seed=0):
    torch.manual_seed(seed)
    ref = original.get_model(name, **params)
    torch.manual_seed(seed)
    ours = build_model(name, **params)
    return ref, ours


def structures(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2, (n, 1, 128, 128), generator=g).float() * 2 - 1


def test_parameter_counts_of_the_defaults():
    assert sum(p.numel() for p in build_model("cnn_xattn").parameters()) == 8_881_980
    assert sum(p.numel() for p in build_model("cnn_gru").parameters()) == 4_632_892


@pytest.mark.parametrize("name,params", CONFIGS)
def test_same_keys_shapes_and_initialisation_as_the_original(name, params):
    """Same module tree and creation order: identical state_dicts from the same seed, including the
    nn.Sequential indices (to_z.1, head.3, ff.3) when a dropout is 0."""
    ref, ours = pair(name, params)
    a, b = ref.state_dict(), ours.state_dict()
    assert list(a) == list(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    if name == "cnn_xattn":
        assert {"dec.0.self_attn.in_proj_weight", "dec.0.cross_attn.out_proj.bias", "dec.0.ff.3.weight",
                "to_z.1.weight", "head.3.bias", "s_pos", "w_pos", "query", "spec_bias"} <= set(b)
    else:
        assert {"gru.weight_ih_l0", "gru.bias_hh_l0", "to_z.1.weight", "head.3.weight"} <= set(b)


@pytest.mark.parametrize("name,params", CONFIGS)
def test_eval_output_equals_the_original(name, params):
    ref, ours = pair(name, params, seed=1)
    ref.eval()
    ours.eval()
    x = structures(3)
    with torch.no_grad():
        expected = ref(x)
        got = ours(x)
        ours_cl = ours.to(memory_format=torch.channels_last)
        got_cl = ours_cl(x.contiguous(memory_format=torch.channels_last))
    assert got.shape == (3, 2, 2, params.get("out_len", 30))
    assert (got - expected).abs().max() <= 2e-6
    assert (got_cl - expected).abs().max() <= 2e-6


@pytest.mark.parametrize("circular", [True, False])
def test_training_gradients_equal_the_original(circular):
    """With dropout off, one backward pass gives the original's gradients: the custom backward of the
    periodic padding and the batch-first attention change nothing."""
    params = {"out_len": 10, "d_model": 32, "nhead": 4, "dec_layers": 1, "cnn_dropout": 0.0, "tr_dropout": 0.0,
              "head_dropout": 0.0, "use_circular_padding": circular}
    ref, ours = pair("cnn_xattn", params, seed=2)
    x = structures(2, seed=3)
    y = torch.rand(2, 2, 2, 10)
    for m in (ref, ours):
        m.train()
        ((m(x) - y) ** 2).mean().backward()
    for (k, pa), (_, pb) in zip(ref.named_parameters(), ours.named_parameters()):
        assert torch.allclose(pa.grad, pb.grad, rtol=1e-4, atol=1e-7), k


def test_channels_last_backward_stays_channels_last():
    """train.py trains in channels_last on the CPU. The gradient reaching each block's input must be
    channels_last too: the strided skip path used to slice, whose backward is a contiguous tensor,
    and the whole previous block's backward then ran on mixed layouts (measured: the training step
    1.26x -> 1.33x the original once fixed)."""
    from spectral.model import ResBlockGN

    torch.manual_seed(0)
    block = ResBlockGN(16, 32, stride=2, dropout=0.0).to(memory_format=torch.channels_last)
    x = torch.randn(2, 16, 8, 8).contiguous(memory_format=torch.channels_last).requires_grad_()
    seen = []
    x.register_hook(seen.append)
    y = block(x)
    y.backward(torch.randn_like(y))
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert seen and seen[0].is_contiguous(memory_format=torch.channels_last) and not seen[0].is_contiguous()
    expected = nn.functional.conv2d(x.detach()[:, :, ::2, ::2], block.skip.weight)    # the strided 1x1 sum
    assert torch.equal(block.project(x.detach()), expected)


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_periodic_padding_is_the_torus_wrap_with_the_right_gradient(layout):
    x = torch.randn(2, 3, 6, 5, dtype=torch.float64).contiguous(memory_format=layout).requires_grad_()
    y = wrap_pad(x, 2)
    expected = np.pad(x.detach().numpy(), ((0, 0), (0, 0), (2, 2), (2, 2)), mode="wrap")
    assert np.array_equal(y.detach().numpy(), expected)
    assert torch.equal(y, original.wrap_pad(x, 2))       # CR_recon's two concatenations
    assert torch.autograd.gradcheck(lambda t: wrap_pad(t, 2), (x,))
    assert torch.autograd.gradcheck(lambda t: wrap_pad(t, 1), (x,))


def test_architecture_facts():
    m = build_model("cnn_xattn")
    gns = [mod for mod in m.modules() if isinstance(mod, nn.GroupNorm)]
    assert gns and all(g.num_groups == 16 for g in gns)
    convs = [mod for mod in m.modules() if isinstance(mod, nn.Conv2d)]
    assert len(convs) == 22 and all(c.bias is None for c in convs)
    assert all(mod.approximate == "none" for mod in m.modules() if isinstance(mod, nn.GELU))
    f = m.forward_features(structures(1))
    assert f.shape == (1, 256, 4, 4)
    assert m.forward_head(f).shape == (1, 2, 2, 30)


def test_enforce_diag_sym_makes_the_prediction_transpose_invariant():
    m = build_model("cnn_xattn", enforce_diag_sym=True, d_model=32, nhead=4, dec_layers=1).eval()
    x = structures(2)
    with torch.no_grad():
        assert torch.allclose(m(x), m(x.transpose(-1, -2)), atol=1e-6)


def test_cnn_gru_cannot_tell_where_a_feature_sits():
    """A property of CR_recon's cnn_gru worth knowing: its decoder sees only the average-pooled
    backbone features, so with periodic padding a circular shift of the structure by a multiple of
    the backbone's stride (32 px) leaves its prediction unchanged - it cannot tell the R pixel's
    quarter from the B pixel's. cnn_xattn's spatial tokens carry their position (s_pos)."""
    x = structures(1, seed=5)
    shifted = torch.roll(x, shifts=(64, 64), dims=(-2, -1))          # the R quarter moves onto B
    gru = build_model("cnn_gru").eval()
    xattn = build_model("cnn_xattn").eval()
    with torch.no_grad():
        assert torch.allclose(gru(x), gru(shifted), atol=1e-5)
        assert not torch.allclose(xattn(x), xattn(shifted), atol=1e-4)


def test_bad_model_names_and_params_are_one_line_errors():
    with pytest.raises(UserError, match="unknown model.*cnn_xattn, cnn_gru"):
        build_model("cnn_lstm")
    with pytest.raises(UserError, match=r"model.params.nhead: cnn_gru has no parameter 'nhead'"):
        build_model("cnn_gru", nhead=8)
    with pytest.raises(UserError, match="not divisible"):
        build_model("cnn_xattn", d_model=100, nhead=8)
    with pytest.raises(UserError, match="dropout probability"):
        build_model("cnn_xattn", tr_dropout=1.5)
    assert MODEL_NAMES == ("cnn_xattn", "cnn_gru")


def test_a_checkpoint_of_the_other_model_or_size_is_named_in_one_line():
    gru = original.get_model("cnn_gru").state_dict()
    assert describe_weights(gru)["model"] == "cnn_gru"
    with pytest.raises(UserError, match="holds cnn_gru weights, but the config asks for cnn_xattn"):
        load_state_dict_checked(build_model("cnn_xattn"), "cnn_xattn", {"out_len": 30, "d_model": 256}, gru, "w.pt")
    xattn40 = original.get_model("cnn_xattn", out_len=40, d_model=64, nhead=4, dec_layers=1).state_dict()
    with pytest.raises(UserError, match="out_len 40, but the config asks for cnn_xattn \\(out_len 30"):
        load_state_dict_checked(build_model("cnn_xattn", d_model=64, nhead=4, dec_layers=1), "cnn_xattn",
                                {"out_len": 30, "d_model": 64}, xattn40, "w.pt")
    two = original.get_model("cnn_xattn", d_model=64, nhead=4, dec_layers=2).state_dict()
    with pytest.raises(UserError, match="weights do not fit.*unexpected: dec.1"):
        load_state_dict_checked(build_model("cnn_xattn", d_model=64, nhead=4, dec_layers=1), "cnn_xattn",
                                {"out_len": 30, "d_model": 64}, two, "w.pt")
