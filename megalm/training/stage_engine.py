"""ZeRO-2/3 under pipeline parallelism: one plain DeepSpeedEngine per pipeline stage, our own 1F1B.

DeepSpeed's PipelineEngine asserts ZeRO <= 1. Here each stage is a `PipelineModule` (the same layer
specs, partitioning and tied-embedding groups as the ZeRO-1 pipeline), wrapped in `StageModule` so that
`deepspeed.initialize` builds a plain engine for it, built under `zero.Init` over the stage's own DP
group. ZeRO therefore partitions, gathers and reduce-scatters exactly as at pp=1, only inside one stage;
`megalm.training.pipeline_schedule` moves activations and their gradients between stages.

What DeepSpeed's per-stage engine would get wrong by itself, and what this module does (the rest, and
how each was found, in DESIGN decision 49):
- **The gradient norm and the non-finite skip must cover the PP x TP x DP world.** ZeRO sums squared
  norms over the DP group, then over the mpu's model-parallel group (tp x pp: one replica, so every
  stage), counting a parameter that is not tensor-parallel only where its `model_parallel_rank` is 0.
  ZeRO-2 takes that rank from the mpu's TP rank; ZeRO-3 takes the model-parallel rank (pp_rank * tp +
  tp_rank), which would count each stage's replicated parameters (norms) on stage 0 only. The stage
  engine sets ZeRO-3's to the TP rank. The mpu itself stays the grid's, so checkpoint files are named
  by the model-parallel rank as at every other layout (megalm.ckpt_files).
- **The tied embedding** lives on the first and the last stage. After the step's last backward, each
  partition of its gradient is all-reduced over PipelineModule's tie group (same dp and tp coordinates,
  so the partitions line up), and the last stage's copy is left out of the norm.
- **Losses arrive on the last stage only**; the step's loss is reduced over the pipeline group so that
  every rank logs the same number.
"""
from __future__ import annotations

from typing import Any, Callable

import deepspeed
import torch
from deepspeed.pipe import PipelineModule
from deepspeed.utils import safe_get_full_grad, safe_get_local_grad, safe_set_full_grad, safe_set_local_grad
from torch import nn

from megalm.config.run import RunConfig
from megalm.model.pipeline import STAGE_MODULE_ATTR, pipeline_layer_specs
from megalm.parallel.device import gather_objects, reduce_scalars, reduce_tensor
from megalm.parallel.grid import ProcessGrid
from megalm.parallel.init import initialise_zero3_partitions

from .once_per_step import OncePerStep
from .optimizer import build_optimizer
from .pipeline_schedule import PipelineLoss, StageSchedule
from .precision import check_parameter_dtypes, parameter_dtype


class StageModule(nn.Module):
    """One pipeline stage as a plain module, so `deepspeed.initialize` does not build a PipelineEngine."""

    def __init__(self, pipe: nn.Module):
        super().__init__()
        self.add_module(STAGE_MODULE_ATTR, pipe)  # checkpoint names: "pipe.<layer>.<name>"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return getattr(self, STAGE_MODULE_ATTR)(x)


def tied_parameters(pipe: nn.Module) -> list[tuple[nn.Parameter, Any]]:
    """(parameter, tie group) of every tied weight this stage holds (empty at pp=1 or untied)."""
    out = []
    for key, comm in getattr(pipe, "tied_comms", {}).items():
        module = pipe.tied_modules[key]
        for attr in comm["weight_attr"]:
            out.append((getattr(module, attr), comm["group"]))
    return out


def reduce_tied_gradients(pipe: nn.Module) -> None:
    """Sum each tied weight's gradient over its tie group. ZeRO-3: the local partitions (the copies on
    the first and last stage partition the same shape over DP groups of the same size, so they line
    up). ZeRO-2: the full gradient, which DeepSpeed assembles from the DP partitions and scatters back."""
    for param, group in tied_parameters(pipe):
        if hasattr(param, "ds_id"):
            grad = safe_get_local_grad(param)
            if grad is not None:
                safe_set_local_grad(param, reduce_tensor(grad, "sum", group))
        else:
            grad = safe_get_full_grad(param)
            if grad is not None:
                safe_set_full_grad(param, reduce_tensor(grad, "sum", group))


def exclude_from_grad_norm(optimizer: Any, params: list[nn.Parameter]) -> None:
    """Make ZeRO-3's norm count `params` as zero (the last stage's copy of a tied weight, whose
    gradient equals the first stage's after `reduce_tied_gradients`)."""
    if not params:
        return
    skip = {id(p) for p in params}
    original: Callable = optimizer.get_grad_norm_direct

    def norm_without_copies(gradients, group_params, norm_type=2):
        kept = [torch.zeros_like(g) if id(p) in skip else g for g, p in zip(gradients, group_params)]
        return original(kept, group_params, norm_type)

    optimizer.get_grad_norm_direct = norm_without_copies


