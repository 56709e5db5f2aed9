"""Shared fixtures. `rank_pool(n)` hands out one long-lived n-rank gloo pool per world size per session."""
from __future__ import annotations

import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from tests.harness import RankPool  # noqa: E402


@pytest.fixture(scope="session")
def rank_pool():
    """Factory: `rank_pool(4)` returns a ready 4-rank pool, reused across tests; a pool broken by a
    failed or hung test is replaced on the next request, so one failure does not cascade."""
    pools: dict[int, RankPool] = {}

    def get(world_size: int) -> RankPool:
        pool = pools.get(world_size)
        if pool is None or pool.broken:
            pools[world_size] = pool = RankPool(world_size)
        return pool

    yield get
    for pool in pools.values():
        if not pool.broken:
            pool.close()


@pytest.fixture(scope="session")
def repo_root() -> str:
    return REPO
