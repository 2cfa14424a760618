"""Review s63: mutation review of safepool/metrics/. Mutants that survived
the existing tests, killed here.

Most existing exporter tests read a pool whose counters are mostly 0, so a
metric fed from the wrong ``PoolStats`` field (two zero counters swapped,
``resetting`` for ``closing``) went unnoticed; the Prometheus test that
checks every counter takes the field names from the exporter's own
``COUNTERS`` table, so it cannot catch a wrong field there. Here a stand-in
pool serves a ``PoolStats`` in which every number differs, and the expected
metric -> field mapping is written out from docs/metrics.md and the
OpenTelemetry semantic conventions for database client connection pools
(db.client.connection.*), not imported from the exporters. No server, no
event loop: each test reads one snapshot.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable, Iterator
from types import SimpleNamespace
from typing import Any, TypeVar, cast

import pytest
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import HistogramDataPoint, InMemoryMetricReader
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from safepool._histogram import DEFAULT_BOUNDS, Histogram
from safepool._state import Backoff, PoolState
from safepool.metrics import SNAPSHOT_TIMEOUT, snapshot
from safepool.metrics.otel import PoolInstruments
from safepool.metrics.prometheus import register
from safepool.stats import LeaseInfo, PoolStats, SiteStats, build_stats

T = TypeVar("T")

# Every PoolStats counter, as docs/metrics.md lists them: the Prometheus
# metric is safepool_<field>_total, the OpenTelemetry one safepool.<field>.
COUNTER_FIELDS = (
    "acquired", "released", "acquire_timeouts", "overload_rejections", "unavailable_rejections",
    "leases_expired", "leaks_detected", "leak_warnings", "leases_discarded", "connections_opened",
    "connections_closed", "connections_retired", "connect_errors", "resets", "resets_skipped",
    "resets_failed", "shed", "admission_rejections",
)
# A distinct value per counter (none equal to another number of the snapshot).
COUNTS = {field: 1000 + 10 * i for i, field in enumerate(COUNTER_FIELDS)}


def distribution(*values: float) -> Any:
    histogram = Histogram()
    for value in values:
        histogram.record(value)
    return histogram.snapshot()


def distinct_stats(name: str, **changes: Any) -> PoolStats:
    """A snapshot in which every number differs from every other."""
    base = build_stats(name, PoolState(max_size=3, min_size=1, backoff=Backoff(rng=lambda: 1.0)), 100.0)
    fields: dict[str, Any] = {
        "idle": 2, "in_use": 3, "connecting": 5, "resetting": 7, "closing": 11, "size": 28,
        "waiting": 13, "max_size": 40, "min_size": 17, "max_waiters": 19,
        "oldest_lease_age": 4.5, "oldest_wait_age": 6.25, "consecutive_connect_failures": 23,
        "site_cap": 29, "sites": (SiteStats("app.route", 31, 37), SiteStats("other", 41, 43)),
        "acquire_wait": distribution(0.002), "lease_duration": distribution(0.2, 0.3),
        "connect_time": distribution(1.5, 1.5, 1.5),
        **COUNTS,
    }
    fields.update(changes)
    return dataclasses.replace(base, **fields)


class StatsPool:
    """What the exporters read of a Pool (its public surface), serving a
    fixed snapshot; records each trip's timeout and the timing sinks added."""

    def __init__(self, stats: PoolStats, leak_warning_after: float | None = None,
                 leases: tuple[float, ...] = ()) -> None:
        self.name = stats.name
        self._stats = stats
        self.closed = False
        self.options = SimpleNamespace(leak_warning_after=leak_warning_after)
        self._ages = leases
        self.timeouts: list[float | None] = []
        self.sinks: dict[str, list[Callable[[float], None]]] = {}

    def stats(self) -> PoolStats:
        return self._stats

    def leases(self, *, stacks: bool = True) -> list[LeaseInfo]:
        return [LeaseInfo(id=i, age=age, deadline_in=None, task_name=None, acquired_at=None, stack=None)
                for i, age in enumerate(self._ages)]

    def call_threadsafe(self, function: Callable[[], T], timeout: float | None = 5.0) -> T:
        assert threading.current_thread() is threading.main_thread()
        self.timeouts.append(timeout)
        return function()

    def stats_threadsafe(self, timeout: float | None = 5.0) -> PoolStats:
        return self.call_threadsafe(self.stats, timeout)

    def add_timing_sink(self, kind: str, sink: Callable[[float], None]) -> None:
        self.sinks.setdefault(kind, []).append(sink)

    def remove_timing_sink(self, kind: str, sink: Callable[[float], None]) -> None:
        self.sinks[kind].remove(sink)

    def add_event_listener(self, callback: Callable[[Any], None]) -> None:
        pass  # (a fixed snapshot: it never closes)


