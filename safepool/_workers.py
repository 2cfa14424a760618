"""The pool's connection work: connect, reset, take back, close.

Coroutines that do one piece of I/O on a :class:`~safepool._internals.ServerConnection`
and return its outcome (an ``Exception``, or None for success). They know
nothing of the state core: the runner (``_runner.py``) turns outcomes into the
core's facts. Cancellation: ``CancelledError`` always propagates (after a
synchronous ``terminate()`` where a connection would be left half-used); only
``Exception`` is an outcome.
"""

from __future__ import annotations

import asyncio
import contextvars
import os
import socket
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from asyncpg import connection as _pg_connection
from asyncpg import exceptions as _pg_exceptions

from . import _internals as _pg
from . import _keepalive, _secrets
from ._internals import RawConnection
from ._keepalive import TcpKeepalive
from ._options import misspelt_keyword_hint
from .errors import PoolInterfaceError

_T = TypeVar("_T")

# Bound on a background reset or take-back when no release timeout applies:
# a reset that hangs longer than this is treated as a broken connection.
DEFAULT_RESET_TIMEOUT = 30.0
# Bound on the cancel request sent for the backend of a connection lost
# while leased (without reset_timeout).
LOST_BACKEND_CANCEL_TIMEOUT = 2.0
# How long the close of a connection whose release ran out of budget while
# its cancelled query had not answered waits for that answer before it
# aborts: a cancel request slow under load arrives (helper-47's stress saw
# 28-44 ms; the slot counts meanwhile, so the backend never runs beside its
# replacement), and one that never does (a cut network) does not hold the
# slot longer than asyncpg's recovery allows (asyncpg 0.32's own
# test_pool_release_timeout_during_cancellation wants a replacement within
# 1 s of the release's TimeoutError; asyncpg aborts at once).
CANCEL_ANSWER_GRACE = 0.5
# How soon a take-back repeats its cancel request while the expired
# holder's statement goes on (a request that reached the backend before the
# statement did, or between two of a call's steps, was dropped: PostgreSQL
# ignores a cancel while idle), doubling up to TAKE_BACK_CANCEL_MAX_INTERVAL
# while the same statement runs: one the server cannot cancel (a query
# waiting in PgBouncer's queue for a server connection, which PgBouncer
# drops cancels for) costs a dozen requests in reset_timeout's 30 s, not
# 300. A statement begun since the last request gets one at once.
TAKE_BACK_CANCEL_INTERVAL = 0.1
TAKE_BACK_CANCEL_MAX_INTERVAL = 2.0
# Loop passes a take-back lets go by before its first step: see take_back.
TAKE_BACK_FIRST_PASSES = 2
# How long a closed connection's place stays counted while its backend
# exits (seconds): until the server closes its end of the socket. PostgreSQL
# closes a backend's socket as the process ends, after its exit work (a
# session's temporary tables are dropped then: 2,000 take 0.1-0.8 s here,
# review h206); PgBouncer closes a dropped client's at once. A peer that
# never answers (a cut network) holds the place no longer than this.
BACKEND_EXIT_GRACE = 1.0


class ResetHooks:
    """How the pool resets a session: ``custom`` (a ``reset=`` hook, or a
    connection class with its own ``reset()``), the hook itself, and whether
    the reset query is sent by default (not with ``reset_mode="rollback"``).
    ``ended``: the hooks for a lease the pool ended itself (taken back by
    ``lease_timeout``, or reclaimed after its proxy was garbage collected),
    which always send the reset query: the lease's own clean-up (the
    ``finally:`` that unlocks or UNLISTENs) never ran, so rollback mode's
    "the application cleans up what it sets" does not hold for it."""

    __slots__ = ("custom", "hook", "full", "ended")

    def __init__(self, custom: bool, hook: Callable[[Any], Awaitable[None]] | None, full: bool) -> None:
        self.custom = custom
        self.hook = hook
        self.full = full
        self.ended: ResetHooks = self if full else ResetHooks(custom, hook, True)


