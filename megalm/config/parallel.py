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

    def validate(self, where: str = "parallel") -> None:
        where = where or "parallel"
        require(self.tp >= 1, where, "tp", f"must be >= 1, got {self.tp}")
        require(self.pp >= 1, where, "pp", f"must be >= 1, got {self.pp}")

    def data_parallel_size(self, world_size: int, where: str = "parallel") -> int:
        """DP size for this world size; an error naming the numbers when tp*pp does not divide it."""
        model_parallel = self.tp * self.pp
        if world_size % model_parallel != 0:
            raise ConfigError(
                f"{where}: world size {world_size} is not divisible by tp*pp = {self.tp}*{self.pp} = {model_parallel}; "
                f"launch a multiple of {model_parallel} processes or change tp/pp")
        return world_size // model_parallel
