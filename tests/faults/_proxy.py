"""A loopback TCP proxy that injects network faults between a pool and its
server: added latency, a black hole (accepts, never answers), and resets.

It runs on the test's event loop. Modes apply to every connection at once:

* ``latency``: each chunk is held this long before it is forwarded, in both
  directions (a round trip costs twice that);
* ``blackhole``: new connections are accepted and never answered; the data
  of existing ones is swallowed (their byte stream is then unusable, so
  ``heal()`` resets them);
* ``partition``: a black hole the server never learns about, as in a network
  cut: no FIN or RST reaches it when the client gives a connection up, so
  its backend lives on (until ``close()``);
* ``reset_all()``: abort every connection with a TCP RST now (mid-query if a
  query is running).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import AsyncIterator


async def swallow(reader: asyncio.StreamReader) -> None:
    """Read and drop what the client sends until it closes (a connection
    accepted and never answered: a stalled cancel request)."""
    with contextlib.suppress(OSError, asyncio.CancelledError):
        while await reader.read(65536):
            pass


class _Pair:
    def __init__(self, client: asyncio.StreamWriter) -> None:
        self.client = client
        self.upstream: asyncio.StreamWriter | None = None
        self.tasks: list[asyncio.Task[None]] = []
        self.tainted = False  # swallowed data while black-holed
        self.cut = False  # tainted during a partition: the server side stays open

    def abort(self) -> None:
        for writer in (self.client, self.upstream):
            if writer is None:
                continue
            sock = writer.get_extra_info("socket")
            if sock is not None:
                # (ValueError: uvloop's stand-in socket of a transport
                # already aborted has no descriptor left.)
                with contextlib.suppress(OSError, ValueError):
                    # Linger 0: close() sends RST instead of FIN.
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
        for task in self.tasks:
            task.cancel()


class FaultProxy:
    def __init__(self, upstream_port: int, upstream_host: str = "127.0.0.1") -> None:
        self.upstream = (upstream_host, upstream_port)
        self.latency = 0.0
        self.blackhole = False
        self.partition = False
        self.port = 0
        self.accepted = 0
        self._pairs: set[_Pair] = set()
        self._orphans: list[_Pair] = []  # cut pairs whose client went: their server side stays
        self._server: asyncio.Server | None = None

    async def start(self) -> FaultProxy:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for pair in [*self._pairs, *self._orphans]:
            pair.abort()
        self._pairs.clear()
        self._orphans.clear()
        if self._server is not None:
            await self._server.wait_closed()

    @contextlib.asynccontextmanager
    async def refusing_new_connections(self) -> AsyncIterator[None]:
        """New TCP connections to the proxy's port are refused (its listening
        socket closed: a restart under way behind it, a load balancer
        draining) while the connections it relays live on; it listens on
        the same port again afterwards. A cancel request, which takes a
        connection of its own, then fails where the lease's does not."""
        assert self._server is not None
        self._server.close()
        try:
            yield
        finally:
            self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)

    async def __aenter__(self) -> FaultProxy:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def connections(self) -> int:
        return len(self._pairs)

    def reset_all(self) -> int:
        """Abort every open connection with an RST; returns how many."""
        pairs = list(self._pairs)
        for pair in pairs:
            pair.abort()
        self._pairs.clear()
        return len(pairs)

    def heal(self) -> None:
        """End the black hole (or partition); connections whose data was
        swallowed are reset (only on the client's side after a partition)."""
        self.blackhole = self.partition = False
        for pair in [p for p in self._pairs if p.tainted]:
            self._pairs.discard(pair)
            if pair.cut:
                pair.client.transport.abort()
                self._orphans.append(pair)
            else:
                pair.abort()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        pair = _Pair(writer)
        self._pairs.add(pair)
        try:
            if self.blackhole or self.partition:
                pair.tainted = True
                while await reader.read(65536):
                    pass  # swallow; never answer
                return
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
            pair.upstream = up_writer
            pair.tasks = [
                asyncio.current_task(),  # type: ignore[list-item]
                asyncio.create_task(self._pump(up_reader, writer, pair)),
            ]
            await self._pump(reader, up_writer, pair)
        except (OSError, RuntimeError, asyncio.CancelledError):
            # (RuntimeError: uvloop's write() on a transport already closed,
            # "handler is closed", where asyncio's raises nothing or OSError.)
            pass
        finally:
            if pair.cut or self.partition:
                # A partition: the server's side of the connection stays.
                pair.cut = True
                self._pairs.discard(pair)
                pair.client.transport.abort()
                self._orphans.append(pair)
            elif pair in self._pairs:
                self._pairs.discard(pair)
                for task in pair.tasks[1:]:
                    task.cancel()
                for w in (pair.client, pair.upstream):
                    if w is not None:
                        w.transport.abort()

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, pair: _Pair) -> None:
        """Relay one direction until either side goes; then close ``writer``."""
        try:
            await self._relay(reader, writer, pair)
        except (OSError, RuntimeError, asyncio.CancelledError):  # (RuntimeError: uvloop, see above)
            pass
        finally:
            if not ((pair.cut or self.partition) and writer is pair.upstream):
                with contextlib.suppress(OSError, RuntimeError):
                    writer.close()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, pair: _Pair) -> None:
        """Copy ``reader`` to ``writer`` up to the EOF, with the latency and
        black hole the test asked for (subclasses change what is copied when)."""
        while True:
            data = await reader.read(65536)
            if not data:
                break
            if self.latency:
                await asyncio.sleep(self.latency)
            if self.blackhole or self.partition or pair.cut:
                # (A cut pair relays nothing more, even after the heal: bytes
                # its client sent in the partition may still be buffered here
                # when heal() runs, and a Terminate among them would end the
                # backend the server must never hear about.)
                pair.tainted = True
                pair.cut = pair.cut or self.partition
                continue
            writer.write(data)
            await writer.drain()