class ConnectAttempt:
    """What :func:`connect` tells the pool beside its error: whether the
    connection was open when ``init=`` raised (the hook failed, not the
    server), and, with ``close_later``, that connection itself, left open
    for the pool to close (``connection``). Passed through
    :data:`CONNECT_ATTEMPT`, so the error raised is the hook's own, as from
    asyncpg, and ``_get_new_connection`` keeps asyncpg's signature.

    ``close_later``: the runner closes a connection ``init=`` failed on in
    a pool task of its own, its slot counted until the backend is gone,
    and the task waiting for the connect gets the hook's error at once
    (asyncpg's acquire raises it even when the close outlasts its
    ``timeout``: the close, cut short, re-raises it). Without it (pool
    creation, which raises the error to its caller, as asyncpg's), the
    close is awaited here first."""

    __slots__ = ("init_failed", "close_later", "connection", "error", "opened")

    def __init__(self, close_later: bool = False, opened: Callable[[], None] | None = None) -> None:
        self.init_failed = False
        self.close_later = close_later
        # Called once the server has answered (the connection is open),
        # before ``init=`` runs: the connect is no longer a lost one.
        self.opened = opened
        self.connection: RawConnection | None = None
        self.error: BaseException | None = None  # the hook's, raised with ``connection`` left open

    def left_open(self, raised: BaseException | None) -> RawConnection | None:
        """The connection to close, when what the connect raised (``raised``;
        None: it returned, or was cancelled) is the hook's error it was left
        open with. Otherwise (a ``Pool`` subclass's ``_get_new_connection()``
        caught that error) it is terminated here: never left open."""
        con, self.connection = self.connection, None
        error, self.error = self.error, None  # (no cycle through the error's traceback)
        if con is not None and (raised is None or raised is not error):
            _pg.terminate(con)
            return None
        return con


# Set by the runner around its connect (a task-local context, so concurrent
# connects in other tasks do not see each other's).
CONNECT_ATTEMPT: contextvars.ContextVar[ConnectAttempt | None] = contextvars.ContextVar(
    "safepool_connect_attempt", default=None
)


async def connect(
    open_connection: Callable[..., Awaitable[Any]],
    args: Any,
    kwargs: dict[str, Any],
    *,
    loop: asyncio.AbstractEventLoop,
    connection_class: type[Any],
    record_class: type[Any],
    init: Callable[[Any], Awaitable[None]] | None,
    keepalive: TcpKeepalive | None = None,
    pool_name: str = "",
) -> RawConnection:
    """Open a connection and run ``init=`` on it; raises what the connect or
    ``init`` raised (a connection ``init`` failed on is closed first, or
    left to the pool, see :class:`ConnectAttempt`; on cancellation it is
    terminated), or asyncpg's
    ``ConnectionDoesNotExistError`` when the connection came back closed."""
    try:
        con = await open_connection(
            *args, loop=loop, connection_class=connection_class, record_class=record_class, **kwargs
        )
    except Exception as exc:
        # asyncpg's DSN errors may quote a piece of the password, and so
        # may the server's (a misread database name), and a connect=
        # callback's or connection_class's own error the DSN; the pool
        # raises, logs, emits and reports them (health).
        _secrets.scrub_connect_error(exc, *_secrets.connect_secrets(args, kwargs))
        if type(exc) is TypeError and open_connection is _pg_connection.connect and len(exc.args) == 1:
            # A misspelt option reached asyncpg's connect (the class and
            # the start of the message stay asyncpg's pool's).
            hint = misspelt_keyword_hint(exc)
            if hint is not None:
                exc.args = (f"{exc.args[0]} ({hint})",)
        raise
    try:
        await _pg.connect_settled()  # asyncpg 0.31: before the pool counts references to it
    except BaseException:
        _pg.terminate(con)
        raise
    if not isinstance(con, connection_class):
        good = f"{connection_class.__module__}.{connection_class.__name__}"
        bad_type = type(con)
        bad = bad_type.__name__ if bad_type.__module__ == "builtins" else f"{bad_type.__module__}.{bad_type.__name__}"
        raise PoolInterfaceError(
            f"expected pool connect callback to return an instance of '{good}', got '{bad}'"
        )
    _pg.tune_reads(con)
    attempt = CONNECT_ATTEMPT.get()
    if attempt is not None and attempt.opened is not None:
        attempt.opened()
    if keepalive is not None:
        _keepalive.apply(con, keepalive, pool_name)  # (before init=: its statements are probed too)
    if init is not None:
        try:
            await init(con)
        except Exception as exc:
            # (Its message may quote the DSN: "cannot prepare {dsn}".)
            _secrets.scrub_connect_error(exc, *_secrets.connect_secrets(args, kwargs), quoted=False)
            attempt = CONNECT_ATTEMPT.get()
            if attempt is not None:
                # Still open: the hook itself raised (a lost connection is
                # the server's failure, as any connect's).
                attempt.init_failed = not con.is_closed()
                if attempt.init_failed and attempt.close_later:
                    # The pool closes it; nothing is awaited between the
                    # hook's error and the runner taking the connection.
                    attempt.left_open(None)  # (an earlier one, caught by a Pool subclass)
                    attempt.connection = con
                    attempt.error = exc
                    raise
            try:
                await con.close()
            except Exception:
                _pg.terminate(con)
            raise
        except BaseException:
            # A cancel path, or the hook raised a BaseException (the runner
            # tells which): no awaited close (a second cancel would leak the
            # backend).
            attempt = CONNECT_ATTEMPT.get()
            if attempt is not None:
                attempt.init_failed = not con.is_closed()
            _pg.terminate(con)
            raise
    if con.is_closed():
        # Lost in init=, or before (a connect= callback's await after the
        # login): asyncpg tells the pool of a loss only once it is attached,
        # so it would sit idle, counted, with no backend. asyncpg 0.32's
        # error, so the floor upkeep retries it.
        raise _pg_exceptions.ConnectionDoesNotExistError("connection was closed during pool initialization")
    return con


