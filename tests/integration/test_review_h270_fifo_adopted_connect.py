"""Review h270: FIFO order breaks when a task gives up on its connect.

``queue_policy="fifo"`` (the default) is documented as "asyncpg's arrival
order, without its barging" (docs/backpressure.md). On a full pool (one
connection held by a long lease, one place left), task W1 finds no
connection and a connect is opened for it; W2, then W3, queue behind it.
W1 gives up (cancelled). ``PoolState.cancel_waiter`` unbinds the connect
and ``_adopt`` (safepool/_state.py:1449, via ``_unbound_waiter(newest=
True)``, :1442) hands it to the *newest* waiter, W3. When the connect
finishes, W3 is served while W2, who came first, waits on for the long
lease. asyncpg's pool keeps the order: W1's acquire aborts its connect,
its holder goes back to the queue and the oldest waiter, W2, takes it and
connects (the asyncpg case below passes). docs/migration.md:215 describes
the newest-first hand-over ("the older ones are first in line for
released connections, which usually come sooner"), but nothing guarantees
a release comes: behind a long lease, the older task waits while a later
one is served (with ``acquire_timeout`` it times out instead).
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from tests._util import MakePool

pytestmark = pytest.mark.asyncio


async def _steps(n: int = 50) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


@pytest.mark.parametrize("gives_up", ["cancel", "cancel twice", "timeout"])
@pytest.mark.parametrize("flavour", ["asyncpg", "safepool"])
async def test_a_connect_given_up_serves_the_oldest_waiter_first(make_pool: MakePool, flavour: str, gives_up: str) -> None:
    gate = asyncio.Event()
    gate.set()
    entered = asyncio.Event()

    async def init(con: Any) -> None:
        entered.set()
        await gate.wait()

    pool = await make_pool(min_size=1, max_size=2, init=init)
    long_lease = await pool.acquire()  # the pool's one connection, held
    gate.clear()
    entered.clear()
    async def first() -> Any:
        if gives_up != "timeout":
            return await pool.acquire()
        async with asyncio.timeout(None) as deadline:
            scope.append(deadline)
            return await pool.acquire()

    scope: list[Any] = []
    w1 = asyncio.ensure_future(first())  # opens the second connection, held in init=
    await entered.wait()
    served: list[str] = []

    async def waiter(name: str) -> Any:
        con = await pool.acquire()
        served.append(name)
        return con

    w2 = asyncio.ensure_future(waiter("W2"))
    await _steps()
    w3 = asyncio.ensure_future(waiter("W3"))
    await _steps()
    if gives_up == "timeout":
        scope[0].reschedule(asyncio.get_running_loop().time())  # its deadline is now
        with pytest.raises(TimeoutError):
            await w1
    else:
        w1.cancel()
        if gives_up == "cancel twice":
            await asyncio.sleep(0)
            w1.cancel()
        with pytest.raises(asyncio.CancelledError):
            await w1
    gate.set()  # the connect (safepool's, or W2's own on asyncpg's pool) finishes
    await asyncio.wait_for(asyncio.wait([w2, w3], return_when=asyncio.FIRST_COMPLETED), 10)
    await _steps()
    try:
        assert served == ["W2"], served  # the oldest waiter first; W3 waits for the long lease
    finally:
        await pool.release(long_lease)
        for task in (w2, w3):
            await pool.release(await asyncio.wait_for(task, 10))
