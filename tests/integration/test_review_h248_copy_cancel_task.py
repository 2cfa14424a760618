"""Review h248: the combined-fault stress tool's "Task was destroyed but it
is pending! ... coro=<Connection._cancel() ...> wait_for=<Future pending
cb=[shield.<locals>._outer_done_callback() ...]>" (seeds 43/49, about 1
run in 10).

asyncpg's own behaviour, the same on asyncpg's pool. A COPY IN
(``copy_to_table`` from an async iterable, or a file-like object read in
the executor) is between two chunks of its source when the server ends the
backend (the tool's chaos task: pg_terminate_backend). asyncpg's
``connection_lost`` runs ``Connection._cleanup()`` (its ``_clean_tasks``
finds nothing to cancel yet) and completes the protocol's waiters, but
leaves ``protocol.transport`` set: the closed transport swallows writes.
When the COPY then fails in its source loop (cancelled, a timeout),
asyncpg's ``Protocol.copy_in`` ``except`` clause (protocol.pyx, "COPY
aborted due to an exception in input generator") writes CopyFail and calls
``_request_cancel()`` on that dead protocol: a new ``cancel_waiter`` and a
new ``Connection._cancel`` task, added to ``_cancellations`` after the
cleanup. The task sends its cancel request, then awaits
``asyncio.shield(cancel_waiter)``, which nothing will ever complete (no
connection_lost again, no ReadyForQuery). Only the loop holds nothing of
it: once the pool (either) has dropped the lost connection, the cycle
connection -> _cancellations -> task -> frame -> connection is garbage, and
the collector destroys the pending task. A later ``terminate()`` of the
connection would cancel it (``_clean_tasks``); both pools ended the
connection before the task existed, whether the lease is released before
or after the COPY fails.

Found with the tool plus an instrumented ``_cancel_current_command`` (the
task's creator was ``copy_to_table`` -> ``_copy_in``; the run's pool had
dropped the connection)."""

from __future__ import annotations

import asyncio
import gc
from typing import Any

import asyncpg
import pytest

import safepool

from .._util import asyncpg_version

pytestmark = pytest.mark.asyncio


async def _outcome(create: Any, dsn: str, release_first: bool) -> tuple[str, list[str]]:
    loop = asyncio.get_running_loop()
    errors: list[str] = []
    old = loop.get_exception_handler()
    loop.set_exception_handler(
        lambda _loop, ctx: errors.append(f"{ctx.get('message')} {str(ctx.get('task', ''))[:60]}")
    )
    admin = await asyncpg.connect(dsn)
    await admin.execute("CREATE TABLE IF NOT EXISTS h248_copy (tag text)")
    pool = await create(dsn, min_size=0, max_size=1)
    try:
        con = await pool.acquire()
        pid = await con.fetchval("SELECT pg_backend_pid()")
        raw = con._raw if isinstance(pool, safepool.Pool) else con._con
        gate = asyncio.Event()

        async def source() -> Any:
            yield b"a\n"
            await gate.wait()
            yield b"b\n"

        copy = asyncio.create_task(con.copy_to_table("h248_copy", source=source(), columns=["tag"]))
        for _ in range(500):
            if await admin.fetchval("SELECT query LIKE 'COPY%' FROM pg_stat_activity WHERE pid = $1", pid):
                break
            await asyncio.sleep(0.01)
        await admin.execute("SELECT pg_terminate_backend($1)", pid)
        for _ in range(500):
            if raw.is_closed():
                break
            await asyncio.sleep(0.01)
        assert raw.is_closed()
        if release_first:
            await pool.release(con)
        copy.cancel()
        with pytest.raises(asyncio.CancelledError):
            await copy
        if not release_first:
            await pool.release(con)
        await asyncio.sleep(0.1)  # (the cancel request is sent and answered)
        pending = [t.get_coro().__qualname__ for t in raw._cancellations if not t.done()]
        del con, copy, raw
        gc.collect()
        for _ in range(5):
            await asyncio.sleep(0)
        return repr(pending), errors
    finally:
        pool.terminate()
        await admin.execute("DROP TABLE IF EXISTS h248_copy")
        await admin.close()
        loop.set_exception_handler(old)


@pytest.mark.parametrize("release_first", [False, True])
async def test_copy_in_cancelled_after_backend_lost_leaves_cancel_task_parity(pg_dsn: str, release_first: bool) -> None:
    a = await _outcome(asyncpg.create_pool, pg_dsn, release_first)
    s = await _outcome(safepool.create_pool, pg_dsn, release_first)
    destroyed = "Task was destroyed but it is pending! <Task pending name='Task-"
    if asyncpg_version() >= (0, 32):
        assert [e[: len(destroyed)] for e in a[1]] == [destroyed]  # asyncpg's behaviour
        assert a[0] == "['Connection._cancel']"  # left in _cancellations, pending
    else:
        # asyncpg 0.29-0.31: Connection._cancel sends the request and ends
        # (0.32's awaits asyncio.shield(cancel_waiter) after it): no task is
        # left pending, none destroyed, on either pool.
        assert a == ("[]", [])
    assert s[0] == a[0]
    assert [e[: len(destroyed)] for e in s[1]] == [e[: len(destroyed)] for e in a[1]]
