"""`megalm-launch status [JOB] --run-dir DIR`: where a run stands.

SLURM state and restart count (`scontrol show job`), supervisor restarts (RUN_DIR/restarts.jsonl),
each attempt's nodes and world size (RUN_DIR/slurm/attempts.jsonl: the job's starts and, under
`megalm-launch run --min-nodes`, each job step), elastic resumes at another data-parallel size (the
trainer's `elastic_resume` lines in restarts.jsonl), the latest checkpoint step, and the last logged
train step / loss / tokens per second (metrics.jsonl).
"""
from __future__ import annotations

import json
import os
import time
from typing import Optional

from megalm import rundir

from . import slurm
from .checkpoints import latest_complete_step, read_latest
from .sbatch import recorded_jobs
from .supervisor import read_heartbeat, read_restarts


def last_train_record(run_dir: str) -> Optional[dict]:
    """The last `{"kind": "train", ...}` line of metrics.jsonl (read from the end: the file can be big)."""
    path = rundir.metrics_file(run_dir)
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            chunk = 1 << 16
            while True:
                start = max(0, size - chunk)
                f.seek(start)
                lines = f.read(size - start).splitlines()
                for line in reversed(lines[1:] if start > 0 else lines):
                    try:
                        rec = json.loads(line)
                    except ValueError:
                        continue  # a line being appended right now
                    if rec.get("kind") == "train":
                        return rec
                if start == 0:
                    return None
                chunk *= 4
    except OSError:
        return None


def _read_jsonl(path: str) -> list[dict]:
    out = []
    try:
        with open(path) as f:
            for line in f:
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue  # a line being appended right now
                if isinstance(rec, dict):
                    out.append(rec)
    except OSError:
        pass
    return out


def read_attempts(run_dir: str) -> list[dict]:
    """One row per attempt, oldest first: each SLURM start of the job ({job_id, restart, step: None, nodes,
    num_nodes, ntasks, exit_code}) and each job step the supervisor started in it (step = its attempt index)."""
    rows: list[dict] = []
    open_rows: dict[tuple, dict] = {}
    for ev in _read_jsonl(rundir.slurm_attempts_file(run_dir)):
        kind = ev.get("event")
        key = (ev.get("job_id"), ev.get("restart"), ev.get("attempt") if kind in ("step", "step_end") else None)
        if kind in ("start", "step"):
            row = {"job_id": ev.get("job_id"), "restart": ev.get("restart"), "step": key[2], "nodes": ev.get("nodes"),
                   "num_nodes": ev.get("num_nodes"), "ntasks": ev.get("ntasks"), "exit_code": None}
            rows.append(row)
            open_rows[key] = row
        elif kind in ("end", "step_end") and key in open_rows:
            open_rows[key]["exit_code"] = ev.get("exit_code")
            if ev.get("preempted"):
                open_rows[key]["preempted"] = True
    return rows


def read_elastic_resumes(run_dir: str) -> list[dict]:
    """The trainer's resumes at another data-parallel size: {step, old_dp, new_dp, old_world, new_world}."""
    out = []
    for ev in read_restarts(run_dir):
        if ev.get("event") == "elastic_resume":
            old, new = ev.get("old_layout") or {}, ev.get("new_layout") or {}
            out.append({"step": ev.get("step"), "old_dp": old.get("dp"), "new_dp": new.get("dp"),
                        "old_world": old.get("world_size"), "new_world": new.get("world_size")})
    return out


