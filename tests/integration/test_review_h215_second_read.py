"""Review helper-215: a second, adversarial read of the day's changes
(4c981ee..HEAD) other than the backend-exit wait: the release stand-in's
cancel error (_detach._Driver, 906380e) side by side with asyncpg's pool.

What held (both pools, both loops, 20 runs each, same exception class and
args and task.cancelling() after, pool whole and reset): task.cancel with
and without a message, asyncio.timeout / anyio move_on_after / fail_after /
CancelScope around release() and around ``async with pool.acquire()``, a
TaskGroup's (asyncio's and anyio's) failing sibling, a coroutine closed
mid-release (GeneratorExit); a failing reset cancelled mid-way is logged by
the pool and the caller gets the canceller's CancelledError.

What did not (strict xfails until s66 fixed both: the stand-in reads as an
asyncio.Future to anyio, done only once cancelled; the loop pass waits on a
future):
- an anyio cancel that comes after asyncio.timeout's, before the releasing
  task wakes: anyio cancels again (the stand-in is no asyncio.Future), the
  timeout no longer turns its cancel into TimeoutError, a bare
  CancelledError leaves the scope (asyncpg's pool: TimeoutError);
- the loop-pass release (every 32nd with nothing to reset: a bare yield)
  keeps the last cancel's message, and lets review h206's bare
  CancelledError out of an anyio scope.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import asyncpg
import pytest

import safepool

LOOPS = ("asyncio", "uvloop")
FLAVOURS = ("asyncpg", "safepool")


def run_on(loop: str, scenario: Callable[[], Awaitable[Any]]) -> Any:
    factory = None
    if loop == "uvloop":
        factory = pytest.importorskip("uvloop").new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(scenario())  # type: ignore[arg-type]


async def open_pool(flavour: str, dsn: str, **kwargs: Any) -> Any:
    create = asyncpg.create_pool if flavour == "asyncpg" else safepool.create_pool
    return await create(dsn, min_size=1, max_size=1, **kwargs)


async def whole(flavour: str, pool: Any) -> None:
    async with pool.acquire() as con:
        assert await con.fetchval("SELECT current_setting('application_name')") == ""
        assert not con.is_in_transaction()
    if flavour == "safepool":
        pool._state.check_invariants()
        assert pool.get_idle_size() == 1


def repeat(
    flavour: str, loop: str, dsn: str, once: Callable[[Any], Awaitable[str]], times: int = 20, **kwargs: Any
) -> Counter[str]:
    async def scenario() -> Counter[str]:
        pool = await open_pool(flavour, dsn, **kwargs)
        outcomes: Counter[str] = Counter()
        try:
            for _ in range(times):
                outcomes[await once(pool)] += 1
                await whole(flavour, pool)
        finally:
            await pool.close()
        return outcomes

    return run_on(loop, scenario)  # type: ignore[no-any-return]


def outcome_of(task: asyncio.Task[Any], error: BaseException | None, label: str = "") -> str:
    cancelling = task.cancelling()
    while task.cancelling():
        task.uncancel()
    name = "ok" if error is None else f"{type(error).__name__}{error.args!r}"
    return f"{label}{name} cancelling={cancelling}"


# ------------------------------------------------ scenarios (both pools, both loops)


async def timeout_then_scope(pool: Any) -> str:
    """asyncio.timeout(0) cancels the releasing task first (no message), an
    anyio scope's cancel() comes next, before the task has woken up."""
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    try:
        with anyio.CancelScope() as scope:
            con = await pool.acquire()
            await con.execute("SET application_name = 'dirty'")
            async with asyncio.timeout(0):
                loop.call_soon(scope.cancel)  # (queued after the timeout's own handler)
                await pool.release(con)
    except BaseException as exc:  # noqa: BLE001
        return outcome_of(task, exc)
    return outcome_of(task, None, f"caught={scope.cancelled_caught} ")


async def dirty(pool: Any) -> Any:
    con = await pool.acquire()
    await con.execute("SET application_name = 'dirty'")
    return con


async def timeout_around_release(pool: Any) -> str:
    task = asyncio.current_task()
    assert task is not None
    con = await dirty(pool)
    try:
        async with asyncio.timeout(0):
            await pool.release(con)
    except BaseException as exc:  # noqa: BLE001
        return outcome_of(task, exc)
    return outcome_of(task, None)


async def move_on_around_release(pool: Any) -> str:
    task = asyncio.current_task()
    assert task is not None
    con = await dirty(pool)
    try:
        with anyio.move_on_after(0) as scope:
            await pool.release(con)
    except BaseException as exc:  # noqa: BLE001
        return outcome_of(task, exc)
    return outcome_of(task, None, f"caught={scope.cancelled_caught} ")


