"""Review h257: a ``connection_class`` whose ``close()`` runs a statement of
its own (an audit ``INSERT``) before asyncpg's close.

Session s76 (``_workers.statement_ended``: ``_once_free(probe=True)``) made
the pool's close of a connection released with a statement in flight stop
waiting for its cancel request once the statement ended by itself: the
request still under way is dropped (its task cancelled). Review h255 pinned
that such a request, delivered late anyway (its bytes already in the
network), names the closed backend only, reasoning that only the close's
Terminate follows it there. A ``close()`` override runs statements on that
same backend before its Terminate, though.

Pinned here, on a real server, with the late request's bytes held in a proxy
(``LateProxy``, review h255's, here in front of the suite's Unix socket:
the pool really wrote them; the proxy plays a slow network):

- (a) safepool, the request held in the network (by the test, and, with no
  choreography, by a fixed 0.45 s delay on new connections): before the
  fix the close dropped it once the statement ended and called the
  override, whose ``INSERT`` the late request then cancelled (the audit row
  lost; ``QueryCanceledError`` from the release on 0.32, nothing at all on
  0.29-0.31). Now the close of a class with a ``close()`` of its own waits
  for the request under way, as asyncpg's protocol does for its own: the
  ``INSERT`` does not start while the request is held, and lands once it
  was delivered. A request that never gets through then holds the close
  until the release's budget (``TimeoutError``, the connection aborted,
  the override not called: asyncpg's pool times out alike on its own
  stalled request, review h249). The same class with the request answered
  in time: the ``INSERT`` lands.
- (b) asyncpg's pool on the same scenario sends no request: its release
  closes at once with the call still in flight, and the override's
  ``INSERT`` is refused by the protocol ("another operation is in
  progress") before anything is sent: the write is lost there too, another
  way. asyncpg's own cancel request, slow alike, is awaited before the
  override's ``INSERT`` is sent (its protocol's cancellation wait), which
  then lands: the rule the probe gives up.
- (c) where each pool calls the class's ``close()`` (``max_queries``,
  ``expire_connections()`` with the connection leased and idle,
  ``Pool.close()``, ``max_inactive_connection_lifetime``, ``terminate()``),
  and that its ``INSERT`` lands there. A divergence pinned: an expired idle
  connection is closed at ``expire_connections()`` on safepool, at the next
  acquire on asyncpg's (documented). Past ``max_inactive_connection_lifetime``
  both pools call the class's ``terminate()``, not its ``close()`` (safepool
  called ``close()`` there before this review).

Passes on asyncpg 0.29, 0.30, 0.31, 0.32 (and ``--loop uvloop``).

Every wait is bounded (``asyncio.timeout`` / ``wait_for``)."""

from __future__ import annotations

import asyncio
import contextlib
import struct
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

import safepool
from safepool import _internals
from tests._util import in_pg_sleep_on, outcome_of, relay_to_unix, until, watched_class

pytestmark = pytest.mark.asyncio

CLOSE_SLEEP = 0.3  # (the override's INSERT takes this long on the server: a late request can meet it)
# "delayed": the request, written when the release begins, reaches the
# server this long after; the lease's statement (0.3 s) has ended by itself
# by then and the override's INSERT (DELAYED_CLOSE_SLEEP) runs: 0.15 s
# after the statement's end, 0.85 s before the INSERT's.
DELAY = 0.45
DELAYED_CLOSE_SLEEP = 1.0  # (there the INSERT outlasts a late delivery by 0.85 s)
# "late": how long the test holds the request after the statement ended,
# looking for the override's INSERT to start meanwhile (it began within
# milliseconds of the statement's end before the fix): a window for an
# absence, not a synchronisation.
HOLD_WINDOW = 0.5
NEVER_BUDGET = 1.0  # (the release's timeout= where the request never arrives)
CANCEL_REQUEST_CODE = 80877102


