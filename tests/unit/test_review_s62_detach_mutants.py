"""Mutation review of safepool/_detach.py (review s62): each test here kills
a hand-made mutant of the reset driver that the suite let through, by
asserting its contract (the module's docstring, docs/design.md "The hot
path"): the caller's task drives the coroutine until it is cancelled, then
a pool task finishes it; a cancelled await never cuts the coroutine short,
and the pool task behaves as the coroutine's own task would (terminate()
cancels it). No database: the coroutine waits on plain futures the test
resolves, as in tests/unit/test_detach.py."""

from __future__ import annotations

import asyncio
import warnings
from typing import Any

import pytest

from safepool._detach import detached
from tests.unit.test_detach import Spawner

pytestmark = pytest.mark.asyncio


async def two_steps(first: asyncio.Future[int], second: asyncio.Future[int], log: list[str]) -> int:
    log.append("start")
    try:
        a = await first
        log.append("after first")
        b = await second
    except asyncio.CancelledError:
        log.append("cancelled")
        raise
    log.append("done")
    return a + b


async def test_a_cancel_after_the_future_resolved_wakes_the_caller_once() -> None:
    """The future resolves and the caller is cancelled in the same loop
    step: the future has already scheduled the caller's wake-up, which
    delivers the CancelledError. No second wake-up may follow: a caller
    that swallows the cancel (an ``asyncio.timeout`` block around a
    release, then more work) and awaits another future would be stepped
    while that one is pending ("await wasn't used with future"). (Mutant:
    cancel() scheduling the wake-up even when the future is done.)"""
    loop = asyncio.get_running_loop()
    spawn = Spawner()
    first, second = loop.create_future(), loop.create_future()
    other: asyncio.Future[str] = loop.create_future()
    log: list[str] = []
    errors: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, context: errors.append(context))

    async def caller() -> str:
        try:
            await detached(two_steps(first, second, log), spawn)
        except asyncio.CancelledError:
            return await other
        return "not reached"

    task = asyncio.create_task(caller())
    await asyncio.sleep(0)
    first.set_result(1)  # the wake-up is scheduled, not run
    task.cancel()
    for _ in range(3):
        await asyncio.sleep(0)
    assert not task.done(), task.exception() if task.done() else None  # waits on `other`
    other.set_result("woken by its own future")
    assert await task == "woken by its own future"
    second.set_result(2)
    assert await spawn.tasks[0] == 3
    assert log == ["start", "after first", "done"]
    assert errors == []


async def test_an_exception_thrown_in_mid_wait_does_not_cut_the_coroutine_short() -> None:
    """The driver as a coroutine (``create_task(con.release())``, a runner
    that drives it itself): an exception other than a cancel thrown in
    while the coroutine waits on a pending future (a KeyboardInterrupt
    delivered into the task) propagates to the caller, and the coroutine,
    which the exception is not meant for, goes on in a pool task: its
    ``await`` must not raise it half-way. (Mutant: any exception thrown in
    while not cancelled passed on into the coroutine as the future's error,
    though the future is still pending.)"""
    loop = asyncio.get_running_loop()
    spawn = Spawner()
    first, second = loop.create_future(), loop.create_future()
    log: list[str] = []
    driver = detached(two_steps(first, second, log), spawn)
    assert driver.send(None) is driver  # waiting on `first` (the driver stands in for it)
    with pytest.raises(KeyboardInterrupt):
        driver.throw(KeyboardInterrupt())
    assert len(spawn.tasks) == 1
    first.set_result(1)
    second.set_result(2)
    assert await spawn.tasks[0] == 3
    assert log == ["start", "after first", "done"]


