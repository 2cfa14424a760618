"""Every use of asyncpg's private members, in one place.

safepool must reach into asyncpg's Connection the way asyncpg's own pool does
(a back-reference to the pool holder, the proxy slot, the protocol's query
counter and cancellation state). asyncpg-stubs do not declare those members,
so connections are typed ``Any`` here; when asyncpg changes, this is the
module to check (the compat suite in tests/compat runs asyncpg's own pool
tests against safepool to catch it, and .ci/matrix.py runs it on every
supported asyncpg).

What differs between the supported asyncpg versions (0.29 to 0.32), and how
each function below bridges it:

- 0.32 tells a pool holder that its connection died through
  ``con._pool_holder`` (a weak reference), idle or leased. 0.29-0.31 have no
  such slot: they call ``con._proxy._holder._release_on_close()``, which
  covers leased connections only; for idle ones a termination listener of
  ours does it (see ``attach_holder``).
- ``protocol._wait_for_cancellation(timeout)``: the timeout is 0.32's; before,
  the wait is bounded here, with 0.32's outcome (the connection is
  terminated, ``TimeoutError`` raised).
- ``Connection._reset()`` and the public ``get_reset_query()`` are 0.30's;
  0.29 has ``_get_reset_query()`` and does both in ``reset()``.
- 0.31's ``connect()`` returns while a task of its own still refers to the
  new connection (``connect_settled``).
- Before 0.32 a query's cancellation futures stay pending once the socket
  closed, and a task cancelled while awaiting them cancels them
  (``is_cancelling``, ``wait_for_cancellation``).
"""

from __future__ import annotations

import asyncio
import asyncio.selector_events
import contextlib
import errno
import functools
import gc
import os
import re
import socket
import struct
import sys
import types
import weakref
from collections.abc import Callable, Generator
from typing import Any, Protocol, runtime_checkable

from asyncpg import connect_utils as _connect_utils
from asyncpg import connection as _pg_connection
from asyncpg import connresource as _pg_connresource
from asyncpg import exceptions as _pg_exceptions
from asyncpg.protocol import protocol as _pg_protocol

from ._detach import retrieve
from ._state import BROKEN, NOT_REFUSED, REFUSED, UNREACHABLE, UNRESOLVED, LeaseState


class ServerProtocol(Protocol):
    """The part of asyncpg's protocol object that the helpers below read."""

    queries_count: int
    backend_pid: int
    backend_secret: int

    def is_in_transaction(self) -> bool: ...
    def is_connected(self) -> bool: ...
    async def query(self, query: str, timeout: float | None) -> str: ...
    def _is_cancelling(self) -> bool: ...
    async def _wait_for_cancellation(self, timeout: float | None) -> None: ...


@runtime_checkable
class ServerConnection(Protocol):
    """What the pool, its runner and its workers use of a server connection:
    asyncpg's public methods, plus the private members the helpers of this
    module read (declared here so that a fake, in tests/io, can stand in for
    an ``asyncpg.Connection`` without a server). Everything outside this
    module calls only the public part directly."""

    # asyncpg's public API
    async def execute(self, query: str, *args: Any, timeout: float | None = None) -> str: ...
    async def close(self, *, timeout: float | None = None) -> None: ...
    async def reset(self, *, timeout: float | None = None) -> None: ...
    def terminate(self) -> None: ...
    def is_closed(self) -> bool: ...
    def is_in_transaction(self) -> bool: ...
    def get_reset_query(self) -> str: ...

    # what the helpers below read or call (asyncpg's private members)
    _protocol: ServerProtocol | None
    _top_xact: Any
    _listeners: Any
    _log_listeners: Any
    _termination_listeners: Any
    _query_loggers: Any
    _pool_release_ctr: int
    _proxy: Any
    _pool_holder: Any
    _config: Any
    _loop: asyncio.AbstractEventLoop

    def _on_release(self, stacklevel: int = 1) -> None: ...
    def _check_listeners(self, listeners: Any, listener_type: str) -> None: ...
    def _set_proxy(self, proxy: Any) -> None: ...
    async def _reset(self) -> None: ...


# Typed Any at the call sites: asyncpg-stubs do not declare the private
# members, and a Connection subclass must pass as one.
RawConnection = Any


# An OSError's errno that says nothing answered: refused (no listener),
# timed out, or no route to the server's host or network (the host is down
# or rebooting: its router, or this host's ARP, answered for it).
_UNREACHABLE_ERRNOS = frozenset(
    {errno.ECONNREFUSED, errno.ENOENT, errno.ETIMEDOUT, errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EHOSTDOWN,
     errno.ENETDOWN}
)
# Of a host name's addresses, one this host cannot use (an IPv6 address
# without IPv6): says nothing of the server.
_UNUSABLE_ADDRESS_ERRNOS = frozenset({errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT})
_ERRNO_IN_TEXT = re.compile(r"\[Errno (-?\d+)\]")
# asyncpg's ConnectionError when something answered its SSLRequest with
# neither S nor N (not a PostgreSQL server: a wrong port), N while SSL is
# required, or an error response (a server that could not start a backend).
_SSL_ANSWERS = ("rejected SSL upgrade", "error response during SSL exchange")

# PgBouncer's refusals of a login that end by themselves, all SQLSTATE 08P01
# (asyncpg's ProtocolViolationError), which it also sends for lasting ones
# ("no such database", "no such user"): told apart by PgBouncer's wording
# (pgbouncer 1.x, src/client.c, src/objects.c, src/janitor.c). Out of client
# slots (its 53300), a database DISABLEd or shutting down, a login queued
# past query_wait_timeout while its server is down or slow, its own failing
# server logins (server_login_retry), its resources exhausted (review h273).
_POOLER_BUSY = (
    "no more connections allowed", "client connections exceeded", "query_wait_timeout",
    "server login has been failing", "pgbouncer cannot connect to server", "bouncer resources exhaustion",
    "no memory for pool", "pooler is shutting down", "server shutting down", "client_login_timeout",
)


# Of _POOLER_BUSY, PgBouncer's words for a server it cannot reach.
_POOLER_SERVER_UNREACHABLE = ("query_wait_timeout", "server login has been failing", "pgbouncer cannot connect to server")


def program_error(error: BaseException) -> bool:
    """Whether a connect failed on the program's own mistake, not on the
    server or the network: a keyword asyncpg's ``connect()`` does not take
    (``TypeError``), an option or DSN it cannot use (``ValueError``,
    asyncpg's ``ClientConfigurationError``; ``OverflowError``, a port out
    of range, which the socket refuses before anything is sent), a
    ``connect=`` callable's bug (``AttributeError``). Such an error says
    nothing of the server, so it does not count toward the circuit breaker
    (as an ``init=`` hook's does not): acquires get it as from asyncpg's
    pool."""
    return isinstance(error, (TypeError, ValueError, AttributeError, OverflowError)) and not isinstance(
        error, (OSError, _pg_exceptions.PostgresError)
    )


