"""megalm/rundir.py, the one definition of the run directory: step names, `latest`, completeness,
atomic writes, stale-save cleanup and the prune rule, and that the trainer, the export tools and the
launcher see the same checkpoints in the same directory."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from megalm import rundir
from megalm.rundir import CheckpointError, parse_entry, parse_tag, tag_for

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_ckpt(root: str, name: str, meta: bool = True, step: int | None = None) -> str:
    path = os.path.join(root, name)
    os.makedirs(os.path.join(path, rundir.RNG_DIR), exist_ok=True)
    with open(os.path.join(path, "mp_rank_00_model_states.pt"), "wb") as f:
        f.write(b"x" * 64)
    if meta:
        with open(rundir.meta_file(path), "w") as f:
            json.dump({"step": step if step is not None else (parse_entry(name) or (0,))[0]}, f)
    return path


# --------------------------------------------------------------------------------------------- names

@pytest.mark.parametrize("step", [0, 1, 12, 99_999_999, 100_000_000, 123_456_789_012])
def test_tag_round_trip(step):
    tag = tag_for(step)
    assert parse_tag(tag) == step and parse_entry(tag) == (step, False)
    assert parse_entry(rundir.tmp_tag_for(step)) == (step, True) and parse_tag(rundir.tmp_tag_for(step)) is None
    assert tag_for(parse_tag(tag)) == tag


def test_one_regex_accepts_only_canonical_names():
    assert tag_for(12) == "step_00000012"
    assert parse_tag("step_00000012") == 12
    assert parse_entry("step_00000012.tmp") == (12, True)
    for bad in ("step_12", "step_0000012", "step_000000012", "step_00000012.tmpx", "step_00000012.deleting",
                "step_0000001a", "step_00000012/", "xstep_00000012", "step_-0000012", "latest", "step_"):
        assert parse_entry(bad) is None and parse_tag(bad) is None, bad
    with pytest.raises(ValueError):
        tag_for(-1)


def test_path_helpers_place_files_in_the_documented_layout():
    rd = "/r"
    assert rundir.heartbeat_file(rd) == "/r/heartbeat.json"
    assert rundir.stack_file(rd, 3) == "/r/stacks/rank00003.txt"
    assert rundir.restarts_file(rd) == "/r/restarts.jsonl" and rundir.metrics_file(rd) == "/r/metrics.jsonl"
    assert rundir.config_file(rd) == "/r/config.yaml" and rundir.tensorboard_dir(rd) == "/r/tensorboard"
    assert rundir.eval_result_file(rd, 7) == "/r/eval/step_00000007.json"
    assert rundir.eval_tensorboard_dir(rd) == "/r/eval/tensorboard"
    assert rundir.slurm_attempts_file(rd) == "/r/slurm/attempts.jsonl" and rundir.slurm_jobs_file(rd) == "/r/slurm/jobs.txt"
    assert rundir.slurm_output_pattern(rd) == "/r/slurm/job-%j.out"
    root = rundir.checkpoint_root(rd)
    assert root == "/r/checkpoints" and rundir.latest_file(root) == "/r/checkpoints/latest"
    assert rundir.rng_file(os.path.join(root, tag_for(5)), 2) == "/r/checkpoints/step_00000005/rng/rank00002.pt"
    assert rundir.meta_file("/r/checkpoints/step_00000005") == "/r/checkpoints/step_00000005/megalm.json"


def test_stack_files_in_rank_order(tmp_path):
    rd = str(tmp_path)
    for r in (10, 2, 0):
        os.makedirs(os.path.dirname(rundir.stack_file(rd, r)), exist_ok=True)
        open(rundir.stack_file(rd, r), "w").close()
    open(os.path.join(rundir.stacks_dir(rd), "notes.txt"), "w").close()
    assert [r for r, _ in rundir.stack_files(rd)] == [0, 2, 10]
    assert rundir.stack_files(str(tmp_path / "none")) == []


# ------------------------------------------------------------------------------------ latest, writes

def test_latest_strict_and_lenient(tmp_path):
    root = str(tmp_path)
    assert rundir.read_latest(root) is None and rundir.read_latest_pointer(root) is None
    make_ckpt(root, tag_for(5))
    make_ckpt(root, tag_for(9), meta=False)
    rundir.write_atomic(rundir.latest_file(root), tag_for(5))
    assert rundir.read_latest(root) == tag_for(5) and rundir.latest_complete_step(root) == 5
    for bad in (tag_for(9), tag_for(9) + rundir.TMP_SUFFIX, "step_5", ""):
        rundir.write_atomic(rundir.latest_file(root), bad)
        assert rundir.read_latest_pointer(root) == (bad or None)  # listing still shows what it says
        assert rundir.latest_complete_step(root) is None
        with pytest.raises(CheckpointError, match="not a complete checkpoint"):
            rundir.read_latest(root)


def test_write_atomic_leaves_no_tmp(tmp_path):
    path = str(tmp_path / "f")
    rundir.write_atomic(path, "one")
    rundir.write_atomic(path, "two", fsync=False)
    assert open(path).read() == "two" and os.listdir(tmp_path) == ["f"]


def test_remove_stale_tmp_removes_only_dead_saves(tmp_path):
    root = str(tmp_path)
    make_ckpt(root, tag_for(5))
    make_ckpt(root, tag_for(6), meta=False)  # incomplete: listed as such, never removed here
    make_ckpt(root, rundir.tmp_tag_for(7))
    make_ckpt(root, tag_for(3) + rundir.DELETING_SUFFIX)  # a prune that died mid-delete
    open(rundir.latest_file(root) + rundir.TMP_SUFFIX, "w").close()
    open(os.path.join(root, "notes.tmp"), "w").close()  # not ours
    removed = rundir.remove_stale_tmp(root)
    assert removed == sorted([rundir.tmp_tag_for(7), tag_for(3) + rundir.DELETING_SUFFIX, "latest.tmp"])
    assert sorted(os.listdir(root)) == ["notes.tmp", tag_for(5), tag_for(6)]


def test_publish_replaces_a_resaved_step(tmp_path):
    root = str(tmp_path)
    make_ckpt(root, tag_for(4))
    rundir.write_atomic(rundir.latest_file(root), tag_for(4))
    tmp = make_ckpt(root, rundir.tmp_tag_for(4), step=4)
    open(os.path.join(tmp, "new"), "w").close()
    assert rundir.publish_checkpoint(root, 4) == os.path.join(root, tag_for(4))
    assert os.path.isfile(os.path.join(root, tag_for(4), "new")) and sorted(os.listdir(root)) == ["latest", tag_for(4)]
    make_ckpt(root, rundir.tmp_tag_for(8), meta=False)
    with pytest.raises(CheckpointError, match="without megalm.json"):
        rundir.publish_checkpoint(root, 8)  # never point `latest` at a save without its metadata
    assert rundir.read_latest(root) == tag_for(4)


# ------------------------------------------------------------------------------------------------ prune

def test_prune_renames_out_of_the_namespace_before_deleting(tmp_path, monkeypatch):
    root = str(tmp_path)
    for s in (1, 2, 3, 4, 5, 6):
        make_ckpt(root, tag_for(s))
    make_ckpt(root, rundir.tmp_tag_for(7))
    make_ckpt(root, tag_for(8), meta=False)
    rundir.write_atomic(rundir.latest_file(root), tag_for(2))  # e.g. resumed from an older step
    seen = []
    real_rmtree = shutil.rmtree
    files_of = {n: sorted(os.listdir(os.path.join(root, n))) for n in os.listdir(root) if rundir.is_complete(root, n)}

    def watching_rmtree(path, *a, **kw):
        name = os.path.basename(path)
        assert name.endswith(rundir.DELETING_SUFFIX) and parse_entry(name) is None, f"deleted in place: {path}"
        # A reader at this moment sees only whole checkpoints: each one still visible has all its files.
        for n in os.listdir(root):
            if n in files_of:
                assert sorted(os.listdir(os.path.join(root, n))) == files_of[n], n
        seen.append(name)
        # a deletion that dies halfway leaves a .deleting remnant, invisible to every reader
        os.unlink(os.path.join(path, rundir.META_FILE))
        raise OSError("simulated crash inside rmtree")

    monkeypatch.setattr(rundir.shutil, "rmtree", watching_rmtree)
    with pytest.raises(OSError, match="simulated"):
        rundir.prune(root, keep_last=2, protect=(tag_for(3),))
    monkeypatch.setattr(rundir.shutil, "rmtree", real_rmtree)
    assert seen == [tag_for(1) + rundir.DELETING_SUFFIX]
    assert rundir.complete_steps(root) == [2, 3, 4, 5, 6]
    assert rundir.prune(root, keep_last=2, protect=(tag_for(3),)) == [4]
    # kept: the newest two, `latest`'s target, the protected tag; never the save in progress or the incomplete dir
    assert rundir.complete_steps(root) == [2, 3, 5, 6]
    assert os.path.isdir(os.path.join(root, rundir.tmp_tag_for(7))) and os.path.isdir(os.path.join(root, tag_for(8)))
    assert rundir.read_latest(root) == tag_for(2)
    assert rundir.remove_stale_tmp(root) == sorted([tag_for(1) + rundir.DELETING_SUFFIX, rundir.tmp_tag_for(7)])


def test_prune_rule(tmp_path):
    root = str(tmp_path)
    for s in (5, 10, 15, 20, 25):
        make_ckpt(root, tag_for(s))
    rundir.write_atomic(rundir.latest_file(root), tag_for(25))
    assert rundir.plan_prune(root, keep_last=1, keep_every=10) == ([10, 20, 25], [5, 15])
    assert rundir.prune(root, keep_last=1, keep_every=10, dry_run=True) == [5, 15]
    assert rundir.complete_steps(root) == [5, 10, 15, 20, 25]
    for bad in ({"keep_last": 0}, {"keep_last": 1, "keep_every": 0}):
        with pytest.raises(ValueError):
            rundir.prune(root, **bad)


# ---------------------------------------------------------------------------- every reader agrees

def test_trainer_export_and_launcher_views_agree(tmp_path):
    from launcher import checkpoints as launcher_ckpt
    from megalm.export.checkpoint_files import list_checkpoints as export_steps, locate_checkpoint
    from megalm.training import checkpoint as trainer_ckpt

    rd = str(tmp_path / "run")
    root = rundir.checkpoint_root(rd)
    for s in (5, 10, 100_000_000):
        make_ckpt(root, tag_for(s))
    make_ckpt(root, rundir.tmp_tag_for(15))  # a save in progress (its metadata already written)
    make_ckpt(root, tag_for(20), meta=False)  # a save that died before megalm.json
    make_ckpt(root, "step_12", step=12)  # not a canonical name: nobody's checkpoint
    make_ckpt(root, "step_000000030", step=30)
    make_ckpt(root, tag_for(40) + rundir.DELETING_SUFFIX)  # a prune in progress
    rundir.write_atomic(rundir.latest_file(root), tag_for(10))

    expected = [5, 10, 100_000_000]
    entries = launcher_ckpt.list_checkpoints(rd)
    assert trainer_ckpt.complete_steps(root) == expected == rundir.complete_steps(root)
    assert [e.step for e in entries if e.complete] == expected
    assert export_steps(rd) == expected
    assert {e.tag: e.status for e in entries} == {tag_for(5): "complete", tag_for(10): "complete",
                                                   tag_for(100_000_000): "complete", rundir.tmp_tag_for(15):
                                                   f"abandoned (no live run holds {rundir.lock_file(rd)})",
                                                   tag_for(20): "incomplete"}
    assert trainer_ckpt.read_latest(root) == tag_for(10) == launcher_ckpt.read_latest(rd)
    assert launcher_ckpt.latest_complete_step(rd) == 10 == locate_checkpoint(rd).step
    assert [e.tag for e in entries if e.is_latest] == [tag_for(10)]

    rundir.write_atomic(rundir.latest_file(root), tag_for(20))  # `latest` naming an incomplete step
    with pytest.raises(trainer_ckpt.CheckpointError):
        trainer_ckpt.read_latest(root)  # the trainer refuses to guess
    with pytest.raises(trainer_ckpt.CheckpointError):
        locate_checkpoint(rd)
    assert launcher_ckpt.latest_complete_step(rd) is None  # the launcher lists and reports it
    assert "latest" in launcher_ckpt.verify(rd, quick=True)


def test_rundir_and_launcher_import_without_torch_or_numpy():
    code = ("import sys, megalm.rundir, launcher.cli, launcher.supervisor, launcher.status, launcher.checkpoints, "
            "launcher.sbatch; bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'numpy', "
            "'deepspeed') or (m.startswith('megalm.') and m not in ('megalm.rundir', 'megalm.runlock', 'megalm.ckpt_files'))); assert not bad, bad")
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, env={**os.environ, "PYTHONPATH": REPO},
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    # stdlib only: every module megalm.rundir imports comes with Python itself
    code = ("import sys; before = set(sys.modules); import megalm.rundir, megalm.runlock; new = set(sys.modules) - before; "
            "bad = sorted(m for m in new if m.split('.')[0] not in sys.stdlib_module_names and m.split('.')[0] "
            "!= 'megalm'); assert not bad, bad")
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, env={**os.environ, "PYTHONPATH": REPO},
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
