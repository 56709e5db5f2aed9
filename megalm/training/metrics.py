"""Step metrics to the console and TensorBoard (rank 0), plus the heartbeat the launcher watches."""
from __future__ import annotations

import json
import os
import resource
import sys
import time
from typing import Optional

import torch

from megalm import rundir


def peak_memory_gib() -> float:
    """Peak memory of this process: device memory on GPU, peak RSS on CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is KiB on Linux


class MetricsLogger:
    def __init__(self, run_dir: str, enabled: bool, tensorboard: bool):
        self.enabled = enabled
        self.writer = None
        self.log_path = rundir.metrics_file(run_dir)
        if enabled and tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=rundir.tensorboard_dir(run_dir))

    def log(self, step: int, values: dict[str, float], prefix: str = "train") -> None:
        if not self.enabled:
            return
        shown = " | ".join(f"{k} {_fmt(v)}" for k, v in values.items())
        print(f"[{prefix}] step {step} | {shown}", flush=True)
        with open(self.log_path, "a") as f:
            f.write(json.dumps({"kind": prefix, "step": step, **values}) + "\n")
        if self.writer is not None:
            for k, v in values.items():
                self.writer.add_scalar(f"{prefix}/{k}", v, step)
            self.writer.flush()

    def record(self, step: int, kind: str, values: dict) -> None:
        """A metrics.jsonl line that is not a scalar (not printed, not in TensorBoard)."""
        if self.enabled:
            with open(self.log_path, "a") as f:
                f.write(json.dumps({"kind": kind, "step": step, **values}) + "\n")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _fmt(v: float) -> str:
    if isinstance(v, int):
        return str(v)
    return f"{v:.6g}"


class Heartbeat:
    """RUN_DIR/heartbeat.json rewritten after every step: the supervisor's evidence of progress."""

    def __init__(self, run_dir: str, enabled: bool):
        self.path = rundir.heartbeat_file(run_dir)
        self.enabled = enabled

    def beat(self, step: int, loss: Optional[float] = None) -> None:
        if not self.enabled:
            return
        # No fsync: it is evidence of liveness, rewritten every step, not state to recover.
        rundir.write_atomic(self.path, json.dumps({"step": step, "time": time.time(), "loss": loss,
                                                   "pid": os.getpid()}), fsync=False)


def log_to_stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
