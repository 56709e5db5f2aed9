"""`megalm-launch ckpt list|verify|prune` on checkpoints written by the stub trainer (same layout and
protocol as the real one; tests/test_launcher_real_trainer.py covers real DeepSpeed checkpoints)."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from tests.harness import run_command, signal_tree

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STUB = os.path.join(REPO, "tests", "launcher_stub_trainer.py")
ENV = {"PYTHONPATH": REPO}


def ckpt(*args, expect=0):
    return run_command([sys.executable, "-m", "launcher", "ckpt", *args], timeout=60, env=ENV).check(expect)


def stub_run(run_dir, *overrides, env=None, expect=0):
    cfg = os.path.join(run_dir + ".yaml")
    with open(cfg, "w") as f:
        f.write(f"train: {{run_dir: {run_dir}, train_steps: 20, save_interval: 5, keep_last: 10}}\n"
                "stub: {step_time: 0.0}\n")
    return run_command([sys.executable, STUB, "--config", cfg, *overrides], timeout=60,
                       env={**ENV, **(env or {})}).check(expect)


@pytest.fixture
def run_dir(tmp_path):
    """Complete checkpoints at steps 5, 10, 15, 20 (latest), a half-written step_00000025.tmp (a save in
    progress) and a step directory without metadata (a save that died before megalm.json)."""
    rd = str(tmp_path / "run")
    stub_run(rd, env={"WORLD_SIZE": "1", "RANK": "0"})
    root = os.path.join(rd, "checkpoints")
    tmp = os.path.join(root, "step_00000025.tmp")
    shutil.copytree(os.path.join(root, "step_00000020"), tmp)
    os.remove(os.path.join(tmp, "megalm.json"))
    os.makedirs(os.path.join(root, "step_00000003"))
    return rd


def entries(run_dir):
    return {e["tag"]: e for e in json.loads(ckpt("list", "--run-dir", run_dir, "--json").output)}


def test_list_shows_step_status_layout_and_latest(run_dir):
    got = entries(run_dir)
    assert sorted(got) == ["step_00000003", "step_00000005", "step_00000010", "step_00000015", "step_00000020",
                           "step_00000025.tmp"]
    assert got["step_00000020"]["latest"] and not got["step_00000015"]["latest"]
    assert got["step_00000025.tmp"]["status"] == f"abandoned (no live run holds {run_dir}/.lock)"
    assert got["step_00000003"]["status"] == "incomplete"
    assert got["step_00000010"]["status"] == "complete"
    assert got["step_00000010"]["layout"] == {"tp": 1, "pp": 1, "dp": 1, "zero_stage": 1, "world_size": 1}
    assert got["step_00000010"]["size_bytes"] > 0 and got["step_00000010"]["saved_at"] > 0
    text = ckpt("list", "--run-dir", run_dir).output
    assert "step_00000020 (latest)" in text and "tp=1 pp=1 dp=1 zero=1 world=1" in text and "abandoned" in text


def test_verify_passes_on_good_checkpoints(run_dir):
    res = ckpt("verify", "--run-dir", run_dir)
    for step in (5, 10, 15, 20):
        assert f"step_{step:08d}: OK" in res.output
    assert "25" not in res.output  # a save in progress is not verified (nor deleted)


@pytest.mark.parametrize("damage, message", [
    ("truncate", "truncated zip: no central directory"),
    ("flip", "CRC mismatch"),
    ("missing_rng", "missing rng/rank00000.pt"),
    ("missing_optim", "optimizer shard(s)"),
    ("meta_step", "megalm.json says step 11, directory says 10"),
    ("meta_layout", "!= world_size"),
])
def test_verify_finds_damage(run_dir, damage, message):
    ck = os.path.join(run_dir, "checkpoints", "step_00000010")
    model = os.path.join(ck, "mp_rank_00_model_states.pt")
    if damage == "truncate":
        data = open(model, "rb").read()
        open(model, "wb").write(data[: len(data) // 2])
    elif damage == "flip":
        data = bytearray(open(model, "rb").read())
        i = data.index(b'"x"')  # inside the stored (uncompressed) member
        data[i + 1] ^= 0x01
        open(model, "wb").write(bytes(data))
    elif damage == "missing_rng":
        os.remove(os.path.join(ck, "rng", "rank00000.pt"))
    elif damage == "missing_optim":
        os.remove(os.path.join(ck, "zero_pp_rank_0_mp_rank_00_optim_states.pt"))
    else:
        meta = json.load(open(os.path.join(ck, "megalm.json")))
        if damage == "meta_step":
            meta["step"] = 11
        else:
            meta["layout"]["dp"] = 2
        json.dump(meta, open(os.path.join(ck, "megalm.json"), "w"))
    res = ckpt("verify", "--run-dir", run_dir, expect=1)
    assert "step_00000010: BAD" in res.output and message in res.output, res.output
    assert "step_00000015: OK" in res.output


def test_verify_flags_latest_naming_an_incomplete_checkpoint(run_dir):
    with open(os.path.join(run_dir, "checkpoints", "latest"), "w") as f:
        f.write("step_00000025.tmp")
    res = ckpt("verify", "--run-dir", run_dir, expect=1)
    assert "`latest` names 'step_00000025.tmp', which is not a complete checkpoint" in res.output


def test_prune_keeps_last_every_and_latest_never_tmp(run_dir):
    root = os.path.join(run_dir, "checkpoints")
    dry = json.loads(ckpt("prune", "--run-dir", run_dir, "--keep-last", "1", "--keep-every", "10", "--dry-run",
                          "--json").output)
    assert dry == {"would_delete": ["step_00000005", "step_00000015"]}
    assert os.path.isdir(os.path.join(root, "step_00000005"))  # dry run deleted nothing
    # `latest` names an older checkpoint (e.g. a run resumed from it): it must survive the prune
    with open(os.path.join(root, "latest"), "w") as f:
        f.write("step_00000005")
    res = json.loads(ckpt("prune", "--run-dir", run_dir, "--keep-last", "1", "--json").output)
    assert res == {"deleted": ["step_00000010", "step_00000015"]}
    left = sorted(os.listdir(root))
    assert left == ["latest", "step_00000003", "step_00000005", "step_00000020", "step_00000025.tmp"]
    assert "step_00000005: OK" in ckpt("verify", "--run-dir", run_dir).output
    ckpt("prune", "--run-dir", run_dir, "--keep-last", "0", expect=2)


def _kill_during_save(cfg: str, run_dir: str, step: int, *extra: str) -> None:
    """Run the stub with a 30 s pause inside every save; SIGKILL it once the step's .tmp holds its rank files."""
    proc = subprocess.Popen([sys.executable, STUB, "--config", cfg, "stub.save_time=30", *extra],
                            env={**os.environ, **ENV}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        marker = os.path.join(run_dir, "checkpoints", f"step_{step:08d}.tmp", "rng", "rank00000.pt")
        deadline = time.monotonic() + 30
        while not os.path.isfile(marker) and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.02)
        assert os.path.isfile(marker), "the save never started"
    finally:
        signal_tree(proc.pid, signal.SIGKILL)
        proc.wait()


