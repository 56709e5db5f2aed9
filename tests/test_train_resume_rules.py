"""What a resume may change (DESIGN decision 33): seq_len, data.seed and the tokenizer are refused (they
change what consumed_samples means); data paths/weights and the global batch are allowed and recorded
in megalm.json `resume_changes`; the LR schedule always comes from the current config."""
from __future__ import annotations

import pytest

from tests.test_train_faults import _records, _train
from tests.train_fixtures import write_synthetic_shard
from megalm.config.run import load_run_config
from megalm.training.checkpoint import checkpoint_root, read_latest, read_meta
from megalm.training.schedule import lr_at
from tests.train_fixtures import TINY_RUN


@pytest.fixture(scope="module")
def shard(tmp_path_factory):
    return write_synthetic_shard(str(tmp_path_factory.mktemp("shard") / "tokens"))


def test_resume_refuses_seq_len_and_seed_changes_in_one_error(shard, tmp_path):
    run_dir = str(tmp_path / "r")
    _train(shard, run_dir, "train.train_steps=4").check()
    res = _train(shard, run_dir, "--resume", "auto", "data.seq_len=16", "data.seed=99")
    assert res.returncode == 2, res.output[-3000:]
    lines = [line for line in res.output.splitlines() if line.startswith("megalm-train:")]
    assert len(lines) == 1 and "Traceback" not in res.output, res.output[-3000:]
    assert "data.seq_len: checkpoint 32 vs this run 16" in res.output
    assert "data.seed: checkpoint 1234 vs this run 99" in res.output
    assert "start a new run" in res.output and "resumed from step" not in res.output


def test_resume_allows_and_records_data_and_batch_changes(shard, tmp_path):
    other = write_synthetic_shard(str(tmp_path / "other" / "tokens"), seed=1)
    run_dir = str(tmp_path / "r")
    root = checkpoint_root(run_dir)
    _train(shard, run_dir, "train.train_steps=4").check()
    _train(other, run_dir, "--resume", "auto", "train.train_steps=6").check()
    res = _train(other, run_dir, "--resume", "auto", "train.train_steps=8", "train.global_batch_size=4").check()
    assert "resumed from step 6" in res.output
    meta = read_meta(root, read_latest(root))
    assert meta["step"] == 8 and meta["consumed_samples"] == 6 * 8 + 2 * 4
    changes = meta["resume_changes"]
    assert changes == [{"step": 4, "field": "data.train_paths", "old": [shard], "new": [other]},
                       {"step": 6, "field": "train.global_batch_size", "old": 8, "new": 4}], changes


def test_resume_lr_comes_from_the_current_config(shard, tmp_path):
    """Megatron's --override-opt_param-scheduler: lr, min_lr, warm-up and decay of the config that
    resumes apply at the resumed step (before, DeepSpeed's restored base LR made 1e-2 end at 9e-5)."""
    run_dir = str(tmp_path / "r")
    _train(shard, run_dir, "train.train_steps=4", "train.lr_decay_steps=8").check()
    new = ["train.lr=1e-2", "train.min_lr=1e-3", "train.lr_decay_steps=8"]
    _train(shard, run_dir, "--resume", "auto", *new).check()
    cfg = load_run_config(TINY_RUN, [f"data.train_paths=[{shard}]", "train.train_steps=8", *new]).train
    rec = _records(run_dir)
    for step in range(5, 9):  # the value logged at step s is the LR the next update (0-based s) uses
        assert rec[step]["lr"] == pytest.approx(lr_at(step, cfg), rel=1e-9), (step, rec[step]["lr"])
        assert rec[step]["lr"] >= cfg.min_lr * (1 - 1e-9)
