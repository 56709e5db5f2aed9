"""Cutting the ordered stream of encoded documents into shards, each written atomically.

Three layouts:
  single  one shard named PREFIX (the default): directly usable as a data path.
  size    a new shard starts once the current one holds >= shard_size tokens (--shard-size).
  count   K shards by input record: shard k holds records [k*R/K, (k+1)*R/K) (--num-shards).
Every boundary depends only on the documents and their token counts, never on timing, so the same
inputs give the same shards for any number of workers, and a resumed run continues exactly where the
last complete shard ended (`records` in its manifest entry).
"""
from __future__ import annotations

import os
import signal
from typing import Any, Callable, Optional

import numpy as np

from data_prep.mmidx import ShardWriter, data_path, index_path
from data_prep.shards import numbered_prefix
from data_prep.tokenizer import file_sha256

# Test hook: SIGKILL this process right after it starts writing shard N (N >= 1), i.e. with N shards
# finished and a temporary file half written, to exercise resume exactly like a crash would.
KILL_HOOK_ENV = "MEGALM_PREP_TEST_KILL_AT_SHARD"


class ShardSink:
    def __init__(self, prefix: str, dtype: np.dtype, layout: str, *, shard_size: Optional[int] = None,
                 record_bounds: Optional[np.ndarray] = None, first_shard: int = 0, first_record: int = 0,
                 on_shard_done: Callable[[dict[str, Any]], None] = lambda entry: None):
        assert layout in ("single", "size", "count")
        self.prefix = prefix
        self.dtype = np.dtype(dtype)
        self.layout = layout
        self.shard_size = shard_size
        self.bounds = record_bounds  # count layout: K+1 record boundaries
        self.on_shard_done = on_shard_done
        self.index = first_shard  # shard being written
        self.shard_first_record = first_record
        self.writer: Optional[ShardWriter] = None
        self.entries: list[dict[str, Any]] = []
        kill = os.environ.get(KILL_HOOK_ENV)
        self._kill_at = int(kill) if kill else None

    def _name(self, index: int) -> str:
        return self.prefix if self.layout == "single" else numbered_prefix(self.prefix, index)

    def _open(self) -> ShardWriter:
        if self.writer is None:
            self.writer = ShardWriter(self._name(self.index), self.dtype)
        return self.writer

    def _close(self, record_end: int) -> None:
        """Finish the current shard (an empty one if nothing was written) and report its entry."""
        writer = self._open()
        writer.finish()
        name = self._name(self.index)
        entry = {"name": os.path.basename(name), "documents": writer.documents, "tokens": writer.tokens,
                 "bin_bytes": os.path.getsize(data_path(name)), "idx_sha256": file_sha256(index_path(name)),
                 "records": [self.shard_first_record, record_end]}
        self.entries.append(entry)
        self.writer = None
        self.index += 1
        self.shard_first_record = record_end
        self.on_shard_done(entry)

    def _write(self, flat: np.ndarray, lengths: np.ndarray) -> None:
        if len(lengths):
            self._open().add_encoded(flat, lengths.tolist())
        if self._kill_at is not None and self.index >= self._kill_at and self.writer is not None:
            os.kill(os.getpid(), signal.SIGKILL)

    def add(self, flat: np.ndarray, lengths: np.ndarray, records: np.ndarray) -> None:
        """Append a batch of documents (`records`: the input record index of each, increasing)."""
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        i = 0
        n = len(lengths)
        while i < n:
            if self.layout == "single":
                j = n
            elif self.layout == "count":
                assert self.bounds is not None
                target = int(np.searchsorted(self.bounds, records[i], side="right")) - 1
                while self.index < target:  # records in between were all skipped: empty shards
                    self._close(int(self.bounds[self.index + 1]))
                j = int(np.searchsorted(records, self.bounds[self.index + 1], side="left"))
            else:
                assert self.shard_size is not None
                have = self.writer.tokens if self.writer is not None else 0
                # first document whose end brings the shard to >= shard_size closes it
                need = offsets[i] + (self.shard_size - have)
                j = min(int(np.searchsorted(offsets, need, side="left")), n)
                j = max(j, i + 1)
            self._write(flat[offsets[i]:offsets[j]], lengths[i:j])
            if self.layout == "size" and self.writer is not None and self.writer.tokens >= self.shard_size:
                self._close(int(records[j - 1]) + 1)
            elif self.layout == "count" and j < n:
                self._close(int(self.bounds[self.index + 1]))
            i = j

    def finish(self, total_records: int) -> list[dict[str, Any]]:
        """Close the last shard (and, for --num-shards, any trailing empty ones)."""
        if self.layout == "count":
            assert self.bounds is not None
            while self.index < len(self.bounds) - 1:
                self._close(int(self.bounds[self.index + 1]))
        elif self.writer is not None or (self.layout == "single" and not self.entries) or self.index == 0:
            self._close(total_records)
        return self.entries

    def abort(self) -> None:
        if self.writer is not None:
            self.writer.abort()
            self.writer = None
