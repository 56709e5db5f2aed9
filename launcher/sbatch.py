"""Render the sbatch script for a training run from launcher/templates/job.sbatch.tmpl, and submit it.

One task per GPU: `--ntasks-per-node` = `--gpus-per-node`. On CPU-only clusters (`--cpu-only`) the GPU
request is left out but the task count per node stays `--gpus-per-node`, so the same layout runs.
The job always runs the trainer with `--resume auto`: the first start finds no checkpoint and starts
fresh; a requeued start continues from `latest`.

Elastic jobs (`--nodes MIN-MAX`, DESIGN decision 44): `#SBATCH --nodes=MIN-MAX` with `--mincpus` instead of
`--ntasks-per-node` (with a task count SLURM allocates the minimum of the range), the step under
`megalm-launch run --min-nodes MIN`, which runs srun on the nodes the allocation has; with `--max-restarts`
> 0 also `--no-kill`, so a failed node leaves the allocation instead of ending the job, and the supervisor
restarts on the nodes that are left. Too few left: the supervisor exits 75 and the script requeues the job.
"""
from __future__ import annotations

import os
import re
import shlex
import sys
import time
from dataclasses import dataclass, field
from typing import Optional

from megalm import rundir

from . import elastic
from . import slurm
from .run_config import config_values

TEMPLATE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "templates", "job.sbatch.tmpl")
_PLACEHOLDER = re.compile(r"\{\{(\w+)\}\}")
_TIME = re.compile(r"^(\d+-)?\d{1,3}(:\d{2}){0,2}$")


class SubmitError(ValueError):
    """Bad submission options (reported before anything reaches SLURM)."""


@dataclass
class JobSpec:
    config: str
    nodes: int = 1  # the maximum when min_nodes is set
    gpus_per_node: int = 1
    min_nodes: Optional[int] = None  # < nodes: elastic, SLURM may start (and the run continue) on MIN..nodes
    partition: Optional[str] = None
    account: Optional[str] = None
    time: Optional[str] = None
    constraint: Optional[str] = None
    cpus_per_task: Optional[int] = None
    sbatch_extra: list[str] = field(default_factory=list)
    launcher: str = "srun"  # "srun" or "deepspeed"
    grace: int = 120
    cpu_only: bool = False
    job_name: Optional[str] = None
    overrides: list[str] = field(default_factory=list)
    env: list[str] = field(default_factory=list)  # KEY=VALUE exported in the job
    entry: Optional[str] = None  # a training script to run instead of megalm.train (tests, custom entries)
    max_restarts: int = 0  # > 0: wrap the launch in `megalm-launch run` (restarts inside the allocation)
    hang_timeout: float = 0
    python: str = field(default_factory=lambda: sys.executable)
    workdir: str = field(default_factory=os.getcwd)


def run_dir_of(config: str, overrides: list[str], workdir: str) -> str:
    """train.run_dir from the config and overrides (the last `train.run_dir=` wins), made absolute."""
    run_dir = str(config_values(config, overrides, {"train.run_dir": None}, SubmitError)["train.run_dir"] or "runs/default")
    return os.path.normpath(os.path.join(workdir, run_dir))


def _validate(spec: JobSpec) -> None:
    if spec.nodes < 1:
        raise SubmitError(f"--nodes must be >= 1, got {spec.nodes}")
    if spec.min_nodes is not None:
        elastic.parse_node_range(str(spec.nodes), spec.min_nodes)  # refuses min > max, min < 1
        if spec.min_nodes < spec.nodes and spec.launcher != "srun":
            raise SubmitError(f"--nodes {spec.min_nodes}-{spec.nodes} needs --launcher srun: the restart supervisor "
                              f"re-renders the srun command for the nodes that are left")
    if spec.gpus_per_node < 1:
        raise SubmitError(f"--gpus-per-node must be >= 1 (it is also the number of tasks per node), got {spec.gpus_per_node}")
    if spec.launcher not in ("srun", "deepspeed"):
        raise SubmitError(f"--launcher must be srun or deepspeed, got {spec.launcher!r}")
    if spec.grace < 1:
        raise SubmitError(f"--grace must be >= 1 second, got {spec.grace}")
    if spec.time is not None and not _TIME.match(spec.time):
        raise SubmitError(f"--time {spec.time!r}: expected HH:MM:SS, MM:SS, MM or D-HH:MM:SS")
    if spec.time is not None and spec.grace >= _seconds(spec.time):
        raise SubmitError(f"--grace {spec.grace}s must be shorter than --time {spec.time} "
                          f"({_seconds(spec.time)}s), or the checkpoint warning comes before the job starts")
    for line in spec.sbatch_extra:
        if not line.startswith("#SBATCH "):
            raise SubmitError(f"--sbatch-extra {line!r}: each extra line must start with '#SBATCH '")
    for item in spec.env:
        if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", item):
            raise SubmitError(f"--env {item!r}: expected KEY=VALUE")
    for item in spec.overrides:
        if "=" not in item:
            raise SubmitError(f"override {item!r}: expected section.field=value")


