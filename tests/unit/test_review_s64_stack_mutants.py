"""Review s64: mutation review of safepool/_stack.py. Mutants that survived
the existing tests, killed here.

The existing tests capture from shallow stacks under pytest, where the
limit of 8 frames, the stop at an asyncio frame past an application frame,
the skip of one before any, the stop at a task's top and the file-kind
cache's eviction never decided an outcome. Here asyncio's frames are code
compiled with a file name in asyncio's directory (the kind is by file, as
for the replay demo in tests/unit/test_stack.py). No server.
"""

from __future__ import annotations

import _thread
import asyncio
import os
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from safepool import _stack


@pytest.fixture(autouse=True)
def fresh_cache(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(_stack, "_kind_by_file", {})
    yield


def asyncio_runner() -> Callable[[Callable[[], Any]], Any]:
    """``run(f)``: calls ``f``, from a frame in asyncio's own directory (as
    the event loop's Handle._run calls a callback)."""
    namespace: dict[str, Any] = {}
    filename = os.path.join(_stack._ASYNCIO_DIR, "review_s64_runner.py")
    exec(compile("def run(f):\n    return f()\n", filename, "exec"), namespace)
    return namespace["run"]  # type: ignore[no-any-return]


def names(captured: _stack.Captured) -> list[str]:
    return [name for _, _, name in _stack.resolve(captured)]


def test_the_walk_stops_at_an_asyncio_frame_past_an_application_frame() -> None:
    """A callback the loop runs: its frame is kept, the loop's are not."""

    def callback() -> _stack.Captured:
        return _stack.capture()

    assert names(asyncio_runner()(callback)) == ["callback"]


def test_an_asyncio_frame_before_any_application_frame_is_skipped() -> None:
    """capture() called from asyncio's code (a task's wait_for around the
    pool's coroutine): the walk goes on to the application that called it."""
    captured = asyncio_runner()(_stack.capture)
    assert names(captured)[0] == "test_an_asyncio_frame_before_any_application_frame_is_skipped"


def test_at_most_eight_frames_are_kept_by_default() -> None:
    def deep(n: int, limit: int | None) -> _stack.Captured:
        if n:
            return deep(n - 1, limit)
        return _stack.capture() if limit is None else _stack.capture(limit)

    assert names(deep(20, None)) == ["deep"] * 8
    assert names(deep(20, 3)) == ["deep"] * 3


def test_a_coroutine_stepped_by_a_plain_function_is_the_top_of_its_task() -> None:
    """Its caller is whatever runs the loop (here a plain function): not kept."""

    async def top() -> _stack.Captured:
        return _stack.capture()

    def drive() -> _stack.Captured:
        coro = top()
        try:
            coro.send(None)
        except StopIteration as done:
            return done.value  # type: ignore[no-any-return]
        raise AssertionError("top() did not finish in one step")

    assert names(drive()) == ["top"]


def test_a_coroutine_with_no_caller_frame_ends_the_walk(monkeypatch: pytest.MonkeyPatch) -> None:
    """A coroutine stepped by a thread's C entry has no caller frame: the
    walk ends with it (it does not fail)."""
    found: list[_stack.Captured] = []
    ended: list[type[BaseException] | None] = []
    finished = threading.Event()

    async def step() -> None:
        found.append(_stack.capture())

    def unraisable(report: Any) -> None:  # (the thread's end: StopIteration, the coroutine's return)
        ended.append(report.exc_type)
        finished.set()

    monkeypatch.setattr(sys, "unraisablehook", unraisable)
    _thread.start_new_thread(step().send, (None,))
    assert finished.wait(30)
    assert ended == [StopIteration] and [names(c) for c in found] == [["step"]]


def test_caller_names_the_running_task_or_none() -> None:
    captured, task = _stack.caller()
    assert task is None and names(captured)[0] == "test_caller_names_the_running_task_or_none"

    async def main() -> bool:
        return _stack.caller()[1] is asyncio.current_task()

    assert asyncio.run(main()) is True


def test_caller_past_its_caller_walks_from_the_callers_caller() -> None:
    # Pool.acquire passes past_caller=True: the walk starts above its frame,
    # which it would only pass by. Here the skipped frame is an application
    # one, so the skip shows.
    def acquire_like() -> _stack.Caller:
        return _stack.caller(True)

    def acquire_plain() -> _stack.Caller:
        return _stack.caller()

    here = "test_caller_past_its_caller_walks_from_the_callers_caller"
    assert names(acquire_like()[0])[0] == here
    assert names(acquire_plain()[0])[:2] == ["acquire_plain", here]


def test_the_kind_of_a_file_is_cached_and_the_oldest_dropped_first(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_stack, "KIND_CACHE_SIZE", 3)
    files = [
        os.path.join(_stack._ASYNCIO_DIR, "tasks.py"),
        os.path.join(_stack._PACKAGE_DIR, "pool.py"),
        "/srv/app/handlers.py",
        os.path.join(_stack._PACKAGE_DIR, "replay", "demo_handler.py"),
        "<ipython-input-7>",
    ]
    assert [_stack._kind(f) for f in files] == [_stack._ASYNCIO, _stack._POOL, _stack._APP, _stack._APP, _stack._APP]
    assert list(_stack._kind_by_file) == files[2:]


def sample() -> int:
    first = 1
    second = (
        first
        + 2
    )
    return second


def test_each_instructions_line_is_its_own_range_s() -> None:
    code = sample.__code__
    checked = 0
    for start, end, line in code.co_lines():
        if start < end and line is not None:
            assert _stack._line(code, start) == line
            assert _stack._line(code, end - 2) == line
            checked += 1
    assert checked >= 4
    # Not started (offset -1) or past the end: the def line.
    assert _stack._line(code, -1) == code.co_firstlineno
    assert _stack._line(code, len(code.co_code) + 100) == code.co_firstlineno


def test_the_report_is_outermost_first_with_each_line_stripped() -> None:
    def inner() -> _stack.Captured:
        return _stack.capture(2)

    def outer() -> _stack.Captured:
        return inner()

    captured = outer()
    [(file, outer_line, _), (_, inner_line, _)] = reversed(_stack.resolve(captured))
    assert _stack.format_stack(captured) == (
        f'  File "{file}", line {outer_line}, in outer\n'
        "    return inner()\n"
        f'  File "{file}", line {inner_line}, in inner\n'
        "    return _stack.capture(2)\n"
    )
    assert _stack.acquire_site(captured) == f"{file}:{inner_line} in inner"


def test_a_password_on_the_acquires_line_is_masked() -> None:
    def acquire() -> _stack.Captured:
        return (_stack.capture(1), "postgresql://app:hunter2@db/x")[0]

    report = _stack.format_stack(acquire())
    assert "hunter2" not in report and "postgresql://app:" in report


def test_an_empty_capture_reads_as_not_captured() -> None:
    """No application frame kept (``()``): as for no capture at all."""
    assert _stack.format_stack(()) == _stack.format_stack(None)
    assert "capture_stack=True" in _stack.format_stack(())
    assert _stack.acquire_site(()) == "unknown (stack not captured)"
