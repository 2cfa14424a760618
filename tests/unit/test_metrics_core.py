"""Exporters and health bookkeeping driven from the state core: no event
loop, no database. A stand-in pool serves ``stats()`` from a PoolState."""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any, TypeVar, cast

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from safepool import health
from safepool._histogram import DEFAULT_BOUNDS, Histogram, TeeHistogram
from safepool._state import Backoff, PoolState, ReleaseOutcome
from safepool.metrics import PoolSet, leak_suspects, snapshot
from safepool.metrics.prometheus import _buckets, register
from safepool.stats import LeaseInfo, PoolStats, build_stats

T = TypeVar("T")


class StubPool:
    """What the exporters read of a Pool (its public surface only), backed
    by the pure state core."""

    def __init__(self, name: str, state: PoolState, leak_warning_after: float | None = None) -> None:
        self.name = name
        self.state = state
        self.closed = False
        self.options = SimpleNamespace(leak_warning_after=leak_warning_after)
        self.now = 100.0
        self.hops: list[int] = []  # the thread of each call_threadsafe
        self.listeners: list[Callable[[Any], None]] = []

    def stats(self) -> PoolStats:
        return build_stats(self.name, self.state, self.now)

    def leases(self, *, stacks: bool = True) -> list[LeaseInfo]:
        return [
            LeaseInfo(id=lease.id, age=self.now - lease.acquired_at, deadline_in=None, task_name=None,
                      acquired_at=None, stack=None)
            for lease in self.state.leases()
        ]

    def call_threadsafe(self, function: Callable[[], T], timeout: float | None = 5.0) -> T:
        self.hops.append(threading.get_ident())
        return function()

    def stats_threadsafe(self, timeout: float | None = 5.0) -> PoolStats:
        return self.call_threadsafe(self.stats, timeout)

    def add_event_listener(self, callback: Callable[[Any], None]) -> None:
        self.listeners.append(callback)


def busy_state() -> PoolState:
    state = PoolState(max_size=3, min_size=1, backoff=Backoff(rng=lambda: 1.0))
    for _ in range(2):
        slot = state.add_connecting(90.0)
        state.connect_succeeded(slot, object(), 90.5)
    state.try_acquire(95.0)
    lease = state.try_acquire(99.0)
    assert lease is not None
    state.release(lease, 99.75, ReleaseOutcome.CLEAN)
    state.actions.clear()
    return state


def scrape(*pools: StubPool) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    registry = CollectorRegistry()
    register(*cast(Any, pools), registry=registry)
    text = generate_latest(registry).decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_buckets_are_cumulative_with_inf_last() -> None:
    histogram = Histogram()
    for value in (0.0, 0.001, 0.001, 0.3, 400.0):
        histogram.record(value)
    buckets = _buckets(histogram.snapshot())
    assert len(buckets) == len(DEFAULT_BOUNDS) + 1
    assert buckets[0] == ("1e-05", 1)
    assert dict(buckets)["0.001"] == 3  # le: a value equal to the bound is in its bucket
    assert dict(buckets)["0.5"] == 4
    assert dict(buckets)["300.0"] == 4 and buckets[-1] == ("+Inf", 5)
    assert [count for _, count in buckets] == sorted(count for _, count in buckets)


def test_exposition_from_the_state_core() -> None:
    pool = StubPool("core", busy_state(), leak_warning_after=3.0)
    samples = scrape(pool)
    label = frozenset({("pool", "core")})
    assert samples[("safepool_connections", label | {("state", "in_use")})] == 1
    assert samples[("safepool_connections", label | {("state", "idle")})] == 1
    assert samples[("safepool_acquired_total", label)] == 2
    assert samples[("safepool_released_total", label)] == 1
    assert samples[("safepool_resets_skipped_total", label)] == 1
    assert samples[("safepool_oldest_lease_age_seconds", label)] == 5.0
    assert samples[("safepool_leak_suspects", label)] == 1  # held 5 s > 3 s
    assert samples[("safepool_lease_duration_seconds_sum", label)] == 0.75
    assert samples[("safepool_connect_duration_seconds_count", label)] == 2
    assert samples[("safepool_connect_duration_seconds_sum", label)] == 1.0  # 0.5 s each
    assert ("safepool_max_waiters", label) not in samples  # unbounded


