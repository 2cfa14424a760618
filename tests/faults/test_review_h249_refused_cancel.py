"""Review h249: the s75 fix when the close's cancel requests are refused.

A lease of an expired generation is released while a write of it runs in
another task, and the server's address refuses new connections meanwhile
(a restart under way behind a proxy, a load balancer draining): a cancel
request cannot get through, while the lease's connection lives on. The
write fails late (its trigger raises after a pause).

asyncpg 0.32's pool closes at once: ``close()`` asks for a cancel, the
request fails, asyncpg's ``Connection._cancel`` terminates the connection
while the protocol is closing, and ``_on_connection_lost`` (its closing
branch) resolves the write's waiter with ``None``: a write that then fails
on the server is reported done, without any server fault. safepool's close
waits for the write to end (``_workers.statement_ended``, its cancel
requests failing and retried), so the write gets its own error; the
release takes as long as the write (bounded by the release's budget: then
aborted, the write fails with ``ConnectionDoesNotExistError``).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import asyncpg
import pytest

import safepool
import safepool._internals
from tests._util import in_pg_sleep_on

from ._pg import Cluster
from ._proxy import FaultProxy

pytestmark = [pytest.mark.asyncio]

APG_032 = tuple(int(p) for p in asyncpg.__version__.split(".")[:2]) >= (0, 32)

LATE_FAILURE = """
    CREATE TABLE IF NOT EXISTS h249_writes (tag text);
    CREATE OR REPLACE FUNCTION h249_late() RETURNS trigger LANGUAGE plpgsql AS
      $$ BEGIN PERFORM pg_sleep(1.5); RAISE EXCEPTION 'h249 late failure'; END $$;
    DROP TRIGGER IF EXISTS h249_late ON h249_writes;
    CREATE TRIGGER h249_late BEFORE INSERT ON h249_writes FOR EACH ROW EXECUTE FUNCTION h249_late();
    GRANT ALL ON h249_writes TO PUBLIC;
"""


async def _release_with_cancels_refused(
    create_pool: Any, cluster: Cluster, admin: Any, app_name: str, timeout: float | None
) -> tuple[Any, BaseException | None, float, int]:
    await admin.execute(LATE_FAILURE)
    tag = f"{app_name}-{create_pool.__module__}-{timeout}"
    async with FaultProxy(cluster.port) as proxy:
        pool = await create_pool(
            cluster.dsn(port=proxy.port), min_size=0, max_size=2, server_settings={"application_name": app_name}
        )
        try:
            con = await pool.acquire()
            pid = con.get_server_pid()
            write = asyncio.create_task(con.execute(f"INSERT INTO h249_writes VALUES ('{tag}')"))
            await in_pg_sleep_on(admin, pid)
            await pool.expire_connections()
            release_error: BaseException | None = None
            async with proxy.refusing_new_connections():
                started = time.monotonic()
                try:
                    await asyncio.wait_for(pool.release(con, timeout=timeout), 20)
                except Exception as error:  # noqa: BLE001
                    release_error = error
                took = time.monotonic() - started
            outcome: Any
            try:
                outcome = await asyncio.wait_for(write, 10)
            except Exception as error:  # noqa: BLE001
                outcome = error
        finally:
            pool.terminate()
    rows = await admin.fetchval("SELECT count(*) FROM h249_writes WHERE tag = $1", tag)
    return outcome, release_error, took, rows


@pytest.mark.skipif(not APG_032, reason="asyncpg 0.32's close() cancels a call in flight")
async def test_asyncpg_pool_reports_a_failing_write_done(running: Cluster, admin: Any, app_name: str) -> None:
    """What safepool does not copy (asyncpg 0.32's pool): ``None`` at once."""
    outcome, release_error, took, rows = await _release_with_cancels_refused(
        asyncpg.create_pool, running, admin, app_name, None
    )
    assert rows == 0
    assert release_error is None
    assert took < 0.5
    assert outcome is None, f"asyncpg's pool no longer reports the write done: {outcome!r}"


async def test_the_write_gets_its_own_error(running: Cluster, admin: Any, app_name: str) -> None:
    """safepool: the release waits for the write (about its remaining 1.5 s),
    and the write raises the trigger's error."""
    outcome, release_error, took, rows = await _release_with_cancels_refused(
        safepool.create_pool, running, admin, app_name, None
    )
    assert rows == 0
    assert release_error is None
    assert isinstance(outcome, asyncpg.RaiseError) and "h249 late failure" in str(outcome), outcome
    assert 0.8 < took < 5, took


async def test_a_release_budget_bounds_the_wait(running: Cluster, admin: Any, app_name: str) -> None:
    """With ``release(timeout=0.5)``: the release raises ``TimeoutError`` at
    its budget (as asyncpg's ``close(timeout=)`` would), the connection is
    aborted, and the write fails with ``ConnectionDoesNotExistError``. On
    asyncpg 0.29-0.31 a release's close keeps the pool's own bound
    (``_internals.CLOSE_UNDER_BUDGET``: asyncpg's ``close(timeout=)`` there
    leaves its transport unclosed when it runs out) and the release does not
    raise; the wait before it, for the call in flight, has the release's
    budget all the same (``Holder.calls_budget``, review h258): aborted at
    0.5 s, the write fails with ``ConnectionDoesNotExistError`` there too."""
    outcome, release_error, took, rows = await _release_with_cancels_refused(
        safepool.create_pool, running, admin, app_name, 0.5
    )
    assert rows == 0
    if not safepool._internals.CLOSE_UNDER_BUDGET:
        assert release_error is None
        assert isinstance(outcome, asyncpg.ConnectionDoesNotExistError), outcome
        assert 0.4 < took < 1.5, took
        return
    assert isinstance(release_error, TimeoutError), release_error
    assert isinstance(outcome, asyncpg.ConnectionDoesNotExistError), outcome
    assert 0.4 < took < 1.5, took
