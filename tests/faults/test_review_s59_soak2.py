"""Review s59, soak 2 (helper-172): what the second soak of random combined
faults found (the fixed code of helper-171's soak, direct and through
PgBouncer), reduced to tests on the fault suite's cluster and TCP proxy.

Fixed since (``_workers._once_free`` sends a refused cancel request again at
its next interval, and the take-back waits on). A lease past
``lease_timeout`` whose statement still runs is taken back:
the take-back tries its reset, and while asyncpg refuses it (the statement
runs) it sends cancel requests of its own and tries again
(``_workers._once_free``), waiting for the statement to end. When one of
those cancel requests fails (the server's address refuses the request's new
TCP connection: a restart under way, a proxy or load balancer that stopped
accepting, while the lease's own connection lives on), the error leaves the
take-back as its result, and the runner closes the connection as after any
failed reset: gracefully, with asyncpg's ``Connection.close()``, while the
expired lease's statement still runs in the holder's task. asyncpg's close
cancels that statement through its protocol (its own cancel request, which
fails the same way, and asyncpg then aborts the connection): the holder's
``await con.execute(...)`` gets a ``None`` result and raises
``TypeError: cannot unpack non-iterable NoneType object`` from inside
asyncpg (or, when the statement's answer was already on its way,
``InternalClientError: got result for unknown protocol state 3``), instead
of the error a lease timeout promises (the statement cancelled:
``QueryCanceledError`` or ``LeaseExpiredError``; at worst a lost
connection's ``ConnectionDoesNotExistError``). docs/reliability.md records
the unknown-protocol-state error as a known limit only for a *release* that
closes while *another* task's statement runs; here the pool itself closes
the connection under the lease's own statement, and the take-back's
documented rule ("waits until the statement ends") is broken.

Found by the soak at seed 102 (asyncio; max_size 4, lease_timeout 0.211,
max_queries 15, reset_mode rollback, server restarts fast/immediate behind
the proxy, task cancels): 10 of 15 runs of that seed, 1 or 2 such errors
each (one run of it on uvloop was clean); seed 138 (asyncio, lease_timeout
0.13, restarts behind the proxy) hit it twice. The soak's probes showed the
path: the take-back ended with ``ConnectionError('unexpected
connection_lost() call')`` (its cancel request, accepted by the proxy,
which then failed to reach the restarting server and closed it) while the
statement was in flight, ``reset_done`` closed the
slot, ``_workers.close`` called ``con.close()`` (no budget: reset_timeout
unset), asyncpg's close sent its own cancel request, which failed, and
asyncpg aborted the connection: the waiter of the holder's statement
resolved with None.
"""

from __future__ import annotations

import asyncio
import contextlib

import asyncpg
import pytest

import safepool

from ._pg import Cluster, count_backends
from ._proxy import FaultProxy

pytestmark = [pytest.mark.asyncio, pytest.mark.realtime]


@pytest.mark.parametrize("call", ["execute", "fetchval"])
async def test_a_failed_take_back_cancel_does_not_close_the_connection_under_the_leases_statement(
    running: Cluster, admin: asyncpg.Connection, app_name: str, call: str
) -> None:
    """``execute``: the holder gets TypeError from inside asyncpg.
    ``fetchval``: worse, the holder's call *returns* None, no error at all:
    a wrong result handed to the application (the soak saw a lease read its
    own ``SET LOCAL`` back as None inside its transaction)."""
    async with FaultProxy(running.port) as proxy:
        pool = await safepool.create_pool(
            running.dsn(port=proxy.port), min_size=1, max_size=1, lease_timeout=0.3,
            server_settings={"application_name": app_name},
        )
        try:
            outcome: list[BaseException | None] = []
            results: list[object] = []

            async def lease() -> None:
                try:
                    async with pool.acquire() as con:
                        if call == "execute":
                            results.append(await con.execute("SELECT pg_sleep($1)", 3.0))
                        else:
                            results.append(await con.fetchval("SELECT 42 FROM pg_sleep($1)", 3.0))
                except BaseException as exc:
                    outcome.append(exc)
                    raise
                outcome.append(None)

            async with asyncio.timeout(10):
                await pool.fetchval("SELECT 1")  # (the pool's connection is open: only cancel requests connect)
                async with proxy.refusing_new_connections():
                    holder = asyncio.create_task(lease())
                    while not await count_backends(admin, app_name, " AND state = 'active'"):
                        await asyncio.sleep(0.005)
                    # The lease expires at 0.3 s; the take-back's cancel request is refused.
                    with contextlib.suppress(BaseException):
                        await holder
            assert outcome, "the holder never finished"
            error = outcome[0]
            assert not isinstance(error, (TypeError, asyncpg.InternalClientError)), (
                f"the expired lease's statement failed from inside asyncpg: {error!r} "
                "(the pool closed the connection under it)"
            )
            assert results in ([], ["SELECT 1"], [42]), f"the expired lease's call returned {results!r} with no error"
            assert error is None or isinstance(
                error, (asyncpg.QueryCanceledError, safepool.LeaseExpiredError, asyncpg.ConnectionDoesNotExistError)
            ), repr(error)
        finally:
            await asyncio.wait_for(pool.close(), 10)


@pytest.mark.parametrize("call", ["execute", "fetchval"])
async def test_a_release_under_a_running_statement_whose_cancels_fail_leaves_the_statement_its_outcome(
    running: Cluster, admin: asyncpg.Connection, app_name: str, call: str
) -> None:
    """The sibling in a release made while another task's statement runs
    on the lease (asyncpg refuses the reset: the pool gives the connection
    up, and its close first waits for the statement, cancelling it on the
    server as a take-back does). Those cancel requests refused too, the
    statement runs to its end and its task gets its own outcome, never a
    None result or an error from inside asyncpg. (Before the fix this path
    aborted the connection at the first refused request, and the statement
    got ConnectionDoesNotExistError: allowed, but not its own outcome.)"""
    async with FaultProxy(running.port) as proxy:
        pool = await safepool.create_pool(
            running.dsn(port=proxy.port), min_size=1, max_size=1, server_settings={"application_name": app_name},
        )
        try:
            con = await pool.acquire()

            async def statement() -> object:
                if call == "execute":
                    return await con.execute("SELECT pg_sleep($1)", 1.5)
                return await con.fetchval("SELECT 42 FROM pg_sleep($1)", 1.5)

            async with asyncio.timeout(10):
                async with proxy.refusing_new_connections():
                    running_statement = asyncio.create_task(statement())
                    while not await count_backends(admin, app_name, " AND state = 'active'"):
                        await asyncio.sleep(0.005)
                    with contextlib.suppress(Exception):
                        await pool.release(con)  # (its reset refused: the statement runs)
                    outcome = (await asyncio.gather(running_statement, return_exceptions=True))[0]
            assert not isinstance(outcome, (TypeError, asyncpg.InternalClientError)), repr(outcome)
            assert outcome in ("SELECT 1", 42) or isinstance(
                outcome, (asyncpg.QueryCanceledError, asyncpg.ConnectionDoesNotExistError)
            ), repr(outcome)
            async with pool.acquire(timeout=5) as again:
                assert await again.fetchval("SELECT 1") == 1
        finally:
            await asyncio.wait_for(pool.close(), 10)
