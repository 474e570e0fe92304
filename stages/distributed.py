"""torchrun support: process group set-up, rank queries, DDP wrapping. A no-op in a single process."""
from __future__ import annotations

import os

import torch
import torch.distributed as td

from unclip.device import resolve_device


def world_size() -> int:
    return td.get_world_size() if td.is_initialized() else 1


def rank() -> int:
    return td.get_rank() if td.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def training_device(name: str) -> torch.device:
    """Decide this process's device and join torchrun's process group, before any tensor is built
    (nanoGPT's order). Under torchrun a CUDA run takes cuda:LOCAL_RANK; the group has gloo for CPU
    tensors (flags, RNG states) and nccl for CUDA ones."""
    device = resolve_device(name)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank())
        torch.cuda.set_device(device)
    if not td.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        td.init_process_group("cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo")
    return device


def wrap(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """DDP with batch norm synchronised over ranks, so N processes of batch B/N train like one of batch B."""
    model.to(device)
    if world_size() == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    if device.type == "cuda":
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)  # replaces the children in place
    else:
        for m in model.modules():
            if type(m) is torch.nn.BatchNorm2d:
                m.__class__ = GlobalBatchNorm2d  # same parameters and buffers, statistics over all ranks
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


class _SumOverRanks(torch.autograd.Function):
    """all_reduce(SUM) whose backward sums the gradient over ranks too (each rank's loss uses the sum)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        td.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        td.all_reduce(grad)
        return grad


class GlobalBatchNorm2d(torch.nn.BatchNorm2d):
    """BatchNorm2d whose training statistics cover the global batch of every rank (torch's SyncBatchNorm
    takes GPU tensors only; this is the same computation for gloo on CPU)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or world_size() == 1:
            return super().forward(x)
        C = x.shape[1]
        count = x.new_tensor([x.numel() / C])
        stats = _SumOverRanks.apply(torch.cat([x.sum((0, 2, 3)), (x * x).sum((0, 2, 3)), count]))
        n = stats[-1]
        mean = stats[:C] / n
        var = stats[C : 2 * C] / n - mean**2  # biased, as BatchNorm normalises
        with torch.no_grad():
            self.num_batches_tracked += 1
            weight = self.momentum if self.momentum is not None else 1 / float(self.num_batches_tracked)  # cumulative
            self.running_mean.lerp_(mean.detach(), weight)
            self.running_var.lerp_(var.detach() * n / (n - 1), weight)
        shape = (1, C, 1, 1)
        x = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        return x * self.weight.view(shape) + self.bias.view(shape)


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