# ------------------------------------------------------------ Prometheus


def scrape(*pools: StatsPool) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    registry = CollectorRegistry()
    register(*cast(Any, pools), registry=registry)
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(generate_latest(registry).decode())
        for sample in family.samples
    }


def sample(samples: dict[Any, float], name: str, **labels: str) -> float:
    return samples[(name, frozenset({"pool": "p", **labels}.items()))]


def test_prometheus_every_counter_is_fed_by_its_own_field() -> None:
    samples = scrape(StatsPool(distinct_stats("p")))
    for field, count in COUNTS.items():
        assert sample(samples, f"safepool_{field}_total") == count, field


def test_prometheus_gauges_are_fed_by_their_own_fields() -> None:
    samples = scrape(StatsPool(distinct_stats("p")))
    states = {state: sample(samples, "safepool_connections", state=state)
              for state in ("idle", "in_use", "connecting", "resetting", "closing")}
    assert states == {"idle": 2, "in_use": 3, "connecting": 5, "resetting": 7, "closing": 11}
    assert sample(samples, "safepool_waiting") == 13
    assert sample(samples, "safepool_max_size") == 40
    assert sample(samples, "safepool_min_size") == 17
    assert sample(samples, "safepool_max_waiters") == 19
    assert sample(samples, "safepool_site_cap") == 29
    assert sample(samples, "safepool_site_connections", site="app.route") == 31
    assert sample(samples, "safepool_site_waiting", site="app.route") == 37
    assert sample(samples, "safepool_site_connections", site="other") == 41
    assert sample(samples, "safepool_site_waiting", site="other") == 43
    assert sample(samples, "safepool_oldest_lease_age_seconds") == 4.5
    assert sample(samples, "safepool_oldest_wait_age_seconds") == 6.25
    assert sample(samples, "safepool_consecutive_connect_failures") == 23
    assert sample(samples, "safepool_acquire_wait_seconds_count") == 1
    assert sample(samples, "safepool_lease_duration_seconds_count") == 2
    assert sample(samples, "safepool_connect_duration_seconds_count") == 3
    assert sample(samples, "safepool_connect_duration_seconds_sum") == 4.5


def test_prometheus_waiting_is_zero_with_connections_in_use() -> None:
    samples = scrape(StatsPool(distinct_stats("p", waiting=0)))
    assert sample(samples, "safepool_waiting") == 0


def test_prometheus_max_waiters_zero_is_reported_as_zero() -> None:
    """max_waiters=0 is a valid bound (no queue at all): present, 0; only
    None (unbounded) leaves the gauge out."""
    samples = scrape(StatsPool(distinct_stats("p", max_waiters=0)))
    assert sample(samples, "safepool_max_waiters") == 0
    assert ("safepool_max_waiters", frozenset({("pool", "p")})) not in scrape(
        StatsPool(distinct_stats("p", max_waiters=None)))


def test_a_scrape_waits_for_the_pools_loop_the_documented_five_seconds() -> None:
    """docs/metrics.md: a loop that does not answer within 5 seconds fails
    the scrape (and is left out of an OpenTelemetry collection)."""
    assert SNAPSHOT_TIMEOUT == 5.0
    pool = StatsPool(distinct_stats("p"), leak_warning_after=1.0)
    snapshot(cast(Any, pool))
    scrape(pool)
    assert pool.timeouts == [5.0, 5.0]


def test_register_without_a_registry_uses_prometheus_clients_global_one() -> None:
    """register(): default registry, prometheus_client's global REGISTRY."""
    from prometheus_client import REGISTRY

    from safepool.metrics.prometheus import _collector_of

    pool = StatsPool(distinct_stats("s63-global"))
    had = _collector_of(REGISTRY)
    collector = register(cast(Any, pool))
    try:
        assert _collector_of(REGISTRY) is collector
        text = generate_latest(REGISTRY).decode()
        assert 'safepool_max_size{pool="s63-global"} 40.0' in text
    finally:
        if had is None:
            REGISTRY.unregister(collector)
        else:
            collector.remove(cast(Any, pool))


# --------------------------------------------------------- OpenTelemetry


@pytest.fixture
def reader() -> Iterator[tuple[InMemoryMetricReader, MeterProvider]]:
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    yield reader, provider
    provider.shutdown()


def collect(reader: InMemoryMetricReader) -> dict[str, Any]:
    """Instrument name -> its metric (name, unit, data), from one collection."""
    data = reader.get_metrics_data()
    assert data is not None
    return {metric.name: metric for resource in data.resource_metrics for scope in resource.scope_metrics
            for metric in scope.metrics}


