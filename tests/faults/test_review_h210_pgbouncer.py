"""Review h210: safepool behind a real PgBouncer driven through its admin
console (PAUSE/RESUME, KILL, RECONNECT), restarted, and behind the fault
proxy (a black hole between the pool and PgBouncer), side by side with
asyncpg's pool on the same scenario where that is meaningful.

Client connections are counted on both ends: PgBouncer's ``SHOW CLIENTS``
(which, while a database is paused or killed, keeps listing clients that
already closed their end: PgBouncer does not read from a client waiting for
its login or its server) and this process's own sockets to PgBouncer's port
(/proc), the figure the pool's ``max_size`` bounds."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import shutil
import time
from collections.abc import Callable
from typing import Any

import asyncpg
import pytest

import safepool
from tests._pgbouncer import Bouncer, requires_pgbouncer
from tests.faults.test_pgbouncer_outage import start_bouncer  # noqa: F401 (fixture)

from ._harness import held_through_a_black_hole
from ._pg import APP_USER, Cluster

# The admin console is driven with psql (asyncpg's extended protocol is
# refused there).
requires_psql = pytest.mark.skipif(shutil.which("psql") is None, reason="psql is not installed (postgresql-client)")
pytestmark = [pytest.mark.asyncio, pytest.mark.realtime, requires_pgbouncer, requires_psql]

FACTORIES: dict[str, Any] = {"asyncpg": asyncpg.create_pool, "safepool": safepool.create_pool}
DB = "postgres"


async def admin(bouncer: Bouncer, command: str, timeout: float = 10.0) -> list[list[str]]:
    """Run one command on PgBouncer's admin console (psql, unaligned)."""
    proc = await asyncio.create_subprocess_exec(
        "psql", "-X", "-A", "-t", "-F", "|", "-h", "127.0.0.1", "-p", str(bouncer.port), "-U", APP_USER,
        "-d", "pgbouncer", "-c", command,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except BaseException:
        proc.kill()
        await proc.wait()
        raise
    if proc.returncode != 0:
        raise RuntimeError(f"{command}: {err.decode()}")
    return [line.split("|") for line in out.decode().splitlines() if line]


async def clients(bouncer: Bouncer) -> int:
    """Client connections to the pools' database (the console's own left out)."""
    rows = await admin(bouncer, "SHOW CLIENTS")
    return sum(1 for row in rows if len(row) > 2 and row[2] == DB)


def bouncer_settings(**extra: Any) -> dict[str, Any]:
    return {"admin_users": APP_USER, "log_connections": 1, "log_disconnections": 1, **extra}


def own_sockets(port: int) -> int:
    """TCP sockets of this process to 127.0.0.1:``port`` it has not closed
    (ESTABLISHED, or CLOSE_WAIT: the peer closed, this end did not), from /proc."""
    return len(own_socket_rows(port))


def own_socket_rows(port: int) -> list[tuple[int, str]]:
    """The sockets :func:`own_sockets` counts, as (local port, TCP state:
    01 ESTABLISHED, 08 CLOSE_WAIT) pairs: a failure's detail."""
    import os

    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    rows: dict[str, tuple[int, str]] = {}
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            parts = line.split()
            local, remote, state, inode = parts[1], parts[2], parts[3], parts[9]
            if inode in inodes and int(remote.split(":")[1], 16) == port and state in ("01", "08"):
                # (By inode: /proc/net/tcp is read in pieces, not as one
                # snapshot, and a socket can be listed twice while the
                # kernel's table changes under the read: CI once counted
                # one socket twice, a fourth "connection" of max_size 3.)
                rows[inode] = (int(local.split(":")[1], 16), state)
    return list(rows.values())


def typed(exc: BaseException) -> bool:
    """A failure a caller can catch by type: safepool's own (PoolError) or
    what asyncpg raises (its errors, OSError from a connect, TimeoutError)."""
    return isinstance(exc, (safepool.PoolError, asyncpg.PostgresError, asyncpg.InterfaceError, OSError,
                            asyncio.TimeoutError))


def outcome(exc: BaseException | None) -> str:
    """The asyncpg-level class of an outcome: safepool's errors mapped to the
    asyncpg/builtin class they subclass, so both pools compare."""
    if exc is None:
        return "ok"
    if isinstance(exc, asyncio.TimeoutError):
        return "TimeoutError"
    for cls in type(exc).__mro__:
        if cls.__module__.startswith("asyncpg") or cls.__module__ == "builtins":
            return cls.__name__
    return type(exc).__name__


async def settled(pool: Any, port: int, timeout: float = 5.0) -> None:
    """Until the pool's own count of connections matches its sockets."""
    deadline = time.monotonic() + timeout
    while True:
        stats = pool.stats()
        if stats.connecting == stats.resetting == stats.closing == 0 and stats.size == own_sockets(port):
            acquired, accounted = lease_books(pool)
            assert acquired == accounted, (acquired, accounted, stats)
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"stats {stats.size=} {stats.idle=} {stats.in_use=} {stats.connecting=} "
                                 f"{stats.closing=} vs {own_sockets(port)} sockets")
        await asyncio.sleep(0.02)


