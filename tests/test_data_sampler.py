"""Resumable data-parallel micro-batches: resume equals the uninterrupted tail; dp=2 splits dp=1's batches."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from megalm.data import GPTDataset, MicroBatchSampler, collate_samples, micro_batches, micro_batches_for_step
from tests.test_data_indexed import random_docs, write_shard


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    prefix = write_shard(tmp_path_factory.mktemp("sampler") / "s", random_docs(80, seed=9))
    return GPTDataset(prefix, 8, 100, seed=4)


def as_lists(batches):
    return [(x.tolist(), y.tolist(), idx) for x, y, idx in batches]


def test_shapes_and_labels(dataset):
    x, y, idx = next(micro_batches(dataset, 3, with_indices=True))
    assert x.dtype == torch.long and y.dtype == torch.long and x.shape == y.shape == (3, 8)
    for row, i in enumerate(idx):
        sample = torch.from_numpy(dataset[i])
        assert torch.equal(x[row], sample[:-1]) and torch.equal(y[row], sample[1:])


@pytest.mark.parametrize("dp_size", [1, 2])
def test_resume_equals_uninterrupted_tail(dataset, dp_size):
    m = 2
    for rank in range(dp_size):
        full = as_lists(micro_batches(dataset, m, rank, dp_size, 0, with_indices=True))
        assert len(full) == len(dataset) // (m * dp_size)  # incomplete final chunk dropped
        for steps in (1, 5, len(full) - 1):
            resumed = as_lists(micro_batches(dataset, m, rank, dp_size, steps * m * dp_size, with_indices=True))
            assert resumed == full[steps:]


def test_dp2_union_equals_dp1_global_batch(dataset):
    one = list(micro_batches(dataset, 4, 0, 1, with_indices=True))
    r0 = list(micro_batches(dataset, 2, 0, 2, with_indices=True))
    r1 = list(micro_batches(dataset, 2, 1, 2, with_indices=True))
    assert len(one) == len(r0) == len(r1) == 25
    for (x, y, idx), (x0, y0, i0), (x1, y1, i1) in zip(one, r0, r1):
        assert idx == i0 + i1
        assert torch.equal(x, torch.cat([x0, x1])) and torch.equal(y, torch.cat([y0, y1]))
    every = sorted(i for _, _, idx in r0 + r1 for i in idx)
    assert every == list(range(100))  # each sample used once across ranks


def test_sampler_with_dataloader(dataset):
    sampler = MicroBatchSampler(len(dataset), 12, 3, 1, 2)
    assert len(sampler) == (100 - 12) // 6
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_samples)
    direct = list(micro_batches(dataset, 3, 1, 2, 12))
    for (x, y), (dx, dy) in zip(loader, direct):
        assert torch.equal(x, dx) and torch.equal(y, dy)


def test_rejects_misaligned_resume_and_bad_rank():
    with pytest.raises(ValueError, match="multiple of"):
        MicroBatchSampler(100, 5, 2, 0, 2)
    with pytest.raises(ValueError, match="dp_rank"):
        MicroBatchSampler(100, 0, 2, 2, 2)
    assert np.array_equal(collate_samples([np.arange(5)])[1].numpy(), [[1, 2, 3, 4]])


def test_step_batches_match_stream_and_layouts(dataset):
    stream = list(micro_batches(dataset, 2, 0, 1))
    for step in range(3):  # dp=1, accumulation 2: step k is stream items [2k, 2k+2)
        got = micro_batches_for_step(dataset, step * 4, 2, 2, 0, 1)
        assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(got, stream[2 * step:]))
        # Same global batch as dp=2 without accumulation: rank r holds dp=1's r-th micro-batch.
        for r in range(2):
            (x, y), = micro_batches_for_step(dataset, step * 4, 2, 1, r, 2)
            assert torch.equal(x, got[r][0]) and torch.equal(y, got[r][1])
    with pytest.raises(ValueError, match="needs 8 samples"):
        micro_batches_for_step(dataset, 96, 2, 2, 0, 2)
