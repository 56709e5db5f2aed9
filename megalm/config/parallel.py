"""Parallel layout section: tensor/pipeline parallel sizes and the ZeRO stage. DP is what is left."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from .loader import ConfigError, require


@dataclass
class ParallelConfig:
    tp: int = 1
    pp: int = 1
    zero_stage: Literal[0, 1, 2, 3] = 0
    # How DeepSpeed's PipelineModule splits layers over stages: balance transformer blocks ("type:...")
    # or parameters ("parameters") or plain layer count ("uniform").
    pipeline_partition: str = "type:TransformerBlock"
    # ZeRO-3 with pp > 1 (megalm.training.stage_engine): "per_step" gathers a stage's parameters at their
    # first use in a step and keeps them, and its gradients, until the step's last backward: one all-gather
    # and one reduce-scatter per parameter per step, the stage's full parameters and gradients live during
    # the step; "per_microbatch" gathers for every micro-batch's forward and again for its backward and
    # reduce-scatters after each backward (ZeRO-3's own behaviour; least memory).
    pipeline_reshard: Literal["per_step", "per_microbatch"] = "per_step"
    # ZeRO-2/3: when gradients are reduce-scattered into their partitions. "per_microbatch" is DeepSpeed's
    # own behaviour (every micro-batch's backward reduce-scatters: least memory); "per_step" accumulates
    # the full gradients on each rank over the step's micro-batches and reduce-scatters once at its end
    # (DeepSpeed's `coalesce_grad_reduction`): 1/m of the gradient traffic and bookkeeping for the full
    # gradients in memory during the step. ZeRO-3 under PP with pipeline_reshard=per_step always reduces
    # per step (its gradients live on parameters held for the whole step).
    grad_reduction: Literal["per_microbatch", "per_step"] = "per_microbatch"

    def validate(self, where: str = "parallel") -> None:
        where = where or "parallel"
        require(self.tp >= 1, where, "tp", f"must be >= 1, got {self.tp}")
        require(self.pp >= 1, where, "pp", f"must be >= 1, got {self.pp}")
        require(self.grad_reduction == "per_microbatch" or self.zero_stage >= 2, where, "grad_reduction",
                f"per_step applies to zero_stage 2 and 3 (ZeRO {self.zero_stage} reduces once per step "
                "already); remove it or set parallel.zero_stage to 2 or 3")

    @property
    def holds_parameters_per_step(self) -> bool:
        """ZeRO-3 x PP gathering each stage's parameters once per step (`pipeline_reshard=per_step`)."""
        return self.zero_stage == 3 and self.pp > 1 and self.pipeline_reshard == "per_step"

    @property
    def reduces_gradients_per_step(self) -> bool:
        """ZeRO-2/3 reduce-scattering gradients once per step instead of after every micro-batch."""
        return self.zero_stage >= 2 and (self.grad_reduction == "per_step" or self.holds_parameters_per_step)

    def data_parallel_size(self, world_size: int, where: str = "parallel") -> int:
        """DP size for this world size; an error naming the numbers when tp*pp does not divide it."""
        model_parallel = self.tp * self.pp
        if world_size % model_parallel != 0:
            raise ConfigError(
                f"{where}: world size {world_size} is not divisible by tp*pp = {self.tp}*{self.pp} = {model_parallel}; "
                f"launch a multiple of {model_parallel} processes or change tp/pp")
        return world_size // model_parallel
