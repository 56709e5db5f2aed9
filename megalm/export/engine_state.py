"""Put a checkpoint into a live DeepSpeed engine of any layout, and save it from there: a saved step read
tensor by tensor (`apply_checkpoint`, megalm-reshard) or a layout-free FullState (`apply_full_state`,
megalm-import and init_from).

This is how a checkpoint moves to another (tp, pp, dp, ZeRO) layout: the target layout's own engine
is built by `megalm.training.engine.build_engine` (so its model, parameter groups, ZeRO partitioning
and pipeline stages are exactly what training at that layout builds), the weights and Adam moments are
written into it through DeepSpeed's `safe_set_full_*` API (which knows its flat partitions), and
`megalm.training.checkpoint.save_checkpoint` writes DeepSpeed's own files. We never hand-write
DeepSpeed's formats, so `--resume` at the new layout loads them like any other checkpoint.

Every function here is collective: every rank of the target world calls it, in the same order.
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, Callable, Optional

import torch

from megalm.training.engine import Engine

from .consolidate import FullState, pipeline_to_gpt_name
from .full_weights import shard_for_tp
from .shard_reader import ShardReader
from .zero_merge import MOMENTS


def base_optimizer(ds: Any) -> torch.optim.Optimizer:
    """The torch optimizer that holds the Adam state (inside DeepSpeed's ZeRO wrapper, if any)."""
    opt = ds.optimizer
    return getattr(opt, "optimizer", opt) if ds.zero_optimization_stage() > 0 else opt


def _adam_params(ds: Any, base: torch.optim.Optimizer) -> list[torch.Tensor]:
    """The tensors Adam steps: the base optimizer's params, or for ZeRO-3 (which empties its
    param_groups between steps and swaps each flat partition in) the fp32 flat partitions."""
    flat = getattr(ds.optimizer, "fp32_partitioned_groups_flat", None)
    if flat is not None:
        return list(flat)
    return [p for group in base.param_groups for p in group["params"]]


def _init_adam_state(params: list[torch.Tensor], base: torch.optim.Optimizer, step: float) -> None:
    """Create Adam's state the way torch.optim.AdamW's first step would (it is lazy), so DeepSpeed's
    state setters have tensors to write into; `step` is the bias-correction count to continue from."""
    for p in params:
        st = base.state[p]
        # torch's rule: fused (and capturable) AdamW keeps `step` on the parameter's device, the others on CPU
        on_device = base.defaults.get("fused") or base.defaults.get("capturable")
        st["step"] = torch.tensor(float(step), dtype=torch.float32, device=p.device if on_device else "cpu")
        for key in MOMENTS:
            st[key] = torch.zeros_like(p, memory_format=torch.preserve_format)


def _local_name(engine: Engine, name: str, state: FullState) -> str:
    return pipeline_to_gpt_name(name, state.cfg) if engine.is_pipeline else name


def apply_full_state(engine: Engine, state: FullState, weights_only: bool = False) -> None:
    """Load weights (and, unless `weights_only`, Adam moments, step count, LR schedule and engine
    counters) into `engine`, sliced for this rank's TP position."""
    grid, cfg = engine.grid, state.cfg
    restore_optimizer = not weights_only and state.moments is not None

    def local(name: str) -> dict[str, torch.Tensor]:
        gpt = _local_name(engine, name, state)
        kinds = ("weight",) + (MOMENTS if restore_optimizer else ())
        full = {"weight": state.weights[gpt], **(state.moments[gpt] if restore_optimizer else {})}
        return {k: shard_for_tp(gpt, full[k], cfg, grid.tp, grid.tp_rank) for k in kinds}

    apply_local_state(engine, local, (state.adam_step or 0.0) if restore_optimizer else None, state.engine_state)


def apply_checkpoint(engine: Engine, reader: ShardReader, schedule: bool = True) -> None:
    """Like `apply_full_state`, reading from a saved step of any layout one parameter at a time instead of
    from consolidated tensors: every rank reads each full tensor it needs, keeps its TP slice and unmaps
    the files again, so it holds its own share of the target layout plus one tensor. The optimizer
    state comes along when `reader` was made `with_optimizer`; the LR schedule and engine counters unless
    `schedule` is False (a fresh run that only takes the weights)."""
    grid, cfg = engine.grid, reader.cfg

    def local(name: str) -> Mapping[str, torch.Tensor]:
        return _KindsOnDemand(reader, pipeline_to_gpt_name(name, cfg) if engine.is_pipeline else name, grid)

    adam_step = reader.adam_step() if reader.with_optimizer else None
    apply_local_state(engine, local, adam_step, reader.engine_state() if schedule else {})


class _KindsOnDemand(Mapping):
    """One parameter's {"weight", "exp_avg", "exp_avg_sq"} at this rank's TP shape, each read from the
    checkpoint only when asked for and the files unmapped right after: `apply_local_state` takes them
    one at a time, so a rank holds one full tensor (and the file pages it touched) beyond its engine."""

    def __init__(self, reader: ShardReader, name: str, grid: Any):
        self.reader, self.name, self.grid = reader, name, grid

    def __getitem__(self, kind: str) -> torch.Tensor:
        if kind not in self.reader.kinds:
            raise KeyError(kind)
        full = self.reader.state(self.name, (kind,))[kind]
        self.reader.close()
        return shard_for_tp(self.name, full, self.reader.cfg, self.grid.tp, self.grid.tp_rank, copy=False)

    def __iter__(self) -> Iterator[str]:
        return iter(self.reader.kinds)

    def __len__(self) -> int:
        return len(self.reader.kinds)


def apply_local_state(engine: Engine, local: Callable[[str], Mapping[str, torch.Tensor]], adam_step: Optional[float],
                      engine_state: dict) -> None:
    """Collective. For every parameter of this rank's engine (by its name in `ds.module`), `local(name)`
    gives {"weight"} or {"weight", "exp_avg", "exp_avg_sq"} at this rank's model-parallel shape; they
    go into the model, ZeRO's fp32 master copy and Adam's state (which DeepSpeed partitions over DP as
    it stores them). `adam_step` None: the optimizer starts fresh. The LR schedule and the engine's
    counters come from `engine_state` either way."""
    from deepspeed import zero
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    ds = engine.ds
    stage = ds.zero_optimization_stage()
    base = base_optimizer(ds)
    restore_optimizer = adam_step is not None
    if restore_optimizer:
        _init_adam_state(_adam_params(ds, base), base, adam_step)
        if hasattr(ds.optimizer, "_lazy_init_hp_params_optimizer_state"):  # ZeRO-1/2: link state fragments
            ds.optimizer._hp_optimizer_states_linked = False
            ds.optimizer._lazy_init_hp_params_optimizer_state()

    for name, p in ds.module.named_parameters():
        values = local(name)
        weight = values["weight"]
        if stage == 3:
            with zero.GatheredParameters([p], modifier_rank=0):  # the model's own partitions
                p.data.copy_(weight.view_as(p.data))
        else:
            p.data.copy_(weight.view_as(p.data))
        if stage > 0:
            safe_set_full_fp32_param(p, weight)  # ZeRO keeps a separate fp32 master copy
        if restore_optimizer:
            for key in MOMENTS:
                if stage > 0:
                    safe_set_full_optimizer_state(p, values[key], key)
                else:
                    base.state[p][key].copy_(values[key].view_as(p.data))
    if stage == 0 and hasattr(ds.optimizer, "refresh_fp32_params"):
        # fp16 at ZeRO-0: DeepSpeed's fp16 wrapper steps fp32 master copies of its own, which would put
        # the built initialisation back at the first update (the weights were loaded into p.data only).
        ds.optimizer.refresh_fp32_params()

    # The LR schedule and step counters continue even with --weights-only: only Adam restarts.
    restore_schedule(ds, base, engine_state)


def restore_schedule(ds: Any, base: torch.optim.Optimizer, engine_state: dict) -> None:
    """LR scheduler position and the lr it last set (DeepSpeed saves both; on load the optimizer's
    param_groups carry the lr for the next step), plus the engine's step/sample counters."""
    sched_state: Optional[dict] = engine_state.get("lr_scheduler")
    if sched_state is not None and ds.lr_scheduler is not None:
        ds.lr_scheduler.load_state_dict(sched_state)
        last = sched_state.get("_last_lr") or []
        if last:
            groups = list(base.param_groups)
            if ds.optimizer is not base:
                groups += [g for g in ds.optimizer.param_groups if all(g is not b for b in groups)]
            for g in groups:
                g["lr"] = float(last[0])  # one LambdaLR factor for every group (megalm.training.schedule)
    for attr in ("global_steps", "global_samples", "skipped_steps"):
        if engine_state.get(attr) is not None:
            setattr(ds, attr, int(engine_state[attr]))
