"""Helper 262, adversarial review of pool names in the Prometheus exposition.

safepool refuses a pool name that is not a str because such a name "was
taken and broke every Prometheus scrape of its collector later (label
values must be str)" (safepool/pool.py:176, PoolSet.add's check at
safepool/metrics/__init__.py:82). docs/metrics.md says pools are reported
under their name, and review h208 checked names with quotes, backslashes,
newlines and non-ASCII characters.

A str that UTF-8 cannot encode passes both checks and breaks every scrape
the same way: a lone surrogate, which is what Python makes of undecodable
bytes in an environment variable, a host name or a file name
(``os.fsdecode``, surrogateescape) a service builds its pool name from.
prometheus_client encodes the whole exposition at once, so the scrape
fails with ``UnicodeEncodeError`` for every pool of the collector (every
metric of the registry: on the global ``REGISTRY``, the process and the
application's own metrics too), and with ``register(live=True)`` such a
pool anywhere in the process does it without being registered. An
acquire site name does the same through ``safepool_site_connections``
(``acquire(site=)``, checked for type and emptiness only at
safepool/pool.py:292), while that site holds or waits. Either
refusing the name where it is given (as a non-str one) or reporting it
escaped would keep the other pools' metrics.
"""

from __future__ import annotations

from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

import safepool
from safepool.metrics.prometheus import register

pytestmark = pytest.mark.asyncio


async def test_a_name_utf8_cannot_encode_never_breaks_the_other_pools_scrape(pools: Any) -> None:
    registry = CollectorRegistry()
    good = await pools(name="orders")
    register(good, registry=registry)
    name = b"db-\xff".decode("utf-8", "surrogateescape")  # "db-\udcff", as os.fsdecode() gives it
    try:
        odd = await pools(name=name)
        register(odd, registry=registry)
    except (TypeError, ValueError):
        pass  # refused where it was given: fine
    text = generate_latest(registry).decode()  # UnicodeEncodeError: surrogates not allowed
    reported = {
        sample.labels["pool"]
        for family in text_string_to_metric_families(text)
        if family.name == "safepool_acquired"
        for sample in family.samples
    }
    assert "orders" in reported


async def test_a_site_name_utf8_cannot_encode_never_breaks_the_scrape(pools: Any) -> None:
    registry = CollectorRegistry()
    pool = await pools(name="orders", max_site_share=0.5)
    register(pool, registry=registry)
    site = b"route-\xff".decode("utf-8", "surrogateescape")
    try:
        con = await pool.acquire(site=site)
    except (TypeError, ValueError):
        return  # refused where it was given: fine
    try:
        text = generate_latest(registry).decode()  # UnicodeEncodeError: surrogates not allowed
        assert any(family.name == "safepool_acquired" for family in text_string_to_metric_families(text))
    finally:
        await pool.release(con)


# ------------------------------------------------------------ siblings (helper 264)
# The choice: a name given by the application is refused where it is given,
# with PoolValueError (a PoolError and a ValueError), before anything is done
# with it; a name safepool derives itself is reported with the character
# escaped. Either way no scrape fails. (The other labels need neither: an
# error class's name cannot hold a lone surrogate, type() refuses it, and
# the SQLSTATE is the server's.)

ODD = b"db-\xff".decode("utf-8", "surrogateescape")


def family_labels(registry: CollectorRegistry, family_name: str, label: str) -> set[str]:
    return {
        sample.labels[label]
        for family in text_string_to_metric_families(generate_latest(registry).decode())
        if family.name == family_name
        for sample in family.samples
    }


async def test_create_pool_refuses_the_name_with_a_typed_error_before_connecting(pg_dsn: str) -> None:
    with pytest.raises(safepool.PoolValueError, match="UTF-8") as raised:
        await safepool.create_pool(pg_dsn, name=ODD, min_size=1, max_size=1)
    assert isinstance(raised.value, safepool.PoolError) and isinstance(raised.value, ValueError)
    assert not [pool for pool in safepool.pool.live_pools() if not pool.closed and pool.name.startswith("db-")]


async def test_every_place_a_name_is_given_refuses_it(pools: Any) -> None:
    from opentelemetry.sdk.metrics import MeterProvider

    from safepool.metrics.otel import instrument

    pool = await pools(name="orders", max_site_share=0.5)
    registry = CollectorRegistry()
    collector = register(pool, registry=registry)
    with pytest.raises(safepool.PoolValueError, match="UTF-8"):
        collector.add(pool, ODD)
    assert collector.pools.name_of(pool) == "orders"
    provider = MeterProvider()
    try:
        instruments = instrument(meter_provider=provider)
        with pytest.raises(safepool.PoolValueError, match="UTF-8"):
            instruments.add(pool, ODD)
    finally:
        provider.shutdown()
    with pytest.raises(safepool.PoolValueError, match="UTF-8"):
        safepool.site(ODD)
    with pytest.raises(safepool.PoolValueError, match="UTF-8"):
        pool.acquire(site=ODD)  # at the call, as for an empty site
    assert pool.stats().in_use == 0
    # Non-ASCII text UTF-8 encodes is a name like any other.
    async with pool.acquire(site="café ☕"):
        assert family_labels(registry, "safepool_site_connections", "site") == {"café ☕"}
    assert collector.add(pool, "commandes-é") == "commandes-é"


async def test_a_derived_site_name_is_escaped_and_never_breaks_the_scrape(pools: Any) -> None:
    pool = await pools(name="orders", max_site_share=0.5)
    registry = CollectorRegistry()
    register(pool, registry=registry)
    # A module whose __name__ came from undecodable bytes (a file name):
    # the site is derived from it, nobody gave it, so it is escaped.
    namespace: dict[str, Any] = {"__name__": "jobs_" + ODD}
    exec("async def handler(pool):\n    return await pool.acquire()\n", namespace)
    con = await namespace["handler"](pool)
    try:
        sites = family_labels(registry, "safepool_site_connections", "site")
        assert sites == {"jobs_db-\\udcff.handler"}, sites
        [lease] = pool.leases()
        assert lease.site == "jobs_db-\\udcff.handler"
    finally:
        await pool.release(con)