def audit_close_class(table: str, sleep: float = CLOSE_SLEEP) -> Any:
    """A ``connection_class`` whose ``close()`` first inserts its backend's
    pid into ``table`` (taking ``sleep`` seconds on the server), then closes
    as asyncpg's. ``Cls.calls``: one dict per ``close()`` called (pid, a
    call in flight when it began, the INSERT's error if any); ``Cls.ended``
    is set after each."""

    class AuditClose(asyncpg.Connection):  # type: ignore[misc]
        calls: list[dict[str, Any]] = []
        ended = asyncio.Event()

        async def close(self, *, timeout: float | None = None) -> None:
            pid = self.get_server_pid()
            call: dict[str, Any] = {"pid": pid, "in_flight": _internals.statement_in_flight(self)}
            type(self).calls.append(call)
            try:
                await self.execute(f"INSERT INTO {table} (pid) SELECT {int(pid)} FROM pg_sleep({sleep})")
            except BaseException as error:
                call["error"] = error
                type(self).ended.set()
                raise
            type(self).ended.set()
            await super().close(timeout=timeout)

    AuditClose.calls = []
    AuditClose.ended = asyncio.Event()
    return AuditClose


@contextlib.asynccontextmanager
async def audit_table(pg_dsn: str, app_name: str) -> AsyncIterator[tuple[str, Any]]:
    """A fresh table ``(pid int)`` and an admin connection (not through any
    proxy) that reads it; dropped after."""
    table = f"h257_audit_{app_name.replace('-', '_')}"
    admin = await asyncpg.connect(pg_dsn)
    await admin.execute(f"CREATE TABLE {table} (pid int)")
    try:
        yield table, admin
    finally:
        await admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1", app_name
        )
        await admin.execute(f"DROP TABLE IF EXISTS {table}")
        await admin.close()


async def audited(admin: Any, table: str) -> list[int]:
    return [r["pid"] for r in await admin.fetch(f"SELECT pid FROM {table} ORDER BY pid")]


class LateProxy:
    """TCP in front of the test server's Unix socket (review h255's
    LateProxy, on this suite's server). While ``hold`` is set a new
    connection's bytes are read and kept (``held``), nothing relayed:
    a network slow to deliver them; :meth:`deliver` sends them to the server
    later, on a connection of its own, and waits until the server closes it
    (it has read the request)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.hold = False
        self.latency: float | None = None
        self.held: list[bytearray] = []
        self.clients: list[asyncio.StreamWriter] = []  # (the held connections' client ends)
        self.delivered = asyncio.Event()
        self.port = 0
        self.tasks: set[asyncio.Task[Any]] = set()
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> LateProxy:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self.tasks):
            task.cancel()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.tasks.add(asyncio.current_task())  # type: ignore[arg-type]
        try:
            if self.hold:
                data = bytearray()
                self.held.append(data)
                self.clients.append(writer)
                if self.latency is not None:
                    later = asyncio.ensure_future(self._deliver_later(data, self.latency, writer))
                    self.tasks.add(later)
                while chunk := await reader.read(65536):
                    data += chunk
                return
            await relay_to_unix(reader, writer, self.path)
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            self.tasks.discard(asyncio.current_task())  # type: ignore[arg-type]
            writer.transport.abort()

    async def deliver(self) -> None:
        """Send what was held, then close the held connections, as the
        server closes a cancel request's once it has read it."""
        for data in self.held:
            await self._send(data)
        for client in self.clients:
            client.close()

    async def _deliver_later(self, data: bytearray, latency: float, client: asyncio.StreamWriter) -> None:
        """What a connection held wrote within ``latency`` seconds, sent then
        (a slow network: a client that gave up meanwhile does not recall the
        bytes it wrote); the client's connection is then closed, as the
        server closes a cancel request's once it has read it."""
        await asyncio.sleep(latency)  # (the network's delay: the scenario, not a synchronisation)
        await self._send(data)
        client.close()
        self.delivered.set()

    async def _send(self, data: bytearray) -> None:
        up_reader, up = await asyncio.open_unix_connection(self.path)
        up.write(bytes(data))
        await up.drain()
        with contextlib.suppress(OSError):
            while await up_reader.read(65536):
                pass
        up.close()


