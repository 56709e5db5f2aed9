"""Megatron-style tensor-parallel layers (no biases: the Llama decoder has none).

    ColumnParallelLinear   W [out, in] split along out (dim 0): y_shard = x @ W_shard^T
    RowParallelLinear      W [out, in] split along in  (dim 1): y = sum over ranks of x_shard @ W_shard^T
    VocabParallelEmbedding W [vocab_padded, dim] split along vocab (dim 0)

A column layer followed by a row layer needs one all-reduce forward and one backward. Every layer
takes its TP group explicitly (`tp_group=None`: not tensor-parallel) and draws only its shard's tiles
of the full weight named by (seed, init_key), so weights are TP-invariant (see `init.py`). `tp_unit`:
every legal TP shard of the split dim is a multiple of it, whatever the TP size (the model knows this
from its shape; None: only the whole dim is known to be), so a shard's tiles are its own.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed import ProcessGroup

from .comm import (copy_to_tp_region, gather_from_tp_region, group_rank, group_size, reduce_from_tp_region,
                   scatter_to_tp_region)
from .init import ShardInit, new_parameter, tp_shard_init


def _split(size: int, world: int, what: str) -> int:
    if size % world != 0:
        raise ValueError(f"{what} = {size} is not divisible by the tensor-parallel size {world}")
    return size // world


class ColumnParallelLinear(nn.Module):
    """y = x W^T with W's output rows split over TP ranks. Input replicated; output sharded on the last
    dim unless `gather_output`."""

    def __init__(self, in_features: int, out_features: int, *, gather_output: bool = False,
                 init_std: float = 0.02, init_key: str, seed: int, tp_group: Optional[ProcessGroup] = None,
                 tp_unit: Optional[int] = None):
        super().__init__()
        self.tp_group = tp_group
        self.gather_output = gather_output
        world, rank = group_size(tp_group), group_rank(tp_group)
        self.in_features, self.out_features = in_features, out_features
        self.out_features_per_rank = _split(out_features, world, f"{init_key}: out_features")
        shape = (out_features, in_features)
        self.weight = new_parameter(tp_shard_init(init_key, seed, init_std, shape, shape, 0, rank, world, tp_unit),
                                    partition_dim=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(copy_to_tp_region(x, self.tp_group), self.weight)
        return gather_from_tp_region(y, self.tp_group) if self.gather_output else y


class RowParallelLinear(nn.Module):
    """y = x W^T with W's input columns split over TP ranks; partial products are summed (all-reduce).
    Input already sharded on its last dim (`input_is_parallel`) or split here; output replicated."""

    def __init__(self, in_features: int, out_features: int, *, input_is_parallel: bool = True,
                 init_std: float = 0.02, init_key: str, seed: int, tp_group: Optional[ProcessGroup] = None,
                 tp_unit: Optional[int] = None):
        super().__init__()
        self.tp_group = tp_group
        self.input_is_parallel = input_is_parallel
        world, rank = group_size(tp_group), group_rank(tp_group)
        self.in_features, self.out_features = in_features, out_features
        self.in_features_per_rank = _split(in_features, world, f"{init_key}: in_features")
        shape = (out_features, in_features)
        self.weight = new_parameter(tp_shard_init(init_key, seed, init_std, shape, shape, 1, rank, world, tp_unit),
                                    partition_dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.input_is_parallel:
            x = scatter_to_tp_region(x, self.tp_group)
        return reduce_from_tp_region(F.linear(x, self.weight), self.tp_group)


class TokenIdError(ValueError):
    """A token id outside the model's vocabulary reached the embedding."""


