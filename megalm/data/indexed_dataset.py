"""The training-side name of data_prep's shard reader (PREFIX.idx / PREFIX.bin, Megatron MMIDIDX v1).

`IndexedDataset` *is* `data_prep.mmidx.Shard`: one validating, zero-copy, numpy-only reader, so the
on-disk layout is parsed in exactly one place (DESIGN.md decisions 11 and 27) and what megalm trains
on is, document for document, what `megalm-prep inspect` shows. The name follows Megatron-LM.
"""
from __future__ import annotations

from data_prep.mmidx import Shard as IndexedDataset
from data_prep.mmidx import ShardFormatError

__all__ = ["IndexedDataset", "ShardFormatError"]
