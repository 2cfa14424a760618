"""Hostile review of 88dada2 (the reset driver's wake-up on the real future),
9895366 (full mode marks every coroutine call, no watch() wrapper) and
4975bca (fast_members), on a real PostgreSQL, on asyncio's loop and uvloop.

Each scenario runs in its own event loop (``asyncio.Runner`` with the loop
factory under test), so the same checks run on both loops."""

from __future__ import annotations

import ast
import asyncio
import pathlib
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import asyncpg
import pytest
import uvloop

import safepool
from safepool import _state
from tests._util import pool_and_admin

LOOPS = {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}


def _run(loop: str, main: Callable[[], Awaitable[None]]) -> None:
    with asyncio.Runner(loop_factory=LOOPS[loop]) as runner:
        runner.run(asyncio.wait_for(main(), 60))  # type: ignore[arg-type]



async def _dirty(con: Any, key: int) -> None:
    """Leave all a reset must undo: a transaction holding an advisory lock,
    a session advisory lock, LISTEN, a session setting."""
    await con.execute("SET work_mem = '8MB'")
    await con.execute("LISTEN review_s21")
    await con.execute("SELECT pg_advisory_lock($1)", key)
    await con.execute("BEGIN")
    await con.execute("SELECT pg_advisory_xact_lock($1)", key + 1)


async def _assert_clean(pool: Any, admin: Any, key: int) -> None:
    """Acquire the (only) connection again: the reset has finished; nothing left."""
    async with pool.acquire() as con:
        assert not con.is_in_transaction()
        assert await con.fetchval("SHOW work_mem") == "4MB"
        assert await con.fetch("SELECT pg_listening_channels()") == []
        pid = con.get_server_pid()
    held = await admin.fetchval("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = $1", pid)
    assert held == 0
    # Another session can take both locks at once.
    assert await admin.fetchval("SELECT pg_try_advisory_lock($1) AND pg_try_advisory_lock($2)", key, key + 1)
    await admin.execute("SELECT pg_advisory_unlock_all()")
    pool._state.check_invariants()


async def _cancel_after(task: asyncio.Task[Any], steps: int, times: int) -> None:
    for _ in range(steps):
        await asyncio.sleep(0)
    for _ in range(times):
        task.cancel()
        await asyncio.sleep(0)


STYLES = ["cancel_once", "cancel_twice", "timeout", "wait_for", "anyio_scope"]


@pytest.mark.parametrize("loop", list(LOOPS))
@pytest.mark.parametrize("style", STYLES)
def test_cancelled_release_at_each_step_returns_the_connection_clean(pg_dsn: str, loop: str, style: str) -> None:
    """Cancel the releasing task 0..N loop steps into the reset (so before,
    during and after the reset's round trip), in every way a caller can be
    cancelled: the caller gets CancelledError (or TimeoutError) promptly,
    the reset finishes in a pool task, the connection comes back clean."""

    async def main() -> None:
        outcomes: set[str] = set()
        async with pool_and_admin(pg_dsn) as (pool, admin):
            for steps in range(1, 12):  # (0: cancelled before release() starts: never released, as on asyncpg)
                key = 7100 + 2 * steps
                con = await pool.acquire()
                await _dirty(con, key)
                loop_ = asyncio.get_running_loop()
                started = loop_.time()

                async def release(con: Any = con, steps: int = steps, loop_: Any = loop_) -> str:
                    if style in ("cancel_once", "cancel_twice"):
                        await pool.release(con)
                        return "released"
                    if style == "timeout":
                        async with asyncio.timeout(None) as cm:

                            async def expire_soon() -> None:
                                for _ in range(steps):
                                    await asyncio.sleep(0)
                                cm.reschedule(loop_.time())

                            expiring = loop_.create_task(expire_soon())
                            await pool.release(con)
                            await expiring
                        return "released"
                    if style == "wait_for":
                        await asyncio.wait_for(pool.release(con), 0.0005 * steps)
                        return "released"
                    with anyio.CancelScope() as scope:

                        async def cancel_soon() -> None:
                            for _ in range(steps):
                                await asyncio.sleep(0)
                            scope.cancel()

                        canceller = asyncio.get_running_loop().create_task(cancel_soon())
                        await pool.release(con)
                        await canceller
                        return "released"
                    await canceller
                    return "cancelled"

                task = asyncio.get_running_loop().create_task(release())
                if style in ("cancel_once", "cancel_twice"):
                    await _cancel_after(task, steps, 1 if style == "cancel_once" else 2)
                try:
                    outcomes.add(await task)
                except (asyncio.CancelledError, TimeoutError):
                    outcomes.add("cancelled")
                # Promptly: no round trip waited for after the cancel (bounded loosely).
                assert loop_.time() - started < 5
                await _assert_clean(pool, admin, key)
            if style != "wait_for":  # (time-based: the reset may beat every timeout)
                assert "cancelled" in outcomes, outcomes

    _run(loop, main)


