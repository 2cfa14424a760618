"""Review s62 (helper-190): a lost grant whose task is refused when it
queues again, on a real server.

``Leaser.acquire`` (safepool/_leasing.py) claims a granted connection when
the task resumes; if the connection died in between (``SlotLost``) the
task loops: ``try_acquire``, then ``enqueue``, draining after a refused
enqueue (``except Overloaded`` / ``except Unavailable``) only if the core
appended actions. With a queue policy the lost claim gives its site's
place back (``PoolState.claim`` -> ``_policy_released(plan=True)``), so
the site's tasks waiting at its cap become eligible: a connect under way
that nobody waits on becomes their orphan, presumed lost at its start
plus the hedge delay, and ``connects_to_watch`` is set, with no action.
When the retry is refused, nothing drains: no timer is armed for the lost
deadline, ``connects_to_watch`` stays set, and the eligible task waits on
the black-holed connect (for its 60 s connect timeout) where the hedge
would have served it 0.1 s after the connect started.

The core's half of each refusal (``max_waiters``' ``Overloaded``, the
adaptive queue's ``Inadmissible``, the breaker's ``Unavailable`` with the
probe's deadline) is pinned in tests/unit/test_review_s62_lost_grant.py.
Fixed: ``Leaser.acquire`` drains after a lost claim (``except SlotLost:
self.drain()``; rare, off the hot path), before the retry that a refusal
may cut short. Both tests failed before the fix.

The window between the grant and the task resuming is held open as in
tests/integration/test_review_s24.py (its ``Gate``): the granted
connection's backend is ended with ``pg_terminate_backend`` meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import asyncpg
import pytest

import safepool
from safepool._state import WaiterState
from tests._util import step_to, until
from tests.integration.test_review_s24 import Gate

from ._pg import Cluster
from ._proxy import FaultProxy
from .test_review_s61_connect_timers import HEDGE_AFTER, GuardedClock, connect_starts, until_accepted

pytestmark = [pytest.mark.asyncio]


def queued(pool: Any, site: str) -> list[Any]:
    return [w for w in pool._state._waiters if w.state is WaiterState.WAITING and w.site == site]


async def test_a_lost_grant_refused_by_the_adaptive_admission_still_hedges_the_orphan_for_the_eligible_task(
    running: Cluster, admin: asyncpg.Connection, app_name: str
) -> None:
    """``max_size=2``, ``max_site_share=0.5`` (a cap of 1 per site), the
    adaptive queue (``queue_interval`` long: it never stands). Nine
    releases 0.5 s apart, each to a waiting task, measure the drain rate
    (a connection per ~0.3 s). Task A1 (``timeout=0.6``) and task B queue;
    a leased connection is closed and its replacement, opened for A1, goes
    into a black hole; a release serves A1 (a grant, its wake-up held back)
    and B gives up: the connect is nobody's, and no eligible task waits.
    A2 queues at site a's cap. A1's granted connection's backend is
    terminated before A1 resumes: its claim is lost, A2 is eligible, and
    the connect is A2's orphan, presumed lost at its start + 0.1 s. A1
    queues again with 0.45 s left and a task ahead: the deadline-aware
    admission refuses it (``PoolOverloadedError``, right). Expected: at the
    orphan's lost deadline it is cancelled and A2's own connect (the
    network healed) serves A2. Found: no timer was armed for it (the
    refusal appended no action, so ``Leaser.acquire`` did not drain), and
    A2 still waits; ``connects_to_watch`` is still set."""
    clock = GuardedClock()
    async with FaultProxy(running.port) as proxy:
        pool = await safepool.create_pool(
            running.dsn(port=proxy.port), min_size=0, max_size=2, clock=clock, max_site_share=0.5,
            queue_policy="adaptive", queue_target=0.05, queue_interval=1000.0,
            server_settings={"application_name": app_name},
        )
        tasks: list[asyncio.Future[Any]] = []
        try:
            held_q = await pool.acquire(site="q")
            lease = await pool.acquire(site="p")
            for i in range(10):
                tasks.append(asyncio.ensure_future(pool.acquire(site=f"s{i}")))
                await until(lambda n=i + 1: pool.stats().waiting == n)  # type: ignore[misc]
            for i in range(9):
                clock.advance(0.5)
                await pool.release(lease)
                lease = await asyncio.wait_for(tasks[i], 5)
            tasks[9].cancel()
            await until(lambda: pool.stats().waiting == 0)
            gap = pool._state._policy.adaptive.gap  # type: ignore[union-attr]
            assert 0.25 < gap < 0.4, gap  # (A1 admitted at first, refused with 0.45 s left)

            a1 = asyncio.ensure_future(pool.acquire(site="a", timeout=0.6))
            tasks.append(a1)
            await until(lambda: len(queued(pool, "a")) == 1)
            [waiter] = queued(pool, "a")
            b = asyncio.ensure_future(pool.acquire(site="b", timeout=10))
            tasks.append(b)
            await until(lambda: pool.stats().waiting == 2)
            clock.advance(0.15)
            proxy.blackhole = True
            held_q.terminate()  # (its replacement, opened for A1, goes unanswered)
            await until_accepted(proxy, 3)
            proxy.blackhole = False  # (the black-holed connect stays unanswered)
            [started] = connect_starts(pool)
            gate = Gate(waiter.future)
            await pool.release(lease)
            await gate.fired.wait()
            assert waiter.state is WaiterState.GRANTED
            b.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await b
            a2 = asyncio.ensure_future(pool.acquire(site="a"))
            tasks.append(a2)
            await until(lambda: len(queued(pool, "a")) == 1)
            slot = waiter.slot
            assert await admin.fetchval("SELECT pg_terminate_backend($1)", slot.connection.get_server_pid())
            await until(lambda: slot.state.value in ("closing", "closed"))
            assert pool._state.next_deadline() is None  # (nothing due yet: A2 waits at its cap)
            gate.open()
            with pytest.raises(safepool.PoolOverloadedError, match="cannot be served within its timeout"):
                await asyncio.wait_for(a1, 5)
            lost_at = started + HEDGE_AFTER
            assert pool._state.next_deadline() == lost_at
            step_to(clock, lost_at)  # (a timer armed for the lost deadline fires)
            await until(lambda: proxy.accepted == 4, timeout=1)
            con = await asyncio.wait_for(a2, 5)
            assert await con.fetchval("SELECT 1") == 1
            assert not pool._state.connects_to_watch
            await pool.release(con)
        finally:
            for task in tasks:
                task.cancel()
            pool.terminate()


async def test_a_lost_grant_refused_by_the_breaker_still_probes_at_the_backoffs_end_for_the_eligible_task(
    running: Cluster, admin: asyncpg.Connection, app_name: str
) -> None:
    """``fail_fast=True`` (paced connects, the breaker at 3 failures),
    ``max_size=2``, ``max_site_share=0.5`` (a cap of 1 per site). Site a
    holds the one connection; three connects of site b are refused (the
    proxy not listening), the last one's backoff running. A1 and A2 queue
    at a's cap (no task needs a connect: no probe is due). The release
    serves A1 (its wake-up held back) and the connection's backend is
    terminated before A1 resumes: its claim is lost, A2 is eligible, and a
    probe is due at the backoff's end. A1 queues again and the breaker
    refuses it (no connection left, in the backoff, no connect under way:
    ``ServerUnavailableError``, right). Expected: at the backoff's end the
    probe starts (the server answers now) and serves A2. Found: no timer
    was armed for it (the refusal appended no action, so
    ``Leaser.acquire`` did not drain, and ``connects_to_watch`` is not set
    with no connect under way): the only timer is the stale-failure check
    60 s after the last failure, and A2 waits until then."""
    clock = GuardedClock()
    async with FaultProxy(running.port) as proxy:
        pool = await safepool.create_pool(
            running.dsn(port=proxy.port), min_size=0, max_size=2, clock=clock, fail_fast=True,
            max_site_share=0.5, server_settings={"application_name": app_name},
        )
        tasks: list[asyncio.Future[Any]] = []
        try:
            held = await pool.acquire(site="a")
            async with proxy.refusing_new_connections():
                for failures in (1, 2, 3):
                    refused = asyncio.ensure_future(pool.acquire(site="b"))
                    tasks.append(refused)
                    if failures > 1:
                        await until(lambda: pool.stats().waiting == 1)
                        step_to(clock, pool._state.backoff_until)  # (the probe)
                    with pytest.raises(OSError):
                        await asyncio.wait_for(refused, 5)
                    assert pool.stats().consecutive_connect_failures == failures
            probe_at = pool._state.backoff_until
            assert clock.now() < probe_at
            a1 = asyncio.ensure_future(pool.acquire(site="a"))
            tasks.append(a1)
            await until(lambda: len(queued(pool, "a")) == 1)
            [waiter] = queued(pool, "a")
            a2 = asyncio.ensure_future(pool.acquire(site="a"))
            tasks.append(a2)
            await until(lambda: len(queued(pool, "a")) == 2)
            assert pool._state.next_deadline() != probe_at  # (no task needs a connect yet)
            gate = Gate(waiter.future)
            pid = held.get_server_pid()
            await pool.release(held)
            await gate.fired.wait()
            assert waiter.state is WaiterState.GRANTED
            slot = waiter.slot
            assert await admin.fetchval("SELECT pg_terminate_backend($1)", pid)
            await until(lambda: slot.state.value in ("closing", "closed"))
            accepted = proxy.accepted
            gate.open()
            with pytest.raises(safepool.ServerUnavailableError):
                await asyncio.wait_for(a1, 5)
            assert pool._state.next_deadline() == probe_at
            step_to(clock, probe_at)  # (a timer armed for the probe fires)
            await until(lambda: proxy.accepted == accepted + 1, timeout=1)
            con = await asyncio.wait_for(a2, 5)
            assert await con.fetchval("SELECT 1") == 1
            await pool.release(con)
        finally:
            for task in tasks:
                task.cancel()
            pool.terminate()
