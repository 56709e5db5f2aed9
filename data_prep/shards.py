"""Reading shards back (for inspect, merge and resume checks) with numpy only, validating as we go.

megalm.data has the training-time reader; this one is deliberately separate because data_prep must
not import anything that pulls in torch.
"""
from __future__ import annotations

import glob as globlib
import json
import os
import re
from dataclasses import dataclass

import numpy as np

from data_prep.errors import PrepError
from data_prep.mmidx import HEADER_SIZE, IndexHeader, ShardFormatError, data_path, index_path, read_index_header

SHARD_DIGITS = 5


def numbered_prefix(prefix: str, index: int) -> str:
    """PREFIX_00000, PREFIX_00001, ...: the names used when an output has several shards."""
    return f"{prefix}_{index:0{SHARD_DIGITS}d}"


def manifest_path(prefix: str) -> str:
    return prefix + ".manifest.json"


@dataclass
class ShardIndex:
    prefix: str
    header: IndexHeader
    lengths: np.ndarray  # int32[S]
    pointers: np.ndarray  # int64[S]
    document_indices: np.ndarray  # int64[D]

    @property
    def dtype(self) -> np.dtype:
        return self.header.dtype

    @property
    def tokens(self) -> int:
        return int(self.lengths.sum(dtype=np.int64))

    def data(self) -> np.ndarray:
        """The .bin as a read-only memory map of tokens (empty array for an empty shard)."""
        if self.tokens == 0:
            return np.zeros(0, dtype=self.dtype)
        return np.memmap(data_path(self.prefix), dtype=self.dtype, mode="r")

    def document(self, i: int) -> np.ndarray:
        start = int(self.pointers[i]) // self.dtype.itemsize
        return np.asarray(self.data()[start:start + int(self.lengths[i])])


def read_shard_index(prefix: str) -> ShardIndex:
    """Parse PREFIX.idx and check it against PREFIX.bin; ShardFormatError names the file and problem."""
    idx = index_path(prefix)
    header = read_index_header(idx)
    with open(idx, "rb") as f:
        f.seek(HEADER_SIZE)
        body = f.read()
    s, d = header.sequence_count, header.document_count
    lengths = np.frombuffer(body, dtype=np.int32, count=s, offset=0)
    pointers = np.frombuffer(body, dtype=np.int64, count=s, offset=4 * s)
    docs = np.frombuffer(body, dtype=np.int64, count=d, offset=12 * s)
    shard = ShardIndex(prefix, header, lengths, pointers, docs)
    bin_file = data_path(prefix)
    if not os.path.isfile(bin_file):
        raise ShardFormatError(f"{bin_file}: data file does not exist (its index {idx} does)")
    want = shard.tokens * header.dtype.itemsize
    have = os.path.getsize(bin_file)
    if have != want:
        raise ShardFormatError(f"{bin_file}: {have} bytes but {idx} describes {shard.tokens} tokens "
                               f"of {header.dtype} = {want} bytes: the shard is truncated or corrupt")
    return shard


def output_shards(prefix: str) -> list[str]:
    """The shard prefixes that make up an output: the manifest's list, else PREFIX itself, else PREFIX_NNNNN."""
    mpath = manifest_path(prefix)
    if os.path.isfile(mpath):
        with open(mpath) as f:
            manifest = json.load(f)
        base = os.path.dirname(prefix)
        return [os.path.join(base, entry["name"]) for entry in manifest.get("shards", [])]
    if os.path.isfile(index_path(prefix)):
        return [prefix]
    pattern = re.compile(re.escape(os.path.basename(prefix)) + r"_\d{%d}\.idx$" % SHARD_DIGITS)
    found = sorted(p[:-4] for p in globlib.glob(globlib.escape(prefix) + "_*.idx")
                   if pattern.match(os.path.basename(p)))
    if not found:
        raise PrepError(f"no shards found for prefix {prefix!r} (looked for {prefix}.idx, "
                        f"{prefix}_00000.idx, ... and {mpath})")
    return found
