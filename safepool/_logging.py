"""safepool's loggers, guarded against the handlers a program attaches.

A ``logging.Handler`` is meant to catch its own errors (``emit()`` calls
``handleError()``, Python's logging documentation), and the standard ones
do; but ``Logger.callHandlers`` catches nothing, so a custom handler or a
filter that raises throws out of the logging call, wherever the pool made
it: inside its action loop or a timer callback, where it left a take-back
never started, a reset watchdog unarmed, a slot closing for good (review
h259). The pool's loggers hand such an error to the running loop's
exception handler instead (as asyncio reports a callback's error), or,
with no loop running, to ``logging``'s own last resort (stderr, when
``logging.raiseExceptions`` is on, as ``Handler.handleError`` does); the
pool's work goes on.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import traceback
from collections.abc import MutableMapping
from typing import Any

__all__ = ["guarded_logger"]


class _GuardedLogger(logging.LoggerAdapter):  # type: ignore[type-arg]
    """A ``logging.Logger`` by name (``.logger``), whose calls never raise
    a handler's or a filter's exception (``KeyboardInterrupt`` and
    ``SystemExit`` aside, as in asyncio's callbacks). The call's own ``extra`` goes
    through unchanged, and the record names the pool's function that
    logged (``stacklevel`` counts this frame)."""

    def process(self, msg: Any, kwargs: MutableMapping[str, Any]) -> tuple[Any, MutableMapping[str, Any]]:
        return msg, kwargs

    def log(self, level: int, msg: Any, *args: Any, **kwargs: Any) -> None:
        if not self.logger.isEnabledFor(level):
            return
        kwargs["stacklevel"] = kwargs.get("stacklevel", 1) + 1
        try:
            self.logger.log(level, msg, *args, **kwargs)
        except (SystemExit, KeyboardInterrupt):
            raise  # (as asyncio's Handle._run: the program is asked to stop)
        except BaseException as error:  # (a CancelledError too: as asyncio reports a callback's)
            _handler_failed(self.logger.name, error)


_reporting = False  # (a report under way: the loop's handler logging through the failing handler again)


def _handler_failed(name: str, error: BaseException) -> None:
    """Report a handler's ``error``, without the exceptions it chains to: the
    pool logs from inside ``except`` blocks, and the error being handled
    there (a failing listener's, a hook's) may quote the pool's password,
    which the pool masks only in the record it writes (review h260). Not
    again while a report is under way (a loop exception handler that logs
    through the same failing handler recursed until Python's limit)."""
    global _reporting
    if _reporting:
        return
    error.__cause__ = None
    error.__suppress_context__ = True
    _reporting = True
    try:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            if logging.raiseExceptions:
                sys.stderr.write(f"--- a logging handler of {name!r} raised ---\n")
                traceback.print_exception(error, file=sys.stderr)
            return
        loop.call_exception_handler({"message": f"a logging handler of {name!r} raised", "exception": error})
    finally:
        _reporting = False


def guarded_logger(name: str) -> logging.Logger:
    """``logging.getLogger(name)``, guarded (see the module). Typed as a
    ``Logger``: it answers the calls the pool makes (``debug`` to
    ``exception``, ``log``, ``isEnabledFor``)."""
    return _GuardedLogger(logging.getLogger(name), {})  # type: ignore[return-value]
