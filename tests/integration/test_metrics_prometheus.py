"""The Prometheus collector, scraped through a real prometheus_client registry
(text exposition) while a real pool on PostgreSQL is busy."""

from __future__ import annotations

import asyncio
import gc
import re
import uuid
import warnings
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import DuplicateTimeseries

import safepool
from safepool import ManualClock
from safepool.metrics.prometheus import COUNTERS, PoolCollector, register
from tests._util import until
from tests.integration.conftest import dsn_to_closed_port

pytestmark = pytest.mark.asyncio

DOC = (Path(__file__).resolve().parents[2] / "docs" / "metrics.md").read_text()


def scrape(registry: CollectorRegistry) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of the text exposition, keyed by (sample name, labels)."""
    text = generate_latest(registry).decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: dict[Any, float], name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


async def test_busy_pool_scraped_through_a_real_registry(pools: Any) -> None:
    clock = ManualClock()
    pool = await pools(name="orders", min_size=1, max_size=2, clock=clock, leak_warning_after=60.0)
    registry = CollectorRegistry()
    register(pool, registry=registry)

    first = await pool.acquire()
    second = await pool.acquire()
    await first.execute("SELECT 1")
    waiter = asyncio.ensure_future(pool.acquire(timeout=None))
    await until(lambda: pool.stats().waiting == 1)
    clock.advance(2.5)

    samples = scrape(registry)
    assert value(samples, "safepool_connections", pool="orders", state="in_use") == 2
    assert value(samples, "safepool_connections", pool="orders", state="idle") == 0
    for state in ("connecting", "resetting", "closing"):
        assert value(samples, "safepool_connections", pool="orders", state=state) == 0
    assert value(samples, "safepool_waiting", pool="orders") == 1
    assert value(samples, "safepool_max_size", pool="orders") == 2
    assert value(samples, "safepool_min_size", pool="orders") == 1
    assert value(samples, "safepool_oldest_lease_age_seconds", pool="orders") == pytest.approx(2.5)
    assert value(samples, "safepool_oldest_wait_age_seconds", pool="orders") == pytest.approx(2.5)
    assert value(samples, "safepool_acquired_total", pool="orders") == 2
    assert value(samples, "safepool_connections_opened_total", pool="orders") == 2
    assert value(samples, "safepool_leak_suspects", pool="orders") == 0
    assert value(samples, "safepool_server_up", pool="orders") == 1
    assert value(samples, "safepool_server_status", pool="orders", status="up") == 1
    assert value(samples, "safepool_server_status", pool="orders", status="down") == 0
    # Every counter of PoolStats is exported as a *_total counter.
    for field, name, _ in COUNTERS:
        assert value(samples, f"safepool_{name}_total", pool="orders") == getattr(pool.stats(), field)

    await pool.release(first)  # ran a statement: reset, then handed to the waiter
    third = await asyncio.wait_for(waiter, 5)
    clock.advance(0.5)
    await pool.release(second)
    await pool.release(third)
    await until(lambda: pool.stats().idle == 2)

    samples = scrape(registry)
    stats = pool.stats()
    assert value(samples, "safepool_lease_duration_seconds_count", pool="orders") == 3
    assert value(samples, "safepool_lease_duration_seconds_sum", pool="orders") == pytest.approx(
        stats.lease_duration.sum
    )
    # The waiter waited 2.5 s on the manual clock: it is in the le=2.5 bucket, not below.
    assert value(samples, "safepool_acquire_wait_seconds_bucket", pool="orders", le="1.0") == 2
    assert value(samples, "safepool_acquire_wait_seconds_bucket", pool="orders", le="2.5") == 3
    assert value(samples, "safepool_acquire_wait_seconds_count", pool="orders") == 3
    assert value(samples, "safepool_released_total", pool="orders") == 3
    assert value(samples, "safepool_resets_total", pool="orders") == 1
    assert value(samples, "safepool_connect_duration_seconds_count", pool="orders") == 2
    assert value(samples, "safepool_connections", pool="orders", state="idle") == 2


async def test_histogram_buckets_are_cumulative_and_match_the_distribution(pools: Any) -> None:
    pool = await pools(name="hist")
    registry = CollectorRegistry()
    register(pool, registry=registry)
    for _ in range(20):
        async with pool.acquire() as con:
            await con.execute("SELECT 1")
    samples = scrape(registry)
    distribution = pool.stats().lease_duration
    buckets = {
        float(dict(labels)["le"]): count
        for (name, labels), count in samples.items()
        if name == "safepool_lease_duration_seconds_bucket" and ("pool", "hist") in labels
    }
    assert sorted(buckets) == [*distribution.bounds, float("inf")]
    running = 0
    for bound, count in zip(distribution.bounds, distribution.bucket_counts, strict=False):
        running += count
        assert buckets[bound] == running
    assert value(samples, "safepool_lease_duration_seconds_bucket", pool="hist", le="+Inf") == 20
    assert value(samples, "safepool_lease_duration_seconds_count", pool="hist") == 20


async def test_server_down_is_visible(pools: Any, pg_dsn: str) -> None:
    async def refuse(*args: Any, **kwargs: Any) -> Any:
        raise ConnectionRefusedError("connection refused (test)")

    pool = await pools(name="down", min_size=0, connect=refuse)
    registry = CollectorRegistry()
    register(pool, registry=registry)
    with pytest.raises(ConnectionRefusedError):
        await pool.acquire(timeout=2)
    samples = scrape(registry)
    assert value(samples, "safepool_server_up", pool="down") == 0
    assert value(samples, "safepool_server_status", pool="down", status="down") == 1
    assert value(samples, "safepool_connect_errors_total", pool="down") >= 1
    assert value(samples, "safepool_consecutive_connect_failures", pool="down") >= 1


def connect_failing(samples: dict[Any, float], pool: str) -> dict[str, str]:
    """The labels (but ``pool``) of ``pool``'s safepool_connect_failing
    samples, each checked to be 1; {} for none."""
    found = [dict(labels) for (name, labels), v in samples.items()
             if name == "safepool_connect_failing" and ("pool", pool) in labels and v == 1]
    assert len(found) <= 1, found
    return {k: v for k, v in found[0].items() if k != "pool"} if found else {}


async def test_a_full_server_is_told_from_a_down_one_by_its_sqlstate(pools: Any, refused_role: Any) -> None:
    """The server answers the login with 53300 (a role at its CONNECTION
    LIMIT: "too many connections for role"): safepool_server_up says 0
    as for a server that is down, safepool_connect_failing says which it
    is, and is gone once a connect succeeds."""
    pool = await pools(name="full", min_size=0, dsn=refused_role.dsn)
    registry = CollectorRegistry()
    register(pool, registry=registry)
    assert connect_failing(scrape(registry), "full") == {}  # (no connect yet: nothing failing)
    with pytest.raises(asyncpg.TooManyConnectionsError, match="too many connections for role"):
        await pool.fetchval("SELECT 1")
    text = generate_latest(registry).decode()
    samples = scrape(registry)
    assert value(samples, "safepool_server_up", pool="full") == 0
    assert connect_failing(samples, "full") == {"sqlstate": "53300", "error_type": "TooManyConnectionsError"}
    assert refused_role.password not in text and refused_role.dsn not in text
    assert 'safepool_connect_failing{error_type="TooManyConnectionsError",pool="full",sqlstate="53300"} 1.0' in text

    await refused_role.admit()
    assert await pool.fetchval("SELECT 1") == 1
    samples = scrape(registry)
    assert value(samples, "safepool_server_up", pool="full") == 1
    assert connect_failing(samples, "full") == {}
    assert "safepool_connect_failing{" not in generate_latest(registry).decode()


async def test_a_refused_tcp_connect_is_connect_failing_with_no_sqlstate(pools: Any, pg_dsn: str) -> None:
    """Nothing listens on the port: the server never answered, so the
    sample's sqlstate is empty, and error_type names the refusal."""
    password = f"pw-{uuid.uuid4().hex}"
    pool = await pools(name="refused", min_size=0, dsn=dsn_to_closed_port(pg_dsn, password))
    registry = CollectorRegistry()
    register(pool, registry=registry)
    with pytest.raises(ConnectionRefusedError):
        await pool.fetchval("SELECT 1")
    text = generate_latest(registry).decode()
    samples = scrape(registry)
    assert value(samples, "safepool_server_up", pool="refused") == 0
    assert connect_failing(samples, "refused") == {"sqlstate": "", "error_type": "ConnectionRefusedError"}
    assert password not in text

    pool.set_connect_args(pg_dsn)  # the server again: the next connect succeeds
    assert await pool.fetchval("SELECT 1") == 1
    assert connect_failing(scrape(registry), "refused") == {}


