"""Data section of a run config: which token shards to train/validate on and how to cut samples."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional

from data_prep.shards import ShardPathError
from data_prep.shards import expand_shard_path as prep_expand_shard_path

from .loader import ConfigError, require


def expand_shard_path(path: str, where: str = "data.train_paths") -> list[str]:
    """The shard prefixes one entry of a shard list names, in order, by data_prep's one rule
    (`data_prep.shards.expand_shard_path`: a prep output through its manifest, refused while incomplete;
    a plain PREFIX.bin/.idx; a glob through .idx files). Errors name the entry (`where`) and the fix."""
    try:
        return prep_expand_shard_path(path)
    except ShardPathError as e:
        raise ConfigError(f"{where}: {e}") from None


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
        from data_prep.sft import seq_len_problem

        for name in ("train_paths", "valid_paths", "test_paths"):
            for prefix in expand_shard_paths(getattr(self, name), f"{where}.{name}"):
                problem = seq_len_problem(prefix, self.seq_len)  # fine-tuning data: one record per sample
                if problem is not None:
                    raise ConfigError(f"{where}.seq_len: {problem}")
        if self.tokenizer is not None and not os.path.isfile(self.tokenizer):
            raise ConfigError(f"{where}.tokenizer: file {self.tokenizer!r} does not exist")

    def check_vocabulary(self, vocab_size: int, where: str = "data") -> None:
        """Refuse data with token ids the model cannot embed, before any process group starts: the
        tokenizer's vocabulary (data.tokenizer, else each output's manifest) and each shard's largest
        id must fit model.vocab_size. At tp>1 such ids would otherwise train silently as zero vectors."""
        from data_prep.manifest import load_manifest
        from data_prep.mmidx import Shard

        fix = "use the tokenizer the shards were made with and a model.vocab_size that covers it"
        if self.tokenizer is not None:
            from data_prep.tokenizer import load_tokenizer

            tok_vocab = load_tokenizer(self.tokenizer).vocab_size
            if tok_vocab > vocab_size:
                raise ConfigError(f"{where}.tokenizer: {self.tokenizer} has {tok_vocab} tokens but model.vocab_size "
                                  f"is {vocab_size}: {fix}")
        for name in ("train_paths", "valid_paths", "test_paths"):
            for i, entry in enumerate(getattr(self, name)):
                manifest = load_manifest(entry) or {}
                tok_vocab = (manifest.get("tokenizer") or {}).get("vocab_size")
                if isinstance(tok_vocab, int) and tok_vocab > vocab_size:
                    raise ConfigError(f"{where}.{name}[{i}]: {entry} was tokenised with a {tok_vocab}-token "
                                      f"vocabulary (its manifest) but model.vocab_size is {vocab_size}: {fix}")
                for shard in expand_shard_path(entry, f"{where}.{name}[{i}]"):
                    top = Shard(shard).max_token_id()
                    if top >= vocab_size:
                        raise ConfigError(f"{where}.{name}[{i}]: shard {shard} holds token id {top}, outside "
                                          f"model.vocab_size={vocab_size}: {fix}")
