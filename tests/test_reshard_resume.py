"""Issue 6 acceptance: a (tp, pp, dp, ZeRO) = (2, 2, 2, 1) checkpoint resharded with `megalm-reshard`
resumes at another layout and continues the original run's loss curve within 1e-4 relative; the
resharded (universal) step holds exactly the source's weights and Adam moments; a universal step
resumes at a layout other than the one it was made for too; --weights-only warns; impossible target
layouts fail with the field named; a truncated universal file is named before any rank loads it."""
from __future__ import annotations

import json
import os
import sys

import pytest
import torch

from tests.harness import free_port, run_command
from tests.train_fixtures import read_losses, train_layout_run, train_on_rank, write_synthetic_shard

STEPS, SAVE_AT = 6, 3
RTOL = 1e-4
SOURCE = (2, 2, 2, 1)  # tp, pp, dp, zero


@pytest.fixture(scope="module")
def source(rank_pool, tmp_path_factory):
    shard = write_synthetic_shard(str(tmp_path_factory.mktemp("shard") / "tokens"))
    run_dir = str(tmp_path_factory.mktemp("source"))
    train_layout_run(rank_pool, SOURCE, shard, run_dir, STEPS, (f"train.save_interval={SAVE_AT}",))
    losses = read_losses(run_dir)
    assert sorted(losses) == list(range(1, STEPS + 1))
    return run_dir, losses


TARGETS = [(1, 1, 2, 1), (1, 4, 2, 1), (2, 1, 2, 3)]


@pytest.fixture(scope="module")
def zero3_pipeline_source(rank_pool, tmp_path_factory):
    """Issue 11: a (2, 2, 2, 3) run, one ZeRO-3 engine per pipeline stage."""
    shard = write_synthetic_shard(str(tmp_path_factory.mktemp("shard") / "tokens"))
    run_dir = str(tmp_path_factory.mktemp("zero3-pipeline"))
    train_layout_run(rank_pool, (2, 2, 2, 3), shard, run_dir, STEPS, (f"train.save_interval={SAVE_AT}",))
    return run_dir, read_losses(run_dir)


@pytest.mark.parametrize("target", TARGETS, ids=[f"tp{t}-pp{p}-dp{d}-z{z}" for t, p, d, z in TARGETS])
def test_resume_after_reshard_continues_loss_curve(rank_pool, source, tmp_path, target):
    _reshard_and_resume(rank_pool, source, tmp_path, target)


# From ZeRO-3 x PP to ZeRO-1 x PP, ZeRO-3 without PP, ZeRO-3 at pp=2 and dp=4, and into ZeRO-3 x PP from
# the (2, 2, 2, 1) source ("and back").
ZERO3_PIPELINE_TARGETS = [("z3pp", (2, 2, 2, 1)), ("z3pp", (1, 1, 4, 3)), ("z3pp", (1, 2, 4, 3)), ("z1pp", (2, 2, 2, 3))]


@pytest.mark.parametrize("origin,target", ZERO3_PIPELINE_TARGETS,
                         ids=[f"{o}-to-tp{t}-pp{p}-dp{d}-z{z}" for o, (t, p, d, z) in ZERO3_PIPELINE_TARGETS])
def test_zero3_pipeline_reshard_both_ways_continues_loss_curve(rank_pool, request, tmp_path, origin, target):
    src = request.getfixturevalue("zero3_pipeline_source" if origin == "z3pp" else "source")
    _reshard_and_resume(rank_pool, src, tmp_path, target)


