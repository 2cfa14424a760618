"""What every fault run checks: a sampler of the server's view, an error
ledger that only admits typed errors, the loop's unhandled errors, and the
pool's books once the run is over."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import asyncpg

import safepool

LONG = bool(os.environ.get("SAFEPOOL_LONG"))


def scale(short: float, long: float) -> float:
    """A load parameter: the default (CI) value, or the long mode's."""
    return long if LONG else short


def classify(exc: BaseException) -> str | None:
    """The kind of an error a caller may legitimately see during a fault,
    or None if it must never reach application code."""
    if isinstance(exc, safepool.PoolError):
        return type(exc).__name__
    if isinstance(exc, asyncpg.ConnectionDoesNotExistError):
        return "connection_lost"  # "connection was closed in the middle of operation"
    if isinstance(exc, asyncpg.PostgresError):  # the server's own, with a SQLSTATE
        return f"server:{exc.sqlstate}"
    if isinstance(exc, asyncpg.InternalClientError) and "another operation (2) is in progress" in str(exc):
        # asyncpg itself (no pool involved: see docs/reliability.md): the
        # server's FATAL for a terminated idle connection was read, the EOF
        # behind it not yet, and the protocol refuses the next query.
        return "asyncpg:unsolicited_fatal"
    if isinstance(exc, asyncpg.InterfaceError) and "connection is closed" in str(exc):
        return "connection_closed"  # used a connection the server had just dropped
    if isinstance(exc, OSError):  # refused, reset, connect timeout: surfaced as asyncpg does
        return f"os:{type(exc).__name__}"
    return None


async def fatal_read_eof_unread(admin: asyncpg.Connection, raw: asyncpg.Connection, pid: int) -> None:
    """Terminate ``pid`` (from ``admin``) and return once its client
    connection ``raw`` has read the server's FATAL and not the EOF behind it
    (the window of ``asyncpg:unsolicited_fatal``, see classify). The client
    reads nothing until the backend has exited, so both are in its socket;
    it then reads the FATAL in one read and the EOF in the next: a peek at
    the socket (a duplicate of its descriptor) that finds only the EOF left
    is the moment between the two."""
    transport = raw._transport
    peek = socket.socket(fileno=socket.dup(transport.get_extra_info("socket").fileno()))
    try:
        peek.setblocking(False)
        transport.pause_reading()
        assert await admin.fetchval("SELECT pg_terminate_backend($1, 5000)", pid)
        transport.resume_reading()
        async with asyncio.timeout(5):
            while peek.recv(1, socket.MSG_PEEK) != b"":
                await asyncio.sleep(0)
    finally:
        peek.close()
    assert not raw.is_closed(), "the client read the EOF too: the window was missed"


@dataclass
class Ledger:
    """Outcomes of a load loop: successes, typed errors by kind, and
    anything untyped (which fails the test)."""

    ok: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    unexpected: list[BaseException] = field(default_factory=list)

    def record(self, exc: BaseException) -> None:
        kind = classify(exc)
        if kind is None:
            self.unexpected.append(exc)
        else:
            self.errors[kind] += 1

    @property
    def total(self) -> int:
        return self.ok + sum(self.errors.values()) + len(self.unexpected)

    def check(self) -> None:
        if self.unexpected:
            first = self.unexpected[0]
            raise AssertionError(
                f"{len(self.unexpected)} untyped error(s) reached the caller, first: {first!r}"
            ) from first

    def summary(self) -> str:
        kinds = ", ".join(f"{k}={v}" for k, v in self.errors.most_common())
        return f"{self.total} operations: ok={self.ok} {kinds}".strip()


