"""torchrun support: process-group setup from the environment, rank-0 helpers, reductions.

Every task's train.py calls `init_distributed()`; under plain `python` it returns a
single-process DistInfo and every helper here becomes a no-op.
"""
from __future__ import annotations

import hashlib
import os
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist

from common.io import UserError


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


def wrap_model(model: torch.nn.Module, device: torch.device, info: DistInfo,
               channels_last: bool = False) -> torch.nn.Module:
    """DistributedDataParallel under torchrun, the model itself otherwise.

    Parameters with requires_grad=False (frozen layers, or weights a model keeps only for its
    checkpoints' names and never uses) are not reduced, so they need no find_unused_parameters;
    DDP still copies them from rank 0 once here, as it does every parameter and buffer.
    `channels_last` converts the parameters before DDP lays out its gradient buckets (after it, every
    gradient would be copied into buckets of the other layout).
    """
    if channels_last:
        model.to(memory_format=torch.channels_last)
    if not info.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP
    # DDP compares each gradient's strides with its bucket's in every dimension, size-1 ones included,
    # which autograd's layout contract ignores: a (C, 1, 3, 3) depthwise weight's gradient comes back
    # with stride 1 where the weight has 9, a channels_last (1, 2, 1, 1) weight's contiguous. Harmless
    # (one small copy). The case that costs, parameters converted to channels_last after wrapping, is
    # prevented above, so the warning would only ever report the harmless one.
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
    ids = [device.index] if device.type == "cuda" else None
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


def all_gather_cat(t: torch.Tensor | list[torch.Tensor], info: DistInfo) -> torch.Tensor:
    """Concatenate tensors of possibly different lengths (dim 0) from every process, rank order.

    `t` may be a list of this process's batch results (concatenated first): under torchrun a
    process gets no validation sample at all when the set is smaller than the number of
    processes, and its empty list then adds nothing."""
    if isinstance(t, (list, tuple)):
        t = torch.cat(list(t)) if t else None
    if not info.enabled:
        if t is None:
            raise ValueError("all_gather_cat: no tensors to concatenate")
        return t
    parts: list = [None] * info.world_size
    dist.all_gather_object(parts, None if t is None else t.detach().cpu())
    parts = [p for p in parts if p is not None]
    if not parts:
        raise ValueError("all_gather_cat: no process had tensors to concatenate")
    return torch.cat(parts)


def sync_buffers(model: torch.nn.Module, info: DistInfo) -> None:
    """Give every process rank 0's buffers (BatchNorm running statistics). DDP sends them at the
    start of each training forward, after which each process updates its own from its own batch;
    without this every rank would evaluate a slightly different model than the one rank 0 saves."""
    if not info.enabled:
        return
    for b in getattr(model, "module", model).buffers():
        dist.broadcast(b, src=0)


class ReplicasDiverged(UserError):
    """The processes of a torchrun job ended training with different weights."""


def tensor_digests(tensors: dict[str, torch.Tensor]) -> dict[str, str]:
    """A hash of each tensor's exact values (dtype, shape and bytes; the memory layout aside)."""
    out = {}
    for name, t in tensors.items():
        t = t.detach().cpu().contiguous()
        h = hashlib.blake2b(f"{t.dtype} {tuple(t.shape)}".encode(), digest_size=16)
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        out[name] = h.hexdigest()
    return out


def disagreeing(digests: list[dict[str, str]]) -> list[str]:
    """The tensor names whose digests differ between processes (or that some process lacks)."""
    names = set().union(*digests)
    return sorted(n for n in names if len({d.get(n) for d in digests}) > 1)


def check_replicas(model: torch.nn.Module, info: DistInfo, optimizer: torch.optim.Optimizer | None = None) -> int:
    """A safety check at the end of training under torchrun: raise ReplicasDiverged unless every
    process holds exactly rank 0's weights and buffers (the ones saved), and the same values of
    any parameter the optimizer trains outside the model. One all_gather of a hash per tensor,
    cheap next to an epoch. Returns how many tensors were compared (0 when not distributed)."""
    if not info.enabled:
        return 0
    net = getattr(model, "module", model)
    tensors = dict(net.state_dict())
    own = {id(p) for p in net.parameters()}
    for g, group in enumerate(optimizer.param_groups if optimizer is not None else []):
        tensors.update({f"optimizer.param_groups.{g}.params.{i}": p for i, p in enumerate(group["params"])
                        if id(p) not in own})
    gathered: list = [None] * info.world_size
    dist.all_gather_object(gathered, tensor_digests(tensors))
    bad = disagreeing(gathered)
    if bad:
        raise ReplicasDiverged(
            f"the {info.world_size} processes ended training with different values in {len(bad)} of "
            f"{len(tensors)} tensors ({', '.join(bad[:5])}{', ...' if len(bad) > 5 else ''}): something "
            f"changed them outside DistributedDataParallel's gradient reduction; the checkpoints hold "
            f"rank 0's values")
    if info.is_main:
        print(f"torchrun: all {info.world_size} processes end with identical weights ({len(tensors)} tensors "
              f"compared)", flush=True)
    return len(tensors)


def cleanup(info: DistInfo) -> None:
    """End of a run that every process reached: wait for all of them, then tear down. A process that
    destroyed the group while another (rank 0 writing its summary) still held it left gloo's threads
    to abort at exit ("terminate called without an active exception", exit -6 after a good run)."""
    if info.enabled and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
