"""Benchmark on one GPU (H100/H200): the `1.3b` model, bf16, sequence 2048, tokens/s, MFU, peak memory.

    python -m bench.gpu [--micro-batch 4] [--global-batch 16] [--seq-len 2048] [--peak-tflops T]
                        [--checkpointing] [--steps 10] [--warmup 3] [--zero-stage 1] [--no-plain] [--json PATH]

Our DeepSpeed engine at world size 1 (tp=pp=dp=1, bf16 with fp32 master weights and gradient accumulation:
ZeRO-1, which at world size 1 is DeepSpeed's bf16 optimizer; DeepSpeed 0.19.8 refuses bf16 with fp32 gradient
accumulation at ZeRO-0 outside a pipeline -- "unsupported mix of model_dtype and grad_accum_dtype"), attention through `F.scaled_dot_product_attention` (flash attention kernel for bf16 on
Hopper), activation checkpointing off unless --checkpointing. Also the plain PyTorch baseline (our model,
torch AdamW, autocast bf16) on the same shapes. MFU = model FLOPs (megalm.model.flops, no recomputation)
/ step time / peak; the peak is the device's dense bf16 figure, from its name unless --peak-tflops is given
(H100 SXM and H200: 989 TFLOP/s, H100 PCIe 756, H100/H200 NVL 835, A100 312). Target >= 50% MFU. --json
writes the figures for bench/gpu_check.sh. Needs CUDA; prints why not and exits 1 without it.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Dense (no sparsity) bf16 tensor-core peaks, TFLOP/s, by a substring of torch.cuda.get_device_name();
# the first match wins, so the specific names come before the generic ones.
DENSE_BF16_PEAK_TFLOPS = [("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H200 NVL", 835.0), ("H100", 989.0),
                          ("H200", 989.0), ("GH200", 989.0), ("A100", 312.0)]


def dense_bf16_peak_tflops(device_name: str) -> float | None:
    """The dense bf16 peak of a device from its name (None when we do not know it)."""
    for key, peak in DENSE_BF16_PEAK_TFLOPS:
        if key.lower() in device_name.lower():
            return peak
    return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="1.3b")
    ap.add_argument("--micro-batch", type=int, default=4)
    ap.add_argument("--global-batch", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--peak-tflops", type=float, default=None, help="default: from the device name")
    ap.add_argument("--checkpointing", action="store_true")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--zero-stage", type=int, default=1, help="ZeRO stage of our engine (default 1, see above)")
    ap.add_argument("--no-plain", action="store_true", help="skip the plain PyTorch baseline")
    ap.add_argument("--json", default=None, help="also write the figures to this JSON file")
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
                 "parallel.tp=1", "parallel.pp=1", f"parallel.zero_stage={args.zero_stage}"]
    cfg = load_run_config(config, overrides)
    device = torch.cuda.get_device_name(0)
    peak = args.peak_tflops or dense_bf16_peak_tflops(device)
    tokens = args.global_batch * args.seq_len
    flops = flops_per_token(cfg.model, args.seq_len) * tokens
    print(f"{device}; model {args.model} ({cfg.model.num_parameters() / 1e9:.2f} B params), "
          f"bf16, seq {args.seq_len}, micro batch {args.micro_batch}, global batch {args.global_batch}, "
          f"activation checkpointing {'on' if args.checkpointing else 'off'}; SDPA backend: flash when eligible; "
          f"dense bf16 peak {f'{peak:g} TFLOP/s' if peak else 'unknown (pass --peak-tflops)'}")
    report = {"device": device, "model": args.model, "params": cfg.model.num_parameters(), "seq_len": args.seq_len,
              "micro_batch": args.micro_batch, "global_batch": args.global_batch, "peak_tflops": peak,
              "checkpointing": args.checkpointing, "torch": torch.__version__, "runs": []}
    runs = [(f"ours (DeepSpeed engine, ZeRO-{args.zero_stage})", run_ours)] + ([] if args.no_plain else [("plain PyTorch", run_plain)])
    for name, fn in runs:
        (r,) = spawn(1, fn, config, overrides, args.steps, args.warmup, distributed=fn is run_ours, threads=4)
        step = statistics.median(r["times"])
        tflops = flops / step / 1e12
        mfu = tflops / peak if peak else None
        shown = f"MFU {100 * mfu:.1f}% of {peak:g} (target >= 50%)" if mfu is not None else "MFU: peak unknown"
        print(f"{name}: {step * 1e3:.0f} ms/step, {tokens / step:,.0f} tokens/s, {tflops:.0f} TFLOP/s, {shown}, "
              f"peak memory {r['peak_gib']:.1f} GiB", flush=True)
        report["runs"].append({"name": name, "step_s": step, "tokens_per_s": tokens / step, "tflops": tflops,
                               "mfu": mfu, "peak_gib": r["peak_gib"], "times": r["times"]})
        if args.json:  # after each run, so a later run's failure or timeout keeps the earlier figures
            with open(args.json, "w") as f:
                json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
