"""The same program on both pools, on a loop whose task factory is
``asyncio.eager_task_factory`` (Python 3.12+): a new task runs its first
step inside ``create_task()``, so asyncpg's shielded release task (and
every task its pool creates) starts at once instead of one loop pass later.

Each test runs one scenario on asyncpg's pool and on safepool, in the same
eager loop, and compares what the program observes. (Helper session 134,
2026-12: the parity fuzzer, tests/compat/test_parity_fuzz.py, run on such a
loop, found these; with them normalised, 600 programs gave the same traces.)
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import pytest

import safepool
from tests.compat.test_parity import first_served_after_replacement, lease_leaving_a_transaction_open

pytestmark = pytest.mark.skipif(sys.version_info < (3, 12), reason="asyncio.eager_task_factory is 3.12+")

FACTORIES: dict[str, Callable[..., Awaitable[Any]]] = {
    "asyncpg": asyncpg.create_pool,
    "safepool": safepool.create_pool,
}


def on_eager_loop(scenario: Callable[[Callable[..., Awaitable[Any]]], Awaitable[Any]]) -> dict[str, Any]:
    """What ``scenario(create_pool)`` returns for each pool, each run on a
    fresh loop with the eager task factory."""
    outcomes: dict[str, Any] = {}
    for name, factory in FACTORIES.items():
        with asyncio.Runner() as runner:
            runner.get_loop().set_task_factory(asyncio.eager_task_factory)  # type: ignore[attr-defined]
            outcomes[name] = runner.run(scenario(factory))
    return outcomes


def test_open_transaction_report_order_among_query_log_records(pg_dsn: str) -> None:
    """tests/compat/test_parity.py::test_open_transaction_report_comes_after_queued_query_log_callbacks
    on an eager loop: asyncpg's shielded release task runs its first step
    inside release(), so the report comes before the record of the lease's
    last statement (BEGIN logged, the report, SELECT 1 logged; 10 of 10
    runs). safepool kept the default loop's order (the report after the
    records) until it reported at once on such a loop too
    (``_internals.starts_tasks_eagerly``)."""

    async def scenario(create_pool: Callable[..., Awaitable[Any]]) -> list[str]:
        pool = await create_pool(pg_dsn, min_size=1, max_size=1)
        try:
            events = await lease_leaving_a_transaction_open(pool, settle=0.05)  # (any record still queued)
        finally:
            await pool.close()
        return [event for event in events if event.startswith(("logged BEGIN", "logged SELECT 1", "Resetting"))]

    outcomes = on_eager_loop(scenario)
    assert outcomes["safepool"] == outcomes["asyncpg"]


def test_waiters_are_served_oldest_first_after_expire_connections(pg_dsn: str) -> None:
    """tests/compat/test_parity.py::test_a_connection_replaced_under_waiters_serves_the_oldest_first
    ("expired") on an eager loop: which two of six queued acquires get the
    two replaced connections first. asyncpg: [1, 2] or [1, 3], never the
    oldest waiter (12 of 12 runs; its default-loop order is [0, 1], as
    test_parity.py asserts); safepool: [0, 1], FIFO on every loop. A
    difference kept on purpose (docs/migration.md): asyncpg's order there
    comes from its holders' tasks racing, and no program can rely on it."""

    async def scenario(create_pool: Callable[..., Awaitable[Any]]) -> bool:
        pool = await create_pool(pg_dsn, min_size=2, max_size=2)
        flavour = "safepool" if create_pool is safepool.create_pool else "asyncpg"
        try:
            return 0 in await first_served_after_replacement(pool, flavour, pg_dsn, "expired")
        finally:
            await pool.close()

    outcomes = on_eager_loop(scenario)
    assert outcomes["safepool"] is True  # (asyncpg's: False in 12 of 12 runs; not asserted)
