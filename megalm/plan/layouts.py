"""Valid parallel layouts: the divisibility rules of `ModelConfig.check_layout`, `ParallelConfig.validate`
and `TrainConfig.gradient_accumulation_steps`, applied to every candidate."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

from megalm.config import ConfigError
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

    @property
    def gpus(self) -> int:
        return self.tp * self.pp * self.dp

    def micro_batches(self, global_batch: int) -> int:
        """Micro-batches per step per pipeline (gradient accumulation steps)."""
        return global_batch // (self.micro_batch * self.dp)

    def short(self) -> str:
        return (f"tp{self.tp} pp{self.pp} dp{self.dp} z{self.zero} mb{self.micro_batch}"
                f"{' ac' if self.checkpointing else ''}")


def layout_problem(model: ModelConfig, layout: Layout, global_batch: int, gpus_per_node: int = 8,
                   precision: str = "bf16") -> str | None:
    """Why `layout` is invalid, or None. The same checks the config loader and engine apply."""
    if layout.tp > gpus_per_node:
        return f"tp={layout.tp} spans more than one node ({gpus_per_node} GPUs)"
    try:
        model.check_layout(layout.tp, layout.pp)
        ParallelConfig(tp=layout.tp, pp=layout.pp, zero_stage=layout.zero).validate()  # type: ignore[arg-type]
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
    """Every valid layout using exactly `gpus` GPUs, except ZeRO-2/3 with pp > 1 (see below). At dp=1 ZeRO
    partitions nothing: only the stage the precision needs is listed there (1 for bf16, else 0); micro
    batches are powers of two."""
    for tp in _powers_of_two(min(gpus_per_node, gpus)):
        for pp in range(1, model.num_layers + 1):
            if gpus % (tp * pp):
                continue
            dp = gpus // (tp * pp)
            for zero in (0, 1, 2, 3):
                if dp == 1 and zero != (1 if precision == "bf16" else 0):
                    continue
                if pp > 1 and zero >= 2:
                    # The trainer runs these (one engine per stage, megalm.training.stage_engine), but the
                    # memory and cost models have not been validated against measurements of them yet
                    # (issue 11): the planner proposes only layouts whose predictions were checked.
                    continue
                for mb in _powers_of_two(min(max_micro_batch, max(1, global_batch // dp))):
                    for ac in (False, True):
                        layout = Layout(tp, pp, dp, zero, mb, ac)
                        if layout_problem(model, layout, global_batch, gpus_per_node, precision) is None:
                            yield layout
