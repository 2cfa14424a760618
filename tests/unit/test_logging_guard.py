"""safepool's loggers (``safepool._logging.guarded_logger``): a handler that
raises never throws out of the pool's logging call (review h259); records
are what a plain ``logging.Logger`` makes (the caller's function and line,
the call's ``extra``, ``exc_info``)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator

import pytest

from safepool._logging import guarded_logger

NAME = "safepool.test-logging-guard"


class Recording(logging.Handler):
    def __init__(self, fail: bool = False) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []
        self.fail = fail

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
        if self.fail:
            raise RuntimeError("handler failed")


@pytest.fixture
def handlers() -> Iterator[tuple[Recording, Recording]]:
    log = logging.getLogger(NAME)
    good, bad = Recording(), Recording(fail=True)
    log.addHandler(good)
    log.setLevel(logging.DEBUG)
    try:
        yield good, bad
    finally:
        log.removeHandler(good)
        log.removeHandler(bad)
        log.setLevel(logging.NOTSET)


def logging_function() -> None:
    guarded_logger(NAME).warning("value %s", 7, extra={"event": "e"})


def test_a_record_is_a_plain_loggers(handlers: tuple[Recording, Recording]) -> None:
    good, _ = handlers
    logging_function()
    try:
        raise ValueError("x")
    except ValueError:
        guarded_logger(NAME).exception("failed")
    first, second = good.records
    assert (first.getMessage(), first.levelno, first.funcName, first.event) == (  # type: ignore[attr-defined]
        "value 7", logging.WARNING, "logging_function", "e"
    )
    assert first.pathname == __file__
    assert second.funcName == "test_a_record_is_a_plain_loggers" and second.exc_info is not None


def test_a_level_not_enabled_logs_nothing(handlers: tuple[Recording, Recording]) -> None:
    good, _ = handlers
    logging.getLogger(NAME).setLevel(logging.ERROR)
    guarded_logger(NAME).warning("dropped")
    assert good.records == []


@pytest.mark.asyncio
async def test_a_raising_handler_goes_to_the_loops_exception_handler(handlers: tuple[Recording, Recording]) -> None:
    good, bad = handlers
    logging.getLogger(NAME).addHandler(bad)
    seen: list[dict[str, object]] = []
    loop = asyncio.get_running_loop()
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: seen.append(context))
    try:
        logging_function()  # does not raise
    finally:
        loop.set_exception_handler(previous)
    assert len(good.records) == 1 and len(bad.records) == 1
    [context] = seen
    assert context["message"] == f"a logging handler of {NAME!r} raised"
    assert isinstance(context["exception"], RuntimeError)


def test_with_no_loop_a_raising_handler_goes_to_stderr(
    handlers: tuple[Recording, Recording], capsys: pytest.CaptureFixture[str]
) -> None:
    _, bad = handlers
    logging.getLogger(NAME).addHandler(bad)
    logging_function()  # does not raise
    assert f"a logging handler of {NAME!r} raised" in capsys.readouterr().err
