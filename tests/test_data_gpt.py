"""GPTDataset: sample contents, Megatron equivalence of the vectorised index, seeds, epochs, subsets, cache."""
from __future__ import annotations

import hashlib
import os

import numpy as np
import pytest

from bench.index_build import megatron_sample_index  # the line-by-line port of Megatron's C++ loop
from megalm.data import GPTDataset, IndexedDataset
from megalm.data.gpt_dataset import build_doc_index, build_sample_index
from tests.test_data_indexed import random_docs, write_shard


def stream_of(ds: GPTDataset) -> np.ndarray:
    """All documents in doc_index order, concatenated: the token stream samples are cut from."""
    return np.concatenate([np.asarray(ds.indexed[int(d)], np.int64) for d in ds.doc_index])


@pytest.mark.parametrize("seq_len", [1, 3, 16, 100])
def test_sample_index_matches_megatron_loop(seq_len):
    rng = np.random.default_rng(seq_len)
    sizes = rng.integers(0, 30, 300).astype(np.int32)  # includes empty documents
    sizes[-1] = 0
    doc_idx = build_doc_index(np.arange(300), 3, np.random.RandomState(5), False)
    tokens = int(sizes.sum())
    ours = build_sample_index(sizes, doc_idx, seq_len)
    num_samples = (3 * tokens - 1) // seq_len  # Megatron's count for 3 epochs
    assert np.array_equal(ours, megatron_sample_index(sizes, doc_idx, seq_len, num_samples))


@pytest.mark.parametrize("dtype", [np.uint16, np.int32])
def test_sample_contents(tmp_path, dtype):
    docs = random_docs(40, seed=1, empty_every=9)
    shard = IndexedDataset(write_shard(tmp_path / "s", docs, dtype))
    seq_len = 8
    per_epoch = (shard.num_tokens - 1) // seq_len
    ds = GPTDataset(shard, seq_len, per_epoch, seed=3)
    assert len(ds) == per_epoch and ds.num_epochs == 1
    assert sorted(ds.doc_index.tolist()) == list(range(40))  # each document once per epoch
    stream = stream_of(ds)
    unshuffled = [ds.stream_sample(j) for j in range(per_epoch)]
    for j, s in enumerate(unshuffled):
        assert s.dtype == np.int64 and len(s) == seq_len + 1
        assert np.array_equal(s, stream[j * seq_len: j * seq_len + seq_len + 1])
        if j:
            assert s[0] == unshuffled[j - 1][-1]  # consecutive samples overlap by exactly one token
    assert sorted(ds.shuffle_index.tolist()) == list(range(per_epoch))
    assert ds.shuffle_index.tolist() != list(range(per_epoch))  # actually shuffled
    for i in range(len(ds)):
        assert np.array_equal(ds[i], unshuffled[int(ds.shuffle_index[i])])
    with pytest.raises(IndexError):
        ds[len(ds)]


def test_seed_determinism(tmp_path):
    shard = IndexedDataset(write_shard(tmp_path / "s", random_docs(60, seed=2)))
    a, b, c = (GPTDataset(shard, 16, 50, seed=s) for s in (7, 7, 8))
    assert all(np.array_equal(a[i], b[i]) for i in range(50))
    assert not np.array_equal(a.doc_index, c.doc_index)
    assert not all(np.array_equal(a[i], c[i]) for i in range(50))


