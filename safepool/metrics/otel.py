"""OpenTelemetry metrics for safepool pools, on ``opentelemetry-api`` only.

    from safepool.metrics.otel import instrument

    instrument(pool)                    # the global MeterProvider, or meter_provider=...

Follows the OpenTelemetry semantic conventions for database client
connection pools (docs/db/database-metrics.md, "Development" status), as
named since semantic conventions v1.27.0 (v1.26.0 renamed the metrics to
``db.client.connection.*``, v1.27.0 the attributes to
``db.client.connection.pool.name`` and ``db.client.connection.state``;
before, ``db.client.connections.*`` and ``pool.name``), unchanged up to
v1.44.0: ``db.client.connection.count`` (state ``idle`` / ``used``),
``.idle.max``, ``.idle.min``, ``.max``, ``.pending_requests``,
``.timeouts``, and the histograms ``.create_time``, ``.wait_time`` and
``.use_time`` in seconds (unit ``s``). ``safepool.connect.failing`` carries
``db.response.status_code`` (the SQLSTATE; added in v1.28.0) and
``error.type`` (the error's class name, ``_OTHER`` when unknown). The
``safepool.*`` instruments cover what the conventions do not.

Design note. Gauges and counters are observable instruments whose callbacks
read :meth:`safepool.Pool.stats` when the reader collects: no cost between
collections. Histograms cannot work that way: the API has no asynchronous
histogram, and a histogram point (buckets, sum, min, max) can only be built
from recorded values; exporting p50/p99 as gauges instead would be wrong as
soon as anything aggregates them (a mean of percentiles is not a percentile).
So ``wait_time``, ``use_time`` and ``create_time`` are synchronous histograms
fed with every value the pool records in its own distributions, through the
pool's public timing sinks (:meth:`safepool.Pool.add_timing_sink`). That costs one
``Histogram.record`` per acquire and per release while instrumented (see
docs/metrics.md for the measured figure), and nothing otherwise. The bucket
boundaries advised to the SDK are the pool's own, so OpenTelemetry and
Prometheus report the same buckets. Needs the ``safepool[otel]`` extra.
"""

from __future__ import annotations

import dataclasses
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

try:
    from opentelemetry import metrics
    from opentelemetry.metrics import CallbackOptions, Meter, MeterProvider, Observation
except ModuleNotFoundError as _missing:  # pragma: no cover - tested in a subprocess
    raise ModuleNotFoundError(
        "safepool.metrics.otel needs the OpenTelemetry API: pip install 'safepool[otel]'", name=_missing.name
    ) from _missing

from .. import __version__
from .._histogram import DEFAULT_BOUNDS
from ..errors import PoolTypeError, PoolValueError, check_flag
from ..events import PoolClosed, PoolEvent
from ..stats import PoolStats
from . import PoolSet, pool_list, read

if TYPE_CHECKING:
    from ..pool import Pool

__all__ = ["PoolInstruments", "instrument"]

POOL_NAME = "db.client.connection.pool.name"
STATE = "db.client.connection.state"
SAFEPOOL_STATE = "safepool.connection.state"
SITE = "safepool.site"
RESPONSE_STATUS_CODE = "db.response.status_code"
ERROR_TYPE = "error.type"