def lease_books(pool: Any) -> tuple[int, int]:
    """Both sides of docs/metrics.md's identity: ``acquired == released +
    leases_expired + leaks_detected + leases_discarded + len(pool.leases())``."""
    stats = pool.stats()
    ended = stats.released + stats.leases_expired + stats.leaks_detected + stats.leases_discarded
    return stats.acquired, ended + len(pool.leases())


class CancelRequests:
    """Cancel requests of this process under way (asyncpg's
    ``connect_utils._cancel``, safepool's ``send_cancel_request``): each has
    a socket to the server of its own for a moment, no session and no
    backend (PostgreSQL reads the request and closes it; PgBouncer too), so
    not one of the pool's connections that max_size bounds. A cancelled
    statement sends one (a release's budget ran out on its reset)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.in_flight = 0
        from asyncpg import connect_utils

        from safepool import _internals

        monkeypatch.setattr(connect_utils, "_cancel", self._counted(connect_utils._cancel))
        monkeypatch.setattr(_internals, "send_cancel_request", self._counted(_internals.send_cancel_request))

    def _counted(self, send: Callable[..., Any]) -> Callable[..., Any]:
        async def counted(*args: Any, **kwargs: Any) -> Any:
            self.in_flight += 1
            try:
                return await send(*args, **kwargs)
            finally:
                # Its socket closes in a callback its transport queued as it
                # ended (transport.close()): counted until that has run.
                asyncio.get_running_loop().call_soon(self._ended)

        return counted

    def _ended(self) -> None:
        self.in_flight -= 1


class Sampler:
    """Peak of this process's sockets to PgBouncer (and of SHOW CLIENTS),
    cancel requests under way left out (see :class:`CancelRequests`)."""

    def __init__(
        self, bouncer: Bouncer, show_clients: bool = True, pool: Any = None, cancels: CancelRequests | None = None,
        every: float = 0.02,
    ) -> None:
        self.bouncer = bouncer
        self.show_clients = show_clients
        self.pool = pool
        self.cancels = cancels
        self.every = every  # seconds between samples (0: every loop pass)
        self.own = 0
        # At the peak: the sockets and, for safepool's pool, its stats (what
        # a failure of the bound reports).
        self.peak = ""
        self.listed = 0
        self._task: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()

    async def _run(self) -> None:
        while not self._stop.is_set():
            rows = own_socket_rows(self.bouncer.port)
            cancelling = self.cancels.in_flight if self.cancels is not None else 0
            if len(rows) - cancelling > self.own:
                self.own = len(rows) - cancelling
                self.peak = f"sockets {rows}, of which cancel requests: {cancelling}"
                if isinstance(self.pool, safepool.Pool):
                    stats = self.pool.stats()
                    self.peak += "; " + ", ".join(f"{name}={getattr(stats, name)}" for name in (
                        "size", "idle", "in_use", "connecting", "resetting", "closing", "connections_opened",
                        "connections_closed", "connect_errors", "resets_failed"))
            if self.show_clients:
                self.listed = max(self.listed, await clients(self.bouncer))
            await asyncio.sleep(self.every)

    async def __aenter__(self) -> Sampler:
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._stop.set()  # not a cancel: a psql under way is waited for
        await asyncio.wait_for(self._task, 15)


MODES = ["transaction", "session"]


@pytest.mark.parametrize("pool_mode", MODES)
@pytest.mark.parametrize("kind", list(FACTORIES))
async def test_reconnect_under_load_costs_no_caller_an_error(
    start_bouncer: Callable[..., Bouncer], running: Cluster, pool_mode: str, kind: str,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """RECONNECT (server connections closed once released) repeated under
    load: PgBouncer hides it from its clients, so neither pool's callers see
    an error, and neither pool ever has more than max_size connections to
    PgBouncer (own sockets, cancel requests left out, and SHOW CLIENTS)."""
    cancels = CancelRequests(monkeypatch)
    bouncer = start_bouncer(**bouncer_settings(pool_mode=pool_mode, default_pool_size=3))
    max_size = 3
    pool = await FACTORIES[kind](bouncer.dsn(), min_size=1, max_size=max_size, statement_cache_size=0)
    errors: list[BaseException] = []
    done = 0
    stop = asyncio.Event()

    async def worker() -> None:
        nonlocal done
        while not stop.is_set():
            try:
                async with pool.acquire(timeout=5) as con, con.transaction():
                    await con.fetchval("SELECT pg_sleep(0.005)")
                done += 1
            except Exception as exc:
                errors.append(exc)

    try:
        async with Sampler(bouncer, pool=pool, cancels=cancels) as sampler:
            workers = [asyncio.create_task(worker()) for _ in range(6)]
            for _ in range(5):
                await asyncio.sleep(0.15)
                await admin(bouncer, f"RECONNECT {DB}")
            stop.set()
            await asyncio.wait_for(asyncio.gather(*workers), 10)
        assert not errors, errors[:3]
        assert done > 20
        assert sampler.own <= max_size, sampler.peak
        assert sampler.listed <= max_size, sampler.listed
        if kind == "safepool":
            await settled(pool, bouncer.port)
            assert pool.stats().in_use == 0
    finally:
        await asyncio.wait_for(pool.close(), 10)


async def _short_leases(pool: Any, stop: asyncio.Event) -> int:
    """Leases with ``acquire(timeout=0.01)`` until ``stop``; how many ended well."""
    done = 0
    while not stop.is_set():
        with contextlib.suppress(Exception):
            async with pool.acquire(timeout=0.01) as con, con.transaction():
                await con.fetchval("SELECT pg_sleep(0.005)")
            done += 1
        await asyncio.sleep(0)
    return done


@pytest.mark.parametrize("pool_mode", MODES)
async def test_acquire_timeouts_shorter_than_a_lease_keep_max_size(
    start_bouncer: Callable[..., Bouncer], running: Cluster, pool_mode: str,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The test above with ``acquire(timeout=0.01)``: most acquires time out
    waiting, and the release's budget (the acquire's, as asyncpg's) runs
    out on resets, whose statements are cancelled and whose connections are
    closed and replaced, while PgBouncer reconnects. Sampled at every loop
    pass, the pool never has more than max_size sockets to PgBouncer beside
    its cancel requests. (asyncpg's pool, in the same run, reached 5 and 6
    with max_size=3: not asserted, its figure is printed.)"""
    cancels = CancelRequests(monkeypatch)
    bouncer = start_bouncer(**bouncer_settings(pool_mode=pool_mode, default_pool_size=3))
    max_size = 3
    peaks = {}
    for kind, factory in FACTORIES.items():
        pool = await factory(bouncer.dsn(), min_size=1, max_size=max_size, statement_cache_size=0)
        stop = asyncio.Event()
        try:
            async with Sampler(bouncer, show_clients=False, pool=pool, cancels=cancels, every=0) as sampler:
                workers = [asyncio.create_task(_short_leases(pool, stop)) for _ in range(6)]
                for _ in range(5):
                    await asyncio.sleep(0.15)
                    await admin(bouncer, f"RECONNECT {DB}")
                stop.set()
                done = sum(await asyncio.wait_for(asyncio.gather(*workers), 10))
            peaks[kind] = (sampler.own, sampler.peak)
            if kind == "safepool":
                stats = pool.stats()
                print({"done": done, "acquire_timeouts": stats.acquire_timeouts, "resets_failed": stats.resets_failed})
                assert stats.acquire_timeouts > 0 and done > 0, (done, stats.acquire_timeouts)  # (the scenario happened)
                await settled(pool, bouncer.port)
        finally:
            await asyncio.wait_for(pool.close(), 10)
            await _previous_pools_sockets_closed(bouncer.port)
    print({"asyncpg_peak": peaks["asyncpg"][0], "safepool_peak": peaks["safepool"][0], "max_size": max_size})
    assert peaks["safepool"][0] <= max_size, peaks["safepool"][1]


