"""Megatron MMIDIDX v1 token shards: the on-disk format, a streaming writer and a validating header reader.

A shard is a pair PREFIX.bin / PREFIX.idx (DESIGN.md decision 6), byte-compatible with Megatron-LM's
`IndexedDataset` and GPT-NeoX's `MMapIndexedDataset`:

    .idx  b"MMIDIDX\\x00\\x00"                      9 bytes magic
          version               <Q  (= 1)
          dtype code            <B  (1 uint8, 2 int8, 3 int16, 4 int32, 5 int64, 8 uint16)
          sequence count  S     <Q
          document count  D     <Q  (= number of documents + 1)
          sequence_lengths      int32[S]   tokens per sequence
          sequence_pointers     int64[S]   byte offset of each sequence in .bin
          document_indices      int64[D]   0, then the end (exclusive sequence index) of every document
    .bin  the tokens of all sequences back to back, in the dtype above

We write one sequence per document (no sentence splitting), so document_indices = 0, 1, ..., S.
This module is numpy-only: data_prep must run where torch is not installed.
"""
from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from typing import Iterable

import numpy as np

INDEX_MAGIC = b"MMIDIDX\x00\x00"
INDEX_VERSION = 1
HEADER_SIZE = len(INDEX_MAGIC) + 8 + 1 + 8 + 8  # magic, version, dtype code, sequence count, document count

DTYPE_CODES: dict[int, np.dtype] = {
    1: np.dtype(np.uint8),
    2: np.dtype(np.int8),
    3: np.dtype(np.int16),
    4: np.dtype(np.int32),
    5: np.dtype(np.int64),
    8: np.dtype(np.uint16),
}
CODE_OF_DTYPE = {dt: code for code, dt in DTYPE_CODES.items()}

# Megatron picks uint16 below this vocabulary size and int32 at or above it.
UINT16_VOCAB_LIMIT = 65500


class ShardFormatError(ValueError):
    """A .idx/.bin pair is missing, truncated, or does not follow the MMIDIDX v1 layout."""


def token_dtype(vocab_size: int) -> np.dtype:
    """The token dtype Megatron uses for this vocabulary size (uint16 below 65,500, else int32)."""
    return np.dtype(np.uint16) if vocab_size < UINT16_VOCAB_LIMIT else np.dtype(np.int32)


def index_path(prefix: str) -> str:
    return prefix + ".idx"


def data_path(prefix: str) -> str:
    return prefix + ".bin"


@dataclass(frozen=True)
class IndexHeader:
    dtype: np.dtype
    sequence_count: int
    document_count: int  # entries in document_indices (documents + 1)

    @property
    def expected_index_size(self) -> int:
        return HEADER_SIZE + self.sequence_count * (4 + 8) + self.document_count * 8


def encode_index(lengths: np.ndarray, dtype: np.dtype, document_indices: np.ndarray | None = None) -> bytes:
    """The complete .idx bytes for sequences of `lengths` tokens stored back to back in `dtype`."""
    dtype = np.dtype(dtype)
    if dtype not in CODE_OF_DTYPE:
        raise ValueError(f"token dtype {dtype} has no MMIDIDX code; use one of {sorted(map(str, CODE_OF_DTYPE))}")
    lengths = np.asarray(lengths, dtype=np.int32)
    pointers = np.zeros(len(lengths), dtype=np.int64)
    if len(lengths) > 1:
        np.cumsum(lengths[:-1].astype(np.int64) * dtype.itemsize, out=pointers[1:])
    if document_indices is None:
        document_indices = np.arange(len(lengths) + 1, dtype=np.int64)
    document_indices = np.asarray(document_indices, dtype=np.int64)
    head = INDEX_MAGIC + struct.pack("<Q", INDEX_VERSION) + struct.pack("<B", CODE_OF_DTYPE[dtype])
    head += struct.pack("<Q", len(lengths)) + struct.pack("<Q", len(document_indices))
    return head + lengths.tobytes(order="C") + pointers.tobytes(order="C") + document_indices.tobytes(order="C")