async def fail_after_around_release(pool: Any) -> str:
    task = asyncio.current_task()
    assert task is not None
    con = await dirty(pool)
    try:
        with anyio.fail_after(0):
            await pool.release(con)
    except BaseException as exc:  # noqa: BLE001
        return outcome_of(task, exc)
    return outcome_of(task, None)


async def timeout_around_acquire_block(pool: Any) -> str:
    """asyncio.timeout expiring as `async with pool.acquire()` exits (its release)."""
    task = asyncio.current_task()
    assert task is not None
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(None) as cm:
            async with pool.acquire() as con:
                await con.execute("SET application_name = 'dirty'")
                cm.reschedule(loop.time())
    except BaseException as exc:  # noqa: BLE001
        return outcome_of(task, exc)
    return outcome_of(task, None)


async def scope_around_acquire_block(pool: Any) -> str:
    task = asyncio.current_task()
    assert task is not None
    loop = asyncio.get_running_loop()
    try:
        with anyio.CancelScope() as scope:
            async with pool.acquire() as con:
                await con.execute("SET application_name = 'dirty'")
                loop.call_soon(scope.cancel)
    except BaseException as exc:  # noqa: BLE001
        return outcome_of(task, exc)
    return outcome_of(task, None, f"caught={scope.cancelled_caught} ")


async def fail_after_around_acquire_block(pool: Any) -> str:
    task = asyncio.current_task()
    assert task is not None
    try:
        with anyio.fail_after(3600) as scope:
            async with pool.acquire() as con:
                await con.execute("SET application_name = 'dirty'")
                scope.deadline = anyio.current_time() - 1
    except BaseException as exc:  # noqa: BLE001
        return outcome_of(task, exc)
    return outcome_of(task, None)


async def cancel_with_message_in_release(pool: Any) -> str:
    task = asyncio.current_task()
    assert task is not None
    con = await dirty(pool)
    asyncio.get_running_loop().call_soon(task.cancel, "msg")
    try:
        await pool.release(con)
    except BaseException as exc:  # noqa: BLE001
        return outcome_of(task, exc)
    return outcome_of(task, None)


async def cancel_without_message_in_release(pool: Any) -> str:
    task = asyncio.current_task()
    assert task is not None
    con = await dirty(pool)
    asyncio.get_running_loop().call_soon(task.cancel)
    try:
        await pool.release(con)
    except BaseException as exc:  # noqa: BLE001
        return outcome_of(task, exc)
    return outcome_of(task, None)


async def taskgroup_sibling_fails_in_release(pool: Any) -> str:
    task = asyncio.current_task()
    assert task is not None

    async def boom() -> None:
        raise KeyError("sibling")

    async def releaser() -> None:
        con = await dirty(pool)
        loop = asyncio.get_running_loop()
        loop.call_soon(lambda: tg.create_task(boom()))
        await pool.release(con)

    try:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(releaser())
    except BaseException as exc:  # noqa: BLE001
        inner = [type(e).__name__ for e in getattr(exc, "exceptions", [])]
        return outcome_of(task, None, f"{type(exc).__name__}{inner} ")
    return outcome_of(task, None)


async def timeout_in_anyio_taskgroup_in_release(pool: Any) -> str:
    """An anyio task group whose sibling fails while the other task's
    asyncio.timeout(0) fires around its release."""
    task = asyncio.current_task()
    assert task is not None
    got: list[str] = []
    go = asyncio.Event()

    async def releaser() -> None:
        con = await dirty(pool)
        try:
            async with asyncio.timeout(0):
                asyncio.get_running_loop().call_soon(go.set)
                await pool.release(con)
        except BaseException as exc:
            got.append(type(exc).__name__ + repr(exc.args))
            raise

    async def boom() -> None:
        await go.wait()
        raise KeyError("sibling")

    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(boom)
            tg.start_soon(releaser)
    except BaseException as exc:  # noqa: BLE001
        inner = sorted(type(e).__name__ for e in getattr(exc, "exceptions", []))
        return outcome_of(task, None, f"{type(exc).__name__}{inner} releaser={got} ")
    return outcome_of(task, None, f"releaser={got} ")


async def closed_mid_release(pool: Any) -> str:
    """The releasing coroutine closed (GeneratorExit) while its reset runs."""

    async def releaser(con: Any) -> None:
        await pool.release(con)

    con = await dirty(pool)
    coro = releaser(con)
    coro.send(None)  # (inside release(), its reset under way)
    coro.close()
    await asyncio.sleep(0.05)
    return "closed"