def refusal(error: BaseException) -> int:
    """How a connect failed, for its backoff (``_state.Backoff``):
    ``UNREACHABLE``, nothing answered: nothing listening (the kernel
    refused: free to retry soon), no route to the host (it is down: the
    server pays nothing), or no answer within the connect timeout (a black
    hole: the attempt's own wait spaced it from the next); also when a host
    name's every address failed so (asyncio's "Multiple exceptions" OSError,
    as ``localhost`` gives with ``::1`` and ``127.0.0.1`` both refused);
    ``REFUSED``, the server refused at once (starting up or shutting down,
    57P03, or ending the start-up as it goes down, 57P01 and 57P02; out of
    connection slots, 53300: cheap, but a backend process each; PgBouncer's
    refusals that end by themselves, 08P01 with its wording: out of client
    slots, a database disabled, a login queued past ``query_wait_timeout``:
    :func:`pooler_busy`);
    ``BROKEN``, the connect broke before the server answered (reset,
    aborted, or closed mid-start-up: asyncpg's ConnectionDoesNotExistError;
    a black hole healing, a proxy whose server is down);
    ``UNRESOLVED``, the host name did not resolve (socket.gaierror: the
    resolver, not the server, would pay for quick retries);
    else ``NOT_REFUSED`` (a wrong password, a missing database, an SSL
    upgrade refused and everything else back off longer)."""
    if isinstance(error, (ConnectionRefusedError, FileNotFoundError, TimeoutError)):
        return UNREACHABLE
    if isinstance(
        error,
        (
            _pg_exceptions.CannotConnectNowError,
            _pg_exceptions.TooManyConnectionsError,
            _pg_exceptions.AdminShutdownError,
            _pg_exceptions.CrashShutdownError,
        ),
    ):
        return REFUSED
    if isinstance(error, _pg_exceptions.ProtocolViolationError) and pooler_busy(error_text(error)):
        return REFUSED
    if type(error) is ConnectionError and any(answer in error_text(error) for answer in _SSL_ANSWERS):
        return NOT_REFUSED  # (something answered, and will answer so again)
    if isinstance(error, socket.gaierror):
        return UNRESOLVED
    if isinstance(error, (ConnectionError, _pg_exceptions.ConnectionDoesNotExistError)):
        return BROKEN
    if isinstance(error, OSError):
        if error.errno in _UNREACHABLE_ERRNOS:
            return UNREACHABLE
        if error.errno is None and (text := error_text(error)).startswith("Multiple exceptions: "):
            codes = {int(code) for code in _ERRNO_IN_TEXT.findall(text)}
            if codes & _UNREACHABLE_ERRNOS and codes <= _UNREACHABLE_ERRNOS | _UNUSABLE_ADDRESS_ERRNOS:
                return UNREACHABLE
    return NOT_REFUSED


def pooler_refusal(error: BaseException | None) -> bool:
    """Whether a connect's error is a connection pooler's refusal because the
    pooler itself is full or paused (PgBouncer's SQLSTATE 08P01: its client
    slots, ``max_client_conn``, used up; its memory; a database it was told
    to ``DISABLE``; its own shutdown), not because the server behind it
    cannot be reached (``query_wait_timeout``, "server login has been
    failing", "pgbouncer cannot connect to server": the server is down, as
    ``health()`` says; review h283). Both kinds end by themselves, and the
    backoff retries both (:func:`pooler_busy`)."""
    if not isinstance(error, _pg_exceptions.ProtocolViolationError):
        return False
    text = error_text(error)
    return pooler_busy(text) and not any(phrase in text for phrase in _POOLER_SERVER_UNREACHABLE)


def pooler_busy(text: str) -> bool:
    """Whether a login refusal's message (SQLSTATE 08P01) is one of
    PgBouncer's that end by themselves (``_POOLER_BUSY``, or a database it
    was told to ``DISABLE``: 'database "app" is disabled')."""
    return any(phrase in text for phrase in _POOLER_BUSY) or (
        text.startswith('database "') and text.rstrip().endswith('" is disabled')
    )


def error_text(error: BaseException) -> str:
    """``str(error)``, or ``"<exception str() failed>"`` (as ``traceback``
    prints such an error) where its ``__str__`` raises: an error of the
    application's (a ``connect=`` callback's, a hook's, a connection
    class's) may, and the pool reads the text of those while it keeps its
    books (review h262)."""
    try:
        return str(error)
    except Exception:
        return "<exception str() failed>"


def is_busy(error: BaseException) -> bool:
    """asyncpg refused a second operation on a connection still running one
    (nothing was sent)."""
    return isinstance(error, _pg_exceptions.InterfaceError) and "another operation" in error_text(error)

# asyncpg 0.32+: Connection has the _pool_holder slot.
HAS_POOL_HOLDER = "_pool_holder" in _pg_connection.Connection.__slots__
# asyncpg 0.30+: Connection.get_reset_query() and Connection._reset().
HAS_PUBLIC_RESET_QUERY = hasattr(_pg_connection.Connection, "get_reset_query")
# asyncpg 0.30 (the release that made get_reset_query public) runs its
# reset's execute(reset_query) inside an outer timeout of the release's
# budget, so command_timeout bounds the statement as well: the first limit
# to come ends it. 0.29 passed the budget to execute() in its place.
RESET_UNDER_BUDGET = HAS_PUBLIC_RESET_QUERY
# asyncpg 0.32+: a release that closes its connection (max_queries, an
# expired generation) gets the release's budget, as asyncpg's closes with
# close(timeout=) and raises its TimeoutError. On 0.29-0.31 a close that
# ran out left its transport unclosed (ResourceWarning, on asyncpg's pool
# too: tests/compat/test_parity.py): there the close keeps the pool's own
# bound and the release does not raise.
CLOSE_UNDER_BUDGET = HAS_POOL_HOLDER

# asyncpg < 0.32: the termination listener that stands in for _pool_holder,
# per connection (so that forget_holder can remove it and has_callbacks can
# tell it from the application's).
_CLOSE_LISTENERS: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()


async def _done() -> None:
    pass


def attach_holder(con: RawConnection, holder: Any) -> None:
    """asyncpg calls ``holder._release_on_close()`` when the connection dies."""
    if HAS_POOL_HOLDER:
        con._pool_holder = weakref.ref(holder)
        return
    # asyncpg < 0.32 tells only a leased connection's holder, through the
    # proxy (and raises ReferenceError from close() if that proxy is garbage
    # not yet reclaimed). A termination listener covers the rest. asyncpg
    # runs plain listeners one loop iteration later (call_soon), but calls
    # an async one's function at once to make its task: so this one is
    # "async", does its work in that call and returns a finished coroutine,
    # and the holder hears of the loss at the same point as with 0.32.
    forget_holder(con)
    holder_ref = weakref.ref(holder)
    con_ref = weakref.ref(con)
    protocol = con._protocol  # (asyncpg < 0.32 lets go of it as it aborts, before this listener runs)

    def on_close(_: Any) -> Any:
        # Every way a connection closes (a close, an abort, a loss) runs its
        # termination listeners, at once for this one (see above): a call of
        # the lease awaiting the protocol's cancellation ends (review h253).
        complete_cancel_waiters(protocol)
        found, dead = holder_ref(), con_ref()
        if dead is not None:
            # asyncpg is iterating this set of listeners: the pool's reaction
            # (forget_holder, or a terminate() whose own cleanup clears the
            # listeners) must not change it under that loop. A fresh set
            # takes those changes; the loop still calls the others.
            _CLOSE_LISTENERS.pop(dead, None)
            dead._termination_listeners = set()
        if found is not None and dead is not None and found._con is dead:
            proxy = dead._proxy
            if proxy is not None:
                try:
                    proxy._holder  # noqa: B018  (alive: asyncpg tells the holder itself, right after)
                    return _done()
                except ReferenceError:
                    dead._set_proxy(None)
            found._release_on_close()
        return _done()

    listener = _pg_connection._Callback(on_close, True)  # type: ignore[attr-defined]
    _CLOSE_LISTENERS[con] = listener
    con._termination_listeners.add(listener)


def forget_holder(con: RawConnection) -> None:
    if HAS_POOL_HOLDER:
        con._pool_holder = None
        return
    listener = _CLOSE_LISTENERS.pop(con, None)
    if listener is not None:
        con._termination_listeners.discard(listener)


def queries_count(con: RawConnection) -> int:
    """Statements sent on this connection so far (asyncpg's protocol counter)."""
    return int(con._protocol.queries_count)


# The most a pool connection's transport reads per recv(), in bytes.
# asyncio's selector transport asks for 256 KiB (``max_size``, CPython
# 3.11-3.13) and shrinks the bytes object to what arrived. glibc's malloc
# serves 256 KiB with mmap until something frees a larger mmapped block (its
# threshold starts at 128 KiB and only then rises), so in such a process every
# read costs mmap + a page fault + mremap + munmap: measured here (2 cores,
# CPython 3.11, glibc's default threshold), a contended lease took 121 us
# with 256 KiB reads and 88 us with 64 KiB ones; with the threshold raised
# both take the same. 64 KiB always comes from the heap; a 50,000-row fetch
# is no slower (docs/performance.md, "Reads").
READ_SIZE = 64 * 1024


