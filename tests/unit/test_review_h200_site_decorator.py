"""helper-200: ``@safepool.site(...)`` on a function that is neither a
coroutine function nor an async generator function, but returns what runs
later (safepool/_sites.py, ``site.__call__``'s sync branch): no loop, no
database. It ran without its site (fixed in s64); the pool side is in
tests/integration/test_blast_radius.py."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest

import safepool
from safepool._sites import current_site


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


def test_a_plain_function_returning_a_coroutine_returns_it_as_is() -> None:
    # Not wrapped (a wrapper coroutine changed its name and warned "never
    # awaited" when closed unstarted): the site covers the call only. An
    # acquire in the coroutine gets its site from an `async def` decorated.
    seen: list[str | None] = []

    async def body(value: int) -> int:
        seen.append(current_site())
        return value * 2

    made: list[object] = []

    @safepool.site("db")
    def later(value: int) -> object:
        made.append(coroutine := body(value))
        return coroutine

    async def main() -> int:
        coroutine = later(21)
        assert coroutine is made[0]
        return await coroutine  # type: ignore[no-any-return, misc]

    assert asyncio.run(main()) == 42
    assert seen == [None]


def test_a_plain_function_returning_anything_else_returns_it_as_is() -> None:
    marker = object()

    @safepool.site("db")
    def plain() -> object:
        assert current_site() == "db"
        return marker

    assert plain() is marker


def test_the_asynccontextmanager_object_keeps_its_identity_class_and_error_handling() -> None:
    exits: list[tuple[str, str | None]] = []

    @safepool.site("db")
    @contextlib.asynccontextmanager
    async def suppressing() -> AsyncIterator[str]:
        try:
            yield "entered"
        except KeyError:
            exits.append(("suppressed", current_site()))

    @safepool.site("db")
    @contextlib.asynccontextmanager
    async def passing() -> AsyncIterator[None]:
        try:
            yield
        finally:
            exits.append(("finally", current_site()))

    async def main() -> None:
        manager = suppressing()
        assert isinstance(manager, contextlib.AbstractAsyncContextManager)
        assert type(manager).__mro__[1] is type(contextlib.asynccontextmanager(passing.__wrapped__)())  # type: ignore[attr-defined]
        async with manager as value:
            assert value == "entered" and current_site() is None
            raise KeyError("swallowed")
        error = ValueError("mine")
        with pytest.raises(ValueError) as raised:
            async with passing():
                raise error
        assert raised.value is error

    asyncio.run(main())
    assert exits == [("suppressed", "db"), ("finally", "db")]


def test_the_asynccontextmanager_object_used_as_a_decorator_holds_the_site_each_call() -> None:
    seen: list[str | None] = []

    @safepool.site("db")
    @contextlib.asynccontextmanager
    async def scope() -> AsyncIterator[None]:
        seen.append(current_site())
        yield

    @scope()
    async def job() -> None:
        seen.append(current_site())

    async def main() -> None:
        await job()
        await job()

    asyncio.run(main())
    assert seen == ["db", None, "db", None]
