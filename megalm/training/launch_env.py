"""Map whatever launched us (torchrun, deepspeed, srun, mpirun) onto RANK/WORLD_SIZE/LOCAL_RANK/MASTER_*.

torchrun and the deepspeed launcher set the torch variables themselves. Under `srun` we read SLURM's
task variables and take the first node of the allocation as master; under `mpirun` we ask MPI (mpi4py)
for rank and size and broadcast rank 0's address and a free port. The result is written back into
os.environ so that torch.distributed's env:// rendezvous and DeepSpeed see one consistent story.
"""
from __future__ import annotations

import os
import re
import socket
import subprocess
from dataclasses import dataclass
from typing import Mapping

DEFAULT_PORT_TO_AVOID = 29500


@dataclass(frozen=True)
class LaunchEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    launcher: str  # "torch" (torchrun/deepspeed), "slurm", "mpi" or "single"


def first_host(nodelist: str) -> str:
    """First host of a SLURM nodelist such as 'gpu[03-05,9],cpu1' -> 'gpu03' (no scontrol needed)."""
    m = re.match(r"([^,\[]+)(\[([^\]]+)\])?", nodelist.strip())
    if not m:
        raise ValueError(f"cannot parse SLURM nodelist {nodelist!r}")
    prefix, _, ranges = m.groups()
    if not ranges:
        return prefix
    first = ranges.split(",")[0].split("-")[0]
    return prefix + first


def slurm_master_port(job_id: str) -> int:
    """A port derived from the job id: two jobs sharing a node do not collide, every task agrees."""
    port = 20000 + int(job_id) % 20000
    return port + 1 if port == DEFAULT_PORT_TO_AVOID else port


def free_port() -> int:
    """A TCP port free right now for a rendezvous on this host, never 29500 (the default other jobs use)."""
    while True:
        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        if port != DEFAULT_PORT_TO_AVOID:
            return port


def discover(environ: Mapping[str, str] | None = None) -> LaunchEnv:
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return LaunchEnv(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)),
                         env.get("MASTER_ADDR", "127.0.0.1"), int(env.get("MASTER_PORT", "29501")), "torch")
    # SLURM_STEP_NUM_TASKS is set for `srun` job steps, not for the batch script itself, so a plain
    # `python -m megalm.train` inside an sbatch script is not mistaken for one task of many.
    if "SLURM_PROCID" in env and "SLURM_STEP_NUM_TASKS" in env:
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST", "127.0.0.1")
        addr = env.get("MASTER_ADDR") or _resolve_first_host(nodelist)
        port = int(env.get("MASTER_PORT") or slurm_master_port(env.get("SLURM_JOB_ID", "0")))
        return LaunchEnv(int(env["SLURM_PROCID"]), int(env["SLURM_STEP_NUM_TASKS"]), int(env.get("SLURM_LOCALID", 0)),
                         addr, port, "slurm")
    if any(k in env for k in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MPI_LOCALRANKID")):
        return _discover_mpi(env)
    return LaunchEnv(0, 1, 0, "127.0.0.1", int(env.get("MASTER_PORT") or free_port()), "single")


def _resolve_first_host(nodelist: str) -> str:
    try:  # scontrol knows every nodelist syntax; our parser is the fallback off-cluster
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                             timeout=30, check=True).stdout.split()
        if out:
            return out[0]
    except (OSError, subprocess.SubprocessError):
        pass
    return first_host(nodelist)


def _discover_mpi(env: Mapping[str, str]) -> LaunchEnv:
    try:
        from mpi4py import MPI
    except ImportError as e:
        raise RuntimeError("launched by mpirun but mpi4py is not importable: pip install 'megalm[mpi]' "
                           f"(mpi4py + an MPI library) ({e})") from None
    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    local = comm.Split_type(MPI.COMM_TYPE_SHARED)
    local_rank = local.Get_rank()
    addr, port = None, None
    if rank == 0:
        addr = env.get("MASTER_ADDR") or socket.gethostbyname(socket.gethostname())
        port = int(env.get("MASTER_PORT") or free_port())
    addr, port = comm.bcast((addr, port), root=0)
    return LaunchEnv(rank, size, local_rank, addr, port, "mpi")


def export(launch: LaunchEnv) -> None:
    """Write the discovered values into os.environ for torch.distributed (env://) and DeepSpeed."""
    os.environ.update(RANK=str(launch.rank), WORLD_SIZE=str(launch.world_size),
                      LOCAL_RANK=str(launch.local_rank), MASTER_ADDR=launch.master_addr,
                      MASTER_PORT=str(launch.master_port))
