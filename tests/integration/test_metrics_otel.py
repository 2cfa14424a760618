"""OpenTelemetry instruments, read with the SDK's InMemoryMetricReader while a
real pool on PostgreSQL works."""

from __future__ import annotations

import asyncio
import gc
import json
import os
import sys
import uuid
from collections.abc import Iterator
from typing import Any

import asyncpg
import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

import safepool
from safepool import ManualClock
from safepool._histogram import DEFAULT_BOUNDS
from safepool._histogram import TeeHistogram as _Tee
from safepool.metrics import otel
from safepool.metrics.otel import COUNTERS, instrument
from tests._util import until
from tests.integration.conftest import dsn_to_closed_port

pytestmark = pytest.mark.asyncio
POOL = "db.client.connection.pool.name"


@pytest.fixture
def reader() -> Iterator[tuple[InMemoryMetricReader, MeterProvider]]:
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    yield reader, provider
    provider.shutdown()


def points(reader: InMemoryMetricReader) -> dict[str, list[Any]]:
    """Instrument name -> its data points, from one collection."""
    return points_of(reader.get_metrics_data())


def points_of(data: Any) -> dict[str, list[Any]]:
    """Instrument name -> its data points, in one collection's data."""
    result: dict[str, list[Any]] = {}
    assert data is not None
    for resource in data.resource_metrics:
        for scope in resource.scope_metrics:
            assert scope.scope.name == "safepool"
            for metric in scope.metrics:
                result[metric.name] = list(metric.data.data_points)
    return result


def point(found: dict[str, list[Any]], name: str, **attributes: str) -> Any:
    matches = [p for p in found[name] if dict(p.attributes) == attributes]
    assert len(matches) == 1, (name, attributes, found.get(name))
    return matches[0]


async def test_semantic_convention_instruments_on_a_busy_pool(pools: Any, reader: Any) -> None:
    memory, provider = reader
    clock = ManualClock()
    pool = await pools(name="orders", min_size=1, max_size=2, clock=clock)
    instrument(pool, meter_provider=provider)

    first = await pool.acquire()
    second = await pool.acquire()  # opens a second connection: create_time
    waiter = asyncio.ensure_future(pool.acquire(timeout=None))
    await until(lambda: pool.stats().waiting == 1)
    clock.advance(3.0)

    found = points(memory)
    assert point(found, "db.client.connection.count", **{POOL: "orders", "db.client.connection.state": "idle"}).value == 0
    assert point(found, "db.client.connection.count", **{POOL: "orders", "db.client.connection.state": "used"}).value == 2
    assert point(found, "db.client.connection.pending_requests", **{POOL: "orders"}).value == 1
    assert point(found, "db.client.connection.max", **{POOL: "orders"}).value == 2
    assert point(found, "db.client.connection.idle.max", **{POOL: "orders"}).value == 2
    assert point(found, "db.client.connection.idle.min", **{POOL: "orders"}).value == 1
    assert point(found, "db.client.connection.timeouts", **{POOL: "orders"}).value == 0
    assert point(found, "safepool.lease.oldest_age", **{POOL: "orders"}).value == pytest.approx(3.0)
    assert point(found, "safepool.wait.oldest_age", **{POOL: "orders"}).value == pytest.approx(3.0)
    assert point(found, "safepool.server.up", **{POOL: "orders"}).value == 1
    assert point(found, "safepool.init.failing", **{POOL: "orders"}).value == 0
    states = {dict(p.attributes)["safepool.connection.state"]: p.value for p in found["safepool.connection.count"]}
    assert states == {"idle": 0, "in_use": 2, "connecting": 0, "resetting": 0, "closing": 0}
    for field, name, _, _ in COUNTERS:
        assert point(found, name, **{POOL: "orders"}).value == getattr(pool.stats(), field)
    create = point(found, "db.client.connection.create_time", **{POOL: "orders"})
    assert create.count == 1  # the connection opened after instrumenting
    assert list(create.explicit_bounds) == list(DEFAULT_BOUNDS)  # the pool's buckets, advised to the SDK

    await pool.release(first)
    third = await asyncio.wait_for(waiter, 5)
    clock.advance(1.0)
    await pool.release(second)
    await pool.release(third)  # (neither ran a statement: no round trip, no loop turn)
    await asyncio.sleep(0)  # timing sinks get their values in a loop callback of their own

    found = points(memory)
    wait = point(found, "db.client.connection.wait_time", **{POOL: "orders"})
    assert wait.count == 3 and wait.sum == pytest.approx(3.0) and wait.max == pytest.approx(3.0)
    use = point(found, "db.client.connection.use_time", **{POOL: "orders"})
    assert use.count == 3
    assert use.sum == pytest.approx(pool.stats().lease_duration.sum)  # the same values as the pool's own
    assert pool.stats().acquire_wait.count == 3  # the tee still feeds the pool's histogram


