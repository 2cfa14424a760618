"""Review h263: the leak guard's release of a lease whose statement is still
running logs asyncio's "Future exception was never retrieved".

``assert_no_leaks`` (and the pytest plugin's check, through the same
``release_leaked``) releases a leaked lease with ``pool.release_lease(id)``
driven by ``guards._run_to_first_wait`` (``safepool/testing/guards.py:796``):
it sends the coroutine once and, if it wants to wait, closes it
(line 805). A lease whose statement still runs in another task (a
``pool.fetchval`` left running in a background task: the case the report
itself describes, "running a statement") takes the pool-task reset path,
and the release waits on the reset's future in ``Leaser.finish_release``
(``safepool/_leasing.py:711``, ``error = await done``). The close throws
``GeneratorExit`` there; nothing retrieves the future, and when the pool's
reset is refused ("another operation is in progress") its exception is
reported by asyncio through the loop's exception handler, an ERROR log
line in the user's test run on top of the pool's own "reset failed"
warning. (``finish_release`` marks the future retrieved only for a
coroutine already closing when it starts: ``closing_now()``, line 696.)
Fixed: a wait for the pool task's future given up (closed or cancelled)
marks the future retrieved.
"""

from __future__ import annotations

import asyncio
import gc
from typing import Any

import pytest

from safepool.testing import LeakError, assert_no_leaks
from tests._util import loop_errors, until

pytestmark = [pytest.mark.asyncio, pytest.mark.safepool_allow_leaks]


async def test_guard_releasing_a_lease_with_a_running_statement_leaves_no_unretrieved_future(pools: Any) -> None:
    pool = await pools(max_size=2)
    with loop_errors() as errors:
        running: asyncio.Future[Any] | None = None
        with pytest.raises(LeakError):
            async with assert_no_leaks(pool):
                running = asyncio.ensure_future(pool.fetchval("SELECT pg_sleep(0.5)"))  # left running: the leak
                await until(lambda: pool.stats().in_use == 1)
                await asyncio.sleep(0.1)  # its statement is on the server
        assert running is not None
        await asyncio.gather(running, return_exceptions=True)  # cancelled by the pool's release
        await until(lambda: pool.stats().in_use == 0 and pool.stats().resetting == 0 and pool.stats().closing == 0)
        gc.collect()  # asyncio reports an unretrieved exception when the future is freed
        await asyncio.sleep(0.05)
    assert [context.get("message") for context in errors] == []


async def test_a_release_cancelled_while_its_pool_task_resets_leaves_no_unretrieved_future(pools: Any) -> None:
    """The sibling: the releasing task cancelled while it waits for the pool
    task's reset, which then fails (refused: a statement of the lease runs
    in another task)."""
    pool = await pools(max_size=2)
    with loop_errors() as errors:
        con = await pool.acquire()
        running = asyncio.ensure_future(con.fetchval("SELECT pg_sleep(0.5)"))
        await asyncio.sleep(0.1)  # its statement is on the server
        release = asyncio.ensure_future(pool.release(con))
        await asyncio.sleep(0)  # the release waits for its pool task
        release.cancel()
        await asyncio.gather(release, running, return_exceptions=True)
        await until(lambda: pool.stats().in_use == 0 and pool.stats().resetting == 0 and pool.stats().closing == 0)
        gc.collect()
        await asyncio.sleep(0.05)
    assert [context.get("message") for context in errors] == []
