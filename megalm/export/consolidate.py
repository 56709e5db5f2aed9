"""Any megalm checkpoint -> full weights (and, on request, full Adam moments), in one CPU process.

DeepSpeed's on-disk layouts, by training layout (file names inside RUN_DIR/checkpoints/step_N/):

    pp=1, ZeRO 0-2   mp_rank_{t:02d}_model_states.pt: 'module' = TP rank t's GPTModel state dict
                     ZeRO-0: Adam state in its 'optimizer' (index-keyed torch state dict)
                     ZeRO-1/2: zero_pp_rank_{d}_mp_rank_{t:02d}_optim_states.pt, flat fp32 partitions
    pp=1, ZeRO-3     zero_pp_rank_{d}_mp_rank_{t:02d}_model_states.pt ('module' holds empty placeholders;
                     'param_shapes' the order) + ..._optim_states.pt: the weights exist only there
    pp>1, ZeRO 0/1   layer_{i:02d}-model_{t:02d}-model_states.pt: pipeline layer i of TP rank t (the tied
                     embedding once, under layer 0); mp_rank_{m:02d}_model_states.pt and
                     zero_pp_rank_{d}_mp_rank_{m:02d}_optim_states.pt per model-parallel rank
                     m = pp_rank * tp + tp_rank (the grid's order, DESIGN decision 1)
    pp>1, ZeRO 2/3   one DeepSpeedEngine per stage (megalm.training.stage_engine): pp=1's files per
                     model-parallel rank m, PipelineModule names under "pipe."

Pipeline names ("3.attention.qkv.weight", "tied_modules.embed.weight") become GPTModel names through
`megalm.model.pipeline.pipeline_to_gpt_name`; a ZeRO-0 optimizer's index-keyed state is split into
parameter groups by training's own rule (`megalm.training.param_groups.group_names`); TP shards are
joined by `full_weights.merge_tp`. The result is checked against the model shape recorded in
megalm.json, naming the file of any tensor that does not fit.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Optional

import torch

from megalm.ckpt_files import (UNIVERSAL_STATE_FILE, layer_states_name, model_states_name, optim_states_name,
                               stage_engine_layout, universal_kinds, universal_tensor_file)
from megalm.config import ConfigError, from_dict
from megalm.config.model import ModelConfig
from megalm.config.train import TrainConfig
from megalm.model.pipeline import gpt_param_name, pipeline_to_gpt_name
from megalm.rundir import META_FILE
from megalm.training.param_groups import group_names

from .checkpoint_files import CheckpointError, CheckpointRef, load_pt
from .full_weights import check_full_weights, merge_tp
from .zero_merge import MOMENTS, Merged, merge_zero, unflatten_torch_optimizer


# What of a DeepSpeed model-states file a layout change carries over: the LR scheduler and the counters.
ENGINE_STATE_KEYS = ("lr_scheduler", "global_steps", "global_samples", "skipped_steps")


@dataclass
class FullState:
    """A checkpoint in layout-free form. `moments[name]` = {"exp_avg", "exp_avg_sq"} (full shapes)."""

    cfg: ModelConfig
    weights: dict[str, torch.Tensor]
    ref: CheckpointRef
    moments: Optional[dict[str, dict[str, torch.Tensor]]] = None
    adam_step: Optional[float] = None
    # DeepSpeed engine counters and the LR scheduler's state dict, from model-parallel rank 0.
    engine_state: dict = field(default_factory=dict)


def model_config_of(meta: dict, where: str) -> ModelConfig:
    try:
        return from_dict(ModelConfig, meta["model"], "model")
    except (ConfigError, KeyError) as e:
        raise CheckpointError(f"{where}: its {META_FILE} has no valid model section ({e})") from None


__all__ = ["FullState", "consolidate", "model_config_of", "pipeline_to_gpt_name"]


class _Reader:
    def __init__(self, ref: CheckpointRef, with_optimizer: bool):
        self.ref = ref
        self.with_optimizer = with_optimizer
        self.tp, self.pp, self.dp, self.zero = ref.layout()
        self.cfg = model_config_of(ref.meta, ref.meta_path)
        # The optimizer's grouping depends on the run's train section; parsed up front so a bad config
        # fails before any shard is read (weights alone do not need it).
        self.train_cfg: Optional[TrainConfig] = ref.run_config().train if with_optimizer else None
        # per TP rank: GPTModel name -> {"weight": t, "exp_avg": t, "exp_avg_sq": t}
        self.local: list[Merged] = [{} for _ in range(self.tp)]
        self.origin: dict[str, str] = {}
        self.adam_step: Optional[float] = None
        self.engine_state: dict = {}

    def model_states_name(self, mp: int) -> str:
        return model_states_name(mp, self.zero)

    def optim_files(self, mp: int) -> list[tuple[str, dict]]:
        paths = [self.ref.file(optim_states_name(d, mp)) for d in range(self.dp)]
        return [(p, load_pt(p, deepspeed_types=True)) for p in paths]

    def put(self, t: int, name: str, kind: str, value: torch.Tensor, path: str) -> None:
        entry = self.local[t].setdefault(name, {})
        if kind not in entry:  # a tied embedding appears on two stages: the copies are equal, keep one
            entry[kind] = value
            self.origin.setdefault(name, path)

    def put_merged(self, t: int, merged: Merged, step: float, path: str, rename) -> None:
        self.adam_step = step if self.adam_step is None else self.adam_step
        for local_name, values in merged.items():
            name = rename(local_name)
            for kind, v in values.items():
                self.put(t, name, kind, v, path)

    def read_engine_state(self, ms: dict) -> None:
        if not self.engine_state:
            self.engine_state = {k: ms.get(k) for k in ENGINE_STATE_KEYS}

    # ---- one engine per model-parallel rank: pp = 1, or pp > 1 with ZeRO-2/3 (one per stage) ----
    def read_engine_files(self, t: int, mp: int) -> None:
        path = self.ref.file(self.model_states_name(mp))
        ms = load_pt(path)
        self.read_engine_state(ms)
        # GPTModel names already at pp=1; a stage engine's are PipelineModule names under `pipe.`
        rename = (lambda n: n) if self.pp == 1 else (lambda n: pipeline_to_gpt_name(n, self.cfg))
        if self.zero == 3:  # weights exist only as fp32 partitions
            kinds = ("weight",) + (MOMENTS if self.with_optimizer else ())
            merged, step = merge_zero(self.optim_files(mp), ms["param_shapes"], (3,), kinds)
            self.put_merged(t, merged, step, path, rename)
            return
        if self.with_optimizer and self.zero in (1, 2):  # fp32 master weights first: exact even under bf16
            merged, step = merge_zero(self.optim_files(mp), ms["param_shapes"], (1, 2))
            self.put_merged(t, merged, step, path, rename)
        module = ms.get("module")
        if not isinstance(module, dict):
            raise CheckpointError(f"{path}: no 'module' state dict; {META_FILE} says pp={self.pp} "
                                  f"ZeRO-{self.zero}, which does not match the files")
        for name, v in module.items():
            self.put(t, rename(name), "weight", v, path)
        if self.with_optimizer and self.zero == 0:
            groups = group_names(module, self.train_cfg)  # the state dict is in parameter order
            merged, step = unflatten_torch_optimizer(ms["optimizer"], groups, path)
            self.put_merged(t, merged, step, path, same)

    # ---- pp > 1 ----
    def read_layers(self, t: int) -> None:
        L = self.cfg.num_layers
        for idx in range(L + 3):
            path = self.ref.file(layer_states_name(idx, t))
            if idx == L + 2 and self.cfg.tie_embeddings and not os.path.isfile(path):
                continue  # the tied head is the embedding, saved under layer 0
            for local, v in load_pt(path).items():
                self.put(t, gpt_param_name(idx, local, self.cfg), "weight", v, path)

    def read_pipeline_optimizer(self, t: int) -> None:
        rename = lambda n: pipeline_to_gpt_name(n, self.cfg)  # noqa: E731
        for p in range(self.pp):
            mp = p * self.tp + t
            path = self.ref.file(self.model_states_name(mp))
            ms = load_pt(path)
            self.read_engine_state(ms)
            if self.zero != 1:
                # ZeRO-0 pipeline files keep an index-keyed torch optimizer state and no parameter names
                # (param_shapes is None), and which layers a stage held depends on DeepSpeed's partitioning.
                raise CheckpointError(f"{path}: optimizer state of pipeline checkpoints without ZeRO (pp>1, "
                                      f"zero_stage 0) cannot be consolidated; use --weights-only, or train the "
                                      f"source run with zero_stage 1")
            merged, step = merge_zero(self.optim_files(mp), ms["param_shapes"], (1, 2))
            self.put_merged(t, merged, step, path, rename)

    def read(self) -> FullState:
        for t in range(self.tp):
            if self.pp == 1 or stage_engine_layout(self.pp, self.zero):
                for p in range(self.pp):
                    self.read_engine_files(t, p * self.tp + t)
            else:
                self.read_layers(t)
                if self.with_optimizer:
                    self.read_pipeline_optimizer(t)
        weights, moments = {}, {} if self.with_optimizer else None
        for name in self.local[0]:
            kinds = [{k: v for k, v in self.local[t].get(name, {}).items()} for t in range(self.tp)]
            if any("weight" not in k for k in kinds):
                raise CheckpointError(f"{self.ref.path}: {name} is missing on some TP ranks; the checkpoint is incomplete")
            weights[name] = merge_tp(name, [k["weight"] for k in kinds], self.cfg)
            if moments is not None and all(m in kinds[0] for m in MOMENTS):
                moments[name] = {m: merge_tp(name, [k[m] for k in kinds], self.cfg) for m in MOMENTS}
        check_full_weights(weights, self.cfg, self.ref.path, self.origin)
        if moments is not None and set(moments) != set(weights):
            raise CheckpointError(f"{self.ref.path}: optimizer state is missing for "
                                  f"{sorted(set(weights) - set(moments))[:5]}; reshard with --weights-only")
        return FullState(cfg=self.cfg, weights=weights, ref=self.ref, moments=moments,
                         adam_step=self.adam_step, engine_state=self.engine_state)


def consolidate(ref: CheckpointRef, with_optimizer: bool = False) -> FullState:
    """Full weights of the checkpoint `ref` (fp32 master weights and Adam moments too when
    `with_optimizer`), whatever its (tp, pp, dp, ZeRO) layout, or a universal step's."""
    kinds = universal_kinds(ref.meta.get("layout"))
    if kinds:
        return _read_universal(ref, kinds, with_optimizer)
    return _Reader(ref, with_optimizer).read()


def _read_universal(ref: CheckpointRef, kinds: tuple[str, ...], with_optimizer: bool) -> FullState:
    """A universal step (megalm.export.universal) read whole: its files already hold full tensors."""
    from safetensors.torch import load_file

    cfg = model_config_of(ref.meta, ref.meta_path)
    if with_optimizer and not set(MOMENTS) <= set(kinds):
        raise CheckpointError(f"{ref.path}: this universal step holds no Adam moments (--weights-only)")
    tensors = {k: load_file(ref.file(universal_tensor_file(k))) for k in kinds if k == "weight" or with_optimizer}
    weights = tensors["weight"]
    check_full_weights(weights, cfg, ref.path)
    moments = {n: {m: tensors[m][n] for m in MOMENTS} for n in weights} if with_optimizer else None
    state = load_pt(ref.file(UNIVERSAL_STATE_FILE))
    return FullState(cfg=cfg, weights=weights, ref=ref, moments=moments,
                     adam_step=state["adam_step"] if with_optimizer else None,
                     engine_state=dict(state["engine_state"]))
