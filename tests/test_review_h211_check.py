"""Review h211: ``python -m safepool check`` tried as a new user would, on a
small service's code. Each xfail is a leak the check passes as released."""

from __future__ import annotations

import textwrap

import pytest

from safepool.check import check_source


def found(source: str) -> list[tuple[int, str]]:
    return [(f.line, f.code) for f in check_source(textwrap.dedent(source))]


def test_a_raise_between_the_acquire_and_its_try_is_reported() -> None:
    # What holds: the documented rule ("the first `await`, `return` or
    # `raise` between the acquire and its `try:`").
    source = """
    async def f(pool):
        con = await pool.acquire()
        if con.get_server_pid() <= 0:
            raise RuntimeError("no backend")
        try:
            await con.execute("SELECT 1")
        finally:
            await pool.release(con)
    """
    assert [code for _, code in found(source)] == ["SP001"]


@pytest.mark.xfail(
    strict=True,
    reason=(
        "safepool/check.py:680-682: _LEAVING (what can raise or leave between the acquire and its try:, or in "
        "the finally: before the release) has ast.Raise but not ast.Assert: an `assert` that fails there raises "
        "AssertionError with the connection held, and the check accepts the function"
    ),
)
def test_an_assert_between_the_acquire_and_its_try_is_reported() -> None:
    source = """
    async def f(pool):
        con = await pool.acquire()
        assert con.get_server_pid() > 0
        try:
            await con.execute("SELECT 1")
        finally:
            await pool.release(con)
    """
    assert [code for _, code in found(source)] == ["SP001"]


@pytest.mark.xfail(
    strict=True,
    reason=(
        "safepool/check.py:528-529 (_releases): any `X.release(con)` counts as the release, whatever X is: "
        "a connection of `read_pool` given to `write_pool.release()` is refused (PoolInterfaceError / "
        "asyncpg's InterfaceError, 'not one of this pool's') and never released, but the check passes it; "
        "docs/testing.md's limits do not mention it"
    ),
)
def test_a_release_to_another_pool_is_not_a_release() -> None:
    source = """
    async def copy_row(read_pool, write_pool):
        con = await read_pool.acquire()
        try:
            return await con.fetchrow("SELECT 1")
        finally:
            await write_pool.release(con)
    """
    # Reported at the acquire, whichever code (SP002: never released).
    assert [line for line, _ in found(source)] == [3]


@pytest.mark.xfail(
    strict=True,
    reason=(
        "safepool/check.py:274 (acquire_call returns ast.unparse(func.value); method_receiver at :263 alike): an awaited receiver loses "
        "its parentheses, so the fix: line reads `async with await safepool.create_pool(...).acquire() as "
        "con:` (which awaits the acquire's context, not the pool) and `await await ...release(con)`"
    ),
)
def test_the_fix_line_keeps_an_awaited_receivers_parentheses() -> None:
    source = """
    import safepool


    async def main(dsn):
        con = await (await safepool.create_pool(dsn)).acquire()
        return await con.fetchval("SELECT 1")
    """
    [finding] = check_source(textwrap.dedent(source))
    assert "async with (await safepool.create_pool(dsn)).acquire() as con:" in finding.hint


@pytest.mark.xfail(
    strict=True,
    reason=(
        "safepool/check.py:1280 (unreleased_exit; message at :979-981): a retry loop that `break`s once an acquire succeeds, "
        "with the `try:`/`finally:` that releases right after the loop, is reported SP001 'the `break` at line "
        "N skips the release': the break leads straight to that `try:`. The same retry written inside the "
        "`try:` (tests/check_fixtures/clean.py:345 retry_loop_inside_try) is accepted"
    ),
)
@pytest.mark.parametrize("source", [
    pytest.param("""
    import asyncio
    import safepool


    async def f(pool):
        while True:
            try:
                con = await pool.acquire(timeout=1)
                break
            except safepool.PoolTimeoutError:
                await asyncio.sleep(1)
        try:
            return await con.fetchval("SELECT 1")
        finally:
            await pool.release(con)
    """, id="break-in-the-try"),
    pytest.param("""
    import asyncio
    import safepool


    async def f(pool):
        for _ in range(3):
            try:
                con = await pool.acquire(timeout=1)
            except safepool.PoolTimeoutError:
                await asyncio.sleep(1)
            else:
                break
        else:
            raise RuntimeError("no connection")
        try:
            return await con.fetchval("SELECT 1")
        finally:
            await pool.release(con)
    """, id="break-in-the-else"),
])
def test_a_retry_loop_followed_by_the_releasing_try_is_not_reported(source: str) -> None:
    assert found(source) == []
