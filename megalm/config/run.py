"""A run config composes the model, parallel, data and train sections (configs/run/*.yaml).

    model: tiny                 # a name in configs/model/, a YAML path, or a mapping;
                                # a mapping with `base: NAME` loads NAME and overrides its fields
    parallel: {tp: 2, pp: 2, zero_stage: 1}
    data: {train_paths: [...], seq_len: 128}
    train: {micro_batch_size: 4, global_batch_size: 16, train_steps: 300}

`load_run_config(path, overrides)` applies `section.field=value` overrides (YAML-parsed) before the
typed load, so a typo in an override is reported exactly like a typo in the file.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from .data import DataConfig
from .loader import ConfigError, apply_overrides, from_dict, load_yaml, to_dict
from .model import ModelConfig, load_model_config
from .parallel import ParallelConfig
from .train import TrainConfig


@dataclass
class RunConfig:
    model: ModelConfig
    data: DataConfig
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def validate(self, where: str = "") -> None:
        self.model.check_layout(self.parallel.tp, self.parallel.pp, "model")
        if self.data.seq_len > self.model.max_seq_len:
            raise ConfigError(f"data.seq_len: {self.data.seq_len} exceeds model.max_seq_len "
                              f"{self.model.max_seq_len}; lower seq_len or raise max_seq_len")

    def check_launch(self, world_size: int) -> int:
        """Everything that depends on the number of processes, checked before any process group starts.
        Returns the gradient accumulation steps."""
        dp = self.parallel.data_parallel_size(world_size)
        accum = self.train.gradient_accumulation_steps(dp)
        self.data.check_files()
        return accum

    def to_dict(self) -> dict:
        return to_dict(self)


def _resolve_model(value: Any) -> dict | ModelConfig:
    if isinstance(value, str):
        return load_model_config(value)
    if isinstance(value, dict) and "base" in value:
        rest = {k: v for k, v in value.items() if k != "base"}
        base = to_dict(load_model_config(value["base"]))
        base.update(rest)
        return base
    return value


def run_config_from_dict(data: dict) -> RunConfig:
    data = dict(data)
    if "model" not in data:
        raise ConfigError("model: required section is missing (a name like 'tiny', a path, or a mapping)")
    if "data" not in data:
        raise ConfigError("data: required section is missing (at least data.train_paths)")
    data["model"] = _resolve_model(data["model"])
    return from_dict(RunConfig, data)


def load_run_config(path: str | os.PathLike, overrides: list[str] | None = None) -> RunConfig:
    data = load_yaml(path)
    if overrides:
        model = data.get("model")
        if isinstance(model, str) and any(o.startswith("model.") for o in overrides):
            data["model"] = {"base": model}  # let `model.x=...` override a named model
        apply_overrides(data, overrides)
    return run_config_from_dict(data)