async def test_a_failing_init_hook_is_visible_with_the_server_up(pools: Any) -> None:
    # The server accepts connections; the application's init= hook raises:
    # safepool_server_up stays 1 (no outage of the server), so the failure
    # needs a gauge of its own for an alert (docs/metrics.md).
    broken = True

    async def init(con: Any) -> None:
        if broken:
            raise ValueError("bug in init hook (test)")

    pool = await pools(name="init-bug", min_size=0, init=init)
    registry = CollectorRegistry()
    register(pool, registry=registry)
    assert value(scrape(registry), "safepool_init_failing", pool="init-bug") == 0
    with pytest.raises(ValueError, match="bug in init hook"):
        await pool.acquire(timeout=10)
    samples = scrape(registry)
    assert value(samples, "safepool_init_failing", pool="init-bug") == 1
    assert value(samples, "safepool_server_up", pool="init-bug") == 1
    assert value(samples, "safepool_consecutive_connect_failures", pool="init-bug") == 1
    broken = False
    async with pool.acquire(timeout=10):
        pass
    assert value(scrape(registry), "safepool_init_failing", pool="init-bug") == 0


async def test_live_mode_reports_every_open_pool_and_drops_closed_ones(pools: Any) -> None:
    await pools(name="live-a")
    unnamed = await pools(min_size=0)
    registry = CollectorRegistry()
    collector = PoolCollector(live=True)
    registry.register(collector)
    names = {name for name, _ in collector.pools.items()}
    assert {"live-a", unnamed.name} <= names
    samples = scrape(registry)
    assert value(samples, "safepool_max_size", pool=unnamed.name) == 2
    assert ("safepool_leak_suspects", frozenset({("pool", "live-a")})) not in samples  # option off

    await unnamed.close()
    samples = scrape(registry)
    assert ("safepool_max_size", frozenset({("pool", unnamed.name)})) not in samples
    assert value(samples, "safepool_max_size", pool="live-a") == 2


