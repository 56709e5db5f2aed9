"""The run-directory lock: one trainer per RUN_DIR (two interleave metrics.jsonl and race checkpoints).

Standard library only: the trainer takes the lock, the launcher (on a login node) reads it to tell a
save in progress from an abandoned one. A lock file created with O_CREAT|O_EXCL (`rundir.lock_file`),
not flock: O_EXCL creation is atomic on NFS v3+ and Lustre, flock is not reliable there. It holds
JSON {host, pid, pid_start, started_at, slurm_job_id, token}. When it exists, its holder is judged:

  * same host: stale when the pid no longer exists, is now another process (its start time differs:
    pid reuse, e.g. in a restarted container), or is this very process; else live.
  * another host (we cannot see its processes): stale when the holder has the same SLURM_JOB_ID as
    us (SLURM requeued the job: its earlier attempt is dead) or when neither the run's heartbeat nor
    the lock file changed for `stale_after_s()` seconds; else live.

A stale lock is taken over (said in the log); a live one is refused with a message naming the holder.
"""
from __future__ import annotations

import contextlib
import datetime
import json
import os
import socket
import time
import uuid
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

from megalm import rundir

STALE_AFTER_S = 1800.0  # no heartbeat for 30 min on another host: dead (longer than any index build we saw)
STALE_ENV = "MEGALM_LOCK_STALE_S"  # overrides STALE_AFTER_S (seconds)
_UNREADABLE_GRACE_S = 10.0  # an empty/garbled lock younger than this may be mid-write by its creator
_TAKEOVER_TRIES = 3


class RunDirInUse(RuntimeError):
    """Another live run holds RUN_DIR's lock."""


def stale_after_s() -> float:
    try:
        return float(os.environ.get(STALE_ENV, STALE_AFTER_S))
    except ValueError:
        return STALE_AFTER_S


