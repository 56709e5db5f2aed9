"""The run-directory lock (megalm/runlock.py): a second run into a live run's directory is refused with a
message naming the holder; dead holders (same host: pid gone; other host: no heartbeat, or the same
SLURM job requeued) are taken over; the trainer releases it on normal exit, signal stop and exception.
Real processes and real lock files throughout; a holder "on another host" is a lock file whose
recorded host is not ours (the input, not a mock of the lock)."""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

from megalm import rundir, runlock
from tests.harness import run_command, signal_tree
from tests.train_fixtures import TINY_RUN, write_synthetic_shard

ENV = {"OMP_NUM_THREADS": "1"}
HOLD = ("import sys, time; from megalm import runlock; runlock.acquire(sys.argv[1]); "
        "print('held', flush=True); time.sleep(600)")


@pytest.fixture(scope="module")
def shard(tmp_path_factory):
    return write_synthetic_shard(str(tmp_path_factory.mktemp("shard") / "tokens"))


def _train(shard: str, run_dir: str, *extra: str, steps: int = 4):
    cmd = [sys.executable, "-m", "megalm.train", "--config", TINY_RUN, f"data.train_paths=[{shard}]",
           f"train.run_dir={run_dir}", f"train.train_steps={steps}", *extra]
    return run_command(cmd, timeout=300, env=ENV)


def _holder_process(run_dir: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, run_dir], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def _write_lock(run_dir: str, **fields) -> None:
    os.makedirs(run_dir, exist_ok=True)
    record = {"host": "other-node-17", "pid": 4242, "started_at": time.time(), "slurm_job_id": None, "token": "x"}
    record.update(fields)
    with open(rundir.lock_file(run_dir), "w") as f:
        json.dump(record, f)


def _age(path: str, seconds: float) -> None:
    t = time.time() - seconds
    os.utime(path, (t, t))


def test_second_run_into_a_live_runs_directory_is_refused(shard, tmp_path):
    run_dir = str(tmp_path / "run")
    holder = _holder_process(run_dir)
    try:
        res = _train(shard, run_dir)
    finally:
        holder.kill()
        holder.wait()
    assert res.returncode == 2, res.output
    lock = rundir.lock_file(run_dir)
    assert re.search(rf"megalm-train: run directory {re.escape(run_dir)} is in use by pid {holder.pid} on host "
                     rf"{re.escape(socket.gethostname())} \(since [^)]+\): wait for it, or remove "
                     rf"{re.escape(lock)} if that run is dead", res.output), res.output
    assert "Traceback" not in res.output
    # Nothing of the refused run landed in the directory.
    assert sorted(os.listdir(run_dir)) == [rundir.LOCK_FILE]


def test_dead_holder_on_this_host_is_taken_over_and_released_at_exit(shard, tmp_path):
    run_dir = str(tmp_path / "run")
    holder = _holder_process(run_dir)
    holder.send_signal(signal.SIGKILL)  # dies holding the lock, as a SIGKILLed trainer does
    holder.wait()
    assert os.path.exists(rundir.lock_file(run_dir))
    res = _train(shard, run_dir).check()
    assert f"taking over the stale lock {rundir.lock_file(run_dir)} (pid {holder.pid} no longer exists" in res.output
    assert not os.path.exists(rundir.lock_file(run_dir)), "lock not released after a normal exit"


def test_lock_is_released_when_training_fails(shard, tmp_path):
    run_dir = str(tmp_path / "run")
    res = _train(shard, run_dir, "--resume", "step_00000099")  # no such checkpoint: raises inside train
    assert res.returncode != 0 and "step_00000099" in res.output, res.output
    assert not os.path.exists(rundir.lock_file(run_dir)), "lock left behind by a failed run"


def test_lock_is_released_after_a_signal_stop(shard, tmp_path):
    run_dir = str(tmp_path / "run")
    cmd = [sys.executable, "-m", "megalm.train", "--config", TINY_RUN, f"data.train_paths=[{shard}]",
           f"train.run_dir={run_dir}", "train.train_steps=100000", "train.save_interval=0"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, env={**os.environ, **ENV})
    try:
        deadline = time.monotonic() + 240
        while not os.path.exists(rundir.heartbeat_file(run_dir)):
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
            time.sleep(0.2)
        with open(rundir.lock_file(run_dir)) as f:
            assert json.load(f)["pid"] == proc.pid
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            signal_tree(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0 and "stop signal received" in out, out[-3000:]
    assert not os.path.exists(rundir.lock_file(run_dir))


# ---- the holder rules, on real lock files (no trainer needed) -----------------------------------------

def test_other_host_with_fresh_heartbeat_is_live(tmp_path):
    run_dir = str(tmp_path / "run")
    _write_lock(run_dir, started_at=time.time() - 7200)
    _age(rundir.lock_file(run_dir), 7200)
    rundir.write_atomic(rundir.heartbeat_file(run_dir), "{}")  # beat just now
    with pytest.raises(runlock.RunDirInUse, match="in use by pid 4242 on host other-node-17"):
        runlock.acquire(run_dir)


def test_other_host_without_heartbeat_past_the_timeout_is_taken_over(tmp_path):
    run_dir = str(tmp_path / "run")
    _write_lock(run_dir)
    _age(rundir.lock_file(run_dir), runlock.STALE_AFTER_S + 60)
    logs: list[str] = []
    lock = runlock.acquire(run_dir, log=logs.append)
    assert "no heartbeat from host other-node-17" in logs[0]
    with open(rundir.lock_file(run_dir)) as f:
        assert json.load(f)["pid"] == os.getpid()
    lock.release()
    assert not os.path.exists(rundir.lock_file(run_dir))


def test_requeued_slurm_job_takes_over_its_own_lock(tmp_path, monkeypatch):
    run_dir = str(tmp_path / "run")
    _write_lock(run_dir, slurm_job_id="5501")  # fresh: another host would be live but for the job id
    monkeypatch.setenv("SLURM_JOB_ID", "5501")
    logs: list[str] = []
    runlock.acquire(run_dir, log=logs.append).release()
    assert "SLURM job 5501" in logs[0]
    # An onlooker inside that job (the launcher) still sees a live run.
    _write_lock(run_dir, slurm_job_id="5501")
    assert runlock.holder_alive(run_dir)[0]
    monkeypatch.setenv("SLURM_JOB_ID", "5502")
    with pytest.raises(runlock.RunDirInUse):
        runlock.acquire(run_dir)


def test_reused_pid_on_this_host_is_stale(tmp_path):
    run_dir = str(tmp_path / "run")
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:
        _write_lock(run_dir, host=socket.gethostname(), pid=sleeper.pid, pid_start="1")  # started at another time
        logs: list[str] = []
        runlock.acquire(run_dir, log=logs.append).release()
        assert "is now another process" in logs[0]
    finally:
        sleeper.kill()
        sleeper.wait()


def test_release_leaves_a_lock_that_someone_else_took_over(tmp_path):
    run_dir = str(tmp_path / "run")
    lock = runlock.acquire(run_dir)
    _write_lock(run_dir)  # taken over by another host meanwhile
    lock.release()
    assert os.path.exists(rundir.lock_file(run_dir))