async def test_remove_stops_reporting_a_pool_in_live_mode_too(pools: Any) -> None:
    """remove() "stops exporting a pool: its series are gone from the next
    scrape"; with live=True the pool came back at once, by live mode."""
    kept = await pools(name="kept", min_size=0)
    hidden = await pools(name="hidden", min_size=0)
    other = await pools(name="other", min_size=0)
    registry = CollectorRegistry()
    collector = register(kept, hidden, registry=registry, live=True)
    collector.remove(hidden)
    collector.remove("other")  # by the name it is reported under
    names = {name for name, _ in collector.pools.items()}
    assert "kept" in names and "hidden" not in names and "other" not in names
    samples = scrape(registry)
    assert ("safepool_max_size", frozenset({("pool", "hidden")})) not in samples
    collector.add(other)  # added again: reported again
    assert "other" in {name for name, _ in collector.pools.items()}


async def test_names_are_unique(pools: Any) -> None:
    first = await pools(name="dup", min_size=0)
    second = await pools(name="dup", min_size=0)
    collector = PoolCollector([first])
    with pytest.raises(ValueError, match="already reported as 'dup'"):
        collector.add(second)
    assert collector.add(second, "dup-2") == "dup-2"
    # Live mode keeps two open pools with the same name apart.
    live = PoolCollector(live=True)
    dups = [name for name, pool in live.pools.items() if pool in (first, second)]
    assert len(dups) == 2 and len(set(dups)) == 2
    # A closed pool's name can be taken over (an application re-creating its pool).
    await first.close()
    replacement = await pools(name="dup", min_size=0)
    collector.add(replacement)
    assert collector.pools.get("dup") is replacement


async def test_describe_lets_the_registry_catch_duplicates_without_collecting(pools: Any) -> None:
    pool = await pools(name="describe", min_size=0)
    registry = CollectorRegistry()
    register(pool, registry=registry)
    # A second collector of safepool's names is refused by the registry,
    # from describe() alone.
    with pytest.raises(DuplicateTimeseries):
        registry.register(PoolCollector())
    described = {metric.name for metric in PoolCollector().describe()}
    assert {"safepool_connections", "safepool_acquire_wait_seconds", "safepool_acquired"} <= described


async def test_register_once_per_pool_reports_every_pool(pools: Any) -> None:
    # The documented call, once per pool: before, the second register()
    # raised DuplicateTimeseries (a 4 KB message naming no pool).
    orders = await pools(name="orders", min_size=1, max_size=2)
    reports = await pools(name="reports", min_size=0, max_size=3)
    registry = CollectorRegistry()
    collector = register(orders, registry=registry)
    assert register(reports, registry=registry) is collector
    async with orders.acquire() as con:
        await con.execute("SELECT 1")
        samples = scrape(registry)
    assert value(samples, "safepool_max_size", pool="orders") == 2
    assert value(samples, "safepool_max_size", pool="reports") == 3
    assert value(samples, "safepool_connections", pool="orders", state="in_use") == 1
    assert value(samples, "safepool_acquired_total", pool="reports") == 0
    # One series per pool and metric: exactly two pools on each.
    assert {dict(labels)["pool"] for name, labels in samples if name == "safepool_waiting"} == {"orders", "reports"}


