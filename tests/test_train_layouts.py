"""Issue 4 acceptance: every (tp, pp, dp, zero) layout trains the tiny model with the loss curve of the
single-process baseline, within 1e-4 relative at every one of 20 steps, with the same global batch."""
from __future__ import annotations

import pytest

from tests.train_fixtures import LAYOUT_STEPS as STEPS, layout_curve, write_synthetic_shard

RTOL = 1e-4


@pytest.fixture(scope="module")
def shard(tmp_path_factory):
    return write_synthetic_shard(str(tmp_path_factory.mktemp("shard") / "tokens"))


def _run(rank_pool, world, tp, pp, zero, shard, run_dir, extra=()):
    return layout_curve(rank_pool, tp, pp, world // (tp * pp), zero, shard, run_dir, extra)


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
