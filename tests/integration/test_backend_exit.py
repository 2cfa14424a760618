"""A closed connection's place counts towards ``max_size`` until its backend
has exited (review h206): the pool keeps a second descriptor of each
connection's socket (``_workers.exit_watch``), and after a close that did
not see the server's end of the socket (an abort: the pool's, the
program's ``terminate()``, asyncpg's own on a FATAL) it waits for that end
(``_workers.backend_gone``), ``BACKEND_EXIT_GRACE`` at most, before the
place is free. ``test_review_h206_backpressure.py`` has the scenarios of a
backend slow to exit (2,000 temporary tables to drop); this file has the
mechanism's own cases: the wait on a socket pair, its bound, a backend that
cannot exit (stopped), descriptors never left open, and ``get_size()``."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import struct
import time
from collections.abc import Callable
from typing import Any

import pytest

import safepool
from safepool import _workers
from tests._util import stoppable_backend

COUNT = "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1"


def open_descriptors() -> int:
    """This process's open sockets. (Not every descriptor: uvloop keeps a
    /dev/null placeholder for a while where a transport's socket was.)"""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            count += os.readlink(f"/proc/self/fd/{fd}").startswith("socket:")
        except OSError:
            pass  # (listdir's own descriptor, closed by now)
    return count


# ------------------------------------------------------- the wait itself


@pytest.mark.asyncio
async def test_backend_gone_returns_true_once_the_peer_closes_and_sends_our_end_first() -> None:
    ours, peer = socket.socketpair()
    ours.setblocking(False)
    loop = asyncio.get_running_loop()
    try:
        wait = asyncio.create_task(_workers.backend_gone(ours, 5.0))
        peer.setblocking(False)
        # Our end came first (the half-close), so the peer reads EOF...
        assert await loop.sock_recv(peer, 10) == b""
        assert not wait.done()
        # ...and what it sends before its own end is read and dropped.
        peer.send(b"E\x00\x00\x00\x04FATAL")
        peer.close()
        assert await asyncio.wait_for(wait, 5.0) is True
    finally:
        ours.close()


@pytest.mark.asyncio
async def test_backend_gone_gives_up_after_its_grace_when_the_peer_stays() -> None:
    ours, peer = socket.socketpair()
    ours.setblocking(False)
    try:
        started = time.monotonic()
        assert await _workers.backend_gone(ours, 0.05) is False
        assert 0.04 <= time.monotonic() - started < 2.0
    finally:
        ours.close()
        peer.close()


@pytest.mark.asyncio
async def test_backend_gone_takes_a_reset_for_the_end() -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    ours = socket.create_connection(listener.getsockname())
    peer, _ = listener.accept()
    listener.close()
    ours.setblocking(False)
    try:
        peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        peer.close()  # (SO_LINGER 0: an RST, not a FIN)
        assert await asyncio.wait_for(_workers.backend_gone(ours, 5.0), 5.0) is True
    finally:
        ours.close()


def test_exit_watch_is_none_without_a_socket() -> None:
    class NoTransport:
        _transport = None

    class NoSocket:
        class _transport:  # noqa: N801
            @staticmethod
            def get_extra_info(name: str) -> None:
                return None

    assert _workers.exit_watch(NoTransport()) is None  # type: ignore[arg-type]
    assert _workers.exit_watch(NoSocket()) is None  # type: ignore[arg-type]


# --------------------------------------------------------- on a real server


@pytest.mark.asyncio
async def test_the_duplicate_descriptors_are_closed_whatever_ends_the_connections(
    pools: Callable[..., Any], pg_dsn: str
) -> None:
    """Connections closed gracefully (expired), aborted (terminate() on the
    proxy), killed by the server, and the rest at close(): the process has
    as many descriptors open after as before the pool (one per connection
    while open, two with the duplicate)."""
    import asyncpg

    admin = await asyncpg.connect(pg_dsn)
    try:
        before = open_descriptors()
        pool = await pools(min_size=3, max_size=3)
        assert open_descriptors() == before + 6  # (each connection's socket, and its duplicate)
        con = await pool.acquire()
        con.terminate()
        await pool.release(con)
        con = await pool.acquire()
        await admin.execute("SELECT pg_terminate_backend($1)", con.get_server_pid())
        with pytest.raises((asyncpg.PostgresError, asyncpg.InterfaceError, asyncpg.InternalClientError)):
            for _ in range(100):  # (until the FATAL is read)
                await con.fetchval("SELECT 1")
                await asyncio.sleep(0.01)
        await pool.release(con)
        await pool.expire_connections()
        async with pool.acquire() as con:
            assert await con.fetchval("SELECT 1") == 1
        await pool.close()
        assert open_descriptors() == before
    finally:
        await admin.close()