def _reshard_and_resume(rank_pool, source, tmp_path, target):
    from megalm.export.checkpoint_files import locate_checkpoint
    from megalm.export.consolidate import consolidate
    from megalm.export.reshard import main as reshard

    src_dir, src_losses = source
    tp, pp, dp, zero = target
    out = str(tmp_path / "resharded")
    assert reshard(["--checkpoint", src_dir, "--step", str(SAVE_AT), "--output", out, "--tp", str(tp),
                    "--pp", str(pp), "--dp", str(dp), "--zero-stage", str(zero)]) == 0

    # the new files hold exactly the source's weights, Adam moments, step count and schedule
    src = consolidate(locate_checkpoint(src_dir, SAVE_AT), with_optimizer=True)
    new_ref = locate_checkpoint(out)
    assert new_ref.meta["layout"] == {"universal": ["weight", "exp_avg", "exp_avg_sq"], "tp": tp, "pp": pp, "dp": dp,
                                      "zero_stage": zero, "world_size": tp * pp * dp}
    assert new_ref.step == SAVE_AT and new_ref.meta["consumed_samples"] == src.ref.meta["consumed_samples"]
    new = consolidate(new_ref, with_optimizer=True)
    for name, w in src.weights.items():
        assert (new.weights[name] == w).all(), name
        for key in ("exp_avg", "exp_avg_sq"):
            assert (new.moments[name][key] == src.moments[name][key]).all(), (name, key)
    assert new.adam_step == src.adam_step == SAVE_AT
    assert new.engine_state == src.engine_state

    # resume at the new layout: steps SAVE_AT+1 .. STEPS follow the source run's curve
    assert rank_pool(tp * pp * dp).run(train_on_rank, [], "auto", os.path.join(out, "config.yaml"),
                                       timeout=600) == [0] * (tp * pp * dp)
    resumed = read_losses(out)
    assert sorted(resumed) == list(range(SAVE_AT + 1, STEPS + 1)), resumed
    for step in resumed:
        want = src_losses[step]
        assert abs(resumed[step] - want) <= RTOL * abs(want), (step, resumed[step], want)


def test_weights_only_warns_and_keeps_weights(source, tmp_path):
    from megalm.export.checkpoint_files import locate_checkpoint
    from megalm.export.consolidate import consolidate
    from megalm.export.reshard import reshard

    src_dir, _ = source
    out = str(tmp_path / "weights-only")
    with pytest.warns(UserWarning, match="Adam moments and the step count restart"):
        reshard(src_dir, out, tp=1, pp=1, dp=1, zero_stage=0, step=SAVE_AT, weights_only=True)
    src = consolidate(locate_checkpoint(src_dir, SAVE_AT))
    new = consolidate(locate_checkpoint(out))
    assert all((new.weights[n] == w).all() for n, w in src.weights.items())
    assert json.load(open(os.path.join(new.ref.path, "megalm.json")))["resharded_from"]["layout"]["tp"] == 2


def test_impossible_or_unsafe_targets_are_refused(source, tmp_path, capsys):
    from megalm.export.reshard import main as reshard

    src_dir, _ = source
    assert reshard(["--checkpoint", src_dir, "--output", str(tmp_path / "a"), "--tp", "3", "--pp", "1"]) == 2
    assert "model.num_heads: 8 query heads cannot be split over tensor_parallel=3" in capsys.readouterr().err
    assert reshard(["--checkpoint", src_dir, "--output", str(tmp_path / "b"), "--tp", "1", "--pp", "8",
                    "--zero-stage", "3"]) == 2
    assert "pipeline_parallel=8" in capsys.readouterr().err
    assert reshard(["--checkpoint", src_dir, "--output", str(tmp_path / "d"), "--tp", "1", "--pp", "1"]) == 2
    assert "global_batch_size: 8 is not divisible by micro_batch_size x dp = 2 x 8" in capsys.readouterr().err
    assert reshard(["--checkpoint", src_dir, "--output", src_dir, "--tp", "1", "--pp", "1", "--dp", "2"]) == 2
    assert "already holds checkpoints" in capsys.readouterr().err
    assert reshard(["--checkpoint", src_dir, "--step", "5", "--output", str(tmp_path / "c"), "--tp", "1",
                    "--pp", "1"]) == 2
    assert "available steps: 3, 6" in capsys.readouterr().err


