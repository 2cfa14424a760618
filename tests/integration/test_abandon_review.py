"""Connects a task took over and the pool presumed lost (an ``Abandon``):
its cancellation ignored, close() and terminate() during it, many waiters
on max_size=1, a taker cancelled twice, the min_size upkeep's connect, and
the sockets a black hole leaves, beside asyncpg's pool. These run on real
time: the hedge delay (0.1 s) is what presumes a connect lost."""

from __future__ import annotations

import asyncio
import gc
from typing import Any

import asyncpg
import pytest

import safepool
from tests._util import relay_to_unix, until

pytestmark = pytest.mark.realtime


class HeldConnect:
    """A ``connect=`` callable that counts its calls, and those under way
    (``most``: their peak), and holds the calls ``holds(n)`` picks (n from
    1) until ``release`` is set. A held call that is cancelled sets
    ``cancelling`` and takes ``cleanup`` seconds to end (its socket still
    open, as a connect being torn down)."""

    def __init__(self, holds: Any, cleanup: float) -> None:
        self.holds = holds
        self.cleanup = cleanup
        self.release = asyncio.Event()
        self.entered = asyncio.Event()
        self.cancelling = asyncio.Event()
        self.calls = self.live = self.most = 0

    async def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        self.live += 1
        self.most = max(self.most, self.live)
        try:
            if self.holds(self.calls):
                self.entered.set()
                try:
                    await self.release.wait()
                except asyncio.CancelledError:
                    self.cancelling.set()
                    await asyncio.sleep(self.cleanup)
                    raise
            return await asyncpg.connect(*args, **kwargs)
        finally:
            self.live -= 1


