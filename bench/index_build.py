"""Benchmark: GPTDataset index build (document / sample / shuffle indices) for a 1B-token shard.

Writes a synthetic uint16 shard (random document lengths, mean ~1000 tokens) into a temporary directory,
times the index build for one epoch of seq_len-2048 samples, and deletes the shard. Target: < 10 s.
Baseline in the same run: Megatron's per-sample sample-index loop (pure Python here; Megatron compiles
it in C++), timed on a slice and extrapolated, printed as a ratio.

    python -m bench.index_build [--tokens 1000000000] [--seq-len 2048] [--dir /tmp]
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

import numpy as np

if __package__ in (None, ""):  # allow `python bench/index_build.py`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data_prep.mmidx import ShardWriter  # noqa: E402
from megalm.data import GPTDataset, IndexedDataset  # noqa: E402
from megalm.data.gpt_dataset import build_doc_index, build_sample_index, build_shuffle_index  # noqa: E402

TARGET_S = 10.0
CHUNK_TOKENS = 1 << 26  # 64M tokens (128 MB) per write


def document_lengths(total_tokens: int, mean: int, rng: np.random.Generator) -> np.ndarray:
    """Uniform lengths in [1, 2*mean) cut so they sum to exactly total_tokens."""
    lengths = rng.integers(1, 2 * mean, size=int(total_tokens / mean * 1.1) + 16, dtype=np.int64)
    ends = np.cumsum(lengths)
    n = int(np.searchsorted(ends, total_tokens)) + 1
    lengths = lengths[:n]
    lengths[-1] -= int(ends[n - 1]) - total_tokens
    return lengths.astype(np.int32)


def write_shard(prefix: str, lengths: np.ndarray, rng: np.random.Generator) -> None:
    # Token values do not affect the index build; one random buffer is reused for every chunk.
    buffer = rng.integers(0, 65000, size=CHUNK_TOKENS + int(lengths.max()), dtype=np.uint16)
    ends = np.cumsum(lengths, dtype=np.int64)
    with ShardWriter(prefix, np.uint16) as w:
        first = 0
        while first < len(lengths):
            last = int(np.searchsorted(ends, (ends[first - 1] if first else 0) + CHUNK_TOKENS, side="right"))
            last = max(last, first + 1)
            chunk = lengths[first:last]
            w.add_encoded(buffer[: int(chunk.sum(dtype=np.int64))], chunk.tolist())
            first = last


def megatron_sample_index(sizes: np.ndarray, doc_idx: np.ndarray, seq_len: int, num_samples: int) -> np.ndarray:
    """Line-by-line port of Megatron-LM's C++ helpers.build_sample_idx: the baseline timed here and the
    reference tests/test_data_gpt.py checks our vectorised build against."""
    out = np.zeros((num_samples + 1, 2), np.int64)
    doc_idx_index, doc_offset = 0, 0
    for s in range(1, num_samples + 1):
        remaining = seq_len + 1
        while remaining != 0:
            doc_length = int(sizes[doc_idx[doc_idx_index]]) - doc_offset
            remaining -= doc_length
            if remaining <= 0:
                doc_offset += remaining + doc_length - 1
                remaining = 0
            else:
                doc_idx_index += 1
                doc_offset = 0
        out[s] = (doc_idx_index, doc_offset)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=1_000_000_000)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--mean-doc", type=int, default=1000)
    ap.add_argument("--dir", default=None, help="parent of the temporary shard directory (needs 2 bytes/token)")
    ap.add_argument("--seed", type=int, default=1234)
    args = ap.parse_args(argv)

    rng = np.random.default_rng(args.seed)
    workdir = tempfile.mkdtemp(prefix="megalm-index-bench-", dir=args.dir)
    try:
        prefix = os.path.join(workdir, "synthetic")
        lengths = document_lengths(args.tokens, args.mean_doc, rng)
        t0 = time.perf_counter()
        write_shard(prefix, lengths, rng)
        write_s = time.perf_counter() - t0
        print(f"shard: {args.tokens:,} uint16 tokens, {len(lengths):,} documents (mean {lengths.mean():.0f}), "
              f"written in {write_s:.1f} s ({2 * args.tokens / write_s / 1e6:.0f} MB/s)")

        t0 = time.perf_counter()
        shard = IndexedDataset(prefix)
        open_s = time.perf_counter() - t0
        seq_len = args.seq_len
        num_samples = (shard.num_tokens - 1) // seq_len  # one epoch
        docs = np.arange(len(shard), dtype=np.int64)
        sizes = shard.sequence_lengths

        # The three steps on their own (same work GPTDataset does without a cache).
        t0 = time.perf_counter()
        rs = np.random.RandomState(args.seed)
        doc_index = build_doc_index(docs, 1, rs, False)
        t1 = time.perf_counter()
        sample_index = build_sample_index(sizes, doc_index, seq_len)
        t2 = time.perf_counter()
        build_shuffle_index(len(sample_index) - 1, len(sample_index) - 1, rs)
        t3 = time.perf_counter()
        print(f"open + validate shard: {open_s:.3f} s")
        print(f"doc index {t1 - t0:.3f} s | sample index {t2 - t1:.3f} s | shuffle index {t3 - t2:.3f} s")

        cache = os.path.join(workdir, "index-cache")
        t0 = time.perf_counter()
        ds = GPTDataset(shard, seq_len, num_samples, args.seed, cache_dir=cache)
        build_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        again = GPTDataset(shard, seq_len, num_samples, args.seed, cache_dir=cache)
        load_s = time.perf_counter() - t0
        assert ds.built_indices and not again.built_indices and len(again) == num_samples
        t0 = time.perf_counter()
        for i in range(0, num_samples, max(1, num_samples // 2000)):
            again[i]
        read_us = (time.perf_counter() - t0) / len(range(0, num_samples, max(1, num_samples // 2000))) * 1e6

        probe = min(20_000, num_samples)
        t0 = time.perf_counter()
        megatron_sample_index(sizes, doc_index, seq_len, probe)
        loop_s = (time.perf_counter() - t0) * num_samples / probe
        print(f"GPTDataset index build, seq_len {seq_len}, {num_samples:,} samples (1 epoch), incl. hashing "
              f"and writing the cache: {build_s:.2f} s (target < {TARGET_S:.0f} s: "
              f"{'PASS' if build_s < TARGET_S else 'FAIL'})")
        print(f"reload from cache: {load_s:.3f} s | random sample read: {read_us:.0f} us")
        print(f"baseline: Megatron's per-sample loop in Python, extrapolated from {probe:,} samples: "
              f"{loop_s:.1f} s for the sample index alone -> vectorised build is {loop_s / (t2 - t1):.0f}x faster")
        return 0 if build_s < TARGET_S else 1
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
