"""Build a GPTModel holding a checkpoint's weights, in one process or as one rank of a TP group.

The checkpoint is first consolidated to full weights (`megalm.export.consolidate`), so the training
layout does not matter: a (2, 2, 2, ZeRO-1) checkpoint loads the same as a single-process one.
"""
from __future__ import annotations

from typing import Optional

import torch

from megalm.export.checkpoint_files import CheckpointRef
from megalm.export.consolidate import FullState, consolidate
from megalm.export.full_weights import load_full_weights
from megalm.model import GPTModel
from megalm.parallel.grid import ProcessGrid


def model_from_state(state: FullState, grid: Optional[ProcessGrid] = None,
                     device: str | torch.device = "cpu") -> GPTModel:
    """A GPTModel in eval mode with `state`'s weights; `grid` gives its TP group (None: no TP)."""
    model = GPTModel(state.cfg, grid)
    tp, rank = (grid.tp, grid.tp_rank) if grid is not None else (1, 0)
    load_full_weights(model, state.weights, state.cfg, tp, rank, where=state.ref.path)
    return model.to(device).eval()


def load_model(ref: CheckpointRef, grid: Optional[ProcessGrid] = None,
               device: str | torch.device = "cpu") -> GPTModel:
    return model_from_state(consolidate(ref), grid, device)
