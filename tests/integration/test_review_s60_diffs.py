"""Review of the s60 diffs (helper-178): a prepared statement made by a
``con.prepare()`` that resumes or completes after its lease expired stays
valid for asyncpg, and runs in the next lease's session.

The take-back invalidates the lease's cursors, prepared statements and
transactions when the lease expires (``_internals.invalidate_taken_back``:
asyncpg's ``_pool_release_ctr``, which each ``ConnectionResource`` copies
when it is made). A ``con.prepare()`` that passed the proxy's gate before
the expiry and returns after it makes its ``PreparedStatement`` *after* the
invalidation, so it carries the new counter: asyncpg's
``_check_conn_validity`` passes it for good. The take-back then waits for
the call (a statement on the wire is refused, cancelled, waited for),
resets the connection and hands it on, and the old holder's statement runs
on it: here inside the next lease's transaction (it reads that
transaction's ``SET LOCAL``). docs/leases.md promises the holder
``LeaseExpiredError``, or from asyncpg's own objects "the underlying
connection has been released back to the pool".

Two ways in:

- the prepare waited for asyncpg's cancellation of an earlier statement (a
  ``timeout=``) when the lease expired. Before b41e303 (the take-back's two
  loop passes) it was refused with asyncpg's raw "another operation is in
  progress"; now it goes first, as intended, and returns a statement that
  outlives the lease;
- the prepare's Parse was on the wire when the lease expired (no earlier
  cancellation; also on 898d679): the Parse answers before the take-back's
  cancel request can matter.

Now the take-back invalidates again once its wait for the holder's call
is over, before the hand-on (``Reclaimer.take_back_slot``): anything the
call made while the lease was expired is refused.
"""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import pytest

import safepool
from tests._pgbouncer import requires_pgbouncer
from tests.integration.test_review_s60_expiry import _expiring_connection_class, bouncer_dsn  # noqa: F401

pytestmark = pytest.mark.asyncio

QUERY = "SELECT current_setting('application_name')"


async def _old_holders_statement_in_the_next_lease(dsn: str, *, waits_for_a_cancellation: bool) -> Any:
    """What the expired lease's prepared statement does inside the next
    lease's transaction: its result, or the error it raised (or the
    prepare's own error, when the take-back's cancel got it)."""
    clock = safepool.ManualClock()
    pool = await safepool.create_pool(
        dsn, min_size=1, max_size=1, clock=clock,
        # (expires the lease, lease_timeout=10, when asyncpg's cancellation ends)
        connection_class=_expiring_connection_class(clock, expire=waits_for_a_cancellation),
    )
    try:
        con = await pool.acquire(lease_timeout=10)
        if waits_for_a_cancellation:
            try:
                await con.execute("SELECT pg_sleep(5)", timeout=0.1)
            except TimeoutError:
                pass
            preparing = asyncio.ensure_future(con.prepare(QUERY))  # waits for the cancellation; the lease expires there
        else:
            preparing = asyncio.ensure_future(con.prepare(QUERY))
            await asyncio.sleep(0)  # its Parse is on the wire
            clock.advance(11)  # the lease expires under it
        try:
            statement = await preparing
        except (asyncpg.QueryCanceledError, safepool.LeaseExpiredError) as exc:
            return exc  # (the take-back's cancel got it, or the gate: nothing outlives the lease)
        assert pool.stats().leases_expired == 1
        with pytest.raises(safepool.LeaseExpiredError):
            await con.fetchval("SELECT 1")  # the proxy knows
        async with pool.acquire(timeout=5) as next_lease:  # the same connection (max_size=1)
            async with next_lease.transaction():
                await next_lease.execute("SET LOCAL application_name = 'the-next-lease'")
                try:
                    return await statement.fetchval()
                except Exception as exc:  # noqa: BLE001 (the outcome under test)
                    return exc
    finally:
        await asyncio.wait_for(pool.close(), 10)


ATTEMPTS = 10


async def _check(dsn: str, waits_for_a_cancellation: bool) -> None:
    """Up to ATTEMPTS runs: the take-back's cancel request races the
    prepare's Parse (on a loaded machine the cancel gets it about one run in
    four: QueryCanceledError, nothing outlives the lease, run again); every
    statement that was made must be refused in the next lease."""
    for _ in range(ATTEMPTS):
        outcome = await _old_holders_statement_in_the_next_lease(dsn, waits_for_a_cancellation=waits_for_a_cancellation)
        if isinstance(outcome, (asyncpg.QueryCanceledError, safepool.LeaseExpiredError)):
            continue  # the prepare itself was cancelled or refused (docs/leases.md)
        assert outcome != "the-next-lease", (
            "the expired lease's prepared statement ran inside the next lease's transaction"
        )
        assert isinstance(outcome, asyncpg.InterfaceError) and "released back to the pool" in str(outcome), repr(outcome)
        return


@pytest.mark.parametrize("waits_for_a_cancellation", [True, False], ids=["after-a-timeout", "parse-on-the-wire"])
async def test_a_statement_prepared_across_the_expiry_does_not_run_in_the_next_lease(
    pg_dsn: str, waits_for_a_cancellation: bool
) -> None:
    await _check(pg_dsn, waits_for_a_cancellation)


@requires_pgbouncer
@pytest.mark.parametrize("bouncer_dsn", ["session"], indirect=True)
@pytest.mark.parametrize("waits_for_a_cancellation", [True, False], ids=["after-a-timeout", "parse-on-the-wire"])
async def test_through_pgbouncer_too(bouncer_dsn: str, waits_for_a_cancellation: bool) -> None:  # noqa: F811 (the fixture)
    await _check(bouncer_dsn, waits_for_a_cancellation)
