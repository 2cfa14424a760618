"""Review h283: b3892bb bounded a pool task's wait for a cancelled
statement (one the server never answers: ``COPY ... FROM STDIN`` sent with
``execute()``) by ``DEFAULT_RESET_TIMEOUT`` when no budget is set. Other
ways to the same wait: the statement cancelled by its task in the same loop
step as the release (``Runner._reset_after_a_loop_pass``), and while it is
still running (the release's reset refused at once).
"""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import pytest

import safepool
from safepool import _reclaim, _runner, _workers
from tests._util import copy_in_table, next_lease_is_another_backend

pytestmark = [pytest.mark.asyncio, pytest.mark.realtime]

BOUND = 0.5  # seconds: DEFAULT_RESET_TIMEOUT, shortened for the test


@pytest.mark.parametrize(
    ("how", "reset_mode"),
    [
        ("same_step", "full"),
        ("same_step", "rollback"),
        ("same_step", "auto"),
        ("after_a_step", "full"),
        ("after_a_step", "rollback"),
        ("after_a_step", "auto"),
    ],
)
@pytest.mark.parametrize("command_timeout", [None, 60.0])
async def test_a_task_cancelled_copy_in_does_not_hold_the_slot_for_ever(
    pg_dsn: str, app_name: str, server_count: Any, monkeypatch: pytest.MonkeyPatch, reset_mode: str,
    command_timeout: float | None, how: str,
) -> None:
    """As test_review_h281_copy_in_cancel.py's, the statement cancelled by
    its task rather than by its ``timeout=``: with no budget, the release
    returns (or raises) within DEFAULT_RESET_TIMEOUT, and the next acquire
    gets a new connection, never two backends at once."""
    monkeypatch.setattr(_workers, "DEFAULT_RESET_TIMEOUT", BOUND)
    monkeypatch.setattr(_runner, "DEFAULT_RESET_TIMEOUT", BOUND)
    async with copy_in_table(pg_dsn, app_name) as table:
        pool = await safepool.create_pool(
            pg_dsn, min_size=1, max_size=1, reset_mode=reset_mode, command_timeout=command_timeout,
            server_settings={"application_name": app_name},
        )
        try:
            con = await pool.acquire()
            stuck_pid = con.get_server_pid()
            statement = asyncio.ensure_future(con.execute(f"COPY {table} FROM STDIN"))
            await asyncio.sleep(0.2)
            statement.cancel()
            if how == "after_a_step":
                await asyncio.sleep(0)
            await _release_within_the_bound(pool, con)
            await next_lease_is_another_backend(pool, stuck_pid, server_count, app_name)
            assert pool.stats().in_use == 0
        finally:
            statement.cancel()
            pool.terminate()


async def _release_within_the_bound(pool: safepool.Pool, con: Any) -> None:
    """``pool.release(con)`` of a lease whose COPY FROM STDIN was cancelled
    returns, or raises (TimeoutError, the bound's: as asyncpg's release when
    its budget runs out), within about BOUND."""
    loop = asyncio.get_running_loop()
    began = loop.time()
    try:
        async with asyncio.timeout(BOUND + 4):
            await pool.release(con)
    except Exception:
        pass
    assert loop.time() - began < BOUND + 3, "release() waited for the ignored cancel (no bound)"


class OwnReset(asyncpg.Connection):  # type: ignore[misc]
    async def reset(self, *, timeout: Any = None) -> None:
        await super().reset(timeout=timeout)


async def _reset_hook(con: Any) -> None:
    await con.execute("RESET ALL")


@pytest.mark.parametrize("how", ["same_step", "after_a_step", "timeout"])
@pytest.mark.parametrize("custom", ["connection_class", "reset_hook"])
async def test_a_custom_reset_after_an_ignored_cancel(
    pg_dsn: str, app_name: str, server_count: Any, monkeypatch: pytest.MonkeyPatch, how: str, custom: str,
) -> None:
    """A custom reset (a class's own reset(), a reset= hook) runs in a pool
    task: its wait for the cancellation is bounded alike."""
    monkeypatch.setattr(_workers, "DEFAULT_RESET_TIMEOUT", BOUND)
    monkeypatch.setattr(_runner, "DEFAULT_RESET_TIMEOUT", BOUND)
    async with copy_in_table(pg_dsn, app_name) as table:
        options: dict[str, Any] = {"connection_class": OwnReset} if custom == "connection_class" else {"reset": _reset_hook}
        pool = await safepool.create_pool(
            pg_dsn, min_size=1, max_size=1, server_settings={"application_name": app_name}, **options,
        )
        statement: asyncio.Future[Any] | None = None
        try:
            con = await pool.acquire()
            stuck_pid = con.get_server_pid()
            if how == "timeout":
                with pytest.raises(asyncio.TimeoutError):
                    await con.execute(f"COPY {table} FROM STDIN", timeout=0.2)
            else:
                statement = asyncio.ensure_future(con.execute(f"COPY {table} FROM STDIN"))
                await asyncio.sleep(0.2)
                statement.cancel()
                if how == "after_a_step":
                    await asyncio.sleep(0)
            await _release_within_the_bound(pool, con)
            await next_lease_is_another_backend(pool, stuck_pid, server_count, app_name)
        finally:
            if statement is not None:
                statement.cancel()
            pool.terminate()


