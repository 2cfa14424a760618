"""Immutable snapshots of a pool's state for operators and exporters."""

from __future__ import annotations

import asyncio
import re
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ._histogram import Distribution
from ._internals import error_text, pooler_refusal
from ._keepalive import TcpKeepalive
from ._state import PoolState, SlotState


@dataclass(frozen=True, slots=True)
class LeaseInfo:
    """One connection held by application code (see ``Pool.leases()``):
    ``id`` (the lease's, for ``Pool.release_lease()``), ``age`` and
    ``deadline_in`` in seconds (``deadline_in`` None: no ``lease_timeout``),
    where and by which task it was acquired
    (None unless stacks are captured: ``capture_stack``)."""

    id: int
    age: float  # seconds since acquire
    deadline_in: float | None  # seconds until the lease timeout takes it back
    task_name: str | None
    acquired_at: str | None  # "file:line in function", when stacks are captured
    stack: str | None  # the full acquire stack, outermost first, when stacks are captured
    site: str | None = None  # the acquire site (with max_site_share, or acquire(site=))
    # The task that acquired, held weakly (when stacks are captured).
    task_ref: weakref.ref[asyncio.Task[Any]] | None = None
    # Its proxy was garbage collected unreleased (a leak): the pool takes the
    # connection back in a loop callback, so ``Pool.leases()`` may still list
    # it until the loop runs once more, or for as long as the connection is
    # still in use (a query running, a listener registered: reclaimed once
    # that ends, release_lease() asks, or lease_timeout takes it back).
    # (``Pool.leases()`` sets it; events' False.)
    collected: bool = False

    @property
    def task(self) -> asyncio.Task[Any] | None:
        """The task that acquired the connection, while it exists (None when
        stacks were not captured, or the task is gone)."""
        return self.task_ref() if self.task_ref is not None else None


@dataclass(frozen=True, slots=True)
class PoolOptions:
    """A pool's settings (``Pool.options``): what ``create_pool`` was given,
    after defaults, with the current sizes (``resize()`` changes them) and
    the current ``capture_stack`` (``Pool.capture_stack`` changes it). All
    of safepool's settings but ``backoff`` and ``clock`` (objects); never
    the DSN, a password or other connection arguments. Times are seconds;
    None means "no limit" (or "off")."""

    name: str
    min_size: int
    max_size: int
    init_size: int
    max_queries: int
    max_inactive_connection_lifetime: float
    max_lifetime: float | None  # None: connections are not replaced for their age
    tcp_keepalive: TcpKeepalive | None  # None: no TCP keepalive set (asyncpg sets none)
    lease_timeout: float | None
    leak_warning_after: float | None
    acquire_timeout: float | None
    max_waiters: int | None
    max_connecting: int | None
    fail_fast: bool
    wait_on_connect_error: bool
    reset_mode: str
    reset_timeout: float | None
    backend_exit_timeout: float  # seconds a closed connection's place waits for its backend's exit (0: none)
    capture_stack: bool
    max_site_share: float | None  # None: no cap per acquire site
    queue_policy: str  # "fifo" or "adaptive"
    queue_target: float | None  # CoDel's target delay; None with queue_policy="fifo" (unused)
    queue_interval: float | None  # CoDel's interval; None with queue_policy="fifo"


@dataclass(frozen=True, slots=True)
class SiteStats:
    """One acquire site's share of the pool (``PoolStats.sites``)."""

    site: str  # acquire(site=), safepool.site(), or "module.function"; "other": the rest summed
    in_use: int  # connections leased by the site, or handed to one of its waiters
    waiting: int  # its tasks waiting for a connection


