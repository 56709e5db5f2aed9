"""Data section of a run config: which token shards to train/validate on and how to cut samples."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional

from .loader import ConfigError, require


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


@dataclass
class DataConfig:
    # Shard prefixes: PREFIX names the pair PREFIX.bin / PREFIX.idx written by `megalm-prep tokenize`.
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
            for i, prefix in enumerate(getattr(self, name)):
                for ext in (".idx", ".bin"):
                    if not os.path.isfile(prefix + ext):
                        raise ConfigError(f"{where}.{name}[{i}]: shard file {prefix + ext!r} does not exist "
                                          f"(give the prefix without .bin/.idx; build shards with `megalm-prep tokenize`)")
        if self.tokenizer is not None and not os.path.isfile(self.tokenizer):
            raise ConfigError(f"{where}.tokenizer: file {self.tokenizer!r} does not exist")
