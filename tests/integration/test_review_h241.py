"""Review h241: 2987a52 (a custom reset refused during a counted call
reports; counted cursor steps make asyncpg's step at their first step; a
retried reset lets go of the kept Transaction) on top of a6eee2e's cursor
counting, compared with asyncpg's pool on a real server."""

from __future__ import annotations

import asyncio
import gc
import inspect
import warnings
from typing import Any

import asyncpg
import pytest

import safepool
from safepool import _internals

pytestmark = pytest.mark.asyncio

HAS_RESET_HOOK = "reset" in inspect.signature(asyncpg.create_pool).parameters


async def _reset_hook(con: Any) -> None:
    pass


class OwnResetConnection(asyncpg.Connection):
    async def reset(self, *, timeout: float | None = None) -> None:
        await super().reset(timeout=timeout)


def _kwargs(custom: str) -> dict[str, Any]:
    if custom == "reset_hook":
        if not HAS_RESET_HOOK:
            pytest.skip("asyncpg < 0.30 has no reset= hook")
        return {"reset": _reset_hook}
    if custom == "connection_class_reset":
        return {"connection_class": OwnResetConnection}
    return {}


def _check(pool: Any) -> None:
    state = getattr(pool, "_state", None)
    if state is not None:
        state.check_invariants()


async def _step(con: Any, what: str, sql: str = "SELECT pg_sleep(0.2)") -> Any:
    if what == "cursor_iterator":
        it = con.cursor(sql + ", generate_series(1, 3)", prefetch=1).__aiter__()
        return await it.__anext__()
    if what == "cursor_await":
        return await con.cursor(sql + ", generate_series(1, 3)")
    if what == "prepare":
        return await con.prepare(sql)
    return await con.fetchval(sql)


async def _cancel_then_release(
    factory: Any, dsn: str, what: str, xact: str, passes: int | None = None, order: str = "cancel_first", **kwargs: Any
) -> list[Any]:
    loop = asyncio.get_running_loop()
    seen: list[Any] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: seen.append(context["message"].split(" <")[0]))
    pool = await factory(dsn, min_size=1, max_size=1, **kwargs)
    try:
        con = await pool.acquire()
        if xact == "unmanaged":
            await con.transaction().start()
        elif xact == "begin":
            await con.execute("BEGIN")
        if passes is None:
            task = asyncio.ensure_future(_step(con, what))
            await asyncio.sleep(0.05)  # (its statement is under way)
        else:
            task = asyncio.ensure_future(_step(con, what, "SELECT 1"))
            for _ in range(passes):
                await asyncio.sleep(0)
        if order == "cancel_first":
            task.cancel()
        else:  # (the cancel queued by the release's step, before the pool's task)
            loop.call_soon(task.cancel)
        try:
            await pool.release(con)
        except Exception as exc:
            seen.append(("release", type(exc).__name__, str(exc)))
        try:
            await task
        except BaseException as exc:
            seen.append(("task", type(exc).__name__))
        await asyncio.sleep(0.3)
        async with pool.acquire() as again:
            seen.append(await again.fetchval("SELECT 1"))
            seen.append(again.is_in_transaction())
            async with again.transaction():
                seen.append(await again.fetchval("SELECT 2"))
        _check(pool)
    finally:
        loop.set_exception_handler(previous)
        pool.terminate()
    return seen


@pytest.mark.parametrize("xact", ["unmanaged", "begin", "none"])
@pytest.mark.parametrize("what", ["cursor_iterator", "cursor_await", "prepare", "fetchval"])
@pytest.mark.parametrize("custom", ["reset_hook", "connection_class_reset", "default"])
async def test_a_statement_cancelled_in_the_release_step_reports_as_asyncpg(
    pg_dsn: str, custom: str, what: str, xact: str
) -> None:
    kwargs = _kwargs(custom)
    theirs = await _cancel_then_release(asyncpg.create_pool, pg_dsn, what, xact, **kwargs)
    ours = await _cancel_then_release(safepool.create_pool, pg_dsn, what, xact, **kwargs)
    assert ours == theirs


