"""BlendedDataset: Megatron's greedy assignment, realised proportions at every prefix, item routing."""
from __future__ import annotations

import os

import numpy as np
import pytest

from megalm.data import BlendedDataset
from megalm.data.blended_dataset import build_blend_index


def megatron_blend(weights, size):
    """Port of Megatron-LM's helpers.build_blending_indices, the reference."""
    w = np.asarray(weights, np.float64) / np.sum(weights)
    current = np.zeros(len(w), np.int64)
    ds_index, ds_sample = np.zeros(size, np.int64), np.zeros(size, np.int64)
    for t in range(size):
        errors = w * max(t, 1.0) - current
        d = int(np.argmax(errors))  # first maximum, as the C++ strict '>' comparison
        ds_index[t], ds_sample[t] = d, current[d]
        current[d] += 1
    return ds_index, ds_sample


@pytest.mark.parametrize("weights", [[0.5, 0.3, 0.2], [1, 1], [0.97, 0.01, 0.02], [3, 1, 4, 1, 5, 9, 2, 6]])
def test_matches_megatron_and_tracks_weights(weights):
    size = 3000
    out = build_blend_index(weights, size)
    ref_index, ref_sample = megatron_blend(weights, size)
    assert np.array_equal(out["dataset"], ref_index)
    assert np.array_equal(out["dataset_sample"], ref_sample)
    w = np.asarray(weights, np.float64) / np.sum(weights)
    # At every prefix t each dataset's count is within two samples of w * t (never more than one over:
    # the builder's +1 margin relies on that), and the totals within one of w * size.
    onehot = np.eye(len(w), dtype=np.int64)[out["dataset"]]
    counts = np.cumsum(onehot, axis=0)
    t = np.arange(1, size + 1)[:, None]
    assert np.abs(counts - w * t).max() <= 2.0
    assert (counts - w * t).max() <= 1.0 + 1e-9
    assert np.abs(counts[-1] - w * size).max() <= 1.0 + 1e-9


class Tagged:
    """A dataset whose item k is (tag, k), to check where blended items come from."""

    def __init__(self, tag: int, n: int):
        self.tag, self.n, self.name = tag, n, f"tagged{tag}"

    def __len__(self):
        return self.n

    def __getitem__(self, k):
        assert 0 <= k < self.n
        return np.array([self.tag, k])


def test_items_route_to_datasets_in_order(tmp_path):
    parts = [Tagged(0, 600), Tagged(1, 300), Tagged(2, 120)]
    blend = BlendedDataset(parts, [5, 3, 1], 900, cache_dir=str(tmp_path))
    items = np.stack([blend[i] for i in range(len(blend))])
    for tag in range(3):
        ks = items[items[:, 0] == tag, 1]
        assert ks.tolist() == list(range(len(ks)))  # each dataset read front to back, no repeats
    assert np.bincount(items[:, 0]).tolist() == [500, 300, 100]
    assert blend.built_indices
    again = BlendedDataset(parts, [5, 3, 1], 900, cache_dir=str(tmp_path))
    assert not again.built_indices and np.array_equal(again.dataset_index, blend.dataset_index)
    assert len([f for f in os.listdir(tmp_path) if f.endswith(".npy")]) == 2


def test_too_small_component_and_bad_weights():
    with pytest.raises(ValueError, match="takes 500 samples from dataset 0"):
        BlendedDataset([Tagged(0, 10), Tagged(1, 1000)], [1, 1], 1000)
    with pytest.raises(ValueError, match="positive"):
        BlendedDataset([Tagged(0, 10)], [0], 5)
