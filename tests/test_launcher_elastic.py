"""Elastic restarts, the launcher's half (issue 15, DESIGN decision 44).

Without SLURM: the node-count rule agrees with the trainer's world-size rule, the launcher's copy of the
config defaults agrees with the config classes, the elastic sbatch script, the srun re-rendering.

On the real single-host SLURM (tests/slurm_cluster.py, SlurmdTimeout 5 s so a dead node is DOWN within
~12 s): a 2-node job of the real trainer (tiny model) submitted with `--nodes 1-2` loses node n2 (its
slurmd and the job's processes on it are SIGKILLed, as a node failure does) -> SLURM drops n2 from the
`--no-kill` allocation -> `megalm-launch run --min-nodes 1` restarts the step on n1 -> the trainer resumes
the dp=2 checkpoint at dp=1 -> n2 comes back, `scontrol requeue` -> the job starts on both nodes again and
resumes at dp=2 -> finishes. Each attempt's world size is in slurm/attempts.jsonl and `status`.
"""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time

import pytest

from launcher import elastic
from tests.harness import run_command
from tests.slurm_cluster import running_cluster
from tests.train_fixtures import read_losses, wait_for_heartbeat

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "configs", "run", "tiny.yaml")
ENV = {"PYTHONPATH": REPO, "OMP_NUM_THREADS": "1"}
STEPS = 20
SAVE_EVERY = 3


def launch(args, cwd, expect=0, env=None, timeout=60):
    return run_command([sys.executable, "-m", "launcher", *args], timeout=timeout, env={**ENV, **(env or {})},
                       cwd=cwd).check(expect)


# ------------------------------------------------------------------------------------------ no SLURM

def test_node_counts_agree_with_the_trainers_world_sizes():
    from megalm.config.run import run_config_from_dict
    from megalm.training.resume import allowed_world_sizes

    for tp, pp, mbs, gbs, g in [(1, 1, 2, 8, 1), (2, 1, 1, 16, 1), (1, 2, 1, 12, 4), (2, 2, 2, 64, 8), (1, 1, 3, 8, 1)]:
        cfg = run_config_from_dict({"model": "tiny", "data": {"train_paths": ["x"], "seq_len": 32}, "parallel": {"tp": tp, "pp": pp},
                                   "train": {"micro_batch_size": mbs, "global_batch_size": gbs}})
        worlds = set(allowed_world_sizes(cfg))
        counts = elastic.allowed_node_counts(tp, pp, mbs, gbs, g)
        assert counts == [n for n in range(1, 200) if n * g in worlds], (tp, pp, mbs, gbs, g)
    assert elastic.allowed_node_counts(1, 1, 2, 8, 1) == [1, 2, 4]
    assert elastic.allowed_node_counts(1, 1, 3, 8, 1) == []  # the batch does not split at all


def test_launcher_layout_defaults_are_the_config_classes():
    from megalm.config.parallel import ParallelConfig
    from megalm.config.train import TrainConfig

    fields = {f"parallel.{f.name}": f.default for f in dataclasses.fields(ParallelConfig)}
    fields.update({f"train.{f.name}": f.default for f in dataclasses.fields(TrainConfig)})
    assert {k: fields[k] for k in elastic.LAYOUT_DEFAULTS} == elastic.LAYOUT_DEFAULTS


