"""Absolute timings per contender, for pytest-benchmark's table and JSON.

These are not interleaved (pytest-benchmark times one callable per test), so
compare them across runs on one machine only; the ratios that CI guards are
in test_ratios.py. Each round is ``loop.run_until_complete`` of a batch of
operations (``extra_info["operations_per_round"]``); in the normal test run
pytest-benchmark is disabled and each case runs one small batch as a smoke
test.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from ._harness import FULL, Contender
from ._workloads import (
    SAFETY_ON,
    STATS_EVERY,
    Contended,
    Lease,
    RawConnection,
    Waiters,
    asyncpg_pool,
    minimal_pool,
    safepool_pool,
)
from .conftest import Bench

pytestmark = pytest.mark.solo  # the README command's second run (-m solo) selects only marked tests

Factory = Callable[[str], Contender]
UNBOUNDED = {"max_waiters": None}

# (group, name, factory, operations per round in quick mode, in full mode)
CASES: list[tuple[str, str, Factory, int, int]] = [
    ("1 empty lease", "asyncpg", lambda dsn: Lease("asyncpg", asyncpg_pool(dsn), query=False), 50, 2_000),
    ("1 empty lease", "safepool", lambda dsn: Lease("safepool", safepool_pool(dsn), query=False), 200, 20_000),
    ("1 empty lease", "minimal", lambda dsn: Lease("minimal", minimal_pool(), query=False), 200, 100_000),
    ("2 query lease", "asyncpg", lambda dsn: Lease("asyncpg", asyncpg_pool(dsn), query=True), 50, 2_000),
    ("2 query lease", "safepool", lambda dsn: Lease("safepool", safepool_pool(dsn), query=True), 50, 2_000),
    ("2 query lease", "safepool rollback",
     lambda dsn: Lease("rollback", safepool_pool(dsn, reset_mode="rollback"), query=True), 50, 2_000),
    ("2 query lease", "safepool safety on",
     lambda dsn: Lease("safety", safepool_pool(dsn, **SAFETY_ON), query=True, stats_every=STATS_EVERY), 50, 2_000),
    ("2 query lease", "raw connection", lambda dsn: RawConnection(dsn), 50, 2_000),
    ("3 contended", "asyncpg", lambda dsn: Contended("asyncpg", asyncpg_pool(dsn)), 200, 5_000),
    ("3 contended", "safepool", lambda dsn: Contended("safepool", safepool_pool(dsn)), 200, 5_000),
    ("3 contended", "safepool rollback",
     lambda dsn: Contended("rollback", safepool_pool(dsn, reset_mode="rollback")), 200, 5_000),
    ("3 contended", "safepool safety on",
     lambda dsn: Contended("safety", safepool_pool(dsn, **SAFETY_ON), stats_every=STATS_EVERY), 200, 5_000),
    ("4 hand-off", "safepool 10 waiting",
     lambda dsn: Waiters("sp10", safepool_pool(dsn, **UNBOUNDED), waiters=10), 500, 50_000),
    ("4 hand-off", "safepool 10000 waiting",
     lambda dsn: Waiters("sp10000", safepool_pool(dsn, **UNBOUNDED), waiters=10_000), 500, 50_000),
    ("4 hand-off", "minimal 10 waiting", lambda dsn: Waiters("min10", minimal_pool(), waiters=10), 500, 50_000),
    ("4 hand-off", "minimal 10000 waiting",
     lambda dsn: Waiters("min10000", minimal_pool(), waiters=10_000), 500, 50_000),
]


@pytest.mark.parametrize(
    ("group", "name", "factory", "quick_n", "full_n"), CASES, ids=[f"{c[0]}: {c[1]}" for c in CASES]
)
def test_timing(
    benchmark: Any, bench: Bench, group: str, name: str, factory: Factory, quick_n: int, full_n: int
) -> None:
    loop = bench.loop
    contender = factory(bench.dsn)
    n = full_n if bench.mode is FULL else quick_n
    benchmark.group = group
    benchmark.extra_info["operations_per_round"] = n

    async def batch() -> None:
        await contender.run(n)
        await contender.settle()

    def setup() -> None:
        if contender.per_round:
            loop.run_until_complete(contender.setup())

    def teardown() -> None:
        if contender.per_round:
            loop.run_until_complete(contender.teardown())

    if not contender.per_round:
        loop.run_until_complete(contender.setup())
    try:
        benchmark.pedantic(
            lambda: loop.run_until_complete(batch()), setup=setup, teardown=teardown,
            rounds=bench.mode.slow_rounds, warmup_rounds=1,
        )
        if benchmark.stats is not None:
            benchmark.extra_info["median_us_per_operation"] = benchmark.stats.stats.median / n * 1e6
    finally:
        # Per-round contenders: pedantic() tears down after each round, but not
        # when disabled (it then runs setup and target only); teardown is idempotent.
        loop.run_until_complete(contender.teardown())
        loop.run_until_complete(contender.close())
