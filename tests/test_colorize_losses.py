"""colorize.losses: the original's L1 + 0.2 * VGG16 perceptual loss (against a transcription of it),
the frozen VGG with buffer constants, the Gram style term and the damaged-region weight.
VGG16 has random weights here (no download in tests)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from colorize.losses import ColorizeLoss, gram, masked_l1
from tests.colorize_ref.original_losses import OriginalCombinedLoss



@pytest.fixture(scope="module")
def losses():
    torch.manual_seed(0)
    ours = ColorizeLoss(vgg_weights=None)                       # l1 1, perceptual 0.2: the original's
    ref = OriginalCombinedLoss(ours.vgg.features)               # the same random VGG16 layers
    return ours, ref


def pair(seed=0, size=32):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(2, 3, size, size, generator=g), torch.rand(2, 3, size, size, generator=g)


def test_default_loss_equals_the_originals_combined_loss(losses):
    ours, ref = losses
    pred, target = pair()
    total, parts = ours(pred, target)
    torch.testing.assert_close(total, ref(pred, target))
    torch.testing.assert_close(total, parts["l1"] + 0.2 * parts["perceptual"])
    assert set(parts) == {"l1", "perceptual"}


def test_vgg_is_frozen_in_eval_mode_with_buffer_constants(losses):
    ours, ref = losses
    assert not any(p.requires_grad for p in ours.parameters())
    ours.train()
    assert not ours.vgg.training and not any(m.training for m in ours.vgg.modules())
    buffers = dict(ours.vgg.named_buffers())
    assert {"mean", "std"} <= set(buffers)
    # the original's defect: its normalisation constants are trainable parameters
    trainable = [n for n, p in ref.named_parameters() if p.requires_grad]
    assert trainable == ["perceptual.mean", "perceptual.std"]
    # gradients reach the prediction only
    pred, target = pair(1)
    pred.requires_grad_()
    ours(pred, target)[0].backward()
    assert pred.grad is not None and pred.grad.abs().sum() > 0
    assert all(p.grad is None for p in ours.parameters())


def test_gram_and_style_term():
    f = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]], [[0.0, 1.0], [0.0, 1.0]]]])   # (1, 2, 2, 2)
    # by hand: rows a = (1,2,3,4), b = (0,1,0,1); G = [[a.a, a.b], [b.a, b.b]] / (2 * 2 * 2)
    expected = torch.tensor([[[30.0, 6.0], [6.0, 2.0]]]) / 8
    torch.testing.assert_close(gram(f), expected)
    torch.manual_seed(1)
    style = ColorizeLoss(perceptual=0.0, style=5.0, vgg_weights=None)
    pred, target = pair(2)
    total, parts = style(pred, target)
    assert set(parts) == {"l1", "style"} and parts["style"] > 0
    torch.testing.assert_close(total, parts["l1"] + 5.0 * parts["style"])
    feats_p, feats_t = style.vgg(pred), style.vgg(target)
    by_hand = sum(w * F.l1_loss(gram(a), gram(b)) for w, a, b in zip((0.5, 0.7, 1.0), feats_p, feats_t))
    torch.testing.assert_close(parts["style"], by_hand)
    assert style(target, target)[1]["style"] == 0


def test_damaged_region_weight():
    pred = torch.zeros(1, 3, 4, 4)
    target = torch.ones(1, 3, 4, 4)
    target[..., :2, :] = 0.0                       # the top half is already right
    mask = torch.zeros(1, 1, 4, 4)
    mask[..., 1:3, :] = 1                          # damaged rows 1 and 2: one right, one wrong
    assert masked_l1(pred, target, mask) == pytest.approx(0.5)
    assert masked_l1(pred, target, torch.zeros_like(mask)) == 0.0
    loss = ColorizeLoss(perceptual=0.0, mask_weight=2.0, vgg_weights=None)
    assert loss.vgg is None                        # no VGG built when no term needs it
    total, parts = loss(pred, target, mask)
    assert parts["l1"] == pytest.approx(0.5) and parts["mask_l1"] == pytest.approx(0.5)
    assert total == pytest.approx(0.5 + 2.0 * 0.5)
