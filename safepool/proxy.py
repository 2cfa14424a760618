"""The connection handed to application code.

Subclasses asyncpg's ``PoolConnectionProxy`` (so ``isinstance(proxy,
asyncpg.Connection)`` and ``isinstance(proxy, asyncpg.pool.PoolConnectionProxy)``
hold, as with asyncpg's pool) and forwards every public
``Connection`` method to the leased connection. After release the proxy is
detached and every call raises ``InterfaceError``; after a lease timeout it
raises :class:`~safepool.LeaseExpiredError` instead.

The connection refers back to its proxy only weakly, so a proxy the
application loses is garbage collected and the weak reference's callback
reports it to the pool, which reclaims the connection.
"""

from __future__ import annotations

import functools
import inspect
import types
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar, cast

from asyncpg import connection as _pg_connection
from asyncpg import cursor as _pg_cursor
from asyncpg import pool as _pg_pool

from ._internals import RawConnection
from .errors import LeaseExpiredError, PoolInterfaceError

if TYPE_CHECKING:
    from ._holder import Holder as _Holder
    from ._state import Lease


def _no_mark(function: Any) -> Any:
    return function


# inspect.markcoroutinefunction is 3.12+; on 3.11 nothing marks a sync
# function as a coroutine function (asyncpg's own shim is a no-op there).
_mark_coroutine = getattr(inspect, "markcoroutinefunction", None) or _no_mark


def _released_error(proxy: PoolConnectionProxy, method: str) -> Exception:
    if proxy._expired is not None:
        return LeaseExpiredError(f"cannot call Connection.{method}(): {proxy._expired}")
    return PoolInterfaceError(
        f"cannot call Connection.{method}(): connection has been released back to the pool"
    )


class _ReleasedAttributeError(PoolInterfaceError, AttributeError):
    """An attribute read on a released proxy: asyncpg's proxy reads it from
    its detached ``_con``, None, and raises ``AttributeError``, so
    ``hasattr(con, name)`` and ``getattr(con, name, default)`` answer
    instead of raising. Also an ``InterfaceError``, with its message."""


class _ExpiredAttributeError(LeaseExpiredError, AttributeError):
    """As :class:`_ReleasedAttributeError`, after a lease timeout."""


def _released_attribute_error(proxy: PoolConnectionProxy, attr: str) -> Exception:
    """What the fallback ``__getattr__`` of a released proxy raises (see
    :class:`_ReleasedAttributeError`)."""
    error = _released_error(proxy, attr)
    kind = _ExpiredAttributeError if isinstance(error, LeaseExpiredError) else _ReleasedAttributeError
    return kind(str(error))


# The wrappers below (watch, _copying; _autoreset's) call the connection's
# method at their own first step, not when the proxy's method is called:
# a wrapper cancelled before that step (``asyncio.wait_for(con.fetch(...),
# 0)``, a gather cancelled at once) then holds no coroutine that was never
# awaited (a RuntimeWarning, an error under ``-W error``: review h230), and
# a call whose lease ended before that step is refused with nothing sent.
# An argument error (a missing query) is raised at the await, not at the
# call. Each method's wrapper is a copy named as asyncpg's method
# (:func:`named_for`): a call never awaited warns "coroutine
# 'Connection.copy_to_table' was never awaited", as on asyncpg's pool, and a
# filter written for that message still matches (review h232).


_F = TypeVar("_F", bound=Callable[..., Any])


def named_for(wrapper: _F, name: str, owner: type = _pg_connection.Connection) -> _F:
    """A copy of the coroutine function ``wrapper`` whose coroutines carry
    ``<owner>.<name>``'s qualified name (asyncpg's; ``owner``: its
    ``Connection`` by default): a coroutine takes its function's
    ``__qualname__`` when it is made, so the name costs a call nothing."""
    method = getattr(owner, name, None)
    named = types.FunctionType(
        wrapper.__code__, wrapper.__globals__, name, wrapper.__defaults__, wrapper.__closure__
    )
    named.__qualname__ = getattr(method, "__qualname__", None) or f"{owner.__name__}.{name}"
    return cast(_F, named)