@dataclass(frozen=True, slots=True)
class PoolStats:
    """A pool's state at one moment (``Pool.stats()``). Sizes count
    connections (``waiting``: tasks); counters are ints that only grow,
    since the pool was created; ``acquire_wait``, ``lease_duration`` and
    ``connect_time`` are :class:`~safepool.Distribution` snapshots in
    seconds; ages and ``taken_at`` are seconds on the pool's clock;
    ``sites`` is a tuple of :class:`SiteStats`. docs/metrics.md,
    "pool.stats()", has the table of every field, its unit and meaning."""

    name: str
    # Sizes now.
    size: int  # connections counted against max_size (opening and closing included)
    idle: int
    in_use: int  # leased, or handed to a waiter that has not resumed yet
    connecting: int
    resetting: int
    closing: int
    waiting: int  # tasks queued for a connection
    max_size: int
    min_size: int
    max_waiters: int | None
    # Counters since the pool started.
    acquired: int
    released: int
    acquire_timeouts: int
    overload_rejections: int
    unavailable_rejections: int
    leases_expired: int
    leaks_detected: int  # proxies garbage collected while leased
    leak_warnings: int
    connections_opened: int
    connections_closed: int
    connect_errors: int
    resets: int
    resets_skipped: int  # leases that ran no statement: no reset needed
    resets_failed: int
    # Distributions.
    acquire_wait: Distribution
    lease_duration: Distribution
    connect_time: Distribution  # successful connects, from planning to ready (init hook included)
    oldest_lease_age: float  # 0.0 when nothing is leased
    oldest_wait_age: float  # how long the head of the wait queue has waited; 0.0 if none
    # "up", "backing_off" or "down"; "up" also once failing connects are no
    # longer wanted and the last failed over 60 s ago (docs/metrics.md).
    server_status: str
    consecutive_connect_failures: int
    # Site caps and the adaptive queue (docs/backpressure.md).
    shed: int = 0  # waiters the adaptive queue failed after queue_target
    admission_rejections: int = 0  # refused at once: not servable within their timeout at the drain rate
    # Leases the pool ended itself: their connection was lost (the backend
    # terminated, the network cut) or terminate() ended them.
    leases_discarded: int = 0
    # Connections whose max_lifetime ran out: closed then if idle, else
    # when their lease ended (pgxpool's MaxLifetimeDestroyCount).
    connections_retired: int = 0
    site_cap: int | None = None  # connections one site may hold (None: max_site_share off)
    sites: tuple[SiteStats, ...] = ()  # the busiest SITES_REPORTED sites, then "other"
    # The last connect reached the server and the init= hook raised (until a
    # connect succeeds, or the failure goes stale as a refusal's: 60 s with no
    # connect wanted): an application error; server_status stays "up".
    init_failing: bool = False
    # While connects fail (consecutive_connect_failures > 0), the last one's
    # error as the logs give it ("InvalidPasswordError: password
    # authentication failed for user \"app\"": type and first line, never
    # the DSN), and the SQLSTATE the server sent with it ("28P01"; None for
    # an error that is not the server's: refused, unreachable, a timeout).
    # Both None once a connect succeeds.
    last_connect_error: str | None = None
    last_connect_sqlstate: str | None = None
    # That error's class name ("TooManyConnectionsError",
    # "ConnectionRefusedError"): the type last_connect_error starts with, as
    # the exporters label it (error_type, OpenTelemetry's error.type). None
    # once a connect succeeds.
    last_connect_error_type: str | None = None
    # The last connect failed on the program's own connect arguments (a
    # keyword asyncpg's connect() does not take, an option or DSN it cannot
    # use, a connect= callable's bug), before the server had a say: a
    # configuration error. False once a connect succeeds.
    connect_misconfigured: bool = False
    # The last connect was refused by a connection pooler in front of the
    # server (PgBouncer's refusals that end by themselves, SQLSTATE 08P01:
    # its max_client_conn reached, the database paused or disabled, a login
    # queued past query_wait_timeout): the pooler is full, the server behind
    # it may be fine. False once a connect succeeds.
    connect_pooler_busy: bool = False
    # Seconds since the last failed connect, while connects fail (None once
    # one succeeds, and before any failed): health()'s connect_errors counts
    # the current run only while this is within its connect_error_window.
    last_connect_failure_age: float | None = None

    taken_at: float = 0.0  # the pool clock's time of this snapshot (seconds; for rates between snapshots)