def tune_reads(con: RawConnection) -> None:
    """Make ``con`` read at most :data:`READ_SIZE` bytes per recv(): only on
    asyncio's plain socket transport feeding a non-buffered protocol
    (asyncpg's), and never more than it reads already. TLS (asyncio's SSL
    protocol reads into a buffer of its own) and uvloop (libuv reuses one
    buffer per loop) are left alone. Nothing observable changes: the bytes
    arrive in more, smaller reads when a result is larger than 64 KiB."""
    transport: Any = getattr(con, "_transport", None)  # (the I/O layer's fake connection has none)
    if (
        type(transport) is asyncio.selector_events._SelectorSocketTransport  # type: ignore[attr-defined]
        and not isinstance(con._protocol, asyncio.BufferedProtocol)
        and transport.max_size > READ_SIZE
    ):
        transport.max_size = READ_SIZE


@types.coroutine
def _next_iteration() -> Generator[None, None, None]:
    yield  # what asyncio.sleep(0) does (without the name tests patch)


async def connect_settled() -> None:
    """Let asyncpg's ``connect()`` finish with a new connection before the
    pool counts references to it: 0.31 leaves a task referring to it (it
    closes the other hosts' candidates) until the next loop iteration.
    A no-op on asyncpg 0.32, which has no such task."""
    if not HAS_POOL_HOLDER:
        await _next_iteration()


def in_call(con: RawConnection) -> bool:
    """A fetch-family call (``fetch``, ``fetchval``, ``fetchrow``, ``execute``
    with arguments, ``executemany``) is under way on the connection.

    Such a call takes several protocol steps (prepare, then bind and
    execute), and between two of them the protocol is idle: a statement sent
    then would refuse the call's next step, or let it run in the next
    lease's session. asyncpg (0.29-0.32) holds ``_stmt_exclusive_section``
    for the whole call."""
    section = getattr(con, "_stmt_exclusive_section", None)
    return bool(section is not None and section._acquired)


def terminate(con: RawConnection) -> None:
    """``con.terminate()`` (the connection class's own, as asyncpg's pool
    calls it), then, on asyncpg < 0.32, the abort 0.32's ``terminate()``
    makes: before 0.32 it aborted only if ``is_closed()`` said open, so a
    class whose ``is_closed()`` calls an open connection closed (a health
    flag) left its socket open (a ResourceWarning, and a backend until the
    garbage collector closed it). Also on asyncpg < 0.32: a
    ``close(timeout=)`` that ran out (a connection class's own close()
    handed a release's budget forwards it to asyncpg's) aborted the
    connection but left its transport open (the protocol's close skips
    ``transport.abort()`` on its timeout, and the abort that follows
    returns early): it is aborted here, so the backend sees the socket end
    and exits."""
    con.terminate()
    if not HAS_POOL_HOLDER:
        if not con._aborted and con._protocol is not None:
            con._abort()
        is_closing = getattr(getattr(con, "_transport", None), "is_closing", None)
        if con._aborted and callable(is_closing) and not is_closing():
            con._transport.abort()


def complete_cancel_waiters(protocol: Any) -> None:
    """On asyncpg < 0.32, once its connection is closed: complete the
    ``protocol``'s pending cancellation futures, as 0.32's ``abort()`` and
    ``connection_lost()`` do (``Protocol._complete_cancel_waiters``, asyncpg
    0.32). Before 0.32 they stay pending with nothing left to answer them,
    and a call of the lease's task that awaits one (a ``ROLLBACK`` after
    its statement was cancelled, in ``Transaction.__aexit__``) waited for
    ever once the pool closed the connection (review h253). It now raises
    asyncpg's ``InterfaceError`` ("another operation is cancelling").
    Called by the pool's own termination listener (:func:`attach_holder`),
    which every close, abort and loss of a pool connection runs.

    The futures are the protocol's C fields, out of Python's reach but for
    the garbage collector's traversal, which lists a ``BaseProtocol``'s
    fields in their declared order (asyncpg 0.29-0.31's protocol.pxd):
    ``settings``, ``cancel_sent_waiter``, ``cancel_waiter``, ``waiter``,
    ``create_future``. Found by the settings object (``get_settings()``)
    and that shape checked, else nothing is done. The query's ``waiter`` is
    left to asyncpg (its ``connection_lost`` fails it)."""
    if HAS_POOL_HOLDER or protocol is None:
        return
    try:
        settings = protocol.get_settings()
    except Exception:  # (a protocol of another shape: nothing to do)
        return
    fields = gc.get_referents(protocol)
    at = next((i for i, field in enumerate(fields) if field is settings), None)
    if at is None:
        return
    shape = fields[at + 1:at + 5]
    if len(shape) != 4 or not callable(shape[3]) or not all(
        f is None or isinstance(f, asyncio.Future) for f in shape[:3]
    ):
        return
    for waiter in shape[:2]:  # (cancel_sent_waiter, cancel_waiter; asyncpg checks done() before it sets them)
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


def is_cancelling(con: RawConnection) -> bool:
    protocol = con._protocol
    if protocol is None:
        return False
    if not HAS_POOL_HOLDER and _pg_connection.Connection.is_closed(con):
        # asyncpg 0.32 completes the cancellation futures when the socket
        # closes; before, they stay pending with nothing left to answer them.
        # (asyncpg's own is_closed(), the socket's: a connection class's own
        # may raise, which failed the close of its slot: review h283.)
        return False
    return bool(protocol._is_cancelling())


async def wait_for_cancellation(con: RawConnection, timeout: float | None = None) -> None:
    """Wait until the server answered a cancelled query.

    :param timeout: seconds, or None to wait as long as it takes.
    :raises TimeoutError: not answered in time; the connection is then
        terminated (a new query could not use it), as asyncpg 0.32 does.
        With asyncpg < 0.32 the connection may also come back closed, once
        the server is done with the query, or once it was lost (see below).
    """
    protocol = con._protocol
    if HAS_POOL_HOLDER:  # 0.32+: the timeout is asyncpg's
        await protocol._wait_for_cancellation(timeout)
        return
    if not is_cancelling(con):
        return
    # The wait in a task of its own, shielded (see below). Nothing completes
    # asyncpg's cancellation futures once the connection is gone, so a wait
    # given up (a timeout, the caller's cancellation) may stay pending until
    # the connection is garbage collected with it: not a task destroyed
    # pending for the loop's exception handler to report (asyncpg's own
    # waits run in the query's task, and report nothing).
    waiting = asyncio.ensure_future(protocol._wait_for_cancellation())
    with contextlib.suppress(AttributeError):  # (a task factory's own class may lack it)
        waiting._log_destroy_pending = False
    # Given up, it may still end with asyncpg's error (its cancel request
    # failed) that nobody awaits then: read here, not reported by the loop
    # as never retrieved (review h236). Awaited, it is raised as ever.
    waiting.add_done_callback(retrieve)
    # The connection lost meanwhile (an RST, the server gone) ends the wait
    # too: its cleanup calls the termination listeners, and then nothing
    # will answer (the caller finds it closed). With no timeout asked for,
    # a reset waited there for good, its slot lost to the pool (review h234).
    lost, listener = _termination_future(con)
    try:
        async with asyncio.timeout(timeout):
            try:
                # (asyncio.wait cancels neither when this task is: a shield)
                await asyncio.wait((waiting, lost), return_when=asyncio.FIRST_COMPLETED)
                if waiting.done():
                    waiting.result()  # (CancelledError: its futures were cancelled, below)
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if task is None or task.cancelling():
                    raise  # this task was cancelled
                # asyncpg < 0.32 has every query await its cancellation
                # futures unshielded: a task cancelled there (a transaction's
                # ROLLBACK on the way out of a double cancel) cancelled them.
                # They never resolve now and every later query on the
                # connection would raise CancelledError: give the connection
                # up, as asyncpg does when its own background cancel gives up
                # (the caller sees it closed). But not by an abort: its
                # backend may still run the query (a cancel request that came
                # before the query started is ignored) and would run on
                # beside the slot's replacement.
                await _end_session(con)
    except TimeoutError:
        terminate(con)
        raise
    finally:
        con._termination_listeners.discard(listener)


# The protocol's Terminate message.
_TERMINATE = b"X\x00\x00\x00\x04"


