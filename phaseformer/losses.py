"""Phaseformer's training losses, with the original's defects fixed.

Per head: Charbonnier (eps 1e-3), perceptual (VGG features), Laplacian ("gradient") L1 and
1 - MS-SSIM; the 1x head against the ground truth at the input size, the 2x head against the
full-resolution ground truth resized to twice the input size (the data pipeline makes both).

Fixed against the originals:
- the official script adds +MS-SSIM (rewarding dissimilarity): here it is 1 - MS-SSIM;
- MS-SSIM with an 11-px window asserts images over 160 px: the window (or single-scale SSIM) is
  chosen from the image size instead;
- the learnable softmax weights were never given to the optimizer (frozen at their random start),
  and given to it naively they would collapse onto the smallest term: `learned` here is
  homoscedastic-uncertainty weighting (Kendall et al., CVPR 2018), whose log-variance terms keep
  every weight finite and away from zero; `fixed` is Spectroformer's 0.03/0.025/0.02/0.01;
- the perceptual loss sees ImageNet-normalised inputs (trains.py fed raw [0,1] images).
"""
from __future__ import annotations


import torch
import torch.nn as nn
import torch.nn.functional as F

TERMS = ("charbonnier", "perceptual", "laplacian", "msssim")
HEADS = ("1x", "2x")
FIXED_WEIGHTS = {"charbonnier": 0.03, "perceptual": 0.025, "laplacian": 0.02, "msssim": 0.01}  # Spectroformer
MSSSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
# VGG features: trains.py's VGG19 features[:35] (conv5_4 before its ReLU); the official utils.py's
# VGG16 relu1_2, relu2_2, relu3_3, relu4_3 on a 224x224 bilinear resize
PERCEPTUAL_VARIANTS = {"vgg19": ("vgg19", (34,), None), "vgg16": ("vgg16", (3, 8, 15, 22), (224, 224))}
LOG_VAR_BOUND = 6.0  # learned weights 0.5*exp(-s) stay within [1.2e-3, 202]


class CharbonnierLoss(nn.Module):
    def __init__(self, eps: float = 1e-3):
        super().__init__()
        self.eps = eps

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        diff = pred.float() - target.float()
        return torch.sqrt(diff * diff + self.eps * self.eps).mean()


class LaplacianLoss(nn.Module):
    """L1 between per-channel 3x3 Laplacians (valid, no padding) of prediction and target."""

    def __init__(self):
        super().__init__()
        kernel = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]])
        self.register_buffer("kernel", kernel.expand(3, 1, 3, 3).clone(), persistent=False)

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        with torch.autocast(pred.device.type, enabled=False):  # fp32: differences of nearby pixels
            lap = lambda t: F.conv2d(t.float(), self.kernel, groups=3)  # noqa: E731
            return F.l1_loss(lap(pred), lap(target))


class PerceptualLoss(nn.Module):
    """L1 between frozen VGG features of prediction and target (summed over the layers)."""

    def __init__(self, variant: str = "vgg19", weights: str | None = "imagenet"):
        super().__init__()
        from common.vgg import VGGFeatures

        if variant not in PERCEPTUAL_VARIANTS:
            raise ValueError(f"unknown perceptual variant {variant!r}")
        arch, layers, resize = PERCEPTUAL_VARIANTS[variant]
        self.variant = variant
        self.features = VGGFeatures(arch=arch, layers=layers, normalize=True, weights=weights, resize=resize)

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            target_features = self.features(target)
        return sum(F.l1_loss(p.float(), t.float()) for p, t in zip(self.features(pred), target_features))


# ---------------------------------------------------------------- (MS-)SSIM
def gaussian_window(size: int, sigma: float = 1.5) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float32) - size // 2
    g = torch.exp(-coords ** 2 / (2 * sigma ** 2))
    return g / g.sum()


