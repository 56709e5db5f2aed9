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
    out = {}
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        return out
    with open(path) as f:
        for line in f:
            rec = json.loads(line)
            if rec["kind"] == kind:
                out[rec["step"]] = rec["loss"]
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
