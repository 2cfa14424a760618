"""The reset driver: a coroutine runs in the awaiting task until that task is
cancelled, then finishes in a pool task; the caller gets CancelledError at
once, whichever way the cancel arrives. No database: the coroutine waits on
plain futures the test resolves."""

from __future__ import annotations

import asyncio
import gc
import warnings
from typing import Any

import anyio
import pytest

from safepool._detach import _Driver, already_ended, detached, loop_pass, released
from tests._util import cancelled

pytestmark = pytest.mark.asyncio


class Spawner:
    """The pool's side: collects the tasks that finish handed-over coroutines."""

    def __init__(self) -> None:
        self.tasks: list[asyncio.Task[Any]] = []

    def __call__(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.append(task)
        return task


async def two_steps(first: asyncio.Future[int], second: asyncio.Future[int], log: list[str]) -> int:
    log.append("start")
    a = await first
    log.append("after first")
    b = await second
    log.append("done")
    return a + b


async def test_runs_in_the_callers_task_without_a_new_task() -> None:
    loop = asyncio.get_running_loop()
    spawn = Spawner()
    first, second = loop.create_future(), loop.create_future()
    log: list[str] = []
    seen_tasks: set[asyncio.Task[Any] | None] = set()

    async def probe() -> int:
        seen_tasks.add(asyncio.current_task())
        return await two_steps(first, second, log)

    async def run() -> int:
        return await detached(probe(), spawn)

    task = asyncio.create_task(run())
    await asyncio.sleep(0)
    first.set_result(1)
    await asyncio.sleep(0)
    second.set_result(2)
    assert await task == 3
    assert seen_tasks == {task}
    assert spawn.tasks == []


async def _await(make: Any, spawn: Spawner) -> Any:
    return await detached(make(), spawn)


@pytest.mark.parametrize(
    "how", ["cancel once", "cancel twice", "asyncio.timeout", "wait_for", "anyio scope", "anyio move_on_after"]
)
async def test_a_cancelled_caller_returns_at_once_and_the_pool_finishes(how: str) -> None:
    loop = asyncio.get_running_loop()
    spawn = Spawner()
    first, second = loop.create_future(), loop.create_future()
    log: list[str] = []
    outcome: list[str] = []

    async def caller() -> None:
        if how in ("cancel once", "cancel twice"):
            try:
                await detached(two_steps(first, second, log), spawn)
            except asyncio.CancelledError:
                outcome.append("cancelled")
                raise
        elif how == "asyncio.timeout":
            try:
                async with asyncio.timeout(0.01):
                    await detached(two_steps(first, second, log), spawn)
            except TimeoutError:
                outcome.append("timed out")
        elif how == "wait_for":
            try:
                await asyncio.wait_for(detached(two_steps(first, second, log), spawn), 0.01)
            except TimeoutError:
                outcome.append("timed out")
        elif how == "anyio scope":
            with anyio.CancelScope() as scope:
                loop.call_soon(scope.cancel)
                await detached(two_steps(first, second, log), spawn)
            assert scope.cancelled_caught
            outcome.append("scope cancelled")
        else:
            with anyio.move_on_after(0.01) as scope:
                await detached(two_steps(first, second, log), spawn)
            assert scope.cancelled_caught
            outcome.append("moved on")

    task = asyncio.create_task(caller())
    for _ in range(3):  # wait_for runs the awaitable in a task of its own: one more turn
        await asyncio.sleep(0)
    assert log == ["start"]  # (the timeouts are 10 ms away: the futures never resolve before)
    if how.startswith("cancel"):
        await cancelled(task, 2 if how == "cancel twice" else 1)
    else:
        await task
    # The caller is done while the coroutine still waits on its first future...
    assert outcome and not first.done() and not first.cancelled()
    assert len(spawn.tasks) == 1
    # ...which the pool task then finishes, with the real results.
    first.set_result(1)
    second.set_result(2)
    assert await spawn.tasks[0] == 3
    assert log == ["start", "after first", "done"]


async def test_the_cancel_message_reaches_the_caller() -> None:
    loop = asyncio.get_running_loop()
    spawn = Spawner()
    fut: asyncio.Future[int] = loop.create_future()

    async def wait() -> int:
        return await fut

    task = asyncio.create_task(_await(wait, spawn))
    await asyncio.sleep(0)
    task.cancel("by the test")
    with pytest.raises(asyncio.CancelledError, match="by the test"):
        await task
    fut.set_result(5)
    assert await spawn.tasks[0] == 5


async def test_a_cancel_at_a_bare_yield_hands_over_too() -> None:
    spawn = Spawner()
    log: list[str] = []

    async def yields() -> str:
        await asyncio.sleep(0)
        log.append("resumed")
        return "finished"

    task = asyncio.create_task(_await(yields, spawn))
    await asyncio.sleep(0)  # the task is now parked at the bare yield
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await spawn.tasks[0] == "finished"
    assert log == ["resumed"]


async def test_cancelling_the_pool_task_reaches_the_coroutine() -> None:
    """terminate() cancels the pool's tasks: the handed-over coroutine then
    gets CancelledError where it waits, as in a task of its own."""
    loop = asyncio.get_running_loop()
    spawn = Spawner()
    fut: asyncio.Future[int] = loop.create_future()
    seen: list[str] = []

    async def wait() -> int:
        try:
            return await fut
        except asyncio.CancelledError:
            seen.append("cancelled")
            raise

    task = asyncio.create_task(_await(wait, spawn))
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    spawn.tasks[0].cancel()
    with pytest.raises(asyncio.CancelledError):
        await spawn.tasks[0]
    assert seen == ["cancelled"]
    assert fut.cancelled()


async def test_errors_of_the_coroutine_reach_the_caller() -> None:
    loop = asyncio.get_running_loop()
    spawn = Spawner()
    fut: asyncio.Future[int] = loop.create_future()

    async def fails() -> int:
        await fut
        raise ValueError("boom")

    task = asyncio.create_task(_await(fails, spawn))
    await asyncio.sleep(0)
    fut.set_result(1)
    with pytest.raises(ValueError, match="boom"):
        await task
    assert spawn.tasks == []


async def test_a_cancel_after_the_future_resolved_but_before_the_wakeup() -> None:
    loop = asyncio.get_running_loop()
    spawn = Spawner()
    first, second = loop.create_future(), loop.create_future()
    log: list[str] = []
    task = asyncio.create_task(_await(lambda: two_steps(first, second, log), spawn))
    await asyncio.sleep(0)
    first.set_result(1)  # the wake-up is scheduled, not run
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    second.set_result(2)
    assert await spawn.tasks[0] == 3
    assert log == ["start", "after first", "done"]


async def test_the_awaited_futures_error_reaches_the_coroutine_which_may_handle_it() -> None:
    loop = asyncio.get_running_loop()
    spawn = Spawner()
    first, second = loop.create_future(), loop.create_future()

    async def handles() -> str:
        try:
            await first
        except ValueError as exc:
            return f"handled {exc}, then {await second}"
        return "not reached"

    task = asyncio.create_task(_await(handles, spawn))
    await asyncio.sleep(0)
    first.set_exception(ValueError("boom"))
    await asyncio.sleep(0)
    second.set_result(2)
    assert await task == "handled boom, then 2"
    assert spawn.tasks == []


@pytest.mark.parametrize("ends", ["returns", "raises"])
async def test_then_gets_the_coroutines_error_and_gives_the_result(ends: str) -> None:
    loop = asyncio.get_running_loop()
    spawn = Spawner()
    fut: asyncio.Future[int] = loop.create_future()

    async def work() -> int:
        value = await fut
        if ends == "raises":
            raise ValueError("boom")
        return value

    def then(token: str, error: Exception | None) -> str:
        return f"{token}: {error!r}"

    async def run() -> str:
        return await detached(work(), spawn, then, "reset")

    task = asyncio.create_task(run())
    await asyncio.sleep(0)
    fut.set_result(1)
    assert await task == ("reset: None" if ends == "returns" else "reset: ValueError('boom')")


@pytest.mark.parametrize("resolved", ["with a result", "with an error"])
async def test_a_cancel_after_the_future_resolved_hands_then_to_the_pool(resolved: str) -> None:
    """The future scheduled the caller's wake-up before the cancel: the
    caller gets CancelledError, the pool task runs the rest and ``then``."""
    loop = asyncio.get_running_loop()
    spawn = Spawner()
    fut: asyncio.Future[int] = loop.create_future()
    ends: list[Exception | None] = []

    async def work() -> int:
        return await fut

    async def run() -> None:
        await detached(work(), spawn, ends.append)

    task = asyncio.create_task(run())
    await asyncio.sleep(0)
    if resolved == "with a result":
        fut.set_result(1)
    else:
        fut.set_exception(ValueError("boom"))
    task.cancel("by the test")
    with pytest.raises(asyncio.CancelledError, match="by the test"):
        await task
    await spawn.tasks[0]
    assert len(ends) == 1
    assert ends[0] is None if resolved == "with a result" else isinstance(ends[0], ValueError)


async def test_after_a_cancel_the_future_never_wakes_the_caller_again() -> None:
    """The caller's wake-up is on the real future: a cancel takes it off, so
    the future resolving later (in the pool task) cannot step the caller,
    which by then waits on something else."""
    loop = asyncio.get_running_loop()
    spawn = Spawner()
    fut: asyncio.Future[int] = loop.create_future()
    other: asyncio.Future[str] = loop.create_future()
    errors: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, context: errors.append(context))

    async def caller() -> str:
        try:
            await detached(_wait(fut), spawn)
        except asyncio.CancelledError:
            return await other  # (swallows the cancel, then waits on another future)
        return "not reached"

    task = asyncio.create_task(caller())
    await asyncio.sleep(0)
    task.cancel()
    await asyncio.sleep(0)
    fut.set_result(1)
    assert await spawn.tasks[0] == 1
    for _ in range(3):
        await asyncio.sleep(0)
    assert not task.done()  # still waiting on `other`: not woken by `fut`
    other.set_result("woken by its own future")
    assert await task == "woken by its own future"
    assert errors == []


