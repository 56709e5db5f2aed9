"""Reassembling ZeRO-partitioned fp32 master weights and Adam moments of one model-parallel rank.

This follows DeepSpeed's own `deepspeed.utils.zero_to_fp32` protocol (the layout is DeepSpeed's; we
re-implement the walk rather than call its private helpers because (a) they `torch.load` with
`weights_only=False`, (b) they only reassemble the weights, and we need exp_avg / exp_avg_sq laid out
the same way, and (c) they assume a single model-parallel rank):

* ZeRO-1/2: per param group, the flat group is cut into one contiguous partition per DP rank.
  Concatenating the partitions in DP order gives the flat group; parameters follow in `param_shapes`
  order, each followed by its alignment padding (`param_alignment_paddings`).
* ZeRO-3: every parameter is split on its own into ceil(numel / dp) elements per DP rank; a rank's
  flat buffer holds its piece of every parameter, in `param_shapes` order (all groups merged).

Returns local (this model-parallel rank's) names -> {"weight", "exp_avg", "exp_avg_sq"} and the Adam
step count.
"""
from __future__ import annotations

import math
from typing import Any

import torch

from .checkpoint_files import CheckpointError

MOMENTS = ("exp_avg", "exp_avg_sq")
Merged = dict[str, dict[str, torch.Tensor]]


def _numel(shape: Any) -> int:
    return int(math.prod(shape))


def _group_state(base_state: dict, g: int, where: str) -> dict:
    """Adam state of flat group g (a torch optimizer state dict: one flat param per group)."""
    try:
        key = base_state["param_groups"][g]["params"][0]
        return base_state["state"][key]
    except (KeyError, IndexError, TypeError):
        raise CheckpointError(f"{where}: optimizer state of param group {g} is missing or not in the expected "
                              f"DeepSpeed layout (elastic ZeRO checkpoints are not supported)") from None


def _step_of(state: dict) -> float:
    step = state.get("step", 0)
    return float(step.item() if torch.is_tensor(step) else step)


def merge_zero12(optim_files: list[tuple[str, dict]], param_shapes: list[dict]) -> tuple[Merged, float]:
    """`optim_files`: (path, loaded dict) of every DP rank, in DP order."""
    where = optim_files[0][0]
    osd0 = optim_files[0][1]["optimizer_state_dict"]
    if int(osd0["zero_stage"]) not in (1, 2):
        raise CheckpointError(f"{where}: expected a ZeRO-1/2 optimizer file, found stage {int(osd0['zero_stage'])}")
    paddings = osd0.get("param_alignment_paddings")
    out: Merged = {}
    step = None
    for g, shapes in enumerate(param_shapes):
        flats: dict[str, torch.Tensor] = {}
        flats["weight"] = torch.cat([sd["optimizer_state_dict"]["single_partition_of_fp32_groups"][g]
                                     for _, sd in optim_files])
        states = [_group_state(sd["optimizer_state_dict"]["base_optimizer_state"], g, path) for path, sd in optim_files]
        for key in MOMENTS:
            flats[key] = torch.cat([s[key] for s in states])
        step = _step_of(states[0]) if step is None else step
        offset = 0
        for i, (name, shape) in enumerate(shapes.items()):
            n = _numel(shape)
            if offset + n > flats["weight"].numel():
                raise CheckpointError(f"{where}: param group {g} holds {flats['weight'].numel()} elements, fewer "
                                      f"than its parameters need; a DP rank's optimizer file is missing or damaged")
            out[name] = {k: v.narrow(0, offset, n).view(tuple(shape)).clone() for k, v in flats.items()}
            offset += n + (int(paddings[g][i]) if paddings else 0)
    return out, step or 0.0


def merge_zero3(optim_files: list[tuple[str, dict]], param_shapes: list[dict]) -> tuple[Merged, float]:
    where = optim_files[0][0]
    dp = len(optim_files)
    per_rank: list[dict[str, torch.Tensor]] = []
    step = None
    for path, sd in optim_files:
        osd = sd["optimizer_state_dict"]
        if int(osd["zero_stage"]) != 3:
            raise CheckpointError(f"{path}: expected a ZeRO-3 optimizer file, found stage {int(osd['zero_stage'])}")
        if int(osd["partition_count"]) != dp:
            raise CheckpointError(f"{path}: partitioned over {int(osd['partition_count'])} DP ranks but {dp} "
                                  f"optimizer files were found; the checkpoint is incomplete")
        groups = osd["fp32_flat_groups"]
        states = [_group_state(osd["optimizer_state_dict"], g, path) for g in range(len(groups))]
        step = _step_of(states[0]) if step is None else step
        flats = {"weight": torch.cat(list(groups))}
        for key in MOMENTS:
            flats[key] = torch.cat([s[key] for s in states])
        per_rank.append(flats)
    merged_shapes = {k: v for group in param_shapes for k, v in group.items()}
    out: Merged = {}
    offset = 0
    for name, shape in merged_shapes.items():
        n = _numel(shape)
        part = math.ceil(n / dp)
        if offset + part > per_rank[0]["weight"].numel():
            raise CheckpointError(f"{where}: flat ZeRO-3 partitions are shorter than the parameters need; "
                                  f"a DP rank's optimizer file is missing or damaged")
        out[name] = {k: torch.cat([r[k].narrow(0, offset, part) for r in per_rank])[:n].view(tuple(shape)).clone()
                     for k in per_rank[0]}
        offset += part
    return out, step or 0.0


def unflatten_torch_optimizer(opt_state: dict, names_by_group: list[list[str]], where: str) -> tuple[Merged, float]:
    """ZeRO-0: a plain torch optimizer state dict (index-keyed) -> names, given each group's names
    in order. Parameters without state (never stepped) get no entry."""
    out: Merged = {}
    step = 0.0
    groups = opt_state["param_groups"]
    if [len(g["params"]) for g in groups] != [len(n) for n in names_by_group]:
        raise CheckpointError(f"{where}: optimizer groups have {[len(g['params']) for g in groups]} parameters, "
                              f"the model {[len(n) for n in names_by_group]}; was it saved by another model?")
    for group, names in zip(groups, names_by_group):
        for idx, name in zip(group["params"], names):
            state = opt_state["state"].get(idx)
            if state:
                out[name] = {k: state[k] for k in MOMENTS}
                step = max(step, _step_of(state))
    return out, step
