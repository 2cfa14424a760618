"""What the metrics extensions must not accumulate over a long run: pools
created and closed under names of their own (a pool per tenant, per job)."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

import safepool
from safepool.metrics import otel

pytestmark = pytest.mark.asyncio


@pytest.fixture
def reader() -> Iterator[tuple[InMemoryMetricReader, MeterProvider]]:
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    yield reader, provider
    provider.shutdown()


async def test_otel_series_of_closed_pools_with_new_names_are_bounded(
    pg_dsn: str, reader: tuple[InMemoryMetricReader, MeterProvider], monkeypatch: pytest.MonkeyPatch
) -> None:
    # PoolInstruments remembers, per reported name, the counts to carry over
    # to a pool re-created under that name (a cumulative counter must not
    # fall). A process that creates and closes pools under new names (one
    # per tenant or job; or the default 'pool-<hex id>' names with
    # live=True) adds one entry per name for good: measured 1 entry (~0.6 KB)
    # per pool, 1,501 after 1,500 pools, still growing once the SDK folds
    # names beyond its limit (2,000 attribute sets per instrument) into
    # otel.metric.overflow. Bounded by SERIES_LIMIT (the names of closed
    # pools forgotten, oldest first); 32 here to keep the test short.
    monkeypatch.setattr(otel, "SERIES_LIMIT", 32)
    memory, provider = reader
    instruments = otel.instrument(live=True, meter_provider=provider)
    try:
        for number in range(100):
            # min_size=0: no connection is opened; the pool is reported all the same.
            pool = await safepool.create_pool(pg_dsn, min_size=0, max_size=1, name=f"tenant-{number}")
            data: Any = memory.get_metrics_data()
            assert data is not None
            await pool.close()
            del pool
        gc.collect()
        assert len(instruments._series) <= 32
    finally:
        instruments.close()


async def test_otel_series_of_open_pools_are_kept_past_the_limit(
    pg_dsn: str, reader: tuple[InMemoryMetricReader, MeterProvider], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only closed (or collected) pools' names are forgotten: an open pool's
    counters must never fall, however many names there are."""
    monkeypatch.setattr(otel, "SERIES_LIMIT", 4)
    memory, provider = reader
    instruments = otel.instrument(live=True, meter_provider=provider)
    pools = [await safepool.create_pool(pg_dsn, min_size=0, max_size=1, name=f"open-{n}") for n in range(6)]
    try:
        for pool in pools:
            await pool.fetchval("SELECT 1")
        memory.get_metrics_data()
        assert {f"open-{n}" for n in range(6)} <= set(instruments._series)
    finally:
        instruments.close()
        for pool in pools:
            await pool.close()
