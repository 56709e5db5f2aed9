"""Build a model holding a checkpoint's weights: in one process, as one rank of a TP group, or as one
pipeline stage of any (tp, pp) grid.

Whatever layout the checkpoint was saved at, no rank consolidates it: each builds only its own part of
the model at its TP shard and fills it parameter by parameter from the shard files
(`megalm.export.shard_reader`), so a rank holds its stage plus one full tensor at a time. A (2, 2, 2,
ZeRO-1) checkpoint therefore loads the same as a single-process one, at any target layout.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from megalm.export.checkpoint_files import CheckpointRef
from megalm.export.consolidate import FullState
from megalm.export.full_weights import load_full_weights
from megalm.model import GPTModel
from megalm.parallel.grid import ProcessGrid

from megalm.export.shard_reader import ShardReader, fill_parameters


def model_from_state(state: FullState, grid: Optional[ProcessGrid] = None,
                     device: str | torch.device = "cpu") -> GPTModel:
    """A GPTModel in eval mode with `state`'s (already consolidated) weights; `grid` gives its TP group."""
    model = GPTModel(state.cfg, grid)
    tp, rank = (grid.tp, grid.tp_rank) if grid is not None else (1, 0)
    load_full_weights(model, state.weights, state.cfg, tp, rank, where=state.ref.path)
    return model.to(device).eval()


def load_stage(ref: CheckpointRef, grid: Optional[ProcessGrid] = None,
               device: str | torch.device = "cpu") -> nn.Module:
    """This rank's part of the checkpoint's model in eval mode: a GPTModel when `grid` is None or has
    pp=1 (at the grid's TP shard), else its pipeline stage (`megalm.eval.stages.PipelineStage`)."""
    reader = ShardReader(ref)
    try:
        if grid is None or grid.pp == 1:
            model: nn.Module = GPTModel(reader.cfg, grid)
        else:
            from .stages import PipelineStage

            model = PipelineStage(reader.cfg, grid)
        tp, rank = (grid.tp, grid.tp_rank) if grid is not None else (1, 0)
        fill_parameters(model, reader, tp, rank)
    finally:
        reader.close()
    return model.to(device).eval()


def load_model(ref: CheckpointRef, grid: Optional[ProcessGrid] = None,
               device: str | torch.device = "cpu") -> GPTModel:
    """The whole GPTModel (at `grid`'s TP shard; the grid must have pp=1), read tensor by tensor."""
    if grid is not None and grid.pp != 1:
        raise ValueError(f"load_model builds the whole model; at pp={grid.pp} use load_stage")
    return load_stage(ref, grid, device)  # type: ignore[return-value]