def test_elastic_sbatch_script(tmp_path):
    (tmp_path / "run.yaml").write_text("train: {run_dir: runs/e, micro_batch_size: 1, global_batch_size: 48}\n"
                                       "parallel: {tp: 2}\n")
    script = launch(["slurm", "submit", "--config", "run.yaml", "--nodes", "4-12", "--gpus-per-node", "8",
                     "--max-restarts", "5", "--dry-run", "--", "train.global_batch_size=96"], cwd=str(tmp_path)).output
    lines = script.splitlines()
    assert "#SBATCH --nodes=4-12" in lines and "#SBATCH --mincpus=8" in lines and "#SBATCH --no-kill" in lines
    assert not any(line.startswith("#SBATCH --ntasks-per-node") for line in lines)
    # 96 = dp x accumulation with dp = 4 x nodes: nodes 4, 6, 8, 12 (not 5, 7, 9-11)
    assert (f"-m launcher run --run-dir {tmp_path}/runs/e --max-restarts 5 --min-nodes 4 --node-counts 4,6,8,12 -- "
            "srun --kill-on-bad-exit=1 --nodes=12 --ntasks-per-node=8") in script
    assert any(line.startswith('if [ "$RC" = 75 ]; then') for line in lines) and script.count('scontrol requeue "$SLURM_JOB_ID"') == 2
    subprocess.run(["bash", "-n"], input=script, text=True, check=True)
    # no --max-restarts: no --no-kill (SLURM requeues the job on a node failure), still node-aware
    script = launch(["slurm", "submit", "--config", "run.yaml", "--nodes", "4-6", "--gpus-per-node", "8",
                     "--dry-run"], cwd=str(tmp_path)).output
    assert "#SBATCH --no-kill" not in script and "--min-nodes 4 --node-counts 4,6 " in script


@pytest.mark.parametrize("args, message", [
    (["--nodes", "1-3"], "--nodes 1-3: the layout cannot run on 3 node(s) (parallel.tp 1 x parallel.pp 1, "
                         "train.micro_batch_size 2, train.global_batch_size 8, 1 task(s) per node)"),
    (["--nodes", "1-3"], "Node counts it can use: 1, 2, 4;"),
    (["--nodes", "2", "--min-nodes", "3"], "--min-nodes 3 is larger than --nodes 2"),
    (["--nodes", "3-2"], "the minimum 3 is larger than the maximum 2"),
    (["--nodes", "two"], "--nodes 'two': expected a node count N or a range MIN-MAX"),
    (["--nodes", "1-2", "--launcher", "deepspeed"], "--nodes 1-2 needs --launcher srun"),
])
def test_impossible_node_ranges_are_refused_at_submit(tmp_path, args, message):
    (tmp_path / "run.yaml").write_text("train: {run_dir: runs/e, micro_batch_size: 2, global_batch_size: 8}\n")
    res = launch(["slurm", "submit", "--config", "run.yaml", "--dry-run", *args], cwd=str(tmp_path), expect=2)
    assert message in res.output and "Traceback" not in res.output


def test_srun_command_is_re_rendered_for_the_nodes_left():
    cmd = ["srun", "--kill-on-bad-exit=1", "--nodes=4", "-n", "32", "--ntasks-per-node=8", "python", "-u", "-m",
           "megalm.train", "--nodes=9"]
    assert elastic.tasks_per_node(cmd) == 8
    assert elastic.resize_srun(cmd, ["g1"], 8, overlap=True)[:5] == [
        "srun", "--nodes=1", "--ntasks=8", "--nodelist=g1", "--overlap"]
    assert elastic.resize_srun(cmd, ["g1", "g3"], 16) == [
        "srun", "--nodes=2", "--ntasks=16", "--nodelist=g1,g3", "--kill-on-bad-exit=1", "--ntasks-per-node=8",
        "python", "-u", "-m", "megalm.train", "--nodes=9"]  # the trainer's own arguments are left alone
    assert [elastic.usable(s) for s in ("MIXED", "ALLOCATED", "IDLE", "DOWN*", "MIXED*", "IDLE+DRAIN", "DOWN")] == \
        [True, True, True, False, False, False, False]


# ------------------------------------------------------------------------------------------ real SLURM

@pytest.fixture(scope="module")
def slurm_cluster():
    # SlurmdTimeout 5 s, MessageTimeout 3 s: a node whose slurmd died is DOWN (and leaves a --no-kill job)
    # within ~12 s instead of ~35 s.
    with running_cluster(nodes=2, slurmd_timeout=5, message_timeout=3) as cluster:
        yield cluster


def jsonl(path):
    return [json.loads(line) for line in open(path)] if os.path.exists(path) else []


