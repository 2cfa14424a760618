"""Review h263: a callback that raises inside ``ManualClock.advance()``
(a pool timer whose leak report is a ResourceWarning turned into an error,
say) neither stops the other due callbacks nor leaves the clock part-way:
as the event loop goes on past a raising callback (asyncio's
``Handle._run`` reports it to the loop's exception handler), every due
callback runs, the clock reaches the target, and then the error is raised
from ``advance()`` for the test to see (several: an ExceptionGroup, in the
order raised). ``KeyboardInterrupt`` and ``SystemExit`` propagate at once,
as from the loop."""

from __future__ import annotations

import warnings

import pytest

from safepool._clock import ManualClock


def test_a_raising_callback_does_not_stop_the_later_ones_nor_the_clock() -> None:
    clock = ManualClock()
    ran: list[float] = []

    def boom() -> None:
        ran.append(clock.now())
        raise RuntimeError("boom")

    clock.call_at(1001.0, boom)
    clock.call_at(1002.0, lambda: ran.append(clock.now()))
    clock.call_at(1020.0, lambda: ran.append(clock.now()))  # (not due: stays queued)
    with pytest.raises(RuntimeError, match="boom"):
        clock.advance(10.0)
    assert ran == [1001.0, 1002.0] and clock.now() == 1010.0
    clock.advance(10.0)  # the queue is intact: the next advance runs the rest
    assert ran == [1001.0, 1002.0, 1020.0] and clock.now() == 1020.0


def test_a_warning_turned_into_an_error_is_raised_after_every_due_callback() -> None:
    """The kind the review found: ``warnings.warn(..., ResourceWarning)``
    in a callback, with warnings as errors (pytest's ``filterwarnings =
    error``): the same ResourceWarning comes out of ``advance()``, once
    the rest ran."""
    clock = ManualClock()
    ran: list[str] = []
    clock.call_at(1001.0, lambda: warnings.warn("reclaimed", ResourceWarning, stacklevel=1))
    clock.call_at(1001.0, lambda: ran.append("same instant, later"))
    clock.call_at(1005.0, lambda: ran.append("later"))
    with warnings.catch_warnings():
        warnings.simplefilter("error", ResourceWarning)
        with pytest.raises(ResourceWarning, match="reclaimed"):
            clock.advance(10.0)
    assert ran == ["same instant, later", "later"] and clock.now() == 1010.0


def test_several_errors_are_raised_together_in_order() -> None:
    clock = ManualClock()
    ran: list[int] = []

    def fail(n: int) -> None:
        ran.append(n)
        raise ValueError(n)

    clock.call_at(1003.0, lambda: fail(2))
    clock.call_at(1001.0, lambda: fail(1))
    clock.call_at(1002.0, lambda: ran.append(0))
    with pytest.raises(ExceptionGroup) as info:
        clock.advance(5.0)
    assert [exc.args for exc in info.value.exceptions] == [(1,), (2,)]
    assert ran == [1, 0, 2] and clock.now() == 1005.0


def test_a_callback_that_schedules_then_raises_still_has_its_timer_run() -> None:
    """What a raising callback scheduled before it raised stays scheduled,
    and runs in the same advance if due."""
    clock = ManualClock()
    ran: list[float] = []

    def arm_then_fail() -> None:
        clock.call_at(clock.now() + 1.0, lambda: ran.append(clock.now()))
        raise LookupError("after arming")

    clock.call_at(1001.0, arm_then_fail)
    with pytest.raises(LookupError):
        clock.advance(5.0)
    assert ran == [1002.0] and clock.now() == 1005.0


def test_a_cancelled_error_is_collected_not_propagated_at_once() -> None:
    """asyncio.CancelledError is a BaseException but not an interrupt: the
    loop reports it as any other callback error, and so does advance()
    (after the rest ran)."""
    import asyncio

    clock = ManualClock()
    ran: list[str] = []

    def cancelled() -> None:
        raise asyncio.CancelledError

    clock.call_at(1001.0, cancelled)
    clock.call_at(1002.0, lambda: ran.append("ran"))
    with pytest.raises(asyncio.CancelledError):
        clock.advance(5.0)
    assert ran == ["ran"] and clock.now() == 1005.0


@pytest.mark.parametrize("interrupt", [KeyboardInterrupt, SystemExit])
def test_an_interrupt_propagates_at_once(interrupt: type[BaseException]) -> None:
    clock = ManualClock()
    ran: list[float] = []

    def stop() -> None:
        raise interrupt

    clock.call_at(1001.0, stop)
    clock.call_at(1002.0, lambda: ran.append(clock.now()))
    with pytest.raises(interrupt):
        clock.advance(5.0)
    assert ran == [] and clock.now() == 1001.0  # (where the loop would stop too)
    clock.advance(4.0)  # the rest is still due
    assert ran == [1002.0] and clock.now() == 1005.0