async def test_a_failing_init_hook_is_visible_with_the_server_up(pools: Any, reader: Any) -> None:
    memory, provider = reader
    broken = True

    async def init(con: Any) -> None:
        if broken:
            raise ValueError("bug in init hook (test)")

    pool = await pools(name="init-bug", min_size=0, init=init)
    instrument(pool, meter_provider=provider)
    with pytest.raises(ValueError, match="bug in init hook"):
        await pool.acquire(timeout=10)
    found = points(memory)
    assert point(found, "safepool.init.failing", **{POOL: "init-bug"}).value == 1
    assert point(found, "safepool.server.up", **{POOL: "init-bug"}).value == 1
    broken = False
    async with pool.acquire(timeout=10):
        pass
    assert point(points(memory), "safepool.init.failing", **{POOL: "init-bug"}).value == 0


def connect_failing(found: dict[str, list[Any]], pool: str) -> list[dict[str, Any]]:
    """The attributes of ``pool``'s safepool.connect.failing points, each
    checked to be 1."""
    matches = [p for p in found.get("safepool.connect.failing", []) if dict(p.attributes)[POOL] == pool]
    assert all(p.value == 1 for p in matches), matches
    return [dict(p.attributes) for p in matches]


async def test_a_full_server_is_told_from_a_down_one_by_its_sqlstate(
    pools: Any, reader: Any, refused_role: Any, pg_dsn: str
) -> None:
    """53300 from the server (a role at its CONNECTION LIMIT) and a refused
    TCP connect (no answer, no SQLSTATE) both read safepool.server.up 0;
    safepool.connect.failing tells them apart with the database
    conventions' db.response.status_code and error.type, and has no point
    once a connect succeeds."""
    memory, provider = reader
    full = await pools(name="full", min_size=0, dsn=refused_role.dsn)
    password = f"pw-{uuid.uuid4().hex}"
    down = await pools(name="down", min_size=0, dsn=dsn_to_closed_port(pg_dsn, password))
    instrument(full, down, meter_provider=provider)
    assert connect_failing(points(memory), "full") == []
    with pytest.raises(asyncpg.TooManyConnectionsError):
        await full.fetchval("SELECT 1")
    with pytest.raises(ConnectionRefusedError):
        await down.fetchval("SELECT 1")
    data = memory.get_metrics_data()
    found = points_of(data)
    assert point(found, "safepool.server.up", **{POOL: "full"}).value == 0
    assert point(found, "safepool.server.up", **{POOL: "down"}).value == 0
    assert connect_failing(found, "full") == [
        {POOL: "full", "db.response.status_code": "53300", "error.type": "TooManyConnectionsError"}
    ]
    assert connect_failing(found, "down") == [{POOL: "down", "error.type": "ConnectionRefusedError"}]
    exported = data.to_json()
    assert refused_role.password not in exported and password not in exported

    await refused_role.admit()
    assert await full.fetchval("SELECT 1") == 1
    found = points(memory)
    assert point(found, "safepool.server.up", **{POOL: "full"}).value == 1
    assert connect_failing(found, "full") == []
    assert len(connect_failing(found, "down")) == 1  # still failing


