"""Parameter groups and the LR schedule: the same decisions whatever shape the model is built in."""
import math

import torch

from megalm.config import load_model_config
from megalm.config.train import TrainConfig
from megalm.model import GPTModel
from megalm.model.pipeline import pipeline_layer_specs
from megalm.training.optimizer import parameter_groups
from megalm.training.schedule import lr_at


def _group_sizes(model: torch.nn.Module, cfg: TrainConfig) -> tuple[int, int]:
    groups = parameter_groups(model, cfg)
    decay = sum(p.numel() for p in groups[0]["params"])
    no_decay = sum(p.numel() for g in groups[1:] for p in g["params"])
    return decay, no_decay


def test_groups_match_between_gpt_model_and_pipeline_layers():
    for tied in (False, True):
        cfg = load_model_config("tiny")
        cfg.tie_embeddings = tied
        train = TrainConfig()
        whole = GPTModel(cfg)
        built: dict = {}  # a tied spec appears twice but, as in PipelineModule, is built once
        for i, spec in enumerate(pipeline_layer_specs(cfg)):
            key = getattr(spec, "key", i)
            if key not in built:
                built[key] = spec.build()
        layers = torch.nn.ModuleList(built.values())
        assert _group_sizes(whole, train) == _group_sizes(layers, train)
        decay, no_decay = _group_sizes(whole, train)
        emb = cfg.padded_vocab_size() * cfg.hidden_size
        norms = (2 * cfg.num_layers + 1) * cfg.hidden_size
        assert no_decay == emb + norms  # input embedding + every RMSNorm gain, nothing else
        train.no_decay_embeddings = False
        assert _group_sizes(whole, train)[1] == norms


def test_lr_schedule_warmup_then_decay_to_floor():
    cfg = TrainConfig(lr=1.0, min_lr=0.1, warmup_steps=10, train_steps=110, lr_decay="cosine")
    assert lr_at(0, cfg) == 0.1 and lr_at(9, cfg) == 1.0
    assert math.isclose(lr_at(60, cfg), 0.55, rel_tol=1e-9)  # half way: the cosine mid-point
    assert lr_at(110, cfg) == 0.1 and lr_at(500, cfg) == 0.1
    cfg.lr_decay = "linear"
    assert math.isclose(lr_at(35, cfg), 1.0 - 0.9 * 0.25, rel_tol=1e-9)


def test_adamw_is_fused_and_keeps_torch_adamw_state_and_numbers():
    """Our AdamW runs torch's fused kernel (DESIGN decision 54): same state tensors, the same update to
    fp32 rounding, and a state dict written unfused loads and goes on unfused (its saved group's flag)."""
    from megalm.training.optimizer import adamw_options

    train = TrainConfig(weight_decay=0.1)
    opts = adamw_options(train)
    assert opts["fused"] is True
    torch.manual_seed(0)
    fused_p = torch.nn.Parameter(torch.randn(1000))
    plain_p = torch.nn.Parameter(fused_p.detach().clone())
    fused = torch.optim.AdamW([fused_p], **opts)
    plain = torch.optim.AdamW([plain_p], **{**opts, "fused": False})
    for _ in range(3):
        grad = torch.randn(1000)
        fused_p.grad, plain_p.grad = grad.clone(), grad.clone()
        fused.step()
        plain.step()
    assert torch.allclose(fused_p, plain_p, rtol=1e-6, atol=1e-7), (fused_p - plain_p).abs().max()
    assert set(fused.state[fused_p]) == set(plain.state[plain_p]) == {"step", "exp_avg", "exp_avg_sq"}
    resumed = torch.optim.AdamW([torch.nn.Parameter(plain_p.detach().clone())], **opts)
    resumed.load_state_dict(plain.state_dict())
    assert resumed.param_groups[0]["fused"] is False
