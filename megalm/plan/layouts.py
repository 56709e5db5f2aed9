"""Valid parallel layouts: the divisibility rules of `ModelConfig.check_layout`, `ParallelConfig.validate`
and `TrainConfig.gradient_accumulation_steps`, applied to every candidate."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

from megalm.ckpt_files import stage_engine_layout
from megalm.config import ConfigError
from megalm.config.loader import from_dict
from megalm.config.model import ModelConfig
from megalm.config.parallel import ParallelConfig
from megalm.config.run import check_precision
from megalm.config.train import TrainConfig


@dataclass(frozen=True)
class Layout:
    tp: int
    pp: int
    dp: int
    zero: int
    micro_batch: int
    checkpointing: bool
    # ZeRO-3 with pp > 1 only (`parallel.pipeline_reshard`): "per_step" gathers a stage once per step,
    # "per_microbatch" on every use; anything else ignores it.
    pipeline_reshard: str = "per_step"

    @property
    def stage_engine(self) -> bool:
        """One DeepSpeedEngine per pipeline stage (ZeRO-2/3 x PP) instead of DeepSpeed's PipelineEngine."""
        return stage_engine_layout(self.pp, self.zero)

    @property
    def gathers_per_step(self) -> bool:
        """ZeRO-3 x PP with `per_step`: a stage gathered once per step, its gradients reduced once."""
        return self.zero == 3 and self.stage_engine and self.pipeline_reshard == "per_step"

    @property
    def gathers_per_microbatch(self) -> bool:
        return self.zero == 3 and self.stage_engine and self.pipeline_reshard == "per_microbatch"

    @property
    def gpus(self) -> int:
        return self.tp * self.pp * self.dp

    def micro_batches(self, global_batch: int) -> int:
        """Micro-batches per step per pipeline (gradient accumulation steps)."""
        return global_batch // (self.micro_batch * self.dp)

    def short(self) -> str:
        return (f"tp{self.tp} pp{self.pp} dp{self.dp} z{self.zero}{'/mb-gather' if self.gathers_per_microbatch else ''}"
                f" mb{self.micro_batch}{' ac' if self.checkpointing else ''}")


def layout_problem(model: ModelConfig, layout: Layout, global_batch: int, gpus_per_node: int = 8,
                   precision: str = "bf16") -> str | None:
    """Why `layout` is invalid, or None. The same checks the config loader and engine apply."""
    if layout.tp > gpus_per_node:
        return f"tp={layout.tp} spans more than one node ({gpus_per_node} GPUs)"
    try:
        model.check_layout(layout.tp, layout.pp)
        # through the loader's from_dict, so its field types (pipeline_reshard's choices) are checked too
        from_dict(ParallelConfig, {"tp": layout.tp, "pp": layout.pp, "zero_stage": layout.zero,
                                   "pipeline_reshard": layout.pipeline_reshard}, "parallel").validate()
        batch = TrainConfig(micro_batch_size=layout.micro_batch, global_batch_size=global_batch)
        batch.gradient_accumulation_steps(layout.dp)
        check_precision(precision, layout.zero, layout.pp)
    except ConfigError as e:
        return str(e)
    return None


def _powers_of_two(limit: int) -> list[int]:
    out, v = [], 1
    while v <= limit:
        out.append(v)
        v *= 2
    return out


def enumerate_layouts(model: ModelConfig, gpus: int, global_batch: int, gpus_per_node: int = 8,
                      max_micro_batch: int = 16, precision: str = "bf16") -> Iterator[Layout]:
    """Every valid layout using exactly `gpus` GPUs. At dp=1 ZeRO partitions nothing: only the stage the
    precision needs is listed there (1 for bf16, else 0); micro batches are powers of two. ZeRO-3 with
    pp > 1 is listed under both `parallel.pipeline_reshard` modes."""
    for tp in _powers_of_two(min(gpus_per_node, gpus)):
        for pp in range(1, model.num_layers + 1):
            if gpus % (tp * pp):
                continue
            dp = gpus // (tp * pp)
            for zero in (0, 1, 2, 3):
                if dp == 1 and zero != (1 if precision == "bf16" else 0):
                    continue
                modes = ("per_step", "per_microbatch") if pp > 1 and zero == 3 else ("per_step",)
                for mb in _powers_of_two(min(max_micro_batch, max(1, global_batch // dp))):
                    for ac in (False, True):
                        for mode in modes:
                            layout = Layout(tp, pp, dp, zero, mb, ac, mode)
                            if layout_problem(model, layout, global_batch, gpus_per_node, precision) is None:
                                yield layout
