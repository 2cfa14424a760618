"""Prometheus exporter: a ``prometheus_client`` custom collector.

    from prometheus_client import REGISTRY
    from safepool.metrics.prometheus import PoolCollector

    REGISTRY.register(PoolCollector([pool]))        # or PoolCollector(live=True)

Every metric carries a ``pool`` label (the pool's name). Values are read from
:meth:`safepool.Pool.stats` at scrape time; histograms are the pool's own
fixed-bucket distributions, exported bucket for bucket. Names follow
Prometheus's conventions (prometheus_client adds the suffixes): counters
``safepool_<counter>_total`` (one per :class:`~safepool.PoolStats` counter),
histograms ``safepool_acquire_wait_seconds``,
``safepool_lease_duration_seconds`` and ``safepool_connect_duration_seconds``
(cumulative ``le`` buckets, ``_sum``, ``_count``), gauges for sizes and
states (``safepool_connections{state}``, ``safepool_waiting``, ...). The
exposition is prometheus_client's (its text format, or OpenMetrics when the
scraper asks for it; the version depends on prometheus_client's). See
docs/metrics.md for every metric.
Needs the ``safepool[prometheus]`` extra.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING

try:
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
    from prometheus_client.registry import REGISTRY, CollectorRegistry
    from prometheus_client.utils import floatToGoString as _untyped_float_to_go
except ModuleNotFoundError as _missing:  # pragma: no cover - tested in a subprocess
    raise ModuleNotFoundError(
        "safepool.metrics.prometheus needs prometheus_client: pip install 'safepool[prometheus]'",
        name=_missing.name,
    ) from _missing

from .._histogram import Distribution
from ..errors import PoolTypeError, check_flag
from ..stats import PoolStats
from . import PoolSet, read

if TYPE_CHECKING:
    from ..pool import Pool

__all__ = ["PoolCollector", "register"]

# How prometheus_client renders "le" for its own histograms ("0.005", "1.0").
_le: Callable[[float], str] = _untyped_float_to_go
_Row = tuple[str, PoolStats, int | None]  # name, snapshot, leak suspects

# (PoolStats field, metric name without "_total", help). Every counter of PoolStats.
COUNTERS: tuple[tuple[str, str, str], ...] = (
    ("acquired", "acquired", "Connections handed to application code."),
    ("released", "released", "Leases ended by release (expired, garbage-collected and discarded leases excluded)."),
    ("acquire_timeouts", "acquire_timeouts", "Acquires that gave up waiting (PoolTimeoutError)."),
    ("overload_rejections", "overload_rejections", "Acquires refused at once because the wait queue was full."),
    ("unavailable_rejections", "unavailable_rejections",
     "Acquires refused with ServerUnavailableError (fail_fast): the server unreachable, the circuit open."),
    ("leases_expired", "leases_expired", "Leases taken back after outliving lease_timeout."),
    ("leaks_detected", "leaks_detected", "Leased connections whose proxy was garbage collected unreleased."),
    ("leak_warnings", "leak_warnings", "Leases that were still held after leak_warning_after (warnings logged)."),
    ("connections_opened", "connections_opened", "Server connections opened."),
    ("connections_closed", "connections_closed", "Server connections closed."),
    ("connect_errors", "connect_errors", "Failed connection attempts."),
    ("resets", "resets", "Session resets that succeeded on release."),
    ("resets_skipped", "resets_skipped", "Releases that needed no reset (no statement ran, or none reset_mode resets after)."),
    ("resets_failed", "resets_failed", "Session resets that failed (the connection was closed)."),
    ("shed", "shed", "Acquires the adaptive queue failed after queue_target (PoolOverloadedError)."),
    ("admission_rejections", "admission_rejections",
     "Acquires refused at once: not servable within their timeout at the measured drain rate."),
    ("leases_discarded", "leases_discarded",
     "Leases the pool ended because their connection was lost, or terminate() ended."),
    ("connections_retired", "connections_retired", "Connections closed for reaching max_lifetime."),
)

CONNECTION_STATES = ("idle", "in_use", "connecting", "resetting", "closing")
SERVER_STATUSES = ("up", "backing_off", "down")
# (PoolStats field, metric name without "_seconds", help).
HISTOGRAMS: tuple[tuple[str, str, str], ...] = (
    ("acquire_wait", "safepool_acquire_wait", "Time from acquire() to getting a connection (0 when one was idle)."),
    ("lease_duration", "safepool_lease_duration", "Time from acquire to release, expiry, reclaim or discard of a lease."),
    ("connect_time", "safepool_connect_duration", "Time to open a server connection (successful connects)."),
)


class PoolCollector:
    """Collects every registered pool's statistics at scrape time.

    :param pools: pools to report, each under its ``name`` (add more with
        :meth:`add`, under another name if you like).
    :param live: also report every other open pool of the process.
    """

    def __init__(self, pools: Iterable[Pool] = (), *, live: bool = False) -> None:
        self.pools = PoolSet(pools, live=live)

    def add(self, pool: Pool, name: str | None = None) -> str:
        """Report ``pool`` under ``name`` (default ``pool.name``, or the name
        it is reported under already: a new name replaces the old); returns the name."""
        return self.pools.add(pool, name)

    def remove(self, pool_or_name: Pool | str) -> None:
        """Stop exporting a pool (given by name or object: by name, the pool
        reported under it, live mode included); an unknown one is ignored.
        Its series are gone from the next scrape."""
        self.pools.remove(pool_or_name)

    def describe(self) -> list[Metric]:
        """The metric families, with no samples (prometheus_client's
        collector protocol: the registry checks names for clashes with it)."""
        # The registry checks names for duplicates with this; without it,
        # register() would call collect().
        return list(self._families([]))

    def collect(self) -> Iterator[Metric]:
        """One scrape: every metric family, with a sample per pool (label
        ``pool``) read from its :meth:`safepool.Pool.stats` now
        (prometheus_client's collector protocol).

        :raises safepool.PoolTimeoutError: (a ``TimeoutError``) a pool's
            event loop did not take the snapshot within 5 seconds (it is
            blocked): the scrape fails rather than report half-read numbers."""
        return self._families(self.pools.items())

    def _families(self, pools: list[tuple[str, Pool]]) -> Iterator[Metric]:
        stats: list[_Row] = [(name, *read(pool)) for name, pool in pools]

        connections = GaugeMetricFamily(
            "safepool_connections",
            "Connections counted against max_size, by state (in_use: leased or handed to a waiter).",
            labels=["pool", "state"],
        )
        for name, s, _ in stats:
            for state, value in zip(CONNECTION_STATES, (s.idle, s.in_use, s.connecting, s.resetting, s.closing),
                                    strict=True):
                connections.add_metric([name, state], value)
        yield connections

        yield _gauge("safepool_waiting", "Tasks waiting for a connection.", stats, lambda s: s.waiting)
        # Per acquire site (max_site_share): the 10 busiest sites plus "other".
        site_in_use = GaugeMetricFamily(
            "safepool_site_connections",
            "Connections held by an acquire site (leased or handed to its waiter); top sites plus 'other'.",
            labels=["pool", "site"],
        )
        site_waiting = GaugeMetricFamily(
            "safepool_site_waiting", "Tasks of an acquire site waiting for a connection; top sites plus 'other'.",
            labels=["pool", "site"],
        )
        site_cap = GaugeMetricFamily(
            "safepool_site_cap", "Connections one acquire site may hold (absent when max_site_share is off).",
            labels=["pool"],
        )
        for name, s, _ in stats:
            if s.site_cap is not None:
                site_cap.add_metric([name], s.site_cap)
            for row in s.sites:
                site_in_use.add_metric([name, row.site], row.in_use)
                site_waiting.add_metric([name, row.site], row.waiting)
        yield site_in_use
        yield site_waiting
        yield site_cap
        yield _gauge("safepool_max_size", "The pool's max_size.", stats, lambda s: s.max_size)
        yield _gauge("safepool_min_size", "The pool's min_size.", stats, lambda s: s.min_size)
        max_waiters = GaugeMetricFamily(
            "safepool_max_waiters", "The pool's max_waiters (absent when unbounded).", labels=["pool"]
        )
        for name, s, _ in stats:
            if s.max_waiters is not None:
                max_waiters.add_metric([name], s.max_waiters)
        yield max_waiters

        for field, metric, help_text in HISTOGRAMS:
            family = HistogramMetricFamily(metric, help_text, labels=["pool"], unit="seconds")
            for name, s, _ in stats:
                distribution: Distribution = getattr(s, field)
                family.add_metric([name], _buckets(distribution), distribution.sum)
            yield family

        for field, metric, help_text in COUNTERS:
            counter = CounterMetricFamily(f"safepool_{metric}", help_text, labels=["pool"])
            for name, s, _ in stats:
                counter.add_metric([name], getattr(s, field))
            yield counter

        yield _gauge(
            "safepool_oldest_lease_age_seconds", "Age of the oldest lease held now (0 when none).",
            stats, lambda s: s.oldest_lease_age,
        )
        yield _gauge(
            "safepool_oldest_wait_age_seconds", "How long the first task in the wait queue has waited (0 when none).",
            stats, lambda s: s.oldest_wait_age,
        )
        suspects = GaugeMetricFamily(
            "safepool_leak_suspects",
            "Leases held longer than leak_warning_after now (absent when leak_warning_after is off).",
            labels=["pool"],
        )
        for name, _, count in stats:
            if count is not None:
                suspects.add_metric([name], count)
        yield suspects

        yield _gauge(
            "safepool_server_up",
            "1 while the server status is up (connects succeed, or their failures went stale), 0 while backing off or down.",
            stats, lambda s: 1 if s.server_status == "up" else 0,
        )
        status = GaugeMetricFamily(
            "safepool_server_status", "1 for the pool's current view of the server, 0 for the others.",
            labels=["pool", "status"],
        )
        for name, s, _ in stats:
            for server_status in SERVER_STATUSES:
                status.add_metric([name, server_status], 1 if s.server_status == server_status else 0)
        yield status
        yield _gauge(
            "safepool_consecutive_connect_failures", "Connect attempts that failed since the last success.",
            stats, lambda s: s.consecutive_connect_failures,
        )
        # Info-style: one sample while connects fail, labelled with what the
        # last one got; none while they succeed. The labels are the error's
        # SQLSTATE (5 characters) and class name, never its message.
        connect_failing = GaugeMetricFamily(
            "safepool_connect_failing",
            "1 while connects fail (server status backing off or down), labelled with the last failure's SQLSTATE ('' when the server sent none: "
            "refused, unreachable, a timeout) and error class; no sample while connects succeed.",
            labels=["pool", "sqlstate", "error_type"],
        )
        for name, s, _ in stats:
            if s.server_status != "up":  # (not once the failure view went stale, nor in init=)
                connect_failing.add_metric(
                    [name, s.last_connect_sqlstate or "", s.last_connect_error_type or ""], 1
                )
        yield connect_failing
        yield _gauge(
            "safepool_init_failing",
            "1 while new connections fail in the init= hook with the server up (an application error), else 0.",
            stats, lambda s: 1 if s.init_failing else 0,
        )


def _gauge(name: str, help_text: str, stats: list[_Row], value: Callable[[PoolStats], float]) -> Metric:
    family = GaugeMetricFamily(name, help_text, labels=["pool"])
    for pool_name, s, _ in stats:
        family.add_metric([pool_name], value(s))
    return family


def _buckets(distribution: Distribution) -> list[tuple[str, float]]:
    """Cumulative (le, count) pairs; the pool's bucket i holds values <= bounds[i]."""
    buckets: list[tuple[str, float]] = []
    total = 0
    for bound, count in zip(distribution.bounds, distribution.bucket_counts, strict=False):
        total += count
        buckets.append((_le(bound), total))
    buckets.append(("+Inf", total + distribution.bucket_counts[-1]))
    return buckets


def register(
    *pools: Pool, live: bool = False, registry: CollectorRegistry | None = None
) -> PoolCollector:
    """Report ``pools`` (and every open pool with ``live=True``) on
    ``registry`` (default: prometheus_client's global one), and return the
    registry's :class:`PoolCollector`.

    One collector per registry: the first call registers it, later calls
    add their pools to it (``live=True`` turns live mode on), so
    ``register(orders)`` then ``register(reports)`` report both. A collector
    registered directly (``registry.register(PoolCollector(...))``) is used
    the same way. A pool already reported stays as it is: registering it
    again is a no-op.

    :raises TypeError: ``registry`` is not a registry, a pool not a safepool pool, or ``live`` not a bool.
    :raises ValueError: another open pool is already reported under the
        pool's name (the message names it; give the pools distinct names,
        or add one with ``collector.add(pool, "other-name")``); then none
        of ``pools`` is added."""
    check_flag("live", live)
    target = REGISTRY if registry is None else registry
    if not callable(getattr(target, "register", None)):
        raise PoolTypeError(f"registry must be a prometheus_client CollectorRegistry, got {type(target).__name__}")
    collector = _collector_of(target)
    if collector is None:
        collector = PoolCollector(pools, live=live)  # (a name clash raises before registering)
        target.register(collector)
        _made[target] = collector
        return collector
    collector.pools.add_all(pools)  # (all or none: a name clash adds no pool)
    if live:
        collector.pools.live = True
    return collector


# The collectors register() made, per registry: used when a registry does
# not list its collectors (see _collector_of).
_made: weakref.WeakKeyDictionary[CollectorRegistry, PoolCollector] = weakref.WeakKeyDictionary()


def _collector_of(registry: CollectorRegistry) -> PoolCollector | None:
    """The PoolCollector registered on ``registry`` now, if any (there is at
    most one: a second one's names would collide)."""
    # prometheus_client has no public list of a registry's collectors; its
    # _collector_to_names (0.20 to 0.26 at least) is that list, and also
    # shows a collector that was unregistered since, or registered directly.
    collectors = getattr(registry, "_collector_to_names", None)
    if isinstance(collectors, dict):
        return next((c for c in list(collectors) if isinstance(c, PoolCollector)), None)
    return _made.get(registry)
