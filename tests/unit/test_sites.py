"""Acquire-site naming (safepool/_sites.py): no loop, no database."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator

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
    for bad in ("", None, 3):
        with pytest.raises(TypeError, match="non-empty string"):
            safepool.site(bad)  # type: ignore[arg-type]


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
