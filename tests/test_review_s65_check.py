"""The static check on an acquire context chosen by a conditional expression
(`ctx = pool.acquire() if x else replica_pool.acquire()`): left open in s64's
note, followed from s65 as the awaited form (`await (a.acquire() if x else
b.acquire())`) already was. Each branch's acquire is reported on its own."""

from __future__ import annotations

import textwrap

import pytest

from safepool.check import check_source


def _codes(source: str) -> list[tuple[int, int, str]]:
    return [(f.line, f.col, f.code) for f in check_source(textwrap.dedent(source))]


@pytest.mark.parametrize(("source", "expected"), [
    pytest.param("""
        pool = None; other_pool = None
        async def f(x):
            ctx = pool.acquire() if x else other_pool.acquire()
            con = await ctx
            return 1
    """, [(4, 11, "SP002"), (4, 36, "SP002")], id="context-awaited-and-never-released"),
    pytest.param("""
        pool = None; other_pool = None
        async def f(x):
            ctx = pool.acquire() if x else other_pool.acquire()
            async with ctx as con:
                return await con.fetchval("SELECT 1")
    """, [], id="context-entered"),
    pytest.param("""
        pool = None; other_pool = None
        async def f(x):
            ctx = pool.acquire() if x else other_pool.acquire()
            con = await ctx
            try:
                return await con.fetchval("SELECT 1")
            finally:
                await (pool if x else other_pool).release(con)
    """, [], id="context-awaited-and-released-in-finally"),
    pytest.param("""
        pool = None; other_pool = None
        async def f(x):
            ctx = pool.acquire() if x else other_pool.acquire()
            return 1
    """, [(4, 11, "SP004"), (4, 36, "SP004")], id="context-never-used"),
    pytest.param("""
        pool = None; other_pool = None
        def f(x):
            ctx = pool.acquire() if x else other_pool.acquire()
            return ctx
    """, [], id="context-returned"),
    pytest.param("""
        pool = None; other_pool = None
        def f(x):
            pool.acquire() if x else other_pool.acquire()
    """, [(4, 5, "SP004"), (4, 30, "SP004")], id="statement-acquires-nothing"),
    pytest.param("""
        pool = None; other_pool = None
        def f(x):
            return pool.acquire() if x else other_pool.acquire()
    """, [], id="returned-directly"),
    pytest.param("""
        pool = None; other_pool = None
        async def f(x):
            async with (pool.acquire() if x else other_pool.acquire()) as con:
                return 1
    """, [], id="entered-directly"),
])
def test_check_follows_a_context_chosen_by_a_conditional(source: str, expected: list[tuple[int, int, str]]) -> None:
    assert _codes(source) == expected
