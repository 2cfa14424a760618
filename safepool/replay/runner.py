"""One replay run: a pool, the service on uvicorn, the load, a sampler.

Everything a run starts it also stops, in reverse order, whether the run
ends, fails or is cancelled (Ctrl-C).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import types
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import asyncpg
import uvicorn

import safepool

from ..stats import describe_error
from .config import ACQUIRE_TIMEOUT, ReplayConfig, ReplayError, app_name, pool_options
from .load import RequestRecord, run_load
from .server import Database, Monitor

if TYPE_CHECKING:
    from starlette.types import ASGIApp

    from .app import ServiceMetrics


@dataclass(slots=True)
class Sample:
    """The state of a run, once a second."""

    t: float  # seconds since the run started
    pool_size: int
    in_use: int
    waiting: int | None  # safepool only: asyncpg's pool does not say
    server_connections: int | None  # pg_stat_activity, by application_name
    in_flight: int  # requests inside the service
    leaks_detected: int  # safepool's leak + lease_expired events so far


@dataclass(slots=True)
class PoolRun:
    pool: str  # "asyncpg" or "safepool"
    records: list[RequestRecord] = field(default_factory=list)
    samples: list[Sample] = field(default_factory=list)
    leaked: int = 0  # connections the service left unreleased (ground truth)
    events: list[dict[str, Any]] = field(default_factory=list)  # safepool's listener events
    leak_report: str | None = None  # safepool's first leak log message
    log_records: int = 0  # warnings and errors logged during the run
    # When things happened, in seconds since the run started: "fault" (the
    # fault's start), and for restart "stopped" (the server is down) and
    # "accepting" (it accepts connections again: a probe connected).
    marks: dict[str, float] = field(default_factory=dict)

    def leaks_taken_back(self) -> int:
        """Leases safepool took back so far: a connection collected unreleased
        (``leak``) or a lease past its ``lease_timeout`` (``lease_expired``)."""
        return sum(1 for event in self.events if event["event"] in ("leak", "lease_expired"))


Tick = Callable[[str, Sample, list[RequestRecord]], None]

def load_service() -> types.ModuleType:
    """The demo service (``app.py``), imported as usual: safepool's
    acquire-site capture skips the pool's own modules (``safepool/*.py``) but
    not its subpackages, so leak reports name the service's lines."""
    from . import app

    return app


class AcquireTimeout:
    """asyncpg's pool as a service on it uses it: every ``acquire()`` passes
    the acquire timeout (asyncpg's pool has no pool-wide one). Everything
    else is the pool's own."""

    def __init__(self, pool: asyncpg.Pool, timeout: float) -> None:
        self.pool = pool
        self.timeout = timeout

    def acquire(self, *, timeout: float | None = None) -> Any:
        return self.pool.acquire(timeout=self.timeout if timeout is None else timeout)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.pool, name)


async def open_pool(pool: str, dsn: str, config: ReplayConfig) -> Any:
    """asyncpg's pool with its defaults and the service's acquire timeout
    (``AcquireTimeout``), or safepool's with the recommended configuration
    (config.py); a small floor (min_size), so that pg_stat_activity shows
    leaked connections pile up."""
    settings = {"application_name": app_name(pool)}
    options = pool_options(pool, config)
    if pool == "asyncpg":
        return AcquireTimeout(await asyncpg.create_pool(dsn, server_settings=settings, **options), ACQUIRE_TIMEOUT)
    return await safepool.create_pool(dsn, server_settings=settings, name="replay", **options)


async def close_pool(pool: Any) -> None:
    if isinstance(pool, safepool.Pool):
        try:
            await asyncio.wait_for(pool.close(), timeout=5)
        except TimeoutError:
            pool.terminate()
    else:
        # asyncpg's close() waits for every connection to come back, and the
        # leaked ones never will: a restart (terminate) is the only way out.
        pool.terminate()


class _Server(uvicorn.Server):
    # The replay owns Ctrl-C (asyncio.run cancels the main task, whose
    # cleanup stops this server); uvicorn must not take the signals over.
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


