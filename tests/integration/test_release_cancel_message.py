"""A release cancelled while its reset runs raises the first canceller's
``CancelledError``, as asyncpg's does (its release awaits a shield's future,
and a cancelled future's ``result()`` raises its first cancel's message).

anyio's cancel scopes recognise their own cancellation by that message. The
release's stand-in for the reset's future (``_detach._Driver``) raised the
message-less ``CancelledError`` the Task throws in for a later cancel
(``_must_cancel``) whenever the reset's answer was already in when the first
cancel came: on uvloop, an ``asyncio.timeout(0)`` around a release inside an
anyio scope whose deadline had passed let a bare ``CancelledError`` out of
the scope in 20-60% of tries (review h206; the scope test is in
``test_review_h206_backpressure.py``). Each case runs on both pools and both
loops, and asserts what the releasing task got and that the pool is whole
after."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import pytest

import safepool

LOOPS = ("asyncio", "uvloop")


def run_on(loop: str, scenario: Callable[[], Awaitable[Any]]) -> Any:
    factory = None
    if loop == "uvloop":
        factory = pytest.importorskip("uvloop").new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(scenario())  # type: ignore[arg-type]


async def open_pool(flavour: str, dsn: str) -> Any:
    create = asyncpg.create_pool if flavour == "asyncpg" else safepool.create_pool
    return await create(dsn, min_size=1, max_size=1)


async def whole(flavour: str, pool: Any) -> None:
    """The connection came back reset and the books agree."""
    async with pool.acquire() as con:
        assert await con.fetchval("SELECT current_setting('application_name')") == ""
        assert not con.is_in_transaction()
    if flavour == "safepool":
        pool._state.check_invariants()
        assert pool.get_idle_size() == 1


async def cancelled_twice_in_release(pool: Any, answered: bool) -> tuple[Any, ...]:
    """One lease whose release is cancelled twice ("first", "second") while
    its reset runs (``answered``: once its answer is read); the args of the
    ``CancelledError`` the releasing task got."""
    con = await pool.acquire()
    await con.execute("SET application_name = 'dirty'")
    in_release = asyncio.Event()
    got: list[tuple[Any, ...]] = []

    async def releaser() -> None:
        in_release.set()
        try:
            await pool.release(con)
        except asyncio.CancelledError as error:
            got.append(error.args)
            raise

    task = asyncio.create_task(releaser())
    await in_release.wait()  # (it is inside release() now, its reset sent)
    loop = asyncio.get_running_loop()

    def cancel_twice() -> None:
        task.cancel("first")
        task.cancel("second")

    def when_answered() -> None:
        # The reset's answer read, the releaser's wake-up pending: polled
        # each loop pass on the future the release's stand-in (safepool's
        # _Driver) waits on; the cancels come before the wake-up it scheduled.
        if task._fut_waiter._fut.done():  # type: ignore[attr-defined]
            cancel_twice()
        else:
            loop.call_soon(when_answered)

    if answered:
        when_answered()
    else:
        cancel_twice()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert len(got) == 1
    return got[0]


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize(
    ("flavour", "answered"),
    [("asyncpg", False), ("safepool", False), ("safepool", True)],
    ids=["asyncpg-reset-running", "safepool-reset-running", "safepool-reset-answered"],
)
def test_a_release_cancelled_twice_raises_the_first_cancellers_error(
    pg_dsn: str, flavour: str, loop: str, answered: bool
) -> None:
    """Two cancels of the releasing task, with messages, in one loop step:
    the task gets ``CancelledError("first")``. ``answered``: the reset's
    answer is read before the cancels come, the releasing task not resumed
    yet (the case that raised the second, message-less error; safepool's
    stand-in only: asyncpg's release waits on a shield's future, done only
    once its task has run)."""

    async def scenario() -> tuple[tuple[Any, ...], int]:
        pool = await open_pool(flavour, pg_dsn)
        try:
            outcomes = []
            for _ in range(20):
                outcomes.append(await cancelled_twice_in_release(pool, answered))
                await whole(flavour, pool)
            return tuple(set(outcomes)), len(outcomes)
        finally:
            await pool.close()

    seen, count = run_on(loop, scenario)
    assert seen == (("first",),) and count == 20, (seen, count)
