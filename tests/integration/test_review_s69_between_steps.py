"""Review s69: a release made while another task's fetch-family call is
between two of its steps (its prepare answered, its bind not sent yet: the
protocol idle, asyncpg's statement section held). asyncpg's release resets
in a shielded task whose first step comes after the call's, so the call
sends its bind first and gets its own result; safepool sent the reset
inline, in the release's step, and the call's bind then failed with
asyncpg's "another operation is in progress" (seen once in CI, in
tests/faults/test_review_s59_soak2.py under load). Run on both pools."""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import pytest

import safepool

pytestmark = pytest.mark.asyncio


class Gate:
    """Holds a call between its prepare and its bind (asyncpg's
    ``Connection._get_statement``, patched on the class: a connection class
    of the test's own would make safepool reset in a pool task anyway)
    while armed: the window, made wide."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.armed = False
        self.prepared = asyncio.Event()
        self.opened = asyncio.Event()
        original = asyncpg.Connection._get_statement
        gate = self

        async def _get_statement(self: asyncpg.Connection, *args: Any, **kwargs: Any) -> Any:
            statement = await original(self, *args, **kwargs)
            if gate.armed:
                gate.armed = False
                gate.prepared.set()
                await gate.opened.wait()
            return statement

        monkeypatch.setattr(asyncpg.Connection, "_get_statement", _get_statement)


async def _release_as_the_call_resumes(
    factory: Any, dsn: str, call: str, monkeypatch: pytest.MonkeyPatch
) -> tuple[str, str, int]:
    """The call's outcome, the release's, and a new lease's SELECT 1."""
    pool = await factory(dsn, min_size=1, max_size=1)
    try:
        con = await pool.acquire()
        gate = Gate(monkeypatch)
        gate.armed = True
        statement = {
            "fetchval": lambda: con.fetchval("SELECT $1::int + 1", 41),
            "fetch": lambda: con.fetch("SELECT $1::int + 1 AS n", 41),
            "execute": lambda: con.execute("SELECT $1::int", 41),
        }[call]
        running = asyncio.create_task(statement())
        await asyncio.wait_for(gate.prepared.wait(), 5)
        # The call's wake-up is queued first, then the release runs: the
        # natural window (prepare answered, the call's next step queued).
        gate.opened.set()
        released: BaseException | None = None
        try:
            async with asyncio.timeout(5):
                await pool.release(con)  # (in this step, not a task of wait_for's own)
        except Exception as exc:
            released = exc
        outcome = (await asyncio.gather(running, return_exceptions=True))[0]
        async with pool.acquire(timeout=5) as again:
            value = await again.fetchval("SELECT 1")
        shown = type(outcome).__name__ if isinstance(outcome, BaseException) else repr(
            [tuple(r) for r in outcome] if isinstance(outcome, list) else outcome
        )
        return shown, type(released).__name__ if released is not None else "ok", value
    finally:
        await asyncio.wait_for(pool.close(), 10)


@pytest.mark.parametrize("call", ["fetchval", "fetch", "execute"])
async def test_a_release_as_a_call_resumes_between_its_steps_leaves_the_call_its_result(
    pg_dsn: str, call: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    on_asyncpg = await _release_as_the_call_resumes(asyncpg.create_pool, pg_dsn, call, monkeypatch)
    on_safepool = await _release_as_the_call_resumes(safepool.create_pool, pg_dsn, call, monkeypatch)
    print({"asyncpg": on_asyncpg, "safepool": on_safepool})
    # The call's own result on safepool (the reset refused, the connection
    # given up once the call ended); asyncpg's pool terminates it under the
    # call (ConnectionDoesNotExistError), an outcome the s59 test allows.
    assert on_safepool[0] in ("42", "[(42,)]", "'SELECT 1'"), on_safepool
    assert on_asyncpg[0] in (on_safepool[0], "ConnectionDoesNotExistError"), on_asyncpg
    # The release raises alike (the reset refused: another operation in
    # progress), and the pool serves on.
    assert on_safepool[1] == on_asyncpg[1]
    assert on_safepool[2] == on_asyncpg[2] == 1