# (PoolStats counter, instrument name, unit, description): every counter of PoolStats.
COUNTERS: tuple[tuple[str, str, str, str], ...] = (
    ("acquired", "safepool.acquired", "{acquire}", "Connections handed to application code."),
    ("released", "safepool.released", "{release}", "Leases ended by release."),
    ("acquire_timeouts", "safepool.acquire_timeouts", "{timeout}", "Acquires that gave up waiting."),
    ("overload_rejections", "safepool.overload_rejections", "{acquire}",
     "Acquires refused at once because the wait queue was full."),
    ("unavailable_rejections", "safepool.unavailable_rejections", "{acquire}",
     "Acquires refused with ServerUnavailableError (fail_fast) while the server was unreachable."),
    ("leases_expired", "safepool.leases_expired", "{lease}", "Leases taken back after outliving lease_timeout."),
    ("leaks_detected", "safepool.leaks_detected", "{lease}", "Leased connections garbage collected unreleased."),
    ("leak_warnings", "safepool.leak_warnings", "{lease}", "Leases still held after leak_warning_after."),
    ("connections_opened", "safepool.connections_opened", "{connection}", "Server connections opened."),
    ("connections_closed", "safepool.connections_closed", "{connection}", "Server connections closed."),
    ("connect_errors", "safepool.connect_errors", "{error}", "Failed connection attempts."),
    ("resets", "safepool.resets", "{reset}", "Session resets that succeeded."),
    ("resets_skipped", "safepool.resets_skipped", "{reset}", "Releases that needed no reset."),
    ("resets_failed", "safepool.resets_failed", "{reset}", "Session resets that failed."),
    ("shed", "safepool.shed", "{acquire}", "Acquires the adaptive queue failed after queue_target."),
    ("admission_rejections", "safepool.admission_rejections", "{acquire}",
     "Acquires refused at once: not servable within their timeout at the measured drain rate."),
    ("leases_discarded", "safepool.leases_discarded", "{lease}",
     "Leases the pool ended because their connection was lost, or terminate() ended."),
    ("connections_retired", "safepool.connections_retired", "{connection}",
     "Connections closed for reaching max_lifetime."),
)

# (the pool's timing sink kind, instrument name, description)
HISTOGRAMS: tuple[tuple[str, str, str], ...] = (
    ("wait", "db.client.connection.wait_time", "The time it took to obtain an open connection from the pool."),
    ("lease", "db.client.connection.use_time",
     "The time between borrowing a connection and returning it to the pool."),
    ("connect", "db.client.connection.create_time", "The time it took to create a new connection."),
)
# The callbacks of one collection read each pool once: the first callback
# the SDK runs (the first instrument created) takes a fresh snapshot, the
# others reuse it if it is younger than this (seconds).
_SNAPSHOT_REUSE = 1.0
# Names whose counts PoolInstruments keeps for a pool re-created under them
# (see _continued): beyond this many, the names of closed or collected pools
# are forgotten, oldest first. The SDK's own limit (2,000 attribute sets per
# instrument, opentelemetry-sdk 1.45) folds further names into overflow.
SERIES_LIMIT = 2000


