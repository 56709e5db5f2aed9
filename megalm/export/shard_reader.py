"""A saved step's full tensors, one at a time, straight from DeepSpeed's shard files.

Why not consolidate: `megalm.export.consolidate` puts the whole model together in one process, which a
model larger than one host's memory cannot afford, and which every rank of a multi-process eval would
repeat. `ShardReader.full(name)` instead reads only the pieces of one parameter (its TP pieces from the
files of each source TP rank, or for ZeRO-3 its slices of every DP rank's partition), joins them into
the full, layout-free tensor (`full_weights.merge_tp`: vocab padding stripped) and returns it;
`shard(name, tp, rank)` cuts that for a target TP rank (`full_weights.shard_for_tp`). Files are opened
with `load_pt(..., mmap=True)`, so a file's bytes are paged in only where a requested tensor lies, and
only the files that hold a requested tensor are ever opened. A caller that fills its own parameters
one by one (`fill_parameters`) therefore peaks at one full tensor plus what it keeps.

Where each tensor is (file names from `megalm.ckpt_files`, the layouts `megalm.export.consolidate`
documents):

    pp=1, ZeRO 0-2   mp_rank_{t:02d}_model_states.pt 'module'[GPTModel name]
    pp=1, ZeRO-3     zero_pp_rank_{d}_mp_rank_{t:02d}_optim_states.pt for every d (`ZeroPartitions`),
                     parameter order from zero_pp_rank_0_mp_rank_{t:02d}_model_states.pt 'param_shapes'
    pp>1, ZeRO 0/1   layer_{i:02d}-model_{t:02d}-model_states.pt[local name], i = the pipeline layer
                     (`pipeline_layer_of`; a tied head is the embedding, under layer 0)
    pp>1, ZeRO 2/3   pp=1's files of model-parallel rank stage * tp + t, under the PipelineModule name
                     (`_pipeline_stage`: the first stage holding it, from every stage's param_shapes)
    universal        universal_{kind}.safetensors[GPTModel name], full fp32 (megalm-reshard's output)

Weights come from the same entries `consolidate(ref)` (weights only) reads, so a model filled from here
equals one loaded from consolidated weights bit for bit. Any later reader (streaming export) can use it.
"""
from __future__ import annotations

import os
from typing import Any, Optional

import torch
from torch import nn

from megalm.ckpt_files import (UNIVERSAL_STATE_FILE, layer_states_name, model_states_name, optim_states_name,
                               safetensors_problem, stage_engine_layout, universal_kinds, universal_tensor_file)
from megalm.config.model import ModelConfig
from megalm.model.pipeline import gpt_parameter_names, pipeline_to_gpt_name
from megalm.rundir import META_FILE
from megalm.training.param_groups import group_names

from .checkpoint_files import CheckpointError, CheckpointRef, load_pt
from .consolidate import ENGINE_STATE_KEYS, model_config_of
from .full_weights import expected_shapes, merge_tp, shard_for_tp
from .zero_merge import MOMENTS, Merged, ZeroPartitions, unflatten_torch_optimizer


def pipeline_layer_of(name: str, cfg: ModelConfig) -> tuple[int, str]:
    """(pipeline layer index, name inside the layer) holding GPTModel parameter `name`: the inverse of
    `megalm.model.pipeline.gpt_param_name` (the tied head is the embedding, saved under layer 0)."""
    head, _, rest = name.partition(".")
    if head == "embedding":
        return 0, rest
    if head == "layers":
        index, _, local = rest.partition(".")
        return int(index) + 1, local
    if head == "final_norm":
        return cfg.num_layers + 1, rest
    if head == "output":
        return cfg.num_layers + 2, rest
    raise CheckpointError(f"{name}: not a GPTModel parameter name")


