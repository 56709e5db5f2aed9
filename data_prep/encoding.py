"""Batch encoding in worker processes, with results handed back in submission order.

Workers receive lists of texts and return two numpy arrays (all token ids back to back in the shard
dtype, and the per-document lengths), so the parent never touches per-token Python objects and can
write each batch with one `ShardWriter.add_encoded` call. Results come back in the order the batches
were submitted, never in completion order: that is what makes shards byte-identical for any --workers.
"""
from __future__ import annotations

import itertools
import os
from typing import Any, Iterable, Iterator, Optional

import numpy as np

from data_prep.workers import OrderedWorkers

Encoded = tuple[np.ndarray, np.ndarray]  # (flat token ids in the shard dtype, int64 lengths)


class BatchEncoder:
    """Encodes batches of documents with `Tokenizer.encode_batch`, appending the end-of-document id."""

    def __init__(self, tokenizer_path: str, dtype: str, eod_id: Optional[int]):
        from tokenizers import Tokenizer

        self.tokenizer = Tokenizer.from_file(tokenizer_path)
        self.dtype = np.dtype(dtype)
        self.eod = [eod_id] if eod_id is not None else []
        # --- fast path (data_prep/fast_bpe.py): tiktoken when it provably gives the same ids ---
        from data_prep.fast_bpe import fast_encoder_for

        self.fast, self.fast_unsupported = fast_encoder_for(tokenizer_path, self.tokenizer)

    def encode(self, texts: list[str]) -> Encoded:
        if self.fast is not None:
            return self._encode_fast(texts)
        encodings = self.tokenizer.encode_batch(texts)
        extra = len(self.eod)
        lengths = np.fromiter((len(e) + extra for e in encodings), dtype=np.int64, count=len(encodings))
        total = int(lengths.sum())
        if extra:
            ids = itertools.chain.from_iterable(itertools.chain(e.ids, self.eod) for e in encodings)
        else:
            ids = itertools.chain.from_iterable(e.ids for e in encodings)
        flat = np.fromiter(ids, dtype=self.dtype, count=total)
        return flat, lengths

    def _encode_fast(self, texts: list[str]) -> Encoded:
        assert self.fast is not None
        arrays = self.fast.encode_batch(texts)
        eod = np.asarray(self.eod, dtype=self.dtype)
        lengths = np.fromiter((a.size + eod.size for a in arrays), dtype=np.int64, count=len(arrays))
        parts = [p for a in arrays for p in (a, eod)] if eod.size else arrays
        flat = np.concatenate(parts).astype(self.dtype, copy=False) if parts else np.empty(0, self.dtype)
        return flat, lengths
    # --- end fast path ---


_WORKER_ENCODER: Optional[BatchEncoder] = None


def _init_worker(tokenizer_path: str, dtype: str, eod_id: Optional[int]) -> None:
    global _WORKER_ENCODER
    # One thread per worker process: parallelism comes from the processes, and Rayon threads on top
    # would oversubscribe the cores.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _WORKER_ENCODER = BatchEncoder(tokenizer_path, dtype, eod_id)


def _encode_in_worker(texts: list[str]) -> Encoded:
    assert _WORKER_ENCODER is not None
    return _WORKER_ENCODER.encode(texts)


class EncoderPool:
    """`workers` processes (data_prep.workers.OrderedWorkers) or the calling process (workers == 1)
    encoding batches in order.

    At most `max_in_flight` batches are queued at once, so memory stays bounded however large the
    corpus is (multiprocessing's `imap` would read the whole input iterator ahead).
    """

    def __init__(self, workers: int, tokenizer_path: str, dtype: str, eod_id: Optional[int],
                 max_in_flight: Optional[int] = None):
        self.workers = workers
        self._pool: Optional[OrderedWorkers] = None
        self._inline: Optional[BatchEncoder] = None
        if workers <= 1:
            self._inline = BatchEncoder(tokenizer_path, dtype, eod_id)
        else:
            self._pool = OrderedWorkers(workers, _encode_in_worker, initializer=_init_worker,
                                        initargs=(tokenizer_path, dtype, eod_id), max_in_flight=max_in_flight)

    def map(self, batches: Iterable[tuple[Any, list[str]]]) -> Iterator[tuple[Any, Encoded]]:
        """For each (metadata, texts) yield (metadata, encoded) in input order."""
        if self._inline is not None:
            for meta, texts in batches:
                yield meta, self._inline.encode(texts)
            return
        assert self._pool is not None
        yield from self._pool.map(batches)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    def __enter__(self) -> "EncoderPool":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
