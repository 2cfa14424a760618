"""Review h260: ``safepool._logging.guarded_logger`` attacked: its records
against a plain ``logging.Logger``'s (every call form the pool uses, on
each Python at hand), errors that must go through (``BaseException``),
filters that raise, a loop exception handler that logs through the guard
(re-entrancy), ``logging.raiseExceptions = False``."""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from safepool._logging import guarded_logger

NAME = "safepool.review-h260"
LOGGING_PY = Path(__file__).resolve().parents[2] / "safepool" / "_logging.py"


class Recording(logging.Handler):
    def __init__(self, raising: BaseException | None = None) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []
        self.raising = raising

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
        if self.raising is not None:
            raise self.raising


@pytest.fixture
def log() -> Iterator[logging.Logger]:
    plain = logging.getLogger(NAME)
    plain.setLevel(logging.DEBUG)
    plain.propagate = False
    try:
        yield plain
    finally:
        for handler in list(plain.handlers):
            plain.removeHandler(handler)
        for filt in list(plain.filters):
            plain.removeFilter(filt)
        plain.setLevel(logging.NOTSET)
        plain.propagate = True


# The probe run on each Python: every call form, guarded and plain, from
# the same function; the (funcName, lineno, exc_info, stack_info depth)
# of each record must match the plain logger's.
PROBE = r'''
import importlib.util, logging, sys
spec = importlib.util.spec_from_file_location("sp_logging", sys.argv[1])
mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
records = []
class H(logging.Handler):
    def emit(self, record): records.append(record)
for name in ("guarded", "plain"):
    logging.getLogger(name).addHandler(H()); logging.getLogger(name).setLevel(1)
def outer(lg): return inner(lg)
def inner(lg):
    lg.warning("w %s", 1, extra={"event": "e"})
    lg.log(30, "l")
    lg.info("i", stacklevel=2)
    try:
        1 / 0
    except ZeroDivisionError:
        lg.exception("e")
        lg.error("e2", exc_info=True)
    lg.warning("s", stack_info=True)
    lg.critical("c"); lg.debug("d")
def run(lg):
    records.clear(); outer(lg)
    return [(r.funcName, r.lineno, r.pathname, bool(r.exc_info), (r.stack_info or "").count("\n"),
             getattr(r, "event", None), r.getMessage()) for r in records]
guarded, plain = run(mod.guarded_logger("guarded")), run(logging.getLogger("plain"))
print(len(guarded), "SAME" if guarded == plain else f"DIFF {guarded} {plain}")
'''

PYTHONS = [sys.executable] + [
    p for p in ("/root/.pyenv/versions/3.12.1/bin/python", "/root/.pyenv/versions/3.13.0/bin/python") if os.path.exists(p)
]


@pytest.mark.parametrize("python", PYTHONS)
def test_records_match_a_plain_loggers_on_each_python(python: str, tmp_path: Path) -> None:
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    done = subprocess.run([python, str(probe), str(LOGGING_PY)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "8 SAME", done.stdout


def test_logging_disable_is_honoured(log: logging.Logger) -> None:
    good = Recording()
    log.addHandler(good)
    logging.disable(logging.CRITICAL)
    try:
        guarded_logger(NAME).critical("dropped")
    finally:
        logging.disable(logging.NOTSET)
    assert good.records == []


@pytest.mark.parametrize("error", [KeyboardInterrupt(), SystemExit(3)])
def test_a_handlers_base_exception_goes_through(log: logging.Logger, error: BaseException) -> None:
    log.addHandler(Recording(raising=error))
    with pytest.raises(type(error)):
        guarded_logger(NAME).warning("x")


def test_a_raising_filter_is_guarded(log: logging.Logger, capsys: pytest.CaptureFixture[str]) -> None:
    def bad_filter(record: logging.LogRecord) -> bool:
        raise LookupError("filter failed")

    log.addFilter(bad_filter)
    guarded_logger(NAME).error("x")  # does not raise
    assert "LookupError: filter failed" in capsys.readouterr().err


def test_raise_exceptions_off_and_no_loop_is_silent(log: logging.Logger, capsys: pytest.CaptureFixture[str]) -> None:
    log.addHandler(Recording(raising=RuntimeError("handler failed")))
    previous, logging.raiseExceptions = logging.raiseExceptions, False
    try:
        guarded_logger(NAME).warning("x")
    finally:
        logging.raiseExceptions = previous
    assert capsys.readouterr().err == ""


@pytest.mark.asyncio
async def test_a_loop_handler_that_logs_through_the_guard_ends(log: logging.Logger) -> None:
    """The loop's exception handler logs to the same (raising) logger:
    each handler error goes back to the loop handler. The recursion is
    bounded by Python's limit (RecursionError, reported by asyncio's
    default handler), the call returns, the program goes on. (A plain
    Logger would raise once out of the exception handler instead: asyncio
    reports "Unhandled error in exception handler" once.)"""
    bad = Recording(raising=RuntimeError("handler failed"))
    log.addHandler(bad)
    guarded = guarded_logger(NAME)
    loop = asyncio.get_running_loop()
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: guarded.error("loop error: %s", context["message"]))
    asyncio_log = logging.getLogger("asyncio")
    was_disabled, asyncio_log.disabled = asyncio_log.disabled, True  # (its flood of RecursionError reports)
    try:
        guarded.warning("first")  # returns
    finally:
        loop.set_exception_handler(previous)
        asyncio_log.disabled = was_disabled
    assert 1 < len(bad.records) < sys.getrecursionlimit()
    assert await asyncio.sleep(0, "alive") == "alive"


@pytest.mark.asyncio
async def test_with_a_loop_raise_exceptions_off_still_reports(log: logging.Logger) -> None:
    """(As asyncio reports a callback's error whatever logging.raiseExceptions says.)"""
    log.addHandler(Recording(raising=RuntimeError("handler failed")))
    seen: list[dict[str, object]] = []
    loop = asyncio.get_running_loop()
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: seen.append(context))
    was, logging.raiseExceptions = logging.raiseExceptions, False
    try:
        guarded_logger(NAME).warning("x")
    finally:
        logging.raiseExceptions = was
        loop.set_exception_handler(previous)
    assert [type(c["exception"]) for c in seen] == [RuntimeError]


def test_the_guard_answers_the_logger_calls_safepool_makes() -> None:
    """Everything safepool calls on its loggers (grep ``logger.`` in
    safepool/): the guard has each; ``.logger`` is the plain one."""
    guarded = guarded_logger("safepool")
    assert guarded.logger is logging.getLogger("safepool")  # type: ignore[attr-defined]
    for method in ("debug", "info", "warning", "error", "exception", "critical", "log", "isEnabledFor"):
        assert callable(getattr(guarded, method))
    assert guarded.name == "safepool"