def diagnostics(cluster, job, run_dir) -> str:
    out = os.path.join(run_dir, "slurm", f"job-{job}.out")
    parts = [f"job: {cluster.job(job)}",
             f"sinfo: {cluster.run(['sinfo', '-h', '-N', '-o', '%N %T'], check=False).stdout.split()}",
             f"attempts.jsonl: {jsonl(os.path.join(run_dir, 'slurm', 'attempts.jsonl'))}",
             f"restarts.jsonl: {jsonl(os.path.join(run_dir, 'restarts.jsonl'))}",
             "job output (tail):\n" + (open(out).read()[-5000:] if os.path.exists(out) else "(none)"),
             cluster.logs(20)]
    return "\n".join(parts)


def test_supervisor_takes_a_usable_node_count_and_exits_75_when_too_few_are_left(slurm_cluster, tmp_path):
    run_dir = str(tmp_path / "run")
    sup = f"{sys.executable} -m launcher run --run-dir {run_dir} --max-restarts 0"
    step = "-- srun --nodes=2 --ntasks-per-node=1 sh -c 'echo step on $SLURMD_NODENAME'"
    script = tmp_path / "job.sh"
    script.write_text(f"#!/bin/bash\n#SBATCH --nodes=2\n#SBATCH --output={tmp_path}/out.txt\n"
                      f"{sup} --min-nodes 3 {step}; echo rc=$?\n"
                      f"{sup} --min-nodes 1 --node-counts 1,4 {step}; echo rc=$?\n")
    job = slurm_cluster.run(["sbatch", "--parsable", str(script)], check=True).stdout.strip()
    info = slurm_cluster.wait_job(job, timeout=60)
    out = open(tmp_path / "out.txt").read()
    assert info["JobState"] == "COMPLETED", (info, out)
    assert "fewer than --min-nodes 3 usable node(s) left" in out and "rc=75" in out, out
    assert "2 node(s) left; the layout uses 1 (--node-counts 1,4): n2 stay idle" in out, out
    assert out.count("step on n1") == 1 and "step on n2" not in out and out.endswith("rc=0\n"), out
    events = jsonl(os.path.join(run_dir, "restarts.jsonl"))
    assert [e["event"] for e in events] == ["too_few_nodes"], events
    steps = [e for e in jsonl(os.path.join(run_dir, "slurm", "attempts.jsonl")) if e["event"] == "step"]
    assert [(e["nodes"], e["ntasks"]) for e in steps] == [("n1", 1)], steps