async def test_register_the_same_pool_twice_is_a_no_op(pools: Any) -> None:
    pool = await pools(name="twice", min_size=1)
    registry = CollectorRegistry()
    collector = register(pool, registry=registry)
    assert register(pool, registry=registry) is collector
    assert register(pool, pool, registry=registry) is collector
    assert collector.pools.items() == [("twice", pool)]
    text = generate_latest(registry).decode()
    assert text.count('safepool_max_size{pool="twice"}') == 1


async def test_a_pool_is_reported_under_one_name_only(pools: Any) -> None:
    """A pool reported under another name (add(pool, "orders-2"), the way the
    docs give around a clash) was reported again under its own name by a
    later register(pool): two series of one pool, counted twice in every sum."""
    pool = await pools(name="orders", min_size=1)
    registry = CollectorRegistry()
    collector = register(registry=registry)
    assert collector.add(pool, "orders-2") == "orders-2"
    assert register(pool, registry=registry) is collector  # already reported: a no-op
    assert collector.add(pool) == "orders-2"
    assert collector.pools.items() == [("orders-2", pool)]
    assert collector.add(pool, "orders-primary") == "orders-primary"  # a new name replaces the old
    assert collector.pools.items() == [("orders-primary", pool)]
    text = generate_latest(registry).decode()
    assert text.count("safepool_max_size{") == 1


async def test_register_a_second_open_pool_of_the_same_name_names_it(pools: Any) -> None:
    first = await pools(name="same", min_size=0)
    second = await pools(name="same", min_size=0)
    registry = CollectorRegistry()
    collector = register(first, registry=registry)
    with pytest.raises(ValueError, match=r"^cannot report pool 'same': another open pool is already reported as "
                                         r"'same' \(give the pools distinct names"):
        register(second, registry=registry)
    # The registry still scrapes, with the first pool; the second can be
    # reported under another name.
    assert value(scrape(registry), "safepool_max_size", pool="same") == 2
    collector.add(second, "same-2")
    assert value(scrape(registry), "safepool_max_size", pool="same-2") == 2
    # A closed pool's name is free again (an application re-creating its pool).
    await first.close()
    replacement = await pools(name="same", min_size=0, max_size=4)
    register(replacement, registry=registry)
    assert value(scrape(registry), "safepool_max_size", pool="same") == 4


async def test_register_of_several_pools_adds_all_or_none(pools: Any) -> None:
    # register(a, b) where b's name is taken: it raised after adding a, so a
    # retry with b renamed... found a already there, and a caller that
    # treats the error as "nothing registered" reported a anyway.
    first = await pools(name="taken", min_size=0)
    fresh = await pools(name="fresh", min_size=0)
    clash = await pools(name="taken", min_size=0)
    registry = CollectorRegistry()
    collector = register(first, registry=registry)
    with pytest.raises(ValueError, match="already reported as 'taken'"):
        register(fresh, clash, registry=registry)
    assert collector.pools.items() == [("taken", first)]
    # Two of the given pools clashing with each other: none added either.
    other = CollectorRegistry()
    with pytest.raises(ValueError, match="already reported as 'taken'"):
        register(fresh, first, clash, registry=other)
    assert "safepool_max_size" not in generate_latest(other).decode()
    register(fresh, registry=registry)
    assert [name for name, _ in collector.pools.items()] == ["taken", "fresh"]


async def test_register_on_something_that_is_not_a_registry_says_so(pools: Any) -> None:
    # It raised "cannot create weak reference to 'str' object".
    pool = await pools(name="reg-arg")
    with pytest.raises(TypeError, match="registry must be a prometheus_client CollectorRegistry, got str"):
        register(pool, registry="default")  # type: ignore[arg-type]


async def test_register_of_an_asyncpg_pool_says_what_it_is(pools: Any, pg_dsn: str) -> None:
    # A service half migrated (or an ORM's pool not redirected) registering
    # asyncpg's pool got "AttributeError: 'Pool' object has no attribute
    # 'name'"; and register(first, not_a_pool) kept nothing of the call.
    first = await pools(name="first", min_size=0)
    legacy = await asyncpg.create_pool(pg_dsn, min_size=1, max_size=1)
    try:
        registry = CollectorRegistry()
        with pytest.raises(TypeError, match=r"expected a safepool pool, got asyncpg\.pool\.Pool: an asyncpg pool"):
            register(legacy, registry=registry)
        collector = register(first, registry=registry)
        with pytest.raises(TypeError, match=r"expected a safepool pool, got builtins\.NoneType$"):
            collector.add(None)  # type: ignore[arg-type]
        with pytest.raises(TypeError, match="create it with safepool.create_pool"):
            PoolCollector([first, legacy])
        assert collector.pools.items() == [("first", first)]
        assert value(scrape(registry), "safepool_max_size", pool="first") == first.get_max_size()
    finally:
        await legacy.close()


