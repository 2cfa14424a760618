"""Review h266: 827cb0a reads an error's text through ``error_text`` in
``describe_error`` and ``refusal``, but ``_internals.is_busy``
(``safepool/_internals.py:206``: ``"another operation" in str(error)``)
still calls ``str()`` on any ``asyncpg.InterfaceError``.

A ``reset=`` hook raising an ``InterfaceError`` (asyncpg's class, or a
subclass of a library's) whose ``__str__`` raises: ``Runner.reset_done``
moves the slot to ``closing`` (``state.reset_done``) and then asks
``holder.busy_elsewhere = ... _pg.is_busy(error)``
(``safepool/_runner.py:583``), which raises before the ``Close`` is run
and the releasing task's future settled: the reset's pool task dies
("Task exception was never retrieved"), ``release()`` hangs and the slot
reads ``closing`` for good (``resets_failed=1, closing=1``), as review
h262's ``Unprintable`` did before 827cb0a. (``_runner.py:503`` asks it too,
for a release whose proxy is passed.) asyncpg's pool raises the hook's
error from ``release()`` and closes the connection.
"""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import pytest

import safepool
from tests._util import skip_before_asyncpg

pytestmark = pytest.mark.asyncio


class UnprintableInterfaceError(asyncpg.InterfaceError):
    """A driver-level error whose message needs what it was not given."""

    def __str__(self) -> str:
        raise IndexError("tuple index out of range")


async def _reset(con: Any) -> None:
    raise UnprintableInterfaceError("x")


async def _release_outcome(pool: Any) -> tuple[bool, BaseException | None]:
    con = await pool.acquire()
    await con.execute("SELECT 1")
    release = asyncio.ensure_future(pool.release(con))
    done, _ = await asyncio.wait([release], timeout=5.0)
    if not done:
        release.cancel()
        return False, None
    return True, release.exception()


async def test_control_asyncpg_raises_the_hooks_error_from_release(pg_dsn: str) -> None:
    skip_before_asyncpg((0, 30), "create_pool(reset=)")
    pool = await asyncpg.create_pool(pg_dsn, min_size=1, max_size=1, reset=_reset)
    try:
        finished, error = await _release_outcome(pool)
        assert finished and isinstance(error, UnprintableInterfaceError)
    finally:
        pool.terminate()


async def test_safepool_raises_the_hooks_error_from_release(pg_dsn: str, app_name: str) -> None:
    pool = await safepool.create_pool(
        pg_dsn, min_size=1, max_size=1, reset=_reset, server_settings={"application_name": app_name}
    )
    loop = asyncio.get_running_loop()
    seen: list[Any] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: seen.append(context))
    try:
        finished, error = await _release_outcome(pool)
        assert finished, f"release() still running after 5 s: {pool.stats()}"
        assert isinstance(error, UnprintableInterfaceError)
        stats = pool.stats()
        assert (stats.resetting, stats.closing) == (0, 0), stats
    finally:
        loop.set_exception_handler(previous)
        pool.terminate()
