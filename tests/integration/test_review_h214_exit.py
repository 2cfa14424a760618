"""Review helper-214 of the backend-exit wait (commit 78ea1f5): each
connection's socket has a second descriptor (``_workers.exit_watch``), and a
closed connection's place counts towards ``max_size`` until the server has
closed that socket, ``BACKEND_EXIT_GRACE`` at most (``Runner.backend_exit``).

Attacks: descriptors left open by any way a connection or a pool ends; the
duplicate reading or half-closing an open connection; a backend kept alive
longer than before the change; recovery after a cut or a restart; uvloop.
"""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import time
from collections.abc import Callable
from typing import Any

import asyncpg
import pytest

import safepool
from safepool import _workers
from tests._util import backends_after_the_loop, stoppable_backend
from tests.faults.test_cancel_request_tls import tls_cluster  # noqa: F401  (a fixture)

COUNT = "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1"


def open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


def descriptor_targets() -> dict[int, str]:
    found = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            found[int(name)] = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            pass
    return found


async def settled_descriptors(expected: int | Callable[[], int], timeout: float = 4.0) -> int:
    """The process's descriptor count once it equals ``expected`` (exit
    waits last up to backend_exit_timeout), or what it is at ``timeout``.
    ``expected`` may be a function, read again at each poll (the pool's
    size changes while a replacement connects)."""
    deadline = time.monotonic() + timeout
    while True:
        now = open_descriptors()
        if now == (expected() if callable(expected) else expected) or time.monotonic() > deadline:
            return now
        await asyncio.sleep(0.02)


async def until_backends(admin: Any, app_name: str, expected: int, timeout: float = 5.0) -> int:
    deadline = time.monotonic() + timeout
    while True:
        n = int(await admin.fetchval(COUNT, app_name))
        if n == expected or time.monotonic() > deadline:
            return n
        await asyncio.sleep(0.01)


async def _until_fatal_read(con: Any) -> None:
    with pytest.raises((asyncpg.PostgresError, asyncpg.InterfaceError, asyncpg.InternalClientError)):
        for _ in range(200):
            await con.fetchval("SELECT 1")
            await asyncio.sleep(0.01)


# ----------------------------------------------------------------- (1) leaks

ENDINGS = [
    "close",
    "terminate",
    "close_cancelled",
    "terminate_during_exit_wait",
    "connect_abandoned",
    "resize_shrink",
    "expire_connections",
    "max_inactive",
    "max_queries",
    "lease_timeout",
    "leaked_lease_reclaimed",
    "reset_failure",
    "kill_idle",
    "kill_leased",
    "proxy_terminate",
    "connection_class_terminate",
]


class _OwnTerminate(asyncpg.Connection):  # type: ignore[misc]
    terminated = 0

    def terminate(self) -> None:
        type(self).terminated += 1
        super().terminate()


