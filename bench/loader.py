"""Benchmark: samples/s of the training data pipeline at the demo config vs what a training step consumes.

    python -m bench.loader [--config configs/run/demo.yaml] [--steps 200] [--train-steps 3]

Pipeline: `build_datasets` (shard open + cached sample/shuffle indices) and `micro_batches_for_step`
for every DP rank of the config's layout (the same calls the training loop makes), timed over --steps
steps after the datasets are built. Consumption: the config's global batch / the median step time of
our engine on the same config (bench/train.py's measurement, world size tp*pp*dp of the config with
dp=1, CPU). Target: pipeline >= 50x consumption. Needs the demo shards (`megalm-prep demo-corpus
--output-dir data/demo`).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=os.path.join(REPO, "configs", "run", "demo.yaml"))
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--train-steps", type=int, default=3, help="timed training steps for the consumption side")
    args = ap.parse_args(argv)
    sys.path.insert(0, REPO)

    from bench.train import run_ours, spawn
    from megalm.config.run import load_run_config
    from megalm.data import build_datasets, micro_batches_for_step

    cfg = load_run_config(args.config)
    t = cfg.train
    dp = 1
    accum = t.gradient_accumulation_steps(dp)
    t0 = time.perf_counter()
    train_ds, _, _ = build_datasets(cfg.data, train_samples=(args.steps + 1) * t.global_batch_size,
                                    valid_samples=0, test_samples=0)
    build_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for step in range(args.steps):
        micro_batches_for_step(train_ds, consumed_samples=step * t.global_batch_size, micro_batch_size=t.micro_batch_size,
                               accumulation_steps=accum, dp_rank=0, dp_size=dp)
    loader_s = time.perf_counter() - t0
    loader_rate = args.steps * t.global_batch_size / loader_s

    world = cfg.parallel.tp * cfg.parallel.pp
    results = spawn(world, run_ours, args.config, [], args.train_steps, 1)
    step_s = statistics.median(results[0]["times"])
    train_rate = t.global_batch_size / step_s
    print(f"data pipeline ({cfg.data.train_paths}, seq {cfg.data.seq_len}): datasets built in {build_s:.2f} s, "
          f"{args.steps} steps x {t.global_batch_size} samples in {loader_s:.2f} s = {loader_rate:,.0f} samples/s")
    print(f"training (ours, tp={cfg.parallel.tp} pp={cfg.parallel.pp} zero={cfg.parallel.zero_stage}, {world} ranks): "
          f"{step_s * 1e3:.0f} ms/step median = {train_rate:,.1f} samples/s consumed")
    ratio = loader_rate / train_rate
    print(f"loader headroom ratio (pipeline {loader_rate:,.0f} samples/s / training {train_rate:,.1f} samples/s): "
          f"{ratio:,.0f}x (target >= 50x: {'PASS' if ratio >= 50 else 'FAIL'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