SITES_REPORTED = 10  # bounded label cardinality for exporters


def describe_error(error: BaseException | None) -> str:
    """Type and first non-blank line of an error (stripped): enough for an
    operator, never a DSN. Never raises: an error whose ``__str__`` raises
    reads ``<exception str() failed>``."""
    if error is None:
        return "none"
    text = next((line.strip() for line in error_text(error).splitlines() if line.strip()), "")
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def sqlstate(error: BaseException | None) -> str | None:
    """The SQLSTATE the server sent with ``error`` (asyncpg's
    ``PostgresError.sqlstate``), or None: no error, or not the server's
    (a refused TCP connect, a timeout, asyncpg's own)."""
    code = getattr(error, "sqlstate", None)
    # Five characters, digits and upper-case letters, as the server sends
    # it: anything else (an attribute of some other error) is not one, and
    # the exporters put this in a label, whose values must stay few.
    return code if isinstance(code, str) and _SQLSTATE.fullmatch(code) else None


_SQLSTATE = re.compile(r"[0-9A-Z]{5}")


def build_stats(
    name: str, state: PoolState, now: float, describe: Callable[[BaseException | None], str] = describe_error
) -> PoolStats:
    """The :class:`PoolStats` snapshot of ``state`` at ``now`` (seconds, the
    pool clock's), for the pool named ``name``: what ``Pool.stats()`` returns.
    ``describe``: the line ``last_connect_error`` shows (the pool's passes
    :meth:`Reporter.describe`, which masks its password)."""
    c = state.counters
    failing = state.last_connect_error if state.connect_failures else None
    oldest = min((lease.acquired_at for lease in state.leases()), default=now)
    return PoolStats(
        name=name,
        size=state.size,
        idle=state.idle,
        in_use=state.in_use,
        connecting=state.count(SlotState.CONNECTING),
        resetting=state.count(SlotState.RESETTING),
        closing=state.count(SlotState.CLOSING),
        waiting=state.waiting,
        max_size=state.max_size,
        min_size=state.min_size,
        max_waiters=state.max_waiters,
        acquired=state.acquired,
        released=state.released,
        acquire_timeouts=c.acquire_timeouts,
        overload_rejections=c.overload_rejections,
        unavailable_rejections=c.unavailable_rejections,
        leases_expired=c.leases_expired,
        leaks_detected=c.leaks_detected,
        leak_warnings=c.leak_warnings,
        connections_opened=c.connections_opened,
        connections_closed=c.connections_closed,
        connect_errors=c.connect_errors,
        resets=c.resets,
        resets_skipped=c.resets_skipped,
        resets_failed=c.resets_failed,
        acquire_wait=state.wait_times.snapshot(),
        lease_duration=state.lease_times.snapshot(),
        connect_time=state.connect_times.snapshot(),
        oldest_lease_age=now - oldest,
        oldest_wait_age=state.oldest_waiter_age(now),
        server_status=state.server_status(now).value,
        consecutive_connect_failures=state.connect_failures,
        shed=c.shed,
        admission_rejections=c.admission_rejections,
        leases_discarded=c.leases_discarded,
        connections_retired=c.connections_retired,
        site_cap=state.site_cap,
        sites=tuple(SiteStats(*row) for row in state.site_usage(SITES_REPORTED)),
        init_failing=state.init_failing and not state.failure_went_stale,
        last_connect_error=None if failing is None else describe(failing),
        last_connect_sqlstate=sqlstate(failing),
        last_connect_error_type=None if failing is None else type(failing).__name__,
        connect_misconfigured=state.connect_misconfigured,
        connect_pooler_busy=pooler_refusal(failing),
        last_connect_failure_age=now - state.connect_failed_at if state.connect_failures else None,
        taken_at=now,
    )