@contextlib.asynccontextmanager
async def serving(app: ASGIApp) -> AsyncIterator[tuple[str, int]]:
    """Run ``app`` on uvicorn at 127.0.0.1 on a free port; yield its address."""
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=0,
        lifespan="off",
        log_config=None,
        access_log=False,
        log_level="warning",
        timeout_graceful_shutdown=2,
    )
    server = _Server(config)
    task = asyncio.create_task(server.serve())
    try:
        async with asyncio.timeout(10):
            while not server.started:
                if task.done():
                    break
                await asyncio.sleep(0.02)
        if task.done() or not server.servers:
            error = task.exception() if task.done() and not task.cancelled() else None
            raise ReplayError(
                f"the HTTP service did not start ({describe_error(error) if error else 'no reason given'})"
            )
        port = server.servers[0].sockets[0].getsockname()[1]
        yield "127.0.0.1", int(port)
    finally:
        server.should_exit = True
        # asyncio.wait, not await: the task's own error must not mask ours,
        # and an outer cancellation must still propagate.
        done, _ = await asyncio.wait([task], timeout=5)
        if not done:
            task.cancel()
            await asyncio.wait([task])
        if not task.cancelled():
            task.exception()  # retrieved: uvicorn already logged it


class _LogCollector(logging.Handler):
    """Keeps the run's warnings off the terminal (the progress bar owns it)
    and the first leak report for the summary."""

    def __init__(self, run: PoolRun) -> None:
        super().__init__(logging.WARNING)
        self.run = run

    def emit(self, record: logging.LogRecord) -> None:
        self.run.log_records += 1
        if record.name == "safepool.leaks" and self.run.leak_report is None:
            self.run.leak_report = record.getMessage()


@contextlib.contextmanager
def collecting_logs(run: PoolRun) -> Iterator[None]:
    root = logging.getLogger()
    handler = _LogCollector(run)
    root.addHandler(handler)
    try:
        yield
    finally:
        root.removeHandler(handler)


def _sample(pool: Any, run: PoolRun, metrics: ServiceMetrics, t: float, server_connections: int | None) -> Sample:
    leaks = run.leaks_taken_back()
    if isinstance(pool, safepool.Pool):
        stats = pool.stats()
        return Sample(t, stats.size, stats.in_use, stats.waiting, server_connections, metrics.in_flight, leaks)
    size = pool.get_size()
    return Sample(t, size, size - pool.get_idle_size(), None, server_connections, metrics.in_flight, leaks)


async def _sample_every_second(
    pool: Any, run: PoolRun, metrics: ServiceMetrics, monitor: Monitor, start: float, tick: Tick | None
) -> None:
    loop = asyncio.get_running_loop()
    second = 1
    while True:
        await asyncio.sleep(max(0.0, start + second - loop.time()))
        connections = await monitor.count_connections(app_name(run.pool))
        sample = _sample(pool, run, metrics, round(loop.time() - start, 3), connections)
        run.samples.append(sample)
        if tick is not None:
            tick(run.pool, sample, run.records)
        second += 1


async def _accepting(dsn: str) -> None:
    """Return once the server accepts a connection (probing every 20 ms)."""
    while True:
        try:
            con = await asyncpg.connect(dsn, timeout=1, server_settings={"application_name": "safepool-replay-probe"})
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError):
            await asyncio.sleep(0.02)
        else:
            await con.close()
            return


async def _inject_fault(
    config: ReplayConfig, db: Database, metrics: ServiceMetrics, run: PoolRun, start: float
) -> None:
    """At ``leak_start``: the provider hangs (stuck), or the server restarts (restart)."""
    loop = asyncio.get_running_loop()
    await asyncio.sleep(max(0.0, start + config.leak_start - loop.time()))
    run.marks["fault"] = loop.time() - start
    if config.scenario == "stuck":
        metrics.provider_hangs = True
    elif config.scenario == "restart":
        stopping: asyncio.Task[None] | None = None
        starting: asyncio.Task[None] | None = None
        try:
            stopping = loop.create_task(asyncio.to_thread(db.stop, "fast"))
            await asyncio.wait([stopping])  # (a cancel here leaves the task to end with its thread)
            stopping.result()
            run.marks["stopped"] = loop.time() - start
            await asyncio.sleep(config.downtime)
            starting = loop.create_task(asyncio.to_thread(db.start))
            await _accepting(db.dsn)
            run.marks["accepting"] = loop.time() - start
        except BaseException:
            # Cancelled (Ctrl-C, a run too short) or failed: still leave the
            # server running and no pg_ctl behind, but the first exception is
            # the one that propagates. Ctrl-C also kills pg_ctl (the same
            # process group): its error is not the replay's. A stop under way
            # (pg_ctl in a thread: cancelling the await does not stop it) ends
            # first, or the start would run beside it.
            try:
                if stopping is not None:
                    await _ended(stopping)
            finally:
                await _ended(starting or loop.create_task(asyncio.to_thread(db.start)))
            raise
        if (error := await _ended(starting)) is not None:
            raise ReplayError(f"could not start the server again ({describe_error(error)})") from error