def raised_not_cancelled(error: BaseException) -> bool:
    """Whether a ``BaseException`` out of a pool task's connect or reset is
    that work's outcome, not the task being stopped: a hook (``init=``,
    ``reset=``, a connection class's ``reset()``) raised it, a
    ``CancelledError`` of its own or a ``BaseException`` subclass, while
    nothing cancelled the task. asyncpg's pool raises such an error to the
    caller (``acquire()``, ``create_pool()``, ``release()``) as any hook
    error, and gives the connection up. Taken for a cancellation, a failed
    connect left its waiting task waiting while the pool reconnected in a
    loop (a server login each time), and a failed reset left its slot
    resetting for ever (``close()`` never returned). KeyboardInterrupt and
    SystemExit always pass."""
    if isinstance(error, (KeyboardInterrupt, SystemExit)):
        return False
    task = asyncio.current_task()
    return task is not None and not task.cancelling()


async def reset(
    con: RawConnection, rollback: bool, hooks: ResetHooks, budget: float | None, statement_limit: float | None
) -> BaseException | None:
    """Reset a released connection in a pool task, within ``budget`` seconds
    (None: no limit; ``statement_limit`` then bounds the statements).
    Returns the reset's error (a hook's ``BaseException`` too, see
    :func:`raised_not_cancelled`); raises when the task is cancelled."""
    try:
        if hooks.custom and hooks.hook is None:
            # A connection class's own reset(): asyncpg 0.32's release bounds
            # only the wait for a cancelled query by the budget, and passes
            # reset() what is left (Connection.reset() bounds itself by it): a
            # reset() that takes longer, or ignores the timeout, is not cut short.
            if _pg.is_cancelling(con):
                async with asyncio.timeout(budget):
                    budget = await cancel_answered(con, budget)
            whole = None
        else:
            whole = budget
        async with asyncio.timeout(whole):
            await _reset_connection(con, rollback, hooks, statement_limit, budget)
    except Exception as exc:
        return exc
    except BaseException as exc:
        if not raised_not_cancelled(exc):
            raise
        return exc
    return None


async def take_back(
    con: RawConnection, hooks: ResetHooks, budget: float, copying: Callable[[], bool] = lambda: False,
    before_reset: Callable[[], object] = lambda: None,
) -> Exception | None:
    """Reset a connection whose lease expired, within ``budget`` seconds.

    The holder may be in the middle of a call. asyncpg exposes no "busy"
    flag for a query on the wire, but refuses a second operation at once
    without sending anything: so try the reset, and if refused, cancel the
    running query on the server (asyncpg's cancel request) and retry until
    it is free. Between the steps of a fetch-family call (prepare, then bind
    and execute) the protocol is idle although the call goes on
    (:func:`_internals.in_call`): nothing is sent then, and the cancel is
    repeated for the step that follows (a cancel that reached an idle
    backend was dropped by the server). ``copying``: whether a COPY method
    of the lease is under way, which may wait before its first message
    (a file opening) as a fetch-family call waits between its steps.
    ``before_reset``: called before each attempt sends the reset, once the
    lease's statements are counted and before the reset's are (the
    ``max_queries`` check: review h266)."""

    async def reset() -> None:
        # Something must be sent, even where a release would send nothing
        # (a reset= hook or reset() that sends nothing): the refusal is the
        # only sign of a query still running, which must be cancelled
        # before the connection is handed on. There a ROLLBACK goes first
        # (it also ends a Parse's implicit transaction, as for a marked
        # lease; outside any transaction it is a server warning). The
        # default reset always sends its query (hooks.ended: the full
        # reset, in rollback mode too).
        rollback = con.is_in_transaction() or hooks.custom or not hooks.full
        # The take-back dropped the listeners when the lease expired, but a
        # call it waited for may have added one since (add_listener records
        # its callback after its LISTEN answered): it goes with the lease too.
        _pg.clear_listeners(con)
        before_reset()
        await _reset_connection(con, rollback, hooks)

    try:
        async with asyncio.timeout(budget):
            # A holder's call that waited for asyncpg's cancellation of an
            # earlier statement (its client timeout, a task cancel) resumes
            # two loop passes after the cancellation ended (asyncio.shield's
            # callback, then its task), the proxy's and asyncpg's checks
            # behind it. A take-back started in that gap sent its reset first,
            # and the call was refused with asyncpg's raw "another operation
            # is in progress" (review s60). After these passes the call has
            # started, or is refused by the proxy (LeaseExpiredError) or by
            # asyncpg's classes ("released back to the pool"); one that
            # started is cancelled below as any running statement.
            for _ in range(TAKE_BACK_FIRST_PASSES):
                await asyncio.sleep(0)
            return await _once_free(con, reset, copying)
    except Exception as exc:
        return exc