def _termination_future(con: RawConnection) -> tuple[asyncio.Future[None], Any]:
    """A future done once ``con``'s cleanup (its close, abort or loss) calls
    its termination listeners, and the listener of the pool's own that does
    it, to discard from ``con._termination_listeners`` afterwards. Put in
    that set as asyncpg's ``add_termination_listener()`` would, but past
    it: a ``connection_class`` that overrides that method, and the notes of
    the lease's callbacks (:func:`_add_termination_listener`), never see it
    (review h236)."""
    done: asyncio.Future[None] = con._loop.create_future()

    def on_termination(_: Any) -> None:
        if not done.done():
            done.set_result(None)

    listener = _pg_connection._Callback(on_termination, False)  # type: ignore[attr-defined]
    con._termination_listeners.add(listener)
    return done, listener


async def _end_session(con: RawConnection) -> None:
    """Close a connection asyncpg can no longer use once its backend is done:
    send Terminate (the server reads it after whatever query runs) and wait
    until the server closed the socket. Aborts the connection on the way out
    (at once if cancelled)."""
    closed, listener = _termination_future(con)
    try:
        if not con.is_closed():
            con._transport.write(_TERMINATE)
            await closed
    finally:
        con._termination_listeners.discard(listener)
        terminate(con)


# What a released connection needs: safepool._state.Observed, as plain ints
# here (the adapter does not import the core); Leaser.release finds it.
UNUSABLE, USED_UP, MUST_RESET, DIRTY, CLEAN = 0, 1, 2, 3, 4


# What a connection had registered when it joined the pool (see
# callback_baseline), or None for nothing.
Baseline = tuple[frozenset[Any], frozenset[Any], tuple[Any, ...]] | None


def callback_baseline(con: RawConnection) -> Baseline:
    """The callbacks a connection carries when it joins the pool: registered
    by ``init=``, a ``connect=`` callback or a ``connection_class``. Its
    termination listeners and query loggers are the connection's for its
    whole life (asyncpg's release keeps both kinds): they tell nothing of a
    lease, and :func:`has_callbacks` leaves them out. Its notification and
    log listeners (the first release drops them) are kept here too, only so
    that they stay alive: one that refers to the connection (a closure) is
    counted in ``Holder.base_refs``, and once gone would leave every later
    count one short, a query's reference unseen. None when there are none
    (the common case)."""
    termination, loggers = con._termination_listeners, con._query_loggers
    listeners, log_listeners = con._listeners, con._log_listeners
    if not termination and not loggers and not listeners and not log_listeners:
        return None
    kept = (*(cb for callbacks in listeners.values() for cb in callbacks), *log_listeners)
    return frozenset(termination), frozenset(loggers), kept


def has_callbacks(con: RawConnection, baseline: Baseline = None, registered: dict[Any, int] | None = None,
                  lease_id: int = -1) -> bool:
    """Callbacks the application registered on the connection: asyncpg keeps
    calling them for as long as the connection is leased. Those of the
    connection's ``baseline`` (:func:`callback_baseline`) do not count:
    with them every lost proxy of the connection would count as in use.
    Nor do the termination listeners and query loggers an earlier lease
    left (asyncpg's release keeps both): ``registered`` (the holder's
    ``lease_callbacks``) says which lease registered each; one it does not
    know counts as the lease ``lease_id``'s."""
    termination = con._termination_listeners
    if termination and not HAS_POOL_HOLDER:
        termination = termination - {_CLOSE_LISTENERS.get(con)}
    loggers = con._query_loggers
    if baseline is not None:
        termination = termination - baseline[0]
        loggers = loggers - baseline[1]
    if con._listeners or con._log_listeners:
        return True
    if registered:
        return any(registered.get((TERMINATION, entry), lease_id) == lease_id for entry in termination) or any(
            registered.get((LOGGER, entry), lease_id) == lease_id for entry in loggers
        )
    return bool(termination or loggers)


def reference_count(con: RawConnection) -> int:
    """CPython's reference count of the connection, as seen by this call.

    The pool compares it with the count it took when the connection was
    idle: anything above means something outside the pool (a running query's
    coroutine, a transaction, cursor or prepared statement object, a
    callback's closure) still refers to the connection."""
    return sys.getrefcount(con) - 1  # minus this function's own argument


def own_references(con: RawConnection) -> int:
    """References to the connection from objects only the connection keeps
    alive: a transaction started with ``start()`` and then dropped (asyncpg
    keeps it as ``_top_xact``, and it refers back to the connection). Once
    the proxy is gone nothing can commit it, so it does not make the
    connection in use. And a lost lease's :class:`StandIn` proxy, while no
    callback holds it."""
    own = 0
    holder = con._proxy
    if type(holder) is StandIn:
        # A lost lease's stand-in proxy refers to the connection; only the
        # connection keeps it (3: its attribute, the local, the argument)
        # unless a callback still holds it.
        proxy = holder.proxy
        if proxy._raw is con and sys.getrefcount(proxy) == 3:
            own += 1
        del proxy
    del holder
    xact = con._top_xact
    if xact is None or xact._connection is not con:
        return own
    del xact
    # 2: the connection's attribute and this call's argument.
    return own + (1 if sys.getrefcount(con._top_xact) == 2 else 0)


def stale_references(con: RawConnection) -> int:
    """References to the connection from objects that can never use it
    again: frames that finished running, kept by a traceback (an exception
    of an earlier lease, kept in a list, a ``last_error`` attribute, an error
    reporter's queue, holds asyncpg's frames, whose ``self`` is the
    connection), and asyncpg's prepared statements, cursors and transactions
    of an earlier lease (invalidated: their release counter is behind the
    connection's).

    A frame object refers to its locals only once it owns them, when its
    code has returned or raised (a suspended coroutine's locals are its
    coroutine's, a running frame's its thread's): any frame found here has
    finished. The count is exact (``gc.get_referents`` per referrer); a
    reference through anything else (a dict, a cell) is not counted.

    Costs a pass over every object the garbage collector tracks
    (``gc.get_referrers``): for the reclaimer's checks of a lost proxy's
    connection, never for a lease."""
    release_ctr = con._pool_release_ctr
    stale = 0
    for referrer in gc.get_referrers(con):
        if isinstance(referrer, types.FrameType) or (
            isinstance(referrer, _pg_connresource.ConnectionResource)
            and referrer._con_release_ctr != release_ctr  # type: ignore[attr-defined]  # (a slot the stubs omit)
        ):
            stale += sum(1 for referent in gc.get_referents(referrer) if referent is con)
    return stale


def command_timeout(con: RawConnection) -> float | None:
    value = con._config.command_timeout
    return None if value is None else float(value)


def clear_listeners(con: RawConnection) -> None:
    """What asyncpg's reset does locally, without a round trip."""
    if con._listeners or con._log_listeners:
        con._listeners.clear()
        con._log_listeners.clear()


def invalidate_lease_resources(con: RawConnection) -> None:
    """Invalidate the cursors, prepared statements and transactions made on
    ``con`` until now (asyncpg's ``_pool_release_ctr``, which each one copies
    when it is made and checks on use), with nothing else of
    ``_on_release()``."""
    con._pool_release_ctr += 1


def invalidate_taken_back(con: RawConnection) -> None:
    """asyncpg's ``Connection._on_release()`` for a lease the pool ends from
    its own timer (a take-back): the lease's cursors, prepared statements and
    transactions are invalidated now (the counter they check), and the
    warning of listeners left registered comes a loop pass later. With
    warnings turned into errors (pytest's ``filterwarnings = error``), raised
    in the timer it stopped the pool's work midway: the take-back never
    started and its slot stayed out of the pool for good."""
    invalidate_lease_resources(con)
    notification = [cb for callbacks in con._listeners.values() for cb in callbacks]
    log = list(con._log_listeners)
    if notification or log:

        def warn() -> None:
            con._check_listeners(notification, "notification")
            con._check_listeners(log, "log")

        con._loop.call_soon(warn)


