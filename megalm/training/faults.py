"""Fault injection for tests and fire drills, from MEGALM_FAULT (comma-separated):

    nan@STEP           the loss of step STEP (as logged: steps count from 1) becomes NaN, so its
                       update is skipped (exercises the non-finite skip)
    hang@STEP[:RANK]   RANK (default 0) stops stepping once step STEP is done (exercises hang detection)
    crash@STEP[:RANK]  RANK exits with status 17 once step STEP is done (exercises restarts)
    stop@STEP          every rank stops as on SIGTERM once step STEP is done: checkpoint, exit 0
                       (a preemption at a known step: exercises resumes, e.g. on another dp size)

Unset in normal runs; parsing errors fail loudly so a mistyped drill does not silently do nothing.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass


@dataclass(frozen=True)
class Fault:
    kind: str
    step: int
    rank: int = 0


def parse_faults(spec: str | None = None) -> list[Fault]:
    spec = os.environ.get("MEGALM_FAULT", "") if spec is None else spec
    faults = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        try:
            kind, rest = item.split("@")
            step, _, rank = rest.partition(":")
            fault = Fault(kind, int(step), int(rank) if rank else 0)
        except ValueError:
            raise ValueError(f"MEGALM_FAULT: cannot parse {item!r}; expected KIND@STEP[:RANK]") from None
        if kind not in ("nan", "hang", "crash", "stop"):
            raise ValueError(f"MEGALM_FAULT: unknown kind {kind!r} in {item!r}; use nan, hang, crash or stop")
        faults.append(fault)
    return faults


def nan_at(faults: list[Fault], step: int) -> bool:
    """Whether the loss of (1-based, logged) step `step` is to be poisoned."""
    return any(f.kind == "nan" and f.step == step for f in faults)


def stop_after(faults: list[Fault], step: int) -> bool:
    """Whether the run is to stop (checkpoint and exit, as on SIGTERM) now that `step` steps are done."""
    return any(f.kind == "stop" and f.step == step for f in faults)


def act(faults: list[Fault], step: int, rank: int) -> None:
    """Called before each step with the number of steps done: hang or crash where a drill says so."""
    for f in faults:
        if f.step == step and f.rank == rank:
            if f.kind == "crash":
                os._exit(17)
            if f.kind == "hang":
                while True:
                    time.sleep(1)