@pytest.mark.asyncio
@pytest.mark.parametrize("ending", ENDINGS)
async def test_no_descriptor_outlives_its_connection(
    pools: Callable[..., Any], pg_dsn: str, app_name: str, ending: str
) -> None:
    """Whatever ends a connection (or the pool), once the exit waits are
    over the process holds two descriptors per open connection (its socket
    and the duplicate) and none for a closed one; after the pool ends, as
    many as before it."""
    admin = await asyncpg.connect(pg_dsn)
    try:
        gc.collect()
        before = open_descriptors()
        kwargs: dict[str, Any] = {"min_size": 2, "max_size": 2}
        if ending == "max_inactive":
            kwargs["max_inactive_connection_lifetime"] = 0.2
        if ending == "max_queries":
            kwargs["max_queries"] = 1
        if ending == "lease_timeout":
            kwargs["lease_timeout"] = 0.2
        if ending == "reset_failure":

            async def failing_reset(con: Any) -> None:
                raise RuntimeError("reset fails")

            kwargs["reset"] = failing_reset
        if ending == "connect_abandoned":
            kwargs["min_size"] = 0
        if ending == "connection_class_terminate":
            kwargs["connection_class"] = _OwnTerminate
        pool = await pools(**kwargs)

        def open_now() -> int:
            return before + 2 * pool.get_size()

        if ending == "close":
            async with pool.acquire() as con:
                await con.fetchval("SELECT 1")
            await pool.close()
        elif ending == "terminate":
            con = await pool.acquire()
            pool.terminate()
        elif ending == "close_cancelled":
            con = await pool.acquire()
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(pool.close(), 0.05)
        elif ending == "terminate_during_exit_wait":
            con = await pool.acquire()
            pid = con.get_server_pid()
            if not stoppable_backend(pid):
                pytest.skip("backend not stoppable here")
            os.kill(pid, signal.SIGSTOP)
            try:
                con.terminate()
                await pool.release(con)
                await asyncio.sleep(0.05)  # (the exit wait is reading the duplicate)
                assert pool._runner.exiting
                pool.terminate()
                await asyncio.sleep(0.05)
            finally:
                os.kill(pid, signal.SIGCONT)
        elif ending == "connect_abandoned":

            async def take() -> Any:
                return await pool.acquire()

            task = asyncio.create_task(take())
            await asyncio.sleep(0)  # (its connect is under way)
            pool.terminate()
            with pytest.raises(safepool.PoolClosedError):
                await task
        elif ending == "resize_shrink":
            pool.resize(max_size=1, min_size=0)
            assert await settled_descriptors(before + 2 * 1) - before <= 2
            assert pool.get_size() <= 1
            assert not pool._runner.exit_watches or len(pool._runner.exit_watches) == pool.get_size()
        elif ending == "expire_connections":
            await pool.expire_connections()
            async with pool.acquire() as con:
                await con.fetchval("SELECT 1")
            await asyncio.sleep(0.2)
            assert await settled_descriptors(open_now) == open_now()
        elif ending == "max_inactive":
            await asyncio.sleep(0.6)
            assert await settled_descriptors(open_now) == open_now()
        elif ending == "max_queries":
            for _ in range(4):
                async with pool.acquire() as con:
                    await con.fetchval("SELECT 1")
            assert await settled_descriptors(open_now) == open_now()
        elif ending == "lease_timeout":
            con = await pool.acquire()
            await asyncio.sleep(0.5)  # (taken back)
            assert await settled_descriptors(open_now) == open_now()
        elif ending == "leaked_lease_reclaimed":
            con = await pool.acquire()
            del con
            gc.collect()
            await asyncio.sleep(0.2)
            gc.collect()
            assert await settled_descriptors(open_now) == open_now()
        elif ending == "reset_failure":
            with pytest.raises(RuntimeError):
                async with pool.acquire() as con:
                    await con.fetchval("SELECT 1")
            assert await settled_descriptors(open_now) == open_now()
        elif ending == "kill_idle":
            await admin.execute(
                f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = '{app_name}'"
            )
            await asyncio.sleep(0.3)
            assert await settled_descriptors(open_now) == open_now()
        elif ending == "kill_leased":
            con = await pool.acquire()
            await admin.execute("SELECT pg_terminate_backend($1)", con.get_server_pid())
            await _until_fatal_read(con)
            await pool.release(con)
            assert await settled_descriptors(open_now) == open_now()
        elif ending == "proxy_terminate":
            con = await pool.acquire()
            con.terminate()
            await pool.release(con)
            assert await settled_descriptors(open_now) == open_now()
        elif ending == "connection_class_terminate":
            con = await pool.acquire()
            con.terminate()
            await pool.release(con)
            pool.terminate()
        # The pool's books: one duplicate per open connection.
        if not pool._closed:
            assert len(pool._runner.exit_watches) == pool.get_size(), (pool._runner.exit_watches, pool.get_size())
            await pool.close()
        pool.terminate()
        for _ in range(3):
            await asyncio.sleep(0.05)
            gc.collect()
        assert await settled_descriptors(before) == before
        assert await until_backends(admin, app_name, 0) == 0
    finally:
        await admin.close()


@pytest.mark.filterwarnings("ignore::ResourceWarning")
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
@pytest.mark.parametrize("ending", ["left_open", "garbage_collected"])
def test_no_descriptor_outlives_the_loop(pg_dsn: str, loop: str, ending: str) -> None:
    """asyncio.run ending with a pool open (its tasks cancelled, its loop
    closed) and a pool dropped without a close: once the pool is garbage
    collected, no descriptor of it stays. (terminate() on the closed loop
    raises at its first abort and leaves asyncpg's socket open on asyncio,
    before the change too: see the uvloop xfail below for what the
    duplicates add.)"""
    factory = None
    if loop == "uvloop":
        factory = pytest.importorskip("uvloop").new_event_loop

    async def warm_up() -> None:  # (uvloop's pipes and /dev/null, opened once per process or loop)
        con = await asyncpg.connect(pg_dsn)
        await con.close()

    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(warm_up())
    gc.collect()
    before = open_descriptors()
    targets = descriptor_targets()
    kept: list[Any] = []

    async def scenario() -> None:
        pool = await safepool.create_pool(pg_dsn, min_size=2, max_size=2)
        con = await pool.acquire()
        con.terminate()
        await pool.release(con)  # (an exit wait under way as the loop ends)
        if ending != "garbage_collected":
            kept.append(pool)

    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(scenario())
    kept.clear()
    for _ in range(3):
        gc.collect()
    assert open_descriptors() == before, {k: v for k, v in descriptor_targets().items() if targets.get(k) != v}


