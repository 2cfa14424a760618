"""A fake server connection for tests/io: no database, every statement and
connect completes when the test says so.

``FakeConnection`` implements ``safepool._internals.ServerConnection``. It
subclasses ``asyncpg.Connection`` only because the pool checks what the
connect callback returns against ``connection_class`` (asyncpg's contract);
none of asyncpg's I/O runs: every method the pool, the runner and the
workers call is replaced here or reads the attributes set here.

Two modes. By default (``FakeServer()``) connects and statements wait until
the test finishes them (``finish_connect``, ``finish_statement``).
``FakeServer(suspending=True)`` answers on its own, one loop iteration
later, and behaves as asyncpg 0.32 does where the pool can tell: a
cancelled statement leaves the protocol cancelling until the server
acknowledges it (one more iteration; ``_wait_for_cancellation`` waits for
it, the next statement too), a second statement while one runs is refused
("another operation is in progress"), ``BEGIN``/``COMMIT``/``ROLLBACK`` move
the transaction state, ``close()`` takes an iteration (cancelled: the
connection is aborted), a connection that ends tells its pool holder
(``_release_on_close``) and fails its running statement. Every await it
makes is a suspension point reported to ``on_suspend(label)`` before the
answer is scheduled (tests/io/test_sweep.py cancels there), and it counts
the backends: ``peak_open`` (connections open at once) and ``peak_backends``
(open or being opened).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

from asyncpg import connection as _pg_connection
from asyncpg import exceptions as _pg_exceptions


class FakeProtocol:
    """What safepool's adapter reads of asyncpg's protocol."""

    def __init__(self, server: FakeServer | None = None) -> None:
        self.queries_count = 0
        self.backend_pid = 1
        self.backend_secret = 0
        self.in_transaction = False
        self._server = server
        # Suspending mode: the running statement's future, and the server's
        # acknowledgement of a cancelled one (asyncpg's cancel_waiter).
        self.waiter: asyncio.Future[str] | None = None
        self.cancel_waiter: asyncio.Future[None] | None = None

    def is_in_transaction(self) -> bool:
        return self.in_transaction

    def _is_cancelling(self) -> bool:
        return self.cancel_waiter is not None

    async def _wait_for_cancellation(self, timeout: float | None = None) -> float | None:
        if self.cancel_waiter is None:
            return timeout
        assert self._server is not None
        self._server.suspend("wait for cancel")
        await asyncio.shield(self.cancel_waiter)  # asyncpg 0.32 shields it too
        return timeout

    def request_cancel(self, loop: asyncio.AbstractEventLoop) -> None:
        """A running statement's waiter was cancelled: the server
        acknowledges the cancel request one iteration later."""
        if self.cancel_waiter is not None:
            return
        ack: asyncio.Future[None] = loop.create_future()
        self.cancel_waiter = ack
        loop.call_soon(self.complete_cancel, ack)

    def complete_cancel(self, ack: asyncio.Future[None] | None = None) -> None:
        waiter = self.cancel_waiter
        if waiter is None or (ack is not None and waiter is not ack):
            return
        self.cancel_waiter = None
        if not waiter.done():
            waiter.set_result(None)


class FakeServer:
    """Pending connects and statements, resolved by the test; what was
    terminated or closed, recorded."""

    def __init__(self, *, suspending: bool = False) -> None:
        self.connects: deque[asyncio.Future[None]] = deque()
        self.statements: deque[tuple[FakeConnection, str, asyncio.Future[str]]] = deque()
        self.connections: list[FakeConnection] = []
        self.terminated: list[FakeConnection] = []
        self.closed: list[FakeConnection] = []
        self.auto_connect = False
        self.suspending = suspending
        # Suspending mode: called with a label at every suspension point,
        # before its answer is scheduled.
        self.on_suspend: Callable[[str], None] | None = None
        self.statements_run: list[str] = []
        self.connecting = 0
        self.peak_open = 0
        self.peak_backends = 0
        # What is in flight (connects, statements, closes, cancel requests):
        # the suspending server is quiet when this is empty.
        self.in_flight: set[asyncio.Future[Any]] = set()

    async def connect(self, *args: Any, loop: Any = None, connection_class: Any = None, **kwargs: Any) -> Any:
        if self.suspending:
            return await self._connect_suspending()
        if not self.auto_connect:
            future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self.connects.append(future)
            await future
        con = FakeConnection(self)
        self.connections.append(con)
        return con

    # ------------------------------------------------------ suspending mode

    def suspend(self, label: str) -> None:
        """A suspension point: tell the test (which may cancel a task now)."""
        if self.on_suspend is not None:
            self.on_suspend(label)

    def answer_soon(self, future: asyncio.Future[Any], callback: Callable[[], None]) -> None:
        """Run ``callback`` one iteration from now unless ``future`` was
        resolved (cancelled) meanwhile."""
        self.in_flight.add(future)
        future.add_done_callback(self.in_flight.discard)

        def answer() -> None:
            if not future.done():
                callback()

        asyncio.get_running_loop().call_soon(answer)

    def open_count(self) -> int:
        return sum(1 for con in self.connections if not con.is_closed())

    def note_peak(self) -> None:
        open_now = self.open_count()
        self.peak_open = max(self.peak_open, open_now)
        self.peak_backends = max(self.peak_backends, open_now + self.connecting)

    def busy(self) -> bool:
        """Anything in flight: a connect, statement, close or cancel request."""
        return bool(self.in_flight) or any(con._protocol.cancel_waiter is not None for con in self.open())

    async def _connect_suspending(self) -> FakeConnection:
        self.connecting += 1
        self.note_peak()
        try:
            future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self.suspend("connect")
            self.answer_soon(future, lambda: future.set_result(None))
            await future
        finally:
            self.connecting -= 1
        con = FakeConnection(self)
        self.connections.append(con)
        self.note_peak()
        return con

    def finish_connect(self, error: BaseException | None = None) -> None:
        future = self.connects.popleft()
        if error is None:
            future.set_result(None)
        else:
            future.set_exception(error)

    def finish_statement(self, error: BaseException | None = None) -> str:
        con, query, future = self.statements.popleft()
        if not future.done():
            if error is None:
                future.set_result("OK")
            else:
                future.set_exception(error)
        return query

    def open(self) -> list[FakeConnection]:
        return [con for con in self.connections if not con.is_closed()]


class FakeConnection(_pg_connection.Connection):
    """An in-memory ServerConnection."""

    def __init__(self, server: FakeServer) -> None:  # no super(): no socket, no protocol
        self._server = server
        self._closed = False
        self._closing: asyncio.Future[None] | None = None
        self._protocol = FakeProtocol(server)  # type: ignore[assignment]
        self._loop = asyncio.get_running_loop()
        self._top_xact = None
        self._aborted = False
        self._pool_release_ctr = 0
        self._listeners = {}
        self._log_listeners = set()
        self._termination_listeners = set()
        self._query_loggers = set()
        self._stmt_exclusive_section = _pg_connection._Atomic()  # (no call ever holds it)
        self._proxy = None
        self._pool_holder = None
        self._source_traceback = None
        self._config = SimpleNamespace(command_timeout=None)  # type: ignore[assignment]
        self._reset_query = "RESET ALL"

    async def execute(self, query: str, *args: Any, timeout: float | None = None) -> str:
        if self._server.suspending:
            return await self._execute_suspending(query)
        if self._closed:
            raise ConnectionError("connection is closed")
        self._protocol.queries_count += 1
        future: asyncio.Future[str] = self._loop.create_future()
        self._server.statements.append((self, query, future))
        return await future

    async def _execute_suspending(self, query: str) -> str:
        """asyncpg 0.32's simple query: wait for a cancelled one first,
        refuse a second operation, count the statement, await the answer."""
        protocol = self._protocol
        if self._closed:
            raise _pg_exceptions.InterfaceError("cannot perform operation: connection is closed")
        await protocol._wait_for_cancellation(None)
        if self._closed:
            raise _pg_exceptions.InterfaceError("cannot perform operation: connection is closed")
        if protocol.waiter is not None:
            raise _pg_exceptions.InterfaceError("cannot perform operation: another operation is in progress")
        protocol.queries_count += 1
        waiter: asyncio.Future[str] = self._loop.create_future()
        protocol.waiter = waiter

        def finished(future: asyncio.Future[str]) -> None:
            if protocol.waiter is future:
                protocol.waiter = None
            if future.cancelled() and not self._closed:
                protocol.request_cancel(self._loop)  # asyncpg's _on_waiter_completed

        def run() -> None:
            self._server.statements_run.append(query)
            verb = query.lstrip().split(None, 1)[0].rstrip(";").upper() if query.strip() else ""
            if verb in ("BEGIN", "START"):
                protocol.in_transaction = True
            elif verb in ("COMMIT", "ROLLBACK", "END", "ABORT"):
                protocol.in_transaction = False
            waiter.set_result(verb or "EMPTY")

        waiter.add_done_callback(finished)
        self._server.suspend(f"execute {query.splitlines()[0]}")
        self._server.answer_soon(waiter, run)
        return await waiter

    def is_closed(self) -> bool:
        return self._closed

    def is_in_transaction(self) -> bool:
        return bool(self._protocol.in_transaction)

    def terminate(self) -> None:
        self._aborted = True  # (as asyncpg's _abort(): safepool's terminate() reads it on asyncpg < 0.32)
        if not self._closed:
            self._closed = True
            self._server.terminated.append(self)
            if self._server.suspending:
                self._connection_ended()

    async def close(self, *, timeout: float | None = None) -> None:
        if self._server.suspending:
            await self._close_suspending()
            return
        if not self._closed:
            self._closed = True
            self._server.closed.append(self)

    async def _close_suspending(self) -> None:
        """asyncpg's close: the server ends the session an iteration later;
        cancelled (or failed), the connection is aborted."""
        if self._closed:
            return
        if self._closing is None:
            closing: asyncio.Future[None] = self._loop.create_future()
            self._closing = closing
            self._server.suspend("close")

            def closed() -> None:
                if not self._closed:
                    self._closed = True
                    self._server.closed.append(self)
                    self._connection_ended()  # resolves closing
                if not closing.done():
                    closing.set_result(None)

            self._server.answer_soon(closing, closed)
        try:
            await asyncio.shield(self._closing)
        except BaseException:
            self.terminate()
            raise

    def _connection_ended(self) -> None:
        """What asyncpg does when a connection ends: fail the running
        statement, complete the cancel waiters, tell the pool holder."""
        protocol = self._protocol
        waiter, protocol.waiter = protocol.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(
                _pg_exceptions.ConnectionDoesNotExistError("connection was closed in the middle of operation")
            )
        protocol.complete_cancel()
        if self._closing is not None and not self._closing.done():
            self._closing.set_result(None)
        ref, self._pool_holder = self._pool_holder, None
        holder = ref() if ref is not None else None
        if holder is not None and holder._con is self:
            holder._release_on_close()

    def __repr__(self) -> str:
        return f"<FakeConnection {id(self):x}{' closed' if self._closed else ''}>"
