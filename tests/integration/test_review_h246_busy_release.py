"""Review h246: a release refused because a statement of the lease runs in
another task (busy_elsewhere) waits for it to end within the release's
budget (safepool/_runner.py:553-558: its timeout=, else the acquire's),
not reset_timeout's. A statement (pg_sleep), not a COPY (s74's case)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import asyncpg
import pytest

import safepool

pytestmark = pytest.mark.asyncio

BUSY = "cannot perform operation: another operation is in progress"


async def _count_backends(admin: Any, app: str) -> int:
    return int(await admin.fetchval("SELECT count(*) FROM pg_stat_activity WHERE application_name = $1", app))


async def _busy_release(
    create: Any, dsn: str, app: str, *, sleep: float, acquire_timeout: float | None,
    release_timeout: float | None, cancel_release_after: float | None = None,
) -> dict[str, Any]:
    """A lease's pg_sleep(sleep) runs in one task; another releases the lease.
    What the release and the statement got, how long the release took, the
    most backends of the pool the server had at once (sampled until a
    second lease has served and the first backend is gone)."""
    admin = await asyncpg.connect(dsn)
    watcher = await asyncpg.connect(dsn)
    peak = 0
    stop = asyncio.Event()

    async def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, await _count_backends(watcher, app))
            await asyncio.sleep(0.005)

    pool = await create(dsn, min_size=1, max_size=1, server_settings={"application_name": app})
    sampler = asyncio.ensure_future(sample())
    try:
        con = await pool.acquire(timeout=acquire_timeout)
        pid = await con.fetchval("SELECT pg_backend_pid()")
        call = asyncio.ensure_future(con.fetchval(f"SELECT pg_sleep({sleep})"))
        async with asyncio.timeout(5):
            while not await admin.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE pid = $1 AND state = 'active'", pid
            ):
                await asyncio.sleep(0.005)
        started = time.monotonic()
        kwargs = {} if release_timeout is None else {"timeout": release_timeout}
        release = asyncio.ensure_future(pool.release(con, **kwargs))
        if cancel_release_after is not None:
            await asyncio.sleep(cancel_release_after)
            release.cancel()
        try:
            await asyncio.wait_for(asyncio.shield(release), 30)
            released = "ok"
        except asyncio.CancelledError:
            released = "cancelled"
        except Exception as exc:  # noqa: BLE001 (the outcome compared)
            released = f"{type(exc).__name__}: {exc}"
        took = time.monotonic() - started
        try:
            await asyncio.wait_for(call, 30)
            statement = "ok"
        except Exception as exc:  # noqa: BLE001
            statement = type(exc).__name__
        async with pool.acquire(timeout=30) as again:
            assert await again.fetchval("SELECT pg_backend_pid()") != pid
        async with asyncio.timeout(10):
            while await admin.fetchval("SELECT count(*) FROM pg_stat_activity WHERE pid = $1", pid):
                await asyncio.sleep(0.005)
        gone = time.monotonic() - started
        stop.set()
        await sampler
        return {"release": released, "took": took, "statement": statement, "peak": peak, "gone": gone}
    finally:
        stop.set()
        await asyncio.gather(sampler, return_exceptions=True)
        await asyncio.wait_for(pool.close(), 10)
        await admin.close()
        await watcher.close()


@pytest.mark.parametrize(
    ("acquire_timeout", "release_timeout"), [(None, 0.3), (0.3, None), (10.0, 0.3), (None, None)],
    ids=["release-timeout", "acquire-timeout", "release-over-acquire", "no-budget"],
)
async def test_a_release_during_another_tasks_statement_fails_it_without_a_second_backend(
    pg_dsn: str, app_name: str, acquire_timeout: Any, release_timeout: Any
) -> None:
    kwargs = {"sleep": 3, "acquire_timeout": acquire_timeout, "release_timeout": release_timeout}
    theirs = await _busy_release(asyncpg.create_pool, pg_dsn, app_name + "-a", **kwargs)
    ours = await _busy_release(safepool.create_pool, pg_dsn, app_name + "-s", **kwargs)
    # Both pools refuse the release with the same InterfaceError.
    assert theirs["release"] == ours["release"] == f"InterfaceError: {BUSY}"
    # asyncpg's pool terminates the connection at once: the statement fails
    # with the lost connection's error, and its backend runs pg_sleep to its
    # end beside the replacement (2 backends from a max_size=1 pool).
    assert theirs["statement"] == "ConnectionDoesNotExistError"
    assert theirs["peak"] == 2
    # safepool cancels the statement (docs/migration.md: QueryCanceledError),
    # reads its answer, then closes: the release raises long before the
    # statement's 3 s (whatever the budget), and the slot counts until the
    # backend is gone: never 2 backends.
    assert ours["statement"] == "QueryCanceledError"
    assert ours["took"] < 2.0
    assert ours["gone"] < 2.5
    assert ours["peak"] == 1
