"""One Llama-style decoder block and its parts: RMSNorm, rotary embeddings, grouped-query attention,
SwiGLU MLP. Tensor-parallel over `tp_group` (None: not split); no biases anywhere.

Fused QKV layout (the full weight, before TP slicing), grouped by kv head as in Megatron-core:

    qkv.weight: [(num_heads + 2 * num_kv_heads) * head_dim, hidden]
    rows = for g in range(num_kv_heads): [ q heads g*r .. g*r+r-1 | k head g | v head g ],  r = num_heads/num_kv_heads
           each head = head_dim consecutive rows

Slicing dim 0 into tp equal parts therefore hands each rank whole kv groups (its q heads together
with the k/v heads they attend with), which is why num_kv_heads % tp == 0 is required. Query head
j uses kv head j // r, matching Hugging Face's `repeat_kv`; `megalm.model.params.split_qkv` turns
the full weight into HF's q_proj/k_proj/v_proj.

Rotary uses the rotate-half convention (HF LlamaForCausalLM's), so HF weights need no permutation.

Generation passes a `megalm.model.kv_cache.KVCache`: attention then rotates the new tokens at the
positions the cache gives, stores their k/v and attends over every cached slot the cache's mask allows.
Without one (training, evaluation) the forward is the plain causal one.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed import ProcessGroup

from megalm.config.model import ModelConfig
from megalm.parallel.comm import group_size
from megalm.parallel.init import new_parameter
from megalm.parallel.layers import ColumnParallelLinear, RowParallelLinear
from megalm.parallel.random import get_rng_tracker

if TYPE_CHECKING:
    from .kv_cache import KVCache


def tp_unit(size: int, cfg: ModelConfig) -> int:
    """What every legal TP shard of a `size` dim (qkv rows, o_proj columns, ffn) is a multiple of:
    check_layout lets tp be any divisor of gcd(num_heads, kv heads, ffn), and each of those dims is a
    multiple of that gcd. Init tiles that divide it are never split between TP ranks."""
    return size // math.gcd(cfg.num_heads, cfg.kv_heads, cfg.ffn_size)


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in fp32 (a bf16 mean of squares loses too much precision)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = new_parameter(torch.ones(dim, dtype=torch.float32, device="cpu"), partition_dim=None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


def rotary_cos_sin(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [*positions.shape, head_dim] at integer `positions` (fp32; computed per call, so nothing is
    allocated at construction time where deepspeed.zero.Init would cast it to bf16)."""
    device = positions.device
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    freqs = positions.to(torch.float32)[..., None] * inv_freq
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate [b, heads, s, head_dim] by position (rotate-half convention)."""
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (xf * cos + rotated * sin).to(x.dtype)


class Attention(nn.Module):
    """Causal grouped-query self-attention; this rank computes num_heads/tp query heads and
    num_kv_heads/tp kv heads."""

    def __init__(self, cfg: ModelConfig, layer_idx: int, tp_group: Optional[ProcessGroup] = None):
        super().__init__()
        tp = group_size(tp_group)
        prefix = f"layers.{layer_idx}.attention"
        self.layer_idx = layer_idx
        self.head_dim = cfg.head_dim
        self.group = cfg.num_heads // cfg.kv_heads  # query heads per kv head
        self.local_kv_heads = cfg.kv_heads // tp
        self.rope_theta = cfg.rope_theta
        self.dropout = cfg.attention_dropout
        qkv_rows = (cfg.num_heads + 2 * cfg.kv_heads) * cfg.head_dim
        self.qkv = ColumnParallelLinear(cfg.hidden_size, qkv_rows, init_std=cfg.init_std,
                                        init_key=f"{prefix}.qkv.weight", seed=cfg.init_seed, tp_group=tp_group,
                                        tp_unit=tp_unit(qkv_rows, cfg))
        # Output projections feed the residual stream: std / sqrt(2 * layers) (GPT-2/Megatron) keeps
        # its variance from growing with depth.
        self.o_proj = RowParallelLinear(cfg.num_heads * cfg.head_dim, cfg.hidden_size,
                                        init_std=cfg.init_std / math.sqrt(2 * cfg.num_layers),
                                        init_key=f"{prefix}.o_proj.weight", seed=cfg.init_seed, tp_group=tp_group,
                                        tp_unit=tp_unit(cfg.num_heads * cfg.head_dim, cfg))

    def forward(self, x: torch.Tensor, cache: Optional[KVCache] = None) -> torch.Tensor:
        b, s, _ = x.shape
        qkv = self.qkv(x).view(b, s, self.local_kv_heads, self.group + 2, self.head_dim)
        q = qkv[:, :, :, : self.group].reshape(b, s, self.local_kv_heads * self.group, self.head_dim)
        k, v = qkv[:, :, :, self.group], qkv[:, :, :, self.group + 1]
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [b, heads, s, head_dim]
        if cache is not None:  # generation: this row's positions, then attend over the cached context
            cos, sin = cache.rotary(self.head_dim, self.rope_theta)
            k, v = cache.update(self.layer_idx, apply_rotary(k, cos, sin), v)
            out = F.scaled_dot_product_attention(apply_rotary(q, cos, sin), k, v, attn_mask=cache.mask, enable_gqa=True)
            return self.o_proj(out.transpose(1, 2).reshape(b, s, -1))
        cos, sin = rotary_cos_sin(torch.arange(s, device=x.device), self.head_dim, self.rope_theta)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        dropout = self.dropout if self.training else 0.0
        if dropout > 0.0:
            # attention probabilities are sharded by head: each TP rank needs its own mask stream
            with get_rng_tracker().fork():
                out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True, enable_gqa=True)
        else:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return self.o_proj(out.transpose(1, 2).reshape(b, s, -1))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)); gate/up column-parallel, down row-parallel."""

    def __init__(self, cfg: ModelConfig, layer_idx: int, tp_group: Optional[ProcessGroup] = None):
        super().__init__()
        prefix = f"layers.{layer_idx}.mlp"
        h, f, seed, unit = cfg.hidden_size, cfg.ffn_size, cfg.init_seed, tp_unit(cfg.ffn_size, cfg)
        self.gate_proj = ColumnParallelLinear(h, f, init_std=cfg.init_std, init_key=f"{prefix}.gate_proj.weight",
                                              seed=seed, tp_group=tp_group, tp_unit=unit)
        self.up_proj = ColumnParallelLinear(h, f, init_std=cfg.init_std, init_key=f"{prefix}.up_proj.weight",
                                            seed=seed, tp_group=tp_group, tp_unit=unit)
        self.down_proj = RowParallelLinear(f, h, init_std=cfg.init_std / math.sqrt(2 * cfg.num_layers),
                                           init_key=f"{prefix}.down_proj.weight", seed=seed, tp_group=tp_group,
                                           tp_unit=unit)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class TransformerBlock(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then + mlp(norm(.)). A pipeline layer: tensor in,
    tensor out. `layer_idx` is the global layer index (it names the init streams, so a pipeline stage
    building layers 4..7 gets the same weights as the full model)."""

    def __init__(self, cfg: ModelConfig, layer_idx: int, tp_group: Optional[ProcessGroup] = None):
        super().__init__()
        self.layer_idx = layer_idx
        self.hidden_dropout = cfg.hidden_dropout
        self.attention_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.attention = Attention(cfg, layer_idx, tp_group)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.mlp = MLP(cfg, layer_idx, tp_group)

    def forward(self, x: torch.Tensor, cache: Optional[KVCache] = None) -> torch.Tensor:
        # residual-stream dropout uses the default generator, identical across TP ranks, so all TP
        # replicas of the hidden state stay equal
        x = x + F.dropout(self.attention(self.attention_norm(x), cache), self.hidden_dropout, self.training)
        return x + F.dropout(self.mlp(self.mlp_norm(x)), self.hidden_dropout, self.training)