class ShardReader:
    """Full tensors of one checkpoint by GPTModel name, read tensor by tensor from its shard files.

    `with_optimizer`: `state(name)` also returns the Adam moments, and the weights then come from ZeRO's
    fp32 master partitions where the run kept them (exact even when the module was bf16), as
    `consolidate(ref, with_optimizer=True)` reads them. Files stay mapped until `close()`; a caller that
    walks a whole model calls it after each tensor, so the pages it touched are unmapped again and its
    resident memory stays at one tensor's worth."""

    def __init__(self, ref: CheckpointRef, with_optimizer: bool = False):
        self.ref = ref
        # A universal step (megalm-reshard's) stores full tensors: read like a one-rank layout.
        self.universal = universal_kinds(ref.meta.get("layout"))
        self.tp, self.pp, self.dp, self.zero = (1, 1, 1, 0) if self.universal else ref.layout()
        self.cfg: ModelConfig = model_config_of(ref.meta, ref.meta_path)
        self.shapes = expected_shapes(self.cfg)
        self.with_optimizer = with_optimizer
        if with_optimizer and self.universal and not set(MOMENTS) <= set(self.universal):
            raise CheckpointError(f"{ref.path}: this universal step was written with --weights-only and holds no "
                                  f"Adam moments; use --weights-only here too")
        if with_optimizer and self.pp > 1 and self.zero == 0:
            raise CheckpointError(f"{ref.path}: optimizer state of pipeline checkpoints without ZeRO (pp={self.pp}, "
                                  f"zero_stage 0) cannot be read; use --weights-only, or train the source run "
                                  f"with zero_stage 1, 2 or 3")
        # The optimizer's grouping (ZeRO-0) depends on the train section: parsed up front so a bad config fails first.
        self._train_cfg = ref.run_config().train if with_optimizer and self.zero == 0 and not self.universal else None
        self._files: dict[str, Any] = {}  # path -> mmap'd torch.load result
        self._partitions: dict[int, ZeroPartitions] = {}  # model-parallel rank -> its ZeRO partitions
        self._torch_moments: dict[int, Merged] = {}  # ZeRO-0, pp=1: source TP rank -> its moments (mmap views)
        self._stage_of: dict[str, tuple[int, str]] = {}  # pp>1: GPTModel name -> (first stage holding it, its name there)
        self._adam_step: Optional[float] = None

    @property
    def names(self) -> list[str]:
        """Every GPTModel parameter of the checkpoint's model, in GPTModel order."""
        return list(self.shapes)

    def _open(self, name: str, deepspeed_types: bool = False) -> Any:
        path = self.ref.file(name)
        if path not in self._files:
            self._files[path] = load_pt(path, deepspeed_types=deepspeed_types, mmap=True)
        return self._files[path]

    def _zero(self, mp: int) -> ZeroPartitions:
        """The ZeRO partitions of model-parallel rank `mp` (its optimizer files of every DP rank)."""
        if mp not in self._partitions:
            shapes = self._open(model_states_name(mp, self.zero)).get("param_shapes")
            files = [(self.ref.file(optim_states_name(d, mp)), self._open(optim_states_name(d, mp), True))
                     for d in range(self.dp)]
            self._partitions[mp] = ZeroPartitions(files, shapes)
            if self._adam_step is None:
                self._adam_step = self._partitions[mp].step
        return self._partitions[mp]

    def _pipeline_stage(self, name: str) -> tuple[int, str]:
        """pp>1: the stage whose model-parallel files hold `name`'s optimizer state (the tied embedding:
        the first stage) and the PipelineModule name it has there. Read once from every stage's
        param_shapes (names and shapes only)."""
        if not self._stage_of:
            for p in range(self.pp - 1, -1, -1):  # the first stage last, so it wins for the tied embedding
                shapes = load_pt(self.ref.file(model_states_name(p * self.tp, self.zero)), mmap=True)["param_shapes"]
                for group in shapes:
                    for local in group:
                        self._stage_of[pipeline_to_gpt_name(local, self.cfg)] = (p, local)
        if name not in self._stage_of:
            raise CheckpointError(f"{self.ref.path}: no pipeline stage's param_shapes holds {name}; the checkpoint "
                                  f"was saved by another model than its {META_FILE} describes")
        return self._stage_of[name]

    def _module_piece(self, name: str, t: int) -> tuple[torch.Tensor, str]:
        """Source TP rank t's weight of `name` as the module saved it (an mmap-backed view) and its file."""
        if self.pp == 1 or stage_engine_layout(self.pp, self.zero):
            # one engine per model-parallel rank; a stage engine's module holds PipelineModule names
            stage, local = (0, name) if self.pp == 1 else self._pipeline_stage(name)
            file = model_states_name(stage * self.tp + t, self.zero)
            module = self._open(file).get("module")
            if not isinstance(module, dict):
                raise CheckpointError(f"{self.ref.file(file)}: no 'module' state dict; {META_FILE} says "
                                      f"pp={self.pp} ZeRO-{self.zero}, which does not match the files")
        else:
            index, local = pipeline_layer_of(name, self.cfg)
            file = layer_states_name(index, t)
            module = self._open(file)
        if local not in module:
            raise CheckpointError(f"{self.ref.file(file)}: holds no {local!r} (GPTModel {name}); the checkpoint "
                                  f"was saved by another model than its {META_FILE} describes")
        return module[local], self.ref.file(file)

    def _pieces(self, name: str, t: int, kinds: tuple[str, ...]) -> tuple[dict[str, torch.Tensor], str]:
        """Source TP rank t's `kinds` of `name` (its model-parallel shape) and the file they came from."""
        if self.zero == 3 or (self.with_optimizer and self.zero in (1, 2)):
            # ZeRO-3: the weights exist only as fp32 partitions; ZeRO-1/2: the fp32 master copy, with its moments.
            stage, local = (0, name) if self.pp == 1 else self._pipeline_stage(name)
            parts = self._zero(stage * self.tp + t)  # DeepSpeed's mp_rank: the grid's order (decision 1)
            return parts.tensors(local, kinds), parts.where
        out = {}
        if "weight" in kinds:
            out["weight"], file = self._module_piece(name, t)
        else:
            file = self.ref.file(model_states_name(t, self.zero))
        if set(kinds) & set(MOMENTS):  # ZeRO-0, pp=1: the torch optimizer's index-keyed state, split by the train rule
            if t not in self._torch_moments:
                ms = self._open(model_states_name(t, self.zero))
                groups = group_names(list(ms["module"]), self._train_cfg)
                self._torch_moments[t], step = unflatten_torch_optimizer(ms["optimizer"], groups, file)
                self._adam_step = step if self._adam_step is None else self._adam_step
            if name not in self._torch_moments[t]:
                raise CheckpointError(f"{file}: no optimizer state for {name} (never stepped); reshard with "
                                      f"--weights-only")
            out.update({k: v for k, v in self._torch_moments[t][name].items() if k in kinds})
        return out, file

    @property
    def kinds(self) -> tuple[str, ...]:
        """What `state` returns per parameter: the weight, and the Adam moments `with_optimizer`."""
        return ("weight",) + (MOMENTS if self.with_optimizer else ())

    def state(self, name: str, kinds: Optional[tuple[str, ...]] = None) -> dict[str, torch.Tensor]:
        """The full (tp=1, unpadded vocabulary) tensors of parameter `name`: `kinds` of {"weight"}, plus
        "exp_avg" and "exp_avg_sq" when the reader was made `with_optimizer` (default: all of them);
        checked against the model shape in megalm.json (a mismatch names the file it came from)."""
        if name not in self.shapes:
            raise CheckpointError(f"{self.ref.path}: {name} is not a parameter of the model its {META_FILE} describes "
                                  f"(num_layers={self.cfg.num_layers}, tie_embeddings={self.cfg.tie_embeddings})")
        kinds = kinds or self.kinds
        if not set(kinds) <= set(self.kinds):
            raise ValueError(f"{kinds}: this reader reads {self.kinds} (make it with_optimizer for the moments)")
        if self.universal:
            pieces = tuple({k: self._universal_file(k).get_tensor(name) for k in kinds} for _ in (0,))
            files = (self.ref.file(universal_tensor_file(kinds[0])),)
        else:
            pieces, files = zip(*(self._pieces(name, t, kinds) for t in range(self.tp)))
        out = {}
        for kind in kinds:
            full = merge_tp(name, [p[kind] for p in pieces], self.cfg)
            if tuple(full.shape) != self.shapes[name]:
                raise CheckpointError(f"{files[0]}: {name} has shape {tuple(full.shape)} but the model needs "
                                      f"{self.shapes[name]}: the checkpoint was saved by another model than its "
                                      f"{META_FILE} describes")
            out[kind] = full
        return out

    def full(self, name: str) -> torch.Tensor:
        """The full weight of parameter `name` (see `state`)."""
        return self.state(name)["weight"]

    def shard(self, name: str, tp: int = 1, rank: int = 0) -> torch.Tensor:
        """TP rank `rank` of `tp`'s slice of `name` (vocabulary padded for `tp`), as a new tensor."""
        return shard_for_tp(name, self.full(name), self.cfg, tp, rank)

    def _universal_file(self, kind: str) -> Any:
        """A universal step's safetensors file of `kind`, memory-mapped (safe_open) until `close()`."""
        from safetensors import safe_open

        path = self.ref.file(universal_tensor_file(kind))
        if path not in self._files:
            problem = safetensors_problem(path) if os.path.isfile(path) else "missing"
            if problem:
                raise CheckpointError(f"{path}: cannot read this universal checkpoint file: {problem}; reshard "
                                      f"the source again, or restore the file from a copy")
            self._files[path] = safe_open(path, framework="pt")
        return self._files[path]

    def _universal_state(self) -> dict:
        return load_pt(self.ref.file(UNIVERSAL_STATE_FILE))

    def adam_step(self) -> float:
        """The optimizer's step count (bias correction), from the first optimizer file (with_optimizer)."""
        if self.universal:
            return float(self._universal_state().get("adam_step") or 0.0)
        if self._adam_step is None:
            if self.zero > 0:
                self._zero(0)  # reads the step from the partitions' state, no tensor
            else:
                self._pieces(self.names[0], 0, MOMENTS)
            self.close()
        return self._adam_step or 0.0

    def engine_state(self) -> dict:
        """DeepSpeed's engine counters and the LR scheduler's state, from model-parallel rank 0's file."""
        if self.universal:
            return dict(self._universal_state()["engine_state"])
        ms = load_pt(self.ref.file(model_states_name(0, self.zero)), mmap=True)
        return {k: ms.get(k) for k in ENGINE_STATE_KEYS}

    def close(self) -> None:
        """Unmap the files (reopened on the next read; the pipeline stage index is kept)."""
        self._files.clear()
        self._partitions.clear()
        self._torch_moments.clear()


def fill_parameters(model: nn.Module, reader: ShardReader, tp: int = 1, tp_rank: int = 0,
                    where: Optional[str] = None) -> None:
    """Copy the checkpoint's weights into every parameter of `model` (a GPTModel or any set of its
    pipeline layers, built for TP rank `tp_rank` of `tp`), one parameter at a time: each full tensor is
    read, cut for this rank, copied and dropped before the next is read."""
    names = gpt_parameter_names(model)
    with torch.no_grad():
        for p in model.parameters():  # unique parameters: a tied embedding is filled once
            name = names[id(p)]
            shard = reader.shard(name, tp, tp_rank)
            if shard.shape != p.shape:
                raise CheckpointError(f"{where or reader.ref.path}: {name} is {tuple(shard.shape)} at tp={tp} but "
                                      f"the model built here has {tuple(p.shape)}; it was built for another model")
            p.copy_(shard)
            del shard
            reader.close()  # unmap what this tensor touched: resident memory stays at one tensor
