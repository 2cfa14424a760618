"""What a long-running pool must not accumulate: structures that grew by one
entry per acquire site, per lease, per leak, per error... (a soak run's
findings, each pinned by counting the structure after N operations)."""

from __future__ import annotations

import asyncio
import gc
import weakref
from collections.abc import Callable
from typing import Any

import asyncpg
import pytest

import safepool
from safepool import _sites, _stack
from tests._util import skip_before_asyncpg, until

pytestmark = pytest.mark.asyncio


def generated_handler(number: int) -> Callable[[safepool.Pool], Any]:
    """A handler compiled at run time, as templates and notebook cells are:
    a new code object (and a new file name) each time."""
    source = (
        f"async def handler_{number}(pool):\n"
        "    async with pool.acquire() as con:\n"
        "        return await con.fetchval('SELECT 1')\n"
    )
    namespace: dict[str, Any] = {"__name__": "generated_handlers"}
    exec(compile(source, f"<generated-{number}>", "exec"), namespace)
    return namespace[f"handler_{number}"]  # type: ignore[no-any-return]


async def test_acquire_sites_compiled_at_run_time_do_not_accumulate(
    pools: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The site names (max_site_share) and the stack capture's file kinds
    # were cached per code object and per file name, unbounded: every
    # handler compiled at run time stayed in them (its code object kept
    # alive), one entry per acquire.
    monkeypatch.setattr(_sites, "SITE_CACHE_SIZE", 64, raising=False)
    monkeypatch.setattr(_stack, "KIND_CACHE_SIZE", 64, raising=False)
    monkeypatch.setattr(_sites, "_site_of_code", {})
    monkeypatch.setattr(_stack, "_kind_by_file", {})
    pool = await pools(max_size=2, max_site_share=0.5, capture_stack=True)
    for number in range(300):
        assert await generated_handler(number)(pool) == 1
    assert len(_sites._site_of_code) <= 64
    assert len(_stack._kind_by_file) <= 64
    # The cache still names the newest sites right (and the leak report's
    # stack still finds the handler's frame).
    handler = generated_handler(300)
    lease_sites: list[str | None] = []
    stacks: list[str | None] = []

    async def inspect_lease(pool: safepool.Pool) -> None:
        async with pool.acquire():
            (lease,) = pool.leases()
            lease_sites.append(lease.site)
            stacks.append(lease.acquired_at)

    namespace = {"__name__": "generated_handlers", "inspect_lease": inspect_lease}
    exec(compile("async def outer(pool):\n    await inspect_lease(pool)\n", "<generated-outer>", "exec"), namespace)
    await namespace["outer"](pool)
    assert lease_sites[0] is not None and lease_sites[0].endswith("inspect_lease")
    assert stacks[0] is not None and "inspect_lease" in stacks[0]
    assert await handler(pool) == 1
    gc.collect()
    stats = pool.stats()
    assert (stats.acquired, stats.released, stats.in_use) == (302, 302, 0)


class Request:
    """What a handler's frame holds (a request, its body): anything that
    keeps the frame alive keeps this."""


@pytest.mark.parametrize("options", [{"max_site_share": 1.0}, {"queue_policy": "adaptive"}, {}])
async def test_settled_waiters_do_not_keep_their_callers_alive(
    pools: Callable[..., Any], options: dict[str, Any]
) -> None:
    # With site caps or the adaptive queue, the core's wait queue was popped
    # only when it held more than 64 entries: a pool that went back to
    # uncontended kept up to 64 settled waiters for good, and with each its
    # future, its PoolTimeoutError, that error's traceback and every frame
    # on it (the caller's locals: a request, its body, the proxies it held).
    clock = safepool.ManualClock()
    pool = await pools(min_size=2, max_size=2, clock=clock, **options)
    held = [await pool.acquire(), await pool.acquire()]
    requests: list[weakref.ref[Request]] = []

    async def handler(give_up: str) -> None:
        request = Request()
        requests.append(weakref.ref(request))
        if give_up == "timeout":
            with pytest.raises(safepool.PoolTimeoutError):
                await pool.acquire(timeout=1.0)
        else:
            async with pool.acquire(timeout=None):
                pass

    # (The adaptive queue's admission would refuse a wait whose timeout the
    # manual clock's pace of hand-ons cannot meet: its waiters give up by
    # cancellation only.)
    timeouts = "queue_policy" not in options
    for _ in range(10):
        if timeouts:
            timing_out = asyncio.ensure_future(handler("timeout"))
            await until(lambda: pool.stats().waiting == 1)
            clock.advance(1.5)
            await timing_out
        cancelled = asyncio.ensure_future(handler("cancel"))
        await until(lambda: pool.stats().waiting == 1)
        cancelled.cancel()
        with pytest.raises(asyncio.CancelledError):
            await cancelled
        served = asyncio.ensure_future(handler("served"))
        await until(lambda: pool.stats().waiting == 1)
        await pool.release(held.pop())
        await served
        held.append(await pool.acquire())
    for con in held:
        await pool.release(con)
    async with pool.acquire() as con:
        assert await con.fetchval("SELECT 1") == 1
    gc.collect()
    assert len(pool._state._waiters) == 0
    assert len(requests) == (30 if timeouts else 20)
    assert [ref() for ref in requests] == [None] * len(requests)
    stats = pool.stats()
    assert (stats.acquire_timeouts, stats.waiting, stats.in_use) == (10 if timeouts else 0, 0, 0)


async def test_a_busy_sites_settled_waiters_are_not_kept(pools: Callable[..., Any]) -> None:
    # A site's book lives as long as the site holds a connection (a
    # consumer that never lets go of one); its queue kept its settled
    # waiters (up to 32) as long, with their callers' frames.
    clock = safepool.ManualClock()
    pool = await pools(min_size=2, max_size=2, clock=clock, max_site_share=0.5)
    consumer = await pool.acquire(site="consumer")  # held throughout
    requests: list[weakref.ref[Request]] = []

    async def handler() -> None:
        request = Request()
        requests.append(weakref.ref(request))
        with pytest.raises(safepool.PoolTimeoutError):
            await pool.acquire(site="consumer", timeout=1.0)

    for _ in range(20):
        task = asyncio.ensure_future(handler())
        await until(lambda: pool.stats().waiting == 1)
        if len(requests) % 2 == 0:  # (the last one times out)
            clock.advance(1.5)
            await task
        else:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
    gc.collect()
    policy = pool._state._policy
    assert policy is not None and len(policy.books["consumer"].queue) == 0
    assert [ref() for ref in requests] == [None] * 20
    await pool.release(consumer)
    assert pool.stats().acquire_timeouts == 10


async def _close_by(how: str, pool: Any, pid: int, pg_dsn: str) -> None:
    """Close the (only) connection of ``pool`` (backend ``pid``), whose
    released proxy the test keeps, the way ``how`` names (asyncpg's pool or
    safepool's: public calls only)."""
    if how == "expire_connections":
        await pool.expire_connections()
        async with pool.acquire() as con:  # (the expired connection is closed at this acquire)
            await con.fetchval("SELECT 1")
    elif how == "pool_close":
        await pool.close()
    elif how == "max_queries":
        async with pool.acquire() as con:  # (its second query: closed on release)
            await con.fetchval("SELECT 1")
    elif how == "terminate_backend":
        admin = await asyncpg.connect(pg_dsn)
        try:
            assert await admin.fetchval("SELECT pg_terminate_backend($1)", pid)
        finally:
            await admin.close()
    elif how == "proxy_terminate":
        pass  # (terminated through the proxy during its lease: see below)


@pytest.mark.parametrize("pool_kind", ["asyncpg", "safepool"])
@pytest.mark.parametrize(
    "how", ["expire_connections", "pool_close", "max_queries", "terminate_backend", "proxy_terminate"]
)
async def test_a_kept_released_proxy_does_not_keep_its_closed_connection(pool_kind: str, how: str, pg_dsn: str) -> None:
    # A program that keeps a released proxy (a request object, a cache)
    # must not keep the connection and its asyncpg protocol alive once the
    # pool has closed it. safepool's holder kept two bound methods of the
    # connection for its releases, and the closed slot kept the connection.
    if pool_kind == "asyncpg" and how in ("pool_close", "terminate_backend"):
        # (Before 0.32 asyncpg's own pool keeps the connection there: the
        # reference holds from 0.32; safepool lets go on every version.)
        skip_before_asyncpg((0, 32), "its pool lets go of a closed connection a released proxy's holder had")
    create = asyncpg.create_pool if pool_kind == "asyncpg" else safepool.create_pool
    pool = await create(pg_dsn, min_size=1, max_size=1, max_queries=2 if how == "max_queries" else 50_000)
    try:
        async with pool.acquire() as proxy:
            pid = proxy.get_server_pid()
            await proxy.fetchval("SELECT 1")
            raw = proxy._con if pool_kind == "asyncpg" else proxy._raw
            connection, protocol = weakref.ref(raw), weakref.ref(raw._protocol)
            del raw
            if how == "proxy_terminate":
                proxy.terminate()
        await _close_by(how, pool, pid, pg_dsn)

        def collected() -> bool:
            gc.collect()
            return connection() is None and protocol() is None

        await until(collected)
        # The proxy is still the released one it was.
        with pytest.raises(asyncpg.InterfaceError, match="released"):
            await proxy.fetchval("SELECT 1")
    finally:
        await pool.close()