def starts_tasks_eagerly(loop: asyncio.AbstractEventLoop) -> bool:
    """Whether ``loop``'s task factory runs a new task's first step inside
    ``create_task()`` (``asyncio.eager_task_factory``, or one made by
    ``asyncio.create_eager_task_factory()``; Python 3.12+). asyncpg's
    release then runs its shielded task's first step (the report of an open
    transaction) before ``release()`` returns to the loop. A factory that
    wraps another and names it in ``__wrapped__`` (``functools.wraps``'s
    convention; the leak guards' task factory, safepool.testing) starts
    tasks as the one it wraps (review h280)."""
    factory = loop.get_task_factory()
    for _ in range(8):  # (a chain of wrappers; bounded: a cycle is no factory)
        wrapped = getattr(factory, "__wrapped__", None)
        if wrapped is None:
            break
        factory = wrapped
    if factory is None:
        return False
    return factory is getattr(asyncio, "eager_task_factory", None) or getattr(
        factory, "__qualname__", ""
    ).startswith("create_eager_task_factory.")


def transaction_open(con: RawConnection) -> bool:
    """Whether asyncpg's reset would roll back: the server's transaction
    status, or an asyncpg ``Transaction`` still held (``_top_xact``). The
    connection's protocol must be set."""
    return bool(con._protocol.is_in_transaction() or con._top_xact is not None)


def warn_open_transaction(
    con: RawConnection, *, quiet: bool = False, deferred: bool = False, keep: bool = False
) -> bool:
    """asyncpg's reset reports an unmanaged open transaction through the
    loop's exception handler, and lets go of asyncpg's ``Transaction``.
    Returns whether a ROLLBACK is needed. ``keep``: report it and keep the
    ``Transaction`` (a reset refused before it starts, while a call of the
    lease runs: the connection is given up once the call ended, and the
    call's next step finds its transaction; asyncpg < 0.32's cursor checks
    it).

    ``deferred``: the caller is the releasing task, where asyncpg's pool
    reports from the first step of its shielded release task, after the
    callbacks already queued (a query logger's record of the lease's last
    statement). ``call_soon`` keeps that order without the hop: the report
    still comes before release() returns (the ROLLBACK's round trip follows).
    On a loop that starts tasks eagerly (:func:`starts_tasks_eagerly`)
    asyncpg's task reports at once, inside ``release()``: so does this."""
    protocol = con._protocol
    clear_listeners(con)
    if protocol is None:
        return False
    if transaction_open(con):
        if not quiet and (con._top_xact is None or not con._top_xact._managed):
            context = {"message": f"Resetting connection with an active transaction {con!r}"}
            loop = con._loop
            if deferred and not starts_tasks_eagerly(loop):
                loop.call_soon(loop.call_exception_handler, context)
            else:
                loop.call_exception_handler(context)
        if not keep:
            con._top_xact = None
        return True
    return False


async def base_reset(con: RawConnection) -> None:
    """asyncpg's ``Connection._reset()``: what its pool runs before a
    ``reset=`` hook (report and roll back an open transaction, drop
    listeners)."""
    if HAS_PUBLIC_RESET_QUERY:
        await con._reset()
        return
    # asyncpg 0.29: the first half of its Connection.reset(), as 0.30 split it.
    con._check_open()
    if warn_open_transaction(con):
        await con.execute("ROLLBACK")


def reset_query_getter(con: RawConnection) -> Callable[[], str]:
    """The bound method that gives ``con``'s reset query, called on every
    reset (a connection class may override it), kept per connection by the
    pool so a release pays one call."""
    getter: Callable[[], str] = con.get_reset_query if HAS_PUBLIC_RESET_QUERY else con._get_reset_query
    return getter


def waiter_completed_callback(con: RawConnection) -> Callable[[Any], object] | None:
    """The done callback asyncpg's protocol puts on each statement's waiter
    future (``BaseProtocol._on_waiter_completed``, asyncpg 0.29-0.32), bound
    once per connection; None if the protocol has none.

    It does two things: cancels the statement's timeout timer, and sends a
    cancel request when the waiter was *cancelled* (its awaiting task was).
    A reset the release drives with no timer (no budget, no
    ``command_timeout``) through a ``_detach._Driver`` needs neither while
    the caller's task drives it: a cancel of that task never reaches the
    waiter (the driver stands in for it). So the driver takes the callback
    off the waiter, saving the loop a callback handle per release (about
    3% of a query lease's client instructions), and puts it back when it
    hands the reset to a pool task, whose cancel does cancel the waiter."""
    callback: Callable[[Any], object] | None = getattr(con._protocol, "_on_waiter_completed", None)
    return callback


# What asyncpg's own code is, to tell its methods from what replaced them
# (a subclass's, or a patch of asyncpg's Connection itself: Sentry's
# AsyncPGIntegration wraps Connection.execute, OpenTelemetry's instrumentation
# wraps its methods with wrapt, an application may patch reset()): a plain
# function whose code is in asyncpg's package, or one of the standard
# library's decorator wrappers around such a function (asyncpg's
# query_logger and _time_and_log are contextlib.contextmanager's).
_ASYNCPG_PACKAGE = os.path.join(os.path.dirname(os.path.abspath(_pg_connection.__file__)), "")


def _decorated() -> Generator[None, None, None]:
    yield  # pragma: no cover (never run: only its decorated forms' code is read)


_STDLIB_WRAPPER_CODES = frozenset(
    {contextlib.contextmanager(_decorated).__code__, contextlib.asynccontextmanager(_decorated).__code__}  # type: ignore[arg-type]
)


def asyncpg_own(value: object) -> bool:
    """Whether ``value`` (a class attribute) is a function of asyncpg's own
    code: a plain function (not a wrapper object such as wrapt's, which
    passes for the function it wraps) whose code lives in the installed
    asyncpg package, or a standard-library decorator's wrapper of one. A
    wrapper made with ``functools.wraps`` keeps asyncpg's name and module,
    not its code: it is not asyncpg's own. The methods safepool installs on
    asyncpg's class (``_unwrap``, the callbacks' add and remove) count as
    asyncpg's."""
    while type(value) is types.FunctionType:
        if value in _SAFEPOOL_METHODS:
            return True
        code = value.__code__
        if code.co_filename.startswith(_ASYNCPG_PACKAGE):
            return True
        if code not in _STDLIB_WRAPPER_CODES:
            return False
        value = getattr(value, "__wrapped__", None)
    return False


# The functions safepool itself installs on asyncpg's Connection (_unwrap,
# the callbacks' add and remove methods, below): asyncpg's own for
# overrides, which the pool's shortcuts account for.
_SAFEPOOL_METHODS: set[Any] = set()


def overrides(connection_class: type, name: str) -> bool:
    """Whether a ``connection_class`` has a method ``name`` that is not
    asyncpg's own: its own (or a base class's of the application's), or one
    that replaced asyncpg's on asyncpg's ``Connection`` itself (a patch, by
    instrumentation or a site-wide fix), which asyncpg's pool calls as it
    would a subclass's. When it has none, the pool does what asyncpg's does
    without the call: ``is_closed()`` reads ``_aborted`` and the protocol's
    ``is_connected()``; ``execute(query)`` with no arguments and no query
    logger awaits ``_protocol.query(query, timeout)`` (asyncpg 0.29-0.32
    alike); the release's reset sends asyncpg's reset query itself.

    Read where a pool or a holder is made, never per lease: a patch made
    after that is seen by the next pool or connection. Both orders of
    import work: a patch made before safepool's import is told by its code
    (not asyncpg's), one made after by that and by its identity (not the
    function this import found). A patch undone is asyncpg's own again."""
    current = getattr(connection_class, name, None)
    if not asyncpg_own(current):
        return True
    original = _ASYNCPG_METHODS.get(name)
    return original is not None and current is not original


def released_unusable(con: RawConnection, holder: Any, listening: object) -> bool:
    """The release's look at a connection whose class has an
    ``is_closed()`` or an ``_on_release()`` in place of asyncpg's
    (``holder.own_release_checks``; see :func:`overrides`): whether it is
    unusable, asking its own ``is_closed()``, after its own
    ``_on_release()`` (asyncpg's pool calls it at every release, first).
    ``listening``: the release found listeners left and called
    ``_on_release()`` already. Without listeners the release has counted
    the lease's end inline (``_pool_release_ctr += 1``, all that asyncpg's
    method does then): that count is undone first, as the class's own
    method counts it, or not, as on asyncpg's pool."""
    if holder.own_on_release and not listening:
        con._pool_release_ctr -= 1
        con._on_release()
    protocol = con._protocol
    return protocol is None or (con.is_closed() if holder.own_is_closed else con._aborted or not protocol.is_connected())


