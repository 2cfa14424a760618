"""A lease whose query waits in PgBouncer's queue for a server connection.

Behind PgBouncer (transaction mode), a client connection has no server
connection while its query waits for one (``default_pool_size`` reached).
PgBouncer 1.18 drops a cancel request for such a client ("cancel request for
idle client" in its log): the query cannot be cancelled, it runs once a
server connection frees up (or ends with ``query_wait_timeout``).

When such a lease passes ``lease_timeout``, the take-back repeats its
cancel request until the call ends or the reset budget (``reset_timeout``,
30 s by default) runs out: each one a new client connection to PgBouncer,
each one refused. At one every ``TAKE_BACK_CANCEL_INTERVAL`` (0.1 s), as it
was, one expired lease cost PgBouncer ten connections a second, up to ~300;
the interval now doubles while the same statement runs (up to 2 s).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest

import safepool
from tests._pgbouncer import Bouncer, requires_pgbouncer
from tests.integration.test_pgbouncer import start_bouncer, upstream  # noqa: F401 (fixtures)

pytestmark = [pytest.mark.asyncio, pytest.mark.realtime, requires_pgbouncer]


def _cancel_requests(bouncer: Bouncer) -> int:
    """Client connections PgBouncer logged as cancel requests."""
    text = (bouncer.root / "pgbouncer.log").read_text()
    return sum(" C-" in line and "closing because" in line and "cancel request" in line for line in text.splitlines())


async def test_an_expired_lease_waiting_in_pgbouncers_queue_costs_few_cancel_requests(
    start_bouncer: Callable[..., Bouncer],  # noqa: F811
) -> None:
    bouncer = start_bouncer(default_pool_size=1, query_wait_timeout=30, log_connections=1, log_disconnections=1)
    pool = await safepool.create_pool(
        bouncer.dsn(), min_size=1, max_size=2, statement_cache_size=0, reset_mode="rollback", lease_timeout=0.3,
    )
    expired = asyncio.Event()
    pinned = asyncio.Event()
    release = asyncio.Event()

    def on_event(event: dict[str, Any]) -> None:
        if event["event"] == "lease_expired":
            expired.set()

    pool.add_listener(on_event)

    async def holder() -> None:
        # Pins PgBouncer's only server connection: an open transaction.
        async with pool.acquire(lease_timeout=None) as con, con.transaction():
            await con.execute("SELECT 1")
            pinned.set()
            await release.wait()

    async def waiter() -> Any:
        async with pool.acquire() as con:
            return await con.fetchval("SELECT 2")  # waits in PgBouncer's queue

    try:
        holding = asyncio.create_task(holder())
        await pinned.wait()
        before = _cancel_requests(bouncer)
        waiting = asyncio.create_task(waiter())
        await asyncio.wait_for(expired.wait(), 10)
        # The query still waits in PgBouncer; the take-back goes on for 1 s.
        await asyncio.sleep(1.0)
        release.set()
        await holding
        await asyncio.gather(waiting, return_exceptions=True)
        await asyncio.sleep(0.2)  # PgBouncer has logged the last ones
        sent = _cancel_requests(bouncer) - before
        # One at once, then 0.1, 0.3 and 0.7 s later (doubling): 4 in that
        # second; one every 0.1 s, as it was, sent 10.
        assert sent <= 5, f"{sent} cancel requests to PgBouncer for one expired lease in about 1 s"
    finally:
        release.set()
        await asyncio.wait_for(pool.close(), 10)