async def watch(proxy: PoolConnectionProxy, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Await ``Connection.<name>(*args, **kwargs)`` of the proxy's
    connection, and mark the lease for a reset round trip (``clean_mark =
    -1``) if it raises (an error, a timeout, a cancel) or sends statements
    of asyncpg's own. Used where a lease's statements alone decide its reset
    (``reset_mode`` "rollback" and "auto"); "full" resets every lease that
    ran one.

    asyncpg sends Parse/Describe/Flush to prepare a statement, then Bind/
    Execute/Sync, and counts the statement (``queries_count``, which release
    reads) only once the second part is sent. An error in between (an
    argument that fails to encode, a cancel after the prepare answered)
    leaves the backend inside the implicit transaction the Parse opened,
    holding the parse-time locks, with the counter unmoved. asyncpg's pool
    ends it with its reset query; so does safepool's release, marked here.

    A call counts one statement. More means asyncpg ran its own in it: the
    type introspection of a type it meets first (an enum, a domain, a row
    type) turns JIT off with ``set_config('jit', 'off', false)`` and back
    with ``set_config('jit', <before>, false)`` (asyncpg 0.32,
    ``Connection._introspect_types``): a setting of session scope that
    asyncpg's reset query clears, and that the classifier never sees
    (review h227).

    Counted on the holder (``Holder.watched``) while it runs: a lease
    released meanwhile (the statement awaited in another task, or its task
    cancelled in the release's own loop step) is marked by the release, as
    it may end in a transaction the statement opened, or not end at all:
    the reset then goes as in full mode (refused while the statement runs,
    after the cancelled one answered).

    :raises asyncpg.InterfaceError: (:class:`safepool.PoolInterfaceError`,
        or :class:`safepool.LeaseExpiredError`) the lease had ended before
        this first ran (a task created in the lease and started after its
        release, a missing ``await``): nothing is sent. Unseen by the
        release, the call ran on a connection handed on with no reset
        (review h227)."""
    con = proxy._raw
    if con is None:
        raise _released_error(proxy, name)
    holder = proxy._holder
    del proxy  # (a lost proxy stays garbage while its statement runs: leak detection)
    protocol = con._protocol
    before = protocol.queries_count
    holder.watched += 1
    try:
        result = await getattr(con.__class__, name)(con, *args, **kwargs)
    except BaseException:
        holder.clean_mark = -1
        raise
    finally:
        holder.watched -= 1
    if protocol.queries_count - before > 1:
        holder.clean_mark = -1
    return result


def plain_forwarder(name: str) -> Any:
    """``Connection.<name>`` of the leased connection (the proxy's method);
    ``InterfaceError`` (or ``LeaseExpiredError``) once released."""

    def call(self: PoolConnectionProxy, *args: Any, **kwargs: Any) -> Any:
        con = self._raw
        if con is None:
            raise _released_error(self, name)
        return getattr(con.__class__, name)(con, *args, **kwargs)

    return call


def marking_forwarder(name: str) -> Any:
    """As :func:`plain_forwarder`, and marks the lease for the reset round
    trip (``clean_mark = -1``) before the call."""

    def call(self: PoolConnectionProxy, *args: Any, **kwargs: Any) -> Any:
        con = self._raw
        if con is None:
            raise _released_error(self, name)
        self._holder.clean_mark = -1
        return getattr(con.__class__, name)(con, *args, **kwargs)

    return call


async def _copying(
    proxy: PoolConnectionProxy, con: Any, name: str, args: tuple[Any, ...], kwargs: dict[str, Any], refuse_late: bool
) -> Any:
    """Await ``Connection.<name>(*args, **kwargs)`` of ``con`` (a COPY
    method, or another of ``COUNTED``), counted on the holder
    (``Holder.copies``) for a take-back to wait for, and for a release made
    meanwhile to reset in a pool task. Before the COPY's first message such
    a call may wait on something else, the protocol idle and no statement
    section held (``_internals.in_call``): ``source=`` or ``output=`` a path
    opens its file in an executor thread (a FIFO, until its other end
    opens). A reset sent then went first, and the COPY ran in the next
    lease's session. And once the server ended a cancelled COPY (the
    protocol idle again), asyncpg reads an asynchronous source on to its
    end: an error or timeout there cancels whatever the connection runs by
    then.

    :raises asyncpg.InterfaceError: ``refuse_late`` ("rollback" mode) and
        the lease ended before this first ran (see :func:`watch`). In
        "full" mode such a call runs on the connection, as on asyncpg's
        pool: the lease was marked, so its reset is sent (refused while it
        runs)."""
    if refuse_late and proxy._raw is None:
        raise _released_error(proxy, name)
    holder = proxy._holder
    del proxy  # (see watch)
    holder.copies += 1
    try:
        return await getattr(con.__class__, name)(con, *args, **kwargs)
    finally:
        holder.copies -= 1


def copy_forwarder(name: str, refuse_late: bool = False) -> Any:
    """As :func:`marking_forwarder`, and counts the call while it goes on
    (see :func:`_copying`)."""
    copying = named_for(_copying, name)

    def call(self: PoolConnectionProxy, *args: Any, **kwargs: Any) -> Any:
        con = self._raw
        if con is None:
            raise _released_error(self, name)
        self._holder.clean_mark = -1
        return copying(self, con, name, args, kwargs, refuse_late)

    return call


def _watched_forwarder(name: str) -> Any:
    watched = named_for(watch, name)

    def call(self: PoolConnectionProxy, *args: Any, **kwargs: Any) -> Any:
        if self._raw is None:
            raise _released_error(self, name)
        return watched(self, name, args, kwargs)

    return call


# Methods that may leave the backend inside the implicit transaction of a
# Parse that no Sync followed, holding the parse-time locks, with asyncpg's
# statement counter unmoved: prepare() sends Parse/Describe/Flush, and a
# cursor() refused outside a transaction stops there too. Every reset mode
# must end that transaction with a round trip, whatever the SQL.
PARSE_WITHOUT_SYNC = frozenset({"prepare", "cursor"})


# Calls of several protocol steps that hold no statement section (asyncpg's
# _stmt_exclusive_section, _internals.in_call): counted while they run
# (Holder.copies), so a release made meanwhile resets in a pool task, after
# the call's next step, as asyncpg's shielded reset comes (review s70), and a
# take-back waits for them. prepare() introspects the types of a statement
# it has just parsed with a query of its own; a COPY method may prepare, or
# open a file, before its COPY.
COUNTED = frozenset({"prepare"})


# A cursor's steps run through asyncpg's cursor objects, not the proxy: its
# first fetch (or ``await con.cursor(...)``) prepares the statement, then
# binds it; a later fetch of an iterator may execute, then close the portal.
# The protocol is idle between the two, and no statement section is held.
# The cursor factory a lease's ``cursor()`` returns counts each such step
# on the lease's holder while it runs, as ``_copying`` counts a COPY (review
# s70). Subclasses that add no state (their instances are asyncpg's, their
# class swapped) and keep asyncpg's module and names: ``repr()`` and
# ``isinstance()`` read as on asyncpg's pool. Steps of one round trip (a
# ``Cursor``'s ``fetch()``, ``forward()``) are not counted.


def _holder_of(con: Any) -> _Holder | None:
    """The holder of the lease ``con`` is in (asyncpg's cursor checks, which
    run first, refuse a call from another lease), or None: a proxy that was
    collected."""
    proxy = con._proxy
    try:
        return None if proxy is None else cast("_Holder", proxy._holder)
    except ReferenceError:
        return None


async def _counted_step(holder: _Holder, step: Any) -> Any:
    holder.copies += 1
    try:
        return await step
    finally:
        holder.copies -= 1


# asyncpg's CursorIterator.__anext__, and the same without its guard
# (connresource.guarded keeps the function it wraps as __wrapped__, asyncpg
# 0.29-0.32).
_asyncpg_next = _pg_cursor.CursorIterator.__anext__
_next_row = _asyncpg_next.__wrapped__  # type: ignore[attr-defined]


async def _counted_next_row(holder: _Holder, iterator: Any) -> Any:
    # (asyncpg's step is made here, at this coroutine's first step: one
    # cancelled before it leaves no coroutine of asyncpg's never awaited,
    # review h240.)
    holder.copies += 1
    try:
        return await _next_row(iterator)
    finally:
        holder.copies -= 1


# Its coroutines named as asyncpg's ("coroutine 'CursorIterator.__anext__'
# was never awaited").
_counted_next_row = named_for(_counted_next_row, "__anext__", _pg_cursor.CursorIterator)


class _CountedCursorIterator(_pg_cursor.CursorIterator):
    __slots__ = ()

    def __anext__(self) -> Any:
        step = _pg_cursor.CursorIterator.__anext__
        if step is not _asyncpg_next:
            # Patched in asyncpg's class since (an instrumentation's wrapper:
            # OpenTelemetry's asyncpg instrumentation wraps this method): the
            # patch runs, as on asyncpg's pool, counted (review h269).
            holder = _holder_of(self._connection)  # type: ignore[attr-defined]
            return step(self) if holder is None else _counted_step(holder, step(self))
        # asyncpg's guard, at the call as asyncpg's (connresource.guarded)
        self._check_conn_validity("__anext__")  # type: ignore[attr-defined]
        holder = _holder_of(self._connection)  # type: ignore[attr-defined]
        return _next_row(self) if holder is None else _counted_next_row(holder, self)


class _CountedCursorFactory(_pg_cursor.CursorFactory):
    __slots__ = ()

    def __aiter__(self) -> Any:
        iterator = super().__aiter__()
        if type(iterator) is _pg_cursor.CursorIterator:
            iterator.__class__ = _CountedCursorIterator
        return iterator

    def __await__(self) -> Any:
        opening = super().__await__()  # (asyncpg's checks raise here)
        holder = _holder_of(self._connection)  # type: ignore[attr-defined]
        return opening if holder is None else _counted_step(holder, _Awaiting(opening)).__await__()


class _Awaiting:
    """An iterator of ``__await__`` made awaitable again."""

    __slots__ = ("_iterator",)

    def __init__(self, iterator: Any) -> None:
        self._iterator = iterator

    def __await__(self) -> Any:
        return self._iterator


for _counted_class, _original in ((_CountedCursorIterator, _pg_cursor.CursorIterator),
                                  (_CountedCursorFactory, _pg_cursor.CursorFactory)):
    _counted_class.__module__ = _original.__module__
    _counted_class.__name__ = _original.__name__
    _counted_class.__qualname__ = _original.__qualname__


def counted_cursor(factory: Any) -> Any:
    """``factory``, asyncpg's ``CursorFactory`` returned by a lease's
    ``cursor()``, made to count its multi-step calls on the lease's holder
    (``Holder.copies``): a release made while one is between its steps
    resets in a pool task, after the step, as asyncpg's shielded reset comes.
    Anything else (a ``connection_class``'s own ``cursor()``) is returned as
    it is."""
    if type(factory) is _pg_cursor.CursorFactory:
        factory.__class__ = _CountedCursorFactory
    return factory


def _cursor_forwarder() -> Any:
    """``Connection.cursor()`` of the leased connection: marks the lease (see
    PARSE_WITHOUT_SYNC) and counts the cursor's steps (:func:`counted_cursor`)."""

    def call(self: PoolConnectionProxy, *args: Any, **kwargs: Any) -> Any:
        con = self._raw
        if con is None:
            raise _released_error(self, "cursor")
        self._holder.clean_mark = -1
        return counted_cursor(con.__class__.cursor(con, *args, **kwargs))

    return call


def _forward(name: str, is_coroutine: bool, *, watch_errors: bool) -> Any:
    if name.startswith("copy_") or name in PARSE_WITHOUT_SYNC:
        # What asyncpg's statement counter does not count, yet leaves the
        # session to reset: a COPY's query can change it (a lock,
        # set_config, a trigger), and see PARSE_WITHOUT_SYNC.
        counted = name.startswith("copy_") or name in COUNTED
        if name == "cursor":
            call = _cursor_forwarder()
        else:
            call = copy_forwarder(name, refuse_late=watch_errors) if counted else marking_forwarder(name)
    elif is_coroutine:
        # Full mode resets every lease that ran a statement: marking the
        # lease at the call covers a statement that raised before asyncpg
        # counted it (see watch) without a coroutine frame per statement.
        # (A coroutine method that sends nothing, reload_schema_state(), now
        # costs its lease a reset, as every lease costs on asyncpg's pool.)
        # Rollback mode must not reset a lease whose statements succeeded:
        # it watches for the error instead.
        call = _watched_forwarder(name) if watch_errors else marking_forwarder(name)
    else:
        call = plain_forwarder(name)

    if is_coroutine:
        _mark_coroutine(call)
    return call


if TYPE_CHECKING:
    # The type checker sees asyncpg's Connection: every public Connection
    # method is forwarded (_install_forwarders) with its signature, and
    # isinstance(con, asyncpg.Connection) holds at run time (asyncpg's
    # proxy's metaclass), so a lease's methods are typed as the
    # connection's in users' code (tests/test_typing.py). (Not asyncpg's
    # PoolConnectionProxy: its stubbed _holder type would hide this class's.)
    class _ProxyBase(_pg_pool.PoolConnectionProxy[Any], _pg_connection.Connection[Any]):  # type: ignore[misc,metaclass]
        _holder: Any  # (asyncpg's stubbed PoolConnectionHolder; this class's is its own Holder)
else:
    # asyncpg's own proxy class, so that isinstance(con,
    # asyncpg.pool.PoolConnectionProxy) holds as on asyncpg's pool (code
    # branches on it: "release it if pooled, else close it"). It adds its
    # slots _con and _holder and methods this class replaces: every public
    # Connection method (_install_forwarders), __getattr__, _detach and
    # __repr__.
    _ProxyBase = _pg_pool.PoolConnectionProxy


class PoolConnectionProxy(_ProxyBase):
    # (_holder shadows the base's slot of the same name, and the _con
    # property its _con: two unused pointers per proxy, where the checker
    # needs _holder declared here. The leased connection is _raw.)
    __slots__ = ("_raw", "_holder", "_lease", "_expired", "__weakref__")

    def __init__(self, holder: _Holder, con: RawConnection, lease: Lease) -> None:
        self._raw: RawConnection | None = con
        self._holder = holder
        self._lease = lease
        self._expired: str | None = None
        # Weak, so that losing the proxy lets the GC find the leak: the weak
        # reference's callback reports it (Holder._proxy_collected). (asyncpg's
        # _set_proxy, inlined: a lease's proxy is its connection's only one.)
        con._proxy = weakref.proxy(self, holder.proxy_collected)

    def __getattr__(self, attr: str) -> Any:
        # Not a Connection method the proxy forwards: a private attribute of
        # asyncpg's, or what a connection_class adds. A helper method runs
        # its SQL on the connection itself, unseen: it may have changed the
        # session (auto mode), or stopped after a Parse (prepare(): see
        # PARSE_WITHOUT_SYNC), which asyncpg's counter does not count. Mark.
        con = self._raw
        if con is None:
            raise _released_attribute_error(self, attr)
        self._holder.clean_mark = -1
        return getattr(con, attr)

    @property
    def _con(self) -> RawConnection | None:
        """The leased connection (None once released), as asyncpg's proxy's
        ``_con``: code that unwraps the proxy. What runs on it directly is
        unseen, and a COPY there is not counted by asyncpg's statement
        counter either: mark the lease for the full reset, as every lease
        gets on asyncpg's pool."""
        con = self._raw
        if con is not None:
            self._holder.clean_mark = -1
        return con

    @_con.setter
    def _con(self, con: RawConnection | None) -> None:
        self._raw = con

    def terminate(self) -> None:
        """``Connection.terminate()`` of the leased connection; first notes
        whether a statement is in flight (the pool then sends its backend a
        cancel request and counts the slot until it was delivered:
        docs/design.md, "Slot states")."""
        con = self._raw
        if con is None:
            raise _released_error(self, "terminate")
        holder = self._holder
        holder.note_abort(con)
        try:
            con.__class__.terminate(con)
        finally:
            if not con.is_closed():
                holder.abort_in_flight = None  # (a class's terminate() that did not abort: not this abort's reading)

    def _referent(self) -> PoolConnectionProxy:
        """This proxy itself, called through the connection's weak proxy
        (``_internals._unwrap``: asyncpg's callbacks get the proxy, as with
        asyncpg's pool)."""
        return self

    def _detach(self) -> RawConnection | None:
        con, self._raw = self._raw, None
        if con is not None:
            con._set_proxy(None)
        return con

    def _expire(self, reason: str) -> RawConnection | None:
        self._expired = reason
        return self._detach()

    def __repr__(self) -> str:
        if self._raw is None:
            state = "[expired]" if self._expired else "[released]"
            return f"<{type(self).__name__} {state} {id(self):#x}>"
        return f"<{type(self).__name__} {self._raw!r} {id(self):#x}>"


class WatchingProxy(PoolConnectionProxy):
    """The proxy of ``reset_mode="rollback"``: marks its lease for a
    round trip (the ``ROLLBACK``) only when a statement raises or the lease
    prepares or copies (see :func:`watch`), not at every statement as the
    base proxy of the full mode does."""

    __slots__ = ()


# The Connection methods the proxy writes out itself (terminate()), before
# the forwarders below fill in the rest: every proxy class keeps these
# (auto mode's AutoResetProxy too: review h281).
OWN_METHODS = frozenset(name for name in PoolConnectionProxy.__dict__ if not name.startswith("_"))


def _install_forwarders() -> None:
    own = set(PoolConnectionProxy.__dict__)
    for name in dir(_pg_connection.Connection):
        if name.startswith("_") or name in own:
            continue
        method = getattr(_pg_connection.Connection, name)
        if not inspect.isfunction(method):
            continue
        is_coroutine = inspect.iscoroutinefunction(method)
        setattr(PoolConnectionProxy, name,
                functools.update_wrapper(_forward(name, is_coroutine, watch_errors=False), method))
        if is_coroutine:
            setattr(WatchingProxy, name,
                    functools.update_wrapper(_forward(name, is_coroutine, watch_errors=True), method))
    PoolConnectionProxy.__doc__ = _pg_connection.Connection.__doc__


_install_forwarders()
