"""Deterministic evaluation windows over token shards: no shuffling, no sampling, no overlap.

A shard's documents are read in order as one token stream t_0 .. t_{N-1} (documents end in EOD, as in
training, so windows may span documents exactly like training samples do). Window w predicts tokens
w*S+1 .. w*S+S from inputs w*S .. w*S+S-1; every token but the first is predicted exactly once. The last
window is padded (labels IGNORE_INDEX) when the stream does not fill it. `max_tokens` caps the number of
predicted tokens over all shards (taken from the first shards first), so "the first 1M tokens" means
the same tokens for every checkpoint and layout.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterator, Optional

import numpy as np
import torch

from megalm.data.indexed_dataset import IndexedDataset
from megalm.parallel.cross_entropy import IGNORE_INDEX


@dataclass
class ShardWindows:
    prefix: str
    inputs: torch.Tensor  # [windows, S] int64
    labels: torch.Tensor  # [windows, S] int64, IGNORE_INDEX where nothing is predicted

    @property
    def name(self) -> str:
        return os.path.basename(self.prefix)

    @property
    def num_tokens(self) -> int:
        return int((self.labels != IGNORE_INDEX).sum())


DocRange = Optional[tuple[int, int]]  # [start, end) documents of a shard; None = all of them


def _stream(ds: IndexedDataset, limit: int, docs: DocRange = None) -> np.ndarray:
    """The first `limit` tokens of the shard's documents `docs` (all when shorter), in document order."""
    start, end = docs if docs is not None else (0, len(ds))
    parts, have = [], 0
    for i in range(start, end):
        if have >= limit:
            break
        seq = ds.get(i)
        parts.append(np.asarray(seq[: limit - have], dtype=np.int64))
        have += len(parts[-1])
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def shard_windows(prefix: str, seq_len: int, max_tokens: Optional[int] = None, docs: DocRange = None) -> ShardWindows:
    """Windows of one shard (or of its documents `docs`) predicting at most `max_tokens` tokens."""
    ds = IndexedDataset(prefix)  # validates the shard; a corrupt one raises ShardFormatError naming it
    start, end = docs if docs is not None else (0, len(ds))
    available = int(ds.sequence_lengths[start:end].sum())
    want = available if max_tokens is None else min(available, max_tokens + 1)
    tokens = torch.from_numpy(_stream(ds, want, docs))
    predicted = max(0, len(tokens) - 1)
    n_windows = (predicted + seq_len - 1) // seq_len
    inputs = torch.zeros(n_windows, seq_len, dtype=torch.int64)
    labels = torch.full((n_windows, seq_len), IGNORE_INDEX, dtype=torch.int64)
    flat_in, flat_lab = inputs.view(-1), labels.view(-1)
    flat_in[:predicted] = tokens[:-1] if predicted else tokens[:0]
    flat_lab[:predicted] = tokens[1:]
    return ShardWindows(prefix, inputs, labels)


def eval_windows(prefixes: list[str], seq_len: int, max_tokens: Optional[int] = None,
                 doc_ranges: Optional[dict[str, tuple[int, int]]] = None) -> list[ShardWindows]:
    """Windows for every shard (restricted to `doc_ranges[prefix]` where given), with `max_tokens`
    (if given) spent over the shards in order."""
    out = []
    left = max_tokens
    for prefix in prefixes:
        if left is not None and left <= 0:
            break
        sw = shard_windows(prefix, seq_len, left, (doc_ranges or {}).get(prefix))
        out.append(sw)
        if left is not None:
            left -= sw.num_tokens
    return out


def batches(sw: ShardWindows, micro_batch_size: int, dp_rank: int = 0, dp: int = 1) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Micro-batches of this DP rank's windows (window i goes to rank i % dp)."""
    idx = torch.arange(dp_rank, sw.inputs.shape[0], dp)
    for start in range(0, len(idx), micro_batch_size):
        sel = idx[start:start + micro_batch_size]
        yield sw.inputs[sel], sw.labels[sel]