# How long the restart scenario's load may run past --duration waiting for
# the server to accept connections again (a loaded machine's pg_ctl).
RESTART_GRACE = 60.0
# What the restart scenario observes once the server accepts again, at
# least (the CLI asks --duration to leave as much).
AFTER_RESTART = 2.0


def _restart_observed(config: ReplayConfig, run: PoolRun, fault: asyncio.Task[None]) -> Callable[[], float]:
    """The restart scenario's ``until`` for ``run_load``: the load runs on
    until ``AFTER_RESTART`` seconds after the server accepts connections
    again (marked ``load_extended`` when that is past ``--duration``), up
    to ``RESTART_GRACE`` seconds past it while the server is not back; a
    fault that ended otherwise (failed) extends nothing."""

    def until() -> float:
        accepting = run.marks.get("accepting")
        if accepting is not None:
            end = accepting + AFTER_RESTART
            if end > config.duration:
                run.marks["load_extended"] = end
            return end
        return 0.0 if fault.done() else config.duration + RESTART_GRACE

    return until


async def _ended(task: asyncio.Task[None]) -> BaseException | None:
    """Wait for ``db.start`` or ``db.stop`` to end, even through cancellation
    (pg_ctl runs in a thread, which cannot be interrupted); its error, always
    retrieved. A cancellation that came meanwhile is raised once it has ended."""
    cancelled = False
    while not task.done():
        try:
            await asyncio.wait([task])
        except asyncio.CancelledError:
            cancelled = True
    error = None if task.cancelled() else task.exception()
    if cancelled:
        raise asyncio.CancelledError
    return error


async def run_pool(
    pool_kind: str, db: Database, config: ReplayConfig, monitor: Monitor, tick: Tick | None = None
) -> PoolRun:
    """Replay one scenario against one pool."""
    run = PoolRun(pool_kind)
    service = load_service()
    loop = asyncio.get_running_loop()
    with collecting_logs(run):
        try:
            pool = await open_pool(pool_kind, db.dsn, config)
        except Exception as exc:
            raise ReplayError(f"could not open {pool_kind}'s pool ({describe_error(exc)})") from exc
        try:
            if isinstance(pool, safepool.Pool):
                pool.add_listener(run.events.append)
            app, metrics = service.build_app(pool, request_timeout=config.request_timeout, query_time=config.query_time)
            try:
                async with serving(app) as address:
                    start = loop.time()
                    helpers = [
                        loop.create_task(_sample_every_second(pool, run, metrics, monitor, start, tick)),
                        loop.create_task(_inject_fault(config, db, metrics, run, start)),
                    ]
                    until = _restart_observed(config, run, helpers[1]) if config.scenario == "restart" else None
                    try:
                        await run_load(address, config, start, run.records, until=until)
                    finally:
                        sampler, fault = helpers
                        sampler.cancel()
                        if not fault.done():  # a run shorter than the fault: stop it (pg_ctl finishes)
                            fault.cancel()
                        await asyncio.wait(helpers)
                    for task in helpers:
                        if not task.cancelled() and (error := task.exception()) is not None:
                            raise ReplayError(f"the replay failed ({describe_error(error)})") from error
            finally:
                await metrics.shutdown()
            run.leaked = metrics.leaked + metrics.stuck
        finally:
            await close_pool(pool)
    return run
