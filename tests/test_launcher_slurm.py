"""Real SLURM (a throwaway 2-node cluster on this host, tests/slurm_cluster.py) with the stub trainer:
a 2-node job finishes; preemption by `scancel --batch --signal=USR1` and by `scontrol requeue` both end in a
checkpoint, a requeue and a resume with the losses of an uninterrupted run; the deepspeed launcher path.
The real-trainer versions are in test_launcher_real_trainer.py. Skips when the SLURM packages are missing."""
from __future__ import annotations

import json
import os
import sys

import pytest

from tests.harness import run_command
from tests.train_fixtures import read_losses as final_losses, wait_for_heartbeat
from tests.slurm_cluster import running_cluster

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STUB = os.path.join(REPO, "tests", "launcher_stub_trainer.py")
STEPS = 30


@pytest.fixture(scope="module")
def slurm_cluster():
    with running_cluster(nodes=2) as cluster:
        yield cluster


def launch(cluster, args, cwd, timeout=60):
    env = {**cluster.env, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1"}
    return run_command([sys.executable, "-m", "launcher", *args], timeout=timeout, env=env, cwd=cwd)


def submit_stub(cluster, tmp_path, *extra, step_time=0.15, nodes=2):
    run_dir = str(tmp_path / "run")
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"train: {{run_dir: {run_dir}, train_steps: {STEPS}, save_interval: 10}}\n"
                   f"stub: {{step_time: {step_time}}}\n")
    launch(cluster, ["slurm", "submit", "--config", str(cfg), "--nodes", str(nodes), "--gpus-per-node", "1",
                     "--cpu-only", "--grace", "30", "--entry", STUB, *extra], cwd=str(tmp_path)).check()
    jobs = open(os.path.join(run_dir, "slurm", "jobs.txt")).read().split("\n")
    return jobs[0].split("\t")[0], run_dir




def wait_for_step(cluster, job_id, run_dir, step, timeout=60):
    if wait_for_heartbeat(run_dir, step, timeout).get("step", 0) >= step:
        return
    raise AssertionError(f"job {job_id} did not reach step {step}: {cluster.job(job_id)}\n{job_output(run_dir, job_id)}")


def job_output(run_dir, job_id):
    path = os.path.join(run_dir, "slurm", f"job-{job_id}.out")
    return open(path).read() if os.path.exists(path) else "(no job output)"


def attempts(run_dir):
    return [json.loads(line) for line in open(os.path.join(run_dir, "slurm", "attempts.jsonl"))]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted loss curve (the stub's losses do not depend on the world size)."""
    d = tmp_path_factory.mktemp("ref")
    cfg = d / "run.yaml"
    cfg.write_text(f"train: {{run_dir: {d / 'run'}, train_steps: {STEPS}}}\nstub: {{step_time: 0}}\n")
    run_command([sys.executable, STUB, "--config", str(cfg)], timeout=60, check=True)
    return final_losses(str(d / "run"))


def test_two_node_job_trains_and_finishes(slurm_cluster, tmp_path, reference):
    job, run_dir = submit_stub(slurm_cluster, tmp_path, step_time=0.02)
    info = slurm_cluster.wait_job(job, timeout=90)
    out = job_output(run_dir, job)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", (info, out)
    assert info["NumNodes"] == "2" and info["NodeList"] == "n[1-2]"
    assert "start on n[1-2], master 127.0.0.1:" in out
    assert final_losses(run_dir) == reference
    ck = json.load(open(os.path.join(run_dir, "checkpoints", f"step_{STEPS:08d}", "megalm.json")))
    assert ck["layout"]["world_size"] == 2
    launch(slurm_cluster, ["ckpt", "verify", "--run-dir", run_dir], cwd=str(tmp_path)).check()
    st = json.loads(launch(slurm_cluster, ["status", "--run-dir", run_dir, "--json"], cwd=str(tmp_path)).check().output)
    assert st["job_id"] == job and st["slurm"]["state"] == "COMPLETED" and st["slurm"]["restarts"] == 0
    assert st["latest_checkpoint_step"] == STEPS and st["last_step"] == STEPS and st["tokens_per_s"] > 0


def test_preempted_by_usr1_checkpoints_requeues_and_resumes_exactly(slurm_cluster, tmp_path, reference):
    job, run_dir = submit_stub(slurm_cluster, tmp_path)
    wait_for_step(slurm_cluster, job, run_dir, 5)
    slurm_cluster.run(["scancel", "--batch", "--signal=USR1", job])
    info = slurm_cluster.wait_job(job, states=("COMPLETED", "FAILED", "CANCELLED"), timeout=120)
    out = job_output(run_dir, job)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", (info, out)
    ev = attempts(run_dir)
    assert [(e["event"], e["restart"]) for e in ev] == [("start", 0), ("end", 0), ("start", 1), ("end", 1)], ev
    assert ev[1]["preempted"] == 1 and ev[1]["exit_code"] == 0 and ev[3]["preempted"] == 0
    resumed = int(out.split("resumed from step ")[1].split()[0])
    assert 5 <= resumed < STEPS, out  # really interrupted mid-run, from the signal's checkpoint
    assert "USR1: asking the training step to checkpoint and exit" in out
    assert final_losses(run_dir) == reference
    st = launch(slurm_cluster, ["status", job, "--run-dir", run_dir], cwd=str(tmp_path)).check().output
    assert "state COMPLETED" in st and "restarts 1" in st


def test_scontrol_requeue_checkpoints_and_resumes_exactly(slurm_cluster, tmp_path, reference):
    job, run_dir = submit_stub(slurm_cluster, tmp_path)
    wait_for_step(slurm_cluster, job, run_dir, 5)
    slurm_cluster.run(["scontrol", "requeue", job])
    info = slurm_cluster.wait_job(job, states=("COMPLETED", "FAILED", "CANCELLED"), timeout=120)
    out = job_output(run_dir, job)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", (info, out)
    resumed = int(out.split("resumed from step ")[1].split()[0])
    assert 5 <= resumed < STEPS, out  # TERM made the trainer checkpoint before SLURM killed it
    assert final_losses(run_dir) == reference


def test_deepspeed_hostfile_launcher_inside_the_allocation(slurm_cluster, tmp_path, reference):
    job, run_dir = submit_stub(slurm_cluster, tmp_path, "--launcher", "deepspeed", step_time=0.02)
    info = slurm_cluster.wait_job(job, timeout=120)
    out = job_output(run_dir, job)
    assert info["JobState"] == "COMPLETED", (info, out)
    assert open(os.path.join(run_dir, "slurm", f"hostfile-{job}")).read() == "n1 slots=1\nn2 slots=1\n"
    meta = json.load(open(os.path.join(run_dir, "checkpoints", f"step_{STEPS:08d}", "megalm.json")))
    assert meta["layout"]["world_size"] == 2
    assert final_losses(run_dir) == reference
