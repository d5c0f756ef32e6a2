"""DistributedDataParallel under torchrun: one process per GPU (nccl) or per CPU slot (gloo)."""

from __future__ import annotations

import dataclasses
import os

import torch
import torch.distributed as dist


@dataclasses.dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    #: where this rank's collectives live: NCCL has no CPU backend, so flags and values go on the GPU there
    device: torch.device = dataclasses.field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device_kind: str) -> DistContext:
    """Join the process group torchrun describes in the environment; a no-op without torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cpu")
    if device_kind == "cuda":
        torch.cuda.set_device(local_rank)  # else every rank's NCCL communicator and caches land on GPU 0
        device = torch.device("cuda", local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_kind == "cuda" else "gloo")
    return DistContext(rank, world, local_rank, device)


def barrier(ctx: DistContext) -> None:
    if ctx.enabled:
        dist.barrier()


def broadcast_flag(ctx: DistContext, flag: bool) -> bool:
    """Rank 0 decides (e.g. the time budget ran out); every rank follows."""
    if not ctx.enabled:
        return flag
    tensor = torch.tensor([1 if flag else 0], dtype=torch.int32, device=ctx.device)
    dist.broadcast(tensor, src=0)
    return bool(tensor.item())


def ranks_where(ctx: DistContext, flag: bool) -> list:
    """The ranks on which `flag` holds, known to every rank (e.g. a non-finite loss), so all stop together."""
    if not ctx.enabled:
        return [0] if flag else []
    tensor = torch.zeros(ctx.world_size, dtype=torch.int32, device=ctx.device)
    tensor[ctx.rank] = 1 if flag else 0
    dist.all_reduce(tensor)
    return [rank for rank, value in enumerate(tensor.tolist()) if value]


def gather_objects(ctx: DistContext, obj) -> list:
    """Every rank's `obj` (plain data), in rank order, on every rank."""
    if not ctx.enabled:
        return [obj]
    out: list = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_values(ctx: DistContext, values: list) -> list:
    """Rank 0's numbers (e.g. validation scores) on every rank, so per-rank decisions stay identical."""
    if not ctx.enabled:
        return values
    tensor = torch.tensor([float(v) for v in values], dtype=torch.float64, device=ctx.device)
    dist.broadcast(tensor, src=0)
    return tensor.tolist()


def cleanup(ctx: DistContext) -> None:
    if ctx.enabled and dist.is_initialized():
        dist.destroy_process_group()
