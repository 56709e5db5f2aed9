"""Predicted memory per GPU (the worst pipeline stage) for a layout of our engine.

Parameters and the states that scale with them (P = parameters on this GPU's tp x pp shard, D = dp):

    precision  params  grads                       optimizer (Adam m, v + fp32 master)
    fp32       4P      4P                          8P (ZeRO-0: no master) / 12P/D (ZeRO>=1: DeepSpeed's fp32
                                                   partition is a copy even of fp32 weights)
    bf16       2P      2P + 4P fp32 accumulator    12P (/D with ZeRO>=1)

ZeRO-1 partitions the optimizer state, ZeRO-2 also the gradients (DeepSpeed keeps two fp32 gradient
partitions: the reduced partition and the master's .grad), ZeRO-3 also the parameters, which are
gathered layer by layer (with DeepSpeed's defaults max_live_parameters = max_reuse_distance = 1e9
elements they stay gathered from forward to backward, so up to min(P, 1e9) elements are live).

Transients: the optimizer allocates nothing in step() (torch's fused AdamW; the unfused one allocated a
temporary of the updated partition's size); at ZeRO-0 DeepSpeed's gradient all-reduce flattens the
gradients (buckets of up to 5e8 elements) while the Adam state is alive, from the second step on (125m
tp=1: 20P measured, 16P after one step); activations are counted when the last micro-batch's forward
reaches the loss (the memory peak of the forward/backward), gradients at the optimizer step; the peak is
the larger of the two.

Activations per token per layer, elements (from what autograd saves in `megalm.model.transformer`;
norms and residuals are not split by TP, everything inside attention/MLP is):

    two RMSNorms: input, normalised, output   6h     (bf16: + fp32 copies, 14h bytes per norm)
    attention: qkv output (h + 2 kv*hd), rotated q (h) and k (kv*hd), SDPA output (h), o_proj input (h)
    SwiGLU: gate, silu(gate), up, product     4f
    flash attention (SDPA) keeps no s x s matrix; without it (--no-flash) nh*s per token is added.

With activation checkpointing a layer keeps its input (h) and one layer is recomputed at a time. The
pipeline's first stage holds min(pp, micro-batches) micro-batches in flight (1F1B). The loss adds the
logits and the cross-entropy's float copies (3 x V/tp floats, plus the bf16 logits).

Buffers: DeepSpeed's ZeRO reduce bucket (`megalm.config.zero_buckets`: DeepSpeed's 5e8 elements or the
model's TP-shard parameter count if smaller, as the trainer configures it; allocated whole: fp32 for
ZeRO-1 and on CPU, the gradient dtype otherwise; a second one under DeepSpeed's PipelineEngine, i.e.
ZeRO-1 x PP), ZeRO-3's reduce-scatter staging (one full gradient copy), and on a GPU a fixed reserve
(CUDA context, cuBLAS/NCCL workspaces) plus a fragmentation margin of the caching allocator.

ZeRO-2/3 x PP (one DeepSpeedEngine per stage, `megalm.training.stage_engine`): the pp=1 terms of the
stage's P, one bucket. ZeRO-3 `pipeline_reshard=per_step` adds the stage's full gradients (param dtype),
which accumulate across the step's micro-batches before its single reduce-scatter; `per_microbatch`
reduces them every backward, as at pp=1. Both keep the gathered parameters (the max-live rule above).
`parallel.grad_reduction=per_step` (ZeRO-2/3, any pp) adds the same full gradients.
Validated (tests/test_plan_memory.py) on 125m at (1,2,2,2) and (1,2,2,3) `per_step`, and on the tiny
model at (1,2,2,3) `per_microbatch`; 125m `per_microbatch` is reported in bench/RESULTS.md, not tested.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from megalm.config.model import ModelConfig
from megalm.config.zero_buckets import zero_bucket_elements

from .layouts import Layout

GIB = 2**30
ZERO3_MAX_LIVE = 1_000_000_000  # stage3_max_live_parameters / max_reuse_distance defaults
ZERO0_ALLREDUCE_BUCKET = 500_000_000  # deepspeed.runtime.engine.MEMORY_OPT_ALLREDUCE_SIZE


@dataclass
class Hardware:
    """What the plan assumes about one GPU and the network (override on the command line)."""

    mem_gib: float = 80.0
    precision: str = "bf16"  # "bf16" on GPUs; "fp32" for the CPU validation
    flash_attention: bool = True
    reserve_gib: float = 1.5  # CUDA context, cuBLAS/NCCL workspaces (0 on CPU)
    fragmentation: float = 0.08  # caching-allocator margin on top of the tensors (0 on CPU)
    gpus_per_node: int = 8
    peak_tflops: float = 989.0  # dense bf16, H100 SXM
    mfu: float = 0.45  # achieved fraction of peak for the matmuls
    intra_node_gbps: float = 300.0  # NVLink bus bandwidth per GPU, GB/s
    inter_node_gbps: float = 25.0  # InfiniBand per GPU (200 Gb/s), GB/s

    @classmethod
    def cpu(cls) -> "Hardware":
        return cls(mem_gib=1e9, precision="fp32", reserve_gib=0.0, fragmentation=0.0)


@dataclass
class MemoryEstimate:
    params: float = 0.0
    grads: float = 0.0
    optimizer: float = 0.0
    activations: float = 0.0
    buffers: float = 0.0
    parts: dict = field(default_factory=dict)

    @property
    def total(self) -> float:
        return self.params + self.grads + self.optimizer + self.activations + self.buffers

    def gib(self) -> str:
        return (f"{self.total / GIB:.1f} GiB (params {self.params / GIB:.1f}, grads {self.grads / GIB:.1f}, "
                f"optim {self.optimizer / GIB:.1f}, act {self.activations / GIB:.1f}, buffers {self.buffers / GIB:.1f})")


def layer_parameters(cfg: ModelConfig, tp: int) -> int:
    h, hd = cfg.hidden_size, cfg.head_dim
    split = (cfg.num_heads + 2 * cfg.kv_heads) * hd * h + cfg.num_heads * hd * h + 3 * h * cfg.ffn_size
    return split // tp + 2 * h


def stage_parameters(cfg: ModelConfig, tp: int, pp: int) -> list[int]:
    """Parameters on one TP rank of each pipeline stage (blocks balanced as DeepSpeed's type: partition)."""
    emb = cfg.padded_vocab_size(tp) * cfg.hidden_size // tp
    layers = [cfg.num_layers // pp + (1 if s < cfg.num_layers % pp else 0) for s in range(pp)]
    out = [n * layer_parameters(cfg, tp) for n in layers]
    out[0] += emb
    out[-1] += cfg.hidden_size  # final norm
    if not cfg.tie_embeddings or pp > 1:  # untied head, or the tied copy on the last stage
        out[-1] += emb
    return out


def _activation_bytes_per_token_layer(cfg: ModelConfig, tp: int, act_bytes: int, seq: int, flash: bool) -> float:
    h, hd, f = cfg.hidden_size, cfg.head_dim, cfg.ffn_size
    norms = 2 * (12 * h if act_bytes == 4 else 14 * h)
    attn = (h + 2 * cfg.kv_heads * hd) + h + cfg.kv_heads * hd + h + h
    inner = (attn + 4 * f) / tp * act_bytes
    if not flash:
        inner += cfg.num_heads / tp * seq * act_bytes * 2  # probabilities and their dropout/softmax copy
    return norms + inner


def estimate_memory(cfg: ModelConfig, layout: Layout, seq_len: int, global_batch: int,
                    hw: Hardware | None = None) -> MemoryEstimate:
    hw = hw or Hardware()
    fp32 = hw.precision == "fp32"
    pbytes = 4 if fp32 else 2
    tp, pp, D, z = layout.tp, layout.pp, layout.dp, layout.zero
    m = layout.micro_batches(global_batch)
    stages = stage_parameters(cfg, tp, pp)
    layers = [cfg.num_layers // pp + (1 if s < cfg.num_layers % pp else 0) for s in range(pp)]

    best = None
    for s, P in enumerate(stages):
        e = MemoryEstimate()
        # ---- parameters
        e.params = pbytes * (P / D if z == 3 else P)
        if z == 3:
            e.params += pbytes * min(P, ZERO3_MAX_LIVE)  # gathered working copies
        # ---- gradients: persistent part + the full gradient present at the step
        if fp32:
            persistent_grads = {0: 0.0, 1: 4 * P, 2: 8 * P / D, 3: 4 * P / D}[z]
            step_grads = 4 * P if z == 0 else 0.0
        else:
            persistent_grads = {0: 6 * P, 1: 2 * P + 4 * P / D, 2: 8 * P / D, 3: 4 * P / D}[z]
            step_grads = 0.0
        if layout.reduces_per_step:
            # parallel.grad_reduction=per_step (implied by ZeRO-3 x PP pipeline_reshard=per_step): the full
            # gradients accumulate on the parameters (in their dtype) from the step's first backward to
            # the one reduce-scatter at its end.
            persistent_grads += pbytes * P
        e.grads = persistent_grads
        # ---- optimizer state (fused AdamW, megalm.training.optimizer: no temporary at step time)
        e.optimizer = (8 if fp32 else 12) * P if z == 0 else 12 * P / D
        # ZeRO-0: DeepSpeed's gradient all-reduce at the boundary flattens the gradients into buckets of up
        # to 5e8 elements (engine.allreduce_gradients, also at dp=1), alive with the Adam state.
        step_temp = pbytes * min(P, ZERO0_ALLREDUCE_BUCKET) if z == 0 else 0.0
        # ---- activations at the loss of the last micro-batch in flight
        tokens = layout.micro_batch * seq_len
        in_flight = min(pp - s, m) if pp > 1 else 1
        per_layer = _activation_bytes_per_token_layer(cfg, tp, pbytes, seq_len, hw.flash_attention)
        loss = 0.0
        if s == pp - 1:
            vocab = cfg.padded_vocab_size(tp) / tp
            loss = tokens * (3 * vocab * 4 + (0 if fp32 else vocab * 2) + 3 * cfg.hidden_size * pbytes)
        stored = layers[s] * (cfg.hidden_size * pbytes if layout.checkpointing else per_layer)
        act = tokens * in_flight * (stored + cfg.hidden_size * pbytes)  # + embedding output / stage input
        # Checkpointing: the loss (forward) and one recomputed layer (backward) are never alive together.
        act += max(loss, tokens * per_layer) if layout.checkpointing else loss
        # Gradients of earlier micro-batches are alive while the next ones run forward.
        fwd_peak = act + (step_grads if m > 1 else 0.0)
        step_peak = step_grads + step_temp
        e.activations = act
        extra_step = max(fwd_peak, step_peak) - act  # gradients / step temporaries, reported under buffers
        # ---- buffers
        buffers = 0.0
        bucket = zero_bucket_elements(cfg, tp)  # the trainer's reduce_bucket_size
        if z in (1, 2):
            bucket_bytes = 4 if (fp32 or z == 1) else 2
            # DeepSpeed's PipelineEngine (ZeRO-1 x PP) holds a second one; a stage engine does not.
            buffers += bucket * bucket_bytes * (2 if pp > 1 and not layout.stage_engine else 1)
        if z == 3:
            buffers += bucket * (4 if fp32 else 2) + min(P, bucket) * (4 if fp32 else 2)
        e.buffers = buffers + extra_step
        e.parts = {"stage": s, "fwd_peak_act": fwd_peak, "step_transient": step_peak}
        tensors = e.total
        e.buffers += tensors * hw.fragmentation + hw.reserve_gib * GIB
        if best is None or e.total > best.total:
            best = e
    assert best is not None
    return best


def fits(est: MemoryEstimate, hw: Hardware) -> bool:
    return est.total <= hw.mem_gib * GIB and math.isfinite(est.total)
