"""Helper 262, adversarial review of the event listener API.

docs/metrics.md ("Events"): listeners' events are "delivered after the
pool's books are settled ...; a callback that raises is logged (``event
listener failed``) and the others still run" (also ``Pool.add_event_listener``'s
docstring: "An exception in a callback is logged ... and the other callbacks
still run").

A listener that raises ``asyncio.CancelledError`` (a ``BaseException``
since Python 3.8: a listener that reads ``result()`` of a future someone
cancelled, or re-raises what it caught around an awaitable's result) is
not logged, and the listeners after it never get that event:
``Reporter.deliver`` (safepool/_reporting.py:345) catches ``Exception``
only, so the error leaves ``deliver()`` with the event already popped and
the rest of the listener loop skipped. asyncio's own callbacks
(``Handle._run``) report every ``BaseException`` but ``SystemExit`` and
``KeyboardInterrupt`` and carry on; the pool's own loop callbacks do the
same (``Runner.report_to_loop``). Out of the timer's drain here it lands in
the loop's exception handler as "Exception in callback"; out of the drain
of an application task's ``acquire()``/``release()`` (``Runner.drain`` ends
with ``deliver()``) it would reach that task as a cancellation it never got.

The same ``except Exception`` guards the timing sinks
(safepool/_histogram.py:208, ``TeeHistogram.flush``).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

import safepool
from safepool import events
from tests._util import until

pytestmark = pytest.mark.asyncio


async def test_a_listener_raising_cancelled_error_leaves_the_others_their_event(pools: Any) -> None:
    pool = await pools(min_size=1, max_size=1, leak_warning_after=0.05)
    loop = asyncio.get_running_loop()
    reported: list[dict[str, Any]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, context: reported.append(context))
    first: list[events.PoolEvent] = []
    second: list[events.PoolEvent] = []

    def raising(event: events.PoolEvent) -> None:
        first.append(event)
        raise asyncio.CancelledError  # (a cancelled future's result(), read in a listener)

    pool.add_event_listener(raising)
    pool.add_event_listener(second.append)
    try:
        con = await pool.acquire()
        await until(lambda: bool(first), timeout=5.0)  # the leak warning was delivered to the first listener
        await asyncio.sleep(0.05)
        assert [type(event) for event in second] == [events.LeakSuspected], (first, second, reported)
        await pool.release(con)
    finally:
        pool.remove_event_listener(raising)  # (the fixture's terminate() would deliver lease_ended to it)
        loop.set_exception_handler(previous)


# ------------------------------------------------------------ siblings (helper 264)
# Every user callback the pool guards follows asyncio's Handle._run: any
# BaseException is reported and the pool goes on, but KeyboardInterrupt and
# SystemExit, which propagate.


async def test_a_listener_raising_cancelled_error_is_logged(pools: Any, caplog: pytest.LogCaptureFixture) -> None:
    pool = await pools(min_size=1, max_size=1)
    got: list[dict[str, Any]] = []

    def raising(event: events.PoolEvent) -> None:
        raise asyncio.CancelledError

    pool.add_event_listener(raising)
    pool.add_listener(got.append)  # (a dict listener after it)
    try:
        with caplog.at_level(logging.ERROR, logger="safepool"):
            async with pool.acquire():
                pass
            pool._reporter.emit_event("server_status", **{"from": "up", "to": "backing_off"})
            await asyncio.sleep(0.05)
        failed = [r for r in caplog.records if getattr(r, "event", None) == "listener_failed"]
        assert failed and "CancelledError" in failed[0].getMessage(), [r.getMessage() for r in caplog.records]
        assert any(event["event"] == "server_status" for event in got), got
    finally:
        pool.remove_event_listener(raising)


@pytest.mark.parametrize("stop", [KeyboardInterrupt, SystemExit])
async def test_a_listener_raising_keyboard_interrupt_or_system_exit_propagates(pools: Any, stop: type) -> None:
    pool = await pools(min_size=1, max_size=1)

    def raising(event: events.PoolEvent) -> None:
        raise stop

    pool.add_event_listener(raising)
    reporter = pool._reporter
    try:
        reporter.emit_event("server_status", **{"from": "up", "to": "backing_off"})
        with pytest.raises(stop):
            reporter.deliver()  # (what the loop callback runs: asyncio re-raises these from run_forever)
        assert not reporter.delivering  # the next delivery is not locked out
    finally:
        pool.remove_event_listener(raising)
    await asyncio.sleep(0)


async def test_a_timing_sink_raising_cancelled_error_leaves_the_others_their_values(
    pools: Any, caplog: pytest.LogCaptureFixture
) -> None:
    pool = await pools(min_size=1, max_size=1)
    got: list[float] = []

    def raising(seconds: float) -> None:
        raise asyncio.CancelledError

    pool.add_timing_sink("lease", raising)
    pool.add_timing_sink("lease", got.append)
    try:
        with caplog.at_level(logging.WARNING, logger="safepool"):
            for _ in range(2):
                async with pool.acquire():
                    pass
                await asyncio.sleep(0.02)
        assert len(got) == 2, got
        failed = [r for r in caplog.records if getattr(r, "event", None) == "timing_sink_failed"]
        assert len(failed) == 1 and "CancelledError" in failed[0].getMessage(), [r.getMessage() for r in caplog.records]
    finally:
        pool.remove_timing_sink("lease", raising)
        pool.remove_timing_sink("lease", got.append)


async def test_a_pool_created_hook_raising_cancelled_error_is_logged(
    pools: Any, caplog: pytest.LogCaptureFixture
) -> None:
    from safepool.pool import on_pool_created

    def raising(pool: safepool.Pool) -> None:
        raise asyncio.CancelledError

    seen: list[str] = []
    remove_raising = on_pool_created(raising)
    remove_seen = on_pool_created(lambda pool: seen.append(pool.name))
    try:
        with caplog.at_level(logging.ERROR, logger="safepool"):
            pool = await pools(name="h264-created", min_size=1, max_size=1)
    finally:
        remove_raising()
        remove_seen()
    assert seen == [pool.name]
    assert await pool.fetchval("SELECT 1") == 1
    failed = [r for r in caplog.records if getattr(r, "event", None) == "created_hook_failed"]
    assert failed and "CancelledError" in failed[0].getMessage()


async def test_a_logging_handler_raising_cancelled_error_goes_to_the_loop(pools: Any) -> None:
    loop = asyncio.get_running_loop()
    reported: list[dict[str, Any]] = []
    previous = loop.get_exception_handler()

    class Raising(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            raise asyncio.CancelledError

    handler = Raising()
    target = logging.getLogger("safepool")
    pool = await pools(min_size=1, max_size=1)

    def raising_listener(event: events.PoolEvent) -> None:
        raise ValueError("x")  # logged: through the raising handler

    got: list[events.PoolEvent] = []
    loop.set_exception_handler(lambda _loop, context: reported.append(context))
    target.addHandler(handler)
    pool.add_event_listener(raising_listener)
    pool.add_event_listener(got.append)
    try:
        pool._reporter.emit_event("server_status", **{"from": "up", "to": "backing_off"})
        await asyncio.sleep(0.05)
        assert [type(event) for event in got] == [events.ServerStatusChanged], got
        assert any(isinstance(context.get("exception"), asyncio.CancelledError) for context in reported), reported
    finally:
        target.removeHandler(handler)
        pool.remove_event_listener(raising_listener)
        pool.remove_event_listener(got.append)
        loop.set_exception_handler(previous)


async def test_a_logging_handler_raising_keyboard_interrupt_propagates() -> None:
    from safepool._logging import guarded_logger

    class Raising(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            raise KeyboardInterrupt

    target = logging.getLogger("safepool.h264")
    handler = Raising()
    target.addHandler(handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            guarded_logger("safepool.h264").error("x")
    finally:
        target.removeHandler(handler)