class PoolInstruments:
    """The OpenTelemetry instruments for a set of pools (one per meter).

    :param pools: pools to report, each under its ``name``.
    :param live: also report every other open pool of the process (their
        histograms start recording when a collection first sees them).
    :param meter_provider: default: the global one.
    :param record_times: feed the wait/use/create time histograms (the only
        instruments with a per-operation cost).
    """

    def __init__(
        self,
        pools: Iterable[Pool] = (),
        *,
        live: bool = False,
        meter_provider: MeterProvider | None = None,
        record_times: bool = True,
    ) -> None:
        self.pools = PoolSet(live=live)
        self._record_times = record_times
        self._closed = False
        # Held weakly: instrumenting a pool must not keep it alive.
        # Per hooked pool: the name its histograms' attributes carry, and its sinks.
        self._sinks: weakref.WeakKeyDictionary[Pool, tuple[str, list[tuple[str, Callable[[float], None]]]]] = (
            weakref.WeakKeyDictionary()
        )
        self._recent: weakref.WeakKeyDictionary[Pool, tuple[float, PoolStats | None, int | None]] = (
            weakref.WeakKeyDictionary()
        )
        # Per name reported: the pool last reported under it, its counters
        # then, and the counts of the pools it took the name over from (see _continued).
        self._series: dict[str, _Series] = {}
        self._forget_at = 0  # (the size of _series at which _forget_series runs again, past SERIES_LIMIT)
        provider = meter_provider if meter_provider is not None else metrics.get_meter_provider()
        meter = provider.get_meter("safepool", __version__)
        self._create_instruments(meter)
        self.add_all(pools)

    # ------------------------------------------------------------ pools

    def add(self, pool: Pool, name: str | None = None) -> str:
        """Report ``pool`` under ``name`` (default ``pool.name``, or the name
        it is reported under already: a new name replaces the old); returns
        the name. Reports again after :meth:`close`, as :meth:`add_all`."""
        name = self.pools.add(pool, name)
        self._closed = False  # (after the add: a name clash leaves a closed set closed)
        self._attach(pool, name)  # (moves its histograms to a new name)
        return name

    def add_all(self, pools: Iterable[Pool], *, live: bool = False) -> None:
        """Report each of ``pools`` under its name, or none of them on a name
        clash (``live=True`` turns live mode on); reports again after :meth:`close`.

        :raises ValueError: as :meth:`add`, for the first pool that clashes.
        :raises safepool.PoolTypeError: ``live`` is not a bool."""
        check_flag("live", live)
        pools = pool_list(pools)
        self._closed = False
        self.pools.add_all(pools)
        for pool in pools:
            self._attach(pool, self.pools.name_of(pool) or pool.name)
        if live:
            self.pools.live = True

    @property
    def record_times(self) -> bool:
        """Whether the wait/use/create time histograms are fed."""
        return self._record_times

    def remove(self, pool_or_name: Pool | str) -> None:
        """Stop reporting a pool (given by name or object: by name, the pool
        reported under it, live mode included) and unhook its histograms; an
        unknown one is ignored."""
        for pool in self.pools.remove(pool_or_name):
            self._detach(pool)

    def close(self) -> None:
        """Unhook every pool. The observable instruments stay registered with
        the meter (the API cannot remove them) but report nothing more."""
        self._closed = True
        for pool in list(self._sinks.keys()):
            self._detach(pool)
        self.pools = PoolSet()

    def _items(self) -> list[tuple[str, Pool]]:
        if self._closed:
            return []
        items = self.pools.items()
        if self._record_times:
            for name, pool in items:
                # A live pool seen for the first time, or one whose reported
                # name changed (it took over the bare name of a closed
                # namesake, see PoolSet.items): its histograms follow it.
                hooked = self._sinks.get(pool)
                if hooked is None or hooked[0] != name:
                    self._attach(pool, name)
        return items

    def _attach(self, pool: Pool, name: str) -> None:
        """Hook ``pool``'s time histograms under ``name``; hooked under
        another name already, it is unhooked from that one first."""
        if not self._record_times:
            return
        hooked = self._sinks.get(pool)
        if hooked is not None:
            if hooked[0] == name:
                return
            self._detach(pool)  # (its histograms' attributes name the old name)
        attributes = {POOL_NAME: name}
        hooks: list[tuple[str, Callable[[float], None]]] = []
        self._sinks[pool] = (name, hooks)
        for kind, instrument in zip((h[0] for h in HISTOGRAMS), self._histograms, strict=True):

            def sink(value: float, instrument: metrics.Histogram = instrument) -> None:
                instrument.record(value, attributes)

            hooks.append((kind, sink))
            pool.add_timing_sink(kind, sink)

    def _detach(self, pool: Pool) -> None:
        hooked = self._sinks.pop(pool, None)
        self._recent.pop(pool, None)
        if hooked is None:
            return
        for kind, sink in hooked[1]:
            pool.remove_timing_sink(kind, sink)

    def _read(self, pool: Pool, fresh: bool = False) -> tuple[PoolStats, int | None] | None:
        """The pool's stats and leak suspects, taken on its loop once per
        collection (the instruments' callbacks run one after the other).
        None: this collection's read of the pool failed already (its loop
        did not answer), so the pool is skipped rather than waited for again.

        :raises TimeoutError: the first read of a collection failed (the SDK
            logs it once; the other pools are still reported)."""
        now = time.monotonic()
        recent = self._recent.get(pool)
        if not fresh and recent is not None and now - recent[0] < _SNAPSHOT_REUSE:
            return None if recent[1] is None else (recent[1], recent[2])
        try:
            stats, suspects = read(pool)
        except Exception:
            # Timed from the failure: a blocked loop costs one timeout per
            # collection, not one per instrument (SNAPSHOT_TIMEOUT each,
            # beyond the reader's own collection timeout).
            self._recent[pool] = (time.monotonic(), None, None)
            raise
        self._recent[pool] = (now, stats, suspects)
        return stats, suspects

    def _snapshots(self, fresh: bool = False) -> Iterator[tuple[str, PoolStats, int | None]]:
        """(name, stats, leak suspects) of every pool this collection could
        read; a pool whose read failed is left out and the first failure is
        raised after the others (the SDK logs a callback's exception)."""
        failure: Exception | None = None
        for name, pool in self._items():
            try:
                found = self._read(pool, fresh)
            except Exception as exc:
                failure = failure or exc
                continue
            if found is not None:
                yield name, self._continued(name, pool, found[0]), found[1]
        if failure is not None:
            raise failure

    def _continued(self, name: str, pool: Pool, stats: PoolStats) -> PoolStats:
        """``stats`` with the counts of the pools that had ``name`` before
        added to its counters. A cumulative counter must not fall within a
        series (its start time stays the first pool's, and a delta reader
        would export a negative increase), yet an application that
        re-creates its pool under the same name keeps its series."""
        series = self._series.get(name)
        if series is None or series.pool() is not pool:
            carried = dict.fromkeys(_COUNTER_FIELDS, 0)
            if series is not None:
                last = series.final_counts()
                carried = {field: series.carried[field] + last[field] for field in _COUNTER_FIELDS}
            if name not in self._series and len(self._series) >= max(SERIES_LIMIT, self._forget_at):
                self._forget_series()
            series = self._series[name] = _Series(pool, carried)
        series.last = _counts(stats)
        if not any(series.carried.values()):
            return stats
        totals: dict[str, Any] = {field: value + series.carried[field] for field, value in series.last.items()}
        return dataclasses.replace(stats, **totals)

    def _forget_series(self) -> None:
        """Make room in ``_series``: forget the oldest names whose pool is
        closed or collected, down to half of SERIES_LIMIT; the next pass
        comes after half the limit more names (not one per new name, when
        most names are open pools'). A pool later re-created under a
        forgotten name starts its counters at 0 (docs/metrics.md)."""
        keep = SERIES_LIMIT // 2
        for name in list(self._series):
            if len(self._series) <= keep:
                break
            pool = self._series[name].pool()
            if pool is None or pool.closed:
                del self._series[name]
        # (Open pools' names are kept: with many open, the next pass waits
        # for half the limit more names, not one pass per new name.)
        self._forget_at = len(self._series) + keep

    # ------------------------------------------------------- instruments

    def _create_instruments(self, meter: Meter) -> None:
        conn = "{connection}"
        meter.create_observable_up_down_counter(
            "db.client.connection.count", [self._observe_count], conn,
            "The number of connections that are currently in state described by the state attribute.",
        )
        meter.create_observable_up_down_counter(
            "db.client.connection.idle.max", [self._per_pool(lambda s: s.max_size)], conn,
            "The maximum number of idle open connections allowed.",
        )
        meter.create_observable_up_down_counter(
            "db.client.connection.idle.min", [self._per_pool(lambda s: s.min_size)], conn,
            "The minimum number of idle open connections allowed.",
        )
        meter.create_observable_up_down_counter(
            "db.client.connection.max", [self._per_pool(lambda s: s.max_size)], conn,
            "The maximum number of open connections allowed.",
        )
        meter.create_observable_up_down_counter(
            "db.client.connection.pending_requests", [self._per_pool(lambda s: s.waiting)], "{request}",
            "The number of current pending requests for an open connection.",
        )
        meter.create_observable_counter(
            "db.client.connection.timeouts", [self._per_pool(lambda s: s.acquire_timeouts)], "{timeout}",
            "The number of connection timeouts that have occurred trying to obtain a connection from the pool.",
        )
        self._histograms = [
            meter.create_histogram(
                name, "s", description, explicit_bucket_boundaries_advisory=DEFAULT_BOUNDS
            )
            for _, name, description in HISTOGRAMS
        ]
        # safepool's own, beyond the conventions.
        meter.create_observable_up_down_counter(
            "safepool.connection.count", [self._observe_states], conn,
            "Connections counted against max_size, by safepool's state "
            "(idle, in_use, connecting, resetting, closing).",
        )
        for field, name, unit, description in COUNTERS:
            meter.create_observable_counter(
                name, [self._per_pool(_field(field))], unit, description
            )
        meter.create_observable_up_down_counter(
            "safepool.site.connection.count", [self._observe_sites(in_use=True)], conn,
            "Connections held by an acquire site (max_site_share); the 10 busiest sites plus 'other'.",
        )
        meter.create_observable_up_down_counter(
            "safepool.site.pending_requests", [self._observe_sites(in_use=False)], "{request}",
            "Tasks of an acquire site waiting for a connection; the 10 busiest sites plus 'other'.",
        )
        meter.create_observable_gauge(
            "safepool.lease.oldest_age", [self._per_pool(lambda s: s.oldest_lease_age)], "s",
            "Age of the oldest lease held now (0 when none).",
        )
        meter.create_observable_gauge(
            "safepool.wait.oldest_age", [self._per_pool(lambda s: s.oldest_wait_age)], "s",
            "How long the first task in the wait queue has waited (0 when none).",
        )
        meter.create_observable_up_down_counter(
            "safepool.leak_suspects", [self._observe_leak_suspects], "{lease}",
            "Leases held longer than leak_warning_after now (absent when that option is off).",
        )
        meter.create_observable_gauge(
            "safepool.server.up", [self._per_pool(lambda s: 1 if s.server_status == "up" else 0)], "1",
            "1 while the server status is up (connects succeed, or their failures went stale), 0 while backing off or down.",
        )
        meter.create_observable_gauge(
            "safepool.connect.failing", [self._observe_connect_failing], "1",
            "1 while connects fail (server status backing off or down), with the last failure's SQLSTATE (db.response.status_code, when the "
            "server sent one) and error class (error.type); no point while connects succeed.",
        )
        meter.create_observable_gauge(
            "safepool.init.failing", [self._per_pool(lambda s: 1 if s.init_failing else 0)], "1",
            "1 while new connections fail in the init= hook with the server up (an application error), else 0.",
        )

    def _per_pool(self, value: Callable[[PoolStats], float]) -> Callable[[CallbackOptions], Iterator[Observation]]:
        def callback(options: CallbackOptions) -> Iterator[Observation]:
            for name, stats, _ in self._snapshots():
                yield Observation(value(stats), {POOL_NAME: name})

        return callback

    def _observe_count(self, options: CallbackOptions) -> Iterator[Observation]:
        # The conventions know two states. "used" is every open connection
        # that cannot be handed out now: leased, granted to a waiter, or
        # being reset. Connections still opening or already closing are in
        # neither (safepool.connection.count has them).
        for name, s, _ in self._snapshots(fresh=True):  # the first instrument: a new collection
            yield Observation(s.idle, {POOL_NAME: name, STATE: "idle"})
            yield Observation(s.in_use + s.resetting, {POOL_NAME: name, STATE: "used"})

    def _observe_states(self, options: CallbackOptions) -> Iterator[Observation]:
        for name, s, _ in self._snapshots():
            for state, value in (("idle", s.idle), ("in_use", s.in_use), ("connecting", s.connecting),
                                 ("resetting", s.resetting), ("closing", s.closing)):
                yield Observation(value, {POOL_NAME: name, SAFEPOOL_STATE: state})

    def _observe_sites(self, *, in_use: bool) -> Callable[[CallbackOptions], Iterator[Observation]]:
        def callback(options: CallbackOptions) -> Iterator[Observation]:
            for name, stats, _ in self._snapshots():
                for row in stats.sites:
                    yield Observation(row.in_use if in_use else row.waiting, {POOL_NAME: name, SITE: row.site})

        return callback

    def _observe_connect_failing(self, options: CallbackOptions) -> Iterator[Observation]:
        # The database conventions' attributes for a failed operation:
        # db.response.status_code (the SQLSTATE, when the server sent one)
        # and error.type (the exception's class name, which the conventions
        # allow in place of the status code; more telling: it also names
        # the failures without one).
        for name, s, _ in self._snapshots():
            if s.server_status == "up":  # (also once the failure view went stale, and in init=)
                continue
            attributes = {POOL_NAME: name, ERROR_TYPE: s.last_connect_error_type or "_OTHER"}
            if s.last_connect_sqlstate is not None:
                attributes[RESPONSE_STATUS_CODE] = s.last_connect_sqlstate
            yield Observation(1, attributes)

    def _observe_leak_suspects(self, options: CallbackOptions) -> Iterator[Observation]:
        for name, _, count in self._snapshots():
            if count is not None:
                yield Observation(count, {POOL_NAME: name})


