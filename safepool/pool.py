"""The asyncpg-compatible face of the pool: ``Pool``, ``PoolAcquireContext``
and ``create_pool``.

The face is asyncpg's API, and hands the rest to objects with one job each:
the lease hot path, acquire and release (``_leasing.py``, which
``PoolAcquireContext`` calls directly), argument checks and settings
(``_options.py``), the observation surface (``_surface.py``), the registry of
live pools (``_registry.py``). The state core (``_state.py``) decides, the runner
(``_runner.py``) carries the core's actions out and owns the pool's tasks and
timers, the workers (``_workers.py``) do the I/O on connections, and
``_internals.py`` is the one adapter over asyncpg's private members
(docs/design.md).

The hot path (an idle connection, no waiters) is: read the clock, pop the idle
stack, build a proxy. Release of a lease that ran no statement hands the
connection on at once; otherwise the default reset is one message driven in
the releasing task (``_detach``), a custom one runs in a pool task.
"""

from __future__ import annotations

import asyncio
import warnings
from collections.abc import Awaitable, Callable, Coroutine, Generator, Iterable
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, NoReturn, SupportsIndex, TypeVar

from asyncpg import connection as _pg_connection
from asyncpg import pool as _pg_pool
from asyncpg import protocol as _pg_protocol

from . import _autoreset, _registry, _secrets, _sites, _stack, _workers
from . import _internals as _pg
from . import events as _events
from ._clock import Clock, LoopClock
from ._compat import HolderView, QueueView  # asyncpg's private pool attributes
from ._compat import holders as _compat_holders
from ._compat import queue as _compat_queue
from ._internals import RawConnection
from ._keepalive import TcpKeepalive
from ._leasing import Leaser
from ._logging import guarded_logger
from ._options import DEFAULT as _DEFAULT  # left out: "the pool's setting" (None: no limit)
from ._options import (
    DEFAULT_QUEUE_INTERVAL,
    DEFAULT_QUEUE_TARGET,
    check_resize,
    configure,
)
from ._registry import live_pools, on_pool_created
from ._reporting import Reporter
from ._runner import Runner
from ._state import (
    Backoff,
    Phase,
    SlotState,
)
from ._surface import Observation
from ._workers import ResetHooks
from .errors import (
    EventLoopMismatchError,
    PoolClosedError,
    PoolInterfaceError,
    PoolTypeError,
    PoolValueError,
    check_encodable,
    check_flag,
)
from .proxy import PoolConnectionProxy, WatchingProxy, _mark_coroutine
from .stats import LeaseInfo, PoolOptions, PoolStats

if TYPE_CHECKING:
    from .health import HealthReport

logger = guarded_logger("safepool")

_T = TypeVar("_T")
# What repr() says of each phase: a pool not yet awaited is "not initialized",
# as acquire() says then (asyncpg's "pool is not initialized").
_REPR_PHASES = {
    Phase.NEW: "not initialized",
    Phase.STARTING: "starting",
    Phase.OPEN: "open",
    Phase.CLOSING: "closing",
    Phase.CLOSED: "closed",
}
# COPY's formats, as asyncpg's stubs spell them (the shortcuts pass format= on
# to the connection's method).
_CopyFormat = Literal["text", "csv", "binary"]


# asyncpg's own pool class, so that isinstance(pool, asyncpg.Pool) holds as
# for asyncpg's pool (code branches on it: "a pool: acquire; else a
# connection: use it"). Its __init__ never runs: every method and every
# attribute asyncpg's pool sets is this class's own (its private ones are
# read-only views, see _compat.py). The type checker sees the same base, so
# that `pool: asyncpg.Pool = await safepool.create_pool(...)` type-checks in
# users' code (tests/test_typing.py): parametrized with Any, so the pool fits
# any record class's annotation (asyncpg.Pool[MyRecord] too). (The generic
# alias is not subclassable at run time: hence the two branches.)
if TYPE_CHECKING:
    _PoolBase = _pg_pool.Pool[Any]
else:
    _PoolBase = _pg_pool.Pool