async def test_instrument_of_an_asyncpg_pool_says_what_it_is(pg_dsn: str, reader: Any) -> None:
    legacy = await asyncpg.create_pool(pg_dsn, min_size=1, max_size=1)
    try:
        with pytest.raises(TypeError, match=r"expected a safepool pool, got asyncpg\.pool\.Pool: an asyncpg pool"):
            instrument(legacy, meter_provider=reader[1])
    finally:
        await legacy.close()


async def test_timeouts_counter(pools: Any, reader: Any) -> None:
    memory, provider = reader
    pool = await pools(name="busy", min_size=1, max_size=1)
    instrument(pool, meter_provider=provider)
    async with pool.acquire():
        with pytest.raises(safepool.PoolTimeoutError):
            await pool.acquire(timeout=0.01)
    assert point(points(memory), "db.client.connection.timeouts", **{POOL: "busy"}).value == 1


async def test_remove_restores_the_pool_histograms(pools: Any, reader: Any) -> None:
    memory, provider = reader
    pool = await pools(name="hooked", min_size=1)
    instruments = instrument(pool, meter_provider=provider)
    assert isinstance(pool._state.wait_times, _Tee)
    await pool.fetchval("SELECT 1")
    instruments.remove("hooked")
    assert not isinstance(pool._state.wait_times, _Tee)
    assert not isinstance(pool._state.lease_times, _Tee)
    await pool.fetchval("SELECT 1")
    assert pool.stats().acquire_wait.count == 2  # nothing lost across the swaps
    found = points(memory)
    assert not any(dict(p.attributes).get(POOL) == "hooked" for p in found.get("db.client.connection.count", []))

    # Two meter providers on one pool: one tee, two sinks.
    other_reader = InMemoryMetricReader()
    other = MeterProvider(metric_readers=[other_reader])
    try:
        first = instrument(pool, meter_provider=provider)
        second = instrument(pool, meter_provider=other)
        await pool.fetchval("SELECT 1")
        assert len(pool._state.wait_times.sinks) == 2  # type: ignore[attr-defined]
        second.close()
        assert isinstance(pool._state.wait_times, _Tee)
        first.close()
        assert not isinstance(pool._state.wait_times, _Tee)
        assert point(points(other_reader), "db.client.connection.wait_time", **{POOL: "hooked"}).count == 1
    finally:
        other.shutdown()


async def test_live_pools_are_hooked_from_the_reader_thread(pools: Any, reader: Any) -> None:
    memory, provider = reader
    instrument(live=True, meter_provider=provider)
    pool = await pools(name="late", min_size=1)
    # The SDK's periodic reader collects in its own thread: the first
    # collection that sees the pool hooks its histograms through the loop.
    await asyncio.to_thread(memory.get_metrics_data)
    await until(lambda: isinstance(pool._state.lease_times, _Tee))
    for _ in range(3):
        await pool.fetchval("SELECT 1")
    found = await asyncio.to_thread(points, memory)
    assert point(found, "db.client.connection.use_time", **{POOL: "late"}).count == 3
    assert point(found, "safepool.acquired", **{POOL: "late"}).value == 3


async def test_a_failing_sink_never_breaks_the_pool(pools: Any, reader: Any, caplog: Any) -> None:
    _, provider = reader
    pool = await pools(name="sink", min_size=1)
    instrument(pool, meter_provider=provider)

    def broken(value: float) -> None:
        raise RuntimeError("exporter bug")

    pool.add_timing_sink("wait", broken)
    for _ in range(3):
        assert await pool.fetchval("SELECT 1") == 1
    assert pool.stats().acquire_wait.count == 3
    complaints = [r for r in caplog.records if "'sink': a wait timing sink failed" in r.getMessage()]
    assert len(complaints) == 1  # logged once, not per acquire


