"""Issue 4 acceptance: exact resume after SIGKILL, and SIGTERM/SIGUSR1 -> checkpoint + clean exit."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from tests.harness import free_port, run_command, signal_tree
from tests.train_fixtures import TINY_RUN, read_losses, write_synthetic_shard
from megalm.training.checkpoint import checkpoint_root, complete_steps, read_latest

STEPS = 20
SAVE_EVERY = 5


@pytest.fixture(scope="module")
def shard(tmp_path_factory):
    return write_synthetic_shard(str(tmp_path_factory.mktemp("shard") / "tokens"))


def _torchrun(nproc: int, run_dir: str, shard: str, *extra: str, resume: bool = False) -> list[str]:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", "-m", "megalm.train", "--config", TINY_RUN]
    if resume:
        cmd += ["--resume", "auto"]
    return cmd + [f"data.train_paths=[{shard}]", f"train.run_dir={run_dir}", f"train.train_steps={STEPS}",
                  f"train.save_interval={SAVE_EVERY}", *extra]


ENV = {"OMP_NUM_THREADS": "1"}
LAYOUT = ["parallel.pp=2", "parallel.zero_stage=1"]  # a pipeline: its checkpoint has per-layer files


# (ranks, layout, precision). bf16: DeepSpeed's bf16 optimizer state (fp32 master weights) resumes exactly
# too. (tp, pp, dp, zero) = (2, 2, 2, 3): one ZeRO-3 engine per pipeline stage (issue 11).
RUNS = [(2, LAYOUT, "fp32"), (2, LAYOUT, "bf16"),
        (8, ["parallel.tp=2", "parallel.pp=2", "parallel.zero_stage=3"], "fp32")]


@pytest.fixture(scope="module", params=RUNS, ids=["pp2-z1-fp32", "pp2-z1-bf16", "tp2-pp2-dp2-z3-fp32"])
def uninterrupted(request, shard, tmp_path_factory):
    nproc, layout, precision = request.param
    layout = [*layout, f"train.precision={precision}"]
    run_dir = str(tmp_path_factory.mktemp("full"))
    run_command(_torchrun(nproc, run_dir, shard, *layout), timeout=400, env=ENV, check=True)
    losses = read_losses(run_dir)
    assert sorted(losses) == list(range(1, STEPS + 1))
    return nproc, layout, losses


def _wait_for_step(run_dir: str, step: int, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if max(read_losses(run_dir), default=0) >= step:
            return
        if proc.poll() is not None:
            raise AssertionError(f"run exited with {proc.returncode} before step {step}:\n{proc.stdout.read()[-4000:]}")
        time.sleep(0.2)
    signal_tree(proc.pid, signal.SIGKILL)
    raise AssertionError(f"run did not reach step {step} within {timeout}s")


def test_sigkill_between_checkpoints_then_resume_is_exact(shard, uninterrupted, tmp_path):
    nproc, layout, uninterrupted = uninterrupted
    run_dir = str(tmp_path / "killed")
    # The tiny run is faster than any polling: a drill parks rank 0 after step 12 (past the step-10
    # checkpoint, before step 15's) so the SIGKILL lands between checkpoints every time.
    proc = subprocess.Popen(_torchrun(nproc, run_dir, shard, *layout), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True, env={**os.environ, **ENV, "MEGALM_FAULT": "hang@12:0"})
    _wait_for_step(run_dir, 12, proc, timeout=300)
    signal_tree(proc.pid, signal.SIGKILL)
    proc.wait()
    root = checkpoint_root(run_dir)
    killed_at = max(read_losses(run_dir))
    assert read_latest(root) is not None and complete_steps(root)[-1] < killed_at
    resumed_from = complete_steps(root)[-1]
    out = run_command(_torchrun(nproc, run_dir, shard, *layout, resume=True), timeout=400, env=ENV, check=True).output
    assert f"resumed from step {resumed_from}" in out
    losses = read_losses(run_dir)  # steps after the checkpoint are the resumed run's (logged last)
    assert [losses[s] for s in range(1, STEPS + 1)] == [uninterrupted[s] for s in range(1, STEPS + 1)]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1], ids=["SIGTERM", "SIGUSR1"])
def test_signal_to_one_rank_checkpoints_and_exits_zero(shard, tmp_path, sig):
    run_dir = str(tmp_path / "signalled")
    cmd = _torchrun(2, run_dir, shard, "train.save_interval=0")
    cmd[cmd.index(f"train.train_steps={STEPS}")] = "train.train_steps=100000"
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, env={**os.environ, **ENV})
    _wait_for_step(run_dir, 3, proc, timeout=300)
    workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    assert len(workers) == 2, workers
    t0 = time.monotonic()
    os.kill(int(workers[-1]), sig)  # only one rank hears it; all must agree to stop at the same step
    try:
        out, _ = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        signal_tree(proc.pid, signal.SIGKILL)
        raise AssertionError("run did not exit within 120 s of the signal")
    assert proc.returncode == 0, out[-4000:]
    assert time.monotonic() - t0 < 60
    root = checkpoint_root(run_dir)
    latest = read_latest(root)
    assert latest is not None and "stop signal received" in out
    assert int(latest.split("_")[1]) == complete_steps(root)[-1] >= 3
