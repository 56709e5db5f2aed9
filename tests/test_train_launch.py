"""Issue 4 acceptance: the one entry point under `deepspeed --hostfile`, `mpirun` and `torchrun`, and bad
configs rejected before any process group starts, each with its message."""
from __future__ import annotations

import os
import sys

import pytest

from tests.harness import free_port, run_command
from tests.train_fixtures import TINY_RUN, read_losses, write_synthetic_shard

ENV = {"OMP_NUM_THREADS": "1"}
BIN = os.path.dirname(sys.executable)


@pytest.fixture(scope="module")
def shard(tmp_path_factory):
    return write_synthetic_shard(str(tmp_path_factory.mktemp("shard") / "tokens"))


def _train_args(shard: str, run_dir: str, *extra: str, layout: tuple[str, ...] = ("parallel.tp=2",)) -> list[str]:
    return ["--config", TINY_RUN, f"data.train_paths=[{shard}]", f"train.run_dir={run_dir}",
            "train.train_steps=5", *layout, *extra]


def _assert_reached_step_5(run_dir: str, out: str) -> None:
    losses = read_losses(run_dir)
    assert max(losses, default=0) == 5, f"losses {losses}; output tail:\n{out[-3000:]}"


def test_deepspeed_hostfile_launch(shard, tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=2\n")
    run_dir = str(tmp_path / "run")
    # a ZeRO-3 pipeline (one engine per stage, issue 11); tp=2 runs under mpirun and torchrun
    layout = ("parallel.pp=2", "parallel.zero_stage=3")
    cmd = [os.path.join(BIN, "deepspeed"), "--hostfile", str(hostfile), "--no_ssh_check", "--master_addr",
           "127.0.0.1", "--master_port", str(free_port()), "--module", "megalm.train",
           *_train_args(shard, run_dir, layout=layout)]
    out = run_command(cmd, timeout=300, env=ENV, check=True).output
    _assert_reached_step_5(run_dir, out)


def test_mpirun_launch(shard, tmp_path):
    run_dir = str(tmp_path / "run")
    cmd = [os.path.join(BIN, "mpirun"), "-n", "2", sys.executable, "-m", "megalm.train", *_train_args(shard, run_dir)]
    out = run_command(cmd, timeout=300, env={**ENV, "MASTER_PORT": str(free_port())}, check=True).output
    _assert_reached_step_5(run_dir, out)


def test_torchrun_launch(shard, tmp_path):
    run_dir = str(tmp_path / "run")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", "-m", "megalm.train", *_train_args(shard, run_dir, "train.tensorboard=true")]
    out = run_command(cmd, timeout=300, env=ENV, check=True).output
    _assert_reached_step_5(run_dir, out)
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(os.path.join(run_dir, "tensorboard")))


BAD = [
    (["train.global_batch_size=6"], 2, "global_batch_size: 6 is not divisible by micro_batch_size x dp = 2 x 2"),
    (["parallel.pp=2", "parallel.zero_stage=3", "train.precision=fp16"], 2,
     "train.precision: fp16 cannot be combined with pipeline parallelism (pp=2) under parallel.zero_stage 3"),
    (["parallel.tp=2"], 3, "world size 3 is not divisible by tp*pp = 2*1 = 2"),
    (["data.train_paths=[/nonexistent/shard]"], 1, "data.train_paths[0]: no shard '/nonexistent/shard'"),
    (["parallel.tp=3"], 3, "model.num_heads"),
    (["train.precision=fp8"], 1, "train.precision: must be one of 'fp32', 'bf16', 'fp16'; got 'fp8'"),
]


@pytest.mark.parametrize("overrides,world,message", BAD, ids=["batch", "fp16-zero3-pp", "world", "data", "heads", "precision"])
def test_bad_config_rejected_before_process_group(shard, tmp_path, overrides, world, message):
    # RANK/WORLD_SIZE as a launcher would set them, but no rendezvous partner exists: reaching
    # init_process_group would hang (and the timeout would fail the test) instead of exiting 2.
    env = {**ENV, "RANK": "0", "WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    args = ["--config", TINY_RUN, f"data.train_paths=[{shard}]", f"train.run_dir={tmp_path}", *overrides]
    res = run_command([sys.executable, "-m", "megalm.train", *args], timeout=60, env=env)
    assert res.returncode == 2, res.output
    assert message in res.output, res.output
