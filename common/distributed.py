"""torchrun support: process-group setup from the environment, rank-0 helpers, reductions.

Every task's train.py calls `init_distributed()`; under plain `python` it returns a
single-process DistInfo and every helper here becomes a no-op.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: torch.device) -> DistInfo:
    """Join the process group torchrun describes in RANK / WORLD_SIZE / LOCAL_RANK, if any."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    info = DistInfo(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(info.local_rank)
        dist.init_process_group(backend=backend)
    return info


def local_device(device: torch.device, info: DistInfo) -> torch.device:
    """Under torchrun each process drives the GPU of its LOCAL_RANK."""
    return torch.device("cuda", info.local_rank) if device.type == "cuda" and info.enabled else device


def wrap_model(model: torch.nn.Module, device: torch.device, info: DistInfo) -> torch.nn.Module:
    if not info.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP
    ids = [device.index] if device.type == "cuda" else None
    # frozen sub-networks (e.g. CRBL's lower layers) have no gradients to reduce
    return DDP(model, device_ids=ids, find_unused_parameters=False)


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def all_reduce_mean(value: float | torch.Tensor, info: DistInfo) -> float:
    """Mean of a scalar over all processes (plain float back)."""
    t = torch.as_tensor(value, dtype=torch.float64).detach().cpu()
    if info.enabled:
        # gloo reduces CPU tensors; nccl needs them on the GPU
        if dist.get_backend() == "nccl":
            t = t.cuda()
        dist.all_reduce(t)
        t = t / info.world_size
    return float(t)


def any_rank(flags: list[bool], info: DistInfo) -> list[bool]:
    """For each flag: is it set on any process? (one collective for all of them)"""
    t = torch.tensor([float(f) for f in flags], dtype=torch.float64)
    if info.enabled:
        if dist.get_backend() == "nccl":
            t = t.cuda()
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(v) for v in t.cpu().tolist()]


def all_gather_cat(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Concatenate tensors of possibly different lengths (dim 0) from every process, rank order."""
    if not info.enabled:
        return t
    parts = [None] * info.world_size
    dist.all_gather_object(parts, t.detach().cpu())
    return torch.cat(parts)


def cleanup(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()
