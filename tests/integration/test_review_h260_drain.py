"""Review h260: the guarded loggers (``safepool._logging``) and the
``Runner.drain()`` error path, attacked with real PostgreSQL.

Every wait is bounded (``asyncio.wait_for`` / ``until`` / ``outcome_of``)."""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import pytest

import safepool
from tests._util import loop_errors, outcome_of, raising_handler, until

pytestmark = pytest.mark.asyncio


async def eventually(predicate: Any, timeout: float) -> bool:
    """Polls ``predicate`` for up to ``timeout`` seconds (a plain bool: an
    xfail's report stays short)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        if asyncio.get_running_loop().time() > deadline:
            return False
        await asyncio.sleep(0.05)
    return True


async def _refused(*_args: Any, **_kwargs: Any) -> Any:
    raise ConnectionRefusedError("review h260: refused")


async def _kill_backends(pg_dsn: str, app_name: str) -> None:
    admin = await asyncpg.connect(pg_dsn)
    try:
        await admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1", app_name)
    finally:
        await admin.close()


# ------------------------------------------- min_size upkeep, asyncpg.pool


@pytest.mark.parametrize("where", ["asyncpg.pool", None])
async def test_floor_upkeep_survives_a_raising_handler_on_the_asyncpg_logger(
    pg_dsn: str, app_name: str, where: str | None
) -> None:
    pool = await safepool.create_pool(
        pg_dsn, min_size=1, max_size=2, server_settings={"application_name": app_name},
    )
    runner = pool._runner
    real_open = runner.open_connection
    try:
        with loop_errors() as errors, raising_handler(where) as handler:
            runner.open_connection = _refused
            await _kill_backends(pg_dsn, app_name)  # the floor's connection is lost
            # The floor's reconnects fail.
            await until(lambda: runner.state.connect_failures >= 2, 10)
            assert any("restore the pool connection floor" in r.getMessage() for r in handler.records), errors
            runner.open_connection = real_open
            # The upkeep retries (1, 2, 4 s ...): the floor is back.
            restored = await eventually(lambda: pool.get_size() >= 1 and runner.state.connect_failures == 0, 15)
            assert restored, (pool.get_size(), runner.maintenance_task)
        await asyncio.wait_for(pool.close(), 5)
    finally:
        runner.open_connection = real_open
        pool.terminate()
        dead = runner.maintenance_task
        if dead is not None and dead.done() and not dead.cancelled():
            dead.exception()  # (retrieved: no "Task exception was never retrieved" later)


async def test_floor_upkeep_with_a_raising_handler_on_safepool(pg_dsn: str, app_name: str) -> None:
    """Same, the raising handler on ``safepool`` (guarded): the floor is restored."""
    pool = await safepool.create_pool(
        pg_dsn, min_size=1, max_size=2, server_settings={"application_name": app_name},
    )
    runner = pool._runner
    real_open = runner.open_connection
    try:
        with loop_errors() as errors, raising_handler("safepool") as handler:
            runner.open_connection = _refused
            await _kill_backends(pg_dsn, app_name)  # the floor's connection is lost
            await until(lambda: runner.state.connect_failures >= 2, 10)
            assert any("connect failed" in r.getMessage() for r in handler.records), errors
            runner.open_connection = real_open
            await until(lambda: pool.get_size() >= 1 and runner.state.connect_failures == 0, 15)
            async with pool.acquire(timeout=3) as con:
                assert await con.fetchval("SELECT 1") == 1
        assert errors and all(isinstance(c.get("exception"), RuntimeError) for c in errors), errors
        await asyncio.wait_for(pool.close(), 5)
    finally:
        runner.open_connection = real_open
        pool.terminate()


# ------------------------------------------- drain(): a Wake that raises


async def test_a_wake_that_raises_does_not_leave_the_acquire_hanging(pg_dsn: str, app_name: str) -> None:
    """Fault injected (Runner.grant raising once, standing for an internal
    bug that drain() now reports instead of raising)."""
    pool = await safepool.create_pool(pg_dsn, min_size=0, max_size=1, server_settings={"application_name": app_name})
    runner = pool._runner
    real_grant = runner.grant
    calls: list[int] = []

    def grant(waiter: Any) -> bool:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("review h260: grant failed")
        return real_grant(waiter)

    runner.grant = grant  # type: ignore[method-assign]
    try:
        with loop_errors() as errors:
            got = await outcome_of(pool.acquire(timeout=1), 4)
            assert calls and any("Wake raised" in c["message"] for c in errors), errors
            # The acquire ends by its timeout=1 (or with the grant's error), not
            # by the test's 4 s bound (outcome_of's builtin TimeoutError).
            assert isinstance(got, (safepool.PoolTimeoutError, RuntimeError)) and type(got) is not TimeoutError, got
    finally:
        runner.grant = real_grant  # type: ignore[method-assign]
        pool.terminate()


async def test_a_timeout_that_raises_does_not_leave_the_acquire_hanging(
    pg_dsn: str, app_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from safepool._reporting import Reporter

    pool = await safepool.create_pool(pg_dsn, min_size=1, max_size=1, server_settings={"application_name": app_name})
    try:
        with loop_errors() as errors:
            held = await pool.acquire(timeout=3)

            def busy_message(*_args: Any, **_kwargs: Any) -> str:
                raise RuntimeError("review h260: busy_message failed")

            monkeypatch.setattr(Reporter, "busy_message", busy_message)
            got = await outcome_of(pool.acquire(timeout=0.5), 3)
            monkeypatch.undo()
            assert any("TimeOut raised" in c["message"] for c in errors), errors
            assert isinstance(got, (safepool.PoolTimeoutError, RuntimeError)) and type(got) is not TimeoutError, got
            await pool.release(held)
    finally:
        pool.terminate()


# ------------------------------------ a raising handler: the password


PASSWORD = "pw-review-h260-secret"


async def test_a_raising_handler_on_a_listener_failure_does_not_leak_the_password(pg_dsn: str, app_name: str) -> None:
    """The pool redacts a failing event listener's traceback in its
    ``listener_failed`` record; the handler's error, raised while that
    listener's error was being handled, chains to it (``__context__``) and
    goes to the loop's exception handler, which prints the chain."""
    import traceback

    pool = await safepool.create_pool(
        pg_dsn, min_size=0, max_size=1, password=PASSWORD, server_settings={"application_name": app_name},
    )

    def listener(event: Any) -> None:
        raise RuntimeError(f"listener could not export: connect with password={PASSWORD}")

    pool.add_event_listener(listener)
    try:
        with loop_errors() as errors, raising_handler("safepool") as handler:
            pool._runner.open_connection = _refused  # a connect_failed event for the listener
            await outcome_of(pool.acquire(timeout=1), 4)
            await until(lambda: any(getattr(r, "event", None) == "listener_failed" for r in handler.records), 5)
        failed = [r for r in handler.records if getattr(r, "event", None) == "listener_failed"]
        assert failed and all(PASSWORD not in r.getMessage() for r in failed)  # the pool's own record: redacted
        assert errors
        printed = "".join(
            "".join(traceback.format_exception(c["exception"])) for c in errors if c.get("exception") is not None
        )
        assert PASSWORD not in printed, printed
    finally:
        pool.terminate()


# ------------------------------- a timing sink's failure, plain logger


async def test_remove_timing_sink_with_a_failing_sink_and_a_raising_handler(pg_dsn: str, app_name: str) -> None:
    pool = await safepool.create_pool(pg_dsn, min_size=1, max_size=1, server_settings={"application_name": app_name})

    def sink(value: float) -> None:
        raise ValueError("sink failed")

    try:
        pool.add_timing_sink("lease", sink)
        with loop_errors(), raising_handler("safepool"):
            async with pool.acquire(timeout=3):
                pass  # a value queued; its flush not yet run (call_soon)
            got: BaseException | None = None
            try:
                pool.remove_timing_sink("lease", sink)  # flushes first: the sink raises, the pool logs
            except Exception as error:
                got = error
            assert got is None, got
        # Gone: the plain histogram is back (unknown sinks are ignored by a
        # second remove_timing_sink(), so that cannot tell).
        from safepool._histogram import TeeHistogram
        from safepool._surface import _TIMINGS

        assert not isinstance(getattr(pool._state, _TIMINGS["lease"]), TeeHistogram)
        await asyncio.wait_for(pool.close(), 5)
    finally:
        pool.terminate()
