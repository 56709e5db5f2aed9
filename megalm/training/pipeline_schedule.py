"""The 1F1B schedule over one stage's DeepSpeedEngine (ZeRO-2/3 x PP, see `stage_engine`).

Stage s of P runs min(P - s - 1, M) warm-up forwards, then alternates one forward and one backward, then
drains the remaining backwards: at most P - s micro-batches' activations are alive at once (GPipe keeps
all M). Neighbours exchange with one `batch_isend_irecv` per step of the schedule (megalm.parallel.p2p):
the forward's output goes out together with the request for the oldest in-flight gradient.

Gradients: the last stage calls `engine.backward(loss)` (DeepSpeed divides by the accumulation steps);
the others back-propagate the received output gradient through the surrogate scalar `(y * dy).sum()`,
whose gradient with respect to the stage's parameters and input is exactly dy's vector-Jacobian product,
with `scale_wrt_gas=False` because dy already carries the 1/M. `engine.step()` follows every backward
but the last, as at pp=1 (DeepSpeed only counts the micro-step; under `OncePerStep` there is none); the
boundary's `step()` waits until the schedule is drained, because the update reduces across stages (tied
gradients, grad norm, overflow).
"""
from __future__ import annotations

from collections import deque
from typing import Callable, Optional

import torch

from megalm.model.pipeline import pipeline_loss_fn
from megalm.parallel.grid import ProcessGrid
from megalm.parallel.p2p import StagePeers, exchange

from .once_per_step import OncePerStep

Batch = tuple[torch.Tensor, torch.Tensor]


class PipelineLoss:
    """The pipeline's loss_fn; `poison` turns the next losses into NaN (fault drills only);
    `targets_per_micro_batch` is set by the engine for each step (see the module docstring)."""

    def __init__(self) -> None:
        self.poison = False
        self.targets_per_micro_batch: float | None = None

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        loss = pipeline_loss_fn(logits, labels, self.targets_per_micro_batch)
        return loss * float("nan") if self.poison else loss


class StageSchedule:
    """Runs one step (train: 1F1B; eval: forwards only) of this rank's stage."""

    def __init__(self, ds, grid: ProcessGrid, loss_fn: Callable, hidden_size: int, act_dtype: torch.dtype,
                 device: torch.device, before_update: Callable[[], None],
                 once_per_step: Optional[OncePerStep] = None):
        self.ds, self.grid, self.loss_fn = ds, grid, loss_fn
        self.hidden_size, self.act_dtype, self.device = hidden_size, act_dtype, device
        self.before_update = before_update
        self.once_per_step = once_per_step
        self.peers = StagePeers.of(grid.pp_ranks, grid.pp_rank)

    # ---- one micro-batch ----
    def _activation_like(self, input_ids: torch.Tensor) -> torch.Tensor:
        return torch.empty(*input_ids.shape, self.hidden_size, dtype=self.act_dtype, device=self.device)

    def _forward(self, batch: Batch, received: Optional[torch.Tensor], grad: bool):
        input_ids, labels = batch
        x = input_ids.to(self.device) if self.grid.is_first_stage else received.requires_grad_(grad)
        y = self.ds(x)
        if self.grid.is_last_stage:
            y = self.loss_fn(y, labels.to(self.device))
        return x, y

    def _backward(self, x: torch.Tensor, y: torch.Tensor, dy: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        # ZeRO counts micro-steps at the start of each forward (`engine.forward` calls this): the first
        # backward after a forward overwrites the gradient partitions, later ones add to them. 1F1B runs
        # backwards back to back (the cool-down), where ZeRO-3 would overwrite the previous micro-batch's
        # gradients and ZeRO-2 would keep a consumed accumulator; calling it here keeps the count exact.
        self.ds.optimizer.clear_backward_seen_flag()
        if self.grid.is_last_stage:
            self.ds.backward(y)
        else:
            self.ds.backward((y * dy).sum(), scale_wrt_gas=False)
        if self.once_per_step is None and not self.ds.is_gradient_accumulation_boundary():
            self.ds.step()  # only counts the micro-step; the boundary's step is `_update`
        return None if self.grid.is_first_stage else x.grad

    def _update(self) -> None:
        """The step's update, once every backward has sent its gradient on: it all-reduces across stages
        (tied gradients, the norm, the non-finite check), so inside the schedule it would deadlock with
        a neighbour still waiting for this stage's last input gradient."""
        if self.once_per_step is not None:
            self.once_per_step.end()
        self.before_update()
        if self.once_per_step is not None:
            self.once_per_step.update()
        else:
            self.ds.step()

    # ---- transfers (None peers: nothing to send or receive at that end) ----
    def _send_recv(self, send: Optional[torch.Tensor], send_to: Optional[int],
                   like: Optional[torch.Tensor], recv_from: Optional[int]) -> Optional[torch.Tensor]:
        sends = [(send.detach(), send_to)] if send is not None and send_to is not None else []
        recvs = [(like, recv_from)] if like is not None and recv_from is not None else []
        got = exchange(sends, recvs)
        return got[0] if got else None

    def _recv_forward(self, batch: Batch) -> Optional[torch.Tensor]:
        if self.peers.prev is None:
            return None
        return self._send_recv(None, None, self._activation_like(batch[0]), self.peers.prev)

    # ---- steps ----
    def train(self, micro_batches: list[Batch]) -> list[torch.Tensor]:
        """1F1B over `micro_batches`; the last stage returns their losses (others: empty)."""
        M, P, s = len(micro_batches), self.grid.pp, self.grid.pp_rank
        warmup = min(P - s - 1, M)
        in_flight: deque = deque()
        losses: list[torch.Tensor] = []
        nxt, prv = self.peers.next, self.peers.prev
        if self.once_per_step is not None:
            self.once_per_step.begin()

        def forward(i: int, received: Optional[torch.Tensor]) -> torch.Tensor:
            x, y = self._forward(micro_batches[i], received, grad=True)
            in_flight.append((i, x, y))
            if self.grid.is_last_stage:
                losses.append(y.detach())
            return y

        for i in range(warmup):
            y = forward(i, self._recv_forward(micro_batches[i]))
            self._send_recv(y, nxt, None, None)
        received = self._recv_forward(micro_batches[warmup]) if warmup < M else None
        for k in range(M - warmup):
            i = warmup + k
            y = forward(i, received)
            j, x, y_j = in_flight.popleft()
            # send this forward's output, receive the oldest in-flight micro-batch's output gradient
            dy = self._send_recv(None if self.grid.is_last_stage else y, nxt,
                                 None if nxt is None else self._activation_like(micro_batches[j][0]), nxt)
            dx = self._backward(x, y_j, dy)
            last = k == M - warmup - 1
            # send the input gradient back, receive the next forward's input
            received = self._send_recv(dx, prv, None if last or prv is None else
                                       self._activation_like(micro_batches[i + 1][0]), prv)
        while in_flight:
            j, x, y_j = in_flight.popleft()
            dy = self._send_recv(None, None, None if nxt is None else self._activation_like(micro_batches[j][0]), nxt)
            dx = self._backward(x, y_j, dy)
            self._send_recv(dx, prv, None, None)
        self._update()
        return losses

    @torch.no_grad()
    def evaluate(self, micro_batches: list[Batch]) -> list[torch.Tensor]:
        """Forwards only; the last stage returns the losses."""
        losses = []
        for batch in micro_batches:
            _, y = self._forward(batch, self._recv_forward(batch), grad=False)
            if self.grid.is_last_stage:
                losses.append(y.detach())
            else:
                self._send_recv(y, self.peers.next, None, None)
        return losses
