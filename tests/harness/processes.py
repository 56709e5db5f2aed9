"""Run a command (a CLI, a launcher, a whole multi-rank job) with a hard timeout that never hangs CI.

On timeout the whole process tree gets SIGUSR2 first (megalm entry points register faulthandler on
it and print every thread's stack to stderr), then SIGKILL. "Tree", not process group: torchrun starts
its workers in sessions of their own, so a group kill would leave the ranks running as orphans.
The failure message carries the command and the tail of its output.
"""
from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import dataclass

from launcher.supervisor import descendants


@dataclass
class CommandResult:
    args: list[str]
    returncode: int
    output: str  # stdout and stderr interleaved

    def check(self, expect: int = 0) -> "CommandResult":
        assert self.returncode == expect, (
            f"{' '.join(self.args)} exited {self.returncode} (expected {expect}); output tail:\n{self.output[-6000:]}")
        return self


def signal_tree(pid: int, sig: int) -> None:
    """Send `sig` to `pid` and every process below it (collected before anything is signalled)."""
    for p in [pid, *descendants(pid)]:
        try:
            os.kill(p, sig)
        except ProcessLookupError:
            pass


def run_command(args: list[str], timeout: float, env: dict[str, str] | None = None, cwd: str | None = None,
                check: bool = False) -> CommandResult:
    full_env = dict(os.environ)
    full_env.update(env or {})
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=cwd, env=full_env,
                            start_new_session=True, text=True, errors="replace")
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        signal_tree(proc.pid, signal.SIGUSR2)
        time.sleep(2.0)
        signal_tree(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        raise AssertionError(f"{' '.join(args)} did not finish within {timeout:.0f}s and was killed; "
                             f"output tail (with stacks where the processes dumped them):\n{out[-12000:]}")
    result = CommandResult(list(args), proc.returncode, out)
    return result.check() if check else result
