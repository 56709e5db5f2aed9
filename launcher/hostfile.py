"""DeepSpeed hostfiles from a SLURM allocation: one `HOST slots=N` line per node.

Inside a job, `python -m launcher hostfile --slots G` expands SLURM_JOB_NODELIST (with
`scontrol show hostnames`, which knows every nodelist syntax; a small parser is the fallback when
scontrol is absent) and writes the file `deepspeed --hostfile` reads.
"""
from __future__ import annotations

import re

from . import slurm


def expand_nodelist(nodelist: str) -> list[str]:
    """'gpu[01-03,7],cpu1' -> ['gpu01', 'gpu02', 'gpu03', 'gpu7', 'cpu1'], preferring scontrol."""
    try:
        hosts = slurm.hostnames(nodelist)
        if hosts:
            return hosts
    except slurm.SlurmError:
        pass
    return parse_nodelist(nodelist)


def parse_nodelist(nodelist: str) -> list[str]:
    """Pure-Python expansion of the common nodelist forms (prefix[a-b,c]suffix, comma separated)."""
    hosts: list[str] = []
    for m in re.finditer(r"([^,\[]+)(?:\[([^\]]+)\])?([^,\[]*)", nodelist.strip()):
        prefix, ranges, suffix = m.group(1), m.group(2), m.group(3)
        if not prefix and not ranges:
            continue
        if ranges is None:
            hosts.append(prefix + suffix)
            continue
        for part in ranges.split(","):
            lo, _, hi = part.partition("-")
            if not hi:
                hosts.append(f"{prefix}{lo}{suffix}")
                continue
            width = len(lo)
            for i in range(int(lo), int(hi) + 1):
                hosts.append(f"{prefix}{i:0{width}d}{suffix}")
    return hosts


def render_hostfile(hosts: list[str], slots: int) -> str:
    if slots < 1:
        raise ValueError(f"slots per host must be >= 1, got {slots}")
    if not hosts:
        raise ValueError("no hosts: is SLURM_JOB_NODELIST set (run this inside an allocation)?")
    return "".join(f"{h} slots={slots}\n" for h in hosts)


def write_hostfile(path: str, nodelist: str, slots: int) -> list[str]:
    hosts = expand_nodelist(nodelist)
    with open(path, "w") as f:
        f.write(render_hostfile(hosts, slots))
    return hosts
