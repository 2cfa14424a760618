"""Termination listeners and query loggers that init=, setup= or an earlier
lease left on a connection (asyncpg's release keeps both kinds) are the
connection's, not a later lease's callbacks: they do not keep a lost proxy's
connection leased. Only a callback the lost lease registered itself does, and
a reference to the connection that a leftover holds (a closure over it, its
bound method, a partial) still counts: that connection then stays leased (the
safe side) until the lease timeout, or ``release_lease()``, takes it back. On
a real PostgreSQL."""

from __future__ import annotations

import functools
import gc
import logging
import warnings
from collections.abc import Callable
from typing import Any

import asyncpg
import pytest

from safepool import ManualClock
from tests._util import looked_at, until

pytestmark = pytest.mark.asyncio


def _on_close(con: Any) -> None:
    pass


def _log_record(record: Any) -> None:
    pass


def _register(con: Any, kind: str, callback: Any = None) -> None:
    """Registers ``callback`` (a plain function by default) as a
    termination listener or a query logger, as ``kind`` names."""
    if kind == "termination listener":
        con.add_termination_listener(callback or _on_close)
    else:
        con.add_query_logger(callback or _log_record)


def _suspects(caplog: pytest.LogCaptureFixture) -> int:
    return sum(getattr(r, "event", None) == "leak_suspect" for r in caplog.records)