def overrides_connection_methods(connection_class: type) -> bool:
    """Whether ``connection_class``, a subclass of asyncpg's Connection, has
    any of asyncpg's Connection methods (public or private; not the dunders)
    in place of asyncpg's (:func:`overrides`: its own, or a patch of
    asyncpg's class). ``reset_mode="auto"`` trusts no lease of such a
    connection: the proxy calls the connection's own methods, and asyncpg's
    public ones call its private ones, so what an overridden one sends is
    unknown (``Holder.own_methods``). False for anything else (the test
    suite's stand-in connections: a pool's connections are asyncpg
    Connections, checked when connected). About 20 µs: read once per
    connection (Holder), not per lease."""
    return issubclass(connection_class, _pg_connection.Connection) and any(
        overrides(connection_class, name) for name in CONNECTION_METHODS
    )


def overrides_reset_query(connection_class: type) -> bool:
    """Whether a ``connection_class`` overrides asyncpg's reset query."""
    return overrides(connection_class, "get_reset_query" if HAS_PUBLIC_RESET_QUERY else "_get_reset_query")


class ReleasedProxy:
    """What ``con._proxy`` is while the pool closes or aborts the connection
    of a lease that just ended: a release that discards it (max_queries, an
    expired generation) or whose reset failed. asyncpg's pool keeps the
    proxy attached through such a close (``PoolConnectionHolder.release``
    detaches it last, in ``_release()``), so the termination listeners, and
    a notification or log message that comes meanwhile, get the proxy the
    program held (:func:`_unwrap`), not the connection.

    Both references are weak: a released proxy stays collectable (the
    callbacks then get the connection, as for any garbage proxy), and
    nothing of the lease outlives the close.

    asyncpg < 0.32 also calls ``con._proxy._holder._release_on_close()``
    in every close (``Connection._cleanup``), and ``_pool`` through it to
    drop caches: this object answers as that holder. It tells the real
    holder only while the connection is still its own (the pool's own close
    let go of it first: ``Runner.close_slot``), the check 0.32 makes on
    ``_pool_holder``; so :func:`attach_holder`'s listener, which leaves the
    telling to asyncpg when ``_proxy`` is set, stays right."""

    __slots__ = ("_proxy_ref", "_holder_ref")

    def __init__(self, proxy: Any, holder: Any) -> None:
        self._proxy_ref = weakref.ref(proxy)
        self._holder_ref = weakref.ref(holder)

    def referent(self, con: RawConnection) -> Any:
        """The proxy, or ``con`` once the proxy is garbage."""
        proxy = self._proxy_ref()
        return con if proxy is None else proxy

    @property
    def _holder(self) -> ReleasedProxy:
        return self

    @property
    def _pool(self) -> Any:
        holder = self._holder_ref()
        return self if holder is None else holder._pool

    def _release_on_close(self) -> None:
        holder = self._holder_ref()
        if holder is not None and holder._con is not None:
            holder._release_on_close()

    def _drop_statement_cache(self) -> None:
        pass  # (the pool is gone: nothing shares the connection's cache)

    def _drop_type_cache(self) -> None:
        pass


def attach_released(con: RawConnection, proxy: Any, holder: Any) -> None:
    """Keep ``proxy``, just released, as the one ``con``'s callbacks get
    while the pool closes ``con`` (see :class:`ReleasedProxy`); until
    :func:`drop_released` or :func:`detach_proxy`."""
    con._proxy = ReleasedProxy(proxy, holder)


def drop_released(con: RawConnection) -> None:
    """The pool's close of ``con`` is over: let go of the released proxy
    (:func:`attach_released`), if it is there."""
    if type(con._proxy) is ReleasedProxy:
        con._proxy = None


class StandIn:
    """What ``con._proxy`` is once a lease's proxy was garbage collected while
    the connection is still in use (its callbacks registered, an operation
    under way: the reclaimer waits): a new proxy of the same lease, held
    strongly here, handed to the connection's listener, log listener and
    termination listener callbacks (:func:`_unwrap`), as asyncpg hands them
    the lease's proxy. Through it a callback works while the lease lasts,
    and gets ``LeaseExpiredError`` (``InterfaceError`` after a reclaim) once
    the lease ended: handed the connection itself, a callback still running
    when ``lease_timeout`` took the connection back wrote into the next
    lease's session (review h207). Not the application's proxy
    (:func:`live_proxy` says None); a reference only this object holds does
    not keep the connection in use (:func:`own_references`)."""

    __slots__ = ("proxy",)

    def __init__(self, proxy: Any) -> None:
        self.proxy = proxy

    @property
    def _holder(self) -> Any:
        # asyncpg < 0.32's close: con._proxy._holder._release_on_close(), as
        # through the lost proxy (the lease is still open).
        return self.proxy._holder


def stand_in(con: RawConnection, proxy: Any) -> None:
    """Make ``proxy``, a new proxy of the lost lease (its constructor pointed
    ``con._proxy`` at it weakly), the connection's :class:`StandIn`."""
    con._proxy = StandIn(proxy)


def detach_proxy(con: RawConnection, expired_reason: str | None = None) -> None:
    """Cut the proxy (if any) off its connection; the proxy may already be
    garbage: ``con._proxy`` is a weak proxy (or a :class:`ReleasedProxy`,
    whose lease has ended already, or a lost lease's :class:`StandIn`)."""
    proxy = con._proxy
    if proxy is None:
        return
    if type(proxy) is ReleasedProxy:
        con._proxy = None
        return
    if type(proxy) is StandIn:
        proxy = proxy.proxy
    try:
        if expired_reason is not None:
            proxy._expire(expired_reason)
        else:
            proxy._detach()
    except ReferenceError:
        con._set_proxy(None)


def _unwrap(con: RawConnection) -> Any:
    """``Connection._unwrap()``, what asyncpg passes to listener, log
    listener and termination listener callbacks: the proxy the connection
    is leased through, else the connection (asyncpg 0.29-0.32). safepool's
    connection refers to its proxy weakly (so a lost proxy is garbage
    collected and found); asyncpg's own method would hand callbacks that
    weak proxy, which is not the object the program holds (``is``,
    ``hash()``, dict keys and ``isinstance`` fail on it). This resolves it
    to the proxy itself (the connection once the proxy is garbage), as it
    does a :class:`ReleasedProxy` while the pool closes a released lease's
    connection, and leaves every other connection (asyncpg's own pool's, plain ones) to
    asyncpg's method."""
    proxy = con._proxy
    if isinstance(proxy, weakref.ProxyTypes):
        try:
            return proxy._referent()
        except ReferenceError:
            return con
    if type(proxy) is ReleasedProxy:
        return proxy.referent(con)
    if type(proxy) is StandIn:
        return proxy.proxy
    return _asyncpg_unwrap(con)


# Installed on asyncpg's Connection class (every connection_class inherits
# it): the only way to reach the callbacks' argument, which asyncpg takes
# from this private method. It changes nothing for a connection whose
# _proxy is not a weak proxy, that is, for every connection not leased from
# a safepool pool.
_asyncpg_unwrap = _pg_connection.Connection._unwrap  # type: ignore[attr-defined]
_pg_connection.Connection._unwrap = _unwrap  # type: ignore[attr-defined]


# Which lease registered each termination listener and query logger (see
# has_callbacks): a key of Holder.lease_callbacks.
TERMINATION, LOGGER = "termination", "logger"


