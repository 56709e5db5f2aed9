"""SIGTERM/SIGUSR1 -> checkpoint and exit 0; SIGUSR2 -> dump every thread's stack (hang debugging).

The handler only sets a flag; the loop checks it after each step and all ranks agree through an
all-reduce, so a signal that reaches only some ranks (scancel --batch, a supervisor) still makes every
rank save the same step.
"""
from __future__ import annotations

import faulthandler
import signal
import sys


class StopRequest:
    def __init__(self) -> None:
        self.signum: int | None = None

    def install(self, stack_dump: bool = True) -> None:
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)
        if stack_dump:  # off where a test harness already routes SIGUSR2 stack dumps to its own file
            faulthandler.register(signal.SIGUSR2, file=sys.stderr, all_threads=True)

    def _handle(self, signum, frame) -> None:
        self.signum = signum

    @property
    def requested(self) -> bool:
        return self.signum is not None