class ServerSampler:
    """Counts the pool's connections in pg_stat_activity (by
    application_name) every ``interval`` seconds; reconnects through
    restarts. ``max_seen`` is the largest count observed."""

    def __init__(self, admin_dsn: str, app_name: str, interval: float = 0.02) -> None:
        self.admin_dsn = admin_dsn
        self.app_name = app_name
        self.interval = interval
        self.samples: list[int] = []
        self._task: asyncio.Task[None] | None = None
        self._con: asyncpg.Connection | None = None
        self._lock = asyncio.Lock()  # count() is also called from the test while sampling

    @property
    def max_seen(self) -> int:
        return max(self.samples, default=0)

    async def count(self) -> int:
        async with self._lock:
            for attempt in range(3):
                try:
                    if self._con is None or self._con.is_closed():
                        self._con = await asyncpg.connect(self.admin_dsn, timeout=2)
                    # Backends that are starting up or exiting are counted
                    # too: the server's own bound is what matters.
                    return int(
                        await self._con.fetchval(
                            "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1",
                            self.app_name,
                            timeout=2,
                        )
                    )
                except Exception:
                    # The observer's own connection died in a restart: reconnect.
                    if self._con is not None:
                        self._con.terminate()
                        self._con = None
                    if attempt == 2:
                        raise
                    await asyncio.sleep(0.05)
            raise AssertionError("unreachable")

    async def _run(self) -> None:
        while True:
            try:
                self.samples.append(await self.count())
            except Exception:  # an observer: any failure (restart, FATAL read early) means reconnect
                if self._con is not None:
                    self._con.terminate()
                    self._con = None
            await asyncio.sleep(self.interval)

    async def __aenter__(self) -> ServerSampler:
        self._task = asyncio.create_task(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        try:
            if self._task is not None:
                self._task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._task
        finally:
            if self._con is not None:
                self._con.terminate()
                self._con = None


class SideBySide:
    """The same light load on asyncpg's pool and safepool's (``pools``,
    keyed by kind): per kind, the times of its successful leases and a
    :class:`Ledger`. The recovery tests cut both pools off the server the
    same way and compare when each served again.

    Used as ``async with SideBySide(pools, budget) as side:``: however the
    block ends, the load is told to stop and every pool is terminated."""

    def __init__(self, pools: dict[str, Any], budget: float) -> None:
        self.pools = pools
        self.budget = budget  # seconds per lease (acquire, SELECT 1, release)
        self.successes: dict[str, list[float]] = {kind: [] for kind in pools}
        self.ledgers = {kind: Ledger() for kind in pools}
        self.stop = asyncio.Event()
        self.workers: list[asyncio.Task[None]] = []

    async def __aenter__(self) -> SideBySide:
        return self

    async def __aexit__(self, *exc: object) -> None:
        """Tell the load to stop (its workers are not waited for: see
        :meth:`finish`) and terminate every pool."""
        self.stop.set()
        for pool in self.pools.values():
            pool.terminate()

    def start(self, per_kind: int) -> None:
        """Start the load: ``per_kind`` workers running :meth:`load` on each pool."""
        self.workers += [asyncio.create_task(self.load(kind)) for kind in self.pools for _ in range(per_kind)]

    async def finish(self) -> None:
        """Stop the load and wait for its workers: each ends after its
        current lease (at most ``budget`` seconds) and pause (5 ms)."""
        self.stop.set()
        await asyncio.gather(*self.workers)

    async def load(self, kind: str) -> None:
        pool = self.pools[kind]
        while not self.stop.is_set():
            try:
                async with asyncio.timeout(self.budget):
                    async with pool.acquire() as con:
                        await con.fetchval("SELECT 1")
                self.ledgers[kind].ok += 1
                self.successes[kind].append(time.monotonic())
            except Exception as exc:
                self.ledgers[kind].record(exc)
            await asyncio.sleep(0.005)

    async def served_since(self, instant: float, timeout: float = 10.0) -> None:
        """Until every pool has served a lease after ``instant`` (monotonic s)."""
        async with asyncio.timeout(timeout):
            while not all(s and s[-1] >= instant for s in self.successes.values()):
                await asyncio.sleep(0.005)

    def recovery(self, instant: float) -> dict[str, float]:
        """Per kind, seconds from ``instant`` to its first success after it."""
        return {kind: min(t for t in s if t >= instant) - instant for kind, s in self.successes.items()}

    @staticmethod
    def in_ms(recovery: dict[str, float]) -> dict[str, float]:
        """Per kind, :meth:`recovery`'s seconds as milliseconds (to 0.1 ms), for a report."""
        return {kind: round(1000 * r, 1) for kind, r in recovery.items()}

    def summaries(self) -> dict[str, str]:
        return {kind: ledger.summary() for kind, ledger in self.ledgers.items()}


def asyncpg_connect_lost(context: dict[str, Any]) -> bool:
    """asyncpg's own report, no pool needed (docs/reliability.md): a TLS
    upgrade's ``on_data`` future left unretrieved when its connection is
    lost without an error, which happens when a connect over TCP
    (``sslmode=prefer``) is cancelled between the TCP handshake and asyncio's
    ``connection_made`` (an acquire's timeout, ``close()``), and when a
    connection is terminated while asyncpg's cancel request for it
    negotiates SSL; and on asyncpg 0.29-0.31 the answer to such a cancelled
    SSL request, arriving later (``InvalidStateError`` from its
    ``data_received``). Noise, not a failure: an ``allow=`` for
    :func:`loop_errors`."""
    if context.get("message") == "Future exception was never retrieved":
        return str(context.get("exception")) == "unexpected connection_lost() call"
    # asyncpg 0.29-0.31's sibling: the server's answer to the SSL request of a
    # connect (or cancel request) already cancelled, set on the cancelled
    # future (0.32 returns early when it is done).
    return (
        str(context.get("message", "")).startswith("Fatal error: protocol.data_received() call failed")
        and isinstance(context.get("exception"), asyncio.InvalidStateError)
        and type(context.get("protocol")).__name__ == "TLSUpgradeProto"
    )


@contextlib.contextmanager
def loop_errors(allow: Callable[[dict[str, Any]], bool] = lambda ctx: False) -> Iterator[list[dict[str, Any]]]:
    """Collect what reaches the loop's exception handler (errors of the
    pool's own tasks, unretrieved task exceptions); the caller asserts it is
    empty. ``allow`` filters expected reports."""
    loop = asyncio.get_running_loop()
    seen: list[dict[str, Any]] = []
    previous = loop.get_exception_handler()

    def handler(_loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        if not allow(context):
            seen.append(context)

    loop.set_exception_handler(handler)
    try:
        yield seen
    finally:
        loop.set_exception_handler(previous)


async def held_through_a_black_hole(pool: safepool.Pool, proxy: Any) -> tuple[float, list[BaseException]]:
    """A lease runs ``pg_sleep(0.2)`` through ``proxy`` (a ``FaultProxy``),
    which goes silent once the query is on its way (the query or its answer
    lost): how long the holder held on (seconds), and the errors it got."""
    errors: list[BaseException] = []
    querying = asyncio.Event()

    async def holder() -> float:
        started = time.monotonic()
        try:
            async with pool.acquire() as con:
                querying.set()
                await con.fetchval("SELECT pg_sleep(0.2)")
        except Exception as exc:
            errors.append(exc)
        return time.monotonic() - started

    task = asyncio.create_task(holder())
    await asyncio.wait_for(querying.wait(), 5)
    # The holder's query is sent in the step that follows: the network goes
    # silent under it.
    proxy.blackhole = True
    return await asyncio.wait_for(task, 10), errors


async def settle(pool: safepool.Pool, timeout: float = 10.0) -> None:
    """Wait until the pool's background work (connects, resets, closes) is
    done and nothing is leased."""
    deadline = time.monotonic() + timeout
    while True:
        s = pool.stats()
        if s.in_use == 0 and s.connecting == 0 and s.resetting == 0 and s.closing == 0 and s.waiting == 0:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"pool did not settle in {timeout}s: {pool!r}")
        await asyncio.sleep(0.01)


async def assert_books_balance(pool: safepool.Pool, sampler: ServerSampler, timeout: float = 10.0) -> None:
    """After a run: nothing leased, idle + in_use == size, the core's
    invariants hold, and the server sees exactly the pool's connections (none
    leaked, none counted twice)."""
    await settle(pool, timeout)
    pool._state.check_invariants()
    s = pool.stats()
    assert s.in_use == 0, pool
    assert s.idle + s.in_use == s.size, pool
    assert s.size <= s.max_size, pool
    deadline = time.monotonic() + timeout
    while True:  # a backend takes a moment to leave pg_stat_activity
        seen = await sampler.count()
        if seen == pool.get_size():
            break
        if time.monotonic() > deadline:
            raise AssertionError(f"server sees {seen} connections, the pool has {pool.get_size()}: {pool!r}")
        await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def closing(pool: safepool.Pool, timeout: float = 15.0) -> AsyncIterator[safepool.Pool]:
    try:
        yield pool
    finally:
        await asyncio.wait_for(pool.close(), timeout)


class PausedAfterPrepare(asyncpg.Connection):
    """A connection class that holds a fetch-family call between its prepare
    and its bind (the protocol idle, the call under way: asyncpg's statement
    section held) once the test sets ``paused`` and ``go_on``: ``paused`` is
    set there, and the call goes on when ``go_on`` is."""

    paused: asyncio.Event | None = None
    go_on: asyncio.Event | None = None

    async def _get_statement(self, *args: Any, **kwargs: Any) -> Any:
        statement = await super()._get_statement(*args, **kwargs)  # type: ignore[misc]
        if self.paused is not None and self.go_on is not None:
            self.paused.set()
            await self.go_on.wait()
        return statement
