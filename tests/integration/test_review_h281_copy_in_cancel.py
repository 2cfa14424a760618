"""Review h281 (s80): ``execute("COPY t FROM STDIN")`` on a lease, cut
short by its ``timeout=``. asyncpg sends a cancel request, which the
server does not act on while it waits for the COPY's data: the protocol
stays "cancelling" for good. asyncpg's release, with no budget, waits for
that cancellation for ever (its pool's slot and every acquire after it
with it); safepool's waited for ever too, its 30 s bound
(``_workers.DEFAULT_RESET_TIMEOUT``) covering the reset's statements only.
Now the wait for a cancellation is bounded by it as well: the release
raises ``TimeoutError``, the connection is given up, and the next acquire
gets a new one. (Only safepool's pool is run: asyncpg's never returns.)
"""

from __future__ import annotations

import asyncio

import pytest

import safepool
from safepool import _workers
from tests._util import copy_in_table, next_lease_is_another_backend

pytestmark = [pytest.mark.asyncio, pytest.mark.realtime]

BOUND = 0.5  # seconds: DEFAULT_RESET_TIMEOUT, shortened for the test


@pytest.mark.parametrize("reset_mode", ["full", "rollback", "auto"])
@pytest.mark.parametrize("command_timeout", [None, 60.0])
async def test_a_cancel_the_server_ignores_does_not_hold_the_slot_for_ever(
    pg_dsn: str, app_name: str, server_count: object, monkeypatch: pytest.MonkeyPatch, reset_mode: str,
    command_timeout: float | None,
) -> None:
    monkeypatch.setattr(_workers, "DEFAULT_RESET_TIMEOUT", BOUND)
    async with copy_in_table(pg_dsn, app_name) as table:
        pool = await safepool.create_pool(
            pg_dsn, min_size=1, max_size=1, reset_mode=reset_mode, command_timeout=command_timeout,
            server_settings={"application_name": app_name},
        )
        try:
            con = await pool.acquire()
            stuck_pid = con.get_server_pid()
            with pytest.raises(asyncio.TimeoutError):
                await con.execute(f"COPY {table} FROM STDIN", timeout=0.2)
            loop = asyncio.get_running_loop()
            began = loop.time()
            with pytest.raises(asyncio.TimeoutError):
                async with asyncio.timeout(BOUND + 10):
                    await pool.release(con)
            assert loop.time() - began < BOUND + 5
            await next_lease_is_another_backend(pool, stuck_pid, server_count, app_name)  # type: ignore[arg-type]
            stats = pool.stats()
            assert stats.resets_failed == 1 and stats.in_use == 0
        finally:
            await asyncio.wait_for(pool.close(), 10)
