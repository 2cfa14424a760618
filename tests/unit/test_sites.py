"""Acquire-site naming (safepool/_sites.py): no loop, no database."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
from collections.abc import AsyncIterator, Iterator

import pytest

import safepool
from safepool._sites import caller_site, current_site


def named_here() -> str:
    return caller_site(1)


class Handlers:
    def method(self) -> str:
        return caller_site(1)


def test_the_caller_is_named_by_module_and_qualified_name() -> None:
    assert named_here() == f"{__name__}.named_here"
    assert Handlers().method() == f"{__name__}.Handlers.method"

    def inner() -> str:
        return caller_site(1)

    assert inner() == f"{__name__}.test_the_caller_is_named_by_module_and_qualified_name.<locals>.inner"


def test_contextlib_frames_are_walked_past() -> None:
    @contextlib.contextmanager
    def helper() -> Iterator[str]:
        yield caller_site(1)

    with helper() as name:
        # The helper is application code: it is the site, not contextlib.
        assert name.endswith("<locals>.helper")


def test_site_context_manager_nests_and_restores() -> None:
    assert current_site() is None
    with safepool.site("outer"):
        assert current_site() == "outer"
        with safepool.site("inner"):
            assert current_site() == "inner"
        assert current_site() == "outer"
    assert current_site() is None


def test_site_decorates_sync_and_async_functions() -> None:
    @safepool.site("sync")
    def sync() -> str | None:
        return current_site()

    @safepool.site("async")
    async def run() -> str | None:
        # Tasks started here inherit the site (contextvars are copied).
        return await asyncio.create_task(_read())

    async def _read() -> str | None:
        return current_site()

    assert sync() == "sync" and current_site() is None
    assert asyncio.run(run()) == "async"
    assert sync.__name__ == "sync"


def test_site_names_must_be_non_empty_strings() -> None:
    for bad in (None, 3, b"checkout"):
        with pytest.raises(safepool.PoolTypeError, match="non-empty string"):
            safepool.site(bad)  # type: ignore[arg-type]
    # A str of the wrong value is a ValueError, not a TypeError.
    with pytest.raises(safepool.PoolValueError, match="a site name must be a non-empty string, got ''") as caught:
        safepool.site("")
    assert not isinstance(caught.value, TypeError)


def test_one_site_object_shared_by_concurrent_tasks() -> None:
    """A site made once (``REPORTS = safepool.site("reports")`` at module
    level) and entered by concurrent requests: each task's exit restores its
    own context. The object kept one stack of tokens for every task, so the
    task that left first popped the other's token, and both raised
    ``ValueError: <Token ...> was created in a different Context``."""
    reports = safepool.site("reports")

    async def handler(entered: asyncio.Event, leave: asyncio.Event) -> tuple[str | None, str | None]:
        with reports:
            entered.set()
            await leave.wait()
            inside = current_site()
        return inside, current_site()

    async def main() -> list[tuple[str | None, str | None]]:
        first_in, second_in = asyncio.Event(), asyncio.Event()
        first_out, second_out = asyncio.Event(), asyncio.Event()
        first = asyncio.create_task(handler(first_in, first_out))
        await first_in.wait()
        second = asyncio.create_task(handler(second_in, second_out))
        await second_in.wait()
        first_out.set()  # the first in leaves first: not the reverse order of entry
        one = await first
        second_out.set()
        return [one, await second]

    assert asyncio.run(main()) == [("reports", None), ("reports", None)]
    with reports, reports:  # and nested in one task, as before
        assert current_site() == "reports"
    assert current_site() is None


def test_site_decorates_an_async_generator_function() -> None:
    """``@safepool.site("db")`` on an async generator (a FastAPI dependency
    that yields a connection): it was wrapped as a sync function, so
    ``inspect.isasyncgenfunction`` said False, and the site was reset before
    the generator's first step (under FastAPI the dependency's acquire got
    the function's own site, the name ignored). Now the site holds during
    each step, not in the consumer between steps, and sends, throws and
    closes reach the generator."""
    log: list[object] = []

    @safepool.site("db")
    async def dependency() -> AsyncIterator[str | None]:
        try:
            sent = yield current_site()
            log.append(("sent", sent, current_site()))
            try:
                yield current_site()
            except KeyError as exc:
                log.append(("caught", exc.args[0], current_site()))
                yield "recovered"
            yield "more"
        finally:
            log.append(("closed", current_site()))

    assert inspect.isasyncgenfunction(dependency) and dependency.__name__ == "dependency"

    async def main() -> None:
        steps = dependency()
        assert await steps.__anext__() == "db"
        assert current_site() is None  # between steps: the consumer's own
        assert await steps.asend("hello") == "db"
        assert await steps.athrow(KeyError("k")) == "recovered"
        await steps.aclose()
        assert current_site() is None
        assert [item async for item in dependency()] == ["db", "db", "more"]
        raised = dependency()
        await raised.__anext__()
        with pytest.raises(ValueError, match="not caught"):
            await raised.athrow(ValueError("not caught"))

    asyncio.run(main())
    assert log == [
        ("sent", "hello", "db"), ("caught", "k", "db"), ("closed", "db"),
        ("sent", None, "db"), ("closed", "db"),
        ("closed", "db"),
    ]


def test_async_with_names_the_site_as_with_does() -> None:
    """``async with safepool.site(...)`` (a newcomer's guess, review h218):
    the same as ``with``, nested, shared by concurrent tasks, and restored
    when the block raises."""
    shared = safepool.site("shared")

    async def handler(entered: asyncio.Event, leave: asyncio.Event) -> tuple[str | None, str | None]:
        async with shared:
            entered.set()
            await leave.wait()
            inside = current_site()
        return inside, current_site()

    async def main() -> list[tuple[str | None, str | None]]:
        async with safepool.site("outer") as outer:
            assert outer.name == "outer" and current_site() == "outer"
            with pytest.raises(KeyError):
                async with safepool.site("inner"):
                    assert current_site() == "inner"
                    raise KeyError("x")
            assert current_site() == "outer"
        assert current_site() is None
        first_in, second_in, first_out, second_out = (asyncio.Event() for _ in range(4))
        first = asyncio.create_task(handler(first_in, first_out))
        await first_in.wait()
        second = asyncio.create_task(handler(second_in, second_out))
        await second_in.wait()
        first_out.set()
        one = await first
        second_out.set()
        return [one, await second]

    assert asyncio.run(main()) == [("shared", None), ("shared", None)]
