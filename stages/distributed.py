"""torchrun support: process group set-up, rank queries, DDP wrapping. A no-op in a single process."""
from __future__ import annotations

import os

import torch
import torch.distributed as td


def world_size() -> int:
    return td.get_world_size() if td.is_initialized() else 1


def rank() -> int:
    return td.get_rank() if td.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def setup(device: torch.device) -> None:
    """Join the process group torchrun describes in the environment (gloo on CPU, nccl on GPU)."""
    if td.is_initialized() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    td.init_process_group("nccl" if device.type == "cuda" else "gloo")


def wrap(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    setup(device)
    model.to(device)
    if world_size() == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index or 0] if device.type == "cuda" else None)


def broadcast_buffers(model: torch.nn.Module) -> None:
    """Give every rank rank 0's buffers (BatchNorm statistics, which each rank updates from its own shard)."""
    if world_size() == 1:
        return
    for b in model.buffers():
        td.broadcast(b, src=0)


def gather_objects(obj) -> list:
    if world_size() == 1:
        return [obj]
    out = [None] * world_size()
    td.all_gather_object(out, obj)
    return out


def any_rank(flag: bool) -> bool:
    """True on every rank if `flag` is True on any (so all ranks stop at the same step)."""
    if world_size() == 1:
        return flag
    t = torch.tensor([float(flag)])
    td.all_reduce(t, op=td.ReduceOp.MAX)
    return bool(t.item())


def mean(x: torch.Tensor) -> torch.Tensor:
    """The mean of a scalar over ranks (for logging, and so a non-finite loss stops every rank)."""
    if world_size() == 1:
        return x
    t = x.detach().float().cpu().reshape(1)
    td.all_reduce(t)
    return t[0] / world_size()


def all_gather(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` from every rank along dim 0 (no gradient)."""
    if world_size() == 1:
        return x
    out = [torch.empty_like(x) for _ in range(world_size())]
    td.all_gather(out, x.contiguous())
    return torch.cat(out)


class _AllGatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums the gradient over ranks and returns this rank's slice."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return all_gather(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        td.all_reduce(grad)
        n = grad.shape[0] // world_size()
        return grad[rank() * n : (rank() + 1) * n]


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` (same shape on every rank) from every rank along dim 0, keeping the gradient path
    (open_clip's gather_with_grad): every rank then computes the loss of the global batch."""
    return x if world_size() == 1 else _AllGatherWithGrad.apply(x)
