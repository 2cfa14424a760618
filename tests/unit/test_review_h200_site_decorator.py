"""helper-200: ``@safepool.site(...)`` on a function that is neither a
coroutine function nor an async generator function, but returns what runs
later (safepool/_sites.py, ``site.__call__``'s sync branch): no loop, no
database. It ran without its site (fixed in s64); the pool side is in
tests/integration/test_blast_radius.py."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

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


def test_site_decorates_a_plain_function_returning_a_coroutine() -> None:
    seen: list[str | None] = []

    async def body(value: int) -> int:
        seen.append(current_site())
        return value * 2

    @safepool.site("db")
    def later(value: int) -> object:
        return body(value)

    async def main() -> int:
        result = await later(21)  # type: ignore[misc]
        assert current_site() is None
        return result  # type: ignore[no-any-return]

    assert asyncio.run(main()) == 42
    assert seen == ["db"]


def test_a_plain_function_returning_anything_else_returns_it_as_is() -> None:
    marker = object()

    @safepool.site("db")
    def plain() -> object:
        assert current_site() == "db"
        return marker

    assert plain() is marker


def test_the_wrapped_async_context_manager_keeps_its_attributes_and_its_exit_sees_the_error() -> None:
    exits: list[tuple[object, str | None]] = []

    class Resource:
        label = "resource"

        async def __aenter__(self) -> str:
            return "entered"

        async def __aexit__(self, kind: object, error: object, tb: object) -> bool:
            exits.append((kind, current_site()))
            return True  # swallows the error, as a context manager may

    @safepool.site("db")
    def open_resource() -> Resource:
        return Resource()

    async def main() -> None:
        wrapped = open_resource()
        assert wrapped.label == "resource"
        async with wrapped as value:
            assert value == "entered"
            raise KeyError("swallowed")

    asyncio.run(main())
    assert exits == [(KeyError, "db")]
