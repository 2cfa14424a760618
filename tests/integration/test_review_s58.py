"""Review s58 (a new user's walk through the README and docs): what the
docs promised and the code did not do (live-mode metrics kept a closed
registered pool's name from its replacement), fixed."""

from __future__ import annotations

from typing import Any

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

import safepool
import safepool.pool
from safepool.metrics.otel import instrument
from safepool.metrics.prometheus import register

pytestmark = pytest.mark.asyncio


def reported_names(registry: CollectorRegistry) -> set[str]:
    """The ``pool`` label of every ``safepool_max_size`` sample."""
    text = generate_latest(registry).decode()
    return {
        sample.labels["pool"]
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "safepool_max_size"
    }


async def test_a_recreated_pool_takes_over_a_closed_registered_pools_name_in_live_mode(pools: Any) -> None:
    """docs/metrics.md: "a closed pool's name can be reused, so an application
    that re-creates its pool keeps its series" and, in live mode, the bare
    name goes to the other pool once the first closes. With the first pool
    registered explicitly (``register(pool, live=True)``: the application's
    pool named, the ORM's pools found by live mode) and its object still
    referenced after ``close()``, the replacement created under the same
    name was reported as ``dup-s58@<hex id>``: its series started apart from
    the old one's (and with OpenTelemetry its counters started at 0 instead of
    continuing, docs/metrics.md). Without the explicit registration, or once
    the old object is garbage, it gets the bare name."""
    registry = CollectorRegistry()
    first = await pools(name="dup-s58", min_size=0)
    register(first, live=True, registry=registry)
    assert reported_names(registry) >= {"dup-s58"}
    await first.close()
    replacement = await pools(name="dup-s58", min_size=0)
    names = {name for name in reported_names(registry) if name.startswith("dup-s58")}
    assert first.closed and not replacement.closed
    assert names == {"dup-s58"}  # (was {"dup-s58@<hex id of replacement>"})


async def test_a_recreated_pool_continues_a_closed_instrumented_pools_counters_in_live_mode(pools: Any) -> None:
    """docs/metrics.md (OpenTelemetry): "A pool that takes over a closed
    pool's name continues its counters from where the closed pool's ended".
    The same root as the test above: with the first pool passed to
    ``instrument(pool, live=True)`` and still referenced, its replacement is
    observed as ``dup-otel-s58@<hex id>`` with its own count (1), and the
    bare name's series is gone, so a dashboard's ``safepool.acquired`` for
    the pool stops at 2 instead of reading 3."""
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    try:
        first = await pools(name="dup-otel-s58", min_size=0)
        instrument(first, live=True, meter_provider=provider)
        for _ in range(2):
            await first.fetchval("SELECT 1")
        assert acquired(reader) == {"dup-otel-s58": 2}
        await first.close()
        replacement = await pools(name="dup-otel-s58", min_size=0)
        await replacement.fetchval("SELECT 1")
        # (was {"dup-otel-s58@<hex id of replacement>": 1})
        assert acquired(reader) == {"dup-otel-s58": 3}
    finally:
        provider.shutdown()


def acquired(reader: InMemoryMetricReader) -> dict[str, int]:
    """``safepool.acquired`` per pool name beginning "dup-otel-s58", from one collection."""
    data = reader.get_metrics_data()
    assert data is not None
    return {
        str(point.attributes["db.client.connection.pool.name"]): int(point.value)
        for resource in data.resource_metrics
        for scope in resource.scope_metrics
        for metric in scope.metrics
        if metric.name == "safepool.acquired"
        for point in metric.data.data_points
        if str(point.attributes["db.client.connection.pool.name"]).startswith("dup-otel-s58")
    }


async def test_the_exporters_and_the_creation_hook_refuse_what_they_cannot_use(pools: Any) -> None:
    # Taken unchecked, on_pool_created(5) logged "pool-created hook failed"
    # at every later pool's creation; live="no" (truthy) reported every pool
    # of the process. add_event_listener(5) refused at once already.
    with pytest.raises(safepool.PoolTypeError, match="callback must be callable, got int"):
        safepool.pool.on_pool_created(5)  # type: ignore[arg-type]
    pool = await pools(name="live-s58", min_size=0)
    with pytest.raises(safepool.PoolTypeError, match="live must be True or False, got 'no'"):
        register(pool, live="no", registry=CollectorRegistry())  # type: ignore[arg-type]
    provider = MeterProvider(metric_readers=[InMemoryMetricReader()])
    try:
        with pytest.raises(safepool.PoolTypeError, match="live must be True or False, got 1"):
            instrument(pool, live=1, meter_provider=provider)  # type: ignore[arg-type]
        instruments = instrument(pool, meter_provider=provider)
        with pytest.raises(safepool.PoolTypeError, match="live must be True or False, got 'yes'"):
            instruments.add_all([], live="yes")  # type: ignore[arg-type]
        assert not instruments.pools.live
    finally:
        provider.shutdown()
    assert isinstance(safepool.PoolTypeError("x"), TypeError)


async def test_a_timeout_names_the_holders_site_without_calling_it_unknown(pools: Any) -> None:
    # With capture_stack off and a site named, the message read "at unknown
    # site (capture_stack is off) (site 'checkout')".
    pool = await pools(max_size=1, min_size=1, capture_stack=False)
    async with pool.acquire(site="checkout"):
        with pytest.raises(safepool.PoolTimeoutError) as info:
            await pool.acquire(timeout=0.01)
    message = str(info.value)
    assert "oldest leases: " in message and message.endswith(" at site 'checkout'"), message
    assert "unknown site" not in message
    async with pool.acquire():  # no site, no stack: as before
        with pytest.raises(safepool.PoolTimeoutError) as info:
            await pool.acquire(timeout=0.01)
    assert str(info.value).endswith(" at unknown site (capture_stack is off)")
