"""The pipeline seam: LayerSpecs built in order reproduce GPTModel exactly (weights, logits, loss,
gradients), a stage building a subset of layers gets the full model's weights, and pipeline parameter
names map back to GPTModel names. Also under TP=2 x PP=2 on 4 ranks. No pipeline engine involved."""
import dataclasses

import pytest
import torch

from megalm.config import load_model_config
from megalm.model import GPTModel, gpt_param_name, pipeline_layer_specs, pipeline_loss_fn


def _build_like_pipeline_module(specs):
    """What PipelineModule does with specs on one stage: build each, reusing tied modules by key, and
    call tied layers through their forward_fn."""
    from deepspeed.pipe import TiedLayerSpec

    tied, layers = {}, []
    for spec in specs:
        if isinstance(spec, TiedLayerSpec):
            module = tied.setdefault(spec.key, spec.build())
            fn = module if spec.forward_fn is None else (lambda x, m=module, f=spec.forward_fn: f(m, x))
        else:
            module = spec.build()
            fn = module
        layers.append((module, fn))
    return layers


def _run(layers, ids):
    x = ids
    for _, fn in layers:
        x = fn(x)
    return x


def _compare_specs_with_model(cfg, grid=None):
    gen = torch.Generator().manual_seed(9)
    ids = torch.randint(0, cfg.vocab_size, (2, 10), generator=gen)
    labels = torch.randint(0, cfg.vocab_size, (2, 10), generator=gen)
    labels[:, :2] = -100

    model = GPTModel(cfg, grid)
    specs = pipeline_layer_specs(cfg, grid)
    assert len(specs) == cfg.num_layers + 3
    layers = _build_like_pipeline_module(specs)

    model_params = dict(model.named_parameters())
    seen = set()
    for idx, (module, _) in enumerate(layers):
        for local, p in module.named_parameters():
            name = gpt_param_name(idx, local, cfg)
            assert torch.equal(p, model_params[name]), name
            seen.add(name)
    assert seen == set(model_params)

    logits = model(ids)
    pipe_logits = _run(layers, ids)
    assert torch.equal(pipe_logits, logits)
    loss, pipe_loss = model.loss(logits, labels), pipeline_loss_fn(pipe_logits, labels)
    assert torch.equal(loss, pipe_loss)
    loss.backward()
    pipe_loss.backward()
    grads = {gpt_param_name(i, local, cfg): p.grad for i, (m, _) in enumerate(layers) for local, p in m.named_parameters()}
    for name, p in model_params.items():
        assert torch.allclose(grads[name], p.grad, rtol=0, atol=1e-7), name
    return True


@pytest.mark.parametrize("tied", [False, True])
def test_specs_built_in_order_equal_gpt_model(tied):
    cfg = dataclasses.replace(load_model_config("tiny"), tie_embeddings=tied, vocab_size=300)
    assert _compare_specs_with_model(cfg)


def test_stage_with_subset_of_layers_has_full_model_weights():
    cfg = load_model_config("tiny")
    full = dict(GPTModel(cfg).named_parameters())
    specs = pipeline_layer_specs(cfg)
    for idx in (3, 4, cfg.num_layers + 2):  # blocks 2 and 3 and the head, as a last stage of pp=2 builds them
        for local, p in specs[idx].build().named_parameters():
            assert torch.equal(p, full[gpt_param_name(idx, local, cfg)])


def test_tied_specs_share_key_and_weight_attr():
    from deepspeed.pipe import TiedLayerSpec

    cfg = dataclasses.replace(load_model_config("tiny"), tie_embeddings=True)
    specs = pipeline_layer_specs(cfg)
    first, last = specs[0], specs[-1]
    assert isinstance(first, TiedLayerSpec) and isinstance(last, TiedLayerSpec)
    assert first.key == last.key == "embed" and first.tied_weight_attr == last.tied_weight_attr == ["weight"]
    assert first.forward_fn is None and last.forward_fn is not None
    # on different stages the two copies are built separately: they must start identical
    assert torch.equal(first.build().weight, last.build().weight)
    assert gpt_param_name("tied_modules.embed", "weight", cfg) == "embedding.weight"


def test_gpt_param_name_bounds():
    cfg = load_model_config("tiny")
    assert gpt_param_name(1, "mlp.up_proj.weight", cfg) == "layers.0.mlp.up_proj.weight"
    assert gpt_param_name(cfg.num_layers + 1, "weight", cfg) == "final_norm.weight"
    with pytest.raises(IndexError, match="has 7 layers"):
        gpt_param_name(cfg.num_layers + 3, "weight", cfg)


def test_specs_reject_more_stages_than_layers():
    from megalm.config import ConfigError
    from megalm.parallel.grid import ProcessGrid

    cfg = load_model_config("tiny")
    fake = ProcessGrid(tp=1, dp=1, pp=8, rank=0, tp_rank=0, dp_rank=0, pp_rank=0, tp_ranks=[0], dp_ranks=[0],
                       pp_ranks=list(range(8)), model_ranks=list(range(8)),
                       tp_group=None, dp_group=None, pp_group=None, model_group=None)
    with pytest.raises(ConfigError, match="model.num_layers: 4 layers cannot fill pipeline_parallel=8"):
        pipeline_layer_specs(cfg, fake)


def _specs_under_tp_pp(tied):
    from megalm.parallel import destroy_process_grid, initialize_process_grid

    initialize_process_grid(2, 2)
    try:
        cfg = dataclasses.replace(load_model_config("tiny"), tie_embeddings=tied)
        return _compare_specs_with_model(cfg)  # grid=None: both pick up the current grid
    finally:
        destroy_process_grid()


@pytest.mark.parametrize("tied", [False, True])
def test_specs_equal_gpt_model_under_tp2_pp2(rank_pool, tied):
    assert rank_pool(4).run(_specs_under_tp_pp, tied) == [True] * 4
