"""Shared fixtures. `rank_pool(n)` hands out one long-lived n-rank gloo pool per world size per session."""
from __future__ import annotations

import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from tests.harness import RankPool  # noqa: E402


# A pool is replaced once a rank holds more gloo groups than this (an engine a failed test never closed
# keeps its groups). Replacing costs a few seconds; idle, 76 groups cost a rank ~6% of a core.
MAX_GLOO_THREADS = 20


@pytest.fixture(scope="session")
def rank_pool():
    """Factory: `rank_pool(4)` returns a ready 4-rank pool, reused across tests; a pool broken by a
    failed or hung test is replaced on the next request, so one failure does not cascade."""
    pools: dict[int, RankPool] = {}

    def get(world_size: int) -> RankPool:
        pool = pools.get(world_size)
        if pool is not None and not pool.broken and pool.gloo_threads() > MAX_GLOO_THREADS:
            pool.close()  # its leaked groups' threads keep waking and slow every later test
        if pool is None or pool.broken:
            pools[world_size] = pool = RankPool(world_size)
        return pool

    def close_all() -> None:
        """End every idle pool (a later request starts a fresh one): for a test that needs the memory
        their ranks hold, ~0.3-0.6 GB each, 15 processes once worlds 1, 2, 4 and 8 are up."""
        for pool in pools.values():
            if not pool.broken:
                pool.close()
        pools.clear()

    get.close_all = close_all  # type: ignore[attr-defined]
    yield get
    close_all()


@pytest.fixture(scope="session")
def repo_root() -> str:
    return REPO


@pytest.fixture(scope="session")
def tiny_run_dir(tmp_path_factory) -> str:
    """A real 1-process run of the tiny config with complete checkpoints at steps 2 and 4 (latest).
    Shared read-only: tests that feed it to tools must not change it."""
    from tests.harness import run_command
    from tests.train_fixtures import TINY_RUN, write_synthetic_shard

    shard = write_synthetic_shard(str(tmp_path_factory.mktemp("tiny_shard") / "tokens"))
    run_dir = str(tmp_path_factory.mktemp("tiny_run") / "run")
    run_command([sys.executable, "-m", "megalm.train", "--config", TINY_RUN, f"data.train_paths=[{shard}]",
                 f"train.run_dir={run_dir}", "train.train_steps=4", "train.save_interval=2"], timeout=300,
                env={"OMP_NUM_THREADS": "1"}).check()
    return run_dir


# The fault table (tests/fault_table.py): outcomes of the tests that feed each case, printed at the end.
_FAULT_RESULTS: dict[str, list[str]] = {}


def pytest_runtest_logreport(report) -> None:
    if report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
        path, _, name = report.nodeid.partition("::")
        key = f"{os.path.basename(path)}::{name.split('[')[0]}"
        _FAULT_RESULTS.setdefault(key, []).append(report.outcome)


def pytest_terminal_summary(terminalreporter) -> None:
    from tests.fault_table import DRILL, FAULT_CASES

    rows = []
    for case in FAULT_CASES:
        outcomes = [o for t in case.tests for o in _FAULT_RESULTS.get(t, [])]
        if outcomes:
            verdict = "FAILED" if "failed" in outcomes else ("passed" if "passed" in outcomes else outcomes[0])
            rows.append(f"  {verdict:8} {case.outcome:12} {case.fault}")
    drill = _FAULT_RESULTS.get("test_fault_drill.py::test_bad_input", [])
    if not rows and not drill:
        return
    terminalreporter.section("fault table (tests/fault_table.py)")
    for row in rows:
        terminalreporter.write_line(row)
    if drill:
        terminalreporter.write_line(f"  bad-input drill: {drill.count('passed')} of {len(DRILL)} rows passed"
                                    + (f", {drill.count('failed')} FAILED" if "failed" in drill else ""))
