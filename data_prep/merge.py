"""`megalm-prep merge`: concatenate the shards of several outputs (same dtype) into one shard, atomically.

Documents keep their order: inputs in the order given, each input's shards in manifest order. The
result is written through ShardWriter (temporary names, renamed when complete) in bounded chunks, so
merging shards larger than memory works. An input whose manifest says it is incomplete is refused (the
one expansion rule, data_prep.shards) and there is no override: the merged output is marked complete,
so merging a half-written input would pass it off as whole. Fine-tuning outputs (a loss mask beside
each shard) are refused: the merged shard would lose the masks and train on prompts; list the outputs
in data.train_paths instead, which blends them.
"""
from __future__ import annotations

import os
import sys
import time
from typing import Optional, Any, TextIO

import numpy as np

from data_prep.errors import PrepError
from data_prep.manifest import MANIFEST_FORMAT, MANIFEST_VERSION, SHARD_NAMING, load_manifest, write_manifest
from data_prep.mmidx import CODE_OF_DTYPE, Shard, ShardFormatError, ShardWriter, data_path, index_path
from data_prep.output_dir import prepare_output_dir
from data_prep.shards import expand_shard_path, loss_mask_of
from data_prep.tokenizer import file_sha256

CHUNK_TOKENS = 1 << 24


def _copy(shard: Shard, writer: ShardWriter) -> None:
    if len(shard) == 0:
        return
    data = shard.tokens()
    ends = np.cumsum(shard.sequence_lengths, dtype=np.int64)
    i, n, done = 0, len(shard), 0
    while i < n:
        j = max(int(np.searchsorted(ends, done + CHUNK_TOKENS, side="right")), i + 1)
        writer.add_encoded(data[done:int(ends[j - 1])], shard.sequence_lengths[i:j].tolist())
        done = int(ends[j - 1])
        i = j


def merge(inputs: list[str], output_prefix: str, out: Optional[TextIO] = None) -> dict[str, Any]:
    out = out if out is not None else sys.stdout
    start = time.perf_counter()
    out_abs = os.path.abspath(output_prefix)
    shards: list[Shard] = []
    tokenizer_hashes = set()
    for prefix in inputs:
        try:
            parts = [Shard(p) for p in expand_shard_path(prefix)]
        except ShardFormatError as exc:
            raise PrepError(str(exc)) from None
        masked = [p.prefix for p in parts if loss_mask_of(p.prefix) is not None]
        if masked:
            raise PrepError(f"merge: {masked[0]} is fine-tuning data with a loss mask, which merge does not carry; "
                            f"list the outputs in data.train_paths instead (training blends them)")
        if any(os.path.abspath(p.prefix) == out_abs for p in parts):
            raise PrepError(f"--output-prefix {output_prefix!r} is also an input; merge into a new prefix")
        manifest = load_manifest(prefix)
        tokenizer_hashes.add((manifest or {}).get("tokenizer", {}).get("sha256"))
        shards.extend(parts)
    if not shards:
        raise PrepError("merge: the inputs hold no shards")
    dtype = shards[0].dtype
    for s in shards:
        if s.dtype != dtype:
            raise PrepError(f"merge: {s.prefix} holds {s.dtype} tokens but {shards[0].prefix} holds {dtype}; "
                            f"only shards of one dtype (one tokenizer) can be merged")
        if not np.array_equal(s.document_indices, np.arange(len(s) + 1)):
            raise PrepError(f"merge: {s.prefix} groups several sequences per document (sentence-split data); "
                            f"only one-sequence-per-document shards can be merged")
    prepare_output_dir(output_prefix)
    with ShardWriter(output_prefix, dtype) as writer:
        for s in shards:
            _copy(s, writer)
        documents, tokens = writer.documents, writer.tokens
    hashes = tokenizer_hashes - {None}
    manifest = {
        "format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "complete": True,
        "prefix": os.path.basename(output_prefix), "shard_naming": SHARD_NAMING,
        "tokenizer": {"sha256": hashes.pop() if len(hashes) == 1 and None not in tokenizer_hashes else None},
        "dtype": str(dtype), "dtype_code": CODE_OF_DTYPE[dtype], "documents": documents, "tokens": tokens,
        "merged_from": [{"prefix": s.prefix, "documents": len(s), "tokens": s.num_tokens}
                        for s in shards],
        "elapsed_seconds": round(time.perf_counter() - start, 3),
        "shards": [{"name": os.path.basename(output_prefix), "documents": documents, "tokens": tokens,
                    "bin_bytes": os.path.getsize(data_path(output_prefix)),
                    "idx_sha256": file_sha256(index_path(output_prefix))}],
    }
    write_manifest(output_prefix, manifest)
    print(f"{output_prefix}: merged {len(shards)} shard(s) from {len(inputs)} input(s): {documents} documents, "
          f"{tokens} tokens ({dtype}) in {manifest['elapsed_seconds']:.2f} s", file=out)
    return manifest
