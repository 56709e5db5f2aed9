"""Shard format: round trips in both dtypes and the exact MMIDIDX v1 bytes, checked by an independent parser."""
from __future__ import annotations

import os
import struct

import numpy as np
import pytest

from data_prep.mmidx import Shard, ShardFormatError, ShardWriter, token_dtype
from tests.prep_fixtures import parse_idx, read_docs


def _docs(rng: np.random.Generator, high: int, n: int = 25) -> list[np.ndarray]:
    return [rng.integers(0, high, size=rng.integers(0, 50)) for _ in range(n)]


@pytest.mark.parametrize("vocab_size,code,np_dtype", [(1000, 8, np.uint16), (65499, 8, np.uint16),
                                                     (65500, 4, np.int32), (250_000, 4, np.int32)])
def test_roundtrip_both_dtypes(tmp_path, vocab_size, code, np_dtype):
    dtype = token_dtype(vocab_size)
    assert dtype == np.dtype(np_dtype)
    rng = np.random.default_rng(vocab_size)
    docs = _docs(rng, vocab_size)
    docs[3] = np.array([vocab_size - 1, 0, vocab_size // 2])  # the largest id survives the round trip
    prefix = str(tmp_path / "shard")
    with ShardWriter(prefix, dtype) as w:
        for d in docs[:10]:
            w.add_document(d)
        flat = np.concatenate(docs[10:])
        w.add_encoded(flat.astype(dtype), [len(d) for d in docs[10:]])
    assert parse_idx(prefix + ".idx")["code"] == code
    assert read_docs([prefix]) == [d.tolist() for d in docs]
    shard = Shard(prefix)
    assert shard.dtype == dtype and shard.num_tokens == sum(len(d) for d in docs)
    assert [shard[i].tolist() for i in range(len(docs))] == [d.tolist() for d in docs]


def test_idx_bytes_follow_the_spec_exactly(tmp_path):
    prefix = str(tmp_path / "s")
    docs = [[5, 6, 7], [], [1], [2, 3]]
    with ShardWriter(prefix, np.uint16) as w:
        for d in docs:
            w.add_document(d)
    raw = open(prefix + ".idx", "rb").read()
    expected = (b"MMIDIDX\x00\x00" + struct.pack("<Q", 1) + struct.pack("<B", 8) + struct.pack("<Q", 4)
                + struct.pack("<Q", 5) + struct.pack("<4i", 3, 0, 1, 2) + struct.pack("<4q", 0, 6, 6, 8)
                + struct.pack("<5q", 0, 1, 2, 3, 4))
    assert raw == expected
    assert open(prefix + ".bin", "rb").read() == struct.pack("<6H", 5, 6, 7, 1, 2, 3)
    # int32: pointers advance by 4 bytes per token, dtype code 4
    with ShardWriter(prefix + "32", np.int32) as w:
        for d in docs:
            w.add_document(d)
    parsed = parse_idx(prefix + "32.idx")
    assert (parsed["version"], parsed["code"], parsed["pointers"], parsed["doc_idx"]) == (1, 4, [0, 12, 12, 16], [0, 1, 2, 3, 4])


def test_writer_is_atomic(tmp_path):
    prefix = str(tmp_path / "s")
    w = ShardWriter(prefix, np.uint16)
    w.add_document([1, 2, 3])
    assert not os.path.exists(prefix + ".bin") and not os.path.exists(prefix + ".idx")
    w.abort()
    assert os.listdir(tmp_path) == []


def test_reader_rejects_truncated_shards(tmp_path):
    prefix = str(tmp_path / "s")
    with ShardWriter(prefix, np.uint16) as w:
        w.add_document(list(range(100)))
    with open(prefix + ".bin", "r+b") as f:
        f.truncate(150)
    with pytest.raises(ShardFormatError, match=r"s\.bin: 150 bytes .* 100 tokens"):
        Shard(prefix)
    with open(prefix + ".idx", "r+b") as f:
        f.truncate(40)
    with pytest.raises(ShardFormatError, match="truncated or corrupt"):
        Shard(prefix)


def test_data_prep_never_imports_torch():
    import subprocess
    import sys

    code = ("import sys, data_prep.cli, data_prep.pipeline, data_prep.inspection, data_prep.merge, data_prep.demo, "
            "data_prep.trainer; assert 'torch' not in sys.modules and 'deepspeed' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=os.path.dirname(os.path.dirname(__file__)))
