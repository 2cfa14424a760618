"""min_size is restored in the background whatever left the pool below it,
also while connects fail (the core then opens no connect for the floor
alone, and the runner's upkeep, Runner.keep_floor, must be started)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import asyncpg
import pytest

import safepool
import safepool._runner
from tests._util import until

pytestmark = pytest.mark.asyncio


@pytest.fixture(autouse=True)
def _quick_upkeep(monkeypatch: pytest.MonkeyPatch) -> None:
    # The upkeep's first retry comes after 1 s (asyncpg 0.32's schedule).
    monkeypatch.setattr(safepool._runner, "_FLOOR_RETRY_FIRST", 0.01)


class RefuseSome:
    """An ``init=`` that fails the connects chosen by ``refuse``."""

    def __init__(self) -> None:
        self.calls = 0
        self.refuse: Callable[[int], bool] = lambda call: False

    async def __call__(self, con: asyncpg.Connection) -> None:
        self.calls += 1
        if self.refuse(self.calls):
            raise OSError("connect refused by the test's init")


async def test_a_failed_start_up_connect_is_retried_to_min_size(pg_dsn: str, app_name: str) -> None:
    init = RefuseSome()
    init.refuse = lambda call: call == 2  # the first (creation fails on it) succeeds
    async with safepool.create_pool(
        pg_dsn, min_size=2, max_size=3, init=init, server_settings={"application_name": app_name}
    ) as pool:
        await until(lambda: pool.get_size() == 2)
        assert init.calls == 3 and pool.stats().waiting == 0


async def test_a_connection_lost_during_a_backoff_is_replaced_to_min_size(pg_dsn: str, app_name: str) -> None:
    """A connect above min_size fails (connects now back off), then a floor
    connection is lost: nobody waits, so only the upkeep brings it back."""
    init = RefuseSome()
    async with safepool.create_pool(
        pg_dsn, min_size=1, max_size=2, init=init, server_settings={"application_name": app_name}
    ) as pool:
        held = await pool.acquire()
        init.refuse = lambda call: True
        with pytest.raises(OSError, match="refused by the test's init"):
            await pool.acquire(timeout=5)  # its own connect's error, as on asyncpg's pool
        # Connects back off now (an init= failure is the hook's, not the
        # server's: server_status stays "up", stats().init_failing says so).
        stats = pool.stats()
        assert stats.consecutive_connect_failures == 1 and stats.init_failing
        init.refuse = lambda call: False
        held._con.terminate()  # the floor connection dies while leased
        await pool.release(held)  # (the dead connection's slot closes after it returns)
        await until(lambda: pool.get_idle_size() == 1)  # a new connection, nobody having asked
        assert pool.get_size() == 1 and pool.stats().connections_opened == 2


async def test_raising_min_size_during_a_backoff_is_met(pg_dsn: str, app_name: str) -> None:
    init = RefuseSome()
    async with safepool.create_pool(
        pg_dsn, min_size=0, max_size=3, init=init, server_settings={"application_name": app_name}
    ) as pool:
        init.refuse = lambda call: True
        with pytest.raises(OSError, match="refused by the test's init"):
            await pool.acquire(timeout=5)
        init.refuse = lambda call: False
        pool.resize(min_size=2)  # max_size left as it is (3)
        assert (pool.get_min_size(), pool.get_max_size()) == (2, 3)
        await until(lambda: pool.get_size() == 2)


async def test_resize_of_a_closing_or_closed_pool_raises_and_changes_nothing(
    pg_dsn: str, app_name: str, server_count: Any
) -> None:
    """resize() on a closed pool was taken silently: get_max_size() and
    stats() reported bounds of a pool that opens nothing any more. It raises
    PoolClosedError (an asyncpg.InterfaceError), as acquire() does; a pool
    not started yet still takes new bounds."""
    pool = safepool.create_pool(pg_dsn, min_size=0, max_size=2, server_settings={"application_name": app_name})
    pool.resize(max_size=3, min_size=1)  # before `await pool`: taken
    await pool
    await until(lambda: pool.get_size() == 1)
    held = await pool.acquire()
    closing = asyncio.create_task(pool.close())  # waits for `held`
    await until(pool.is_closing)
    with pytest.raises(safepool.PoolClosedError, match=r"cannot resize pool '.*': pool is closing"):
        pool.resize(max_size=5, min_size=3)
    assert (pool.get_max_size(), pool.get_min_size()) == (3, 1)
    await pool.release(held)
    await closing
    for kwargs in ({"max_size": 5, "min_size": 2}, {"min_size": 0}, {"max_size": 1}):
        with pytest.raises(asyncpg.InterfaceError, match=r"cannot resize pool '.*': pool is closed") as raised:
            pool.resize(**kwargs)
        assert isinstance(raised.value, safepool.PoolClosedError)
        assert (pool.get_max_size(), pool.get_min_size()) == (3, 1)
        assert pool.stats().max_size == 3
    # A bad argument is still named as such (checked first, as acquire(site=)).
    with pytest.raises(TypeError, match="max_size must be an int"):
        pool.resize(max_size="5")  # type: ignore[arg-type]
    assert pool.get_size() == 0
    # (a closed connection's backend leaves pg_stat_activity a moment after
    # its Terminate: the server's count polled)
    async with asyncio.timeout(5):
        while await server_count(app_name):
            await asyncio.sleep(0.005)
    assert pool.get_size() == 0 and await server_count(app_name) == 0

    terminated = await safepool.create_pool(pg_dsn, min_size=0, max_size=1)
    terminated.terminate()
    with pytest.raises(safepool.PoolClosedError, match="pool is closed"):
        terminated.resize(max_size=2)
    assert terminated.get_max_size() == 1
