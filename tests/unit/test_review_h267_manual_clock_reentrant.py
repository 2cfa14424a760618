"""Review h267: ``ManualClock.advance()`` called from inside a callback that
an outer ``advance()`` runs (a test's own timer, or an event listener a
pool timer's drain delivers to, that moves time on).

The docstring of ``advance`` says the clock is monotonic ("it never moves
back") and that ``now()`` reads each callback's ``when`` while it runs. A
nested ``advance()`` moves the clock to its own target (past the outer's)
and runs callbacks due by then; when it returns, the outer ``advance()``
ends with ``self._now = target`` (safepool/_clock.py:173), its own, earlier
target: the clock moves back, below the ``when`` of callbacks that already
ran. A pool on that clock then sees time go backwards (a lease acquired
"after" now, a negative held time), and a deadline the nested advance
already passed is not due again until time catches up.
"""

from __future__ import annotations

from safepool._clock import ManualClock


def test_an_advance_inside_a_callback_never_moves_the_clock_back() -> None:
    clock = ManualClock()
    seen: list[float] = []

    clock.call_at(1001.0, lambda: clock.advance(100.0))  # a callback that moves time on: to 1101
    clock.call_at(1050.0, lambda: seen.append(clock.now()))  # due inside the nested advance
    clock.advance(5.0)  # outer target 1005
    assert seen == [1050.0]  # (ran: the nested advance passed it)
    # The clock never reads less than a callback's when that already ran.
    assert clock.now() >= 1101.0, clock.now()


def test_control_a_callback_that_schedules_instead_of_advancing() -> None:
    # Control: the same timers without the nested advance keep the clock
    # monotonic and run each one in order.
    clock = ManualClock()
    seen: list[float] = []
    clock.call_at(1001.0, lambda: seen.append(clock.now()))
    clock.call_at(1050.0, lambda: seen.append(clock.now()))
    clock.advance(5.0)
    assert seen == [1001.0] and clock.now() == 1005.0
    clock.advance(100.0)
    assert seen == [1001.0, 1050.0] and clock.now() == 1105.0
