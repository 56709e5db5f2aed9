"""Elastic restarts, the launcher's half (DESIGN decision 44): which node counts a run's layout can use,
and, inside a SLURM allocation, the nodes that are left and the srun command for them.

* `allowed_node_counts` is the rule `slurm submit --nodes MIN-MAX` applies before anything is queued: a
  node count n works when n x gpus-per-node processes split into tp x pp x dp and the global batch splits
  into micro_batch_size x dp x gradient accumulation (the trainer checks the same rule again before its
  process group starts, `megalm.training.resume.allowed_world_sizes`, and exits 2 with the allowed sizes).
* `read_batch_layout` reads (tp, pp, micro_batch_size, global_batch_size) from the run config YAML and its
  overrides without megalm.config (which would pull in torch on a login node); `LAYOUT_DEFAULTS` are the
  config classes' defaults, and a test keeps them equal.
* `plan_step` (used by `megalm-launch run --min-nodes`) asks SLURM which of the job's nodes still answer
  (`scontrol show job` / `show node`: a failed node leaves a `--no-kill` allocation once slurmctld marks
  it DOWN) and re-renders the srun command for them: `--nodes=K --ntasks=K*G --nodelist=...`.
"""
from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass
from typing import Optional

from megalm import rundir

from . import slurm
from .run_config import config_values
from .hostfile import parse_nodelist

# The config classes' defaults (megalm/config/parallel.py, train.py); tests/test_launcher_elastic.py
# checks that they agree, since the launcher may not import megalm.config.
LAYOUT_DEFAULTS = {"parallel.tp": 1, "parallel.pp": 1, "train.micro_batch_size": 1, "train.global_batch_size": 8}
# `megalm-launch run --min-nodes` exits with this when fewer than --min-nodes nodes are left in the
# allocation: the sbatch script then requeues the job, which SLURM starts again on MIN..MAX nodes.
EXIT_TOO_FEW_NODES = 75  # EX_TEMPFAIL
# Node states that take a node out of the next attempt (a trailing `*` is SLURM's "not responding").
_UNUSABLE = ("DOWN", "DRAIN", "FAIL", "NOT_RESPONDING", "POWER", "REBOOT", "MAINT")


class ElasticError(ValueError):
    """An impossible node range or elastic setup (names the flag or field, and the fix)."""


@dataclass(frozen=True)
class BatchLayout:
    tp: int
    pp: int
    micro_batch_size: int
    global_batch_size: int

    def describe(self, gpus_per_node: int) -> str:
        return (f"parallel.tp {self.tp} x parallel.pp {self.pp}, train.micro_batch_size {self.micro_batch_size}, "
                f"train.global_batch_size {self.global_batch_size}, {gpus_per_node} task(s) per node")


