"""Predicted step time of a layout: compute, pipeline bubble and communication, nothing overlapped.

    compute   = flops_per_token * global tokens * (4/3 with activation checkpointing) / gpus / (peak * mfu)
    bubble    = compute * (pp - 1) / m                    (1F1B: (pp-1)/(m+pp-1) of the step is idle)
    tp comm   = 4 all-reduces per layer and micro-batch (2 forward, 2 backward) of micro*seq*h activations,
                ring volume 2(tp-1)/tp, over NVLink (tp <= 8 stays in a node)
    pp comm   = 2 point-to-point transfers of micro*seq*h per stage boundary and micro-batch
    dp comm   = gradient all-reduce (ZeRO 0-2: reduce-scatter + all-gather, same volume) 2(D-1)/D * grad bytes;
                ZeRO-3 also all-gathers the parameters twice (forward, backward) per micro-batch
                (D-1)/D * param bytes each; over NVLink when the DP group fits in a node, else InfiniBand
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
        volume = 2 * (D - 1) / D * P * act_bytes
        if layout.zero == 3:
            volume += 2 * m * (D - 1) / D * P * act_bytes
        dp_comm = volume / (bw * 1e9)
    return StepTime(compute, bubble, tp_comm, pp_comm, dp_comm)
