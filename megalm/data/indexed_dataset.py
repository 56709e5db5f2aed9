"""Zero-copy reader of Megatron MMIDIDX v1 token shards (PREFIX.idx / PREFIX.bin).

Everything a reader could trip over later is checked once, up front and vectorised, so that a truncated
or corrupt shard fails here with a `ShardFormatError` naming the file and the problem, instead of as an
out-of-bounds slice, a garbage sample or a hang deep inside training (DESIGN.md decision 10).
Tokens are never copied: `get()` returns views into the mmapped `.bin`.

Semantics follow Megatron-LM's `IndexedDataset`: items are *sequences* (our writer emits one sequence
per document, so the two coincide), `document_indices` groups sequences into documents.
"""
from __future__ import annotations

import os

import numpy as np

from data_prep.mmidx import HEADER_SIZE, ShardFormatError, data_path, index_path, read_index_header

__all__ = ["IndexedDataset", "ShardFormatError"]


class IndexedDataset:
    """Read-only view of one shard; `ds[i]` is sequence i's tokens as a zero-copy numpy array."""

    def __init__(self, prefix: str):
        self.prefix = prefix
        self.idx_file = index_path(prefix)
        self.bin_file = data_path(prefix)
        try:
            header = read_index_header(self.idx_file)  # magic, version, dtype code, exact .idx size
        except OSError as e:  # a directory, a permission problem: still an error that names the file
            raise ShardFormatError(f"{self.idx_file}: cannot read index: {e.strerror or e}") from None
        self.dtype: np.dtype = header.dtype
        seqs, docs = header.sequence_count, header.document_count

        # The header check guarantees the file is exactly large enough for these three arrays.
        idx = np.memmap(self.idx_file, dtype=np.uint8, mode="r") if seqs or docs else np.zeros(HEADER_SIZE, np.uint8)
        off = HEADER_SIZE
        self.sequence_lengths: np.ndarray = idx[off:off + 4 * seqs].view(np.int32)
        off += 4 * seqs
        self.sequence_pointers: np.ndarray = idx[off:off + 8 * seqs].view(np.int64)
        off += 8 * seqs
        self.document_indices: np.ndarray = idx[off:off + 8 * docs].view(np.int64)
        # Hold plain ndarray views (they keep the mmap alive) so slices are ordinary arrays, not np.memmap.
        self.sequence_lengths = self.sequence_lengths.view(np.ndarray)
        self.sequence_pointers = self.sequence_pointers.view(np.ndarray)
        self.document_indices = self.document_indices.view(np.ndarray)

        self.num_tokens: int = self._validate_index()
        self._tokens = self._open_bin()
        # Token offset of each sequence in .bin; pointers were validated to be contiguous, so this is exact.
        self._starts = self.sequence_pointers // self.dtype.itemsize if seqs else np.zeros(0, np.int64)

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
        if len(docs) > 1:
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
        expected = np.empty(seqs, np.int64)
        expected[0] = 0
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
                f"{self.bin_file}: data file is {size} bytes but {self.idx_file} describes {self.num_tokens} "
                f"{self.dtype} tokens = {expected} bytes: the shard is truncated or corrupt")
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

    def __reduce__(self):
        # Pickle (e.g. to DataLoader workers under spawn) as the path and re-map, never the tokens.
        return (IndexedDataset, (self.prefix,))

    @property
    def num_documents(self) -> int:
        return len(self.document_indices) - 1

    def __repr__(self) -> str:
        return (f"IndexedDataset({self.prefix!r}, sequences={len(self)}, documents={self.num_documents}, "
                f"tokens={self.num_tokens}, dtype={self.dtype})")