def test_sigkill_during_save_leaves_previous_checkpoint_loadable(tmp_path):
    """Stub version (the real trainer's is in test_launcher_real_trainer.py): SIGKILL while the step-10 save
    is half written leaves `latest` on step 7, which verifies; the dead .tmp is listed, never trusted."""
    rd = str(tmp_path / "run")
    cfg = rd + ".yaml"
    with open(cfg, "w") as f:
        f.write(f"train: {{run_dir: {rd}, train_steps: 20, save_interval: 5}}\nstub: {{step_time: 0.0}}\n")
    _kill_during_save(cfg, rd, 5)
    assert not os.path.exists(os.path.join(rd, "checkpoints", "latest"))  # nothing complete yet
    run_command([sys.executable, STUB, "--config", cfg, "--resume", "auto", "train.train_steps=7"], timeout=60,
                env=ENV, check=True)  # removes the dead .tmp, starts fresh, saves step 7
    _kill_during_save(cfg, rd, 10, "--resume", "auto")
    assert open(os.path.join(rd, "checkpoints", "latest")).read().strip() == "step_00000007"
    assert "step_00000007: OK" in ckpt("verify", "--run-dir", rd).output
    assert entries(rd)["step_00000010.tmp"]["status"].startswith("abandoned (no live run holds")
    out = run_command([sys.executable, STUB, "--config", cfg, "--resume", "auto"], timeout=60, env=ENV, check=True)
    assert "resumed from step 7" in out.output


HOLD = ("import sys, time; from megalm import runlock; runlock.acquire(sys.argv[1]); "
        "print('held', flush=True); time.sleep(600)")


def test_tmp_is_writing_only_while_a_live_run_holds_the_lock(run_dir):
    """A .tmp with a live lock holder (a real process holding RUN_DIR/.lock) is a save in progress; once
    that holder is dead (SIGKILL: its lock stays behind) the same .tmp is abandoned."""
    holder = subprocess.Popen([sys.executable, "-c", HOLD, run_dir], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, **ENV})
    try:
        assert holder.stdout.readline().strip() == "held"
        assert entries(run_dir)["step_00000025.tmp"]["status"] == "writing"
    finally:
        holder.kill()
        holder.wait()
    assert os.path.exists(os.path.join(run_dir, ".lock"))
    assert entries(run_dir)["step_00000025.tmp"]["status"] == f"abandoned (no live run holds {run_dir}/.lock)"


@pytest.mark.parametrize("cmd", [["status"], ["ckpt", "list"], ["ckpt", "verify"]])
def test_mistyped_run_dir_is_an_error(tmp_path, cmd):
    missing = str(tmp_path / "no-such-run")
    res = run_command([sys.executable, "-m", "launcher", *cmd, "--run-dir", missing], timeout=60, env=ENV)
    assert res.returncode == 2, res.output
    assert f"run directory {missing} does not exist: check --run-dir" in res.output