async def _once_free(
    con: RawConnection, send: Callable[[], Awaitable[None]], paused: Callable[[], bool] = lambda: False,
    *, probe: bool = False,
) -> Exception | None:
    """Run ``send`` once asyncpg's protocol takes it: while it is refused at
    once (``_internals.is_busy``: a statement still runs), send the server a
    cancel request (at once for each statement the protocol starts, then
    again after TAKE_BACK_CANCEL_INTERVAL, doubling up to
    TAKE_BACK_CANCEL_MAX_INTERVAL while that statement runs) and try again 5 ms
    later. Nothing is tried between the steps of a fetch-family call
    (``_internals.in_call``) or while ``paused()``: the protocol is idle
    there although the call goes on, and the cancel is repeated for the
    step that follows. A cancel request that fails (refused, reset) is sent
    again at the next interval, not returned: the statement still runs.
    Returns ``send``'s error other than the refusal, or None (also when the
    connection closed first); the caller bounds the wait.

    A request under way does not hold the watch: a connection that dies
    meanwhile ends the wait at once (its statement ended with it), and the
    request is dropped. No second request is sent while one is under way.
    Nor is ``send``, so that a request late for a statement that ended by
    itself cannot reach it (a take-back's reset, review h249), unless
    ``probe``: ``send`` only tells that nothing runs any more (a close's
    empty query, :func:`statement_ended`), and a late request meeting it
    says the same. A request that never gets through (new connections
    accepted and never relayed) then does not hold a close past the
    statement's end (review h249's stalled request held it for the whole
    budget). Only where nothing but asyncpg's Terminate follows: see
    :func:`statement_ended` (review h257)."""
    loop = asyncio.get_running_loop()
    cancelled_at: float | None = None
    cancelled_statement = -1  # (asyncpg's count of statements sent, at the last request)
    interval = TAKE_BACK_CANCEL_INTERVAL
    request: asyncio.Future[None] | None = None
    try:
        while not con.is_closed():
            requesting = request is not None and not request.done()
            if requesting and not probe:
                await asyncio.sleep(0.005)  # (delivered first; or the connection dies)
                continue
            if not (_pg.in_call(con) or paused()):
                try:
                    await send()
                except Exception as exc:
                    if not _pg.is_busy(exc):
                        return exc
                else:
                    return None
            statement = _pg.queries_count(con)
            if statement != cancelled_statement:
                interval = TAKE_BACK_CANCEL_INTERVAL
                cancelled_at = None  # (a statement begun since the last request: one at once)
            if not requesting and (cancelled_at is None or loop.time() - cancelled_at >= interval):
                if cancelled_at is not None:
                    interval = min(interval * 2, TAKE_BACK_CANCEL_MAX_INTERVAL)
                cancelled_at = loop.time()
                cancelled_statement = statement
                request = asyncio.ensure_future(_cancel_request(con))
            await asyncio.sleep(0.005)  # the server's reply frees the protocol
        return None
    finally:
        if request is not None and not request.done():
            # (Dead, or the caller's bound ran out or it was cancelled: the
            # connection is given up; nothing awaited then.)
            request.cancel()


async def _cancel_request(con: RawConnection) -> None:
    """One cancel request of :func:`_once_free`'s for ``con``'s statement."""
    try:
        await _pg.cancel_running_query(con)
    except Exception:
        # The request did not get through (the address refuses new
        # connections: a restart under way, a proxy or a load balancer that
        # stopped accepting, while this connection lives on). The statement
        # still runs: keep waiting for it, and ask again at the next
        # interval. Ending here would hand the connection to a close that
        # cancels the statement inside asyncpg's protocol, under its task's
        # await (a None result for its fetchval(), a TypeError from its
        # execute()).
        pass


