"""The pool's I/O layer: carries out what the state core (``_state.py``) decides.

The hot path (an idle connection, no waiters) is: read the clock, pop the idle
stack, build a proxy. Release of a lease that ran no statement hands the
connection on at once; otherwise the reset runs in a pool-owned task, so the
caller neither waits for it nor can cancel it halfway (asyncpg pays a shield
and a round trip in the caller's task). Timers for every deadline (acquire
timeouts, lease expiry, leak-suspect warnings, idle lifetime, connect retries)
share one clock callback armed at the earliest deadline.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import traceback
import warnings
import weakref
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar, assert_never

from asyncpg import connection as _pg_connection
from asyncpg import exceptions as _pg_exceptions
from asyncpg import protocol as _pg_protocol

from . import _autoreset, _sites, _stack
from . import _internals as _pg
from . import events as _events
from ._clock import Clock, LoopClock, Timer
from ._compat import HolderCompat, HolderView, QueueView  # asyncpg's private pool attributes
from ._compat import holders as _compat_holders
from ._compat import queue as _compat_queue
from ._detach import _Driver
from ._histogram import Histogram, TeeHistogram
from ._internals import RawConnection
from ._policy import AdaptiveQueue
from ._state import (
    RESET_MODES,
    Backoff,
    Close,
    Closed,
    Connect,
    Fail,
    Inadmissible,
    LeakSuspect,
    Lease,
    Overloaded,
    PoolState,
    ReleaseOutcome,
    Shed,
    Slot,
    SlotLost,
    SlotState,
    TakeBack,
    TimeOut,
    Unavailable,
    Waiter,
    Wake,
)
from .errors import (
    PoolClosedError,
    PoolOverloadedError,
    PoolTimeoutError,
    ServerUnavailableError,
)
from .proxy import PoolConnectionProxy
from .stats import LeaseInfo, PoolOptions, PoolStats, build_stats

if TYPE_CHECKING:
    from .health import HealthReport

logger = logging.getLogger("safepool")
leak_logger = logging.getLogger("safepool.leaks")
_asyncpg_logger = logging.getLogger("asyncpg.pool")

_DEFAULT = object()
# Every open pool in the process, weakly: the pytest leak plugin and exporters
# find pools here without the application registering them.
_LIVE_POOLS: weakref.WeakSet[Pool] = weakref.WeakSet()


_CREATED_HOOKS: list[Callable[[Pool], None]] = []
_T = TypeVar("_T")


def live_pools() -> list[Pool]:
    """Pools created in this process that are not garbage yet."""
    return list(_LIVE_POOLS)


def on_pool_created(callback: Callable[[Pool], None]) -> Callable[[], None]:
    """Call ``callback(pool)`` for every pool created from now on, at the end
    of its constructor (before it connects), in the creating thread. For
    extensions that watch every pool (the pytest leak guard, exporters with
    ``live=True``) without the application registering each one. An exception
    in the callback is logged and swallowed.

    Returns a function that removes the callback (idempotent)."""
    _CREATED_HOOKS.append(callback)

    def remove() -> None:
        if callback in _CREATED_HOOKS:
            _CREATED_HOOKS.remove(callback)

    return remove


def _pool_created(pool: Pool) -> None:
    for callback in _CREATED_HOOKS.copy():  # a callback may remove itself
        try:
            callback(pool)
        except Exception:
            logger.error("pool %r: pool-created hook failed\n%s", pool.name, traceback.format_exc().rstrip())


class _DictListener:
    """A ``Pool.add_listener`` callback, fed the dict form of typed events."""

    __slots__ = ("callback",)

    def __init__(self, callback: Callable[[dict[str, Any]], None]) -> None:
        self.callback = callback

    def __call__(self, event: _events.PoolEvent) -> None:
        payload = event.to_dict()
        if payload is not None:
            self.callback(payload)


_LEASE_EVENTS: dict[str, type[_events.LeaseEvent]] = {
    cls.kind: cls
    for cls in (_events.LeakSuspected, _events.LeaseExpired, _events.Leaked, _events.LeaseEnded)
}
_POOL_EVENTS: dict[str, Callable[..., _events.PoolEvent]] = {
    cls.kind: cls for cls in (_events.ConnectFailed, _events.ServerStatusChanged, _events.LateRelease)
}
_TIMINGS = {"wait": "wait_times", "lease": "lease_times", "connect": "connect_times"}

# Bound on a background reset or take-back when no release timeout applies:
# a reset that hangs longer than this is treated as a broken connection.
_DEFAULT_RESET_TIMEOUT = 30.0
# fail_fast=True: consecutive failed connects, with no connection left, after
# which acquires fail at once with ServerUnavailableError.
_BREAKER_THRESHOLD = 3
# A garbage-collected proxy whose connection is still in use is checked again
# after these delays (seconds, doubling), until it is provably abandoned.
_ORPHAN_RECHECK_FIRST = 0.05
_ORPHAN_RECHECK_CAP = 2.0
# Bound on the cancel request sent for the backend of a connection lost
# while leased (without reset_timeout).
_LOST_BACKEND_CANCEL_TIMEOUT = 2.0
# The floor upkeep's retry delays after failed connects (asyncpg 0.32's).
_FLOOR_RETRY_FIRST = 1.0
_FLOOR_RETRY_CAP = 60.0
# How long close() lets connects under way finish before cancelling them.
_CONNECT_GRACE_ON_CLOSE = 0.5
QUEUE_POLICIES = ("fifo", "adaptive")
# queue_policy="adaptive": CoDel's delay target and interval (seconds); see
# docs/backpressure.md for the measurements behind them.
DEFAULT_QUEUE_TARGET = 0.01
DEFAULT_QUEUE_INTERVAL = 0.1


class _Holder(HolderCompat):  # HolderCompat: asyncpg's holder._in_use & co., read-only
    """What asyncpg's Connection expects of its pool holder: it calls
    ``_release_on_close()`` when the connection dies, and reaches the pool
    through ``proxy._holder._pool`` to drop statement and type caches."""

    __slots__ = ("_pool", "_slot", "_con", "clean_mark", "base_refs", "release_timeout", "orphan_checks",
                 "orphan_reported", "unresponsive", "lost_while_leased", "reset_since",
                 "__weakref__")

    def __init__(self, pool: Pool, slot: Slot, con: RawConnection, clean_mark: int) -> None:
        self._pool = pool
        self._slot = slot
        self._con: RawConnection | None = con
        # asyncpg's statement counter when the session was last known to be
        # as the pool leaves it (opened, before init=; or just reset). A
        # release that finds the counter moved must reset; -1: always reset.
        self.clean_mark = clean_mark
        # The connection's reference count while only the pool holds it.
        self.base_refs = 0
        # release(timeout=None) defaults to the acquire's timeout (asyncpg).
        self.release_timeout: float | None = None
        # How often a garbage-collected proxy's connection was found still in
        # use (0: not orphaned).
        self.orphan_checks = 0
        self.orphan_reported = False
        # A reset or take-back timed out: no graceful close, abort it.
        self.unresponsive = False
        # The socket died under a lease: its backend may still run a query.
        self.lost_while_leased = False
        # When a release's unbounded reset started (the reset watchdog's clock).
        self.reset_since: float | None = None

    def _release_on_close(self) -> None:
        self._con = None
        self._pool._connection_lost(self._slot)

    def _abandoned(self, lease: Lease) -> None:
        # Runs inside the garbage collector, possibly in the middle of the
        # pool's own bookkeeping: only schedule, never touch state here.
        pool = self._pool
        try:
            pool._loop.call_soon_threadsafe(pool._reclaim, lease)
        except RuntimeError:
            pass  # the loop is closed: the process is shutting down


def _validate_timeout(name: str, value: Any, *, allow_none: bool = True) -> float | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number of seconds or None, got {type(value).__name__}")
    if value != value or value < 0:  # NaN or negative
        raise ValueError(f"{name} must be >= 0 seconds, got {value!r}")
    return float(value)


class Pool:
    """A connection pool with asyncpg's ``Pool`` API, plus lease timeouts,
    leak detection, bounded waiting and statistics.

    Create it with :func:`safepool.create_pool`.
    """

    def __init__(
        self,
        *connect_args: Any,
        init_size: int | None = None,
        min_size: int,
        max_size: int,
        max_queries: int,
        max_inactive_connection_lifetime: float,
        connect: Callable[..., Awaitable[_pg_connection.Connection]] | None = None,
        setup: Callable[[PoolConnectionProxy], Awaitable[None]] | None = None,
        init: Callable[[_pg_connection.Connection], Awaitable[None]] | None = None,
        reset: Callable[[_pg_connection.Connection], Awaitable[None]] | None = None,
        loop: asyncio.AbstractEventLoop | None,
        connection_class: type[_pg_connection.Connection],
        record_class: type[Any],
        name: str | None = None,
        lease_timeout: float | None = None,
        leak_warning_after: float | None = None,
        capture_stack: bool | None = None,
        max_waiters: int | None | object = _DEFAULT,
        acquire_timeout: float | None = None,
        max_connecting: int | None = None,
        fail_fast: bool = False,
        wait_on_connect_error: bool = False,
        reset_mode: str = "full",
        reset_timeout: float | None = None,
        backoff: Backoff | None = None,
        clock: Clock | None = None,
        max_site_share: float | None = None,
        queue_policy: str = "fifo",
        queue_target: float = DEFAULT_QUEUE_TARGET,
        queue_interval: float = DEFAULT_QUEUE_INTERVAL,
        **connect_kwargs: Any,
    ) -> None:
        if len(connect_args) > 1:
            warnings.warn(
                "Passing multiple positional arguments to Pool is deprecated; use Pool(<dsn>, **kwargs)",
                DeprecationWarning,
                stacklevel=2,
            )
        if loop is None:
            loop = asyncio.get_event_loop()
        self._loop = loop

        # Types first: asyncpg compares without checking, so a wrong type
        # would fail with "'<=' not supported ..." or at first use.
        for size_name, size in (("max_size", max_size), ("min_size", min_size), ("init_size", init_size)):
            if not isinstance(size, int) and not (size is None and size_name == "init_size"):
                raise TypeError(f"{size_name} must be an int, got {size!r}")
        for number_name, number in (
            ("max_queries", max_queries),
            ("max_inactive_connection_lifetime", max_inactive_connection_lifetime),
        ):
            if not isinstance(number, (int, float)):
                raise TypeError(f"{number_name} must be a number, got {number!r}")
            if number != number:
                raise ValueError(f"{number_name} must not be NaN")
        # asyncpg's checks and messages, in asyncpg's order.
        if max_size <= 0:
            raise ValueError("max_size is expected to be greater than zero")
        if min_size < 0:
            raise ValueError("min_size is expected to be greater or equal to zero")
        if min_size > max_size:
            raise ValueError("min_size is greater than max_size")
        if init_size is None:
            init_size = min_size
        if init_size < 0:
            raise ValueError("init_size is expected to be greater or equal to zero")
        if init_size > max_size:
            raise ValueError("init_size is greater than max_size")
        if init_size < min_size:
            raise ValueError("init_size is smaller than min_size")
        if max_queries <= 0:
            raise ValueError("max_queries is expected to be greater than zero")
        if max_inactive_connection_lifetime < 0:
            raise ValueError("max_inactive_connection_lifetime is expected to be greater or equal to zero")
        if not issubclass(connection_class, _pg_connection.Connection):
            raise TypeError(
                f"connection_class is expected to be a subclass of asyncpg.Connection, got {connection_class!r}"
            )
        if not issubclass(record_class, _pg_protocol.Record):
            raise TypeError(f"record_class is expected to be a subclass of asyncpg.Record, got {record_class!r}")

        # safepool's own options.
        self._lease_timeout = _validate_timeout("lease_timeout", lease_timeout)
        if self._lease_timeout == 0:
            raise ValueError("lease_timeout must be > 0 seconds (None turns it off)")
        self._leak_warning_after = _validate_timeout("leak_warning_after", leak_warning_after)
        self._acquire_timeout = _validate_timeout("acquire_timeout", acquire_timeout)
        self._reset_timeout = _validate_timeout("reset_timeout", reset_timeout)
        if max_waiters is _DEFAULT:
            # Unbounded, as asyncpg: a bound can fail a call that works on
            # asyncpg's pool (1,500 gathered queries on 10 connections), so it
            # is opt-in (docs/backpressure.md recommends one for services).
            max_waiters = None
        if max_waiters is not None and (
            isinstance(max_waiters, bool) or not isinstance(max_waiters, int) or max_waiters < 0
        ):
            raise ValueError(f"max_waiters must be an int >= 0 or None, got {max_waiters!r}")
        if max_connecting is not None and (
            isinstance(max_connecting, bool) or not isinstance(max_connecting, int) or max_connecting < 1
        ):
            raise ValueError(f"max_connecting must be an int >= 1 or None, got {max_connecting!r}")
        for flag_name, flag in (("fail_fast", fail_fast), ("wait_on_connect_error", wait_on_connect_error)):
            if not isinstance(flag, bool):
                raise TypeError(f"{flag_name} must be True or False, got {flag!r}")
        if reset_mode not in RESET_MODES:
            raise ValueError(f"reset_mode must be one of {RESET_MODES}, got {reset_mode!r}")
        adaptive = _adaptive_queue(queue_policy, queue_target, queue_interval)
        _validate_site_share(max_site_share)
        self._site_caps = max_site_share is not None
        self._capture_stack = (
            capture_stack if capture_stack is not None else self._leak_warning_after is not None
        )

        self._name = name or f"pool-{id(self):x}"
        self._init_size = init_size
        self._min_size = min_size
        self._max_queries = max_queries
        self._connection_class = connection_class
        self._record_class = record_class
        self._connect = connect if connect is not None else _pg_connection.connect
        self._connect_args: Any = connect_args
        self._connect_kwargs = connect_kwargs
        self._setup = setup
        self._init = init
        self._reset = reset
        self._reset_mode = reset_mode
        self._proxy_class: type[PoolConnectionProxy] = PoolConnectionProxy
        if reset_mode == "auto":
            _autoreset.require_parser()  # a missing extra fails here, not at the first release
            self._proxy_class = _autoreset.AutoResetProxy
        # A user reset= hook, or a connection class with its own reset(), is
        # called as asyncpg calls it (asyncpg's own rollback first, in the
        # hook's case); it and an overridden get_reset_query() run on every
        # release as with asyncpg, statement or not.
        self._custom_reset = reset is not None or connection_class.reset is not _pg_connection.Connection.reset
        self._always_reset = (
            self._custom_reset or connection_class.get_reset_query is not _pg_connection.Connection.get_reset_query
        )

        self._state = PoolState(
            max_size=max_size,
            min_size=min_size,
            max_waiters=max_waiters,
            max_connecting=max_connecting,
            max_inactive_lifetime=max_inactive_connection_lifetime,
            backoff=backoff,
            breaker_threshold=_BREAKER_THRESHOLD if fail_fast else None,
            wait_on_connect_error=wait_on_connect_error,
            max_site_share=max_site_share,
            adaptive=adaptive,
            reset_mode=reset_mode,
            always_reset=self._always_reset,
        )
        self._clock: Clock = clock if clock is not None else LoopClock(loop)
        self._now = self._clock.now
        self._timer: Timer | None = None
        self._reset_watchdog: Timer | None = None
        self._timer_at: float | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._connect_tasks: set[asyncio.Task[Any]] = set()
        self._slot_holders: dict[Slot, _Holder] = {}
        # Releases and failed setups that wait for their connection's close.
        self._closes_done: dict[Slot, asyncio.Future[None]] = {}
        # Typed event callbacks (dict listeners are wrapped): events queue in
        # _pending_events and are delivered once the books are settled.
        self._listeners: list[Callable[[_events.PoolEvent], None]] = []
        self._pending_events: deque[_events.PoolEvent] = deque()
        self._delivering = False
        self._drained = asyncio.Event()

        self._initialized = False
        self._initializing = False
        self._closed = False
        self._terminating = False
        self._server_status = "up"
        _LIVE_POOLS.add(self)
        # Restores min_size after failed connects, on asyncpg's schedule and
        # under asyncpg's name (its tests and monitoring read it).
        self._maintenance_task: asyncio.Task[Any] | None = None
        if _CREATED_HOOKS:
            _pool_created(self)

    # ------------------------------------------------------------ start-up

    async def _async__init__(self) -> Pool:
        if self._initialized:
            return self
        if self._initializing:
            raise _pg_exceptions.InterfaceError("pool is being initialized in another task")
        if self._closed:
            raise PoolClosedError("pool is closed")
        self._initializing = True
        try:
            await self._initialize()
            return self
        except BaseException:
            self._closed = True
            self._terminate_all()
            raise
        finally:
            self._initializing = False
            self._initialized = True

    async def _initialize(self) -> None:
        state = self._state
        if self._init_size:
            # The first connection is awaited and its error raised, as with
            # asyncpg: a wrong DSN or password must fail pool creation.
            first = state.add_connecting(self._now())
            await self._connect_slot(first, raise_errors=True)
            others = [state.add_connecting(self._now()) for _ in range(self._init_size - 1)]
            # The rest may fail without failing creation: the min_size upkeep
            # retries them in the background with backoff.
            await asyncio.gather(*(self._connect_slot(slot) for slot in others))
        state.floor_enabled = True
        state.advance(self._now())
        self._drain()

    # ------------------------------------------------------------- acquire

    def acquire(
        self,
        *,
        timeout: float | None = None,
        lease_timeout: float | None | object = _DEFAULT,
        site: str | None = None,
    ) -> PoolAcquireContext:
        """Acquire a connection: ``async with pool.acquire() as con`` or
        ``con = await pool.acquire()`` (then release it in ``finally``).

        :param timeout: seconds to wait for a connection (default: the pool's
            ``acquire_timeout``); raises :class:`~safepool.PoolTimeoutError`.
        :param lease_timeout: override the pool's ``lease_timeout`` for this
            lease (None: no limit).
        :param site: the acquire site this lease counts against under
            ``max_site_share`` (default: the name set by :class:`safepool.site`,
            else the calling function); shown in ``leases()`` and leak reports.
        :raises safepool.PoolOverloadedError: refused at once (``max_waiters``,
            the site's share of it, or the adaptive queue).
        """
        return PoolAcquireContext(self, timeout, lease_timeout, site)

    async def _acquire(
        self,
        timeout: float | None,
        lease_timeout: Any = _DEFAULT,
        context: PoolAcquireContext | None = None,
        site: str | None = None,
    ) -> PoolConnectionProxy:
        if timeout is None:
            timeout = self._acquire_timeout
        else:
            timeout = _validate_timeout("timeout", timeout)
        if lease_timeout is _DEFAULT:
            lease_timeout = self._lease_timeout
        elif lease_timeout is not None:
            lease_timeout = _validate_timeout("lease_timeout", lease_timeout)
            if lease_timeout == 0:
                raise ValueError("lease_timeout must be > 0 seconds (None turns it off)")
        if self._state.closing and not self._closed:
            raise PoolClosedError("pool is closing")
        self._check_init()
        if self._site_caps and site is None:
            site = _sites.current_site() or _sites.caller_site(2)
        state = self._state
        now = self._now()
        deadline = None if timeout is None else now + timeout
        while True:
            try:
                lease = state.try_acquire(now, site)
            except Closed:
                raise PoolClosedError("pool is closing") from None
            if state.actions:
                self._drain()
            if lease is not None:
                break
            lease = await self._wait_for_connection(
                now, None if deadline is None else max(0.0, deadline - now), site
            )
            if lease is not None:
                break
            # The granted connection died before this task resumed: try
            # again with what is left of the timeout.
            now = self._now()
        if site is not None:
            lease.site = site
        slot = lease.slot
        holder = self._slot_holders[slot]
        holder.release_timeout = timeout
        if holder.orphan_checks:
            holder.orphan_checks = 0
            holder.orphan_reported = False
        proxy = self._proxy_class(holder, slot.connection, lease)
        if lease_timeout is not None or self._leak_warning_after is not None:
            state.arm_lease(lease, lease_timeout, self._leak_warning_after)
            due = lease.deadline if lease.warn_at is None else (
                lease.warn_at if lease.deadline is None else min(lease.deadline, lease.warn_at))
            if self._timer_at is None or (due is not None and due < self._timer_at):
                self._arm_timer()  # (else the armed timer comes first and re-arms: no heap scan per lease)
        if self._capture_stack:
            lease.stack = _stack.capture()
            task = asyncio.current_task()
            if task is not None:
                lease.task_name = task.get_name()
                lease.task_ref = weakref.ref(task)
        if self._setup is not None:
            # Its statements are the lease's: a SET it runs is reset on
            # release like any other (the clean mark is per connection).
            await self._run_setup(proxy, lease)
        if context is not None:
            context.connection = proxy
        return proxy

    async def _wait_for_connection(self, now: float, timeout: float | None, site: str | None = None) -> Lease | None:
        state = self._state
        future = self._loop.create_future()
        try:
            waiter = state.enqueue(future, now, timeout, site)
        except Overloaded as exc:
            if isinstance(exc, Inadmissible):
                raise PoolOverloadedError(self._shed_message("refused at once: " + str(exc))) from None
            raise PoolOverloadedError(self._busy_message(str(exc) or "wait queue is full", now)) from None
        except Unavailable as exc:
            raise ServerUnavailableError(
                f"pool {self._name!r} has no connection and the server refuses new ones "
                f"(last error: {_describe_error(exc.last_error)}); next attempt in {exc.retry_in:.2f}s"
            ) from exc.last_error
        except Closed:
            raise PoolClosedError("pool is closing") from None
        self._drain()  # also arms the timer for the waiter's deadline
        try:
            await future
        except asyncio.CancelledError:
            # Cancelled while waiting, or after the grant but before resuming:
            # either way the core gets the connection back (anyio's pattern).
            state.cancel_waiter(waiter, self._now())
            self._drain()
            raise
        try:
            return state.claim(waiter, self._now())
        except SlotLost:
            return None

    async def _run_setup(self, proxy: PoolConnectionProxy, lease: Lease) -> None:
        try:
            await self._setup(proxy)  # type: ignore[misc]
        except BaseException:
            # The connection's state is unknown: close it, as asyncpg does,
            # and wait for the close (asyncpg awaits it too), so the proxy
            # answers is_closed() with True. The close runs in a pool task: a
            # second cancel cannot cut it short, and the slot counts until
            # the backend is gone (a cancelled setup query is waited for).
            if lease.active:
                slot = lease.slot
                done = self._loop.create_future()
                self._closes_done[slot] = done
                self._state.release(lease, self._now(), ReleaseOutcome.DISCARD)
                self._drain()
                await asyncio.wait([done])
            raise

    # ------------------------------------------------------------- release

    async def release(self, connection: Any, *, timeout: float | None = None) -> None:
        """Release a connection back to the pool, with asyncpg's semantics.

        Returns once the connection is back: an open transaction rolled back
        and the session reset (asyncpg's reset query: advisory locks, cursors,
        LISTENs, settings), so no other session sees anything of this lease
        any more. A lease that ran no statement (``setup=``/``init=``
        included) is handed on with no round trip. The reset runs in a pool
        task that the caller's cancellation cannot interrupt (asyncpg shields
        it); a cancelled caller gets ``CancelledError`` while the pool
        finishes the reset, or closes the connection once any cancelled query
        has stopped on the server. A second release is a no-op.

        :param timeout: seconds for the reset (default: the ``timeout`` of the
            ``acquire()`` that produced the connection, as in asyncpg 0.32).
        :raises asyncpg.InterfaceError: ``connection`` is not one of this pool's.
        :raises Exception: the reset's own error (e.g. ``asyncio.TimeoutError``),
            after the connection was given up, as asyncpg raises it.
        """
        if not isinstance(connection, PoolConnectionProxy) or connection._holder._pool is not self:
            raise _pg_exceptions.InterfaceError(
                f"Pool.release() received invalid connection: {connection!r} is not a member of this pool"
            )
        con: RawConnection = connection._con
        if con is None:
            # Released twice, or the pool ended the lease (terminate, lease
            # timeout) first: a no-op, as asyncpg's, that the leak guards note.
            if self._listeners:
                self._emit_event("late_release", lease_id=connection._lease.id)
                self._deliver_events()
            return
        self._check_init()
        connection._detach()
        _pg.on_release(con)
        if timeout is None:
            timeout = connection._holder.release_timeout
        done = self._end_lease(connection._lease, con, timeout)
        if done is not None:
            # A plain future resolved by the pool's task, or the reset driven
            # in this task until it is cancelled (then a pool task finishes
            # it): either way cancelling this await never cuts the reset short.
            error = await done
            if error is not None:
                raise error

    def _end_lease(
        self, lease: Lease, con: RawConnection, timeout: float | None
    ) -> asyncio.Future[None] | Awaitable[Exception | None] | None:
        """End a lease; returns what the releasing caller awaits: the reset
        (driven in the caller's task, see ``_detach``) or a future that the
        pool's reset or close resolves; None when the connection was handed
        on (or dropped) at once."""
        state = self._state
        if not lease.active:
            return None  # taken back by the lease timeout while being released
        slot = lease.slot
        holder = self._slot_holders[slot]
        check = _pg.release_check(con, holder.clean_mark, self._max_queries)
        usable = check != _pg.UNUSABLE
        outcome = state.release_outcome(lease, check, holder.clean_mark == -1)
        if outcome is ReleaseOutcome.CLEAN:
            _pg.clear_listeners(con)
        done: asyncio.Future[None] | None = None
        if outcome is ReleaseOutcome.NEEDS_RESET:
            # asyncpg reports an unmanaged open transaction from release(),
            # through the loop's exception handler: do it here, in the
            # releasing task.
            # (A custom reset reports it itself, as asyncpg's.)
            if self._custom_reset:
                done = self._loop.create_future()
                state.release(lease, self._now(), outcome)
                self._spawn(self._reset_slot(slot, con, timeout, False, done))
            elif _pg.is_cancelling(con):
                rollback = _pg.warn_open_transaction(con)
                done = self._loop.create_future()
                state.release(lease, self._now(), outcome)
                self._spawn(self._reset_slot(slot, con, timeout, rollback, done))
            else:
                # The common case: one statement, driven in the caller's
                # task (no task, no loop hop; see _detach).
                if check == _pg.MUST_RESET:
                    rollback = _pg.warn_open_transaction(con)
                else:
                    rollback = False
                    _pg.clear_listeners(con)
                now = self._now()
                state.release(lease, now, outcome)
                if state.actions:
                    self._drain()
                return _Driver(self._reset_inline(slot, holder, con, timeout, rollback, now), self._spawn)
        else:
            if outcome is ReleaseOutcome.DISCARD and usable:
                # max_queries or an expired generation: asyncpg closes the
                # connection gracefully before release() returns.
                done = self._loop.create_future()
                self._closes_done[slot] = done
            state.release(lease, self._now(), outcome)
        self._after_hand_on()
        return done

    def _after_hand_on(self) -> None:
        """After a connection was handed on (or idled, or closed): carry out
        the core's actions; with none, only arm the idle-lifetime timer if
        it now has something to watch (the hot path skips _drain)."""
        state = self._state
        if state.actions:
            self._drain()
        elif self._timer is None and state.max_inactive_lifetime and state.size > state.min_size:
            self._arm_timer()  # an idle connection above min_size now has a lifetime to watch

    async def _reset_slot(
        self,
        slot: Slot,
        con: RawConnection,
        timeout: float | None,
        rollback: bool,
        done: asyncio.Future[None] | None = None,
    ) -> None:
        """Reset a RESETTING slot's connection, then hand it on or close it.

        Resolves ``done`` (the releasing caller's future) with None, or with
        the reset's error once the connection was given up."""
        # The caller's budget (release(timeout=), else the acquire's), or the
        # pool's reset_timeout; with neither, asyncpg's limits apply: its
        # background cancel gives up by closing the connection (then release
        # returns quietly), statements are bounded by command_timeout (else
        # by a 30 s safety bound: a silent network must not hold a slot forever).
        budget = timeout if timeout is not None else self._reset_timeout
        statement_limit = None
        if budget is None and _pg.command_timeout(con) is None:
            statement_limit = _DEFAULT_RESET_TIMEOUT
        error: Exception | None = None
        try:
            async with asyncio.timeout(budget):
                await self._reset_connection(con, rollback, statement_limit, budget)
        except Exception as exc:
            error = exc
        except asyncio.CancelledError:
            # Only terminate() cancels the pool's tasks: it has discarded the slot.
            _settle(done, None)
            raise
        if error is not None and slot.state is SlotState.RESETTING:
            logger.warning(
                "pool %r: reset failed (%s); closing the connection", self._name, _describe_error(error),
                extra={"event": "reset_failed", "pool": self._name},
            )
        if self._reset_finished(slot, con, error):
            _settle(done, error)
        else:
            _settle(done, None)  # the pool was terminated meanwhile

    async def _reset_inline(
        self, slot: Slot, holder: _Holder, con: RawConnection, timeout: float | None, rollback: bool, now: float
    ) -> Exception | None:
        """The default reset of a released connection (no custom reset, no
        cancelled query in flight), run by ``detached``: no ``asyncio.timeout``
        here (it would cancel the caller), asyncpg's ``timeout=`` instead.
        ROLLBACK (if a transaction is open) and the reset query go in one
        message. Returns the reset's error for the caller to raise, once the
        connection was given up (None if it was handed on)."""
        budget = timeout if timeout is not None else self._reset_timeout
        if budget is None and _pg.command_timeout(con) is None:
            # No limit asked for: asyncpg would wait forever. A watchdog (one
            # pool timer, not one per statement: asyncpg's timeout= costs a
            # loop timer and a callback per call) aborts a reset still
            # running after _DEFAULT_RESET_TIMEOUT, so a silent network
            # cannot hold a slot forever.
            holder.reset_since = now
            if self._reset_watchdog is None:
                self._watch_resets()
        if self._state.full_reset(holder.clean_mark == -1):
            query = con.get_reset_query()
            if rollback:
                query = f"ROLLBACK;\n{query}"
        else:
            query = "ROLLBACK" if rollback else ""
        error: Exception | None = None
        try:
            if query:
                await con.execute(query, timeout=budget)
        except Exception as exc:
            error = exc
        holder.reset_since = None
        if error is not None and slot.state is SlotState.RESETTING:
            logger.warning(
                "pool %r: reset failed (%s); closing the connection", self._name, _describe_error(error),
                extra={"event": "reset_failed", "pool": self._name},
            )
        return error if self._reset_finished(slot, con, error) else None

    def _watch_resets(self) -> None:
        if self._reset_watchdog is None and not self._closed:
            self._reset_watchdog = self._clock.call_at(self._now() + _DEFAULT_RESET_TIMEOUT, self._check_resets)

    def _check_resets(self) -> None:
        """The reset watchdog: abort releases' resets that have run for
        _DEFAULT_RESET_TIMEOUT seconds (the releasing caller then gets the
        connection's error, and the slot closes); re-arm while any run."""
        self._reset_watchdog = None
        now = self._now()
        pending = False
        for slot, holder in list(self._slot_holders.items()):
            started = holder.reset_since
            if started is None:
                continue
            if now - started >= _DEFAULT_RESET_TIMEOUT:
                holder.reset_since = None
                holder.unresponsive = True
                logger.warning(
                    "pool %r: a reset got no answer for %.0fs; aborting the connection",
                    self._name, now - started, extra={"event": "reset_failed", "pool": self._name},
                )
                slot.connection.terminate()
            else:
                pending = True
        if pending:
            self._watch_resets()

    def _reset_finished(self, slot: Slot, con: RawConnection, error: Exception | None) -> bool:
        """Hand a reset (or taken back) connection on, or close it; False if
        the pool was terminated meanwhile (nothing left to do)."""
        if slot.state is not SlotState.RESETTING:
            return False
        ok = error is None and not con.is_closed()
        holder = self._slot_holders[slot]
        if ok:
            holder.clean_mark = _pg.queries_count(con)
        else:
            holder.unresponsive = isinstance(error, TimeoutError)
        # On failure the core closes the slot; the close waits for a
        # cancelled query to stop on the server before the slot stops
        # counting towards max_size.
        self._state.reset_done(slot, self._now(), ok)
        self._after_hand_on()
        return True

    async def _reset_connection(
        self, con: RawConnection, rollback: bool, limit: float | None = None, budget: float | None = None
    ) -> None:
        """One round trip: ROLLBACK (if a transaction is open) and asyncpg's
        reset query in one simple-query message. ``limit`` bounds the
        statements, not the wait for a cancelled query."""
        if _pg.is_cancelling(con):
            # A cancelled query has not answered yet (asyncpg makes release
            # wait for it too, or the next holder inherits the cancellation).
            await _pg.wait_for_cancellation(con)
        if con.is_closed():
            return  # asyncpg's background cancel gave up and closed it
        async with asyncio.timeout(limit):
            await self._send_reset(con, rollback, budget)

    async def _send_reset(
        self, con: RawConnection, rollback: bool, budget: float | None, limit: float | None = None,
        full: bool | None = None,
    ) -> None:
        """``rollback``: an open transaction already reported (quietly, for a
        reclaimed or taken-back lease) that must end first. ``limit``:
        asyncpg's own timeout for the default reset's statement. ``full``:
        send the reset query (default: unless reset_mode="rollback"; a lease
        taken back or reclaimed in "auto" mode always gets it)."""
        if full is None:
            full = self._reset_mode != "rollback"
        if self._custom_reset:
            if rollback:
                await con.execute("ROLLBACK")
            if self._reset is not None:
                # asyncpg 0.32: Connection._reset() (report and roll back an
                # open transaction, drop listeners), then the hook.
                await _pg.base_reset(con)
                await self._reset(con)
            else:
                await con.reset(timeout=budget)  # sees the lease's state, as with asyncpg
            return
        rollback = rollback or con.is_in_transaction()
        query = con.get_reset_query() if full else ""
        if rollback:
            query = f"ROLLBACK;\n{query}" if query else "ROLLBACK"
        if query:
            await con.execute(query, timeout=limit)

    # ---------------------------------------------- leases: expiry and leaks

    def _reclaim(self, lease: Lease) -> None:
        """A proxy was garbage collected while still leased (or a re-check
        of one whose connection was still in use)."""
        state = self._state
        slot = lease.slot
        if not lease.active or self._closed:
            return
        holder = self._slot_holders[slot]
        if self._still_in_use(holder, slot):
            self._defer_reclaim(lease, holder, slot.connection)
            return
        con = slot.connection
        held = self._now() - lease.acquired_at
        if not state.reclaim(lease, self._now()):
            return
        report = (
            f"pool {self._name!r}: a connection was garbage collected without being released "
            f"(held {held:.3f}s); acquired at:\n{_stack.format_stack(lease.stack)}"
        )
        _pg.detach_proxy(con)  # the proxy is gone; drop the dead weak reference
        con._on_release()
        self._spawn(self._reset_slot(slot, con, None, _pg.warn_open_transaction(con, quiet=True)))
        self._drain()
        # Report last: with warnings turned into errors the bookkeeping above
        # must already be done.
        leak_logger.warning(report, extra=self._event_fields("leak", lease, held))
        self._emit("leak", lease, held)
        self._deliver_events()
        warnings.warn(report, ResourceWarning, stacklevel=1)

    def _still_in_use(self, holder: _Holder, slot: Slot) -> bool:
        """Whether a connection whose proxy is gone may still be in use: only
        a provably abandoned one is reclaimed (never one with an operation in
        flight, callbacks registered, or any object outside the pool still
        referring to it: a running query's coroutine, a transaction, cursor
        or prepared statement, a callback's closure)."""
        if _pg.has_callbacks(slot.connection) or _pg.is_cancelling(slot.connection):
            return True
        # Measured as base_refs was: no local reference to the connection.
        return _pg.reference_count(slot.connection) > holder.base_refs

    def _defer_reclaim(self, lease: Lease, holder: _Holder, con: RawConnection) -> None:
        if holder.orphan_checks == 0:
            # Listener callbacks get the connection itself from now on, not
            # the dead proxy.
            _pg.detach_proxy(con)
        # A query still running when its proxy went (`await (await
        # pool.acquire()).fetch(...)`) ends soon and is reclaimed quietly as a
        # leak; callbacks, or use that goes on, are worth a report now.
        if not holder.orphan_reported and (_pg.has_callbacks(con) or holder.orphan_checks >= 3):
            holder.orphan_reported = True
            held = self._now() - lease.acquired_at
            leak_logger.warning(
                "pool %r: a connection's proxy was garbage collected without being released, but the "
                "connection is still in use (callbacks registered, or an operation or object still "
                "refers to it); it stays leased until that ends. Acquired at:\n%s",
                self._name, _stack.format_stack(lease.stack),
                extra=self._event_fields("leak_suspect", lease, held),
            )
            self._emit("leak_suspect", lease, held, collected=True)
            self._deliver_events()
        holder.orphan_checks += 1
        delay = min(_ORPHAN_RECHECK_CAP, _ORPHAN_RECHECK_FIRST * 2 ** min(holder.orphan_checks - 1, 16))
        self._clock.call_at(self._now() + delay, lambda: self._reclaim(lease))

    def _take_back(self, lease: Lease) -> None:
        slot = lease.slot
        con = slot.connection
        held = self._now() - lease.acquired_at
        limit = (lease.deadline or 0) - lease.acquired_at
        reason = (
            f"the lease expired: held {held:.3f}s, lease_timeout is {limit:.3f}s; "
            "the connection was taken back by the pool"
        )
        _pg.detach_proxy(con, reason)
        con._on_release()  # invalidates cursors, statements and transactions made through the proxy
        leak_logger.error(
            "pool %r: lease expired after %.3fs (lease_timeout %.3fs); taking the connection back. "
            "Acquired at:\n%s",
            self._name, held, limit, _stack.format_stack(lease.stack),
            extra=self._event_fields("lease_expired", lease, held),
        )
        self._emit("lease_expired", lease, held, lease_timeout=limit)
        self._spawn(self._take_back_slot(slot, con))

    async def _take_back_slot(self, slot: Slot, con: RawConnection) -> None:
        # The holder may be in the middle of a query. asyncpg exposes no
        # "busy" flag, but refuses a second operation at once without sending
        # anything: so try the reset, and if refused, cancel the running query
        # on the server (asyncpg's cancel request) and retry until it is free.
        budget = self._reset_timeout or _DEFAULT_RESET_TIMEOUT
        error: Exception | None = None
        try:
            async with asyncio.timeout(budget):
                cancel_sent = False
                while not con.is_closed():
                    try:
                        await self._reset_connection(con, con.is_in_transaction())
                    except _pg_exceptions.InterfaceError as exc:
                        if "another operation" not in str(exc):
                            raise
                    else:
                        break
                    if not cancel_sent:
                        cancel_sent = True
                        await _pg.cancel_running_query(con)
                    await asyncio.sleep(0.005)  # the server's reply frees the protocol
        except Exception as exc:
            error = exc
            logger.warning(
                "pool %r: could not take back an expired connection cleanly (%s); closing it",
                self._name, _describe_error(exc), extra={"event": "reset_failed", "pool": self._name},
            )
        # A cancel here comes only from terminate(), which discarded the slot.
        self._reset_finished(slot, con, error)

    def _leak_suspect(self, lease: Lease) -> None:
        held = self._now() - lease.acquired_at
        leak_logger.warning(
            "pool %r: connection held for %.3fs (leak_warning_after %.3fs), still not released; "
            "task %s; acquired at:\n%s",
            self._name, held, self._leak_warning_after or 0.0, lease.task_name or "?",
            _stack.format_stack(lease.stack),
            extra=self._event_fields("leak_suspect", lease, held),
        )
        self._emit("leak_suspect", lease, held)

    # --------------------------------------------------- the action runner

    def _drain(self) -> None:
        """Carry out what the state core asked for."""
        actions = self._state.actions
        while actions:
            batch = actions[:]
            actions.clear()
            for action in batch:
                match action:
                    case Wake(waiter):
                        if waiter.future.done():
                            # Its task was cancelled while the grant was in flight.
                            self._state.cancel_waiter(waiter, self._now())
                        else:
                            waiter.future.set_result(None)
                    case Connect(slot):
                        task = self._spawn(self._connect_slot(slot))
                        self._connect_tasks.add(task)
                        task.add_done_callback(self._connect_tasks.discard)
                    case Close(slot):
                        self._close_slot(slot)
                    case TimeOut(waiter):
                        if not waiter.future.done():
                            waiter.future.set_exception(
                                PoolTimeoutError(self._busy_message("timed out waiting for a connection",
                                                                    self._now(), waiter))
                            )
                    case Fail(waiter, error):
                        self._fail_waiter(waiter, error)
                    case TakeBack(lease):
                        self._take_back(lease)
                    case LeakSuspect(lease):
                        self._leak_suspect(lease)
                    case Shed(waiter, reason):
                        if not waiter.future.done():
                            waiter.future.set_exception(PoolOverloadedError(self._shed_message(reason)))
                    case _:
                        assert_never(action)
        if self._state.size == 0:
            self._drained.set()
        self._arm_timer()
        if self._pending_events:
            self._deliver_events()

    def _fail_waiter(self, waiter: Waiter, error: BaseException) -> None:
        if waiter.future.done():
            return
        if isinstance(error, PoolClosedError):
            error = PoolClosedError(str(error))
        # A connect error reaches the waiters as is, as asyncpg raises it from
        # acquire(): `except asyncpg.InvalidPasswordError` keeps working.
        waiter.future.set_exception(error)

    def _arm_timer(self) -> None:
        when = self._state.next_deadline()
        if when == self._timer_at:
            return
        if when is not None and self._timer_at is not None and self._timer_at <= when:
            # The armed callback comes first and re-arms for what is then
            # due: no need to replace a loop timer on every acquire.
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_at = when
        if when is not None:
            self._timer = self._clock.call_at(when, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = None
        if self._closed:
            return
        self._state.advance(self._now())
        self._drain()

    def _spawn(self, coro: Awaitable[Any]) -> asyncio.Task[Any]:
        task: asyncio.Task[Any] = self._loop.create_task(coro)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # ------------------------------------------------- connects and closes

    async def _connect_slot(self, slot: Slot, *, raise_errors: bool = False) -> None:
        state = self._state
        failure: BaseException | None = None
        try:
            con = await self._get_new_connection()
        except asyncio.CancelledError:
            state.connect_cancelled(slot)
            self._drain()
            raise
        except BaseException as exc:
            failure = exc
        if failure is not None:
            if slot.state is SlotState.CONNECTING:
                state.connect_failed(slot, self._now(), failure, _is_refusal(failure))
            # Reported outside the except block: a failing listener's
            # traceback must not carry the connect error's full text.
            self._report_connect_failure(failure)
            self._drain()
            if state.floor_deficit() and self._initialized and (
                self._maintenance_task is None or self._maintenance_task.done()
            ):
                self._maintenance_task = self._spawn(self._restore_floor())
            if raise_errors:
                raise failure
            return
        if slot.state is not SlotState.CONNECTING:  # terminated meanwhile
            con.terminate()
            return
        # Mark 0: statements of init= (and of a connect= callback) make the
        # first lease's release reset, as asyncpg resets after every lease.
        # reset_mode="auto" cannot see them (they run on the raw connection):
        # -1, always reset after the first lease.
        holder = _Holder(self, slot, con, clean_mark=-1 if self._reset_mode == "auto" else 0)
        self._slot_holders[slot] = holder
        _pg.attach_holder(con, holder)
        state.connect_succeeded(slot, con, self._now())
        del con  # measured below with no reference but the pool's own
        holder.base_refs = _pg.reference_count(slot.connection)
        self._note_server_status()
        self._drain()

    async def _restore_floor(self) -> None:
        """min_size upkeep once connects fail and nobody waits: one connect
        after 1, 2, 4 ... 60 s (asyncpg 0.32's floor retry schedule), until the
        floor is met. Waiting tasks do not depend on it: their connects are
        paced by the core's backoff (a refused one is retried within 50 ms)."""
        state = self._state
        delay = _FLOOR_RETRY_FIRST
        while True:
            await asyncio.sleep(delay)
            if self._closed or state.closing or not state.floor_deficit():
                return
            slot = state.plan_floor_connect(self._now())
            if slot is None:
                continue  # a connect is under way: look again later
            await self._connect_slot(slot)
            if slot.state is SlotState.CLOSED:  # the connect failed
                delay = min(delay * 2, _FLOOR_RETRY_CAP)
            else:
                delay = _FLOOR_RETRY_FIRST
            if not state.floor_deficit():
                return

    def _report_connect_failure(self, error: BaseException) -> None:
        described = _describe_error(error)
        logger.warning(
            "pool %r: connect failed (%s); %d consecutive failures",
            self._name, described, self._state.connect_failures,
            extra={"event": "connect_failed", "pool": self._name, "error": described},
        )
        if not self._state.waiting and not self._state.closing:
            # Nobody waits: the min_size upkeep's connect. asyncpg logs these
            # on its own logger, and monitoring of asyncpg programs reads it.
            _asyncpg_logger.warning("Failed to restore the pool connection floor; retrying (%s)", described)
        self._emit_event("connect_failed", error=described, consecutive_failures=self._state.connect_failures)
        self._note_server_status()

    def _note_server_status(self) -> None:
        """Log and emit the breaker's transitions: up, backing_off, down."""
        status = self._state.server_status(self._now()).value
        previous, self._server_status = self._server_status, status
        if status == previous:
            return
        level = logging.INFO if status == "up" else logging.WARNING
        logger.log(
            level, "pool %r: server status %s -> %s", self._name, previous, status,
            extra={"event": "server_status", "pool": self._name, "from": previous, "to": status},
        )
        self._emit_event("server_status", **{"from": previous, "to": status})

    async def _get_new_connection(self) -> RawConnection:
        con = await self._connect(
            *self._connect_args,
            loop=self._loop,
            connection_class=self._connection_class,
            record_class=self._record_class,
            **self._connect_kwargs,
        )
        if not isinstance(con, self._connection_class):
            good = f"{self._connection_class.__module__}.{self._connection_class.__name__}"
            bad_type = type(con)
            bad = bad_type.__name__ if bad_type.__module__ == "builtins" else f"{bad_type.__module__}.{bad_type.__name__}"
            raise _pg_exceptions.InterfaceError(
                f"expected pool connect callback to return an instance of '{good}', got '{bad}'"
            )
        if self._init is not None:
            try:
                await self._init(con)
            except BaseException:
                await con.close()
                raise
            if con.is_closed():
                # asyncpg 0.32's error, so the floor upkeep retries it.
                raise _pg_exceptions.ConnectionDoesNotExistError("connection was closed during pool initialization")
        return con

    def _close_slot(self, slot: Slot) -> None:
        holder = self._slot_holders.pop(slot, None)
        con = slot.connection
        if holder is not None:
            holder._con = None  # our own close: no _release_on_close callback
        lost = holder is not None and holder.lost_while_leased
        unresponsive = holder is not None and holder.unresponsive
        if (
            con is None
            or self._terminating
            or unresponsive
            or (con.is_closed() and not lost and not _pg.is_cancelling(con))
        ):
            if con is not None:
                con.terminate()
            self._slot_closed(slot)
            return
        self._spawn(self._close_connection(slot, con, lost))

    async def _close_connection(self, slot: Slot, con: RawConnection, lost: bool) -> None:
        """Close; the slot counts towards max_size until the backend is gone.

        A cancelled query is first waited for (the server confirms it), else
        a graceful close could not run and an abort would leave the backend
        running the query beside its replacement. A connection whose socket
        died under a lease (``lost``: a network reset) may still have its
        backend running the lease's query: cancel it (the server acknowledges
        a cancel request by closing that connection)."""
        try:
            if lost:
                async with asyncio.timeout(self._reset_timeout or _LOST_BACKEND_CANCEL_TIMEOUT):
                    await _pg.cancel_running_query(con)
            else:
                budget = self._reset_timeout or _DEFAULT_RESET_TIMEOUT
                if _pg.is_cancelling(con):
                    await _pg.wait_for_cancellation(con, budget)
                await con.close(timeout=budget)
        except Exception:
            con.terminate()  # lost: the server is unreachable; nothing more to do for that backend
        except asyncio.CancelledError:
            con.terminate()  # terminate() of the pool; the books are settled below
            raise
        finally:
            self._slot_closed(slot)
            self._drain()

    def _slot_closed(self, slot: Slot) -> None:
        """The slot's backend is gone: free its place, wake whoever waits for it."""
        self._state.closed(slot, self._now())
        _settle(self._closes_done.pop(slot, None), None)

    def _connection_lost(self, slot: Slot) -> None:
        """asyncpg noticed the connection died (server restart, terminate)."""
        if slot.state is SlotState.LEASED:
            self._slot_holders[slot].lost_while_leased = True
        if slot.state in (SlotState.IDLE, SlotState.LEASED, SlotState.RESERVED):
            if slot.connection is not None:
                _pg.detach_proxy(slot.connection)
            self._state.discard(slot, self._now())
            self._drain()

    # ---------------------------------------------------------- shutdown

    async def close(self) -> None:
        """Wait for every connection to be released, then close them all.

        Waiting tasks fail with :class:`~safepool.PoolClosedError`. On error or
        cancellation the pool is terminated, as with asyncpg."""
        if self._closed:
            return
        self._check_init()
        warn_handle = self._loop.call_later(60, self._warn_on_long_close)
        try:
            self._state.begin_close(PoolClosedError("pool is closing"))
            if self._maintenance_task is not None:
                self._maintenance_task.cancel()  # nothing to keep a floor for
            self._drain()
            # Connects under way get a short grace to finish (with asyncpg
            # they belong to acquires, so they complete and run init=); one
            # that never answers (a black-holed server) must not hold close()
            # up to asyncpg's connect timeout.
            if self._connect_tasks:
                await asyncio.wait(list(self._connect_tasks), timeout=_CONNECT_GRACE_ON_CLOSE)
            for task in list(self._connect_tasks):
                task.cancel()
            self._drain()
            while self._state.size:
                self._drained.clear()
                self._drain()
                if self._state.size:
                    await self._drained.wait()
        except BaseException:
            self.terminate()
            raise
        finally:
            warn_handle.cancel()
            self._closed = True
            self._cancel_timer()
        if self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    def _warn_on_long_close(self) -> None:
        in_use = [lease for lease in self._state.leases()]
        logger.warning(
            "pool %r: close() is taking over 60 seconds: %d connection(s) not released. %s",
            self._name, len(in_use), self._describe_oldest(self._now(), 3),
        )

    def terminate(self) -> None:
        """Terminate all connections at once."""
        if self._closed:
            return
        self._check_init()
        self._closed = True
        self._terminate_all()

    def _terminate_all(self) -> None:
        state = self._state
        self._terminating = True
        state.begin_close(PoolClosedError("pool is closed"))
        now = self._now()
        if self._listeners:
            # Leases the code never released, ended here: the leak guards
            # report them (they vanish from leases() below).
            for lease in state.leases():
                self._emit("lease_ended", lease, now - lease.acquired_at, reason="terminate")
        for slot in state.slots():
            if slot.connection is not None:
                _pg.detach_proxy(slot.connection)
            state.discard(slot, now)
        for task in list(self._tasks):
            task.cancel()  # connects record themselves as cancelled
        self._drain()
        self._cancel_timer()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
            self._timer_at = None
        if self._reset_watchdog is not None:
            self._reset_watchdog.cancel()
            self._reset_watchdog = None

    async def expire_connections(self) -> None:
        """Replace every open connection: idle ones now, leased ones on release."""
        self._state.expire_connections()
        self._drain()

    def set_connect_args(self, dsn: str | None = None, **connect_kwargs: Any) -> None:
        """Use these arguments for every new connection (existing ones stay
        until they expire; see :meth:`expire_connections`)."""
        self._connect_args = [dsn]
        self._connect_kwargs = connect_kwargs

    def resize(self, *, max_size: int, min_size: int | None = None) -> None:
        """Change the pool's bounds at run time without dropping any lease.

        Shrinking closes idle connections now and leased ones as they return."""
        if isinstance(max_size, bool) or not isinstance(max_size, int) or max_size <= 0:
            raise ValueError(f"max_size must be an int > 0, got {max_size!r}")
        if min_size is not None:
            if isinstance(min_size, bool) or not isinstance(min_size, int) or not 0 <= min_size <= max_size:
                raise ValueError(f"min_size must be an int between 0 and max_size, got {min_size!r}")
            self._state.min_size = min_size
            self._min_size = min_size
        self._state.resize(max_size, self._now())
        self._min_size = self._state.min_size
        self._drain()

    # ----------------------------------------------------------- getters

    # asyncpg's private pool._holders / pool._queue, read-only: kept for
    # compatibility, not API (see _compat.py).
    @property
    def _holders(self) -> tuple[HolderView, ...]:
        return _compat_holders(self)

    @property
    def _queue(self) -> QueueView:
        return _compat_queue(self)

    def is_closing(self) -> bool:
        return self._closed or self._state.closing

    def get_size(self) -> int:
        """Connections open on the server (being opened ones excluded)."""
        return self._state.connected()

    def get_init_size(self) -> int:
        return self._init_size

    def get_min_size(self) -> int:
        return self._min_size

    def get_max_size(self) -> int:
        return self._state.max_size

    def get_idle_size(self) -> int:
        return self._state.idle

    @property
    def name(self) -> str:
        return self._name

    def stats(self) -> PoolStats:
        """An immutable snapshot of sizes, counters and distributions."""
        return build_stats(self._name, self._state, self._now())

    def leases(self, *, stacks: bool = True) -> list[LeaseInfo]:
        """The connections currently held by application code, oldest first.

        :param stacks: format each lease's acquire stack (``LeaseInfo.stack``;
            False leaves it None and costs no source-line lookups)."""
        now = self._now()
        infos = [self._lease_info(lease, now, stacks) for lease in self._state.leases()]
        infos.sort(key=lambda info: -info.age)
        return infos

    async def health(self, **options: Any) -> HealthReport:
        """Readiness check: ``ok`` / ``degraded`` / ``failing`` with reasons.
        See :func:`safepool.health.check_health` for the options."""
        from .health import check_health

        return await check_health(self, **options)

    def add_listener(self, callback: Callable[[dict[str, Any]], None]) -> None:
        """Call ``callback(event)`` for every pool event (a dict with at least
        ``event`` and ``pool``): connect_failed, server_status, lease_expired,
        leak, leak_suspect, lease_ended, late_release (docs/metrics.md lists
        their fields). Exceptions in callbacks are logged and swallowed.

        The dict form of :meth:`add_event_listener`'s typed events, kept for
        compatibility (kinds added later are not sent here)."""
        self._listeners.append(_DictListener(callback))

    def remove_listener(self, callback: Callable[[dict[str, Any]], None]) -> None:
        """Remove a callback added with :meth:`add_listener`.

        :raises ValueError: it was not added."""
        for listener in self._listeners:
            if isinstance(listener, _DictListener) and listener.callback == callback:
                self._listeners.remove(listener)
                return
        raise ValueError(f"{callback!r} is not a listener of this pool")

    def __repr__(self) -> str:
        state = self._state
        status = "closed" if self._closed else "closing" if state.closing else "open"
        return (
            f"<safepool.Pool {self._name!r} {status} size={state.size}/{state.max_size} "
            f"idle={state.idle} in_use={state.in_use} resetting={state.count(SlotState.RESETTING)} waiting={state.waiting}>"
        )

    # ------------------------------------------------------------ helpers

    def _check_init(self) -> None:
        if not self._initialized:
            if self._initializing:
                raise _pg_exceptions.InterfaceError(
                    "pool is being initialized, but not yet ready: "
                    "likely there is a race between creating a pool and using it"
                )
            raise _pg_exceptions.InterfaceError("pool is not initialized")
        if self._closed:
            raise PoolClosedError("pool is closed")

    def _describe_oldest(self, now: float, limit: int) -> str:
        leases = sorted(self._state.leases(), key=lambda lease: lease.acquired_at)[:limit]
        if not leases:
            return "no connection is leased"
        parts = []
        for lease in leases:
            where = _stack.acquire_site(lease.stack) if lease.stack else "unknown site (capture_stack is off)"
            if lease.site is not None:
                where = f"{where} (site {lease.site!r})"
            task = f", task {lease.task_name}" if lease.task_name else ""
            parts.append(f"{now - lease.acquired_at:.3f}s at {where}{task}")
        return "oldest leases: " + "; ".join(parts)

    def _busy_message(self, what: str, now: float, waiter: Waiter | None = None) -> str:
        state = self._state
        if waiter is not None and self._listeners:
            # An acquire timed out (the only caller with a waiter): who holds what, now.
            self._pending_events.append(_events.AcquireTimedOut(
                self._name, now - waiter.enqueued_at, state.max_size, state.in_use, state.idle,
                state.count(SlotState.CONNECTING), state.waiting, state.max_waiters,
                tuple(sorted((self._lease_info(lease, now) for lease in state.leases()), key=lambda i: -i.age)),
            ))
        waited = f" after {now - waiter.enqueued_at:.3f}s" if waiter is not None else ""
        sites = ""
        if self._site_caps:
            usage = ", ".join(f"{name}: {held} in use, {waiting} waiting" for name, held, waiting in state.site_usage(3))
            sites = f", site cap={state.site_cap} ({usage})"
        return (
            f"pool {self._name!r}: {what}{waited}: max_size={state.max_size}, in use={state.in_use}, "
            f"idle={state.idle}, connecting={state.count(SlotState.CONNECTING)}, waiting={state.waiting}, "
            f"max_waiters={state.max_waiters}{sites}; {self._describe_oldest(now, 3)}"
        )

    def _shed_message(self, why: str) -> str:
        # Cheaper than _busy_message (no lease listing): under a surge the
        # adaptive queue sheds thousands of waiters a second.
        state = self._state
        return (
            f"pool {self._name!r}: {why}: max_size={state.max_size}, in use={state.in_use}, "
            f"waiting={state.waiting}"
        )

    def _event_fields(self, event: str, lease: Lease, held: float) -> dict[str, Any]:
        return {
            "event": event,
            "pool": self._name,
            "lease_id": lease.id,
            "held_seconds": held,
            "acquired_at": _stack.acquire_site(lease.stack) if lease.stack else None,
            "task_name": lease.task_name,
            "site": lease.site,
        }

    def _emit(self, event: str, lease: Lease, held: float, **extra: Any) -> None:
        """Queue a lease event (delivered by _deliver_events, after the books settle)."""
        if self._listeners:
            info = self._lease_info(lease, lease.acquired_at + held)
            self._pending_events.append(_LEASE_EVENTS[event](self._name, info, **extra))

    def _emit_event(self, event: str, **fields: Any) -> None:
        """Queue a pool event (delivered by _deliver_events, after the books settle)."""
        if not self._listeners:
            return
        if event == "server_status":
            fields = {"previous": fields["from"], "status": fields["to"]}
        self._pending_events.append(_POOL_EVENTS[event](self._name, **fields))
        if len(self._pending_events) == 1:
            # Every emitter is followed by a _drain() or _deliver_events();
            # this is the safety net should one not be.
            try:
                self._loop.call_soon(self._deliver_events)
            except RuntimeError:
                pass  # the loop is closed

    def _deliver_events(self) -> None:
        """Hand queued events to the listeners, in order. Never runs inside
        the action loop; a listener that calls into the pool (even one that
        emits more events) sees settled books, and its events follow."""
        if self._delivering:
            return
        self._delivering = True
        pending = self._pending_events
        try:
            while pending:
                event = pending.popleft()
                for callback in list(self._listeners):
                    try:
                        callback(event)
                    except Exception:
                        # Formatted now: a record holding the traceback would keep the
                        # callers' frames, and the connections they refer to, alive.
                        logger.error("pool %r: event listener failed\n%s", self._name, traceback.format_exc().rstrip())
        finally:
            self._delivering = False

    def _lease_info(self, lease: Lease, now: float, stacks: bool = True) -> LeaseInfo:
        return LeaseInfo(
            id=lease.id,
            age=now - lease.acquired_at,
            deadline_in=None if lease.deadline is None else lease.deadline - now,
            task_name=lease.task_name,
            acquired_at=_stack.acquire_site(lease.stack) if lease.stack else None,
            stack=_stack.format_stack(lease.stack) if lease.stack and stacks else None,
            site=lease.site,
            task_ref=lease.task_ref,
        )

    def _drop_statement_cache(self) -> None:
        for slot in self._state.slots():
            if slot.connection is not None:
                _pg.drop_statement_cache(slot.connection)

    def _drop_type_cache(self) -> None:
        for slot in self._state.slots():
            if slot.connection is not None:
                _pg.drop_type_cache(slot.connection)

    # -------------------------------------------- asyncpg's query shortcuts

    async def execute(self, query: str, *args: Any, timeout: float | None = None) -> str:
        async with self.acquire() as con:
            return await con.execute(query, *args, timeout=timeout)  # type: ignore[no-any-return]

    async def executemany(self, command: str, args: Iterable[Any], *, timeout: float | None = None) -> None:
        async with self.acquire() as con:
            await con.executemany(command, args, timeout=timeout)

    async def fetch(self, query: str, *args: Any, timeout: float | None = None, record_class: Any = None) -> list[Any]:
        async with self.acquire() as con:
            return await con.fetch(query, *args, timeout=timeout, record_class=record_class)  # type: ignore[no-any-return]

    async def fetchval(self, query: str, *args: Any, column: int = 0, timeout: float | None = None) -> Any:
        async with self.acquire() as con:
            return await con.fetchval(query, *args, column=column, timeout=timeout)

    async def fetchrow(self, query: str, *args: Any, timeout: float | None = None, record_class: Any = None) -> Any:
        async with self.acquire() as con:
            return await con.fetchrow(query, *args, timeout=timeout, record_class=record_class)

    async def fetchmany(
        self, query: str, args: Iterable[Any], *, timeout: float | None = None, record_class: Any = None
    ) -> list[Any]:
        async with self.acquire() as con:
            return await con.fetchmany(query, args, timeout=timeout, record_class=record_class)  # type: ignore[no-any-return]

    async def copy_from_table(self, table_name: str, **kwargs: Any) -> str:
        async with self.acquire() as con:
            return await con.copy_from_table(table_name, **kwargs)  # type: ignore[no-any-return]

    async def copy_from_query(self, query: str, *args: Any, **kwargs: Any) -> str:
        async with self.acquire() as con:
            return await con.copy_from_query(query, *args, **kwargs)  # type: ignore[no-any-return]

    async def copy_to_table(self, table_name: str, **kwargs: Any) -> str:
        async with self.acquire() as con:
            return await con.copy_to_table(table_name, **kwargs)  # type: ignore[no-any-return]

    async def copy_records_to_table(self, table_name: str, **kwargs: Any) -> str:
        async with self.acquire() as con:
            return await con.copy_records_to_table(table_name, **kwargs)  # type: ignore[no-any-return]

    # ------------------------------------------------------ awaiting the pool

    def __await__(self) -> Any:
        return self._async__init__().__await__()

    async def __aenter__(self) -> Pool:
        await self._async__init__()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ------------------------------------------- the observation surface
    # What extensions (the pytest leak guard, the exporters, health) use;
    # docs/api.md, "Observing a pool".

    def add_event_listener(self, callback: Callable[[_events.PoolEvent], None]) -> None:
        """Call ``callback(event)`` with every :class:`~safepool.events.PoolEvent`.

        Delivered on the pool's event loop thread once the pool's books are
        settled (never from inside its bookkeeping), in the order they
        happened. An exception in a callback is logged (``event listener
        failed``) and the other callbacks still run. With no listener the
        pool builds no event at all."""
        self._listeners.append(callback)

    def remove_event_listener(self, callback: Callable[[_events.PoolEvent], None]) -> None:
        """Remove a callback added with :meth:`add_event_listener`.

        :raises ValueError: it was not added."""
        self._listeners.remove(callback)

    @property
    def capture_stack(self) -> bool:
        """Whether each acquire records its call stack and its task (for leak
        reports, :meth:`leases` and lease events). Settable at any time; it
        applies to later acquires. Costs a few microseconds per acquire."""
        return bool(self._capture_stack)

    @capture_stack.setter
    def capture_stack(self, on: bool) -> None:
        if not isinstance(on, bool):
            raise TypeError(f"capture_stack must be True or False, got {on!r}")
        self._capture_stack = on

    @property
    def closed(self) -> bool:
        """True once :meth:`close` finished or :meth:`terminate` was called
        (:meth:`is_closing` is also true while closing)."""
        return self._closed

    @property
    def options(self) -> PoolOptions:
        """The pool's settings, with the current sizes; never the DSN, a
        password or other connection arguments."""
        state = self._state
        return PoolOptions(
            name=self._name,
            min_size=self._min_size,
            max_size=state.max_size,
            init_size=self._init_size,
            max_queries=self._max_queries,
            max_inactive_connection_lifetime=state.max_inactive_lifetime,
            lease_timeout=self._lease_timeout,
            leak_warning_after=self._leak_warning_after,
            acquire_timeout=self._acquire_timeout,
            max_waiters=state.max_waiters,
            max_connecting=state.max_connecting,
            fail_fast=state.breaker_threshold is not None,
            wait_on_connect_error=state.wait_on_connect_error,
            reset_mode=self._reset_mode,
            reset_timeout=self._reset_timeout,
        )

    async def release_lease(self, lease_id: int) -> bool:
        """Release a lease by its id (:attr:`LeaseInfo.id <safepool.LeaseInfo.id>`),
        through :meth:`release`: for tools that clean up after leaked
        connections (the pytest leak guard). Its proxy stops working, as
        after any release.

        Returns False, doing nothing, when no open lease has that id, or its
        proxy was already garbage collected (the pool reclaims that one
        itself). Raises what :meth:`release` raises."""
        for lease in self._state.leases():
            if lease.id == lease_id and lease.active and lease.slot.connection is not None:
                proxy = _pg.live_proxy(lease.slot.connection)
                if proxy is None:
                    return False
                await self.release(proxy)
                return True
        return False

    def add_timing_sink(self, kind: str, callback: Callable[[float], None]) -> None:
        """Call ``callback(seconds)`` with every duration the pool records:
        ``kind`` ``"wait"`` (acquire wait, 0.0 when a connection was idle),
        ``"lease"`` (acquire to release, expiry or reclaim) or ``"connect"``
        (successful connects). For exporters that need each value (an
        OpenTelemetry histogram); the pool's own distributions in
        :meth:`stats` are fed as before.

        The callback runs synchronously inside the pool's bookkeeping, on its
        loop thread: it must be quick and must not call into the pool. An
        exception in it is logged once per pool and kind, and swallowed. May
        be called from any thread (the sink is installed on the loop; values
        recorded before that are not seen). With no sink the pool pays
        nothing.

        :raises ValueError: unknown ``kind``."""
        field = _TIMINGS.get(kind)
        if field is None:
            raise ValueError(f"kind must be one of {sorted(_TIMINGS)}, got {kind!r}")

        def install() -> None:
            current: Histogram = getattr(self._state, field)
            if not isinstance(current, TeeHistogram):
                current = TeeHistogram(current, f"pool {self._name!r}: a {kind} timing sink")
                setattr(self._state, field, current)
            current.sinks.append(callback)

        self._on_loop(install)

    def remove_timing_sink(self, kind: str, callback: Callable[[float], None]) -> None:
        """Remove a sink added with :meth:`add_timing_sink` (unknown ones are
        ignored); the last one removed restores the plain histogram. May be
        called from any thread.

        :raises ValueError: unknown ``kind``."""
        field = _TIMINGS.get(kind)
        if field is None:
            raise ValueError(f"kind must be one of {sorted(_TIMINGS)}, got {kind!r}")

        def uninstall() -> None:
            current: Histogram = getattr(self._state, field)
            if isinstance(current, TeeHistogram):
                if callback in current.sinks:
                    current.sinks.remove(callback)
                if not current.sinks:
                    setattr(self._state, field, current.inner)

        self._on_loop(uninstall)

    def stats_threadsafe(self, timeout: float | None = 5.0) -> PoolStats:
        """:meth:`stats`, from any thread: taken on the pool's event loop.

        :meth:`stats` itself must be called on the loop's thread (it reads
        structures the loop changes). From another thread, while the loop
        runs, this schedules it there and waits up to ``timeout`` seconds
        (None: no limit); on the loop's thread, or while the loop is not
        running, it calls :meth:`stats` directly.

        :raises TimeoutError: the loop did not run it in time (it is blocked)."""
        return self.call_threadsafe(self.stats, timeout)

    def call_threadsafe(self, function: Callable[[], _T], timeout: float | None = 5.0) -> _T:
        """Run ``function()`` on the pool's event loop and return its result,
        from any thread (see :meth:`stats_threadsafe`): for exporters that
        read several things in one consistent moment.

        :raises TimeoutError: the loop did not run it within ``timeout`` seconds.
        :raises Exception: what ``function`` raised."""
        loop = self._loop
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop or not loop.is_running() or loop.is_closed():
            return function()
        result: concurrent.futures.Future[_T] = concurrent.futures.Future()

        def run() -> None:
            if not result.set_running_or_notify_cancel():
                return
            try:
                result.set_result(function())
            except BaseException as exc:
                result.set_exception(exc)

        loop.call_soon_threadsafe(run)
        try:
            return result.result(timeout)
        except concurrent.futures.TimeoutError:
            result.cancel()
            raise TimeoutError(
                f"pool {self._name!r}: its event loop did not answer within {timeout}s"
            ) from None

    def _on_loop(self, action: Callable[[], None]) -> None:
        """Run ``action`` on the pool's loop thread: now if this is it (or the
        loop is not running), else soon."""
        loop = self._loop
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop or loop.is_closed() or not loop.is_running():
            action()
        else:
            loop.call_soon_threadsafe(action)


class PoolAcquireContext:
    """What ``pool.acquire()`` returns: awaitable, or an async context manager."""

    __slots__ = ("pool", "timeout", "lease_timeout", "site", "connection", "done")

    def __init__(self, pool: Pool, timeout: float | None, lease_timeout: Any, site: str | None = None) -> None:
        self.pool = pool
        self.timeout = timeout
        self.lease_timeout = lease_timeout
        self.site = site
        self.connection: PoolConnectionProxy | None = None
        self.done = False

    # Plain methods returning the pool's coroutine: one coroutine frame per
    # acquire and per release instead of two (the hot path).
    def __aenter__(self) -> Coroutine[Any, Any, PoolConnectionProxy]:
        if self.connection is not None or self.done:
            raise _pg_exceptions.InterfaceError("a connection is already acquired")
        return self.pool._acquire(self.timeout, self.lease_timeout, self, self.site)

    def __aexit__(
        self,
        exc_type: type[BaseException] | None = None,
        exc_val: BaseException | None = None,
        exc_tb: TracebackType | None = None,
    ) -> Coroutine[Any, Any, None]:
        self.done = True
        con, self.connection = self.connection, None
        return self.pool.release(con)

    def __await__(self) -> Any:
        self.done = True
        return self.pool._acquire(self.timeout, self.lease_timeout, None, self.site).__await__()


def _settle(future: asyncio.Future[None] | None, error: BaseException | None) -> None:
    """Resolve a caller's future unless its task gave up on it (cancelled)."""
    if future is None or future.done():
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)


def _validate_site_share(share: Any) -> None:
    if share is None:
        return
    if isinstance(share, bool) or not isinstance(share, (int, float)):
        raise TypeError(f"max_site_share must be a number or None, got {type(share).__name__}")
    if not 0 < share <= 1:
        raise ValueError(
            f"max_site_share must be > 0 and <= 1 (the fraction of max_size one acquire site may hold), "
            f"got {share!r}"
        )


def _adaptive_queue(policy: Any, target: Any, interval: Any) -> AdaptiveQueue | None:
    if policy not in QUEUE_POLICIES:
        raise ValueError(f"queue_policy must be one of {QUEUE_POLICIES}, got {policy!r}")
    target = _validate_timeout("queue_target", target, allow_none=False)
    interval = _validate_timeout("queue_interval", interval, allow_none=False)
    if not target or not interval:
        raise ValueError("queue_target and queue_interval must be > 0 seconds")
    if target >= interval:
        raise ValueError(
            f"queue_target ({target}s) must be shorter than queue_interval ({interval}s): "
            "the queue counts as standing only after a whole interval"
        )
    return AdaptiveQueue(target, interval) if policy == "adaptive" else None


def _is_refusal(error: BaseException) -> bool:
    """A connect the server refused at once (nothing listening, starting up or
    shutting down, out of connection slots): cheap to retry soon. Timeouts and
    everything else back off longer."""
    if isinstance(error, (ConnectionRefusedError, FileNotFoundError)):
        return True
    return isinstance(error, (_pg_exceptions.CannotConnectNowError, _pg_exceptions.TooManyConnectionsError))


def _describe_error(error: BaseException | None) -> str:
    """Type and first line of an error: enough for an operator, never a DSN."""
    if error is None:
        return "none"
    text = str(error).splitlines()[0] if str(error) else ""
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def create_pool(
    dsn: str | None = None,
    *,
    init_size: int | None = None,
    min_size: int = 10,
    max_size: int = 10,
    max_queries: int = 50000,
    max_inactive_connection_lifetime: float = 300.0,
    connect: Callable[..., Awaitable[_pg_connection.Connection]] | None = None,
    setup: Callable[[PoolConnectionProxy], Awaitable[None]] | None = None,
    init: Callable[[_pg_connection.Connection], Awaitable[None]] | None = None,
    reset: Callable[[_pg_connection.Connection], Awaitable[None]] | None = None,
    loop: asyncio.AbstractEventLoop | None = None,
    connection_class: type[_pg_connection.Connection] = _pg_connection.Connection,
    record_class: type[Any] = _pg_protocol.Record,
    **kwargs: Any,
) -> Pool:
    """Create a pool: the same parameters, defaults and meaning as
    :func:`asyncpg.create_pool`, plus safepool's options:

    ``name``, ``lease_timeout``, ``leak_warning_after``, ``capture_stack``,
    ``max_waiters``, ``acquire_timeout``, ``max_connecting``, ``fail_fast``,
    ``wait_on_connect_error``, ``reset_mode``
    (``"full"`` or ``"rollback"``), ``reset_timeout``, ``backoff``, ``clock``,
    ``max_site_share`` (0 < share <= 1: one acquire site holds at most
    ``ceil(share * max_size)`` connections), ``queue_policy`` (``"fifo"`` or
    ``"adaptive"``), ``queue_target`` and ``queue_interval`` (seconds, the
    adaptive queue's CoDel parameters). See docs/backpressure.md.
    Every other keyword goes to :func:`asyncpg.connect`.

    Use as ``pool = await create_pool(...)`` or ``async with create_pool(...) as pool``.
    """
    return Pool(
        dsn,
        init_size=init_size,
        min_size=min_size,
        max_size=max_size,
        max_queries=max_queries,
        max_inactive_connection_lifetime=max_inactive_connection_lifetime,
        connect=connect,
        setup=setup,
        init=init,
        reset=reset,
        loop=loop,
        connection_class=connection_class,
        record_class=record_class,
        **kwargs,
    )


__all__ = ["Pool", "PoolAcquireContext", "create_pool", "live_pools", "on_pool_created"]
