"""crbl.model: structure, Keras correspondence, padding, head, freezing and Keras BN semantics.

Pure torch.  Parity with the genuine Keras model (and the Keras-side numbers used here) is checked
in tests/test_convert_h5.py against models built by TensorFlow in a subprocess.
"""
from collections import Counter

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from crbl.model import (BLOCKS, CRBL, DEFAULT_THRESHOLDS, FREEZE_INDEX, KERAS_LAYER_NAMES, KERAS_LAYERS,
                        Conv2dSame, EfficientNetB0, bilinear_pool, build_model)

# Keras numbers for qubvel B0 / CRBL (checked against a live Keras model in test_convert_h5.py)
KERAS_CROP_TRAINABLE = 8_139_833
KERAS_FULL_TRAINABLE = 1_638_401
KERAS_TOTAL = 9_737_529
KERAS_B0_TOTAL = 4_049_564


def n_trainable(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters() if p.requires_grad)


def keras_total(m: nn.Module) -> int:
    """Keras counts BN moving mean/variance as (non-trainable) weights; torch keeps them as buffers."""
    stats = sum(b.numel() for n, b in m.named_buffers() if n.endswith(("running_mean", "running_var")))
    return sum(p.numel() for p in m.parameters()) + stats


# ----------------------------------------------------------------------------- Keras layer list
def test_keras_layer_list():
    assert len(KERAS_LAYERS) == 230
    assert KERAS_LAYER_NAMES[0] == "input_1" and KERAS_LAYER_NAMES[-1] == "top_activation"
    assert KERAS_LAYER_NAMES[FREEZE_INDEX] == "block5c_se_expand"
    assert KERAS_LAYER_NAMES[149] == "block5c_se_reduce"
    assert KERAS_LAYER_NAMES[154:157] == ("block5c_drop", "block5c_add", "block6a_expand_conv")
    assert Counter(c for _, c in KERAS_LAYERS) == {
        "Conv2D": 65, "DepthwiseConv2D": 16, "BatchNormalization": 49, "Activation": 33,
        "GlobalAveragePooling2D": 16, "Reshape": 16, "Multiply": 16, "FixedDropout": 9, "Add": 9,
        "InputLayer": 1}
    assert len(set(KERAS_LAYER_NAMES)) == 230


def test_keras_layers_cover_every_parameter_once():
    m = EfficientNetB0()
    layers = m.keras_layers()
    assert [n for n, _ in layers] == list(KERAS_LAYER_NAMES)
    mods = [mod for _, mod in layers if mod is not None]
    assert len(mods) == 130 == len({id(x) for x in mods})
    covered = {id(p) for mod in mods for p in mod.parameters()}
    assert covered == {id(p) for p in m.parameters()}
    # module path = Keras name with the block prefix split off
    named = dict(m.named_modules())
    for name, mod in layers:
        if mod is not None:
            path = name.replace("_", ".", 1) if name.startswith("block") else name
            assert named[path] is mod


def test_block_table_matches_qubvel_b0():
    assert len(BLOCKS) == 16
    m = EfficientNetB0()
    se = {b.name: getattr(m, b.name).se_reduce.out_channels for b in BLOCKS}
    assert se == {"block1a": 8, "block2a": 4, "block2b": 6, "block3a": 6, "block3b": 10, "block4a": 10,
                  "block4b": 20, "block4c": 20, "block5a": 20, "block5b": 28, "block5c": 28,
                  "block6a": 28, "block6b": 48, "block6c": 48, "block6d": 48, "block7a": 48}
    drops = {b.name: round(b.drop_rate, 6) for b in BLOCKS if b.drop_rate > 0}
    assert drops == {n: round(0.2 * i / 16, 6) for i, n in enumerate(
        [b.name for b in BLOCKS]) if n in ("block2b", "block3b", "block4b", "block4c", "block5b",
                                            "block5c", "block6b", "block6c", "block6d")}
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm2d):
            assert mod.eps == 1e-3 and mod.momentum == pytest.approx(0.01)
    strided = [n for n, mod in m.named_modules() if isinstance(mod, nn.Conv2d) and mod.stride != (1, 1)]
    assert strided == ["stem_conv", "block2a.dwconv", "block3a.dwconv", "block4a.dwconv", "block6a.dwconv"]
    assert sum(p.numel() for p in m.parameters()) + sum(
        b.numel() for n, b in m.named_buffers() if "running" in n) == KERAS_B0_TOTAL