def test_server_status_gauges_follow_connect_failures() -> None:
    state = PoolState(max_size=2, backoff=Backoff(rng=lambda: 1.0))
    pool = StubPool("flaky", state)
    slot = state.add_connecting(0.0)
    state.connect_failed(slot, 1.0, ConnectionRefusedError("refused"))
    label = frozenset({("pool", "flaky")})
    samples = scrape(pool)
    assert samples[("safepool_server_up", label)] == 0
    assert samples[("safepool_server_status", label | {("status", "down")})] == 1
    assert samples[("safepool_server_status", label | {("status", "up")})] == 0
    assert samples[("safepool_connect_errors_total", label)] == 1
    assert samples[("safepool_consecutive_connect_failures", label)] == 1


def test_pool_set_names_and_weak_references() -> None:
    a = StubPool("a", busy_state())
    b = StubPool("b", busy_state())
    pools = PoolSet(cast(Any, [a, b]))
    assert [name for name, _ in pools.items()] == ["a", "b"]
    with pytest.raises(ValueError, match="already reported"):
        pools.add(cast(Any, StubPool("a", busy_state())))
    a.closed = True
    assert [name for name, _ in pools.items()] == ["b"]  # closed pools are not reported
    replacement = StubPool("a", busy_state())
    pools.add(cast(Any, replacement))  # a closed pool's name is free again
    assert pools.get("a") is replacement
    del b
    assert [name for name, _ in pools.items()] == ["a"]  # gone with the pool
    with pytest.raises(ValueError, match="empty"):
        pools.add(cast(Any, replacement), "")
    pools.remove("a")
    assert pools.items() == []


def test_leak_suspects_needs_the_option() -> None:
    state = busy_state()
    assert leak_suspects(cast(Any, StubPool("x", state))) is None
    assert leak_suspects(cast(Any, StubPool("x", state, leak_warning_after=5.0))) == 1  # exactly 5 s: counted
    assert leak_suspects(cast(Any, StubPool("x", state, leak_warning_after=5.5))) == 0


def test_exporters_read_through_the_pools_loop() -> None:
    """Snapshots go through call_threadsafe (the pool's loop), one trip per
    pool and scrape for Prometheus; never a read of the pool's containers
    from the exporter's thread."""
    pool = StubPool("hop", busy_state(), leak_warning_after=3.0)
    assert snapshot(cast(Any, pool)).name == "hop" and len(pool.hops) == 1
    scrape(pool)
    assert len(pool.hops) == 2


def test_tee_records_into_the_pool_histogram_and_each_sink_after() -> None:
    """The pool's histogram at once; the sinks in one loop callback after the
    recording code has finished (the books settled), in order."""
    loop = asyncio.new_event_loop()
    try:
        inner = Histogram()
        inner.record(0.5)
        tee = TeeHistogram(inner, loop)
        seen: list[float] = []
        tee.sinks.append(seen.append)
        tee.sinks.append(lambda value: 1 / 0)  # a broken sink is logged once, never raised
        tee.record(0.25)
        tee.record(2.0)
        assert seen == [] and (tee.count, tee.sum, tee.max) == (3, 2.75, 2.0)
        assert len(loop._ready) == 1  # type: ignore[attr-defined]  # one callback for both values
        loop.run_until_complete(asyncio.sleep(0))
        assert seen == [0.25, 2.0]
    finally:
        loop.close()
    tee.record(1.0)  # the loop is closed: dropped, never raised
    assert seen == [0.25, 2.0] and tee.count == 4
    assert tee.snapshot() == inner.snapshot() and tee.quantile(0.5) == inner.quantile(0.5)


def test_tee_takes_the_hot_paths_held_back_values_at_once() -> None:
    """The pool's hot path bumps ``zeros`` and appends to ``pending``: with a
    tee installed, each value reaches the inner histogram and the sinks'
    queue at once, and nothing is left held back in the tee."""
    loop = asyncio.new_event_loop()
    try:
        inner = Histogram()
        inner.pending.append(0.75)  # held back before the tee came: still counted
        tee = TeeHistogram(inner, loop)
        seen: list[float] = []
        tee.sinks.append(seen.append)
        tee.zeros += 1
        tee.pending.append(0.5)
        assert tee.pending == [] and tee.zeros == 0
        assert (tee.count, tee.sum, tee.max) == (3, 1.25, 0.75)
        loop.run_until_complete(asyncio.sleep(0))
        assert seen == [0.0, 0.5]
    finally:
        loop.close()