async def timeout_then_scope_deadline(pool: Any) -> str:
    """The same order by deadlines alone: an ``asyncio.timeout`` around the
    release expires just before the enclosing anyio scope's deadline, both
    within the reset's round trip (the loop's timers fire in deadline order)."""
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    con = await dirty(pool)
    try:
        with anyio.CancelScope(deadline=anyio.current_time() + 0.02) as scope:
            async with asyncio.timeout_at(loop.time() + 0.01):
                time.sleep(0.03)  # noqa: ASYNC251  (both deadlines pass before the release's first wait)
                await pool.release(con)
    except BaseException as exc:  # noqa: BLE001
        return outcome_of(task, exc)
    return outcome_of(task, None, f"caught={scope.cancelled_caught} ")


SCENARIOS = {
    "timeout_around_release": timeout_around_release,
    "move_on_around_release": move_on_around_release,
    "fail_after_around_release": fail_after_around_release,
    "timeout_around_acquire_block": timeout_around_acquire_block,
    "scope_around_acquire_block": scope_around_acquire_block,
    "fail_after_around_acquire_block": fail_after_around_acquire_block,
    "cancel_with_message_in_release": cancel_with_message_in_release,
    "cancel_without_message_in_release": cancel_without_message_in_release,
    "taskgroup_sibling_fails_in_release": taskgroup_sibling_fails_in_release,
    "timeout_in_anyio_taskgroup_in_release": timeout_in_anyio_taskgroup_in_release,
    "closed_mid_release": closed_mid_release,
}
EXPECTED = {
    "timeout_around_release": "TimeoutError() cancelling=0",
    "move_on_around_release": "caught=True ok cancelling=0",
    "fail_after_around_release": "TimeoutError() cancelling=0",
    "timeout_around_acquire_block": "TimeoutError() cancelling=0",
    "scope_around_acquire_block": "caught=True ok cancelling=0",
    "fail_after_around_acquire_block": "TimeoutError() cancelling=0",
    "cancel_with_message_in_release": "CancelledError('msg',) cancelling=1",
    "cancel_without_message_in_release": "CancelledError() cancelling=1",
    "taskgroup_sibling_fails_in_release": "ExceptionGroup['KeyError'] ok cancelling=1",
    "timeout_in_anyio_taskgroup_in_release": (
        "ExceptionGroup['KeyError', 'TimeoutError'] releaser=['TimeoutError()'] ok cancelling=0"
    ),
}


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_a_cancelled_release_ends_as_on_asyncpgs_pool(pg_dsn: str, loop: str, name: str) -> None:
    """What held: the same cancellation of a release (task.cancel with and
    without a message, asyncio.timeout, a TaskGroup's sibling, anyio's
    move_on_after/fail_after/CancelScope, around release() and around
    ``async with pool.acquire()``, a coroutine closed mid-release) ends the
    same on both pools (exception class and args, task.cancelling() after),
    20 times each, and leaves the pool whole and the connection reset."""
    seen = {flavour: repeat(flavour, loop, pg_dsn, SCENARIOS[name]) for flavour in FLAVOURS}
    assert seen["safepool"] == seen["asyncpg"], seen
    if name in EXPECTED:
        assert seen["safepool"] == Counter({EXPECTED[name]: 20}), seen


class FailingResetConnection(asyncpg.Connection):  # type: ignore[misc]
    """A reset that takes 0.2 s of server time, then fails."""

    def get_reset_query(self) -> str:
        return "SELECT pg_sleep(0.2); SELECT 1/0"

    def _get_reset_query(self) -> str:  # asyncpg < 0.30 (no public get_reset_query)
        return "SELECT pg_sleep(0.2); SELECT 1/0"


@pytest.mark.parametrize("loop", LOOPS)
def test_a_failing_reset_cancelled_mid_way_is_logged_and_the_caller_gets_its_cancel(
    pg_dsn: str, loop: str, caplog: pytest.LogCaptureFixture
) -> None:
    """What held: the releasing task cancelled while a reset that will fail
    runs gets the canceller's CancelledError (as on asyncpg's pool); the
    reset's error reaches the pool task, which logs it and closes the
    connection; the books balance."""

    async def scenario() -> tuple[list[str], int]:
        pool = await open_pool("safepool", pg_dsn, connection_class=FailingResetConnection)
        outcomes = []
        try:
            for _ in range(3):
                task = asyncio.current_task()
                assert task is not None
                con = await dirty(pool)
                asyncio.get_running_loop().call_later(0.05, task.cancel, "msg")
                try:
                    await pool.release(con)
                except BaseException as exc:  # noqa: BLE001
                    outcomes.append(outcome_of(task, exc))
                else:
                    outcomes.append(outcome_of(task, None))
                await asyncio.sleep(0.4)
                pool._state.check_invariants()
            return outcomes, pool.get_size()
        finally:
            pool.terminate()

    caplog.set_level("WARNING", logger="safepool")
    outcomes, size = run_on(loop, scenario)
    assert outcomes == ["CancelledError('msg',) cancelling=1"] * 3
    assert size <= 1
    failed = [r for r in caplog.records if "reset failed" in r.getMessage() and "DivisionByZero" in r.getMessage()]
    assert len(failed) == 3, [r.getMessage() for r in caplog.records]


