"""Training data: shard reader, GPT samples, blending and resumable data-parallel micro-batches.

    IndexedDataset(prefix)                       zero-copy, validated MMIDIDX v1 shard reader
    GPTDataset(shard, seq_len, num_samples, seed, documents=None, cache_dir=None, name="train", loss_mask=None)
        items: token arrays, or MaskedSample(tokens, loss_mask) for fine-tuning data (data_prep/sft.py)
    BlendedDataset(datasets, weights, size, cache_dir=None, name="blend")
    build_datasets(cfg, train_samples, valid_samples, test_samples) -> (train, valid, test)
    micro_batches(dataset, micro_batch_size, dp_rank, dp_size, consumed_samples) -> (input_ids, labels)...
        labels are IGNORE_INDEX where a fine-tuning sample's loss mask is 0 (prompt tokens, padding)
    micro_batches_for_step(dataset, consumed_samples, micro_batch_size, accumulation_steps, dp_rank, dp_size)

`sampler` (and so torch) is imported lazily: the datasets themselves need only numpy.
"""
from data_prep.mmidx import ShardFormatError

from .blended_dataset import BlendedDataset
from .builder import build_datasets, split_document_ranges
from .gpt_dataset import GPTDataset, MaskedSample
from .indexed_dataset import IndexedDataset

__all__ = ["BlendedDataset", "GPTDataset", "IndexedDataset", "MaskedSample", "MicroBatchSampler", "ShardFormatError",
           "build_datasets", "collate_samples", "masked_labels", "micro_batches", "micro_batches_for_step",
           "split_document_ranges"]


def __getattr__(name: str):
    if name in ("MicroBatchSampler", "collate_samples", "masked_labels", "micro_batches", "micro_batches_for_step"):
        from . import sampler

        return getattr(sampler, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