def test_connect_error_window_uses_checks_as_samples() -> None:
    state = PoolState(max_size=2, backoff=Backoff(rng=lambda: 1.0))
    pool = cast(Any, StubPool("window", state))

    def fail(now: float) -> None:
        slot = state.add_connecting(now)
        state.connect_failed(slot, now, OSError("refused"))
        state.actions.clear()

    def check(now: float) -> tuple[int, float | None]:
        return health._recent_connect_errors(pool, build_stats("window", state, now), now, 60.0)

    fail(0.0)
    assert check(1.0) == (1, None)  # first check: only the current run is known
    # The failure the first check saw (at 0.0) is within the window of the
    # next checks too: counted from its time (review h284; this read (0, 9.0)).
    assert check(10.0) == (1, 10.0)
    fail(20.0)
    slot = state.add_connecting(21.0)
    state.connect_succeeded(slot, object(), 21.0)  # the run ends; the errors stay counted
    assert check(30.0) == (2, 30.0)
    assert check(80.0) == (1, 70.0)  # baseline: the newest check at or before 20.0 (10.0)
    # The counter did not move between the checks at 30.0 and 80.0: its value
    # at the window's start (40.0) is known, the window measured in full.
    assert check(100.0) == (0, 60.0)
    # Runs of the counter, not one sample per check; the run of 1 ended before any window's start: dropped.
    assert [run[2] for run in health._history[pool].runs] == [2]
    assert check(500.0) == (0, None)  # the last check is too old to measure a rate from


def test_with_no_baseline_the_current_run_counts_only_within_the_window() -> None:
    """A first check, or one more than twice the window after the last,
    counts the current run of failures only if its last failed within the
    window (``last_connect_failure_age``): no connect since a failure long
    ago (a pool idling at min_size) kept connect_errors for ever."""
    state = PoolState(max_size=2, backoff=Backoff(rng=lambda: 1.0))
    pool = cast(Any, StubPool("old-run", state))
    slot = state.add_connecting(0.0)
    state.connect_failed(slot, 0.0, OSError("refused"))
    slot = state.add_connecting(5.0)
    state.connect_failed(slot, 5.0, OSError("refused"))
    state.actions.clear()

    def check(now: float) -> tuple[int, float | None]:
        stats = build_stats("old-run", state, now)
        assert stats.last_connect_failure_age == now - 5.0
        return health._recent_connect_errors(pool, stats, now, 60.0)

    assert check(65.0) == (2, None)  # the first check: the last failure 60 s ago, within the window
    assert check(500.0) == (0, None)  # no usable baseline; the run ended 495 s ago
    assert check(1000.0) == (0, None)
    slot = state.add_connecting(1000.0)
    state.connect_succeeded(slot, object(), 1000.0)
    assert build_stats("old-run", state, 1001.0).last_connect_failure_age is None


def test_live_pools_is_safe_from_another_thread_while_pools_are_created(monkeypatch: pytest.MonkeyPatch) -> None:
    """Exporters with live=True list the live pools from the scrape's (or the
    reader's) thread: a pool created on the loop's thread meanwhile failed
    that scrape with "RuntimeError: Set changed size during iteration"."""
    import sys
    import weakref

    from safepool import _registry

    monkeypatch.setattr(_registry, "_LIVE_POOLS", weakref.WeakSet())
    monkeypatch.setattr(_registry, "_CREATED_HOOKS", [])
    errors: list[BaseException] = []
    done = threading.Event()

    def scrape() -> None:
        pools = PoolSet(live=True)
        while not done.is_set():
            try:
                pools.items()
            except Exception as exc:
                errors.append(exc)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible
    scraper = threading.Thread(target=scrape)
    scraper.start()
    try:
        kept: deque[StubPool] = deque(maxlen=50)
        for i in range(3000):
            pool = StubPool(f"p{i}", PoolState(max_size=1))
            _registry.register(cast(Any, pool))
            kept.append(pool)
    finally:
        done.set()
        scraper.join()
        sys.setswitchinterval(interval)
    assert not errors, errors[:3]


