"""Acquire-site capture keeps application frames, even inside safepool's subpackages."""

from __future__ import annotations

import os

import safepool
from safepool import _stack


def test_capture_names_the_caller() -> None:
    frames = _stack.capture()
    assert frames[0][0] == __file__ and frames[0][2] == "test_capture_names_the_caller"
    assert "test_capture_names_the_caller" in _stack.acquire_site(frames)
    assert "frames = _stack.capture()" in _stack.format_stack(frames)


def test_frames_in_safepool_subpackages_are_kept() -> None:
    demo = os.path.join(os.path.dirname(safepool.__file__), "replay", "demo_handler.py")
    namespace: dict[str, object] = {}
    exec(compile("from safepool import _stack\ndef handler():\n    return _stack.capture()\n", demo, "exec"), namespace)
    frames = namespace["handler"]()  # type: ignore[operator]
    assert frames[0][0] == demo and frames[0][2] == "handler"


def test_uncaptured_stack_says_how_to_turn_it_on() -> None:
    assert "capture_stack=True" in _stack.format_stack(None)
    assert _stack.acquire_site(None) == "unknown (stack not captured)"
