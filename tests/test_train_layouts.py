"""Issue 4 acceptance: every (tp, pp, dp, zero) layout trains the tiny model with the loss curve of the
single-process baseline, within 1e-4 relative at every one of 20 steps, with the same global batch."""
from __future__ import annotations

import pytest

from tests.train_fixtures import TINY_RUN, read_losses, write_synthetic_shard

STEPS = 20
RTOL = 1e-4


def _train(overrides: list[str], run_dir: str):
    """Runs on every rank of a pool: the real entry's train() with the pool's process group."""
    import torch.distributed as dist

    from megalm.config.run import load_run_config
    from megalm.training.launch_env import LaunchEnv
    from megalm.training.loop import train

    cfg = load_run_config(TINY_RUN, overrides + [f"train.run_dir={run_dir}", f"train.train_steps={STEPS}"])
    rank, world = dist.get_rank(), dist.get_world_size()
    rc = train(cfg, LaunchEnv(rank, world, rank, "127.0.0.1", 0, "torch"), stack_dump=False)
    return rc, (read_losses(run_dir) if rank == 0 else None)


@pytest.fixture(scope="module")
def shard(tmp_path_factory):
    return write_synthetic_shard(str(tmp_path_factory.mktemp("shard") / "tokens"))


def _run(rank_pool, world, tp, pp, zero, shard, run_dir, extra=()):
    overrides = [f"data.train_paths=[{shard}]", f"parallel.tp={tp}", f"parallel.pp={pp}",
                 f"parallel.zero_stage={zero}", "train.save_at_end=false", *extra]
    results = rank_pool(world).run(_train, overrides, run_dir, timeout=600)
    assert all(rc == 0 for rc, _ in results), results
    losses = results[0][1]
    assert sorted(losses) == list(range(1, STEPS + 1)), f"missing steps in {losses}"
    return [losses[s] for s in range(1, STEPS + 1)]


@pytest.fixture(scope="module")
def baseline(rank_pool, shard, tmp_path_factory):
    losses = _run(rank_pool, 1, 1, 1, 0, shard, str(tmp_path_factory.mktemp("baseline")))
    assert losses[-1] < losses[0] * 0.8, f"baseline loss does not fall: {losses}"
    return losses


LAYOUTS = [  # (tp, pp, dp, zero)
    (1, 1, 2, 1), (1, 1, 2, 2), (1, 1, 2, 3), (2, 1, 1, 0), (2, 1, 2, 3),
    (1, 2, 1, 0), (1, 2, 2, 1), (2, 2, 2, 1),
]


@pytest.mark.parametrize("tp,pp,dp,zero", LAYOUTS, ids=[f"tp{t}-pp{p}-dp{d}-z{z}" for t, p, d, z in LAYOUTS])
def test_layout_matches_single_process(rank_pool, shard, baseline, tmp_path, tp, pp, dp, zero):
    losses = _run(rank_pool, tp * pp * dp, tp, pp, zero, shard, str(tmp_path / "run"))
    for step, (got, want) in enumerate(zip(losses, baseline), start=1):
        assert abs(got - want) <= RTOL * abs(want), (
            f"step {step}: loss {got!r} vs baseline {want!r} (rel {abs(got - want) / abs(want):.2e})\n"
            f"layout curve {losses}\nbaseline     {baseline}")


AC_LAYOUTS = [(1, 2, 1, 0), (2, 1, 1, 0), (1, 1, 2, 3)]


@pytest.mark.parametrize("tp,pp,dp,zero", AC_LAYOUTS, ids=[f"ac-tp{t}-pp{p}-dp{d}-z{z}" for t, p, d, z in AC_LAYOUTS])
def test_activation_checkpointing_matches_single_process(rank_pool, shard, baseline, tmp_path, tp, pp, dp, zero):
    """Recomputing activations in the backward pass changes memory, not the numbers."""
    losses = _run(rank_pool, tp * pp * dp, tp, pp, zero, shard, str(tmp_path / "run"),
                  extra=["train.activation_checkpointing=true"])
    for step, (got, want) in enumerate(zip(losses, baseline), start=1):
        assert abs(got - want) <= RTOL * abs(want), f"step {step}: {got!r} vs {want!r}"
