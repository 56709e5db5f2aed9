"""Benchmark: generation tokens/s with the KV cache against re-running the context, measured in this run.

    python -m bench.generate [--config configs/run/demo.yaml] [--new-tokens 256] [--batches 1,4]
                             [--prompt-len 32] [--repeat 3] [--device cpu] [--threads N]

Model: the config's model shape (the demo's: h128, 4 layers, 8/4 heads, vocab 8192), random weights
from its init_seed, fp32, eval mode. The context limit is raised to prompt + new tokens when the config's
max_seq_len is smaller (weights do not depend on it), so no row slides its window. Greedy decoding of
--new-tokens tokens per row (no stop token), prompts of random ids; a batch of B has prompts of
different lengths (--prompt-len down to about half of it), left-padded by the cached path.

  cache            `generate_batch(kv_cache=True)`: one prefill forward, then one token per row per step;
  no cache         `generate_batch(kv_cache=False)`, the old path: each row alone, every step re-runs
                   the row's whole context (the baseline of the target: cache >= 5x its tokens/s);
  no cache, batched  every step re-runs the whole left-padded batch (a fresh cache each step): the
                   best a batch can do without keeping the cache, reported for batches > 1.

tokens/s = rows x new tokens / wall seconds, best of --repeat alternating runs; the same with this
process's CPU time (time.process_time), which a shared machine disturbs less (with --threads 1 it is the
work done). Greedy outputs of all paths are checked equal.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _rerun_batched(model, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    """Greedy, no cache kept: every step runs the whole left-padded batch from scratch."""
    import torch

    from megalm.eval.decode import full_vocab
    from megalm.model import KVCache

    rows = [list(p) for p in prompts]
    with torch.inference_mode():  # as generate_batch runs both of its paths
        for _ in range(new_tokens):
            width = max(map(len, rows))
            ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
            valid = torch.tensor([[False] * (width - len(r)) + [True] * len(r) for r in rows])
            logits = model(ids, cache=KVCache.for_model(model, len(rows), width), valid=valid)[:, -1]
            for r, token in zip(rows, full_vocab(model, logits).argmax(-1).tolist()):
                r.append(token)
    return [r[len(p):] for r, p in zip(rows, prompts)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=os.path.join(REPO, "configs", "run", "demo.yaml"))
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--batches", default="1,4", help="comma-separated batch sizes")
    ap.add_argument("--prompt-len", type=int, default=32, help="longest prompt of a batch")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args(argv)
    sys.path.insert(0, REPO)

    import torch

    from megalm.config.run import load_run_config
    from megalm.eval.decode import generate_batch
    from megalm.model import GPTModel

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_run_config(args.config).model
    needed = args.prompt_len + args.new_tokens
    note = ""
    if cfg.max_seq_len < needed:
        note = f", max_seq_len {cfg.max_seq_len} -> {needed} (prompt + new tokens)"
        cfg.max_seq_len = needed
    model = GPTModel(cfg).to(args.device).eval()
    params = sum(p.numel() for p in model.parameters())
    print(f"model {os.path.relpath(args.config, REPO)}: h{cfg.hidden_size}, {cfg.num_layers} layers, "
          f"{cfg.num_heads}/{cfg.kv_heads} heads, vocab {cfg.vocab_size}, {params / 1e6:.1f} M params{note}; "
          f"{args.device}, {torch.get_num_threads()} threads, fp32, greedy, {args.new_tokens} new tokens per row")

    g = torch.Generator().manual_seed(0)
    ok = True
    for batch in (int(b) for b in args.batches.split(",")):
        lengths = [args.prompt_len - (i * args.prompt_len) // (2 * batch) for i in range(batch)]
        prompts = [torch.randint(1, cfg.vocab_size, (n,), generator=g).tolist() for n in lengths]
        paths = {"cache": lambda: generate_batch(model, prompts, args.new_tokens),
                 "no cache": lambda: generate_batch(model, prompts, args.new_tokens, kv_cache=False)}
        if batch > 1:
            paths["no cache, batched"] = lambda: _rerun_batched(model, prompts, args.new_tokens)
        wall = {name: float("inf") for name in paths}
        cpu = dict(wall)
        outputs = {}
        generate_batch(model, prompts, 4)  # warm-up
        for _ in range(args.repeat):
            for name, run in paths.items():
                t0, c0 = time.perf_counter(), time.process_time()
                outputs[name] = run()
                wall[name] = min(wall[name], time.perf_counter() - t0)
                cpu[name] = min(cpu[name], time.process_time() - c0)
        same = all(out == outputs["cache"] for out in outputs.values())
        ok &= same
        tokens = batch * args.new_tokens
        print(f"batch {batch} (prompt lengths {lengths}):")
        for name in paths:
            print(f"  {name:18} {wall[name]:7.2f} s  {tokens / wall[name]:9,.1f} tokens/s   "
                  f"(CPU time {cpu[name]:7.2f} s  {tokens / cpu[name]:9,.1f} tokens/CPU-s)")
        for what, best in (("wall", wall), ("CPU time", cpu)):
            ratios = {name: best[name] / best["cache"] for name in paths if name != "cache"}
            print(f"  {what}: " + "; ".join(f"cache / {name}: {r:.1f}x" for name, r in ratios.items())
                  + f" (target >= 5x: {'PASS' if min(ratios.values()) >= 5 else 'FAIL'})")
        print(f"  greedy outputs identical across paths: {'yes' if same else 'NO'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