def value(metrics: dict[str, Any], name: str, **attributes: str) -> Any:
    attributes = {"db.client.connection.pool.name": "p", **attributes}
    found = [p for p in metrics[name].data.data_points if dict(p.attributes) == attributes]
    assert len(found) == 1, (name, attributes, metrics[name].data.data_points)
    return found[0].value


def instruments(reader: Any, pool: StatsPool, record_times: bool = False) -> PoolInstruments:
    """Instruments on ``pool``, kept alive with them (pools are held weakly)."""
    made = PoolInstruments([cast(Any, pool)], meter_provider=reader[1], record_times=record_times)
    _alive.append(pool)
    return made


_alive: list[StatsPool] = []


@pytest.fixture(autouse=True)
def _release_pools() -> Iterator[None]:
    yield
    _alive.clear()


def test_otel_connection_count_states_per_the_conventions(reader: Any) -> None:
    """db.client.connection.count: idle = idle, used = in_use + resetting
    (open, not available); connecting and closing connections are in neither
    (docs/metrics.md); unit {connection}, an UpDownCounter."""
    instruments(reader, StatsPool(distinct_stats("p")))
    metrics = collect(reader[0])
    state = "db.client.connection.state"
    assert value(metrics, "db.client.connection.count", **{state: "idle"}) == 2
    assert value(metrics, "db.client.connection.count", **{state: "used"}) == 3 + 7
    assert len(metrics["db.client.connection.count"].data.data_points) == 2
    assert metrics["db.client.connection.count"].unit == "{connection}"
    assert metrics["db.client.connection.count"].data.is_monotonic is False


def test_otel_convention_gauges_and_the_timeouts_counter(reader: Any) -> None:
    instruments(reader, StatsPool(distinct_stats("p")))
    metrics = collect(reader[0])
    assert value(metrics, "db.client.connection.pending_requests") == 13
    assert metrics["db.client.connection.pending_requests"].unit == "{request}"
    assert value(metrics, "db.client.connection.max") == 40
    assert value(metrics, "db.client.connection.idle.min") == 17
    assert value(metrics, "db.client.connection.idle.max") == 40
    # The conventions: db.client.connection.timeouts is a Counter (monotonic), unit {timeout}.
    timeouts = metrics["db.client.connection.timeouts"]
    assert value(metrics, "db.client.connection.timeouts") == COUNTS["acquire_timeouts"]
    assert timeouts.unit == "{timeout}" and timeouts.data.is_monotonic is True


def test_otel_safepool_states_sites_counters_and_ages(reader: Any) -> None:
    instruments(reader, StatsPool(distinct_stats("p")))
    metrics = collect(reader[0])
    state = "safepool.connection.state"
    states = {s: value(metrics, "safepool.connection.count", **{state: s})
              for s in ("idle", "in_use", "connecting", "resetting", "closing")}
    assert states == {"idle": 2, "in_use": 3, "connecting": 5, "resetting": 7, "closing": 11}
    assert value(metrics, "safepool.site.connection.count", **{"safepool.site": "app.route"}) == 31
    assert value(metrics, "safepool.site.pending_requests", **{"safepool.site": "app.route"}) == 37
    for field, count in COUNTS.items():
        assert value(metrics, f"safepool.{field}") == count, field
        assert metrics[f"safepool.{field}"].data.is_monotonic is True, field
    assert value(metrics, "safepool.lease.oldest_age") == 4.5
    assert value(metrics, "safepool.wait.oldest_age") == 6.25
    assert metrics["safepool.lease.oldest_age"].unit == "s"
    assert metrics["safepool.wait.oldest_age"].unit == "s"


def test_otel_leak_suspects_zero_is_a_point_when_the_option_is_on(reader: Any) -> None:
    """"absent when leak_warning_after is off": with it on and no lease past
    it, the point is there with 0 (as safepool_leak_suspects)."""
    instruments(reader, StatsPool(distinct_stats("p"), leak_warning_after=3.0, leases=(1.0,)))
    assert value(collect(reader[0]), "safepool.leak_suspects") == 0


def test_otel_connect_failing_without_an_error_type_is_other(reader: Any) -> None:
    """error.type: the class name, or _OTHER when unknown (the module
    docstring, as the conventions' error.type fallback); no SQLSTATE
    attribute when the server sent none."""
    stats = distinct_stats("p", server_status="down", last_connect_error_type=None, last_connect_sqlstate=None)
    instruments(reader, StatsPool(stats))
    assert value(collect(reader[0]), "safepool.connect.failing", **{"error.type": "_OTHER"}) == 1


