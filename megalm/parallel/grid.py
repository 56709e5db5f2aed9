"""The process grid: every rank's place on the (pp, dp, tp) axes and the process groups along them.

Rank order (DESIGN.md decision 1): TP fastest-varying, then DP, then PP, i.e.

    rank = pp_rank * (dp * tp) + dp_rank * tp + tp_rank

which is DeepSpeed's `PipeModelDataParallelTopology(num_pp, num_mp=tp, num_dp)` (axes
['pipe', 'data', 'model']) and Megatron's order, so TP peers are adjacent ranks and share a node.
`grid_rank_lists` computes every group as plain rank lists (a pure function, testable for any shape
without processes); `initialize_process_grid` turns them into torch.distributed groups.

The grid doubles as the `mpu` DeepSpeed expects (`deepspeed.initialize(mpu=grid.mpu)`): ZeRO
partitions inside the DP group, gradient-norm reductions span the model-parallel group (tp x pp, the
ranks holding one replica, as in DeepSpeed's own `PipelineParallelGrid`), TP layers use the TP group.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Optional

import torch.distributed as dist
from torch.distributed import ProcessGroup

AXES = ("tp", "dp", "pp", "model")


def grid_rank_lists(world_size: int, tp: int, pp: int) -> dict[str, list[list[int]]]:
    """All groups of each axis as rank lists, in DeepSpeed's `get_axis_comm_lists` order.

    Keys: "tp", "dp", "pp" (ranks that differ only along that axis) and "model" (the tp x pp ranks
    sharing a DP index: one full model replica).
    """
    if tp < 1 or pp < 1 or world_size < 1 or world_size % (tp * pp) != 0:
        raise ValueError(f"world size {world_size} is not divisible by tensor_parallel ({tp}) x "
                         f"pipeline_parallel ({pp}) = {tp * pp}; the data-parallel size would be "
                         f"{world_size / max(tp * pp, 1):g}. Change tp/pp or the number of ranks.")
    dp = world_size // (tp * pp)

    def rank(p: int, d: int, t: int) -> int:
        return p * dp * tp + d * tp + t

    return {
        "tp": [[rank(p, d, t) for t in range(tp)] for p in range(pp) for d in range(dp)],
        "dp": [[rank(p, d, t) for d in range(dp)] for p in range(pp) for t in range(tp)],
        "pp": [[rank(p, d, t) for p in range(pp)] for d in range(dp) for t in range(tp)],
        "model": [sorted(rank(p, d, t) for p in range(pp) for t in range(tp)) for d in range(dp)],
    }


@dataclass
class ProcessGrid:
    """This rank's coordinates, group sizes, rank lists and groups. Groups of size 1 are still real
    groups, so code can always pass `grid.tp_group` without special cases."""

    tp: int
    dp: int
    pp: int
    rank: int
    tp_rank: int
    dp_rank: int
    pp_rank: int
    tp_ranks: list[int]
    dp_ranks: list[int]
    pp_ranks: list[int]
    model_ranks: list[int]
    tp_group: ProcessGroup
    dp_group: ProcessGroup
    pp_group: ProcessGroup
    model_group: ProcessGroup

    @property
    def world_size(self) -> int:
        return self.tp * self.dp * self.pp

    @property
    def model_parallel_size(self) -> int:
        return self.tp * self.pp

    @property
    def model_rank(self) -> int:
        return self.model_ranks.index(self.rank)

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    @property
    def mpu(self) -> "ModelParallelUnit":
        return ModelParallelUnit(self)

    def topology(self) -> Any:
        """The equivalent DeepSpeed topology, for `PipelineModule(topology=...)`."""
        from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

        return PipeModelDataParallelTopology(num_pp=self.pp, num_mp=self.tp, num_dp=self.dp)


class ModelParallelUnit:
    """DeepSpeed's `mpu` interface over a ProcessGrid (the names DeepSpeed's engine, ZeRO and
    activation checkpointing look up; the `pipe`/`slice` spellings are those of its PipelineParallelGrid).
    Sequence-parallel methods are deliberately absent: DeepSpeed probes for them with hasattr."""

    def __init__(self, grid: ProcessGrid):
        self.grid = grid

    # model parallel = tp x pp: one replica
    def get_model_parallel_rank(self) -> int:
        return self.grid.model_rank

    def get_model_parallel_world_size(self) -> int:
        return self.grid.model_parallel_size

    def get_model_parallel_group(self) -> ProcessGroup:
        return self.grid.model_group

    # data parallel
    def get_data_parallel_rank(self) -> int:
        return self.grid.dp_rank

    def get_data_parallel_world_size(self) -> int:
        return self.grid.dp

    def get_data_parallel_group(self) -> ProcessGroup:
        return self.grid.dp_group

    def get_data_parallel_group_ranks(self) -> list[int]:
        return list(self.grid.dp_ranks)

    # tensor parallel (DeepSpeed also calls it "slice" parallel)
    def get_tensor_model_parallel_rank(self) -> int:
        return self.grid.tp_rank

    def get_tensor_model_parallel_world_size(self) -> int:
        return self.grid.tp

    def get_tensor_model_parallel_group(self) -> ProcessGroup:
        return self.grid.tp_group

    def get_tensor_model_parallel_src_rank(self) -> int:
        return self.grid.tp_ranks[0]

    get_slice_parallel_rank = get_tensor_model_parallel_rank
    get_slice_parallel_world_size = get_tensor_model_parallel_world_size
    get_slice_parallel_group = get_tensor_model_parallel_group

    # pipeline parallel
    def get_pipeline_model_parallel_rank(self) -> int:
        return self.grid.pp_rank

    def get_pipeline_model_parallel_world_size(self) -> int:
        return self.grid.pp

    def get_pipeline_model_parallel_group(self) -> ProcessGroup:
        return self.grid.pp_group

    get_pipe_parallel_rank = get_pipeline_model_parallel_rank
    get_pipe_parallel_world_size = get_pipeline_model_parallel_world_size
    get_pipe_parallel_group = get_pipeline_model_parallel_group


_GRID: Optional[ProcessGrid] = None
_GROUPS_BEFORE_GRID: frozenset[ProcessGroup] = frozenset()


def live_process_groups() -> list[ProcessGroup]:
    """Every process group this rank is a member of, but the default one. torch has no public registry:
    this reads `distributed_c10d._world.pg_map` (tests/test_parallel_grid.py checks it still works)."""
    from torch.distributed import distributed_c10d as c10d

    return [g for g in list(c10d._world.pg_map) if g is not c10d.GroupMember.WORLD]


def initialize_process_grid(tp: int, pp: int, backend: str | None = None) -> ProcessGrid:
    """Build the grid on the already-initialised default group. Every rank must call this (group
    creation is collective). `backend` defaults to the default group's."""
    global _GRID, _GROUPS_BEFORE_GRID
    if not dist.is_initialized():
        raise RuntimeError("initialize_process_grid: torch.distributed is not initialised; call "
                           "torch.distributed.init_process_group first (the training entry point does)")
    if _GRID is not None:
        raise RuntimeError("initialize_process_grid: a grid already exists; call destroy_process_grid() first")
    world, rank = dist.get_world_size(), dist.get_rank()
    _GROUPS_BEFORE_GRID = frozenset(live_process_groups())
    lists = grid_rank_lists(world, tp, pp)
    mine: dict[str, tuple[list[int], ProcessGroup]] = {}
    for axis in AXES:
        for ranks in lists[axis]:
            # new_group is collective over the whole world: every rank creates every group, in order.
            group = dist.new_group(ranks=ranks, backend=backend)
            if rank in ranks:
                mine[axis] = (ranks, group)
    dp = world // (tp * pp)
    _GRID = ProcessGrid(
        tp=tp, dp=dp, pp=pp, rank=rank,
        tp_rank=rank % tp, dp_rank=(rank // tp) % dp, pp_rank=rank // (tp * dp),
        tp_ranks=mine["tp"][0], dp_ranks=mine["dp"][0], pp_ranks=mine["pp"][0], model_ranks=mine["model"][0],
        tp_group=mine["tp"][1], dp_group=mine["dp"][1], pp_group=mine["pp"][1], model_group=mine["model"][1],
    )
    return _GRID


def get_process_grid() -> ProcessGrid:
    if _GRID is None:
        raise RuntimeError("no process grid: call megalm.parallel.initialize_process_grid(tp, pp) first")
    return _GRID


def is_grid_initialized() -> bool:
    return _GRID is not None


def destroy_process_grid() -> None:
    """Destroy the grid's groups and every other group built while it lived, not the default group, so a
    new grid can be built in this process. The others are the engines': DeepSpeed's pipeline-grid and
    p2p groups (built anew for every pipeline engine, never freed by DeepSpeed) and its world clone.
    Left alive, each gloo group keeps two worker threads and a polling loop (a long-lived test worker
    held 76 groups halfway through the suite); each NCCL group keeps its communicator's GPU memory."""
    global _GRID, _GROUPS_BEFORE_GRID
    destroy_process_groups([g for g in live_process_groups() if g not in _GROUPS_BEFORE_GRID])
    _release_deepspeed_references()
    _GROUPS_BEFORE_GRID = frozenset()
    _GRID = None


def _release_deepspeed_references() -> None:
    """Drop what DeepSpeed's modules still hold of the finished run (deepspeed==0.19.8): `groups.mpu`
    (our grid's mpu), the pipeline p2p module's grid and groups, and ZeRO-3's forward-module stack
    (which still held the top module after a step: GPTModel, a pipeline StageModule). Destroyed groups
    stay alive, threads and all, while anything references them, and the stack kept a whole model."""
    groups = sys.modules.get("deepspeed.utils.groups")
    if groups is not None and isinstance(getattr(groups, "mpu", None), ModelParallelUnit):
        groups.mpu = None
    p2p = sys.modules.get("deepspeed.runtime.pipe.p2p")
    if p2p is not None:
        p2p._grid = p2p._groups = None
    offload = sys.modules.get("deepspeed.runtime.zero.parameter_offload")
    if offload is not None and isinstance(getattr(offload, "FWD_MODULE_STACK", None), list):
        offload.FWD_MODULE_STACK.clear()


def destroy_process_groups(groups: list[ProcessGroup]) -> None:
    """Destroy these (non-default) groups on this rank."""
    ds_comm = sys.modules.get("deepspeed.comm")
    for group in groups:
        try:
            if ds_comm is not None and ds_comm.is_initialized():
                # DeepSpeed's teardown also drops its cached references (its world clone, ZeRO's groups),
                # so the next engine in this process builds fresh ones instead of using a destroyed group.
                ds_comm.destroy_process_group(group)
            else:
                dist.destroy_process_group(group)
        except (ValueError, RuntimeError):  # already gone with the default group
            pass
