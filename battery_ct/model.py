"""Battery inspection models, one file, read top to bottom.

CT classifiers (5 classes, fixed order, see CLASS_NAMES):
    resnet18, efficientnet_b0, convnext_tiny   torchvision models with a 5-class head
    cbam          ResNet18 + CBAM after layer3 and layer4
    hdcnn         HD-CNN: shared ResNet18 trunk, coarse (normal/defect) + fine (5-class) branches
    late_fusion   ResNet18 image features + 2 raw metadata floats (battery_type, axis)
    drn_aspp      torchvision ResNet50 (output stride 16) + separable ASPP + light decoder
    deeplabv3     DRN-D-54 + ASPP from pytorch-deeplab-xception (output stride 8), GAP classifier
    deeplab_seg   the original DeepLabV3+ (DRN-D-54) segmentation network, per-pixel logits
RGB anomaly model:
    ae            convolutional autoencoder; anomaly_score(x, recon) = per-image MSE

Call conventions (timm-like):
    logits = model(x)                      every classifier except the two below
    logits = model(x, metadata)            late_fusion; metadata (B,2) floats or None (-> zeros)
    coarse, fine = model(x)                hdcnn: a tuple; HDCNNLoss()(outputs, y) for training,
                                           hdcnn_decision(coarse, fine) -> (pred, probs) for metrics
    recon, z = model(x)                    ae
    model.forward_head(model.forward_features(x)) == model(x) for all of them (late_fusion's
    forward_head takes metadata as a second argument; deeplab_seg's forward_head needs the
    low-level features and the output size, see DeepLabSeg).

Pretrained weights are never downloaded: pretrained=True reads the torchvision file from the local
torch hub cache (torch.hub.get_dir()/checkpoints/<file>) or raises UserError naming the file.
DeepLab weights come from scripts/convert_deeplab.py and are loaded with load_converted().
"""
from __future__ import annotations

import copy
import math
import os
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from common.io import UserError, load_untrusted, state_dict_from

CLASS_NAMES = ("cell_normal", "cell_porosity", "module_normal", "module_porosity",
               "module_resin_overflow")
NORMAL_CLASSES = (0, 2)
DEFECT_CLASSES = (1, 3, 4)
MODEL_NAMES = ("resnet18", "efficientnet_b0", "convnext_tiny", "cbam", "hdcnn", "late_fusion",
               "drn_aspp", "deeplabv3", "deeplab_seg", "ae")


# ---------------------------------------------------------------- pretrained torchvision weights
TORCHVISION_WEIGHTS = {  # architecture -> the torchvision weights the original project used
    "resnet18": torchvision.models.ResNet18_Weights.IMAGENET1K_V1,
    "resnet50": torchvision.models.ResNet50_Weights.IMAGENET1K_V2,
    "efficientnet_b0": torchvision.models.EfficientNet_B0_Weights.IMAGENET1K_V1,
    "convnext_tiny": torchvision.models.ConvNeXt_Tiny_Weights.IMAGENET1K_V1,
}


