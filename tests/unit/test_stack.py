"""Acquire-site capture keeps application frames, even inside safepool's subpackages."""

from __future__ import annotations

import os
from types import FrameType

import safepool
from safepool import _stack


def test_capture_names_the_caller() -> None:
    frames = _stack.capture()
    filename, _, name = _stack.resolve(frames)[0]
    assert filename == __file__ and name == "test_capture_names_the_caller"
    assert "test_capture_names_the_caller" in _stack.acquire_site(frames)
    assert "frames = _stack.capture()" in _stack.format_stack(frames)


def test_frames_in_safepool_subpackages_are_kept() -> None:
    demo = os.path.join(os.path.dirname(safepool.__file__), "replay", "demo_handler.py")
    namespace: dict[str, object] = {}
    exec(compile("from safepool import _stack\ndef handler():\n    return _stack.capture()\n", demo, "exec"), namespace)
    frames = _stack.resolve(namespace["handler"]())  # type: ignore[operator]
    assert frames[0][0] == demo and frames[0][2] == "handler"


def test_uncaptured_stack_says_how_to_turn_it_on() -> None:
    assert "capture_stack=True" in _stack.format_stack(None)
    assert _stack.acquire_site(None) == "unknown (stack not captured)"


def _lines_of(frames: list[FrameType]) -> list[int]:
    return [frame.f_lineno for frame in frames]


def test_resolved_lines_are_the_frames_lines_at_capture() -> None:
    """capture() keeps instruction offsets and resolve() maps them to lines
    later: the lines must be what each frame's f_lineno said at the capture,
    in a plain call, a call spread over lines, a loop, a nested function
    and a coroutine suspended in an await (the acquire's own case)."""
    import asyncio
    import sys

    seen: list[tuple[tuple[str, int, str], ...]] = []
    expected: list[list[int]] = []

    def grab() -> None:  # (returns None, an argument of spread() below)
        captured = _stack.capture()  # grab's own frame first, then its callers
        frames: list[FrameType] = []
        frame = sys._getframe(1)
        while frame is not None and frame.f_code.co_filename == __file__:
            frames.append(frame)
            frame = frame.f_back  # type: ignore[assignment]
        expected.append(_lines_of(frames))
        seen.append(_stack.resolve(captured)[1: 1 + len(frames)])

    def spread(a: int, b: int, c: None) -> None:
        grab()

    def nested() -> None:
        def inner() -> None:
            grab()

        inner()

    for _ in range(2):
        grab()
    spread(
        1,
        2,
        grab(),  # type: ignore[func-returns-value]
    )
    nested()

    async def leaf() -> None:
        grab()
        await asyncio.sleep(0)

    async def caller() -> None:
        x = 1
        await leaf()
        assert x

    asyncio.run(caller())
    assert len(seen) == 6
    for frames, lines in zip(seen, expected, strict=True):
        assert lines and [line for _, line, _ in frames] == lines


def test_an_instruction_without_a_line_resolves_to_the_codes_first_line() -> None:
    """f_lineno is None there; a report names the def line instead and
    formats without error."""
    import sys

    captured: list[_stack.Captured] = []
    lineno: list[int | None] = []

    def target() -> None:
        lineno.append(sys._getframe().f_lineno)
        captured.append(_stack.capture())

    code = target.__code__
    units = len(code.co_code) // 2
    table = bytearray()
    while units > 0:  # location entries of kind 15: no line, up to 8 code units each
        table.append(0x80 | (15 << 3) | (min(units, 8) - 1))
        units -= 8
    target.__code__ = code.replace(co_linetable=bytes(table))
    target()
    assert lineno == [None]
    filename, line, name = _stack.resolve(captured[0])[0]
    assert (filename, line, name) == (__file__, code.co_firstlineno, "target")
    assert f"line {code.co_firstlineno}, in target" in _stack.format_stack(captured[0])