def scope_zero3_trace_checks(group: Any) -> None:
    """ZeRO-3's parameter coordinator checks, at each forward while it records its fetch trace, that
    every rank of the *world* recorded the same module order (a broadcast from global rank 0). Stages
    hold different modules, so that check fails (or deadlocks, when a stage has another number of
    submodules). Only the ranks that gather together, the stage's DP group, must agree: scope it there."""
    from deepspeed.runtime.zero import partitioned_param_coordinator as coordinator

    # A process-wide replacement of a DeepSpeed module function (DeepSpeed offers no hook for it), written
    # against deepspeed==0.19.8 (setup.py): an upgrade that renames or drops the function stops here
    # instead of silently running the world-wide check.
    if not callable(getattr(coordinator, "assert_ints_same_as_other_ranks", None)):
        raise RuntimeError(f"deepspeed {deepspeed.__version__}: partitioned_param_coordinator has no "
                           "assert_ints_same_as_other_ranks; ZeRO-3 x PP (megalm.training.stage_engine) was "
                           "validated on deepspeed==0.19.8: install that version or re-validate the stage engine")

    def same_on_every_rank_of_the_stage(ints: list[int]) -> None:
        # Relative to the first: ZeRO-3's ids are process-wide counters, so a process that built another
        # model before (a tool, a test's reused process) numbers the same modules from another start.
        lists = gather_objects([i - ints[0] for i in ints] if ints else [], group)
        if any(other != lists[0] for other in lists):
            raise RuntimeError(f"ZeRO-3 recorded different module orders on the ranks of one stage: {lists}")

    coordinator.assert_ints_same_as_other_ranks = same_on_every_rank_of_the_stage


def pipeline_mean(value: float, grid: ProcessGrid) -> float:
    """The last stage's `value` on every rank of its pipeline group (the others pass anything)."""
    mine = value if grid.is_last_stage else 0.0
    return float(reduce_scalars([mine], "sum", grid.pp_group)[0])


def build_stage_engine(cfg: RunConfig, grid: ProcessGrid, ds_config: dict, ds_args: Any,
                       lr_scheduler: Callable, device: torch.device) -> tuple[Any, StageSchedule, PipelineLoss]:
    """This rank's stage engine (ZeRO-2/3, pp > 1) and the schedule that drives it."""
    mpu = grid.mpu
    loss = PipelineLoss()

    def stage_module() -> nn.Module:
        pipe = PipelineModule(layers=pipeline_layer_specs(cfg.model), loss_fn=None, topology=grid.topology(),
                              partition_method=cfg.parallel.pipeline_partition,
                              checkpointable_layers=["TransformerBlock"])
        # Through the setter: it computes which layer blocks to checkpoint (the PipelineEngine does that
        # itself; without it PipelineModule.forward runs no layer at all).
        pipe.set_checkpoint_interval(1 if cfg.train.activation_checkpointing else 0)
        return pipe

    if cfg.parallel.zero_stage == 3:
        scope_zero3_trace_checks(grid.dp_group)
        with deepspeed.zero.Init(data_parallel_group=grid.dp_group, config_dict_or_path=ds_config, mpu=mpu):
            pipe = stage_module()
        initialise_zero3_partitions(pipe)  # zero.Init deferred each parameter's draw to its partition
        check_parameter_dtypes(pipe, cfg.train.precision)
    else:
        pipe = stage_module()
    model = StageModule(pipe)
    optimizer = build_optimizer(model, cfg.train, cfg.parallel.zero_stage, grid)
    ds, _, _, _ = deepspeed.initialize(args=ds_args, model=model, optimizer=optimizer, mpu=mpu,
                                       lr_scheduler=lr_scheduler, config=ds_config)
    if cfg.parallel.zero_stage == 3:
        ds.optimizer.model_parallel_rank = grid.tp_rank  # see the module docstring: the norm over stages
    tied = tied_parameters(pipe)
    if not grid.is_first_stage:
        exclude_from_grad_norm(ds.optimizer, [p for p, _ in tied])

    def before_update() -> None:
        if tied:
            reduce_tied_gradients(pipe)

    par = cfg.parallel
    once_per_step = OncePerStep(ds, par.holds_parameters_per_step) if par.reduces_gradients_per_step else None
    schedule = StageSchedule(ds, grid, loss, cfg.model.hidden_size, parameter_dtype(cfg.train.precision),
                             device, before_update, once_per_step)
    return ds, schedule, loss
