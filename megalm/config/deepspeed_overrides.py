"""`train.deepspeed_config`: DeepSpeed settings the run config does not cover, merged last into the
generated DeepSpeed config (`megalm.training.deepspeed_config`).

The run config owns batch sizes, the ZeRO stage, precision, clipping, the optimiser and the LR
schedule: the trainer, the checkpoint metadata, the resume checks and the planner all read them from
there. A DeepSpeed key that would change one of them behind the run config's back is refused unless
it agrees with the run config, and the error names both fields. Everything else (bucket sizes,
overlap_comm, stage3_* thresholds, offload, loss-scale tuning, ...) passes through unchanged.

Torch-free, so `RunConfig.check_launch` refuses a conflict before any process group starts.
"""
from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass
from typing import Any, Mapping, Optional

from .loader import ConfigError
from .train import TrainConfig

WHERE = "train.deepspeed_config"
_ABSENT = object()  # the run config never sets this key: any value in the user's dict conflicts


@dataclass(frozen=True)
class OwnedKey:
    """One DeepSpeed key the run config decides. `expected` is the value that agrees with the run
    config (`_ABSENT`: no value does); `owner` shows the run-config side of a conflict; `fix` is the
    field(s) to set instead."""
    path: tuple[str, ...]
    expected: Any
    owner: str
    fix: str


def owned_keys(train: TrainConfig, zero_stage: int, dp: int) -> list[OwnedKey]:
    """The DeepSpeed keys the run config owns, with the values that agree with it for this `dp`."""
    t = train
    accum = t.gradient_accumulation_steps(dp)
    precision = f"train.precision={t.precision}"
    optimiser = "train.lr, train.adam_beta1, train.adam_beta2, train.adam_eps, train.weight_decay"
    schedule = "train.lr, train.min_lr, train.warmup_steps, train.lr_decay, train.lr_decay_steps"
    return [
        OwnedKey(("train_batch_size",), t.global_batch_size, f"train.global_batch_size={t.global_batch_size}",
                 "train.global_batch_size"),
        OwnedKey(("train_micro_batch_size_per_gpu",), t.micro_batch_size,
                 f"train.micro_batch_size={t.micro_batch_size}", "train.micro_batch_size"),
        OwnedKey(("gradient_accumulation_steps",), accum,
                 f"train.global_batch_size / (train.micro_batch_size x dp) = {t.global_batch_size} / "
                 f"({t.micro_batch_size} x {dp}) = {accum}", "train.global_batch_size or train.micro_batch_size"),
        # Compared with train.grad_clip, not with the generated value: under fp32 ZeRO-0 GuardedAdamW
        # clips and the generated DeepSpeed value is 0.0, but the user means the same clipping norm.
        OwnedKey(("gradient_clipping",), t.grad_clip, f"train.grad_clip={t.grad_clip}", "train.grad_clip"),
        OwnedKey(("zero_optimization", "stage"), zero_stage, f"parallel.zero_stage={zero_stage}",
                 "parallel.zero_stage"),
        OwnedKey(("bf16", "enabled"), t.precision == "bf16", precision, "train.precision"),
        OwnedKey(("bfloat16", "enabled"), t.precision == "bf16", precision, "train.precision"),  # DeepSpeed's old name
        OwnedKey(("fp16", "enabled"), t.precision == "fp16", precision, "train.precision"),
        OwnedKey(("torch_autocast", "enabled"), False, precision, "train.precision"),
        # bf16 under pipeline parallelism needs fp32 gradient accumulation (DESIGN decision 5).
        OwnedKey(("data_types", "grad_accum_dtype"), "fp32" if t.precision == "bf16" else _ABSENT,
                 precision + ("" if t.precision == "bf16" else " (which leaves it unset)"), "train.precision"),
        # megalm builds AdamW (GuardedAdamW) and hands DeepSpeed the LR schedule as a factory; a
        # DeepSpeed optimizer or scheduler would replace them (or DeepSpeed refuses having both).
        OwnedKey(("optimizer",), _ABSENT, f"{optimiser} (megalm builds AdamW from them)", optimiser),
        OwnedKey(("scheduler",), _ABSENT, f"{schedule} (megalm builds the LR schedule from them)", schedule),
    ]


def load_deepspeed_overrides(value: Optional[str | Mapping[str, Any]]) -> dict:
    """The user's dict: `train.deepspeed_config` inline, or read from the JSON file it names."""
    if value is None:
        return {}
    if isinstance(value, Mapping):
        return copy.deepcopy(dict(value))
    if not os.path.isfile(value):
        raise ConfigError(f"{WHERE}: file {value!r} does not exist; give a DeepSpeed JSON file or an inline mapping")
    with open(value, encoding="utf-8") as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{WHERE}: {value!r} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{WHERE}: {value!r} must hold a JSON object of DeepSpeed fields, got {type(data).__name__}")
    return data


def _agrees(value: Any, expected: Any) -> bool:
    if expected is _ABSENT:
        return False
    if isinstance(expected, bool):  # `1` is not `true`: DeepSpeed's own validation differs by field
        return isinstance(value, bool) and value == expected
    if isinstance(expected, (int, float)):
        return isinstance(value, (int, float)) and not isinstance(value, bool) and value == expected
    return value == expected


def _show(value: Any) -> str:
    return json.dumps(value) if not isinstance(value, (dict, list)) else json.dumps(value, sort_keys=True)


def check_deepspeed_overrides(train: TrainConfig, zero_stage: int, dp: int) -> dict:
    """Refuse user DeepSpeed keys that disagree with the run config (every conflict in one ConfigError);
    return the user's dict without the owned keys, ready to merge: they agree, and the generated value
    stands (it may be spelled differently, e.g. gradient_clipping under GuardedAdamW)."""
    user = load_deepspeed_overrides(train.deepspeed_config)
    source = f" from {train.deepspeed_config}" if isinstance(train.deepspeed_config, str) else ""
    conflicts = []
    for key in owned_keys(train, zero_stage, dp):
        node: Any = user
        for i, part in enumerate(key.path[:-1]):
            node = node.get(part) if isinstance(node, dict) else None
            if node is not None and not isinstance(node, dict):
                section = ".".join(key.path[:i + 1])
                raise ConfigError(f"{WHERE}.{section}{source}: expected a mapping of DeepSpeed fields, got "
                                  f"{_show(node)}")
        if not isinstance(node, dict) or key.path[-1] not in node:
            continue
        name = ".".join(key.path)
        value = node[key.path[-1]]
        if _agrees(value, key.expected):
            del node[key.path[-1]]
        else:
            conflicts.append(f"{WHERE}.{name}={_show(value)} conflicts with {key.owner}: set {key.fix} instead"
                             f" (or remove it{source})")
    if conflicts:
        raise ConfigError("; ".join(conflicts))
    return user