def cached_weights_path(arch: str) -> Path:
    """Where torchvision's weight file for `arch` lies in the local torch hub cache."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(TORCHVISION_WEIGHTS[arch].url)


def load_torchvision_weights(model: nn.Module, arch: str) -> None:
    """Load ImageNet weights into a torchvision model with its original 1000-class head.

    Only reads the local cache; a missing file is a UserError that says what to put where.
    """
    path = cached_weights_path(arch)
    if not path.is_file():
        raise UserError(f"pretrained {arch} weights are not on this machine (nothing is downloaded): "
                        f"put {path.name} (from {TORCHVISION_WEIGHTS[arch].url}) at {path}, "
                        f"or train from scratch with pretrained=False")
    sd = state_dict_from(load_untrusted(path), path)
    try:
        model.load_state_dict(sd)
    except RuntimeError as e:
        raise UserError(f"{path}: not the torchvision {arch} weights ({str(e).splitlines()[0]})") from None


def torchvision_model(arch: str, pretrained: bool = False, **kwargs) -> nn.Module:
    """A torchvision model with its ImageNet head (weights from the local cache if pretrained)."""
    model = getattr(torchvision.models, arch)(weights=None, **kwargs)
    if pretrained:
        load_torchvision_weights(model, arch)
    return model


# ---------------------------------------------------------------- freezing
class FreezableModel(nn.Module):
    """nn.Module whose frozen submodules stay in eval mode (BN statistics fixed, dropout off),
    even after model.train(): freezing means requires_grad=False *and* eval."""

    BACKBONE: tuple[str, ...] = ()  # the submodules that freeze_backbone=True freezes

    def __init__(self):
        super().__init__()
        self.frozen: list[str] = []

    def freeze(self, *names: str) -> None:
        for name in names:
            module = self.get_submodule(name)
            module.requires_grad_(False)
            module.eval()
            if name not in self.frozen:
                self.frozen.append(name)

    def train(self, mode: bool = True):
        super().train(mode)
        for name in self.frozen:
            self.get_submodule(name).eval()
        return self


def _flat_gap(x: torch.Tensor) -> torch.Tensor:
    return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)


def _resnet_trunk(r: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """torchvision ResNet conv1 .. layer4 (no pooling)."""
    x = r.maxpool(r.relu(r.bn1(r.conv1(x))))
    return r.layer4(r.layer3(r.layer2(r.layer1(x))))


# ---------------------------------------------------------------- torchvision classifiers
class TorchvisionClassifier(FreezableModel):
    """resnet18 / efficientnet_b0 / convnext_tiny with a num_classes head.

    The weights live under `model.` like the original ResNet18Classifier. resnet18's fc is
    Sequential(Dropout(p), Linear(512, n)) as in the original (keys model.fc.1.*);
    efficientnet_b0 keeps torchvision's classifier (Dropout p, Linear); convnext_tiny keeps
    torchvision's LayerNorm2d/Flatten/Linear with an optional dropout before the Linear.
    """

    def __init__(self, arch: str, num_classes: int = 5, pretrained: bool = False, dropout: float = 0.0):
        super().__init__()
        self.arch = arch
        if arch == "resnet18":
            m = torchvision_model(arch, pretrained, **({} if pretrained else {"num_classes": num_classes}))
            fc = m.fc if not pretrained else nn.Linear(512, num_classes)
            m.fc = nn.Sequential(nn.Dropout(dropout), fc)
            self.BACKBONE = tuple(f"model.{n}" for n in ("conv1", "bn1", "layer1", "layer2", "layer3", "layer4"))
        elif arch == "efficientnet_b0":
            m = torchvision_model(arch, pretrained, dropout=dropout, stochastic_depth_prob=0.2,
                                  **({} if pretrained else {"num_classes": num_classes}))
            if pretrained:
                m.classifier[1] = nn.Linear(m.classifier[1].in_features, num_classes)
            self.BACKBONE = ("model.features",)
        elif arch == "convnext_tiny":
            m = torchvision_model(arch, pretrained, stochastic_depth_prob=0.1,
                                  **({} if pretrained else {"num_classes": num_classes}))
            if pretrained:
                m.classifier[2] = nn.Linear(m.classifier[2].in_features, num_classes)
            self.head_drop = nn.Dropout(dropout)
            self.BACKBONE = ("model.features",)
        else:
            raise ValueError(arch)
        self.model = m

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        if self.arch == "resnet18":
            return _resnet_trunk(self.model, x)
        return self.model.features(x)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        m = self.model
        if self.arch == "resnet18":
            return m.fc(_flat_gap(features))
        if self.arch == "efficientnet_b0":
            return m.classifier(_flat_gap(features))
        x = m.classifier[1](m.classifier[0](m.avgpool(features)))  # LayerNorm2d, Flatten
        return m.classifier[2](self.head_drop(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


# ---------------------------------------------------------------- CBAM
class ChannelAttention(nn.Module):
    """avg- and max-pooled descriptors through one shared 1x1-conv MLP, summed, sigmoid."""

    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        self.mlp = nn.Sequential(nn.Conv2d(channels, channels // reduction, 1, bias=False),
                                 nn.ReLU(inplace=True),
                                 nn.Conv2d(channels // reduction, channels, 1, bias=False))

    def forward(self, x):
        a = self.mlp(F.adaptive_avg_pool2d(x, 1)) + self.mlp(F.adaptive_max_pool2d(x, 1))
        return x * torch.sigmoid(a)


class SpatialAttention(nn.Module):
    """[channel mean, channel max] -> 7x7 conv (no bias) -> BN(1) -> sigmoid."""

    def __init__(self, kernel_size: int = 7):
        super().__init__()
        self.conv = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2, bias=False)
        self.bn = nn.BatchNorm2d(1)

    def forward(self, x):
        s = torch.cat([x.mean(1, keepdim=True), x.amax(1, keepdim=True)], 1)
        return x * torch.sigmoid(self.bn(self.conv(s)))


class CBAM(nn.Module):
    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        self.channel = ChannelAttention(channels, reduction)
        self.spatial = SpatialAttention()

    def forward(self, x):
        return self.spatial(self.channel(x))


class ResNet18CBAM(FreezableModel):
    """ResNet18 with CBAM after layer3 (256 ch) and layer4 (512 ch); GAP, Dropout, Linear(512, n).
    Layers sit at the top level (conv1.*, layer1.*, cbam3.*, fc.*) like the original."""

    BACKBONE = ("conv1", "bn1", "layer1", "layer2", "layer3", "cbam3", "layer4", "cbam4")

    def __init__(self, num_classes: int = 5, pretrained: bool = False, dropout: float = 0.5):
        super().__init__()
        r = torchvision_model("resnet18", pretrained)
        self.conv1, self.bn1, self.relu, self.maxpool = r.conv1, r.bn1, r.relu, r.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = r.layer1, r.layer2, r.layer3, r.layer4
        self.cbam3 = CBAM(256)
        self.cbam4 = CBAM(512)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(512, num_classes)

    def forward_features(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.cbam3(self.layer3(self.layer2(self.layer1(x))))
        return self.cbam4(self.layer4(x))

    def forward_head(self, features):
        return self.fc(self.dropout(_flat_gap(features)))

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


# ---------------------------------------------------------------- HD-CNN
class HDCNN(FreezableModel):
    """Hierarchical Deep CNN: ResNet18 conv1..layer2 shared, then two independent copies of
    layer3+layer4: a coarse branch (normal vs defect, 2 logits) and a fine branch (5 logits).

    forward(x) -> (coarse_logits (B,2), fine_logits (B,5)); train with HDCNNLoss.
    The final class is decided by hdcnn_decision (also self.predict / self.probabilities):
      1. coarse argmax picks the group: 0 -> normal {0, 2}, 1 -> defect {1, 3, 4} (tie -> normal);
      2. within that group, the class with the highest fine probability wins.
    """

    BACKBONE = ("conv1", "bn1", "layer1", "layer2")  # the shared trunk

    def __init__(self, num_classes: int = 5, pretrained: bool = False, dropout: float = 0.5):
        super().__init__()
        if num_classes != len(CLASS_NAMES):
            raise UserError(f"hdcnn needs the {len(CLASS_NAMES)} battery classes, got num_classes={num_classes}")
        r = torchvision_model("resnet18", pretrained)
        self.conv1, self.bn1, self.relu, self.maxpool = r.conv1, r.bn1, r.relu, r.maxpool
        self.layer1, self.layer2 = r.layer1, r.layer2
        self.layer3_c, self.layer4_c = copy.deepcopy(r.layer3), copy.deepcopy(r.layer4)
        self.layer3_f, self.layer4_f = copy.deepcopy(r.layer3), copy.deepcopy(r.layer4)
        self.fc_coarse = nn.Sequential(nn.Dropout(dropout), nn.Linear(512, 2))
        self.fc_fine = nn.Sequential(nn.Dropout(dropout), nn.Linear(512, num_classes))
        for fc in (self.fc_coarse[1], self.fc_fine[1]):
            nn.init.kaiming_normal_(fc.weight)
            nn.init.zeros_(fc.bias)

    def forward_features(self, x):
        x = self.layer2(self.layer1(self.maxpool(self.relu(self.bn1(self.conv1(x))))))
        return self.layer4_c(self.layer3_c(x)), self.layer4_f(self.layer3_f(x))

    def forward_head(self, features):
        coarse, fine = features
        return self.fc_coarse(_flat_gap(coarse)), self.fc_fine(_flat_gap(fine))

    def forward(self, x):
        return self.forward_head(self.forward_features(x))

    @staticmethod
    def probabilities(outputs) -> torch.Tensor:
        """5-class probabilities from forward's (coarse, fine); argmax agrees with predict."""
        return hdcnn_decision(*outputs)[1]

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Class indices (B,) by the rule in the class docstring (call model.eval() first)."""
        return hdcnn_decision(*self(x))[0]


def hdcnn_decision(coarse_logits: torch.Tensor, fine_logits: torch.Tensor):
    """(pred, probs) for HD-CNN outputs.

    pred: coarse argmax chooses normal {0,2} or defect {1,3,4} (a tie counts as normal); the fine
    head's most probable class inside that group is the answer.
    probs (B,5), for metrics/ROC: inside each group the fine probabilities are rescaled so that the
    group's best class gets the coarse probability of its group and the others keep their fine
    probability ratio to it; then everything is normalised to sum 1. So argmax(probs) == pred
    (except at an exact coarse tie) and the within-group ranking follows the fine head.
    """
    pc = coarse_logits.float().softmax(1)
    fine = fine_logits.float()
    groups = []
    for g, idx in enumerate((NORMAL_CLASSES, DEFECT_CLASSES)):
        idx = torch.tensor(idx, device=fine.device)
        lg = fine.index_select(1, idx)
        best = idx[lg.argmax(1)]
        rel = torch.exp(lg - lg.amax(1, keepdim=True))  # fine prob / best fine prob in the group
        groups.append((idx, best, pc[:, g:g + 1] * rel))
    (n_idx, n_best, n_s), (d_idx, d_best, d_s) = groups
    pred = torch.where(pc.argmax(1) == 1, d_best, n_best)
    s = torch.zeros_like(fine)
    s[:, n_idx] = n_s
    s[:, d_idx] = d_s
    return pred, s / s.sum(1, keepdim=True)


class HDCNNLoss(nn.Module):
    """coarse_weight * CE(coarse, is_defect) + fine_weight * CE(fine, y) over defect samples only.

    is_defect = y in {1,3,4}. class_weights (5) weight the fine CE, coarse_class_weights (2) the
    coarse CE; label_smoothing applies to both. The fine term is a weighted mean over the defect
    samples (the same as F.cross_entropy on that subset) and is exactly 0 for a batch without
    defect samples, so the loss stays finite.
    """

    def __init__(self, class_weights=None, coarse_class_weights=None, label_smoothing: float = 0.0,
                 coarse_weight: float = 1.0, fine_weight: float = 1.0):
        super().__init__()
        w = torch.ones(len(CLASS_NAMES)) if class_weights is None else \
            torch.as_tensor(class_weights, dtype=torch.float32)
        self.register_buffer("class_weights", w, persistent=False)
        cw = None if coarse_class_weights is None else torch.as_tensor(coarse_class_weights, dtype=torch.float32)
        self.register_buffer("coarse_class_weights", cw, persistent=False)
        is_defect = torch.zeros(len(CLASS_NAMES), dtype=torch.bool)
        is_defect[list(DEFECT_CLASSES)] = True
        self.register_buffer("is_defect", is_defect, persistent=False)
        self.label_smoothing = label_smoothing
        self.coarse_weight, self.fine_weight = coarse_weight, fine_weight

    def forward(self, outputs, target: torch.Tensor) -> torch.Tensor:
        coarse_logits, fine_logits = outputs
        defect = self.is_defect[target]
        loss_c = F.cross_entropy(coarse_logits.float(), defect.long(), weight=self.coarse_class_weights,
                                 label_smoothing=self.label_smoothing)
        ce = F.cross_entropy(fine_logits.float(), target, weight=self.class_weights,
                             label_smoothing=self.label_smoothing, reduction="none")
        mask = defect.float()
        loss_f = (ce * mask).sum() / (self.class_weights[target] * mask).sum().clamp_min(1e-12)
        return self.coarse_weight * loss_c + self.fine_weight * loss_f


class FocalLoss(nn.Module):
    """The focal loss of the original train.py, with label smoothing folded into the target:

        t   = onehot(y) * (1 - eps) + eps / C
        p_t = clamp(sum_c softmax_c * t_c, 1e-6, 1 - 1e-6)
        ce  = -sum_c t_c * log_softmax_c
        loss = mean_batch( alpha[y] * (1 - p_t)^gamma * ce )

    alpha: per-class weights (C,) or None (all 1). With gamma=0, eps=0 and no alpha this is
    F.cross_entropy. (train_late_fusion.py's variant, pt = exp(-ce), differs once eps > 0.)
    """

    def __init__(self, alpha=None, gamma: float = 2.0, label_smoothing: float = 0.0):
        super().__init__()
        a = None if alpha is None else torch.as_tensor(alpha, dtype=torch.float32)
        self.register_buffer("alpha", a, persistent=False)
        self.gamma, self.label_smoothing = gamma, label_smoothing

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        n = logits.shape[1]
        t = F.one_hot(target, n).float() * (1.0 - self.label_smoothing) + self.label_smoothing / n
        log_p = F.log_softmax(logits, 1)
        p_t = (log_p.exp() * t).sum(1).clamp(1e-6, 1.0 - 1e-6)
        ce = -(t * log_p).sum(1)
        loss = (1.0 - p_t).pow(self.gamma) * ce
        if self.alpha is not None:
            loss = self.alpha[target] * loss
        return loss.mean()


# ---------------------------------------------------------------- Late fusion
class LateFusion(FreezableModel):
    """ResNet18 GAP features (512) concatenated with 2 raw metadata floats (battery_type: 0 cell /
    1 module; axis: 0 x / 1 y / 2 z) -> MLP 514 -> 256 -> 128 -> n.

    forward(image, metadata=None): metadata (B,2); None means zeros.
    """

    BACKBONE = ("backbone",)

    def __init__(self, num_classes: int = 5, pretrained: bool = False, dropout: float = 0.5,
                 num_metadata: int = 2):
        super().__init__()
        self.num_metadata = num_metadata
        self.backbone = torchvision_model("resnet18", pretrained)
        self.backbone.fc = nn.Identity()
        self.classifier = nn.Sequential(
            nn.Linear(512 + num_metadata, 256), nn.BatchNorm1d(256), nn.ReLU(inplace=True), nn.Dropout(dropout),
            nn.Linear(256, 128), nn.BatchNorm1d(128), nn.ReLU(inplace=True), nn.Dropout(dropout / 2),
            nn.Linear(128, num_classes))
        for m in self.classifier.modules():
            if isinstance(m, nn.Linear):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm1d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        # The original's Kaiming fan_out, nonlinearity relu, is harmless before a BatchNorm but not on the
        # output layer: nn.Linear's fan_out is its 5 outputs, so the logits start with a std of ~5 and the
        # first loss is ~7 instead of log(5) = 1.6 (confidently wrong at random). The logits layer gets
        # the fan_in (LeCun) scale of a linear output instead: std 1/sqrt(128).
        last = self.classifier[-1]
        nn.init.normal_(last.weight, std=last.in_features ** -0.5)

    def forward_features(self, image):
        return _resnet_trunk(self.backbone, image)

    def forward_head(self, features, metadata=None):
        f = _flat_gap(features)
        if metadata is None:
            metadata = f.new_zeros(f.shape[0], self.num_metadata)
        return self.classifier(torch.cat([f, metadata.to(f.dtype)], 1))

    def forward(self, image, metadata=None):
        return self.forward_head(self.forward_features(image), metadata)


# ---------------------------------------------------------------- "DRN+ASPP" (really ResNet50, OS 16)
class SeparableConv(nn.Module):
    """depthwise 3x3 (dilated) -> pointwise 1x1 -> BN -> ReLU."""

    def __init__(self, cin: int, cout: int, dilation: int = 1):
        super().__init__()
        self.depthwise = nn.Conv2d(cin, cin, 3, padding=dilation, dilation=dilation, groups=cin, bias=False)
        self.pointwise = nn.Conv2d(cin, cout, 1, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        return self.relu(self.bn(self.pointwise(self.depthwise(x))))


class SeparableASPP(nn.Module):
    """1x1 branch, separable atrous branches, image pooling without BN (batch 1 trains), fuse."""

    def __init__(self, cin: int = 2048, cout: int = 256, rates=(6, 12, 18), dropout: float = 0.5):
        super().__init__()
        self.conv1x1 = nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))
        self.atrous = nn.ModuleList(SeparableConv(cin, cout, r) for r in rates)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(cin, cout, 1), nn.ReLU(inplace=True))
        self.project = nn.Sequential(nn.Conv2d(cout * (len(rates) + 2), cout, 1, bias=False),
                                     nn.BatchNorm2d(cout), nn.ReLU(inplace=True), nn.Dropout(dropout))

    def forward(self, x):
        pooled = self.pool(x).expand(-1, -1, x.shape[-2], x.shape[-1])  # = upsampling a 1x1 map
        return self.project(torch.cat([self.conv1x1(x), *(b(x) for b in self.atrous), pooled], 1))


class DRNASPPClassifier(FreezableModel):
    """torchvision ResNet50 with a dilated layer4 (output stride 16), separable ASPP (rates 6/12/18)
    on layer4, low-level layer1 features (256 -> 48), bilinear upsampling (align_corners=False),
    two separable 3x3 convs (304 -> 256 -> 256), GAP, Dropout, Linear(256, n).
    forward_features returns the decoder map (B,256,H/4,W/4). freeze_stem freezes conv1/bn1/layer1.
    """

    BACKBONE = ("backbone",)
    STEM = ("backbone.conv1", "backbone.bn1", "backbone.layer1")

    def __init__(self, num_classes: int = 5, pretrained: bool = False, dropout: float = 0.5):
        super().__init__()
        self.backbone = torchvision_model("resnet50", pretrained, replace_stride_with_dilation=[False, False, True])
        self.backbone.fc = nn.Identity()
        self.low_level = nn.Sequential(nn.Conv2d(256, 48, 1, bias=False), nn.BatchNorm2d(48), nn.ReLU(inplace=True))
        self.aspp = SeparableASPP(2048, 256, (6, 12, 18), dropout=0.5)
        self.decoder = nn.Sequential(SeparableConv(304, 256), SeparableConv(256, 256))
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(256, num_classes)

    def forward_features(self, x):
        b = self.backbone
        low = b.layer1(b.maxpool(b.relu(b.bn1(b.conv1(x)))))
        x = self.aspp(b.layer4(b.layer3(b.layer2(low))))
        x = F.interpolate(x, size=low.shape[-2:], mode="bilinear", align_corners=False)
        return self.decoder(torch.cat([x, self.low_level(low)], 1))

    def forward_head(self, features):
        return self.classifier(self.dropout(_flat_gap(features)))

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


# ---------------------------------------------------------------- DeepLabV3+ (pytorch-deeplab-xception port)
# Attribute names follow the original code so that its checkpoints load key for key
# (SynchronizedBatchNorm2d has the same state names as nn.BatchNorm2d).
class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample=None, dilation: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + identity)


def _conv_layers(cin: int, cout: int, convs: int, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    mods = []
    for i in range(convs):
        mods += [nn.Conv2d(cin if i == 0 else cout, cout, 3, stride=stride if i == 0 else 1,
                           padding=dilation, dilation=dilation, bias=False),
                 nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
    return nn.Sequential(*mods)


class DRN(nn.Module):
    """DRN-D-54: layers [1,1,3,4,6,3,1,1], channels (16,32,64,128,256,512,512,512), output stride 8.
    forward(x) -> (x (B,512,H/8,W/8), low_level_feat = layer3 output (B,256,H/4,W/4))."""

    def __init__(self, layers=(1, 1, 3, 4, 6, 3, 1, 1), channels=(16, 32, 64, 128, 256, 512, 512, 512)):
        super().__init__()
        self.inplanes = channels[0]
        self.layer0 = nn.Sequential(nn.Conv2d(3, channels[0], 7, padding=3, bias=False),
                                    nn.BatchNorm2d(channels[0]), nn.ReLU(inplace=True))
        self.layer1 = _conv_layers(channels[0], channels[0], layers[0])
        self.layer2 = _conv_layers(channels[0], channels[1], layers[1], stride=2)
        self.inplanes = channels[1]
        self.layer3 = self._make_layer(channels[2], layers[2], stride=2)
        self.layer4 = self._make_layer(channels[3], layers[3], stride=2)
        self.layer5 = self._make_layer(channels[4], layers[4], dilation=2)
        self.layer6 = self._make_layer(channels[5], layers[5], dilation=4)
        self.layer7 = _conv_layers(self.inplanes, channels[6], layers[6], dilation=2)
        self.layer8 = _conv_layers(channels[6], channels[7], layers[7], dilation=1)
        for m in self.modules():  # the original DRN init
            if isinstance(m, nn.Conv2d):
                n = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                m.weight.data.normal_(0, math.sqrt(2.0 / n))
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.data.fill_(1)
                m.bias.data.zero_()

    def _make_layer(self, planes: int, blocks: int, stride: int = 1, dilation: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * Bottleneck.expansion:
            downsample = nn.Sequential(nn.Conv2d(self.inplanes, planes * 4, 1, stride=stride, bias=False),
                                       nn.BatchNorm2d(planes * 4))
        blocks_ = [Bottleneck(self.inplanes, planes, stride, downsample, dilation)]
        self.inplanes = planes * 4
        blocks_ += [Bottleneck(self.inplanes, planes, dilation=dilation) for _ in range(1, blocks)]
        return nn.Sequential(*blocks_)

    def forward(self, x):
        x = self.layer3(self.layer2(self.layer1(self.layer0(x))))
        low_level_feat = x
        x = self.layer8(self.layer7(self.layer6(self.layer5(self.layer4(x)))))
        return x, low_level_feat


def _kaiming_init(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight)
        elif isinstance(m, nn.BatchNorm2d):
            m.weight.data.fill_(1)
            m.bias.data.zero_()


class _ASPPModule(nn.Module):
    def __init__(self, inplanes: int, planes: int, kernel_size: int, padding: int, dilation: int):
        super().__init__()
        self.atrous_conv = nn.Conv2d(inplanes, planes, kernel_size, padding=padding, dilation=dilation, bias=False)
        self.bn = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        return self.relu(self.bn(self.atrous_conv(x)))


class ASPP(nn.Module):
    """Output stride 8: dilations 1/12/24/36, image pooling with BN, 1280 -> 256, Dropout 0.5."""

    def __init__(self, inplanes: int = 512, dilations=(1, 12, 24, 36)):
        super().__init__()
        self.aspp1 = _ASPPModule(inplanes, 256, 1, padding=0, dilation=dilations[0])
        self.aspp2 = _ASPPModule(inplanes, 256, 3, padding=dilations[1], dilation=dilations[1])
        self.aspp3 = _ASPPModule(inplanes, 256, 3, padding=dilations[2], dilation=dilations[2])
        self.aspp4 = _ASPPModule(inplanes, 256, 3, padding=dilations[3], dilation=dilations[3])
        self.global_avg_pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(inplanes, 256, 1, bias=False),
                                             nn.BatchNorm2d(256), nn.ReLU(inplace=True))
        self.conv1 = nn.Conv2d(1280, 256, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(256)
        self.relu = nn.ReLU(inplace=True)
        self.dropout = nn.Dropout(0.5)
        _kaiming_init(self)

    def forward(self, x):
        x5 = F.interpolate(self.global_avg_pool(x), size=x.shape[-2:], mode="bilinear", align_corners=True)
        x = torch.cat([self.aspp1(x), self.aspp2(x), self.aspp3(x), self.aspp4(x), x5], 1)
        return self.dropout(self.relu(self.bn1(self.conv1(x))))


class Decoder(nn.Module):
    """low-level 256 -> 48, concat with the upsampled ASPP map (304), last_conv -> num_classes."""

    def __init__(self, num_classes: int, low_level_inplanes: int = 256):
        super().__init__()
        self.conv1 = nn.Conv2d(low_level_inplanes, 48, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(48)
        self.relu = nn.ReLU(inplace=True)
        self.last_conv = nn.Sequential(
            nn.Conv2d(304, 256, 3, padding=1, bias=False), nn.BatchNorm2d(256), nn.ReLU(inplace=True), nn.Dropout(0.5),
            nn.Conv2d(256, 256, 3, padding=1, bias=False), nn.BatchNorm2d(256), nn.ReLU(inplace=True), nn.Dropout(0.1),
            nn.Conv2d(256, num_classes, 1))
        _kaiming_init(self)

    def forward(self, x, low_level_feat):
        low = self.relu(self.bn1(self.conv1(low_level_feat)))
        x = F.interpolate(x, size=low.shape[-2:], mode="bilinear", align_corners=True)
        return self.last_conv(torch.cat([x, low], 1))


class DeepLabClassifier(FreezableModel):
    """DRN-D-54 + ASPP (output stride 8) -> GAP -> Dropout -> Linear(256, n) as `classifier`.
    The low-level feature is unused. forward_features returns the ASPP map (B,256,H/8,W/8).
    freeze_backbone freezes backbone and ASPP (requires_grad False, always eval: the image-pooling
    BN cannot train on batch size 1); then only the classifier (256*n + n parameters) trains."""

    BACKBONE = ("backbone", "aspp")

    def __init__(self, num_classes: int = 5, dropout: float = 0.5):
        super().__init__()
        self.backbone = DRN()
        self.aspp = ASPP(512, (1, 12, 24, 36))
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(256, num_classes)

    def forward_features(self, x):
        return self.aspp(self.backbone(x)[0])

    def forward_head(self, features):
        return self.classifier(self.dropout(_flat_gap(features)))

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


class DeepLabSeg(FreezableModel):
    """The original DeepLab(backbone='drn', output_stride=8): per-pixel logits (B,n,H,W), upsampled
    bilinearly (align_corners=True) to the input size. Same state_dict keys as the original.
    forward_features(x) -> ASPP map; forward_head(aspp_map, low_level_feat, size) -> logits."""

    BACKBONE = ("backbone", "aspp")

    def __init__(self, num_classes: int = 4):
        super().__init__()
        self.backbone = DRN()
        self.aspp = ASPP(512, (1, 12, 24, 36))
        self.decoder = Decoder(num_classes)

    def forward_features(self, x):
        return self.aspp(self.backbone(x)[0])

    def forward_head(self, features, low_level_feat, size):
        x = self.decoder(features, low_level_feat)
        return F.interpolate(x, size=size, mode="bilinear", align_corners=True)

    def forward(self, x):
        feat, low = self.backbone(x)
        return self.forward_head(self.aspp(feat), low, x.shape[-2:])


# ---------------------------------------------------------------- RGB autoencoder
class ConvAutoEncoder(FreezableModel):
    """Encoder 4 x [Conv4x4 s2 (no bias), BN, LeakyReLU 0.2] (+ Dropout2d after blocks 2-4),
    3 -> 64 -> 128 -> 256 -> 512; AdaptiveAvgPool 4x4 -> Linear 8192 -> latent, ReLU;
    Linear latent -> 8192, ReLU, 512x4x4, bilinear resize to the encoder map (H/16, W/16);
    decoder 3 x [ConvTranspose4x4 s2, BN, ReLU] 512 -> 64, ConvTranspose 64 -> 3 s2, Tanh.
    forward(x) -> (recon, z). H and W must be multiples of 16."""

    BACKBONE = ("encoder",)

    def __init__(self, latent_dim: int = 1024, dropout: float = 0.2):
        super().__init__()
        ch = (3, 64, 128, 256, 512)
        enc = []
        for i in range(4):
            enc += [nn.Conv2d(ch[i], ch[i + 1], 4, stride=2, padding=1, bias=False),
                    nn.BatchNorm2d(ch[i + 1]), nn.LeakyReLU(0.2, inplace=True)]
            if i > 0:
                enc.append(nn.Dropout2d(dropout))
        self.encoder = nn.Sequential(*enc)
        self.pool = nn.AdaptiveAvgPool2d(4)
        self.fc_enc = nn.Linear(512 * 16, latent_dim)
        self.fc_dec = nn.Linear(latent_dim, 512 * 16)
        dec = []
        for cin, cout in ((512, 256), (256, 128), (128, 64)):
            dec += [nn.ConvTranspose2d(cin, cout, 4, stride=2, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
        dec += [nn.ConvTranspose2d(64, 3, 4, stride=2, padding=1), nn.Tanh()]
        self.decoder = nn.Sequential(*dec)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.xavier_normal_(m.weight)
                nn.init.zeros_(m.bias)

    def forward_features(self, x):
        if x.shape[-1] % 16 or x.shape[-2] % 16:
            raise ValueError(f"autoencoder input height and width must be multiples of 16, got {tuple(x.shape[-2:])}")
        return self.encoder(x)

    def forward_head(self, features):
        pooled = _adaptive_avg_pool_export(features, 4) if torch.onnx.is_in_onnx_export() else self.pool(features)
        z = F.relu(self.fc_enc(torch.flatten(pooled, 1)))
        d = F.relu(self.fc_dec(z)).view(-1, 512, 4, 4)
        d = F.interpolate(d, size=features.shape[-2:], mode="bilinear", align_corners=False)
        return self.decoder(d), z

    def forward(self, x):
        return self.forward_head(self.forward_features(x))


def _adaptive_avg_pool_export(x: torch.Tensor, size: int) -> torch.Tensor:
    """F.adaptive_avg_pool2d(x, size) for ONNX export, where the input size is fixed: two products
    with constant averaging matrices. (The exporter maps adaptive pooling to AveragePool, which
    cannot express the unequal bins of, e.g., 6 -> 4; bin i covers [floor(i*n/m), ceil((i+1)*n/m)).)"""
    def bins(n: int) -> torch.Tensor:
        m = torch.zeros(size, n, dtype=x.dtype)
        for i in range(size):
            lo, hi = i * n // size, -(-(i + 1) * n // size)
            m[i, lo:hi] = 1.0 / (hi - lo)
        return m
    return bins(int(x.shape[-2])) @ x @ bins(int(x.shape[-1])).T


def anomaly_score(x: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
    """Per-image mean squared reconstruction error over C, H, W: (B,)."""
    return (x.float() - recon.float()).pow(2).flatten(1).mean(1)


# ---------------------------------------------------------------- build_model
def build_model(name: str, num_classes: int | None = None, pretrained: bool = False,
                dropout: float | None = None, freeze_backbone: bool = False,
                freeze_stem: bool = False) -> nn.Module:
    """Build one of MODEL_NAMES.

    num_classes: 5 by default (4 for deeplab_seg, ignored by ae). dropout: the head dropout, None
    for the model's default (resnet18/cbam/hdcnn/late_fusion/drn_aspp/deeplab 0.5, efficientnet_b0
    0.2, convnext_tiny 0, ae's Dropout2d 0.2). pretrained: torchvision ImageNet weights from the local
    cache (resnet18-based models, efficientnet_b0, convnext_tiny, drn_aspp's ResNet50); DeepLab
    weights come from scripts/convert_deeplab.py + load_converted instead.
    freeze_backbone: everything but the head is frozen and kept in eval mode (DeepLab: backbone +
    ASPP; hdcnn: the shared trunk). freeze_stem (drn_aspp only): conv1, bn1, layer1.
    """
    if name not in MODEL_NAMES:
        raise UserError(f"unknown model {name!r}; choose one of {', '.join(MODEL_NAMES)}")
    if num_classes is None:
        num_classes = 4 if name == "deeplab_seg" else len(CLASS_NAMES)
    if pretrained and name in ("deeplabv3", "deeplab_seg", "ae"):
        hint = ("convert a pytorch-deeplab-xception checkpoint with scripts/convert_deeplab.py and load it "
                "with battery_ct.model.load_converted" if name != "ae" else "train it on normal images")
        raise UserError(f"{name} has no torchvision pretrained weights: {hint}")
    if freeze_stem and name != "drn_aspp":
        raise UserError("freeze_stem applies to drn_aspp only")

    def p(default):
        return default if dropout is None else dropout

    if name in ("resnet18", "efficientnet_b0", "convnext_tiny"):
        model = TorchvisionClassifier(name, num_classes, pretrained,
                                      p({"resnet18": 0.5, "efficientnet_b0": 0.2, "convnext_tiny": 0.0}[name]))
    elif name == "cbam":
        model = ResNet18CBAM(num_classes, pretrained, p(0.5))
    elif name == "hdcnn":
        model = HDCNN(num_classes, pretrained, p(0.5))
    elif name == "late_fusion":
        model = LateFusion(num_classes, pretrained, p(0.5))
    elif name == "drn_aspp":
        model = DRNASPPClassifier(num_classes, pretrained, p(0.5))
    elif name == "deeplabv3":
        model = DeepLabClassifier(num_classes, p(0.5))
    elif name == "deeplab_seg":
        model = DeepLabSeg(num_classes)
    else:
        model = ConvAutoEncoder(dropout=p(0.2))
    if freeze_backbone:
        model.freeze(*model.BACKBONE)
    if freeze_stem:
        model.freeze(*model.STEM)
    return model


# ---------------------------------------------------------------- converted DeepLab weights
def describe_key_mismatch(missing, unexpected, wrong_shape, shown: int = 5) -> str:
    parts = []
    for what, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong_shape)):
        if keys:
            more = f" (+{len(keys) - shown} more)" if len(keys) > shown else ""
            parts.append(f"{len(keys)} {what}: {', '.join(keys[:shown])}{more}")
    return "; ".join(parts)


def fuse_for_inference(model: nn.Module) -> nn.Module:
    """An inference-only copy: every Conv2d + BatchNorm2d pair folded into one conv (torch.fx) and
    channels_last weights. Same outputs up to float rounding; call it like the model (forward only).
    Worth it on GPUs; on an AVX2 CPU the DeepLab convolutions dominate and it gains ~8%."""
    from torch.fx.experimental.optimization import fuse
    return fuse(copy.deepcopy(model).eval()).to(memory_format=torch.channels_last)


def load_converted(model: nn.Module, path) -> dict:
    """Load a state_dict written by scripts/convert_deeplab.py (or any plain state_dict).

    Strict, except that for DeepLabClassifier `classifier.*` may be absent (it keeps its fresh
    initialisation: a --task classify file holds only the 378 backbone + ASPP tensors) and
    `decoder.*` tensors of a --task segment file are ignored. Returns
    {'loaded': [...], 'kept_init': [...], 'ignored': [...]}; any other mismatch is a UserError.
    """
    sd = state_dict_from(load_untrusted(path), path)
    own = model.state_dict()
    classifier = isinstance(model, DeepLabClassifier)
    kept_init = [k for k in own if k not in sd and classifier and k.startswith("classifier.")]
    ignored = [k for k in sd if k not in own and classifier and k.startswith("decoder.")]
    missing = [k for k in own if k not in sd and k not in kept_init]
    unexpected = [k for k in sd if k not in own and k not in ignored]
    wrong = [k for k in own if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong:
        raise UserError(f"{path}: weights do not fit {type(model).__name__} "
                        f"({describe_key_mismatch(missing, unexpected, wrong)})")
    loaded = [k for k in own if k in sd]
    model.load_state_dict({k: sd[k] for k in loaded}, strict=False)
    return {"loaded": loaded, "kept_init": kept_init, "ignored": ignored}