# ------------------------------------------- (3) backends kept alive longer


def _backend_alive_after(pg_dsn: str, pid: int, wait: float) -> bool:
    async def probe() -> bool:
        admin = await asyncpg.connect(pg_dsn)
        try:
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline:
                if not await admin.fetchval("SELECT count(*) FROM pg_stat_activity WHERE pid = $1", pid):
                    return False
                await asyncio.sleep(0.02)
            return True
        finally:
            await admin.close()

    return asyncio.run(probe())


@pytest.mark.filterwarnings("ignore::ResourceWarning")
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_a_terminated_connections_backend_exits_when_the_loop_ends_right_after(pg_dsn: str, loop: str) -> None:
    """The program terminates its leased connection, releases it and its
    asyncio.run() ends at once, the pool kept (a module's global, a pool of
    a test session's fixture): asyncpg's abort closed its descriptor, so
    before the duplicate the backend read the socket's end and exited. The
    exit wait's task is cancelled before its first step (asyncio.run cancels
    every task) and never half-closes the duplicate, which keeps the socket
    open: the idle backend lives on as long as the pool is referenced."""
    factory = None
    if loop == "uvloop":
        factory = pytest.importorskip("uvloop").new_event_loop
    kept: list[Any] = []
    pids: list[int] = []

    async def scenario() -> None:
        pool = await safepool.create_pool(pg_dsn, min_size=1, max_size=1)
        kept.append(pool)
        con = await pool.acquire()
        pids.append(con.get_server_pid())
        con.terminate()
        await pool.release(con)

    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(scenario())
    try:
        assert not _backend_alive_after(pg_dsn, pids[0], 2.0), "the terminated connection's backend is still there"
    finally:
        kept.clear()
        gc.collect()


# ------------------------------------------------------ (4) recovery speed


@pytest.fixture(scope="module")
def tcp_cluster() -> Any:
    from tests.faults._pg import start_cluster

    try:
        cluster = start_cluster()
    except Exception as exc:  # pragma: no cover - no Debian PostgreSQL here
        pytest.skip(f"no PostgreSQL cluster for the fault tests: {exc!r}")
    try:
        yield cluster
    finally:
        cluster.cleanup()


