"""Cheap acquire-site capture for leak reports.

traceback.extract_stack() costs tens of microseconds (it reads source lines);
walking frames and keeping each application frame's code object and the
offset of its current instruction costs about a microsecond. Line numbers
and source lines are looked up only when a report is written: a frame's
``f_lineno`` scans its code's line table from the start, which cost a
lease with stack capture on more than the rest of the walk (8,000 machine
instructions per frame in a long function, measured with callgrind).
"""

from __future__ import annotations

import asyncio
import inspect
import linecache
import os
import sys
from types import CodeType, FrameType
from typing import Any

from . import _secrets

Frame = tuple[str, int, str]  # (file, line, function)
Captured = tuple[tuple[CodeType, int], ...]  # (code, offset of the instruction in bytes), innermost first
# Who called pool.acquire(): its stack, and its task (None outside one), taken
# at the call: awaited in a task of its own (asyncio.gather, ensure_future,
# shield), the acquire would see that short-lived task instead.
Caller = tuple[Captured, "asyncio.Task[Any] | None"]

# The pool's own modules (not its subpackages: safepool/replay holds a demo
# application whose frames are exactly what a report must name).
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
_ASYNCIO_DIR = os.path.dirname(os.path.abspath(sys.modules["asyncio"].__file__ or "")) + os.sep


# _WRAPPER: a library that runs a task's coroutine inside a coroutine of its
# own (anyio 4.x's asyncio backend: ``TaskHandle._run_coro``, review h263):
# the event loop's side, as asyncio's frames, but at the top of a task it
# stands where the pool method a task runs (``tg.start_soon(pool.fetchval,
# ...)``) would, and that method is what the report names.
_APP, _POOL, _ASYNCIO, _WRAPPER = 0, 1, 2, 3
# The packages whose frames are _WRAPPER (by their directory, once imported).
TASK_WRAPPERS = ("anyio",)
# Code that a task resumes (coroutines, asyncio's generator-based ones, async
# generators): the frame of one whose caller is none of these is the top of
# the running task, and its caller is whatever runs the event loop.
RESUMED = inspect.CO_COROUTINE | inspect.CO_ITERABLE_COROUTINE | inspect.CO_ASYNC_GENERATOR
# One entry per source file, at most KIND_CACHE_SIZE (the oldest dropped
# first): code compiled at run time may name a new "file" each time
# (``<ipython-input-7>``, a template's generated name).
KIND_CACHE_SIZE = 4096
_kind_by_file: dict[str, int] = {}


def _kind(filename: str) -> int:
    kind = _kind_by_file.get(filename)
    if kind is None:
        if filename.startswith(_ASYNCIO_DIR):
            kind = _ASYNCIO
        elif os.path.dirname(filename) == _PACKAGE_DIR:
            kind = _POOL
        elif any(filename.startswith(folder) for folder in _wrapper_dirs()):
            kind = _WRAPPER
        else:
            kind = _APP
        if len(_kind_by_file) >= KIND_CACHE_SIZE:
            try:
                del _kind_by_file[next(iter(_kind_by_file))]
            except (KeyError, RuntimeError, StopIteration):  # another thread got there first
                pass
        _kind_by_file[filename] = kind
    return kind


def _wrapper_dirs() -> list[str]:
    """The folders of the TASK_WRAPPERS packages imported so far (a frame of
    one is classified only once it runs, so after its import)."""
    folders = []
    for name in TASK_WRAPPERS:
        module = sys.modules.get(name)
        path = getattr(module, "__file__", None)
        if path:
            folders.append(os.path.dirname(os.path.abspath(path)) + os.sep)
    return folders


def capture(limit: int = 8) -> Captured:
    """The caller's stack, innermost first, without the pool's or asyncio's
    frames, as :func:`resolve` reads it. The walk stops at the event loop
    (the first asyncio frame past an application frame, or the top of the
    running task): beyond it is whatever runs the loop, not the code that
    acquired, and the walk then costs a few frames, not the whole stack.

    A task whose own coroutine is the pool's (``asyncio.gather(pool.fetchval(...))``,
    or ``asyncio.create_task(pool.fetchval(...))``) has no application frame
    below its top: its top frame is kept instead, so the report names the
    pool method that acquired (with the task's name) rather than the code
    that runs the event loop."""
    return _walk(sys._getframe(1), limit)


