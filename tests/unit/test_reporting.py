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


class _StrRaises(Exception):
    def __str__(self) -> str:
        raise AttributeError("no message attribute")


class _StrNotText(Exception):
    def __str__(self) -> str:
        return 42  # type: ignore[return-value]


class _ConnectionErrorStrRaises(ConnectionError):
    def __str__(self) -> str:
        raise IndexError("args")


class _OSErrorStrRaises(OSError):
    def __str__(self) -> str:
        raise IndexError("args")


def test_describe_error_never_raises_on_an_error_whose_str_fails() -> None:
    """Review h262: an application's error whose ``__str__`` raises (or
    returns no str) is described by its type and traceback's stand-in."""
    from safepool.stats import describe_error

    assert describe_error(_StrRaises()) == "_StrRaises: <exception str() failed>"
    assert describe_error(_StrNotText()) == "_StrNotText: <exception str() failed>"


def test_refusal_reads_an_error_whose_str_fails() -> None:
    """The connect failure's classification (``_internals.refusal``) reads
    the text of ConnectionError and errno-less OSError: never raises."""
    from safepool import _internals

    assert _internals.refusal(_ConnectionErrorStrRaises()) == _internals.BROKEN
    assert _internals.refusal(_OSErrorStrRaises()) == _internals.NOT_REFUSED