async def test_a_closed_caller_hands_over_and_leaves_no_wake_up_on_the_future() -> None:
    loop = asyncio.get_running_loop()
    spawn = Spawner()
    fut: asyncio.Future[int] = loop.create_future()
    driver = detached(_wait(fut), spawn)
    steps = driver.__await__()
    assert next(steps) is driver  # waits on fut, through the driver
    woken: list[object] = []
    driver.add_done_callback(woken.append)  # (as the caller's task registers its wake-up)
    steps.close()  # GeneratorExit: as when the caller's coroutine is closed
    fut.set_result(5)
    assert await spawn.tasks[0] == 5
    await asyncio.sleep(0)
    assert woken == []


async def _wait(fut: asyncio.Future[int]) -> int:
    return await fut


def _awaiting_with(fut: asyncio.Future[int], callback: Any) -> Any:
    """What asyncpg's protocol does per statement: its own done callback on
    the waiter future (``_on_waiter_completed``), then the await."""
    fut.add_done_callback(callback)
    return _wait(fut)


async def test_a_quiet_callback_is_off_the_future_while_the_caller_drives_it() -> None:
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[int] = loop.create_future()
    seen: list[asyncio.Future[int]] = []
    driver = _Driver(_awaiting_with(fut, seen.append), Spawner(), None, (), quiet=seen.append)
    task = asyncio.create_task(_drive(driver))
    await asyncio.sleep(0)
    fut.set_result(7)
    assert await task == 7
    await asyncio.sleep(0)
    assert seen == []  # never scheduled: one loop callback less per statement