# Found: a cancel that comes after release() was called (queued before the
# release's step: ``loop.call_soon(task.cancel)`` then ``await
# pool.release(con)``, as another task cancelling the lease's query would)
# of a statement that makes the release take the pool-task path (a query of
# another task: the exclusive section held; a counted cursor step; any
# custom reset). On asyncpg's pool the shielded reset task's first step
# finds the protocol busy (the cancel has not reached it yet): the ROLLBACK
# is refused, release() raises InterfaceError("cannot perform operation:
# another operation is in progress") and the connection is replaced -- as
# docs/migration.md ("release() in the loop step that cancels that task")
# says both pools do. safepool's pool task (Runner.reset_slot) is refused
# the same way, but its settle_reset (safepool/_runner.py:418) passes
# busy_retry=True, so reset_done (safepool/_runner.py:463) queues
# reset_after_a_loop_pass one step later than the release's own step, where
# the cancel has reached the protocol: the retry waits for it and resets,
# and release() returns quietly. With a custom reset and a counted cursor
# step in an unmanaged transaction it also reports the open transaction
# twice: reset_slot reports with keep=True (holder.copies > 0,
# safepool/_runner.py:391-392), keeping asyncpg's Transaction, and the
# retry's custom branch (safepool/_runner.py:622-623) does not let go of it
# (only the default branch calls warn_open_transaction(quiet=True), :630),
# so Connection._reset() in the custom reset reports it again.


async def _release_then_cancel(factory: Any, dsn: str, what: str, xact: str, **kwargs: Any) -> list[Any]:
    loop = asyncio.get_running_loop()
    seen: list[Any] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: seen.append(context["message"].split(" <")[0]))
    pool = await factory(dsn, min_size=1, max_size=1, **kwargs)
    try:
        con = await pool.acquire()
        pid = con.get_server_pid()
        if xact == "unmanaged":
            await con.transaction().start()
        else:
            await con.execute("BEGIN")
        task = asyncio.ensure_future(_step(con, what))
        await asyncio.sleep(0.05)  # (its statement is under way)
        loop.call_soon(task.cancel)  # (runs after the release's first step)
        try:
            await pool.release(con)
        except Exception as exc:
            seen.append(("release", type(exc).__name__, str(exc)))
        try:
            await task
        except BaseException as exc:
            seen.append(("task", type(exc).__name__))
        await asyncio.sleep(0.3)
        async with pool.acquire() as again:
            seen.append(("same connection", again.get_server_pid() == pid))
            seen.append(await again.fetchval("SELECT 1"))
        _check(pool)
    finally:
        loop.set_exception_handler(previous)
        pool.terminate()
    return seen


@pytest.mark.parametrize("what", ["fetchval", "cursor_iterator"])
async def test_a_cancel_after_the_release_step_refuses_the_reset_as_on_asyncpg_pool(pg_dsn: str, what: str) -> None:
    theirs = await _release_then_cancel(asyncpg.create_pool, pg_dsn, what, "begin")
    ours = await _release_then_cancel(safepool.create_pool, pg_dsn, what, "begin")
    if what == "fetchval" or _internals.HAS_POOL_HOLDER:
        # (asyncpg 0.29-0.31's cursor checks asyncpg's Transaction, which
        # their reset lets go of first: the step fails, the reset goes on.)
        assert ("release", "InterfaceError", "cannot perform operation: another operation is in progress") in theirs
    # (safepool's refusal of a reset during a counted call is its
    # PoolInterfaceError, a subclass of asyncpg's InterfaceError: the drop-in
    # contract's "same exceptions, or subclasses".)
    ours = [
        ("release", "InterfaceError", *entry[2:]) if isinstance(entry, tuple) and entry[:2] == ("release", "PoolInterfaceError")
        else entry
        for entry in ours
    ]
    assert ours == theirs


@pytest.mark.parametrize("custom", ["reset_hook", "connection_class_reset"])
async def test_a_custom_reset_retried_after_a_counted_cursor_step_reports_once_as_on_asyncpg_pool(
    pg_dsn: str, custom: str
) -> None:
    kwargs = _kwargs(custom)
    theirs = await _release_then_cancel(asyncpg.create_pool, pg_dsn, "cursor_iterator", "unmanaged", **kwargs)
    ours = await _release_then_cancel(safepool.create_pool, pg_dsn, "cursor_iterator", "unmanaged", **kwargs)
    message = "Resetting connection with an active transaction"
    assert theirs.count(message) == 1
    assert ours.count(message) == theirs.count(message)


