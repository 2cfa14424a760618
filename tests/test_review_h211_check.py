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


@pytest.mark.parametrize(("source", "line"), [
    pytest.param("""
    async def f(pool):
        con = await pool.acquire()
        try:
            await con.execute("SELECT 1")
        finally:
            assert con is not None
            await pool.release(con)
    """, 3, id="assert-in-the-finally-before-the-release"),
    pytest.param("""
    async def f(pool, rows):
        con = await pool.acquire()
        names = [r async for r in rows]
        try:
            await con.execute("SELECT 1")
        finally:
            await pool.release(con)
    """, 3, id="async-comprehension-between"),
    pytest.param("""
    async def rows(pool):
        con = await pool.acquire()
        yield 1
        try:
            await con.execute("SELECT 1")
        finally:
            await pool.release(con)
    """, 3, id="yield-between"),
])
def test_what_raises_or_suspends_between_the_acquire_and_the_release_is_reported(source: str, line: int) -> None:
    # Siblings of the assert: what leaves or suspends (`assert`, an `async
    # for` in a comprehension, a `yield`) before the `try:`, or in the
    # `finally:` before the release.
    assert found(source) == [(line, "SP001")]


@pytest.mark.parametrize("source", [
    pytest.param("""
    async def f(pool, x):
        assert x
        con = await pool.acquire()
        try:
            await con.execute("SELECT 1")
        finally:
            await pool.release(con)
    """, id="assert-before-the-acquire"),
    pytest.param("""
    async def f(pool):
        con = await pool.acquire()
        try:
            assert con.get_server_pid() > 0
        finally:
            await pool.release(con)
    """, id="assert-inside-the-try"),
])
def test_an_assert_where_the_connection_is_safe_is_not_reported(source: str) -> None:
    assert found(source) == []


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


def test_a_release_to_another_pool_says_which_pool_refuses_it() -> None:
    [finding] = check_source(textwrap.dedent("""
    async def copy_row(read_pool, write_pool):
        con = await read_pool.acquire()
        try:
            return await con.fetchrow("SELECT 1")
        finally:
            await write_pool.release(con)
    """))
    assert finding.code == "SP002"
    assert "`write_pool.release(con)` at line 7 gives it to another pool" in finding.message
    assert "`await read_pool.release(con)`" in finding.hint


@pytest.mark.parametrize("source", [
    pytest.param("""
    class Repo:
        async def f(self):
            con = await self.pools["primary"].acquire()
            try:
                return await con.fetchrow("SELECT 1")
            finally:
                await self.pools["replica"].release(con)
    """, id="items-of-pools"),
    pytest.param("""
    import contextlib


    async def f(read_pool, write_pool):
        async with contextlib.AsyncExitStack() as stack:
            con = await read_pool.acquire()
            stack.push_async_callback(write_pool.release, con)
            return await con.fetchrow("SELECT 1")
    """, id="exit-stack-callback"),
    pytest.param("""
    import functools


    async def f(read_pool, write_pool):
        con = await read_pool.acquire()
        try:
            return await con.fetchrow("SELECT 1")
        finally:
            await functools.partial(write_pool.release, con)()
    """, id="partial"),
    pytest.param("""
    async def f(read_pool, write_pool):
        await write_pool.release(con := await read_pool.acquire())
    """, id="acquired-inside-the-release"),
])
def test_other_releases_to_another_pool_are_not_releases(source: str) -> None:
    assert [code for _, code in found(source)] == ["SP002"]


@pytest.mark.parametrize("source", [
    pytest.param("""
    async def f(self):
        db = self._pool
        con = await db.acquire()
        try:
            return await con.fetchrow("SELECT 1")
        finally:
            await self._pool.release(con)
    """, id="an-alias-of-the-pool"),
    pytest.param("""
    class Repo:
        async def f(self):
            con = await self.pool.acquire()
            try:
                return await con.fetchrow("SELECT 1")
            finally:
                await self._pool.release(con)
    """, id="a-leading-underscore"),
    pytest.param("""
    async def f(request, app):
        con = await request.app["pool"].acquire()
        try:
            return await con.fetchrow("SELECT 1")
        finally:
            await app["pool"].release(con)
    """, id="same-last-name"),
    pytest.param("""
    async def f(primary_pool, replica_pool, read_only):
        pool = replica_pool if read_only else primary_pool
        con = await pool.acquire()
        try:
            return await con.fetchrow("SELECT 1")
        finally:
            await replica_pool.release(con)
    """, id="either-pool-of-a-conditional"),
    pytest.param("""
    async def f(pool):
        con = await get_pool().acquire()
        try:
            return await con.fetchrow("SELECT 1")
        finally:
            await pool.release(con)
    """, id="cannot-tell-a-call"),
    pytest.param("""
    async def f(pools, key, pool):
        con = await pools[key].acquire()
        try:
            return await con.fetchrow("SELECT 1")
        finally:
            await pool.release(con)
    """, id="cannot-tell-an-item"),
])
def test_a_release_the_check_cannot_tell_from_the_acquires_pool_counts(source: str) -> None:
    # The rule's other side: a release counts unless both pools are named
    # (a name, an attribute chain, a string item) and their names differ and
    # are not assigned one to the other in the file.
    assert found(source) == []


