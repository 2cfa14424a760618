"""Review of the hot-path changes on a real PostgreSQL: the release's fast
hand-on to one waiter (``Runner.after_hand_on``) when that waiter's task
was cancelled in the same loop step, the detached reset's driver keeping the
releasing task's context through a cancelled release, and the books under
random cancellations with each queue policy."""

from __future__ import annotations

import asyncio
import contextvars
import random
from typing import Any

import pytest

import safepool

pytestmark = pytest.mark.asyncio

VAR: contextvars.ContextVar[str] = contextvars.ContextVar("VAR", default="unset")


async def _until_waiting(pool: Any, n: int) -> None:
    """Let the tasks just created run their first step (they enqueue there)."""
    for _ in range(100):
        if pool._state.waiting >= n:
            return
        await asyncio.sleep(0)
    raise AssertionError(f"{pool._state.waiting} waiters, expected {n}")


@pytest.mark.parametrize("release", ["clean", "inline_reset", "custom_reset"])
async def test_a_waiter_cancelled_in_the_step_of_its_grant_passes_the_connection_on(
    pools: Any, monkeypatch: pytest.MonkeyPatch, release: str
) -> None:
    """b heads the queue and its task is cancelled (its future with it) in the
    loop step that grants it the connection, before b could leave the queue:
    the hand-on must give the connection to c, not strand it reserved."""
    kwargs: dict[str, Any] = {}
    if release == "custom_reset":

        async def reset(con: Any) -> None:
            await con.execute("RESET ALL")

        kwargs["reset"] = reset
    pool = await pools(min_size=1, max_size=1, **kwargs)
    state = pool._state
    con = await pool.acquire()
    if release != "clean":
        await con.execute("SET work_mem = '8MB'")
    got: list[str] = []

    async def waiter(name: str) -> None:
        async with pool.acquire() as c:
            got.append(name)
            assert await c.fetchval("SHOW work_mem") == "4MB"

    b = asyncio.create_task(waiter("b"))
    await _until_waiting(pool, 1)
    c = asyncio.create_task(waiter("c"))
    await _until_waiting(pool, 2)
    if release == "clean":
        assert b.cancel()
    else:
        # The reset's end (in the releasing task, or a pool task) grants b:
        # cancel b just before, in the same step.
        # (On the class: PoolState has slots, no instance attribute to patch.)
        reset_done = type(state).reset_done

        def cancel_b_then_reset_done(self: Any, *args: Any) -> Any:
            monkeypatch.undo()  # once: c's release resets too
            assert self is state and b.cancel()
            return reset_done(self, *args)

        monkeypatch.setattr(type(state), "reset_done", cancel_b_then_reset_done)
    await pool.release(con)
    with pytest.raises(asyncio.CancelledError):
        await b
    await asyncio.wait_for(c, 10)
    assert got == ["c"]
    state.check_invariants()
    assert state.waiting == 0 and state.in_use == 0 and state.idle == 1


@pytest.mark.parametrize(
    "how", ["not_cancelled", "task_cancel", "asyncio_timeout", "anyio_scope", "anyio_scope_async_with"]
)
async def test_a_release_keeps_the_releasing_tasks_context(pools: Any, how: str) -> None:
    """The detached reset's driver wakes the releasing task in the task's
    own context: variables set before the release are there after it (also
    when the release is cancelled and the reset moves to a pool task), and
    what the task sets afterwards stays set."""
    pool = await pools(min_size=1, max_size=1)

    async def user() -> str:
        VAR.set("before")
        if how == "anyio_scope_async_with":
            anyio = pytest.importorskip("anyio")
            with anyio.CancelScope() as scope:
                async with pool.acquire() as c:
                    await c.execute("SET work_mem = '8MB'")
                    VAR.set("inside")
                    scope.cancel()  # the release in __aexit__ is cancelled
            assert scope.cancelled_caught
            assert VAR.get() == "inside"
        else:
            con = await pool.acquire()
            await con.execute("SET work_mem = '8MB'")  # dirty: the reset runs in this task
            if how == "not_cancelled":
                await pool.release(con)  # the task resumes from the reset's wake-up
            elif how == "task_cancel":
                task = asyncio.current_task()
                assert task is not None
                task.cancel()  # delivered at the release's first wait: the driver hands over
                with pytest.raises(asyncio.CancelledError):
                    await pool.release(con)
                task.uncancel()
            elif how == "asyncio_timeout":
                with pytest.raises(TimeoutError):
                    async with asyncio.timeout(0):
                        await pool.release(con)
            else:
                anyio = pytest.importorskip("anyio")
                with anyio.CancelScope() as scope:
                    scope.cancel()
                    await pool.release(con)
                assert scope.cancelled_caught
            assert VAR.get() == "before"
        VAR.set("after")
        await asyncio.sleep(0)
        async with pool.acquire() as c:  # the handed-over reset finished
            assert await c.fetchval("SHOW work_mem") == "4MB"
        return VAR.get()

    assert await asyncio.create_task(user()) == "after"
    assert VAR.get() == "unset"  # (the test's own context: untouched)
    pool._state.check_invariants()


@pytest.mark.parametrize("seed", [1, 2])
@pytest.mark.parametrize(
    "options",
    [{}, {"queue_policy": "adaptive", "queue_target": 0.002}, {"max_site_share": 0.5}],
    ids=["fifo", "adaptive", "site_caps"],
)
async def test_random_cancellations_under_contention_keep_the_books(
    pools: Any, seed: int, options: dict[str, Any]
) -> None:
    """300 tasks on 3 connections: clean, dirty and in-transaction leases,
    acquire timeouts, asyncio.timeout around the whole lease and outright
    cancellation. Afterwards the books balance, every connection comes back
    clean, and each task's context held its own value throughout."""
    rnd = random.Random(seed)
    pool = await pools(min_size=1, max_size=3, max_inactive_connection_lifetime=0.05, **options)
    outcomes: dict[str, int] = {}

    async def one(i: int) -> None:
        mode = rnd.choice(["clean", "dirty", "transaction"])
        VAR.set(f"task{i}")
        try:
            async with asyncio.timeout(rnd.choice([None, 0.001, 0.003, 0.01])):
                async with pool.acquire(timeout=rnd.choice([None, 0.002, 1.0]), site=rnd.choice("abc")) as c:
                    if mode == "dirty":
                        await c.execute("SET work_mem = '8MB'")
                    elif mode == "transaction":
                        await c.execute("BEGIN; SELECT 1")
                    assert VAR.get() == f"task{i}"
            key = "ok"
        except TimeoutError:
            key = "timeout"
        except safepool.PoolOverloadedError:
            key = "shed"
        assert VAR.get() == f"task{i}"
        outcomes[key] = outcomes.get(key, 0) + 1

    tasks = [asyncio.create_task(one(i)) for i in range(300)]
    for k in range(0, 300, 7):
        if rnd.random() < 0.5:
            tasks[k].cancel()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert [r for r in results if r is not None and not isinstance(r, asyncio.CancelledError)] == []
    assert outcomes.get("ok", 0) > 0
    state = pool._state
    state.check_invariants()
    # (One site each: with site caps one site holds at most 2 of the 3.)
    cons = [await pool.acquire(timeout=10, site=f"check{k}") for k in range(3)]
    for c in cons:
        assert await c.fetchval("SHOW work_mem") == "4MB"
        assert not c.is_in_transaction()
    for c in cons:
        await pool.release(c)
    state.check_invariants()
    assert state.waiting == 0 and state.in_use == 0