def _silent_proxy_class() -> type:
    from tests.faults._proxy import FaultProxy

    class SilentProxy(FaultProxy):  # type: ignore[misc,valid-type]
        """``go_silent()``: the connections relayed so far get no byte more
        in either direction and are never closed, not even on the client's
        FIN (their server's host died without a word, or a failover moved
        the address: nothing answers on the old path); new connections are
        relayed as usual (the standby, the new path)."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.dead: set[Any] = set()

        def go_silent(self) -> None:
            self.dead.update(self._pairs)

        async def _relay(self, reader: Any, writer: Any, pair: Any) -> None:
            while True:
                data = await reader.read(65536)
                if pair in self.dead:
                    await asyncio.Event().wait()  # (never answers, never closes)
                if not data:
                    break
                writer.write(data)
                await writer.drain()

    return SilentProxy


@pytest.mark.parametrize(
    "backend_exit_timeout",
    [
        pytest.param(
            None, id="default",
            marks=pytest.mark.xfail(
                strict=True,
                reason="the trade-off of the exit wait (docs/design.md, Slot states; docs/backpressure.md): after the "
                "program terminate()s a connection whose peer never answers (a dead host, a failover that moved the "
                "address, a proxy that went silent), its place stays counted for backend_exit_timeout (1 s by "
                "default), which cannot tell that backend from one slow to exit: the next acquire waits 1 s where "
                "asyncpg's pool connects at once",
            ),
        ),
        pytest.param(0.0, id="no-wait"),  # (the option since s66: as fast as asyncpg's pool)
    ],
)
@pytest.mark.asyncio
async def test_recovery_after_the_old_path_dies_is_as_fast_as_asyncpgs(
    tcp_cluster: Any, backend_exit_timeout: float | None
) -> None:
    proxy = await _silent_proxy_class()(tcp_cluster.port).start()
    try:
        dsn = f"postgresql://postgres@127.0.0.1:{proxy.port}/postgres"
        waited: dict[str, float] = {}
        options = {} if backend_exit_timeout is None else {"backend_exit_timeout": backend_exit_timeout}
        for flavour, factory, kwargs in (
            ("asyncpg", asyncpg.create_pool, {}), ("safepool", safepool.create_pool, options)
        ):
            pool = await factory(dsn, min_size=1, max_size=1, **kwargs)
            try:
                con = await pool.acquire()
                await con.fetchval("SELECT 1")
                proxy.go_silent()
                with pytest.raises(TimeoutError):
                    await con.fetchval("SELECT 1", timeout=0.2)
                con.terminate()  # (the program gives the dead connection up)
                await pool.release(con)
                started = time.monotonic()
                async with pool.acquire(timeout=5) as con:
                    assert await con.fetchval("SELECT 1") == 1
                waited[flavour] = time.monotonic() - started
            finally:
                pool.terminate()
        assert waited["safepool"] < waited["asyncpg"] + 0.3, waited
    finally:
        await proxy.close()


# ------------------------------------------------ (5) TLS and PgBouncer


async def _terminate_rounds(dsn: str, admin_dsn: str, app_name: str, temp_tables: int) -> tuple[list[int], list[float]]:
    """Five leases, each terminated by the program after making its backend
    slow to exit: the server's count of the pool's backends at each lease,
    and how long each next acquire waited."""
    admin = await asyncpg.connect(admin_dsn)
    pool = await safepool.create_pool(dsn, min_size=0, max_size=1, server_settings={"application_name": app_name})
    seen: list[int] = []
    waits: list[float] = []
    try:
        released = None
        for _ in range(5):
            con = await pool.acquire()
            if released is not None:
                waits.append(time.monotonic() - released)
            seen.append(int(await admin.fetchval(COUNT, app_name)))
            if temp_tables:
                await con.execute(
                    f"DO $$ BEGIN FOR i IN 1..{temp_tables} LOOP "
                    "EXECUTE format('CREATE TEMP TABLE exit_t%s (a int)', i); END LOOP; END $$"
                )
            con.terminate()
            await pool.release(con)
            released = time.monotonic()
        await pool.close()
        assert await until_backends(admin, app_name, 0) == 0
    finally:
        pool.terminate()
        await admin.close()
    return seen, waits


@pytest.mark.asyncio
async def test_tls_connections_keep_the_bound_and_leave_no_descriptor(
    tls_cluster: Any,  # noqa: F811
    app_name: str,
) -> None:
    dsn = f"{tls_cluster.admin_dsn}?sslmode=require"
    warm = await asyncpg.connect(dsn)  # (uvloop opens a /dev/null of its own at a loop's first TCP connection)
    warm.terminate()
    await asyncio.sleep(0.05)
    gc.collect()
    before = open_descriptors()
    targets = descriptor_targets()
    seen, waits = await _terminate_rounds(dsn, dsn, app_name, temp_tables=500)
    assert seen == [1] * 5, seen
    assert max(waits) < _workers.BACKEND_EXIT_GRACE + 0.5, waits
    gc.collect()
    assert await settled_descriptors(before) == before, {
        k: v for k, v in descriptor_targets().items() if targets.get(k) != v
    }


@pytest.mark.asyncio
async def test_behind_pgbouncer_an_aborted_clients_place_is_freed_at_once(tcp_cluster: Any, app_name: str) -> None:
    """PgBouncer closes a dropped client's socket at once: the exit wait
    ends at once (no 1 s grace per terminate()), and nothing leaks."""
    import shutil
    import tempfile
    from pathlib import Path

    from tests._pgbouncer import Bouncer

    if shutil.which("pgbouncer") is None:
        pytest.skip("pgbouncer is not installed")
    root = tempfile.mkdtemp(prefix="safepool-pgbouncer-")
    os.chmod(root, 0o755)
    upstream = {
        "host": "127.0.0.1",
        "port": tcp_cluster.port,
        "database": "postgres",
        "user": "postgres",
        "password": None,
        "server_user": "postgres",
    }
    bouncer = Bouncer(
        upstream, Path(root), pool_mode="session", ignore_startup_parameters="extra_float_digits,application_name"
    )
    bouncer.start()
    try:
        warm = await asyncpg.connect(tcp_cluster.admin_dsn)  # (uvloop's /dev/null, see above)
        warm.terminate()
        await asyncio.sleep(0.05)
        gc.collect()
        before = open_descriptors()
        admin = await asyncpg.connect(tcp_cluster.admin_dsn)
        pool = await safepool.create_pool(bouncer.dsn(), min_size=0, max_size=1)
        try:
            waits = []
            for _ in range(5):
                con = await pool.acquire()
                await con.fetchval("SELECT 1")
                con.terminate()
                await pool.release(con)
                started = time.monotonic()
                async with pool.acquire() as con:
                    assert await con.fetchval("SELECT 1") == 1
                waits.append(time.monotonic() - started)
            assert max(waits) < 0.3, waits
            await pool.close()
        finally:
            pool.terminate()
            await admin.close()
        gc.collect()
        assert await settled_descriptors(before) == before
    finally:
        bouncer.stop()
        shutil.rmtree(root, ignore_errors=True)


def _backends_after_the_loop_closed(pg_dsn: str, loop: str, terminate_after: bool) -> int:
    """A pool left open when its asyncio.Runner ends (the program keeps it:
    a module's global, a session fixture), optionally terminate()d after
    the loop closed: how many of its backends the server still has 1 s
    later, the pool still referenced."""
    import uuid

    factory = None
    if loop == "uvloop":
        factory = pytest.importorskip("uvloop").new_event_loop
    name = f"sp-h214-{uuid.uuid4().hex[:8]}"
    kept: list[Any] = []

    async def scenario() -> None:
        pool = await safepool.create_pool(pg_dsn, min_size=2, max_size=2, server_settings={"application_name": name})
        async with pool.acquire() as con:
            await con.fetchval("SELECT 1")
        kept.append(pool)

    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(scenario())
    if terminate_after:
        try:
            kept[0].terminate()
        except RuntimeError:
            pass  # (the loop is closed: the first abort raises)

    try:
        return backends_after_the_loop(pg_dsn, name)
    finally:
        kept.clear()
        gc.collect()


@pytest.mark.filterwarnings("ignore::ResourceWarning")
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize(
    "terminate_after",
    [
        # (The loop's shutdown_asyncgens() closes the duplicates: Runner.watch_loop_shutdown, s69.)
        pytest.param(False, id="left_open"),
        pytest.param(True, id="terminated_after"),  # (terminate() closes the duplicates first: fixed in s66)
    ],
)
def test_on_uvloop_backends_end_when_the_loop_closes_with_the_pool_open(pg_dsn: str, terminate_after: bool) -> None:
    assert _backends_after_the_loop_closed(pg_dsn, "uvloop", terminate_after) == 0


@pytest.mark.filterwarnings("ignore::ResourceWarning")
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_on_asyncio_a_pool_left_open_keeps_its_backends_as_before(pg_dsn: str) -> None:
    """asyncio's loop leaves its transports open when it closes: the backends
    of a pool left open live on, with or without the duplicates (parity)."""
    assert _backends_after_the_loop_closed(pg_dsn, "asyncio", False) == 2


@pytest.mark.asyncio
async def test_a_pool_closed_takes_its_loop_shutdown_hook_with_it(pg_dsn: str) -> None:
    """The generator the loop's shutdown_asyncgens() would close (see
    Runner.watch_loop_shutdown) is closed by the pool's own close(): the
    loop has nothing of the pool's left to close."""
    pool = await safepool.create_pool(pg_dsn, min_size=1, max_size=1)
    hook = pool._runner.loop_shutdown
    assert hook is not None and hook.ag_frame is not None  # (started: suspended at its yield)
    await pool.close()
    assert pool._runner.loop_shutdown is None
    assert hook.ag_frame is None  # (finished)


@pytest.mark.filterwarnings("ignore::ResourceWarning")
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.asyncio
async def test_a_pool_left_open_is_collected_and_its_loop_shutdown_hook_ends_quietly(pg_dsn: str) -> None:
    """The hook holds the pool weakly: a pool nobody references is still
    collected (asyncpg's test_pool_gc_does_not_restore_min_size), and its
    generator, finalized with it, closes in a task of the loop's with
    nothing to do and no error."""
    import weakref

    loop = asyncio.get_running_loop()
    errors: list[dict[str, Any]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _, context: errors.append(context))
    try:
        pool = await safepool.create_pool(pg_dsn, min_size=1, max_size=1)
        hook = weakref.ref(pool._runner.loop_shutdown)
        collected = weakref.ref(pool)
        del pool
        gc.collect()
        assert collected() is None
        for _ in range(3):
            await asyncio.sleep(0)  # (the loop's finalizer hook closes the generator in a task)
        gc.collect()
        assert hook() is None
        assert errors == []
    finally:
        loop.set_exception_handler(previous)
