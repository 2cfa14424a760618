"""Review h255: a cancel request the close dropped (``_once_free(probe=True)``)
that reaches the server late anyway.

The pool's request for a released lease's statement is sent, and its bytes
are held in the network (a proxy that reads them and relays them only
later); the statement ends by itself, the close's empty query is accepted,
and the close drops the request (cancels its task) and closes. The held
bytes then reach the server while the slot's next lease runs a statement
on its new connection. Pinned: the request names the closed connection's
backend only (its pid), the close did not wait for it, the first
statement's result reached its caller, and the next lease's statement is
not cancelled by it."""

from __future__ import annotations

import asyncio
import contextlib
import struct
import time

import pytest

import safepool
from tests._util import until_in_pg_sleep

from ._pg import Cluster
from ._proxy import FaultProxy

pytestmark = [pytest.mark.asyncio]


_SSL_REQUEST = struct.pack("!ll", 8, 80877103)


class LateProxy(FaultProxy):
    """While ``hold`` is set, a new connection's bytes are read and kept
    (``held``), nothing relayed (an SSL request is declined first, as the
    server would); :meth:`deliver` sends them to the server
    later, on a connection of its own, and waits until the server closes
    it."""

    def __init__(self, upstream_port: int) -> None:
        super().__init__(upstream_port)
        self.hold = False
        self.held: list[bytearray] = []
        self.closed_by_client = asyncio.Event()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self.hold:
            await super()._handle(reader, writer)
            return
        data = bytearray()
        self.held.append(data)
        with contextlib.suppress(OSError, asyncio.CancelledError):
            while chunk := await reader.read(65536):
                data += chunk
                if bytes(data[:8]) == _SSL_REQUEST:
                    del data[:8]
                    writer.write(b"N")  # (no TLS: the request's bytes come next, in the clear)
        self.closed_by_client.set()
        writer.transport.abort()

    async def deliver(self) -> None:
        for data in self.held:
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
            up_writer.write(bytes(data))
            await up_writer.drain()
            with contextlib.suppress(OSError):
                while await up_reader.read(65536):
                    pass
            up_writer.close()


async def test_a_dropped_request_arriving_late_cancels_nothing_of_the_next_lease(
    running: Cluster, app_name: str
) -> None:
    async with LateProxy(running.port) as proxy:
        pool = await safepool.create_pool(
            running.dsn(port=proxy.port), min_size=0, max_size=1, server_settings={"application_name": app_name}
        )
        try:
            con = await pool.acquire()
            old_pid = con.get_server_pid()
            call = asyncio.ensure_future(con.fetchval("SELECT 'done' FROM pg_sleep(0.3)"))
            await until_in_pg_sleep(running.admin_dsn, old_pid)
            proxy.hold = True
            await pool.expire_connections()
            started = time.monotonic()
            await asyncio.wait_for(pool.release(con, timeout=5), 10)
            took = time.monotonic() - started
            assert await asyncio.wait_for(call, 10) == "done"
            assert took < 2.0, took  # (the statement's 0.3 s, not the budget)
            await asyncio.wait_for(proxy.closed_by_client.wait(), 5)  # the request was dropped
            assert len(proxy.held) == 1
            length, code, pid, _secret = struct.unpack("!llll", bytes(proxy.held[0][:16]))
            assert (length, code, pid) == (16, 80877102, old_pid)
            proxy.hold = False

            async with pool.acquire() as next_lease:
                new_pid = next_lease.get_server_pid()
                assert new_pid != old_pid
                work = asyncio.ensure_future(next_lease.fetchval("SELECT 'next' FROM pg_sleep(0.5)"))
                await until_in_pg_sleep(running.admin_dsn, new_pid)
                await proxy.deliver()  # the late request reaches the server now
                assert await asyncio.wait_for(work, 10) == "next"
        finally:
            pool.terminate()
