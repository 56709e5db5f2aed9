"""Resumable data-parallel micro-batches that depend only on (dataset seed, consumed samples).

Megatron's `MegatronPretrainingSampler` scheme: the (already seeded-shuffled) dataset is read in order,
in chunks of micro_batch_size * dp_size samples; data-parallel rank r takes slice [r*m, (r+1)*m) of each
chunk. Nothing else is stateful, so a run resumed at consumed_samples N (a multiple of the chunk, as
every step boundary is) yields exactly the micro-batches an uninterrupted run would have from N on, and
the union of the ranks' micro-batches is the same global batch whatever dp_size is. Incomplete final
chunks are dropped so every rank takes the same number of steps.

Labels are the inputs shifted by one; for fine-tuning samples (`MaskedSample`) a label whose token is
not a training target (loss mask 0: prompt, role header, padding) is IGNORE_INDEX, which the loss skips.
"""
from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np
import torch

from megalm.parallel.cross_entropy import IGNORE_INDEX

from .gpt_dataset import MaskedSample, Sample

__all__ = ["MicroBatchSampler", "collate_samples", "micro_batches", "micro_batches_for_step"]


class MicroBatchSampler:
    """Yields, for one data-parallel rank, the dataset indices of each of its micro-batches.

    Usable as `torch.utils.data.DataLoader(dataset, batch_sampler=..., collate_fn=collate_samples)`.
    """

    def __init__(self, total_samples: int, consumed_samples: int, micro_batch_size: int,
                 dp_rank: int, dp_size: int):
        if micro_batch_size <= 0 or dp_size <= 0:
            raise ValueError(f"micro_batch_size ({micro_batch_size}) and dp_size ({dp_size}) must be > 0")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} must lie in [0, {dp_size})")
        chunk = micro_batch_size * dp_size
        if consumed_samples < 0 or consumed_samples % chunk:
            # Resuming mid-chunk would shift every later chunk and so break the resume guarantee.
            raise ValueError(f"consumed_samples {consumed_samples} must be a non-negative multiple of "
                             f"micro_batch_size * dp_size = {chunk}")
        if consumed_samples > total_samples:
            raise ValueError(f"consumed_samples {consumed_samples} exceeds the dataset's {total_samples} samples")
        self.total_samples = total_samples
        self.consumed_samples = consumed_samples
        self.micro_batch_size = micro_batch_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size

    @property
    def chunk(self) -> int:
        return self.micro_batch_size * self.dp_size

    def __len__(self) -> int:
        return (self.total_samples - self.consumed_samples) // self.chunk

    def __iter__(self) -> Iterator[list[int]]:
        m = self.micro_batch_size
        first = self.consumed_samples + self.dp_rank * m
        for k in range(len(self)):
            start = first + k * self.chunk
            yield list(range(start, start + m))


def masked_labels(labels: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """`labels` with IGNORE_INDEX wherever `targets` (the loss mask of the labels' tokens) is 0."""
    return labels.masked_fill(targets == 0, IGNORE_INDEX)


def collate_samples(samples: Sequence[Sample]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack samples of seq_len + 1 tokens into (input_ids, labels) LongTensors of shape [m, seq_len];
    the labels of fine-tuning samples are IGNORE_INDEX where their loss mask is 0."""
    masked = [isinstance(s, MaskedSample) for s in samples]
    tokens = [s.tokens if is_masked else s for s, is_masked in zip(samples, masked)]
    batch = torch.from_numpy(np.stack([np.asarray(s, np.int64) for s in tokens]))
    input_ids, labels = batch[:, :-1].contiguous(), batch[:, 1:].contiguous()
    if not any(masked):  # pre-training data: labels are exactly the shifted tokens
        return input_ids, labels
    # A pre-training sample in a blend with fine-tuning data: every label is a target.
    targets = np.stack([s.loss_mask[1:] if is_masked else np.ones(labels.shape[1], np.uint8)
                        for s, is_masked in zip(samples, masked)])
    return input_ids, masked_labels(labels, torch.from_numpy(targets))


def micro_batches(dataset, micro_batch_size: int, dp_rank: int = 0, dp_size: int = 1, consumed_samples: int = 0,
                  with_indices: bool = False) -> Iterator[tuple]:
    """This rank's micro-batches from `consumed_samples` on, as (input_ids, labels) LongTensors of shape
    [micro_batch_size, seq_len]; with_indices=True appends the list of dataset indices used.

    Reads happen in the calling process (each sample is a few mmap slices); for overlap with compute wrap
    MicroBatchSampler in a DataLoader with workers instead.
    """
    sampler = MicroBatchSampler(len(dataset), consumed_samples, micro_batch_size, dp_rank, dp_size)
    for indices in sampler:
        input_ids, labels = collate_samples([dataset[i] for i in indices])
        yield (input_ids, labels, indices) if with_indices else (input_ids, labels)


def micro_batches_for_step(dataset, consumed_samples: int, micro_batch_size: int, accumulation_steps: int,
                           dp_rank: int, dp_size: int, with_indices: bool = False) -> list[tuple]:
    """The `accumulation_steps` micro-batches this rank trains on in the step that starts after
    `consumed_samples` (a step consumes micro_batch_size * dp_size * accumulation_steps samples).
    Same stream as `micro_batches`: step k's batches are that generator's items [k*a, (k+1)*a);
    with_indices=True appends each micro-batch's dataset indices."""
    if accumulation_steps <= 0:
        raise ValueError(f"accumulation_steps must be > 0, got {accumulation_steps}")
    step_samples = micro_batch_size * dp_size * accumulation_steps
    if consumed_samples + step_samples > len(dataset):
        raise ValueError(f"a step from consumed_samples {consumed_samples} needs {step_samples} samples but the "
                         f"dataset holds {len(dataset)}; build it with at least steps * global batch samples")
    batches = micro_batches(dataset, micro_batch_size, dp_rank, dp_size, consumed_samples, with_indices)
    return [next(batches) for _ in range(accumulation_steps)]
