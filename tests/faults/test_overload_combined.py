"""Every overload feature at once (bulkheads, the adaptive queue,
max_waiters, fail_fast) through a real server outage: the server is
stopped under load from two acquire sites, then started again.

Checked: every error a caller sees is typed; each refusal is counted once,
by the counter of the error the caller got; the breaker goes up -> down
-> up (server_status events, in that order, each change once); the pool
serves again after the restart; the server never sees more than max_size
backends; the books balance."""

from __future__ import annotations

import asyncio
import collections
import time

import pytest

import safepool
from tests._util import until
from tests.faults._harness import Ledger, ServerSampler, assert_books_balance, closing, loop_errors

from ._pg import Cluster

pytestmark = [pytest.mark.asyncio, pytest.mark.realtime]


async def test_all_overload_features_through_an_outage(running: Cluster, app_name: str) -> None:
    max_size = 4
    pool = await safepool.create_pool(
        running.dsn(), min_size=2, max_size=max_size, max_site_share=0.5, queue_policy="adaptive",
        max_waiters=8, fail_fast=True, acquire_timeout=0.5,
        server_settings={"application_name": app_name},
    )
    statuses: list[tuple[str, str]] = []
    pool.add_event_listener(
        lambda e: statuses.append((e.previous, e.status)) if isinstance(e, safepool.events.ServerStatusChanged) else None
    )
    ledger = Ledger()
    caught: collections.Counter[str] = collections.Counter()
    phase = {"stop": False}

    async def client(site: str, hold: float) -> None:
        while not phase["stop"]:
            try:
                async with pool.acquire(site=site) as con:
                    await con.execute(f"SELECT pg_sleep({hold})")
                ledger.ok += 1
            except Exception as exc:  # noqa: BLE001 - classified below
                ledger.record(exc)
                for kind in (safepool.PoolOverloadedError, safepool.PoolTimeoutError, safepool.ServerUnavailableError):
                    if isinstance(exc, kind):
                        caught[kind.__name__] += 1
                await asyncio.sleep(0.005)

    async with closing(pool), ServerSampler(running.admin_dsn, app_name) as sampler:
        with loop_errors() as unhandled:
            tasks = [asyncio.create_task(client("slow", 0.05)) for _ in range(6)]
            tasks += [asyncio.create_task(client("fast", 0.002)) for _ in range(6)]
            await asyncio.sleep(0.5)  # the load before the outage (the workload)
            await until(lambda: ledger.ok > 0)  # (served: waited for, not assumed of the half second)
            served_before = ledger.ok
            running.stop("immediate")
            await asyncio.sleep(1.0)
            assert pool.stats().server_status == "down", pool.stats()
            running.start()
            running.wait_accepting()
            restarted = time.monotonic()
            ok_at_restart = ledger.ok
            await until(lambda: ledger.ok >= ok_at_restart + 20, timeout=10)
            recovery = time.monotonic() - restarted
            phase["stop"] = True
            await asyncio.gather(*tasks)
        assert not unhandled, unhandled
        ledger.check()
        stats = pool.stats()
        print(ledger.summary(), f"recovery={recovery:.3f}s", statuses, sampler.max_seen)
        assert served_before > 0
        assert caught["ServerUnavailableError"] >= 1, ledger.summary()
        # Each refusal counted once, by what the caller got.
        assert stats.unavailable_rejections == caught["ServerUnavailableError"], (stats, ledger.summary())
        assert stats.acquire_timeouts == caught["PoolTimeoutError"], (stats, ledger.summary())
        assert stats.overload_rejections + stats.shed + stats.admission_rejections == caught["PoolOverloadedError"], (
            stats, ledger.summary(),
        )
        # The breaker's transitions, each once, in order (backing_off may come between).
        path = [s for _, s in statuses]
        assert path[-1] == "up" and "down" in path, statuses
        assert all(a != b for a, b in statuses), statuses
        assert sampler.max_seen <= max_size
        await assert_books_balance(pool, sampler)
        pool._state.check_invariants()


async def test_all_overload_features_through_a_black_hole(running: Cluster, app_name: str) -> None:
    """The same pool through a TCP proxy that swallows everything (connects
    go unanswered until their timeout=): once the circuit opens, callers
    get ServerUnavailableError within about one connect timeout, never a
    wait to their acquire timeout (docs/backpressure.md: with the circuit
    open, connects under way do not hold the waiters); after the heal the
    pool serves within about a second; never more than max_size backends.
    (Without reset_timeout, when the cut leaves every connection under a
    lease, the slots count for 2 s while their cancel requests go
    unanswered: the callers wait to their acquire timeout, status "up";
    seen in 1 of 3 runs before reset_timeout was set here.)"""
    from ._proxy import FaultProxy

    max_size, connect_timeout = 4, 0.3
    async with FaultProxy(running.port) as proxy:
        pool = await safepool.create_pool(
            running.dsn(port=proxy.port), min_size=2, max_size=max_size, max_site_share=0.5,
            queue_policy="adaptive", max_waiters=8, fail_fast=True, acquire_timeout=2.0, timeout=connect_timeout,
            # The cancel request for each backend the cut left under a lease
            # goes unanswered too: its slot counts towards max_size until
            # reset_timeout (2 s without one), and with every slot so held no
            # connect is tried, so the breaker cannot open before then.
            reset_timeout=connect_timeout,
            server_settings={"application_name": app_name},
        )
        ledger = Ledger()
        slowest_unavailable = 0.0
        stop = asyncio.Event()

        async def client(site: str) -> None:
            nonlocal slowest_unavailable
            while not stop.is_set():
                started = time.monotonic()
                try:
                    async with pool.acquire(site=site) as con:
                        await con.execute("SELECT pg_sleep(0.005)")
                    ledger.ok += 1
                except Exception as exc:  # noqa: BLE001 - classified below
                    ledger.record(exc)
                    if isinstance(exc, safepool.ServerUnavailableError):
                        slowest_unavailable = max(slowest_unavailable, time.monotonic() - started)
                    await asyncio.sleep(0.01)

        async with closing(pool), ServerSampler(running.admin_dsn, app_name) as sampler:
            with loop_errors() as unhandled:
                tasks = [asyncio.create_task(client(site)) for site in ("a", "b") for _ in range(4)]
                await asyncio.sleep(0.3)
                proxy.blackhole = True
                proxy.reset_all()
                await asyncio.sleep(2.0)
                assert pool.stats().server_status == "down", pool.stats()
                during = ledger.summary()
                proxy.heal()
                healed = time.monotonic()
                ok_at_heal = ledger.ok
                await until(lambda: ledger.ok >= ok_at_heal + 10, timeout=10)
                recovery = time.monotonic() - healed
                stop.set()
                await asyncio.gather(*tasks)
            assert not unhandled, unhandled
            ledger.check()
            print(during, "|", ledger.summary(), f"recovery={recovery:.3f}s slowest_unavailable={slowest_unavailable:.3f}s")
            assert ledger.errors["ServerUnavailableError"] >= 1, ledger.summary()
            assert ledger.errors["PoolTimeoutError"] == 0, ledger.summary()
            assert slowest_unavailable < 1.0, slowest_unavailable  # (the acquire timeout is 2 s)
            assert recovery < 1.0, recovery
            assert sampler.max_seen <= max_size
            pool._state.check_invariants()
