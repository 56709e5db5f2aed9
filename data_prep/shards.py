"""Which shards a path names: the one expansion rule, used by megalm-prep and by megalm's data config.

    PREFIX       with PREFIX.manifest.json (every megalm-prep output has one): the shards it lists,
                 refused while it says "complete": false, so a half-written output is never trained
                 on, merged or summarised as if it were whole;
    PREFIX       without a manifest: the shard PREFIX.bin + PREFIX.idx (e.g. written by other tools);
    data/*/tok   a glob: every PREFIX whose PREFIX.idx matches data/*/tok.idx and has its .bin, sorted.

Fine-tuning outputs (data_prep/sft.py) give each token shard PREFIX a loss mask, the sibling shard
`loss_mask_prefix(PREFIX)` = PREFIX.loss_mask.bin/.idx. It is never a token shard itself: a glob skips
it, a path naming it is refused, and a manifest that lists it requires its files.

The shards themselves are read (and validated) by `data_prep.mmidx.Shard`.
"""
from __future__ import annotations

import glob as globlib
import json
import os
from typing import Optional

from data_prep.errors import PrepError
from data_prep.mmidx import data_path, index_path

SHARD_DIGITS = 5
GLOB_CHARS = "*?["
LOSS_MASK_SUFFIX = ".loss_mask"


class ShardPathError(PrepError):
    """A shard path names no usable shard: nothing there, a broken or incomplete manifest, a missing file.
    The message names the path or the manifest and the fix; callers may prefix where the path came from."""


def numbered_prefix(prefix: str, index: int) -> str:
    """PREFIX_00000, PREFIX_00001, ...: the names used when an output has several shards."""
    return f"{prefix}_{index:0{SHARD_DIGITS}d}"


def manifest_path(prefix: str) -> str:
    return prefix + ".manifest.json"


def loss_mask_prefix(prefix: str) -> str:
    """The shard that holds token shard PREFIX's loss mask (fine-tuning data): PREFIX.loss_mask."""
    return prefix + LOSS_MASK_SUFFIX


def loss_mask_of(prefix: str) -> Optional[str]:
    """PREFIX's loss-mask shard when it has one (its .idx exists), else None (pre-training data)."""
    mask = loss_mask_prefix(prefix)
    return mask if os.path.isfile(index_path(mask)) else None


def _manifest_shards(manifest: str, allow_incomplete: bool) -> list[str]:
    try:
        with open(manifest) as f:
            m = json.load(f)
        names = [entry["name"] for entry in m["shards"]]
        masked = [bool(entry.get("loss_mask")) for entry in m["shards"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ShardPathError(f"{manifest!r} is not a readable megalm-prep manifest ({e}); re-run the "
                             f"`megalm-prep tokenize` command that wrote it") from None
    # Checked before the files: an unfinished run legitimately lacks some, and "finish the run" is the fix.
    if not m.get("complete") and not allow_incomplete:
        raise ShardPathError(f"{manifest!r} says the prep run is not complete (\"complete\": false), so its shards "
                             f"are not all written; re-run the same `megalm-prep tokenize` command to finish it "
                             f"(`megalm-prep inspect --allow-incomplete` shows the shards written so far)")
    folder = os.path.dirname(manifest)
    shards = [os.path.join(folder, n) for n in names]
    # A listed loss mask must be there: without it fine-tuning data would train on prompts and padding.
    pairs = shards + [loss_mask_prefix(s) for s, has_mask in zip(shards, masked) if has_mask]
    missing = [p for s in pairs for p in (index_path(s), data_path(s)) if not os.path.isfile(p)]
    if missing:
        raise ShardPathError(f"{manifest!r} lists shard files that do not exist: {missing[:3]}; re-run the "
                             f"`megalm-prep tokenize` command that wrote it to redo them")
    return shards


def expand_shard_path(path: str, *, allow_incomplete: bool = False) -> list[str]:
    """The shard prefixes `path` names, in order (see the module docstring); ShardPathError otherwise.

    `allow_incomplete=True` is for looking at an unfinished output (`megalm-prep inspect
    --allow-incomplete`): it lists the shards finished so far instead of refusing."""
    path = os.fspath(path)
    if path.endswith(LOSS_MASK_SUFFIX):
        raise ShardPathError(f"{path!r} is a loss mask, not token shards; name the output it belongs to: "
                             f"{path[: -len(LOSS_MASK_SUFFIX)]!r}")
    manifest = manifest_path(path)
    # The manifest wins over PREFIX.idx: a one-shard output's PREFIX.idx appears before its manifest
    # says complete, and only the manifest knows whether the output is whole.
    if os.path.isfile(manifest):
        return _manifest_shards(manifest, allow_incomplete)
    idx, bin_ = index_path(path), data_path(path)
    if os.path.isfile(idx):
        if not os.path.isfile(bin_):
            raise ShardPathError(f"{bin_!r}: data file does not exist (its index {idx!r} does); rebuild the shard")
        return [path]
    if any(c in path for c in GLOB_CHARS):
        shards = sorted(p[: -len(".idx")] for p in globlib.glob(path + ".idx"))
        shards = [s for s in shards if os.path.isfile(data_path(s)) and not s.endswith(LOSS_MASK_SUFFIX)]
        if not shards:
            raise ShardPathError(f"the pattern {path!r} matches no shard (no PREFIX.idx with its PREFIX.bin)")
        return shards
    raise ShardPathError(f"no shard {path!r}: no shards found for prefix (neither {idx!r} + {bin_!r} nor "
                         f"{manifest!r} exists); give the prefix without .bin/.idx, build shards with "
                         f"`megalm-prep tokenize`")
