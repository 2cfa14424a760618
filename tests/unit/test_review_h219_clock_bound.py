"""Review h219: ManualClock's bound (MAX_READING, 2**32 s either way of 0;
safepool/_clock.py) at its edges. Pinned: the bound itself is a reading
(start there, advance(0) there, a negative start advanced up to it, a
timer due exactly there fires); one float step past it is refused, for a
start as for an advance; a refused advance changes nothing (no timer runs,
the reading stays); ints and Fractions no float holds are refused as out of
range, not as a crash."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest

import safepool
from safepool._clock import MAX_READING, ManualClock

BOUND = 2**32


def test_the_bound_is_a_reading() -> None:
    assert MAX_READING == float(BOUND)
    clock = ManualClock(BOUND)
    clock.advance(0)
    assert clock.now() == BOUND
    clock.advance(1e-300)  # (rounds to the bound: still no further)
    assert clock.now() == BOUND
    low = ManualClock(-BOUND)
    low.advance(2 * BOUND)
    assert low.now() == BOUND


def test_a_timer_due_at_the_bound_fires() -> None:
    clock = ManualClock(BOUND - 1)
    fired: list[float] = []
    clock.call_at(BOUND, lambda: fired.append(clock.now()))
    clock.advance(1)
    assert fired == [BOUND] and clock.now() == BOUND


@pytest.mark.parametrize("start", [
    math.nextafter(float(BOUND), math.inf), -math.nextafter(float(BOUND), math.inf), BOUND + 1, -(BOUND + 1),
    10**400, -(10**400), Fraction(BOUND + 1), Fraction(10**400, 3),
])
def test_a_start_past_the_bound_is_refused(start: object) -> None:
    with pytest.raises(safepool.PoolValueError, match="within 4294967296 seconds of 0"):
        ManualClock(start)  # type: ignore[arg-type]


def test_an_advance_past_the_bound_is_refused_and_changes_nothing() -> None:
    clock = ManualClock(BOUND - 10)
    fired: list[float] = []
    clock.call_at(BOUND - 5, lambda: fired.append(clock.now()))
    for seconds in (10.000001, 11, math.inf, float(BOUND)):
        with pytest.raises(safepool.PoolValueError, match="past 4294967296 seconds"):
            clock.advance(seconds)
        assert fired == [] and clock.now() == BOUND - 10
    with pytest.raises(OverflowError):
        clock.advance(10**400)  # (DurationTooLarge: too large for a float)
    clock.advance(10)
    assert fired == [BOUND - 5] and clock.now() == BOUND
    with pytest.raises(safepool.PoolValueError):
        clock.advance(math.ulp(float(BOUND)))
    clock.advance(0)
    assert clock.now() == BOUND