async def test_a_task_of_the_driver_cancelled_before_it_ran_hands_over_quietly() -> None:
    """module docstring: programs hand asyncpg's release() coroutine to
    ``asyncio.create_task()``. Such a task cancelled before its first step:
    the lease has ended, so the pool runs the coroutine at once, and
    nothing warns that it was never awaited (it was: by the task). (Mutant:
    throw() before the first step raising without handing over: the
    coroutine ran only when the driver was garbage collected, with
    "a pool connection's release was never awaited".)"""
    loop = asyncio.get_running_loop()
    spawn = Spawner()
    first, second = loop.create_future(), loop.create_future()
    log: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        task = loop.create_task(detached(two_steps(first, second, log), spawn))  # type: ignore[arg-type]
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert len(spawn.tasks) == 1
        first.set_result(1)
        second.set_result(2)
        assert await spawn.tasks[0] == 3
        del task
    assert log == ["start", "after first", "done"]
    assert [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)] == []


@pytest.mark.parametrize("step", ["first", "second"])
async def test_a_pool_task_cancelled_as_its_future_resolves_cancels_the_coroutine(step: str) -> None:
    """"Cancelling the pool task (terminate()) reaches the coroutine as
    usual" (_Resume): as in a task of its own, a cancel that comes in the
    loop step in which the awaited future resolved (the future can no
    longer be cancelled: the task delivers CancelledError at the wake-up)
    raises CancelledError at the coroutine's await. (Mutants: _Resume
    dropping what is thrown in at the first step's future, or at a later
    step's: the cancel was lost and the coroutine went on.)"""
    loop = asyncio.get_running_loop()
    spawn = Spawner()
    first, second = loop.create_future(), loop.create_future()
    log: list[str] = []
    caller = asyncio.create_task(_await(detached(two_steps(first, second, log), spawn)))
    await asyncio.sleep(0)
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller
    [pool_task] = spawn.tasks
    await asyncio.sleep(0)  # the pool task waits on `first`
    if step == "second":
        first.set_result(1)
        for _ in range(2):
            await asyncio.sleep(0)
        assert log == ["start", "after first"]  # waits on `second`
    if step == "first":
        second.set_result(2)  # (a mutant that loses the cancel then ends at once: no hang)
        first.set_result(1)
    else:
        second.set_result(2)
    pool_task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await pool_task
    assert log[-1] == "cancelled"


async def _await(awaitable: Any) -> Any:
    return await awaitable


async def test_an_async_generators_aclose_runs_the_coroutine_in_the_caller() -> None:
    """_closing(): a GeneratorExit from an async generator's ``aclose()``
    (a FastAPI dependency that releases in its ``finally:``) is awaited by
    a task, so its waits are waited for: the coroutine runs in the caller
    and has ended when ``aclose()`` returns; only a closed coroutine's
    GeneratorExit (no wait possible) hands it to the pool. (Mutant: every
    GeneratorExit taken for a closed coroutine's: the pool task ran it
    and aclose() returned before it ended.)"""
    loop = asyncio.get_running_loop()
    spawn = Spawner()
    first, second = loop.create_future(), loop.create_future()
    log: list[str] = []

    async def dependency() -> Any:
        try:
            yield "connection"
        finally:
            log.append(f"released: {await detached(two_steps(first, second, log), spawn)}")

    agen = dependency()
    assert await agen.__anext__() == "connection"
    closing = asyncio.create_task(agen.aclose())
    await asyncio.sleep(0)
    first.set_result(1)
    second.set_result(2)
    await closing
    assert spawn.tasks == []
    assert log == ["start", "after first", "done", "released: 3"]


async def test_a_driver_awaited_twice_reports_the_end_once() -> None:
    """The driver is awaited once, as a coroutine: a second await raises
    RuntimeError("cannot reuse already awaited coroutine") and must not
    report the coroutine's end to ``then`` twice (a release's reset_done:
    the connection handed on twice). (Mutant: no check: the spent
    coroutine's own RuntimeError went to ``then`` as the reset's error.)"""
    loop = asyncio.get_running_loop()
    spawn = Spawner()
    first, second = loop.create_future(), loop.create_future()
    first.set_result(1)
    second.set_result(2)
    ends: list[BaseException | None] = []
    driver = detached(two_steps(first, second, []), spawn, ends.append)
    await driver
    with pytest.raises(RuntimeError, match="cannot reuse already awaited coroutine"):
        await driver
    assert ends == [None]
