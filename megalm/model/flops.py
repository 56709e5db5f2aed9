"""Model FLOPs per token for MFU: forward + backward, dense matmuls and attention.

    flops_per_token = 6 * N_matmul + 12 * L * h_attn * s

  * N_matmul: weights that take part in a matmul per token: per layer qkv ((nh + 2*nkv) * hd * h),
    o_proj (nh*hd * h) and SwiGLU (3 * h * ffn), plus the LM head (V * h, counted even when tied,
    since the head's matmul runs either way). The embedding lookup is not a matmul and is excluded;
    norms are negligible. V is the *unpadded* vocabulary: this counts model FLOPs, not the extra
    hardware work on padding columns, so MFU does not change with the TP padding.
  * 6 = 2 (multiply-add) x 3 (forward, plus backward's two matmuls per forward matmul).
  * 12 * L * h_attn * s with h_attn = nh * hd: per layer and token, QK^T and attention-times-V are
    2 * s * h_attn FLOPs each forward, x3 for backward. Counted without the causal halving
    (Megatron/PaLM convention), so numbers compare with published MFU figures.
Activation recomputation is not included (it is hardware work, not model work).
"""
from __future__ import annotations

from megalm.config.model import ModelConfig


def matmul_parameters(cfg: ModelConfig) -> int:
    """N_matmul above."""
    h, hd = cfg.hidden_size, cfg.head_dim
    per_layer = (cfg.num_heads + 2 * cfg.kv_heads) * hd * h + cfg.num_heads * hd * h + 3 * h * cfg.ffn_size
    return cfg.num_layers * per_layer + cfg.vocab_size * h


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Forward + backward FLOPs per trained token at sequence length `seq_len`."""
    attention = 12 * cfg.num_layers * cfg.num_heads * cfg.head_dim * seq_len
    return float(6 * matmul_parameters(cfg) + attention)