async def in_close_insert(admin: Any, pid: int, timeout: float = 10.0) -> None:
    """Until backend ``pid`` runs the override's INSERT (in its pg_sleep)."""
    async with asyncio.timeout(timeout):
        while not await admin.fetchval(
            "SELECT query LIKE 'INSERT%' AND wait_event = 'PgSleep' FROM pg_stat_activity WHERE pid = $1", pid
        ):
            await asyncio.sleep(0.005)


async def _released_with_late_request(
    create: Any, pg_dsn: str, app_name: str, mode: str, **options: Any
) -> dict[str, Any]:
    """A max_size=1 pool (``create``) through a LateProxy, its connection of
    class AuditClose; a lease's statement (0.3 s) runs in another task when
    the lease is released after ``expire_connections()`` (the release
    closes). ``mode``:

    - ``"late"``: the pool's cancel request is held in the proxy, the
      statement ends by itself; the held bytes are delivered once the
      override's INSERT runs on the server, or after HOLD_WINDOW seconds
      if it does not (``insert_while_held`` says which);
    - ``"never"``: held and never delivered;
    - ``"delayed"``: every byte of the request reaches the server DELAY
      seconds after it was written (a slow new connection: h249's
      DelayingProxy's kind), nothing else choreographed;
    - ``"on_time"``: not held (the server cancels the statement).

    Returns what happened: the call's and the release's outcomes, the
    class's close() calls, the audit rows, the old pid, and whether a
    request was held. ``options``: create()'s own."""
    async with audit_table(pg_dsn, app_name) as (table, admin), LateProxy(str(admin._addr)) as proxy:
        cls = audit_close_class(table, DELAYED_CLOSE_SLEEP if mode == "delayed" else CLOSE_SLEEP)
        pool = await create(
            pg_dsn, host="127.0.0.1", port=proxy.port, ssl=False, min_size=0, max_size=1, connection_class=cls,
            server_settings={"application_name": app_name}, **options,
        )
        insert_while_held = None
        try:
            con = await pool.acquire()
            pid = con.get_server_pid()
            call = asyncio.ensure_future(con.fetchval("SELECT 'done' FROM pg_sleep(0.3)"))
            await in_pg_sleep_on(admin, pid, call=call)
            proxy.hold = mode in ("late", "never", "delayed")
            if mode == "delayed":
                proxy.latency = DELAY
            await pool.expire_connections()
            budget = NEVER_BUDGET if mode == "never" else 5
            release = asyncio.ensure_future(outcome_of(pool.release(con, timeout=budget), 10))
            outcome = await outcome_of(call, 10)
            if mode == "late" and proxy.held:
                # The request is in the network. Deliver it once the
                # override's INSERT runs, or once HOLD_WINDOW passed without.
                inserting = asyncio.ensure_future(in_close_insert(admin, pid))
                await asyncio.wait([inserting, release], timeout=HOLD_WINDOW, return_when=asyncio.FIRST_COMPLETED)
                insert_while_held = inserting.done() and not inserting.cancelled() and inserting.exception() is None
                inserting.cancel()
                await asyncio.gather(inserting, return_exceptions=True)
                proxy.hold = False
                await asyncio.wait_for(proxy.deliver(), 10)
            released = await release
            if mode == "delayed" and proxy.held:
                await asyncio.wait_for(proxy.delivered.wait(), 10)
            if cls.calls:
                await asyncio.wait_for(cls.ended.wait(), 10)
            held = len(proxy.held)
            proxy.hold = False
            rows = await audited(admin, table)
        finally:
            pool.terminate()
    return {
        "call": outcome, "release": released, "calls": cls.calls, "rows": rows, "pid": pid, "held": held,
        "insert_while_held": insert_while_held,
        "requests": [struct.unpack("!lll", bytes(data[:12])) for data in proxy.held if len(data) >= 12],
    }