def _blur(x: torch.Tensor, win: torch.Tensor) -> torch.Tensor:
    c = x.shape[1]
    x = F.conv2d(x, win.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(x, win.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def _ssim_maps(x, y, win, data_range=1.0, k=(0.01, 0.03)):
    """Per (image, channel) SSIM and contrast-structure means, 'valid' Gaussian filtering."""
    c1, c2 = (k[0] * data_range) ** 2, (k[1] * data_range) ** 2
    mu_x, mu_y = _blur(x, win), _blur(y, win)
    var_x = _blur(x * x, win) - mu_x ** 2
    var_y = _blur(y * y, win) - mu_y ** 2
    cov = _blur(x * y, win) - mu_x * mu_y
    cs = (2 * cov + c2) / (var_x + var_y + c2)
    ssim = (2 * mu_x * mu_y + c1) / (mu_x ** 2 + mu_y ** 2 + c1) * cs
    return ssim.flatten(2).mean(-1), cs.flatten(2).mean(-1)


def msssim_window(side: int, levels: int = len(MSSSIM_WEIGHTS)) -> int | None:
    """The largest of 11/9/7/5/3 whose 5-scale MS-SSIM fits an image with this smaller side
    (side > (window-1) * 2**(levels-1)), or None when none does."""
    for window in (11, 9, 7, 5, 3):
        if side > (window - 1) * 2 ** (levels - 1):
            return window
    return None


def ssim_window(side: int) -> int:
    """Single-scale fallback: 11 px, or the largest odd window the image holds."""
    return min(11, side if side % 2 else side - 1)


def ms_ssim(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0, window: int | None = None) -> torch.Tensor:
    """MS-SSIM per image, in fp32: pytorch-msssim's definition (5 scales, Gaussian sigma 1.5,
    'valid' filtering, cs and ssim clamped at 0), except that the window defaults to
    msssim_window(smaller side) and images too small for 5 scales get single-scale SSIM.
    """
    with torch.autocast(x.device.type, enabled=False):
        x, y = x.float(), y.float()
        side = min(x.shape[-2:])
        window = window or msssim_window(side)
        if window is None:
            win = gaussian_window(ssim_window(side)).to(x.device)
            return _ssim_maps(x, y, win, data_range)[0].mean(1)
        win = gaussian_window(window).to(x.device)
        weights = torch.tensor(MSSSIM_WEIGHTS, device=x.device)
        factors = []
        for level in range(len(MSSSIM_WEIGHTS)):
            ssim, cs = _ssim_maps(x, y, win, data_range)
            if level < len(MSSSIM_WEIGHTS) - 1:
                factors.append(torch.relu(cs))
                padding = [s % 2 for s in x.shape[2:]]
                x = F.avg_pool2d(x, kernel_size=2, padding=padding)
                y = F.avg_pool2d(y, kernel_size=2, padding=padding)
        factors.append(torch.relu(ssim))
        value = torch.prod(torch.stack(factors) ** weights.view(-1, 1, 1), dim=0)  # (batch, channel)
        return value.mean(1)


class MSSSIMLoss(nn.Module):
    """1 - MS-SSIM (the official Phaseformer script added +MS-SSIM, rewarding dissimilarity)."""

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return 1.0 - ms_ssim(pred, target).mean()


# ---------------------------------------------------------------- weighting
class FixedWeighting(nn.Module):
    """Spectroformer's weights per term; the two heads count equally."""

    def __init__(self, keys: list[tuple[str, str]]):
        super().__init__()
        self.keys = list(keys)
        self.head_share = 1.0 / len({h for h, _ in keys})

    def weights(self) -> dict[tuple[str, str], float]:
        return {(h, t): self.head_share * FIXED_WEIGHTS[t] for h, t in self.keys}

    def forward(self, losses: dict[tuple[str, str], torch.Tensor]) -> torch.Tensor:
        w = self.weights()
        return sum(w[k] * losses[k] for k in self.keys)


class UncertaintyWeighting(nn.Module):
    """Kendall, Gal & Cipolla (CVPR 2018): sum_i 0.5*exp(-s_i)*L_i + 0.5*s_i, s_i = log sigma_i^2 learned.

    For a fixed L_i the optimum is exp(-s_i) = 1/L_i: each term is scaled to unit size and no
    weight can fall to zero (the 0.5*s_i term), unlike softmax weights, whose optimum puts all mass
    on the smallest term. s is clamped to [-6, 6] so weights also stay finite as a term nears 0.
    """

    def __init__(self, keys: list[tuple[str, str]], mean_over_processes=None):
        super().__init__()
        self.keys = list(keys)
        self.log_vars = nn.Parameter(torch.zeros(len(self.keys)))
        # under torchrun: the terms' mean over all processes (the weights are not in DDP, so their
        # gradient must come from the global loss to stay identical on every process)
        self.mean_over_processes = mean_over_processes

    def clamped(self) -> torch.Tensor:
        return self.log_vars.clamp(-LOG_VAR_BOUND, LOG_VAR_BOUND)

    def weights(self) -> dict[tuple[str, str], float]:
        w = (0.5 * torch.exp(-self.clamped())).tolist()
        return dict(zip(self.keys, w))

    def forward(self, losses: dict[tuple[str, str], torch.Tensor]) -> torch.Tensor:
        s = self.clamped()
        stacked = torch.stack([losses[k].float() for k in self.keys])
        if self.mean_over_processes is None:
            return (0.5 * torch.exp(-s) * stacked + 0.5 * s).sum()
        # same value; the model's gradient from the local terms (DDP averages it), the weights'
        # gradient from the global mean of the terms
        weight = 0.5 * torch.exp(-s)
        global_terms = self.mean_over_processes(stacked.detach())
        return (weight.detach() * stacked + (weight - weight.detach()) * global_terms + 0.5 * s).sum()


class PhaseformerLoss(nn.Module):
    """Both heads' terms (or the 1x head's only: heads=("1x",), Spectroformer), combined by fixed
    or learned weights.

    forward(out_1x, out_2x, target_1x, target_2x) -> (total, {"1x_charbonnier": float, ...});
    with one head, out_2x and target_2x are ignored (pass None). With fixed weights and one head
    the total is exactly Spectroformer's 0.03/0.025/0.02/0.01 sum.
    `terms` may leave out 'perceptual' (no VGG weights available).
    """

    def __init__(self, weighting: str = "fixed", terms=TERMS, perceptual: PerceptualLoss | None = None,
                 mean_over_processes=None, heads=HEADS):
        super().__init__()
        terms = tuple(terms)
        unknown = set(terms) - set(TERMS)
        if unknown or not terms:
            raise ValueError(f"unknown loss terms {sorted(unknown)}" if unknown else "no loss terms")
        if "perceptual" in terms and perceptual is None:
            raise ValueError("the perceptual term needs a PerceptualLoss")
        self.terms = terms
        self.charbonnier = CharbonnierLoss()
        self.laplacian = LaplacianLoss()
        self.msssim = MSSSIMLoss()
        self.perceptual = perceptual if "perceptual" in terms else None
        if not heads or set(heads) - set(HEADS):
            raise ValueError(f"heads must be a subset of {HEADS} (got {heads!r})")
        self.heads = tuple(heads)
        keys = [(h, t) for h in self.heads for t in terms]
        if weighting == "fixed":
            self.weighting = FixedWeighting(keys)
        elif weighting == "learned":
            self.weighting = UncertaintyWeighting(keys, mean_over_processes)
        else:
            raise ValueError(f"weighting must be 'fixed' or 'learned' (got {weighting!r})")

    def term_losses(self, pred: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        return {t: getattr(self, t)(pred, target) for t in self.terms}

    def forward(self, out_1x, out_2x, target_1x, target_2x):
        losses = {}
        pairs = {"1x": (out_1x, target_1x), "2x": (out_2x, target_2x)}
        for head, (pred, target) in ((h, pairs[h]) for h in self.heads):
            for term, value in self.term_losses(pred, target).items():
                losses[(head, term)] = value
        total = self.weighting(losses)
        logs = {f"{h}_{t}": float(v.detach()) for (h, t), v in losses.items()}
        return total, logs

    def weights(self) -> dict[str, float]:
        return {f"w_{h}_{t}": w for (h, t), w in self.weighting.weights().items()}
