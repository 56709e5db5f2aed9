"""The JSON manifest written beside every output (PREFIX.manifest.json) and the resume checks on it.

The manifest is rewritten atomically after every finished shard with "complete": false, and once more
with "complete": true at the end. A re-run with the same fingerprint (same input bytes, tokenizer and
output-shaping options) keeps every listed shard that still verifies and redoes the rest.

Fine-tuning outputs (`tokenize --sft`, data_prep/sft.py) add:
    "sft"        {"layout": "padded", "seq_len", "pad_id", "eod_id", "eod_token", "template" (the rendering
                 of prompt/response and chat records), "loss_mask" and "packing" (what they mean),
                 "truncated" and "target_tokens" (totals)}
    per shard    "loss_mask": {"name", "bin_bytes", "idx_sha256", "target_tokens"} (the uint8 mask shard
                 beside it, checked on resume like the shard) and "sft_counts" (records of its range
                 skipped as prompt_too_long or truncated, so a resumed run keeps exact totals)
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Optional

from data_prep.mmidx import ShardFormatError, data_path, index_path, read_index_header
from data_prep.sft import LOSS_MASK_DTYPE
from data_prep.shards import loss_mask_prefix, manifest_path
from data_prep.tokenizer import file_sha256

MANIFEST_FORMAT = "megalm-prep-manifest"
MANIFEST_VERSION = 1
SHARD_NAMING = ("one shard: PREFIX.bin/PREFIX.idx; several: PREFIX_00000.bin/.idx, PREFIX_00001.bin/.idx, ... "
                "in document order; names in 'shards' are relative to this manifest's directory")


def describe_inputs(paths: list[str]) -> list[dict[str, Any]]:
    """Path, size and sha256 of every input file, in reading order."""
    return [{"path": p, "bytes": os.path.getsize(p), "sha256": file_sha256(p)} for p in paths]


def fingerprint(inputs: list[dict[str, Any]], tokenizer_sha256: str, options: dict[str, Any]) -> str:
    """Identifies everything that determines the shard bytes; resume only reuses shards with the same one."""
    blob = json.dumps({"inputs": [[i["path"], i["bytes"], i["sha256"]] for i in inputs],
                       "tokenizer": tokenizer_sha256, "options": options}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def load_manifest(prefix: str) -> Optional[dict[str, Any]]:
    """The manifest if present and readable; an unreadable one is treated as absent (we start over)."""
    try:
        with open(manifest_path(prefix)) as f:
            m = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(m, dict) or m.get("format") != MANIFEST_FORMAT:
        return None
    return m


def write_manifest(prefix: str, manifest: dict[str, Any]) -> None:
    path = manifest_path(prefix)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=1)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def shard_problem(shard_prefix: str, entry: dict[str, Any], dtype: str) -> Optional[str]:
    """Why a shard listed in a manifest cannot be reused (None when it is complete and unchanged)."""
    idx = index_path(shard_prefix)
    try:
        header = read_index_header(idx)
    except ShardFormatError as exc:
        return str(exc)
    if str(header.dtype) != dtype:
        return f"{idx}: dtype {header.dtype}, manifest says {dtype}"
    if header.sequence_count != entry["documents"]:
        return f"{idx}: {header.sequence_count} documents, manifest says {entry['documents']}"
    try:
        size = os.path.getsize(data_path(shard_prefix))
    except OSError:
        return f"{data_path(shard_prefix)}: missing"
    if size != entry["bin_bytes"]:
        return f"{data_path(shard_prefix)}: {size} bytes, manifest says {entry['bin_bytes']}"
    if file_sha256(idx) != entry["idx_sha256"]:
        return f"{idx}: contents differ from the manifest's hash"
    mask = entry.get("loss_mask")
    if mask:  # fine-tuning data: its loss mask is part of the shard
        return shard_problem(loss_mask_prefix(shard_prefix), {**mask, "documents": entry["documents"]},
                             str(LOSS_MASK_DTYPE))
    return None
