"""Which parameters get weight decay: one rule, on GPTModel parameter names.

Training applies it to live modules (`parameter_groups`: GPTModel, a ZeRO-3 GPTModel whose parameters
look 1-D, or a pipeline stage named "3.attention.qkv.weight"/"tied_modules.embed.weight"), after
`megalm.model.pipeline.gpt_parameter_names` has named each parameter. Checkpoint tools apply it to the
names they read from files (`group_names`), to know how a saved optimizer's flat index space was
grouped. Because both go through `decays` there is no second copy of the rule to drift (it used to be a
module-type test in training and a substring test in consolidation).

Groups are ordered [decay, no_decay] (no_decay omitted when empty), each in the model's parameter
order: torch's optimizer state_dict numbers parameters in exactly that order.
"""
from __future__ import annotations

from typing import Iterable

import torch

from megalm.config.train import TrainConfig
from megalm.model.params import parameter_kind
from megalm.model.pipeline import gpt_parameter_names


def decays(name: str, cfg: TrainConfig) -> bool:
    """Whether the GPTModel parameter `name` is weight-decayed under `cfg` (norm gains and the input
    embedding are excluded by default, as in Megatron and Llama)."""
    kind = parameter_kind(name)
    if kind == "norm":
        return not cfg.no_decay_norms
    if kind == "embedding":
        return not cfg.no_decay_embeddings
    return True


def group_names(names: Iterable[str], cfg: TrainConfig) -> list[list[str]]:
    """GPTModel names (in parameter order) -> [decay names, no-decay names] (the second only if non-empty)."""
    decay, no_decay = [], []
    for name in names:
        (decay if decays(name, cfg) else no_decay).append(name)
    return [decay, no_decay] if no_decay else [decay]


def named_trainable_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """GPTModel name -> parameter, for the parameters of `model` that train, in `model.parameters()` order."""
    names = gpt_parameter_names(model)
    return {names[id(p)]: p for p in model.parameters() if p.requires_grad}


def parameter_groups(model: torch.nn.Module, cfg: TrainConfig) -> list[dict]:
    """torch.optim parameter groups for `model` (any of the shapes training builds)."""
    params = named_trainable_parameters(model)
    groups = group_names(params, cfg)
    out = [{"params": [params[n] for n in groups[0]], "weight_decay": cfg.weight_decay}]
    if len(groups) > 1:
        out.append({"params": [params[n] for n in groups[1]], "weight_decay": 0.0})
    return out
