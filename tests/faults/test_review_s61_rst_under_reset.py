"""Review s61, hand-made mutation review of the runtime modules (see
tests/integration/test_review_s61_runtime_mutants.py): the survivor that
needs a network fault (an RST from FaultProxy), on the faults suite's own
cluster (TCP, so the proxy can stand between pool and server)."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

import safepool
from tests._util import sleeping_reset_connection_class, until_in_pg_sleep

from ._pg import Cluster
from ._proxy import FaultProxy

pytestmark = [pytest.mark.asyncio, pytest.mark.realtime]


_SleepingReset = sleeping_reset_connection_class()


async def test_a_socket_reset_under_a_releases_reset_gets_the_backend_a_cancel_request(
    running: Cluster, app_name: str
) -> None:
    """The connection is reset (an RST: a proxy, a load balancer, the
    network) while the release's reset runs on the server. The backend
    has not noticed (in pg_sleep it reads nothing from its socket) and
    runs on: the close must send it a cancel request, and the slot counts
    until that was delivered (``Runner.reset_done``, "The socket was
    reset ... under the reset"), as for an RST under a lease
    (tests/faults/test_network.py). Else the server runs the old backend
    beside the slot's replacement: more backends than max_size.

    Mutation killed: ``reset_done`` no longer sets
    ``holder.lost_while_leased`` for a connection reset under its reset:
    the close sent no cancel request, and the backend slept its minute out."""
    async with FaultProxy(running.port) as proxy:
        pool = await safepool.create_pool(
            running.dsn(port=proxy.port), min_size=1, max_size=1, connection_class=_SleepingReset,
            server_settings={"application_name": app_name},
        )
        admin = await asyncpg.connect(running.admin_dsn)
        con = await pool.acquire()
        pid = con.get_server_pid()
        try:
            await con.fetchval("SELECT 1")  # dirty: the release resets
            release = asyncio.ensure_future(pool.release(con))
            await until_in_pg_sleep(running.admin_dsn, pid)  # the reset runs on the server
            assert proxy.reset_all() == 1
            # The reset's error, as asyncpg's release raises it (the same
            # scenario on asyncpg's pool raises it too, at once): the cancel
            # request is the close's business and does not hold it up.
            with pytest.raises(asyncpg.ConnectionDoesNotExistError):
                await asyncio.wait_for(release, 5)
            # The cancel request interrupts the backend's pg_sleep (the server
            # state polled; without one it sleeps its minute out).
            async with asyncio.timeout(3):
                while await admin.fetchval(
                    "SELECT wait_event FROM pg_stat_activity WHERE pid = $1", pid
                ) == "PgSleep":
                    await asyncio.sleep(0.01)
            # A replacement serves (not released: its reset would sleep; the
            # pool is terminated below).
            again = await pool.acquire(timeout=5)
            assert await again.fetchval("SELECT 1") == 1 and again.get_server_pid() != pid
        finally:
            await admin.execute("SELECT pg_terminate_backend($1)", pid)
            await admin.close()
            pool.terminate()
