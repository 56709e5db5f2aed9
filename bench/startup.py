"""Benchmark: start-up (process start to the first training step) with sharded initialisation ("new")
against the full-tensor initialisation it replaced ("old"), measured in the same run.

    python -m bench.startup [--model 350m] [--layouts 2,2,1,1 1,1,4,3] [--steps 1] [--repeat 1]
                            [--seq 128] [--bucket 5e7] [--threads N]

Per layout (tp,pp,dp,zero) and mode: tp*pp*dp fresh spawned processes (gloo, fp32, CPU) that import
torch/DeepSpeed, join the process group, build the engine (the model is initialised inside) and take
`--steps` training steps of one micro-batch of `--seq` synthetic tokens (`--steps 0`: stop at engine
ready). Reported per rank: seconds from the spawn to engine ready and to the end of the first step;
init's share of that (seconds inside `Tensor.normal_` + for old also its scaling); numbers drawn by
init against the numbers of drawn weights the rank keeps (its TP shard / stage / ZeRO-3 partition);
peak RSS at engine ready and after the step. old and new alternate `--repeat` times; the faster
first-step time of each is kept (the machine may be shared).

old = the algorithm of commit 4ef964e (megalm/parallel/init.py before issue 12), patched into each
rank by `install_full_tensor_init`: every rank draws the full tensor of each of its parameters from
one generator per parameter and slices its TP shard, also under zero.Init. Same shapes, same code
path otherwise, so the difference is init alone. DeepSpeed's reduce/allgather buckets are set to
`--bucket` elements (default 5e7, DeepSpeed's 5e8 would allocate ~2 GB per rank twice over) so four
350m ranks fit in this machine's memory; both modes use the same value.
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from bench.train import spawn  # noqa: E402  (fresh processes joined by a gloo group)


# ---------------------------------------------------------------- the old way, for comparison
def install_full_tensor_init() -> None:
    """Make this process initialise like commit 4ef964e: per parameter, one generator seeded by
    (seed, name) draws the full fp32 tensor; the vocabulary is padded in a full-size copy; the rank's TP
    shard is sliced out (a contiguous copy) and copied into the parameter; nothing is deferred under
    zero.Init (DeepSpeed partitions the full shard as each module's __init__ returns)."""
    import torch

    from megalm.parallel import init, layers

    @dataclass(frozen=True)
    class FullTensorInit(init.ShardInit):
        padded: tuple = ()
        tp_dim: int = 0
        rank: int = 0
        world: int = 1

        def rows(self, a: int, b: int, out: Optional[torch.Tensor] = None) -> torch.Tensor:
            n = self.normal
            digest = hashlib.sha256(f"{n.seed}/{n.key}".encode()).digest()
            g = torch.Generator(device="cpu")
            g.manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
            full = init.fp32_cpu_empty(n.shape).normal_(generator=g).mul_(n.std)
            if tuple(self.padded) != tuple(n.shape):
                padded = init.fp32_cpu_empty(self.padded).zero_()
                padded[:n.shape[0]] = full
                full = padded
            shard = full if self.world == 1 else full.chunk(self.world, dim=self.tp_dim)[self.rank].contiguous()
            if out is None:
                return shard[a:b].clone()
            return out.copy_(shard[a:b])

    def full_tensor_shard_init(key, seed, std, full_shape, padded_shape, tp_dim, rank, world, tp_unit=None):
        s = init.tp_shard_init(key, seed, std, full_shape, padded_shape, tp_dim, rank, world, tp_unit)
        return FullTensorInit(s.normal, s.shape, s.offset, tuple(int(x) for x in padded_shape), tp_dim, rank, world)

    layers.tp_shard_init = full_tensor_shard_init
    init.zero3_deferral_active = lambda: False


class _DrawMeter:
    """Counts numbers and seconds spent in Tensor.normal_ (and the old way's scaling, inside it)."""

    def __init__(self) -> None:
        import torch

        self.numbers, self.seconds = 0, 0.0
        orig = torch.Tensor.normal_

        def normal_(t, *args, **kwargs):
            t0 = time.perf_counter()
            try:
                return orig(t, *args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - t0
                self.numbers += t.numel()

        torch.Tensor.normal_ = normal_


# ---------------------------------------------------------------- one rank
def run_rank(config: str, mode: str, t_spawn: float, steps: int) -> dict:
    import torch.distributed as dist

    from bench.train import _batches, _peak_memory_gib, _sync
    from megalm.config.run import load_run_config
    from megalm.parallel.grid import destroy_process_grid, initialize_process_grid
    from megalm.training.engine import build_engine

    t_ready = time.time()  # imports done, process group up
    if mode == "old":
        install_full_tensor_init()
    meter = _DrawMeter()
    cfg = load_run_config(config, [])
    grid = initialize_process_grid(cfg.parallel.tp, cfg.parallel.pp)
    engine = build_engine(cfg, grid)
    _sync()
    t_engine, rss_engine = time.time(), _peak_memory_gib()
    init_numbers, init_seconds = meter.numbers, meter.seconds
    held = 0
    for p in engine.ds.module.parameters():
        shape = getattr(p, "ds_shape", p.shape)
        if len(shape) == 2:  # the drawn weights (norms are ones)
            held += p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel()
    accum = cfg.train.gradient_accumulation_steps(grid.dp)
    t_step = None
    for i in range(steps):
        engine.train_step(_batches(cfg, accum, grid.dp_rank, i))
        _sync()
        if i == 0:
            t_step = time.time()
    rss_step = _peak_memory_gib()
    destroy_process_grid()
    dist.barrier()
    return {"to_pg": t_ready - t_spawn, "to_engine": t_engine - t_spawn,
            "to_step": None if t_step is None else t_step - t_spawn, "init_numbers": init_numbers,
            "init_s": init_seconds, "held": held, "rss_engine": rss_engine, "rss_step": rss_step}


# ---------------------------------------------------------------- driver
def write_config(path: str, model: str, tp: int, pp: int, dp: int, zero: int, seq: int, bucket: float) -> None:
    """A run config of `model` at the layout, one micro-batch per DP rank per step, fp32, small buckets."""
    b = int(bucket)
    text = f"""model: {model}
parallel: {{tp: {tp}, pp: {pp}, zero_stage: {zero}}}
data: {{train_paths: [unused], seq_len: {seq}, seed: 1234}}
train:
  micro_batch_size: 1
  global_batch_size: {dp}
  train_steps: 10
  precision: fp32
  tensorboard: false
  run_dir: {os.path.dirname(path)}/run
  deepspeed_config:
    zero_optimization: {{reduce_bucket_size: {b}, allgather_bucket_size: {b}, stage3_prefetch_bucket_size: 0}}
"""
    with open(path, "w") as f:
        f.write(text)


def measure(config: str, world: int, mode: str, steps: int, threads: int) -> list[dict]:
    return spawn(world, run_rank, config, mode, time.time(), steps, threads=threads)


def _fmt(values: list[Optional[float]], spec: str) -> str:
    return "/".join("-" if v is None else format(v, spec) for v in values)


def report(layout: str, mode: str, r: list[dict]) -> str:
    step = _fmt([x["to_step"] for x in r], ".1f")
    build = _fmt([x["to_engine"] - x["to_pg"] for x in r], ".1f")
    return (f"{mode} {layout}: to engine ready {_fmt([x['to_engine'] for x in r], '.1f')} s, to end of step 1 "
            f"{step} s (process group up at {_fmt([x['to_pg'] for x in r], '.1f')} s, engine build {build} s); "
            f"init draws {_fmt([x['init_numbers'] / 1e6 for x in r], '.1f')} M numbers in "
            f"{_fmt([x['init_s'] for x in r], '.2f')} s; drawn weights held {_fmt([x['held'] / 1e6 for x in r], '.1f')} M; "
            f"peak RSS engine ready "
            f"{_fmt([x['rss_engine'] for x in r], '.2f')} GiB, after step {_fmt([x['rss_step'] for x in r], '.2f')} GiB")


def _key(r: list[dict]) -> float:
    return max((x["to_step"] if x["to_step"] is not None else x["to_engine"]) for x in r)


def _build(r: list[dict]) -> float:
    return max(x["to_engine"] - x["to_pg"] for x in r)


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="350m")
    ap.add_argument("--layouts", nargs="+", default=["2,2,1,1", "1,1,4,3"], help="tp,pp,dp,zero each")
    ap.add_argument("--steps", type=int, default=1, help="training steps after the engine is built (0: none)")
    ap.add_argument("--repeat", type=int, default=1, help="alternating old/new repetitions; fastest kept")
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--bucket", type=float, default=5e7, help="DeepSpeed reduce/allgather bucket elements")
    ap.add_argument("--threads", type=int, default=0, help="torch threads per rank (default: cores / ranks)")
    args = ap.parse_args(argv)

    from megalm.config import load_model_config

    m = load_model_config(args.model)
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout
    print(f"{datetime.date.today()} commit {head.strip()} (+ working tree); model {args.model} "
          f"({m.num_parameters() / 1e6:.0f} M params), fp32, seq {args.seq}, micro batch 1, {args.steps} step(s); "
          f"{os.cpu_count()} cores; old = full-tensor init (commit 4ef964e), new = sharded tiles")
    tmp = tempfile.mkdtemp(prefix="bench-startup-")
    for layout in args.layouts:
        tp, pp, dp, zero = (int(x) for x in layout.split(","))
        config = os.path.join(tmp, f"run_{tp}_{pp}_{dp}_{zero}.yaml")
        write_config(config, args.model, tp, pp, dp, zero, args.seq, args.bucket)
        best: dict[str, Any] = {}
        for _ in range(args.repeat):
            for mode in ("old", "new"):
                r = measure(config, tp * pp * dp, mode, args.steps, args.threads)
                if mode not in best or _key(r) < _key(best[mode]):
                    best[mode] = r
        name = f"tp={tp} pp={pp} dp={dp} zero={zero}"
        for mode in ("old", "new"):
            print(report(name, mode, best[mode]))
        old, new = best["old"], best["new"]
        what = "first step" if args.steps else "engine ready"
        share = [n["init_numbers"] / max(o["init_numbers"], 1) for o, n in zip(old, new)]
        print(f"ratio {name} (new / old): time to {what} {_key(new) / _key(old):.2f}, engine build (process group "
              f"up to engine ready) {_build(new) / _build(old):.2f} (slowest rank); init numbers "
              f"drawn per rank {_fmt(share, '.2f')}; init seconds {_fmt([n['init_s'] / max(o['init_s'], 1e-9) for o, n in zip(old, new)], '.2f')}; "
              f"peak RSS {_fmt([n['rss_step'] / o['rss_step'] for o, n in zip(old, new)], '.2f')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
