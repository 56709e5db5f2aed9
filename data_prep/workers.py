"""Worker processes that map a function over tasks in order, and that an interrupt always ends.

Not multiprocessing.Pool: its terminate() deadlocks now and then when the parent is interrupted while
workers are busy (the fault drill: SIGINT to the main process of `tokenize --workers 2` hung 4 times in
7, the parent blocked on a lock of the shared result queue that a worker held while writing a large
result nobody read any more, workers left as zombies). Here no lock is shared between processes: each
worker has a pipe for tasks and a pipe for results of its own, tasks go round-robin, and results are
read back from the worker that has the oldest task, so they come back in submission order. Stopping is
SIGKILL, reap, close: it needs nothing from the workers, whatever state they are in.

Signals: the parent decides when workers stop. Workers ignore SIGINT and SIGTERM (a Ctrl-C reaches
the whole process group; without this each worker printed a KeyboardInterrupt traceback), and both are
blocked while a worker starts, so one that arrives during its interpreter's start-up is dropped too.
A worker whose parent died without cleaning up (SIGKILL) sees its task pipe close and exits.
"""
from __future__ import annotations

import collections
import multiprocessing as mp
from multiprocessing import resource_tracker
import queue
import signal
import threading
from typing import Any, Callable, Iterable, Iterator, Optional

STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}


class WorkerDied(RuntimeError):
    """A worker process ended without being asked to (killed, e.g. by the out-of-memory killer)."""


class WorkerTraceback(Exception):
    """The traceback of an exception raised in a worker, attached as the re-raised exception's cause."""


def _worker_main(tasks: Any, results: Any, func: Callable[[Any], Any], initializer: Optional[Callable[..., None]],
                 initargs: tuple) -> None:
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)  # blocked by the parent around start()
    if initializer is not None:
        initializer(*initargs)
    inbox: queue.SimpleQueue = queue.SimpleQueue()

    def receive() -> None:
        # Always draining the task pipe means the parent's send never waits on a worker that is itself
        # blocked sending a result (which would deadlock both).
        while True:
            try:
                inbox.put(tasks.recv())
            except (EOFError, OSError):
                inbox.put(None)
                return

    threading.Thread(target=receive, daemon=True, name="tasks").start()
    while (task := inbox.get()) is not None:
        try:
            reply = (True, func(task))
        except Exception as exc:  # noqa: BLE001 - handed to the parent, which re-raises it
            import traceback

            reply = (False, (exc, traceback.format_exc()))
        try:
            results.send(reply)
        except (BrokenPipeError, OSError):  # the parent is gone
            return


class OrderedWorkers:
    """`n` spawned processes running `func`; `map` yields func(task) for each task in input order,
    with at most `max_in_flight` tasks submitted and not yet yielded."""

    def __init__(self, n: int, func: Callable[[Any], Any], initializer: Optional[Callable[..., None]] = None,
                 initargs: tuple = (), max_in_flight: Optional[int] = None):
        # spawn, not fork: the parent may hold threads (progress bar, Rayon) that must not be forked.
        ctx = mp.get_context("spawn")
        self.max_in_flight = max_in_flight or 4 * n + 2
        self._procs: list[Any] = []
        self._task_pipes: list[Any] = []
        self._result_pipes: list[Any] = []
        try:
            # spawn starts multiprocessing's resource tracker on first use, and that *unblocks* SIGINT
            # and SIGTERM on its way out: start it now, before they are blocked for the workers' start.
            resource_tracker.ensure_running()
            for i in range(n):
                task_r, task_w = ctx.Pipe(duplex=False)
                result_r, result_w = ctx.Pipe(duplex=False)
                proc = ctx.Process(target=_worker_main, args=(task_r, result_w, func, initializer, initargs),
                                   name=f"megalm-prep-worker-{i}", daemon=True)
                old = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
                try:
                    proc.start()  # the child inherits the blocked mask through fork + exec
                finally:
                    signal.pthread_sigmask(signal.SIG_SETMASK, old)
                self._procs.append(proc)
                self._task_pipes.append(task_w)
                self._result_pipes.append(result_r)
                task_r.close()  # the worker's ends: closing ours lets each side see the other go
                result_w.close()
        except BaseException:
            self.close()
            raise

    def _died(self, i: int) -> WorkerDied:
        proc = self._procs[i]
        proc.join(timeout=5)
        return WorkerDied(f"tokenizer worker {i} (pid {proc.pid}) ended unexpectedly with exit code {proc.exitcode} "
                          f"(a negative code is the signal that killed it, -9 often the out-of-memory killer)")

    def _send(self, i: int, task: Any) -> None:
        try:
            self._task_pipes[i].send(task)
        except (BrokenPipeError, OSError):
            raise self._died(i) from None

    def _receive(self, i: int) -> Any:
        try:
            ok, value = self._result_pipes[i].recv()
        except (EOFError, OSError):
            raise self._died(i) from None
        if not ok:
            exc, trace = value
            raise exc from WorkerTraceback(f"in worker process {i}:\n{trace}")
        return value

    def map(self, items: Iterable[tuple[Any, Any]]) -> Iterator[tuple[Any, Any]]:
        """For each (metadata, task) yield (metadata, func(task)), in input order."""
        pending: collections.deque = collections.deque()  # (metadata, worker index), oldest first
        turn = 0
        for meta, task in items:
            self._send(turn, task)
            pending.append((meta, turn))
            turn = (turn + 1) % len(self._procs)
            if len(pending) >= self.max_in_flight:
                meta0, i = pending.popleft()
                yield meta0, self._receive(i)
        while pending:
            meta0, i = pending.popleft()
            yield meta0, self._receive(i)

    def close(self) -> None:
        """Kill and reap every worker. Stop signals are held off meanwhile, so a second Ctrl-C cannot
        leave workers behind; one that arrives is delivered when this returns."""
        old = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            for proc in self._procs:
                proc.kill()  # nothing to save in a worker: its results are only in the parent's shards
            for proc in self._procs:
                proc.join()
                proc.close()
            for conn in self._task_pipes + self._result_pipes:
                conn.close()
            self._procs, self._task_pipes, self._result_pipes = [], [], []
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)