def _pid_start(pid: int) -> Optional[str]:
    """The process's start time in clock ticks (/proc/PID/stat field 22): tells pid reuse apart."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def _mtime(path: str) -> Optional[float]:
    try:
        return os.stat(path).st_mtime
    except OSError:
        return None


def read_holder(run_dir: str) -> tuple[Optional[dict], Optional[bytes]]:
    """(parsed holder or None when unreadable, raw bytes or None when there is no lock file)."""
    try:
        with open(rundir.lock_file(run_dir), "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        return None, None
    try:
        holder = json.loads(raw)
    except ValueError:
        return None, raw
    return (holder if isinstance(holder, dict) else None), raw


def _since(holder: dict) -> str:
    t = holder.get("started_at")
    if not isinstance(t, (int, float)):
        return "an unknown time"
    return datetime.datetime.fromtimestamp(t).astimezone().isoformat(timespec="seconds")


@dataclass
class Verdict:
    live: bool
    why: str  # for the log (takeover) or the launcher's listing


def judge(run_dir: str, holder: Optional[dict], takeover_same_job: bool = True,
          now: Optional[float] = None) -> Verdict:
    """Is the lock's holder a live run? `takeover_same_job` is False for onlookers (the launcher), which
    must not call a run dead because they happen to run inside its SLURM job."""
    now = time.time() if now is None else now
    path = rundir.lock_file(run_dir)
    if holder is None:
        age = now - (_mtime(path) or now)
        if age > _UNREADABLE_GRACE_S:
            return Verdict(False, f"{path} is unreadable (a crash while it was written)")
        return Verdict(True, f"{path} is being written")
    host, pid = holder.get("host"), holder.get("pid")
    if host == socket.gethostname() and isinstance(pid, int):
        if pid == os.getpid():
            return Verdict(False, f"pid {pid} is this process (an earlier run in it did not release)")
        if not _pid_alive(pid):
            return Verdict(False, f"pid {pid} no longer exists on host {host}")
        if holder.get("pid_start") not in (None, _pid_start(pid)):
            return Verdict(False, f"pid {pid} on host {host} is now another process")
        return Verdict(True, f"pid {pid} is running on host {host}")
    job = os.environ.get("SLURM_JOB_ID")
    if takeover_same_job and job and holder.get("slurm_job_id") == job:
        return Verdict(False, f"it belongs to SLURM job {job}, this job's earlier (requeued) attempt")
    fresh = max(t for t in (_mtime(rundir.heartbeat_file(run_dir)), _mtime(path), 0.0) if t is not None)
    idle, limit = now - fresh, stale_after_s()
    if idle > limit:
        return Verdict(False, f"no heartbeat from host {host} for {idle:.0f}s (stale after {limit:.0f}s, {STALE_ENV})")
    return Verdict(True, f"host {host} beat {idle:.0f}s ago")


def holder_alive(run_dir: str) -> tuple[bool, Optional[dict]]:
    """For onlookers: (a live run holds RUN_DIR's lock, its holder record)."""
    holder, raw = read_holder(run_dir)
    if raw is None:
        return False, None
    return judge(run_dir, holder, takeover_same_job=False).live, holder


def in_use_message(run_dir: str, holder: Optional[dict]) -> str:
    path = rundir.lock_file(run_dir)
    h = holder or {}
    job = f", SLURM job {h['slurm_job_id']}" if h.get("slurm_job_id") else ""
    return (f"run directory {run_dir} is in use by pid {h.get('pid', '?')} on host {h.get('host', '?')} "
            f"(since {_since(h)}{job}): wait for it, or remove {path} if that run is dead")


class RunDirLock:
    """A held lock; `release` removes the file only while it is still ours (after a takeover by someone
    who judged us dead, the file is theirs)."""

    def __init__(self, run_dir: str, token: str):
        self.run_dir, self.token = run_dir, token

    def release(self) -> None:
        holder, _ = read_holder(self.run_dir)
        if holder is not None and holder.get("token") == self.token:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(rundir.lock_file(self.run_dir))


def _take_away(path: str, raw: bytes) -> bool:
    """Remove the stale lock whose content was `raw`, unless it changed meanwhile (a rival took it
    over first and wrote its own): rename aside, compare, put a changed one back with link (which,
    like O_EXCL, fails if a third lock exists). True when the stale lock is gone."""
    aside = f"{path}.stale-{socket.gethostname()}-{os.getpid()}"
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return False
    with open(aside, "rb") as f:
        same = f.read() == raw
    if not same:
        with contextlib.suppress(FileExistsError):
            os.link(aside, path)
    os.unlink(aside)
    return same


def acquire(run_dir: str, log: Callable[[str], None] = print) -> RunDirLock:
    """Take RUN_DIR's lock (creating RUN_DIR), taking over a stale one; RunDirInUse when it is live."""
    os.makedirs(run_dir, exist_ok=True)
    path = rundir.lock_file(run_dir)
    token = uuid.uuid4().hex
    record = {"host": socket.gethostname(), "pid": os.getpid(), "pid_start": _pid_start(os.getpid()),
              "started_at": time.time(), "slurm_job_id": os.environ.get("SLURM_JOB_ID"), "token": token}
    for _ in range(_TAKEOVER_TRIES):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder, raw = read_holder(run_dir)
            if raw is None:
                continue  # released between our open and read
            verdict = judge(run_dir, holder)
            if verdict.live:
                raise RunDirInUse(in_use_message(run_dir, holder)) from None
            if _take_away(path, raw):
                log(f"megalm-train: taking over the stale lock {path} ({verdict.why})")
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(record, f)
            f.flush()
            os.fsync(f.fileno())
        return RunDirLock(run_dir, token)
    holder, _ = read_holder(run_dir)
    raise RunDirInUse(in_use_message(run_dir, holder) + " (it changed while we took it over: another run "
                      "is starting there)")


@contextlib.contextmanager
def hold(run_dir: str, is_holder: bool, agree: Callable[[bool], bool],
         log: Callable[[str], None] = print) -> Iterator[Optional[RunDirLock]]:
    """For a group of ranks: the holder (rank 0) takes the lock, `agree` (any_rank) tells every rank
    whether it failed, so all raise together instead of the others hanging in the next collective.
    Released when the block exits: normal end, signal stop (the loop returns) or exception."""
    lock, error = None, None
    if is_holder:
        try:
            lock = acquire(run_dir, log)
        except (RunDirInUse, OSError) as e:
            error = e
    if agree(error is not None):
        raise error or RunDirInUse(f"run directory {run_dir} is in use (rank 0 names the holder)")
    try:
        yield lock
    finally:
        if lock is not None:
            lock.release()
