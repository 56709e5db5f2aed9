"""User errors after launch (corrupt shard, truncated checkpoint, disk full during a save) end as ONE
`megalm-train: <what>: <fix>` line from rank 0 and a non-zero exit, never a traceback per rank or a hang.
Real runs of the tiny config under torchrun; the disk-full case writes to a 4 MiB tmpfs."""
from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest

from tests.test_train_faults import _train
from tests.train_fixtures import write_synthetic_shard
from megalm.training.checkpoint import checkpoint_root, complete_steps, read_latest


@pytest.fixture(scope="module")
def shard(tmp_path_factory):
    return write_synthetic_shard(str(tmp_path_factory.mktemp("shard") / "tokens"))


def _one_clean_error(res) -> str:
    """The single `megalm-train:` line; fails on a rank traceback (torchrun's own ChildFailedError
    report, which it prints whenever a worker exits non-zero, is not ours and is allowed)."""
    assert res.returncode != 0, res.output[-3000:]
    lines = [line for line in res.output.splitlines() if line.startswith("megalm-train:")]
    assert len(lines) == 1, res.output[-5000:]
    assert res.output.count("Traceback") == res.output.count("ChildFailedError:"), res.output[-5000:]
    assert not re.search(r'File ".*/megalm/', res.output), res.output[-5000:]
    return lines[0]


def test_corrupt_shard_is_one_line_at_world_size_2(shard, tmp_path):
    bad = str(tmp_path / "bad" / "tokens")
    os.makedirs(os.path.dirname(bad))
    for ext in (".idx", ".bin"):
        shutil.copy(shard + ext, bad + ext)
    os.truncate(bad + ".bin", os.path.getsize(bad + ".bin") // 2)
    line = _one_clean_error(_train(bad, str(tmp_path / "r"), nproc=2))
    assert f"{bad}.bin" in line and "truncated or corrupt" in line and "megalm-prep" in line


def test_truncated_checkpoint_names_file_and_earlier_steps(shard, tmp_path):
    run_dir = str(tmp_path / "r")
    _train(shard, run_dir, "train.save_interval=4", nproc=2).check()
    root = checkpoint_root(run_dir)
    assert complete_steps(root) == [4, 8]
    bad = os.path.join(root, "step_00000008", "mp_rank_00_model_states.pt")
    os.truncate(bad, os.path.getsize(bad) // 2)
    res = _train(shard, run_dir, "--resume", "auto", "train.train_steps=10", nproc=2)
    line = _one_clean_error(res)
    assert bad in line and "truncated" in line, line
    assert "complete earlier steps: [4]" in line and "--resume step_00000004" in line, line
    assert "resumed from step" not in res.output  # never a silent fallback to step 4


def _mount_tmpfs(path: str, size: str) -> bool:
    os.makedirs(path, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", path],
                          capture_output=True).returncode == 0


def test_disk_full_during_save_names_the_path_and_keeps_previous(shard, tmp_path):
    mnt = str(tmp_path / "small")
    if not _mount_tmpfs(mnt, "4m"):  # one tiny checkpoint is 2.6 MB: the second save cannot fit
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        run_dir = os.path.join(mnt, "r")
        res = _train(shard, run_dir, "train.save_interval=2", "train.train_steps=4")
        line = _one_clean_error(res)
        assert "no space left on" in line and checkpoint_root(run_dir) in line, line
        root = checkpoint_root(run_dir)
        assert complete_steps(root) == [2] and read_latest(root) == "step_00000002"
    finally:
        subprocess.run(["umount", mnt], check=False)
