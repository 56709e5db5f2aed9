"""`megalm-launch slurm submit --dry-run`: the rendered sbatch scripts for 1 and 64 nodes, option errors,
hostfiles, and the launcher's no-torch rule. No SLURM needed."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from tests.harness import run_command
from launcher import hostfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {"PYTHONPATH": REPO}


def launch(args, cwd, expect=0):
    res = run_command([sys.executable, "-m", "launcher", *args], timeout=60, env=ENV, cwd=cwd)
    return res.check(expect)


@pytest.fixture
def config(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model: tiny\ndata: {train_paths: [data/x]}\ntrain: {run_dir: runs/exp1, train_steps: 100}\n")
    return path


def sbatch_lines(script: str) -> list[str]:
    """The #SBATCH directives sbatch honours: those before the first command line."""
    out = []
    for line in script.splitlines()[1:]:
        if line.startswith("#SBATCH"):
            out.append(line)
        elif line.strip() and not line.startswith("#"):
            break
    return out


def test_dry_run_one_node_srun(tmp_path, config):
    script = launch(["slurm", "submit", "--config", "run.yaml", "--nodes", "1", "--gpus-per-node", "1",
                     "--dry-run", "--", "train.lr=1e-3"], cwd=str(tmp_path)).output
    run_dir = str(tmp_path / "runs" / "exp1")
    assert script.startswith("#!/bin/bash\n")
    assert sbatch_lines(script) == [
        "#SBATCH --job-name=megalm-exp1",
        "#SBATCH --nodes=1",
        "#SBATCH --ntasks-per-node=1",
        "#SBATCH --gpus-per-node=1",
        f"#SBATCH --chdir={tmp_path}",
        f"#SBATCH --output={run_dir}/slurm/job-%j.out",
        "#SBATCH --open-mode=append",
        "#SBATCH --signal=B:USR1@120",
        "#SBATCH --requeue",
    ]
    launch_line = f"srun --kill-on-bad-exit=1 --nodes=1 --ntasks-per-node=1 {sys.executable} -u -m megalm.train " \
                  f"--config {tmp_path}/run.yaml --resume auto train.lr=1e-3 &"
    assert launch_line in script.splitlines()
    for expected in [
        'MASTER_PORT=$((20000 + SLURM_JOB_ID % 20000)); [ "$MASTER_PORT" = 29500 ] && MASTER_PORT=29501',
        "FIRST_NODE=$(scontrol show hostnames \"$SLURM_JOB_NODELIST\" | head -n 1)",
        "export MASTER_ADDR=${MASTER_ADDR:-$FIRST_NODE}",
        "trap on_usr1 USR1",
        '  scancel --signal=USR1 "$SLURM_JOB_ID" 2>/dev/null || kill -USR1 "$STEP_PID" 2>/dev/null',
        '  scontrol requeue "$SLURM_JOB_ID"',
    ]:
        assert expected in script.splitlines(), expected
    # the requeue happens only after the training step has exited (it has written its checkpoint)
    assert script.index('wait "$STEP_PID"') < script.index('scontrol requeue "$SLURM_JOB_ID"')
    assert "hostfile" not in script and "deepspeed" not in script
    subprocess.run(["bash", "-n"], input=script, text=True, check=True)  # valid bash


def test_dry_run_64_nodes_deepspeed_with_cluster_options(tmp_path, config):
    script = launch(["slurm", "submit", "--config", "run.yaml", "--nodes", "64", "--gpus-per-node", "8",
                     "--partition", "gpu", "--account", "llm", "--time", "2-00:00:00", "--constraint", "h100",
                     "--sbatch-extra", "#SBATCH --exclusive", "--sbatch-extra", "#SBATCH --mem=0",
                     "--launcher", "deepspeed", "--grace", "300", "--env", "NCCL_DEBUG=WARN", "--dry-run",
                     "--", "train.run_dir=/scratch/big_run", "parallel.tp=8"], cwd=str(tmp_path)).output
    assert "64 node(s) x 8 task(s) per node = 512 training processes, launcher deepspeed" in script
    assert sbatch_lines(script) == [
        "#SBATCH --job-name=megalm-big_run",
        "#SBATCH --nodes=64",
        "#SBATCH --ntasks-per-node=8",
        "#SBATCH --gpus-per-node=8",
        "#SBATCH --partition=gpu",
        "#SBATCH --account=llm",
        "#SBATCH --time=2-00:00:00",
        "#SBATCH --constraint=h100",
        f"#SBATCH --chdir={tmp_path}",
        "#SBATCH --output=/scratch/big_run/slurm/job-%j.out",
        "#SBATCH --open-mode=append",
        "#SBATCH --signal=B:USR1@300",
        "#SBATCH --requeue",
        "#SBATCH --exclusive",
        "#SBATCH --mem=0",
    ]
    lines = script.splitlines()
    assert "RUN_DIR=/scratch/big_run" in lines
    assert "export NCCL_DEBUG=WARN" in lines
    assert f'{sys.executable} -m launcher hostfile --slots 8 --output "$HOSTFILE"' in lines
    ds = next(line for line in lines if line.startswith("deepspeed "))
    bindir = os.path.dirname(sys.executable)
    assert ds == (f'deepspeed --hostfile "$HOSTFILE" --launcher slurm --force_multi --no_ssh_check '
                  f'--master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" --launcher_args=--kill-on-bad-exit=1 '
                  f"{bindir}/megalm-train --config {tmp_path}/run.yaml --resume auto "
                  f"train.run_dir=/scratch/big_run parallel.tp=8 &")
    assert "srun " not in script
    subprocess.run(["bash", "-n"], input=script, text=True, check=True)