def cancel_timeout(budget: float | None) -> float:
    """The bound on a cancel request the pool sends for the backend of a
    connection it gave up (lost, or aborted while a statement ran): the
    pool's reset_timeout (a close's budget), else LOST_BACKEND_CANCEL_TIMEOUT.
    The slot counts until the request was delivered or this ran out, so a
    dead network holds it for this long at most."""
    return budget if budget is not None and budget > 0 else LOST_BACKEND_CANCEL_TIMEOUT


async def deliver_cancel(con: RawConnection, key: _pg.CancelKey | None, timeout: float) -> bool:
    """Send a cancel request for an aborted connection's backend (``key``:
    read before the abort) and wait until the server has read it (it closes
    the request's socket once it signalled the backend), for ``timeout``
    seconds at most. False if it failed or ran out (the server unreachable:
    nothing more to do for that backend)."""
    try:
        async with asyncio.timeout(timeout):
            await _pg.cancel_running_query(con, key)
    except Exception:
        return False
    return True


def exit_watch(con: RawConnection) -> socket.socket | None:
    """A second descriptor of ``con``'s socket (``os.dup``), non-blocking, for
    :func:`backend_gone`: while it is open, asyncpg's close of its own
    descriptor does not end the socket, so the pool can still read the
    server's end of it. None when ``con`` has no socket to duplicate (a
    stand-in connection, a transport without one) or the duplicate fails."""
    try:
        fd = con._transport.get_extra_info("socket").fileno()
        if type(fd) is not int or fd < 0:
            return None
        watch = socket.socket(fileno=os.dup(fd))
    except Exception:  # (no transport, no socket, EMFILE)
        return None
    try:
        watch.setblocking(False)
    except OSError:
        watch.close()
        return None
    return watch


def half_close(watch: socket.socket) -> None:
    """Send the socket's end (FIN) through ``watch``: asyncpg's close of its
    own descriptor sends none while ``watch`` keeps the socket open, and an
    idle backend waits for it (or for asyncpg's Terminate) to exit."""
    try:
        watch.shutdown(socket.SHUT_WR)
    except OSError:
        pass  # (already shut, or the peer reset it)


async def backend_gone(watch: socket.socket, grace: float) -> bool:
    """Wait until the server closes its end of the socket ``watch`` is a
    descriptor of (the backend has exited), ``grace`` seconds at most; True
    if it did. Sends the socket's end first (:func:`half_close`). What the
    server sends before its end (a FATAL message, answers nobody reads) is
    read and dropped. Only for a connection asyncpg has closed: on an open
    one this would read its data."""
    half_close(watch)
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(grace):
            while await loop.sock_recv(watch, 65536):
                pass
    except TimeoutError:
        return False
    except OSError:
        return True  # (a reset: the server's end is gone too)
    return True


