"""Issue 4: non-finite steps are skipped and counted (and stop the run after K in a row), checkpoints
keep the last N, and a checkpoint from another layout or model is refused with a clear message."""
from __future__ import annotations

import json
import math
import os
import sys

import pytest

from tests.harness import free_port, run_command
from tests.train_fixtures import TINY_RUN, write_synthetic_shard
from megalm.training.checkpoint import checkpoint_root, complete_steps, read_latest, read_meta

ENV = {"OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def shard(tmp_path_factory):
    return write_synthetic_shard(str(tmp_path_factory.mktemp("shard") / "tokens"))


def _train(shard, run_dir, *extra, env=None, nproc=1):
    args = ["-m", "megalm.train", "--config", TINY_RUN, f"data.train_paths=[{shard}]", f"train.run_dir={run_dir}",
            "train.train_steps=8", *extra]
    if nproc == 1:
        cmd = [sys.executable, *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
               f"--master_port={free_port()}", *args]
    return run_command(cmd, timeout=300, env={**ENV, **(env or {})})


def _records(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return {r["step"]: r for r in map(json.loads, f) if r["kind"] == "train"}


def test_nonfinite_step_is_skipped_and_counted(shard, tmp_path):
    clean, faulty = str(tmp_path / "clean"), str(tmp_path / "faulty")
    _train(shard, clean).check()
    res = _train(shard, faulty, env={"MEGALM_FAULT": "nan@3"}).check()
    assert "update skipped (1 in a row, 1 in total)" in res.output
    rec, ref = _records(faulty), _records(clean)
    # nan@3 poisons the step logged as 3 (not 4: the drill and its docstring count steps as the log does).
    assert math.isnan(rec[3]["loss"]) and rec[3]["skipped_steps"] == 1 and rec[8]["skipped_steps"] == 1
    assert rec[2]["skipped_steps"] == 0
    # The poisoned step changed nothing: step 4 trains on the weights step 2 left, so it differs from
    # the clean run (which took step 3's update) yet stays finite, and every later step is finite.
    assert all(math.isfinite(rec[s]["loss"]) for s in (1, 2, 4, 5, 6, 7, 8))
    assert [rec[s]["loss"] for s in (1, 2)] == [ref[s]["loss"] for s in (1, 2)] and rec[4]["loss"] != ref[4]["loss"]


def test_nonfinite_steps_in_a_row_stop_the_run(shard, tmp_path):
    res = _train(shard, str(tmp_path / "r"), "train.max_consecutive_nonfinite=3",
                 env={"MEGALM_FAULT": "nan@2,nan@3,nan@4"})
    assert res.returncode == 3, res.output
    assert "stopping: 3 non-finite steps in a row (train.max_consecutive_nonfinite=3)" in res.output


def test_nonfinite_skip_under_zero1_and_pipeline(shard, tmp_path):
    # the last: one ZeRO-3 engine per stage, each deciding from the world-wide overflow check (issue 11)
    for layout in (["parallel.zero_stage=1"], ["parallel.pp=2"], ["parallel.pp=2", "parallel.zero_stage=3"]):
        run_dir = str(tmp_path / "-".join(layout))
        res = _train(shard, run_dir, *layout, env={"MEGALM_FAULT": "nan@3"}, nproc=2).check()
        rec = _records(run_dir)
        assert rec[8]["skipped_steps"] == 1 and math.isfinite(rec[8]["loss"]), (layout, res.output[-3000:])


def test_keep_last_and_metadata(shard, tmp_path):
    run_dir = str(tmp_path / "r")
    _train(shard, run_dir, "train.save_interval=2", "train.keep_last=2").check()
    root = checkpoint_root(run_dir)
    assert complete_steps(root) == [6, 8] and read_latest(root) == "step_00000008"
    meta = read_meta(root, "step_00000008")
    assert meta["step"] == 8 and meta["consumed_samples"] == 64
    assert meta["layout"] == {"tp": 1, "pp": 1, "dp": 1, "zero_stage": 0, "world_size": 1}
    assert meta["model"]["hidden_size"] == 64 and meta["data_seed"] == 1234
    assert not any(name.endswith(".tmp") for name in os.listdir(root))


def test_resume_with_other_layout_or_model_is_refused(shard, tmp_path):
    run_dir = str(tmp_path / "r")
    _train(shard, run_dir, "train.train_steps=4").check()
    res = _train(shard, run_dir, "parallel.tp=2", "--resume", "auto", nproc=2)
    assert res.returncode != 0
    assert "another model-parallel layout" in res.output and "tp: checkpoint 1 vs this run 2" in res.output
    assert "megalm-reshard --checkpoint" in res.output  # the conversion, spelled out
    res = _train(shard, run_dir, "model.hidden_size=128", "--resume", "auto")
    assert res.returncode != 0 and "model.hidden_size: checkpoint 64 vs this run 128" in res.output


def test_overrides_may_follow_resume(shard, tmp_path):
    """`--resume auto section.field=value`: overrides anywhere on the command line (argparse intermixed)."""
    run_dir = str(tmp_path / "r")
    _train(shard, run_dir, "train.train_steps=4").check()
    res = _train(shard, run_dir, "--resume", "auto", "train.train_steps=6").check()
    assert "resumed from step 4" in res.output and sorted(_records(run_dir))[-1] == 6