def test_the_fix_line_keeps_an_awaited_receivers_parentheses() -> None:
    source = """
    import safepool


    async def main(dsn):
        con = await (await safepool.create_pool(dsn)).acquire()
        return await con.fetchval("SELECT 1")
    """
    [finding] = check_source(textwrap.dedent(source))
    # Since review h215: the pool is bound to a name first (a fix line that
    # repeats the receiver would create a second pool), its source unchanged.
    assert "`pool = await safepool.create_pool(dsn)`" in finding.hint
    assert "async with pool.acquire() as con:" in finding.hint


def test_the_fix_line_of_a_bare_acquire_keeps_the_parentheses() -> None:
    [finding] = check_source(textwrap.dedent("""
    import safepool


    async def main(dsn):
        (await safepool.create_pool(dsn)).acquire()
    """))
    assert finding.code == "SP004"
    assert "`(await safepool.create_pool(dsn)).acquire()` is neither awaited" in finding.message
    assert "`pool = await safepool.create_pool(dsn)`" in finding.hint
    assert "`con = await pool.acquire()`" in finding.hint


def test_the_fix_line_of_an_acquire_alias_keeps_the_parentheses() -> None:
    [finding] = check_source(textwrap.dedent("""
    import safepool


    async def main(dsn):
        acquire = (await safepool.create_pool(dsn)).acquire
        con = await acquire()
        return await con.fetchval("SELECT 1")
    """))
    assert "`pool = await safepool.create_pool(dsn)`" in finding.hint
    assert "await pool.release(con)" in finding.hint
    assert "create_pool(dsn)).release(" not in finding.hint


@pytest.mark.parametrize(("expression", "text"), [
    ("self.pool", "self.pool"),
    ("get_pool()", "get_pool()"),
    ("pools['a']", "pools['a']"),
    ("(await create_pool(dsn))", "(await create_pool(dsn))"),
    ("(a_pool or b_pool)", "(a_pool or b_pool)"),
    ("(a_pool if x else b_pool)", "(a_pool if x else b_pool)"),
    ("(lambda: pool)", "(lambda: pool)"),
    ("(pools + spare)", "(pools + spare)"),
])
def test_a_receiver_is_parenthesised_when_its_precedence_needs_it(expression: str, text: str) -> None:
    import ast

    from safepool.check import _receiver_source

    assert _receiver_source(ast.parse(expression, mode="eval").body) == text


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


@pytest.mark.parametrize("source", [
    pytest.param("""
    import asyncio
    import safepool


    async def f(pool):
        con = None
        while con is None:
            try:
                con = await pool.acquire(timeout=1)
            except safepool.PoolTimeoutError:
                await asyncio.sleep(1)
        try:
            return await con.fetchval("SELECT 1")
        finally:
            await pool.release(con)
    """, id="while-con-is-none"),
    pytest.param("""
    import asyncio
    import safepool


    async def f(pool, log):
        while True:
            try:
                con = await pool.acquire(timeout=1)
                break
            except safepool.PoolTimeoutError:
                await asyncio.sleep(1)
            finally:
                log.debug("tried")
        try:
            return await con.fetchval("SELECT 1")
        finally:
            await pool.release(con)
    """, id="a-finally-that-cannot-leave"),
])
def test_other_retry_loops_followed_by_the_releasing_try_are_not_reported(source: str) -> None:
    assert found(source) == []


@pytest.mark.parametrize(("source", "expected"), [
    pytest.param("""
    import asyncio
    import safepool


    async def f(pool, log):
        while True:
            try:
                con = await pool.acquire(timeout=1)
                await log("got one")
                break
            except safepool.PoolTimeoutError:
                await asyncio.sleep(1)
        try:
            return await con.fetchval("SELECT 1")
        finally:
            await pool.release(con)
    """, "line 10 between", id="an-await-before-the-break"),
    pytest.param("""
    import asyncio
    import safepool


    async def f(pool, log):
        while True:
            try:
                con = await pool.acquire(timeout=1)
                break
            except safepool.PoolTimeoutError:
                await asyncio.sleep(1)
        await log("got one")
        try:
            return await con.fetchval("SELECT 1")
        finally:
            await pool.release(con)
    """, "line 13 between", id="an-await-after-the-loop"),
    pytest.param("""
    import asyncio
    import safepool


    async def f(pool, log):
        while True:
            try:
                con = await pool.acquire(timeout=1)
                break
            except safepool.PoolTimeoutError:
                await asyncio.sleep(1)
            finally:
                await log("tried")
        try:
            return await con.fetchval("SELECT 1")
        finally:
            await pool.release(con)
    """, "line 14 between", id="an-await-in-the-finally-the-break-goes-through"),
    pytest.param("""
    import asyncio
    import safepool


    async def f(pool):
        for _ in range(3):
            try:
                con = await pool.acquire(timeout=1)
            except safepool.PoolTimeoutError:
                await asyncio.sleep(1)
        try:
            return await con.fetchval("SELECT 1")
        finally:
            await pool.release(con)
    """, "not released on every path", id="no-break-the-loop-turns-holding-it"),
    pytest.param("""
    async def f(pool, tries):
        con = None
        while tries:
            con = await pool.acquire(timeout=1)
            tries -= 1
        try:
            return await con.fetchval("SELECT 1")
        finally:
            await pool.release(con)
    """, "not released on every path", id="a-while-that-does-not-test-the-connection"),
])
def test_a_retry_loop_that_can_leave_or_turn_holding_the_connection_is_reported(source: str, expected: str) -> None:
    [finding] = check_source(textwrap.dedent(source))
    assert finding.code == "SP001"
    assert expected in finding.message