async def _previous_pools_sockets_closed(port: int, timeout: float = 10.0) -> None:
    """Until none of this process's sockets to PgBouncer is left open
    (collecting garbage, which closes an unreferenced connection's), at
    most ``timeout`` seconds. In one loaded full run (2026-12-08) the second
    pool's first connect waited out PgBouncer's query_wait_timeout (10 s):
    in session mode all three server connections were still held for the
    first pool's clients. Which of them outlived its pool's close() was not
    traced; the test is about the second pool's peak, not that."""
    deadline = time.monotonic() + timeout
    while own_sockets(port) and time.monotonic() < deadline:
        gc.collect()
        await asyncio.sleep(0.05)


async def _call(awaitable: Any, timeout: float = 10.0) -> BaseException | None:
    """The error of ``awaitable`` (a callable returning one, or an
    awaitable), or None."""
    try:
        await asyncio.wait_for(awaitable() if callable(awaitable) else awaitable, timeout)
    except Exception as exc:
        return exc
    return None


async def _until_sleeping_on_the_server(bouncer: Bouncer, timeout: float = 5.0) -> None:
    """Until the lease's ``pg_sleep(5)`` runs on the server behind PgBouncer
    (polled there, on a connection of its own): it went through PgBouncer."""
    server = await asyncpg.connect(bouncer.server_dsn)
    try:
        async with asyncio.timeout(timeout):
            while not await server.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'PgSleep' AND query = 'SELECT pg_sleep(5)'"
            ):
                await asyncio.sleep(0.005)
    finally:
        await server.close()