def _seconds(limit: str) -> int:
    """SLURM time limit (MM, MM:SS, HH:MM:SS, D-HH[:MM[:SS]]) in seconds."""
    days, _, rest = limit.rpartition("-")
    parts = [int(p) for p in rest.split(":")]
    if days:
        parts += [0] * (3 - len(parts))
        h, m, sec = parts
    elif len(parts) == 1:
        h, m, sec = 0, parts[0], 0
    elif len(parts) == 2:
        h, (m, sec) = 0, parts
    else:
        h, m, sec = parts
    return ((int(days or 0) * 24 + h) * 60 + m) * 60 + sec


def _train_args(spec: JobSpec) -> list[str]:
    return ["--config", os.path.abspath(os.path.join(spec.workdir, spec.config)), "--resume", "auto", *spec.overrides]


def is_elastic(spec: JobSpec) -> bool:
    return spec.min_nodes is not None and spec.min_nodes < spec.nodes


def _node_directives(spec: JobSpec) -> str:
    if not is_elastic(spec):
        return f"#SBATCH --nodes={spec.nodes}\n#SBATCH --ntasks-per-node={spec.gpus_per_node}"
    lines = [f"#SBATCH --nodes={spec.min_nodes}-{spec.nodes}",
             "# CPUs per node, not --ntasks-per-node: with a task count SLURM allocates the minimum of the range",
             f"#SBATCH --mincpus={spec.gpus_per_node * (spec.cpus_per_task or 1)}"]
    if spec.max_restarts > 0:
        lines += ["# A failed node leaves the allocation instead of ending the job; the step restarts on the rest",
                  "#SBATCH --no-kill"]
    return "\n".join(lines)


def _launch(spec: JobSpec, run_dir: str) -> tuple[str, str]:
    """(setup lines, launch command) for the training step."""
    q = shlex.quote
    bin_dir = os.path.dirname(spec.python)
    setup = ""
    if spec.launcher == "srun":
        entry = ["-m", "megalm.train"] if spec.entry is None else [spec.entry]
        cmd = ["srun", "--kill-on-bad-exit=1", f"--nodes={spec.nodes}", f"--ntasks-per-node={spec.gpus_per_node}",
               spec.python, "-u", *entry, *_train_args(spec)]
        launch = " ".join(q(c) for c in cmd)
    else:
        # deepspeed's slurm runner runs `srun -n WORLD python -u SCRIPT ...`: SCRIPT must be a file.
        script = spec.entry or os.path.join(bin_dir, "megalm-train")
        hostfile_path = os.path.join("$JOB_DIR", rundir.slurm_hostfile_name("$SLURM_JOB_ID"))
        setup = (f"HOSTFILE=\"{hostfile_path}\"\n"
                 f"{q(spec.python)} -m launcher hostfile --slots {spec.gpus_per_node} --output \"$HOSTFILE\"")
        raw = ["deepspeed", "--hostfile", '"$HOSTFILE"', "--launcher", "slurm", "--force_multi", "--no_ssh_check",
               "--master_addr", '"$MASTER_ADDR"', "--master_port", '"$MASTER_PORT"']
        cmd = ["--launcher_args=--kill-on-bad-exit=1", script, *_train_args(spec)]
        launch = " ".join(raw + [q(c) for c in cmd])
    if spec.max_restarts > 0 or is_elastic(spec):
        sup = [spec.python, "-m", "launcher", "run", "--run-dir", run_dir, "--max-restarts", str(spec.max_restarts)]
        if is_elastic(spec):
            layout = elastic.read_batch_layout(os.path.join(spec.workdir, spec.config), spec.overrides)
            counts = elastic.check_node_range(layout, spec.gpus_per_node, spec.min_nodes, spec.nodes)
            sup += ["--min-nodes", str(spec.min_nodes), "--node-counts", ",".join(map(str, counts))]
        if spec.hang_timeout:
            sup += ["--hang-timeout", str(spec.hang_timeout)]
        launch = " ".join(q(c) for c in sup) + " -- " + launch
    return setup, launch


