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

from safepool.metrics.prometheus import register

pytestmark = pytest.mark.asyncio


@pytest.mark.xfail(
    strict=True,
    reason="review h262: a pool name UTF-8 cannot encode (a lone surrogate) is accepted by create_pool "
    "(safepool/pool.py:176) and PoolSet.add (safepool/metrics/__init__.py:82), then fails every scrape",
)
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


@pytest.mark.xfail(
    strict=True,
    reason="review h262: an acquire site name UTF-8 cannot encode is accepted by acquire(site=) "
    "(safepool/pool.py:292) and labels safepool_site_connections: every scrape fails while it holds or waits",
)
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