async def close(
    con: RawConnection, lost: bool, budget: float | None, spent: Callable[[TimeoutError], None] | None = None,
    *, busy: bool = False, key: _pg.CancelKey | None = None,
    in_flight: Callable[[RawConnection], bool] = _pg.statement_in_flight, calls_budget: float | None = None,
    keyword: bool = False,
) -> Exception | None:
    """Close gracefully; on any failure, or cancellation, terminate.

    A cancelled query is first waited for (the server confirms it), else a
    graceful close could not run and an abort would leave the backend
    running the query beside its replacement. A connection whose socket died
    under a lease (``lost``: a network reset, an abort; not a close the peer
    made in order, see ``_internals.peer_closed``) may still have its
    backend running the lease's query: cancel it (the server acknowledges a
    cancel request by closing that connection).

    Returns the error that made it terminate (None after a graceful close):
    a release that closes under its own budget raises it, as asyncpg's
    (``Connection.close(timeout=)`` aborts, then raises). ``spent``: given
    when ``budget`` is a release's (max_queries, max_lifetime, an expired
    generation), called with its TimeoutError when it runs out while a
    cancelled query has not answered, which then gets CANCEL_ANSWER_GRACE
    more (see :func:`_cancel_answered_within`).

    ``calls_budget``: with no ``budget`` (asyncpg 0.29-0.31, whose
    ``close(timeout=)`` the release's budget does not bound: see
    ``_internals.CLOSE_UNDER_BUDGET``), the release's budget for the wait
    for a call in flight before the close, which asyncpg's release does not
    make (review h258); None: DEFAULT_RESET_TIMEOUT's alone.

    ``keyword``: with no ``budget``, asyncpg's ``close()`` gets
    ``timeout=None``, as asyncpg's pool passes it there (a release's close,
    an expired connection's: ``Holder.close_timeout``); else no argument, as
    asyncpg's ``Pool.close()`` calls it. The same to asyncpg's own
    ``close()``; a connection class's own may require or record it.

    ``busy``: a statement of the released lease still runs in another task
    (the release's reset was refused): waited for first, within ``budget``
    (see :func:`statement_ended`); if it never ends, the connection is
    aborted, as an unresponsive one. Any call found in flight right before
    asyncpg's ``close()`` is waited for there too (:func:`_calls_ended`): a
    close with no reset first (an expired generation's, as asyncpg's
    release makes it) meets a call still running in another task, which
    asyncpg's ``close()`` (0.32) would cancel and, closing, resolve with
    None if the server ended the connection meanwhile: a write the server
    rolled back returned as done (session s75).

    Whenever the close ends in an abort while a statement may still run
    (one was in flight when the close began, and, if asyncpg's protocol
    is still there to ask, still is), the backend gets a cancel request
    after the abort (``key``: its cancel key, read when it connected), and
    the close returns once it was delivered (:func:`deliver_cancel`): the
    caller counts the slot until then. ``in_flight``: how to tell that a
    statement may run (the holder's, which counts a lease's COPY too)."""
    running = not lost and in_flight(con)
    try:
        if busy and not lost:
            async with asyncio.timeout(budget if budget is not None else DEFAULT_RESET_TIMEOUT):
                # (Paused between the steps of a call the holder counts, a
                # COPY or a prepare(): asyncpg awaits nothing there.) The
                # close gets what that wait left: the release is bounded by
                # its budget as a whole, not once per step (review h246).
                budget = await _left_after(statement_ended(con, _between_steps(con, in_flight)), budget)
        if lost:
            async with asyncio.timeout(cancel_timeout(budget)):
                await _pg.cancel_running_query(con, key)
        elif budget is None:
            # No budget asked for: asyncpg's pool calls close() with none
            # (Pool.close(), and a release with no timeout), and waits as
            # long as it takes. safepool bounds it from outside, so a
            # connection class's close() gets what asyncpg's pool passes.
            async with asyncio.timeout(DEFAULT_RESET_TIMEOUT):
                if _pg.is_cancelling(con):
                    await _pg.wait_for_cancellation(con)
                    if await _cancelled_after_a_reset(con, running, key):
                        return None
                async with asyncio.timeout(calls_budget):
                    await _calls_ended(con, in_flight)
                if keyword:
                    await con.close(timeout=None)
                else:
                    await con.close()
        else:
            if spent is not None and _pg.is_cancelling(con):
                error = await _cancel_answered_within(con, budget, spent)
                if await _cancelled_after_a_reset(con, running, key):
                    return error
                if error is not None:
                    async with asyncio.timeout(CANCEL_ANSWER_GRACE):
                        await _calls_ended(con, in_flight)
                    await con.close(timeout=CANCEL_ANSWER_GRACE)
                    return error
            if not budget > 0:
                # A release's budget already spent (0, negative, NaN):
                # asyncpg's close(timeout=) raises TimeoutError before it
                # sends anything, and aborts.
                raise TimeoutError
            if _pg.is_cancelling(con):
                await _pg.wait_for_cancellation(con, budget)
                if await _cancelled_after_a_reset(con, running, key):
                    return None
            async with asyncio.timeout(budget):
                left = await _left_after(_calls_ended(con, in_flight), budget)
            if left is not None:
                if not left > 0:
                    raise TimeoutError
                budget = left
            await con.close(timeout=budget)
    except Exception as exc:
        if running and con._protocol is not None:
            running = in_flight(con)  # (still open: it knows; aborted: it ran when the close began)
        _pg.terminate(con)  # lost: the server is unreachable; nothing more to do for that backend
        if running:
            await deliver_cancel(con, key, cancel_timeout(budget))
        return exc
    except BaseException:
        _pg.terminate(con)
        raise
    return None