def render(spec: JobSpec, template_path: str = TEMPLATE) -> str:
    _validate(spec)
    run_dir = run_dir_of(spec.config, spec.overrides, spec.workdir)
    for what, path in (("run dir", run_dir), ("working directory", spec.workdir)):
        if re.search(r"\s", path):
            raise SubmitError(f"{what} {path!r} contains whitespace, which #SBATCH --output/--chdir lines cannot "
                              "hold; use a path without spaces")
    q = shlex.quote
    resources = []
    if spec.cpu_only:
        resources.append(f"# CPU-only cluster: no GPU request; still {spec.gpus_per_node} task(s) per node")
    else:
        resources.append(f"#SBATCH --gpus-per-node={spec.gpus_per_node}")
    for opt, value in (("cpus-per-task", spec.cpus_per_task), ("partition", spec.partition),
                       ("account", spec.account), ("time", spec.time), ("constraint", spec.constraint)):
        if value is not None:
            resources.append(f"#SBATCH --{opt}={value}")
    setup, launch = _launch(spec, run_dir)
    values = {
        "config": os.path.abspath(os.path.join(spec.workdir, spec.config)),
        "run_dir": run_dir,
        "run_dir_q": q(run_dir),
        "slurm_dir_q": q(rundir.slurm_dir(run_dir)),
        "job_output": rundir.slurm_output_pattern(run_dir),
        "attempts_file_q": q(rundir.slurm_attempts_file(run_dir)),
        "nodes": f"{spec.min_nodes}-{spec.nodes}" if is_elastic(spec) else str(spec.nodes),
        "node_directives": _node_directives(spec),
        "tasks_per_node": str(spec.gpus_per_node),
        "world_size": (f"{spec.min_nodes * spec.gpus_per_node}-" if is_elastic(spec) else "")
                      + str(spec.nodes * spec.gpus_per_node),
        "too_few_nodes": "" if not is_elastic(spec) else (
            f'if [ "$RC" = {elastic.EXIT_TOO_FEW_NODES} ]; then  # megalm-launch run: fewer than --min-nodes left\n'
            f'  log "fewer than {spec.min_nodes} node(s) left: requeueing job $SLURM_JOB_ID onto '
            f'{spec.min_nodes}-{spec.nodes} nodes"\n  scontrol requeue "$SLURM_JOB_ID"\n  exit 0\nfi'),
        "launcher": spec.launcher,
        "job_name": re.sub(r"[^A-Za-z0-9_.+-]", "_", spec.job_name or f"megalm-{os.path.basename(run_dir)}"),
        "resource_directives": "\n".join(resources),
        "workdir": spec.workdir,
        "grace": str(spec.grace),
        "extra_directives": "\n".join(spec.sbatch_extra),
        "bin_dir_q": q(os.path.dirname(spec.python)),
        "env_exports": "\n".join(f"export {k}={q(v)}" for k, _, v in (e.partition("=") for e in spec.env)),
        "launch_setup": setup,
        "launch": launch,
    }
    with open(template_path) as f:
        template = f.read()
    missing = sorted(set(_PLACEHOLDER.findall(template)) - set(values))
    if missing:
        raise SubmitError(f"template {template_path} uses unknown placeholders: {missing}")
    text = _PLACEHOLDER.sub(lambda m: values[m.group(1)], template)
    return re.sub(r"\n{3,}", "\n\n", text)  # empty optional blocks leave no gaps


def submit(spec: JobSpec) -> tuple[str, str]:
    """Render, write RUN_DIR/slurm/job.sbatch, sbatch it, append the job id to RUN_DIR/slurm/jobs.txt.
    Returns (job id, script path)."""
    text = render(spec)
    run_dir = run_dir_of(spec.config, spec.overrides, spec.workdir)
    os.makedirs(rundir.slurm_dir(run_dir), exist_ok=True)
    script = rundir.slurm_script_file(run_dir)
    with open(script, "w") as f:
        f.write(text)
    job_id = slurm.sbatch(script)
    with open(rundir.slurm_jobs_file(run_dir), "a") as f:
        f.write(f"{job_id}\t{int(time.time())}\t{script}\n")
    return job_id, script


def recorded_jobs(run_dir: str) -> list[str]:
    """Job ids submitted for this run dir, oldest first."""
    path = rundir.slurm_jobs_file(run_dir)
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [line.split("\t")[0] for line in f if line.strip()]
