"""GPTModel: the Llama-style decoder as the same four layer kinds the pipeline uses, in order:

    EmbeddingLayer -> TransformerBlock x num_layers -> FinalNorm -> OutputLayer (or the tied embedding)

`forward(input_ids [b, s]) -> logits shard [b, s, padded_vocab / tp]`: logits stay vocab-parallel
(never gathered); `loss(logits, labels)` is the vocab-parallel cross-entropy's mean over tokens whose
label is not IGNORE_INDEX. Padding columns of the vocabulary hold -inf. Parameter names and TP partition dims
are listed in `megalm.model.params`.

Generation: `forward(new_ids, cache=KVCache, valid=None)` runs only the new tokens against the cached
context (`megalm.model.kv_cache`; `valid` marks left padding) and returns their logits.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed import ProcessGroup
from torch.utils.checkpoint import checkpoint

from megalm.config.model import VOCAB_PAD_MULTIPLE, ModelConfig
from megalm.parallel.comm import group_rank, group_size
from megalm.parallel.cross_entropy import IGNORE_INDEX, vocab_parallel_cross_entropy
from megalm.parallel.grid import ProcessGrid, get_process_grid, is_grid_initialized
from megalm.parallel.init import initialise_zero3_partitions, new_parameter
from megalm.parallel.layers import VocabParallelEmbedding, vocab_parallel_logits, vocab_weight_shard
from megalm.parallel.random import checkpoint_rng_context

from .kv_cache import KVCache
from .transformer import RMSNorm, TransformerBlock


def resolve_tp_group(grid: Optional[ProcessGrid]) -> Optional[ProcessGroup]:
    """The TP group of `grid`, else of the current process grid, else None (no tensor parallelism)."""
    if grid is None and is_grid_initialized():
        grid = get_process_grid()
    return None if grid is None else grid.tp_group


class EmbeddingLayer(VocabParallelEmbedding):
    """Token embedding (vocab-parallel). With tied embeddings it also serves as the output head:
    `forward(hidden, logits=True)` (a call through the module, not a side method, so ZeRO-3's forward
    hooks gather the weight for the head too)."""

    def __init__(self, cfg: ModelConfig, tp_group: Optional[ProcessGroup] = None):
        tp = group_size(tp_group)
        super().__init__(cfg.padded_vocab_size(tp), cfg.hidden_size, num_embeddings=cfg.vocab_size,
                         init_std=cfg.init_std, init_key="embedding.weight", seed=cfg.init_seed, tp_group=tp_group,
                         tp_unit=VOCAB_PAD_MULTIPLE)
        self.hidden_dropout = cfg.hidden_dropout

    def forward(self, x: torch.Tensor, logits: bool = False) -> torch.Tensor:
        if logits:
            return vocab_parallel_logits(x, self.weight, self.vocab_start, self.num_embeddings, self.tp_group)
        return F.dropout(super().forward(x), self.hidden_dropout, self.training)


class FinalNorm(RMSNorm):
    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg.hidden_size, cfg.norm_eps)


class OutputLayer(nn.Module):
    """Untied LM head: a column-parallel projection onto this rank's vocabulary rows (padding rows
    zero-initialised and masked to -inf)."""

    def __init__(self, cfg: ModelConfig, tp_group: Optional[ProcessGroup] = None):
        super().__init__()
        self.tp_group = tp_group
        tp, rank = group_size(tp_group), group_rank(tp_group)
        padded = cfg.padded_vocab_size(tp)
        self.num_embeddings = cfg.vocab_size
        self.vocab_start = rank * (padded // tp)
        self.weight = new_parameter(vocab_weight_shard(cfg.vocab_size, padded, cfg.hidden_size, cfg.init_std,
                                                       cfg.init_seed, "output.weight", rank, tp, VOCAB_PAD_MULTIPLE),
                                    partition_dim=0)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return vocab_parallel_logits(hidden, self.weight, self.vocab_start, self.num_embeddings, self.tp_group)


def language_model_loss(logits: torch.Tensor, labels: torch.Tensor, tp_group: Optional[ProcessGroup],
                        targets_per_micro_batch: Optional[float] = None) -> torch.Tensor:
    """Mean cross-entropy over tokens whose label is not IGNORE_INDEX (0 when every label is ignored).

    `targets_per_micro_batch` (fine-tuning data, megalm.training.engine): the global batch's mean number of
    such tokens per micro-batch. The sum is divided by it instead of this micro-batch's own count, so the
    average of the micro-batch losses that gradient accumulation and DP take is the mean over every target
    token of the global batch, however unevenly loss masks spread them over micro-batches."""
    per_token = vocab_parallel_cross_entropy(logits, labels, IGNORE_INDEX, tp_group)
    if targets_per_micro_batch is not None:
        return per_token.sum() / targets_per_micro_batch
    count = (labels != IGNORE_INDEX).sum().clamp(min=1)
    return per_token.sum() / count


class GPTModel(nn.Module):
    """The full decoder on one pipeline stage (for PP>1 use `megalm.model.pipeline`). `grid=None` uses
    the current process grid's TP group if one exists, else runs without tensor parallelism."""

    def __init__(self, cfg: ModelConfig, grid: Optional[ProcessGrid] = None):
        super().__init__()
        cfg.validate("model")
        self.cfg = cfg
        self.tp_group = resolve_tp_group(grid)
        cfg.check_layout(group_size(self.tp_group), 1, "model")
        self.activation_checkpointing = False  # per-block torch.utils.checkpoint when training
        self.embedding = EmbeddingLayer(cfg, self.tp_group)
        self.layers = nn.ModuleList(TransformerBlock(cfg, i, self.tp_group) for i in range(cfg.num_layers))
        self.final_norm = FinalNorm(cfg)
        self.output = None if cfg.tie_embeddings else OutputLayer(cfg, self.tp_group)
        # Under deepspeed.zero.Init every submodule is partitioned by now: draw this rank's partitions
        # (megalm.parallel.init; a no-op otherwise).
        initialise_zero3_partitions(self)

    def forward(self, input_ids: torch.Tensor, cache: Optional[KVCache] = None,
                valid: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Logits shard [b, s, padded_vocab / tp]. With `cache`, `input_ids` are the tokens after the cached
        ones and `valid` [b, s] (default: all True) is False on left padding."""
        if cache is not None:
            return self._forward_cached(input_ids, cache, valid)
        if valid is not None:
            raise ValueError("GPTModel.forward: valid= marks padding in a KV cache; pass cache= too")
        h = self.embedding(input_ids)
        for block in self.layers:
            if self.activation_checkpointing and torch.is_grad_enabled():
                h = checkpoint(block, h, use_reentrant=False, context_fn=checkpoint_rng_context)
            else:
                h = block(h)
        h = self.final_norm(h)
        return self.embedding(h, logits=True) if self.output is None else self.output(h)

    def _forward_cached(self, input_ids: torch.Tensor, cache: KVCache, valid: Optional[torch.Tensor]) -> torch.Tensor:
        cache.begin(*input_ids.shape, valid)
        h = self.embedding(input_ids)
        for block in self.layers:
            h = block(h, cache)
        cache.commit()
        h = self.final_norm(h)
        return self.embedding(h, logits=True) if self.output is None else self.output(h)

    def loss(self, logits: torch.Tensor, labels: torch.Tensor,
             targets_per_micro_batch: Optional[float] = None) -> torch.Tensor:
        return language_model_loss(logits, labels, self.tp_group, targets_per_micro_batch)
