"""SIGTERM/SIGUSR1 -> checkpoint and exit 0; SIGUSR2 -> dump every thread's stack (hang debugging).

The handler only sets a flag; the loop checks it after each step and all ranks agree through an
all-reduce, so a signal that reaches only some ranks (scancel --batch, a supervisor) still makes every
rank save the same step.

SIGUSR2 stack dumps go to RUN_DIR/stacks/rank<N>.txt, one file per rank: ranks that share a stderr
would interleave their dumps line by line (seen in CI), which makes the hung rank's stack unreadable.
`megalm-launch run` prints these files in rank order after it sends SIGUSR2.
"""
from __future__ import annotations

import faulthandler
import os
import signal
from typing import IO, Optional

from megalm.rundir import stack_file  # RUN_DIR/stacks/rankNNNNN.txt; re-exported for the loop

__all__ = ["StopRequest", "stack_file"]


class StopRequest:
    def __init__(self) -> None:
        self.signum: int | None = None
        self._stack_out: Optional[IO] = None  # kept open: faulthandler writes to its file descriptor

    def install(self, stack_dump_path: Optional[str] = None) -> None:
        """Route SIGTERM/SIGUSR1 to the flag; with `stack_dump_path`, SIGUSR2 dumps stacks there
        (None where a test harness already routes SIGUSR2 to its own file)."""
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)
        if stack_dump_path:
            os.makedirs(os.path.dirname(stack_dump_path), exist_ok=True)
            self._stack_out = open(stack_dump_path, "w")  # truncated: a restart starts a fresh file
            faulthandler.register(signal.SIGUSR2, file=self._stack_out, all_threads=True)

    def _handle(self, signum, frame) -> None:
        self.signum = signum

    @property
    def requested(self) -> bool:
        return self.signum is not None