async def test_register_joins_a_collector_registered_directly_and_live_mode(pools: Any) -> None:
    direct = await pools(name="direct", min_size=0)
    joined = await pools(name="joined", min_size=0)
    other = await pools(name="other-live", min_size=0)
    registry = CollectorRegistry()
    collector = PoolCollector([direct])
    registry.register(collector)
    assert register(joined, registry=registry) is collector
    samples = scrape(registry)
    assert {"direct", "joined"} <= {dict(labels)["pool"] for name, labels in samples if name == "safepool_waiting"}
    assert ("safepool_waiting", frozenset({("pool", "other-live")})) not in samples
    assert register(live=True, registry=registry) is collector
    assert value(scrape(registry), "safepool_waiting", pool=other.name) == 0
    # Unregistered: the next register() makes and registers a new collector.
    registry.unregister(collector)
    fresh = register(joined, registry=registry)
    assert fresh is not collector
    assert {dict(labels)["pool"] for name, labels in scrape(registry) if name == "safepool_waiting"} == {"joined"}


async def test_register_on_a_registry_that_does_not_list_its_collectors() -> None:
    # prometheus_client's collector list is private: without it, register()
    # finds the collector it made itself.
    class Registry:
        def __init__(self) -> None:
            self.registered: list[Any] = []

        def register(self, collector: Any) -> None:
            self.registered.append(collector)

    registry = Registry()
    first = register(registry=registry)  # type: ignore[arg-type]
    assert register(live=True, registry=registry) is first  # type: ignore[arg-type]
    assert registry.registered == [first] and first.pools.live


async def test_every_exported_metric_is_in_the_docs_table(pools: Any) -> None:
    # safepool_site_connections, _site_waiting and _site_cap were exported
    # but missing from docs/metrics.md's table (a new user's trial,
    # 2026-12-03): every family a scrape shows, with every optional one on
    # (max_waiters, leak_warning_after, max_site_share), has its row.
    table = {m.group(1) for m in re.finditer(r"^\| `(safepool_\w+?)(?:\{[\w, ]+\})?` \|", DOC, re.MULTILINE)}
    pool = await pools(
        name="documented", min_size=1, max_size=4, max_waiters=5, leak_warning_after=60.0, max_site_share=0.5
    )
    registry = CollectorRegistry()
    register(pool, registry=registry)
    async with pool.acquire():
        text = generate_latest(registry).decode()
    families = {family.name for family in text_string_to_metric_families(text)}
    # (the parser names a counter's family without its _total suffix)
    exported = {name if f"{name}_total" not in text else f"{name}_total" for name in families}
    assert "safepool_site_cap" in exported and "safepool_max_waiters" in exported
    assert sorted(exported - table) == []


async def test_a_pool_whose_event_loop_closed_without_close_is_no_longer_reported(pg_dsn: str) -> None:
    """An ``asyncio.run()`` that ends without ``pool.close()``: the pool is
    beyond use, and a live scrape reported its last numbers (idle 1) for as
    long as the application held it, and its repr said "open"."""
    registry = CollectorRegistry()
    registry.register(PoolCollector(live=True))
    pools: list[safepool.Pool] = []

    async def serve() -> None:
        pool = await safepool.create_pool(pg_dsn, name="orphaned", min_size=1, max_size=2)
        pools.append(pool)
        async with pool.acquire() as connection:
            await connection.fetchval("SELECT 1")
        assert value(scrape(registry), "safepool_connections", pool="orphaned", state="idle") == 1
        assert not pool.closed

    with warnings.catch_warnings():
        # The connection the loop's end left open, collected below.
        warnings.simplefilter("ignore", ResourceWarning)
        await asyncio.to_thread(asyncio.run, serve())
        assert pools[0].closed and " closed " in repr(pools[0])
        assert not any(labels.get("pool") == "orphaned" for labels in _labels(scrape(registry)))
        pools.clear()
        gc.collect()


def _labels(samples: dict[tuple[str, frozenset[tuple[str, str]]], float]) -> list[dict[str, str]]:
    return [dict(labels) for _, labels in samples]
