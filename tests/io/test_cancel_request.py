"""The pool's cancel request (``_internals.cancel_running_query``): counted
as delivered only when the server closed its connection in order, sent again
when the connection was reset (review s60: a black hole that heals resets
the request it swallowed, and the backend ran on beside the slot's
replacement; the same on a real server: tests/faults/test_review_s60_blackhole.py).

A fake TCP server plays PostgreSQL's side of a cancel request: an SSL
request answered "N" where the connection asks for SSL, then the 16-byte
CancelRequest, then an orderly close ("fin") or a reset ("rst"), or a reset
before the SSL answer ("rst-before-ssl")."""

from __future__ import annotations

import asyncio
import socket
import ssl
import struct
import types
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio

from safepool import _internals

pytestmark = pytest.mark.asyncio

KEY = (4242, 987654321)
SSL_REQUEST = struct.pack("!ll", 8, 80877103)


class CancelServer:
    """Each connection takes the next of ``endings`` (the last repeats)."""

    def __init__(self, endings: list[str]) -> None:
        self.endings = endings
        self.connections = 0
        self.requests: list[tuple[int, int, int, int]] = []
        self.port = 0
        self.server: asyncio.Server | None = None

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        ending = self.endings[min(self.connections, len(self.endings) - 1)]
        self.connections += 1
        try:
            first = await reader.readexactly(8)
            if first == SSL_REQUEST:
                if ending == "rst-before-ssl":
                    self.reset(writer)
                    return
                writer.write(b"N")
                await writer.drain()
                first = await reader.readexactly(8)
            request = first + await reader.readexactly(8)
            self.requests.append(struct.unpack("!llll", request))
            if ending == "rst":
                self.reset(writer)
            else:
                writer.close()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    @staticmethod
    def reset(writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()

    def connection(self, *, ssl_prefer: bool) -> Any:
        """What cancel_running_query reads of a connection: asyncpg's
        ``_loop``, ``_addr`` and ``_params`` (its ``ssl`` and ``sslmode``)."""
        params = types.SimpleNamespace(ssl=None, sslmode=None)
        if ssl_prefer:
            from asyncpg.connect_utils import SSLMode

            context = ssl.create_default_context()
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE  # (as asyncpg's sslmode=prefer: an "N" is then accepted)
            params = types.SimpleNamespace(ssl=context, sslmode=SSLMode.prefer)
        return types.SimpleNamespace(_loop=asyncio.get_running_loop(), _addr=("127.0.0.1", self.port), _params=params)


@pytest_asyncio.fixture
async def serve() -> AsyncIterator[Any]:
    servers: list[asyncio.Server] = []

    async def start(endings: list[str]) -> CancelServer:
        fake = CancelServer(endings)
        server = await asyncio.start_server(fake.handle, "127.0.0.1", 0)
        fake.port = server.sockets[0].getsockname()[1]
        servers.append(server)
        return fake

    yield start
    for server in servers:
        server.close()
        await server.wait_closed()


@pytest.mark.parametrize("ssl_prefer", [False, True], ids=["plain", "ssl-prefer"])
async def test_an_orderly_close_is_one_delivered_request(serve: Any, ssl_prefer: bool) -> None:
    server = await serve(["fin"])
    await _internals.cancel_running_query(server.connection(ssl_prefer=ssl_prefer), KEY)
    assert server.requests == [(16, 80877102, *KEY)]


@pytest.mark.parametrize("ssl_prefer", [False, True], ids=["plain", "ssl-prefer"])
async def test_a_reset_request_is_sent_again_until_one_is_closed_in_order(serve: Any, ssl_prefer: bool) -> None:
    server = await serve(["rst", "rst", "fin"])
    await _internals.cancel_running_query(server.connection(ssl_prefer=ssl_prefer), KEY)
    assert len(server.requests) == 3


async def test_a_server_that_resets_every_request_it_reads_gets_a_bounded_number(serve: Any) -> None:
    # (asyncpg's Connection._cancel allows for servers that reset a request
    # once read: after the retries, the last counts as delivered.)
    server = await serve(["rst"])
    await _internals.cancel_running_query(server.connection(ssl_prefer=False), KEY)
    assert len(server.requests) == _internals.CANCEL_RESET_RETRIES + 1


async def test_a_reset_before_the_request_was_sent_is_retried(serve: Any) -> None:
    server = await serve(["rst-before-ssl", "fin"])
    await _internals.cancel_running_query(server.connection(ssl_prefer=True), KEY)
    assert server.connections == 2
    assert len(server.requests) == 1


async def test_a_request_never_sent_raises_the_reset(serve: Any) -> None:
    server = await serve(["rst-before-ssl"])
    with pytest.raises(ConnectionResetError):
        await _internals.cancel_running_query(server.connection(ssl_prefer=True), KEY)
    assert server.connections == _internals.CANCEL_RESET_RETRIES + 1
    assert server.requests == []