async def _restart_scenario(start: Callable[..., Bouncer], kind: str, pool_mode: str) -> dict[str, Any]:
    bouncer = start(**bouncer_settings(pool_mode=pool_mode, default_pool_size=3))
    pool = await FACTORIES[kind](bouncer.dsn(), min_size=2, max_size=4, statement_cache_size=0)
    seen: dict[str, Any] = {}
    errors: list[BaseException] = []
    try:
        querying = asyncio.Event()

        async def holder() -> None:
            async with pool.acquire() as con:
                querying.set()
                await con.fetchval("SELECT pg_sleep(5)")

        held = asyncio.create_task(holder())
        idle_lease = await pool.acquire()
        await asyncio.wait_for(querying.wait(), 5)
        await _until_sleeping_on_the_server(bouncer)
        bouncer.stop()
        started = time.monotonic()
        exc = await _call(held)
        seen["mid_query"] = outcome(exc)
        seen["mid_query_fast"] = time.monotonic() - started < 2.0
        exc = await _call(lambda: idle_lease.fetchval("SELECT 1"))
        seen["idle_lease_next_call"] = outcome(exc)
        errors += [e for e in (exc,) if e is not None]
        await asyncio.wait_for(pool.release(idle_lease), 5)
        started = time.monotonic()
        exc = await _call(pool.fetchval("SELECT 1", timeout=1))
        seen["while_down"] = outcome(exc)
        errors += [e for e in (exc,) if e is not None]
        seen["while_down_fast"] = time.monotonic() - started < 1.5
        bouncer.start()
        results = []
        for _ in range(4):
            exc = await _call(pool.fetchval("SELECT 1"))
            results.append(outcome(exc))
        seen["after_restart"] = results
        seen["own_sockets_max"] = own_sockets(bouncer.port) <= 4
        if kind == "safepool":
            await settled(pool, bouncer.port)
            stats = pool.stats()
            seen["stats"] = (stats.in_use, stats.waiting)
            seen["typed"] = all(typed(e) for e in errors)
    finally:
        await asyncio.wait_for(pool.close(), 10)
    return seen


@pytest.mark.parametrize("pool_mode", MODES)
async def test_a_pgbouncer_restart_under_leases_matches_asyncpgs_pool(
    start_bouncer: Callable[..., Bouncer], running: Cluster, pool_mode: str,  # noqa: F811
) -> None:
    """PgBouncer stopped (SIGTERM) under a lease running a statement and a
    lease between statements, an acquire while it is down, then started
    again on the same port: each step's outcome on safepool is the class
    asyncpg's pool gives, safepool's failures are typed, and once PgBouncer
    is back every call succeeds at once (the closed connections replaced,
    no error left over), with stats() counting the sockets it holds."""
    seen = {kind: await _restart_scenario(start_bouncer, kind, pool_mode) for kind in FACTORIES}
    print(seen)
    sp, ap = seen["safepool"], seen["asyncpg"]
    for key in ap:
        assert sp[key] == ap[key], (key, sp[key], ap[key])
    assert sp["after_restart"] == ["ok"] * 4
    assert sp["mid_query_fast"] and sp["while_down_fast"]
    assert sp["stats"] == (0, 0)
    assert sp["typed"]


