"""A torch-free stand-in for `python -m megalm.train` that honours the launcher-facing contract, so the
launcher (supervisor, SLURM submission, requeue, checkpoint upkeep) is testable in seconds.

    python tests/launcher_stub_trainer.py --config RUN.yaml [--resume auto|TAG] [section.field=value ...]

Contract kept (see megalm/training/{loop,checkpoint,metrics,faults,signals}.py; every name and rule of
the run directory comes from megalm/rundir.py, the module the real trainer and the launcher use):
  * rank/world from RANK/WORLD_SIZE (torchrun, deepspeed) or SLURM_PROCID/SLURM_STEP_NUM_TASKS (srun);
  * RUN_DIR = train.run_dir: config.yaml, metrics.jsonl ({"kind": "train", "step", "loss", "lr",
    "grad_norm", "tokens_per_s", "consumed_samples"}), heartbeat.json rewritten atomically by rank 0 at the
    start of every step ({"step", "time", "loss": null, "pid"});
  * checkpoints/step_NNNNNNNN.tmp/ -> every rank writes its files (zip archives, like torch's) -> rank 0
    writes megalm.json, renames to step_NNNNNNNN/, replaces `latest` atomically, prunes to train.keep_last;
    stale .tmp directories are removed at start; `--resume auto` continues from `latest`;
  * SIGTERM/SIGUSR1 -> all ranks agree, checkpoint, exit 0; SIGUSR2 -> stacks to RUN_DIR/stacks/rankNNNNN.txt;
  * MEGALM_FAULT crash@STEP[:RANK] (os._exit(17)), hang@STEP[:RANK] (stops stepping), nan@STEP (ignored).
The "loss" comes from a pseudo-random state carried in the checkpoint, so a resume that loads the wrong
state (or none) shows up as different losses. Ranks agree through files under RUN_DIR/.stub_sync/.

Stub-only knobs: stub.step_time (seconds per step, default 0.05), stub.save_time (extra seconds inside a
save, after the rank files are written, default 0).
"""
from __future__ import annotations

import argparse
import faulthandler
import json
import math
import os
import signal
import sys
import time
import zipfile

import yaml

