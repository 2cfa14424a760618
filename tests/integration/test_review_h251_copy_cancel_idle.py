"""Review h251: the combined-fault stress tool's release reset that waited
safepool's DEFAULT_RESET_TIMEOUT (30 s) in ``cancel_answered`` ->
``_internals.wait_for_cancellation`` -> asyncpg's
``protocol._wait_for_cancellation()`` (seed 37, full reset mode).

asyncpg's own behaviour (0.32), the same on asyncpg's pool. A COPY IN
(``copy_to_table`` from an async iterable) that the server already ended
with an error (a cancel request or statement_timeout, which the backend
acts on once the next chunk arrives; a chunk it cannot parse) while the
source loop awaits its next chunk: the backend is idle again (ErrorResponse
and ReadyForQuery read, the COPY's waiter failed), but asyncpg's
``Protocol.copy_in`` does not look. When the COPY then fails in its source
loop (its task cancelled, its source raising), the ``except`` clause
(protocol.pyx, "COPY aborted due to an exception in input generator")
writes CopyFail, which the idle backend drops, and calls
``_request_cancel()``: a new ``cancel_waiter`` that only a result could
complete, and none comes (the cancel request meets an idle backend; any new
query is refused while it is set). The COPY raises what ended its source
loop (CancelledError, the source's error); the server's error is dropped.

A release then waits for that cancellation: asyncpg's pool
(``PoolConnectionHolder.release``: ``wait_for(_wait_for_cancellation(),
budget)``) with no timeout waits for good, the slot lost; with a timeout it
raises TimeoutError and terminates the connection. safepool's release
raises TimeoutError once its budget (the release's timeout, else
reset_timeout, else DEFAULT_RESET_TIMEOUT's 30 s) is spent, and the pool
replaces the connection. Neither reuses it."""

from __future__ import annotations

import asyncio
import gc
import uuid
from typing import Any

import asyncpg
import pytest

import safepool

from .._util import asyncpg_version

pytestmark = pytest.mark.asyncio


class _SourceError(Exception):
    pass


async def _copy_ended_by_the_server(admin: Any, con: Any, table: str, how: str) -> tuple[asyncio.Future[Any], Any]:
    """A COPY into ``table`` from an async source, under way in a task of its
    own, ended by the server (``how``) while its source awaits its next
    chunk; returns the call's future and a function that ends the source
    loop with an error (``fail(cancel=True)``: the task cancelled; else the
    source raises)."""
    pid = await con.fetchval("SELECT pg_backend_pid()")
    if how == "statement_timeout":
        await con.execute("SET statement_timeout = 100")
    first, trigger, gate = asyncio.Event(), asyncio.Event(), asyncio.Event()
    raise_it = False

    async def source() -> Any:
        yield b"1\n"
        first.set()
        await trigger.wait()
        # (the backend acts on a cancel request, or a statement_timeout,
        # once it reads from the client again)
        yield b"x\n" if how == "bad_input" else b"2\n"
        await gate.wait()
        if raise_it:
            raise _SourceError
        yield b"3\n"

    call = asyncio.ensure_future(con.copy_to_table(table, source=source(), columns=["n"]))
    await asyncio.wait_for(first.wait(), 5)
    for _ in range(500):
        if await admin.fetchval(
            "SELECT query LIKE 'COPY%' AND state = 'active' FROM pg_stat_activity WHERE pid = $1", pid
        ):
            break
        await asyncio.sleep(0.01)
    if how == "cancel_request":
        assert await admin.fetchval("SELECT pg_cancel_backend($1)", pid)
        await asyncio.sleep(0.1)
    elif how == "statement_timeout":
        await asyncio.sleep(0.3)
    trigger.set()
    for _ in range(500):
        if await admin.fetchval("SELECT state = 'idle' FROM pg_stat_activity WHERE pid = $1", pid):
            break
        await asyncio.sleep(0.01)
    assert await admin.fetchval("SELECT state FROM pg_stat_activity WHERE pid = $1", pid) == "idle"
    await asyncio.sleep(0.1)  # (the client has read the ErrorResponse and ReadyForQuery)

    def fail(cancel: bool) -> None:
        nonlocal raise_it
        if cancel:
            call.cancel()
        else:
            raise_it = True
            gate.set()

    return call, fail