async def test_a_blocked_loop_costs_one_timeout_per_collection(
    pools: Any, reader: Any, caplog: Any, monkeypatch: Any
) -> None:
    """A pool whose loop does not answer is waited for once per collection,
    not once per instrument: each of the ~30 observable callbacks waited
    SNAPSHOT_TIMEOUT (5 s) for it again, so a blocked loop stalled the
    reader's thread past its collection timeout (10 s for get_metrics_data,
    30 s for the periodic reader) and every instrument of the provider lost
    that collection, with one logged traceback per safepool instrument."""
    import threading
    import time

    import safepool.metrics

    memory, provider = reader
    monkeypatch.setattr(safepool.metrics, "SNAPSHOT_TIMEOUT", 0.25)
    pool = await pools(name="blocked", min_size=1)
    instrument(pool, meter_provider=provider)
    took: list[float] = []

    def collect() -> None:
        started = time.monotonic()
        memory.get_metrics_data()
        took.append(time.monotonic() - started)

    collector = threading.Thread(target=collect)
    collector.start()
    collector.join(4.0)  # blocks the pool's loop, as a long synchronous call would
    collector.join()
    assert took and took[0] < 2.0, took  # one timeout (0.25 s), not one per instrument (~7.5 s)
    failures = [r for r in caplog.records if "Callback failed" in r.getMessage()]
    assert len(failures) == 1, [r.getMessage() for r in failures]
    # Once the loop answers again, the next collection reports the pool.
    found = await asyncio.to_thread(points, memory)
    assert point(found, "db.client.connection.max", **{POOL: "blocked"}).value == 2


async def test_a_pool_taking_a_closed_pools_name_continues_its_counters(pools: Any) -> None:
    """An application re-creating its pool under the same name keeps its
    series (docs/metrics.md): the observable counters went back to the new
    pool's own counts, so a cumulative point fell (3 to 0) under the same
    start time, and a delta reader exported a monotonic sum of -3."""
    from opentelemetry.sdk.metrics import ObservableCounter
    from opentelemetry.sdk.metrics.export import AggregationTemporality

    for temporality in (AggregationTemporality.CUMULATIVE, AggregationTemporality.DELTA):
        memory = InMemoryMetricReader(preferred_temporality={ObservableCounter: temporality})
        provider = MeterProvider(metric_readers=[memory])
        try:
            old = await pools(name="orders")
            instruments = instrument(old, meter_provider=provider)
            for _ in range(3):
                await old.fetchval("SELECT 1")
            before = points(memory)
            assert point(before, "safepool.acquired", **{POOL: "orders"}).value == 3
            await old.fetchval("SELECT 1")  # after the last collection: still counted
            await old.close()

            new = await pools(name="orders")
            instruments.add(new)
            await new.fetchval("SELECT 1")
            after = points(memory)
            acquired = point(after, "safepool.acquired", **{POOL: "orders"}).value
            opened = point(after, "safepool.connections_opened", **{POOL: "orders"}).value
            if temporality is AggregationTemporality.CUMULATIVE:
                assert acquired == 5 and opened == 2
            else:
                assert acquired == 2 and opened == 1  # the increase since the last collection
            for _, name, _, _ in COUNTERS:
                assert point(after, name, **{POOL: "orders"}).value >= 0, name
            instruments.close()
        finally:
            provider.shutdown()


async def test_a_name_that_is_not_a_str_is_refused_at_add(pools: Any, reader: Any) -> None:
    """add(pool, 5) was taken, and every later scrape of the registry failed
    (prometheus_client: "'int' object has no attribute 'replace'"); OpenTelemetry
    reported a pool name that is not a string."""
    from safepool.metrics.prometheus import PoolCollector

    pool = await pools(name="typed")
    instruments = instrument(meter_provider=reader[1])
    for add in (PoolCollector().add, instruments.add):
        for name in (5, b"typed"):
            with pytest.raises(TypeError, match="name must be a str"):
                add(pool, name)  # type: ignore[arg-type]


