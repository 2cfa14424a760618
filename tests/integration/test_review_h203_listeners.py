"""Helper 203 (a newcomer migrating from asyncpg): an ``async def`` given to
``pool.add_event_listener()`` or ``pool.add_listener()`` is accepted, and
never runs. asyncpg's own listener methods (``Connection.add_listener``,
``add_log_listener``, ``add_termination_listener``) take coroutine
functions and run them; safepool's pool listeners check that the callback
is callable (``TypeError`` otherwise) but call an async one as a plain
function: the coroutine it returns is dropped ("coroutine ... was never
awaited", a RuntimeWarning at garbage collection) and the event is lost
without an error. Either running it or refusing it at registration would
do; these tests accept both. Fixed in s65: refused at registration
(``PoolTypeError``, a ``TypeError``), and a plain callback that returns a
coroutine (a lambda around an ``async def``) has it closed and is logged as
failed."""

from __future__ import annotations

import asyncio
import functools
import gc
import warnings
from collections.abc import Callable
from typing import Any

import pytest

import safepool

pytestmark = pytest.mark.asyncio


async def a_late_release(pool: safepool.Pool) -> None:
    """Send one event: ``late_release`` (a second release, a no-op)."""
    con = await pool.acquire()
    await pool.release(con)
    await pool.release(con)


async def test_a_plain_listener_gets_the_late_release_event(pools: Callable[..., Any]) -> None:
    # What holds: the event this file's tests wait for is sent.
    pool = await pools()
    got: list[Any] = []
    pool.add_event_listener(got.append)
    await a_late_release(pool)
    await asyncio.sleep(0.05)
    assert [type(e).__name__ for e in got] == ["LateRelease"]


@pytest.mark.parametrize("method", ["add_event_listener", "add_listener"])
async def test_an_async_listener_is_run_or_refused(pools: Callable[..., Any], method: str) -> None:
    pool = await pools()
    got: list[Any] = []

    async def on_event(event: Any) -> None:
        got.append(event)

    try:
        getattr(pool, method)(on_event)
    except TypeError:
        return  # refused at registration: fine
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # "coroutine ... was never awaited"
        await a_late_release(pool)
        await asyncio.sleep(0.05)
        gc.collect()
    assert len(got) == 1, "the async listener was accepted and never ran"


async def test_an_async_timing_sink_is_run_or_refused(pools: Callable[..., Any]) -> None:
    pool = await pools()
    got: list[float] = []

    async def sink(seconds: float) -> None:
        got.append(seconds)

    try:
        pool.add_timing_sink("lease", sink)
    except TypeError:
        return  # refused at registration: fine
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # "coroutine ... was never awaited"
        async with pool.acquire() as con:
            await con.fetchval("SELECT 1")
        await asyncio.sleep(0.05)
        gc.collect()
    assert len(got) == 1, "the async timing sink was accepted and never ran"


async def test_an_async_pool_created_hook_is_run_or_refused(pools: Callable[..., Any]) -> None:
    from safepool.pool import on_pool_created

    got: list[str] = []

    async def created(pool: safepool.Pool) -> None:
        got.append(pool.name)

    try:
        remove = on_pool_created(created)
    except TypeError:
        return  # refused at registration: fine
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # "coroutine ... was never awaited"
            pool = await pools(name="h203-created")
            await asyncio.sleep(0.05)
            gc.collect()
    finally:
        remove()
    assert got == [pool.name], "the async hook was accepted and never ran"



# ------------------------------------------------------------ s65 siblings


async def _async_fn(event: Any) -> None:
    pass


class _AsyncCallable:
    async def __call__(self, event: Any) -> None:
        pass


class _InheritsAsyncCall(_AsyncCallable):
    pass


@pytest.mark.parametrize("callback", [
    _async_fn, functools.partial(_async_fn), _AsyncCallable(), _InheritsAsyncCall(),
], ids=["async-def", "partial", "async-call", "inherited-async-call"])
@pytest.mark.parametrize("method", ["add_event_listener", "add_listener", "add_timing_sink", "on_pool_created"])
async def test_every_plain_callback_refuses_a_coroutine_function(
    pools: Callable[..., Any], method: str, callback: Any
) -> None:
    from safepool.pool import on_pool_created

    pool = await pools()
    register = {
        "add_event_listener": pool.add_event_listener,
        "add_listener": pool.add_listener,
        "add_timing_sink": functools.partial(pool.add_timing_sink, "lease"),
        "on_pool_created": on_pool_created,
    }[method]
    with pytest.raises(safepool.PoolTypeError, match="not a coroutine function"):
        register(callback)


@pytest.mark.parametrize("ok", [print, list().append, lambda event: None], ids=["builtin", "bound-method", "lambda"])
async def test_plain_callables_are_still_taken(pools: Callable[..., Any], ok: Any) -> None:
    pool = await pools()
    pool.add_event_listener(ok)
    pool.remove_event_listener(ok)


async def test_a_plain_listener_returning_a_coroutine_is_logged_and_the_others_run(
    pools: Callable[..., Any], caplog: pytest.LogCaptureFixture
) -> None:
    pool = await pools()
    got: list[Any] = []
    pool.add_listener(lambda event: _async_fn(event))  # (a coroutine each call: closed, logged)
    pool.add_event_listener(got.append)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # closed: no "never awaited"
        await a_late_release(pool)
        await asyncio.sleep(0.05)
        gc.collect()
    assert [type(e).__name__ for e in got] == ["LateRelease"]
    failed = [r for r in caplog.records if getattr(r, "event", None) == "listener_failed"]
    assert len(failed) == 1 and "which the pool does not await" in failed[0].getMessage()
