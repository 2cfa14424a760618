"""A fake server connection for tests/io: no database, every statement and
connect completes when the test says so.

``FakeConnection`` implements ``safepool._internals.ServerConnection``. It
subclasses ``asyncpg.Connection`` only because the pool checks what the
connect callback returns against ``connection_class`` (asyncpg's contract);
none of asyncpg's I/O runs: every method the pool, the runner and the
workers call is replaced here or reads the attributes set here.
"""

from __future__ import annotations

import asyncio
from collections import deque
from types import SimpleNamespace
from typing import Any

from asyncpg import connection as _pg_connection


class FakeProtocol:
    """What safepool's adapter reads of asyncpg's protocol."""

    def __init__(self) -> None:
        self.queries_count = 0
        self.backend_pid = 1
        self.backend_secret = 0
        self.in_transaction = False

    def is_in_transaction(self) -> bool:
        return self.in_transaction

    def _is_cancelling(self) -> bool:
        return False

    async def _wait_for_cancellation(self, timeout: float | None) -> None:
        return None


class FakeServer:
    """Pending connects and statements, resolved by the test; what was
    terminated or closed, recorded."""

    def __init__(self) -> None:
        self.connects: deque[asyncio.Future[None]] = deque()
        self.statements: deque[tuple[FakeConnection, str, asyncio.Future[str]]] = deque()
        self.connections: list[FakeConnection] = []
        self.terminated: list[FakeConnection] = []
        self.closed: list[FakeConnection] = []
        self.auto_connect = False

    async def connect(self, *args: Any, loop: Any = None, connection_class: Any = None, **kwargs: Any) -> Any:
        if not self.auto_connect:
            future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self.connects.append(future)
            await future
        con = FakeConnection(self)
        self.connections.append(con)
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
        self._protocol = FakeProtocol()  # type: ignore[assignment]
        self._loop = asyncio.get_running_loop()
        self._top_xact = None
        self._aborted = False
        self._pool_release_ctr = 0
        self._listeners = {}
        self._log_listeners = set()
        self._termination_listeners = set()
        self._query_loggers = set()
        self._proxy = None
        self._pool_holder = None
        self._source_traceback = None
        self._config = SimpleNamespace(command_timeout=None)  # type: ignore[assignment]
        self._reset_query = "RESET ALL"

    async def execute(self, query: str, *args: Any, timeout: float | None = None) -> str:
        if self._closed:
            raise ConnectionError("connection is closed")
        self._protocol.queries_count += 1
        future: asyncio.Future[str] = self._loop.create_future()
        self._server.statements.append((self, query, future))
        return await future

    def is_closed(self) -> bool:
        return self._closed

    def is_in_transaction(self) -> bool:
        return bool(self._protocol.in_transaction)

    def terminate(self) -> None:
        if not self._closed:
            self._closed = True
            self._server.terminated.append(self)

    async def close(self, *, timeout: float | None = None) -> None:
        if not self._closed:
            self._closed = True
            self._server.closed.append(self)

    def __repr__(self) -> str:
        return f"<FakeConnection {id(self):x}{' closed' if self._closed else ''}>"