async def test_instrument_once_per_pool_reports_every_pool(pools: Any, reader: Any) -> None:
    """instrument(pool) where each pool is created, as register(pool) for
    Prometheus: the second call's instruments were the SDK's existing ones
    (same name: no new callbacks), so the second pool's gauges and counters
    were never reported, with no warning, while its histograms were."""
    memory, provider = reader
    first = await pools(name="first")
    second = await pools(name="second")
    instruments = instrument(first, meter_provider=provider)
    assert instrument(second, meter_provider=provider) is instruments  # one per meter provider
    assert instrument(second, meter_provider=provider) is instruments  # (already reported: a no-op)
    await first.fetchval("SELECT 1")
    await second.fetchval("SELECT 1")
    await asyncio.sleep(0)  # timing sinks get their values in a loop callback of their own
    found = points(memory)
    for name in ("first", "second"):
        assert point(found, "safepool.acquired", **{POOL: name}).value == 1
        assert point(found, "db.client.connection.wait_time", **{POOL: name}).count == 1
    with pytest.raises(ValueError, match="record_times"):
        instrument(meter_provider=provider, record_times=False)

    # After close(), the next call reports again, on the same instruments.
    instruments.close()
    assert not any(dict(p.attributes).get(POOL) == "first" for p in points(memory).get("safepool.acquired", []))
    assert instrument(first, meter_provider=provider) is instruments
    assert point(points(memory), "safepool.acquired", **{POOL: "first"}).value == 1


async def test_a_pool_renamed_is_reported_under_its_new_name_only(pools: Any, reader: Any) -> None:
    memory, provider = reader
    pool = await pools(name="orders")
    instruments = instrument(meter_provider=provider)
    assert instruments.add(pool, "orders-2") == "orders-2"
    assert instrument(pool, meter_provider=provider) is instruments  # already reported: a no-op
    assert instruments.add(pool, "orders-primary") == "orders-primary"
    await pool.fetchval("SELECT 1")
    await asyncio.sleep(0)  # timing sinks get their values in a loop callback of their own
    found = points(memory)
    assert [dict(p.attributes)[POOL] for p in found["safepool.acquired"]] == ["orders-primary"]
    assert [dict(p.attributes)[POOL] for p in found["db.client.connection.wait_time"]] == ["orders-primary"]


# Run in a subprocess: the API's global meter provider can be set once per process.
_BEFORE_THE_SDK = r'''
import asyncio, json, os, sys
from opentelemetry import metrics
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
import safepool
from safepool.metrics.otel import instrument

POOL = "db.client.connection.pool.name"
NAMES = ("safepool.acquired", "db.client.connection.max", "db.client.connection.wait_time")


def collect(reader):
    found = {name: [] for name in NAMES}
    for resource in reader.get_metrics_data().resource_metrics:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                if metric.name in found:
                    for p in metric.data.data_points:
                        value = p.count if hasattr(p, "count") else p.value
                        found[metric.name].append([p.attributes[POOL], value])
    return found


async def main(live):
    dsn = os.environ["SAFEPOOL_TEST_DSN"]
    early = await safepool.create_pool(dsn, name="early", min_size=1, max_size=2)
    made = [instrument(live=True) if live else instrument(early)]  # on the API's proxy provider
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    metrics.set_meter_provider(provider)
    late = await safepool.create_pool(dsn, name="late", min_size=1, max_size=2)
    if live:
        made += [instrument(live=True), instrument(late)]
    else:
        made += [instrument(late), instrument(early), instrument(meter_provider=provider)]
    collections = []
    for _ in range(2):
        for pool in (early, late):
            await pool.fetchval("SELECT 1")
        await asyncio.sleep(0)  # timing sinks get their values in a loop callback of their own
        collections.append(collect(reader))
    await early.close()
    await late.close()
    print(json.dumps({"same": all(m is made[0] for m in made), "collections": collections}))


asyncio.run(main(sys.argv[1] == "live"))
'''