# Run as a script (sys.path[0] is tests/): make the repository's megalm importable without PYTHONPATH.
sys.path.insert(1, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from megalm import rundir  # noqa: E402  (torch-free, like this stub)

MASK = (1 << 64) - 1


def parse_args(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--config", required=True)
    p.add_argument("--resume", default=None)
    p.add_argument("--local_rank", "--local-rank", type=int, default=None)
    p.add_argument("overrides", nargs="*")
    return p.parse_args(argv)


def load_config(path, overrides):
    with open(path) as f:
        cfg = yaml.safe_load(f) or {}
    for item in overrides:
        key, _, raw = item.partition("=")
        node = cfg
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = yaml.safe_load(raw)
    return cfg


def world():
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return int(env["RANK"]), int(env["WORLD_SIZE"])
    if "SLURM_PROCID" in env and "SLURM_STEP_NUM_TASKS" in env:
        return int(env["SLURM_PROCID"]), int(env["SLURM_STEP_NUM_TASKS"])
    return 0, 1


def parse_faults():
    faults = []
    for item in filter(None, (s.strip() for s in os.environ.get("MEGALM_FAULT", "").split(","))):
        kind, rest = item.split("@")
        step, _, rank = rest.partition(":")
        faults.append((kind, int(step), int(rank) if rank else 0))
    return faults


def next_state(x: int) -> int:
    return (x * 6364136223846793005 + 1442695040888963407) & MASK


def loss_of(step: int, x: int) -> float:
    return 5.0 * math.exp(-step / 40.0) + ((x >> 40) / float(1 << 24)) * 0.1


def write_zip(path: str, payload: dict) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.json", json.dumps(payload))


def read_zip(path: str) -> dict:
    with zipfile.ZipFile(path) as zf:
        return json.loads(zf.read("archive/data.json"))


class Sync:
    """File barrier + OR-reduction among the ranks of one attempt."""

    def __init__(self, run_dir: str, rank: int, world_size: int, stopping=lambda: False):
        self.rank, self.world, self.stopping = rank, world_size, stopping
        key = "_".join(os.environ.get(k, "-") for k in ("MASTER_ADDR", "MASTER_PORT", "SLURM_JOB_ID",
                                                         "SLURM_RESTART_COUNT", "MEGALM_RESTART",
                                                         "TORCHELASTIC_RESTART_COUNT", "TORCHELASTIC_RUN_ID"))
        self.dir = os.path.join(run_dir, ".stub_sync", key.replace("/", "_"))
        os.makedirs(self.dir, exist_ok=True)

    def agree(self, name: str, flag: bool, timeout: float = 120.0) -> bool:
        if self.world == 1:
            return flag
        rundir.write_atomic(os.path.join(self.dir, f"{name}.{self.rank}"), "1" if flag else "0", fsync=False)
        deadline = time.monotonic() + timeout
        paths = [os.path.join(self.dir, f"{name}.{r}") for r in range(self.world)]
        while not all(os.path.exists(p) for p in paths):
            if self.stopping():  # a launcher tearing us down after a peer died: do not wait long for it
                deadline = min(deadline, time.monotonic() + 3.0)
            if time.monotonic() > deadline:
                print(f"stub rank {self.rank}: peers did not reach {name} within {timeout}s", file=sys.stderr, flush=True)
                os._exit(1)
            time.sleep(0.01)
        return any(open(p).read() == "1" for p in paths)


def main(argv=None) -> int:
    args = parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    t = cfg.get("train", {})
    stub = cfg.get("stub", {})
    run_dir = t.get("run_dir", "runs/default")
    steps = int(t.get("train_steps", 100))
    save_interval = int(t.get("save_interval", 0))
    keep_last = int(t.get("keep_last", 3))
    log_interval = int(t.get("log_interval", 1))
    seed = int(t.get("seed", 1234))
    step_time = float(stub.get("step_time", 0.05))
    save_time = float(stub.get("save_time", 0.0))
    rank, world_size = world()
    faults = parse_faults()

    stop = {"sig": None}

    def on_signal(signum, frame):
        stop["sig"] = signum

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGUSR1, on_signal)
    # Like megalm/training/signals.py: one stack file per rank, truncated at each start.
    stack_path = rundir.stack_file(run_dir, rank)
    os.makedirs(os.path.dirname(stack_path), exist_ok=True)
    stack_out = open(stack_path, "w")  # kept open: faulthandler writes to its file descriptor
    faulthandler.register(signal.SIGUSR2, file=stack_out, all_threads=True)

    root = rundir.checkpoint_root(run_dir)
    os.makedirs(run_dir, exist_ok=True)
    sync = Sync(run_dir, rank, world_size, stopping=lambda: stop["sig"] is not None)
    if rank == 0:
        rundir.remove_stale_tmp(root)
        with open(rundir.config_file(run_dir), "w") as f:
            yaml.safe_dump(cfg, f)
    sync.agree("start", False)

    step, x, consumed = 0, seed, 0
    if args.resume is not None:
        tag = None
        if args.resume == "auto":
            tag = rundir.read_latest(root)
        else:
            tag = args.resume
        if tag is not None:
            meta = rundir.read_meta(root, tag)
            state = read_zip(os.path.join(root, tag, "mp_rank_00_model_states.pt"))
            step, x, consumed = meta["step"], state["x"], meta["consumed_samples"]
            if rank == 0:
                print(f"resumed from step {step} ({consumed} samples consumed)", flush=True)

    def heartbeat(s):
        if rank == 0:
            rundir.write_atomic(rundir.heartbeat_file(run_dir),
                                json.dumps({"step": s, "time": time.time(), "loss": None, "pid": os.getpid()}),
                                fsync=False)

    def save(s):
        tmp = os.path.join(root, rundir.tmp_tag_for(s))
        if rank == 0:
            os.makedirs(tmp, exist_ok=True)
        sync.agree(f"save{s}_dir", False)
        if rank == 0:
            write_zip(os.path.join(tmp, "mp_rank_00_model_states.pt"), {"x": x, "step": s})
        write_zip(os.path.join(tmp, f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"), {"rank": rank, "step": s})
        write_zip(rundir.rng_file(tmp, rank), {"rank": rank})
        if save_time:
            time.sleep(save_time)
        sync.agree(f"save{s}_files", False)
        if rank == 0:
            meta = {"step": s, "consumed_samples": consumed, "saved_at": time.time(), "format_version": 1,
                    "layout": {"tp": 1, "pp": 1, "dp": world_size, "zero_stage": 1, "world_size": world_size}}
            with open(rundir.meta_file(tmp), "w") as f:
                json.dump(meta, f)
            rundir.fsync_tree(tmp)
            rundir.publish_checkpoint(root, s)
            rundir.prune(root, keep_last, protect=(rundir.tag_for(s),))
        sync.agree(f"save{s}_done", False)

    saved_at = None
    while step < steps:
        for kind, fstep, frank in faults:
            if fstep == step and frank == rank:
                if kind == "crash":
                    os._exit(17)
                if kind == "hang":
                    while True:
                        time.sleep(1)
        heartbeat(step)
        t0 = time.perf_counter()
        time.sleep(step_time)
        x = next_state(x)
        loss = loss_of(step, x)
        step += 1
        consumed += 8
        if rank == 0 and (step % log_interval == 0 or step == steps):
            dt = max(time.perf_counter() - t0, 1e-6)
            rec = {"kind": "train", "step": step, "loss": loss, "lr": 1e-3, "grad_norm": 1.0,
                   "tokens_per_s": 8 * 32 / dt, "consumed_samples": consumed}
            print(f"[train] step {step} | loss {loss:.6f}", flush=True)
            with open(rundir.metrics_file(run_dir), "a") as f:
                f.write(json.dumps(rec) + "\n")
        if sync.agree(f"step{step}", stop["sig"] is not None):
            save(step)
            if rank == 0:
                print(f"stop signal received: checkpoint at step {step} written, exiting", flush=True)
            heartbeat(step)
            return 0
        if save_interval and step % save_interval == 0:
            save(step)
            saved_at = step
    if t.get("save_at_end", True) and saved_at != step:
        save(step)
    heartbeat(step)
    return 0


if __name__ == "__main__":
    sys.exit(main())
