"""Helper 203 (a newcomer's trial of ``python -m safepool check``): a
release made through a name bound to the pool's ``release`` is not seen,
though an acquire through a name bound to the pool's ``acquire`` is
followed (docs/testing.md, "Limits of the static check", lists the acquire
aliases as followed and says nothing of release aliases)."""

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


@pytest.mark.xfail(
    strict=True,
    reason="check.py _releases() only recognizes `X.release(con)` calls: `release = pool.release; "
    "await release(con)` in a finally is reported SP002 'never released' (a false positive), though "
    "`acq = pool.acquire` is followed as an acquire",
)
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


@pytest.mark.xfail(
    strict=True,
    reason="check.py _releases(): `functools.partial(pool.release, con)` called in a finally is not "
    "seen as a release (SP002, a false positive), though `stack.push_async_callback(pool.release, con)` "
    "is",
)
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