def check_token_ids(ids: torch.Tensor, vocab_size: int) -> None:
    """The embedding's last guard against ids >= model.vocab_size (or < 0). Under TP an out-of-range id
    would look like another rank's row and silently embed as zeros, so the check cannot be left to
    F.embedding. Training refuses such shards before it starts (their maximum id is checked against
    the model); this catches what gets through anyway. On GPUs the check is asynchronous (no sync
    per step): a bad id fails the next synchronising call with this message."""
    if ids.device.type == "cuda":
        torch._assert_async(((ids >= 0) & (ids < vocab_size)).all(),
                            f"token id outside the model's vocabulary [0, {vocab_size}): check model.vocab_size")
        return
    if ids.numel() and (int(ids.max()) >= vocab_size or int(ids.min()) < 0):
        bad = ids[(ids >= vocab_size) | (ids < 0)]
        raise TokenIdError(f"token id {int(bad[0])} ({bad.numel()} in this batch) is outside the model's "
                           f"vocabulary [0, {vocab_size}): the data was tokenised with a larger vocabulary "
                           f"than model.vocab_size={vocab_size}; use the matching tokenizer or model")


class VocabParallelEmbedding(nn.Module):
    """Embedding table split by vocabulary rows. Each rank looks up the ids in its range, zeros the
    rest, and the all-reduce assembles the full embedding.

    `num_embeddings` (<= the padded size) rows are drawn from (seed, init_key) and the padding rows are
    zero, so real rows are identical whatever padding a TP size implies. `tp_unit`: the padding multiple
    per TP rank (every rank's row count is a multiple of it at every TP size)."""

    def __init__(self, num_embeddings_padded: int, embedding_dim: int, *, num_embeddings: Optional[int] = None,
                 init_std: float = 0.02, init_key: str, seed: int, tp_group: Optional[ProcessGroup] = None,
                 tp_unit: Optional[int] = None):
        super().__init__()
        self.tp_group = tp_group
        world, rank = group_size(tp_group), group_rank(tp_group)
        self.num_embeddings = num_embeddings_padded if num_embeddings is None else num_embeddings
        if self.num_embeddings > num_embeddings_padded:
            raise ValueError(f"{init_key}: num_embeddings {self.num_embeddings} > padded size {num_embeddings_padded}")
        self.num_embeddings_padded = num_embeddings_padded
        self.embedding_dim = embedding_dim
        per_rank = _split(num_embeddings_padded, world, f"{init_key}: padded vocabulary")
        self.vocab_start, self.vocab_end = rank * per_rank, (rank + 1) * per_rank
        self.weight = new_parameter(vocab_weight_shard(self.num_embeddings, num_embeddings_padded, embedding_dim,
                                                       init_std, seed, init_key, rank, world, tp_unit), partition_dim=0)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        check_token_ids(ids, self.num_embeddings)
        if self.tp_group is None or group_size(self.tp_group) == 1:
            return F.embedding(ids, self.weight)
        outside = (ids < self.vocab_start) | (ids >= self.vocab_end)
        local = (ids - self.vocab_start).masked_fill(outside, 0)
        emb = F.embedding(local, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)
        return reduce_from_tp_region(emb, self.tp_group)


def vocab_weight_shard(num_embeddings: int, num_embeddings_padded: int, dim: int, init_std: float, seed: int,
                       init_key: str, rank: int, world: int, tp_unit: Optional[int] = None) -> ShardInit:
    """How to draw this rank's rows of a [padded vocab, dim] table: the real rows' tiles are laid over
    their unpadded shape (seed, init_key), padding rows are zero, so real rows do not depend on the TP
    size's padding. Only this rank's rows are drawn."""
    return tp_shard_init(init_key, seed, init_std, (num_embeddings, dim), (num_embeddings_padded, dim), 0, rank, world,
                         tp_unit)


def vocab_parallel_logits(hidden: torch.Tensor, weight_shard: torch.Tensor, vocab_start: int, num_embeddings: int,
                          tp_group: Optional[ProcessGroup]) -> torch.Tensor:
    """Logits for this rank's vocabulary rows [vocab_start, vocab_start + rows); columns at or past
    `num_embeddings` (vocabulary padding) are -inf, so padding is never predicted or sampled and gets
    no gradient."""
    logits = F.linear(copy_to_tp_region(hidden, tp_group), weight_shard)
    rows = weight_shard.shape[0]
    if vocab_start + rows > num_embeddings:
        padding = torch.arange(vocab_start, vocab_start + rows, device=logits.device) >= num_embeddings
        logits = logits.masked_fill(padding, float("-inf"))
    return logits