class Pool(_PoolBase):
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
        max_lifetime: float | None = None,
        tcp_keepalive: TcpKeepalive | bool | None = None,
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
        backend_exit_timeout: float = _workers.BACKEND_EXIT_GRACE,
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

        if isinstance(name, str):
            # A name that quotes the DSN (name=f"orders {DATABASE_URL}")
            # shows in repr, stats, errors, metrics and logs: without the
            # password, as everything else the pool shows (review h237).
            name = _secrets.redact_known(name, *_secrets.connect_secrets(connect_args, connect_kwargs))
        self._config = config = configure(
            name or f"pool-{id(self):x}", min_size=min_size, max_size=max_size, init_size=init_size,
            max_queries=max_queries, max_inactive_connection_lifetime=max_inactive_connection_lifetime,
            connection_class=connection_class, record_class=record_class, reset=reset,
            max_lifetime=max_lifetime, tcp_keepalive=tcp_keepalive, lease_timeout=lease_timeout, leak_warning_after=leak_warning_after, capture_stack=capture_stack,
            max_waiters=max_waiters, acquire_timeout=acquire_timeout, max_connecting=max_connecting,
            fail_fast=fail_fast, wait_on_connect_error=wait_on_connect_error, reset_mode=reset_mode,
            reset_timeout=reset_timeout, backend_exit_timeout=backend_exit_timeout, backoff=backoff,
            max_site_share=max_site_share,
            queue_policy=queue_policy, queue_target=queue_target, queue_interval=queue_interval,
        )
        if name is not None and not isinstance(name, str):
            # Checked after asyncpg's own arguments, as safepool's other options.
            # An int name was taken and broke every Prometheus scrape of its
            # collector later (label values must be str).
            raise PoolTypeError(f"name must be a str or None, got {type(name).__name__}")
        if name is not None:
            check_encodable("name", name)  # (a lone surrogate failed every scrape of its registry: review h262)
        proxy_class: type[PoolConnectionProxy] = PoolConnectionProxy
        if reset_mode == "rollback":
            proxy_class = WatchingProxy
        elif reset_mode == "auto":
            _autoreset.require_parser()  # a missing extra fails here, not at the first release
            proxy_class = _autoreset.AutoResetProxy
        self._name = config.name
        # What a new connection is opened with (asyncpg's attribute names).
        self._connect = connect if connect is not None else _pg_connection.connect
        self._connect_args: Any = connect_args
        self._connect_kwargs = connect_kwargs
        self._connection_class = connection_class
        self._record_class = record_class
        self._init = init

        self._state = config.new_state()
        if clock is not None and not (callable(getattr(clock, "now", None)) and callable(getattr(clock, "call_at", None))):
            raise PoolTypeError(
                "clock must have now() and call_at(when, callback) (safepool.ManualClock, say), "
                f"or be None for the event loop's, got {type(clock).__name__}"
            )
        self._clock: Clock = clock if clock is not None else LoopClock(loop)
        self._now = self._clock.now
        self._reporter = reporter = Reporter(self._name, self._state, loop, config.site_caps)
        reporter.connect_args = lambda: (self._connect_args, self._connect_kwargs)
        hooks = ResetHooks(config.custom_reset, reset, reset_mode != "rollback")
        self._observation = Observation(config, self._state, reporter, loop, self._now, self.release)
        self._runner = runner = Runner(
            self, self._state, self._clock, loop, reporter, self._get_new_connection, hooks,
            reset_timeout=config.reset_timeout, backend_exit_timeout=config.backend_exit_timeout,
            auto_reset=reset_mode == "auto",
            leak_warning_after=config.leak_warning_after,
        )
        runner.reclaimer.proxy_class = proxy_class
        runner.reclaimer.max_queries = config.max_queries
        self._drain = runner.drain
        # The hot path, acquire and release: PoolAcquireContext calls it
        # directly (no call through the face per lease).
        self._leaser = Leaser(self, config, self._state, runner, self._clock, loop, reporter, proxy_class, setup)
        _registry.register(self)

    # ------------------------------------------------------------ start-up

    async def _async__init__(self) -> Pool:
        state = self._state
        if state.started:
            return self
        if state.phase is Phase.STARTING:
            raise PoolInterfaceError("pool is being initialized in another task")
        if self._config.init_size and asyncio.get_running_loop() is not self._loop:
            # Created with no loop running (at import time): it took the
            # thread's default loop. asyncpg's first connect fails with
            # "got Future attached to a different loop", its socket left open.
            raise EventLoopMismatchError(
                f"pool {self._name!r} was created on another event loop than the one running this await "
                "(usually create_pool() called before the loop started, e.g. at import time): "
                "create the pool in the loop that uses it (an app's lifespan or startup hook)"
            )
        state.set_phase(Phase.STARTING)
        try:
            await self._runner.open(self._config.init_size)
        except BaseException:
            self._runner.terminate_all()
            state.set_phase(Phase.CLOSED)
            raise
        state.set_phase(Phase.OPEN)
        self._runner.keep_floor()  # (a start-up connect after the first may have failed)
        return self

    # ------------------------------------------------------------- acquire

    # (For the type checker this overrides the stubs' acquire(), which returns
    # asyncpg's PoolAcquireContext: this one's is a subclass of it, typed
    # with safepool's proxy. Code typed against asyncpg.Pool gets asyncpg's.)
    def acquire(
        self,
        *,
        timeout: float | None = _DEFAULT,
        lease_timeout: float | None = _DEFAULT,
        site: str | None = None,
    ) -> PoolAcquireContext:
        """Acquire a connection: ``async with pool.acquire() as con`` or
        ``con = await pool.acquire()`` (then release it in ``finally``).

        :param timeout: seconds to wait for a connection; raises
            :class:`~safepool.PoolTimeoutError`. Given, it also bounds this
            lease's release (its reset), as asyncpg's does (0.29-0.32). Left
            out: the pool's ``acquire_timeout``, for the wait only (the
            release then runs under ``reset_timeout``); None: no limit (as
            asyncpg's ``timeout=None``).
        :param lease_timeout: seconds this lease may be held. Left out: the
            pool's ``lease_timeout``; None: no limit.
        :param site: the acquire site this lease counts against under
            ``max_site_share`` (default: the name set by :class:`safepool.site`,
            else the calling function); shown in ``leases()`` and leak reports.
        :raises safepool.PoolOverloadedError: refused at once (``max_waiters``,
            the site's share of it, or the adaptive queue), or shed by the
            adaptive queue while waiting.
        :raises safepool.ServerUnavailableError: ``fail_fast=True``, no
            connection left and connects failing (the breaker is open).
        :raises safepool.PoolClosedError: the pool is closing or closed.
        :raises safepool.EventLoopMismatchError: awaited on another event loop
            than the pool's (an ``asyncpg.InterfaceError`` and a ``RuntimeError``).
        :raises asyncpg.InterfaceError: the pool is not initialized yet (not
            awaited, or still starting), as asyncpg's.
        :raises safepool.PoolTypeError: (a ``TypeError``) ``site`` is
            neither a str nor None; or, when awaited, ``timeout`` or ``lease_timeout``
            is not a number (a bool included).
        :raises safepool.PoolValueError: (a ``ValueError``) ``site`` is
            empty or holds a lone surrogate (UTF-8 cannot encode it, and it
            labels metrics); or, when awaited, ``timeout`` negative or NaN, ``lease_timeout`` not > 0 (NaN
            included), either an int too large for a float.
        """
        if site is not None:
            if not isinstance(site, str) or not site:
                # (As safepool.site(""): an empty name would label a bulkhead and
                # leak reports with nothing.)
                error = PoolValueError if isinstance(site, str) else PoolTypeError
                raise error(f"site must be a non-empty str or None, got {site!r}")
            if type(site) is not str:
                site = str.__str__(site)  # (a StrEnum member, as safepool.site() takes it: its text; review h267)
            check_encodable("site", site)  # (a metric label: review h262)
        # The caller is on the stack now; when the context is awaited it may
        # not be: asyncio.gather(), create_task() and (before Python 3.12)
        # wait_for() run the acquire as a task of its own, whose stack is
        # the event loop's.
        leaser = self._leaser
        if leaser.site_caps and site is None:
            site = _sites.current_site() or _sites.caller_site(2)
        return PoolAcquireContext(
            self, timeout, lease_timeout, site, _stack.caller(True) if leaser.capture_stack else None
        )

    # ------------------------------------------------------------- release

    async def release(self, connection: Any, *, timeout: float | None = None) -> None:
        """Release a connection back to the pool, with asyncpg's semantics.

        Returns once the connection is back: an open transaction rolled back
        and the session reset (asyncpg's reset query: advisory locks, cursors,
        LISTENs, settings), so no other session sees anything of this lease
        any more. A lease that ran no statement (``setup=``/``init=``
        included) is handed on with no round trip. The reset runs in the
        releasing task until that task is cancelled, and a pool task then
        finishes it: the caller's cancellation cannot interrupt it (asyncpg
        shields it); a cancelled caller gets ``CancelledError`` while the pool
        finishes the reset, or closes the connection once any cancelled query
        has stopped on the server. A second release is a no-op.

        :param timeout: seconds for the reset (default: the ``timeout`` of the
            ``acquire()`` that produced the connection, as in asyncpg 0.32).
        :raises safepool.PoolInterfaceError: (an ``asyncpg.InterfaceError``)
            ``connection`` is not one of this pool's.
        :raises safepool.PoolTypeError: (a ``TypeError``) ``timeout`` is not a
            number (a bool included), raised before anything is released.
        :raises Exception: the reset's own error (e.g. ``asyncio.TimeoutError``),
            after the connection was given up, as asyncpg raises it.
        """
        await self._leaser.release(connection, timeout)

    async def _get_new_connection(self) -> RawConnection:
        """A new connection with the current connect arguments, ``init=`` run."""
        return await _workers.connect(
            self._connect, self._connect_args, self._connect_kwargs, loop=self._loop,
            connection_class=self._connection_class, record_class=self._record_class, init=self._init,
            keepalive=self._config.tcp_keepalive, pool_name=self._name,
        )

    # ---------------------------------------------------------- shutdown

    async def close(self) -> None:
        """Wait for every connection to be released, then close them all.

        Waiting tasks fail with :class:`~safepool.PoolClosedError`. On error or
        cancellation the pool is terminated, as with asyncpg: so
        ``asyncio.timeout(grace)`` around it closes within ``grace`` seconds,
        and the ``safepool`` logger's ``close_cut_short`` warning names the
        leases still held then (a holder whose statement is running gets
        asyncpg's ``ConnectionDoesNotExistError``; one between statements,
        asyncpg's ``InterfaceError`` at its next call, as on asyncpg's pool).

        :raises safepool.EventLoopMismatchError: called on another event loop
            than the pool's; the pool is left as it was (asyncpg's pool raises
            ``RuntimeError`` there).
        :raises safepool.PoolInterfaceError: the pool was never awaited (not
            initialized) or is still starting, as asyncpg's ``close()``
            (0.29-0.32) raises ``InterfaceError``. A closed pool returns at once."""
        if self._closed:
            return
        self._check_init()
        if asyncio.get_running_loop() is not self._loop:
            # The pool's tasks and connections belong to its loop: waiting for
            # them from this one never ends (asyncpg's raises at once).
            raise EventLoopMismatchError(
                f"pool {self._name!r} was created on another event loop than the one running this close(): "
                "a pool works only on its own loop; close it there"
            )
        try:
            await self._runner.close_all()
        except BaseException as exc:
            # (Who kept it waiting, logged before terminate() ends their leases.)
            self._reporter.warn_close_cut_short(self._runner.now(), exc)
            self.terminate()  # (which sends pool_closed)
            raise
        finally:
            self._runner.finish_close()
        try:
            await self._runner.join()
        finally:
            self._announce_closed()

    def terminate(self) -> None:
        """Terminate all connections at once, as asyncpg's ``Pool.terminate()``
        (0.29-0.32): no reset, no waiting; leases still held end (their
        proxies raise asyncpg's ``InterfaceError`` at their next call, a
        ``lease_ended`` event reports each) and waiting tasks fail with
        :class:`~safepool.PoolClosedError`. A closed pool returns at once.

        :raises safepool.PoolInterfaceError: the pool was never awaited (not
            initialized) or is still starting, as asyncpg's."""
        if self._closed:
            return
        self._check_init()
        try:
            self._runner.terminate_all()
        finally:
            # Closed even if terminating raised, as asyncpg's pool marks
            # itself closed first: on a closed event loop the first
            # connection's abort raises RuntimeError("Event loop is closed"),
            # and a later terminate() or close() must return, not try again.
            self._state.set_phase(Phase.CLOSED)
            self._announce_closed()

    def _announce_closed(self) -> None:
        """The ``pool_closed`` event, with the pool's last stats (only built
        for a listener)."""
        reporter = self._reporter
        if reporter.listeners:
            reporter.emit_event("pool_closed", stats=self.stats())
            reporter.deliver()

    async def expire_connections(self) -> None:
        """Replace every open connection: idle ones now, leased ones on
        release, and connects under way when they finish (they may have used
        the old :meth:`set_connect_args`; asyncpg 0.32 keeps those). Call it
        once per change of settings: called more often than a connect takes,
        no new connection survives. See docs/migration.md."""
        self._state.expire_connections()
        self._drain()

    def set_connect_args(self, dsn: str | None = None, **connect_kwargs: Any) -> None:
        """Use these arguments for every new connection (existing ones stay
        until they expire; see :meth:`expire_connections`), as asyncpg's
        ``Pool.set_connect_args()`` (0.29-0.32): ``dsn`` and the keywords of
        :func:`asyncpg.connect`, checked by the next connect, not here."""
        self._reporter.retire_connect_args()
        self._connect_args = [dsn]
        self._connect_kwargs = connect_kwargs
        # Tried at the next acquire, not after the old arguments' backoff
        # (fail_fast, wait_on_connect_error: review h270).
        self._state.connect_args_changed(self._runner.now())
        self._drain()

    def resize(self, *, max_size: int | None = None, min_size: int | None = None) -> None:
        """Change the pool's bounds at run time without dropping any lease.
        Either bound left out keeps its current value (``resize(min_size=5)``
        raises the floor alone); a ``max_size`` below the current
        ``min_size`` lowers the floor with it.

        Shrinking closes idle connections now and leased ones as they return.
        A pool not started yet (not awaited) takes the new bounds too.

        :raises TypeError: a bound is not an int.
        :raises ValueError: ``max_size`` is not > 0, or ``min_size`` not
            between 0 and the (new or current) ``max_size``.
        :raises safepool.PoolClosedError: the pool is closing or closed
            (its bounds are left as they were), as :meth:`acquire` raises."""
        if max_size is None:
            # The current bound, as an int: create_pool() takes a bool, as
            # asyncpg's does (True: one connection), which a resize() that
            # names only min_size must not refuse (review h256).
            max_size = int(self._state.max_size)
        max_size, min_size = check_resize(max_size, min_size)
        if self.is_closing():
            # Bounds of a pool that opens no connection any more: taken, they
            # made get_max_size() and stats() report a size it never has.
            raise PoolClosedError(
                f"cannot resize pool {self._name!r}: pool is {'closed' if self._closed else 'closing'}"
            )
        self._state.resize(max_size, self._now(), min_size)
        self._drain()
        self._runner.keep_floor()

    # ----------------------------------------------------------- getters

    # asyncpg's private pool._holders / pool._queue, read-only: kept for
    # compatibility, not API (see _compat.py).
    @property
    def _holders(self) -> tuple[HolderView, ...]:
        return _compat_holders(self)

    @property
    def _maintenance_task(self) -> asyncio.Task[Any] | None:
        # asyncpg's floor-upkeep task (asyncpg's test base awaits it on teardown).
        return self._runner.maintenance_task

    @property
    def _queue(self) -> QueueView:
        return _compat_queue(self)

    # asyncpg's private size bounds, read by monitoring code and libraries
    # (hasql's asyncpg driver reports them): the current ones, read-only.
    @property
    def _minsize(self) -> int:
        return self._state.min_size

    @property
    def _maxsize(self) -> int:
        return self._state.max_size

    # asyncpg's private settings, read-only: code that clones a pool's
    # configuration reads them (pool._max_queries, pool._setup, ...).
    @property
    def _initsize(self) -> int:
        return self._config.init_size

    @property
    def _max_queries(self) -> int:
        return self._config.max_queries

    @property
    def _max_inactive_connection_lifetime(self) -> float:
        return self._config.max_inactive_lifetime

    @property
    def _setup(self) -> Callable[[PoolConnectionProxy], Awaitable[None]] | None:
        return self._leaser.setup

    @property
    def _reset(self) -> Callable[[_pg_connection.Connection], Awaitable[None]] | None:
        return self._runner.hooks.hook

    @property
    def _generation(self) -> int:
        # (asyncpg's counter of expire_connections() calls)
        return self._state.generation

    def is_closing(self) -> bool:
        """True once :meth:`close` or :meth:`terminate` has begun (and after),
        as asyncpg's ``Pool.is_closing()`` (0.29-0.32)."""
        return self._closed or self._state.closing

    def get_size(self) -> int:
        """Connections open on the server (being opened ones excluded), as
        asyncpg's ``Pool.get_size()`` (0.29-0.32). A closed connection whose
        backend is still exiting is not counted here (asyncpg's counts open
        connections), though its place counts towards ``max_size`` until the
        server has closed the socket (docs/backpressure.md)."""
        return self._state.connected() - len(self._runner.exiting)

    def get_init_size(self) -> int:
        """How many connections the pool opens at start-up: ``init_size``, or
        ``min_size`` without it, as asyncpg's ``Pool.get_init_size()``
        (0.32; safepool takes ``init_size=`` on every asyncpg version)."""
        return self._config.init_size

    def get_min_size(self) -> int:
        """The pool's current ``min_size``: connections it keeps open (idle ones
        included), as asyncpg's ``Pool.get_min_size()``."""
        return self._state.min_size

    def get_max_size(self) -> int:
        """The pool's current ``max_size``: the most connections (server
        backends) it ever holds at once, as asyncpg's ``Pool.get_max_size()``."""
        return self._state.max_size

    def get_idle_size(self) -> int:
        """Open connections not leased, reset and ready to hand out, as
        asyncpg's ``Pool.get_idle_size()``; like asyncpg's (0.29 to 0.32), it also
        counts a connection whose acquire is running the ``setup=`` hook
        (asyncpg marks its holder in use only once the hook has returned).
        :meth:`stats` counts that one in ``in_use``."""
        return self._state.idle + self._leaser.in_setup

    @property
    def name(self) -> str:
        """The pool's name: ``create_pool(name=...)``, or ``"pool-<id>"``. Logs,
        leak reports, metric labels and errors name the pool by it."""
        return self._name

    def stats(self) -> PoolStats:
        """An immutable snapshot of sizes, counters and distributions: a
        :class:`~safepool.PoolStats` (connections, seconds; its fields say
        what each counts). On the pool's event loop, as every method; from
        another thread, :meth:`stats_threadsafe`. Also on a pool not awaited
        yet or closed (its last numbers)."""
        return self._observation.stats()

    def describe_error(self, error: BaseException | None) -> str:
        """One line for ``error`` that is safe to log or show: its type and
        the first non-blank line of its message (no query parameters), with
        this pool's password masked however the error holds it (in its
        DSN, its ``password=`` argument, or those of the last connect
        arguments :meth:`set_connect_args` replaced). What the pool's own
        records, ``stats().last_connect_error`` and ``health()`` show of an
        error; ``"none"`` for None. A str, never raises."""
        return self._reporter.describe(error)

    def leases(self, *, stacks: bool = True) -> list[LeaseInfo]:
        """The connections currently held by application code, oldest first:
        a list of :class:`~safepool.LeaseInfo` (ages in seconds).

        :param stacks: format each lease's acquire stack (``LeaseInfo.stack``;
            False leaves it None and costs no source-line lookups).
        :raises safepool.PoolTypeError: ``stacks`` is not True or False."""
        return self._observation.leases(check_flag("stacks", stacks))

    async def health(
        self,
        *,
        probe: bool = True,
        probe_timeout: float = 1.0,
        probe_query: str = "SELECT 1",
        saturated_after: float = 5.0,
        leak_suspect_after: float | None = None,
        connect_error_window: float = 60.0,
    ) -> HealthReport:
        """Readiness check: a :class:`~safepool.health.HealthReport`, ``ok`` /
        ``degraded`` / ``failing`` with reasons. The options are
        :func:`safepool.health.check_health`'s, with its defaults (durations
        in seconds); it says what each does and what it raises."""
        from .health import check_health

        return await check_health(
            self, probe=probe, probe_timeout=probe_timeout, probe_query=probe_query,
            saturated_after=saturated_after, leak_suspect_after=leak_suspect_after,
            connect_error_window=connect_error_window,
        )

    def add_listener(self, callback: Callable[[dict[str, Any]], None]) -> None:
        """Call ``callback(event)`` for every pool event (a dict with at least
        ``event`` and ``pool``): connect_failed, server_status, lease_expired,
        leak, leak_suspect, lease_ended, late_release (docs/metrics.md lists
        their fields). Exceptions in callbacks are logged and swallowed.

        The dict form of :meth:`add_event_listener`'s typed events, kept for
        compatibility (kinds added later are not sent here).

        :raises TypeError: ``callback`` is not callable, or is a coroutine
            function (the pool calls it and does not await it)."""
        self._observation.add_listener(callback)

    def remove_listener(self, callback: Callable[[dict[str, Any]], None]) -> None:
        """Remove a callback added with :meth:`add_listener`.

        :raises ValueError: it was not added."""
        self._observation.remove_listener(callback)

    def __repr__(self) -> str:
        state = self._state
        # (Not yet awaited: "not initialized", as acquire()'s error says.)
        status = "closed" if self.closed else _REPR_PHASES[state.phase]
        return (
            f"<safepool.Pool {self._name!r} {status} size={state.size}/{state.max_size} "
            f"idle={state.idle} in_use={state.in_use} resetting={state.count(SlotState.RESETTING)} waiting={state.waiting}>"
        )

    # ------------------------------------------------------------ copying

    # A copy would share the original's state, runner and connections under
    # a second face (asyncpg's pool copies into one that breaks at first use;
    # safepool's failed with "property '_queue' of 'Pool' object has no
    # setter", its pickling with an error about a WeakSet): refused, clearly.
    def _not_copyable(self, what: str) -> PoolTypeError:
        return PoolTypeError(
            f"cannot {what} safepool.Pool {self._name!r}: a pool cannot be copied or pickled (it owns "
            "connections and tasks on its event loop); pass the pool object itself, or create another "
            "with safepool.create_pool()"
        )

    def __copy__(self) -> NoReturn:
        raise self._not_copyable("copy")

    def __deepcopy__(self, memo: dict[int, Any]) -> NoReturn:
        raise self._not_copyable("deepcopy")

    def __reduce_ex__(self, protocol: SupportsIndex) -> NoReturn:
        raise self._not_copyable("pickle")

    # ------------------------------------------------------------ helpers

    def _check_init(self) -> None:
        self._leaser.check_init()

    # asyncpg's lifecycle flags, read-only views of the one phase.
    @property
    def _initialized(self) -> bool:
        return self._state.started

    @property
    def _initializing(self) -> bool:
        return self._state.phase is Phase.STARTING

    @property
    def _closed(self) -> bool:
        return self._state.phase is Phase.CLOSED

    @property
    def _closing(self) -> bool:
        # True while close() runs (not after it, nor for terminate()), as
        # asyncpg's flag: health checks read `pool._closed or pool._closing`.
        return self._state.phase is Phase.CLOSING

    async def _acquire(self, timeout: float | None) -> PoolConnectionProxy:
        # asyncpg's private acquire, which libraries' own acquire contexts
        # await (`con = await pool._acquire(self.timeout)`, then
        # `pool.release(con)`). Inherited from asyncpg's Pool it read
        # asyncpg's queue ("'QueueView' object has no attribute 'get'").
        # None is asyncpg's default there, so it means "left out": the
        # pool's acquire_timeout, as acquire() without timeout=.
        con: PoolConnectionProxy = await self.acquire(timeout=_DEFAULT if timeout is None else timeout)
        return con

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
        """Run ``query`` (one or more statements; with ``args``, one statement with those parameters) and
        return its status tag (``"INSERT 0 1"``).

        A connection is leased for the call and released before it returns, as by asyncpg's ``Pool.execute()``
        (0.29-0.32): ``timeout`` (seconds) bounds the statement, not the acquire. Raises what :meth:`acquire`
        and ``Connection.execute()`` raise."""
        async with self.acquire() as con:
            return await con.execute(query, *args, timeout=timeout)

    # (The stubs type args as object; an iterable of argument tuples it is.)
    async def executemany(  # type: ignore[override]
        self, command: str, args: Iterable[Any], *, timeout: float | None = None
    ) -> None:
        """Run ``command`` once per tuple of ``args`` (returns None).

        A connection is leased for the call and released before it returns, as by asyncpg's
        ``Pool.executemany()`` (0.29-0.32): ``timeout`` (seconds) bounds the statement, not the acquire.
        Raises what :meth:`acquire` and ``Connection.executemany()`` raise."""
        async with self.acquire() as con:
            await con.executemany(command, args, timeout=timeout)

    async def fetch(self, query: str, *args: Any, timeout: float | None = None, record_class: Any = None) -> list[Any]:
        """Run ``query`` with ``args`` and return its rows, a list of records (``record_class``).

        A connection is leased for the call and released before it returns, as by asyncpg's ``Pool.fetch()``
        (0.29-0.32): ``timeout`` (seconds) bounds the statement, not the acquire. Raises what :meth:`acquire`
        and ``Connection.fetch()`` raise."""
        async with self.acquire() as con:
            return await con.fetch(query, *args, timeout=timeout, record_class=record_class)

    async def fetchval(self, query: str, *args: Any, column: int = 0, timeout: float | None = None) -> Any:
        """Run ``query`` with ``args`` and return the value in ``column`` (a zero-based index) of its first
        row, or None without rows.

        A connection is leased for the call and released before it returns, as by asyncpg's
        ``Pool.fetchval()`` (0.29-0.32): ``timeout`` (seconds) bounds the statement, not the acquire. Raises
        what :meth:`acquire` and ``Connection.fetchval()`` raise."""
        async with self.acquire() as con:
            return await con.fetchval(query, *args, column=column, timeout=timeout)

    async def fetchrow(  # (-> Any | None, as asyncpg's stubs type Pool[Any].fetchrow: a typed caller may return it)
        self, query: str, *args: Any, timeout: float | None = None, record_class: Any = None
    ) -> Any | None:
        """Run ``query`` with ``args`` and return its first row (a record), or None.

        A connection is leased for the call and released before it returns, as by asyncpg's
        ``Pool.fetchrow()`` (0.29-0.32): ``timeout`` (seconds) bounds the statement, not the acquire. Raises
        what :meth:`acquire` and ``Connection.fetchrow()`` raise."""
        async with self.acquire() as con:
            return await con.fetchrow(query, *args, timeout=timeout, record_class=record_class)

    async def fetchmany(
        self, query: str, args: Iterable[Any], *, timeout: float | None = None, record_class: Any = None
    ) -> list[Any]:
        """Run ``query`` once per tuple of ``args`` and return the rows of every run, a list of records.

        A connection is leased for the call and released before it returns, as by asyncpg's
        ``Pool.fetchmany()`` (0.30-0.32): ``timeout`` (seconds) bounds the statement, not the acquire. Raises
        what :meth:`acquire` and ``Connection.fetchmany()`` raise. Missing with asyncpg 0.29, whose pool
        and connection have none."""
        async with self.acquire() as con:
            return await con.fetchmany(query, args, timeout=timeout, record_class=record_class)

    # The COPY shortcuts take asyncpg's keyword-only parameters (the same in
    # 0.29-0.32), not **kwargs: a call asyncpg's signature refuses (a missing
    # output=, a misspelt keyword) raises its TypeError at the call, before
    # an acquire that could wait on a busy pool.
    async def copy_from_table(
        self, table_name: str, *, output: Any, columns: Any = None, schema_name: str | None = None,
        timeout: float | None = None, format: _CopyFormat | None = None, oids: Any = None, delimiter: str | None = None,
        null: str | None = None, header: bool | None = None, quote: str | None = None, escape: str | None = None,
        force_quote: Any = None, encoding: str | None = None,
    ) -> str:
        """Copy a table (or its ``columns``) to ``output`` (a path, a file-like object or an async callable
        taking bytes) with ``COPY ... TO STDOUT``, and return the COPY status tag (``"COPY 10"``).

        A connection is leased for the call and released before it returns, as by asyncpg's
        ``Pool.copy_from_table()`` (0.29-0.32): ``timeout`` (seconds) bounds the statement, not the acquire.
        Raises what :meth:`acquire` and ``Connection.copy_from_table()`` raise."""
        async with self.acquire() as con:
            return await con.copy_from_table(
                table_name, output=output, columns=columns, schema_name=schema_name, timeout=timeout,
                format=format, oids=oids, delimiter=delimiter, null=null, header=header, quote=quote,
                escape=escape, force_quote=force_quote, encoding=encoding,
            )

    async def copy_from_query(
        self, query: str, *args: Any, output: Any, timeout: float | None = None, format: _CopyFormat | None = None,
        oids: Any = None, delimiter: str | None = None, null: str | None = None, header: bool | None = None,
        quote: str | None = None, escape: str | None = None, force_quote: Any = None, encoding: str | None = None,
    ) -> str:
        """Copy the rows of ``query`` (with ``args``) to ``output`` with ``COPY (query) TO STDOUT``, and
        return the COPY status tag.

        A connection is leased for the call and released before it returns, as by asyncpg's
        ``Pool.copy_from_query()`` (0.29-0.32): ``timeout`` (seconds) bounds the statement, not the acquire.
        Raises what :meth:`acquire` and ``Connection.copy_from_query()`` raise."""
        async with self.acquire() as con:
            return await con.copy_from_query(
                query, *args, output=output, timeout=timeout, format=format, oids=oids, delimiter=delimiter,
                null=null, header=header, quote=quote, escape=escape, force_quote=force_quote, encoding=encoding,
            )

    async def copy_to_table(
        self, table_name: str, *, source: Any, columns: Any = None, schema_name: str | None = None,
        timeout: float | None = None, format: _CopyFormat | None = None, oids: Any = None, freeze: bool | None = None,
        delimiter: str | None = None, null: str | None = None, header: bool | None = None, quote: str | None = None,
        escape: str | None = None, force_quote: Any = None, force_not_null: Any = None, force_null: Any = None,
        encoding: str | None = None, where: str | None = None,
    ) -> str:
        """Copy ``source`` (a path, a file-like object or an async iterable of bytes) into a table with ``COPY
        ... FROM STDIN``, and return the COPY status tag.

        A connection is leased for the call and released before it returns, as by asyncpg's
        ``Pool.copy_to_table()`` (0.29-0.32): ``timeout`` (seconds) bounds the statement, not the acquire.
        Raises what :meth:`acquire` and ``Connection.copy_to_table()`` raise."""
        async with self.acquire() as con:
            return await con.copy_to_table(
                table_name, source=source, columns=columns, schema_name=schema_name, timeout=timeout,
                format=format, oids=oids, freeze=freeze, delimiter=delimiter, null=null, header=header,
                quote=quote, escape=escape, force_quote=force_quote, force_not_null=force_not_null,
                force_null=force_null, encoding=encoding, where=where,
            )

    async def copy_records_to_table(
        self, table_name: str, *, records: Any, columns: Any = None, schema_name: str | None = None,
        timeout: float | None = None, where: str | None = None,
    ) -> str:
        """Copy ``records`` (an iterable, or async iterable, of tuples) into a table in binary COPY format,
        and return the COPY status tag.

        A connection is leased for the call and released before it returns, as by asyncpg's
        ``Pool.copy_records_to_table()`` (0.29-0.32): ``timeout`` (seconds) bounds the statement, not the
        acquire. Raises what :meth:`acquire` and ``Connection.copy_records_to_table()`` raise."""
        async with self.acquire() as con:
            return await con.copy_records_to_table(
                table_name, records=records, columns=columns, schema_name=schema_name, timeout=timeout, where=where,
            )

    # ------------------------------------------------------ awaiting the pool

    def __await__(self) -> Generator[Any, None, Pool]:
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
        happened. An exception in a callback (any ``BaseException``,
        ``asyncio.CancelledError`` included, but ``KeyboardInterrupt`` and
        ``SystemExit``, which propagate, as in asyncio's own callbacks) is
        logged (``event listener failed``) and the other callbacks still
        run. With no listener the
        pool builds no event at all.

        :raises TypeError: ``callback`` is not callable, or is a coroutine
            function (the pool calls it and does not await it)."""
        self._observation.add_event_listener(callback)

    def remove_event_listener(self, callback: Callable[[_events.PoolEvent], None]) -> None:
        """Remove a callback added with :meth:`add_event_listener`.

        :raises ValueError: it was not added."""
        self._observation.remove_event_listener(callback)

    @property
    def capture_stack(self) -> bool:
        """Whether each acquire records its call stack and its task (for leak
        reports, :meth:`leases` and lease events). Settable at any time; it
        applies to later acquires. Costs a few microseconds per acquire."""
        return bool(self._leaser.capture_stack)

    @capture_stack.setter
    def capture_stack(self, on: bool) -> None:
        self._leaser.set_capture_stack(check_flag("capture_stack", on))

    @property
    def closed(self) -> bool:
        """True once :meth:`close` finished or :meth:`terminate` was called
        (:meth:`is_closing` is also true while closing), or once the pool's
        event loop is closed: an ``asyncio.run()`` that ended without
        ``close()`` leaves a pool nothing can use (its connections and tasks
        were the loop's), and exporters and the leak guard skip it rather
        than report its last numbers for as long as the application holds it."""
        return self._closed or self._loop.is_closed()

    @property
    def options(self) -> PoolOptions:
        """The pool's settings, with the current sizes; never the DSN, a
        password or other connection arguments."""
        return self._observation.options(self.capture_stack)

    async def release_lease(self, lease_id: int) -> bool:
        """Release a lease by its id (:attr:`LeaseInfo.id <safepool.LeaseInfo.id>`),
        through :meth:`release`: for tools that clean up after leaked
        connections (the pytest leak guard). Its proxy stops working, as
        after any release.

        A lease whose proxy was already garbage collected is the pool's to
        reclaim, which it does once nothing uses the connection. Callbacks
        registered on it (``add_listener()`` and the like) keep it leased
        until then; asked here, the pool drops the listeners, as a release
        does, and reclaims it now.

        Returns False, doing nothing, when no open lease has that id, or its
        proxy was garbage collected and an operation or object still uses
        the connection. Raises what :meth:`release` raises, and
        ``TypeError`` for a ``lease_id`` that is not an int (``True`` is not
        lease 1)."""
        if isinstance(lease_id, bool) or not isinstance(lease_id, int):
            raise PoolTypeError(f"lease_id must be an int (LeaseInfo.id), got {type(lease_id).__name__}")
        if self._runner.reclaimer.release_orphan(lease_id):
            return True
        return await self._observation.release_lease(lease_id)

    def add_timing_sink(self, kind: str, callback: Callable[[float], None]) -> None:
        """Call ``callback(seconds)`` with every duration the pool records:
        ``kind`` ``"wait"`` (acquire wait, 0.0 when a connection was idle),
        ``"lease"`` (acquire to release, expiry or reclaim) or ``"connect"``
        (successful connects). For exporters that need each value (an
        OpenTelemetry histogram); the pool's own distributions in
        :meth:`stats` are fed as before.

        The callback runs on the pool's loop thread, in a loop callback after
        the pool's books have settled (values recorded in one loop iteration
        are handed over together, in order), so it may call into the pool; it
        should be quick. An exception in it (``asyncio.CancelledError``
        included; ``KeyboardInterrupt`` and ``SystemExit`` propagate) is
        logged once per pool and kind, and swallowed. May
        be called from any thread (the sink is installed on the loop; values
        recorded before that are not seen). With no sink the pool pays
        nothing.

        :raises ValueError: unknown ``kind``.
        :raises TypeError: ``callback`` is not callable, or is a coroutine
            function (the pool calls it and does not await it)."""
        self._observation.add_timing_sink(kind, callback)

    def remove_timing_sink(self, kind: str, callback: Callable[[float], None]) -> None:
        """Remove a sink added with :meth:`add_timing_sink` (unknown ones are
        ignored); the last one removed restores the plain histogram. May be
        called from any thread.

        :raises ValueError: unknown ``kind``."""
        self._observation.remove_timing_sink(kind, callback)

    def stats_threadsafe(self, timeout: float | None = 5.0) -> PoolStats:
        """:meth:`stats`, from any thread: taken on the pool's event loop.

        :meth:`stats` itself must be called on the loop's thread (it reads
        structures the loop changes). From another thread, while the loop
        runs, this schedules it there and waits up to ``timeout`` seconds
        (None: no limit); on the loop's thread, or while the loop is not
        running, it calls :meth:`stats` directly.

        :raises safepool.PoolTimeoutError: (a ``TimeoutError``) the loop did not run it in time (it is blocked).
        :raises ValueError: ``timeout`` is negative or NaN (TypeError: not a number)."""
        return self._observation.call_threadsafe(self.stats, timeout)

    def call_threadsafe(self, function: Callable[[], _T], timeout: float | None = 5.0) -> _T:
        """Run ``function()`` on the pool's event loop and return its result, from any thread (see
        :meth:`stats_threadsafe`): for exporters that read several things in one consistent moment.

        :raises safepool.PoolTimeoutError: (a ``TimeoutError``) the loop did not run it within ``timeout`` seconds.
        :raises ValueError: ``timeout`` is negative or NaN (TypeError: not a number,
            or ``function`` not callable).
        :raises Exception: what ``function`` raised."""
        return self._observation.call_threadsafe(function, timeout)


# What an older asyncpg's Pool lacks, safepool's lacks too: a program that
# looks for it (hasattr(pool, "fetchmany")) takes the same branch on both
# pools (asyncpg 0.29 has no fetchmany: review h277).
if not hasattr(_pg_pool.Pool, "fetchmany"):
    del Pool.fetchmany


# The loop running in this thread, or None (asyncio's C function: no Python
# frame on the hot path).
_loop_here = asyncio._get_running_loop


# asyncpg's context class, so that isinstance(pool.acquire(),
# asyncpg.pool.PoolAcquireContext) holds and an annotation of it accepts
# safepool's (tests/test_typing.py). Its slots (pool, connection, done,
# timeout) are used as they are; every method is replaced.
if TYPE_CHECKING:
    _AcquireContextBase = _pg_pool.PoolAcquireContext[Any]
else:
    _AcquireContextBase = _pg_pool.PoolAcquireContext


class PoolAcquireContext(_AcquireContextBase):
    """What ``pool.acquire()`` returns: awaitable, or an async context manager."""

    # (pool, connection, done: asyncpg's slots; its timeout slot is shadowed
    # by the property below, which keeps "left out" apart from None.)
    __slots__ = ("_timeout", "lease_timeout", "site", "stack")
    pool: Pool  # (asyncpg's slot, holding safepool's pool)
    connection: PoolConnectionProxy | None

    def __init__(
        self, pool: Pool, timeout: float | None, lease_timeout: Any, site: str | None = None,
        stack: _stack.Caller | None = None,
    ) -> None:
        self.pool = pool
        self._timeout = timeout
        self.lease_timeout = lease_timeout
        self.site = site
        self.stack = stack  # the caller of pool.acquire() and its task (capture_stack), else None
        self.connection: PoolConnectionProxy | None = None
        self.done = False

    @property
    def timeout(self) -> float | None:
        """The ``timeout`` given to ``acquire()``, in seconds; None when it
        was left out (the pool's ``acquire_timeout`` then applies), as the
        attribute of asyncpg's ``PoolAcquireContext`` reads (asyncpg 0.32)."""
        return None if self._timeout is _DEFAULT else self._timeout

    @timeout.setter
    def timeout(self, value: float | None) -> None:
        self._timeout = value

    # Plain methods returning the leaser's coroutine (acquire) or awaitable
    # (release: the reset's driver itself): no coroutine frame of the face's
    # per acquire or release (the hot path).
    def __aenter__(self) -> Coroutine[Any, Any, PoolConnectionProxy]:
        if self.connection is not None or self.done:
            raise PoolInterfaceError("a connection is already acquired")
        return self.pool._leaser.acquire(self._timeout, self.lease_timeout, self, self.site, self.stack)

    def __aexit__(  # type: ignore[override]  # (returns the release's awaitable itself: see above)
        self,
        exc_type: type[BaseException] | None = None,
        exc_val: BaseException | None = None,
        exc_tb: TracebackType | None = None,
    ) -> Awaitable[None]:
        self.done = True
        con = self.connection
        self.connection = None
        leaser = self.pool._leaser
        if _loop_here() is not leaser.loop:
            # Called where the pool's loop does not run: another thread,
            # handing the result to run_coroutine_threadsafe(), or before
            # the loop runs. asyncpg's __aexit__ is a coroutine, which runs
            # nothing where it is called: Pool.release(), a coroutine too,
            # releases when run, in the loop.
            return self.pool.release(con)
        return leaser.release(con)

    def __await__(self) -> Generator[Any, None, PoolConnectionProxy]:
        self.done = True
        return self.pool._leaser.acquire(self._timeout, self.lease_timeout, None, self.site, self.stack).__await__()

    # What inspect.iscoroutinefunction() answers for asyncpg's (async def)
    # methods, on Python 3.12+ (inspect.markcoroutinefunction; 3.11 has none).
    _mark_coroutine(__aenter__)
    _mark_coroutine(__aexit__)


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
    :func:`asyncpg.create_pool` (0.29-0.32; ``init_size`` as 0.32's, on
    every version), plus safepool's options:

    ``name``, ``max_lifetime`` (seconds, or None: a connection that old,
    less up to 10%, is closed and replaced, once idle or released),
    ``tcp_keepalive`` (a :class:`safepool.TcpKeepalive`, True for its
    defaults, or None or False for none: TCP keepalive on each connection
    over TCP),
    ``lease_timeout`` (seconds > 0, or None), ``leak_warning_after`` and
    ``acquire_timeout`` (seconds >= 0, or None: the default wait of
    ``acquire()``, not a bound on its release), ``capture_stack`` (True,
    False, or None: on with ``leak_warning_after``),
    ``max_waiters`` (an int >= 0, or None), ``max_connecting`` (an int >= 1,
    or None), ``fail_fast`` (True: after 3 consecutive failed connects with
    no connection left, acquires fail at once with
    :class:`~safepool.ServerUnavailableError` until the next attempt is
    due) and ``wait_on_connect_error`` (True or False),
    ``reset_mode``
    (``"full"``, ``"rollback"`` or ``"auto"``), ``reset_timeout`` (seconds
    > 0 for a release's reset when neither ``release(timeout=)`` nor the
    acquire's ``timeout`` gives one; None: asyncpg's limits, the
    connection's ``command_timeout``, else 30 s), ``backend_exit_timeout``
    (seconds >= 0, finite, default 1.0: how long a closed connection's
    place, counted towards ``max_size``, waits for the server to close the
    socket, its backend gone; 0: not at all, as asyncpg's pool), ``backoff`` (a
    :class:`safepool.Backoff`), ``clock`` (a :class:`safepool.Clock`),
    ``max_site_share`` (0 < share <= 1: one acquire site holds at most
    ``ceil(share * max_size)`` connections), ``queue_policy`` (``"fifo"`` or
    ``"adaptive"``), ``queue_target`` and ``queue_interval`` (seconds > 0,
    ``queue_target < queue_interval``; defaults 0.01 and 0.1; other values
    only with ``queue_policy="adaptive"``, else ``PoolValueError``: the adaptive
    queue's CoDel target and interval, after Nichols and Jacobson,
    "Controlling Queue Delay", ACM Queue 2012, as Maurer's "Fail at Scale",
    ACM Queue 2015, applies them to server queues). See docs/backpressure.md.
    Every other keyword goes to :func:`asyncpg.connect`, as with asyncpg's
    pool: a keyword neither knows (a typo) is refused by the first connect
    (``TypeError: connect() got an unexpected keyword argument``), at
    ``await create_pool()`` or, with ``min_size=0``, at the first acquire;
    safepool's message adds the option or connect keyword closest to it
    (``(did you mean lease_timeout=, an option of safepool.create_pool()?)``).

    :raises safepool.PoolValueError: (a ``ValueError``) an argument out of
        range or not one of its choices, checked when called (asyncpg's own
        checks with asyncpg's messages: ``max_size`` > 0, 0 <= ``min_size``
        <= ``max_size``, ...), or a ``name`` UTF-8 cannot encode (a lone
        surrogate, as ``os.fsdecode()`` makes of undecodable bytes: it
        labels metrics).
    :raises safepool.PoolTypeError: (a ``TypeError``) an argument of the
        wrong type (a size that is not an int, a duration that is not a
        number or is a bool, a ``name`` that is not a str).

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