async def test_safepool_late_request_spares_the_close_statement(pg_dsn: str, app_name: str) -> None:
    seen = await _released_with_late_request(safepool.create_pool, pg_dsn, app_name, "late")
    assert seen["held"] == 1, seen  # (the pool's request was written, and held in the network)
    assert seen["requests"] == [(16, CANCEL_REQUEST_CODE, seen["pid"])], seen  # (the pool's, for that backend)
    assert seen["call"] == "done", seen  # (the statement ended by itself)
    assert seen["insert_while_held"] is False, seen  # (before the fix: True, and then cancelled)
    assert len(seen["calls"]) == 1 and not seen["calls"][0]["in_flight"], seen
    assert "error" not in seen["calls"][0], seen
    assert seen["rows"] == [seen["pid"]], seen
    assert seen["release"] is None, seen


async def test_safepool_slow_request_spares_the_close_statement(pg_dsn: str, app_name: str) -> None:
    seen = await _released_with_late_request(safepool.create_pool, pg_dsn, app_name, "delayed")
    assert seen["held"] == 1 and seen["call"] == "done", seen
    [call] = seen["calls"]
    assert not call["in_flight"], seen
    assert "error" not in call, seen  # (before the fix: QueryCanceledError)
    assert seen["rows"] == [seen["pid"]], seen
    assert seen["release"] is None, seen


async def test_safepool_request_never_delivered(pg_dsn: str, app_name: str) -> None:
    """A request that never gets through holds the close of a class with a
    close() of its own until the release's budget: then the connection is
    aborted and the override is not called (no statement of its own that a
    request still in the network could cancel), and the release raises
    ``TimeoutError``. On every asyncpg: a class's own close() gets the
    release's budget on 0.29-0.31 too, as from asyncpg's release (helper
    h279; before, the close kept the pool's own bound there,
    ``_internals.CLOSE_UNDER_BUDGET``, and the release did not raise)."""
    seen = await _released_with_late_request(
        safepool.create_pool, pg_dsn, app_name, "never", reset_timeout=NEVER_BUDGET
    )
    assert seen["held"] == 1 and seen["call"] == "done", seen
    assert seen["calls"] == [] and seen["rows"] == [], seen
    assert isinstance(seen["release"], TimeoutError), seen


async def test_without_a_close_of_its_own_the_request_is_dropped(pg_dsn: str, app_name: str) -> None:
    """asyncpg's own close() sends only Terminate after the statement ended:
    the request still under way is dropped there (review h249's stalled
    request: the release returns within its budget, at the statement's end)."""
    async with audit_table(pg_dsn, app_name) as (_, admin), LateProxy(str(admin._addr)) as proxy:
        pool = await safepool.create_pool(
            pg_dsn, host="127.0.0.1", port=proxy.port, ssl=False, min_size=0, max_size=1,
            server_settings={"application_name": app_name},
        )
        try:
            con = await pool.acquire()
            pid = con.get_server_pid()
            call = asyncio.ensure_future(con.fetchval("SELECT 'done' FROM pg_sleep(0.3)"))
            await in_pg_sleep_on(admin, pid, call=call)
            proxy.hold = True
            await pool.expire_connections()
            released = await outcome_of(pool.release(con, timeout=5), 3)
            assert await outcome_of(call, 1) == "done"
            assert released is None
            assert len(proxy.held) == 1
        finally:
            pool.terminate()


async def test_safepool_request_on_time(pg_dsn: str, app_name: str) -> None:
    seen = await _released_with_late_request(safepool.create_pool, pg_dsn, app_name, "on_time")
    assert seen["held"] == 0, seen
    assert seen["call"] == "done" or isinstance(seen["call"], asyncpg.QueryCanceledError), seen
    [call] = seen["calls"]
    assert not call["in_flight"] and "error" not in call, seen
    assert seen["rows"] == [seen["pid"]], seen
    assert seen["release"] is None, seen


