"""Helper 262, adversarial review of the exporters' ``remove()`` by name.

``PoolCollector.remove(pool_or_name)``: "Stop exporting a pool (given by
name or object) ... Its series are gone from the next scrape" (also
``PoolInstruments.remove``: "Stop reporting a pool and unhook its
histograms"). docs/metrics.md: "a closed pool's name can be reused, so an
application that re-creates its pool keeps its series", and with
``live=True`` "every other open pool of the process is reported too
(except those ``collector.remove(pool)`` took out ...)".

An application that registered its pool (``register(pool, live=True)``),
closed it and re-created it under the same name sees the new pool reported
as that name (live mode, the closed one gave the name up). Then
``remove("main")`` does nothing to it: ``PoolSet.get`` (safepool/metrics/__init__.py:109-111)
answers with the pool registered under the name, the closed one (or None
once it is garbage collected), without looking at the live pool that is
reported under that name now; ``remove()`` (line 119) takes that closed
pool out and the open pool stays in every scrape and collection (a second
``remove("main")`` is needed).
"""

from __future__ import annotations

from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from safepool.metrics.prometheus import register

pytestmark = pytest.mark.asyncio


def reported(registry: CollectorRegistry) -> set[str]:
    names: set[str] = set()
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        if family.name == "safepool_acquired":
            names.update(sample.labels["pool"] for sample in family.samples)
    return names


async def test_remove_by_name_stops_reporting_the_pool_reported_under_it(pools: Any) -> None:
    registry = CollectorRegistry()
    first = await pools(name="main")
    collector = register(first, live=True, registry=registry)
    await first.close()
    await pools(name="main")  # the application re-creates its pool
    assert reported(registry) == {"main"}

    collector.remove("main")
    assert reported(registry) == set()


async def test_otel_remove_by_name_stops_reporting_the_pool_reported_under_it(pools: Any) -> None:
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    from safepool.metrics.otel import instrument

    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])

    def names() -> set[str]:
        found: set[str] = set()
        data = reader.get_metrics_data()
        for resource in data.resource_metrics if data is not None else ():
            for scope in resource.scope_metrics:
                for metric in scope.metrics:
                    if metric.name == "db.client.connection.count":
                        found.update(str(p.attributes["db.client.connection.pool.name"]) for p in metric.data.data_points)
        return found

    try:
        first = await pools(name="main")
        instruments = instrument(first, live=True, meter_provider=provider)
        await first.close()
        await pools(name="main")
        assert names() == {"main"}

        instruments.remove("main")
        assert names() == set()
    finally:
        provider.shutdown()


# ------------------------------------------------------------ siblings (helper 264)


async def test_get_by_name_answers_the_pool_reported_under_it(pools: Any) -> None:
    registry = CollectorRegistry()
    first = await pools(name="main")
    collector = register(first, live=True, registry=registry)
    assert collector.pools.get("main") is first
    await first.close()
    assert collector.pools.get("main") is first  # closed, and no namesake: the registration
    second = await pools(name="main")
    assert collector.pools.get("main") is second  # the pool reported under the name now


async def test_remove_by_name_of_a_registered_pool_leaves_its_live_namesake(pools: Any) -> None:
    registry = CollectorRegistry()
    first = await pools(name="main")
    collector = register(first, live=True, registry=registry)
    second = await pools(name="main")
    assert reported(registry) == {"main", f"main@{id(second):x}"}
    assert collector.pools.remove("main") == [first]
    assert reported(registry) == {"main"}  # the namesake, which takes the freed name
    assert collector.pools.get("main") is second


async def test_remove_by_a_live_pools_told_apart_name(pools: Any) -> None:
    registry = CollectorRegistry()
    await pools(name="main")
    collector = register(live=True, registry=registry)
    reported(registry)
    second = await pools(name="main")
    assert f"main@{id(second):x}" in reported(registry)
    collector.remove(f"main@{id(second):x}")
    assert reported(registry) == {"main"}
    collector.add(second, "main-2")  # added again: reported again
    assert reported(registry) == {"main", "main-2"}


async def test_remove_by_an_unknown_name_is_ignored(pools: Any) -> None:
    registry = CollectorRegistry()
    collector = register(await pools(name="main"), live=True, registry=registry)
    assert collector.pools.remove("nothing") == []
    assert reported(registry) == {"main"}
