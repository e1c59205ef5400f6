"""colorize.model: parameter names and counts of the original U-Nets, numerical parity with a plain
transcription of the original modules (tests/colorize_ref/original_unet.py), gradients, input
checks, and loading the original's checkpoints (prefixes, cuda:0 storages)."""
from __future__ import annotations

import contextlib

import pytest
import torch

from colorize.model import ImprovedUNet, UNet, build_model, detect_architecture, load_original_state
from common.io import UserError, load_state_strict, load_untrusted, strip_wrapper_prefixes
from tests.colorize_ref.original_unet import OriginalImprovedUNet, OriginalUNet



@pytest.fixture(scope="module")
def improved_pair():
    torch.manual_seed(0)
    ref = OriginalImprovedUNet()
    ours = ImprovedUNet()
    ours.load_state_dict(ref.state_dict())
    return ref, ours


@pytest.fixture(scope="module")
def plain_pair():
    torch.manual_seed(1)
    ref = OriginalUNet()
    for m in ref.modules():   # non-trivial BatchNorm statistics, so eval mode is really tested
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.1, 0.1)
    ours = UNet()
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def test_parameter_names_shapes_and_counts_are_the_originals(improved_pair, plain_pair):
    for ref, ours in (improved_pair, plain_pair):
        a, b = ref.state_dict(), ours.state_dict()
        assert list(a) == list(b)
        assert all(a[k].shape == b[k].shape for k in a)
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert n(improved_pair[1]) == 56_919_399      # digest: "about 56.92 M"
    assert n(plain_pair[1]) == 31_043_651         # digest: "about 31.04 M"
    keys = set(improved_pair[1].state_dict())
    # facts the port must keep: output layer names, SE linears without bias, no InstanceNorm keys
    assert "outconv.weight" in keys and "out.weight" in set(plain_pair[1].state_dict())
    assert "conv1.se.excitation.0.weight" in keys and "conv1.se.excitation.0.bias" not in keys
    assert not any("running_mean" in k for k in keys)
    assert "att4.psi.0.weight" in keys and "res_bottleneck.block.3.weight" in keys


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_improved_unet_forward_equals_the_transcription(improved_pair, layout):
    ref, ours = improved_pair
    x = torch.rand(1, 3, 32, 48, generator=torch.Generator().manual_seed(2))
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    ours.to(memory_format=fmt)
    try:
        with torch.no_grad():
            expected = ref(x)
            got = ours(x.contiguous(memory_format=fmt))
        torch.testing.assert_close(got, expected, atol=2e-5, rtol=0)
        assert (got * 255 - expected * 255).abs().max() < 0.01   # far inside the +-1 level of a PNG
    finally:
        ours.to(memory_format=torch.contiguous_format)


def test_block_gradients_equal_the_transcription_in_float64():
    """Each fused block against its plain counterpart, in float64 so that the math is compared and
    not fp32 summation order."""
    from tests.colorize_ref import original_unet as orig
    from colorize import model as ours_mod

    g = torch.Generator().manual_seed(3)
    cases = [(orig.DoubleConv(8, 16), ours_mod.DoubleConv(8, 16), (torch.rand(2, 8, 12, 10, generator=g),)),
             (orig.ResidualBlock(32), ours_mod.ResidualBlock(32), (torch.rand(2, 32, 8, 8, generator=g),)),
             (orig.AttentionGate(16, 16, 8), ours_mod.AttentionGate(16, 16, 8),
              (torch.rand(2, 16, 8, 8, generator=g), torch.rand(2, 16, 8, 8, generator=g)))]
    for ref, ours, inputs in cases:
        ref.double()
        ours.double().load_state_dict(ref.state_dict())
        outs = []
        for m in (ref, ours):
            xs = [x.double().requires_grad_() for x in inputs]
            y = m(*xs)
            (y * torch.linspace(-1, 1, y.numel(), dtype=torch.float64).view_as(y)).sum().backward()
            outs.append((y.detach(), [x.grad for x in xs], dict(m.named_parameters())))
        (y_ref, gx_ref, p_ref), (y_ours, gx_ours, p_ours) = outs
        torch.testing.assert_close(y_ours, y_ref, atol=1e-12, rtol=1e-10)
        for a, b in zip(gx_ours, gx_ref):
            torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-9)
        for name, p in p_ours.items():
            if p.grad is None and name.endswith(".bias"):   # a conv bias right before an InstanceNorm: true gradient 0
                assert p_ref[name].grad.abs().max() < 1e-12, name
            elif name.startswith("se.") and isinstance(ours, ours_mod.ResidualBlock):
                # the residual block's SE squeezes an InstanceNorm output (spatial mean 0), so its
                # linears see zeros and scale by sigmoid(0) = 0.5: no gradient here, rounding noise there
                assert p.grad is None and p_ref[name].grad.abs().max() < 1e-12, name
            else:
                torch.testing.assert_close(p.grad, p_ref[name].grad, atol=1e-12, rtol=1e-9, msg=name)