@pytest.mark.parametrize("reset_mode", ["full", "rollback", "auto"])
async def test_a_lease_timeout_take_back_of_a_copy_in(
    pg_dsn: str, app_name: str, server_count: Any, monkeypatch: pytest.MonkeyPatch, reset_mode: str,
) -> None:
    """lease_timeout runs out on a lease stuck in COPY FROM STDIN: the take
    back's cancel is ignored too; the slot comes back within the bound."""
    for module in (_workers, _runner, _reclaim):
        monkeypatch.setattr(module, "DEFAULT_RESET_TIMEOUT", BOUND)
    async with copy_in_table(pg_dsn, app_name) as table:
        pool = await safepool.create_pool(
            pg_dsn, min_size=1, max_size=1, reset_mode=reset_mode, lease_timeout=0.3,
            server_settings={"application_name": app_name},
        )
        statement: asyncio.Future[Any] | None = None
        try:
            con = await pool.acquire()
            stuck_pid = con.get_server_pid()
            statement = asyncio.ensure_future(con.execute(f"COPY {table} FROM STDIN"))
            await next_lease_is_another_backend(pool, stuck_pid, server_count, app_name, BOUND + 6, lease_timeout=None)
            await asyncio.wait([statement], timeout=5)
            assert statement.done()  # (taken back: the statement's connection went)
            await pool.release(con)
            stats = pool.stats()
            assert stats.in_use == 0 and stats.leases_expired == 1
        finally:
            if statement is not None:
                statement.cancel()
            pool.terminate()


@pytest.mark.parametrize("reset_mode", ["full", "rollback", "auto"])
async def test_a_request_cancelled_in_copy_in_gives_its_slot_back(
    pg_dsn: str, app_name: str, server_count: Any, monkeypatch: pytest.MonkeyPatch, reset_mode: str,
) -> None:
    """The usual way there: a request task cancelled (a client gone) while
    ``async with pool.acquire() as con: await con.execute("COPY ... FROM
    STDIN")`` waits; ``__aexit__`` releases in the loop step of the
    statement's cancellation. With no budget, the slot comes back within
    DEFAULT_RESET_TIMEOUT."""
    for module in (_workers, _runner, _reclaim):
        monkeypatch.setattr(module, "DEFAULT_RESET_TIMEOUT", BOUND)
    async with copy_in_table(pg_dsn, app_name) as table:
        pool = await safepool.create_pool(
            pg_dsn, min_size=1, max_size=1, reset_mode=reset_mode, server_settings={"application_name": app_name},
        )
        pids: list[int] = []

        async def request() -> None:
            async with pool.acquire() as con:
                pids.append(con.get_server_pid())
                await con.execute(f"COPY {table} FROM STDIN")

        task: asyncio.Future[None] | None = None
        try:
            task = asyncio.ensure_future(request())
            await asyncio.sleep(0.3)
            task.cancel()
            # The task ends: cancelled, or with the release's TimeoutError once
            # the bound ran out (as asyncpg's release raises when its budget does).
            await asyncio.wait([task], timeout=BOUND + 4)
            assert task.done(), "the cancelled request still waits in its release (no bound)"
            with pytest.raises((asyncio.CancelledError, TimeoutError)):
                await task
            async with asyncio.timeout(BOUND + 4):
                async with pool.acquire() as again:
                    assert await again.fetchval("SELECT 1") == 1
                    assert again.get_server_pid() != pids[0]
                    assert await server_count(app_name) == 1
        finally:
            if task is not None:
                task.cancel()
            pool.terminate()
