"""One weight-decay rule: groups computed from live modules (training) equal the groups computed from
parameter names (checkpoint consolidation / resharding), for tied and untied embeddings, at pp=1 and
for every stage of pp>1 pipelines. No process group needed: stages are built the way DeepSpeed's
PipelineModule._build builds and names them ("<global index>.<local name>", tied layers once per
stage under "tied_modules.<key>")."""
from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch
from torch import nn

from megalm.config import load_model_config
from megalm.config.train import TrainConfig
from megalm.model import GPTModel, gpt_parameter_names, pipeline_layer_specs, pipeline_to_gpt_name
from megalm.training.param_groups import group_names, parameter_groups


def _stage(specs: list, start: int, stop: int) -> nn.Module:
    """Layers [start, stop) of `specs` registered exactly as PipelineModule does on one stage."""
    from deepspeed.pipe import TiedLayerSpec

    stage = nn.Module()
    stage.tied_modules = nn.ModuleDict()  # created before the layers, as in PipelineModule.__init__
    for idx in range(start, stop):
        spec = specs[idx]
        if isinstance(spec, TiedLayerSpec):
            if spec.key not in stage.tied_modules:
                stage.tied_modules[spec.key] = spec.build()
        else:
            stage.add_module(str(idx), spec.build())
    return stage


def _live_groups(model: nn.Module, train: TrainConfig, saved_name) -> list[list[str]]:
    """Training's groups for `model`, as the names `saved_name(live name)` a checkpoint would hold."""
    live = {id(p): saved_name(n) for n, p in model.named_parameters()}
    return [[live[id(p)] for p in g["params"]] for g in parameter_groups(model, train)]


def _train_configs() -> list[TrainConfig]:
    return [TrainConfig(no_decay_norms=a, no_decay_embeddings=b) for a, b in itertools.product((True, False), repeat=2)]


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_gpt_model_groups_equal_groups_from_state_dict_names(tied):
    cfg = dataclasses.replace(load_model_config("tiny"), tie_embeddings=tied)
    model = GPTModel(cfg)
    names = list(model.state_dict())  # what consolidation reads from mp_rank_XX_model_states.pt
    for train in _train_configs():
        assert _live_groups(model, train, lambda n: n) == group_names(names, train)
    no_decay = set(group_names(names, TrainConfig())[1])
    assert "embedding.weight" in no_decay and "final_norm.weight" in no_decay
    assert "output.weight" not in no_decay and "layers.0.attention.qkv.weight" not in no_decay


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("cuts", [(3,), (1, 3, 5)], ids=["pp2", "pp4"])
def test_pipeline_stage_groups_equal_groups_from_checkpoint_names(tied, cuts):
    cfg = dataclasses.replace(load_model_config("tiny"), tie_embeddings=tied)
    specs = pipeline_layer_specs(cfg)
    bounds = [0, *cuts, len(specs)]
    stages = [_stage(specs, a, b) for a, b in zip(bounds, bounds[1:])]
    full = GPTModel(cfg)
    for train in _train_configs():
        union: dict[str, bool] = {}
        for stage in stages:
            saved = lambda n: pipeline_to_gpt_name(n, cfg)  # noqa: E731 - param_shapes names -> GPTModel
            live = _live_groups(stage, train, saved)
            from_names = group_names([saved(n) for n, _ in stage.named_parameters()], train)
            assert live == from_names
            for i, group in enumerate(live):
                for name in group:
                    decays = i == 0
                    assert union.setdefault(name, decays) == decays, name  # a tied copy groups the same
        # the stages together group every parameter exactly as the whole model does
        whole = group_names(list(full.state_dict()), train)
        assert union == {n: i == 0 for i, g in enumerate(whole) for n in g}


def test_live_names_are_gpt_model_names_on_any_stage():
    cfg = load_model_config("tiny")
    model = GPTModel(cfg)
    assert list(gpt_parameter_names(model).values()) == [n for n, _ in model.named_parameters()]
    specs = pipeline_layer_specs(cfg)
    stage = _stage(specs, 3, len(specs))  # blocks 2, 3, the final norm and the head
    names = gpt_parameter_names(stage)
    assert [names[id(p)] for _, p in stage.named_parameters()] == [
        pipeline_to_gpt_name(n, cfg) for n, _ in stage.named_parameters()]


def test_a_parameter_outside_the_model_layers_is_refused():
    model = GPTModel(load_model_config("tiny"))
    model.extra = nn.Linear(2, 2, bias=False)
    with pytest.raises(ValueError, match=r"\['extra.weight'\].*no GPTModel name"):
        parameter_groups(model, TrainConfig())
    with pytest.raises(KeyError, match="unknown GPTModel parameter 'extra.weight'"):
        group_names(["extra.weight"], TrainConfig())


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_zero0_optimizer_state_maps_back_to_the_right_parameters(tied):
    """What consolidation does with a ZeRO-0 checkpoint: the torch optimizer's index-keyed state, split
    by `group_names` of the saved module's names, lands on the parameter each moment belongs to."""
    from megalm.export.zero_merge import unflatten_torch_optimizer

    cfg = dataclasses.replace(load_model_config("tiny"), tie_embeddings=tied)
    model, train = GPTModel(cfg), TrainConfig()
    opt = torch.optim.AdamW(parameter_groups(model, train), lr=1e-3)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    merged, step = unflatten_torch_optimizer(opt.state_dict(), group_names(model.state_dict(), train), "test")
    assert step == 1.0 and set(merged) == set(model.state_dict())
    for name, p in model.named_parameters():
        assert torch.equal(merged[name]["exp_avg"], opt.state[p]["exp_avg"]), name
