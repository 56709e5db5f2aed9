"""No ZeRO-3 gradient reduce-scatter over a group of one rank.

DeepSpeed's ZeRO-3 reduces a bucket of gradients with `reduce_scatter_coalesced` even when the
partition group is a single rank (dp=1, or one rank per pipeline stage): it interleaves the gradients
into a new flat buffer (`torch.cat`, a full copy) and runs the collective on it. Over one rank the
reduce-scatter is the identity and the pre-division is by 1, so the result equals the flattened
gradients bit for bit. A cProfile of a 125m dp=1 step on 2 CPU cores spent a quarter of the 18.3 s step
there (0.73 s reduce-scatter + ~0.4 s cat in each of 4 micro-batches; bench/RESULTS.md 2026-12-04). Installed only
by our engine builder, so the HF + DeepSpeed baseline in bench/train.py keeps DeepSpeed as it is."""
from __future__ import annotations

from typing import List, Optional

import torch
import torch.distributed as dist
from deepspeed.runtime.zero import stage3 as _stage3
from torch.distributed import ProcessGroup

_ORIGINAL = None  # DeepSpeed's function, once replaced


def _reduce_scatter_coalesced(tensors: List[torch.Tensor], group: Optional[ProcessGroup] = None) -> List[torch.Tensor]:
    if dist.get_world_size(group) == 1:
        return [t.view(-1) for t in tensors]  # what DeepSpeed returns over one rank, without the copy
    return _ORIGINAL(tensors, group)


def skip_single_rank_reduce_scatter() -> None:
    """Replace `deepspeed.runtime.zero.stage3.reduce_scatter_coalesced` (idempotent)."""
    global _ORIGINAL
    if _ORIGINAL is not None:
        return
    original = getattr(_stage3, "reduce_scatter_coalesced", None)
    if not callable(original):
        raise RuntimeError("megalm's ZeRO-3 engine expects deepspeed.runtime.zero.stage3.reduce_scatter_coalesced "
                           "(deepspeed==0.19.8, setup.py): install that version or re-validate "
                           "megalm/training/zero3_single_rank.py")
    _ORIGINAL = original
    _stage3.reduce_scatter_coalesced = _reduce_scatter_coalesced