@pytest.mark.parametrize("loop", list(LOOPS))
@pytest.mark.parametrize("result", ["result", "server_error"])
def test_cancel_between_the_waiter_resolving_and_the_task_waking(pg_dsn: str, loop: str, result: str) -> None:
    """The reset's protocol waiter resolves and schedules the releasing
    task's wake-up; the task is cancelled before that wake-up runs (a done
    callback of the waiter's, put ahead of the task's). The caller must get
    CancelledError, not the reset's result or error; the pool task finishes
    the reset; the connection comes back usable and clean."""

    async def main() -> None:
        async with pool_and_admin(pg_dsn, **({"reset_mode": "full"} if result == "result" else {})) as (
            pool,
            admin,
        ):
            con = await pool.acquire()
            key = 7300
            await _dirty(con, key)
            if result == "server_error":
                # The reset statement itself fails on the server: an
                # error set on the waiter after the cancel was decided.
                await con.execute("COMMIT")
                await con.execute("SELECT pg_advisory_unlock_all()")
                await con.execute("BEGIN")
                await con.execute("SELECT pg_advisory_xact_lock($1)", key + 1)
                with pytest.raises(asyncpg.PostgresError):
                    await con.execute("SELECT 1/0")  # transaction aborted: ROLLBACK still works
            release = asyncio.get_running_loop().create_task(pool.release(con))  # type: ignore[arg-type]
            for _ in range(50):
                await asyncio.sleep(0)
                driver = release._fut_waiter  # type: ignore[attr-defined]
                if driver is not None and getattr(driver, "_fut", None) is not None:
                    break
            else:
                raise AssertionError("the release never waited on the reset")
            fut = driver._fut
            wakeup = driver._wakeup
            assert wakeup is not None and not fut.done()
            # Put a callback ahead of the task's wake-up: it runs first, with
            # the wake-up already scheduled.
            assert fut.remove_done_callback(wakeup) == 1
            seen: list[bool] = []

            def cancel_first(f: asyncio.Future[Any]) -> None:
                seen.append(f.done())
                assert release.cancel()

            fut.add_done_callback(cancel_first)
            fut.add_done_callback(wakeup, context=driver._context)
            with pytest.raises(asyncio.CancelledError):
                await release
            assert seen == [True]
            await _assert_clean(pool, admin, key)

    _run(loop, main)


# -- 9895366: full mode marks at the call; rollback mode watches


@pytest.mark.parametrize("loop", list(LOOPS))
@pytest.mark.parametrize("failure", ["prepare_bad_sql", "prepare_lock_then_fail", "encode_error", "server_error"])
@pytest.mark.parametrize("mode", ["full", "rollback"])
def test_failed_statements_leave_nothing_visible_after_release_returns(
    pg_dsn: str, loop: str, failure: str, mode: str
) -> None:
    """A lease whose statement failed (a Parse left without Sync by a failing
    prepare(), an argument that fails to encode, a server error): once
    release() returns, another session sees no lock of that lease's, and
    the next lease works, as on asyncpg's pool."""

    async def main() -> None:
        table = "review_s21_t"
        async with pool_and_admin(pg_dsn, reset_mode=mode) as (pool, admin):
            await admin.execute(f"CREATE TABLE IF NOT EXISTS {table} (a int)")
            con = await pool.acquire()
            pid = con.get_server_pid()
            with pytest.raises((asyncpg.PostgresError, asyncpg.DataError, TypeError, ValueError)):
                if failure == "prepare_bad_sql":
                    await con.prepare("SELECT nosuchcolumn FROM review_s21_t")
                elif failure == "prepare_lock_then_fail":
                    await con.prepare(f"SELECT a FROM {table}")  # parse-time lock, no Sync
                    await con.prepare(f"SELECT a, nosuch FROM {table}")
                elif failure == "encode_error":
                    await con.fetchval(f"SELECT count(*) FROM {table} WHERE a = $1", "not an int")
                else:
                    await con.fetchval(f"SELECT a / 0 FROM (SELECT 1 AS a FROM {table} UNION ALL SELECT 1) s")
            await pool.release(con)
            # Visible to another session as soon as release() returned:
            locks = await admin.fetchval(
                "SELECT count(*) FROM pg_locks l WHERE l.pid = $1 AND l.locktype = 'relation'"
                " AND l.relation = $2::regclass",
                pid,
                table,
            )
            assert locks == 0
            xact = await admin.fetchval("SELECT state FROM pg_stat_activity WHERE pid = $1", pid)
            assert xact == "idle"
            # A DDL that needs an exclusive lock does not wait on the lease.
            await admin.execute("SET lock_timeout = '2s'")
            await admin.execute(f"ALTER TABLE {table} ADD COLUMN IF NOT EXISTS b int")
            await admin.execute(f"ALTER TABLE {table} DROP COLUMN IF EXISTS b")
            async with pool.acquire() as again:
                assert await again.fetchval("SELECT 1") == 1

    _run(loop, main)


