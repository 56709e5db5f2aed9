"""Benchmark on one GPU (H100/H200): the `1.3b` model, bf16, sequence 2048, tokens/s, MFU, peak memory.

    python -m bench.gpu [--micro-batch 4] [--global-batch 16] [--seq-len 2048] [--peak-tflops 989]
                        [--checkpointing] [--steps 10] [--warmup 3]

Our DeepSpeed engine at world size 1 (tp=pp=dp=1, ZeRO-0, bf16 with fp32 master weights and gradient
accumulation), attention through `F.scaled_dot_product_attention` (flash attention kernel for bf16 on
Hopper), activation checkpointing off unless --checkpointing. Also the plain PyTorch baseline (our model,
torch AdamW, autocast bf16) on the same shapes. MFU = model FLOPs (megalm.model.flops, no recomputation)
/ step time / peak; the default peak is the H100 SXM dense bf16 figure (989 TFLOP/s; H200 has the same
compute). Target >= 50% MFU. Needs CUDA; prints why not and exits 1 without it.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="1.3b")
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--global-batch", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--peak-tflops", type=float, default=989.0)
    ap.add_argument("--checkpointing", action="store_true")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--no-plain", action="store_true", help="skip the plain PyTorch baseline")
    args = ap.parse_args(argv)
    sys.path.insert(0, REPO)
    import torch

    if not torch.cuda.is_available():
        print("bench.gpu: no CUDA device here; nothing measured (see bench/RESULTS.md for CPU figures)")
        return 1
    from bench.train import run_ours, run_plain, spawn
    from megalm.config.run import load_run_config
    from megalm.model.flops import flops_per_token

    config = os.path.join(REPO, "configs", "run", "tiny.yaml")
    overrides = [f"model={args.model}", f"data.seq_len={args.seq_len}", "train.precision=bf16",
                 f"train.micro_batch_size={args.micro_batch}", f"train.global_batch_size={args.global_batch}",
                 f"train.activation_checkpointing={'true' if args.checkpointing else 'false'}",
                 "parallel.tp=1", "parallel.pp=1", "parallel.zero_stage=0"]
    cfg = load_run_config(config, overrides)
    tokens = args.global_batch * args.seq_len
    flops = flops_per_token(cfg.model, args.seq_len) * tokens
    print(f"{torch.cuda.get_device_name(0)}; model {args.model} ({cfg.model.num_parameters() / 1e9:.2f} B params), "
          f"bf16, seq {args.seq_len}, micro batch {args.micro_batch}, global batch {args.global_batch}, "
          f"activation checkpointing {'on' if args.checkpointing else 'off'}; SDPA backend: flash when eligible")
    runs = [("ours (DeepSpeed engine, ZeRO-0)", run_ours)] + ([] if args.no_plain else [("plain PyTorch", run_plain)])
    for name, fn in runs:
        (r,) = spawn(1, fn, config, overrides, args.steps, args.warmup, distributed=fn is run_ours, threads=4)
        step = statistics.median(r["times"])
        tflops = flops / step / 1e12
        print(f"{name}: {step * 1e3:.0f} ms/step, {tokens / step:,.0f} tokens/s, {tflops:.0f} TFLOP/s, "
              f"MFU {100 * tflops / args.peak_tflops:.1f}% of {args.peak_tflops:g} (target >= 50%), "
              f"peak memory {r['peak_gib']:.1f} GiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
