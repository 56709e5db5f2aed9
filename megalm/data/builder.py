"""Train/valid/test datasets from a DataConfig, the way Megatron-LM cuts and blends them.

Two modes:
  * separate shard lists (`valid_paths` / `test_paths` set): train uses all documents of the train
    shards; valid/test use all documents of their own shards (blended by token count: a proportional
    sample of their union);
  * document split (neither set): each train shard is cut by `split` (train,valid,test weights) into
    contiguous document ranges (Megatron's rounding, so the same shard splits the same way there).
Several train shards are blended by `train_weights` (default equal); every split uses the same weights
restricted to the shards that have documents in it. An entry that names several shards (a multi-shard
prep output or a glob, see `expand_shard_path`) shares its weight among them in proportion to their
tokens, so the blend is the one the user wrote per entry. A shard with a loss mask (fine-tuning data,
data_prep/sft.py) gives GPTDatasets that yield masked samples; it may be blended with pre-training data.
"""
from __future__ import annotations

import math
import os
from typing import Optional, Union

import numpy as np

from data_prep.mmidx import default_cache_dir as shard_cache_dir
from data_prep.sft import open_loss_mask, padded_length_problem
from megalm.config import ConfigError, DataConfig, expand_shard_path, expand_shard_paths, parse_split

from .blended_dataset import BlendedDataset
from .gpt_dataset import GPTDataset
from .indexed_dataset import IndexedDataset

Dataset = Union[GPTDataset, BlendedDataset]
SPLIT_NAMES = ("train", "valid", "test")
# Megatron oversizes each blended component by 0.5% (+1 here, which covers tiny runs: the greedy blend
# never takes more than w*size + 1 items from a dataset).
BLEND_MARGIN = 1.005


def split_document_ranges(num_documents: int, split: str) -> list[tuple[int, int]]:
    """[start, end) document ranges for train/valid/test, as Megatron's get_train_valid_test_split_."""
    fractions = parse_split(split)
    bounds = [0]
    for f in fractions:
        bounds.append(bounds[-1] + int(round(f * float(num_documents))))
    diff = bounds[-1] - num_documents  # rounding drift is taken off every boundary but the first
    bounds = [bounds[0]] + [b - diff for b in bounds[1:]]
    return [(bounds[i], bounds[i + 1]) for i in range(3)]


def default_cache_dir(cfg: DataConfig, prefix: str) -> str:
    return cfg.cache_dir or shard_cache_dir(prefix)


def _mix(cfg: DataConfig, parts: list[tuple[IndexedDataset, Optional[np.ndarray]]], weights: list[float],
         num_samples: int, name: str, masks: dict[str, Optional[IndexedDataset]]) -> Optional[Dataset]:
    """One GPTDataset, or a BlendedDataset over one GPTDataset per part; None when nothing to draw.
    `masks`: each shard's loss mask by prefix (None for pre-training shards)."""
    if num_samples <= 0 or not parts:
        return None
    if len(parts) == 1:
        shard, docs = parts[0]
        return GPTDataset(shard, cfg.seq_len, num_samples, cfg.seed, docs, default_cache_dir(cfg, shard.prefix), name,
                          masks[shard.prefix])
    w = np.asarray(weights, np.float64) / float(np.sum(weights))
    datasets = [GPTDataset(shard, cfg.seq_len, int(math.ceil(wi * num_samples * BLEND_MARGIN)) + 1, cfg.seed,
                           docs, default_cache_dir(cfg, shard.prefix), name, masks[shard.prefix])
                for (shard, docs), wi in zip(parts, w)]
    return BlendedDataset(datasets, w, num_samples, default_cache_dir(cfg, parts[0][0].prefix), f"{name}-blend")


def _has_tokens(shard: IndexedDataset, docs: Optional[np.ndarray]) -> bool:
    lengths = shard.sequence_lengths if docs is None else shard.sequence_lengths[docs]
    return len(lengths) > 0 and bool((lengths > 0).any())


def build_datasets(cfg: DataConfig, train_samples: int, valid_samples: int,
                   test_samples: int) -> tuple[Optional[Dataset], Optional[Dataset], Optional[Dataset]]:
    """(train, valid, test) datasets of exactly the requested sample counts; valid/test are None when
    asked for 0 samples or when there are no documents for them. Collective under torch.distributed:
    every rank calls it with the same arguments (rank 0 builds index caches, the others load them)."""
    cfg.validate()
    counts = (train_samples, valid_samples, test_samples)
    opened: dict[str, IndexedDataset] = {}
    masks: dict[str, Optional[IndexedDataset]] = {}

    def shard(prefix: str) -> IndexedDataset:
        if prefix not in opened:
            opened[prefix] = IndexedDataset(prefix)
            masks[prefix] = open_loss_mask(opened[prefix])
            problem = None if masks[prefix] is None else padded_length_problem(opened[prefix], cfg.seq_len)
            if problem is not None:
                raise ConfigError(f"data.seq_len: {problem}")
        return opened[prefix]

    entry_weights = list(cfg.train_weights) if cfg.train_weights else [1.0] * len(cfg.train_paths)
    train_paths, train_weights = [], []
    for i, (entry, w) in enumerate(zip(cfg.train_paths, entry_weights)):
        prefixes = expand_shard_path(entry, f"data.train_paths[{i}]")
        train_paths += prefixes
        if len(prefixes) == 1:
            train_weights.append(w)
        else:
            tokens = [max(shard(p).num_tokens, 1) for p in prefixes]
            train_weights += [w * t / sum(tokens) for t in tokens]

    if cfg.valid_paths or cfg.test_paths:
        out = [_mix(cfg, [(shard(p), None) for p in train_paths], train_weights, train_samples, "train", masks)]
        for name, paths, n in (("valid", cfg.valid_paths, valid_samples), ("test", cfg.test_paths, test_samples)):
            paths = expand_shard_paths(paths, f"data.{name}_paths")
            parts = [(shard(p), None) for p in paths if _has_tokens(shard(p), None)]
            out.append(_mix(cfg, parts, [float(s.num_tokens) for s, _ in parts], n, name, masks))
        train, valid, test = out
    else:
        ranges = {p: split_document_ranges(len(shard(p)), cfg.split) for p in train_paths}
        out = []
        for k, name in enumerate(SPLIT_NAMES):
            parts, weights = [], []
            for p, w in zip(train_paths, train_weights):
                start, end = ranges[p][k]
                docs = np.arange(start, end, dtype=np.int64)
                if end > start and _has_tokens(shard(p), docs):
                    parts.append((shard(p), docs))
                    weights.append(w)
            out.append(_mix(cfg, parts, weights, counts[k], name, masks))
        train, valid, test = out
    if train is None and train_samples > 0:
        raise ValueError(f"data: no train documents with tokens in {train_paths} (split {cfg.split!r})")
    return train, valid, test
