"""Review h280: releases whose reset is in flight when ``asyncio.run()``
(``asyncio.Runner.close()``) shuts the loop down.

The runner cancels every task left, the releasing ones among them, and
waits for those it cancelled. A cancelled release hands its reset to a
pool task (``_detach._Driver.cancel`` -> ``hand_over`` -> ``Runner.spawn``),
created while the runner cancels: the runner never cancels nor waits for
it, and the loop closes with it pending, as asyncpg's shielded reset task
does. When it was garbage collected, ``_Resume.__await__`` caught the
``GeneratorExit`` of the coroutine's close like any error and threw it
into the reset's statement: the reset "failed" (logged), and the pool ran
its close on the closed loop, whose error went to the loop's exception
handler ("Close raised (the pool goes on)"), once per connection. asyncpg's
pool, run the same way, only has the loop report a task destroyed while
pending. Fixed: ``_Resume`` closes the statement and ends, as ``yield
from`` does.
"""

from __future__ import annotations

import asyncio
import gc
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import pytest

import safepool
from tests._util import backends_after_the_loop


class _SlowReset(asyncpg.Connection):  # type: ignore[misc]
    """A reset that takes 0.3 s of server time: in flight when the loop shuts down."""

    def get_reset_query(self) -> str:
        return "SELECT pg_sleep(0.3); " + super().get_reset_query()

    def _get_reset_query(self) -> str:  # asyncpg < 0.30
        return "SELECT pg_sleep(0.3); " + super()._get_reset_query()  # type: ignore[misc]


def _shutdown_with_releases_in_flight(pg_dsn: str, create_pool: Callable[..., Awaitable[Any]]) -> tuple[int, list[str]]:
    """(backends left a second after the loop closed, the messages the
    loop's exception handler got other than "Task was destroyed but it is
    pending!")."""
    name = f"h280-{uuid.uuid4().hex[:8]}"
    messages: list[str] = []

    async def main() -> None:
        pool = await create_pool(
            pg_dsn, min_size=2, max_size=2, connection_class=_SlowReset,
            server_settings={"application_name": name},
        )
        leases = [await pool.acquire() for _ in range(2)]
        for con in leases:
            await con.fetchval("SELECT 1")  # the release resets
        for con in leases:
            asyncio.ensure_future(pool.release(con))
        await asyncio.sleep(0.05)  # the resets run on the server; main returns, the runner shuts down

    with asyncio.Runner() as runner:
        runner.get_loop().set_exception_handler(lambda _loop, context: messages.append(str(context.get("message"))))
        runner.run(main())
    gc.collect()
    left = backends_after_the_loop(pg_dsn, name)
    return left, [m for m in messages if m != "Task was destroyed but it is pending!"]


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_releases_in_flight_at_loop_shutdown_report_what_asyncpg_reports(pg_dsn: str) -> None:
    outcomes = {
        flavour: _shutdown_with_releases_in_flight(pg_dsn, factory)
        for flavour, factory in (("asyncpg", asyncpg.create_pool), ("safepool", safepool.create_pool))
    }
    assert outcomes["asyncpg"] == (0, [])
    assert outcomes["safepool"] == outcomes["asyncpg"]
