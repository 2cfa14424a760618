"""helper-200: ``@safepool.site(...)`` on a function that is neither a
coroutine function nor an async generator function, but returns what runs
later (safepool/_sites.py, ``site.__call__``'s sync branch): no loop, no
database."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest

import safepool
from safepool._sites import current_site


@pytest.mark.xfail(
    strict=True,
    reason=(
        "site.__call__ wraps a function made by @contextlib.asynccontextmanager as a sync "
        "function: the site is reset when the call returns the context manager, before its "
        "__aenter__ runs the generator, so the acquire inside it gets the caller's site "
        "(the same defect test_sites.py fixed for a bare async generator function)"
    ),
)
def test_site_decorates_an_asynccontextmanager_function() -> None:
    """The FastAPI-style dependency of docs/backpressure.md written as an
    async context manager (``@safepool.site("db")`` stacked on
    ``@contextlib.asynccontextmanager``): its ``async with
    pool.acquire()`` runs in ``__aenter__``, after the decorated call
    returned."""
    seen: list[str | None] = []

    @safepool.site("db")
    @contextlib.asynccontextmanager
    async def connection() -> AsyncIterator[None]:
        seen.append(current_site())  # where `async with pool.acquire()` would run
        yield
        seen.append(current_site())

    async def main() -> None:
        async with connection():
            assert current_site() is None  # the body is the caller's
        assert current_site() is None

    asyncio.run(main())
    assert seen == ["db", "db"]
