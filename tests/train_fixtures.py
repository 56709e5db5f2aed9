"""Shared helpers for engine/launcher tests: a learnable synthetic token shard and run launching."""
from __future__ import annotations

import json
import os
import sys
import time
from typing import Callable

import numpy as np

from data_prep.mmidx import ShardWriter
from launcher.supervisor import read_heartbeat

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_RUN = os.path.join(REPO, "configs", "run", "tiny.yaml")
EOD = 0


def write_synthetic_shard(prefix: str, vocab: int = 48, documents: int = 600, seed: int = 0) -> str:
    """Documents are arithmetic progressions over the first `vocab` ids (start, stride random) ending in
    EOD: structure a tiny model (512-entry embedding) starts learning within a few steps, so a falling
    loss is visible in short tests."""
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.dirname(prefix), exist_ok=True)
    with ShardWriter(prefix, np.uint16) as w:
        for _ in range(documents):
            n = int(rng.integers(8, 120))
            start, stride = int(rng.integers(1, vocab)), int(rng.integers(1, 7))
            doc = (start + stride * np.arange(n)) % (vocab - 1) + 1  # ids 1..vocab-1; 0 is EOD
            w.add_document(np.append(doc, EOD))
    return prefix


def read_losses(run_dir: str, kind: str = "train") -> dict[int, float]:
    return read_metric(run_dir, "loss", kind)


def read_metric(run_dir: str, name: str, kind: str = "train") -> dict[int, float]:
    """{step: value} of one metrics.jsonl field."""
    out = {}
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        return out
    with open(path) as f:
        for line in f:
            rec = json.loads(line)
            if rec["kind"] == kind:
                out[rec["step"]] = rec[name]
    return out


def read_restarts(run_dir: str) -> list[dict]:
    """Restart events the supervisor logged (`megalm-launch run`), oldest first."""
    path = os.path.join(run_dir, "restarts.jsonl")
    return [json.loads(line) for line in open(path)] if os.path.exists(path) else []


def wait_for_heartbeat(run_dir: str, step: int, timeout: float, alive: Callable[[], bool] = lambda: True) -> dict:
    """Poll RUN_DIR/heartbeat.json until its step reaches `step`, `timeout` s pass or alive() turns false;
    the last heartbeat read ({} when there was none). Callers assert on it."""
    deadline = time.monotonic() + timeout
    hb: dict = {}
    while time.monotonic() < deadline and alive():
        hb = read_heartbeat(run_dir) or {}
        if hb.get("step", 0) >= step:
            break
        time.sleep(0.02)
    return hb


def python() -> str:
    return sys.executable


LAYOUT_STEPS = 20  # the layout and precision tests' curve length


def train_on_rank(overrides: list[str], resume=None, config: str = TINY_RUN, fault: str | None = None) -> int:
    """Runs on every rank of a RankPool: the real entry's train() with the pool's process group, from
    `config` plus `overrides`; `fault` is MEGALM_FAULT for this call only (the pool's processes live on)."""
    import torch.distributed as dist

    from megalm.config.run import load_run_config
    from megalm.training.launch_env import LaunchEnv
    from megalm.training.loop import train

    cfg = load_run_config(config, overrides)
    rank, world = dist.get_rank(), dist.get_world_size()
    saved = os.environ.pop("MEGALM_FAULT", None)
    if fault is not None:
        os.environ["MEGALM_FAULT"] = fault
    try:
        return train(cfg, LaunchEnv(rank, world, rank, "127.0.0.1", 0, "torch"), resume=resume, stack_dump=False)
    finally:
        os.environ.pop("MEGALM_FAULT", None)
        if saved is not None:
            os.environ["MEGALM_FAULT"] = saved


def train_layout_run(rank_pool, layout: tuple[int, int, int, int], shard: str, run_dir: str, steps: int,
                     extra: tuple[str, ...] = ()) -> None:
    """Train the tiny run on `shard` into `run_dir` for `steps` steps at (tp, pp, dp, zero) on a shared
    pool of tp*pp*dp ranks; every rank must exit 0."""
    tp, pp, dp, zero = layout
    overrides = [f"data.train_paths=[{shard}]", f"train.run_dir={run_dir}", f"train.train_steps={steps}",
                 f"parallel.tp={tp}", f"parallel.pp={pp}", f"parallel.zero_stage={zero}", *extra]
    assert rank_pool(tp * pp * dp).run(train_on_rank, overrides, timeout=600) == [0] * (tp * pp * dp)


def train_in_pool(overrides: list[str], run_dir: str):
    """`train_on_rank` for LAYOUT_STEPS steps into `run_dir`; rank 0 also returns the losses."""
    import torch.distributed as dist

    rc = train_on_rank(overrides + [f"train.run_dir={run_dir}", f"train.train_steps={LAYOUT_STEPS}"])
    return rc, (read_losses(run_dir) if dist.get_rank() == 0 else None)


def layout_curve(rank_pool, tp: int, pp: int, dp: int, zero: int, shard: str, run_dir: str, extra=()) -> list[float]:
    """The LAYOUT_STEPS-step loss curve of the tiny run at (tp, pp, dp, zero), same global batch."""
    overrides = [f"data.train_paths=[{shard}]", f"parallel.tp={tp}", f"parallel.pp={pp}",
                 f"parallel.zero_stage={zero}", "train.save_at_end=false", *extra]
    results = rank_pool(tp * pp * dp).run(train_in_pool, overrides, run_dir, timeout=600)
    assert all(rc == 0 for rc, _ in results), results
    losses = results[0][1]
    assert sorted(losses) == list(range(1, LAYOUT_STEPS + 1)), f"missing steps in {losses}"
    return [losses[s] for s in range(1, LAYOUT_STEPS + 1)]
