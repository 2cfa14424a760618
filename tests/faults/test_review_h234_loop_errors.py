"""Review h234: what safepool let reach the loop's exception handler (or
left hanging) under faults, most of it with asyncpg < 0.32 (``HAS_POOL_HOLDER``
False: asyncpg 0.29, 0.30, 0.31, which the version matrix runs this file on).

- A setup hook's acquire cancelled twice left the setup's dead weak proxy on
  the connection; asyncpg < 0.32's cleanup at its close raised
  ReferenceError in a pool task ("Task exception was never retrieved").
  Fixed in ``Holder._proxy_collected``. Its tests are cells of
  tests/faults/test_cancel_matrix.py (setup_event, setup_lock and the
  tiny budgets' setup config: 14 failed on 0.29), three of which the
  version matrix runs on every cell (.ci/matrix.py, ``CELL_SUITES``): a
  test of its own here did not meet the garbage collector's timing.
- A connection lost (an RST) while a release waited, with no timeout, for
  the answer to asyncpg's cancel request of a timed-out statement: asyncpg
  < 0.32 never completes its cancellation futures then, and the slot stayed
  resetting for good (the pool never served again; close() hung). The wait
  now ends when the connection is lost (``_internals.wait_for_cancellation``).
- A lease taken back (lease_timeout) in a black hole: asyncpg's own cancel
  request, cut short by the take-back's terminate, leaves its TLS future
  unretrieved (asyncpg's documented noise, docs/reliability.md); nothing
  else reaches the handler.

Run on an older asyncpg with an overlay first on PYTHONPATH, e.g.
``PYTHONPATH=/tmp/apg029:$PWD .venv/bin/python -m pytest tests/faults/test_review_h234_loop_errors.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc

import asyncpg
import pytest

import safepool
from safepool import _internals

from ._harness import asyncpg_connect_lost, loop_errors
from ._pg import Cluster
from ._proxy import FaultProxy

pytestmark = pytest.mark.asyncio

OLD_ASYNCPG = not _internals.HAS_POOL_HOLDER


async def _collect() -> None:
    for _ in range(3):
        await asyncio.sleep(0)
        gc.collect()


async def test_a_connection_lost_while_the_release_waits_for_a_cancel_answer_frees_its_slot(
    running: Cluster,
) -> None:
    async with FaultProxy(running.port) as proxy:
        pool = await safepool.create_pool(running.dsn(port=proxy.port), min_size=0, max_size=1, command_timeout=0.3)
        try:
            con = await pool.acquire()
            proxy.blackhole = True
            with pytest.raises(TimeoutError):
                await con.fetchval("SELECT 1")  # command_timeout; asyncpg's cancel request goes unanswered
            release = asyncio.ensure_future(pool.release(con))
            for _ in range(5):  # (into the wait for the answer, which never comes)
                await asyncio.sleep(0)
            assert not release.done() and pool.stats().resetting == 1
            proxy.heal()  # the connection is reset (RST): nothing will answer now
            async with asyncio.timeout(5):
                with contextlib.suppress(asyncpg.PostgresError, asyncpg.InterfaceError, OSError):
                    await release  # (its outcome differs by asyncpg version; it must end)
            async with pool.acquire(timeout=5) as again:
                assert await again.fetchval("SELECT 1") == 1
        finally:
            pool.terminate()


# asyncpg's own report, documented (docs/reliability.md; _harness.
# asyncpg_connect_lost): the take-back terminates the connection while
# asyncpg's cancel request for it negotiates SSL through the black hole, and
# asyncpg leaves that request's TLS future unretrieved. asyncpg's pool never
# terminates a lease's connection there, so it does not meet it. Nothing
# else may reach the handler, and the pool's books end balanced.
@pytest.mark.realtime
async def test_a_lease_taken_back_in_a_black_hole_reports_only_asyncpgs_own_noise(running: Cluster) -> None:
    async with FaultProxy(running.port) as proxy:
        pool = await safepool.create_pool(running.dsn(port=proxy.port), min_size=1, max_size=1, lease_timeout=0.2)
        try:
            with loop_errors(allow=asyncpg_connect_lost) as errors:

                async def holder() -> None:
                    async with pool.acquire() as con:
                        proxy.blackhole = True
                        await con.fetchval("SELECT 1")

                task = asyncio.ensure_future(holder())
                await asyncio.sleep(1.0)  # (the lease expired at 0.2 s; the take-back waits for the statement)
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
                proxy.heal()
                await asyncio.sleep(0.2)
                with contextlib.suppress(BaseException):
                    await asyncio.wait_for(pool.close(), 2)
                pool.terminate()
                await _collect()
            reported = [f"{e.get('message')}: {e.get('exception')!r}" for e in errors]
            assert not reported, reported
            assert pool.stats().size == 0
        finally:
            pool.terminate()