def test_cpu_only_and_supervised_step(tmp_path, config):
    script = launch(["slurm", "submit", "--config", "run.yaml", "--nodes", "2", "--gpus-per-node", "2",
                     "--cpu-only", "--max-restarts", "3", "--hang-timeout", "600", "--dry-run"], cwd=str(tmp_path)).output
    assert "#SBATCH --gpus-per-node" not in script
    assert "# CPU-only cluster: no GPU request; still 2 task(s) per node" in script
    assert "#SBATCH --ntasks-per-node=2" in sbatch_lines(script)
    run_dir = tmp_path / "runs" / "exp1"
    assert (f"{sys.executable} -m launcher run --run-dir {run_dir} --max-restarts 3 --hang-timeout 600.0 -- srun "
            "--kill-on-bad-exit=1 --nodes=2 --ntasks-per-node=2") in script


@pytest.mark.parametrize("args, message", [
    (["--time", "tomorrow"], "--time 'tomorrow'"),
    (["--sbatch-extra=--exclusive"], "must start with '#SBATCH '"),
    (["--nodes", "0"], "--nodes must be >= 1"),
    (["--gpus-per-node", "0"], "--gpus-per-node must be >= 1"),
    (["--env", "1X=2"], "--env '1X=2'"),
    (["--time", "00:01:00", "--grace", "60"], "--grace 60s must be shorter than --time 00:01:00 (60s)"),
    (["--", "train.run_dir=/tmp/a b"], "contains whitespace"),
])
def test_bad_options_are_reported(tmp_path, config, args, message):
    res = launch(["slurm", "submit", "--config", "run.yaml", "--dry-run", *args], cwd=str(tmp_path), expect=2)
    assert message in res.output


def test_missing_config_is_reported(tmp_path):
    res = launch(["slurm", "submit", "--config", "nope.yaml", "--dry-run"], cwd=str(tmp_path), expect=2)
    assert "nope.yaml: cannot read it" in res.output


def test_nodelist_parsing_and_hostfile(tmp_path):
    assert hostfile.parse_nodelist("gpu[01-03,7],cpu1") == ["gpu01", "gpu02", "gpu03", "gpu7", "cpu1"]
    assert hostfile.parse_nodelist("n[1-2]") == ["n1", "n2"]
    assert hostfile.parse_nodelist("node-a") == ["node-a"]
    assert hostfile.render_hostfile(["n1", "n2"], 4) == "n1 slots=4\nn2 slots=4\n"
    out = tmp_path / "hosts"
    launch(["hostfile", "--slots", "2", "--nodelist", "a[09-11]", "--output", str(out)], cwd=str(tmp_path))
    assert out.read_text() == "a09 slots=2\na10 slots=2\na11 slots=2\n"
    res = run_command([sys.executable, "-m", "launcher", "hostfile", "--slots", "2"], timeout=60,
                      env={**ENV, "SLURM_JOB_NODELIST": ""}, cwd=str(tmp_path))
    assert res.returncode == 2 and "SLURM_JOB_NODELIST is unset" in res.output


def test_launcher_never_imports_torch():
    # The launcher may import megalm/__init__.py and the stdlib-only contract modules (rundir, runlock,
    # ckpt_files), nothing else of megalm.
    code = ("import sys, launcher.cli, launcher.supervisor, launcher.status, launcher.checkpoints, launcher.sbatch, "
            "launcher.hostfile, launcher.slurm; bad = [m for m in sys.modules if m in ('torch', 'numpy') or m.startswith("
            "('torch.', 'numpy.', 'deepspeed')) or (m.startswith('megalm') and m not in ('megalm', 'megalm.rundir', 'megalm.runlock', 'megalm.ckpt_files'))]; "
            "assert not bad, bad; assert 'megalm.rundir' in sys.modules")
    run_command([sys.executable, "-c", code], timeout=60, env=ENV, cwd=REPO, check=True)
    # and the CLI entry itself
    res = run_command([sys.executable, "-X", "importtime", "-m", "launcher", "ckpt", "list", "--run-dir", REPO],
                      timeout=60, env=ENV, cwd=REPO, check=True)  # an existing dir (a mistyped one exits 2)
    assert not re.search(r"\|\s+(torch|numpy|deepspeed)(\.|\s*$)", res.output, re.M)
    assert not re.search(r"\|\s+megalm\.(?!(rundir|runlock|ckpt_files)\s*$)", res.output, re.M)
    assert re.search(r"\|\s+megalm\.rundir\s*$", res.output, re.M)
