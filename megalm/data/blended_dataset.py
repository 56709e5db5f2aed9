"""A weighted mix of datasets whose realised proportions track the weights at every prefix.

Megatron-LM's greedy assignment (`helpers.build_blending_indices`): item t goes to the dataset whose
count lags its target the most, argmax_d(w_d * max(t, 1) - count_d), ties to the lowest index. Every
prefix of the stream then holds each dataset within about one sample of w_d * t, so a run stopped at any
step has seen the intended mix. The greedy has no closed form, so the choice is a tight pure-Python
loop (~1 s per million items); the per-dataset sample numbers are then derived vectorised. The result
depends only on (weights, size) and is cached like the GPT indices, so it is built once per run by rank 0.
No randomness is involved: the order of samples inside each dataset already comes from its own
seeded shuffle.
"""
from __future__ import annotations

import array
from typing import Sequence

import numpy as np

from .index_cache import hash_key, load_or_build

INDEX_FORMAT = "megalm-blend-index-v1"


def normalise_weights(weights: Sequence[float]) -> np.ndarray:
    w = np.asarray(weights, np.float64)
    if w.ndim != 1 or len(w) == 0 or not np.isfinite(w).all() or (w <= 0).any():
        raise ValueError(f"blend weights must be a non-empty list of positive numbers, got {list(weights)}")
    return w / w.sum()


def build_blend_index(weights: Sequence[float], size: int) -> dict[str, np.ndarray]:
    """dataset_index[t] (which dataset) and dataset_sample_index[t] (its k-th sample) for t < size."""
    w = [float(x) for x in normalise_weights(weights)]
    n = len(w)
    counts = [0] * n
    # A compact buffer written by index (a Python list of ints would cost 8+ bytes per item).
    choice = bytearray(size) if n < 256 else array.array("H", bytes(2 * size))
    rng_d = range(1, n)
    for t in range(size):
        tt = t if t > 0 else 1
        best, best_err = 0, w[0] * tt - counts[0]
        for d in rng_d:
            err = w[d] * tt - counts[d]
            if err > best_err:
                best, best_err = d, err
        counts[best] += 1
        choice[t] = best
    dataset_index = np.frombuffer(choice, np.uint8 if n < 256 else np.uint16).copy()
    # k-th occurrence of each dataset, vectorised: a stable sort groups items by dataset in stream order.
    order = np.argsort(dataset_index, kind="stable")
    per_dataset = np.bincount(dataset_index, minlength=n)
    first = np.concatenate(([0], np.cumsum(per_dataset)[:-1]))
    sample_index = np.empty(size, np.int64)
    sample_index[order] = np.arange(size, dtype=np.int64) - np.repeat(first, per_dataset)
    return {"dataset": dataset_index, "dataset_sample": sample_index}


class BlendedDataset:
    """`size` items drawn from `datasets` in proportion to `weights` (normalised to sum 1).

    Each dataset must hold at least the number of items the blend takes from it (about w_d * size + 1;
    the builder sizes them with Megatron's 0.5% margin). Construction is collective under
    torch.distributed when cache_dir is given, like GPTDataset.
    """

    def __init__(self, datasets: Sequence, weights: Sequence[float], size: int, cache_dir: str | None = None,
                 name: str = "blend"):
        if len(datasets) != len(weights):
            raise ValueError(f"{name}: {len(datasets)} datasets but {len(weights)} weights")
        if size < 0:
            raise ValueError(f"{name}: size must be >= 0, got {size}")
        self.datasets = list(datasets)
        self.weights = normalise_weights(weights)
        self.size = size
        self.name = name
        self.cache_key = hash_key(INDEX_FORMAT, self.weights, size)
        arrays, self.built_indices = load_or_build(
            cache_dir, f"{name}-{self.cache_key}", ("dataset", "dataset_sample"),
            lambda: build_blend_index(self.weights, size),
            {"format": INDEX_FORMAT, "weights": self.weights.tolist(), "size": size})
        self.dataset_index: np.ndarray = arrays["dataset"]
        self.dataset_sample_index: np.ndarray = arrays["dataset_sample"]
        taken = np.bincount(self.dataset_index, minlength=len(self.datasets))
        for d, (ds, k) in enumerate(zip(self.datasets, taken)):
            if k > len(ds):
                raise ValueError(f"{name}: the blend takes {k} samples from dataset {d} "
                                 f"({getattr(ds, 'name', type(ds).__name__)}) but it holds only {len(ds)}")

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int):  # a token array, or a MaskedSample from fine-tuning data
        if i < 0:
            i += self.size
        if not 0 <= i < self.size:
            raise IndexError(f"item {i} out of range for {self.name} blend of {self.size}")
        return self.datasets[int(self.dataset_index[i])][int(self.dataset_sample_index[i])]
