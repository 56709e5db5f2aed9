"""Cutting the ordered stream of encoded documents into shards, each written atomically.

Three layouts:
  single  one shard named PREFIX (the default): directly usable as a data path.
  size    a new shard starts once the current one holds >= shard_size tokens (--shard-size).
  count   K shards by input record: shard k holds records [k*R/K, (k+1)*R/K) (--num-shards).
Every boundary depends only on the documents and their token counts, never on timing, so the same
inputs give the same shards for any number of workers, and a resumed run continues exactly where the
last complete shard ended (`records` in its manifest entry).

Fine-tuning data (`loss_mask=True`, data_prep/sft.py) writes each shard's loss mask beside it, document
for document, and closes the mask first: the token shard's .idx, renamed last, means the pair is whole.
Such an entry also keeps `sft_counts` (records skipped or truncated only after encoding, by record
index), so a resumed run can add those of the shards it keeps to its totals.
"""
from __future__ import annotations

import collections
import os
import signal
from typing import Any, Callable, Optional

import numpy as np

from data_prep.mmidx import ShardWriter, data_path, index_path
from data_prep.sft import LOSS_MASK_DTYPE
from data_prep.shards import loss_mask_prefix, numbered_prefix
from data_prep.tokenizer import file_sha256

# Test hook: SIGKILL this process right after it starts writing shard N (N >= 1), i.e. with N shards
# finished and a temporary file half written, to exercise resume exactly like a crash would.
KILL_HOOK_ENV = "MEGALM_PREP_TEST_KILL_AT_SHARD"


class ShardSink:
    def __init__(self, prefix: str, dtype: np.dtype, layout: str, *, shard_size: Optional[int] = None,
                 record_bounds: Optional[np.ndarray] = None, first_shard: int = 0, first_record: int = 0,
                 on_shard_done: Callable[[dict[str, Any]], None] = lambda entry: None,
                 loss_mask: bool = False):
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
        self.loss_mask = loss_mask
        self.mask_writer: Optional[ShardWriter] = None
        self.target_tokens = 0  # mask entries that are 1 in the open shard
        self._pending: list[tuple[int, str]] = []  # (record, what) noted by `count`, not yet in a shard
        self.entries: list[dict[str, Any]] = []
        kill = os.environ.get(KILL_HOOK_ENV)
        self._kill_at = int(kill) if kill else None

    def _name(self, index: int) -> str:
        return self.prefix if self.layout == "single" else numbered_prefix(self.prefix, index)

    def _open(self) -> ShardWriter:
        if self.writer is None:
            self.writer = ShardWriter(self._name(self.index), self.dtype)
            if self.loss_mask:
                self.mask_writer = ShardWriter(loss_mask_prefix(self._name(self.index)), LOSS_MASK_DTYPE)
                self.target_tokens = 0
        return self.writer

    def count(self, record: int, what: str) -> None:
        """Note that input record `record` was skipped or truncated for reason `what` after encoding; it is
        counted in the `sft_counts` of the shard whose record range holds it."""
        self._pending.append((record, what))

    def _mask_entry(self, name: str, record_end: int) -> dict[str, Any]:
        assert self.mask_writer is not None
        self.mask_writer.finish()
        self.mask_writer = None
        mask = loss_mask_prefix(name)
        done = [what for record, what in self._pending if record < record_end]
        self._pending = [(record, what) for record, what in self._pending if record >= record_end]
        return {"loss_mask": {"name": os.path.basename(mask), "bin_bytes": os.path.getsize(data_path(mask)),
                              "idx_sha256": file_sha256(index_path(mask)), "target_tokens": self.target_tokens},
                "sft_counts": dict(sorted(collections.Counter(done).items()))}

    def _close(self, record_end: int) -> None:
        """Finish the current shard (an empty one if nothing was written) and report its entry."""
        writer = self._open()
        name = self._name(self.index)
        mask = self._mask_entry(name, record_end) if self.loss_mask else {}
        writer.finish()
        entry = {"name": os.path.basename(name), "documents": writer.documents, "tokens": writer.tokens,
                 "bin_bytes": os.path.getsize(data_path(name)), "idx_sha256": file_sha256(index_path(name)),
                 "records": [self.shard_first_record, record_end], **mask}
        self.entries.append(entry)
        self.writer = None
        self.index += 1
        self.shard_first_record = record_end
        self.on_shard_done(entry)

    def _write(self, flat: np.ndarray, lengths: np.ndarray, mask: Optional[np.ndarray]) -> None:
        if len(lengths):
            self._open().add_encoded(flat, lengths.tolist())
            if self.mask_writer is not None:
                assert mask is not None and mask.size == flat.size
                self.mask_writer.add_encoded(mask, lengths.tolist())
                self.target_tokens += int(np.count_nonzero(mask))
        if self._kill_at is not None and self.index >= self._kill_at and self.writer is not None:
            os.kill(os.getpid(), signal.SIGKILL)

    def add(self, flat: np.ndarray, lengths: np.ndarray, records: np.ndarray,
            mask: Optional[np.ndarray] = None) -> None:
        """Append a batch of documents (`records`: the input record index of each, increasing; `mask`: their
        loss mask back to back, for a sink with loss_mask=True)."""
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
            self._write(flat[offsets[i]:offsets[j]], lengths[i:j],
                        None if mask is None else mask[offsets[i]:offsets[j]])
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
        for writer in (self.writer, self.mask_writer):
            if writer is not None:
                writer.abort()
        self.writer = self.mask_writer = None