async def _outcome(
    create: Any, dsn: str, how: str, cancel: bool, release_timeout: float | None, **opts: Any
) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    errors: list[str] = []
    old = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, ctx: errors.append(f"{ctx.get('message')}: {ctx.get('exception')!r}"))
    table = f"h251_copy_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(dsn)
    await admin.execute(f"CREATE TABLE {table} (n int)")
    pool = await create(dsn, min_size=1, max_size=1, **opts)
    out: dict[str, Any] = {}
    release = None
    try:
        con = await pool.acquire()
        raw = con._raw if isinstance(pool, safepool.Pool) else con._con
        call, fail = await _copy_ended_by_the_server(admin, con, table, how)
        out["cancelling_before"] = raw._protocol._is_cancelling()
        fail(cancel)
        try:
            await asyncio.wait_for(call, 5)
            out["copy"] = "returned"
        except BaseException as exc:  # noqa: BLE001 (the class is the outcome compared)
            out["copy"] = type(exc).__name__
        await asyncio.sleep(0.2)  # (asyncpg's cancel request sent, and met an idle backend)
        out["cancelling_after_copy"] = raw._protocol._is_cancelling()
        release = asyncio.ensure_future(pool.release(con, timeout=release_timeout))
        started = loop.time()
        await asyncio.wait([release], timeout=3)
        out["release_s"] = loop.time() - started
        if release.done():
            out["release"] = type(release.exception()).__name__ if release.exception() else "ok"
        else:
            out["release"] = "still waiting"
            out["cancelling_while_waiting"] = raw._protocol._is_cancelling()
            return out
        for _ in range(200):  # (safepool: CANCEL_ANSWER_GRACE more, then terminated)
            if raw.is_closed():
                break
            await asyncio.sleep(0.01)
        out["closed"] = raw.is_closed()
        con2 = await asyncio.wait_for(pool.acquire(), 3)
        out["reused"] = (con2._raw if isinstance(pool, safepool.Pool) else con2._con) is raw
        assert await asyncio.wait_for(con2.fetchval("SELECT 1"), 3) == 1
        await asyncio.wait_for(pool.release(con2), 3)
    finally:
        if release is not None and not release.done():
            release.cancel()
            await asyncio.gather(release, return_exceptions=True)
        pool.terminate()
        await admin.execute(f"DROP TABLE IF EXISTS {table}")
        await admin.close()
        loop.set_exception_handler(old)
    out["errors"] = errors
    return out


async def _destroyed_pending_tasks() -> list[str]:
    """The coroutines of the pending tasks that a full collection destroys now."""
    loop = asyncio.get_running_loop()
    destroyed: list[str] = []
    old = loop.get_exception_handler()
    loop.set_exception_handler(
        lambda _loop, ctx: destroyed.append(
            ctx["task"].get_coro().__qualname__ if "task" in ctx else str(ctx.get("message"))
        )
    )
    try:
        gc.collect()
        for _ in range(3):
            await asyncio.sleep(0)
    finally:
        loop.set_exception_handler(old)
    return destroyed


# (Three triggers by two failures ran alike in review h251, 49 s in all;
# two pairs cover each trigger kind and each failure in the suite.)
@pytest.mark.parametrize(
    ("how", "cancel"), [("bad_input", True), ("cancel_request", False)],
    ids=["bad_input-task_cancelled", "cancel_request-source_raises"],
)
async def test_copy_failing_after_the_server_ended_it_cancels_an_idle_backend_parity(
    pg_dsn: str, how: str, cancel: bool
) -> None:
    copy = "CancelledError" if cancel else "_SourceError"

    def took(outcome: dict[str, Any], low: float, high: float) -> dict[str, Any]:
        assert low <= outcome.pop("release_s") < high
        return outcome

    # asyncpg's pool, no timeout: the release waits for an answer that never comes.
    a = await _outcome(asyncpg.create_pool, pg_dsn, how, cancel, None)
    assert took(a, 2.9, 3.5) == {
        "cancelling_before": False,
        "copy": copy,
        "cancelling_after_copy": True,
        "release": "still waiting",
        "cancelling_while_waiting": True,
    }
    # asyncpg 0.29-0.31: terminate() leaves the protocol's cancellation
    # waiter pending (0.32 completes it when the socket closes), so the
    # shielded PoolConnectionHolder.release task of asyncpg's pool that
    # waited on it stays pending for good, and the collector destroys it
    # ("Task was destroyed but it is pending!") in whichever later run it
    # happens to collect it: collected here, where it belongs.
    destroyed = await _destroyed_pending_tasks()
    assert destroyed == ([] if asyncpg_version() >= (0, 32) else ["PoolConnectionHolder.release"])
    # safepool, no timeout: until reset_timeout (DEFAULT_RESET_TIMEOUT's 30 s
    # without it), then TimeoutError; the connection is replaced.
    s = await _outcome(safepool.create_pool, pg_dsn, how, cancel, None, reset_timeout=1.0)
    assert took(s, 0.9, 1.5) == {
        "cancelling_before": False,
        "copy": copy,
        "cancelling_after_copy": True,
        "release": "TimeoutError",
        "closed": True,
        "reused": False,
        "errors": [],
    }
    # A release's timeout: TimeoutError on both, the connection terminated.
    assert took(await _outcome(asyncpg.create_pool, pg_dsn, how, cancel, 0.5), 0.4, 1.0) == s
    assert took(await _outcome(safepool.create_pool, pg_dsn, how, cancel, 0.5), 0.4, 1.0) == s