async def _kill_scenario(start: Callable[..., Bouncer], kind: str, pool_mode: str) -> dict[str, Any]:
    bouncer = start(**bouncer_settings(pool_mode=pool_mode, default_pool_size=3))
    pool = await FACTORIES[kind](bouncer.dsn(), min_size=2, max_size=4, statement_cache_size=0)
    seen: dict[str, Any] = {}
    errors: list[BaseException] = []
    try:
        querying = asyncio.Event()

        async def holder() -> None:
            async with pool.acquire() as con:
                querying.set()
                await con.fetchval("SELECT pg_sleep(5)")

        held = asyncio.create_task(holder())
        idle_lease = await pool.acquire()
        await asyncio.wait_for(querying.wait(), 5)
        await _until_sleeping_on_the_server(bouncer)
        await admin(bouncer, f"KILL {DB}")
        started = time.monotonic()
        exc = await _call(held)
        errors += [e for e in (exc,) if e is not None]
        seen["mid_query"] = outcome(exc)
        seen["mid_query_fast"] = time.monotonic() - started < 2.0
        exc = await _call(lambda: idle_lease.fetchval("SELECT 1"))
        errors += [e for e in (exc,) if e is not None]
        seen["idle_lease_next_call"] = outcome(exc)
        await asyncio.wait_for(pool.release(idle_lease), 5)
        # A killed database holds new logins: acquires end at their timeout,
        # for 1.5 s of four tasks retrying, and the pool's sockets to
        # PgBouncer stay within max_size.
        late: list[float] = []
        kinds: set[str] = set()
        stop = time.monotonic() + 1.5

        async def retry() -> None:
            while time.monotonic() < stop:
                begun = time.monotonic()
                try:
                    async with pool.acquire(timeout=0.3) as con:
                        await con.fetchval("SELECT 1", timeout=0.3)
                    kinds.add("ok")
                except Exception as exc:
                    errors.append(exc)
                    kinds.add(outcome(exc))
                late.append(time.monotonic() - begun - 0.3)

        async with Sampler(bouncer, show_clients=False) as sampler:
            await asyncio.wait_for(asyncio.gather(*(retry() for _ in range(4))), 10)
        seen["while_killed"] = sorted(kinds)
        seen["acquires_on_time"] = max(late) < 0.25
        seen["own_sockets_peak"] = sampler.own
        if kind == "safepool":
            seen["typed"] = [repr(e) for e in errors if not typed(e)]
            stats = pool.stats()
            seen["stats"] = (stats.in_use, stats.waiting, stats.size <= 4, stats.size >= own_sockets(bouncer.port))
            seen["books"] = lease_books(pool)
    finally:
        started = time.monotonic()
        await asyncio.wait_for(pool.close(), 10)
        seen["close_fast"] = time.monotonic() - started < 2.0
        seen["sockets_after_close"] = own_sockets(bouncer.port)
    return seen


@pytest.mark.parametrize("pool_mode", MODES)
async def test_a_pgbouncer_kill_under_leases_matches_asyncpgs_pool(
    start_bouncer: Callable[..., Bouncer], running: Cluster, pool_mode: str,  # noqa: F811
) -> None:
    """KILL on the admin console drops every client of the database at once
    and holds new logins (PgBouncer 1.18 keeps holding them after RESUME):
    the lease running a statement and the lease between statements fail as
    on asyncpg's pool, acquires fail at their timeout with a typed error
    while the logins hang, the hanging connects never push the pool's
    sockets past max_size, and close() does not wait for them."""
    seen = {kind: await _kill_scenario(start_bouncer, kind, pool_mode) for kind in FACTORIES}
    print(seen)
    sp, ap = seen["safepool"], seen["asyncpg"]
    for key in ap.keys() - {"own_sockets_peak"}:
        assert sp[key] == ap[key], (key, sp[key], ap[key])
    # asyncpg's pool went past max_size here now and then (more than 4
    # sockets for max_size=4 in 3 of 8 of this review's runs, 5 where the
    # figure was printed: a connect cancelled with its acquire's timeout
    # closes its socket a moment later); safepool stayed within 4 in all.
    assert sp["own_sockets_peak"] <= 4, sp["own_sockets_peak"]
    assert sp["while_killed"] == ["TimeoutError"]
    assert sp["typed"] == []
    assert sp["stats"] == (0, 0, True, True)
    assert sp["books"][0] == sp["books"][1], sp["books"]
    assert sp["sockets_after_close"] == 0