def _note_callback(con: RawConnection, kind: str, callback: Any, added: bool) -> None:
    """Record (``added``) or forget which lease of its pool registered a
    termination listener or query logger on ``con``: the lease whose proxy
    is alive. Nothing for a connection not leased from a safepool pool, nor
    for one whose proxy is gone (a callback registered then is not told
    apart from the lease's own: it keeps a lost proxy's connection)."""
    proxy = con._proxy
    if not isinstance(proxy, weakref.ProxyTypes):
        return  # idle, or not a safepool pool's connection
    try:
        holder, lease = proxy._holder, proxy._lease
    except ReferenceError:
        return
    key = (kind, _pg_connection._Callback.from_callable(callback))  # type: ignore[attr-defined]
    registered = holder.lease_callbacks
    if added:
        if registered is None:
            registered = holder.lease_callbacks = {}
        elif len(registered) >= len(con._termination_listeners) + len(con._query_loggers):
            # Never more notes than asyncpg's entries: see forget_removed_callbacks.
            forget_removed_callbacks(con, registered)
        registered[key] = lease.id
    elif registered is not None:
        registered.pop(key, None)


# The lease id noted for a callback a setup= hook registered: the
# connection's, not a lease's (lease ids start at 1).
SETUP_LEASE = 0


def disown_callbacks(registered: dict[Any, int], lease_id: int) -> None:
    """Note the termination listeners and query loggers lease ``lease_id``
    has registered so far (its ``setup=`` hook's) as the connection's
    (``SETUP_LEASE``): :func:`has_callbacks` then leaves them out for every
    lease, as it leaves out ``init=``'s."""
    for key, owner in registered.items():
        if owner == lease_id:
            registered[key] = SETUP_LEASE


def drop_lease_callbacks(
    con: RawConnection, registered: dict[Any, int] | None, lease_id: int, baseline: Baseline = None
) -> None:
    """Remove from ``con`` the termination listeners and query loggers lease
    ``lease_id`` registered (``Holder.lease_callbacks``), for a take-back:
    the holder never reached its own removal (``with con.query_logger(log):``
    cut short by ``lease_timeout``; a stuck holder may never leave it), and
    its logger would be handed every later lease's statements with their
    arguments, its termination listener a later lease's connection. A
    release keeps them, as asyncpg's does; the connection's own
    (``init=``'s, ``setup=``'s: the ``baseline`` and those noted so) and an
    earlier lease's are not the lease's. One noted for no lease (registered
    once the lease's proxy was garbage: ``with (await
    pool.acquire()).query_logger(log):``) is the lease's, as
    :func:`has_callbacks` counts it (review h207)."""
    registered = registered if registered is not None else {}
    for kind, entries in ((TERMINATION, con._termination_listeners), (LOGGER, con._query_loggers)):
        own = baseline[0 if kind == TERMINATION else 1] if baseline is not None else frozenset()
        for entry in [e for e in entries if e not in own and registered.get((kind, e), lease_id) == lease_id]:
            if kind == TERMINATION and not HAS_POOL_HOLDER and entry is _CLOSE_LISTENERS.get(con):
                continue  # (the pool's own close listener)
            entries.discard(entry)
            registered.pop((kind, entry), None)


def forget_removed_callbacks(con: RawConnection, registered: dict[Any, int]) -> None:
    """Drop the notes (``Holder.lease_callbacks``) of callbacks no longer on
    ``con``: removed where no lease could be told (a ``reset=`` hook or a
    ``connection_class``'s ``reset()``, on the connection itself). Kept,
    the notes would grow with every lease, and each would keep its callback
    alive, with what it refers to: a closure over the connection made every
    later lost proxy of it look referred to (in use)."""
    for stale in [note for note in registered if note[1] not in (
        con._termination_listeners if note[0] == TERMINATION else con._query_loggers
    )]:
        del registered[stale]


_asyncpg_add_termination_listener = _pg_connection.Connection.add_termination_listener
_asyncpg_remove_termination_listener = _pg_connection.Connection.remove_termination_listener
_asyncpg_add_query_logger = _pg_connection.Connection.add_query_logger
_asyncpg_remove_query_logger = _pg_connection.Connection.remove_query_logger


@functools.wraps(_asyncpg_add_termination_listener)
def _add_termination_listener(self: RawConnection, callback: Any) -> None:
    present = _pg_connection._Callback.from_callable(callback) in self._termination_listeners  # type: ignore[attr-defined]
    _asyncpg_add_termination_listener(self, callback)
    if not present:
        _note_callback(self, TERMINATION, callback, True)


@functools.wraps(_asyncpg_remove_termination_listener)
def _remove_termination_listener(self: RawConnection, callback: Any) -> None:
    _asyncpg_remove_termination_listener(self, callback)
    _note_callback(self, TERMINATION, callback, False)


@functools.wraps(_asyncpg_add_query_logger)
def _add_query_logger(self: RawConnection, callback: Any) -> None:
    present = _pg_connection._Callback.from_callable(callback) in self._query_loggers  # type: ignore[attr-defined]
    _asyncpg_add_query_logger(self, callback)
    if not present:
        _note_callback(self, LOGGER, callback, True)


@functools.wraps(_asyncpg_remove_query_logger)
def _remove_query_logger(self: RawConnection, callback: Any) -> None:
    _asyncpg_remove_query_logger(self, callback)
    _note_callback(self, LOGGER, callback, False)


_asyncpg_query_logger = _pg_connection.Connection.query_logger


@functools.wraps(_asyncpg_query_logger)
@contextlib.contextmanager
def _query_logger(self: RawConnection, callback: Any) -> Generator[None, None, None]:
    # asyncpg's, except that the exit removes nothing once the lease that
    # entered it was taken back (lease_timeout): the take-back removed the
    # lease's logger already (drop_lease_callbacks), and the connection may
    # be another lease's by then, with the same function registered (a
    # module's audit logger, its own `with con.query_logger(audit):`),
    # which the expired holder's exit took away from it. (Bound to the
    # connection itself, the block's exit does not pass through the proxy.)
    self.add_query_logger(callback)
    lease = _lease_of(self)
    try:
        yield
    finally:
        # (The lease, not its proxy: the proxy may be garbage by the exit, and
        # then told nothing of the take-back; review h207.)
        if lease is None or lease.state is not LeaseState.EXPIRED:
            self.remove_query_logger(callback)


def _lease_of(con: RawConnection) -> Any:
    """The lease ``con`` is leased under, while its (weak) proxy lives; None."""
    proxy = con._proxy
    if not isinstance(proxy, weakref.ProxyTypes):
        return None
    try:
        return proxy._lease
    except ReferenceError:
        return None


# A callback already on the connection (init='s, setup='s, an earlier
# lease's) is not noted again: asyncpg's add is then a no-op (a set), and
# noted as this lease's it would be taken with it by a take-back
# (drop_lease_callbacks), and would keep a lost proxy's connection leased.
# Installed on asyncpg's Connection class, as _unwrap: the two kinds of
# callback asyncpg's release keeps. Telling a lease's own from those an
# earlier lease left (has_callbacks) otherwise costs every release a look
# at both sets, on the hot path; registering is rare. Each calls asyncpg's
# method first, and records only for a safepool lease's connection (whose
# _proxy is a weak proxy), from a proxy's call or the connection's own (a
# connection_class method, the query_logger() context manager).
_pg_connection.Connection.add_termination_listener = _add_termination_listener  # type: ignore[method-assign]
_pg_connection.Connection.remove_termination_listener = _remove_termination_listener  # type: ignore[method-assign]
_pg_connection.Connection.add_query_logger = _add_query_logger  # type: ignore[method-assign]
_pg_connection.Connection.remove_query_logger = _remove_query_logger  # type: ignore[method-assign]
_pg_connection.Connection.query_logger = _query_logger  # type: ignore[method-assign]
_SAFEPOOL_METHODS.update((
    _unwrap, _add_termination_listener, _remove_termination_listener, _add_query_logger, _remove_query_logger,
    _query_logger,
))


# asyncpg's Connection methods as this import found them, those that are
# asyncpg's own (a patch made before safepool was imported is not: see
# overrides). The names of every method asyncpg's class has (dunders left
# out), for overrides_connection_methods.
_ASYNCPG_METHODS: dict[str, Any] = {
    name: value for name, value in vars(_pg_connection.Connection).items() if asyncpg_own(value)
}
CONNECTION_METHODS: tuple[str, ...] = tuple(sorted(
    name for name, value in vars(_pg_connection.Connection).items()
    if not name.startswith("__") and (name in _ASYNCPG_METHODS or callable(value))
))


