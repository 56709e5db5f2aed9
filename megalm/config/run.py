"""A run config composes the model, parallel, data and train sections (configs/run/*.yaml).

    model: tiny                 # a name in megalm/config/models/, a YAML path, or a mapping;
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
from typing import Any, Mapping

from .data import DataConfig
from .deepspeed_overrides import check_deepspeed_overrides
from .loader import ConfigError, apply_overrides, from_dict, load_yaml, to_dict
from .model import ModelConfig, load_model_config
from .parallel import ParallelConfig
from .train import TrainConfig


def check_precision(precision: str, zero_stage: int, pp: int = 1) -> None:
    """The precision x ZeRO (x PP) rule, shared by the config loader and the planner."""
    if precision == "fp16" and pp > 1 and zero_stage >= 2:
        # One engine per stage (megalm.training.stage_engine), each with its own dynamic loss scale: the
        # output gradient a stage receives is already scaled by the next stage's, and its engine would
        # scale it again.
        raise ConfigError(f"train.precision: fp16 cannot be combined with pipeline parallelism (pp={pp}) "
                          f"under parallel.zero_stage {zero_stage} (each stage's engine keeps its own loss "
                          f"scale); use bf16, or zero_stage 1")
    if precision == "bf16" and zero_stage == 0:
        # DeepSpeed 0.19.8 keeps fp32 master weights and fp32 gradient accumulation for bf16 only in
        # its ZeRO-1 BF16 optimizer; at ZeRO-0 it refuses that mix (NotImplementedError at start-up)
        # or, without it, would step bf16 weights directly.
        raise ConfigError("train.precision: bf16 needs parallel.zero_stage >= 1 (DeepSpeed's bf16 optimizer "
                          "with fp32 master weights is its ZeRO-1 path); set parallel.zero_stage=1, which at "
                          "dp=1 uses the same memory as ZeRO-0")


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
        check_precision(self.train.precision, self.parallel.zero_stage, self.parallel.pp)

    def check_launch(self, world_size: int) -> int:
        """Everything that depends on the number of processes, checked before any process group starts.
        Returns the gradient accumulation steps."""
        dp = self.parallel.data_parallel_size(world_size)
        accum = self.train.gradient_accumulation_steps(dp)
        check_deepspeed_overrides(self.train, self.parallel.zero_stage, dp)  # needs dp (accumulation steps)
        self.data.check_files()
        self.data.check_vocabulary(self.model.vocab_size)
        self.train.check_init_from()
        return accum

    def to_dict(self) -> dict:
        return to_dict(self)

    @classmethod
    def from_checkpoint_meta(cls, meta: Mapping[str, Any], where: str) -> "RunConfig":
        """The run config a checkpoint was trained with: its metadata's "config" (the trainer writes
        `to_dict()` there), parsed and validated exactly like a training config, so tools read typed
        fields whose defaults are the config classes' own. `where` names the metadata file in errors."""
        section = meta.get("config") if isinstance(meta, Mapping) else None
        if not isinstance(section, Mapping):
            raise ConfigError(f"{where}: no 'config' mapping (the run config the trainer records); this file "
                              f"was not written by megalm's trainer or is damaged; use another checkpoint")
        try:
            return run_config_from_dict(dict(section))
        except ConfigError as e:
            raise ConfigError(f"{where}: its 'config' is not a valid run config for this megalm version: {e}. "
                              f"Fix that field in {os.path.basename(where)}, or read the checkpoint with the "
                              f"megalm version that wrote it") from None


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
