"""A pytest plugin that makes safepool slower on purpose, to check that the
benchmark guards catch a regression (docs/performance.md, "Do the guards
catch a regression?"). Never loaded unless asked for:

    SAFEPOOL_SLOWDOWN_US=30 python -m pytest benchmarks -p benchmarks.slowdown -k test_3

``SAFEPOOL_SLOWDOWN_US``: microseconds of busy CPU added to every release
(``Leaser.release``), or, with ``SAFEPOOL_SLOWDOWN_AT=capture``, to every
acquire-stack capture (what benchmark 5's safety-on pool alone pays). The
wrapper and the clock reads add about 0.5 µs more per call.
"""

from __future__ import annotations

import os
import time
from typing import Any

from safepool import _leasing, _stack

try:
    SECONDS = float(os.environ.get("SAFEPOOL_SLOWDOWN_US", "0")) * 1e-6
except ValueError:
    raise ValueError(
        f"SAFEPOOL_SLOWDOWN_US must be a number of microseconds, not {os.environ['SAFEPOOL_SLOWDOWN_US']!r}"
    ) from None
AT = os.environ.get("SAFEPOOL_SLOWDOWN_AT", "release")


def _spin() -> None:
    end = time.perf_counter() + SECONDS
    while time.perf_counter() < end:
        pass


def _slowed(function: Any) -> Any:
    def slowed(*args: Any, **kwargs: Any) -> Any:
        _spin()
        return function(*args, **kwargs)

    return slowed


if AT not in ("release", "capture"):
    raise ValueError(f"SAFEPOOL_SLOWDOWN_AT must be 'release' or 'capture', not {AT!r}")
if SECONDS:
    if AT == "release":
        _leasing.Leaser.release = _slowed(_leasing.Leaser.release)  # type: ignore[method-assign]
    else:
        _stack.capture = _slowed(_stack.capture)