@pytest.mark.parametrize("then", ["completes", "pool task cancelled"])
async def test_a_hand_over_puts_the_quiet_callback_back(then: str) -> None:
    """Once the caller is cancelled, the pool task waits on the future, and a
    cancel of that task (``terminate()``) cancels the future: asyncpg's
    callback must see it to send the server a cancel request."""
    loop = asyncio.get_running_loop()
    spawn = Spawner()
    fut: asyncio.Future[int] = loop.create_future()
    seen: list[asyncio.Future[int]] = []
    driver = _Driver(_awaiting_with(fut, seen.append), spawn, None, (), quiet=seen.append)
    task = asyncio.create_task(_drive(driver))
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    [pool_task] = spawn.tasks
    await asyncio.sleep(0)
    if then == "completes":
        fut.set_result(7)
        assert await pool_task == 7
    else:
        pool_task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await pool_task
        assert fut.cancelled()
    await asyncio.sleep(0)
    assert seen == [fut]


async def test_a_future_without_the_quiet_callback_does_not_get_it_at_a_hand_over() -> None:
    """A coroutine may first wait on a future of another kind (asyncpg's
    wait for an earlier cancel to finish): the callback is put back only
    where it was taken off."""
    loop = asyncio.get_running_loop()
    spawn = Spawner()
    fut: asyncio.Future[int] = loop.create_future()
    seen: list[asyncio.Future[int]] = []
    driver = _Driver(_wait(fut), spawn, None, (), quiet=seen.append)
    task = asyncio.create_task(_drive(driver))
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    fut.set_result(1)
    assert await spawn.tasks[0] == 1
    await asyncio.sleep(0)
    assert seen == []


async def _drive(driver: Any) -> Any:
    return await driver


# A driver whose coroutine's first step the caller took (a release sends its
# reset before its bookkeeping): it goes on from the future that step
# yielded, wherever it ends up, and never takes that step again.