def test_improved_unet_gradients_match_the_transcription(improved_pair):
    """The whole network in fp32: the gradient vectors agree to 1e-3 relative (fp32 rounding through
    40 InstanceNorms; the float64 block test above pins the math)."""
    ref, ours = improved_pair
    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    t = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    for m in (ref, ours):
        m.zero_grad(set_to_none=True)
        torch.nn.functional.mse_loss(m(x), t).backward()
    ref_params = dict(ref.named_parameters())
    names = [n for n, p in ours.named_parameters() if p.grad is not None]
    # none for the 40 conv biases in front of an InstanceNorm and the 5 residual SEs (2 linears each)
    assert len(names) == len(ref_params) - 40 - 10
    g_ours = torch.cat([dict(ours.named_parameters())[n].grad.flatten() for n in names])
    g_ref = torch.cat([ref_params[n].grad.flatten() for n in names])
    assert (g_ours - g_ref).norm() / g_ref.norm() < 1e-3
    for m in (ref, ours):
        m.zero_grad(set_to_none=True)


def test_plain_unet_equals_the_transcription_in_eval_and_train_mode(plain_pair):
    ref, ours = plain_pair
    x = torch.rand(2, 3, 16, 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(x), ref.eval()(x), atol=1e-5, rtol=0)
        ref_state = {k: v.clone() for k, v in ref.state_dict().items()}
        out_ref = ref.train()(x)
        out = ours.train()(x)
        torch.testing.assert_close(out, out_ref, atol=1e-5, rtol=0)
        torch.testing.assert_close(ours.state_dict(), ref.state_dict())   # running stats updated alike
        ref.load_state_dict(ref_state)
        ours.load_state_dict(ref_state)
    ref.eval()
    ours.eval()


def test_timm_style_api_and_small_width():
    torch.manual_seed(0)
    for name in ("unet", "improved_unet"):
        m = build_model(name, width=16).eval()
        assert list(m.state_dict()) == list(build_model(name).state_dict())   # same names at any width
        x = torch.rand(1, 3, 32, 32)
        with torch.no_grad():
            f = m.forward_features(x)
            assert f.shape == (1, 16, 32, 32)
            y = m.forward_head(f)
            torch.testing.assert_close(y, m(x))
        assert y.min() >= 0 and y.max() <= 1
        assert detect_architecture(m.state_dict()) == (name, 16)
    with pytest.raises(ValueError, match="unknown model"):
        build_model("resnet")
    with pytest.raises(ValueError, match="width"):
        build_model("improved_unet", width=8)


def test_size_not_divisible_by_16_is_a_clear_error():
    m = build_model("improved_unet", width=16)
    for shape in ((1, 3, 40, 32), (1, 3, 32, 20)):
        with pytest.raises(ValueError, match="multiples of 16"):
            m(torch.rand(shape))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        m(torch.rand(1, 1, 32, 32))


