"""safepool's exceptions.

Each error also subclasses the exception asyncpg raises in the same situation,
so ``except asyncpg.InterfaceError`` / ``except asyncio.TimeoutError`` clauses
written for asyncpg's pool keep working.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Iterable
from typing import Any

from asyncpg import exceptions as _pg

__all__ = [
    "EventLoopMismatchError",
    "LeaseExpiredError",
    "PoolArgumentError",
    "PoolClosedError",
    "PoolError",
    "PoolInterfaceError",
    "PoolOverloadedError",
    "PoolTimeoutError",
    "PoolTypeError",
    "PoolValueError",
    "ServerUnavailableError",
]


class PoolError(Exception):
    """Root of every error safepool raises of its own: ``except
    safepool.PoolError`` catches them all. Each also subclasses what
    asyncpg's pool raises in the same situation (asyncpg 0.29-0.32), so
    clauses written for asyncpg's pool keep working: a bad argument is a
    :class:`PoolValueError` (a ``ValueError``) or :class:`PoolTypeError` (a
    ``TypeError``); a connection used after its release, or released to a
    pool it does not belong to, a :class:`PoolInterfaceError` (an
    ``asyncpg.InterfaceError``).

    Not a ``PoolError``: what the server or asyncpg's connection raise
    (``asyncpg.PostgresError``, ``asyncpg.ConnectionDoesNotExistError``,
    ``OSError`` from a connect), passed through unchanged as asyncpg's pool
    does, and ``TypeError`` for a call that Python's own argument binding
    refuses (an unknown keyword)."""


class PoolArgumentError(PoolError):
    """An argument safepool checks was refused, before anything was done
    with it: raised as :class:`PoolValueError` or :class:`PoolTypeError`.
    The message names the argument, what it must be and what it got."""


class PoolValueError(PoolArgumentError, ValueError):
    """An argument of the right type out of range or not one of its choices
    (``max_size=0``, ``acquire(timeout=-1)``, ``reset_mode="x"``). asyncpg's
    pool raises ``ValueError`` for the arguments it checks itself, with the
    same message (``"max_size is expected to be greater than zero"``)."""


class PoolTypeError(PoolArgumentError, TypeError):
    """An argument of the wrong type (``acquire(timeout="1")``, a pool name
    that is not a ``str``, a callback that is not callable)."""


class PoolInterfaceError(PoolError, _pg.InterfaceError):
    """The pool or a connection used in a way asyncpg's pool refuses with
    ``asyncpg.InterfaceError``, with asyncpg's message: a connection used
    after its release (``"cannot call Connection.fetch(): connection has
    been released back to the pool"``), released to another pool, an
    acquire before the pool is initialized or while another task
    initializes it, a ``connect=`` callback that returned no connection."""


class PoolClosedError(PoolError, _pg.InterfaceError):
    """The pool is closing or closed: raised by ``acquire()`` (and the
    query shortcuts) once :meth:`~safepool.Pool.close` or
    :meth:`~safepool.Pool.terminate` has begun, by ``resize()``, and to the
    tasks still waiting when the pool closes. asyncpg's pool (0.29-0.32)
    raises ``asyncpg.InterfaceError`` here: this error is one."""


class PoolTimeoutError(PoolError, asyncio.TimeoutError):
    """No connection could be handed out before the acquire deadline.

    The message says how busy the pool was and who held its connections.
    Also raised by ``stats_threadsafe()`` and ``call_threadsafe()`` when the
    pool's event loop did not answer in time (it is blocked).
    """


class PoolOverloadedError(PoolError):
    """The pool refused to make the acquire wait (longer): the wait queue is
    full (``max_waiters``, or an acquire site's share of it under
    ``max_site_share``), or the adaptive queue (``queue_policy="adaptive"``)
    refused it at once (not servable within its timeout at the measured
    drain rate) or shed it once it had waited longer than ``queue_target``
    seconds while the queue stood.
    The message says which. Not an ``asyncio.TimeoutError``: asyncpg's pool
    has no bound on waiters, so no asyncpg error corresponds.

    A web application maps this to HTTP 503: waiting would only make the
    queue longer while every connection is busy.
    """


class ServerUnavailableError(PoolError, ConnectionError):
    """The pool has no connection and the server refuses new ones.

    Raised at once (instead of waiting out the acquire timeout) while the
    pool is backing off between connection attempts. ``__cause__`` is the
    last connect error. Subclasses ``ConnectionError`` (an ``OSError``), as
    asyncpg surfaces a refused connection.
    """


class LeaseExpiredError(PoolError, _pg.InterfaceError):
    """The connection was taken back because its lease outlived
    ``lease_timeout`` (seconds): raised by every later call on the lease's
    proxy (an attribute read raises one that is also an ``AttributeError``),
    where a released proxy raises asyncpg's ``InterfaceError``
    ("connection has been released back to the pool"); this error is one."""


class EventLoopMismatchError(PoolError, _pg.InterfaceError, RuntimeError):
    """``acquire()`` (or a pool shortcut such as ``pool.fetchval()``,
    ``close()``, or ``await pool`` of a pool created before its loop ran)
    ran on an event loop other than the pool's: a pool, like
    each asyncpg connection, works only on the loop it was created on. The
    common cause is a test suite whose pool fixture outlives the tests'
    event loop. asyncpg's pool raises ``InterfaceError("cannot perform
    operation: another operation is in progress")`` or
    ``RuntimeError("Event loop is closed")`` there, or hangs, depending on
    the loops' states, and its ``close()`` raises ``RuntimeError`` ("Task
    ... attached to a different loop", asyncpg 0.32): this error is both,
    so an ``except`` written for asyncpg's catches it."""


def check_is_pool(obj: object, where: str) -> None:
    """Raise TypeError unless ``obj`` looks like a safepool pool (a ``name``
    and a ``stats()``: what ``where``, an API taking safepool pools, reads).
    An asyncpg pool (one not migrated yet, an ORM's not redirected) has
    neither: the error says so, where it was an AttributeError about
    ``name`` or ``stats``, or "'Pool' object is not iterable"."""
    if isinstance(getattr(obj, "name", None), str) and callable(getattr(obj, "stats", None)):
        return
    kind = f"{type(obj).__module__}.{type(obj).__qualname__}"
    hint = ""
    if type(obj).__module__.startswith("asyncpg"):
        hint = (
            ": an asyncpg pool has no statistics or leases to read; create it with safepool.create_pool() "
            "(docs/migration.md; for an ORM's pools, rebind asyncpg.create_pool)"
        )
    raise PoolTypeError(f"{where} expected a safepool pool, got {kind}{hint}")


def check_flag(name: str, value: object) -> bool:
    """``value``, the option ``name``, checked to be True or False (a
    truthy string or number taken as on, where a program meant off).

    :raises safepool.PoolTypeError: it is not a bool."""
    if not isinstance(value, bool):
        raise PoolTypeError(f"{name} must be True or False, got {value!r}")
    return value


def check_encodable(what: str, name: str) -> str:
    """``name`` (a pool or site name: a metric label), checked to be a
    str UTF-8 can encode: one holding a lone surrogate (what Python makes of
    undecodable bytes in an environment variable, a host or file name,
    ``os.fsdecode``) was taken and failed every Prometheus scrape of its
    registry, the other pools' and metrics included, and an OTLP export
    (review h262). O(1) for an ASCII name.

    :raises safepool.PoolValueError: (a ``ValueError``) UTF-8 cannot encode it."""
    if not name.isascii():
        try:
            name.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise PoolValueError(
                f"{what} must be text UTF-8 can encode, got {name!r} (a lone surrogate at index {exc.start}: "
                "undecodable bytes decoded with surrogateescape, as os.fsdecode() does; decode them with "
                "errors='replace' or 'backslashreplace')"
            ) from None
    return name


def encodable(name: str) -> str:
    """``name`` as UTF-8 can encode it: a lone surrogate written as its
    escape (``\\udcff``). For names safepool derives itself (an acquire
    site's module), where there is nobody to refuse."""
    if name.isascii():
        return name
    return name.encode("utf-8", "backslashreplace").decode("utf-8")


def check_callable(name: str, value: object, *, plain: bool = False) -> None:
    """``value``, the argument ``name``, checked to be callable: taken
    unchecked, a callback failed (logged) at every later call instead. With
    ``plain``, a callback the pool calls and does not await (an event
    listener, a timing sink, a created hook) must not be a coroutine
    function: accepted, it would be called, its coroutine dropped and its
    work never done, without an error (asyncpg's connection listeners run
    coroutine functions, so a migrating program may pass one).

    :raises safepool.PoolTypeError: it is not callable, or (``plain``) it is
        a coroutine function (``async def``, a ``functools.partial`` of one,
        an object whose ``__call__`` is one)."""
    if not callable(value):
        raise PoolTypeError(f"{name} must be callable, got {type(value).__name__}")
    if plain and is_coroutine_function(value):
        raise PoolTypeError(
            f"{name} must be a plain function, not a coroutine function ({value!r}): the pool calls it and does not "
            "await it, so its coroutine would be dropped; start the work from a plain function "
            "(asyncio.get_running_loop().create_task(...))"
        )


def is_coroutine_function(value: object) -> bool:
    """``async def`` (also through ``functools.partial``), or an object whose
    class's ``__call__`` is one."""
    try:
        return inspect.iscoroutinefunction(value) or (
            not inspect.isroutine(value) and inspect.iscoroutinefunction(type(value).__call__)
        )
    except Exception:
        # (A Mock spec'd on a function answers inspect's questions with
        # errors of its own: not known to be async, so taken as plain.)
        return False


def refuse_awaitable(name: str, result: object) -> None:
    """A plain callback returned a coroutine (a lambda around an ``async
    def``): closed, so it warns of nothing, and refused, so the pool logs the
    callback as failed, as any error of it. A task or future it returns is
    work it started, which runs on its own: fine.

    :raises safepool.PoolTypeError: ``result`` is a coroutine."""
    if inspect.iscoroutine(result):
        result.close()
        raise PoolTypeError(f"{name} returned {type(result).__name__} {result!r}, which the pool does not await: "
                            "the work it stands for was not done")


def pool_list(pools: Iterable[Any], where: str = "") -> list[Any]:
    """``pools`` as a list, for an API taking several safepool pools
    (``where``, its name for the message: ``"LeakGuard()"``).

    :raises safepool.PoolTypeError: ``pools`` is one pool (``PoolCollector(
        pool)`` for ``PoolCollector([pool])``: "'Pool' object is not
        iterable"), or not iterable."""
    prefix = f"{where} " if where else ""
    if isinstance(getattr(pools, "name", None), str) and callable(getattr(pools, "stats", None)):
        raise PoolTypeError(f"{prefix}expected an iterable of pools, got one pool: pass [pool]")
    try:
        return list(pools)
    except TypeError:
        if isinstance(pools, Iterable):
            raise  # (an error inside the iteration: not the argument's type)
        raise PoolTypeError(f"{prefix}expected an iterable of pools, got {type(pools).__name__}") from None
