"""Resume a checkpoint at another data-parallel size (DESIGN decision 43: elastic restarts).

When a run comes back on fewer (or more) nodes, its checkpoint's (tp, pp, ZeRO stage) still fit but
its data-parallel size does not. `megalm.training.resume.check_layout` decides before any process
group starts whether the new world can continue (same tp, pp and stage; the global batch still splits
over the new dp, through another gradient accumulation), and this module loads the step:

* ZeRO-0: nothing is partitioned over DP (every DP rank saved the same model-parallel files), so
  DeepSpeed's own loader reads the step as it is.
* ZeRO-1/2/3: the optimizer state (and under ZeRO-3 the weights) lives in one partition file per old
  DP rank. Each rank maps the old partition files of its own model-parallel rank (`torch.load(mmap=True)`:
  nothing is read until sliced), assembles one parameter at a time from the pieces that hold it
  (`megalm.export.zero_merge.ZeroPartitions`, the walk consolidation uses too) and hands it to
  DeepSpeed's `safe_set_full_*` setters, which keep this rank's new partition. No process ever holds
  more than one parameter in full: there is no gather of the model, nor of its optimizer state.

The LR schedule and the engine counters come from the model-states file, the fp16 loss scale from the
optimizer files. Per-rank RNG files belong to the old ranks and are not restored (the data order does
not depend on them; dropout masks after an elastic resume differ from an uninterrupted run's, as they
would at any other layout).
"""
from __future__ import annotations

import json
import os
import time
from typing import Any

import torch.distributed as dist

from megalm import rundir
from megalm.ckpt_files import model_states_name, optim_states_name, universal_kinds
from megalm.export.checkpoint_files import load_pt, locate_checkpoint
from megalm.export.consolidate import ENGINE_STATE_KEYS
from megalm.export.engine_state import apply_checkpoint, apply_local_state
from megalm.export.shard_reader import ShardReader
from megalm.export.zero_merge import MOMENTS, ZeroPartitions

from .engine import Engine


def load_at_new_dp(engine: Engine, ckpt_dir: str, old_layout: dict) -> None:
    """Collective (ZeRO >= 1): load the step in `ckpt_dir`, saved at data-parallel size old_layout["dp"],
    into `engine`, whose tp, pp and ZeRO stage are the checkpoint's."""
    if universal_kinds(old_layout):
        load_universal(engine, ckpt_dir, old_layout)
        return
    grid, ds = engine.grid, engine.ds
    zero, old_dp = int(old_layout["zero_stage"]), int(old_layout["dp"])
    mp = grid.pp_rank * grid.tp + grid.tp_rank  # DeepSpeed's mp_rank: the grid's order (decision 1)
    model_states = load_pt(os.path.join(ckpt_dir, model_states_name(mp, zero)), mmap=True)
    optim = [(path, load_pt(path, deepspeed_types=True, mmap=True))
             for path in (os.path.join(ckpt_dir, optim_states_name(d, mp)) for d in range(old_dp))]
    parts = ZeroPartitions(optim, model_states["param_shapes"])
    engine_state = {k: model_states.get(k) for k in ENGINE_STATE_KEYS}
    apply_local_state(engine, parts.tensors, parts.step, engine_state)
    _restore_loss_scale(ds, parts.global_state)


def load_universal(engine: Engine, ckpt_dir: str, layout: dict) -> None:
    """Collective: load a universal (layout-free) step, as megalm-reshard writes it, into `engine` at
    whatever layout it was built: each rank reads every parameter's full tensors one at a time from the
    step's safetensors files and keeps its own slice (`apply_checkpoint`, the reshard loader). A step
    written with --weights-only holds no moments: Adam then starts fresh, the LR schedule continues."""
    reader = ShardReader(locate_checkpoint(ckpt_dir), with_optimizer=set(MOMENTS) <= set(universal_kinds(layout)))
    apply_checkpoint(engine, reader)


def _restore_loss_scale(ds: Any, global_state: dict) -> None:
    """fp16: the dynamic loss scale continues where it was (DeepSpeed's `_load_global_state`); `ds.optimizer`
    is DeepSpeed's ZeRO wrapper here (ZeRO >= 1), which holds it."""
    opt = ds.optimizer
    for key, value in global_state.items():
        if value is not None and hasattr(opt, key):
            setattr(opt, key, value)


def record_elastic_resume(run_dir: str, step: int, old_layout: dict, new_layout: dict,
                          old_accumulation: int, new_accumulation: int) -> None:
    """Rank 0: one `elastic_resume` line in RUN_DIR/restarts.jsonl (next to the supervisor's restart
    events, so one file tells what each attempt ran on)."""
    record = {"event": "elastic_resume", "time": time.time(), "step": step,
              "old_layout": old_layout, "new_layout": new_layout,
              "gradient_accumulation_steps": {"old": old_accumulation, "new": new_accumulation},
              "slurm_job_id": os.environ.get("SLURM_JOB_ID"), "restart": os.environ.get("MEGALM_RESTART")}
    if dist.get_rank() == 0:
        with open(rundir.restarts_file(run_dir), "a") as f:
            f.write(json.dumps(record) + "\n")
