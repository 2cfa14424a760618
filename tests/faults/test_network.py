"""Network faults through a loopback TCP proxy: latency, a black hole,
resets mid-query. Deadlines must hold: nothing hangs past its timeout."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from typing import Any

import asyncpg
import pytest

import safepool
from tests._util import until

from ._harness import (
    Ledger,
    ServerSampler,
    SideBySide,
    assert_books_balance,
    classify,
    closing,
    held_through_a_black_hole,
    loop_errors,
    scale,
    settle,
)
from ._pg import Cluster
from ._proxy import FaultProxy

pytestmark = [pytest.mark.asyncio, pytest.mark.realtime]

SLACK = 0.25  # scheduling slack on a loaded 2-core machine


async def test_latency_acquire_timeouts_fire_on_time(running: Cluster, app_name: str, report: Any) -> None:
    async with FaultProxy(running.port) as proxy:
        pool = await safepool.create_pool(
            running.dsn(port=proxy.port), min_size=2, max_size=2, acquire_timeout=0.3,
            server_settings={"application_name": app_name},
        )
        proxy.latency = 0.05  # each round trip now costs >= 100 ms
        ledger = Ledger()
        late: list[float] = []
        waits: list[float] = []
        deadline = time.monotonic() + scale(3.0, 10.0)

        async def client() -> None:
            while time.monotonic() < deadline:
                started = time.monotonic()
                try:
                    async with pool.acquire() as con:
                        waits.append(time.monotonic() - started)
                        await con.fetchval("SELECT 1")
                    ledger.ok += 1
                except safepool.PoolTimeoutError as exc:
                    waited = time.monotonic() - started
                    if waited > 0.3 + SLACK:
                        late.append(waited)
                    ledger.record(exc)
                except Exception as exc:
                    ledger.record(exc)

        async with closing(pool), ServerSampler(running.admin_dsn, app_name) as sampler:
            with loop_errors() as unhandled:
                await asyncio.gather(*(client() for _ in range(8)))
                proxy.latency = 0.0
                await assert_books_balance(pool, sampler)
            assert not unhandled, unhandled
    ledger.check()
    report(ledger=ledger.summary(), max_wait_s=round(max(waits), 3), late=late)
    assert not late, f"acquire timeouts fired late: {late}"
    assert max(waits) < 0.3 + SLACK
    assert ledger.errors["PoolTimeoutError"] > 0 and ledger.ok > 0
    assert set(ledger.errors) == {"PoolTimeoutError"}, ledger.summary()
    assert sampler.max_seen <= 2


async def test_lease_timeout_takes_back_a_slow_query_under_latency(running: Cluster, app_name: str) -> None:
    async with FaultProxy(running.port) as proxy:
        pool = await safepool.create_pool(
            running.dsn(port=proxy.port), min_size=1, max_size=1, lease_timeout=0.3,
            server_settings={"application_name": app_name},
        )
        proxy.latency = 0.02
        async with closing(pool):
            with loop_errors() as unhandled:
                started = time.monotonic()
                async with pool.acquire() as con:
                    with pytest.raises((asyncpg.QueryCanceledError, safepool.LeaseExpiredError)):
                        await con.fetchval("SELECT pg_sleep(5)")
                held = time.monotonic() - started
                assert held < 0.3 + 1.0, f"the holder was stuck {held:.2f}s"
                # The connection was cancelled, reset and handed on, not lost.
                assert await pool.fetchval("SELECT 2") == 2
                await settle(pool)
                assert pool.stats().leases_expired == 1 and pool.get_size() == 1
            assert not unhandled, unhandled
            pool._state.check_invariants()


async def test_black_hole_connect_times_out_and_close_does_not_hang(running: Cluster, app_name: str) -> None:
    """The server's address accepts TCP and never answers: an acquire on an
    empty pool fails at its timeout, and closing the pool does not wait for
    the hanging connects (asyncpg's connect timeout is 60 s)."""
    async with FaultProxy(running.port) as proxy:
        proxy.blackhole = True
        pool = await safepool.create_pool(
            running.dsn(port=proxy.port), min_size=0, max_size=2,
            server_settings={"application_name": app_name},
        )
        with loop_errors() as unhandled:
            started = time.monotonic()
            with pytest.raises(safepool.PoolTimeoutError):
                await pool.acquire(timeout=0.5)
            assert time.monotonic() - started < 0.5 + SLACK
            assert pool.stats().connecting >= 1 and proxy.accepted >= 1
            started = time.monotonic()
            await asyncio.wait_for(pool.close(), 30)
            closed_in = time.monotonic() - started
        assert not unhandled, unhandled
        assert closed_in < 2.0, f"close() waited {closed_in:.1f}s for connects that never answer"
        assert pool._state.size == 0


@pytest.mark.parametrize("connect_timeout", [0.5, None], ids=["timeout=0.5", "timeout=default"])
async def test_recovery_after_a_black_hole_is_as_fast_as_asyncpgs(
    running: Cluster, app_name: str, report: Any, connect_timeout: float | None
) -> None:
    """Both pools, each through its own proxy, under the same light load:
    their connections are reset, new connects go unanswered for two
    seconds, then the network heals. safepool serves again about as soon as
    asyncpg's pool (which starts a connect on every acquire): its probe is
    retried as soon as it times out (the backoff runs from the attempt's
    start), a probe unanswered for hedge_after gets another beside it, and
    the connects the heal breaks together count once. Before: 0.5-1.4 s
    where asyncpg took 20-60 ms."""
    kwargs: dict[str, Any] = {} if connect_timeout is None else {"timeout": connect_timeout}
    async with FaultProxy(running.port) as proxy_a, FaultProxy(running.port) as proxy_s:
        proxies = {"asyncpg": proxy_a, "safepool": proxy_s}
        pools: dict[str, Any] = {
            "asyncpg": await asyncpg.create_pool(
                running.dsn(port=proxy_a.port), min_size=2, max_size=4,
                server_settings={"application_name": f"{app_name}-a"}, **kwargs,
            ),
            "safepool": await safepool.create_pool(
                running.dsn(port=proxy_s.port), min_size=2, max_size=4,
                server_settings={"application_name": f"{app_name}-s"}, **kwargs,
            ),
        }
        async with SideBySide(pools, budget=0.5) as side:
            with loop_errors():  # (asyncpg's pool leaves connect errors unretrieved: not ours to judge)
                side.start(per_kind=4)
                await until(lambda: all(side.successes.values()), timeout=10)
                errors_before = pools["safepool"].stats().connect_errors
                for proxy in proxies.values():
                    proxy.blackhole = True
                    proxy.reset_all()
                cut_at = time.monotonic()
                await asyncio.sleep(scale(2.0, 5.0))
                for proxy in proxies.values():
                    proxy.heal()
                healed_at = time.monotonic()
                await side.served_since(healed_at)
                attempts = pools["safepool"].stats().connect_errors - errors_before
                await side.finish()
    recovery = side.recovery(healed_at)
    report(
        recovery_ms=side.in_ms(recovery),
        safepool_failed_connects=attempts,
        ledgers=side.summaries(),
    )
    assert recovery["safepool"] < recovery["asyncpg"] + 0.1, recovery
    # Probes are not a storm: at most max_size under way, each ending at
    # its timeout (or at the heal).
    timeout = 60.0 if connect_timeout is None else connect_timeout
    assert attempts <= 4 * ((healed_at - cut_at) / timeout + 2), attempts


async def test_black_hole_mid_query_lease_timeout_bounds_the_holder(running: Cluster, app_name: str) -> None:
    """The network goes silent during a query: the lease timeout takes the
    connection back, the cancel request cannot get through either, and the
    reset deadline closes it: the holder is released within lease_timeout +
    reset_timeout. Once the network heals the pool serves again."""
    async with FaultProxy(running.port) as proxy:
        pool = await safepool.create_pool(
            running.dsn(port=proxy.port), min_size=2, max_size=2, lease_timeout=0.5, reset_timeout=0.5,
            acquire_timeout=0.5, timeout=2.0,  # connect timeout, passed to asyncpg.connect
            server_settings={"application_name": app_name},
        )
        async with closing(pool), ServerSampler(running.admin_dsn, app_name) as sampler:
            with loop_errors() as unhandled:
                held, holder_errors = await held_through_a_black_hole(pool, proxy)
                assert held < 0.5 + 0.5 + 2 * SLACK, f"holder stuck {held:.2f}s"
                assert holder_errors and all(classify(e) for e in holder_errors), holder_errors
                # While the network is silent, acquires end at their deadline.
                started = time.monotonic()
                try:
                    async with pool.acquire() as con:
                        await con.fetchval("SELECT 1")
                except Exception as exc:
                    assert classify(exc), exc
                assert time.monotonic() - started < 0.5 + 0.5 + 2 * SLACK
                proxy.heal()
                recovered_at = time.monotonic() + 10
                while True:
                    try:
                        assert await pool.fetchval("SELECT 3") == 3
                        break
                    except Exception as exc:
                        assert classify(exc), exc
                        assert time.monotonic() < recovered_at, "no recovery after the network healed"
                        await asyncio.sleep(0.05)
                await assert_books_balance(pool, sampler)
            assert not unhandled, unhandled


async def test_resets_mid_query_under_load(running: Cluster, app_name: str, report: Any) -> None:
    rng = random.Random(3)
    max_size = 4
    async with FaultProxy(running.port) as proxy:
        pool = await safepool.create_pool(
            running.dsn(port=proxy.port), min_size=2, max_size=max_size, acquire_timeout=2.0,
            server_settings={"application_name": app_name},
        )
        ledger = Ledger()
        resets = 0
        deadline = time.monotonic() + scale(3.0, 15.0)

        async def client() -> None:
            while time.monotonic() < deadline:
                try:
                    async with pool.acquire() as con:
                        await con.fetchval("SELECT pg_sleep(0.01)")
                    ledger.ok += 1
                except Exception as exc:
                    ledger.record(exc)
                    await asyncio.sleep(0.01)

        async with closing(pool), ServerSampler(running.admin_dsn, app_name) as sampler:
            with loop_errors() as unhandled:
                tasks = [asyncio.create_task(client()) for _ in range(12)]
                while time.monotonic() < deadline:
                    await asyncio.sleep(rng.uniform(0.1, 0.3))
                    resets += proxy.reset_all()
                await asyncio.wait_for(asyncio.gather(*tasks), 10)
                await assert_books_balance(pool, sampler)
                # The last reset_all() may have killed an idle connection whose
                # socket event the loop has not processed yet: its next
                # statement fails (so it would on asyncpg's pool) and the pool
                # replaces it. The one after must succeed.
                try:
                    assert await pool.fetchval("SELECT 1") == 1
                except asyncpg.PostgresConnectionError:
                    assert await pool.fetchval("SELECT 1") == 1
            assert not unhandled, unhandled
    ledger.check()
    report(connections_reset=resets, ledger=ledger.summary(), max_server_connections=sampler.max_seen)
    assert resets >= 10
    assert sampler.max_seen <= max_size, sampler.samples
    assert ledger.ok > 0


async def test_black_hole_during_the_reset_is_aborted_by_the_watchdog(
    running: Cluster, app_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No reset_timeout, no release timeout, no command_timeout: asyncpg's
    release would wait forever for a reset the network swallowed. safepool's
    reset watchdog (one pool timer, on the loop's real time whatever the
    pool's clock: it watches the network) aborts it after its
    DEFAULT_RESET_TIMEOUT (30 s, 0.5 s here): release() raises the
    connection's error and the slot is freed. Advancing the injected clock
    does not (review h263: a manual clock's jumps say nothing about the
    network)."""
    from safepool import _runner

    monkeypatch.setattr(_runner, "DEFAULT_RESET_TIMEOUT", 0.5)
    clock = safepool.ManualClock()
    async with FaultProxy(running.port) as proxy:
        pool = await safepool.create_pool(
            running.dsn(port=proxy.port), min_size=1, max_size=1, clock=clock,
            server_settings={"application_name": app_name},
        )
        async with closing(pool):
            con = await pool.acquire()
            await con.fetchval("SELECT 1")  # dirty: the release must reset
            proxy.blackhole = True
            release = asyncio.create_task(pool.release(con))
            # The reset starts (the watchdog armed on the loop's time) and
            # is sent, and swallowed.
            started = time.monotonic()
            await until(lambda: pool.stats().resetting == 1)
            assert not release.done()
            clock.advance(60.0)  # (the pool's clock: not the watchdog's)
            await asyncio.sleep(0.01)
            assert not release.done()
            with pytest.raises(asyncpg.PostgresConnectionError):
                await asyncio.wait_for(release, 5)
            assert time.monotonic() - started >= 0.45  # (the loop may run a timer a hair early)
            assert pool.get_size() == 0 or pool.stats().resetting == 0
            proxy.heal()
            assert await asyncio.wait_for(pool.fetchval("SELECT 5"), 10) == 5


async def test_network_cut_leaves_backends_only_the_server_can_end(running: Cluster, app_name: str) -> None:
    """A network cut the server does not see (no FIN or RST reaches it): the
    pool gives up its connections at their deadlines and, once the network
    heals, opens new ones; the abandoned backends live on, idle, until the
    server notices (tcp_user_timeout, keepalives: docs/reliability.md), so
    the server counts more than max_size for the pool's application_name.
    The pool's own books stay within max_size; asyncpg's pool does the same."""
    async with FaultProxy(running.port) as proxy:
        pool = await safepool.create_pool(
            running.dsn(port=proxy.port), min_size=2, max_size=2, command_timeout=0.5, reset_timeout=0.5,
            server_settings={"application_name": app_name},
        )
        async with closing(pool), ServerSampler(running.admin_dsn, app_name) as sampler:
            with loop_errors() as unhandled:
                leased = [await pool.acquire(), await pool.acquire()]
                proxy.partition = True
                for con in leased:
                    with pytest.raises(TimeoutError):
                        await con.fetchval("SELECT 1")
                    # Given up: its reset times out (TimeoutError), or asyncpg
                    # aborted it already when the cancel request could not
                    # get through (released without an error, as on
                    # asyncpg's pool): which comes first is timing.
                    with contextlib.suppress(TimeoutError):
                        await pool.release(con)
                assert pool.stats().in_use == 0 and pool.stats().idle == 0, pool
                proxy.heal()  # (a connect under way in the cut is reset: its waiter gets that error)
                with contextlib.suppress(ConnectionResetError):
                    await pool.fetchval("SELECT 1")
                assert await pool.fetchval("SELECT 1") == 1
                await until(lambda: pool.stats().idle == 2, timeout=10)
                seen = await sampler.count()
                assert pool.get_size() == 2 and seen == 4, (seen, pool)
                pool._state.check_invariants()
                proxy.reset_all()
                for orphan in proxy._orphans:
                    orphan.abort()  # what the server's TCP timeout would do
                await until(lambda: pool.stats().idle == 0, timeout=10)
            assert not unhandled, unhandled


async def test_reset_under_a_lease_still_cancels_the_backends_query(running: Cluster, app_name: str) -> None:
    """The connection is reset (an RST, as from a proxy or a network fault)
    while its lease runs a query: the server has not noticed (a backend in
    pg_sleep reads nothing from its socket), so the pool sends a cancel
    request for the backend, and the query ends at once instead of running
    its 30 s. (A connection the peer closed in order gets no cancel
    request: tests/faults/test_pgbouncer_outage.py.)"""
    async with FaultProxy(running.port) as proxy:
        pool = await safepool.create_pool(
            running.dsn(port=proxy.port), min_size=1, max_size=1, server_settings={"application_name": app_name},
        )
        admin = await asyncpg.connect(running.admin_dsn)
        try:
            async with closing(pool):
                with loop_errors() as unhandled:
                    async with pool.acquire() as con:
                        pid = con.get_server_pid()
                        query = asyncio.ensure_future(con.fetchval("SELECT pg_sleep(30)"))
                        async with asyncio.timeout(5):
                            while await admin.fetchval(
                                "SELECT wait_event FROM pg_stat_activity WHERE pid = $1", pid
                            ) != "PgSleep":
                                await asyncio.sleep(0.005)
                        assert proxy.reset_all() == 1
                        with pytest.raises((asyncpg.ConnectionDoesNotExistError, ConnectionError)):
                            await query
                    started = time.monotonic()
                    async with asyncio.timeout(5):
                        while await admin.fetchval(
                            "SELECT state FROM pg_stat_activity WHERE pid = $1", pid
                        ) == "active":
                            await asyncio.sleep(0.01)
                    assert time.monotonic() - started < 2.0
                    assert await pool.fetchval("SELECT 1") == 1
                assert not unhandled, unhandled
        finally:
            await admin.close()