def collect(run_dir: str, job_id: Optional[str] = None, query_slurm: bool = True) -> dict:
    jobs = recorded_jobs(run_dir)
    job_id = job_id or (jobs[-1] if jobs else None)
    out: dict = {"run_dir": run_dir, "job_id": job_id, "slurm": None}
    if job_id and query_slurm:
        try:
            info = slurm.show_job(job_id)
            if info is None:
                out["slurm"] = {"state": "UNKNOWN (no longer in scontrol; finished jobs age out after MinJobAge)"}
            else:
                out["slurm"] = {"state": info.get("JobState"), "reason": info.get("Reason"),
                                "restarts": int(info.get("Restarts", "0") or 0), "nodes": info.get("NodeList"),
                                "run_time": info.get("RunTime"), "time_limit": info.get("TimeLimit"),
                                "exit_code": info.get("ExitCode")}
        except slurm.SlurmError as e:
            out["slurm"] = {"state": f"unavailable: {e}"}
    restarts = [r for r in read_restarts(run_dir) if r.get("event") == "restart"]
    out["supervisor_restarts"] = len(restarts)
    out["last_restart_reason"] = restarts[-1]["reason"] if restarts else None
    out["attempts"] = read_attempts(run_dir)
    out["elastic_resumes"] = read_elastic_resumes(run_dir)
    out["latest_checkpoint"] = read_latest(run_dir)
    out["latest_checkpoint_step"] = latest_complete_step(run_dir)
    rec = last_train_record(run_dir)
    out["last_step"] = rec.get("step") if rec else None
    out["last_loss"] = rec.get("loss") if rec else None
    out["tokens_per_s"] = rec.get("tokens_per_s") if rec else None
    hb = read_heartbeat(run_dir)
    out["heartbeat_step"] = hb.get("step") if hb else None
    out["heartbeat_age_s"] = round(time.time() - hb["time"], 1) if hb and isinstance(hb.get("time"), (int, float)) else None
    return out


def format_status(st: dict) -> str:
    def fmt(v, spec=""):
        return "-" if v is None else format(v, spec)

    lines = [f"run dir:            {st['run_dir']}"]
    if st["job_id"]:
        s = st["slurm"] or {}
        state = s.get("state", "-")
        if s.get("reason") and s.get("reason") != "None":
            state += f" ({s['reason']})"
        lines.append(f"slurm job:          {st['job_id']}  state {state}  restarts {fmt(s.get('restarts'))}"
                     f"  nodes {fmt(s.get('nodes'))}  run time {fmt(s.get('run_time'))}")
    else:
        lines.append(f"slurm job:          - (none recorded in RUN_DIR/{rundir.SLURM_DIR}/{rundir.SLURM_JOBS_FILE})")
    lines.append(f"supervisor restarts: {st['supervisor_restarts']}"
                 + (f" (last: {st['last_restart_reason']})" if st["last_restart_reason"] else ""))
    for a in st.get("attempts") or []:
        what = f"job {a['job_id']} start {a['restart']}" if a["step"] is None else f"  step {a['step']}"
        world = f"world size {fmt(a['ntasks'])} ({fmt(a['num_nodes'])} node(s))"
        end = "running" if a["exit_code"] is None else f"exit {a['exit_code']}" + (" preempted" if a.get("preempted") else "")
        lines.append(f"attempt:            {what:<22} {world:<28} nodes {fmt(a['nodes'])}  {end}")
    for e in st.get("elastic_resumes") or []:
        lines.append(f"elastic resume:     step {fmt(e['step'])}: dp {fmt(e['old_dp'])} -> {fmt(e['new_dp'])} "
                     f"(world size {fmt(e['old_world'])} -> {fmt(e['new_world'])})")
    lines.append(f"latest checkpoint:  {fmt(st['latest_checkpoint'])} (step {fmt(st['latest_checkpoint_step'])})")
    loss = st["last_loss"]
    lines.append(f"last logged step:   {fmt(st['last_step'])}  loss {fmt(loss, '.4f') if isinstance(loss, (int, float)) else fmt(loss)}"
                 f"  tokens/s {fmt(st['tokens_per_s'], '.0f') if isinstance(st['tokens_per_s'], (int, float)) else '-'}")
    lines.append(f"heartbeat:          step {fmt(st['heartbeat_step'])}, {fmt(st['heartbeat_age_s'])} s ago")
    return "\n".join(lines)
