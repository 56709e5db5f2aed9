"""Point-to-point transfers between adjacent pipeline stages: the one home of send/recv.

Each transfer is a list of operations posted together with `torch.distributed.batch_isend_irecv`, so a
stage that sends its activation forward and expects a gradient back posts both at once and two
neighbours never wait on each other's send (the deadlock blocking send/recv pairs invite). Peers are
global ranks: the previous and next entries of this rank's pipeline group (same dp and tp coordinates).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist


@dataclass
class StagePeers:
    """This rank's neighbours along its pipeline group (None at the ends)."""

    prev: Optional[int]
    next: Optional[int]

    @classmethod
    def of(cls, pp_ranks: list[int], pp_rank: int) -> "StagePeers":
        return cls(prev=pp_ranks[pp_rank - 1] if pp_rank > 0 else None,
                   next=pp_ranks[pp_rank + 1] if pp_rank + 1 < len(pp_ranks) else None)


def exchange(sends: list[tuple[torch.Tensor, int]], recv_like: list[tuple[torch.Tensor, int]]) -> list[torch.Tensor]:
    """Post every send (tensor, peer) and every receive (an empty tensor of the expected shape and
    dtype, peer) in one batch, wait for all, return the received tensors in order."""
    ops = [dist.P2POp(dist.isend, t.contiguous(), peer) for t, peer in sends]
    ops += [dist.P2POp(dist.irecv, buf, peer) for buf, peer in recv_like]
    if ops:
        for work in dist.batch_isend_irecv(ops):
            work.wait()
    return [buf for buf, _ in recv_like]
