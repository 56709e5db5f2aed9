"""IndexedDataset: round trip of both token dtypes and every kind of corrupt shard, named in the error."""
from __future__ import annotations

import os
import struct

import numpy as np
import pytest

from data_prep.mmidx import HEADER_SIZE, ShardWriter, encode_index
from megalm.data import IndexedDataset, ShardFormatError


def write_shard(prefix: str, docs: list, dtype=np.uint16) -> str:
    """Write `docs` (lists of token ids) as one shard; used by the other data tests too."""
    with ShardWriter(str(prefix), dtype) as w:
        for d in docs:
            w.add_document(d)
    return str(prefix)


def random_docs(n: int, seed: int = 0, max_len: int = 40, vocab: int = 60000, empty_every: int = 0) -> list:
    rng = np.random.default_rng(seed)
    docs = [rng.integers(0, vocab, rng.integers(1, max_len)).tolist() for _ in range(n)]
    if empty_every:
        for i in range(0, n, empty_every):
            docs[i] = []
    return docs


@pytest.mark.parametrize("dtype,vocab", [(np.uint16, 65535), (np.int32, 2**31 - 1)])
def test_round_trip(tmp_path, dtype, vocab):
    docs = random_docs(50, vocab=vocab, empty_every=7)
    ds = IndexedDataset(write_shard(tmp_path / "s", docs, dtype))
    assert len(ds) == 50 and ds.num_documents == 50 and ds.dtype == np.dtype(dtype)
    assert ds.num_tokens == sum(map(len, docs))
    assert ds.sequence_lengths.tolist() == [len(d) for d in docs]
    assert ds.document_indices.tolist() == list(range(51))
    for i, d in enumerate(docs):
        assert ds[i].tolist() == d and ds[i].dtype == np.dtype(dtype)
    assert ds[-1].tolist() == docs[-1]
    d3 = docs[3]
    assert ds.get(3, 2).tolist() == d3[2:]
    assert ds.get(3, 1, 2).tolist() == d3[1:3]
    assert not ds[3].flags.owndata  # a view into the mmap, not a copy
    with pytest.raises(IndexError):
        ds[50]
    with pytest.raises(IndexError):
        ds.get(3, 0, len(d3) + 1)


def test_empty_shard(tmp_path):
    ds = IndexedDataset(write_shard(tmp_path / "e", []))
    assert len(ds) == 0 and ds.num_tokens == 0


def _patch(path: str, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def _corrupt(tmp_path, case: str) -> tuple[str, str]:
    """Build a good shard, damage it as `case` says; return (prefix, file the error must name)."""
    docs = [[1, 2, 3], [4, 5], [6, 7, 8, 9]]
    prefix = write_shard(tmp_path / "c", docs)
    idx, bin_ = prefix + ".idx", prefix + ".bin"
    n = len(docs)
    ptr_off = HEADER_SIZE + 4 * n
    doc_off = ptr_off + 8 * n
    if case == "truncated idx":
        os.truncate(idx, os.path.getsize(idx) - 8)
    elif case == "truncated header":
        os.truncate(idx, 12)
    elif case == "truncated bin":
        os.truncate(bin_, os.path.getsize(bin_) - 2)
    elif case == "bin too long":
        with open(bin_, "ab") as f:
            f.write(b"\0\0")
    elif case == "wrong magic":
        _patch(idx, 0, b"XXIDIDX\0\0")
    elif case == "bad version":
        _patch(idx, 9, struct.pack("<Q", 2))
    elif case == "bad dtype code":
        _patch(idx, 17, struct.pack("<B", 7))
    elif case == "doc indices not from 0":
        _patch(idx, doc_off, struct.pack("<q", 1))
    elif case == "doc indices decrease":
        with open(idx, "wb") as f:
            f.write(encode_index(np.array([3, 2, 4]), np.uint16, np.array([0, 2, 1, 3])))
    elif case == "doc indices wrong end":
        _patch(idx, doc_off + 8 * n, struct.pack("<q", n + 5))
    elif case == "pointer mismatch":
        _patch(idx, ptr_off + 8, struct.pack("<q", 2))
    elif case == "negative length":
        _patch(idx, HEADER_SIZE + 4, struct.pack("<i", -2))
    elif case == "missing idx":
        os.unlink(idx)
    elif case == "missing bin":
        os.unlink(bin_)
    else:
        raise AssertionError(case)
    return prefix, (bin_ if "bin" in case else idx)


CORRUPTIONS = {
    "truncated idx": "truncated or corrupt", "truncated header": "truncated index header",
    "truncated bin": "truncated or corrupt", "bin too long": "truncated or corrupt",
    "wrong magic": "not an MMIDIDX index", "bad version": "version 2 is not supported",
    "bad dtype code": "unknown token dtype code 7", "doc indices not from 0": "must start at 0",
    "doc indices decrease": "decrease at entry 2", "doc indices wrong end": "must end at the sequence count",
    "pointer mismatch": "sequence 1 has byte pointer 2", "negative length": "negative length",
    "missing idx": "does not exist", "missing bin": "does not exist",
}


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_corrupt_shard_is_named_error(tmp_path, case):
    prefix, bad_file = _corrupt(tmp_path, case)
    with pytest.raises(ShardFormatError) as err:
        IndexedDataset(prefix)
    msg = str(err.value)
    assert bad_file in msg, msg
    assert CORRUPTIONS[case] in msg, msg


def test_directory_instead_of_index(tmp_path):
    os.mkdir(tmp_path / "d.idx")
    with pytest.raises(ShardFormatError, match="d.idx"):
        IndexedDataset(str(tmp_path / "d"))