@pytest.mark.parametrize("live", [False, True])
async def test_instrument_before_the_sdk_is_configured(pg_dsn: str, live: bool) -> None:
    """instrument() on the API's proxy provider, then set_meter_provider(),
    then instrument() again (a pool created later, the same pool, an
    explicit meter_provider=): the proxy hands its instruments to the SDK, so
    the later calls made a second set whose callbacks the SDK dropped (the
    late pool's gauges and counters were never reported) and whose timing
    sinks recorded every wait a second time. One set; each pool once."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _BEFORE_THE_SDK, "live" if live else "pools",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "SAFEPOOL_TEST_DSN": str(pg_dsn), "PYTHONPATH": os.getcwd()},
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, err.decode()
    result = json.loads(out)
    assert result["same"]
    first, second = result["collections"]
    for name in ("safepool.acquired", "db.client.connection.max"):
        assert sorted(first[name]) == [["early", 1 if name == "safepool.acquired" else 2],
                                       ["late", 1 if name == "safepool.acquired" else 2]], name
    assert sorted(second["safepool.acquired"]) == [["early", 2], ["late", 2]]  # monotonic, each once
    # live=True hooks a pool's histograms when a collection first sees it
    # (instrument(late) hooked late's at once).
    assert sorted(second["db.client.connection.wait_time"]) == ([["early", 1], ["late", 2]] if live
                                                                 else [["early", 2], ["late", 2]])


def use_time_counts(found: dict[str, list[Any]]) -> dict[str, int]:
    """Values recorded in db.client.connection.use_time, by pool name."""
    return {dict(p.attributes)[POOL]: p.count for p in found["db.client.connection.use_time"]}


async def test_live_histograms_follow_a_pool_that_takes_over_the_bare_name(pools: Any, reader: Any) -> None:
    memory, provider = reader
    pools_named_dup = [await pools(name="dup", min_size=0), await pools(name="dup", min_size=0)]
    instruments = instrument(live=True, meter_provider=provider)
    # The first collection hooks both live pools: one as "dup", the other as "dup@<hex id>".
    await asyncio.to_thread(memory.get_metrics_data)
    holder = instruments.pools.get("dup")
    other = next(pool for pool in pools_named_dup if pool is not holder)
    await until(lambda: isinstance(other._state.lease_times, _Tee))
    assert holder is not None
    await other.fetchval("SELECT 1")  # (recorded as dup@<hex id>: the name it has till the next collection)
    await holder.close()
    # The next collection gives the other pool the bare name, in every instrument.
    await asyncio.to_thread(memory.get_metrics_data)
    for _ in range(3):
        await other.fetchval("SELECT 1")
    await asyncio.sleep(0)  # (the sinks get their values one loop turn after the lease)
    found = await asyncio.to_thread(points, memory)
    assert point(found, "safepool.acquired", **{POOL: "dup"}).value == 4
    use_times = use_time_counts(found)
    # Its leases since the rename are under the bare name; its histogram
    # series under the suffixed name got nothing more.
    assert use_times == {"dup": 3, f"dup@{id(other):x}": 1}, use_times


async def test_add_under_a_name_moves_the_histograms_of_a_live_pool(pools: Any, reader: Any) -> None:
    memory, provider = reader
    pool = await pools(name="live-one", min_size=0)
    instruments = instrument(live=True, meter_provider=provider)
    await asyncio.to_thread(memory.get_metrics_data)  # hooks the live pool as "live-one"
    await until(lambda: isinstance(pool._state.lease_times, _Tee))
    assert instruments.add(pool, "renamed") == "renamed"
    for _ in range(2):
        await pool.fetchval("SELECT 1")
    await asyncio.sleep(0)  # (the sinks get their values one loop turn after the lease)
    found = await asyncio.to_thread(points, memory)
    assert point(found, "safepool.acquired", **{POOL: "renamed"}).value == 2
    use_times = use_time_counts(found)
    assert use_times.get("renamed") == 2, use_times


# What the instruments must not accumulate over a long run: pools created and
# closed under names of their own (a pool per tenant, per job).


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