def test_of_two_live_pools_sharing_a_name_the_first_keeps_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """live=True names two open pools of one name "app" and "app@<hex id>":
    which got the bare name followed the order of the live-pool set, which
    changes when other pools are created (the set is rehashed), so the
    series "app" jumped from one pool's counters to the other's."""
    import safepool.pool

    first = StubPool("app", PoolState(max_size=1))
    second = StubPool("app", PoolState(max_size=1))
    order = [first, second]
    monkeypatch.setattr(safepool.pool, "live_pools", lambda: list(order))
    pools = PoolSet(live=True)
    assert pools.items() == [("app", first), (f"app@{id(second):x}", second)]
    order.reverse()  # the set's order after a rehash
    assert pools.items() == [("app", first), (f"app@{id(second):x}", second)]
    first.closed = True  # its name is free: the other one takes it
    assert pools.items() == [("app", second)]
    first.closed = False  # (and keeps it)
    assert pools.items() == [("app", second), (f"app@{id(first):x}", first)]


def test_one_pool_where_an_iterable_of_pools_is_expected_says_so() -> None:
    # PoolCollector(pool) for PoolCollector([pool]): "'Pool' object is not iterable".
    pool = StubPool("single", PoolState(max_size=1))
    with pytest.raises(TypeError, match=r"an iterable of pools, got one pool: pass \[pool\]"):
        PoolSet(cast(Any, pool))
    with pytest.raises(TypeError, match=r"an iterable of pools, got one pool"):
        PoolSet().add_all(cast(Any, pool))
    from opentelemetry.sdk.metrics import MeterProvider

    from safepool.metrics.otel import PoolInstruments

    provider = MeterProvider()
    try:
        with pytest.raises(TypeError, match=r"an iterable of pools, got one pool"):
            PoolInstruments(cast(Any, pool), meter_provider=provider)
    finally:
        provider.shutdown()


def test_connect_failing_and_server_up_follow_the_failure_view_going_stale() -> None:
    """One refused connect while a connection serves, then nothing wants a
    connection: backing off (safepool_connect_failing, OpenTelemetry's
    safepool.connect.failing) until 60 s after the failure, then "up" with
    no failing sample, though no connect has succeeded since (the
    consecutive failures stay, for the next connect's backoff)."""
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    from safepool.metrics.otel import PoolInstruments

    state = PoolState(max_size=2, min_size=1, backoff=Backoff(rng=lambda: 1.0))
    state.connect_succeeded(state.add_connecting(0.0), object(), 0.0)
    state.floor_enabled = True
    state.connect_failed(state.add_connecting(10.0), 10.0, ConnectionRefusedError("refused"))
    pool = StubPool("stale", state)
    pool.add_timing_sink = pool.remove_timing_sink = lambda *args: None  # type: ignore[attr-defined]  # (no histograms here)
    label = frozenset({("pool", "stale")})
    failing = label | {("sqlstate", ""), ("error_type", "ConnectionRefusedError")}
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    try:
        PoolInstruments([cast(Any, pool)], meter_provider=provider)

        def otel(name: str) -> list[Any]:
            data = reader.get_metrics_data()
            return [
                point for rm in data.resource_metrics for sm in rm.scope_metrics for metric in sm.metrics
                if metric.name == name for point in metric.data.data_points
            ]

        for now, up in ((10.0, False), (69.9, False), (70.0, True)):
            pool.now = now
            samples = scrape(pool)
            assert samples[("safepool_server_up", label)] == up
            assert samples[("safepool_server_status", label | {("status", "backing_off")})] == (not up)
            assert (("safepool_connect_failing", failing) in samples) == (not up)
            assert samples[("safepool_consecutive_connect_failures", label)] == 1
            assert [p.value for p in otel("safepool.server.up")] == [int(up)]
            assert len(otel("safepool.connect.failing")) == (0 if up else 1)
    finally:
        provider.shutdown()