def test_otel_time_histograms_are_in_seconds_on_the_pools_buckets(reader: Any) -> None:
    pool = StatsPool(distinct_stats("p"))
    instruments(reader, pool, record_times=True)
    for kind, seconds in (("wait", 0.003), ("lease", 0.2), ("connect", 1.5)):
        (sink,) = pool.sinks[kind]
        sink(seconds)
    metrics = collect(reader[0])
    for name, seconds in (("db.client.connection.wait_time", 0.003), ("db.client.connection.use_time", 0.2),
                          ("db.client.connection.create_time", 1.5)):
        assert metrics[name].unit == "s", name
        (point,) = metrics[name].data.data_points
        assert isinstance(point, HistogramDataPoint)
        assert dict(point.attributes or {}) == {"db.client.connection.pool.name": "p"}
        assert (point.count, point.sum) == (1, seconds), name
        assert tuple(point.explicit_bounds) == DEFAULT_BOUNDS


def test_otel_meter_scope_is_safepool_and_its_version(reader: Any) -> None:
    import safepool

    instruments(reader, StatsPool(distinct_stats("p")))
    data = reader[0].get_metrics_data()
    assert data is not None
    scopes = {(scope.scope.name, scope.scope.version) for rm in data.resource_metrics for scope in rm.scope_metrics}
    assert scopes == {("safepool", safepool.__version__)}


def test_otel_record_times_false_hooks_no_timing_sink(reader: Any) -> None:
    """record_times=False: the three histograms are not fed (no per-operation cost)."""
    pool = StatsPool(distinct_stats("p"))
    made = instruments(reader, pool, record_times=False)
    made.add(cast(Any, pool), "renamed")
    collect(reader[0])
    assert pool.sinks == {}


def test_otel_add_all_of_a_pool_reported_under_another_name_keeps_its_histograms_there(reader: Any) -> None:
    """A pool already reported stays as it is: add_all()/instrument() of it
    again is a no-op, so its histograms keep the name its gauges carry."""
    pool = StatsPool(distinct_stats("p"))
    made = instruments(reader, pool, record_times=True)
    made.add(cast(Any, pool), "renamed")
    made.add_all([cast(Any, pool)])
    assert {kind: len(sinks) for kind, sinks in pool.sinks.items()} == {"wait": 1, "lease": 1, "connect": 1}
    pool.sinks["lease"][0](0.2)
    metrics = collect(reader[0])
    (point,) = metrics["db.client.connection.use_time"].data.data_points
    assert dict(point.attributes or {}) == {"db.client.connection.pool.name": "renamed"}
    assert [dict(p.attributes or {}) for p in metrics["db.client.connection.max"].data.data_points] == [
        {"db.client.connection.pool.name": "renamed"}]


def test_otel_instrument_live_true_on_a_later_call_turns_live_mode_on(reader: Any) -> None:
    """instrument(): later calls add their pools, and live=True turns live mode on."""
    from safepool.metrics.otel import instrument

    pool = StatsPool(distinct_stats("p"))
    first = instrument(cast(Any, pool), meter_provider=reader[1])
    assert first.pools.live is False
    assert instrument(live=True, meter_provider=reader[1]) is first
    assert first.pools.live is True
    first.close()
    first.add_all([cast(Any, pool)], live=True)
    assert first.pools.live is True


class BlockedPool(StatsPool):
    def call_threadsafe(self, function: Callable[[], T], timeout: float | None = 5.0) -> T:
        raise TimeoutError(f"{self.name}'s loop did not answer")


def test_otel_the_first_blocked_pools_timeout_is_the_one_raised(reader: Any, caplog: Any) -> None:
    """_snapshots: "the first failure is raised after the others" (the SDK
    logs it); the other pools are still observed."""
    blocked = [BlockedPool(distinct_stats(name)) for name in ("first", "second")]
    fine = StatsPool(distinct_stats("p"))
    made = instruments(reader, blocked[0])
    made.add_all([cast(Any, blocked[1]), cast(Any, fine)])
    _alive.append(blocked[1])
    metrics = collect(reader[0])
    assert value(metrics, "db.client.connection.max") == 40  # the open pool is reported
    raised = [str(r.exc_info[1]) for r in caplog.records if r.exc_info and isinstance(r.exc_info[1], TimeoutError)]
    assert raised == ["first's loop did not answer"]


def named_pool(name: str, acquired: int) -> StatsPool:
    return StatsPool(distinct_stats(name, acquired=acquired))


