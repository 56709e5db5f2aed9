"""Predicted step time of a layout: compute, pipeline bubble and communication, nothing overlapped.

    compute   = flops_per_token * global tokens * (4/3 with activation checkpointing) / gpus / (peak * mfu)
    bubble    = compute * (pp - 1) / m                    (1F1B: (pp-1)/(m+pp-1) of the step is idle)
    tp comm   = 4 all-reduces per layer and micro-batch (2 forward, 2 backward) of micro*seq*h activations,
                ring volume 2(tp-1)/tp, over NVLink (tp <= 8 stays in a node)
    pp comm   = 2 point-to-point transfers of micro*seq*h per stage boundary and micro-batch
    dp comm   = per step, over NVLink when the DP group fits in a node, else InfiniBand, ring volumes of
                the stage's parameter bytes (DeepSpeed 0.19's behaviour, read in its stage_1_and_2.py/stage3.py):
                ZeRO-0/1: one gradient all-reduce (or reduce-scatter + all-gather) at the boundary, 2(D-1)/D;
                ZeRO-2: a reduce-scatter in every micro-batch's backward (it partitions gradients as they
                come) plus the all-gather of the updated parameters, (m+1)(D-1)/D;
                ZeRO-3: per micro-batch two parameter all-gathers (forward, backward) and a reduce-scatter,
                3m(D-1)/D; ZeRO-3 x PP with `pipeline_reshard=per_step`: one all-gather of the stage and one
                reduce-scatter per step, 2(D-1)/D (torchtitan's FSDP2 x PP rule; counted in bench/RESULTS.md);
                `grad_reduction=per_step` reduce-scatters once per step: ZeRO-2 2(D-1)/D, ZeRO-3 (2m+1)(D-1)/D.
A higher micro batch lowers per-kernel overhead, modelled as a matmul efficiency factor mb/(mb + 0.5).
"""
from __future__ import annotations

from dataclasses import dataclass

from megalm.config.model import ModelConfig
from megalm.model.flops import flops_per_token

from .layouts import Layout
from .memory import Hardware, stage_parameters


@dataclass
class StepTime:
    compute: float
    bubble: float
    tp_comm: float
    pp_comm: float
    dp_comm: float

    @property
    def total(self) -> float:
        return self.compute + self.bubble + self.tp_comm + self.pp_comm + self.dp_comm


def estimate_step_time(cfg: ModelConfig, layout: Layout, seq_len: int, global_batch: int,
                       hw: Hardware | None = None) -> StepTime:
    hw = hw or Hardware()
    act_bytes = 4 if hw.precision == "fp32" else 2
    tp, pp, D = layout.tp, layout.pp, layout.dp
    m = layout.micro_batches(global_batch)
    tokens = global_batch * seq_len
    flops = flops_per_token(cfg, seq_len) * tokens * (4 / 3 if layout.checkpointing else 1.0)
    efficiency = hw.mfu * layout.micro_batch / (layout.micro_batch + 0.5)
    compute = flops / layout.gpus / (hw.peak_tflops * 1e12 * efficiency)
    bubble = compute * (pp - 1) / m
    micro_act = layout.micro_batch * seq_len * cfg.hidden_size * act_bytes
    layers_per_stage = -(-cfg.num_layers // pp)
    tp_comm = 0.0
    if tp > 1:
        tp_comm = 4 * layers_per_stage * m * micro_act * 2 * (tp - 1) / tp / (hw.intra_node_gbps * 1e9)
    # P2P crosses nodes when a node holds less than one pipeline stage pair's worth of GPUs.
    pp_bw = hw.intra_node_gbps if tp * pp <= hw.gpus_per_node else hw.inter_node_gbps
    pp_comm = 2 * m * micro_act / (pp_bw * 1e9) if pp > 1 else 0.0
    dp_comm = 0.0
    if D > 1:
        P = max(stage_parameters(cfg, tp, pp))
        bw = hw.intra_node_gbps if layout.gpus <= hw.gpus_per_node else hw.inter_node_gbps
        if layout.gathers_per_step:
            passes = 2
        elif layout.reduces_per_step:
            passes = {2: 2, 3: 2 * m + 1}[layout.zero]
        else:
            passes = {0: 2, 1: 2, 2: m + 1, 3: 3 * m}[layout.zero]
        volume = passes * (D - 1) / D * P * act_bytes
        dp_comm = volume / (bw * 1e9)
    return StepTime(compute, bubble, tp_comm, pp_comm, dp_comm)
