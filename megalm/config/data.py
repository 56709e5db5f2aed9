"""Data section of a run config: which token shards to train/validate on and how to cut samples."""
from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass, field
from typing import Optional

from .loader import ConfigError, require

GLOB_CHARS = "*?["


def expand_shard_path(path: str, where: str = "data.train_paths") -> list[str]:
    """The shard prefixes one entry of a shard list names, in order:

      PREFIX          PREFIX.bin and PREFIX.idx exist: that one shard;
      PREFIX          PREFIX.manifest.json from `megalm-prep tokenize` (an output written as several shards,
                      PREFIX_00000, PREFIX_00001, ...): every shard it lists;
      data/*/tok      a glob: every PREFIX whose PREFIX.idx matches `data/*/tok.idx`, sorted.

    Missing files and an unfinished prep run fail here, naming the entry (`where`) and the fix."""
    if os.path.isfile(path + ".idx") and os.path.isfile(path + ".bin"):
        return [path]
    manifest = path + ".manifest.json"
    if os.path.isfile(manifest):
        try:
            with open(manifest) as f:
                m = json.load(f)
            names = [entry["name"] for entry in m["shards"]]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ConfigError(f"{where}: {manifest!r} is not a readable megalm-prep manifest ({e})") from None
        if not m.get("complete"):
            raise ConfigError(f"{where}: {manifest!r} says the prep run is not complete; re-run the same "
                              f"`megalm-prep tokenize` command to finish it")
        folder = os.path.dirname(manifest)
        shards = [os.path.join(folder, n) for n in names]
        missing = [s + ext for s in shards for ext in (".idx", ".bin") if not os.path.isfile(s + ext)]
        if missing:
            raise ConfigError(f"{where}: {manifest!r} lists shard files that do not exist: {missing[:3]}")
        return shards
    if any(c in path for c in GLOB_CHARS):
        shards = sorted(p[: -len(".idx")] for p in glob.glob(path + ".idx"))
        shards = [s for s in shards if os.path.isfile(s + ".bin")]
        if not shards:
            raise ConfigError(f"{where}: the pattern {path!r} matches no shard (no PREFIX.idx with its PREFIX.bin)")
        return shards
    raise ConfigError(f"{where}: no shard {path!r}: neither {path + '.idx'!r} + {path + '.bin'!r} nor {manifest!r} "
                      f"exists (give the prefix without .bin/.idx; build shards with `megalm-prep tokenize`)")


def parse_split(split: str, where: str = "data") -> tuple[float, float, float]:
    """Megatron-style "train,valid,test" weights (e.g. "969,30,1") normalised to fractions."""
    parts = [p.strip() for p in split.split(",")]
    try:
        nums = [float(p) for p in parts]
    except ValueError:
        nums = []
    if len(nums) == 0 or len(nums) > 3 or any(n < 0 for n in nums) or sum(nums) <= 0:
        raise ConfigError(f"{where}.split: expected up to three non-negative weights like '969,30,1'; got {split!r}")
    nums += [0.0] * (3 - len(nums))
    total = sum(nums)
    return (nums[0] / total, nums[1] / total, nums[2] / total)



def expand_shard_paths(entries: list[str], where: str) -> list[str]:
    """Every shard prefix a list of entries names, in order (`where` names the list, e.g. "data.valid_paths")."""
    return [p for i, e in enumerate(entries) for p in expand_shard_path(e, f"{where}[{i}]")]


@dataclass
class DataConfig:
    # Shard prefixes: PREFIX names the pair PREFIX.bin / PREFIX.idx written by `megalm-prep tokenize`, or
    # (an output written as several shards) every shard in its PREFIX.manifest.json; globs allowed.
    # See expand_shard_path. An entry's weight is shared by its shards in proportion to their tokens.
    train_paths: list[str] = field(default_factory=list)
    # Blending weights, one per train path (normalised to sum 1); None = equal weights.
    train_weights: Optional[list[float]] = None
    # Separate validation/test shards. When empty, `split` cuts the train shards by document instead.
    valid_paths: list[str] = field(default_factory=list)
    test_paths: list[str] = field(default_factory=list)
    split: str = "969,30,1"
    seq_len: int = 2048
    seed: int = 1234
    # Where sample-index caches (.npy) go; default: an `index-cache` folder beside each shard.
    cache_dir: Optional[str] = None
    # tokenizer.json used to build the shards (its hash goes into checkpoints; eval/generate decode with it).
    tokenizer: Optional[str] = None

    def validate(self, where: str = "data") -> None:
        where = where or "data"
        require(len(self.train_paths) > 0, where, "train_paths", "at least one shard prefix is required")
        if self.train_weights is not None:
            require(len(self.train_weights) == len(self.train_paths), where, "train_weights",
                    f"needs one weight per train path ({len(self.train_paths)}), got {len(self.train_weights)}")
            require(all(w > 0 for w in self.train_weights), where, "train_weights", "weights must be > 0")
        require(self.seq_len > 0, where, "seq_len", f"must be > 0, got {self.seq_len}")
        parse_split(self.split, where)

    def check_files(self, where: str = "data") -> None:
        """Fail early (before any process group starts) when a shard or the tokenizer is missing."""
        for name in ("train_paths", "valid_paths", "test_paths"):
            expand_shard_paths(getattr(self, name), f"{where}.{name}")
        if self.tokenizer is not None and not os.path.isfile(self.tokenizer):
            raise ConfigError(f"{where}.tokenizer: file {self.tokenizer!r} does not exist")
