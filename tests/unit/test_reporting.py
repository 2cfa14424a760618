"""The one-line error description every log line, event and CLI uses."""

from __future__ import annotations

import pytest

from safepool.stats import describe_error


@pytest.mark.parametrize(
    ("error", "line"),
    [
        (None, "none"),
        (TimeoutError(), "TimeoutError"),
        (RuntimeError("   "), "RuntimeError"),
        (RuntimeError("refused\nDETAIL: more"), "RuntimeError: refused"),
        (RuntimeError("\nthe message after a blank line"), "RuntimeError: the message after a blank line"),
        (OSError("  padded  "), "OSError: padded"),
    ],
)
def test_type_and_first_non_blank_line(error: BaseException | None, line: str) -> None:
    assert describe_error(error) == line
