"""The multi-rank harness itself: results per rank, errors with tracebacks, hangs with stacks."""
import time

import pytest

from tests.harness import RankPool, RankPoolError, run_command


def _rank_and_sum():
    import torch
    import torch.distributed as dist

    t = torch.tensor([float(dist.get_rank() + 1)])
    dist.all_reduce(t)
    return dist.get_rank(), t.item()


def _fail_on_rank_one():
    import torch.distributed as dist

    if dist.get_rank() == 1:
        raise ValueError("planted failure on rank 1")
    return "fine"


def _hang_on_rank_zero():
    import torch.distributed as dist

    if dist.get_rank() == 0:
        while True:  # a rank that never reaches the collective
            time.sleep(0.1)
    return "done"


def test_pool_runs_collectives(rank_pool):
    results = rank_pool(2).run(_rank_and_sum)
    assert results == [(0, 3.0), (1, 3.0)]


def test_pool_reports_rank_traceback():
    with RankPool(2) as pool:
        with pytest.raises(RankPoolError, match="planted failure on rank 1"):
            pool.run(_fail_on_rank_one)
        assert pool.broken


def test_pool_hang_times_out_with_stack():
    pool = RankPool(2)
    t0 = time.monotonic()
    with pytest.raises(RankPoolError) as err:
        pool.run(_hang_on_rank_zero, timeout=5)
    assert time.monotonic() - t0 < 30
    msg = str(err.value)
    assert "rank 0 did not finish" in msg and "_hang_on_rank_zero" in msg  # the hung frame is named
    assert pool.broken


def test_run_command_timeout_kills_and_reports():
    with pytest.raises(AssertionError, match="did not finish within 2s"):
        run_command(["sleep", "30"], timeout=2)
    assert run_command(["sh", "-c", "echo hi; exit 3"], timeout=10).returncode == 3