async def _cancelled_after_a_reset(con: RawConnection, running: bool, key: _pg.CancelKey | None) -> bool:
    """After a close's wait for a cancelled statement's answer: if the socket
    was reset meanwhile (an RST: a proxy, a load balancer, the network),
    which may also have killed asyncpg's cancel request (asyncpg then aborts
    the connection itself), the backend may still run the statement: send
    it a cancel request of the pool's own, for CANCEL_ANSWER_GRACE at most
    (the slot counts until then; asyncpg's own wait for an answer has the
    same bound), and return True: the close is over. False, nothing sent,
    when the connection is open, no statement ran (``running``), or the
    peer closed it in order (the backend has exited)."""
    if not (running and con.is_closed() and not _pg.peer_closed(con)):
        return False
    await deliver_cancel(con, key, CANCEL_ANSWER_GRACE)
    return True


async def _calls_ended(con: RawConnection, in_flight: Callable[[RawConnection], bool]) -> None:
    """Until no call runs on ``con`` (``in_flight``: the holder's reading,
    a COPY between its steps included), right before asyncpg's ``close()``:
    each as :func:`statement_ended` waits for one, looked at again after
    each, since a call queued behind asyncpg's cancellation of an earlier
    one, or begun while a cancel request was on its way, goes on once that
    one ends (review h249). asyncpg's ``close()`` (0.32) would cancel such
    a call and, closing, resolve it with None if the server ended the
    connection meanwhile: a write the server rolled back returned as done
    (session s75). Nothing is awaited between the last look and the close's
    first step, which marks the protocol closing: a call after it is
    refused, as on asyncpg's pool. The caller bounds the wait."""
    while not con.is_closed() and in_flight(con):
        if _pg.is_cancelling(con):
            await _pg.wait_for_cancellation(con)
            await asyncio.sleep(0)  # (the calls queued behind it take their step first)
        else:
            await statement_ended(con, _between_steps(con, in_flight))


def _between_steps(con: RawConnection, in_flight: Callable[[RawConnection], bool]) -> Callable[[], bool]:
    """:func:`statement_ended`'s ``paused``: a call the holder counts (a COPY,
    a prepare()) runs on ``con`` with no request of asyncpg's awaiting an
    answer, between two of its steps, where asyncpg awaits nothing."""
    return lambda: in_flight(con) and not _pg.statement_in_flight(con)


async def statement_ended(con: RawConnection, paused: Callable[[], bool] = lambda: False) -> None:
    """Until no statement runs on ``con`` any more: one that another task
    started before its lease was released (the release's reset was refused,
    and the pool gives the connection up). Cancelled on the server as a
    take-back's (cancel requests as :func:`_once_free` sends them), it ends
    with its own outcome, delivered to its task by asyncpg's protocol as
    usual (QueryCanceledError, or its result when it had already finished).

    asyncpg's ``close()`` must not meet it: its protocol would cancel the
    statement itself, and a statement whose answer was already on its way
    then fails with ``InternalClientError('got result for unknown protocol
    state 3')`` (asyncpg's pool terminates a connection whose reset was
    refused so: the statement gets ``ConnectionDoesNotExistError``; its
    release that closes a connection, at ``max_queries`` or for an expired
    generation, meets such a statement as safepool's does, and both give
    that error there). The sign that the statement ended
    is an empty query that the protocol accepts: refused at once, with
    nothing sent, while asyncpg still runs one (``_internals.is_busy``).
    Nothing is sent between the steps of a fetch-family call
    (``_internals.in_call``), nor while ``paused()`` (between the steps of
    a call the pool counts, a COPY or a ``prepare()``: review s70). The
    caller bounds the wait. (An error of the empty query's own, a cancel
    request late for the statement meeting it, says the same: nothing
    runs.)

    A cancel request still under way once the statement ended is dropped
    (``_once_free``'s ``probe``) only when asyncpg's own ``close()`` follows,
    which sends nothing but Terminate. A ``connection_class`` with a
    ``close()`` of its own may run statements on the backend before that,
    which the late request would cancel (review h257: an audit ``INSERT``
    lost): the request is then waited for, as asyncpg's protocol awaits its
    own cancellation before its next statement."""
    probe = not _pg.overrides(type(con), "close")
    await _once_free(con, lambda: _pg.empty_query(con), paused, probe=probe)


async def _cancel_answered_within(
    con: RawConnection, budget: float, spent: Callable[[TimeoutError], None]
) -> TimeoutError | None:
    """Wait for a cancelled query's answer within a release's ``budget``;
    None if it came. If the budget runs out first, ``spent`` gets its
    TimeoutError (the release raises it now, as asyncpg's), and the answer
    is waited for CANCEL_ANSWER_GRACE more: aborting at the budget would
    also drop asyncpg's cancel request still under way, and the backend
    would run the query on beside the slot's replacement (as a reset's
    close, Runner.reset_done). Returns that TimeoutError once the answer
    came; raises TimeoutError (asyncpg terminates) if it never does."""
    try:
        async with asyncio.timeout(budget if budget > 0 else 0.0):  # (0, negative, NaN: spent)
            await _pg.wait_for_cancellation(con)
    except TimeoutError as error:
        spent(error)
        await _pg.wait_for_cancellation(con, CANCEL_ANSWER_GRACE)
        return error
    return None


