"""Fixed-length GPT training samples cut from a token shard, Megatron-LM style.

Three index arrays, with the same semantics (and, for the same seed, the same values) as Megatron-LM's
legacy `GPTDataset` / `helpers.build_sample_idx`:

    doc_index     the documents of every epoch, concatenated and shuffled (numpy RandomState(seed)).
                  When the last epoch is needed for less than 80% of its samples it is shuffled on its
                  own, so its partial use does not bias toward documents of earlier epochs.
    sample_index  [n + 1, 2]: sample j starts at (doc_index position, token offset) = sample_index[j]
                  and ends, inclusive, at sample_index[j + 1]. Reading documents in doc_index order as
                  one token stream, sample j is stream[j*seq_len : j*seq_len + seq_len + 1]: seq_len + 1
                  tokens (inputs [:-1], labels [1:]), consecutive samples overlapping by one token.
    shuffle_index a permutation of the samples; dataset item i is sample shuffle_index[i].

Megatron builds sample_index with a per-sample loop in C++. Here it is one vectorised step: sample j
starts at stream position j*seq_len, so its document is found by `searchsorted` over the cumulative
document lengths (side="right" skips empty documents, as the loop does).

Fine-tuning data (data_prep/sft.py) comes with a loss mask, a uint8 shard of the same document lengths;
then item i is a `MaskedSample`: the tokens plus the mask entries at the same stream positions, from
which the collate step makes IGNORE_INDEX labels. Its documents are padded to exactly seq_len tokens,
so every sample is one record from position 0 (plus the next record's first token, which only appears
as the last label and is masked). Without a mask items are plain token arrays, exactly as before.
"""
from __future__ import annotations

import os
from typing import NamedTuple, Sequence, Union

import numpy as np

from .index_cache import hash_key, load_or_build
from .indexed_dataset import IndexedDataset

# Bump when the meaning of the cached arrays changes, so old caches are not reused.
INDEX_FORMAT = "megalm-gpt-index-v1"
# Megatron's threshold: shuffle the last epoch separately when less than this share of it is used.
SEPARATE_LAST_EPOCH_BELOW = 0.80


class MaskedSample(NamedTuple):
    """A fine-tuning sample: seq_len + 1 tokens (int64) and their loss mask (uint8, 1 = a target)."""
    tokens: np.ndarray
    loss_mask: np.ndarray


Sample = Union[np.ndarray, MaskedSample]


