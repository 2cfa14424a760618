"""Helper 262, adversarial review: an error whose ``str()`` raises (connect, init, reset).

``Pool.describe_error``: "One line for ``error`` that is safe to log or
show ... A str, never raises." ``health()``: "The probe's own errors ...
are reasons in the report, never raised." docs/metrics.md: ``stats()`` is
"the source of every number below", read by both exporters at each scrape.

An exception whose ``__str__`` raises (a library error class whose
``__str__`` reads an attribute or argument its constructor was not given:
``IndexError``/``AttributeError`` on ``str(exc)``) raised by a
``connect=`` callable or an ``init=`` hook:

- ``describe_error`` (safepool/stats.py:188: ``str(error)``) raises, and
  ``stats()`` calls it for ``last_connect_error`` (stats.py:256): while it
  is the last connect error, ``pool.stats()`` raises, so does
  ``health()`` (it reads stats), every Prometheus scrape of the registry
  and the pool's OpenTelemetry collection;
- ``Runner.connect_slot`` reports the failure (safepool/_runner.py:768,
  ``Reporter.connect_failed`` -> ``describe``, safepool/_reporting.py:264)
  before its ``drain()`` and ``keep_floor()``: the error escapes, the
  connect task dies ("Task exception was never retrieved"), no
  ``connect_failed`` record or event is sent, and the waiting task is
  failed only when something else drains: its ``acquire()`` sits out its
  whole timeout before it gets the connect's error (a plain connect error
  fails it at once);
- for an ``OSError`` with no errno, ``_pg.refusal`` (safepool/_internals.py:184:
  ``str(error).startswith("Multiple exceptions: ")``) raises before the
  core hears of the failure: ``connect_errors`` misses it, no event, and
  the slot reads ``connecting`` (``size=1, connecting=1``, no connect
  under way) until the waiting acquire gives up: it gets
  ``PoolTimeoutError`` at its timeout, never the connect's error.

A ``reset=`` hook raising such an error is worse: ``Runner.reset_done``
(safepool/_runner.py:530) logs "reset failed" with ``describe`` after the
core moved the slot to ``closing`` and before the ``Close`` is run, so the
close never happens and the releasing task's future is never settled:
``release()`` hangs (118 s until pytest's timeout cancelled it, in a first
run), the slot reads ``closing`` for good and its backend stays open on the
server. The same hook failing a lease's take-back after ``lease_timeout``
(``Reclaimer.take_back_slot``, safepool/_reclaim.py:281, logs before
``reset_done``) leaves the slot ``resetting`` for good: with ``max_size=1``
every later acquire times out.

(Commit 3ed9ace dropped the ``try/finally`` that ran ``drain()`` and
``keep_floor()`` after ``Reporter.connect_failed`` whatever it raised, as
"dead defence" once the loggers were guarded; a raising ``describe`` runs
before the logger is called. The reset and take-back paths had no such
guard.)
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio
from prometheus_client import CollectorRegistry, generate_latest

import safepool
from safepool.metrics.prometheus import register

pytestmark = pytest.mark.asyncio


class Unprintable(LookupError):
    """A library error whose message needs what it was not given."""

    def __str__(self) -> str:
        raise IndexError("tuple index out of range")


class UnprintableOSError(OSError):
    def __str__(self) -> str:
        raise IndexError("tuple index out of range")


@pytest_asyncio.fixture
async def loop_errors() -> AsyncIterator[list[dict[str, Any]]]:
    loop = asyncio.get_running_loop()
    seen: list[dict[str, Any]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: seen.append(context))
    try:
        yield seen
    finally:
        loop.set_exception_handler(previous)


async def failing_pool(pg_dsn: str, error: type[BaseException]) -> safepool.Pool:
    async def connect(*args: Any, **kwargs: Any) -> Any:
        raise error("x")

    return await safepool.create_pool(pg_dsn, min_size=0, max_size=1, connect=connect)


async def test_stats_health_and_the_scrape_survive_an_unprintable_connect_error(
    pg_dsn: str, loop_errors: list[dict[str, Any]]
) -> None:
    pool = await failing_pool(pg_dsn, Unprintable)
    registry = CollectorRegistry()
    register(pool, registry=registry)
    try:
        with pytest.raises(Unprintable):
            await pool.acquire(timeout=0.5)
        assert isinstance(pool.describe_error(Unprintable("y")), str)  # "A str, never raises"
        stats = pool.stats()
        assert stats.connect_errors >= 1
        report = await pool.health(probe=False)
        assert not report.ready
        generate_latest(registry)
    finally:
        pool.terminate()


async def test_an_unprintable_connect_error_fails_the_waiting_acquire_at_once(
    pg_dsn: str, loop_errors: list[dict[str, Any]]
) -> None:
    pool = await failing_pool(pg_dsn, Unprintable)
    try:
        started = time.perf_counter()
        with pytest.raises(Unprintable):
            await pool.acquire(timeout=3.0)
        # A connect error reaches the task waiting for that connect at once
        # (a refused connect: a few ms); here it came at the 3 s timeout.
        assert time.perf_counter() - started < 1.5
        assert not loop_errors, [context.get("message") for context in loop_errors]
    finally:
        pool.terminate()


async def test_an_unprintable_oserror_from_connect_is_counted(
    pg_dsn: str, loop_errors: list[dict[str, Any]]
) -> None:
    pool = await failing_pool(pg_dsn, UnprintableOSError)
    try:
        started = time.perf_counter()
        with pytest.raises(UnprintableOSError):  # (a PoolTimeoutError at the acquire's timeout instead)
            await pool.acquire(timeout=3.0)
        assert time.perf_counter() - started < 1.5
        assert pool.stats().connect_errors == 1
    finally:
        pool.terminate()


async def test_a_reset_hook_raising_an_unprintable_error_never_hangs_release(
    pg_dsn: str, app_name: str, loop_errors: list[dict[str, Any]]
) -> None:
    async def reset(con: Any) -> None:
        raise Unprintable("x")

    pool = await safepool.create_pool(
        pg_dsn, min_size=1, max_size=1, reset=reset, server_settings={"application_name": app_name}
    )
    try:
        con = await pool.acquire()
        await con.execute("SELECT 1")
        release = asyncio.ensure_future(pool.release(con))
        done, _ = await asyncio.wait([release], timeout=5.0)  # (a failed reset's close: a few ms)
        if not done:
            release.cancel()
        assert done, f"release() still running after 5 s: {pool.stats()}"
        with pytest.raises(Unprintable):
            release.result()  # a failed reset's error is raised by release(), as on asyncpg's pool
        stats = pool.stats()
        assert stats.closing == 0, stats
    finally:
        pool.terminate()


async def test_an_expired_lease_whose_take_back_fails_unprintably_gives_its_place_back(
    pg_dsn: str, app_name: str, loop_errors: list[dict[str, Any]]
) -> None:
    async def reset(con: Any) -> None:
        raise Unprintable("x")

    pool = await safepool.create_pool(
        pg_dsn, min_size=1, max_size=1, reset=reset, lease_timeout=0.2,
        server_settings={"application_name": app_name},
    )
    try:
        con = await pool.acquire()
        await con.execute("SELECT 1")
        await asyncio.sleep(1.0)  # expired at 0.2 s; the take-back's reset fails, the connection is closed
        stats = pool.stats()
        assert (stats.leases_expired, stats.resetting) == (1, 0), stats
        got: list[int] = []
        with pytest.raises(Unprintable):  # (this lease's release runs the failing hook too)
            async with pool.acquire(timeout=2.0) as fresh:  # PoolTimeoutError: the one place is stuck resetting
                got.append(await fresh.fetchval("SELECT 1"))
        assert got == [1]
    finally:
        pool.terminate()