BUG_DOUBLE_CANCEL = (
    "safepool/_detach.py:91,175: the release's stand-in (_Driver) is not an asyncio.Future, so anyio's "
    "_deliver_cancellation (which skips a task waiting on a done Future) cancels the task again after an "
    "asyncio.timeout already cancelled it; the extra cancel raises task.cancelling() and asyncio.timeout's "
    "__aexit__ no longer turns its cancellation into TimeoutError: a bare CancelledError (the timeout's) "
    "leaves the anyio scope, which does not take it for its own. asyncpg's pool (a shield's future) raises "
    "TimeoutError"
)


@pytest.mark.parametrize("loop", LOOPS)
def test_an_anyio_cancel_after_asyncio_timeout_in_release_gives_timeout_error_as_on_asyncpg(
    pg_dsn: str, loop: str
) -> None:
    """asyncio.timeout(0) around release() cancels the releasing task
    first; the enclosing anyio scope's cancel() comes in the next callback,
    before the task has woken up. asyncpg's pool: TimeoutError, 20 of 20
    (both loops). safepool: a bare ``CancelledError()`` out of the anyio
    scope, task.cancelling() 0, 20 of 20 on the asyncio loop; on uvloop
    some of those, the rest absorbed by the scope (the timeout's
    TimeoutError lost): never TimeoutError in the runs seen."""
    seen = {flavour: repeat(flavour, loop, pg_dsn, timeout_then_scope) for flavour in FLAVOURS}
    assert seen["asyncpg"] == Counter({"TimeoutError() cancelling=0": 20}), seen
    assert seen["safepool"] == seen["asyncpg"], seen


@pytest.mark.parametrize("loop", LOOPS)
def test_asyncio_timeout_expiring_before_an_anyio_deadline_in_release_gives_timeout_error(
    pg_dsn: str, loop: str
) -> None:
    """The same by deadlines alone (a request handler's anyio deadline, a
    per-query asyncio.timeout that expires just before it, both within the
    release's round trip). safepool, seen: a bare CancelledError in most
    tries, the scope absorbing it in the rest; never TimeoutError."""
    seen = {flavour: repeat(flavour, loop, pg_dsn, timeout_then_scope_deadline, times=10) for flavour in FLAVOURS}
    assert seen["asyncpg"] == Counter({"TimeoutError() cancelling=0": 10}), seen
    assert seen["safepool"] == seen["asyncpg"], seen


async def idle_lease_cancelled_twice_in_release(pool: Any) -> str:
    """A lease that ran no statement (no reset to wait for), its release
    cancelled twice ("first", "second") in one loop step if it suspends."""
    con = await pool.acquire()

    async def releaser() -> None:
        await pool.release(con)

    task = asyncio.create_task(releaser())
    await asyncio.sleep(0)  # (the releaser's first step: inside release(), or done)
    if task.done():
        return "not suspended"
    task.cancel("first")
    task.cancel("second")
    try:
        await task
    except asyncio.CancelledError as error:
        return f"CancelledError{error.args!r}"
    return "ok"


async def idle_lease_scope_then_timeout(pool: Any) -> str:
    """The h206 scenario on a lease that ran no statement: an anyio scope
    cancelled (its delivery comes in the next loop pass), then an
    asyncio.timeout(0) around the release."""
    task = asyncio.current_task()
    assert task is not None
    con = await pool.acquire()
    try:
        with anyio.CancelScope() as scope:
            scope.cancel()  # (delivered to this task by a callback: it is running now)
            async with asyncio.timeout(0):
                await pool.release(con)
    except BaseException as exc:  # noqa: BLE001
        return outcome_of(task, exc)
    return outcome_of(task, None, f"caught={scope.cancelled_caught} ")


