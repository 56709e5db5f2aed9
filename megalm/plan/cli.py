"""`megalm-plan`: the valid layouts of a model on N GPUs, their predicted memory per GPU and step time.

    megalm-plan --model 7b --gpus 64 --gpu-mem-gib 80 --global-batch 1024 --seq-len 4096 [--top 10]
    megalm-plan --table [--output bench/PLAN_TABLE.md]       # best layout for 7b/13b/70b on 8-512 GPUs

Memory model: megalm/plan/memory.py; step-time model: megalm/plan/cost.py (assumptions printed).
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from typing import Optional

from megalm.config import ConfigError
from megalm.config.model import ModelConfig, load_model_config

from .cost import StepTime, estimate_step_time
from .layouts import Layout, enumerate_layouts
from .memory import GIB, Hardware, MemoryEstimate, estimate_memory, fits


@dataclass
class Candidate:
    layout: Layout
    memory: MemoryEstimate
    time: StepTime
    fits: bool


def plan(cfg: ModelConfig, gpus: int, global_batch: int, seq_len: int, hw: Hardware) -> list[Candidate]:
    """All valid layouts, fitting ones first, each group by predicted step time."""
    out = []
    for layout in enumerate_layouts(cfg, gpus, global_batch, hw.gpus_per_node, precision=hw.precision):
        mem = estimate_memory(cfg, layout, seq_len, global_batch, hw)
        out.append(Candidate(layout, mem, estimate_step_time(cfg, layout, seq_len, global_batch, hw), fits(mem, hw)))
    out.sort(key=lambda c: (not c.fits, c.time.total, c.memory.total))
    return out


def why_first(cands: list[Candidate], global_batch: int) -> str:
    fitting = [c for c in cands if c.fits]
    if not fitting:
        smallest = min(cands, key=lambda c: c.memory.total) if cands else None
        return ("nothing fits: " + (f"the smallest layout ({smallest.layout.short()}) needs "
                                    f"{smallest.memory.total / GIB:.1f} GiB" if smallest else "no valid layout"))
    first = fitting[0]
    t, L = first.time, first.layout
    lines = [f"{L.short()} is first: predicted {t.total:.2f} s/step (compute {t.compute:.2f}, bubble {t.bubble:.2f}, "
             f"TP comm {t.tp_comm:.2f}, PP comm {t.pp_comm:.2f}, DP comm {t.dp_comm:.2f}), "
             f"memory {first.memory.total / GIB:.1f} GiB per GPU."]
    for c in fitting[1:]:
        if c.layout.tp != L.tp or c.layout.pp != L.pp or c.layout.zero != L.zero or c.layout.checkpointing != L.checkpointing:
            d = c.time
            diffs = {"compute (incl. recomputation / micro-batch efficiency)": d.compute - t.compute,
                     "pipeline bubble": d.bubble - t.bubble, "TP all-reduces": d.tp_comm - t.tp_comm,
                     "PP transfers": d.pp_comm - t.pp_comm, "DP/ZeRO gradient and parameter traffic": d.dp_comm - t.dp_comm}
            main = max(diffs, key=lambda k: diffs[k])
            if d.total - t.total < 0.005:
                lines.append(f"  {c.layout.short()} has the same predicted step time; the first needs less memory "
                             f"({first.memory.total / GIB:.1f} vs {c.memory.total / GIB:.1f} GiB), so more headroom.")
                continue
            lines.append(f"  the best different layout, {c.layout.short()}, is {d.total - t.total:+.2f} s/step slower, "
                         f"mostly {main} ({diffs[main]:+.2f} s).")
            break
    if L.checkpointing:
        lines.append("  activation checkpointing is on because nothing faster fits without it.")
    if L.pp > 1:
        lines.append(f"  pipeline of {L.pp} stages with {L.micro_batches(global_batch)} micro-batches: bubble "
                     f"{(L.pp - 1) / (L.micro_batches(global_batch) + L.pp - 1):.1%} of the step.")
    return "\n".join(lines)


def _zero_mark(L: Layout) -> str:
    """ZeRO stage with its modes: m = gathered per micro-batch, r = gradients reduced once per step."""
    return f"{L.zero}{'m' if L.gathers_per_microbatch else ''}{'r' if L.chooses_step_reduction else ''}"


def _zero_words(L: Layout) -> str:
    words = (["gathered per micro-batch"] if L.gathers_per_microbatch else []) + (
        ["gradients reduced per step"] if L.chooses_step_reduction else [])
    return f" ({', '.join(words)})" if words else ""


def _row(c: Candidate) -> str:
    m, t, L = c.memory, c.time, c.layout
    zero = _zero_mark(L)
    return (f"{L.tp:>3} {L.pp:>3} {L.dp:>4} {zero:>4} {L.micro_batch:>3} {'yes' if L.checkpointing else 'no':>3} | "
            f"{m.params / GIB:7.1f} {m.grads / GIB:6.1f} {m.optimizer / GIB:6.1f} {m.activations / GIB:6.1f} "
            f"{m.buffers / GIB:6.1f} {m.total / GIB:7.1f} {'fits' if c.fits else 'NO':>5} | "
            f"{t.total:7.2f} {t.bubble:6.2f} {t.tp_comm:6.2f} {t.dp_comm:6.2f}")


HEADER = (" tp  pp   dp zero  mb  ac |  params  grads  optim    act   bufs   total   fit? |  step_s bubble tpcomm dpcomm")


def table(models: list[str], gpu_counts: list[int], global_batch: int, seq_len: int, hw: Hardware) -> str:
    lines = [f"Best predicted layout per model and GPU count ({hw.mem_gib:g} GiB GPUs, {hw.gpus_per_node} per node, "
             f"{hw.precision}, global batch {global_batch} x seq {seq_len}; `megalm-plan --table`)", "",
             "| model | GPUs | tp | pp | dp | ZeRO | micro batch | act. ckpt | memory/GPU (GiB) | step (s, predicted) | tokens/s/GPU (predicted) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name in models:
        cfg = load_model_config(name)
        for gpus in gpu_counts:
            cands = [c for c in plan(cfg, gpus, global_batch, seq_len, hw) if c.fits]
            if not cands:
                lines.append(f"| {name} | {gpus} | - | - | - | - | - | - | does not fit | - | - |")
                continue
            c = cands[0]
            L = c.layout
            zero = f"{L.zero}{_zero_words(L)}"
            lines.append(f"| {name} | {gpus} | {L.tp} | {L.pp} | {L.dp} | {zero} | {L.micro_batch} | "
                         f"{'yes' if L.checkpointing else 'no'} | {c.memory.total / GIB:.1f} | {c.time.total:.1f} | "
                         f"{global_batch * seq_len / c.time.total / gpus:,.0f} |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="megalm-plan", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="7b", help="a name in megalm/config/models/ (tiny, 125m, ... 70b) or a model YAML")
    ap.add_argument("--gpus", type=int, default=8)
    ap.add_argument("--gpu-mem-gib", type=float, default=80.0)
    ap.add_argument("--global-batch", type=int, default=1024)
    ap.add_argument("--seq-len", type=int, default=4096)
    ap.add_argument("--top", type=int, default=10)
    ap.add_argument("--gpus-per-node", type=int, default=8)
    ap.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="dense peak per GPU (H100 SXM bf16: 989)")
    ap.add_argument("--mfu", type=float, default=0.45, help="assumed achieved fraction of peak in matmuls")
    ap.add_argument("--intra-node-gbps", type=float, default=300.0)
    ap.add_argument("--inter-node-gbps", type=float, default=25.0)
    ap.add_argument("--show-unfit", type=int, default=3, help="also list this many layouts that do not fit")
    ap.add_argument("--table", action="store_true", help="the README table for 7b/13b/70b on 8-512 GPUs")
    ap.add_argument("--output", default=None, help="with --table: write it to this file too")
    args = ap.parse_args(argv)
    hw = Hardware(mem_gib=args.gpu_mem_gib, precision=args.precision, gpus_per_node=args.gpus_per_node,
                  peak_tflops=args.peak_tflops, mfu=args.mfu, intra_node_gbps=args.intra_node_gbps,
                  inter_node_gbps=args.inter_node_gbps)
    if args.table:
        text = table(["7b", "13b", "70b"], [8, 16, 32, 64, 128, 256, 512], args.global_batch, args.seq_len, hw)
        print(text)
        if args.output:
            with open(args.output, "w") as f:
                f.write(text)
        return 0
    try:
        cfg = load_model_config(args.model)
    except ConfigError as e:
        print(f"megalm-plan: {e}", file=sys.stderr)
        return 2
    cands = plan(cfg, args.gpus, args.global_batch, args.seq_len, hw)
    if not cands:
        print(f"megalm-plan: no valid layout of {args.model} on {args.gpus} GPUs with global batch {args.global_batch}",
              file=sys.stderr)
        return 1
    fitting = [c for c in cands if c.fits]
    print(f"{args.model}: {cfg.num_parameters() / 1e9:.2f} B parameters; {args.gpus} GPUs x {args.gpu_mem_gib:g} GiB "
          f"({args.gpus_per_node} per node), global batch {args.global_batch} x seq {args.seq_len}, {args.precision}")
    print(f"assumed: {args.peak_tflops:g} TFLOP/s peak at {args.mfu:.0%} MFU, NVLink {args.intra_node_gbps:g} GB/s, "
          f"inter-node {args.inter_node_gbps:g} GB/s per GPU; memory incl. {hw.reserve_gib:g} GiB reserve + "
          f"{hw.fragmentation:.0%} fragmentation")
    print(f"{len(cands)} valid layouts, {len(fitting)} fit in {args.gpu_mem_gib:g} GiB; top {min(args.top, len(fitting))}"
          f" by predicted step time (memory in GiB per GPU, worst pipeline stage; zero 3m: gathered per "
          f"micro-batch, 2r/3r: gradients reduced once per step):")
    print(HEADER)
    for c in fitting[: args.top]:
        print(_row(c))
    unfit = [c for c in cands if not c.fits]
    if unfit and args.show_unfit:
        print(f"do not fit (fastest {min(args.show_unfit, len(unfit))} of {len(unfit)}):")
        for c in unfit[: args.show_unfit]:
            print(_row(c))
    print(why_first(cands, args.global_batch))
    return 0


if __name__ == "__main__":
    sys.exit(main())
