"""Readiness checks: ``await pool.health()`` says ok, degraded or failing, and why.

``failing`` means the pool cannot serve queries now (closed, the server is
down, or the probe query failed or hung once it had a connection): a
readiness endpoint answers 503 so the load balancer stops sending traffic.
``degraded`` means it serves, but an operator should look (saturated, leak
suspects, connect errors, the probe got no connection in time): keep the
instance in rotation, since taking busy instances out only moves their load
to the others. docs/metrics.md lists every reason.
"""

from __future__ import annotations

import asyncio
import time
import weakref
from collections import deque
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

import asyncpg

from ._durations import validate_timeout
from ._histogram import Distribution
from .errors import PoolClosedError, PoolOverloadedError, PoolTypeError, check_flag, check_is_pool
from .stats import PoolStats

if TYPE_CHECKING:
    from .pool import Pool

__all__ = ["HealthReason", "HealthReport", "check_health"]

OK, DEGRADED, FAILING = "ok", "degraded", "failing"
_RANK = {OK: 0, DEGRADED: 1, FAILING: 2}


@dataclass(frozen=True, slots=True)
class HealthReason:
    """One finding: ``code`` is stable (alert on it), ``message`` is for people."""

    code: str  # closed, server_down, connect_rejected, connect_misconfigured, pooler_busy, server_full, server_backing_off, init_failed, connect_errors, saturated,
    # leak_suspects, probe_no_connection, probe_timeout, probe_failed
    status: str  # what this finding alone makes the pool: "degraded" or "failing"
    message: str