async def _until_waiting_in_pgbouncer(bouncer: Bouncer, timeout: float = 5.0) -> None:
    """Until a client of the database waits in PgBouncer for a server."""
    deadline = time.monotonic() + timeout
    while not any(len(row) > 3 and row[2] == DB and row[3] == "waiting" for row in await admin(bouncer, "SHOW CLIENTS")):
        assert time.monotonic() < deadline, "no client waiting in PgBouncer"
        await asyncio.sleep(0.02)


@pytest.mark.parametrize("pool_mode", MODES)
async def test_pause_bounds_a_cancelled_holder_and_a_timed_out_query_by_reset_timeout(
    start_bouncer: Callable[..., Bouncer], running: Cluster, pool_mode: str,  # noqa: F811
) -> None:
    """PAUSE holds every query in PgBouncer's queue, where a cancel request
    reaches nothing ("cancel request for idle client"). A task cancelled
    there, and a release after a query timeout there, wait for the
    statement's end in the release: asyncpg's pool until RESUME (or its
    acquire's timeout=); safepool until reset_timeout, then it closes the
    connection. The cancelled task ends with the reset's TimeoutError, not
    CancelledError: asyncpg's pool does the same with acquire(timeout=1)
    (measured in this review; release() documents "the reset's own error
    ..., as asyncpg raises it"). Its books then balance against its
    sockets, and after RESUME it serves at once."""
    bouncer = start_bouncer(**bouncer_settings(pool_mode=pool_mode, default_pool_size=2))
    reset_timeout = 1.0
    pool = await safepool.create_pool(
        bouncer.dsn(), min_size=2, max_size=3, statement_cache_size=0, reset_timeout=reset_timeout,
    )
    try:
        await admin(bouncer, f"PAUSE {DB}")

        async def holder() -> None:
            async with pool.acquire() as con:
                await con.fetchval("SELECT 1")

        task = asyncio.create_task(holder())
        await _until_waiting_in_pgbouncer(bouncer)
        task.cancel()
        started = time.monotonic()
        await asyncio.wait([task], timeout=10)
        assert task.done() and not task.cancelled(), task
        assert isinstance(task.exception(), asyncio.TimeoutError), task
        assert time.monotonic() - started < reset_timeout + 0.5

        started = time.monotonic()
        with pytest.raises(asyncio.TimeoutError):
            async with pool.acquire(timeout=1) as con:
                await con.fetchval("SELECT 2", timeout=0.3)
        assert time.monotonic() - started < 0.3 + reset_timeout + 0.5
        stats = pool.stats()
        assert stats.in_use == 0 and stats.size <= 3, stats
        assert stats.size >= own_sockets(bouncer.port)

        await admin(bouncer, f"RESUME {DB}")
        for _ in range(4):
            assert await pool.fetchval("SELECT 3", timeout=2) == 3
        await settled(pool, bouncer.port)
        assert pool.stats().in_use == 0
    finally:
        with contextlib.suppress(RuntimeError):
            await admin(bouncer, f"RESUME {DB}")
        await asyncio.wait_for(pool.close(), 10)


@pytest.mark.parametrize("kind", list(FACTORIES))
async def test_a_task_cancelled_in_a_release_stuck_behind_pause_ends_at_once(
    start_bouncer: Callable[..., Bouncer], running: Cluster, kind: str,  # noqa: F811
) -> None:
    """A query timed out in PAUSE's queue leaves its release waiting for the
    statement's end; the task cancelled during that wait ends at once with
    CancelledError on both pools (the reset goes on in the pool), and the
    pool serves again after RESUME with nothing leased."""
    bouncer = start_bouncer(**bouncer_settings(pool_mode="transaction", default_pool_size=2))
    pool = await FACTORIES[kind](bouncer.dsn(), min_size=1, max_size=2, statement_cache_size=0)
    try:
        await admin(bouncer, f"PAUSE {DB}")
        releasing = asyncio.Event()

        async def holder() -> None:
            async with pool.acquire() as con:
                try:
                    await con.fetchval("SELECT 1", timeout=0.3)
                except TimeoutError:
                    releasing.set()
                    raise

        task = asyncio.create_task(holder())
        await asyncio.wait_for(releasing.wait(), 5)
        for _ in range(5):
            await asyncio.sleep(0)  # into the release's wait
        assert not task.done()
        task.cancel()
        started = time.monotonic()
        await asyncio.wait([task], timeout=5)
        assert task.cancelled(), task
        assert time.monotonic() - started < 0.5
        await admin(bouncer, f"RESUME {DB}")
        for _ in range(3):
            assert await pool.fetchval("SELECT 4", timeout=5) == 4
        if kind == "safepool":
            await settled(pool, bouncer.port)
            assert pool.stats().in_use == 0
    finally:
        with contextlib.suppress(RuntimeError):
            await admin(bouncer, f"RESUME {DB}")
        await asyncio.wait_for(pool.close(), 10)


