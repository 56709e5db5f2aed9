"""ZeRO-3's gradient reduce-scatter without two costs DeepSpeed pays on our test platform.

DeepSpeed's ZeRO-3 reduces each gradient bucket with `reduce_scatter_coalesced`: the gradients are
interleaved into a flat buffer (`torch.cat`, a full copy) and reduce-scattered over the partition group.
- Over a group of one rank (dp=1, or one DP rank per pipeline stage) that is the identity (pre-division
  by 1): we return the flattened gradients, bit for bit what DeepSpeed returns, without the copy and the
  collective. cProfile of a 125m dp=1 step on 2 CPU cores: a quarter of an 18.3 s step was there
  (0.73 s reduce-scatter + ~0.4 s cat in each of 4 micro-batches).
- Over gloo (CPU), torch's `reduce_scatter_tensor` is 2.6x slower than an in-place `all_reduce` of the
  same buffer (64 M fp32 elements, 2 ranks: 410 ms vs 156 ms), so there the buffer is all-reduced in
  place and this rank's chunk read from it. NCCL keeps DeepSpeed's reduce-scatter (half the traffic).
Installed only by our engine builder, so bench/train.py's HF + DeepSpeed baseline (its own processes)
keeps DeepSpeed as it is. bench/RESULTS.md (2026-12-04), DESIGN decision 51."""
from __future__ import annotations

from typing import List, Optional

import torch
import torch.distributed as dist
from deepspeed.runtime.comm import coalesced_collectives as _coalesced
from deepspeed.runtime.zero import stage3 as _stage3
from torch.distributed import ProcessGroup

_ORIGINALS: dict = {}  # DeepSpeed's functions, once replaced


def _reduce_scatter_coalesced(tensors: List[torch.Tensor], group: Optional[ProcessGroup] = None) -> List[torch.Tensor]:
    if dist.get_world_size(group) == 1:
        return [t.view(-1) for t in tensors]  # what DeepSpeed returns over one rank, without the copy
    return _ORIGINALS["reduce_scatter_coalesced"](tensors, group)


def _reduce_scatter_fn(input_tensor: torch.Tensor, output_tensor: torch.Tensor, group: Optional[ProcessGroup] = None,
                       async_op: bool = False, prof: bool = False):
    if dist.get_backend(group) != "gloo":
        return _ORIGINALS["_torch_reduce_scatter_fn"](input_tensor, output_tensor, group=group, async_op=async_op,
                                                      prof=prof)
    dist.all_reduce(input_tensor, group=group)  # in place: DeepSpeed's input is its own scratch buffer
    mine = input_tensor.chunk(dist.get_world_size(group))[dist.get_rank(group)]
    if mine.data_ptr() != output_tensor.data_ptr():  # DeepSpeed passes that very chunk as the output
        output_tensor.copy_(mine)
    return None


def install_zero3_reduce_scatter() -> None:
    """Replace DeepSpeed's ZeRO-3 reduce-scatter entry points (idempotent)."""
    if _ORIGINALS:
        return
    targets = [(_stage3, "reduce_scatter_coalesced", _reduce_scatter_coalesced),
               (_coalesced, "_torch_reduce_scatter_fn", _reduce_scatter_fn)]
    for module, name, _ in targets:
        if not callable(getattr(module, name, None)):
            raise RuntimeError(f"megalm's ZeRO-3 engine expects {module.__name__}.{name} (deepspeed==0.19.8, "
                               "setup.py): install that version or re-validate megalm/training/zero3_reduce_scatter.py")
    for module, name, replacement in targets:
        _ORIGINALS[name] = getattr(module, name)
        setattr(module, name, replacement)