def num_epochs_needed(tokens_per_epoch: int, seq_len: int, num_samples: int) -> int:
    """Fewest epochs e with (e * tokens_per_epoch - 1) // seq_len >= num_samples (Megatron's rule)."""
    need = num_samples * seq_len + 1  # tokens needed for num_samples overlapping samples
    return max(1, -(-need // tokens_per_epoch))


def build_doc_index(documents: np.ndarray, num_epochs: int, rng: np.random.RandomState,
                    separate_last_epoch: bool) -> np.ndarray:
    """Documents repeated num_epochs times and shuffled (the last epoch separately if asked)."""
    if not separate_last_epoch or num_epochs == 1:
        doc_index = np.tile(documents.astype(np.int32), num_epochs)
        rng.shuffle(doc_index)
        return doc_index
    first = build_doc_index(documents, num_epochs - 1, rng, False)
    last = build_doc_index(documents, 1, rng, False)
    return np.concatenate((first, last))


def build_sample_index(sizes: np.ndarray, doc_index: np.ndarray, seq_len: int) -> np.ndarray:
    """[n + 1, 2] int64 (doc_index position, offset) of every sample boundary, vectorised."""
    lengths = sizes[doc_index].astype(np.int64)
    starts = np.zeros(len(lengths) + 1, np.int64)  # stream position where each doc_index entry begins
    np.cumsum(lengths, out=starts[1:])
    num_samples = (int(starts[-1]) - 1) // seq_len
    positions = np.arange(num_samples + 1, dtype=np.int64) * seq_len
    doc_pos = np.searchsorted(starts, positions, side="right") - 1
    sample_index = np.empty((num_samples + 1, 2), np.int64)
    sample_index[:, 0] = doc_pos
    sample_index[:, 1] = positions - starts[doc_pos]
    return sample_index


def build_shuffle_index(num_first: int, total: int, rng: np.random.RandomState) -> np.ndarray:
    """Permutation of range(total): [0, num_first) shuffled, then [num_first, total) shuffled on its own."""
    dtype = np.uint32 if total < np.iinfo(np.uint32).max - 1 else np.int64
    first = np.arange(num_first, dtype=dtype)
    rng.shuffle(first)
    if num_first == total:
        return first
    last = np.arange(num_first, total, dtype=dtype)
    rng.shuffle(last)
    return np.concatenate((first, last))


def build_indices(sizes: np.ndarray, documents: np.ndarray, seq_len: int, num_samples: int,
                  seed: int) -> dict[str, np.ndarray]:
    """doc_index, sample_index and shuffle_index for `num_samples` samples of `documents`."""
    tokens_per_epoch = int(sizes[documents].astype(np.int64).sum())
    num_epochs = num_epochs_needed(tokens_per_epoch, seq_len, num_samples)
    separate_last_epoch = False
    if num_epochs > 1:
        from_earlier_epochs = ((num_epochs - 1) * tokens_per_epoch - 1) // seq_len
        per_epoch = (tokens_per_epoch - 1) // seq_len
        separate_last_epoch = (num_samples - from_earlier_epochs) < int(SEPARATE_LAST_EPOCH_BELOW * per_epoch)
    rng = np.random.RandomState(seed=seed)
    doc_index = build_doc_index(documents, num_epochs, rng, separate_last_epoch)
    sample_index = build_sample_index(sizes, doc_index, seq_len)
    total = len(sample_index) - 1
    num_first = ((num_epochs - 1) * tokens_per_epoch - 1) // seq_len if separate_last_epoch else total
    shuffle_index = build_shuffle_index(num_first, total, rng)
    return {"doc": doc_index, "sample": sample_index, "shuffle": shuffle_index}


class GPTDataset:
    """`num_samples` samples of seq_len + 1 tokens (int64) from `documents` of an IndexedDataset.

    documents: sequence ids to draw from (default all), e.g. a contiguous train/valid/test range.
    cache_dir: where the index .npy files go (None: build in memory, no files). With torch.distributed
    initialised, construction is collective: every rank must construct the same datasets in order.
    loss_mask: the shard's loss mask (`data_prep.sft.open_loss_mask`) for fine-tuning data; its
    documents must all be seq_len tokens long (one record per sample).
    """

    def __init__(self, indexed: IndexedDataset | str, seq_len: int, num_samples: int, seed: int,
                 documents: Sequence[int] | np.ndarray | None = None, cache_dir: str | None = None,
                 name: str = "train", loss_mask: IndexedDataset | None = None):
        self.indexed = indexed if isinstance(indexed, IndexedDataset) else IndexedDataset(indexed)
        self.loss_mask = loss_mask
        if seq_len <= 0:
            raise ValueError(f"seq_len must be > 0, got {seq_len}")
        if num_samples < 0:
            raise ValueError(f"num_samples must be >= 0, got {num_samples}")
        n_seq = len(self.indexed)
        documents = np.arange(n_seq, dtype=np.int64) if documents is None else np.asarray(documents, np.int64)
        if documents.ndim != 1 or len(documents) == 0:
            raise ValueError(f"{name}: documents must be a non-empty 1-d list of sequence ids")
        if documents.min() < 0 or documents.max() >= n_seq:
            raise ValueError(f"{name}: document ids must lie in [0, {n_seq}) for {self.indexed.prefix}")
        sizes = self.indexed.sequence_lengths
        doc_sizes = sizes[documents]
        if int(doc_sizes.astype(np.int64).sum()) == 0:
            raise ValueError(f"{name}: the {len(documents)} selected documents of {self.indexed.prefix} hold no tokens")
        if loss_mask is not None:
            if not np.array_equal(loss_mask.sequence_lengths, sizes):
                raise ValueError(f"{name}: loss mask {loss_mask.prefix} does not pair with {self.indexed.prefix}")
            if (doc_sizes != seq_len).any():  # a record would straddle samples and its mask misalign
                raise ValueError(f"{name}: fine-tuning shard {self.indexed.prefix} holds records of "
                                 f"{int(doc_sizes[doc_sizes != seq_len][0])} tokens, not seq_len={seq_len}")
        self.seq_len = seq_len
        self.num_samples = num_samples
        self.num_documents = len(documents)
        self.seed = seed
        self.name = name
        # The indices depend only on the selected documents' ids and lengths and the parameters, so
        # that is what the key hashes (a rewritten shard with other lengths gets other indices).
        self.cache_key = hash_key(INDEX_FORMAT, seq_len, seed, num_samples, documents, doc_sizes)
        stem = f"{os.path.basename(self.indexed.prefix)}-{name}-{self.cache_key}"
        describe = {"format": INDEX_FORMAT, "shard": os.path.abspath(self.indexed.prefix), "name": name,
                    "seq_len": seq_len, "seed": seed, "num_samples": num_samples, "documents": len(documents),
                    "first_document": int(documents[0]), "last_document": int(documents[-1])}
        arrays, self.built_indices = load_or_build(
            cache_dir, stem, ("doc", "sample", "shuffle"),
            lambda: build_indices(sizes, documents, seq_len, num_samples, seed), describe)
        self.doc_index: np.ndarray = arrays["doc"]
        self.sample_index: np.ndarray = arrays["sample"]
        self.shuffle_index: np.ndarray = arrays["shuffle"]
        if len(self.shuffle_index) < num_samples:  # only a foreign or damaged cache could do this
            raise ValueError(f"{name}: index cache {stem} holds {len(self.shuffle_index)} samples, "
                             f"fewer than {num_samples}; delete it from {cache_dir}")

    def __len__(self) -> int:
        return self.num_samples

    @property
    def num_epochs(self) -> int:
        """Passes over the documents that num_samples needs (the doc_index holds each that often)."""
        return len(self.doc_index) // self.num_documents

    def __getitem__(self, i: int) -> Sample:
        if i < 0:
            i += self.num_samples
        if not 0 <= i < self.num_samples:
            raise IndexError(f"sample {i} out of range for {self.name} dataset of {self.num_samples} samples")
        j = int(self.shuffle_index[i])
        if self.loss_mask is None:
            return self.stream_sample(j)
        return MaskedSample(self.stream_sample(j), self._read(self.loss_mask, j, np.uint8))

    def stream_sample(self, j: int) -> np.ndarray:
        """Tokens of sample j of the unshuffled stream (item i is stream_sample(shuffle_index[i]))."""
        return self._read(self.indexed, j, np.int64)

    def _read(self, shard: IndexedDataset, j: int, dtype: type) -> np.ndarray:
        """Stream positions [j*seq_len, j*seq_len + seq_len] of `shard` (the tokens or their loss mask)."""
        doc_f, off_f = (int(v) for v in self.sample_index[j])
        doc_l, off_l = (int(v) for v in self.sample_index[j + 1])
        out = np.empty(self.seq_len + 1, dtype)
        get = shard.get
        if doc_f == doc_l:
            out[:] = get(int(self.doc_index[doc_f]), off_f, off_l - off_f + 1)
            return out
        # First document from its offset, whole documents in between, the last one up to off_l inclusive.
        part = get(int(self.doc_index[doc_f]), off_f)
        out[: len(part)] = part
        pos = len(part)
        for k in range(doc_f + 1, doc_l):
            part = get(int(self.doc_index[k]))
            out[pos:pos + len(part)] = part
            pos += len(part)
        out[pos:] = get(int(self.doc_index[doc_l]), 0, off_l + 1)
        return out