@pytest.mark.asyncio
async def test_an_abandoned_connect_that_ignores_its_cancellation_leaves_its_taker_served(pg_dsn: str) -> None:
    """max_size=1: an acquire times out while its connect hangs, the next
    acquire takes the connect over and, after the hedge delay, has it
    abandoned (cancelled). The connect= callable swallows the cancellation
    and connects anyway: the pool aborts that connection
    (connect_succeeded returns False) and frees its place, so the waiting
    acquire gets a connect of its own at once."""
    gate = asyncio.Event()
    entered = asyncio.Event()
    calls = 0

    async def connect(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 1:
            entered.set()
            try:
                await gate.wait()
            except asyncio.CancelledError:
                pass  # ignores it: connects anyway
        return await asyncpg.connect(*args, **kwargs)

    pool = await safepool.create_pool(pg_dsn, min_size=0, max_size=1, connect=connect)
    try:
        first = asyncio.ensure_future(pool.acquire(timeout=0.2))
        await entered.wait()
        with pytest.raises(asyncio.TimeoutError):
            await first
        async with pool.acquire(timeout=3) as con:
            assert await con.fetchval("SELECT 1") == 1
        assert calls == 2
        pool._state.check_invariants()
    finally:
        gate.set()
        pool.terminate()


@pytest.mark.asyncio
@pytest.mark.parametrize("how", ["close", "terminate"])
async def test_close_while_an_abandoned_connect_is_being_cancelled(pg_dsn: str, how: str) -> None:
    connect = HeldConnect(lambda n: n == 1, cleanup=0.5)  # (a slow cleanup)
    pool = await safepool.create_pool(pg_dsn, min_size=0, max_size=1, connect=connect)
    try:
        first = asyncio.ensure_future(pool.acquire(timeout=0.2))
        await connect.entered.wait()
        with pytest.raises(asyncio.TimeoutError):
            await first
        second = asyncio.ensure_future(pool.acquire(timeout=5))
        await asyncio.wait_for(connect.cancelling.wait(), 2)
        assert pool.stats().connecting == 1
        pool._state.check_invariants()
        if how == "close":
            await asyncio.wait_for(pool.close(), 3)
        else:
            pool.terminate()
        with pytest.raises(safepool.errors.PoolClosedError):
            await second
        assert pool.get_size() == 0
        assert connect.most <= 1
        assert pool.stats().connecting == 0
    finally:
        connect.release.set()
        pool.terminate()


@pytest.mark.asyncio
async def test_many_waiters_max_size_1_black_hole_never_exceeds_max_size(pg_dsn: str) -> None:
    healed = asyncio.Event()
    connect = HeldConnect(lambda n: not healed.is_set(), cleanup=0.05)
    pool = await safepool.create_pool(pg_dsn, min_size=0, max_size=1, connect=connect)
    try:
        outcomes = await asyncio.gather(
            *(pool.acquire(timeout=0.05 + 0.02 * i) for i in range(20)), return_exceptions=True
        )
        assert all(isinstance(o, asyncio.TimeoutError) for o in outcomes), outcomes
        pool._state.check_invariants()
        assert connect.most <= 1
        before = connect.calls
        healed.set()

        async def use() -> int:
            async with pool.acquire(timeout=3) as con:
                return int(await con.fetchval("SELECT 1"))

        assert await asyncio.gather(*(use() for _ in range(10))) == [1] * 10
        pool._state.check_invariants()
        assert connect.most <= 1
        assert connect.calls - before <= 3, connect.calls - before
        assert pool.get_size() == 1
    finally:
        connect.release.set()
        pool.terminate()


@pytest.mark.asyncio
async def test_taker_cancelled_twice(pg_dsn: str) -> None:
    hanging = asyncio.Event()
    calls = 0
    entered = asyncio.Event()

    async def connect(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls <= 2:
            entered.set()
            await hanging.wait()
        return await asyncpg.connect(*args, **kwargs)

    pool = await safepool.create_pool(pg_dsn, min_size=0, max_size=1, connect=connect)
    try:
        first = asyncio.ensure_future(pool.acquire())
        await entered.wait()
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        second = asyncio.ensure_future(pool.acquire(timeout=3))
        await until(lambda: calls == 2)  # past the hedge delay: abandoned, its own connect (hangs too)
        second.cancel()
        second.cancel()
        with pytest.raises(asyncio.CancelledError):
            await second
        pool._state.check_invariants()
        async with pool.acquire(timeout=3) as con:
            assert await con.fetchval("SELECT 1") == 1
        pool._state.check_invariants()
        assert pool.get_size() == 1
    finally:
        hanging.set()
        pool.terminate()


@pytest.mark.asyncio
async def test_floor_upkeep_connect_adopted_then_abandoned(pg_dsn: str, caplog: pytest.LogCaptureFixture) -> None:
    mode = "ok"
    calls = 0
    hanging = asyncio.Event()
    hung = asyncio.Event()

    async def connect(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        if mode == "refuse":
            raise ConnectionRefusedError(111, "Connection refused")
        if mode == "hole":
            hung.set()
            await hanging.wait()
        return await asyncpg.connect(*args, **kwargs)

    pool = await safepool.create_pool(pg_dsn, min_size=1, max_size=2, connect=connect)
    try:
        mode = "refuse"
        async with pool.acquire() as con:
            pid = con.get_server_pid()
        admin = await asyncpg.connect(pg_dsn)
        await admin.execute("SELECT pg_terminate_backend($1)", pid)
        await admin.close()
        for _ in range(200):
            if pool.stats().connect_errors >= 1:
                break
            await asyncio.sleep(0.01)
        assert pool.stats().connect_errors >= 1
        mode = "hole"
        await asyncio.wait_for(hung.wait(), 5)  # the floor upkeep's connect (after 1 s)
        before = calls
        with pytest.raises(asyncio.TimeoutError):
            await pool.acquire(timeout=0.5)
        pool._state.check_invariants()
        mode = "ok"
        async with pool.acquire(timeout=3) as con:
            assert await con.fetchval("SELECT 1") == 1
        pool._state.check_invariants()
        await asyncio.sleep(1.0)  # (no busy loop: few connects meanwhile)
        pool._state.check_invariants()
        assert calls - before < 15
        assert pool.get_size() >= 1
        assert pool.stats().connecting <= 1
    finally:
        hanging.set()
        pool.terminate()
        await until(lambda: not pool._runner.tasks)  # (the hung connect's task ends)
        gc.collect()
        await asyncio.sleep(0)  # (the loop's exception handler runs as a callback)
    assert not [r for r in caplog.records if "never retrieved" in r.getMessage()]


class UnixProxy:
    """TCP in front of the test server's Unix socket; ``hole``: new
    connections are accepted and never answered. ``open``: client sockets
    open now (one per connect the pool has under way or done)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.hole = False
        self.open = 0
        self.most = 0
        self.tasks: set[asyncio.Task[Any]] = set()

    def shut(self, server: asyncio.Server) -> None:
        """Stop listening and drop every proxied connection."""
        server.close()
        for task in list(self.tasks):
            task.cancel()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.open += 1
        self.most = max(self.most, self.open)
        self.tasks.add(asyncio.current_task())  # type: ignore[arg-type]
        try:
            if self.hole:
                while await reader.read(65536):
                    pass
                return
            await relay_to_unix(reader, writer, self.path)
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            self.open -= 1
            self.tasks.discard(asyncio.current_task())  # type: ignore[arg-type]
            writer.transport.abort()


@pytest.mark.asyncio
@pytest.mark.parametrize("flavour", ["asyncpg", "safepool", "safepool-site-share", "safepool-adaptive"])
async def test_black_hole_sockets_never_exceed_max_size(pg_dsn: str, flavour: str) -> None:
    """Twelve acquires time out in a black hole (max_size=2), then new
    connections are answered while the swallowed ones stay unanswered: the
    next acquires are served at once, and the pool never holds more than
    max_size sockets (connects under way included)."""
    admin = await asyncpg.connect(pg_dsn)
    path = admin._addr  # (the test server listens on a Unix socket)
    await admin.close()
    proxy = UnixProxy(str(path))
    server = await asyncio.start_server(proxy.handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    factory = asyncpg.create_pool if flavour == "asyncpg" else safepool.create_pool
    policy = {"safepool-site-share": {"max_site_share": 1.0}, "safepool-adaptive": {"queue_policy": "adaptive"}}
    pool = await factory(
        pg_dsn, host="127.0.0.1", port=port, min_size=0, max_size=2, ssl=False, **policy.get(flavour, {})
    )
    try:
        proxy.hole = True
        outcomes = await asyncio.gather(
            *(pool.acquire(timeout=0.05 + 0.03 * i) for i in range(12)), return_exceptions=True
        )
        assert all(isinstance(o, asyncio.TimeoutError) for o in outcomes), outcomes
        proxy.hole = False  # new connections answered; swallowed ones stay unanswered

        async def use() -> int:
            async with pool.acquire(timeout=2) as con:
                return int(await con.fetchval("SELECT 1"))

        loop = asyncio.get_running_loop()
        started = loop.time()
        assert await asyncio.gather(*(use() for _ in range(6))) == [1] * 6
        took = loop.time() - started
        assert took < 1.0, took
        if flavour != "asyncpg":
            pool._state.check_invariants()
        assert proxy.most <= 2, proxy.most
    finally:
        pool.terminate()
        proxy.shut(server)


@pytest.mark.asyncio
async def test_a_connect_task_cancelled_before_it_ran_frees_its_place(pg_dsn: str) -> None:
    """An Abandon cancels the connect's task; a task cancelled before its
    first step never runs connect_slot's handlers, so nothing reported the
    connect's end and its slot counted towards max_size for ever (reached
    when the Abandon follows the Connect in one batch of actions, as when a
    Connect waited undrained past the hedge delay). The task's end now
    settles a slot it left connecting."""
    pool = await safepool.create_pool(pg_dsn, min_size=0, max_size=1)
    try:
        state, runner = pool._state, pool._runner
        slot = state.add_connecting(runner.now())
        task = runner.start_connect(slot)
        task.cancel()  # (before its first step)
        await asyncio.wait((task,))
        assert task.cancelled()
        async with pool.acquire(timeout=1) as con:
            assert await con.fetchval("SELECT 1") == 1
        state.check_invariants()
        assert pool.stats().connecting == 0
    finally:
        pool.terminate()


async def proxied(pg_dsn: str) -> tuple[UnixProxy, asyncio.Server, int]:
    """A :class:`UnixProxy` in front of the test server, listening; its port."""
    admin = await asyncpg.connect(pg_dsn)
    path = admin._addr  # (the test server listens on a Unix socket)
    await admin.close()
    proxy = UnixProxy(str(path))
    server = await asyncio.start_server(proxy.handle, "127.0.0.1", 0)
    return proxy, server, server.sockets[0].getsockname()[1]


@pytest.mark.asyncio
async def test_site_caps_a_capped_task_s_connect_does_not_hold_up_another_site(pg_dsn: str) -> None:
    """max_size=3, one connection per site: "z" holds the one connection,
    two "x" acquires queue and their connects go into a black hole, "z"
    releases (the first "x" acquire takes it: "x" is at its cap), and the
    network heals. A "y" acquire then waits beside two swallowed connects:
    the served "x" acquire's (nobody's now) and the second's (its own). The
    first is presumed lost after the hedge delay and cancelled, and "y"
    gets a connect of its own, answered. Before, the capped "x" task's
    connect counted as covering "y", and "y" timed out (the swallowed
    connects held max_size until their timeout=, 60 s)."""
    proxy, server, port = await proxied(pg_dsn)
    pool = await safepool.create_pool(
        pg_dsn, host="127.0.0.1", port=port, min_size=0, max_size=3, ssl=False, max_site_share=1 / 3
    )
    waiting: list[asyncio.Future[Any]] = []
    try:
        held = await pool.acquire(site="z")
        proxy.hole = True
        waiting = [asyncio.ensure_future(pool.acquire(site="x", timeout=10)) for _ in range(2)]
        await until(lambda: pool.stats().connecting >= 2)
        await pool.release(held)
        first = await asyncio.wait_for(waiting[0], 1)
        proxy.hole = False  # new connections answered; swallowed ones stay unanswered
        async with pool.acquire(site="y", timeout=1.5) as con:
            assert await con.fetchval("SELECT 1") == 1
        pool._state.check_invariants()
        assert not waiting[1].done()
        await pool.release(first)
        assert proxy.most <= 3, proxy.most
    finally:
        for future in waiting:
            future.cancel()
        pool.terminate()
        proxy.shut(server)


@pytest.mark.asyncio
async def test_site_caps_an_abandoned_connect_s_end_keeps_the_caps(pg_dsn: str) -> None:
    """max_size=4, one connection per site: "x", "y" and "w" hold one each;
    a "z" acquire times out while its connect hangs, another "z" acquire
    and an "x" one queue ("x" at its cap), and after the hedge delay the
    connect is cancelled, its connect= callable taking 0.3 s to end. Then
    "y" releases ("z" takes it) and "w" releases (idle: only "x", at its
    cap, waits). The cancelled connect's end handed that idle connection
    to the "x" acquire past the policy (the default queue's rule): "x"
    held two, over its cap, and the site books no longer added up."""
    hold = False
    connect = HeldConnect(lambda n: hold, cleanup=0.3)
    pool = await safepool.create_pool(pg_dsn, min_size=0, max_size=4, max_site_share=0.25, connect=connect)
    capped: asyncio.Future[Any] | None = None
    try:
        leases = [await pool.acquire(site=site) for site in "xyw"]
        hold = True
        with pytest.raises(asyncio.TimeoutError):
            await pool.acquire(site="z", timeout=0.05)
        later = asyncio.ensure_future(pool.acquire(site="z", timeout=5))
        capped = asyncio.ensure_future(pool.acquire(site="x", timeout=5))
        await asyncio.wait_for(connect.cancelling.wait(), 2)
        await pool.release(leases[1])
        await pool.release(await asyncio.wait_for(later, 1))
        await pool.release(leases[2])
        while connect.live:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
        assert not capped.done()
        pool._state.check_invariants()
        await pool.release(leases[0])
        await pool.release(await asyncio.wait_for(capped, 1))
        pool._state.check_invariants()
        assert pool.get_size() <= 4
    finally:
        if capped is not None:
            capped.cancel()
        connect.release.set()
        pool.terminate()


class CountingClock(safepool.ManualClock):
    """A ManualClock that fails a callback scheduled for a time already past
    more than 100 times at one reading (a timer due again as it fires: a
    busy loop, for ever within one ``advance()`` on this clock)."""

    def __init__(self, start: float) -> None:
        super().__init__(start)
        self.past: dict[float, int] = {}

    def call_at(self, when: float, callback: Any) -> Any:
        if when <= self.now():
            self.past[self.now()] = count = self.past.get(self.now(), 0) + 1
            if count > 100:
                raise AssertionError(f"a timer due at {when!r} re-armed {count} times at {self.now()!r}")
        return super().call_at(when, callback)


@pytest.mark.asyncio
@pytest.mark.parametrize("policy", [{}, {"max_site_share": 1.0}, {"queue_policy": "adaptive"}])
async def test_a_lost_connect_s_timer_fires_once_on_a_manual_clock(pg_dsn: str, policy: dict[str, Any]) -> None:
    """A ManualClock starting at 1023.902: the connect an acquire that
    timed out in a black hole left behind is presumed lost once another
    acquire has waited beside it for the hedge delay (0.1 s), at
    1024.002. The core checked ``start <= now - 0.1``, which rounds the
    other way there: at its deadline the timer found nothing due, and was
    re-armed for that same time, over and over (advance() never returned).
    Now the connect is cancelled and the waiting acquire, the network
    healed, is served by a connect of its own."""
    proxy, server, port = await proxied(pg_dsn)
    clock = CountingClock(1023.902)
    pool = await safepool.create_pool(
        pg_dsn, host="127.0.0.1", port=port, min_size=0, max_size=1, ssl=False, clock=clock, **policy
    )
    later: asyncio.Future[Any] | None = None
    try:
        clock.advance(0.0)
        proxy.hole = True
        first = asyncio.ensure_future(pool.acquire(timeout=1.0))
        await until(lambda: bool(proxy.open))
        first.cancel()  # (at once: the connect started at 1023.902)
        with pytest.raises(asyncio.CancelledError):
            await first
        later = asyncio.ensure_future(pool.acquire(timeout=10.0))
        await until(lambda: pool.stats().waiting == 1)  # queued beside the lost connect
        proxy.hole = False
        clock.advance(0.1)
        async with asyncio.timeout(3):
            con = await later
        assert await con.fetchval("SELECT 1") == 1
        await pool.release(con)
        pool._state.check_invariants()
    finally:
        if later is not None:
            later.cancel()
        pool.terminate()
        proxy.shut(server)
