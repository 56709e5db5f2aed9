"""GPTModel (single process) against a naive per-head Llama implementation written from the
definitions; activation checkpointing with dropout; FLOP count."""
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from megalm.config import load_model_config
from megalm.model import GPTModel, flops_per_token, matmul_parameters, split_qkv
from megalm.parallel import get_rng_tracker, model_parallel_seed


def _rms(x, w, eps):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w


def _rotate(x, theta):  # x [b, s, heads, d]; pairs (i, i + d/2) rotate by pos * theta^(-2i/d)
    b, s, n, d = x.shape
    pos = torch.arange(s, dtype=torch.float64)[:, None]
    ang = pos * theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)  # [s, d/2]
    cos, sin = ang.cos()[None, :, None, :], ang.sin()[None, :, None, :]
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)


def _naive_llama(model, cfg, ids):
    P = {n: p.detach().double() for n, p in model.named_parameters()}
    nh, nkv, hd, eps = cfg.num_heads, cfg.kv_heads, cfg.head_dim, cfg.norm_eps
    x = P["embedding.weight"][ids]
    b, s = ids.shape
    causal = torch.ones(s, s).tril().bool()
    for i in range(cfg.num_layers):
        pre = f"layers.{i}."
        h = _rms(x, P[pre + "attention_norm.weight"], eps)
        wq, wk, wv = split_qkv(P[pre + "attention.qkv.weight"], cfg)
        q = _rotate((h @ wq.T).view(b, s, nh, hd), cfg.rope_theta)
        k = _rotate((h @ wk.T).view(b, s, nkv, hd), cfg.rope_theta)
        v = (h @ wv.T).view(b, s, nkv, hd)
        heads = []
        for j in range(nh):
            kv = j // (nh // nkv)  # Hugging Face repeat_kv grouping
            scores = q[:, :, j] @ k[:, :, kv].transpose(1, 2) / math.sqrt(hd)
            probs = scores.masked_fill(~causal, float("-inf")).softmax(-1)
            heads.append(probs @ v[:, :, kv])
        x = x + torch.cat(heads, -1) @ P[pre + "attention.o_proj.weight"].T
        h = _rms(x, P[pre + "mlp_norm.weight"], eps)
        x = x + (F.silu(h @ P[pre + "mlp.gate_proj.weight"].T) * (h @ P[pre + "mlp.up_proj.weight"].T)) \
            @ P[pre + "mlp.down_proj.weight"].T
    x = _rms(x, P["final_norm.weight"], eps)
    head = P["embedding.weight"] if cfg.tie_embeddings else P["output.weight"]
    return x @ head.T


@pytest.mark.parametrize("tied", [False, True])
def test_model_matches_naive_llama(tied):
    cfg = dataclasses.replace(load_model_config("tiny"), tie_embeddings=tied)
    model = GPTModel(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 20), generator=torch.Generator().manual_seed(1))
    logits = model(ids)
    expected = _naive_llama(model, cfg, ids)
    assert (logits.double() - expected).abs().max() <= 1e-5 * expected.abs().max()
    if tied:
        assert "output.weight" not in dict(model.named_parameters())


def test_init_statistics_and_norm_ones():
    cfg = load_model_config("tiny")
    params = dict(GPTModel(cfg).named_parameters())
    assert torch.equal(params["final_norm.weight"], torch.ones(cfg.hidden_size))
    assert abs(params["layers.0.mlp.gate_proj.weight"].std().item() - cfg.init_std) < 0.1 * cfg.init_std
    scaled = cfg.init_std / math.sqrt(2 * cfg.num_layers)  # residual-output projections
    assert abs(params["layers.0.mlp.down_proj.weight"].std().item() - scaled) < 0.1 * scaled
    # different seed -> different weights; same seed -> identical
    other = GPTModel(dataclasses.replace(cfg, init_seed=cfg.init_seed + 1))
    assert not torch.equal(other.embedding.weight, params["embedding.weight"])
    assert torch.equal(GPTModel(cfg).embedding.weight, params["embedding.weight"])


def _grads_with_dropout(model, ids, labels, checkpointing, cpu_state, tracker_state):
    torch.set_rng_state(cpu_state)
    get_rng_tracker().set_states(tracker_state)
    model.zero_grad()
    model.activation_checkpointing = checkpointing
    loss = model.loss(model(ids), labels)
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_activation_checkpointing_reproduces_dropout_masks():
    cfg = dataclasses.replace(load_model_config("tiny"), attention_dropout=0.2, hidden_dropout=0.1)
    model = GPTModel(cfg).train()
    ids = torch.randint(0, cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(2))
    model_parallel_seed(5, tp_rank=0)
    state = torch.get_rng_state(), get_rng_tracker().get_states()
    loss_a, grads_a = _grads_with_dropout(model, ids, ids, False, *state)
    loss_b, grads_b = _grads_with_dropout(model, ids, ids, True, *state)
    assert loss_a == loss_b
    for name in grads_a:
        assert torch.allclose(grads_a[name], grads_b[name], rtol=1e-6, atol=1e-9), name
    with torch.no_grad():
        assert model.eval().loss(model(ids), ids).item() != loss_a  # dropout really was active


def test_attention_dropout_needs_seeded_tracker():
    cfg = dataclasses.replace(load_model_config("tiny"), attention_dropout=0.1)
    model = GPTModel(cfg).train()
    get_rng_tracker().reset()
    with pytest.raises(RuntimeError, match="model_parallel_seed"):
        model(torch.zeros(1, 4, dtype=torch.long))


def test_flops_per_token_formula():
    cfg = load_model_config("7b")
    n = matmul_parameters(cfg)
    # Llama-2-7B: all parameters minus the embedding table and the norms
    assert n == cfg.num_parameters() - cfg.vocab_size * cfg.hidden_size - (2 * cfg.num_layers + 1) * cfg.hidden_size
    assert flops_per_token(cfg, 4096) == 6 * n + 12 * 32 * 4096 * 4096
    tied = dataclasses.replace(cfg, tie_embeddings=True)
    assert flops_per_token(tied, 4096) == flops_per_token(cfg, 4096)  # the head matmul runs either way
    gqa = load_model_config("70b")
    assert matmul_parameters(gqa) < gqa.num_parameters()
    assert flops_per_token(gqa, 4096) == 6 * matmul_parameters(gqa) + 12 * 80 * 8192 * 4096
    assert 4.4e11 < flops_per_token(gqa, 4096) < 4.5e11  # ~6 x 69B + attention
