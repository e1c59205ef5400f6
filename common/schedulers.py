"""Learning-rate schedules the five projects use, as LambdaLR factors of each group's base lr.

torch's own CosineAnnealingWarmRestarts and ReduceLROnPlateau are used directly where a task
needs them. Each factor function is a plain function of the step/epoch index, so a scheduler's
state_dict holds only numbers and resumes exactly.
"""
from __future__ import annotations

import math
from functools import partial

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


def warmup_cosine_factor(step: int, total_steps: int, warmup_steps: int, min_factor: float = 0.0) -> float:
    """Linear warm-up (step+1)/W for step < W, then half-cosine from 1 down to min_factor at total_steps."""
    if step < warmup_steps:
        return (step + 1) / max(1, warmup_steps)
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_factor + (1.0 - min_factor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def poly_factor(step: int, total_steps: int, power: float = 0.9) -> float:
    """DeepLab 'poly': (1 - step/total)^power, 0 after the end."""
    return max(0.0, 1.0 - step / max(1, total_steps)) ** power


def linear_decay_factor(epoch: int, niter: int, niter_decay: int, epoch_count: int = 0) -> float:
    """pix2pix 'lambda' rule: constant for `niter` epochs, then linear decay over `niter_decay`."""
    return 1.0 - max(0, epoch + epoch_count - niter) / float(niter_decay + 1)


def warmup_cosine(optimizer: Optimizer, total_steps: int, warmup_steps: int, min_factor: float = 0.0) -> LambdaLR:
    """Step every batch."""
    return LambdaLR(optimizer, partial(warmup_cosine_factor, total_steps=total_steps,
                                       warmup_steps=warmup_steps, min_factor=min_factor))


def poly(optimizer: Optimizer, total_steps: int, power: float = 0.9) -> LambdaLR:
    """Step every batch. Param groups keep their ratio (e.g. 10x lr on the head)."""
    return LambdaLR(optimizer, partial(poly_factor, total_steps=total_steps, power=power))


def constant_then_linear_decay(optimizer: Optimizer, niter: int, niter_decay: int, epoch_count: int = 0) -> LambdaLR:
    """Step once per epoch, after training (trains.py's niter / niter_decay)."""
    return LambdaLR(optimizer, partial(linear_decay_factor, niter=niter, niter_decay=niter_decay,
                                       epoch_count=epoch_count))
