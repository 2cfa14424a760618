"""Review s63: mutation review of safepool/metrics/, the one mutant that
needs a real pool (its timing sinks' queue): see
tests/unit/test_review_s63_metrics_mutants.py for the others."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from safepool.metrics.otel import PoolInstruments

pytestmark = pytest.mark.asyncio


async def test_adding_a_pool_again_under_its_name_loses_no_queued_time(pools: Any) -> None:
    """add(pool) of a pool reported already is a no-op (docs/metrics.md). A
    lease's duration is queued for the sinks until the next loop turn; an
    add() that unhooked and re-hooked the sinks in between would drop it
    (the last sink removed restores the plain histogram, whose queue nobody
    flushes any more)."""
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    try:
        pool = await pools(name="s63-requeue", min_size=1, max_size=1)
        instruments = PoolInstruments([pool], meter_provider=provider)
        await asyncio.sleep(0)  # (the sinks are installed on the loop)
        connection = await pool.acquire()
        await pool.release(connection)  # no statement: no reset, the lease's time queued now
        assert instruments.add(pool) == "s63-requeue"  # same loop turn: the value is still queued
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        data = reader.get_metrics_data()
        assert data is not None
        use_time = [p for rm in data.resource_metrics for scope in rm.scope_metrics for m in scope.metrics
                    if m.name == "db.client.connection.use_time" for p in m.data.data_points]
        assert [getattr(p, "count", None) for p in use_time] == [1]
        assert pool.stats().lease_duration.count == 1
        instruments.close()
    finally:
        provider.shutdown()