# ---------------------------------------------------------------- original checkpoints
@contextlib.contextmanager
def saved_as_cuda():
    """Make torch.save tag CPU storages as 'cuda:0', as a checkpoint written on a GPU is."""
    reg = torch.serialization._package_registry
    entry = (-100, lambda obj: "cuda:0" if getattr(obj, "device", None) is not None and obj.device.type == "cpu" else None,
             lambda obj, location: None)
    reg.append(entry)
    reg.sort(key=lambda e: e[0])
    try:
        yield
    finally:
        reg.remove(entry)


def original_checkpoint(model, *, compiled: bool = False, epoch: int = 7) -> dict:
    sd = model.state_dict()
    if compiled:
        sd = {f"_orig_mod.{k}": v for k, v in sd.items()}
    opt = torch.optim.AdamW(model.parameters(), 1e-3, weight_decay=0.01)
    return {"epoch": epoch, "model_state_dict": sd, "optimizer_state_dict": opt.state_dict(),
            "train_loss": 0.123, "val_loss": 0.145}


@pytest.mark.parametrize("compiled", [False, True])
def test_original_checkpoints_load_with_or_without_orig_mod_and_from_cuda(tmp_path, compiled):
    """The original's checkpoint dict (here of a width-16 model, to keep the file small; the full-size
    originals go through colorize/infer.py in test_colorize_infer.py)."""
    torch.manual_seed(6)
    src = build_model("improved_unet", 16).eval()
    path = tmp_path / "best_model.pth"
    with saved_as_cuda():
        torch.save(original_checkpoint(src, compiled=compiled), path)
    if not torch.cuda.is_available():   # the file really holds cuda:0 storages
        with pytest.raises(RuntimeError, match="CUDA"):
            torch.load(path, weights_only=True)
    obj = load_untrusted(path)
    sd, name, width = load_original_state(obj, path)
    assert (name, width) == ("improved_unet", 16)
    ours = build_model(name, width).eval()
    load_state_strict(ours, sd, path)
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), src(x), atol=0, rtol=0)
    # the original's inference built an uncompiled model and loaded strictly: that fails here
    if compiled:
        with pytest.raises(RuntimeError, match="_orig_mod"):
            build_model("improved_unet", 16).load_state_dict(obj["model_state_dict"])


def test_other_architecture_and_foreign_weights_are_refused(plain_pair):
    plain = plain_pair[0].state_dict()
    with pytest.raises(UserError, match="holds a unet model, not --model improved_unet"):
        load_original_state({"model_state_dict": plain}, "x.pth", model="improved_unet")
    sd, name, _ = load_original_state({"model_state_dict": plain}, "x.pth")
    assert name == "unet"
    with pytest.raises(UserError, match="not a colorize U-Net"):
        load_original_state({"model_state_dict": {"fc.weight": torch.zeros(2, 2)}}, "x.pth")
    with pytest.raises(UserError, match="no U-Net weights"):
        load_original_state({"epoch": 3}, "x.pth")
    with pytest.raises(UserError, match="weights do not fit ImprovedUNet"):
        load_state_strict(build_model("improved_unet", 16), sd, "x.pth")
    assert strip_wrapper_prefixes({"module._orig_mod.a": 1, "b": 2}) == ({"a": 1, "b": 2}, ["module.", "_orig_mod."])


def test_bf16_autocast_training_step_runs_the_fused_norm_in_float32():
    torch.manual_seed(0)
    m = build_model("improved_unet", 16)
    x = torch.rand(2, 3, 32, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(x)
        loss = torch.nn.functional.l1_loss(y.float(), torch.rand(2, 3, 32, 32))
    loss.backward()
    grads = [p.grad for p in m.parameters() if p.grad is not None]
    assert grads and all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
    with torch.no_grad():
        torch.testing.assert_close(y.float(), m(x), atol=0.05, rtol=0)   # bf16 rounding only