@pytest.mark.asyncio
async def test_terminate_closes_the_duplicates_of_connections_whose_backend_is_exiting(
    pools: Callable[..., Any],
) -> None:
    """``terminate()`` while a close waits for a backend's exit: nothing can
    wait there, and the duplicate is closed at once (a pool task cancelled
    before its first step never runs its cleanup)."""
    before = open_descriptors()
    pool = await pools(min_size=2, max_size=2)
    con = await pool.acquire()
    con.terminate()
    await pool.release(con)  # (its close waits for the backend in a pool task, not started yet)
    assert pool._runner.exiting  # (the exit wait is under way)
    watch = next(iter(pool._runner.exit_watches.values()))
    pool.terminate()
    assert watch.fileno() == -1 and not pool._runner.exit_watches  # closed by terminate() itself
    # asyncpg's transports close their own sockets a loop pass or more after
    # the abort (uvloop's in a later phase of libuv's loop): polled.
    async with asyncio.timeout(2):
        while open_descriptors() != before:
            await asyncio.sleep(0.01)


@pytest.mark.realtime
@pytest.mark.asyncio
@pytest.mark.parametrize("grace", [0.3, 0.0])
async def test_a_backend_that_cannot_exit_holds_its_place_for_the_grace_only(
    pools: Callable[..., Any], grace: float
) -> None:
    """A backend stopped (SIGSTOP) never closes its socket: the place is
    held for ``backend_exit_timeout`` (0.3 s here), then freed, and the next
    acquire is served by a new connection then, not before and not never;
    with 0 at once, as on asyncpg's pool. ``get_size()`` meanwhile counts
    no connection, as asyncpg's (its connection is closed)."""
    pool = await pools(min_size=0, max_size=1, backend_exit_timeout=grace)
    con = await pool.acquire()
    pid = con.get_server_pid()
    if not stoppable_backend(pid):
        await pool.release(con)
        pytest.skip("the server's backends are not processes of this machine that this test may stop")
    os.kill(pid, signal.SIGSTOP)
    try:
        con.terminate()
        released = time.monotonic()
        await pool.release(con)
        assert pool.get_size() == 0
        async with pool.acquire() as con:
            waited = time.monotonic() - released
            assert con.get_server_pid() != pid
        if grace:
            assert 0.25 <= waited < 3.0, waited
        else:
            assert waited < 0.25, waited
    finally:
        os.kill(pid, signal.SIGCONT)
    await pool.close()


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_the_server_never_counts_more_than_max_size_after_terminates(pg_dsn: str, loop: str) -> None:
    """A program that terminates its leased connection each time, with a
    backend that has work to do on exit (temporary tables): the server
    counts at most ``max_size`` backends of the pool at every lease, on
    both loops."""
    import uuid

    import asyncpg

    factory = None
    if loop == "uvloop":
        factory = pytest.importorskip("uvloop").new_event_loop
    app_name = f"sp-exit-{uuid.uuid4().hex[:8]}"

    async def scenario() -> list[int]:
        admin = await asyncpg.connect(pg_dsn)
        pool = await safepool.create_pool(
            pg_dsn, min_size=0, max_size=1, server_settings={"application_name": app_name}
        )
        seen = []
        try:
            for _ in range(5):
                con = await pool.acquire()
                seen.append(await admin.fetchval(COUNT, app_name))
                await con.execute(
                    "DO $$ BEGIN FOR i IN 1..500 LOOP "
                    "EXECUTE format('CREATE TEMP TABLE exit_t%s (a int)', i); END LOOP; END $$"
                )
                con.terminate()
                await pool.release(con)
            await pool.close()
            async with asyncio.timeout(10):
                while await admin.fetchval(COUNT, app_name):
                    await asyncio.sleep(0.01)
        finally:
            pool.terminate()
            await admin.close()
        return seen

    with asyncio.Runner(loop_factory=factory) as runner:
        seen = runner.run(scenario())
    assert seen == [1] * 5, seen


@pytest.mark.parametrize(
    ("value", "error"),
    [(-1, safepool.PoolValueError), (float("nan"), safepool.PoolValueError), (float("inf"), safepool.PoolValueError),
     ("1", safepool.PoolTypeError), (None, safepool.PoolTypeError), (True, safepool.PoolTypeError)],
)
@pytest.mark.asyncio
async def test_backend_exit_timeout_is_checked(value: Any, error: type[Exception]) -> None:
    with pytest.raises(error, match="backend_exit_timeout"):
        safepool.create_pool("postgresql://localhost/x", backend_exit_timeout=value)


@pytest.mark.asyncio
async def test_backend_exit_timeout_shows_in_the_options(pools: Callable[..., Any]) -> None:
    assert (await pools(min_size=0)).options.backend_exit_timeout == 1.0
    assert (await pools(min_size=0, backend_exit_timeout=0)).options.backend_exit_timeout == 0.0

