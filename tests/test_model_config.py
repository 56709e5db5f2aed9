"""ModelConfig: shipped shapes, loader, every invalid shape/layout message; parameter naming tables."""
import dataclasses

import pytest

from megalm.config import ConfigError, ModelConfig, from_dict, load_model_config
from megalm.model import GPTModel, hf_llama_name, merge_qkv, split_qkv, tp_partition_dim

SHAPES = {  # name: (hidden, layers, heads, kv heads, ffn, parameters)
    "125m": (768, 12, 12, 12, 2048, None),
    "350m": (1024, 24, 16, 16, 2816, None),
    "1.3b": (2048, 24, 16, 16, 5632, None),
    "7b": (4096, 32, 32, 32, 11008, 6_738_415_616),
    "13b": (5120, 40, 40, 40, 13824, 13_015_864_320),
    "70b": (8192, 80, 64, 8, 28672, 68_976_648_192),
}


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_shipped_shapes(name):
    cfg = load_model_config(name)
    h, layers, heads, kv, ffn, params = SHAPES[name]
    assert (cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.kv_heads, cfg.ffn_size, cfg.vocab_size) == \
        (h, layers, heads, kv, ffn, 32000)
    if params is not None:
        assert cfg.num_parameters() == params  # the published Llama-2 counts
    cfg.check_layout(4, 4)
    if heads % 8 == 0 and kv % 8 == 0:
        cfg.check_layout(8, 8)


def test_tiny_supports_test_layouts(repo_root):
    cfg = load_model_config("tiny")
    assert load_model_config(f"{repo_root}/megalm/config/models/tiny.yaml") == cfg
    assert cfg.num_heads != cfg.kv_heads  # GQA is exercised
    for tp in (1, 2, 4):
        for pp in (1, 2, 4):
            cfg.check_layout(tp, pp)


def test_llama_ffn_rule_and_padding():
    cfg = ModelConfig(vocab_size=32000, hidden_size=4096, num_layers=1, num_heads=32)
    assert cfg.ffn_size == 11008 and cfg.kv_heads == 32 and cfg.head_dim == 128
    assert [cfg.padded_vocab_size(tp) for tp in (1, 2, 4, 8)] == [32000, 32000, 32256, 32768]
    assert ModelConfig(vocab_size=50257, hidden_size=64, num_layers=1, num_heads=4).padded_vocab_size(1) == 50304


def test_unknown_model_name_lists_known():
    with pytest.raises(ConfigError, match=r"model: unknown model 'huge'; known: .*7b.*tiny"):
        load_model_config("huge")


BASE = dict(vocab_size=512, hidden_size=64, num_layers=4, num_heads=8, num_kv_heads=4, ffn_hidden_size=128)


@pytest.mark.parametrize("change,message", [
    (dict(hidden_size=60), r"model\.hidden_size: 60 is not divisible by num_heads=8"),
    (dict(num_kv_heads=3), r"model\.num_kv_heads: 3 must divide num_heads=8 .* 1, 2, 4, 8"),
    (dict(num_kv_heads=0), r"model\.num_kv_heads: must be > 0"),
    (dict(num_heads=0), r"model\.num_heads: must be > 0"),
    (dict(vocab_size=0), r"model\.vocab_size: must be > 0"),
    (dict(num_layers=-1), r"model\.num_layers: must be > 0"),
    (dict(hidden_size=24, num_heads=8, num_kv_heads=8), r"model\.num_heads: head_dim .* = 3 must be even"),
    (dict(ffn_hidden_size=0), r"model\.ffn_hidden_size: must be > 0"),
    (dict(hidden_dropout=1.0), r"model\.hidden_dropout: must be in \[0, 1\)"),
    (dict(norm_eps=0.0), r"model\.norm_eps: must be > 0"),
    (dict(init_std=-1.0), r"model\.init_std: must be > 0"),
    (dict(num_head=8), r"model\.num_head: unknown field; did you mean 'num_heads'"),
])
def test_invalid_shapes_name_fields(change, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(ModelConfig, {**BASE, **change}, "model")


@pytest.mark.parametrize("shape,tp,pp,message", [
    (dict(num_heads=12, num_kv_heads=12, hidden_size=96), 8, 1,
     r"model\.num_heads: 12 query heads cannot be split over tensor_parallel=8 ranks; .*1, 2, 3, 4, 6, 12"),
    (dict(num_kv_heads=2), 4, 1, r"model\.num_kv_heads: 2 kv heads cannot be split over tensor_parallel=4"),
    (dict(ffn_hidden_size=130), 4, 1, r"model\.ffn_hidden_size: 130 is not divisible by tensor_parallel=4"),
    (dict(), 1, 8, r"model\.num_layers: 4 layers cannot fill pipeline_parallel=8 stages"),
    (dict(), 0, 1, r"tensor_parallel=0 and pipeline_parallel=1 must both be >= 1"),
])
def test_invalid_layouts_name_fields_and_numbers(shape, tp, pp, message):
    cfg = from_dict(ModelConfig, {**BASE, **shape}, "model")
    with pytest.raises(ConfigError, match=message):
        cfg.check_layout(tp, pp)


def test_parameter_tables_cover_the_model():
    cfg = dataclasses.replace(load_model_config("tiny"), num_layers=2)
    model = GPTModel(cfg)
    hf = set()
    for name, p in model.named_parameters():
        assert tp_partition_dim(name) == p.partition_dim
        if name.endswith("attention.qkv.weight"):
            with pytest.raises(ValueError, match="split_qkv"):
                hf_llama_name(name)
            i = name.split(".")[1]
            hf |= {f"model.layers.{i}.self_attn.{x}_proj.weight" for x in "qkv"}
        else:
            hf.add(hf_llama_name(name))
    expected = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    for i in range(2):
        expected |= {f"model.layers.{i}.{n}.weight" for n in
                     ["input_layernorm", "post_attention_layernorm", "self_attn.q_proj", "self_attn.k_proj",
                      "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]}
    assert hf == expected
    with pytest.raises(KeyError):
        tp_partition_dim("layers.0.attention.bias")


def test_qkv_layout_split_merge_and_tp_shards_hold_whole_groups():
    import torch

    cfg = load_model_config("tiny")  # 8 q heads, 4 kv heads, head_dim 8
    hd, group = cfg.head_dim, cfg.num_heads // cfg.kv_heads
    # label each row of the fused weight by what it is: q head j -> 100+j, k head g -> 200+g, v -> 300+g
    q = torch.cat([torch.full((hd, 1), 100.0 + j) for j in range(cfg.num_heads)])
    k = torch.cat([torch.full((hd, 1), 200.0 + g) for g in range(cfg.kv_heads)])
    v = torch.cat([torch.full((hd, 1), 300.0 + g) for g in range(cfg.kv_heads)])
    fused = merge_qkv(q, k, v, cfg)
    assert all(torch.equal(a, b) for a, b in zip(split_qkv(fused, cfg), (q, k, v)))
    for tp in (1, 2, 4):
        for shard in fused.chunk(tp, 0):
            labels = sorted(set(shard.flatten().tolist()))
            kv = [int(x) - 200 for x in labels if 200 <= x < 300]
            qs = [int(x) - 100 for x in labels if x < 200]
            assert [int(x) - 300 for x in labels if x >= 300] == kv
            assert qs == [j for g in kv for j in range(g * group, (g + 1) * group)]  # whole groups per rank