class _KeepsItsCallbacks(asyncpg.Connection):
    """A connection_class that makes its callbacks when the connection
    opens, before the pool counts the references to it, and keeps them (the
    connection's __dict__): a bound method and a closure over itself."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.on_event = self._on_event
        self.closure = lambda *args: self.is_closed()

    def _on_event(self, *args: Any) -> None:
        pass


# Closures of one scope with the leftover (they share its cell for the
# connection), kept by the program past the lease that made them.
_HELPERS: dict[str, Any] = {}


class _SharesACell(asyncpg.Connection):
    def install(self, kind: str) -> None:
        def on_event(*args: Any) -> None:
            self.is_closed()

        async def server_pid() -> int:
            return int(await self.fetchval("SELECT pg_backend_pid()"))

        _register(self, kind, on_event)
        _HELPERS["server_pid"] = server_pid


async def _still_leased(pool: Any, pending: Any, forget: Callable[[], None] = lambda: None) -> None:
    """The lost proxy's connection stays leased while ``pending`` (a query's
    coroutine, not started) waits; once it ran (and the program let go of
    what else refers to the connection: ``forget``), it is reclaimed."""
    await looked_at(pool)
    leased = pool.stats().in_use == 1 and pool.stats().leaks_detected == 0
    await pending  # (whatever happened: a coroutine never awaited would warn)
    del pending
    forget()
    assert leased
    gc.collect()
    await until(lambda: pool.stats().idle == 1)
    assert pool.stats().leaks_detected == 1


async def _kept_until_the_lease_timeout(pool: Any, clock: ManualClock) -> None:
    """The lost proxy's connection stays leased (a leftover refers to the
    connection; not even ``release_lease()`` takes it), until its
    ``lease_timeout`` (30 s on ``clock``) takes it back."""
    await looked_at(pool)
    assert pool.stats().in_use == 1 and pool.stats().leaks_detected == 0
    [lease] = pool.leases()
    assert lease.collected
    assert await pool.release_lease(lease.id) is False
    clock.advance(30.1)
    await until(lambda: pool.stats().idle == 1)
    assert pool.stats().leases_expired == 1


@pytest.mark.parametrize("how", ["bound method", "closure"])
@pytest.mark.parametrize("kind", ["termination listener", "query logger"])
async def test_a_leftover_the_connection_itself_keeps_does_not_hide_a_pending_query(
    pools: Any, kind: str, how: str
) -> None:
    # The leftover's reference to the connection was already counted when
    # the connection joined the pool (the callback existed then): counted
    # again as the leftover's, it hid the one reference of a query not yet
    # started, and its connection was reclaimed, reset and leased again
    # under it (the query then ran in the next lease's transaction).
    pool = await pools(min_size=1, max_size=1, connection_class=_KeepsItsCallbacks)
    async with pool.acquire(timeout=2) as con:
        _register(con, kind, con.on_event if how == "bound method" else con.closure)

    async def handler_with_a_pending_query() -> Any:
        con = await pool.acquire(timeout=2)
        return con.fetchval("SELECT 41 + 1")

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        await _still_leased(pool, await handler_with_a_pending_query())


@pytest.mark.parametrize("kind", ["termination listener", "query logger"])
async def test_a_leftover_sharing_its_reference_with_live_code_does_not_hide_it(pools: Any, kind: str) -> None:
    # The leftover's cell for the connection is also the cell of a closure
    # the program kept: a coroutine of that closure, not started yet, refers
    # to the connection through it only. The cell is not the leftover's
    # alone: the lost proxy's connection stays leased until it ran (and
    # while the program keeps that closure, which can use it any time).
    clock = ManualClock()
    pool = await pools(min_size=1, max_size=1, connection_class=_SharesACell, lease_timeout=30.0, clock=clock)
    async with pool.acquire(timeout=2) as con:
        con.install(kind)

    async def handler_with_a_pending_query() -> Any:
        con = await pool.acquire(timeout=2)
        await con.execute("SELECT 1")
        _HELPERS["pid"] = con.get_server_pid()
        return _HELPERS["server_pid"]()

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ResourceWarning)
            pending = await handler_with_a_pending_query()
            await looked_at(pool)
            assert pool.stats().in_use == 1 and pool.stats().leaks_detected == 0
            assert await pending == _HELPERS["pid"]
            del pending
            _HELPERS.clear()
            # The leftover closure still refers to the connection: kept.
            await _kept_until_the_lease_timeout(pool, clock)
    finally:
        _HELPERS.clear()


async def test_callbacks_a_reset_hook_removed_are_not_remembered(pools: Any) -> None:
    # A reset= hook (or a connection_class's reset()) that removes what the
    # lease registered runs on the connection itself, after the lease ended:
    # no lease to tell. The pool's note of who registered each callback
    # (holder.lease_callbacks) grew by every callback of every lease, and
    # kept each alive, with what it refers to, for the connection's life.
    async def remove_callbacks(con: Any) -> None:
        for entry in list(con._query_loggers):
            con.remove_query_logger(entry.cb)
        for entry in list(con._termination_listeners):
            con.remove_termination_listener(entry.cb)

    pool = await pools(min_size=1, max_size=1, reset=remove_callbacks)
    for _ in range(200):
        async with pool.acquire(timeout=2) as con:
            con.add_query_logger(lambda record: None)
            con.add_termination_listener(lambda con: None)
    [holder] = pool._runner.slot_holders.values()
    assert len(holder.lease_callbacks or ()) <= 2


class _Registering(asyncpg.Connection):
    """A connection_class whose methods register callbacks on the connection
    itself (through the proxy's attribute fallback: on the raw connection)
    that refer to it: the references a lease's own leftovers hold."""

    def register(self, kind: str, how: str = "closure") -> None:
        if how == "closure":
            _register(self, kind, lambda *args: self.is_closed())
        elif how == "bound method":
            _register(self, kind, self.on_event)
        else:  # a partial, the connection one of its keyword arguments
            _register(self, kind, functools.partial(_on_event, connection=self))

    def on_event(self, *args: Any) -> None:
        pass


def _on_event(con_or_record: Any, connection: Any = None) -> None:
    pass


async def test_a_closure_a_reset_hook_removed_does_not_keep_lost_proxies_leased(pools: Any) -> None:
    # Its note outlived it (removed on the idle connection: no lease to
    # tell), and with the note the closure and its reference to the
    # connection: every later lost proxy of the connection looked referred
    # to, and stayed leased (a leak_suspect report, then nothing).
    async def remove_callbacks(con: Any) -> None:
        for entry in list(con._query_loggers):
            con.remove_query_logger(entry.cb)

    pool = await pools(min_size=1, max_size=1, connection_class=_Registering, reset=remove_callbacks)
    async with pool.acquire(timeout=2) as con:
        con.register("query logger")

    async def handler_that_forgets() -> None:
        con = await pool.acquire(timeout=2)
        await con.execute("SELECT 1")

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        await handler_that_forgets()
        gc.collect()
        await until(lambda: pool.stats().idle == 1)
    assert pool.stats().leaks_detected == 1


class _Unhashable:
    __hash__ = None  # type: ignore[assignment]

    def __call__(self, *args: Any) -> None:
        pass


def _plain(*args: Any) -> None:
    pass


async def test_registering_where_no_lease_can_be_told_raises_nothing_new(pools: Any, pg_dsn: str) -> None:
    # safepool's add_/remove_ methods on asyncpg's Connection note only a
    # safepool lease's registrations: elsewhere they are asyncpg's own, and
    # asyncpg's errors come out unchanged, with nothing noted.
    plain: Any = await asyncpg.connect(pg_dsn)
    try:
        plain.add_termination_listener(_plain)
        plain.add_query_logger(_plain)
        plain.remove_query_logger(_plain)
        assert plain._proxy is None and len(plain._termination_listeners) == 1
    finally:
        await plain.close()
    theirs = await asyncpg.create_pool(pg_dsn, min_size=1, max_size=1)
    try:
        async with theirs.acquire() as con:
            con.add_termination_listener(_plain)
            con.remove_termination_listener(_plain)
    finally:
        await theirs.close()

    pool = await pools(min_size=1, max_size=1)
    async with pool.acquire(timeout=2) as con:
        with pytest.raises(TypeError, match="unhashable"):
            con.add_termination_listener(_Unhashable())
        with pytest.raises(asyncpg.InterfaceError, match="expected a callable"):
            con.add_query_logger(42)
    [holder] = pool._runner.slot_holders.values()
    assert not holder.lease_callbacks

    # The proxy is garbage, not yet reclaimed (that runs one loop pass
    # later): the weak proxy raises ReferenceError. A callback registered
    # then is not told from the lost lease's own: it keeps the connection
    # leased until release_lease() (or lease_timeout) takes it.
    async def loses() -> Any:
        con = await pool.acquire(timeout=2)
        return con._con

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        raw = await loses()
        gc.collect()
        assert raw._proxy is not None  # the dead weak proxy, still in place
        raw.add_termination_listener(_plain)
        del raw
        await looked_at(pool)
        [lease] = pool.leases()
        assert lease.collected and pool.stats().in_use == 1
        assert await pool.release_lease(lease.id) is True
        await until(lambda: pool.stats().idle == 1)
    assert pool.stats().leaks_detected == 1


async def _handler_that_forgets(pool: Any, kind: str | None = None) -> None:
    """Acquires, changes the session (application_name 'leaky') and, with a
    ``kind``, registers a callback of its own; then loses the proxy."""
    con = await pool.acquire(timeout=2)
    await con.execute("SET application_name = 'leaky'")
    if kind is not None:
        _register(con, kind, lambda *args: None)


async def _each_lost_proxy_is_reclaimed(pool: Any, kind: str, caplog: pytest.LogCaptureFixture, leaked: int) -> None:
    """Two lost proxies of ``pool`` (max_size=1) are reclaimed (and their
    session reset) without a leak_suspect report; a third, whose lease
    registered a ``kind`` callback of its own, stays leased until
    ``release_lease()``. ``leaked``: the leaks detected before."""
    for n in (1, 2):
        await _handler_that_forgets(pool)
        gc.collect()
        await until(lambda: pool.stats().idle == 1)
        assert pool.stats().leaks_detected == leaked + n
    assert _suspects(caplog) == 0
    async with pool.acquire(timeout=2) as con:
        assert await con.fetchval("SHOW application_name") != "leaky"

    await _handler_that_forgets(pool, kind)  # the lease's own callback: maybe still in use
    gc.collect()
    await until(lambda: _suspects(caplog) == 1)
    [lease] = pool.leases()
    assert pool.stats().in_use == 1 and lease.collected
    assert await pool.release_lease(lease.id) is True
    await until(lambda: pool.stats().idle == 1)
    assert pool.stats().leaks_detected == leaked + 3


@pytest.mark.parametrize("hook", ["init", "setup"])
@pytest.mark.parametrize("kind", ["termination listener", "query logger"])
async def test_callbacks_the_pools_hooks_register_do_not_keep_lost_proxies_leased(
    pools: Any, caplog: pytest.LogCaptureFixture, kind: str, hook: str
) -> None:
    # A termination listener or query logger registered by init= belongs to
    # the connection for its whole life (asyncpg's release keeps both); one
    # setup= registers (on every acquire, through the lease's proxy) is the
    # pool's setup, as init='s. Both counted as the lease's callbacks: no
    # lost proxy of that connection was reclaimed (a leak_suspect report,
    # then nothing until lease_timeout), and leaked leases exhausted the pool
    # (the outage again). A callback the lease's own code registers (after
    # setup=) still keeps its connection.
    async def register(con: Any) -> None:
        _register(con, kind)

    pool = await pools(min_size=1, max_size=1, **{hook: register})
    caplog.set_level(logging.WARNING, logger="safepool.leaks")

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        await _each_lost_proxy_is_reclaimed(pool, kind, caplog, leaked=0)


@pytest.mark.parametrize("kind", ["termination listener", "query logger"])
async def test_callbacks_an_earlier_lease_left_do_not_keep_lost_proxies_leased(
    pools: Any, caplog: pytest.LogCaptureFixture, kind: str
) -> None:
    # asyncpg's release keeps termination listeners and query loggers: one a
    # lease registered and left counted as the callbacks of every later lease
    # of that connection, and no lost proxy of it was reclaimed any more (a
    # leak_suspect report, then nothing until lease_timeout). Once their
    # lease ended they are the connection's, as init='s are.
    pool = await pools(min_size=1, max_size=1)
    caplog.set_level(logging.WARNING, logger="safepool.leaks")
    async with pool.acquire(timeout=2) as con:
        _register(con, kind)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        await _each_lost_proxy_is_reclaimed(pool, kind, caplog, leaked=0)

        # The leftovers' references to the connection are not taken for a
        # query's: a lost proxy whose query has not started is still in use.
        async def handler_with_a_pending_query() -> Any:
            con = await pool.acquire(timeout=2)
            return con.fetchval("SELECT 41 + 1")

        pending = await handler_with_a_pending_query()
        await looked_at(pool)
        assert pool.stats().in_use == 1 and pool.stats().leaks_detected == 3
        assert await pending == 42
        del pending
        gc.collect()
        await until(lambda: pool.stats().idle == 1)
        assert pool.stats().leaks_detected == 4

        # The lease that registered its own callback ended too (reclaimed by
        # release_lease()): its callback is a leftover now.
        await _handler_that_forgets(pool)
        gc.collect()
        await until(lambda: pool.stats().idle == 1)
        assert pool.stats().leaks_detected == 5 and _suspects(caplog) == 1


@pytest.mark.parametrize("how", ["closure", "bound method", "partial"])
@pytest.mark.parametrize("kind", ["termination listener", "query logger"])
async def test_a_leftover_callback_that_refers_to_the_connection_keeps_lost_proxies_until_the_lease_timeout(
    pools: Any, kind: str, how: str
) -> None:
    # Its reference to the connection (the closure's cell, the method's
    # self, the partial's keyword argument) cannot be told from one in use (a
    # closure the program also keeps, a query not started yet) without the
    # reference counts of all that lies between: the pool keeps the lost
    # proxy's connection leased, the safe side, and the lease timeout takes
    # it back (release_lease() refuses, as for any connection referred to).
    clock = ManualClock()
    pool = await pools(min_size=1, max_size=1, connection_class=_Registering, lease_timeout=30.0, clock=clock)
    async with pool.acquire(timeout=2) as con:
        con.register(kind, how)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        await _handler_that_forgets(pool)
        await _kept_until_the_lease_timeout(pool, clock)
    async with pool.acquire(timeout=2) as con:
        assert await con.fetchval("SHOW application_name") != "leaky"
