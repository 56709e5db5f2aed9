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
    pp>1             layer_{i:02d}-model_{t:02d}-model_states.pt[local name], i = the pipeline layer
                     (`pipeline_layer_of`; a tied head is the embedding, under layer 0)

Weights come from the same entries `consolidate(ref)` (weights only) reads, so a model filled from here
equals one loaded from consolidated weights bit for bit. Any later reader (streaming export) can use it.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from megalm.ckpt_files import layer_states_name, model_states_name, optim_states_name
from megalm.config.model import ModelConfig
from megalm.export.checkpoint_files import CheckpointError, CheckpointRef, load_pt
from megalm.export.consolidate import model_config_of
from megalm.export.full_weights import expected_shapes, merge_tp, shard_for_tp
from megalm.export.zero_merge import ZeroPartitions
from megalm.model.pipeline import gpt_parameter_names
from megalm.rundir import META_FILE


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
    """Full tensors of one checkpoint by GPTModel name, read tensor by tensor from its shard files."""

    def __init__(self, ref: CheckpointRef):
        self.ref = ref
        self.tp, self.pp, self.dp, self.zero = ref.layout()
        self.cfg: ModelConfig = model_config_of(ref.meta, ref.meta_path)
        self.shapes = expected_shapes(self.cfg)
        self._files: dict[str, Any] = {}  # path -> mmap'd torch.load result
        self._partitions: dict[int, ZeroPartitions] = {}  # source TP rank -> its ZeRO-3 partitions

    @property
    def names(self) -> list[str]:
        """Every GPTModel parameter of the checkpoint's model, in GPTModel order."""
        return list(self.shapes)

    def _open(self, name: str, deepspeed_types: bool = False) -> Any:
        path = self.ref.file(name)
        if path not in self._files:
            self._files[path] = load_pt(path, deepspeed_types=deepspeed_types, mmap=True)
        return self._files[path]

    def _zero3(self, t: int) -> ZeroPartitions:
        if t not in self._partitions:
            shapes = self._open(model_states_name(t, 3)).get("param_shapes")
            files = [(self.ref.file(optim_states_name(d, t)), self._open(optim_states_name(d, t), True))
                     for d in range(self.dp)]
            self._partitions[t] = ZeroPartitions(files, shapes)
        return self._partitions[t]

    def _piece(self, name: str, t: int) -> tuple[torch.Tensor, str]:
        """Source TP rank t's piece of `name` (an mmap-backed view where possible) and its file."""
        if self.pp == 1 and self.zero == 3:  # the weights exist only as fp32 partitions
            parts = self._zero3(t)
            return parts.tensors(name, ("weight",))["weight"], parts.where
        if self.pp == 1:
            file = model_states_name(t, self.zero)
            module = self._open(file).get("module")
            if not isinstance(module, dict):
                raise CheckpointError(f"{self.ref.file(file)}: no 'module' state dict; {META_FILE} says pp=1 "
                                      f"ZeRO-{self.zero}, which does not match the files")
            local = name
        else:
            index, local = pipeline_layer_of(name, self.cfg)
            file = layer_states_name(index, t)
            module = self._open(file)
        if local not in module:
            raise CheckpointError(f"{self.ref.file(file)}: holds no {local!r} (GPTModel {name}); the checkpoint "
                                  f"was saved by another model than its {META_FILE} describes")
        return module[local], self.ref.file(file)

    def full(self, name: str) -> torch.Tensor:
        """The full (tp=1, unpadded vocabulary) tensor of parameter `name`, checked against the model
        shape in megalm.json (a mismatch names the file it came from)."""
        if name not in self.shapes:
            raise CheckpointError(f"{self.ref.path}: {name} is not a parameter of the model its {META_FILE} describes "
                                  f"(num_layers={self.cfg.num_layers}, tie_embeddings={self.cfg.tie_embeddings})")
        pieces, files = zip(*(self._piece(name, t) for t in range(self.tp)))
        full = merge_tp(name, list(pieces), self.cfg)
        if tuple(full.shape) != self.shapes[name]:
            raise CheckpointError(f"{files[0]}: {name} has shape {tuple(full.shape)} but the model needs "
                                  f"{self.shapes[name]}: the checkpoint was saved by another model than its "
                                  f"{META_FILE} describes")
        return full

    def shard(self, name: str, tp: int = 1, rank: int = 0) -> torch.Tensor:
        """TP rank `rank` of `tp`'s slice of `name` (vocabulary padded for `tp`), as a new tensor."""
        return shard_for_tp(name, self.full(name), self.cfg, tp, rank)

    def close(self) -> None:
        """Drop the file maps (a reader is cheap to make again)."""
        self._files.clear()
        self._partitions.clear()


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