def read_index_header(idx_file: str) -> IndexHeader:
    """Parse and validate the fixed header of an .idx file; errors name the file and the problem."""
    try:
        size = os.path.getsize(idx_file)
        with open(idx_file, "rb") as f:
            head = f.read(HEADER_SIZE)
    except FileNotFoundError:
        raise ShardFormatError(f"{idx_file}: index file does not exist") from None
    if len(head) < HEADER_SIZE:
        raise ShardFormatError(f"{idx_file}: truncated index header ({len(head)} of {HEADER_SIZE} bytes)")
    if head[:9] != INDEX_MAGIC:
        raise ShardFormatError(f"{idx_file}: not an MMIDIDX index (magic {head[:9]!r}, expected {INDEX_MAGIC!r})")
    (version,) = struct.unpack_from("<Q", head, 9)
    if version != INDEX_VERSION:
        raise ShardFormatError(f"{idx_file}: index version {version} is not supported (expected {INDEX_VERSION})")
    (code,) = struct.unpack_from("<B", head, 17)
    if code not in DTYPE_CODES:
        raise ShardFormatError(f"{idx_file}: unknown token dtype code {code} (valid: {sorted(DTYPE_CODES)})")
    seq_count, doc_count = struct.unpack_from("<QQ", head, 18)
    header = IndexHeader(DTYPE_CODES[code], seq_count, doc_count)
    if size != header.expected_index_size:
        raise ShardFormatError(
            f"{idx_file}: index is {size} bytes but its header ({seq_count} sequences, {doc_count} document "
            f"entries) implies {header.expected_index_size}: the file is truncated or corrupt")
    return header


class ShardWriter:
    """Streams documents into PREFIX.bin/.idx under temporary names; `finish()` renames them into place.

    Until `finish()` returns, neither PREFIX.bin nor PREFIX.idx exists, so an interrupted writer never
    leaves a shard that looks valid. The .idx is renamed last: a reader keyed on the .idx sees either no
    shard or a complete one.
    """

    TMP_SUFFIX = ".tmp"

    def __init__(self, prefix: str, dtype: np.dtype):
        self.prefix = prefix
        self.dtype = np.dtype(dtype)
        if self.dtype not in CODE_OF_DTYPE:
            raise ValueError(f"token dtype {self.dtype} has no MMIDIDX code")
        self._bin_tmp = data_path(prefix) + self.TMP_SUFFIX
        self._idx_tmp = index_path(prefix) + self.TMP_SUFFIX
        self._bin = open(self._bin_tmp, "wb")
        self._lengths: list[int] = []
        self.tokens = 0

    def add_document(self, tokens: Iterable[int] | np.ndarray) -> None:
        arr = np.asarray(tokens, dtype=self.dtype)
        self._bin.write(arr.tobytes(order="C"))
        self._lengths.append(int(arr.size))
        self.tokens += int(arr.size)

    def add_encoded(self, flat: np.ndarray, lengths: Iterable[int]) -> None:
        """Append many documents at once: `flat` holds their tokens back to back (already in dtype)."""
        flat = np.asarray(flat, dtype=self.dtype)
        self._bin.write(flat.tobytes(order="C"))
        lengths = list(lengths)
        self._lengths.extend(lengths)
        self.tokens += int(flat.size)

    @property
    def documents(self) -> int:
        return len(self._lengths)

    def finish(self) -> None:
        self._bin.flush()
        os.fsync(self._bin.fileno())
        self._bin.close()
        with open(self._idx_tmp, "wb") as f:
            f.write(encode_index(np.asarray(self._lengths, dtype=np.int32), self.dtype))
            f.flush()
            os.fsync(f.fileno())
        os.replace(self._bin_tmp, data_path(self.prefix))
        os.replace(self._idx_tmp, index_path(self.prefix))

    def abort(self) -> None:
        """Close and delete the temporary files (the shard never appears)."""
        if not self._bin.closed:
            self._bin.close()
        for p in (self._bin_tmp, self._idx_tmp):
            if os.path.exists(p):
                os.unlink(p)

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.finish()
        else:
            self.abort()
