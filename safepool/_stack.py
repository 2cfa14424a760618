"""Cheap acquire-site capture for leak reports.

traceback.extract_stack() costs tens of microseconds (it reads source lines);
walking frames and keeping (file, line, function) costs about a microsecond.
Source lines are looked up only when a report is written.
"""

from __future__ import annotations

import linecache
import os
import sys

Frame = tuple[str, int, str]

# The pool's own modules (not its subpackages: safepool/replay holds a demo
# application whose frames are exactly what a report must name).
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
_ASYNCIO_DIR = os.path.dirname(os.path.abspath(sys.modules["asyncio"].__file__ or "")) + os.sep


_APP, _POOL, _ASYNCIO = 0, 1, 2
_kind_by_file: dict[str, int] = {}  # one entry per source file: bounded


def _kind(filename: str) -> int:
    kind = _kind_by_file.get(filename)
    if kind is None:
        if filename.startswith(_ASYNCIO_DIR):
            kind = _ASYNCIO
        elif os.path.dirname(filename) == _PACKAGE_DIR:
            kind = _POOL
        else:
            kind = _APP
        _kind_by_file[filename] = kind
    return kind


def capture(limit: int = 8) -> tuple[Frame, ...]:
    """The caller's stack, innermost first, without the pool's or asyncio's
    frames. The walk stops at the event loop (the first asyncio frame past an
    application frame): beyond it is whatever runs the loop, not the code
    that acquired, and the walk then costs a few frames, not the whole stack."""
    frames: list[Frame] = []
    append = frames.append
    known = _kind_by_file
    frame = sys._getframe(1)
    while frame is not None:
        code = frame.f_code
        filename = code.co_filename
        kind = known.get(filename)
        if kind is None:
            kind = _kind(filename)
        if kind == _APP:
            append((filename, frame.f_lineno, code.co_name))
            if len(frames) == limit:
                break
        elif kind == _ASYNCIO and frames:
            break
        frame = frame.f_back  # type: ignore[assignment]
    return tuple(frames)


def format_stack(frames: tuple[Frame, ...] | None) -> str:
    """Outermost first, like a traceback."""
    if not frames:
        return "  (acquire stack not captured: set leak_warning_after or capture_stack=True)\n"
    lines = []
    for filename, lineno, name in reversed(frames):
        lines.append(f'  File "{filename}", line {lineno}, in {name}\n')
        source = linecache.getline(filename, lineno).strip()
        if source:
            lines.append(f"    {source}\n")
    return "".join(lines)


def acquire_site(frames: tuple[Frame, ...] | None) -> str:
    """`file:line in function` of the innermost application frame."""
    if not frames:
        return "unknown (stack not captured)"
    filename, lineno, name = frames[0]
    return f"{filename}:{lineno} in {name}"