def test_state_dict_layout_is_fixed():
    a, b = EfficientNetB0().state_dict(), EfficientNetB0().state_dict()
    assert list(a) == list(b)
    assert torch.equal(a["input_scale"], torch.ones(3)) and torch.equal(a["input_shift"], torch.zeros(3))
    assert "block5c.se_expand.weight" in a and "stem_conv.weight" in a and "top_bn.running_var" in a
    sd = CRBL().state_dict()
    assert sd["predictions.weight"].shape == (1, 1280 * 1280)
    assert {k.split(".")[0] for k in sd} == {"backbone1", "backbone2", "predictions"}


# ----------------------------------------------------------------------------- padding
def _tf_same_reference(x, conv):
    """TF SAME by its definition: pad_total = max((ceil(n/s)-1)*s + k - n, 0), floor half before."""
    k, s = conv.kernel_size[0], conv.stride[0]
    h, w = x.shape[-2:]
    ph = max((-(-h // s) - 1) * s + k - h, 0)
    pw = max((-(-w // s) - 1) * s + k - w, 0)
    xp = F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))
    return F.conv2d(xp, conv.weight, conv.bias, s, 0, 1, conv.groups)


@pytest.mark.parametrize("k", [3, 5])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("cin,cout,groups", [(3, 8, 1), (6, 6, 6)])
def test_conv2d_same_matches_tf_same(k, stride, cin, cout, groups):
    torch.manual_seed(k * 10 + stride)
    conv = Conv2dSame(cin, cout, k, stride, groups=groups, bias=True)
    for h, w in [(16, 16), (17, 15), (16, 13), (2, 3), (1, 1), (131, 127)]:
        x = torch.randn(2, cin, h, w)
        ref = _tf_same_reference(x, conv)
        for xx in (x, x.contiguous(memory_format=torch.channels_last)):
            y = conv(xx)
            assert y.shape == ref.shape == (2, cout, -(-h // stride), -(-w // stride))
            torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)


def test_even_stride2_padding_is_asymmetric():
    """The extra padding row/column of a stride-2 conv goes bottom/right (a symmetric pad differs)."""
    conv = Conv2dSame(1, 1, 3, 2)
    nn.init.ones_(conv.weight)
    x = torch.zeros(1, 1, 4, 4)
    x[..., 0, 0] = 1.0       # TF pads (0, 1): the top-left pixel is inside the first window
    assert conv(x)[0, 0, 0, 0].item() == 1.0
    x = torch.zeros(1, 1, 4, 4)
    x[..., 3, 3] = 1.0       # ... and the bottom-right one only in the last window
    assert conv(x)[0, 0].tolist() == [[0.0, 0.0], [0.0, 1.0]]


def test_output_sizes():
    m = EfficientNetB0().eval()
    with torch.inference_mode():
        assert m(torch.rand(1, 3, 128, 128)).shape == (1, 1280, 4, 4)
        assert m(torch.rand(1, 3, 131, 127)).shape == (1, 1280, 5, 4)
        assert m(torch.rand(2, 3, 224, 224)).shape == (2, 1280, 7, 7)


# ----------------------------------------------------------------------------- bilinear head
def _pool_reference(f1, f2):
    a = f1.double().flatten(2).numpy()
    b = f2.double().flatten(2).numpy()
    phi = np.einsum("bip,bjp->bij", a, b).reshape(a.shape[0], -1) / a.shape[2]
    y = np.sign(phi) * np.sqrt(np.abs(phi) + 1e-12)
    return y / np.maximum(np.linalg.norm(y, axis=1, keepdims=True), 1e-12), phi


def test_bilinear_pool_matches_the_lambda():
    torch.manual_seed(0)
    f1, f2 = torch.randn(2, 1280, 3, 2), torch.randn(2, 1280, 3, 2)
    ref, phi = _pool_reference(f1, f2)
    z = bilinear_pool(f1, f2)
    assert z.shape == (2, 1280 * 1280)
    np.testing.assert_allclose(z.numpy(), ref, atol=2e-7)
    # flatten index i*1280 + j, i from backbone 1: swapping the backbones must change the vector
    swapped = bilinear_pool(f2, f1)
    assert np.abs(swapped.numpy() - ref).max() > 1e-4
    i, j = 5, 700
    expected = np.sign(phi[0, i * 1280 + j]) * np.sqrt(abs(phi[0, i * 1280 + j]) + 1e-12)
    assert z[0, i * 1280 + j].item() == pytest.approx(expected / np.linalg.norm(
        np.sign(phi[0]) * np.sqrt(np.abs(phi[0]) + 1e-12)), rel=1e-4)
    # channels_last feature maps give the same result
    cl = bilinear_pool(f1.contiguous(memory_format=torch.channels_last),
                       f2.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(cl, z)


def test_inference_head_equals_training_head():
    """forward_head takes a blocked no-autograd path in inference; it must equal Linear(pool)."""
    torch.manual_seed(1)
    m = CRBL().eval()
    nn.init.normal_(m.predictions.weight, std=0.05)
    nn.init.constant_(m.predictions.bias, 0.3)
    feats = (torch.randn(3, 1280, 4, 4).relu(), torch.randn(3, 1280, 4, 4))
    ref = m.predictions(bilinear_pool(*feats))
    with torch.inference_mode():
        fast = m.forward_head(feats)
        pre = m.forward_head(feats, pre_logits=True)
    torch.testing.assert_close(fast, ref.detach(), atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(pre, bilinear_pool(*feats))
    with torch.no_grad():
        torch.testing.assert_close(m.forward_head(feats), ref.detach(), atol=2e-6, rtol=1e-5)


def test_crbl_api_shapes_and_memory_formats():
    torch.manual_seed(2)
    m = build_model("full").eval()
    x = torch.rand(2, 3, 128, 128)
    with torch.inference_mode():
        logits = m(x)
        f1, f2 = m.forward_features(x)
        assert logits.shape == (2, 1) and f1.shape == f2.shape == (2, 1280, 4, 4)
        assert f1.is_contiguous()                       # features come back in the input's format
        torch.testing.assert_close(m.forward_head((f1, f2)), logits)
        xc = x.contiguous(memory_format=torch.channels_last)
        mc = build_model("full").eval().to(memory_format=torch.channels_last)
        mc.load_state_dict(m.state_dict())
        torch.testing.assert_close(mc(xc), logits, atol=1e-5, rtol=1e-4)
        assert mc.forward_features(xc)[0].is_contiguous(memory_format=torch.channels_last)
        assert m(torch.rand(1, 3, 131, 127)).shape == (1, 1)
    # the same numbers with autograd on (the differentiable path)
    torch.testing.assert_close(m(x).detach(), logits, atol=1e-5, rtol=1e-4)
    assert m.num_features == 1280 * 1280 and m.backbone1.num_features == 1280


def test_thresholds():
    assert DEFAULT_THRESHOLDS == {"crop": 0.01, "full": 0.5}


# ----------------------------------------------------------------------------- freezing
def test_trainable_counts_match_keras():
    crop, full = build_model("crop"), build_model("full")
    assert n_trainable(crop) == KERAS_CROP_TRAINABLE
    assert n_trainable(full) == KERAS_FULL_TRAINABLE
    assert keras_total(crop) == keras_total(full) == KERAS_TOTAL
    assert crop.model_type == "crop" and full.model_type == "full"
    # crop: exactly layers[150:] of both backbones (+ the head) are trainable
    for bb in (crop.backbone1, crop.backbone2):
        for i, (name, mod) in enumerate(bb.keras_layers()):
            if mod is not None:
                assert all(p.requires_grad == (i >= FREEZE_INDEX) for p in mod.parameters()), name
    assert not any(p.requires_grad for p in full.backbone1.parameters())
    assert all(p.requires_grad for p in full.predictions.parameters())


@pytest.mark.parametrize("bad", ["Crop", "origin", "", None, "cropped"])
def test_build_model_rejects_unknown_type(bad):
    with pytest.raises(ValueError, match="crop.*full"):
        build_model(bad)


def test_frozen_bn_stays_in_eval_mode():
    m = build_model("crop")
    m.train()
    b1 = m.backbone1
    assert not b1.stem_bn.training and not b1.block5c.bn.training and b1.block5c.project_bn.weight.requires_grad
    assert b1.block5c.project_bn.training and b1.top_bn.training and b1.block6a.expand_bn.training
    assert m.dropout.training and b1.block6b.training            # dropout / drop-path stay active
    m.eval()
    m.train()                                                   # again after eval()
    assert not b1.block5a.expand_bn.training and b1.top_bn.training
    full = build_model("full").train()
    assert not any(mod.training for mod in full.modules() if isinstance(mod, nn.BatchNorm2d))
    assert full.dropout.training


@pytest.mark.parametrize("model_type", ["crop", "full"])
def test_train_step_updates_only_trainable_parts(model_type):
    torch.manual_seed(3)
    m = build_model(model_type).train()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.1)
    x = torch.rand(2, 3, 64, 64)
    loss = F.binary_cross_entropy_with_logits(m(x), torch.tensor([[1.0], [0.0]]))
    loss.backward()
    opt.step()
    after = m.state_dict()
    frozen_bn = ["stem_bn", "block1a.bn", "block5c.bn", "block5c.expand_bn"]
    trainable_bn = ["block5c.project_bn", "block6a.bn", "top_bn"]
    for bb in ("backbone1", "backbone2"):
        for name in frozen_bn + (trainable_bn if model_type == "full" else []):
            for stat in ("running_mean", "running_var", "weight", "bias"):
                key = f"{bb}.{name}.{stat}"
                assert torch.equal(before[key], after[key]), key
            assert after[f"{bb}.{name}.num_batches_tracked"] == 0
        for key in (f"{bb}.stem_conv.weight", f"{bb}.block5c.se_reduce.weight"):
            assert torch.equal(before[key], after[key]), key
        if model_type == "crop":
            for name in trainable_bn:
                for stat in ("running_mean", "running_var", "weight"):
                    key = f"{bb}.{name}.{stat}"
                    assert not torch.equal(before[key], after[key]), key
            for key in (f"{bb}.block5c.se_expand.weight", f"{bb}.top_conv.weight"):
                assert not torch.equal(before[key], after[key]), key
        else:
            assert all(torch.equal(before[k], after[k]) for k in before if k.startswith(bb))
    assert not torch.equal(before["predictions.weight"], after["predictions.weight"])


def test_drop_path_per_sample_in_training_only():
    torch.manual_seed(4)
    blk = EfficientNetB0().block6d          # drop rate 0.2 * 14 / 16
    rate = blk.drop_rate
    assert rate == pytest.approx(0.175)
    x = torch.randn(400, 192, 2, 2)
    blk.eval()
    with torch.no_grad():
        residual = blk(x) - x               # the block's branch without drop-path
        blk.train()
        for mod in blk.modules():           # BN in eval so the branch is deterministic
            if isinstance(mod, nn.BatchNorm2d):
                mod.eval()
        out = blk(x) - x
    kept = [(out[i] - residual[i] / (1 - rate)).abs().max() < 1e-4 for i in range(len(x))]
    dropped = [out[i].abs().max() < 1e-6 for i in range(len(x))]
    assert all(k or d for k, d in zip(kept, dropped))   # whole samples, kept ones scaled by 1/(1-rate)
    assert 0.08 < sum(dropped) / len(x) < 0.28


def test_fused_training_head_equals_autograd_through_the_plain_head():
    """The blockwise training head (pooling -> dropout -> linear) gives the logits and gradients
    that autograd gives through bilinear_pool + the same dropout mask + Linear."""
    from crbl.model import bilinear_pool, dropout_bits, unpack_mask
    torch.manual_seed(0)
    model = build_model("crop").train()
    B = 3
    f1 = torch.randn(B, 1280, 4, 4).relu().requires_grad_()
    f2 = torch.randn(B, 1280, 4, 4).relu().requires_grad_()
    f2.data[0, :7] = 0.0                      # exact zeros in phi: autograd's sign' = 0 there
    mask = torch.rand(B, 1280, 1280) < 0.5
    out = model.forward_head((f1, f2), dropout_mask=mask)
    g = torch.randn(B, 1)
    params = [model.predictions.weight, model.predictions.bias]
    got = torch.autograd.grad((out * g).sum(), [f1, f2, *params])
    a, b = f1.detach().clone().requires_grad_(), f2.detach().clone().requires_grad_()
    z = bilinear_pool(a, b).reshape(B, 1280, 1280) * mask / 0.5
    ref = model.predictions(z.reshape(B, -1))
    want = torch.autograd.grad((ref * g).sum(), [a, b, *params])
    assert (out - ref).abs().max() <= 1e-7  # float32 sums over 1.6 M terms; logits here ~1e-3
    for x, y in zip(got, want):
        assert (x - y).abs().max() <= 1e-5 * y.abs().max()
    bits = dropout_bits((4, 64, 1280), 0.5, "cpu")
    kept = unpack_mask(bits, torch.float32).mean()
    assert bits.shape == (4, 64, 160) and abs(float(kept) - 0.5) < 0.01
