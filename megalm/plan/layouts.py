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
    # ZeRO-2/3 (`parallel.grad_reduction`): "per_step" reduce-scatters the accumulated full gradients once
    # per step instead of in every micro-batch's backward.
    grad_reduction: str = "per_microbatch"

    @property
    def stage_engine(self) -> bool:
        """One DeepSpeedEngine per pipeline stage (ZeRO-2/3 x PP) instead of DeepSpeed's PipelineEngine."""
        return stage_engine_layout(self.pp, self.zero)

    @property
    def gathers_per_step(self) -> bool:
        """ZeRO-3 x PP with `per_step`: a stage gathered once per step, its gradients reduced once."""
        return self.parallel.holds_parameters_per_step

    @property
    def reduces_per_step(self) -> bool:
        """ZeRO-2/3 gradients reduce-scattered once per step (full gradients held across the micro-batches)."""
        return self.parallel.reduces_gradients_per_step

    @property
    def chooses_step_reduction(self) -> bool:
        """`grad_reduction=per_step` where it is a choice (ZeRO-3 x PP gathering per step implies it)."""
        return self.grad_reduction == "per_step" and not self.gathers_per_step

    @property
    def parallel(self) -> ParallelConfig:
        """The run config's parallel section for this layout: its properties are the one definition of
        which layouts gather and reduce once per step (the engine builders read the same ones)."""
        return ParallelConfig(tp=self.tp, pp=self.pp, zero_stage=self.zero, pipeline_reshard=self.pipeline_reshard,
                              grad_reduction=self.grad_reduction)

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
        modes = ("/mb-gather" if self.gathers_per_microbatch else "") + (
            "/step-reduce" if self.chooses_step_reduction else "")
        return f"tp{self.tp} pp{self.pp} dp{self.dp} z{self.zero}{modes} mb{self.micro_batch}{' ac' if self.checkpointing else ''}"


def layout_problem(model: ModelConfig, layout: Layout, global_batch: int, gpus_per_node: int = 8,
                   precision: str = "bf16") -> str | None:
    """Why `layout` is invalid, or None. The same checks the config loader and engine apply."""
    if layout.tp > gpus_per_node:
        return f"tp={layout.tp} spans more than one node ({gpus_per_node} GPUs)"
    try:
        model.check_layout(layout.tp, layout.pp)
        # through the loader's from_dict, so its field types (pipeline_reshard's choices) are checked too
        from_dict(ParallelConfig, {"tp": layout.tp, "pp": layout.pp, "zero_stage": layout.zero,
                                   "pipeline_reshard": layout.pipeline_reshard,
                                   "grad_reduction": layout.grad_reduction}, "parallel").validate()
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
    pp > 1 is listed under both `parallel.pipeline_reshard` modes, ZeRO-2/3 under both
    `parallel.grad_reduction` modes (once: ZeRO-3 x PP gathering per step reduces per step)."""
    for tp in _powers_of_two(min(gpus_per_node, gpus)):
        for pp in range(1, model.num_layers + 1):
            if gpus % (tp * pp):
                continue
            dp = gpus // (tp * pp)
            for zero in (0, 1, 2, 3):
                if dp == 1 and zero != (1 if precision == "bf16" else 0):
                    continue
                gathers = ("per_step", "per_microbatch") if pp > 1 and zero == 3 else ("per_step",)
                reductions = ("per_microbatch", "per_step") if zero >= 2 else ("per_microbatch",)
                modes = [(g, r) for g in gathers for r in reductions
                         # ZeRO-3 x PP gathering per step reduces per step already: one entry, not two
                         if not (r == "per_step" and pp > 1 and zero == 3 and g == "per_step")]
                for mb in _powers_of_two(min(max_micro_batch, max(1, global_batch // dp))):
                    for ac in (False, True):
                        for gather, reduction in modes:
                            layout = Layout(tp, pp, dp, zero, mb, ac, gather, reduction)
                            if layout_problem(model, layout, global_batch, gpus_per_node, precision) is None:
                                yield layout