def _reshard_on_rank(argv: list[str]) -> int:
    """On every rank of a pool: megalm-reshard as torchrun would start it (the pool's process group)."""
    from megalm.export.reshard import main

    return main(argv)


@pytest.fixture(scope="module")
def launched(rank_pool, source, tmp_path_factory):
    """The source resharded by a launched world of 2 (torchrun/srun): rank 0 writes, rank 1 waits."""
    src_dir, _ = source
    out = str(tmp_path_factory.mktemp("launched") / "run")
    # --dp omitted: the launched world (2) over tp x pp = 1 says dp = 2
    assert rank_pool(2).run(_reshard_on_rank, ["--checkpoint", src_dir, "--step", str(SAVE_AT), "--output", out,
                                               "--tp", "1", "--pp", "1", "--zero-stage", "3"], timeout=600) == [0, 0]
    return out


def test_reshard_as_a_launched_world(source, launched):
    from megalm.export.checkpoint_files import locate_checkpoint
    from megalm.export.consolidate import consolidate

    src_dir, _ = source
    new_ref = locate_checkpoint(launched)
    assert new_ref.meta["layout"] == {"universal": ["weight", "exp_avg", "exp_avg_sq"], "tp": 1, "pp": 1, "dp": 2,
                                      "zero_stage": 3, "world_size": 2}
    src = consolidate(locate_checkpoint(src_dir, SAVE_AT), with_optimizer=True)
    new = consolidate(new_ref, with_optimizer=True)
    for name, w in src.weights.items():
        assert torch.equal(new.weights[name], w), name
        assert all(torch.equal(new.moments[name][k], src.moments[name][k]) for k in ("exp_avg", "exp_avg_sq"))
    assert os.path.isfile(os.path.join(launched, "config.yaml"))


def test_universal_step_resumes_at_another_layout_than_it_was_made_for(rank_pool, source, launched, tmp_path):
    """Made for (1,1,2,3), resumed at (1,2,2,1) by overriding the layout: the curve still continues."""
    import shutil

    _, src_losses = source
    run = str(tmp_path / "run")
    shutil.copytree(launched, run)
    overrides = ["parallel.pp=2", "parallel.zero_stage=1", f"train.run_dir={run}"]
    assert rank_pool(4).run(train_on_rank, overrides, "auto", os.path.join(run, "config.yaml"),
                            timeout=600) == [0] * 4
    resumed = read_losses(run)
    assert sorted(resumed) == list(range(SAVE_AT + 1, STEPS + 1)), resumed
    for step in resumed:
        assert abs(resumed[step] - src_losses[step]) <= RTOL * abs(src_losses[step]), (step, resumed[step])


def test_truncated_universal_file_is_named_before_loading(launched, tmp_path):
    import shutil

    from megalm.export.checkpoint_files import locate_checkpoint

    run = str(tmp_path / "run")
    shutil.copytree(launched, run)
    victim = locate_checkpoint(run).file("universal_exp_avg.safetensors")
    with open(victim, "r+b") as f:
        f.truncate(os.path.getsize(victim) - 100)
    env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port()), "OMP_NUM_THREADS": "1"}
    result = run_command([sys.executable, "-m", "megalm.train", "--config", os.path.join(run, "config.yaml"),
                          "--resume", "auto", f"train.run_dir={run}"], timeout=300, env=env)
    assert result.returncode == 2, result.output
    assert "universal_exp_avg.safetensors" in result.output and "truncated" in result.output, result.output
    assert "Traceback" not in result.output
    verify = run_command([sys.executable, "-m", "launcher", "ckpt", "verify", "--run-dir", run], timeout=120)
    assert verify.returncode != 0 and "universal_exp_avg.safetensors: truncated" in verify.output, verify.output
    intact = run_command([sys.executable, "-m", "launcher", "ckpt", "verify", "--run-dir", launched], timeout=120)
    assert intact.returncode == 0, intact.output