def allowed_node_counts(tp: int, pp: int, micro_batch_size: int, global_batch_size: int, gpus_per_node: int,
                        max_nodes: Optional[int] = None) -> list[int]:
    """Node counts (ascending, up to `max_nodes`, default: the largest the global batch allows) on which
    the layout trains with the same global batch: world = n x gpus_per_node is tp x pp x dp, and
    micro_batch_size x dp divides global_batch_size."""
    for name, value in (("parallel.tp", tp), ("parallel.pp", pp), ("train.micro_batch_size", micro_batch_size),
                        ("train.global_batch_size", global_batch_size), ("--gpus-per-node", gpus_per_node)):
        if not isinstance(value, int) or value < 1:
            raise ElasticError(f"{name} must be a positive integer, got {value!r}")
    if global_batch_size % micro_batch_size:
        return []
    per_dp = global_batch_size // micro_batch_size  # dp must divide this
    top = max_nodes if max_nodes is not None else per_dp * tp * pp // gpus_per_node
    out = []
    for n in range(1, top + 1):
        world = n * gpus_per_node
        if world % (tp * pp) == 0 and per_dp % (world // (tp * pp)) == 0:
            out.append(n)
    return out


def read_batch_layout(config: str, overrides: list[str]) -> BatchLayout:
    """(tp, pp, micro_batch_size, global_batch_size) of the run config with its `section.field=value`
    overrides applied (the last one wins), torch-free."""
    values = config_values(config, overrides, LAYOUT_DEFAULTS, ElasticError)
    for key, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ElasticError(f"{key}: expected a positive integer, got {value!r} (in {config} or its overrides)")
    return BatchLayout(values["parallel.tp"], values["parallel.pp"], values["train.micro_batch_size"],
                       values["train.global_batch_size"])


def parse_node_range(text: str, min_nodes: Optional[int] = None) -> tuple[int, int]:
    """`--nodes N` or `--nodes MIN-MAX` (plus an optional `--min-nodes`) -> (min, max)."""
    m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", str(text))
    if not m:
        raise ElasticError(f"--nodes {text!r}: expected a node count N or a range MIN-MAX, e.g. --nodes 48-64")
    lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
    if lo < 1:
        raise ElasticError(f"--nodes must be >= 1, got {text}")
    if lo > hi:
        raise ElasticError(f"--nodes {text}: the minimum {lo} is larger than the maximum {hi}; write MIN-MAX")
    if min_nodes is not None:
        if m.group(2) and min_nodes != lo:
            raise ElasticError(f"--min-nodes {min_nodes} contradicts --nodes {text}: give one of them")
        if min_nodes < 1:
            raise ElasticError(f"--min-nodes must be >= 1, got {min_nodes}")
        if min_nodes > hi:
            raise ElasticError(f"--min-nodes {min_nodes} is larger than --nodes {hi}: the job could never start; "
                               f"lower --min-nodes or raise --nodes")
        lo = min_nodes
    return lo, hi


def check_node_range(layout: BatchLayout, gpus_per_node: int, min_nodes: int, max_nodes: int) -> list[int]:
    """The node counts in [min_nodes, max_nodes] the layout can use; ElasticError when it cannot use the
    minimum or the maximum (SLURM may start the job at either). Counts in between that the layout cannot
    use are run on the largest usable count below them."""
    allowed = allowed_node_counts(layout.tp, layout.pp, layout.micro_batch_size, layout.global_batch_size,
                                  gpus_per_node, max_nodes=max(max_nodes, 1))
    bad = [n for n in sorted({min_nodes, max_nodes}) if n not in allowed]
    if bad:
        every = allowed_node_counts(layout.tp, layout.pp, layout.micro_batch_size, layout.global_batch_size,
                                    gpus_per_node)
        listed = ", ".join(map(str, every[:24])) + (", ..." if len(every) > 24 else "") if every else "none"
        raise ElasticError(
            f"--nodes {min_nodes}-{max_nodes}: the layout cannot run on {' or '.join(map(str, bad))} node(s) "
            f"({layout.describe(gpus_per_node)}): each node count must give a world size that splits into "
            f"tp x pp x dp with micro_batch_size x dp dividing the global batch. Node counts it can use: {listed}; "
            f"choose MIN and MAX among them, or change train.global_batch_size / train.micro_batch_size")
    return [n for n in allowed if min_nodes <= n <= max_nodes]


# ------------------------------------------------------------------------- inside the allocation

@dataclass
class StepPlan:
    """What one attempt runs on."""

    command: list[str]
    nodes: list[str]
    ntasks: int
    master_addr: Optional[str]
    left: list[str]  # every usable node of the allocation (nodes is a prefix when the layout needs fewer)


def usable(state: str) -> bool:
    """Whether a node in SLURM state `state` (scontrol's State=, e.g. MIXED, DOWN*, IDLE+DRAIN) takes tasks."""
    s = state.upper()
    return not s.endswith("*") and not any(flag in s for flag in _UNUSABLE)


def allocation_nodes(job_id: str, settle_timeout: float = 0.0) -> tuple[list[str], dict[str, dict[str, str]]]:
    """The nodes of job `job_id` that answer, in allocation order, and their `scontrol show node` records.
    A node that is not responding yet is not DOWN either (slurmctld waits SlurmdTimeout): wait up to
    `settle_timeout` seconds for SLURM to decide, then leave it out."""
    deadline = time.monotonic() + settle_timeout
    while True:
        info = slurm.show_job(job_id)
        if info is None:
            raise slurm.SlurmError(f"job {job_id} is not known to SLURM (is SLURM_JOB_ID this allocation's?)")
        nodelist = info.get("NodeList") or ""
        try:
            names = slurm.hostnames(nodelist) if nodelist and nodelist != "(null)" else []
        except slurm.SlurmError:
            names = parse_nodelist(nodelist)
        table = slurm.show_nodes(names) if names else {}
        states = {n: (table.get(n) or {}).get("State", "UNKNOWN") for n in names}
        pending = [n for n, s in states.items()
                   if (s.endswith("*") or "NOT_RESPONDING" in s.upper()) and "DOWN" not in s.upper()]
        if not pending or time.monotonic() >= deadline:
            return [n for n in names if usable(states[n])], table
        time.sleep(1.0)


def _srun_index(command: list[str]) -> int:
    for i, arg in enumerate(command):
        if os.path.basename(arg) == "srun":
            return i
    raise ElasticError("--min-nodes re-renders the srun command for the nodes that are left, but the command "
                       f"has no srun: {' '.join(command[:6])} ... (run the job step as `srun --ntasks-per-node=G ...`)")


_NODE_OPTS = ("--nodes", "-N", "--ntasks", "-n", "--nodelist", "-w")


def tasks_per_node(command: list[str]) -> int:
    """The srun command's --ntasks-per-node (required with --min-nodes)."""
    i = _srun_index(command)
    args = command[i + 1:]
    for j, arg in enumerate(args):
        value = arg.split("=", 1)[1] if arg.startswith("--ntasks-per-node=") else (
            args[j + 1] if arg == "--ntasks-per-node" and j + 1 < len(args) else None)
        if value is not None:
            if not value.isdigit() or int(value) < 1:
                raise ElasticError(f"srun --ntasks-per-node {value!r}: expected a positive task count per node")
            return int(value)
    raise ElasticError("--min-nodes needs srun's --ntasks-per-node=G in the command (the world size is "
                       "nodes x G); add it to the srun command")


def resize_srun(command: list[str], nodes: list[str], ntasks: int, overlap: bool = False) -> list[str]:
    """The command with srun's node and task options replaced: --nodes=K --ntasks=T --nodelist=a,b, and
    with `overlap` srun's --overlap: the step of an attempt that lost a node never completes in slurmctld
    (its part on the dead node is never reported), keeps its CPUs, and a new step without --overlap
    waits for them forever. Its processes on the nodes left are gone (the supervisor killed its tree)."""
    i = _srun_index(command)
    head, rest = command[:i + 1], command[i + 1:]
    kept, j = [], 0
    while j < len(rest):
        arg = rest[j]
        if not arg.startswith("-"):
            kept += rest[j:]
            break
        long_name = arg.split("=", 1)[0]
        if long_name in _NODE_OPTS and (arg.startswith("--") or len(arg) == 2):
            j += 1 if "=" in arg else 2  # --nodes=2 | --nodes 2 | -N 2
            continue
        if not arg.startswith("--") and arg[:2] in _NODE_OPTS:
            j += 1  # -N2
            continue
        kept.append(arg)
        j += 1
    extra = ["--overlap"] if overlap and "--overlap" not in kept else []
    return head + [f"--nodes={len(nodes)}", f"--ntasks={ntasks}", f"--nodelist={','.join(nodes)}", *extra] + kept


def plan_step(command: list[str], job_id: str, min_nodes: int, node_counts: tuple[int, ...] = (),
              settle_timeout: float = 0.0, overlap: bool = False) -> Optional[StepPlan]:
    """The next attempt's srun command on the allocation's usable nodes, or None when fewer than
    `min_nodes` are left. With `node_counts` (the counts the layout can use), the largest usable count
    that fits is taken; the remaining nodes stay idle until the job is requeued."""
    g = tasks_per_node(command)
    left, table = allocation_nodes(job_id, settle_timeout)
    counts = [n for n in (node_counts or range(1, len(left) + 1)) if min_nodes <= n <= len(left)]
    if not counts:
        return None
    chosen = left[:max(counts)]
    addr = (table.get(chosen[0]) or {}).get("NodeAddr") or chosen[0]
    return StepPlan(resize_srun(command, chosen, len(chosen) * g, overlap), chosen, len(chosen) * g, addr, left)


def record_step(run_dir: str, event: dict) -> None:
    """Inside a SLURM job: one line for a job step (its nodes and world size, or its end) in
    RUN_DIR/slurm/attempts.jsonl, next to the sbatch script's lines for the job's starts."""
    job = os.environ.get("SLURM_JOB_ID")
    if not job:
        return
    os.makedirs(rundir.slurm_dir(run_dir), exist_ok=True)
    event = dict(job_id=job, restart=int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0), time=time.time(), **event)
    with open(rundir.slurm_attempts_file(run_dir), "a") as f:
        f.write(json.dumps(event) + "\n")