def test_node_loss_continues_on_the_nodes_left_then_scales_back_up(slurm_cluster, tmp_path):
    from tests.train_fixtures import write_synthetic_shard

    t0 = time.monotonic()
    shard = write_synthetic_shard(str(tmp_path / "tokens"))
    run_dir = str(tmp_path / "run")
    env = {**slurm_cluster.env, **ENV}
    launch(["slurm", "submit", "--config", TINY, "--nodes", "1-2", "--gpus-per-node", "1", "--cpu-only",
            "--grace", "60", "--max-restarts", "3", "--", f"data.train_paths=[{shard}]", f"train.run_dir={run_dir}",
            f"train.train_steps={STEPS}", f"train.save_interval={SAVE_EVERY}", "train.log_interval=1"],
           cwd=str(tmp_path), env=env)
    job = open(os.path.join(run_dir, "slurm", "jobs.txt")).read().split("\t")[0]
    why = lambda: diagnostics(slurm_cluster, job, run_dir)  # noqa: E731
    try:
        hb = wait_for_heartbeat(run_dir, SAVE_EVERY + 1, 150)
        assert hb.get("step", 0) >= SAVE_EVERY + 1, "the 2-node job did not reach its first checkpoint\n" + why()
        assert slurm_cluster.job(job)["NodeList"] == "n[1-2]", why()
        killed = slurm_cluster.kill_node("n2", job)
        assert killed, "no job processes found on n2\n" + why()
        t_kill = time.monotonic()
        # SLURM marks n2 DOWN and drops it from the --no-kill allocation; the step restarts on n1 at dp=1.
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and slurm_cluster.job(job).get("NodeList") != "n1":
            time.sleep(0.5)
        info = slurm_cluster.job(job)
        assert info["NodeList"] == "n1" and info["JobState"] == "RUNNING" and info["Restarts"] == "0", why()
        t_down = time.monotonic()
        # n2 comes back meanwhile (for the scale-up below); the running step stays on n1.
        slurm_cluster.restart_node("n2")
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and not any(
                e.get("event") == "elastic_resume" for e in jsonl(os.path.join(run_dir, "restarts.jsonl"))):
            assert slurm_cluster.job(job).get("JobState") in ("RUNNING", "COMPLETING"), why()
            time.sleep(0.5)
        shrunk = [e for e in jsonl(os.path.join(run_dir, "restarts.jsonl")) if e.get("event") == "elastic_resume"]
        assert shrunk and shrunk[0]["new_layout"]["dp"] == 1 and shrunk[0]["old_layout"]["dp"] == 2, why()
        t_shrunk = time.monotonic()
        assert slurm_cluster.job(job)["NodeList"] == "n1", why()  # the same allocation, one node less
        # Scale back up: a requeue (as at a time limit or preemption) starts the job on both nodes again.
        hb = wait_for_heartbeat(run_dir, shrunk[0]["step"] + 1, 60)
        assert shrunk[0]["step"] < hb.get("step", 0) < STEPS - 2, "the dp=1 attempt is not mid-run\n" + why()
        slurm_cluster.run(["scontrol", "requeue", job])
        info = slurm_cluster.wait_job(job, states=("COMPLETED", "FAILED", "CANCELLED"), timeout=180)
        assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", why()
    except BaseException:
        print(why())
        raise
    print(f"timings: to first checkpoint {t_kill - t0:.0f}s, node loss -> n2 DOWN {t_down - t_kill:.0f}s, "
          f"-> dp=1 resume {t_shrunk - t_down:.0f}s, total {time.monotonic() - t0:.0f}s")

    attempts = jsonl(os.path.join(run_dir, "slurm", "attempts.jsonl"))
    starts = [(e["restart"], e["num_nodes"], e["ntasks"]) for e in attempts if e["event"] == "start"]
    steps = [(e["restart"], e["attempt"], e["num_nodes"], e["ntasks"], e["nodes"]) for e in attempts
             if e["event"] == "step"]
    assert starts == [(0, 2, 2), (1, 2, 2)], attempts
    assert steps[:2] == [(0, 0, 2, 2, "n1,n2"), (0, 1, 1, 1, "n1")], attempts
    # After the requeue every step runs on both nodes. SLURM may cost the first of them: slurmctld retries
    # the dead attempt's step signal to n2 (~60 s later) once n2 answers again, and the requeued job's
    # first step has the same id (JOB.0); the supervisor then restarts it, still on 2 nodes.
    again = steps[2:]
    assert again and all(st[0] == 1 and st[2:] == (2, 2, "n1,n2") for st in again), attempts
    ends = [e for e in attempts if e["event"] == "step_end"]
    assert ends[-1]["restart"] == 1 and ends[-1]["exit_code"] == 0, attempts
    resumes = [e for e in jsonl(os.path.join(run_dir, "restarts.jsonl")) if e.get("event") == "elastic_resume"]
    dps = [(e["old_layout"]["dp"], e["new_layout"]["dp"]) for e in resumes]
    assert dps[0] == (2, 1) and len(dps) >= 2 and set(dps[1:]) == {(1, 2)}, resumes
    meta = json.load(open(os.path.join(run_dir, "checkpoints", f"step_{STEPS:08d}", "megalm.json")))
    assert meta["layout"]["dp"] == 2 and meta["consumed_samples"] == STEPS * 8
    assert sorted(read_losses(run_dir)) == list(range(1, STEPS + 1))
    text = launch(["status", job, "--run-dir", run_dir], cwd=str(tmp_path), env=env).output
    assert "world size 1 (1 node(s))" in text and "world size 2 (2 node(s))" in text, text
    assert "elastic resume:     step" in text and "dp 2 -> 1" in text and "dp 1 -> 2" in text, text
    st = json.loads(launch(["status", job, "--run-dir", run_dir, "--json"], cwd=str(tmp_path), env=env).output)
    assert [(a["step"], a["ntasks"]) for a in st["attempts"]][:5] == [(None, 2), (0, 2), (1, 1), (None, 2), (0, 2)]
    assert st["attempts"][-1]["exit_code"] == 0 and st["elastic_resumes"][0]["new_dp"] == 1