@pytest.mark.parametrize("mode", ["late", "on_time"])
async def test_asyncpg_pool_same_scenario(pg_dsn: str, app_name: str, mode: str) -> None:
    """asyncpg's pool sends no cancel request of its own here: its release
    (expired generation) calls close() at once, with the call in flight, and
    the override's execute() is refused by the protocol before anything is
    sent. The INSERT never runs; the release raises that error."""
    seen = await _released_with_late_request(asyncpg.create_pool, pg_dsn, app_name, mode)
    assert seen["held"] == 0, seen  # (no request: nothing for the proxy to hold)
    [call] = seen["calls"]
    assert call["in_flight"], seen
    assert isinstance(call.get("error"), asyncpg.InterfaceError), seen
    assert "another operation is in progress" in str(call["error"]), seen
    assert seen["rows"] == [], seen
    assert isinstance(seen["release"], asyncpg.InterfaceError), seen


# (c) Where each pool calls the class's close(), no statement in flight.
PATHS = ["max_queries", "expire_leased", "expire_idle", "pool_close", "inactive", "terminate"]


async def _close_calls(create: Any, pg_dsn: str, app_name: str, path: str) -> dict[str, Any]:
    """A max_size=1 pool of AuditClose (an instant INSERT); one lease runs
    ``SELECT 1`` and is released, then ``path``. Returns the close() calls
    seen right after the step that should make one (``at_step``), all of
    them at the end, the audit rows, the lease's pid."""
    async with audit_table(pg_dsn, app_name) as (table, admin):
        cls = audit_close_class(table, sleep=0)
        options: dict[str, Any] = {}
        if path == "max_queries":
            options["max_queries"] = 1
        elif path == "inactive":
            options["max_inactive_connection_lifetime"] = 0.1
        pool = await create(
            pg_dsn, min_size=0, max_size=1, connection_class=cls, server_settings={"application_name": app_name},
            **options,
        )
        try:
            con = await pool.acquire()
            pid = con.get_server_pid()
            await con.fetchval("SELECT 1")
            if path == "expire_leased":
                await pool.expire_connections()
            await asyncio.wait_for(pool.release(con), 10)
            at_step: list[int] = [c["pid"] for c in cls.calls]
            if path == "expire_idle":
                await pool.expire_connections()
                if create is safepool.create_pool:
                    # (safepool closes an expired idle connection now, in its
                    # task: docs/migration.md.)
                    await asyncio.wait_for(cls.ended.wait(), 10)
                else:
                    for _ in range(5):
                        await asyncio.sleep(0)
                at_step = [c["pid"] for c in cls.calls]
                async with pool.acquire(timeout=10) as again:  # (asyncpg's pool replaces it here)
                    assert again.get_server_pid() != pid
            elif path == "pool_close":
                await asyncio.wait_for(pool.close(), 10)
                at_step = [c["pid"] for c in cls.calls]
            elif path == "inactive":
                await until(lambda: pool.get_size() == 0)
                at_step = [c["pid"] for c in cls.calls]
            elif path == "terminate":
                pool.terminate()
                at_step = [c["pid"] for c in cls.calls]
            if cls.calls:
                await asyncio.wait_for(cls.ended.wait(), 10)
            errors = [c["error"] for c in cls.calls if "error" in c]
            rows = await audited(admin, table)
        finally:
            pool.terminate()
    return {"at_step": at_step, "calls": [c["pid"] for c in cls.calls], "errors": errors, "rows": rows, "pid": pid}


