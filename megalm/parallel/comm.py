"""Tensor-parallel communication as autograd functions (Megatron's mappings).

Each forward collective has the adjoint collective as its backward:

    copy_to_tp_region      forward: identity              backward: all-reduce (sum)
    reduce_from_tp_region  forward: all-reduce (sum)      backward: identity
    scatter_to_tp_region   forward: keep own last-dim chunk backward: all-gather last dim
    gather_from_tp_region  forward: all-gather last dim   backward: keep own last-dim chunk

`group=None` means "no tensor parallelism" (every function is the identity): it never means the
world group, so a forgotten group can not silently reduce over data-parallel ranks.

`send_to`/`recv_from` (no autograd) move hidden states between pipeline stages in evaluation.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup


def group_size(group: Optional[ProcessGroup]) -> int:
    return 1 if group is None else dist.get_world_size(group)


def group_rank(group: Optional[ProcessGroup]) -> int:
    return 0 if group is None else dist.get_rank(group)


def _all_reduce(x: torch.Tensor, group: Optional[ProcessGroup]) -> torch.Tensor:
    if group_size(group) == 1:
        return x
    out = x.contiguous().clone()  # never reduce in place: x may be saved for another backward
    dist.all_reduce(out, group=group)
    return out


def _split_last(x: torch.Tensor, group: Optional[ProcessGroup]) -> torch.Tensor:
    world = group_size(group)
    if world == 1:
        return x
    if x.shape[-1] % world != 0:
        raise ValueError(f"last dimension {x.shape[-1]} is not divisible by the tensor-parallel size {world}")
    return x.chunk(world, dim=-1)[group_rank(group)].contiguous()


def gather_along_dim(x: torch.Tensor, dim: int, group: Optional[ProcessGroup]) -> torch.Tensor:
    """All-gather equal shards along `dim` (no autograd). Also used to assemble full parameters."""
    world = group_size(group)
    if world == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad, ctx.group), None


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        return _all_reduce(x, group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _ScatterToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _split_last(x, group)

    @staticmethod
    def backward(ctx, grad):
        return gather_along_dim(grad, -1, ctx.group), None


class _GatherFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return gather_along_dim(x, -1, group)

    @staticmethod
    def backward(ctx, grad):
        return _split_last(grad, ctx.group), None


def copy_to_tp_region(x: torch.Tensor, group: Optional[ProcessGroup]) -> torch.Tensor:
    """Enter a TP region with a replicated input (before a column-parallel matmul)."""
    return x if group is None else _CopyToTP.apply(x, group)


def reduce_from_tp_region(x: torch.Tensor, group: Optional[ProcessGroup]) -> torch.Tensor:
    """Leave a TP region by summing partial results (after a row-parallel matmul)."""
    return x if group is None else _ReduceFromTP.apply(x, group)


def scatter_to_tp_region(x: torch.Tensor, group: Optional[ProcessGroup]) -> torch.Tensor:
    """Split a replicated tensor's last dimension and keep this rank's chunk."""
    return x if group is None else _ScatterToTP.apply(x, group)


def gather_from_tp_region(x: torch.Tensor, group: Optional[ProcessGroup]) -> torch.Tensor:
    """Concatenate every rank's last-dimension chunk into the full tensor."""
    return x if group is None else _GatherFromTP.apply(x, group)


# Point-to-point for evaluation's pipeline stages (`megalm.eval.stages`): hidden states are already on
# the run device (the model is), which NCCL requires. Gloo sends host memory only, so under gloo (the CPU
# tests, or the GPU check's several ranks on one GPU) a device tensor goes through a host copy.
def _via_host(device: torch.device) -> bool:
    return device.type != "cpu" and dist.get_backend() == "gloo"


def send_to(x: torch.Tensor, dst: int) -> None:
    """Send `x` to global rank `dst` (blocking until it is handed over)."""
    dist.send((x.cpu() if _via_host(x.device) else x).contiguous(), dst=dst)


def recv_from(src: int, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Receive a tensor of `shape`/`dtype` sent by global rank `src`, onto `device`."""
    device = torch.device(device)
    out = torch.empty(shape, dtype=dtype, device="cpu" if _via_host(device) else device)
    dist.recv(out, src=src)
    return out.to(device)
