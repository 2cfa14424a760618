"""Review s70 of the loop-shutdown hook (``Runner.watch_loop_shutdown``,
commit 3645d70): a pool opened once the loop's ``shutdown_asyncgens()`` has
run, or while it runs (the cleanup of an asynchronous generator that it
closes: a resource held by a generator, an ``@asynccontextmanager`` left
open), on both loops, compared with asyncpg's pool.

The loop's first-iteration hook warns about a generator started after
``shutdown_asyncgens()`` (``ResourceWarning: asynchronous generator ... was
scheduled after loop.shutdown_asyncgens() call``), and asyncpg's pool starts
no generator: safepool's pool warns where asyncpg's is silent, and the pool
fails to open where warnings are errors (this project's own pytest
settings). Its generator is also never closed by that loop: on uvloop a pool
so opened and left open keeps its backends after the loop has closed, where
asyncpg's pool's end with uvloop's transports.

Fixed (``Runner.watch_loop_shutdown``): a pool opened once the loop has shut
down its generators starts none and keeps no exit watches.
"""

from __future__ import annotations

import asyncio
import gc
import uuid
import warnings
from collections.abc import AsyncIterator, Callable
from typing import Any

import asyncpg
import pytest

import safepool
from tests._util import backends_after_the_loop

HOOK_WARNING = "was scheduled after loop.shutdown_asyncgens"

LOOPS = ["asyncio", "uvloop"]


def _factory(loop: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    if loop == "uvloop":
        return pytest.importorskip("uvloop").new_event_loop  # type: ignore[no-any-return]
    return None


def _open_in_shutdown_cleanup(
    dsn: str, loop: str, create: Callable[..., Any], *, close: bool, warnings_as_errors: bool = False,
) -> tuple[list[str], list[BaseException], list[Any], str]:
    """An asynchronous generator left suspended when the program's main
    coroutine returns; ``asyncio.Runner``'s ``shutdown_asyncgens()`` closes
    it, and its cleanup opens a pool, uses it, and closes it or leaves it
    open (kept referenced). Returns the hook's warnings, the errors the
    cleanup met, the pools kept and the application name."""
    name = f"sp-s70-{uuid.uuid4().hex[:8]}"
    kept: list[Any] = []
    errors: list[BaseException] = []

    async def resource() -> AsyncIterator[int]:
        try:
            yield 1
        finally:
            try:
                pool = await create(dsn, min_size=1, max_size=1, server_settings={"application_name": name})
                async with pool.acquire() as con:
                    await con.fetchval("SELECT 1")
                if close:
                    await pool.close()
                else:
                    kept.append(pool)
            except Exception as error:
                errors.append(error)

    async def main() -> None:
        gen = resource()
        kept.append(gen)
        await gen.__anext__()

    with warnings.catch_warnings(record=True) as caught:
        if warnings_as_errors:
            warnings.simplefilter("ignore")
            warnings.filterwarnings("error", category=ResourceWarning, message=".*" + HOOK_WARNING)
        else:
            warnings.simplefilter("always")
        with asyncio.Runner(loop_factory=_factory(loop)) as runner:
            runner.run(main())
    hook_warnings = [str(w.message) for w in caught if HOOK_WARNING in str(w.message)]
    return hook_warnings, errors, kept, name


@pytest.mark.parametrize("loop", LOOPS)
def test_asyncpgs_pool_opened_in_a_shutdown_cleanup_is_silent(pg_dsn: str, loop: str) -> None:
    """The baseline the tests below compare with."""
    hook_warnings, errors, _, _ = _open_in_shutdown_cleanup(pg_dsn, loop, asyncpg.create_pool, close=True)
    assert errors == []
    assert hook_warnings == []
    hook_warnings, errors, _, _ = _open_in_shutdown_cleanup(
        pg_dsn, loop, asyncpg.create_pool, close=True, warnings_as_errors=True,
    )
    assert errors == []


@pytest.mark.parametrize("loop", LOOPS)
def test_a_pool_opened_and_closed_in_a_shutdown_cleanup_warns_nothing(pg_dsn: str, loop: str) -> None:
    hook_warnings, errors, _, _ = _open_in_shutdown_cleanup(pg_dsn, loop, safepool.create_pool, close=True)
    assert errors == []
    assert hook_warnings == []


@pytest.mark.parametrize("loop", LOOPS)
def test_a_pool_opens_in_a_shutdown_cleanup_where_warnings_are_errors(pg_dsn: str, loop: str) -> None:
    _, errors, _, _ = _open_in_shutdown_cleanup(
        pg_dsn, loop, safepool.create_pool, close=True, warnings_as_errors=True,
    )
    assert errors == []


@pytest.mark.parametrize(
    "create",
    [
        pytest.param(asyncpg.create_pool, id="asyncpg"),
        pytest.param(safepool.create_pool, id="safepool"),
    ],
)
@pytest.mark.filterwarnings("ignore::ResourceWarning")
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_on_uvloop_a_pool_opened_in_a_shutdown_cleanup_and_left_open_keeps_no_backend(
    pg_dsn: str, create: Callable[..., Any],
) -> None:
    pytest.importorskip("uvloop")
    _, errors, kept, name = _open_in_shutdown_cleanup(pg_dsn, "uvloop", create, close=False)
    try:
        assert errors == []
        assert backends_after_the_loop(pg_dsn, name) == 0
    finally:
        kept.clear()
        gc.collect()