def test_otel_a_name_continues_the_counts_of_every_pool_it_had(reader: Any) -> None:
    """Three pools in turn under one name: the third continues from the
    first two's counts together (a cumulative counter never falls)."""
    made = instruments(reader, named_pool("p", 5))
    for acquired, expected in ((5, 5), (7, 12), (11, 23)):
        if acquired != 5:
            _alive[-1].closed = True
            pool = named_pool("p", acquired)
            _alive.append(pool)
            made.add(cast(Any, pool))
        assert value(collect(reader[0]), "safepool.acquired") == expected


def cycle(reader: Any, made: PoolInstruments, name: str, acquired: int = 1) -> StatsPool:
    """A pool under ``name``: added, collected, closed (kept referenced)."""
    pool = named_pool(name, acquired)
    _alive.append(pool)
    made.add(cast(Any, pool))
    metrics = collect(reader[0])
    assert value(metrics, "safepool.acquired", **{"db.client.connection.pool.name": name}) >= acquired
    pool.closed = True
    return pool


def acquired_after_recreating(reader: Any, made: PoolInstruments, name: str) -> float:
    pool = named_pool(name, 1000)
    _alive.append(pool)
    made.add(cast(Any, pool))
    return float(value(collect(reader[0]), "safepool.acquired", **{"db.client.connection.pool.name": name}))


def test_otel_names_of_closed_pools_are_forgotten_even_while_referenced(
    reader: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SERIES_LIMIT: past it, the names of closed *or* collected pools are
    forgotten (an application may keep a closed pool referenced)."""
    from safepool.metrics import otel

    monkeypatch.setattr(otel, "SERIES_LIMIT", 4)
    made = PoolInstruments(meter_provider=reader[1], record_times=False)
    for n in range(12):
        cycle(reader, made, f"job-{n}")
    assert len(made._series) <= 4


def test_otel_forgetting_keeps_the_newest_half_of_the_closed_names(
    reader: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Forgotten oldest first, down to half of SERIES_LIMIT: the newest
    closed names keep their counts for a pool re-created under them."""
    from safepool.metrics import otel

    monkeypatch.setattr(otel, "SERIES_LIMIT", 4)
    made = PoolInstruments(meter_provider=reader[1], record_times=False)
    for n in range(5):  # the 5th name makes a pass: job-0 and job-1 go, job-2 and job-3 stay
        cycle(reader, made, f"job-{n}", acquired=10 + n)
    assert acquired_after_recreating(reader, made, "job-3") == 1000 + 13
    assert acquired_after_recreating(reader, made, "job-0") == 1000


def test_otel_the_next_forgetting_pass_waits_for_half_the_limit_more_names(
    reader: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """_forget_series: with the names at the limit all open pools', a pass
    forgets nothing, and the next one comes after half the limit more
    names, not at the next new name: a closed name in between keeps its
    counts until then."""
    from safepool.metrics import otel

    monkeypatch.setattr(otel, "SERIES_LIMIT", 4)
    made = PoolInstruments(meter_provider=reader[1], record_times=False)
    for n in range(4):
        pool = named_pool(f"open-{n}", 1)
        _alive.append(pool)
        made.add(cast(Any, pool))
    collect(reader[0])  # 4 open names: at the limit
    cycle(reader, made, "closed-a", acquired=7)  # a pass (nothing to forget); the next at 6 names
    cycle(reader, made, "closed-b", acquired=8)  # 5 names: no pass yet
    assert acquired_after_recreating(reader, made, "closed-a") == 1000 + 7


# A bug until s63 (fixed): PoolInstruments.add() did not clear the flag close()
# set (add_all() did), so after close() add(pool) hooked the pool's time
# histograms but reported none of its gauges or counters.
def test_otel_add_after_close_reports_the_pool_again(reader: Any) -> None:
    """docs/metrics.md: instrument() calls after close() report again, "and
    instruments.add(pool) does the same"; add() "Report[s] pool". After
    close(), add(pool) must report the pool's gauges and counters as well as
    its histograms, not the histograms alone."""
    first = StatsPool(distinct_stats("p"))
    made = instruments(reader, first, record_times=True)
    made.close()
    assert first.sinks == {"wait": [], "lease": [], "connect": []}
    made.add(cast(Any, first))
    assert {kind: len(sinks) for kind, sinks in first.sinks.items()} == {"wait": 1, "lease": 1, "connect": 1}
    first.sinks["lease"][0](0.2)
    metrics = collect(reader[0])
    (point,) = metrics["db.client.connection.use_time"].data.data_points  # the histogram: reported
    assert point.count == 1
    assert value(metrics, "db.client.connection.max") == 40  # the gauges: not reported
