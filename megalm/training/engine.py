"""Build the DeepSpeed engine for a run: a plain engine for pp=1 (ZeRO 0-3), a PipelineEngine for pp>1.

The engine is DeepSpeed's own; this module only decides what goes in: the model (built under
`deepspeed.zero.Init` for ZeRO-3 so it is partitioned as it is constructed), the optimiser with its
parameter groups, the LR schedule and the config dict. `train_step`/`eval_step` hide the one real
difference between the two engine kinds: who loops over micro-batches.

The loss of a step is the mean over every target label (not IGNORE_INDEX) of its global batch. DeepSpeed
averages micro-batch losses (over accumulation steps, then DP ranks) with equal weights, which is that
mean only when every micro-batch holds as many targets; fine-tuning loss masks do not, so then each
micro-batch loss is its sum over the global mean count per micro-batch (`targets_per_micro_batch`).
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any

import deepspeed
import torch
from deepspeed.pipe import PipelineModule
from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

from megalm.ckpt_files import stage_engine_layout
from megalm.config.run import RunConfig
from megalm.model import GPTModel
from megalm.model.pipeline import pipeline_layer_specs
from megalm.parallel.cross_entropy import IGNORE_INDEX
from megalm.parallel.device import reduce_scalars, run_device
from megalm.parallel.grid import ProcessGrid

from .deepspeed_config import build_deepspeed_config
from .once_per_step import OncePerStep
from .optimizer import build_optimizer
from .pipeline_schedule import PipelineLoss, StageSchedule
from .precision import check_parameter_dtypes
from .schedule import build_scheduler
from .stage_engine import build_stage_engine, pipeline_mean
from .zero3_reduce_scatter import install_zero3_reduce_scatter

Batch = tuple[torch.Tensor, torch.Tensor]


@dataclass
class Engine:
    ds: Any  # deepspeed.DeepSpeedEngine or deepspeed.PipelineEngine
    cfg: RunConfig
    grid: ProcessGrid
    is_pipeline: bool
    device: torch.device
    pipeline_loss: PipelineLoss | None = None
    stage: StageSchedule | None = None  # ZeRO-2/3 x PP: our schedule drives a per-stage engine
    once_per_step: OncePerStep | None = None  # pp=1, parallel.grad_reduction=per_step
    last_update_skipped: bool = False  # DeepSpeed skipped the last step's update (fp16 overflow)

    def close(self) -> None:
        """Free the DeepSpeed engine, so its model and process groups (and their gloo threads or NCCL
        communicators) do not outlive the run in this process (DESIGN decision 52). Unusable afterwards."""
        self.ds.destroy()
        _clear_zero3_release_cache()
        # The engine's own attributes still hold the last step's tensors (PipelineEngine's `loss` and
        # pipe buffers: their autograd graph's AccumulateGrad nodes keep the parameters, from C++, where
        # the garbage collector cannot see). Dropping them all leaves only collectable cycles.
        vars(self.ds).clear()

    # ---- one optimiser step over `micro_batches` (gradient accumulation inside) ----
    def train_step(self, micro_batches: list[Batch], poison: bool = False) -> float:
        skipped_before = self.ds.skipped_steps
        try:
            return self._train_step(micro_batches, poison)
        finally:
            self.last_update_skipped = self.ds.skipped_steps > skipped_before

    def _train_step(self, micro_batches: list[Batch], poison: bool) -> float:
        per_micro_batch = self._targets_per_micro_batch(micro_batches)
        if self.stage is not None:
            self.pipeline_loss.poison = poison
            self.pipeline_loss.targets_per_micro_batch = per_micro_batch
            return self._stage_mean(self.stage.train(micro_batches), len(micro_batches))
        if self.is_pipeline:
            self.pipeline_loss.poison = poison
            self.pipeline_loss.targets_per_micro_batch = per_micro_batch
            loss = self.ds.train_batch(iter(micro_batches))  # averaged over micro-batches and DP
            return float(loss)
        model = self.ds.module
        total = torch.zeros((), device=self.device)
        if self.once_per_step is not None:
            self.once_per_step.begin()
        for input_ids, labels in self._on_device(micro_batches):
            loss = model.loss(self.ds(input_ids), labels, per_micro_batch)
            if poison:
                loss = loss * float("nan")
            self.ds.backward(loss)  # DeepSpeed divides by the accumulation steps
            if self.once_per_step is None:
                self.ds.step()  # applies the update only at the accumulation boundary
            total += loss.detach().float()
        if self.once_per_step is not None:
            self.once_per_step.end()  # the step's one reduce-scatter
            self.once_per_step.update()
        return self._dp_mean(total / len(micro_batches))

    @torch.no_grad()
    def eval_step(self, micro_batches: list[Batch]) -> float:
        per_micro_batch = self._targets_per_micro_batch(micro_batches)
        if self.stage is not None:
            self.pipeline_loss.targets_per_micro_batch = per_micro_batch
            self.ds.eval()
            try:
                return self._stage_mean(self.stage.evaluate(micro_batches), len(micro_batches))
            finally:
                self.ds.train()
        if self.is_pipeline:
            self.pipeline_loss.targets_per_micro_batch = per_micro_batch
            return float(self.ds.eval_batch(iter(micro_batches)))
        self.ds.eval()
        model = self.ds.module
        total = torch.zeros((), device=self.device)
        for input_ids, labels in self._on_device(micro_batches):
            total += model.loss(self.ds(input_ids), labels, per_micro_batch).float()
        self.ds.train()
        return self._dp_mean(total / len(micro_batches))

    def _targets_per_micro_batch(self, micro_batches: list[Batch]) -> float | None:
        """The step's global mean number of target labels per micro-batch, or None when every label of
        the global batch is a target (pre-training: each micro-batch's own mean is already the global
        one, and the loss stays bitwise what it was). One scalar all-reduce over DP when dp > 1."""
        targets = sum(int((y != IGNORE_INDEX).sum()) for _, y in micro_batches)
        positions = sum(y.numel() for _, y in micro_batches)
        if self.grid.dp > 1:
            targets, positions = (float(v) for v in reduce_scalars([targets, positions], "sum", self.grid.dp_group))
        if targets == positions:
            return None
        return max(targets, 1) / (len(micro_batches) * self.grid.dp)

    def _on_device(self, micro_batches: list[Batch]) -> list[Batch]:
        # DeepSpeedEngine.forward does not move inputs (only the PipelineEngine does): move them once here.
        return [(x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True))
                for x, y in micro_batches]

    def _stage_mean(self, losses: list[torch.Tensor], count: int) -> float:
        """The mean micro-batch loss over the last stages' DP group, on every rank."""
        local = torch.stack(losses).float().sum() / count if losses else torch.zeros((), device=self.device)
        return pipeline_mean(self._dp_mean(local), self.grid)

    def _dp_mean(self, local: torch.Tensor) -> float:
        return float(reduce_scalars(local.float(), "sum", self.grid.dp_group)[0]) / self.grid.dp

    def grad_norm(self) -> float:
        norm = self.ds.get_global_grad_norm()
        if norm is None:
            return float("nan")
        return float(norm.item() if torch.is_tensor(norm) else norm)

    def lr(self) -> float:
        return float(self.ds.get_lr()[0])


