"""A keyword ``create_pool()`` does not know goes to asyncpg's connect, which
raises ``TypeError`` at the first connect, on both pools alike (at
``create_pool()`` with ``min_size`` > 0, at the first acquire with 0).
safepool's keeps asyncpg's class and message and adds the option the name
is closest to (the fresh-clone trial h278 misspelt ``lease_timeout``)."""

from __future__ import annotations

from typing import Any

import asyncpg
import pytest

import safepool

# (misspelt keyword, what safepool's message adds, or None for nothing)
CASES = [
    ("lease_timout", "(did you mean lease_timeout=, an option of safepool.create_pool()?)"),
    ("max_sise", "(did you mean max_size=, an option of safepool.create_pool()?)"),
    ("leak_warning_afer", "(did you mean leak_warning_after=, an option of safepool.create_pool()?)"),
    ("comand_timeout", "(did you mean command_timeout=, a keyword of asyncpg.connect()?)"),
    ("statement_cache_sise", "(did you mean statement_cache_size=, a keyword of asyncpg.connect()?)"),
    ("zzzzzz", None),
]


async def _error(factory: Any, dsn: str, min_size: int, keyword: str) -> TypeError:
    """The TypeError a pool with ``keyword=1`` raises: from create_pool()
    (min_size 1) or from the first acquire (min_size 0)."""
    with pytest.raises(TypeError) as raised:
        pool = await factory(dsn, min_size=min_size, max_size=2, **{keyword: 1})
        try:
            async with pool.acquire():
                pass
        finally:
            pool.terminate()
    return raised.value


@pytest.mark.asyncio
@pytest.mark.parametrize("min_size", [0, 1])
@pytest.mark.parametrize(("keyword", "hint"), CASES)
async def test_misspelt_option_names_the_closest(pg_dsn: str, min_size: int, keyword: str, hint: str | None) -> None:
    theirs = await _error(asyncpg.create_pool, pg_dsn, min_size, keyword)
    ours = await _error(safepool.create_pool, pg_dsn, min_size, keyword)
    assert type(ours) is type(theirs) is TypeError
    assert str(theirs) == f"connect() got an unexpected keyword argument '{keyword}'"
    assert str(ours) == (str(theirs) if hint is None else f"{theirs} {hint}")


@pytest.mark.asyncio
async def test_connect_callback_errors_are_left_alone(pg_dsn: str) -> None:
    """A connect= callback's own TypeError is the callback's: not annotated."""

    async def connect(*args: Any, **kwargs: Any) -> Any:
        raise TypeError("helper() got an unexpected keyword argument 'lease_timout'")

    pool = await safepool.create_pool(pg_dsn, min_size=0, max_size=1, connect=connect)
    try:
        with pytest.raises(TypeError) as raised:
            async with pool.acquire():
                pass
        assert str(raised.value) == "helper() got an unexpected keyword argument 'lease_timout'"
    finally:
        pool.terminate()
