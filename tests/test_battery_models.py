"""battery_ct.model: shapes, call conventions, parameter counts, freezing, HD-CNN rules, pretrained."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from battery_ct.model import (CLASS_NAMES, DEFECT_CLASSES, MODEL_NAMES, NORMAL_CLASSES, CBAM, HDCNNLoss,
                              anomaly_score, build_model, cached_weights_path, hdcnn_decision)
from common.io import UserError

torch.manual_seed(0)


def _x(b=2, size=64, seed=0):
    return torch.randn(b, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _n(params):
    return sum(p.numel() for p in params)


def _trainable(model):
    return _n(p for p in model.parameters() if p.requires_grad)


RESNET18_TRUNK = _n(torchvision.models.resnet18().parameters()) - (512 * 1000 + 1000)  # without fc


def test_class_constants():
    assert CLASS_NAMES == ("cell_normal", "cell_porosity", "module_normal", "module_porosity",
                           "module_resin_overflow")
    assert NORMAL_CLASSES == (0, 2) and DEFECT_CLASSES == (1, 3, 4)
    assert set(MODEL_NAMES) == {"resnet18", "efficientnet_b0", "convnext_tiny", "cbam", "hdcnn", "late_fusion",
                                "drn_aspp", "deeplabv3", "deeplab_seg", "ae"}
    with pytest.raises(UserError, match="unknown model"):
        build_model("resnet1000")


EXPECTED = {  # name -> output shapes for a (2, 3, 64, 64) batch
    "resnet18": [(2, 5)], "efficientnet_b0": [(2, 5)], "convnext_tiny": [(2, 5)], "cbam": [(2, 5)],
    "hdcnn": [(2, 2), (2, 5)], "late_fusion": [(2, 5)], "drn_aspp": [(2, 5)], "deeplabv3": [(2, 5)],
    "deeplab_seg": [(2, 4, 64, 64)], "ae": [(2, 3, 64, 64), (2, 1024)],
}


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_output_shapes_and_feature_head_split(name):
    model = build_model(name).eval()
    x = _x()
    with torch.no_grad():
        out = model(x)
        feats = model.forward_features(x)
        if name == "deeplab_seg":
            _, low = model.backbone(x)
            again = model.forward_head(feats, low, x.shape[-2:])
        else:
            again = model.forward_head(feats)
    outs = out if isinstance(out, tuple) else (out,)
    assert [tuple(o.shape) for o in outs] == EXPECTED[name]
    agains = again if isinstance(again, tuple) else (again,)
    for a, b in zip(outs, agains):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        assert torch.isfinite(a).all()
    if name in ("deeplabv3", "deeplab_seg"):
        assert feats.shape == (2, 256, 8, 8)  # the ASPP map at output stride 8
    if name == "drn_aspp":
        assert feats.shape == (2, 256, 16, 16)  # decoder map at stride 4


@pytest.mark.parametrize("name", ["resnet18", "efficientnet_b0", "convnext_tiny"])
def test_torchvision_models_match_torchvision(name):
    ours = build_model(name).eval()
    ref = getattr(torchvision.models, name)(num_classes=5).eval()
    assert _n(ours.parameters()) == _n(ref.parameters())
    linear = [m for m in ours.modules() if isinstance(m, nn.Linear)][-1]
    ref_linear = [m for m in ref.modules() if isinstance(m, nn.Linear)][-1]
    assert linear.weight.shape == ref_linear.weight.shape == (5, ref_linear.in_features)
    sd = {k.replace("fc.1.", "fc."): v for k, v in ours.model.state_dict().items()}  # resnet18: Dropout+Linear fc
    ref.load_state_dict(sd)
    x = _x(seed=1)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x))
    ours.freeze(*ours.BACKBONE)  # what build_model(name, freeze_backbone=True) does
    assert _trainable(ours) == ref_linear.weight.numel() + 5 + (768 * 2 if name == "convnext_tiny" else 0)


def test_resnet18_head_is_dropout_then_linear():
    m = build_model("resnet18", dropout=0.3)
    assert isinstance(m.model.fc[0], nn.Dropout) and m.model.fc[0].p == 0.3
    assert tuple(m.state_dict()["model.fc.1.weight"].shape) == (5, 512)


# ---------------------------------------------------------------- DeepLab
def test_deeplabv3_frozen_trains_with_batch_size_1():
    model = build_model("deeplabv3", freeze_backbone=True)
    assert _trainable(model) == 256 * 5 + 5 == 1285
    assert round(_n(model.parameters()) / 1e6, 1) == 39.4
    frozen = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("classifier.")}
    head = {k: v.clone() for k, v in model.classifier.state_dict().items()}
    model.train()
    assert model.training and model.classifier.training and model.dropout.training
    assert not any(m.training for part in (model.backbone, model.aspp) for m in part.modules())
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    loss = F.cross_entropy(model(_x(1)), torch.tensor([3]))  # batch 1: the ASPP pooling BN stays in eval
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    after = model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in frozen.items())  # weights and running stats unchanged
    assert not torch.equal(head["weight"], model.classifier.weight)
    assert all(p.grad is None for p in model.backbone.parameters())
    model.train()  # still frozen after another train() call
    assert not model.aspp.global_avg_pool[2].training and not model.backbone.layer0[1].training


def test_deeplab_seg_freeze_keeps_decoder_trainable():
    model = build_model("deeplab_seg", freeze_backbone=True).train()
    trainable = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"decoder"}
    assert model.decoder.training and not model.backbone.training
    with pytest.raises(UserError, match="convert_deeplab"):
        build_model("deeplabv3", pretrained=True)


# ---------------------------------------------------------------- HD-CNN
def test_hdcnn_structure_and_predict_follows_forward():
    model = build_model("hdcnn").eval()
    assert model.fc_coarse[1].out_features == 2 and model.fc_fine[1].out_features == 5
    assert model.layer3_c is not model.layer3_f and model.layer4_c[0].conv1.weight is not model.layer4_f[0].conv1.weight
    # trunk + 2 x (layer3, layer4) + heads; resnet18 layer3+layer4 = 2,099,712 + 6,558,720 parameters
    l34 = _n(torchvision.models.resnet18().layer3.parameters()) + _n(torchvision.models.resnet18().layer4.parameters())
    assert _n(model.parameters()) == RESNET18_TRUNK + l34 + (512 * 2 + 2) + (512 * 5 + 5)
    x = _x()
    with torch.no_grad():
        out = model(x)
        pred = model.predict(x)
    expect_pred, probs = hdcnn_decision(*out)
    assert torch.equal(pred, expect_pred) and torch.equal(model.probabilities(out), probs)
    assert torch.equal(probs.argmax(1), pred)


def test_hdcnn_decision_rule_on_hand_made_logits():
    coarse = torch.tensor([[3.0, 0.0],   # normal
                           [0.0, 3.0],   # defect
                           [0.2, 0.1],   # normal (barely)
                           [-50.0, 50.0]])
    fine = torch.tensor([[0.0, 9.0, 1.0, 8.0, 7.0],   # fine prefers defects overall; among {0,2}: 2
                         [9.0, 1.0, 8.0, 0.0, 2.0],   # fine prefers normals overall; among {1,3,4}: 4
                         [5.0, 0.0, 4.0, 9.0, 0.0],   # among {0,2}: 0
                         [1e4, -1e4, 0.0, 3.0, 2.9]])  # extreme logits: among {1,3,4}: 3
    pred, probs = hdcnn_decision(coarse, fine)
    assert pred.tolist() == [2, 4, 0, 3]
    assert torch.equal(probs.argmax(1), pred)
    assert torch.isfinite(probs).all()
    torch.testing.assert_close(probs.sum(1), torch.ones(4))
    # inside the chosen group the ranking and ratios follow the fine head
    q = fine[0, [0, 2]].softmax(0)
    torch.testing.assert_close(probs[0, 0] / probs[0, 2], q[0] / q[1])


def test_hdcnn_loss():
    g = torch.Generator().manual_seed(3)
    coarse, fine = torch.randn(4, 2, generator=g), torch.randn(4, 5, generator=g)
    coarse.requires_grad_(True)
    fine.requires_grad_(True)
    w = [1.5, 1.2, 0.8, 1.0, 8.0]
    loss_fn = HDCNNLoss(class_weights=w, label_smoothing=0.1)
    y = torch.tensor([0, 2, 2, 0])  # no defect sample
    loss = loss_fn((coarse, fine), y)
    assert torch.isfinite(loss)
    torch.testing.assert_close(loss, F.cross_entropy(coarse, torch.zeros(4, dtype=torch.long), label_smoothing=0.1))
    loss.backward()
    assert torch.isfinite(fine.grad).all() and fine.grad.abs().sum() == 0
    y = torch.tensor([0, 1, 4, 3])
    defect = torch.tensor([False, True, True, True])
    expect = (F.cross_entropy(coarse, defect.long(), label_smoothing=0.1)
              + F.cross_entropy(fine[defect], y[defect], weight=torch.tensor(w), label_smoothing=0.1))
    torch.testing.assert_close(loss_fn((coarse, fine), y), expect)


# ---------------------------------------------------------------- CBAM, late fusion, DRN+ASPP, AE
def test_cbam():
    cbam = CBAM(256)
    x = torch.randn(2, 256, 4, 4)
    assert cbam(x).shape == x.shape
    mlp = cbam.channel.mlp
    assert [tuple(m.weight.shape) for m in mlp if isinstance(m, nn.Conv2d)] == [(16, 256, 1, 1), (256, 16, 1, 1)]
    assert all(m.bias is None for m in mlp if isinstance(m, nn.Conv2d))
    assert tuple(cbam.spatial.conv.weight.shape) == (1, 2, 7, 7) and cbam.spatial.conv.bias is None
    assert cbam.spatial.bn.num_features == 1
    # channel attention by hand: sigmoid(MLP(avg) + MLP(max))
    with torch.no_grad():
        a = torch.sigmoid(mlp(x.mean((2, 3), keepdim=True)) + mlp(x.amax((2, 3), keepdim=True)))
        torch.testing.assert_close(cbam.channel(x), x * a)
    model = build_model("cbam")
    cbam_params = lambda c: 2 * c * (c // 16) + 2 * 7 * 7 + 2  # noqa: E731
    assert _n(model.parameters()) == RESNET18_TRUNK + cbam_params(256) + cbam_params(512) + 512 * 5 + 5


def test_late_fusion():
    model = build_model("late_fusion").eval()
    head = (514 * 256 + 256) + 2 * 256 + (256 * 128 + 128) + 2 * 128 + (128 * 5 + 5)
    assert _n(model.parameters()) == RESNET18_TRUNK + head
    x = _x()
    meta = torch.tensor([[0.0, 2.0], [1.0, 0.0]])
    with torch.no_grad():
        torch.testing.assert_close(model(x), model(x, torch.zeros(2, 2)))
        assert not torch.allclose(model(x), model(x, meta))
    drop = [m for m in model.classifier if isinstance(m, nn.Dropout)]
    assert [d.p for d in drop] == [0.5, 0.25]
    lin = [m for m in model.classifier if isinstance(m, nn.Linear)]
    assert [tuple(m.weight.shape) for m in lin] == [(256, 514), (128, 256), (5, 128)]
    assert all(m.bias.abs().sum() == 0 for m in lin)
    assert abs(lin[0].weight.std().item() - math.sqrt(2 / 256)) < 0.01  # kaiming fan_out
    model.freeze(*model.BACKBONE)
    assert _trainable(model) == head and not model.train().backbone.training


def test_drn_aspp_params_freeze_stem_and_batch_1():
    model = build_model("drn_aspp", freeze_stem=True)
    r50 = torchvision.models.resnet50()
    head = ((256 * 48 + 96) + (2048 * 256 + 512) + 3 * (2048 * 9 + 2048 * 256 + 512) + (2048 * 256 + 256)
            + (1280 * 256 + 512) + (304 * 9 + 304 * 256 + 512) + (256 * 9 + 256 * 256 + 512) + (256 * 5 + 5))
    total = _n(r50.parameters()) - (2048 * 1000 + 1000) + head
    assert _n(model.parameters()) == total and round(total / 1e6, 1) == 26.7
    stem = _n(r50.conv1.parameters()) + _n(r50.bn1.parameters()) + _n(r50.layer1.parameters())
    assert _trainable(model) == total - stem
    assert model.backbone.layer4[0].conv2.stride == (1, 1) and model.backbone.layer4[1].conv2.dilation == (2, 2)
    model.train()
    assert not model.backbone.layer1.training and not model.backbone.bn1.training and model.backbone.layer2.training
    loss = F.cross_entropy(model(_x(1)), torch.tensor([4]))  # image pooling has no BN: batch 1 trains
    loss.backward()
    assert torch.isfinite(loss) and model.backbone.conv1.weight.grad is None


@pytest.mark.parametrize("size", [64, 128])
def test_autoencoder(size):
    model = build_model("ae").eval()
    x = _x(2, size).clamp(-1, 1)
    with torch.no_grad():
        recon, z = model(x)
    assert recon.shape == x.shape and z.shape == (2, 1024) and (z >= 0).all()
    assert recon.abs().max() <= 1
    score = anomaly_score(x, recon)
    torch.testing.assert_close(score, torch.stack([((a - b) ** 2).mean() for a, b in zip(x, recon)]))
    enc_convs = [m for m in model.encoder if isinstance(m, nn.Conv2d)]
    assert [m.out_channels for m in enc_convs] == [64, 128, 256, 512] and all(m.bias is None for m in enc_convs)
    assert sum(isinstance(m, nn.Dropout2d) for m in model.encoder) == 3
    assert not isinstance(model.encoder[3], nn.Dropout2d)  # none after the first block
    with pytest.raises(ValueError, match="multiples of 16"):
        model(torch.zeros(1, 3, 40, 40))


# ---------------------------------------------------------------- pretrained weights: local cache only
def test_pretrained_without_cache_names_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_torch_home"))
    for name, file in (("resnet18", "resnet18-f37072fd.pth"),
                       ("efficientnet_b0", "efficientnet_b0_rwightman-7f5810bc.pth"),
                       ("convnext_tiny", "convnext_tiny-983f1562.pth"),
                       ("late_fusion", "resnet18-f37072fd.pth"),
                       ("drn_aspp", "resnet50-11ad3fa6.pth")):
        with pytest.raises(UserError) as e:
            build_model(name, pretrained=True)
        where = tmp_path / "empty_torch_home" / "hub" / "checkpoints" / file
        assert str(where) in str(e.value) and "nothing is downloaded" in str(e.value)
    assert not (tmp_path / "empty_torch_home").exists()


def test_pretrained_from_local_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    ref = torchvision.models.resnet18()
    path = cached_weights_path("resnet18")
    path.parent.mkdir(parents=True)
    torch.save(ref.state_dict(), path)
    model = build_model("resnet18", pretrained=True)
    assert torch.equal(model.model.conv1.weight, ref.conv1.weight)
    assert torch.equal(model.model.layer4[1].bn2.running_var, ref.layer4[1].bn2.running_var)
    assert model.model.fc[1].out_features == 5
    hd = build_model("hdcnn", pretrained=True)
    assert torch.equal(hd.layer3_c[0].conv1.weight, ref.layer3[0].conv1.weight)
    assert torch.equal(hd.layer4_f[0].conv1.weight, ref.layer4[0].conv1.weight)


def test_fused_inference_copy_matches_the_model():
    from battery_ct.model import fuse_for_inference
    torch.manual_seed(0)
    model = build_model("deeplab_seg").eval()
    for m in model.modules():  # non-trivial BN statistics, so folding them actually matters
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    fused = fuse_for_inference(model)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fused.modules())
    x = torch.rand(1, 3, 48, 40)
    with torch.inference_mode():
        ref, got = model(x), fused(x)
    assert got.shape == ref.shape == (1, 4, 48, 40)
    assert (got - ref).abs().max() <= 1e-4 * ref.abs().max()