def build_engine(cfg: RunConfig, grid: ProcessGrid, device: torch.device | None = None) -> Engine:
    """`device`: the run's (`select_device`); tools that did not select one get the accelerator's current."""
    device = device or run_device()
    ds_config = build_deepspeed_config(cfg, grid.dp)
    if cfg.parallel.zero_stage == 3:
        install_zero3_reduce_scatter()
    # DeepSpeed places the model on cuda:LOCAL_RANK unless told otherwise; several ranks sharing one GPU
    # (gloo, the GPU check) need the device `select_device` chose.
    ds_args = argparse.Namespace(device_rank=device.index) if device.type != "cpu" else None

    def schedule(optimizer: torch.optim.Optimizer):
        # A factory, not an instance: DeepSpeed calls it with the optimizer it actually steps (ZeRO-3
        # regroups the parameters, so a scheduler bound to the client optimizer would not match).
        return build_scheduler(optimizer, cfg.train)

    ac = cfg.train.activation_checkpointing
    if stage_engine_layout(cfg.parallel.pp, cfg.parallel.zero_stage):
        ds, stage, loss = build_stage_engine(cfg, grid, ds_config, ds_args, schedule, device)
        return Engine(ds, cfg, grid, is_pipeline=True, device=device, pipeline_loss=loss, stage=stage)
    if cfg.parallel.pp > 1:
        topology = PipeModelDataParallelTopology(num_pp=grid.pp, num_mp=grid.tp, num_dp=grid.dp)
        loss = PipelineLoss()
        module = PipelineModule(layers=pipeline_layer_specs(cfg.model), loss_fn=loss, topology=topology,
                                partition_method=cfg.parallel.pipeline_partition,
                                activation_checkpoint_interval=1 if ac else 0,
                                # Only blocks: checkpointing the embedding (integer ids in, nothing that
                                # requires grad) breaks DeepSpeed's reentrant checkpoint.
                                checkpointable_layers=["TransformerBlock"])
        optimizer = build_optimizer(module, cfg.train, cfg.parallel.zero_stage, grid)
        ds, _, _, _ = deepspeed.initialize(args=ds_args, model=module, optimizer=optimizer,
                                           lr_scheduler=schedule, config=ds_config)
        return Engine(ds, cfg, grid, is_pipeline=True, device=device, pipeline_loss=loss)
    if cfg.parallel.zero_stage == 3:
        with deepspeed.zero.Init(data_parallel_group=grid.dp_group, config_dict_or_path=ds_config, mpu=grid.mpu):
            model = GPTModel(cfg.model, grid)
        check_parameter_dtypes(model, cfg.train.precision)
    else:
        model = GPTModel(cfg.model, grid)
    model.activation_checkpointing = ac
    optimizer = build_optimizer(model, cfg.train, cfg.parallel.zero_stage, grid)
    ds, _, _, _ = deepspeed.initialize(args=ds_args, model=model, optimizer=optimizer, mpu=grid.mpu,
                                       lr_scheduler=schedule, config=ds_config)
    once_per_step = OncePerStep(ds, hold_parameters=False) if cfg.parallel.reduces_gradients_per_step else None
    return Engine(ds, cfg, grid, is_pipeline=False, device=device, once_per_step=once_per_step)


def _clear_zero3_release_cache() -> None:
    """ZeRO-3's `PartitionedParameterCoordinator.__params_to_release` is a class-level
    `functools.lru_cache` keyed by (coordinator, module, step): it keeps every coordinator ever used,
    and through it that engine's parameters, model and process groups (deepspeed==0.19.8). Clearing it
    only makes live coordinators recompute their release sets."""
    from deepspeed.runtime.zero.partitioned_param_coordinator import PartitionedParameterCoordinator

    traced = PartitionedParameterCoordinator.__dict__.get("_PartitionedParameterCoordinator__params_to_release")
    for cell in getattr(traced, "__closure__", None) or ():  # instrument_w_nvtx wraps the cached function
        if hasattr(cell.cell_contents, "cache_clear"):
            cell.cell_contents.cache_clear()
