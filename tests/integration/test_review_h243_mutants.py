"""Review h243: mutation review of 57b2150..e14bfeb (the counted cursor
classes, Runner.reset_slot(report=True) without busy retry, the pool-task
release branch's attach_released/drop_released, transaction_open and
warn_open_transaction(keep=)). Tests that kill mutants the existing tests
let survive, each comparing with asyncpg's own pool on a real server."""

from __future__ import annotations

import asyncio
import inspect
from typing import Any

import asyncpg
import pytest

import safepool

pytestmark = pytest.mark.asyncio

HAS_RESET_HOOK = "reset" in inspect.signature(asyncpg.create_pool).parameters


class OwnResetConnection(asyncpg.Connection):  # type: ignore[misc]
    async def reset(self, *, timeout: float | None = None) -> None:
        await super().reset(timeout=timeout)


class SelfTerminatingResetConnection(asyncpg.Connection):  # type: ignore[misc]
    """A reset whose statement ends its own backend: the connection is lost
    while the release's reset runs."""

    async def reset(self, *, timeout: float | None = None) -> None:
        await self.execute("SELECT pg_terminate_backend(pg_backend_pid())")


class FailingResetConnection(asyncpg.Connection):  # type: ignore[misc]
    """A reset that fails: the release closes the connection."""

    async def reset(self, *, timeout: float | None = None) -> None:
        await self.execute("SELECT 1/0")


def _check(pool: Any) -> None:
    state = getattr(pool, "_state", None)
    if state is not None:
        state.check_invariants()


def _describe(got: Any, proxy: Any) -> tuple[str, bool]:
    return type(got).__name__, got is proxy


async def _wait(fut: asyncio.Future[Any]) -> Any:
    return await asyncio.wait_for(fut, 5)


# Runner.reset_slot drops the released proxy once the reset succeeded
# (safepool/_runner.py:416-417; both paths below reset in reset_slot, on
# this server: kills the mutant that never drops it): a termination
# listener added by a lease stays on the connection (asyncpg's reset keeps
# them), and when the idle connection is lost later it gets the connection,
# not the old lease's proxy, as asyncpg's release detaches the proxy.
async def _listener_after_reset(factory: Any, dsn: str, path: str) -> list[Any]:
    kwargs: dict[str, Any] = {}
    if path == "custom_reset":
        kwargs["connection_class"] = OwnResetConnection
    pool = await factory(dsn, min_size=1, max_size=1, **kwargs)
    seen: list[Any] = []
    try:
        loop = asyncio.get_running_loop()
        called: asyncio.Future[Any] = loop.create_future()
        con = await pool.acquire()
        pid = con.get_server_pid()
        con.add_termination_listener(lambda c: called.done() or called.set_result(c))
        if path == "cancelled_statement":
            # (a statement cancelled just before the release: the reset
            # waits for the cancel's answer a loop pass later)
            task = asyncio.ensure_future(con.fetchval("SELECT pg_sleep(0.2)"))
            await asyncio.sleep(0.05)
            task.cancel()
        else:
            task = None
        await pool.release(con)
        if task is not None:
            try:
                await task
            except BaseException as exc:
                seen.append(("task", type(exc).__name__))
        await asyncio.sleep(0.3)  # (the pool task's reset is over: the connection idles)
        seen.append(("idle", pool.get_idle_size()))
        killer = await asyncpg.connect(dsn)
        try:
            seen.append(("terminated", await killer.fetchval("SELECT pg_terminate_backend($1)", pid)))
        finally:
            await killer.close()
        got = await _wait(called)
        seen.append(("listener got", *_describe(got, con)))
        async with pool.acquire(timeout=5) as again:
            seen.append(("again", await again.fetchval("SELECT 1")))
        _check(pool)
    finally:
        pool.terminate()
    return seen


@pytest.mark.parametrize("path", ["custom_reset", "cancelled_statement"])
async def test_a_lost_idle_connection_hands_its_termination_listener_the_connection_as_asyncpg_pool(
    pg_dsn: str, path: str
) -> None:
    theirs = await _listener_after_reset(asyncpg.create_pool, pg_dsn, path)
    ours = await _listener_after_reset(safepool.create_pool, pg_dsn, path)
    assert ours == theirs
    assert ("listener got", "Connection" if path == "cancelled_statement" else "OwnResetConnection", False) in ours