class Started:
    """``two_steps`` with its first step taken by the test, as release takes
    it, and a driver that goes on from there (``first=``)."""

    def __init__(self) -> None:
        loop = asyncio.get_running_loop()
        self.spawn = Spawner()
        self.first: asyncio.Future[int] = loop.create_future()
        self.second: asyncio.Future[int] = loop.create_future()
        self.log: list[str] = []
        coro = two_steps(self.first, self.second, self.log)
        yielded = coro.send(None)
        assert yielded is self.first and self.log == ["start"]
        self.driver: _Driver[Any] | None = _Driver(coro, self.spawn, None, (), first=yielded)

    async def pool_task_finishes(self) -> None:
        """The coroutine went to a pool task, which waits on the first
        future (a second first step would raise in the coroutine: "await
        wasn't used with future") and finishes once both are resolved."""
        assert not self.first.done() and len(self.spawn.tasks) == 1
        await asyncio.sleep(0)  # (the pool task's first step: it waits on first)
        self.first.set_result(1)
        self.second.set_result(2)
        assert await self.spawn.tasks[0] == 3
        assert self.log == ["start", "after first", "done"]


async def test_a_started_driver_goes_on_from_the_first_steps_future() -> None:
    case = Started()
    task = asyncio.create_task(_await_driver(case.driver))
    await asyncio.sleep(0)
    case.first.set_result(1)
    await asyncio.sleep(0)
    case.second.set_result(2)
    assert await task == 3
    assert case.log == ["start", "after first", "done"]
    assert case.spawn.tasks == []


async def _await_driver(driver: Any) -> Any:
    return await driver


@pytest.mark.parametrize("how", ["cancel once", "cancel twice", "anyio scope cancelled before the await"])
async def test_a_started_driver_cancelled_hands_over_from_the_first_steps_future(how: str) -> None:
    case = Started()

    async def caller() -> None:
        if how.startswith("cancel"):
            await case.driver  # type: ignore[misc]
        else:
            with anyio.CancelScope() as scope:
                scope.cancel()  # (anyio cancels at the await)
                await case.driver  # type: ignore[misc]
            assert scope.cancelled_caught

    task = asyncio.create_task(caller())
    await asyncio.sleep(0)
    if how.startswith("cancel"):
        await cancelled(task, 2 if how == "cancel twice" else 1)
    else:
        await task
    await case.pool_task_finishes()


async def test_a_started_driver_never_awaited_is_finished_by_the_pool() -> None:
    case = Started()
    gc.collect()  # (garbage of earlier tests: not this test's warning)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        case.driver = None
        gc.collect()
    assert [str(w.message) for w in caught] == [
        "a pool connection's release was never awaited: the pool ran its reset itself"
    ]
    await case.pool_task_finishes()


async def test_a_started_driver_awaited_by_a_closing_coroutine_hands_over_from_its_future() -> None:
    case = Started()
    gate: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def releasing() -> None:
        try:
            await gate
        finally:
            await case.driver  # type: ignore[misc]  # (in the GeneratorExit of close(): nothing can wait here)

    closing = releasing()
    closing.send(None)
    closing.close()  # no "coroutine ignored GeneratorExit": the driver did not wait
    await case.pool_task_finishes()


@pytest.mark.parametrize("ended", ["returned", "raised"])
async def test_a_first_step_that_ended_reaches_then_at_the_first_await(ended: str) -> None:
    """A statement refused at once (asyncpg: another operation in progress):
    its first step, taken by the caller, raised; ``then`` gets the error when
    the driver is first awaited, as when the driver took the step."""
    spawn = Spawner()
    calls: list[Exception | None] = []

    async def step() -> int:
        if ended == "raised":
            raise ValueError("refused")
        return 7

    coro = step()
    try:
        coro.send(None)
    except BaseException as exc:  # (StopIteration, or the error)
        outcome = exc
    driver = _Driver(already_ended(outcome), spawn, lambda error: calls.append(error), (None,))
    assert calls == []
    await driver
    assert len(calls) == 1
    assert calls[0] is None if ended == "returned" else isinstance(calls[0], ValueError)
    assert spawn.tasks == []


async def test_loop_pass_suspends_once_awaited_or_as_a_task() -> None:
    """loop_pass() lets the callbacks already ready run before the awaiting
    task goes on (one loop iteration), then returns None; a task runs it.
    Both it and released() are coroutines: awaited twice they raise
    asyncpg's release coroutine's RuntimeError."""
    order: list[str] = []
    loop = asyncio.get_running_loop()
    loop.call_soon(order.append, "ready callback")
    assert await loop_pass() is None
    order.append("resumed")
    assert order == ["ready callback", "resumed"]
    assert await asyncio.create_task(loop_pass()) is None
    assert await asyncio.create_task(released()) is None
    for make in (loop_pass, released):
        once = make()
        await once
        with pytest.raises(RuntimeError, match="cannot reuse already awaited coroutine"):
            await once


async def test_released_returns_without_a_loop_pass() -> None:
    """released() returns at once: a callback already ready has not run."""
    order: list[str] = []
    asyncio.get_running_loop().call_soon(order.append, "ready callback")
    assert await released() is None
    assert order == []