@pytest.mark.parametrize("num_samples,separate", [(120, False), (101, True)])  # last epoch used >= / < 80%
def test_epoch_wrap(tmp_path, num_samples, separate):
    docs = random_docs(30, seed=4)
    shard = IndexedDataset(write_shard(tmp_path / "s", docs))
    seq_len = 16
    per_epoch = (shard.num_tokens - 1) // seq_len
    assert per_epoch < num_samples
    ds = GPTDataset(shard, seq_len, num_samples, seed=1)
    assert len(ds) == num_samples and ds.num_epochs == -(-(num_samples * seq_len + 1) // shard.num_tokens)
    assert ds.num_epochs > 1
    counts = np.bincount(ds.doc_index, minlength=30)
    assert (counts == ds.num_epochs).all()  # every document exactly once per epoch
    last_epoch_share = (num_samples - ((ds.num_epochs - 1) * shard.num_tokens - 1) // seq_len) / per_epoch
    assert (last_epoch_share < 0.8) == separate  # the case exercises the branch it is meant to
    if separate:  # Megatron: last epoch's documents and samples shuffled on their own
        assert sorted(ds.doc_index[-30:].tolist()) == list(range(30))
        first = ((ds.num_epochs - 1) * shard.num_tokens - 1) // seq_len
        assert sorted(ds.shuffle_index[:first].tolist()) == list(range(first))
    stream = stream_of(ds)
    for i in range(len(ds)):
        j = int(ds.shuffle_index[i])
        assert np.array_equal(ds[i], stream[j * seq_len: j * seq_len + seq_len + 1])


def test_document_subset(tmp_path):
    # Document d holds only the token value d, so every sample token names the document it came from.
    docs = [[d] * (5 + d % 7) for d in range(50)]
    shard = IndexedDataset(write_shard(tmp_path / "s", docs))
    subset = np.arange(10, 25)
    ds = GPTDataset(shard, 6, 80, seed=0, documents=subset)
    seen = np.unique(np.concatenate([ds[i] for i in range(len(ds))]))
    assert set(seen.tolist()) <= set(subset.tolist()) and len(seen) == len(subset)
    assert set(ds.doc_index.tolist()) == set(subset.tolist())
    with pytest.raises(ValueError, match="document ids"):
        GPTDataset(shard, 6, 10, seed=0, documents=[49, 50])


def test_cache_built_once_and_reused(tmp_path):
    shard = IndexedDataset(write_shard(tmp_path / "s", random_docs(40, seed=5)))
    cache = str(tmp_path / "cache")
    first = GPTDataset(shard, 8, 70, seed=2, cache_dir=cache, name="train")
    assert first.built_indices
    files = sorted(os.listdir(cache))
    npys = [f for f in files if f.endswith(".npy")]
    assert len(npys) == 3 and all(first.cache_key in f for f in files)
    mtimes = {f: os.stat(os.path.join(cache, f)).st_mtime_ns for f in files}
    second = GPTDataset(shard, 8, 70, seed=2, cache_dir=cache, name="train")
    assert not second.built_indices
    assert {f: os.stat(os.path.join(cache, f)).st_mtime_ns for f in files} == mtimes
    assert sorted(os.listdir(cache)) == files  # no temporaries left behind
    for i in range(70):
        assert np.array_equal(first[i], second[i])
    other = GPTDataset(shard, 8, 70, seed=3, cache_dir=cache, name="train")
    assert other.built_indices and other.cache_key != first.cache_key
    # A damaged cache file is rebuilt, not trusted.
    victim = os.path.join(cache, [f for f in npys if f.endswith("-shuffle.npy")][0])
    with open(victim, "wb") as f:
        f.write(b"garbage")
    again = GPTDataset(shard, 8, 70, seed=2, cache_dir=cache, name="train")
    assert again.built_indices and np.array_equal(again.shuffle_index, first.shuffle_index)


def _digest(ds: GPTDataset) -> str:
    h = hashlib.sha256()
    for a in (ds.doc_index, ds.sample_index, ds.shuffle_index):
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def _build_on_rank(prefix: str, cache_dir: str):
    import torch.distributed as dist

    ds = GPTDataset(prefix, 8, 90, seed=11, cache_dir=cache_dir)
    return dist.get_rank(), ds.built_indices, _digest(ds)


def _build_failing_on_rank(prefix: str, cache_dir: str):
    try:
        GPTDataset(prefix, 8, 90, seed=11, cache_dir=cache_dir)
    except Exception as e:  # returned, not raised, so the shared pool stays usable
        return type(e).__name__, str(e)
    return "no error", ""


def test_cache_built_by_rank0_loaded_by_others(tmp_path, rank_pool):
    prefix = write_shard(tmp_path / "s", random_docs(40, seed=6))
    cache = str(tmp_path / "cache")
    results = rank_pool(2).run(_build_on_rank, prefix, cache, timeout=60)
    assert [(r, built) for r, built, _ in results] == [(0, True), (1, False)]
    assert results[0][2] == results[1][2] == _digest(GPTDataset(prefix, 8, 90, seed=11))
    # When rank 0 cannot build (cache dir is a file), every rank gets an error; nobody waits forever.
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    errors = rank_pool(2).run(_build_failing_on_rank, prefix, str(blocker), timeout=60)
    assert errors[0][0] != "no error" and "rank 0 failed" in errors[1][1], errors