def live_proxy(con: RawConnection) -> Any | None:
    """The proxy a connection is leased through, or None (none, or already
    garbage: ``con._proxy`` is a weak proxy)."""
    proxy = con._proxy
    if proxy is None or type(proxy) is ReleasedProxy or type(proxy) is StandIn:
        return None
    try:
        proxy._raw  # noqa: B018 - a dead weak proxy raises ReferenceError
    except ReferenceError:
        return None
    return proxy


def _eof_received(self: Any) -> None:
    # asyncio.Protocol's, which asyncpg's Protocol inherits (it returns
    # None: the transport closes, then calls connection_lost(None)), plus
    # a mark that the peer closed in order.
    self._safepool_peer_closed = True


# Installed on asyncpg's Protocol, a Python class over its Cython base
# (asyncpg 0.29-0.32): asyncio (and uvloop) call eof_received() when the
# peer's FIN arrives, and only then; an RST reaches connection_lost() with
# the ConnectionResetError, a local abort with None and no eof_received().
# The class default makes peer_closed() a plain attribute read. Nothing
# runs per lease: the method runs once, when a connection ends. (Only if
# its instances take attributes: were it ever slotted, every loss under a
# lease would keep its cancel request, as before.)
if _pg_protocol.Protocol.__dictoffset__:
    _pg_protocol.Protocol.eof_received = _eof_received  # type: ignore[method-assign]
    _pg_protocol.Protocol._safepool_peer_closed = False  # type: ignore[attr-defined]


def peer_closed(con: RawConnection) -> bool:
    """The other end closed ``con`` in order (a FIN), not a reset (RST) nor
    an abort of ours. The server's backend closes its socket as it exits, so
    a FIN straight from PostgreSQL means the backend is gone; PgBouncer's
    means it dropped the client, whose cancel key it can then match to
    nothing. Either way a cancel request would cancel nothing. (A proxy
    between that closes the client's side in order while the server's
    side lives on, a load balancer's idle timeout, hides a live backend:
    see docs/pgbouncer.md.) False for a stand-in connection."""
    return getattr(con._protocol, "_safepool_peer_closed", False) is True


async def empty_query(con: RawConnection) -> None:
    """An empty simple query (the server answers EmptyQueryResponse), sent
    by asyncpg's protocol directly (not a connection class's execute()):
    refused at once, with nothing sent, while another operation runs on
    the connection (:func:`is_busy`)."""
    await con._protocol.query("", None)


CancelKey = tuple[int, int]


def cancel_key(con: RawConnection) -> CancelKey | None:
    """The backend's pid and secret key (what a cancel request names), read
    while the connection is open: asyncpg's abort (``terminate()``) drops
    the protocol that holds them. None for a stand-in without a protocol."""
    protocol = con._protocol
    if protocol is None:
        return None
    return protocol.backend_pid, protocol.backend_secret


def statement_in_flight(con: RawConnection) -> bool:
    """A request of asyncpg's protocol awaits the server's answer (its
    waiter), or a cancelled one has not been answered yet: the backend may
    be running a statement; or a fetch-family call holds asyncpg's
    statement section (:func:`in_call`). Read before an abort (which fails
    the waiter and drops the protocol); False once aborted. A COPY whose
    sink or source runs (no request awaited then) is the holder's count
    (``Holder.copies``), which callers add.

    asyncpg (0.29-0.32) keeps the waiter in a C attribute of its protocol,
    not readable from Python; the protocol's garbage-collector referents
    include it while it is set, and no other future while no cancellation
    is under way (``_is_cancelling()`` covers those). Not on a hot path:
    only where a connection is aborted."""
    protocol = con._protocol
    if protocol is None:
        return False
    if in_call(con):
        return True  # (a fetch-family call between its steps: its next one is due)
    if protocol._is_cancelling() or getattr(protocol, "waiter", None) is not None:  # (a stand-in's, readable)
        return True
    return any(isinstance(ref, asyncio.Future) for ref in gc.get_referents(protocol))


# After a cancel request that was not answered by an orderly close (a reset):
# requests sent again, and the pause before each (seconds). See
# cancel_running_query.
CANCEL_RESET_RETRIES = 3
CANCEL_RESET_PAUSE = 0.01
_CANCEL_REQUEST_CODE = 80877102  # (PostgreSQL's protocol, "CancelRequest")


class _CancelRequest(asyncio.Protocol):
    """A cancel request's connection. ``ended`` gets how it ended: None when
    the peer closed it in order (PostgreSQL closes it once it has signalled
    the backend), else the error that ended it (a reset)."""

    is_ssl = False  # (asyncpg's TLS upgrade sets it)

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.ended: asyncio.Future[BaseException | None] = loop.create_future()

    def connection_lost(self, exc: BaseException | None) -> None:
        if not self.ended.done():
            self.ended.set_result(exc)


async def send_cancel_request(con: RawConnection, key: CancelKey) -> BaseException | None:
    """One cancel request for the backend ``key`` names, sent to ``con``'s
    address as asyncpg's ``connect_utils._cancel`` sends it (0.29-0.32: the
    same transport, an SSL negotiation first where the connection's
    ``sslmode`` asks for one), and how its connection ended: None when the
    server closed it in order (it read the request), else the error (a
    reset). asyncpg's own takes a reset for an answer too.

    :raises OSError: the request's connection could not be made, or was
        reset during the SSL negotiation (nothing was sent)."""
    loop = con._loop
    addr = con._addr
    params = con._params
    transport = None
    try:
        if isinstance(addr, str):
            transport, request = await loop.create_unix_connection(lambda: _CancelRequest(loop), addr)
        elif params.ssl and params.sslmode != _connect_utils.SSLMode.allow:
            transport, request = await _connect_utils._create_ssl_connection(  # type: ignore[attr-defined]
                lambda: _CancelRequest(loop),
                *addr,
                loop=loop,
                ssl_context=params.ssl,
                ssl_is_advisory=params.sslmode == _connect_utils.SSLMode.prefer,
            )
        else:
            transport, request = await loop.create_connection(lambda: _CancelRequest(loop), *addr)
        transport.write(struct.pack("!llll", 16, _CANCEL_REQUEST_CODE, key[0], key[1]))
        ended: BaseException | None = await request.ended
        return ended
    finally:
        if transport is not None:
            transport.close()


async def cancel_running_query(con: RawConnection, key: CancelKey | None = None) -> None:
    """Send the server a cancel request for this connection's running
    query, and return once the server closed the request's socket (it has
    signalled the backend: PostgreSQL answers a cancel request with nothing
    else). ``key``: the backend's (:func:`cancel_key`), read before an abort
    dropped the protocol; by default the open connection's.

    A request whose connection is reset, not closed, may never have reached
    the server: a black hole that heals resets the connections it
    swallowed, this one among them, and the backend runs on. So it is sent
    again, after ``CANCEL_RESET_PAUSE`` seconds, up to
    ``CANCEL_RESET_RETRIES`` times; when every one is reset, the server is
    taken to reset the requests it reads (asyncpg's ``Connection._cancel``
    allows for such servers) and the last counts as delivered. A second
    request for a backend whose statement has ended does nothing:
    PostgreSQL ignores a cancel while the backend waits for a command. The
    caller bounds the whole (a dead network never answers).

    :raises OSError: the request could not be sent (refused, unreachable,
        or reset before it was sent, every time).
    """
    if key is None:
        key = cancel_key(con)
        if key is None:
            return
    for retry in range(CANCEL_RESET_RETRIES + 1):
        if retry:
            await asyncio.sleep(CANCEL_RESET_PAUSE)
        try:
            ended = await send_cancel_request(con, key)
        except ConnectionResetError:
            # (during the SSL negotiation: nothing was sent)
            if retry == CANCEL_RESET_RETRIES:
                raise
            continue
        if ended is None or retry == CANCEL_RESET_RETRIES:
            return


def drop_statement_cache(con: RawConnection) -> None:
    con._drop_local_statement_cache()


def drop_type_cache(con: RawConnection) -> None:
    con._drop_local_type_cache()