@pytest.mark.parametrize("loop", list(LOOPS))
def test_rollback_mode_skips_the_round_trip_after_successful_statements(pg_dsn: str, loop: str) -> None:
    """reset_mode="rollback": a lease whose statements all succeeded is
    released without a statement (asyncpg's statement counter of the raw
    connection unchanged by the release); one whose statement failed gets
    its ROLLBACK. Full mode sends its reset for every lease that ran a statement."""

    async def main() -> None:
        pools = {
            mode: await safepool.create_pool(pg_dsn, min_size=1, max_size=1, reset_mode=mode)
            for mode in ("rollback", "full")
        }
        try:
            for mode, pool in pools.items():
                for fail in (False, True):
                    con = await pool.acquire()
                    raw = con._raw
                    await con.fetchval("SELECT 1")
                    if fail:
                        with pytest.raises(asyncpg.PostgresError):
                            await con.fetchval("SELECT 1/0")
                    before = raw._protocol.queries_count
                    await pool.release(con)
                    sent = raw._protocol.queries_count - before
                    if mode == "rollback" and not fail:
                        assert sent == 0, (mode, fail)
                    else:
                        assert sent == 1, (mode, fail)
                    pool._state.check_invariants()
        finally:
            for pool in pools.values():
                await pool.close()

    _run(loop, main)


# -- 4975bca: fast_members aliases are used for member reads only


def test_fast_members_aliases_are_only_read_for_members() -> None:
    """On 3.11 S, L, W, Outcome, Seen, Phases are plain classes: iterating,
    calling (lookup by value), isinstance, or any non-member attribute would
    break there only. Every use in safepool must be ``Alias.MEMBER``."""
    enums = {
        "S": _state.SlotState,
        "L": _state.LeaseState,
        "W": _state.WaiterState,
        "Outcome": _state.ReleaseOutcome,
        "Seen": _state.Observed,
        "Phases": _state.Phase,
    }
    root = pathlib.Path(safepool.__file__).parent
    bad: list[str] = []
    for path in root.rglob("*.py"):
        tree = ast.parse(path.read_text())
        bound: set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[-1] == "_state":
                bound |= {a.asname or a.name for a in node.names if a.name in enums and (a.asname or a.name) == a.name}
                bad += [f"{path}:{node.lineno} renames {a.name}" for a in node.names if a.name in enums and a.asname]
            if (
                isinstance(node, ast.Assign)
                and isinstance(node.value, ast.Call)
                and getattr(node.value.func, "id", None) == "fast_members"
            ):
                bound |= {t.id for t in node.targets if isinstance(t, ast.Name)}
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id == "_state"
                and node.attr in enums
            ):
                bad.append(f"{path}:{node.lineno} reads _state.{node.attr}")
        parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Name) and node.id in bound):
                continue
            parent = parents[node]
            if isinstance(parent, ast.Attribute) and parent.value is node:
                if parent.attr not in enums[node.id].__members__:
                    bad.append(f"{path}:{node.lineno} {ast.unparse(parent)}")
            elif not (isinstance(parent, ast.Assign) and node in parent.targets):
                bad.append(f"{path}:{node.lineno} {ast.unparse(parent)}")
    assert bad == []