# Pinned (pass on asyncio and uvloop, asyncpg 0.32): a lease cursor step
# created and dropped warns exactly once of asyncpg's coroutine (none when
# closed); a lease cursor used after its release is refused with asyncpg's
# exact message; a cursor inside ``async with con.transaction()`` of a task
# whose lease another task released; listeners dropped by the release (the
# type of remove_listener's refusal is safepool's InterfaceError subclass,
# documented: only the message is compared).
async def _never_awaited(pool, how):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        async with pool.acquire() as con, con.transaction():
            it = con.cursor("SELECT generate_series(1, 3)", prefetch=1).__aiter__()
            c = it.__anext__()
            if how == "close":
                c.close()
            del c
            gc.collect()
            rows = [r[0] async for r in it]
        gc.collect()
    return sorted(f"{w.category.__name__}: {w.message}" for w in caught), rows


async def _after_release(pool, how):
    out = []
    con = await pool.acquire()
    tr = con.transaction()
    await tr.start()
    cur = con.cursor("SELECT generate_series(1, 3)", prefetch=1)
    it = cur.__aiter__()
    if how == "started":
        out.append((await it.__anext__())[0])
    await pool.release(con)
    try:
        out.extend([r[0] async for r in (it if how != "fresh" else cur)])
    except Exception as e:
        out.append((type(e).__name__, str(e)))
    try:
        await cur
    except Exception as e:
        out.append((type(e).__name__, str(e)))
    _check(pool)
    return out


async def _other_task_release(pool, where):
    out: list[Any] = []
    loop = asyncio.get_running_loop()
    prev = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, c: out.append(c["message"].split(" <")[0]))
    con = await pool.acquire()
    ev = asyncio.Event()
    go = asyncio.Event()

    async def body():
        try:
            async with con.transaction():
                it = con.cursor("SELECT generate_series(1, 5)", prefetch=1).__aiter__()
                out.append((await it.__anext__())[0])
                ev.set()
                await go.wait()
                out.extend([r[0] async for r in it])
        except Exception as e:
            out.append((type(e).__name__, str(e)))

    t = asyncio.ensure_future(body())
    await ev.wait()
    if where == "concurrent":
        go.set()
    try:
        await pool.release(con)
    except Exception as e:
        out.append(("release", type(e).__name__, str(e)))
    go.set()
    await t
    await asyncio.sleep(0.1)
    async with pool.acquire() as c2:
        out.append((await c2.fetchval("SELECT 1"), c2.is_in_transaction()))
    _check(pool)
    loop.set_exception_handler(prev)
    return out


async def _listeners(pool, how):
    out = []
    got = []
    con = await pool.acquire()
    raw = con._con if hasattr(con, "_con") else con
    await con.add_listener("ch_h241", lambda *a: got.append(a[3]))
    if how == "xact":
        await con.execute("BEGIN")
    await pool.release(con)
    out.append(("after release", len(raw._listeners) if raw is not None else None))
    async with pool.acquire() as c2:
        await c2.execute("NOTIFY ch_h241, 'x'")
        await asyncio.sleep(0.1)
        out.append(("notified", list(got)))
        try:
            await con.remove_listener("ch_h241", None)
        except Exception as e:
            out.append((type(e).__name__, str(e)))
    _check(pool)
    return out


@pytest.mark.parametrize(
    "scenario",
    [
        ("never_awaited", "drop"),
        ("never_awaited", "close"),
        ("after_release", "started"),
        ("after_release", "fresh"),
        ("after_release", "notstarted"),
        ("other_task_release", "concurrent"),
        ("other_task_release", "held"),
        ("listeners", "plain"),
        ("listeners", "xact"),
    ],
)
async def test_lease_cursors_and_listeners_around_a_release_as_on_asyncpg_pool(pg_dsn: str, scenario: Any) -> None:
    name, how = scenario
    fn = globals()["_" + name]
    theirs_pool = await asyncpg.create_pool(pg_dsn, min_size=1, max_size=1)
    ours_pool = await safepool.create_pool(pg_dsn, min_size=1, max_size=1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", asyncpg.InterfaceWarning)
            theirs = await fn(theirs_pool, how)
            ours = await fn(ours_pool, how)
    finally:
        theirs_pool.terminate()
        ours_pool.terminate()
    def norm(seen: Any) -> list[Any]:
        return [
            (x[1:] if isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], str) and x[0].endswith("Error") else x)
            for x in (seen if isinstance(seen, list) else [seen])
        ]

    assert norm(ours) == norm(theirs)
