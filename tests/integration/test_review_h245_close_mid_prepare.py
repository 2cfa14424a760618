"""Review h245, finding (a) of the combined-fault stress tool with
multi-step calls: ``InternalClientError: got result for unknown protocol
state 3`` in a call (``prepare()``, or the prepare step of
``copy_from_query``'s argument inlining, asyncpg's ``utils._mogrify``)
whose lease another task released meanwhile.

Reduced: the lease's connection is of an expired generation (here
``expire_connections()``; ``max_queries`` reached does the same), and is
released while a ``prepare()`` of the lease runs in another task, its
answer sent by the server and not yet read. Both pools then close the
connection gracefully (asyncpg's ``Connection.close()``): the protocol's
``close`` -> ``_drain_cancels`` sees the prepare's waiter and calls
``_request_cancel`` (a SYNC, as the protocol is in its PREPARE state;
state CANCELLED). The prepare's answer, then the SYNC's ReadyForQuery,
arrive with no error: ``_on_result`` completes the cancellation and
dispatches the result to the still-pending prepare waiter in state
CANCELLED, which asyncpg does not know (protocol.pyx ``_dispatch_result``).
Had the cancel request reached the server before the prepare's answer, the
call would get ``QueryCanceledError`` instead (the stress tool's usual
outcome). asyncpg's behaviour, pinned here on asyncpg's pool.

safepool no longer closes the connection while a call of the lease is in
flight (session s75: asyncpg's close() in that state also resolves a call
with ``None`` when the server ends the connection meanwhile): it waits for
the call to end first, as after a refused reset, and the call gets its own
answer (a prepared statement; COPY's status, or ``QueryCanceledError`` for
the COPY that follows), not the protocol's error.

Deterministic: the connection's transport stops reading once the prepare
is sent; the server's answer waits in the socket (the backend shows the
statement) while the release starts the close; reading resumes once
asyncpg is cancelling."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import asyncpg
import pytest

import safepool

pytestmark = pytest.mark.asyncio


async def _outcome(create: Any, dsn: str, method: str) -> tuple[bool, str, str]:
    admin = await asyncpg.connect(dsn)
    pool = await create(dsn, min_size=1, max_size=1)
    try:
        con = await pool.acquire()
        raw = con._raw if isinstance(pool, safepool.Pool) else con._con
        pid = await con.fetchval("SELECT pg_backend_pid()")
        marker = f"h245_{uuid.uuid4().hex[:10]}"
        sql = f"SELECT 1 AS {marker}"

        async def sink(data: bytes) -> None:
            pass

        if method == "prepare":
            call = asyncio.ensure_future(con.prepare(sql))
        else:
            call = asyncio.ensure_future(con.copy_from_query(sql + " WHERE $1::int = 1", 1, output=sink))
        await asyncio.sleep(0)  # (the call's first step: its Parse/Describe sent)
        raw._transport.pause_reading()
        for _ in range(500):  # the backend has the statement (and answers it at once)
            if await admin.fetchval(
                    "SELECT position($2 in query) > 0 FROM pg_stat_activity WHERE pid = $1", pid, marker):
                break
            await asyncio.sleep(0.01)
        else:
            raise AssertionError("the prepare never reached the server")
        await admin.fetchval("SELECT 1")
        await pool.expire_connections()
        release = asyncio.ensure_future(pool.release(con, timeout=5))
        if isinstance(pool, safepool.Pool):
            # (The close waits for the call: until the slot is closing.)
            while pool.stats().closing == 0 and not release.done():
                await asyncio.sleep(0)
        else:
            while not raw._protocol._is_cancelling() and not release.done():
                await asyncio.sleep(0)
        cancelling = bool(raw._protocol._is_cancelling())
        raw._transport.resume_reading()
        call_result, release_result = await asyncio.wait_for(
            asyncio.gather(call, release, return_exceptions=True), 10
        )
        return cancelling, call_result, repr(release_result)
    finally:
        pool.terminate()
        await admin.close()


@pytest.mark.parametrize("method", ["prepare", "copy_from_query"])
async def test_close_of_expired_connection_mid_prepare_parity(pg_dsn: str, method: str) -> None:
    cancelling, call_result, release_result = await _outcome(asyncpg.create_pool, pg_dsn, method)
    assert (cancelling, repr(call_result), release_result) == (
        True, "InternalClientError('got result for unknown protocol state 3')", "None"
    )  # asyncpg's behaviour
    cancelling, call_result, release_result = await _outcome(safepool.create_pool, pg_dsn, method)
    assert (cancelling, release_result) == (False, "None")
    if method == "prepare":
        assert isinstance(call_result, asyncpg.prepared_stmt.PreparedStatement), call_result
    else:
        # The COPY that follows the answered prepare step is a statement of
        # its own, in flight when the close finds it: asked to cancel at
        # once, it ends cancelled or done, whichever reaches the server first.
        assert call_result == "COPY 1" or isinstance(call_result, asyncpg.QueryCanceledError), call_result
