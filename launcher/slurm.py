"""Thin wrappers around SLURM's command-line tools (sbatch, scontrol, squeue, scancel).

Every call has a timeout and raises `SlurmError` with the command and its stderr, so a dead controller
is a clear message, not a hang.
"""
from __future__ import annotations

import re
import shutil
import subprocess

TIMEOUT_S = 60


class SlurmError(RuntimeError):
    """A SLURM command is missing or failed."""


def _run(args: list[str], input_text: str | None = None, timeout: float = TIMEOUT_S) -> str:
    if shutil.which(args[0]) is None:
        raise SlurmError(f"{args[0]} not found on PATH: run this on a SLURM login node "
                         "(or install slurm-client; see scripts/install_slurm.sh)")
    try:
        proc = subprocess.run(args, input=input_text, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise SlurmError(f"{' '.join(args)} did not answer within {timeout:.0f}s (is slurmctld up?)") from None
    if proc.returncode != 0:
        raise SlurmError(f"{' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout


def sbatch(script_path: str, extra_args: list[str] | None = None) -> str:
    """Submit a batch script; returns the job id."""
    out = _run(["sbatch", "--parsable", *(extra_args or []), script_path])
    job_id = out.strip().split(";")[0]  # --parsable: "JOBID" or "JOBID;CLUSTER"
    if not job_id.isdigit():
        raise SlurmError(f"sbatch printed {out!r}, expected a job id")
    return job_id


def parse_key_values(text: str) -> dict[str, str]:
    """`scontrol show ... -o` output (Key=Value pairs separated by spaces) as a dict. Values may hold
    spaces only in the last few free-text keys (Command=, WorkDir=, ...), which we do not need whole."""
    out: dict[str, str] = {}
    for m in re.finditer(r"(\S+?)=(\S*)", text):
        out.setdefault(m.group(1), m.group(2))
    return out


def show_job(job_id: str) -> dict[str, str] | None:
    """`scontrol show job -o JOB` as a dict, or None when SLURM no longer knows the job."""
    try:
        out = _run(["scontrol", "show", "job", "-o", str(job_id)])
    except SlurmError as e:
        if "Invalid job id" in str(e):
            return None
        raise
    line = out.strip().splitlines()[0] if out.strip() else ""
    return parse_key_values(line) if line else None


def show_nodes(nodes: list[str]) -> dict[str, dict[str, str]]:
    """`scontrol show node -o A,B,...` as {NodeName: {Key: Value}} (State, NodeAddr, ...)."""
    out = {}
    for line in _run(["scontrol", "show", "node", "-o", ",".join(nodes)]).splitlines():
        kv = parse_key_values(line)
        if kv.get("NodeName"):
            out[kv["NodeName"]] = kv
    return out


def hostnames(nodelist: str) -> list[str]:
    """Expand a nodelist like 'gpu[01-03],cpu7' with `scontrol show hostnames`."""
    return _run(["scontrol", "show", "hostnames", nodelist]).split()


def queue(user: str | None = None) -> list[dict[str, str]]:
    args = ["squeue", "-h", "-o", "%i|%T|%j|%R"]
    if user:
        args += ["-u", user]
    rows = []
    for line in _run(args).splitlines():
        job_id, state, name, reason = (line.split("|") + ["", "", "", ""])[:4]
        rows.append({"job_id": job_id, "state": state, "name": name, "reason": reason})
    return rows


def cancel(job_id: str, signal: str | None = None, batch: bool = False) -> None:
    args = ["scancel"]
    if signal:
        args.append(f"--signal={signal}")
    if batch:
        args.append("--batch")
    _run(args + [str(job_id)])


def requeue(job_id: str) -> None:
    _run(["scontrol", "requeue", str(job_id)])