# Every PoolStats counter an observable counter reports.
_COUNTER_FIELDS = tuple(field for field, _, _, _ in COUNTERS)


def _counts(stats: PoolStats) -> dict[str, int]:
    counts: dict[str, int] = {field: getattr(stats, field) for field in _COUNTER_FIELDS}
    return counts


class _Series:
    """What one reported name has counted (see PoolInstruments._continued):
    the counts of the pools that had the name before (``carried``), the
    current pool's as last collected (``last``), and, once that pool
    closed, the counts it ended with (``final``, from its ``pool_closed``
    event)."""

    __slots__ = ("pool", "carried", "last", "final")

    def __init__(self, pool: Pool, carried: dict[str, int]) -> None:
        self.pool = weakref.ref(pool)
        self.carried = carried
        self.last: dict[str, int] = {}
        self.final: dict[str, int] | None = None
        # The usual re-creation (`await pool.close(); pool = await
        # create_pool(..., name=...)`) drops the old pool before the next
        # collection: the counts it ended with come with its pool_closed
        # event (review h271), on its loop's thread (one dict stored).
        pool.add_event_listener(self._closed)

    def _closed(self, event: PoolEvent) -> None:
        if isinstance(event, PoolClosed):
            self.final = _counts(event.stats)

    def final_counts(self) -> dict[str, int]:
        """The counts the pool ended with (it closed), or while it still
        runs (moved to another name) its counts now; the counts last
        collected when its loop does not answer, or it was collected
        unclosed."""
        if self.final is not None:
            return self.final  # (closed: its counts no longer move)
        pool = self.pool()
        if pool is None:
            return self.last  # (collected unclosed: as last collected)
        try:
            # (On a closed or stopped loop, read() reads the pool directly.)
            return _counts(read(pool)[0])
        except Exception:
            return self.last


