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
import httpx
import uvicorn

import safepool

from .config import ReplayConfig, ReplayError, app_name
from .load import RequestRecord, client_timeout, run_load
from .server import count_connections, describe_error

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


MIN_SIZE = 2  # both pools' min_size: leaked connections then show as new server connections

Tick = Callable[[str, Sample, list[RequestRecord]], None]

def load_service() -> types.ModuleType:
    """The demo service (``app.py``), imported as usual: safepool's
    acquire-site capture skips the pool's own modules (``safepool/*.py``) but
    not its subpackages, so leak reports name the service's lines."""
    from . import app

    return app


async def open_pool(pool: str, dsn: str, config: ReplayConfig) -> Any:
    settings = {"application_name": app_name(pool)}
    # A small floor, so that pg_stat_activity shows leaked connections pile up.
    low, high = min(MIN_SIZE, config.pool_size), config.pool_size
    if pool == "asyncpg":
        return await asyncpg.create_pool(dsn, min_size=low, max_size=high, server_settings=settings)
    # safepool's defaults, plus the two options the incident calls for.
    return await safepool.create_pool(
        dsn,
        min_size=low,
        max_size=high,
        server_settings=settings,
        name="replay",
        lease_timeout=config.lease_timeout,
        leak_warning_after=config.leak_warning_after,
    )


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
async def serving(app: ASGIApp) -> AsyncIterator[str]:
    """Run ``app`` on uvicorn at 127.0.0.1 on a free port; yield its base URL."""
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
        yield f"http://127.0.0.1:{port}"
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
    leaks = sum(1 for event in run.events if event["event"] in ("leak", "lease_expired"))
    if isinstance(pool, safepool.Pool):
        stats = pool.stats()
        return Sample(t, stats.size, stats.in_use, stats.waiting, server_connections, metrics.in_flight, leaks)
    size = pool.get_size()
    return Sample(t, size, size - pool.get_idle_size(), None, server_connections, metrics.in_flight, leaks)


async def _sample_every_second(
    pool: Any, run: PoolRun, metrics: ServiceMetrics, monitor: asyncpg.Connection, start: float, tick: Tick | None
) -> None:
    loop = asyncio.get_running_loop()
    second = 1
    while True:
        await asyncio.sleep(max(0.0, start + second - loop.time()))
        connections = await count_connections(monitor, app_name(run.pool))
        sample = _sample(pool, run, metrics, round(loop.time() - start, 3), connections)
        run.samples.append(sample)
        if tick is not None:
            tick(run.pool, sample, run.records)
        second += 1


async def run_pool(
    pool_kind: str, dsn: str, config: ReplayConfig, monitor: asyncpg.Connection, tick: Tick | None = None
) -> PoolRun:
    """Replay the incident against one pool."""
    run = PoolRun(pool_kind)
    service = load_service()
    loop = asyncio.get_running_loop()
    with collecting_logs(run):
        try:
            pool = await open_pool(pool_kind, dsn, config)
        except Exception as exc:
            raise ReplayError(f"could not open {pool_kind}'s pool ({describe_error(exc)})") from exc
        try:
            if isinstance(pool, safepool.Pool):
                pool.add_listener(run.events.append)
            app, metrics = service.build_app(pool, request_timeout=config.request_timeout)
            async with serving(app) as base_url:
                limits = httpx.Limits(max_connections=None, max_keepalive_connections=100)
                async with httpx.AsyncClient(
                    base_url=base_url, limits=limits, timeout=client_timeout(config)
                ) as client:
                    start = loop.time()
                    sampler = loop.create_task(_sample_every_second(pool, run, metrics, monitor, start, tick))
                    try:
                        await run_load(client, config, start, run.records)
                    finally:
                        sampler.cancel()
                        await asyncio.wait([sampler])
                    if not sampler.cancelled() and (error := sampler.exception()) is not None:
                        raise ReplayError(f"the sampler failed ({describe_error(error)})") from error
            run.leaked = metrics.leaked
        finally:
            await close_pool(pool)
    return run