@dataclass(frozen=True, slots=True)
class HealthReport:
    """The outcome of :func:`check_health`: ``status``, the
    :class:`HealthReason` findings (empty when ``ok``), the pool's
    :class:`~safepool.PoolStats` and the probe's latency in seconds."""

    status: str  # "ok", "degraded" or "failing": the worst of the reasons
    reasons: tuple[HealthReason, ...]
    stats: PoolStats  # taken after the probe
    probe_latency: float | None  # seconds for the probe query, acquire included; None if skipped or failed

    @property
    def ready(self) -> bool:
        """What a readiness endpoint answers: True unless failing."""
        return self.status != FAILING

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: a dict with ``status``, ``pool`` (the pool's name),
        ``reasons`` (a list of dicts with ``code``, ``status`` and
        ``message``), ``probe_latency`` (seconds or None) and ``stats`` (every
        :class:`~safepool.PoolStats` field by name; each distribution as
        ``count``, ``sum``, ``p50``, ``p90``, ``p99`` and ``max``, without
        its buckets; ``sites`` as a list of dicts with ``site``, ``in_use``
        and ``waiting``)."""
        stats: dict[str, Any] = {}
        for field in fields(self.stats):
            value = getattr(self.stats, field.name)
            if isinstance(value, Distribution):
                value = {key: getattr(value, key) for key in ("count", "sum", "p50", "p90", "p99", "max")}
            elif field.name == "sites":
                value = [{"site": row.site, "in_use": row.in_use, "waiting": row.waiting} for row in value]
            stats[field.name] = value
        return {
            "status": self.status,
            "pool": self.stats.name,
            "reasons": [{"code": r.code, "status": r.status, "message": r.message} for r in self.reasons],
            "probe_latency": self.probe_latency,
            "stats": stats,
        }


# Per pool, the connect error counter as its checks saw it (_History): the
# connect error rate is the counter's growth since the window's start.
_history: weakref.WeakKeyDictionary[Pool, _History] = weakref.WeakKeyDictionary()


PROBE_SITE = "safepool.health"
"""The acquire site of the health probe's lease (``leases()``, per-site stats)."""


async def check_health(
    pool: Pool,
    *,
    probe: bool = True,
    probe_timeout: float = 1.0,
    probe_query: str = "SELECT 1",
    saturated_after: float = 5.0,
    leak_suspect_after: float | None = None,
    connect_error_window: float = 60.0,
) -> HealthReport:
    """Check ``pool`` and say whether it can serve: a :class:`HealthReport`
    (durations below in seconds).

    :param probe: run ``probe_query`` through the pool (acquire included),
        on a lease of its own acquire site (``PROBE_SITE``): a bulkhead
        (``max_site_share``) never counts it against the caller's site. A
        query that fails because its connection was lost under it (an idle
        connection whose backend was terminated before the loop read it) is
        run again on the connection the pool hands out next, up to
        ``max_size + 1`` attempts within ``probe_timeout``: only a failure on
        a connection that stays open, or on the last attempt, reports
        ``probe_failed``.
    :param probe_timeout: seconds for the whole probe, acquire and query
        (default 1.0; a query that outruns it is cancelled and its connection released
        within up to as long again: the check answers within twice this).
    :param saturated_after: degraded when a task has waited longer than
        this many seconds for a connection (default 5.0).
    :param leak_suspect_after: degraded when a lease has been held this
        many seconds or longer (default: the pool's ``leak_warning_after``;
        None there too: no check).
    :param connect_error_window: degraded when connects failed within this
        many seconds (default 60.0; measured between successive checks of
        the same pool; a pool's first check, or one more than twice this after the last,
        only sees the current run of failures, if its last failed within
        this many seconds).
    :raises TypeError: ``pool`` is not a safepool pool (an asyncpg pool), or an option of the wrong type (a duration that is not
        an int or a float, ``probe`` not a bool, ``probe_query`` not a str).
    :raises ValueError: a duration out of range: NaN or negative;
        ``probe_timeout`` and ``connect_error_window`` must be > 0.

    The probe's own errors (a timeout, a refusal, the query's error) are
    reasons in the report, never raised.
    """
    # Checked at the call, as create_pool()'s options: a wrong option must
    # not read as an outage (a probe_timeout of -1 failed every probe, one
    # of 0 also closed a connection per check).
    check_is_pool(pool, "check_health()")
    check_flag("probe", probe)
    probe_timeout = validate_timeout("probe_timeout", probe_timeout, allow_none=False, positive=True)
    if not isinstance(probe_query, str):
        raise PoolTypeError(f"probe_query must be a str, got {type(probe_query).__name__}")
    saturated_after = validate_timeout("saturated_after", saturated_after, allow_none=False)
    leak_suspect_after = validate_timeout("leak_suspect_after", leak_suspect_after)
    connect_error_window = validate_timeout(
        "connect_error_window", connect_error_window, allow_none=False, positive=True,
    )
    reasons: list[HealthReason] = []
    latency: float | None = None
    if pool.closed or pool.is_closing():
        # (closed: also once the pool's event loop closed without close())
        reasons.append(HealthReason("closed", FAILING, f"pool {pool.name!r} is closed or closing"))
    elif probe:
        latency = await _probe(pool, probe_timeout, probe_query, reasons)

    stats = pool.stats()
    now = stats.taken_at
    # Open connections that serve (a closing one will not come back).
    serving = stats.size - stats.connecting - stats.closing
    # A configuration error, or a server with no slot left, fails the pool
    # with nothing left to serve from; with connections still open it degrades.
    failing_if_down = FAILING if stats.server_status == "down" else DEGRADED
    if stats.init_failing:
        # The server answers; the application's hook fails: not an outage of
        # the server, but the pool cannot serve if it has nothing left.
        reasons.append(HealthReason(
            "init_failed", DEGRADED if serving else FAILING,
            f"the init hook failed on new connections ({stats.consecutive_connect_failures} in a row; "
            f"the server accepts connections); {serving} connections open",
        ))
    elif stats.server_status in ("down", "backing_off") and _login_rejected(stats.last_connect_sqlstate):
        # The server answered and refused the login: the pool's settings (or
        # the server's grants) are wrong, not the server's health.
        reasons.append(HealthReason(
            "connect_rejected", failing_if_down,
            f"the server rejects this pool's connections ({stats.last_connect_error}; SQLSTATE "
            f"{stats.last_connect_sqlstate}, {stats.consecutive_connect_failures} in a row): check the DSN, "
            f"the credentials, the database name and the server settings; open connections: {serving}",
        ))
    elif stats.server_status in ("down", "backing_off") and stats.connect_misconfigured:
        # The connect failed in the client, on the program's own arguments:
        # the server was not even asked.
        reasons.append(HealthReason(
            "connect_misconfigured", failing_if_down,
            f"connects fail on the pool's own connect arguments ({stats.last_connect_error}; "
            f"{stats.consecutive_connect_failures} in a row): fix what create_pool() passes to asyncpg.connect(); "
            f"open connections: {serving}",
        ))
    elif stats.server_status in ("down", "backing_off") and stats.connect_pooler_busy:
        # A pooler in front of the server (PgBouncer) refuses logins for now:
        # its client slots or its queue are full, or it is paused; the
        # server behind it was not asked (docs/pgbouncer.md).
        reasons.append(HealthReason(
            "pooler_busy", failing_if_down,
            f"the connection pooler in front of the server refuses this pool's connections for now "
            f"({stats.last_connect_error}; {stats.consecutive_connect_failures} in a row): its client slots "
            f"(PgBouncer's max_client_conn) or its wait queue are full, or the database is paused or disabled "
            f"there; the server behind it may be fine; open connections: {serving}",
        ))
    elif stats.server_status in ("down", "backing_off") and stats.last_connect_sqlstate == _TOO_MANY_CONNECTIONS:
        # The server is up and answered: its connection slots (max_connections,
        # or the role's or database's CONNECTION LIMIT) are all held, by this
        # application or another: the incident's state (docs/runbook.md).
        reasons.append(HealthReason(
            "server_full", failing_if_down,
            f"the server has no connection slot left for this pool ({stats.last_connect_error}; SQLSTATE "
            f"53300, {stats.consecutive_connect_failures} in a row): max_connections, or the role's or database's "
            f"CONNECTION LIMIT, is used up by open connections, this application's or another's; count them by "
            f"client in pg_stat_activity; open connections: {serving}",
        ))
    elif stats.server_status == "down":
        reasons.append(HealthReason(
            "server_down", FAILING,
            f"no connection to the server: {stats.consecutive_connect_failures} consecutive connect failures "
            f"(last error: {stats.last_connect_error})",
        ))
    elif stats.server_status == "backing_off":
        reasons.append(HealthReason(
            "server_backing_off", DEGRADED,
            f"connects are failing ({stats.consecutive_connect_failures} in a row; last error: "
            f"{stats.last_connect_error}); {_connections(serving)} still open",
        ))
    recent_errors, span = _recent_connect_errors(pool, stats, now, connect_error_window)
    if recent_errors:
        if span is None:
            over = "in a row (first check of this pool)"
        elif span >= 1.0:
            over = f"in the last {span:.0f}s"
        else:  # (not "in the last 0s": under a second, tenths, at least one)
            over = f"in the last {max(span, 0.1):.1f}s"
        reasons.append(HealthReason(
            "connect_errors", DEGRADED,
            f"{recent_errors} connect error{'s' if recent_errors != 1 else ''} {over}; {stats.connect_errors} since the pool started",
        ))
    if stats.waiting and stats.oldest_wait_age > saturated_after:
        reasons.append(HealthReason(
            "saturated", DEGRADED,
            f"{stats.waiting} tasks waiting for a connection, the first for {stats.oldest_wait_age:.1f}s; "
            f"{stats.in_use} of max_size {stats.max_size} in use",
        ))
    threshold = leak_suspect_after if leak_suspect_after is not None else pool.options.leak_warning_after
    if threshold is not None and stats.in_use and stats.oldest_lease_age >= threshold:
        suspects = [lease for lease in pool.leases() if lease.age >= threshold]
        if suspects:
            oldest = suspects[0]
            where = oldest.acquired_at or "an unknown site (capture_stack is off)"
            task = f", task {oldest.task_name}" if oldest.task_name else ""
            reasons.append(HealthReason(
                "leak_suspects", DEGRADED,
                f"{len(suspects)} {'lease' if len(suspects) == 1 else 'leases'} held longer than {threshold:g}s; "
                f"oldest {oldest.age:.1f}s, acquired at {where}{task}",
            ))

    status = max((r.status for r in reasons), key=_RANK.__getitem__, default=OK)
    return HealthReport(status=status, reasons=tuple(reasons), stats=stats, probe_latency=latency)


# SQLSTATEs of a login the server refused for who or what it asked for
# (PostgreSQL's errcodes.txt): class 28, invalid authorization (a wrong
# password, an unknown role, no pg_hba.conf entry); 3D000, no such database;
# 42501, no CONNECT privilege on it (or on a setting the start-up sets);
# 42704 and 22023, a start-up setting (server_settings=, options=) the server
# does not know or takes no such value for.
_LOGIN_REJECTED = ("28", "3D000", "42501", "42704", "22023")
# too_many_connections: "sorry, too many clients already", or "too many
# connections for role" / "for database" (a CONNECTION LIMIT).
_TOO_MANY_CONNECTIONS = "53300"


def _login_rejected(sqlstate: str | None) -> bool:
    return sqlstate is not None and sqlstate.startswith(_LOGIN_REJECTED)


async def _probe(pool: Pool, timeout: float, query: str, reasons: list[HealthReason]) -> float | None:
    started = time.perf_counter()
    acquired = False
    # A connection that was idle may have lost its backend while it idled
    # (pg_terminate_backend, a restart, idle_session_timeout, PgBouncer)
    # before the loop read the news: the query fails and the connection is
    # closed under it. The pool serves the next acquire with another, so the
    # probe tries again, once per connection the pool could hand it, before
    # it reports the pool failing.
    attempts = pool.get_max_size() + 1
    try:
        async with asyncio.timeout(timeout):
            while True:
                acquired = False
                attempts -= 1
                # Its own acquire site: under max_site_share the probe must not
                # count against (or be refused by) the bulkhead of the caller
                # (a readiness endpoint's handler, or a safepool.site around it).
                async with pool.acquire(timeout=timeout, site=PROBE_SITE) as con:
                    acquired = True
                    try:
                        await con.fetchval(query)
                    except Exception:
                        if attempts and _lost(con):
                            continue  # (released first: the pool lets the closed connection go)
                        raise
                break
    except TimeoutError:  # PoolTimeoutError included
        if acquired:
            reasons.append(HealthReason(
                "probe_timeout", FAILING, f"the probe query did not answer within {timeout:g}s",
            ))
        else:
            reasons.append(HealthReason(
                "probe_no_connection", DEGRADED, f"the probe got no connection within {timeout:g}s",
            ))
        return None
    except PoolOverloadedError as exc:
        # The pool's own message says which refusal it was (no secrets in it).
        text = str(exc)
        if "shed by the adaptive queue" in text:
            why = "the adaptive queue shed it (the wait queue stands)"
        elif "deadline-aware admission" in text:
            why = "the adaptive queue refused it (not servable within probe_timeout at the drain rate)"
        else:
            why = "the wait queue is full"
        reasons.append(HealthReason("probe_no_connection", DEGRADED, f"the probe got no connection: {why}"))
        return None
    except PoolClosedError:
        reasons.append(HealthReason("closed", FAILING, f"pool {pool.name!r} is closed or closing"))
        return None
    except Exception as exc:
        # Type and first line only (no query parameters), the pool's password
        # masked however the error holds it (review h231).
        reasons.append(HealthReason("probe_failed", FAILING, f"the probe failed: {pool.describe_error(exc)}"))
        return None
    return time.perf_counter() - started


def _lost(con: Any) -> bool:
    """The probe's connection was lost under its query: closed, or (as on
    asyncpg's pool) its lease already ended by the pool, which lets go of a
    connection that died, so its proxy raises as a released one."""
    try:
        return bool(con.is_closed())
    except asyncpg.InterfaceError:
        return True


def _recent_connect_errors(pool: Pool, stats: PoolStats, now: float, window: float) -> tuple[int, float | None]:
    """(connect errors, over how many seconds); None seconds: no usable
    earlier check, so only the current run of failures is known, counted
    if its last failure is within the window.

    The pool's checks share one history of the connect error counter, as
    runs of equal values (``[first seen, last seen, count]``): bounded by
    how often the counter moved, not how often ``health()`` ran (a
    readiness endpoint polled many times a second), and kept for the
    longest window any check asked for, so that a check with a short
    window does not drop what a longer one needs (review h208)."""
    history = _history.get(pool)
    if history is None:
        history = _history[pool] = _History()
        # What the first check knows of the failures before it: the run
        # under way then, and when its last failure was.
        age = stats.last_connect_failure_age
        if age is not None and stats.consecutive_connect_failures:
            history.prior = (now - age, stats.consecutive_connect_failures)
    history.longest = max(history.longest, window)
    runs = history.runs
    # Runs that ended before the longest window's start are not needed once
    # a later run started before it too.
    while len(runs) > 1 and runs[1][0] <= now - history.longest:
        runs.popleft()
    start = now - window
    # The baseline: the counter's value at the window's start, known exactly
    # when a run spans it (the counter did not move between two checks on
    # either side); else the newest check before it (errors between that
    # check and the start count too), or the oldest check, when every check
    # so far is more recent than the start.
    baseline: tuple[float, int] | None = None
    for first, last, count in reversed(runs):
        if first <= start:
            baseline = (start, count) if last >= start else (last, count)
            break
    else:
        if runs:
            baseline = (runs[0][0], runs[0][2])
            prior = history.prior
            if prior is not None and start < prior[0] <= baseline[0]:
                # The failures the first check saw, within the window too:
                # counted from the last of them (a second check within the
                # window reported none: review h284).
                baseline = (prior[0], runs[0][2] - prior[1])
    if baseline is not None and now - baseline[0] > 2 * window:
        baseline = None
    if runs and runs[-1][2] == stats.connect_errors:
        runs[-1][1] = now
    else:
        runs.append([now, now, stats.connect_errors])
    if baseline is None:
        # The current run of failures, if its last failed within the window
        # (a run that ended long ago, with no connect since, is not recent).
        age = stats.last_connect_failure_age
        return (stats.consecutive_connect_failures if age is not None and age <= window else 0), None
    return stats.connect_errors - baseline[1], now - baseline[0]


class _History:
    """A pool's connect error counter as its health checks saw it."""

    __slots__ = ("runs", "longest", "prior")

    def __init__(self) -> None:
        # (when the last failure before the first check was, the run of
        # failures the first check saw), or None: none under way then.
        self.prior: tuple[float, int] | None = None
        # [first seen, last seen, counter]: at most one run per move of the
        # counter, the oldest dropped past _HISTORY_RUNS.
        self.runs: deque[list[Any]] = deque(maxlen=_HISTORY_RUNS)
        self.longest = 0.0


# Runs of the counter kept per pool: a counter that moved this often within
# the longest window loses its oldest runs (the check then knows the current
# run of failures only, as with no earlier check).
_HISTORY_RUNS = 4096


def _connections(count: int) -> str:
    """``count`` connections, in words ("1 connection", "2 connections")."""
    return f"{count} connection{'' if count == 1 else 's'}"