def _field(name: str) -> Callable[[PoolStats], float]:
    def value(stats: PoolStats) -> float:
        value: float = getattr(stats, name)  # an int counter
        return value

    return value


def instrument(
    *pools: Pool, live: bool = False, meter_provider: MeterProvider | None = None, record_times: bool = True
) -> PoolInstruments:
    """Report ``pools`` (and every open pool with ``live=True``) on
    ``meter_provider`` (default: the global one), and return its
    :class:`PoolInstruments`.

    One per meter provider, as :func:`safepool.metrics.prometheus.register`
    keeps one collector per registry: the first call creates the
    instruments, later calls add their pools to them (``live=True`` turns
    live mode on; after :meth:`PoolInstruments.close`, they report again).
    A second set of instruments would not work: the SDK hands back the
    instruments of the first (same names) without the new callbacks.

    :raises ValueError: as :meth:`PoolInstruments.add` (then none of
        ``pools`` is added), or ``record_times`` differs from the first call's.
    :raises TypeError: ``meter_provider`` is not a meter provider, a pool
        not a safepool pool, or ``live`` not a bool."""
    check_flag("live", live)
    provider = meter_provider if meter_provider is not None else metrics.get_meter_provider()
    if not callable(getattr(provider, "get_meter", None)):
        raise PoolTypeError(f"meter_provider must be an OpenTelemetry MeterProvider, got {type(provider).__name__}")
    instruments = _made.get(provider)
    if instruments is None:
        instruments = _handed_over_to(provider)
    if instruments is None:
        instruments = PoolInstruments(pools, live=live, meter_provider=provider, record_times=record_times)
        _made[provider] = instruments
        return instruments
    if record_times != instruments.record_times:
        raise PoolValueError(
            f"instrument() was called on this meter provider with record_times={instruments.record_times}: "
            "its instruments exist already"
        )
    instruments.add_all(pools, live=live)
    return instruments


# The instruments instrument() made, per meter provider.
_made: weakref.WeakKeyDictionary[MeterProvider, PoolInstruments] = weakref.WeakKeyDictionary()


def _handed_over_to(provider: MeterProvider) -> PoolInstruments | None:
    """The instruments made on the API's proxy provider (``instrument()``
    before ``set_meter_provider()``) if that proxy now hands over to
    ``provider``: it created them there, callbacks included, so a second set
    would have its callbacks dropped and its timing sinks record every value
    twice. Only the global provider is handed over to; the proxy then
    forwards ``get_meter`` to it, and the SDK keeps one meter per scope."""
    if provider is not metrics.get_meter_provider():
        return None
    for earlier, instruments in list(_made.items()):
        if earlier is not provider and earlier.get_meter("safepool", __version__) is provider.get_meter(
            "safepool", __version__
        ):
            _made[provider] = instruments
            return instruments
    return None
