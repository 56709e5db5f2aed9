"""One device per run, and the small collectives (scalars and flags) that go through it.

The device comes from DeepSpeed's accelerator, so the trainer, DeepSpeed's engine and ZeRO agree on it:
`cuda:<local rank % visible devices>` on GPUs, `cpu` on DeepSpeed's CPU accelerator. Every tensor that
meets the model or a collective is created on this device or moved there once. Why the scalar
collectives live here: NCCL reduces only device tensors, so a CPU tensor handed to `all_reduce` works
under gloo (every CPU test) and fails at the first step on a GPU cluster. Routing loss averages, grad
norms, agreement flags and eval sums through `reduce_scalars` makes the device rule one function.

`MEGALM_DIST_BACKEND=gloo|nccl` overrides the backend the accelerator names. The GPU check uses gloo to
put several ranks on one GPU, which NCCL refuses; gloo reduces CUDA tensors through host copies.
"""
from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Sequence
from typing import Any, Optional

import torch
import torch.distributed as dist

BACKEND_ENV = "MEGALM_DIST_BACKEND"
_BACKENDS = ("nccl", "gloo")
_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
_selected: Optional[torch.device] = None


def _accelerator():
    # Lazy: tools import this module without paying for DeepSpeed until a device is needed. DeepSpeed's
    # accelerator detection (run when deepspeed is first imported) logs to *stdout*, which corrupts
    # `megalm-generate --json`; a tool that first imports it here sends DeepSpeed's log to stderr.
    with contextlib.redirect_stdout(sys.stderr):
        from deepspeed.accelerator import get_accelerator

        return get_accelerator()


def select_device(local_rank: int) -> torch.device:
    """Pick this process's device (once, before the process group starts) and make it current."""
    global _selected
    acc = _accelerator()
    if acc.device_name() == "cpu":
        _selected = torch.device("cpu")
    else:
        index = local_rank % max(acc.device_count(), 1)  # several ranks may share one device (gloo only)
        acc.set_device(index)
        _selected = torch.device(acc.device_name(index))
    return _selected


def run_device() -> torch.device:
    """The device chosen by `select_device`, else the accelerator's current one (tools outside training)."""
    if _selected is not None:
        return _selected
    acc = _accelerator()
    return torch.device("cpu") if acc.device_name() == "cpu" else torch.device(acc.current_device_name())


def dist_backend() -> str:
    """The process-group backend: $MEGALM_DIST_BACKEND, else what DeepSpeed's accelerator uses."""
    forced = os.environ.get(BACKEND_ENV)
    if forced:
        if forced not in _BACKENDS:
            raise ValueError(f"{BACKEND_ENV}={forced!r}: expected one of {', '.join(_BACKENDS)}")
        return forced
    name = _accelerator().communication_backend_name()
    return name if name in _BACKENDS else "gloo"  # the CPU accelerator may name ccl; torch's own is gloo


def reduce_scalars(values: torch.Tensor | Sequence[float], op: str = "sum", group=None) -> torch.Tensor:
    """All-reduce a few scalars (float64, on the run device, so NCCL accepts them); the result on CPU.

    A tensor argument is reduced in float64 too (its values are copied, never reduced in place)."""
    if torch.is_tensor(values):
        t = values.detach().reshape(-1).to(device=run_device(), dtype=torch.float64, copy=True)
    else:
        t = torch.tensor(list(values), dtype=torch.float64, device=run_device())
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(t, op=_OPS[op], group=group)
    return t.cpu()


def reduce_tensor(tensor: torch.Tensor, op: str = "sum", group=None) -> torch.Tensor:
    """All-reduce a copy of a device tensor (a gradient partition, say) over `group`; the copy."""
    out = tensor.detach().clone()
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(out, op=_OPS[op], group=group)
    return out


def any_rank(flag: bool, group=None) -> bool:
    """True on every rank if it is true on any rank of `group`."""
    return bool(reduce_scalars([1.0 if flag else 0.0], "max", group)[0] > 0)


def all_ranks(flag: bool, group=None) -> bool:
    """True on every rank only if it is true on every rank of `group` (doubles as a barrier)."""
    return bool(reduce_scalars([1.0 if flag else 0.0], "min", group)[0] > 0)


def gather_objects(obj: Any, group=None) -> list[Any]:
    """Every rank's picklable `obj`, in rank order (torch serialises through the current device, which
    `select_device` set, so this works under NCCL as under gloo)."""
    if not (dist.is_initialized() and dist.get_world_size(group) > 1):
        return [obj]
    out: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def broadcast_object(obj: Any, src: int = 0, group=None) -> Any:
    """Rank `src`'s picklable `obj` on every rank (also a barrier)."""
    if not (dist.is_initialized() and dist.get_world_size(group) > 1):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=group)
    return box[0]
