"""Evaluation at any (tp, pp, dp): one rank's pipeline stage of GPTModel, and the loss sum over windows.

Why not DeepSpeed's PipelineEngine: evaluation has no backward and no optimizer, so the simplest correct
schedule serves. Every micro-batch goes through the stages in order: stage p receives the hidden states
from the rank of stage p-1 with its own (dp, tp) coordinates, runs its blocks and sends them on
(`megalm.parallel.comm.send_to`/`recv_from`); the last stage computes the per-token loss with the
vocab-parallel cross-entropy. A stage starts micro-batch k+1 as soon as it has sent k, so stages overlap
as in a GPipe forward. Stage p holds blocks `stage_blocks(L, pp, p)` (as even as possible, earlier
stages taking the remainder) at its TP shard; the first stage the embedding, the last the final norm
and the head (with tied embeddings the last stage builds its own copy of the embedding, filled from
the same checkpoint tensor). Data-parallel ranks split the windows (`windows.batches`); the sums of
the last stage's first TP rank of every replica are all-reduced over the world, so every rank returns
the numbers one process computes (up to fp32 rounding of the sums' order).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from megalm.config.model import ModelConfig
from megalm.model.gpt import EmbeddingLayer, FinalNorm, OutputLayer
from megalm.model.transformer import TransformerBlock
from megalm.parallel.comm import recv_from, send_to
from megalm.parallel.cross_entropy import IGNORE_INDEX, vocab_parallel_cross_entropy
from megalm.parallel.device import reduce_scalars
from megalm.parallel.grid import ProcessGrid

from .windows import ShardWindows, batches


def stage_blocks(num_layers: int, pp: int, pp_rank: int) -> range:
    """Transformer blocks of stage `pp_rank` of `pp`: contiguous, sizes differing by at most one."""
    base, extra = divmod(num_layers, pp)
    start = pp_rank * base + min(pp_rank, extra)
    return range(start, start + base + (1 if pp_rank < extra else 0))


class PipelineStage(nn.Module):
    """The layers of GPTModel that one pipeline stage runs, at one TP rank (eval only).

    `forward(x)`: token ids [b, s] on the first stage, hidden states [b, s, h] on the others; returns
    hidden states, or on the last stage the logits shard [b, s, padded_vocab / tp] (GPTModel's output).
    Parameters carry their GPTModel names through the layers (`gpt_parameter_names`)."""

    def __init__(self, cfg: ModelConfig, grid: ProcessGrid):
        super().__init__()
        cfg.validate("model")
        cfg.check_layout(grid.tp, grid.pp, "model")
        self.cfg = cfg
        self.tp_group = grid.tp_group
        self.is_first, self.is_last = grid.is_first_stage, grid.is_last_stage
        self.blocks = stage_blocks(cfg.num_layers, grid.pp, grid.pp_rank)
        tied_head = self.is_last and cfg.tie_embeddings
        self.embedding = EmbeddingLayer(cfg, self.tp_group) if self.is_first or tied_head else None
        self.layers = nn.ModuleList(TransformerBlock(cfg, i, self.tp_group) for i in self.blocks)
        self.final_norm = FinalNorm(cfg) if self.is_last else None
        self.output = OutputLayer(cfg, self.tp_group) if self.is_last and not cfg.tie_embeddings else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embedding(x) if self.is_first else x
        for block in self.layers:
            h = block(h)
        if not self.is_last:
            return h
        h = self.final_norm(h)
        return self.embedding(h, logits=True) if self.output is None else self.output(h)


@torch.no_grad()
def stage_loss_sum(model: nn.Module, sw: ShardWindows, micro_batch_size: int, device: torch.device,
                   grid: Optional[ProcessGrid] = None) -> tuple[float, int]:
    """(sum of per-token cross-entropy, number of predicted tokens) over all of a shard's windows.

    `grid=None`: `model` is a whole GPTModel in this process. Otherwise `model` is this rank's stage
    (a GPTModel at pp=1, a PipelineStage at pp>1) and every rank of the world must call this with the
    same windows; all of them return the world's totals."""
    first = grid is None or grid.is_first_stage
    last = grid is None or grid.is_last_stage
    prev_rank = None if first else grid.pp_ranks[grid.pp_rank - 1]
    next_rank = None if last else grid.pp_ranks[grid.pp_rank + 1]
    tp_group = None if grid is None else grid.tp_group
    dtype = next(model.parameters()).dtype  # what the previous stage's blocks produce
    hidden = 0 if first else model.cfg.hidden_size
    total = torch.zeros((), dtype=torch.float64)
    count = 0
    dp_rank, dp = (0, 1) if grid is None else (grid.dp_rank, grid.dp)
    for inputs, labels in batches(sw, micro_batch_size, dp_rank, dp):
        if first:
            x = inputs.to(device)
        else:
            x = recv_from(prev_rank, (*inputs.shape, hidden), dtype, device)
        out = model(x)
        if not last:
            send_to(out, next_rank)
            continue
        labels = labels.to(device)
        per_token = vocab_parallel_cross_entropy(out.float(), labels, IGNORE_INDEX, tp_group)
        total += per_token.double().sum().cpu()
        count += int((labels != IGNORE_INDEX).sum())
    if grid is None:
        return float(total), count
    # One copy of each replica's sums (last stage, TP rank 0): every TP rank computed the same numbers.
    mine = last and grid.tp_rank == 0
    t = reduce_scalars([total.item() if mine else 0.0, float(count) if mine else 0.0], "sum")
    return float(t[0]), int(t[1].item())