async def _reset_connection(
    con: RawConnection, rollback: bool, hooks: ResetHooks, limit: float | None = None, budget: float | None = None
) -> None:
    """ROLLBACK (if a transaction is open) and the reset query: one
    simple-query message, one round trip, but with a connection class's own
    reset query, which goes after a ROLLBACK of its own (``_send_reset``).
    ``limit`` bounds the statements, not the wait for a cancelled query
    (:func:`cancel_answered` bounds that)."""
    if _pg.is_cancelling(con):
        budget = await cancel_answered(con, budget)
    if con.is_closed():
        return  # asyncpg's background cancel gave up and closed it
    async with asyncio.timeout(limit):
        await _send_reset(con, rollback, hooks, budget)


async def cancel_answered(con: RawConnection, budget: float | None) -> float | None:
    """Wait until a cancelled query has answered (asyncpg makes release wait
    for it too, or the next holder inherits the cancellation); returns what
    is left of ``budget``, which goes to an overridden reset(), as asyncpg
    0.32's holder passes it. The caller bounds the wait by ``budget``; with
    none, ``DEFAULT_RESET_TIMEOUT`` bounds it here, for every reset that
    waits (asyncpg's release waits for ever: a statement the server does
    not cancel, a ``COPY ... FROM STDIN`` sent with ``execute()``, held the
    slot for good; reviews h281, h283)."""
    if budget is None:
        async with asyncio.timeout(DEFAULT_RESET_TIMEOUT):
            await _pg.wait_for_cancellation(con)
        return None
    budget = await _left_after(_pg.wait_for_cancellation(con), budget)
    if budget is not None and budget <= 0:
        raise TimeoutError  # (asyncpg 0.32: nothing left for the reset)
    return budget


async def _left_after(wait: Awaitable[Any], budget: float | None) -> float | None:
    """Await ``wait``; returns what is left of ``budget`` (seconds, None for
    no budget) once it is done: the time it took, taken off (may be <= 0)."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    await wait
    return None if budget is None else budget - (loop.time() - started)


async def _send_reset(con: RawConnection, rollback: bool, hooks: ResetHooks, budget: float | None) -> None:
    """``rollback``: an open transaction already reported (quietly, for a
    reclaimed or taken-back lease) that must end first."""
    if hooks.custom:
        if rollback:
            await con.execute("ROLLBACK")
        if hooks.hook is not None:
            # asyncpg 0.32: Connection._reset() (report and roll back an
            # open transaction, drop listeners), then the hook.
            await _pg.base_reset(con)
            await hooks.hook(con)
        else:
            await con.reset(timeout=budget)  # sees the lease's state, as with asyncpg
        return
    rollback = rollback or con.is_in_transaction()
    if not _pg.RESET_UNDER_BUDGET:
        # asyncpg 0.29's Connection.reset(timeout=): one statement, the
        # ROLLBACK (with a transaction open) and the reset query together,
        # its timeout= the release's budget, which replaces command_timeout
        # (a class's own execute() sees that one call; review h277).
        query = reset_message(_pg.reset_query_getter(con), hooks.full, rollback)
        if query:
            await con.execute(query, timeout=budget)
        return
    if rollback and hooks.full and _pg.overrides_reset_query(type(con)):
        # A connection class's own reset query may refuse a transaction
        # block (DISCARD ALL): the ROLLBACK first, alone, as asyncpg's
        # Connection._reset sends it (review h269).
        await con.execute("ROLLBACK")
        rollback = False
    query = reset_message(_pg.reset_query_getter(con), hooks.full, rollback)
    if query:
        await con.execute(query)


def reset_message(reset_query: Callable[[], str], full: bool, rollback: bool) -> str:
    """The one simple-query message of a default reset: ROLLBACK (if a
    transaction is open) and, when ``full``, asyncpg's reset query; "" when
    there is nothing to send. PostgreSQL runs the statements after the
    ROLLBACK in the message's implicit transaction block, where asyncpg's
    own reset query runs; a connection class's own may not (DISCARD ALL),
    and goes alone after a ROLLBACK of its own (``_send_reset``)."""
    query = reset_query() if full else ""
    if rollback:
        return f"ROLLBACK;\n{query}" if query else "ROLLBACK"
    return query