def _expected(flavour: str, path: str) -> tuple[bool, bool]:
    """(close() called right at the path's step, called at all)."""
    if path == "terminate":
        return False, False  # (both pools abort: no close())
    if path == "inactive":
        # (asyncpg's pool terminates an idle connection past its lifetime,
        # never calling close(); so does safepool for a class with a close()
        # or terminate() of its own: Runner.close_slot. Before, safepool
        # closed it, and the class's close() ran there on safepool only.)
        return False, False
    if path == "expire_idle" and flavour == "asyncpg":
        return False, True  # (kept open until an acquire picks it, which closes it in a task)
    return True, True


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("flavour", ["asyncpg", "safepool"])
async def test_where_close_is_called(pg_dsn: str, app_name: str, flavour: str, path: str) -> None:
    create = asyncpg.create_pool if flavour == "asyncpg" else safepool.create_pool
    seen = await _close_calls(create, pg_dsn, app_name, path)
    at_step, at_all = _expected(flavour, path)
    pid = seen["pid"]
    assert seen["errors"] == [], seen
    assert seen["at_step"] == ([pid] if at_step else []), seen
    assert seen["calls"] == ([pid] if at_all else []), seen
    assert seen["rows"] == ([pid] if at_all else []), seen


async def test_asyncpg_own_cancel_request_is_awaited_before_the_close_statement(pg_dsn: str, app_name: str) -> None:
    """The rule safepool's probe gives up, on asyncpg's own: a statement
    cancelled in its task (asyncpg's request, DELAY s slow, the statement
    ending by itself first), then the class's close() called at once: its
    INSERT waits until asyncpg's request was delivered (the protocol awaits
    its cancellation before the next statement), so the request meets an
    idle backend and the INSERT lands."""
    async with audit_table(pg_dsn, app_name) as (table, admin), LateProxy(str(admin._addr)) as proxy:
        cls = audit_close_class(table)
        con = await asyncpg.connect(
            pg_dsn, host="127.0.0.1", port=proxy.port, ssl=False, connection_class=cls,
            server_settings={"application_name": app_name},
        )
        try:
            pid = con.get_server_pid()
            call = asyncio.ensure_future(con.fetchval("SELECT 'done' FROM pg_sleep(0.3)"))
            await in_pg_sleep_on(admin, pid, call=call)
            proxy.hold, proxy.latency = True, DELAY
            call.cancel()  # asyncpg sends its cancel request: DELAY s on its way
            with pytest.raises(asyncio.CancelledError):
                await call
            closing = asyncio.ensure_future(con.close(timeout=10))
            await asyncio.wait_for(proxy.delivered.wait(), 10)
            # (close() was called; its INSERT waited for the request)
            assert len(cls.calls) == 1 and not cls.ended.is_set(), cls.calls
            assert struct.unpack("!lll", bytes(proxy.held[0][:12])) == (16, CANCEL_REQUEST_CODE, pid)
            await asyncio.wait_for(closing, 10)
            assert [len(proxy.held), cls.calls[0]["pid"]] == [1, pid], cls.calls
            assert "error" not in cls.calls[0], cls.calls
            assert await audited(admin, table) == [pid]
        finally:
            con.terminate()


@pytest.mark.parametrize("flavour", ["asyncpg", "safepool"])
async def test_inactive_lifetime_calls_the_class_terminate(pg_dsn: str, app_name: str, flavour: str) -> None:
    """Past ``max_inactive_connection_lifetime`` both pools call the class's
    ``terminate()`` (asyncpg's ``_deactivate_inactive_connection``), once,
    and never its ``close()``; the backend is gone afterwards."""
    terminated: list[int] = []
    closed: list[int] = []
    Watched = watched_class(closed, terminated, close=True, terminate=True)

    create = asyncpg.create_pool if flavour == "asyncpg" else safepool.create_pool
    admin = await asyncpg.connect(pg_dsn)
    pool = await create(
        pg_dsn, min_size=0, max_size=1, connection_class=Watched, max_inactive_connection_lifetime=0.1,
        server_settings={"application_name": app_name},
    )
    try:
        async with pool.acquire() as con:
            pid = con.get_server_pid()
        async with asyncio.timeout(10):
            await until(lambda: terminated != [])
            while await admin.fetchval("SELECT count(*) FROM pg_stat_activity WHERE pid = $1", pid):
                await asyncio.sleep(0.01)
        assert terminated == [pid]
        assert closed == []
    finally:
        pool.terminate()
        await admin.close()