# Leaser.release's pool-task branch attaches the released proxy while the
# pool task resets (safepool/_leasing.py:554), and keeps it when the reset
# failed (safepool/_runner.py:416): a connection lost during that reset (a
# custom reset), or closed because it failed, hands its termination
# listeners the lease's proxy, as asyncpg's release does (it detaches the
# proxy after the reset, and after the close of a failed one).
async def _lost_during_custom_reset(factory: Any, dsn: str, how: str) -> list[Any]:
    cls = SelfTerminatingResetConnection if how == "lost" else FailingResetConnection
    pool = await factory(dsn, min_size=1, max_size=1, connection_class=cls)
    seen: list[Any] = []
    try:
        called: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        con = await pool.acquire()
        con.add_termination_listener(lambda c: called.done() or called.set_result(c))
        try:
            await pool.release(con)
        except Exception as exc:
            seen.append(("release", type(exc).__name__))
        got = await _wait(called)
        seen.append(("listener got", *_describe(got, con)))
        _check(pool)
    finally:
        pool.terminate()
    return seen


@pytest.mark.parametrize("how", ["lost", "failed"])
async def test_a_connection_closed_by_its_custom_reset_hands_its_listener_the_proxy_as_asyncpg_pool(
    pg_dsn: str, how: str
) -> None:
    theirs = await _lost_during_custom_reset(asyncpg.create_pool, pg_dsn, how)
    ours = await _lost_during_custom_reset(safepool.create_pool, pg_dsn, how)
    assert ours == theirs
    assert theirs[-1] == ("listener got", "PoolConnectionProxy", True)
    assert theirs[-1] == ("listener got", "PoolConnectionProxy", True)


# A release right after command_timeout cancelled a statement in an
# unmanaged transaction: reported once, as asyncpg's release. (Pinned; on
# this server the release resets in Runner.reset_slot, not in
# _reset_after_a_loop_pass, so it does not reach safepool/_runner.py:637.)
async def _timed_out_in_transaction(factory: Any, dsn: str) -> list[Any]:
    loop = asyncio.get_running_loop()
    seen: list[Any] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: seen.append(context["message"].split(" <")[0]))
    pool = await factory(dsn, min_size=1, max_size=1, command_timeout=0.1)
    try:
        con = await pool.acquire()
        await con.transaction().start()
        try:
            await con.fetchval("SELECT pg_sleep(1)")
        except Exception as exc:
            seen.append(("statement", type(exc).__name__))
        try:
            await pool.release(con)
        except Exception as exc:
            seen.append(("release", type(exc).__name__, str(exc)))
        await asyncio.sleep(0.2)
        async with pool.acquire(timeout=5) as again:
            seen.append(("again", await again.fetchval("SELECT 1"), again.is_in_transaction()))
            async with again.transaction():
                seen.append(await again.fetchval("SELECT 2"))
        _check(pool)
    finally:
        loop.set_exception_handler(previous)
        pool.terminate()
    return seen


async def test_a_release_after_a_timed_out_statement_in_a_transaction_reports_once_as_asyncpg_pool(
    pg_dsn: str,
) -> None:
    theirs = await _timed_out_in_transaction(asyncpg.create_pool, pg_dsn)
    ours = await _timed_out_in_transaction(safepool.create_pool, pg_dsn)
    assert ours == theirs
    assert theirs.count("Resetting connection with an active transaction") == 1


# A lease whose only call is a cursor refused outside a transaction: asyncpg
# parses the statement (Parse, Describe, Flush: no Sync) before it looks, so
# the backend is left in the implicit transaction of that Parse, holding the
# table's lock, with asyncpg's statement counter unmoved. The proxy's
# cursor() marks the lease (safepool/proxy.py _cursor_forwarder, clean_mark
# = -1), so every reset mode ends it, as asyncpg's reset does: kills the
# mutant that drops the mark (review h243's P9). The lock is read from
# another session once release() has returned.
@pytest.mark.parametrize("reset_mode", ["asyncpg", "full", "rollback", "auto"])
async def test_a_lease_whose_cursor_was_refused_outside_a_transaction_holds_no_lock_after_release(
    pg_dsn: str, reset_mode: str
) -> None:
    if reset_mode == "auto":
        pytest.importorskip("pglast")
    table = f"h243_cursor_{reset_mode}"
    admin = await asyncpg.connect(pg_dsn)
    if reset_mode == "asyncpg":
        pool: Any = await asyncpg.create_pool(pg_dsn, min_size=1, max_size=1)
    else:
        pool = await safepool.create_pool(pg_dsn, min_size=1, max_size=1, reset_mode=reset_mode)
    try:
        await admin.execute(f"CREATE TABLE IF NOT EXISTS {table} (n int)")
        async with pool.acquire() as con:
            pid = con.get_server_pid()
            with pytest.raises(asyncpg.NoActiveSQLTransactionError, match="outside of a transaction"):
                async for _ in con.cursor(f"SELECT n FROM {table}"):
                    pass
        locks = await admin.fetchval(
            "SELECT count(*) FROM pg_locks WHERE pid = $1 AND relation = $2::regclass", pid, table
        )
        assert locks == 0
        _check(pool)
    finally:
        await pool.close()
        await admin.execute(f"DROP TABLE IF EXISTS {table}")
        await admin.close()