@pytest.mark.parametrize("pool_mode", MODES)
async def test_a_black_hole_in_front_of_pgbouncer_is_bounded_and_healed(
    start_bouncer: Callable[..., Bouncer], running: Cluster, pool_mode: str,  # noqa: F811
) -> None:
    """The fault proxy between the pool and PgBouncer goes silent during a
    lease's query (docs/reliability.md's black-hole row, there against
    PostgreSQL itself): the holder is freed within lease_timeout +
    reset_timeout with a typed error, acquires end at their deadline, and
    once the network heals the pool serves again with its books balanced
    against its sockets and PgBouncer's SHOW CLIENTS (the connections the
    pool gave up are gone from PgBouncer, not left pinning its clients)."""
    from ._proxy import FaultProxy

    slack = 0.25
    bouncer = start_bouncer(**bouncer_settings(pool_mode=pool_mode, default_pool_size=2))
    async with FaultProxy(bouncer.port) as proxy:
        pool = await safepool.create_pool(
            f"postgresql://{APP_USER}@127.0.0.1:{proxy.port}/{DB}", min_size=2, max_size=2,
            statement_cache_size=0, lease_timeout=0.5, reset_timeout=0.5, acquire_timeout=0.5, timeout=2.0,
        )
        try:
            held, errors = await held_through_a_black_hole(pool, proxy)
            assert held < 0.5 + 0.5 + 2 * slack, held
            assert errors and all(typed(e) for e in errors), errors
            started = time.monotonic()
            try:
                async with pool.acquire() as con:
                    await con.fetchval("SELECT 1")
            except Exception as exc:
                assert typed(exc), exc
            assert time.monotonic() - started < 0.5 + 0.5 + 2 * slack
            assert pool.stats().size <= 2
            proxy.heal()
            deadline = time.monotonic() + 5
            while True:
                try:
                    assert await pool.fetchval("SELECT 3") == 3
                    break
                except Exception as exc:
                    assert typed(exc), exc
                    assert time.monotonic() < deadline, "no recovery after the heal"
                    await asyncio.sleep(0.05)
            await settled(pool, proxy.port)
            deadline = time.monotonic() + 5
            while (listed := await clients(bouncer)) > pool.stats().size:
                assert time.monotonic() < deadline, (listed, pool.stats().size)
                await asyncio.sleep(0.05)
        finally:
            await asyncio.wait_for(pool.close(), 10)


# PgBouncer (1.18) keeps these parameters per client connection and sets them
# again on whichever server connection it links the client to: a SET of one
# of them, in transaction mode, stays with the client connection (the pool
# connection) across transactions, i.e. across leases.
TRACKED = {"TimeZone": "Asia/Tokyo", "application_name": "lease-one", "DateStyle": "SQL, DMY"}


async def _leaked_to_the_next_lease(bouncer: Bouncer, kind: str, **options: Any) -> dict[str, str]:
    """Lease one SETs each tracked parameter; what lease two, on the same
    (only) pool connection, sees of them where it differs from the start."""
    pool = await FACTORIES[kind](bouncer.dsn(), min_size=1, max_size=1, statement_cache_size=0, **options)
    try:
        async with pool.acquire() as con:
            before = {name: await con.fetchval(f"SHOW {name}") for name in TRACKED}
        async with pool.acquire() as con:
            for name, value in TRACKED.items():
                await con.execute(f"SET {name} = '{value}'")
        async with pool.acquire() as con:
            after = {name: await con.fetchval(f"SHOW {name}") for name in TRACKED}
        leaked = {name: after[name] for name in TRACKED if after[name] != before[name]}
        # client_encoding is tracked too: after a lease's SET client_encoding
        # the next lease's text would come back mis-decoded, with no error.
        async with pool.acquire() as con:
            await con.execute("SET client_encoding = 'LATIN1'")
        async with pool.acquire() as con:
            text = await con.fetchval("SELECT 'é'")
        if text != "é":
            leaked["'é' read as"] = text
        return leaked
    finally:
        await asyncio.wait_for(pool.close(), 10)


