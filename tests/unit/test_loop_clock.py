"""LoopClock on uvloop, whose clock counts whole milliseconds and whose
call_at() rounds a delay to the nearest one: a timer armed for a deadline
runs once the clock has reached it, never before (the pool re-armed a timer
that ran early, in a busy loop until the millisecond ticked)."""

from __future__ import annotations

import asyncio
import functools
import math
import random

import uvloop

from safepool._clock import LoopClock, _due_millisecond


def test_due_millisecond_is_the_first_tick_not_before_the_deadline() -> None:
    rng = random.Random(7)
    whens = [rng.uniform(1.0, 1e7) for _ in range(20_000)]
    whens += [n / 1000 for n in rng.sample(range(10**10), 2_000)]  # on a tick already
    whens += [n / 1000 + 1e-9 for n in rng.sample(range(10**10), 2_000)]  # a hair past one
    for when in whens:
        due = _due_millisecond(when)
        tick = round(due * 1000)
        assert due == tick / 1000, when
        assert due >= when, when
        assert (tick - 1) / 1000 < when, when
    assert _due_millisecond(8785.834) == 8785.834


async def _fire_times(offsets: list[float]) -> list[tuple[float, float]]:
    """(deadline, clock reading in its callback) for a timer per offset."""
    loop = asyncio.get_running_loop()
    clock = LoopClock(loop)
    start = clock.now()
    seen: list[tuple[float, float]] = []
    done = loop.create_future()

    def fire(when: float) -> None:
        seen.append((when, clock.now()))
        if len(seen) == len(offsets):
            done.set_result(None)

    for offset in offsets:
        clock.call_at(start + offset, functools.partial(fire, start + offset))
    await asyncio.wait_for(done, 5)
    return seen


def test_uvloop_timers_never_run_before_their_deadline() -> None:
    # Deadlines across two milliseconds, the first half of each included
    # (uvloop ran those up to half a millisecond early), and float sums
    # that land a hair past a tick (those ran early by ~1e-12 s).
    offsets = [0.002 + k / 10_000 for k in range(20)] + [0.013, 0.037, 0.021, 0.05]
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        seen = runner.run(_fire_times(offsets))
    assert len(seen) == len(offsets)
    early = [(when, now) for when, now in seen if now < when]
    assert early == []


def test_an_infinite_deadline_is_passed_on() -> None:
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        clock = LoopClock(runner.get_loop())
        clock.call_at(math.inf, lambda: None).cancel()


def test_a_deadline_too_far_for_milliseconds_is_passed_on() -> None:
    """A finite deadline whose count of milliseconds is past a float's range
    (``max_lifetime=1e306``, a ``lease_timeout`` of as many seconds): uvloop
    takes it as it takes infinity (its longest sleep). Rounded to a
    millisecond first, it raised OverflowError from the pool's timer, where
    the pool had already opened the lease or started."""
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        clock = LoopClock(runner.get_loop())
        for when in (1e306, 1.7e308):
            clock.call_at(when, lambda: None).cancel()
