"""Helper 262, adversarial review of the exporters' pool naming in live mode.

docs/metrics.md ("Prometheus"): registering "a second *open* pool with the
same name raises ValueError naming it", and with ``live=True`` "two live
pools with the same name are told apart as ``name@<hex id>`` (the one
reported first keeps the bare name while it is open)". OpenTelemetry's
"Pool naming works as for Prometheus".

Neither holds when the first pool is reported through live mode and the
second is registered by name (``register(live=True)`` at start-up, then a
library's ``register(pool)``, or ``collector.add(pool)``):
``PoolSet.add`` (safepool/metrics/__init__.py:87-89) looks for a clash in
the registered names (``_named``) only, not at the live pool holding the
bare name (``_bare``), so the second pool is accepted and takes the bare
name over at the next scrape (``items()`` puts registered pools first), and
the first moves to ``name@<hex id>``:

- Prometheus: ``safepool_acquired_total{pool="main"}`` falls from the first
  pool's count to the second's (5 -> 0): a counter that goes backwards
  within one series, which ``rate()``/``increase()`` read as a reset;
- OpenTelemetry: the bare name's series carries the first pool's counts on
  (``_continued``) while the first pool is also reported whole under
  ``main@<hex id>``: summed over pool names, ``safepool.acquired`` counts
  the first pool's acquires twice (11 for 6 acquires).
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from safepool.metrics.prometheus import register

pytestmark = pytest.mark.asyncio


def acquired_by_pool(registry: CollectorRegistry) -> dict[str, float]:
    found: dict[str, float] = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        if family.name == "safepool_acquired":
            for sample in family.samples:
                if sample.name == "safepool_acquired_total":
                    found[sample.labels["pool"]] = sample.value
    return found


async def test_register_of_a_namesake_never_makes_a_live_pools_counter_fall(pools: Any) -> None:
    registry = CollectorRegistry()
    first = await pools(name="main")
    register(live=True, registry=registry)
    for _ in range(5):
        async with first.acquire():
            pass
    assert acquired_by_pool(registry) == {"main": 5}

    second = await pools(name="main")
    try:
        register(second, registry=registry)  # documented: ValueError, another open pool is reported as 'main'
    except ValueError:
        pass
    after = acquired_by_pool(registry)
    # Whatever becomes of the second pool, the series "main" is a counter:
    # it may not fall below what it reported a moment ago.
    assert after["main"] >= 5, after


async def test_instrument_of_a_namesake_never_counts_a_live_pools_acquires_twice(pools: Any) -> None:
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    from safepool.metrics.otel import instrument

    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])

    def acquired() -> dict[str, int]:
        found: dict[str, int] = {}
        data = reader.get_metrics_data()
        for resource in data.resource_metrics if data is not None else ():
            for scope in resource.scope_metrics:
                for metric in scope.metrics:
                    if metric.name == "safepool.acquired":
                        for point in metric.data.data_points:
                            found[str(point.attributes["db.client.connection.pool.name"])] = int(point.value)
        return found

    try:
        first = await pools(name="main")
        instrument(live=True, meter_provider=provider)
        for _ in range(5):
            async with first.acquire():
                pass
        assert acquired() == {"main": 5}

        second = await pools(name="main")
        try:
            instrument(second, meter_provider=provider)  # documented: ValueError, as for Prometheus
        except ValueError:
            pass
        async with second.acquire():
            pass
        await asyncio.sleep(0)
        counts = acquired()
        # Six acquires in all: summed by pool name, as a dashboard sums them.
        assert sum(counts.values()) == 6, counts
    finally:
        provider.shutdown()


# ------------------------------------------------------------ siblings (helper 264)
# Every way a pool is put under a name meets the live pool holding it; the
# holder itself, and the name once its holder is closed, removed or moved,
# stay free to take.


async def test_add_under_an_explicit_name_a_live_pool_holds_is_refused(pools: Any) -> None:
    from safepool.metrics.prometheus import PoolCollector

    registry = CollectorRegistry()
    first = await pools(name="main")
    other = await pools(name="other")
    collector = register(live=True, registry=registry)
    assert acquired_by_pool(registry)["main"] == 0
    with pytest.raises(ValueError, match="another open pool is already reported as 'main'"):
        collector.add(other, "main")
    with pytest.raises(ValueError, match="'main'"):
        register(other, await pools(name="main"), registry=registry)  # all or none
    assert collector.pools.name_of(other) is None
    assert collector.add(other, "main-2") == "main-2"  # another name: fine
    assert collector.add(first) == "main"  # the holder itself: fine
    assert acquired_by_pool(registry).keys() >= {"main", "main-2"}
    assert isinstance(collector, PoolCollector)


async def test_a_live_pools_name_is_free_once_it_is_closed_removed_or_moved(pools: Any) -> None:
    registry = CollectorRegistry()
    collector = register(live=True, registry=registry)

    closed = await pools(name="closed")
    acquired_by_pool(registry)
    await closed.close()
    assert register(await pools(name="closed"), registry=registry) is collector

    removed = await pools(name="removed")
    acquired_by_pool(registry)
    collector.remove(removed)
    successor = await pools(name="removed")
    collector.add(successor)
    assert collector.pools.name_of(successor) == "removed"

    moved = await pools(name="moved")
    acquired_by_pool(registry)
    collector.add(moved, "moved-elsewhere")
    successor = await pools(name="moved")
    collector.add(successor)
    assert collector.pools.name_of(successor) == "moved"
    names = acquired_by_pool(registry)
    assert {"closed", "removed", "moved", "moved-elsewhere"} <= names.keys(), names


async def test_before_a_scrape_a_registered_pool_takes_the_bare_name(pools: Any) -> None:
    # Nothing was reported under the name yet, so no series can fall: the
    # registered pool gets the bare name from the first scrape on.
    registry = CollectorRegistry()
    first = await pools(name="main")
    collector = register(live=True, registry=registry)
    second = await pools(name="main")
    register(second, registry=registry)
    for _ in range(2):
        async with first.acquire():
            pass
    names = acquired_by_pool(registry)
    assert names == {"main": 0, f"main@{id(first):x}": 2}, names
    assert collector.pools.get("main") is second


async def test_otel_add_under_a_name_a_live_pool_holds_is_refused(pools: Any) -> None:
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    from safepool.metrics.otel import instrument

    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    try:
        await pools(name="main")
        instruments = instrument(live=True, meter_provider=provider)
        reader.get_metrics_data()
        other = await pools(name="other")
        with pytest.raises(ValueError, match="'main'"):
            instruments.add(other, "main")
        with pytest.raises(ValueError, match="'main'"):
            instruments.add_all([await pools(name="main")])
        assert instruments.pools.name_of(other) is None
    finally:
        provider.shutdown()