def _walk(frame: FrameType | None, limit: int = 8) -> Captured:
    """:func:`capture`'s walk, from ``frame`` outwards."""
    frames: list[tuple[CodeType, int]] = []
    known = _kind_by_file
    start = frame
    while frame is not None:
        code = frame.f_code
        try:
            kind = known[code.co_filename]  # (a subscript, not .get(): per frame, on every lease)
        except KeyError:
            kind = _kind(code.co_filename)
        if kind == _APP:
            frames.append((code, frame.f_lasti))
            if len(frames) == limit:
                break
        elif kind >= _ASYNCIO and frames:
            break
        back = frame.f_back
        if back is not None and code.co_flags & RESUMED and not back.f_code.co_flags & RESUMED:
            if not frames:
                if kind == _WRAPPER and start is not None:
                    frame = _inside(start, frame)
                frames.append((frame.f_code, frame.f_lasti))
            break
        frame = back
    return tuple(frames)


def task_top(start: FrameType, top: FrameType) -> FrameType:
    """The frame that stands for the task whose top frame is ``top`` (a walk
    from ``start`` reached it): ``top`` itself, or, where ``top`` is a task
    wrapper's (anyio's), the coroutine the wrapper runs (:func:`_inside`).
    The acquire site (``_sites.caller_site``) names it, as a report does."""
    if _kind(top.f_code.co_filename) == _WRAPPER:
        return _inside(start, top)
    return top


def _inside(start: FrameType, top: FrameType) -> FrameType:
    """The frame ``top`` (a task wrapper's, at the top of the task) runs: the
    outermost of ``start``'s callers below it that is not a wrapper's own
    (an anyio portal's call is a wrapper's too)."""
    found, frame = start, start
    while frame is not None and frame is not top:
        if _kind(frame.f_code.co_filename) != _WRAPPER:
            found = frame
        frame = frame.f_back  # type: ignore[assignment]
    return found


def caller(past_caller: bool = False) -> Caller:
    """:func:`capture`, with the running task (None when there is none:
    ``pool.acquire()`` called outside a task). ``past_caller``: the walk
    starts at the caller's caller (``Pool.acquire`` passes True: its own
    frame, a plain function of the pool's, the walk would pass by)."""
    try:
        task = asyncio.current_task()
    except RuntimeError:  # (no running event loop)
        task = None
    # capture(), walked from this function's caller (or past it): this
    # frame, a plain function of the pool, the walk would only pass by (not
    # kept, not a task's top). A frame or two less per lease with stack
    # capture on.
    frame = sys._getframe(1)
    return _walk(frame.f_back if past_caller else frame), task  # (f_back None: nothing above, as the walk finds)


def _line(code: CodeType, offset: int) -> int:
    """The line of the instruction at ``offset`` (bytes), as the frame's
    ``f_lineno`` read then. Where that is None (an instruction without a
    line, which no call or await has in code CPython compiles) or the frame
    had not started (offset -1), the code's first line: a report names a
    line, and linecache gets a number."""
    if offset >= 0:
        for start, end, line in code.co_lines():
            if start <= offset < end:
                return code.co_firstlineno if line is None else line
    return code.co_firstlineno


def resolve(captured: Captured) -> tuple[Frame, ...]:
    """``(file, line, function)`` of each frame :func:`capture` kept, innermost first."""
    return tuple((code.co_filename, _line(code, offset), code.co_name) for code, offset in captured)


def format_stack(captured: Captured | None) -> str:
    """Outermost first, like a traceback."""
    if not captured:
        # (leak_warning_after turns capture on only when capture_stack is left
        # out: with capture_stack=False "set leak_warning_after" misled.)
        return "  (acquire stack not captured: set capture_stack=True, or leak_warning_after without capture_stack=False)\n"
    lines = []
    for filename, lineno, name in reversed(resolve(captured)):
        lines.append(f'  File "{filename}", line {lineno}, in {name}\n')
        source = linecache.getline(filename, lineno).strip()
        if source:
            # A DSN or a password written on the line (create_pool(
            # "postgresql://app:pw@db") on the acquire's line): masked, as
            # in every other report.
            lines.append(f"    {_secrets.redact_source(source)}\n")
    return "".join(lines)


def acquire_site(captured: Captured | None) -> str:
    """`file:line in function` of the innermost application frame."""
    if not captured:
        return "unknown (stack not captured)"
    filename, lineno, name = resolve(captured[:1])[0]
    return f"{filename}:{lineno} in {name}"
