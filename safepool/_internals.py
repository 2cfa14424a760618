"""Every use of asyncpg's private members, in one place.

safepool must reach into asyncpg's Connection the way asyncpg's own pool does
(a back-reference to the pool holder, the proxy slot, the protocol's query
counter and cancellation state). asyncpg-stubs do not declare those members,
so connections are typed ``Any`` here; when asyncpg changes, this is the
module to check (the compat suite in tests/compat runs asyncpg's own pool
tests against safepool to catch it).
"""

from __future__ import annotations

import asyncio
import sys
import weakref
from typing import Any, Protocol, runtime_checkable

from asyncpg import connect_utils as _connect_utils
from asyncpg import exceptions as _pg_exceptions


class ServerProtocol(Protocol):
    """The part of asyncpg's protocol object that the helpers below read."""

    queries_count: int
    backend_pid: int
    backend_secret: int

    def is_in_transaction(self) -> bool: ...
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
    def _set_proxy(self, proxy: Any) -> None: ...
    async def _reset(self) -> None: ...


# Typed Any at the call sites: asyncpg-stubs do not declare the private
# members, and a Connection subclass must pass as one.
RawConnection = Any


def is_refusal(error: BaseException) -> bool:
    """A connect the server refused at once (nothing listening, starting up or
    shutting down, out of connection slots): cheap to retry soon. Timeouts and
    everything else back off longer."""
    if isinstance(error, (ConnectionRefusedError, FileNotFoundError)):
        return True
    return isinstance(error, (_pg_exceptions.CannotConnectNowError, _pg_exceptions.TooManyConnectionsError))


def is_busy(error: BaseException) -> bool:
    """asyncpg refused a second operation on a connection still running one
    (nothing was sent)."""
    return isinstance(error, _pg_exceptions.InterfaceError) and "another operation" in str(error)


def attach_holder(con: RawConnection, holder: Any) -> None:
    """asyncpg calls ``holder._release_on_close()`` when the connection dies."""
    con._pool_holder = weakref.ref(holder)


def forget_holder(con: RawConnection) -> None:
    con._pool_holder = None


def queries_count(con: RawConnection) -> int:
    """Statements sent on this connection so far (asyncpg's protocol counter)."""
    return int(con._protocol.queries_count)


def is_cancelling(con: RawConnection) -> bool:
    protocol = con._protocol
    return protocol is not None and bool(protocol._is_cancelling())


async def wait_for_cancellation(con: RawConnection, timeout: float | None = None) -> None:
    await con._protocol._wait_for_cancellation(timeout)


def is_usable(con: RawConnection) -> bool:
    return con._protocol is not None and not con.is_closed()


# What a released connection needs: safepool._state.Observed, as plain ints
# here (the adapter does not import the core).
UNUSABLE, USED_UP, MUST_RESET, DIRTY, CLEAN = 0, 1, 2, 3, 4


def release_check(con: RawConnection, clean_mark: int, max_queries: int) -> int:
    """One look at the protocol for everything release decides on (the hot
    path: one call instead of five)."""
    protocol = con._protocol
    if protocol is None or con.is_closed():
        return UNUSABLE
    queries = protocol.queries_count
    if queries >= max_queries:
        return USED_UP
    if protocol._is_cancelling() or protocol.is_in_transaction() or con._top_xact is not None:
        return MUST_RESET
    return CLEAN if queries == clean_mark else DIRTY


def on_release(con: RawConnection) -> None:
    """asyncpg's ``Connection._on_release()``: invalidate the lease's prepared
    statements and cursors (a counter they check), and warn of listeners left
    registered. Without listeners, only the counter (the hot path)."""
    if con._listeners or con._log_listeners:
        con._on_release()
    else:
        con._pool_release_ctr += 1


def has_callbacks(con: RawConnection) -> bool:
    """Callbacks the application registered on the connection: asyncpg keeps
    calling them for as long as the connection is leased."""
    return bool(
        con._listeners or con._log_listeners or con._termination_listeners or con._query_loggers
    )


def reference_count(con: RawConnection) -> int:
    """CPython's reference count of the connection, as seen by this call.

    The pool compares it with the count it took when the connection was
    idle: anything above means something outside the pool (a running query's
    coroutine, a transaction, cursor or prepared statement object, a
    callback's closure) still refers to the connection."""
    return sys.getrefcount(con) - 1  # minus this function's own argument


def command_timeout(con: RawConnection) -> float | None:
    value = con._config.command_timeout
    return None if value is None else float(value)


def clear_listeners(con: RawConnection) -> None:
    """What asyncpg's reset does locally, without a round trip."""
    if con._listeners or con._log_listeners:
        con._listeners.clear()
        con._log_listeners.clear()


def warn_open_transaction(con: RawConnection, *, quiet: bool = False) -> bool:
    """asyncpg's reset reports an unmanaged open transaction through the
    loop's exception handler; do that now, in the releasing task, so the
    report comes while the caller still sees it. Returns whether a ROLLBACK
    is needed."""
    protocol = con._protocol
    clear_listeners(con)
    if protocol is None:
        return False
    if protocol.is_in_transaction() or con._top_xact is not None:
        if not quiet and (con._top_xact is None or not con._top_xact._managed):
            con._loop.call_exception_handler({"message": f"Resetting connection with an active transaction {con!r}"})
        con._top_xact = None
        return True
    return False


async def base_reset(con: RawConnection) -> None:
    """asyncpg's ``Connection._reset()``: what its pool runs before a
    ``reset=`` hook (report and roll back an open transaction, drop
    listeners)."""
    await con._reset()


def detach_proxy(con: RawConnection, expired_reason: str | None = None) -> None:
    """Cut the proxy (if any) off its connection; the proxy may already be
    garbage: ``con._proxy`` is a weak proxy."""
    proxy = con._proxy
    if proxy is None:
        return
    try:
        if expired_reason is not None:
            proxy._expire(expired_reason)
        else:
            proxy._detach()
    except ReferenceError:
        con._set_proxy(None)


def live_proxy(con: RawConnection) -> Any | None:
    """The proxy a connection is leased through, or None (none, or already
    garbage: ``con._proxy`` is a weak proxy)."""
    proxy = con._proxy
    if proxy is None:
        return None
    try:
        proxy._con  # noqa: B018 - a dead weak proxy raises ReferenceError
    except ReferenceError:
        return None
    return proxy


async def cancel_running_query(con: RawConnection) -> None:
    """Send the server a cancel request for this connection's running query."""
    await _connect_utils._cancel(  # type: ignore[attr-defined]
        loop=con._loop,
        addr=con._addr,
        params=con._params,
        backend_pid=con._protocol.backend_pid,
        backend_secret=con._protocol.backend_secret,
    )


def drop_statement_cache(con: RawConnection) -> None:
    con._drop_local_statement_cache()


def drop_type_cache(con: RawConnection) -> None:
    con._drop_local_type_cache()
