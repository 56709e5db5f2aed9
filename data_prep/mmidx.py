"""Megatron MMIDIDX v1 token shards: the on-disk format, a streaming writer and the one validating reader.

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
This module is numpy-only: data_prep must run where torch is not installed. It is the only place that
parses .idx bytes (tests/test_shard_contract.py checks): megalm.data.IndexedDataset *is* `Shard`.
"""
from __future__ import annotations

import json
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


def default_cache_dir(prefix: str) -> str:
    """Where facts derived from a shard are cached by default (sample indices, max token id): an
    `index-cache` folder beside the shard (`data.cache_dir` moves the sample indices elsewhere)."""
    return os.path.join(os.path.dirname(os.path.abspath(prefix)), "index-cache")


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


class Shard:
    """One shard, validated up front and memory-mapped; `shard[i]` is sequence i's tokens, zero-copy.

    Everything a reader could trip over later is checked once, vectorised, so a truncated or corrupt
    shard fails here with a ShardFormatError naming the file, not as an out-of-bounds slice, a garbage
    sample or a hang deep inside training (DESIGN.md decision 10). Items are *sequences*, as in
    Megatron's IndexedDataset; `document_indices` groups them into documents (our writer: one each).
    """

    def __init__(self, prefix: str):
        self.prefix = str(prefix)
        self.idx_file = index_path(self.prefix)
        self.bin_file = data_path(self.prefix)
        try:
            self.header = read_index_header(self.idx_file)  # magic, version, dtype code, exact .idx size
        except OSError as e:  # a directory, a permission problem: still an error that names the file
            raise ShardFormatError(f"{self.idx_file}: cannot read index: {e.strerror or e}") from None
        self.dtype: np.dtype = self.header.dtype
        seqs, docs = self.header.sequence_count, self.header.document_count
        # read_index_header proved the file is exactly large enough for these three arrays. Plain ndarray
        # views (they keep the mmap alive) so that slices are ordinary arrays, not np.memmap.
        idx = np.memmap(self.idx_file, dtype=np.uint8, mode="r").view(np.ndarray)
        off = HEADER_SIZE
        self.sequence_lengths: np.ndarray = idx[off:off + 4 * seqs].view(np.int32)
        off += 4 * seqs
        self.sequence_pointers: np.ndarray = idx[off:off + 8 * seqs].view(np.int64)
        off += 8 * seqs
        self.document_indices: np.ndarray = idx[off:off + 8 * docs].view(np.int64)
        self.num_tokens: int = self._validate_index()
        self._tokens = self._open_bin()
        # Token offset of each sequence; pointers were validated to be contiguous, so this is exact.
        self._starts = self.sequence_pointers // self.dtype.itemsize

    def _fail(self, what: str) -> None:
        raise ShardFormatError(f"{self.idx_file}: {what}: the index is corrupt")

    def _validate_index(self) -> int:
        """Check the index arrays against each other; return the total token count they describe."""
        lengths, pointers, docs = self.sequence_lengths, self.sequence_pointers, self.document_indices
        seqs = len(lengths)
        if len(docs) == 0:
            self._fail("document_indices is empty (it must hold at least the leading 0)")
        if docs[0] != 0:
            self._fail(f"document_indices must start at 0, found {int(docs[0])}")
        if docs[-1] != seqs:
            self._fail(f"document_indices must end at the sequence count {seqs}, found {int(docs[-1])}")
        steps = np.diff(docs)
        if (steps < 0).any():
            at = int(np.flatnonzero(steps < 0)[0])
            self._fail(f"document_indices decrease at entry {at + 1} ({int(docs[at])} -> {int(docs[at + 1])})")
        if seqs == 0:
            return 0
        if (lengths < 0).any():
            at = int(np.flatnonzero(lengths < 0)[0])
            self._fail(f"sequence {at} has negative length {int(lengths[at])}")
        # Sequences are stored back to back: pointer[i] = bytes of all sequences before i.
        sizes = lengths.astype(np.int64) * self.dtype.itemsize
        expected = np.zeros(seqs, np.int64)
        np.cumsum(sizes[:-1], out=expected[1:])
        bad = pointers != expected
        if bad.any():
            at = int(np.flatnonzero(bad)[0])
            self._fail(f"sequence {at} has byte pointer {int(pointers[at])} but the lengths before it "
                       f"put it at {int(expected[at])}")
        return int((int(expected[-1]) + int(sizes[-1])) // self.dtype.itemsize)

    def _open_bin(self) -> np.ndarray:
        try:
            size = os.path.getsize(self.bin_file)
        except FileNotFoundError:
            raise ShardFormatError(f"{self.bin_file}: data file does not exist (its index {self.idx_file} does)") from None
        except OSError as e:
            raise ShardFormatError(f"{self.bin_file}: cannot read data file: {e.strerror or e}") from None
        if not os.path.isfile(self.bin_file):
            raise ShardFormatError(f"{self.bin_file}: data file is not a regular file")
        expected = self.num_tokens * self.dtype.itemsize
        if size != expected:
            raise ShardFormatError(
                f"{self.bin_file}: {size} bytes but {self.idx_file} describes {self.num_tokens} tokens "
                f"of {self.dtype} = {expected} bytes: the shard is truncated or corrupt")
        if size == 0:  # mmap cannot map an empty file
            return np.zeros(0, self.dtype)
        return np.memmap(self.bin_file, dtype=self.dtype, mode="r").view(np.ndarray)

    def __len__(self) -> int:
        return len(self.sequence_lengths)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.get(i)

    def get(self, i: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens [offset, offset+length) of sequence i (to its end when length is None), zero-copy."""
        n = len(self)
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError(f"sequence {i} out of range for {self.prefix} ({n} sequences)")
        seq_len = int(self.sequence_lengths[i])
        if length is None:
            length = seq_len - offset
        if offset < 0 or length < 0 or offset + length > seq_len:
            raise IndexError(f"tokens [{offset}, {offset + length}) out of range for sequence {i} "
                             f"of {seq_len} tokens in {self.prefix}")
        start = int(self._starts[i]) + offset
        return self._tokens[start:start + length]

    def tokens(self) -> np.ndarray:
        """All tokens of the shard back to back (a read-only view of the mapped .bin)."""
        return self._tokens

    @property
    def num_documents(self) -> int:
        return len(self.document_indices) - 1

    def max_token_id(self) -> int:
        """The largest token id in the shard (-1 when empty), computed once and cached beside the index.

        Training compares it with model.vocab_size before it starts: an id past the vocabulary crashes
        F.embedding at tp=1 and is silently embedded as zeros by a vocab-parallel embedding at tp>1. The
        scan reads the whole .bin (about 1 s per GB), so its result is cached in
        `index-cache/NAME.max_token_id.json`, keyed by the .idx/.bin sizes and mtimes; the cache is
        best-effort (a read-only data directory just rescans)."""
        st_idx, st_bin = os.stat(self.prefix + ".idx"), os.stat(self.prefix + ".bin")
        key = [st_idx.st_size, st_idx.st_mtime_ns, st_bin.st_size, st_bin.st_mtime_ns]
        cache = os.path.join(default_cache_dir(self.prefix), os.path.basename(self.prefix) + ".max_token_id.json")
        try:
            with open(cache) as f:
                rec = json.load(f)
            if rec.get("key") == key:
                return int(rec["max_token_id"])
        except (OSError, ValueError, KeyError, TypeError):
            pass
        tokens, best, chunk = self._tokens, -1, 1 << 26
        for start in range(0, len(tokens), chunk):
            best = max(best, int(tokens[start:start + chunk].max()))
        try:
            os.makedirs(os.path.dirname(cache), exist_ok=True)
            tmp = f"{cache}.{os.getpid()}.tmp"
            with open(tmp, "w") as f:
                json.dump({"key": key, "max_token_id": best}, f)
            os.replace(tmp, cache)
        except OSError:
            pass
        return best

    def __reduce__(self):
        # Pickle (e.g. to DataLoader workers under spawn) as the path and re-map, never the tokens.
        return (type(self), (self.prefix,))

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.prefix!r}, sequences={len(self)}, documents={self.num_documents}, "
                f"tokens={self.num_tokens}, dtype={self.dtype})")


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
