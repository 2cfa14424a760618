"""Helper 271, review of the observability surface: OpenTelemetry counters
of a pool re-created under the same name.

docs/metrics.md ("OpenTelemetry"): "A pool that takes over a closed pool's
name continues its counters from where the closed pool's ended (a
cumulative counter may not fall within a series ...)".

They continue from where the closed pool's counters were at the last
*collection*, not where they ended, whenever the closed pool object is gone
by the next collection, which is the usual way an application re-creates
its pool (``await pool.close(); pool = await create_pool(..., name=...)``
drops the only reference to the old pool). Everything the old pool counted
between the last collection and its close is lost: with a 60 s export
interval, the acquire timeouts of the minute that made the operator restart
the pool are exactly what disappears.

Cause: ``PoolInstruments._continued`` read the previous pool's final counts
only if its weak reference was still alive (``series.pool()``); once it was
collected it fell back to ``series.last``, the counts seen at the previous
collection. Fixed: each series' pool has a finalizer that reads, from the
pool's core, the counts it ended with (``_Series.final``).
"""

from __future__ import annotations

import asyncio
import gc
from typing import Any

import pytest

import safepool

pytestmark = pytest.mark.asyncio


def points(reader: Any, name: str) -> dict[str, Any]:
    found: dict[str, Any] = {}
    data = reader.get_metrics_data()
    for resource in data.resource_metrics if data else ():
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                if metric.name == name:
                    for point in metric.data.data_points:
                        found[point.attributes["db.client.connection.pool.name"]] = point.value
    return found


async def an_incident(pool: safepool.Pool) -> None:
    """The pool's only connection is stuck: three acquires time out."""
    held = await pool.acquire()
    for _ in range(3):
        with pytest.raises(safepool.PoolTimeoutError):
            await pool.acquire(timeout=0.01)
    await pool.release(held)


@pytest.mark.parametrize("end", ["close", "terminate"])
async def test_a_pool_recreated_under_its_name_continues_from_the_closed_pools_final_counts(
    pools: Any, pg_dsn: str, app_name: str, end: str
) -> None:
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    from safepool.metrics.otel import instrument

    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    pool = await safepool.create_pool(
        pg_dsn, name="h271-orders", min_size=1, max_size=1, server_settings={"application_name": app_name}
    )
    instrument(pool, meter_provider=provider)
    for _ in range(2):
        async with pool.acquire():
            pass
    assert points(reader, "safepool.acquired") == {"h271-orders": 2}  # an export
    await an_incident(pool)
    # The operator's fix: the pool is re-created under its name.
    if end == "close":
        await pool.close()
    else:
        pool.terminate()
    pool = await pools(name="h271-orders", min_size=1, max_size=1)  # (the old pool's last reference goes)
    gc.collect()
    instrument(pool, meter_provider=provider)
    async with pool.acquire():
        pass
    # 2 + 1 acquires by the first pool, 1 by the second; its 3 timeouts.
    assert points(reader, "safepool.acquired") == {"h271-orders": 4}
    assert points(reader, "db.client.connection.timeouts") == {"h271-orders": 3}


async def test_a_pool_whose_loop_closed_hands_its_final_counts_to_its_successor(pools: Any, pg_dsn: str) -> None:
    """A control: a worker that runs each job in ``asyncio.run()`` keeps
    the old pool object, but its loop is closed. Its counts are read as
    they ended, not as last collected: so they were before the fix too
    (``read()`` reads a pool on a closed loop directly)."""
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    from safepool.metrics.otel import instrument

    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])

    async def job() -> safepool.Pool:
        pool = await safepool.create_pool(pg_dsn, name="h271-jobs", min_size=1, max_size=1)
        instrument(pool, meter_provider=provider)
        async with pool.acquire():
            pass
        assert points(reader, "safepool.acquired") == {"h271-jobs": 1}  # an export, on the job's loop
        await an_incident(pool)
        await pool.close()
        return pool

    old = await asyncio.to_thread(asyncio.run, job())  # (kept: only its loop is gone)
    pool = await pools(name="h271-jobs", min_size=1, max_size=1)
    instrument(pool, meter_provider=provider)
    async with pool.acquire():
        pass
    assert points(reader, "safepool.acquired") == {"h271-jobs": 3}
    assert points(reader, "db.client.connection.timeouts") == {"h271-jobs": 3}
    assert old.closed
