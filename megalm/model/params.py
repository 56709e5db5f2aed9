"""GPTModel's parameter names, their tensor-parallel partition dims and Hugging Face Llama names.

    GPTModel name                         full shape                      TP dim  HF LlamaForCausalLM name
    embedding.weight                      [vocab_padded, h]               0       model.embed_tokens.weight (first vocab_size rows)
    layers.{i}.attention_norm.weight      [h]                             None    model.layers.{i}.input_layernorm.weight
    layers.{i}.attention.qkv.weight       [(nh + 2*nkv) * hd, h]          0       model.layers.{i}.self_attn.{q,k,v}_proj.weight (split_qkv)
    layers.{i}.attention.o_proj.weight    [h, nh * hd]                    1       model.layers.{i}.self_attn.o_proj.weight
    layers.{i}.mlp_norm.weight            [h]                             None    model.layers.{i}.post_attention_layernorm.weight
    layers.{i}.mlp.gate_proj.weight       [ffn, h]                        0       model.layers.{i}.mlp.gate_proj.weight
    layers.{i}.mlp.up_proj.weight         [ffn, h]                        0       model.layers.{i}.mlp.up_proj.weight
    layers.{i}.mlp.down_proj.weight       [h, ffn]                        1       model.layers.{i}.mlp.down_proj.weight
    final_norm.weight                     [h]                             None    model.norm.weight
    output.weight (absent when tied)      [vocab_padded, h]               0       lm_head.weight (first vocab_size rows;
                                                                                  tied: embedding.weight)

TP shards are contiguous equal slices along the TP dim, rank order = TP rank; concatenating them
gives the full tensor. vocab_padded = cfg.padded_vocab_size(tp) depends on tp: strip the padding rows
(zero, never used) before re-sharding to another tp. The qkv row layout is described in
`megalm.model.transformer`; `split_qkv`/`merge_qkv` convert it to and from HF's separate projections.
Every parameter also carries `partition_dim` (None for replicated ones) as an attribute.
"""
from __future__ import annotations

import re
from typing import Literal, Optional

import torch

from megalm.config.model import ModelConfig

_PARTITION_DIMS: list[tuple[str, Optional[int]]] = [
    (r"embedding\.weight", 0),
    (r"output\.weight", 0),
    (r"final_norm\.weight", None),
    (r"layers\.\d+\.(attention_norm|mlp_norm)\.weight", None),
    (r"layers\.\d+\.attention\.qkv\.weight", 0),
    (r"layers\.\d+\.attention\.o_proj\.weight", 1),
    (r"layers\.\d+\.mlp\.(gate_proj|up_proj)\.weight", 0),
    (r"layers\.\d+\.mlp\.down_proj\.weight", 1),
]

_HF_NAMES: list[tuple[str, str]] = [
    (r"embedding\.weight", "model.embed_tokens.weight"),
    (r"output\.weight", "lm_head.weight"),
    (r"final_norm\.weight", "model.norm.weight"),
    (r"layers\.(\d+)\.attention_norm\.weight", r"model.layers.\1.input_layernorm.weight"),
    (r"layers\.(\d+)\.mlp_norm\.weight", r"model.layers.\1.post_attention_layernorm.weight"),
    (r"layers\.(\d+)\.attention\.o_proj\.weight", r"model.layers.\1.self_attn.o_proj.weight"),
    (r"layers\.(\d+)\.mlp\.(gate_proj|up_proj|down_proj)\.weight", r"model.layers.\1.mlp.\2.weight"),
]


# What each parameter is, for rules that depend on it rather than on its shape (weight decay): by
# GPTModel name, so a tool that only has names (a checkpoint's files) classifies exactly like training,
# which maps its live modules to these names first (`megalm.model.pipeline.gpt_parameter_names`).
ParameterKind = Literal["embedding", "norm", "matrix"]
_KINDS: list[tuple[str, ParameterKind]] = [
    (r"embedding\.weight", "embedding"),  # the input embedding; with tie_embeddings also the head
    (r"final_norm\.weight", "norm"),
    (r"layers\.\d+\.(attention_norm|mlp_norm)\.weight", "norm"),
    (r"output\.weight", "matrix"),  # the untied head is a projection like any other
    (r"layers\.\d+\.attention\.(qkv|o_proj)\.weight", "matrix"),
    (r"layers\.\d+\.mlp\.(gate_proj|up_proj|down_proj)\.weight", "matrix"),
]


def parameter_kind(name: str) -> ParameterKind:
    """The kind of a GPTModel parameter: "embedding", "norm" (an RMSNorm gain) or "matrix" (any other weight)."""
    for pattern, kind in _KINDS:
        if re.fullmatch(pattern, name):
            return kind
    raise KeyError(f"unknown GPTModel parameter {name!r}: add it to megalm.model.params (_PARTITION_DIMS, "
                   f"_KINDS, _HF_NAMES) together with the module that defines it")


def tp_partition_dim(name: str) -> Optional[int]:
    """The dim along which `name`'s tensor is split over TP ranks; None if replicated."""
    for pattern, dim in _PARTITION_DIMS:
        if re.fullmatch(pattern, name):
            return dim
    raise KeyError(f"unknown GPTModel parameter {name!r}")


def hf_llama_name(name: str) -> str:
    """The LlamaForCausalLM name of a GPTModel parameter (qkv maps to three: use split_qkv)."""
    if re.fullmatch(r"layers\.\d+\.attention\.qkv\.weight", name):
        raise ValueError(f"{name} is fused; split it with split_qkv into q_proj/k_proj/v_proj")
    for pattern, hf in _HF_NAMES:
        if re.fullmatch(pattern, name):
            return re.sub(pattern, hf, name)
    raise KeyError(f"unknown GPTModel parameter {name!r}")


def split_qkv(qkv: torch.Tensor, cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Full fused qkv [(nh + 2*nkv) * hd, h] -> (q [nh*hd, h], k [nkv*hd, h], v [nkv*hd, h]) in HF order."""
    group, hd = cfg.num_heads // cfg.kv_heads, cfg.head_dim
    grouped = qkv.view(cfg.kv_heads, group + 2, hd, -1)
    q = grouped[:, :group].reshape(cfg.num_heads * hd, -1)
    k = grouped[:, group].reshape(cfg.kv_heads * hd, -1)
    v = grouped[:, group + 1].reshape(cfg.kv_heads * hd, -1)
    return q, k, v


def merge_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """Inverse of split_qkv: HF projections -> the fused, kv-grouped layout."""
    group, hd = cfg.num_heads // cfg.kv_heads, cfg.head_dim
    h = q.shape[-1]
    grouped = torch.cat([q.view(cfg.kv_heads, group, hd, h), k.view(cfg.kv_heads, 1, hd, h),
                         v.view(cfg.kv_heads, 1, hd, h)], dim=1)
    return grouped.reshape(-1, h)
