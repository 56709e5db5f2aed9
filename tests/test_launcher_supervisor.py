"""`megalm-launch run` with the stub trainer: restart after a planted crash and after SIGKILL of one rank
(under torchrun), hang detection with a stack dump, the same-step limit, exit codes that are not
restarted, and signal forwarding. The real-trainer versions are in test_launcher_real_trainer.py."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from tests.harness import free_port, run_command, signal_tree
from tests.train_fixtures import read_losses as final_losses, read_restarts as restarts, wait_for_heartbeat

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STUB = os.path.join(REPO, "tests", "launcher_stub_trainer.py")
ENV = {"PYTHONPATH": REPO, "OMP_NUM_THREADS": "1"}
STEPS = 16


def first_attempt_only(fault: str, *cmd: str) -> list[str]:
    """Plant MEGALM_FAULT in the first attempt only (the supervisor exports MEGALM_RESTART); the supervisor
    appends `--resume auto` to restarts, which lands in "$@"."""
    return ["sh", "-c", f'[ "$MEGALM_RESTART" = 0 ] && export MEGALM_FAULT={fault}; exec "$@"', "sh", *cmd]


def write_config(tmp_path, name="run", **train) -> tuple[str, str]:
    run_dir = str(tmp_path / name)
    t = {"run_dir": run_dir, "train_steps": STEPS, "save_interval": 5, **train}
    cfg = str(tmp_path / f"{name}.yaml")
    with open(cfg, "w") as f:
        f.write(f"train: {json.dumps(t)}\nstub: {{step_time: 0.03}}\n")
    return cfg, run_dir


def supervise(run_dir, command, *opts, timeout=90, env=None):
    return run_command([sys.executable, "-m", "launcher", "run", "--run-dir", run_dir, "--backoff", "0.1", *opts,
                        "--", *command], timeout=timeout, env={**ENV, **(env or {})})






@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    cfg, run_dir = write_config(tmp_path_factory.mktemp("ref"))
    run_command([sys.executable, STUB, "--config", cfg], timeout=60, env=ENV, check=True)
    losses = final_losses(run_dir)
    assert sorted(losses) == list(range(1, STEPS + 1))
    return losses


def test_restart_after_planted_crash_resumes_exactly(tmp_path, reference):
    cfg, run_dir = write_config(tmp_path)
    res = supervise(run_dir, first_attempt_only("crash@7", sys.executable, STUB, "--config", cfg)).check()
    ev = restarts(run_dir)
    assert [(e["event"], e["reason"], e["step"], e["resume_step"]) for e in ev] == [("restart", "exit code 17", 6, 5)]
    assert "resumed from step 5" in res.output
    assert final_losses(run_dir) == reference


def test_sigkill_of_one_rank_under_torchrun_restarts(tmp_path, reference):
    cfg, run_dir = write_config(tmp_path, train_steps=STEPS)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", STUB, "--config", cfg, "stub.step_time=0.15"]
    proc = subprocess.Popen([sys.executable, "-m", "launcher", "run", "--run-dir", run_dir, "--backoff", "0.1", "--",
                             *cmd], env={**os.environ, **ENV}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        hb = wait_for_heartbeat(run_dir, 7, 60, alive=lambda: proc.poll() is None)
        assert hb.get("step", 0) >= 7, "the run never reached step 7"
        os.kill(hb["pid"], signal.SIGKILL)  # rank 0 (it writes the heartbeat)
        out, _ = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            signal_tree(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, out[-4000:]
    ev = restarts(run_dir)
    assert len(ev) == 1 and ev[0]["event"] == "restart" and ev[0]["resume_step"] in (5, 10), ev
    assert final_losses(run_dir) == reference


def test_hang_is_detected_dumped_and_restarted(tmp_path, reference):
    cfg, run_dir = write_config(tmp_path)
    t0 = time.monotonic()
    res = supervise(run_dir, first_attempt_only("hang@8", sys.executable, STUB, "--config", cfg),
                    "--hang-timeout", "2", "--kill-grace", "2").check()
    ev = restarts(run_dir)
    assert len(ev) == 1 and ev[0]["reason"].startswith("hang: no heartbeat progress for") and ev[0]["step"] == 7, ev
    assert "(most recent call first)" in res.output, "no stack dump in the log"
    assert re.search(r'File ".*launcher_stub_trainer.py", line \d+ in main', res.output), "the hung rank's stack"
    # dumped to the per-rank file (like the real trainer), which the supervisor printed as its own block
    assert re.search(r"stacks of rank00000 \(.*rank00000\.txt\):\n", res.output), res.output[-4000:]
    assert final_losses(run_dir) == reference
    assert time.monotonic() - t0 < 30


def test_same_failing_step_stops_with_clear_message(tmp_path):
    cfg, run_dir = write_config(tmp_path)
    res = supervise(run_dir, [sys.executable, STUB, "--config", cfg], "--same-step-limit", "3", "--max-restarts", "10",
                    env={"MEGALM_FAULT": "crash@7"})
    assert res.returncode == 1
    assert "giving up: 3 attempts in a row failed at the same step 6" in res.output
    ev = restarts(run_dir)
    assert [e["event"] for e in ev] == ["restart", "restart", "gave_up"]


def test_restart_budget_and_non_restartable_codes(tmp_path):
    run_dir = str(tmp_path / "r")
    res = supervise(run_dir, ["sh", "-c", "exit 2"], "--max-restarts", "5")
    assert res.returncode == 2 and "exit code 2 is not restartable" in res.output
    assert [e["event"] for e in restarts(run_dir)] == ["gave_up"]
    run_dir = str(tmp_path / "s")
    res = supervise(run_dir, ["sh", "-c", "echo attempt $MEGALM_RESTART: $*; exit 5", "sh"], "--max-restarts", "2",
                    "--same-step-limit", "0")
    assert res.returncode == 5
    assert "attempt 0:" in res.output and "attempt 2: --resume auto" in res.output
    assert "restart budget (--max-restarts 2) is spent" in res.output


def test_sigterm_is_forwarded_checkpoint_and_no_restart(tmp_path):
    cfg, run_dir = write_config(tmp_path, train_steps=100000)
    proc = subprocess.Popen([sys.executable, "-m", "launcher", "run", "--run-dir", run_dir, "--", sys.executable, STUB,
                             "--config", cfg], env={**os.environ, **ENV}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        wait_for_heartbeat(run_dir, 3, 30)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            signal_tree(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, out
    assert "stop signal received: checkpoint at step" in out
    assert restarts(run_dir) == []
    latest = open(os.path.join(run_dir, "checkpoints", "latest")).read().strip()
    assert int(latest.split("_")[1]) >= 3
