"""Review h263: a coroutine closed while its acquire runs the ``setup=`` hook
(``coro.close()``, or its pending task garbage collected: "Task was
destroyed but it is pending!") makes Python raise "coroutine ignored
GeneratorExit" out of the close; asyncpg's pool closes it quietly.

docs/leases.md ("Cancellation inside and outside ``async with``"): a
coroutine closed while it holds a lease releases, "and the reset runs in a
pool task, since nothing can wait in a closing coroutine (...) where
asyncpg's release makes Python raise 'coroutine ignored GeneratorExit' out
of the close" (``Leaser.finish_release`` checks ``closing_now()``). The same
close one step earlier, while the acquire is still in ``setup=``, reaches
``Leaser.run_setup``'s failure path (``safepool/_leasing.py:386-392``): the
connection is given up (state.release DISCARD) and then ``await
asyncio.wait([done])`` waits for its close, inside the GeneratorExit, with
no ``closing_now()`` check. The close raises RuntimeError (for a garbage
collected task: an "Exception ignored in" unraisable error, which pytest
reports). The pool's books stay right (the connection is replaced).
Fixed: the failure path waits for the close only where a wait can be made.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

pytestmark = [pytest.mark.asyncio, pytest.mark.safepool_allow_leaks]


@pytest.fixture(params=[
    "asyncpg",  # the reference: closes quietly (and loses the connection, which safepool replaces)
    "safepool",
])
def flavour(request: pytest.FixtureRequest) -> str:
    return str(request.param)


async def test_a_coroutine_closed_in_the_setup_hook_closes_quietly(make_pool: Any, flavour: str) -> None:
    gate = asyncio.Event()

    async def setup(con: Any) -> None:
        await gate.wait()  # a slow hook: the acquiring coroutine is closed here

    pool = await make_pool(max_size=1, setup=setup)

    async def handler() -> int:
        async with pool.acquire() as con:
            return int(await con.fetchval("SELECT 1"))

    coro = handler()
    coro.send(None)  # suspended in the setup hook
    coro.close()  # what a garbage collected pending task does: must not raise
    gate.set()
    if flavour == "safepool":
        # The books stay right: the connection is closed and replaced.
        async with pool.acquire(timeout=5) as con:
            assert await con.fetchval("SELECT 1") == 1
        assert pool.get_size() <= 1
        pool._state.check_invariants()
