"""The work each benchmark times, for any pool with asyncpg's ``acquire()``.

Every contender opens its own pool in ``setup`` and closes it in
``teardown``, so a benchmark never leaves connections behind for the next.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import inspect
import statistics
import time
import tracemalloc
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine
from types import TracebackType
from typing import Any

import asyncpg
from asyncpg.connection import _ConnectionProxy

import safepool
from safepool._detach import _Driver

from ._harness import Contender

PoolFactory = Callable[[], Awaitable[Any]]

MAX_SIZE = 10
CONTENDED_TASKS = 100


def asyncpg_pool(dsn: str, max_size: int = MAX_SIZE) -> PoolFactory:
    async def make() -> Any:
        return await asyncpg.create_pool(dsn, min_size=max_size, max_size=max_size)

    return make


def safepool_pool(dsn: str, max_size: int = MAX_SIZE, **options: Any) -> PoolFactory:
    async def make() -> Any:
        return await safepool.create_pool(dsn, min_size=max_size, max_size=max_size, **options)

    return make


# Every safety feature on: a lease deadline and a leak-suspect timer per lease
# (both far away, so they never fire), the acquire stack captured, and the
# task name recorded. Loops that use it also call stats() every STATS_EVERY
# leases, far more often than a metrics exporter would.
SAFETY_ON: dict[str, Any] = {"lease_timeout": 60.0, "leak_warning_after": 60.0, "capture_stack": True}
STATS_EVERY = 100


class MinimalPool:
    """The bookkeeping floor: what any pool must do at the least, a stack of
    free items and a FIFO of futures, with no database and no safety. It
    hands a released item straight to the oldest waiter, as safepool does."""

    def __init__(self, size: int) -> None:
        self._free: list[object] = [object() for _ in range(size)]
        self._waiters: deque[asyncio.Future[object]] = deque()

    def acquire(self) -> _MinimalLease:
        return _MinimalLease(self)

    async def _get(self) -> object:
        if self._free and not self._waiters:
            return self._free.pop()
        future: asyncio.Future[object] = asyncio.get_running_loop().create_future()
        self._waiters.append(future)
        try:
            return await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self._put(future.result())  # granted, then cancelled: pass it on
            raise

    def _put(self, item: object) -> None:
        waiters = self._waiters
        while waiters:
            future = waiters.popleft()
            if not future.done():
                future.set_result(item)
                return
        self._free.append(item)

    async def close(self) -> None:
        return None


class _MinimalLease:
    __slots__ = ("_pool", "_item")

    def __init__(self, pool: MinimalPool) -> None:
        self._pool = pool
        self._item: object | None = None

    async def __aenter__(self) -> object:
        self._item = await self._pool._get()
        return self._item

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        item, self._item = self._item, None
        self._pool._put(item)


def minimal_pool(size: int = MAX_SIZE) -> PoolFactory:
    async def make() -> Any:
        return MinimalPool(size)

    return make


class LeanPool:
    """The calibration of issue 14: the leanest pool with asyncpg's release
    semantics, on real connections. A LIFO stack of idle connections, a FIFO
    of waiters' futures, and a release that awaits ROLLBACK (if a transaction
    is open) plus asyncpg's reset query before the connection goes back.
    Nothing else: no timeouts, no cancellation safety, no leak detection, no
    statistics. What safepool costs above it is the price of those."""

    RESET = "SELECT pg_advisory_unlock_all(); CLOSE ALL; UNLISTEN *; RESET ALL;"

    def __init__(self, connections: list[asyncpg.Connection]) -> None:
        self._connections = connections
        self._idle = list(connections)
        self._waiters: deque[asyncio.Future[asyncpg.Connection]] = deque()

    def acquire(self) -> _LeanLease:
        return _LeanLease(self)

    async def _get(self) -> asyncpg.Connection:
        if self._idle and not self._waiters:
            return self._idle.pop()
        future: asyncio.Future[asyncpg.Connection] = asyncio.get_running_loop().create_future()
        self._waiters.append(future)
        return await future

    async def _put(self, con: asyncpg.Connection) -> None:
        if con.is_in_transaction():
            await con.execute("ROLLBACK")
        await con.execute(self.RESET)
        waiters = self._waiters
        while waiters:
            future = waiters.popleft()
            if not future.done():
                future.set_result(con)
                return
        self._idle.append(con)

    async def close(self) -> None:
        await asyncio.gather(*(con.close() for con in self._connections))


class _LeanLease:
    __slots__ = ("_pool", "_con")

    def __init__(self, pool: LeanPool) -> None:
        self._pool = pool
        self._con: asyncpg.Connection | None = None

    async def __aenter__(self) -> asyncpg.Connection:
        self._con = await self._pool._get()
        return self._con

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        con, self._con = self._con, None
        assert con is not None
        await self._pool._put(con)


def lean_pool(dsn: str, size: int = MAX_SIZE) -> PoolFactory:
    async def make() -> Any:
        return LeanPool([await asyncpg.connect(dsn) for _ in range(size)])

    return make


class DropInMinimumPool:
    """The calibration's second step: :class:`LeanPool` plus what makes a
    pool a drop-in for asyncpg's, which asyncpg's own pool also pays for.
    The application gets a proxy (:class:`_DropInProxy`) whose Connection
    methods raise ``InterfaceError`` once the lease has ended, not the
    connection itself; and the release's reset (``ROLLBACK`` if a
    transaction is open, then asyncpg's reset query, in one message) cannot
    be cut short by cancelling the releasing task: safepool's ``_Driver``
    runs it in that task and hands it to a pool task on a cancel, which
    finishes it and only then passes the connection on. A waiter cancelled
    after its grant passes the connection on too.

    Still nothing else: no timeouts, statistics or leak detection; no
    listener checks, no link from the connection back to its proxy (asyncpg's
    ``_set_proxy``), and a connection whose reset fails is terminated and not
    replaced. safepool above it is the price of its own features; it above
    the lean pool, the price of being a drop-in."""

    RESET = LeanPool.RESET

    def __init__(self, connections: list[asyncpg.Connection]) -> None:
        self._connections = connections
        self._idle = list(connections)
        self._waiters: deque[asyncio.Future[asyncpg.Connection]] = deque()
        self._loop = asyncio.get_running_loop()
        self._tasks: set[asyncio.Task[Any]] = set()  # resets handed over by a cancel, till they end

    def acquire(self) -> _DropInLease:
        return _DropInLease(self)

    async def _get(self) -> asyncpg.Connection:
        if self._idle and not self._waiters:
            return self._idle.pop()
        future: asyncio.Future[asyncpg.Connection] = self._loop.create_future()
        self._waiters.append(future)
        try:
            return await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self._back(future.result(), None)  # granted, then cancelled: pass it on
            raise

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = self._loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _back(self, con: asyncpg.Connection, error: Exception | None) -> Exception | None:
        """The reset's end (the driver's ``then``, in the releasing task or,
        after a cancel, in the pool's): hand the connection to the oldest
        waiter, or keep it idle; returns the reset's error for the releasing
        caller to raise."""
        if error is not None:
            con.terminate()
            return error
        waiters = self._waiters
        while waiters:
            future = waiters.popleft()
            if not future.done():
                future.set_result(con)
                return None
        self._idle.append(con)
        return None

    async def close(self) -> None:
        while self._tasks:
            await asyncio.gather(*self._tasks)
        await asyncio.gather(*(con.close() for con in self._connections))


class _DropInProxy(_ConnectionProxy):
    """What a :class:`DropInMinimumPool` lease hands out. Each public
    Connection method is a forwarding function of this class's (installed
    below, as asyncpg's pool proxy has them), so a call costs one Python
    frame and no ``__getattr__``; after the release they raise."""

    __slots__ = ("_con",)

    def __init__(self, con: asyncpg.Connection) -> None:
        self._con: asyncpg.Connection | None = con

    def __getattr__(self, name: str) -> Any:
        # Attributes that are not forwarded methods (rare: private ones).
        con = self._con
        if con is None:
            raise _released(name)
        return getattr(con, name)


def _released(name: str) -> asyncpg.InterfaceError:
    return asyncpg.InterfaceError(f"cannot call Connection.{name}(): the connection has been released to the pool")


def _forwarder(name: str, method: Callable[..., Any]) -> Callable[..., Any]:
    def forward(self: _DropInProxy, *args: Any, **kwargs: Any) -> Any:
        con = self._con
        if con is None:
            raise _released(name)
        return method(con, *args, **kwargs)

    return functools.update_wrapper(forward, method)


def _install_forwarders() -> None:
    for name, method in inspect.getmembers(asyncpg.Connection, inspect.isfunction):
        if not name.startswith("_"):
            setattr(_DropInProxy, name, _forwarder(name, method))


_install_forwarders()


class _DropInLease:
    __slots__ = ("_pool", "_proxy")

    def __init__(self, pool: DropInMinimumPool) -> None:
        self._pool = pool
        self._proxy: _DropInProxy | None = None

    async def __aenter__(self) -> _DropInProxy:
        self._proxy = _DropInProxy(await self._pool._get())
        return self._proxy

    def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> _Driver[Exception | None]:
        proxy, self._proxy = self._proxy, None
        assert proxy is not None
        con, proxy._con = proxy._con, None  # detach: the application's proxy raises from here on
        assert con is not None
        pool = self._pool
        query = ("ROLLBACK; " + pool.RESET) if con.is_in_transaction() else pool.RESET
        # The reset in this task; on a cancel, in a pool task that finishes
        # it. Either way pool._back hands the connection on once it ends.
        return _Driver(con.execute(query), pool._spawn, pool._back, (con, None), True)  # (None: the error's place)


def dropin_minimum_pool(dsn: str, size: int = MAX_SIZE) -> PoolFactory:
    async def make() -> Any:
        return DropInMinimumPool([await asyncpg.connect(dsn) for _ in range(size)])

    return make


async def until(predicate: Callable[[], bool]) -> None:
    """Give the loop turns until ``predicate()`` holds: for pool state that
    has no event to wait on (the tests' rule: synchronise on state, never on
    sleeps)."""
    while not predicate():  # noqa: ASYNC110
        await asyncio.sleep(0)


async def settle_pool(pool: Any) -> None:
    """Until no connection is being reset (safepool resets in its own tasks;
    asyncpg's pool and the minimal pool have nothing left running)."""
    stats = getattr(pool, "stats", None)
    if stats is not None:
        await until(lambda: stats().resetting == 0)


class Lease(Contender):
    """One task, uncontended: ``async with pool.acquire() as con`` n times,
    empty or with a ``SELECT 1``."""

    def __init__(self, name: str, make_pool: PoolFactory, *, query: bool, stats_every: int | None = None) -> None:
        self.name = name
        self.make_pool = make_pool
        self.query = query
        self.stats_every = stats_every
        self.pool: Any = None

    async def setup(self) -> None:
        self.pool = await self.make_pool()

    async def run(self, n: int) -> None:
        pool = self.pool
        every = self.stats_every or n
        done = 0
        while done < n:
            chunk = min(every, n - done)
            if self.query:
                for _ in range(chunk):
                    async with pool.acquire() as con:
                        await con.fetchval("SELECT 1")
            else:
                for _ in range(chunk):
                    async with pool.acquire():
                        pass
            done += chunk
            if self.stats_every:
                pool.stats()

    async def settle(self) -> None:
        await settle_pool(self.pool)

    async def teardown(self) -> None:
        await self.pool.close()


def reset_query(con: Any) -> str:
    """asyncpg's reset query for ``con`` (the floor's second statement):
    ``get_reset_query()``, public from asyncpg 0.30; 0.29's
    ``_get_reset_query()`` before."""
    return con.get_reset_query() if hasattr(con, "get_reset_query") else con._get_reset_query()


class RawConnection(Contender):
    """The floor for a query lease: one asyncpg connection, no pool.

    With ``reset``, each operation also sends asyncpg's reset query, as its
    own statement: the physical floor of a lease with the full reset (two
    round trips, nothing else)."""

    def __init__(self, dsn: str, *, reset: bool = False) -> None:
        self.name = "raw SELECT 1 + reset" if reset else "raw connection"
        self.dsn = dsn
        self.reset = reset
        self.con: Any = None

    async def setup(self) -> None:
        self.con = await asyncpg.connect(self.dsn)

    async def run(self, n: int) -> None:
        con = self.con
        if self.reset:
            query = reset_query(con)
            for _ in range(n):
                await con.fetchval("SELECT 1")
                await con.execute(query)
        else:
            for _ in range(n):
                await con.fetchval("SELECT 1")

    async def teardown(self) -> None:
        await self.con.close()


class Contended(Contender):
    """``tasks`` tasks share the pool; n leases in all, each acquire +
    ``SELECT 1`` + release. Records every acquire wait, and every task's
    mean wait (for the fairness spread), per round."""

    def __init__(
        self, name: str, make_pool: PoolFactory, *, tasks: int = CONTENDED_TASKS, query: bool = True,
        stats_every: int | None = None,
    ) -> None:
        self.name = name
        self.make_pool = make_pool
        self.tasks = tasks
        self.query = query
        self.stats_every = stats_every
        self.pool: Any = None
        self.waits: list[list[float]] = []  # one list per batch
        self.task_means: list[list[float]] = []

    async def setup(self) -> None:
        self.pool = await self.make_pool()

    async def run(self, n: int) -> None:
        pool = self.pool
        per_task = max(1, n // self.tasks)
        waits: list[float] = []
        means: list[float] = []
        clock = time.perf_counter
        query = self.query
        stats_every = self.stats_every

        async def worker() -> None:
            mine = 0.0
            for i in range(per_task):
                start = clock()
                async with pool.acquire() as con:
                    waited = clock() - start
                    if query:
                        await con.fetchval("SELECT 1")
                waits.append(waited)
                mine += waited
                if stats_every and i % stats_every == 0:
                    pool.stats()
            means.append(mine / per_task)

        await asyncio.gather(*(worker() for _ in range(self.tasks)))
        self.waits.append(waits)
        self.task_means.append(means)

    async def settle(self) -> None:
        await settle_pool(self.pool)

    def start_timing(self) -> None:
        self.waits.clear()
        self.task_means.clear()

    async def teardown(self) -> None:
        await self.pool.close()


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def wait_summary(contender: Contended) -> dict[str, float]:
    """Medians over batches of p50, p99, max wait and per-task mean-wait spread."""
    p50 = [quantile(w, 0.50) for w in contender.waits]
    p99 = [quantile(w, 0.99) for w in contender.waits]
    worst = [max(w) for w in contender.waits]
    spread = [max(m) / max(min(m), 1e-9) for m in contender.task_means]
    return {
        "p50": statistics.median(p50),
        "p99": statistics.median(p99),
        "max": statistics.median(worst),
        "spread": statistics.median(spread),
        "p99_by_round": p99,  # type: ignore[dict-item]
    }


class Waiters(Contender):
    """Steady state with many tasks queued: ``max_size + waiters`` tasks each
    loop over empty leases, so every release hands the connection to the
    head of a queue ``waiters`` long. ``run(n)`` times n hand-offs. The tasks
    are spawned (and warmed up: every task gets one lease) before timing."""

    per_round = True

    def __init__(self, name: str, make_pool: PoolFactory, *, waiters: int, max_size: int = MAX_SIZE) -> None:
        self.name = name
        self.make_pool = make_pool
        self.waiters = waiters
        self.max_size = max_size
        self.pool: Any = None
        self.tasks: list[asyncio.Task[None]] = []
        self.count = 0
        self.target = -1
        self.reached: asyncio.Future[None] | None = None

    async def _open(self) -> None:
        if self.pool is None:
            self.pool = await self.make_pool()

    async def setup(self) -> None:
        await self._open()
        self.count = 0
        pool = self.pool
        loop = asyncio.get_running_loop()
        go = loop.create_future()
        holding = 0

        async def worker() -> None:
            nonlocal holding
            # An uncontended empty lease never suspends: a task that got in
            # first would loop forever without letting the others queue. So
            # the first max_size tasks hold their connection until all the
            # others wait; from then on the queue never empties.
            async with pool.acquire():
                holding += 1
                await go
            while True:
                async with pool.acquire():
                    pass
                self.count += 1
                if self.count == self.target and self.reached is not None:
                    self.reached.set_result(None)

        self.tasks = [asyncio.create_task(worker()) for _ in range(self.max_size + self.waiters)]
        await until(lambda: holding == self.max_size)
        stats = getattr(pool, "stats", None)
        if stats is not None:
            await until(lambda: stats().waiting == self.waiters)
        else:
            for _ in range(3):  # the minimal pool: every task reaches its await in one pass
                await asyncio.sleep(0)
        go.set_result(None)
        await self._cycles(len(self.tasks))

    async def _cycles(self, n: int) -> None:
        self.reached = asyncio.get_running_loop().create_future()
        self.target = self.count + n
        await self.reached

    async def run(self, n: int) -> None:
        await self._cycles(n)

    async def teardown(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        self.tasks = []

    async def close(self) -> None:
        if self.pool is not None:
            await self.pool.close()
            self.pool = None


class HeldLeases(Contender):
    """Pool-size scaling: a pool of ``max_size`` connections with all but one
    leased (held, idle), while one task cycles empty leases on the last one.
    The pool is opened and closed every round, so pools of 10 and of 100
    connections never need the server's room at the same time."""

    per_round = True

    def __init__(self, name: str, make_pool: PoolFactory, max_size: int) -> None:
        self.name = name
        self.make_pool = make_pool
        self.max_size = max_size
        self.pool: Any = None
        self.held: list[Any] = []

    async def setup(self) -> None:
        self.pool = await self.make_pool()
        self.held = [await self.pool.acquire() for _ in range(self.max_size - 1)]

    async def run(self, n: int) -> None:
        pool = self.pool
        for _ in range(n):
            async with pool.acquire():
                pass

    async def teardown(self) -> None:
        for con in self.held:
            await self.pool.release(con)
        self.held = []
        await self.pool.close()
        self.pool = None


class StatsCalls(Contender):
    """``pool.stats()`` n times on a pool with half its connections leased."""

    def __init__(self, make_pool: PoolFactory) -> None:
        self.name = "safepool stats()"
        self.make_pool = make_pool
        self.pool: Any = None
        self.held: list[Any] = []

    async def setup(self) -> None:
        self.pool = await self.make_pool()
        self.held = [await self.pool.acquire() for _ in range(MAX_SIZE // 2)]
        for _ in range(200):  # some lease and wait history for the histograms
            async with self.pool.acquire():
                pass

    async def run(self, n: int) -> None:
        stats = self.pool.stats
        for _ in range(n):
            stats()

    async def teardown(self) -> None:
        for con in self.held:
            await self.pool.release(con)
        await self.pool.close()


async def memory_profile(pool: Any, leases: int, *, sample: int = 200) -> dict[str, float]:
    """Empty leases under tracemalloc.

    ``growth`` is the traced memory after ``leases`` leases minus before
    them (after warm-up and a full collection): anything kept per lease
    shows up as leases x its size. ``peak_per_lease`` is the median over
    ``sample`` single leases of the traced peak during the lease minus the
    memory before it: what one lease allocates at its busiest.

    The loop gets a turn every 1,000 leases, as in any real application: an
    uncontended empty lease never suspends, and asyncio frees cancelled
    timer handles only when the loop turns."""

    async def leases_of(n: int) -> None:
        for i in range(n):
            async with pool.acquire():
                pass
            if i % 1_000 == 999:
                await asyncio.sleep(0)
        await asyncio.sleep(0)

    def settle() -> None:
        # safepool files lease times in batches of up to 256 (Histogram.FOLD_AT):
        # a read files them, so the batch's phase does not count as growth.
        stats = getattr(pool, "stats", None)
        if stats is not None:
            stats()
        gc.collect()

    await leases_of(2_000)  # warm caches, free lists and the histograms
    settle()
    tracemalloc.start()
    try:
        await leases_of(2_000)
        settle()
        before = tracemalloc.get_traced_memory()[0]
        await leases_of(leases)
        settle()
        after = tracemalloc.get_traced_memory()[0]
        peaks = []
        for _ in range(sample):
            base = tracemalloc.get_traced_memory()[0]
            tracemalloc.reset_peak()
            async with pool.acquire():
                pass
            peaks.append(tracemalloc.get_traced_memory()[1] - base)
    finally:
        tracemalloc.stop()
    return {"growth": float(after - before), "leases": float(leases), "peak_per_lease": statistics.median(peaks)}


def serial_leases(pool: Any, query: bool) -> Callable[[int], Coroutine[Any, Any, None]]:
    """``run(n)``: n leases one after another, each ``SELECT 1`` if ``query``
    (else empty), for the counting tools (``benchmarks.calls``,
    ``benchmarks.bytecodes``)."""

    async def run(n: int) -> None:
        for _ in range(n):
            async with pool.acquire() as con:
                if query:
                    await con.fetchval("SELECT 1")

    return run


def contended_leases(pool: Any) -> Callable[[int], Coroutine[Any, Any, None]]:
    """``run(n)``: n leases by CONTENDED_TASKS tasks at once, each ``SELECT 1``."""

    async def run(n: int) -> None:
        async def worker() -> None:
            for _ in range(n // CONTENDED_TASKS):
                async with pool.acquire() as con:
                    await con.fetchval("SELECT 1")

        await asyncio.gather(*(worker() for _ in range(CONTENDED_TASKS)))

    return run
