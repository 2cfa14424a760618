"""Review s64: mutation review of safepool/_sites.py. Mutants that survived
the existing tests, killed here.

The pool calls ``caller_site(2)`` from ``acquire()`` with the depth that
lands on the application's own frame, so the existing tests never had the
walk pass a library frame: which modules count as libraries, the walk past
them (sync and async), the stop at a task's top, the "unknown" at the
bottom of a stack and the cache's eviction order all went unchecked. Here
library code is compiled with a library's ``__name__`` (``asyncpg.fake``),
as asyncpg's own frames have it. No server, no event loop but
``asyncio.run``.
"""

from __future__ import annotations

import _thread
import asyncio
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import safepool
from safepool import _sites
from safepool._sites import caller_site


@pytest.fixture(autouse=True)
def fresh_cache(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(_sites, "_site_of_code", {})
    yield


def library(source: str, name: str, module: str = "asyncpg.fake") -> Callable[..., Any]:
    """A function compiled as if it were in ``module``."""
    namespace: dict[str, Any] = {"__name__": module, "caller_site": caller_site}
    exec(compile(source, f"<{module}>", "exec"), namespace)
    return namespace[name]  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    ("module", "is_library"),
    [
        ("safepool", True), ("safepool.pool", True), ("safepool._leasing", True),
        ("safepool.replay.demo_handler", False),  # (a subpackage: the demo application)
        ("asyncpg", True), ("asyncpg.connection", True), ("asyncio.tasks", True),
        ("contextlib", True), ("functools", True),
        ("myapp", False), ("myapp.asyncpg", False), ("safepoolx.pool", False), ("__main__", False),
    ],
)
def test_which_modules_are_walked_past(module: str, is_library: bool) -> None:
    assert _sites._is_library(module) is is_library


def test_a_sync_library_frame_is_walked_past_to_its_application_caller() -> None:
    helper = library("def helper():\n    return caller_site(1)\n", "helper")

    def handler() -> str:
        return helper()  # type: ignore[no-any-return]

    assert handler() == f"{__name__}.{handler.__qualname__}"
    # Remembered per code object: the library's as "" (walked past), the handler's by name.
    assert _sites._site_of_code[helper.__code__] == ""
    assert _sites._site_of_code[handler.__code__] == f"{__name__}.{handler.__qualname__}"


def test_an_awaited_library_coroutine_is_walked_past_to_the_awaiting_application() -> None:
    """A library coroutine awaited by the application's coroutine: not the
    top of the task (its caller is a coroutine too), so the walk goes on."""
    helper = library("async def helper():\n    return caller_site(1)\n", "helper")

    async def handler() -> str:
        return await helper()  # type: ignore[no-any-return]

    assert asyncio.run(handler()) == f"{__name__}.{handler.__qualname__}"


def test_a_task_whose_own_coroutine_is_a_librarys_is_named_by_it() -> None:
    """``asyncio.gather(pool.fetchval(...))``: the library coroutine is the
    top of its task; beyond it is the event loop, not the acquirer."""
    helper = library("async def helper():\n    return caller_site(1)\n", "helper")

    async def main() -> list[str]:
        return await asyncio.gather(helper())  # type: ignore[no-any-return]

    assert asyncio.run(main()) == ["asyncpg.fake.helper"]


def test_a_stack_of_library_frames_only_is_unknown() -> None:
    """A thread started on a library function (no Python frame below it):
    the walk reaches the bottom of the stack and says so."""
    body = library(
        "def body(found, finished):\n    try:\n        found.append(caller_site(1))\n    finally:\n"
        "        finished.set()\n",
        "body",
    )
    found: list[str] = []
    finished = threading.Event()
    _thread.start_new_thread(body, (found, finished))
    assert finished.wait(30)
    assert found == ["unknown"]


def test_a_library_coroutine_stepped_from_c_with_no_caller_is_unknown(monkeypatch: pytest.MonkeyPatch) -> None:
    """A coroutine frame whose caller is no Python frame (stepped by a
    thread's C entry): the top-of-task check has no caller to look at, and
    the walk ends at "unknown" (it does not fail)."""
    step = library("async def step(found):\n    found.append(caller_site(1))\n", "step")
    found: list[str] = []
    ended: list[type[BaseException] | None] = []
    finished = threading.Event()

    def unraisable(report: Any) -> None:  # (the thread's end: StopIteration, the coroutine's return)
        ended.append(report.exc_type)
        finished.set()

    monkeypatch.setattr(sys, "unraisablehook", unraisable)
    _thread.start_new_thread(step(found).send, (None,))
    assert finished.wait(30)
    assert (found, ended) == (["unknown"], [StopIteration])


def test_the_cache_drops_its_oldest_entry_first(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_sites, "SITE_CACHE_SIZE", 3)
    codes = [compile(f"x = {n}", f"<c{n}>", "exec") for n in range(5)]
    for n, code in enumerate(codes):
        _sites._remember(code, f"site{n}")
    assert _sites._site_of_code == {codes[2]: "site2", codes[3]: "site3", codes[4]: "site4"}


def test_decorating_what_is_not_callable_is_refused_at_once() -> None:
    with pytest.raises(safepool.PoolTypeError, match=r"safepool.site\('jobs'\) decorates a function, got int"):
        safepool.site("jobs")(3)  # type: ignore[type-var]


def test_the_repr_reads_as_the_call_that_made_it() -> None:
    assert repr(safepool.site("GET /orders")) == "safepool.site('GET /orders')"
