"""Backpressure on a real PostgreSQL (issue 4): overload, a server out of
connection slots, a failing server, recovery.

The module runs its own small cluster (tests/faults/_pg.py) with a low
``max_connections`` and a plain (non-superuser) role for the pools, so that
another client can exhaust the server while the tests' observer keeps a
reserved superuser slot.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import asyncpg
import pytest

import safepool
from tests.faults._harness import (
    Ledger,
    ServerSampler,
    assert_books_balance,
    asyncpg_connect_lost,
    closing,
    loop_errors,
    scale,
    settle,
)
from tests.faults._pg import Cluster, start_cluster

pytestmark = [pytest.mark.asyncio, pytest.mark.realtime]

MAX_CONNECTIONS = 12  # 9 for the app role: 3 are reserved for superusers


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    c = start_cluster(max_connections=MAX_CONNECTIONS)
    try:
        yield c
    finally:
        c.cleanup()


def _stalled_within(stalls: list[tuple[float, float]], start: float, end: float) -> float:
    """Seconds of the loop's stalls (``(from, to)`` pairs, monotonic) that
    fall between ``start`` and ``end``."""
    return sum(max(0.0, min(b, end) - max(a, start)) for a, b in stalls)


def _figures(**figures: Any) -> None:
    print({k: round(v, 4) if isinstance(v, float) else v for k, v in figures.items()})


# ------------------------------------------------------------------ overload


@pytest.mark.parametrize("max_waiters", [8, 1000])
async def test_overload_10x_sheds_load_with_typed_errors(cluster: Cluster, app_name: str, max_waiters: Any) -> None:
    """10x more tasks than connections for a fixed time: the wait queue stays
    bounded, refusals are immediate and typed, the server never sees more
    than max_size connections."""
    max_size, tasks, duration = 4, 40, scale(3.0, 15.0)
    pool = await safepool.create_pool(
        cluster.dsn(), min_size=0, max_size=max_size, acquire_timeout=0.5, max_waiters=max_waiters,
        server_settings={"application_name": app_name},
    )
    bound = pool.stats().max_waiters
    assert bound == max_waiters
    ledger = Ledger()
    refusal_latency: list[float] = []
    max_waiting = 0
    deadline = time.monotonic() + duration

    async def client() -> None:
        while time.monotonic() < deadline:
            started = time.monotonic()
            try:
                async with pool.acquire() as con:
                    await con.execute("SELECT pg_sleep(0.01)")
                ledger.ok += 1
            except safepool.PoolOverloadedError as exc:
                refusal_latency.append(time.monotonic() - started)
                ledger.record(exc)
                await asyncio.sleep(0.005)  # what a 503 costs the client
            except Exception as exc:
                ledger.record(exc)

    async with closing(pool), ServerSampler(cluster.admin_dsn, app_name) as sampler:
        with loop_errors() as unhandled:
            clients = [asyncio.create_task(client()) for _ in range(tasks)]
            while not all(c.done() for c in clients):
                max_waiting = max(max_waiting, pool.stats().waiting)
                await asyncio.sleep(0.005)
            await asyncio.gather(*clients)
            await assert_books_balance(pool, sampler)
        assert not unhandled, unhandled
    ledger.check()
    # Only the pool's own load-shedding errors: nothing from the server.
    assert set(ledger.errors) <= {"PoolOverloadedError", "PoolTimeoutError"}, ledger.summary()
    # Queued behind busy connections: at most max_waiters; tasks waiting for
    # a connection being opened (up to max_size) come on top.
    assert max_waiting <= bound + max_size
    assert sampler.max_seen <= max_size, sampler.samples
    if refusal_latency:
        assert max(refusal_latency) < 0.05, "PoolOverloadedError must be raised at once"
    errors = sum(ledger.errors.values())
    _figures(
        max_waiters=bound, ok=ledger.ok, overloaded=ledger.errors["PoolOverloadedError"],
        timeouts=ledger.errors["PoolTimeoutError"], error_rate=errors / ledger.total,
        throughput_per_s=ledger.ok / duration, max_waiting=max_waiting, max_server_connections=sampler.max_seen,
        p99_refusal_ms=1000 * sorted(refusal_latency)[int(0.99 * (len(refusal_latency) - 1))] if refusal_latency else 0,
    )
    if max_waiters == 8:
        assert ledger.errors["PoolOverloadedError"] > 0  # the bound was actually reached
    assert ledger.ok > 0


async def test_max_waiters_bounds_the_queue_not_the_growth(cluster: Cluster, app_name: str) -> None:
    """max_waiters counts tasks queued behind busy connections. An empty
    pool with room to grow must open connections for a burst, even with
    max_waiters=0 (which used to refuse every acquire of an empty pool)."""
    pool = await safepool.create_pool(
        cluster.dsn(), min_size=0, max_size=4, max_waiters=0, server_settings={"application_name": app_name},
    )
    release = asyncio.Event()
    held = 0

    async def holder() -> None:
        nonlocal held
        async with pool.acquire() as con:
            await con.execute("SELECT 1")
            held += 1
            await release.wait()

    async with closing(pool):
        tasks = [asyncio.create_task(holder()) for _ in range(4)]
        async with asyncio.timeout(10):
            while held < 4:
                await asyncio.sleep(0.005)
                for task in tasks:
                    if task.done():
                        task.result()  # surface a refusal at once
        # Now every connection is busy: the next one would queue, so it is refused.
        with pytest.raises(safepool.PoolOverloadedError):
            await pool.acquire()
        release.set()
        await asyncio.gather(*tasks)
        await settle(pool)
        pool._state.check_invariants()
        assert pool.get_size() == 4


# ------------------------------------------------ server out of connections


async def _hog(cluster: Cluster) -> list[asyncpg.Connection]:
    """Another client takes every connection slot left to ordinary roles."""
    hogs: list[asyncpg.Connection] = []
    while True:
        try:
            hogs.append(await asyncpg.connect(cluster.dsn(), server_settings={"application_name": "hog"}))
        except asyncpg.TooManyConnectionsError:
            return hogs
        assert len(hogs) < MAX_CONNECTIONS


async def test_server_out_of_connections_degrades_then_recovers(cluster: Cluster, app_name: str) -> None:
    """wait_on_connect_error=True: max_connections is exhausted by another
    client: the pool keeps serving with the connections it has, callers never
    see 53300 while it has any, and it grows back once the server has room."""
    max_size = 6
    pool = await safepool.create_pool(
        cluster.dsn(), min_size=2, max_size=max_size, acquire_timeout=2.0, wait_on_connect_error=True,
        server_settings={"application_name": app_name},
    )
    hogs = await _hog(cluster)
    ledger = Ledger()
    statuses: set[str] = set()
    stop = asyncio.Event()

    async def client() -> None:
        while not stop.is_set():
            try:
                async with pool.acquire() as con:
                    await con.execute("SELECT pg_sleep(0.01)")
                ledger.ok += 1
            except Exception as exc:
                ledger.record(exc)
                await asyncio.sleep(0.01)

    try:
        async with closing(pool), ServerSampler(cluster.admin_dsn, app_name) as sampler:
            with loop_errors() as unhandled:
                clients = [asyncio.create_task(client()) for _ in range(12)]
                degraded_until = time.monotonic() + scale(2.0, 8.0)
                while time.monotonic() < degraded_until:
                    statuses.add(pool.stats().server_status)
                    assert pool.get_size() == 2  # no room on the server
                    await asyncio.sleep(0.01)
                served_while_full = ledger.ok
                for con in hogs:
                    await con.close()
                hogs = []
                freed_at = time.monotonic()
                async with asyncio.timeout(10):
                    while pool.get_size() < max_size:
                        await asyncio.sleep(0.01)
                regrown = time.monotonic() - freed_at
                stop.set()
                await asyncio.gather(*clients)
                await assert_books_balance(pool, sampler)
            assert not unhandled, unhandled
    finally:
        for con in hogs:
            await con.close()
    ledger.check()
    assert "backing_off" in statuses
    assert served_while_full > 0
    # The refusal never reached a caller: the pool had connections throughout.
    assert not any(kind.startswith("server:") for kind in ledger.errors), ledger.summary()
    assert sampler.max_seen <= max_size
    _figures(served_while_full=served_while_full, regrown_to_max_s=regrown, ledger=ledger.summary(),
             connect_errors=pool.stats().connect_errors)
    assert regrown < 5.0


async def test_empty_pool_on_a_full_server_fails_fast_and_recovers(cluster: Cluster, app_name: str) -> None:
    """fail_fast=True: with no connection at all, callers get the server's
    refusal, then, from the failure that opens the circuit on, only
    ServerUnavailableError (its __cause__ the refusal): at once while the
    pool backs off, and after the probe that a caller waited for failed;
    the pool does not crash and serves as soon as the server has room."""
    pool = await safepool.create_pool(
        cluster.dsn(), min_size=0, max_size=4, acquire_timeout=2.0, fail_fast=True,
        server_settings={"application_name": app_name},
    )
    hogs = await _hog(cluster)
    ledger = Ledger()
    try:
        async with closing(pool), ServerSampler(cluster.admin_dsn, app_name) as sampler:
            with loop_errors() as unhandled:
                kinds: list[str] = []
                for _ in range(50):
                    started = time.monotonic()
                    try:
                        await pool.fetchval("SELECT 1")
                        ledger.ok += 1
                    except Exception as exc:
                        ledger.record(exc)
                        kinds.append(type(exc).__name__)
                        if isinstance(exc, safepool.ServerUnavailableError):
                            assert isinstance(exc.__cause__, asyncpg.TooManyConnectionsError), repr(exc.__cause__)
                        assert time.monotonic() - started < 1.0  # refused quickly, not after the timeout
                    await asyncio.sleep(0.02)
                assert ledger.ok == 0
                assert ledger.errors["server:53300"] >= 1
                # The refusals before the circuit opened (3 failures in a
                # row), then only ServerUnavailableError: a caller whose
                # acquire waited for a probe gets what the others get.
                opened = kinds.index("ServerUnavailableError")
                assert 1 <= opened <= 3 and set(kinds[:opened]) == {"TooManyConnectionsError"}, kinds
                assert set(kinds[opened:]) == {"ServerUnavailableError"}, kinds
                assert pool.stats().server_status == "down"
                # The server is up, its max_connections used up by others:
                # health says so, not server_down (docs/runbook.md).
                report = await pool.health(probe=False)
                full = next(r for r in report.reasons if r.code == "server_full")
                assert full.status == "failing" and "TooManyConnectionsError" in full.message, report.reasons
                assert "server_down" not in {r.code for r in report.reasons}
                for con in hogs:
                    await con.close()
                hogs = []
                freed_at = time.monotonic()
                async with asyncio.timeout(10):
                    while True:
                        try:
                            assert await pool.fetchval("SELECT 1") == 1
                            break
                        except (safepool.ServerUnavailableError, asyncpg.TooManyConnectionsError):
                            await asyncio.sleep(0.02)
                recovered = time.monotonic() - freed_at
                await assert_books_balance(pool, sampler)
            assert not unhandled, unhandled
    finally:
        for con in hogs:
            await con.close()
    ledger.check()
    _figures(ledger=ledger.summary(), recovered_s=recovered)
    assert recovered < 5.0


# ------------------------------------------------- connect rate when failing


def _max_attempts(backoff: safepool.Backoff, seconds: float, burst: int) -> int:
    """The most connects a pool may try in ``seconds`` of connects broken
    before the server answers (an HAProxy-like proxy whose server is down):
    the first burst (up to max_size at once before anything has failed:
    their failures are one round of the backoff), then one probe per
    delay of a refusal's schedule (``unreachable_cap`` doubling up to
    ``refused_cap``), each at least half its ceiling."""
    elapsed, attempts, failures = 0.0, burst, 1
    while True:
        elapsed += 0.5 * min(backoff.refused_cap, backoff.unreachable_cap * 2 ** (failures - 1))
        if elapsed > seconds:
            return attempts
        attempts += 1
        failures += 1


@pytest.mark.parametrize("paced", [True, False])
async def test_connect_rate_under_a_failing_server(app_name: str, paced: bool) -> None:
    """A server that accepts TCP and drops every connection at once (a
    proxy whose server is down), 20 callers retrying every 5 ms. Paced
    (``wait_on_connect_error``, as ``fail_fast``), many impatient callers
    must not turn into a connect storm: the pool probes one at a time, as
    often as a server's refusals (at most one per refused_cap / 2 once they
    go on), where the callers would try thousands. By default, as on
    asyncpg's pool, each acquire connects for itself and gets its own
    connect's error at once: none waits out its timeout, and there are as
    many connects as acquires."""
    attempts: list[float] = []

    async def refuse(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        attempts.append(time.monotonic())
        writer.transport.abort()

    server = await asyncio.start_server(refuse, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    max_size, duration = 10, scale(3.0, 10.0)
    pool = await safepool.create_pool(
        f"postgresql://app@127.0.0.1:{port}/postgres", min_size=0, max_size=max_size, acquire_timeout=0.2,
        wait_on_connect_error=paced,
    )
    ledger = Ledger()
    deadline = time.monotonic() + duration

    async def client() -> None:
        while time.monotonic() < deadline:
            try:
                await pool.fetchval("SELECT 1")
                ledger.ok += 1
            except Exception as exc:
                ledger.record(exc)
            await asyncio.sleep(0.005)

    try:
        # (A caller's acquire timeout cancels its connect, as asyncpg's
        # does; one cancelled inside asyncio's connection set-up leaves
        # asyncpg's own unretrieved report: allowed.)
        with loop_errors(allow=asyncpg_connect_lost) as unhandled:
            started = time.monotonic()
            await asyncio.gather(*(client() for _ in range(20)))
            elapsed = time.monotonic() - started
        assert not unhandled, unhandled
    finally:
        await asyncio.wait_for(pool.close(), 10)
        server.close()
        await server.wait_closed()
    ledger.check()
    assert ledger.ok == 0
    bound = _max_attempts(safepool.Backoff(), elapsed, max_size)
    _figures(paced=paced, connect_attempts=len(attempts), bound=bound, seconds=elapsed, acquires=ledger.total,
             attempts_per_s=len(attempts) / elapsed, ledger=ledger.summary())
    if paced:
        assert len(attempts) <= bound, f"{len(attempts)} connects in {elapsed:.1f}s (bound {bound})"
        # Without backoff, 20 callers retrying every 5 ms would have tried thousands.
        assert ledger.total > 10 * len(attempts)
    else:
        # Each acquire's own connect (those of the last acquires may still
        # have been under way at the close), and its own error. (On a loaded
        # machine a few acquires, ten waiting at a time for a place under
        # max_size, time out before one frees: those made no connect, as on
        # asyncpg's pool. 0 here when idle, 15-35 of 1,400-1,900 with the
        # unit tests running beside it.)
        # (And the connect of an acquire that timed out runs on: the task
        # that takes it over is not failed by it, and connects again. A
        # loop lagging over hedge_after, 0.1 s, hedges a connect: 3,666
        # connects for 3,665 acquires in one run beside the whole suite.)
        timeouts = ledger.errors["PoolTimeoutError"]
        assert timeouts <= ledger.total // 20, ledger.summary()
        assert ledger.total - max_size - timeouts <= len(attempts) <= ledger.total + timeouts + max_size, (
            ledger.summary()
        )
        assert not [k for k in ledger.errors if not k.startswith("os:") and k != "PoolTimeoutError"], ledger.summary()





@pytest.mark.parametrize("paced", [True, False])
async def test_a_proxy_whose_server_comes_back_is_served_about_as_soon_as_asyncpgs(
    cluster: Cluster, app_name: str, paced: bool
) -> None:
    """An HAProxy-like proxy whose server goes down accepts each connect and
    resets it, for 2.5 s, then relays again. By default each acquire
    connects for itself, as on asyncpg's pool. Paced
    (``wait_on_connect_error``, as ``fail_fast``), the pool's probes stay within
    refused_cap of each other (one at a time, not a storm), so it serves
    again within about that of the proxy's server coming back. (Backing off
    as any failure, the probes were 0.4-2 s apart by the end of the outage,
    and the pool served again 0.5 s after the server came back, asyncpg's
    pool, connecting on every acquire, in 7-25 ms.)"""
    attempts: list[float] = []
    relays: set[asyncio.StreamWriter] = set()
    down = False

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        attempts.append(time.monotonic())
        if down:
            writer.transport.abort()
            return
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", cluster.port)
        relays.update((writer, up_writer))

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except OSError:
                pass
            finally:
                dst.transport.abort()
                relays.discard(dst)

        await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    pool = await safepool.create_pool(
        cluster.dsn(port=port) + f"?application_name={app_name}", min_size=2, max_size=4, acquire_timeout=0.5,
        wait_on_connect_error=paced,
    )
    served: list[float] = []
    stop = False

    async def client() -> None:
        while not stop:
            try:
                await pool.fetchval("SELECT 1")
                served.append(time.monotonic())
            except Exception:
                await asyncio.sleep(0.005)
            await asyncio.sleep(0.005)

    # The loop's own stalls (a loaded CI host descheduling the process, a
    # garbage collection: a full one took 90 ms here in a fresh process, and
    # two CI runs saw gaps of 0.42 s late in a 4,800-test worker): no task,
    # the pool's or the proxy's, runs in one, so the time is taken off the
    # gaps between connect attempts around it.
    ticks: list[float] = []

    async def heartbeat() -> None:
        while not stop:
            ticks.append(time.monotonic())
            await asyncio.sleep(0.005)

    try:
        with loop_errors() as unhandled:
            beating = asyncio.create_task(heartbeat())
            clients = [asyncio.create_task(client()) for _ in range(4)]
            await asyncio.sleep(0.3)
            down = True
            went_down = time.monotonic()
            for writer in list(relays):
                writer.transport.abort()
            await asyncio.sleep(2.5)
            down = False
            came_back = time.monotonic()
            while not [t for t in served if t > came_back] and time.monotonic() < came_back + 3:
                await asyncio.sleep(0.005)
            stop = True
            await asyncio.gather(*clients, beating)
        assert not unhandled, unhandled
    finally:
        await asyncio.wait_for(pool.close(), 10)
        server.close()
        await server.wait_closed()
    recovery = min(t for t in served if t > came_back) - came_back
    late = [t for t in attempts if came_back - 1.5 <= t < came_back]
    stalls = [(a, b) for a, b in zip(ticks, ticks[1:], strict=False) if b - a > 0.05]
    gaps = [b - a - _stalled_within(stalls, a, b) for a, b in zip(late, late[1:], strict=False)]
    while_down = [t for t in attempts if went_down <= t < came_back]
    bound = _max_attempts(safepool.Backoff(), came_back - went_down, 4) + 2  # (+ min_size's refill)
    _figures(paced=paced, attempts_while_down=len(while_down), bound=bound, max_gap_late=max(gaps, default=None),
             recovery_ms=recovery * 1000, loop_stalled=sum(b - a for a, b in stalls))
    assert len(late) >= 6, late  # (the old schedule: 2-3 probes in the outage's last 1.5 s)
    assert max(gaps) < 0.3, gaps
    assert recovery < 1.0, recovery
    if paced:
        assert len(while_down) <= bound, (len(while_down), bound)
