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

`ZeroPartitions` is that walk, one parameter at a time (the elastic resume reads only what a rank
needs through it); `merge_zero` applies it to every parameter and returns local (this
model-parallel rank's) names -> {"weight", "exp_avg", "exp_avg_sq"} and the Adam step count.
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


def _narrow_views(pieces: list[torch.Tensor], start: int, length: int) -> list[torch.Tensor]:
    """Views of elements [start, start + length) of the concatenation of the 1-D `pieces`, touching only
    those (the pieces may be mmap-backed: a partition file is then paged in only where a parameter lies)."""
    out, at = [], 0
    for piece in pieces:
        n = piece.numel()
        lo, hi = max(start, at), min(start + length, at + n)
        if lo < hi:
            out.append(piece.narrow(0, lo - at, hi - lo))
        at += n
    got = sum(t.numel() for t in out)
    if got != length:
        raise IndexError(f"elements [{start}, {start + length}) lie beyond the {at} the partitions hold")
    return out


def _narrow_cat(pieces: list[torch.Tensor], start: int, length: int) -> torch.Tensor:
    """Elements [start, start + length) of the concatenation of the 1-D `pieces`, as a new tensor."""
    views = _narrow_views(pieces, start, length)
    return torch.cat(views) if len(views) > 1 else views[0].clone()


class ZeroPartitions:
    """The data-parallel partition files of one model-parallel rank, read one parameter at a time.

    `tensors(name)` assembles that parameter's fp32 master weight and Adam moments (this model-parallel
    rank's shape) from the pieces of the partitions that hold it, so nothing larger than one parameter
    is ever put together: this is what consolidation (`merge_zero`, the whole model on
    purpose) and the elastic resume (`megalm.training.elastic`, every rank only its own parameters) share.
    `optim_files`: (path, loaded dict) of every DP rank, in DP order; `param_shapes`: the model-states
    file's per-group {name: shape}."""

    def __init__(self, optim_files: list[tuple[str, dict]], param_shapes: list[dict]):
        self.where = optim_files[0][0]
        osds = [sd["optimizer_state_dict"] for _, sd in optim_files]
        self.stage = int(osds[0]["zero_stage"])
        for (path, _), osd in zip(optim_files, osds):
            if int(osd["zero_stage"]) != self.stage:
                raise CheckpointError(f"{path}: ZeRO stage {int(osd['zero_stage'])}, but {self.where} says "
                                      f"{self.stage}; the files come from different runs")
        self.dp = len(optim_files)
        self.shapes = {name: tuple(shape) for group in param_shapes for name, shape in group.items()}
        # name -> (list of 1-D pieces per kind, start, numel) within that list's concatenation
        self._where: dict[str, tuple[dict[str, list[torch.Tensor]], int, int]] = {}
        if self.stage in (1, 2):
            self._locate_zero12(optim_files, osds, param_shapes)
        elif self.stage == 3:
            self._locate_zero3(optim_files, osds, param_shapes)
        else:
            raise CheckpointError(f"{self.where}: expected a ZeRO-1/2/3 optimizer file, found stage {self.stage}")
        # DeepSpeed's fp16 loss scaler state (the same on every DP rank), for a resume to carry on.
        self.global_state = {k: osds[0].get(k) for k in ("loss_scaler", "dynamic_loss_scale", "overflow")}

    @property
    def names(self) -> list[str]:
        return list(self.shapes)

    def _locate_zero12(self, optim_files, osds, param_shapes) -> None:
        # Per param group, the flat group is cut into one contiguous partition per DP rank; parameters
        # follow in param_shapes order, each followed by its alignment padding.
        paddings = osds[0].get("param_alignment_paddings")
        self.step = None
        for g, shapes in enumerate(param_shapes):
            states = [_group_state(osd["base_optimizer_state"], g, path) for (path, _), osd in zip(optim_files, osds)]
            pieces = {"weight": [osd["single_partition_of_fp32_groups"][g] for osd in osds]}
            for key in MOMENTS:
                pieces[key] = [s[key] for s in states]
            self.step = _step_of(states[0]) if self.step is None else self.step
            total = sum(t.numel() for t in pieces["weight"])
            offset = 0
            for i, (name, shape) in enumerate(shapes.items()):
                n = _numel(shape)
                if offset + n > total:
                    raise CheckpointError(f"{self.where}: param group {g} holds {total} elements, fewer than its "
                                          f"parameters need; a DP rank's optimizer file is missing or damaged")
                self._where[name] = (pieces, offset, n)
                offset += n + (int(paddings[g][i]) if paddings else 0)
        self.step = self.step or 0.0

    def _locate_zero3(self, optim_files, osds, param_shapes) -> None:
        # Every parameter is split on its own into ceil(numel / dp) elements per DP rank; a rank's flat
        # groups hold its piece of every parameter, in param_shapes order (all groups merged).
        per_rank = []
        self.step = None
        for (path, _), osd in zip(optim_files, osds):
            if int(osd["partition_count"]) != self.dp:
                raise CheckpointError(f"{path}: partitioned over {int(osd['partition_count'])} DP ranks but "
                                      f"{self.dp} optimizer files were found; the checkpoint is incomplete")
            groups = list(osd["fp32_flat_groups"])
            if not osd["optimizer_state_dict"].get("state"):
                # Never stepped (megalm-import's step 0): the fp32 weights are there, Adam moments are not.
                per_rank.append({"weight": groups})
                continue
            states = [_group_state(osd["optimizer_state_dict"], g, path) for g in range(len(groups))]
            self.step = _step_of(states[0]) if self.step is None else self.step
            per_rank.append({"weight": groups, **{key: [s[key] for s in states] for key in MOMENTS}})
        self.step = self.step or 0.0
        self._zero3_ranks = per_rank
        offset = 0
        length = sum(t.numel() for t in per_rank[0]["weight"])
        for name, shape in self.shapes.items():
            n = _numel(shape)
            part = math.ceil(n / self.dp)
            if offset + part > length:
                raise CheckpointError(f"{self.where}: flat ZeRO-3 partitions are shorter than the parameters "
                                      f"need; a DP rank's optimizer file is missing or damaged")
            self._where[name] = ({}, offset, n)
            offset += part

    def tensors(self, name: str, kinds: tuple[str, ...] = ("weight",) + MOMENTS) -> dict[str, torch.Tensor]:
        """`kinds` of {"weight", "exp_avg", "exp_avg_sq"} of parameter `name`, in its (model-parallel-local)
        shape; only those are assembled (a weights-only reader asks for ("weight",))."""
        if name not in self._where:
            raise CheckpointError(f"{self.where}: no parameter {name!r} in the optimizer partitions (they hold "
                                  f"{len(self._where)} parameters); was the checkpoint saved by another model?")
        pieces, offset, n = self._where[name]
        shape = self.shapes[name]
        if self.stage in (1, 2):
            return {k: _narrow_cat(pieces[k], offset, n).view(shape) for k in kinds}
        part = math.ceil(n / self.dp)
        missing = [k for k in kinds if any(k not in r for r in self._zero3_ranks)]
        if missing:
            raise CheckpointError(f"{self.where}: holds no {', '.join(missing)}: this step's optimizer never "
                                  f"stepped (a megalm-import step 0); read its weights only (--weights-only)")
        # One copy: the DP ranks' pieces (views into their files) are concatenated into a new tensor; the
        # last rank's padding (< dp elements) stays behind the view.
        return {k: torch.cat([v for r in self._zero3_ranks for v in _narrow_views(r[k], offset, part)])[:n].view(shape)
                for k in kinds}


def merge_zero(optim_files: list[tuple[str, dict]], param_shapes: list[dict], stages: tuple[int, ...],
               kinds: tuple[str, ...] = ("weight",) + MOMENTS) -> tuple[Merged, float]:
    """Every parameter's `kinds` from the partition files (`optim_files`: (path, loaded dict) of every DP
    rank, in DP order), which must be of one of the ZeRO `stages`; and the Adam step count."""
    parts = ZeroPartitions(optim_files, param_shapes)
    if parts.stage not in stages:
        raise CheckpointError(f"{parts.where}: expected a ZeRO-{'/'.join(map(str, stages))} optimizer file, "
                              f"found stage {parts.stage}")
    return {name: parts.tensors(name, kinds) for name in parts.names}, parts.step


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