BUG_LOOP_PASS = (
    "safepool/_leasing.py:572-585 (pass_loop) and safepool/_detach.py:428-437 (loop_pass, _bare_yield): every 32nd release "
    "with nothing to reset suspends the task at a bare yield (asyncio.sleep(0)'s), where the Task keeps the last "
    "cancel's message; asyncpg's release waits on a shield's future, whose first cancel wins. Two cancels there "
    "raise the second's CancelledError (CHANGELOG Unreleased: 'now raises the first cancel's error'), and review "
    "h206's anyio scope + asyncio.timeout(0) lets a bare CancelledError out of the scope"
)


@pytest.mark.parametrize("loop", LOOPS)
def test_a_loop_pass_release_cancelled_twice_raises_the_first_cancellers_error(pg_dsn: str, loop: str) -> None:
    """Seventy leases that run no statement, each released in a task
    cancelled twice ("first", then "second") if the release suspends.
    asyncpg's pool: CancelledError('first') 70 times. safepool: the release
    does not suspend 68 times (fine: nothing to wait for), and the loop
    passes (2 of 70) raise CancelledError('second')."""
    seen = {flavour: repeat(flavour, loop, pg_dsn, idle_lease_cancelled_twice_in_release, times=70) for flavour in FLAVOURS}
    assert seen["asyncpg"] == Counter({"CancelledError('first',)": 70}), seen
    assert set(seen["safepool"]) <= {"not suspended", "CancelledError('first',)"}, seen


@pytest.mark.parametrize("loop", LOOPS)
def test_an_anyio_scope_absorbs_its_cancellation_of_a_loop_pass_release_under_asyncio_timeout(
    pg_dsn: str, loop: str
) -> None:
    """Review h206's scenario (an anyio scope's cancel, then an
    asyncio.timeout(0) around the release) on leases that ran no statement.
    asyncpg's pool: absorbed by the scope 70 of 70. safepool: never cancelled
    when the release does not suspend (fine), and a bare CancelledError out
    of the scope, task.cancelling() 0, at each loop pass (2 of 70)."""
    seen = {flavour: repeat(flavour, loop, pg_dsn, idle_lease_scope_then_timeout, times=70) for flavour in FLAVOURS}
    assert seen["asyncpg"] == Counter({"caught=True ok cancelling=0": 70}), seen
    assert not [k for k in seen["safepool"] if k.startswith("CancelledError")], seen


async def wait_for_zero_around_release(pool: Any) -> str:
    task = asyncio.current_task()
    assert task is not None
    con = await dirty(pool)
    try:
        await asyncio.wait_for(pool.release(con), 0)
    except BaseException as exc:  # noqa: BLE001
        return outcome_of(task, exc)
    return outcome_of(task, None)


async def wait_for_short_around_release(pool: Any) -> str:
    task = asyncio.current_task()
    assert task is not None
    con = await dirty(pool)
    try:
        await asyncio.wait_for(pool.release(con), 1e-6)
    except BaseException as exc:  # noqa: BLE001
        return outcome_of(task, exc)
    return outcome_of(task, None)


async def shield_cancelled_around_release(pool: Any) -> str:
    task = asyncio.current_task()
    assert task is not None
    con = await dirty(pool)
    asyncio.get_running_loop().call_soon(task.cancel, "m")
    try:
        await asyncio.shield(pool.release(con))
    except BaseException as exc:  # noqa: BLE001
        out = outcome_of(task, exc)
    else:
        out = outcome_of(task, None)
    await asyncio.sleep(0.01)
    return out

MORE = {
    "wait_for_zero_around_release": "TimeoutError() cancelling=0",
    "wait_for_short_around_release": "TimeoutError() cancelling=0",
    "shield_cancelled_around_release": "CancelledError('m',) cancelling=1",
}


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize("name", sorted(MORE))
def test_wait_for_and_shield_around_a_release_end_as_on_asyncpgs_pool(pg_dsn: str, loop: str, name: str) -> None:
    """What held: asyncio.wait_for(pool.release(con), 0 or 1e-6) (the
    release's driver run as a coroutine by wait_for's task) and
    asyncio.shield(pool.release(con)) with the caller cancelled. (asyncpg's
    pool is left out of wait_for(release, 0): there its connection at times
    never comes back and the next acquire hangs, on both loops: asyncpg's,
    not safepool's.)"""
    flavours = ("safepool",) if name == "wait_for_zero_around_release" else FLAVOURS
    seen = {flavour: repeat(flavour, loop, pg_dsn, globals()[name], times=10) for flavour in flavours}
    assert all(outcomes == Counter({MORE[name]: 10}) for outcomes in seen.values()), seen