@pytest.mark.parametrize("variant", ["asyncpg", "safepool-default", "safepool-auto"])
async def test_the_full_reset_does_reset_pgbouncers_tracked_parameters_in_transaction_mode(
    start_bouncer: Callable[..., Bouncer], running: Cluster, variant: str,  # noqa: F811
) -> None:
    """In transaction mode asyncpg's reset query (RESET ALL) runs on whichever
    server connection PgBouncer picks, but PgBouncer reads the parameters it
    tracks back from that answer and resets the client's copy: the next
    lease does not see a lease's SET TimeZone / application_name / DateStyle
    / client_encoding, on asyncpg's pool, on safepool's default "full" and
    on "auto" alike."""
    bouncer = start_bouncer(**bouncer_settings(pool_mode="transaction", default_pool_size=2))
    kind, _, mode = variant.partition("-")
    options = {"reset_mode": mode} if mode and mode != "default" else {}
    assert await _leaked_to_the_next_lease(bouncer, kind, **options) == {}


async def test_rollback_mode_leaves_a_leases_tracked_set_to_the_next_lease_as_documented(
    start_bouncer: Callable[..., Bouncer], running: Cluster,  # noqa: F811
) -> None:
    """What docs/pgbouncer.md says of ``"rollback"`` in transaction mode (it
    recommended the mode there until s66, as if session state meant nothing):
    PgBouncer applies a lease's ``SET`` of a parameter it tracks to every
    later lease of that client connection, and only a reset's ``RESET ALL``
    resets it (the test above). Hence the recommendation of ``"auto"``."""
    bouncer = start_bouncer(**bouncer_settings(pool_mode="transaction", default_pool_size=2))
    leaked = await _leaked_to_the_next_lease(bouncer, "safepool", reset_mode="rollback")
    assert leaked == {**TRACKED, "'é' read as": "Ã©"}, f"the next lease saw {leaked}"


@pytest.mark.parametrize(
    ("fault", "status", "code"),
    [
        ("pause", "failing", "probe_timeout"),  # docs/pgbouncer.md: the probe's query waits in PgBouncer
        ("kill", "degraded", "probe_no_connection"),  # the probe's connect hangs in PgBouncer's login
        ("restart", "ok", None),  # every idle connection lost: the probe retries on the next
        ("stopped", "failing", "probe_failed"),
    ],
)
async def test_health_behind_pgbouncer_answers_within_twice_probe_timeout(
    start_bouncer: Callable[..., Bouncer], running: Cluster, fault: str, status: str, code: str | None,  # noqa: F811
) -> None:
    """health() through a PgBouncer that PAUSEd, KILLed the database,
    restarted (its idle connections all closed under the pool) or stopped:
    each check answers within twice probe_timeout (docs/metrics.md), with
    the reason docs/pgbouncer.md gives, and leaves the books balanced."""
    bouncer = start_bouncer(**bouncer_settings(pool_mode="transaction", default_pool_size=2))
    pool = await safepool.create_pool(bouncer.dsn(), min_size=2, max_size=3, statement_cache_size=0)
    probe_timeout = 0.5
    try:
        if fault in ("pause", "kill"):
            await admin(bouncer, f"{fault.upper()} {DB}")
        elif fault == "restart":
            bouncer.stop()
            bouncer.start()
        else:
            bouncer.stop()
        for _ in range(3):
            started = time.monotonic()
            report = await pool.health(probe_timeout=probe_timeout)
            assert time.monotonic() - started < 2 * probe_timeout + 0.25
            assert report.status == status, report
            if code is not None:
                assert code in [reason.code for reason in report.reasons], report
        stats = pool.stats()
        assert stats.in_use == 0 and stats.size <= 3, stats
        acquired, accounted = lease_books(pool)
        assert acquired == accounted
    finally:
        if fault == "pause":
            await admin(bouncer, f"RESUME {DB}")
        await asyncio.wait_for(pool.close(), 10)
