"""A pool of N long-lived ranks on one machine, joined by a gloo process group, that runs test functions.

Why a pool: starting N Python processes that import torch and rendezvous costs seconds; tests of one
world size share one pool (see `tests/conftest.py::rank_pool`), each test sending a function that every
rank runs. Why the care around hangs: a rank stuck in a collective would otherwise hang CI until its
global limit. Here every call has a timeout; on timeout (or when one rank fails and the others do not
return within a grace period) every live rank's Python stack is dumped with `faulthandler` (SIGUSR2),
the pool is torn down, and the test fails with all stacks in its message.

Rendezvous uses a free port chosen per pool (never 29500, the default other jobs collide on) and an
explicit `timeout` on `init_process_group`.
"""
from __future__ import annotations

import datetime
import faulthandler
import multiprocessing as mp
import os
import queue
import signal
import tempfile
import time
import traceback
from typing import Any, Callable

from megalm.training.launch_env import free_port  # never 29500


class RankPoolError(RuntimeError):
    """A task failed on some rank, or timed out; the message holds every rank's traceback or stack."""


def _worker(rank: int, world_size: int, port: int, tasks, results, stack_file: str, pg_timeout_s: float) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size))
    with open(stack_file, "w") as stack_out:
        faulthandler.register(signal.SIGUSR2, file=stack_out, all_threads=True)
        try:
            import torch
            import torch.distributed as dist

            torch.set_num_threads(1)  # N ranks share 2 cores; oversubscription makes gloo tests crawl
            dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                    world_size=world_size, timeout=datetime.timedelta(seconds=pg_timeout_s))
            results.put(("ready", rank, None))
        except BaseException:
            results.put(("error", rank, traceback.format_exc()))
            return
        while True:
            task = tasks.get()
            if task is None:
                break
            task_id, fn, args, kwargs = task
            try:
                out = fn(*args, **kwargs)
                results.put(("ok", rank, (task_id, out)))
            except BaseException:
                results.put(("error", rank, (task_id, traceback.format_exc())))
            _destroy_leftover_groups()
        try:
            dist.destroy_process_group()
        except Exception:
            pass


def gloo_loop_threads(pid: int | str = "self") -> int:
    """gloo loop threads of process `pid`: one per gloo group still alive (1 = the default group),
    destroyed or not; 0 when the process is gone."""
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
        names = [open(f"/proc/{pid}/task/{t}/comm").read().strip() for t in tasks]
    except OSError:
        return 0
    return names.count("gloo_tcp_loop")


def _destroy_leftover_groups() -> None:
    """Each task starts with only the default group: a group a task left behind (a failed test's grid,
    a model built outside one) would keep its gloo threads polling for the rest of the session and slow
    every later test. The product's own teardown is tested separately (test_parallel_grid.py)."""
    from megalm.parallel.grid import destroy_process_groups, is_grid_initialized, live_process_groups

    if not is_grid_initialized():
        destroy_process_groups(live_process_groups())


class RankPool:
    """`world_size` spawned ranks in one gloo group. `run(fn, *args)` runs fn on every rank and returns
    the per-rank results as a list indexed by rank. `fn` must be importable (module level)."""

    def __init__(self, world_size: int, start_timeout: float = 120.0, pg_timeout_s: float = 120.0,
                 env: dict[str, str] | None = None):
        self.world_size = world_size
        self.port = free_port()
        self._ctx = mp.get_context("spawn")
        self._results = self._ctx.Queue()
        self._tasks = [self._ctx.Queue() for _ in range(world_size)]
        self._stack_dir = tempfile.mkdtemp(prefix=f"rankpool{world_size}-")
        self._next_task = 0
        self.broken = False
        saved = dict(os.environ)
        os.environ.update(env or {})
        try:
            self._procs = [
                self._ctx.Process(target=_worker, name=f"rank{r}", daemon=True,
                                  args=(r, world_size, self.port, self._tasks[r], self._results,
                                        self._stack_file(r), pg_timeout_s))
                for r in range(world_size)
            ]
            for p in self._procs:
                p.start()
        finally:
            os.environ.clear()
            os.environ.update(saved)
        self._collect("ready", None, start_timeout, what=f"start of {world_size} ranks on port {self.port}")

    def gloo_threads(self) -> int:
        """The most gloo loop threads any rank holds (`gloo_loop_threads`); an engine that was never
        closed keeps its groups (DESIGN decision 52)."""
        return max((gloo_loop_threads(p.pid) for p in self._procs), default=0)

    def _stack_file(self, rank: int) -> str:
        return os.path.join(self._stack_dir, f"rank{rank}.stack")

    def run(self, fn: Callable, *args: Any, timeout: float = 120.0, **kwargs: Any) -> list[Any]:
        __tracebackhide__ = True  # the failure is the ranks' tracebacks in the message, not this frame
        if self.broken:
            raise RankPoolError("pool is broken by an earlier failure; create a new one")
        task_id = self._next_task
        self._next_task += 1
        for q in self._tasks:
            q.put((task_id, fn, args, kwargs))
        return self._collect("ok", task_id, timeout, what=f"{getattr(fn, '__qualname__', fn)}")

    def _collect(self, kind: str, task_id: int | None, timeout: float, what: str,
                 error_grace: float = 10.0) -> list[Any]:
        __tracebackhide__ = True
        out: dict[int, Any] = {}
        errors: dict[int, str] = {}
        deadline = time.monotonic() + timeout
        while len(out) + len(errors) < self.world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                status, rank, payload = self._results.get(timeout=min(remaining, 1.0))
            except queue.Empty:
                dead = [r for r, p in enumerate(self._procs) if not p.is_alive() and r not in out and r not in errors]
                for r in dead:
                    errors[r] = f"process exited with code {self._procs[r].exitcode} without reporting"
                if errors:  # once one rank failed, the rest get a short grace period, not the full timeout
                    deadline = min(deadline, time.monotonic() + error_grace)
                continue
            if status == "error":
                errors[rank] = payload[1] if isinstance(payload, tuple) else payload
                deadline = min(deadline, time.monotonic() + error_grace)
            elif status == kind and (task_id is None or payload[0] == task_id):
                out[rank] = payload[1] if task_id is not None else payload
        missing = [r for r in range(self.world_size) if r not in out and r not in errors]
        if not errors and not missing:
            return [out[r] for r in range(self.world_size)]
        stacks = self._dump_stacks(missing)
        self.close(force=True)
        parts = [f"{what} failed on {self.world_size} ranks:"]
        parts += [f"--- rank {r} raised:\n{tb}" for r, tb in sorted(errors.items())]
        parts += [f"--- rank {r} did not finish within {timeout:.0f}s; its stack:\n{stacks.get(r, '(none)')}"
                  for r in missing]
        raise RankPoolError("\n".join(parts))

    def _dump_stacks(self, ranks: list[int]) -> dict[int, str]:
        for r in ranks:
            if self._procs[r].is_alive():
                try:
                    os.kill(self._procs[r].pid, signal.SIGUSR2)
                except ProcessLookupError:
                    pass
        time.sleep(1.0)
        stacks = {}
        for r in ranks:
            try:
                with open(self._stack_file(r)) as f:
                    stacks[r] = f.read().strip() or "(empty: process did not respond)"
            except OSError as e:
                stacks[r] = f"(unreadable: {e})"
        return stacks

    def close(self, force: bool = False) -> None:
        self.broken = True
        if not force:
            for q in self._tasks:
                q.put(None)
            for p in self._procs:
                p.join(timeout=10)
        for p in self._procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=5)

    def __enter__(self) -> "RankPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
