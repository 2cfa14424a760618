"""Helper 203 (a newcomer's trial of ``python -m safepool check``): a
release made through a name bound to the pool's ``release`` is not seen,
though an acquire through a name bound to the pool's ``acquire`` is
followed (docs/testing.md, "Limits of the static check", lists the acquire
aliases as followed and says nothing of release aliases). Fixed in s65:
a name or attribute bound to a pool's ``release`` (or a ``partial`` of it),
``partial(pool.release, con)()`` and ``getattr(pool, "release")(con)``
release."""

from __future__ import annotations

import textwrap

import pytest

from safepool.check import check_source


def found(source: str) -> list[tuple[int, str]]:
    return [(f.line, f.code) for f in check_source(textwrap.dedent(source))]


def test_an_acquire_alias_is_followed() -> None:
    # What holds: the acquire side of the symmetry.
    source = """
    async def f(pool):
        acq = pool.acquire
        con = await acq()
        await con.execute("SELECT 1")
    """
    assert found(source) == [(4, "SP002")]


def test_a_release_alias_in_finally_is_a_release() -> None:
    source = """
    async def f(pool):
        con = await pool.acquire()
        try:
            await con.execute("SELECT 1")
        finally:
            release = pool.release
            await release(con)
    """
    assert found(source) == []


def test_a_partial_of_release_called_in_finally_is_a_release() -> None:
    source = """
    import functools


    async def f(pool):
        con = await pool.acquire()
        try:
            await con.execute("SELECT 1")
        finally:
            await functools.partial(pool.release, con)()
    """
    assert found(source) == []



@pytest.mark.parametrize(("source", "expected"), [
    pytest.param("""
    async def f(pool):
        con = await pool.acquire()
        try:
            await con.execute("SELECT 1")
        finally:
            await getattr(pool, "release")(con)
    """, [], id="getattr-release"),
    pytest.param("""
    class Repo:
        def __init__(self, pool):
            self._release = pool.release

        async def get(self, pool):
            con = await pool.acquire()
            try:
                return await con.fetchval("SELECT 1")
            finally:
                await self._release(con)
    """, [], id="attribute-alias"),
    pytest.param("""
    import functools

    async def f(pool):
        give_back = functools.partial(pool.release, timeout=5)
        con = await pool.acquire()
        try:
            await con.execute("SELECT 1")
        finally:
            await give_back(con)
    """, [], id="partial-alias-with-a-timeout"),
    pytest.param("""
    async def f(pool):
        release = pool.release
        con = await pool.acquire()
        await con.execute("SELECT 1")
        await release(con)
    """, [(4, "SP001")], id="alias-release-not-in-finally-is-still-sp001"),
    pytest.param("""
    async def f(pool, other):
        release = pool.release
        con = await pool.acquire()
        try:
            await con.execute("SELECT 1")
        finally:
            await release(other)
    """, [(4, "SP002")], id="alias-release-of-another-connection"),
    pytest.param("""
    async def f(pool, log):
        release = log.info
        con = await pool.acquire()
        try:
            await con.execute("SELECT 1")
        finally:
            release(con)
    """, [(4, "SP002")], id="a-name-not-bound-to-a-pools-release"),
])
def test_release_aliases(source: str, expected: list[tuple[int, str]]) -> None:
    assert found(source) == expected
