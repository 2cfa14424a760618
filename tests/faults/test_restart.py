"""The server is stopped and started again under load."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

import safepool
from tests._util import asyncpg_version, until

from ._harness import Ledger, ServerSampler, SideBySide, assert_books_balance, closing, loop_errors, scale
from ._pg import Cluster

pytestmark = [pytest.mark.asyncio, pytest.mark.realtime]

MAX_SIZE = 5
WORKERS = 20


async def _load(pool: safepool.Pool, ledger: Ledger, successes: list[float], stop: asyncio.Event) -> None:
    while not stop.is_set():
        try:
            async with pool.acquire() as con:
                await con.fetchval("SELECT pg_sleep(0.002)")
            ledger.ok += 1
            successes.append(time.monotonic())
        except Exception as exc:
            ledger.record(exc)
            await asyncio.sleep(0.01)  # a real client would back off too


@pytest.mark.parametrize("mode", ["fast", "immediate"])
async def test_restart_under_load(running: Cluster, app_name: str, mode: str, report: Any) -> None:
    """Stop the server (a clean shutdown, or a crash: ``immediate``), keep it
    down, start it again: the pool serves again within seconds, and never
    leaks or double-counts a connection."""
    downtime = scale(1.5, 5.0)
    pool = await safepool.create_pool(
        running.dsn(),
        min_size=2,
        max_size=MAX_SIZE,
        acquire_timeout=2.0,
        server_settings={"application_name": app_name},
    )
    ledger = Ledger()
    successes: list[float] = []
    stop = asyncio.Event()
    async with closing(pool), ServerSampler(running.admin_dsn, app_name) as sampler:
        with loop_errors() as unhandled:
            workers = [asyncio.create_task(_load(pool, ledger, successes, stop)) for _ in range(WORKERS)]
            await asyncio.sleep(1.0)  # the load before the outage (the workload)
            await until(lambda: ledger.ok > 0)  # (served: waited for, not assumed of the second)
            before = ledger.ok
            assert before > 0
            await asyncio.to_thread(running.stop, mode)
            stopped_at = time.monotonic()
            await asyncio.sleep(downtime)
            await asyncio.to_thread(running.start)  # returns once the server accepts connections
            accepting_at = time.monotonic()
            async with asyncio.timeout(10):
                while not successes or successes[-1] < accepting_at:
                    await asyncio.sleep(0.005)
            recovered_at = min(t for t in successes if t >= accepting_at)
            await asyncio.sleep(1.0)  # keep the load on after recovery
            stop.set()
            async with asyncio.timeout(10):
                await asyncio.gather(*workers)
            await assert_books_balance(pool, sampler)
        assert not unhandled, unhandled
    ledger.check()
    recovery = recovered_at - accepting_at
    served_during_outage = sum(1 for t in successes if stopped_at < t < accepting_at)
    report(
        mode=mode,
        downtime_s=round(downtime, 2),
        recovery_s=round(recovery, 3),
        max_server_connections=sampler.max_seen,
        samples=len(sampler.samples),
        served_during_outage=served_during_outage,
        ledger=ledger.summary(),
        connect_errors=pool.stats().connect_errors,
    )
    assert recovery < 5.0, f"recovered {recovery:.2f}s after the server accepted again"
    assert sampler.max_seen <= MAX_SIZE, sampler.samples
    assert len(sampler.samples) > 20


async def test_recovery_is_as_fast_as_asyncpgs(running: Cluster, app_name: str, report: Any) -> None:
    """Both pools under the same light load through one restart: safepool
    (default settings) serves again within 100 ms of the server accepting
    connections, as asyncpg's pool does, raises no error of its own
    (ServerUnavailableError is opt-in), and, as asyncpg's pool, tries one
    connect per acquire while the server is down (pacing is opt-in too)."""
    import asyncpg

    names = {"asyncpg": f"{app_name}-a", "safepool": f"{app_name}-s"}
    pools: dict[str, Any] = {
        "asyncpg": await asyncpg.create_pool(
            running.dsn(), min_size=2, max_size=MAX_SIZE, server_settings={"application_name": names["asyncpg"]}
        ),
        "safepool": await safepool.create_pool(
            running.dsn(), min_size=2, max_size=MAX_SIZE, server_settings={"application_name": names["safepool"]}
        ),
    }
    async with SideBySide(pools, budget=2.0) as side:
        ledgers = side.ledgers
        with loop_errors() as unhandled:
            side.start(per_kind=3)
            await asyncio.sleep(0.5)  # the load before the outage (the workload)
            await until(lambda: all(ledger.ok for ledger in ledgers.values()))  # (waited for, not assumed)
            assert all(ledger.ok for ledger in ledgers.values())
            accepting_at, downtime, connects_while_down = await _restart(
                running, side, pools["safepool"], scale(2.0, 5.0)
            )
            await side.finish()
        assert not unhandled, unhandled
    recovery = side.recovery(accepting_at)
    report(
        downtime_s=round(downtime, 2),
        recovery_ms=side.in_ms(recovery),
        safepool_connect_attempts_while_down=connects_while_down,
        ledgers=side.summaries(),
    )
    # asyncpg before 0.32 takes longer itself to connect again (its own pool
    # measured 20-190 ms on a loaded 2-core machine, 0.32 1-40 ms): there the
    # bound is asyncpg's own recovery plus the same 100 ms.
    bound = 0.1 if asyncpg_version() >= (0, 32) else 0.1 + recovery["asyncpg"]
    assert recovery["safepool"] < bound, recovery
    assert "ServerUnavailableError" not in ledgers["safepool"].errors, ledgers["safepool"].summary()
    # Each acquire's own connect, and its error (those under way when the
    # server came back may have succeeded): no more.
    failed = sum(ledgers["safepool"].errors.values())
    assert connects_while_down <= failed + MAX_SIZE, (connects_while_down, ledgers["safepool"].summary())


async def test_recovery_through_a_host_name_with_two_addresses(
    running: Cluster, app_name: str, report: Any, loop_name: str
) -> None:
    """A DSN naming ``localhost``, which resolves to ``::1`` and
    ``127.0.0.1`` where /etc/hosts lists both (the server listens on the
    second only): while the server is down, both addresses refuse and
    asyncio raises a plain OSError("Multiple exceptions: [Errno 111] ...,
    [Errno 111] ..."), no errno. That is nothing answering, as one address
    refusing is: paced (``wait_on_connect_error``, as ``fail_fast``),
    safepool probes every few milliseconds and serves again within 100 ms
    of the server accepting (it was backed off as a wrong password, up to
    2 s, and served 0.4-1.6 s late)."""
    import socket

    if loop_name == "uvloop":
        # (Where it runs, the test's resolver below is not asked, and the
        # error is another: the test would not reach its case.)
        pytest.skip("asyncio's case: uvloop resolves a host name in C, not through loop.getaddrinfo, and raises "
                    "the first address's ConnectionRefusedError, never a 'Multiple exceptions' OSError")
    loop = asyncio.get_running_loop()
    resolve = loop.getaddrinfo

    async def both_addresses(host: Any, port: Any, **kwargs: Any) -> Any:
        if host == "localhost":  # as "::1 localhost" and "127.0.0.1 localhost" in /etc/hosts
            return [
                (socket.AF_INET6, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", ("::1", port, 0, 0)),
                (socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", ("127.0.0.1", port)),
            ]
        return await resolve(host, port, **kwargs)

    loop.getaddrinfo = both_addresses  # type: ignore[method-assign]
    dsn = running.dsn().replace("@127.0.0.1:", "@localhost:")
    pool = await safepool.create_pool(
        dsn, min_size=2, max_size=MAX_SIZE, server_settings={"application_name": app_name},
        wait_on_connect_error=True,
    )
    failures: list[str] = []
    pool.add_listener(lambda event: failures.append(event["error"]) if event["event"] == "connect_failed" else None)
    try:
        async with SideBySide({"safepool": pool}, budget=2.0) as side:
            with loop_errors() as unhandled:
                side.start(per_kind=3)
                await asyncio.sleep(0.3)  # the load before the outage (the workload)
                await until(lambda: side.ledgers["safepool"].ok > 0)  # (waited for, not assumed)
                assert side.ledgers["safepool"].ok
                accepting_at, downtime, connects_while_down = await _restart(running, side, pool, scale(2.0, 4.0))
                await side.finish()
            assert not unhandled, unhandled
    finally:
        del loop.getaddrinfo
    recovery = side.recovery(accepting_at)["safepool"]
    report(downtime_s=round(downtime, 2), recovery_ms=round(1000 * recovery, 1), attempts_while_down=connects_while_down)
    assert any("Multiple exceptions" in error for error in failures), failures[:3]  # (the case under test)
    assert recovery < 0.1, recovery
    # Probed, not hammered: at most one per 5 ms (unreachable_cap / 2).
    assert connects_while_down <= downtime / 0.005 + MAX_SIZE, connects_while_down


async def _restart(running: Cluster, side: SideBySide, pool: Any, seconds: float) -> tuple[float, float, int]:
    """Stop the server (fast shutdown), keep it down ``seconds``, start it,
    and wait until ``side``'s pools have served since it accepted again.
    Returns when it accepted, how long it was down, and the connects
    ``pool`` (a safepool pool) tried meanwhile."""
    await asyncio.to_thread(running.stop, "fast")
    errors_before = pool.stats().connect_errors
    down_at = time.monotonic()
    await asyncio.sleep(seconds)
    starting = asyncio.create_task(asyncio.to_thread(running.start))
    accepting_at = await _first_accepted_connect(running)
    connects_while_down = pool.stats().connect_errors - errors_before
    await side.served_since(accepting_at)
    await starting
    return accepting_at, accepting_at - down_at, connects_while_down


async def _first_accepted_connect(cluster: Cluster) -> float:
    """When the server accepts connections again (probing with fresh ones)."""
    import asyncpg

    while True:
        try:
            con = await asyncpg.connect(cluster.admin_dsn, timeout=1.0)
        except (TimeoutError, OSError, asyncpg.PostgresError):
            await asyncio.sleep(0.002)
            continue
        accepted = time.monotonic()
        await con.close()
        return accepted
