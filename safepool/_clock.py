"""Clocks: the event loop's, and a manual one for deterministic tests."""

from __future__ import annotations

import asyncio
import heapq
import itertools
import math
import time
from collections.abc import Callable
from typing import Protocol

from ._durations import check_seconds_type, validate_timeout
from .errors import PoolValueError


class Timer(Protocol):
    def cancel(self) -> None: ...


class Clock(Protocol):
    """What the pool needs of time: read it, and be called back at a moment."""

    def now(self) -> float:
        """The current time in seconds, monotonic (any origin: only
        differences and comparisons with :meth:`call_at`'s ``when`` count)."""

    def call_at(self, when: float, callback: Callable[[], None]) -> Timer:
        """Call ``callback()`` once :meth:`now` reads ``when`` (seconds, on
        this clock) or later, unless the returned timer's ``cancel()`` is
        called first. Callbacks due together run in the order they were
        scheduled."""


class LoopClock:
    """The running event loop's monotonic clock (the default)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        # A bound method: no extra call layer on the hot path. asyncio's own
        # loops read time.monotonic() (BaseEventLoop.time): call it directly,
        # one call instead of two. Other loops (uvloop) keep their own clock,
        # which their call_at() uses.
        time_method = getattr(type(loop), "time", None)
        self.now = time.monotonic if time_method is asyncio.BaseEventLoop.time else loop.time
        # uvloop keeps time in whole milliseconds and rounds a call_at()
        # delay to the nearest one: a deadline in the first half of a
        # millisecond (or a float hair past one) fired before it was due, and
        # the pool re-armed it, up to a hundred times in a busy loop, until
        # the clock ticked. Its timers are armed for the first millisecond at
        # which the deadline is due. (A subclass of uvloop.Loop is uvloop.)
        self._milliseconds = any(cls.__module__.partition(".")[0] == "uvloop" for cls in type(loop).__mro__)

    def call_at(self, when: float, callback: Callable[[], None]) -> Timer:
        # (A deadline whose milliseconds overflow a float is as far as
        # infinity: uvloop caps both at its longest sleep.)
        if self._milliseconds and math.isfinite(when * 1000):
            when = _due_millisecond(when)
        return self._loop.call_at(when, callback)


def _due_millisecond(when: float) -> float:
    """The first time a millisecond clock reads (``n / 1000``) that is not
    before ``when``. ``when * 1000`` may round across a whole number, either
    way: checked against the division the clock itself does."""
    tick = math.ceil(when * 1000)
    if tick / 1000 < when:
        tick += 1
    elif (tick - 1) / 1000 >= when:
        tick -= 1
    return tick / 1000


class _ManualTimer:
    __slots__ = ("cancelled",)

    def __init__(self) -> None:
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


# The furthest a ManualClock reads, either way of 0 (seconds; about 136
# years): a float's step there is 2**-20 s, under a microsecond.
MAX_READING = float(2**32)


class ManualClock:
    """Time that moves only when a test says so: ``advance(dt)`` runs every
    callback due by then, in order, with no real sleep."""

    def __init__(self, start: float = 1000.0) -> None:
        """:param start: the clock's first reading, in seconds (default
            1000.0; within ``MAX_READING`` seconds of 0: only differences count).
        :raises TypeError: ``start`` is not a number (bool included).
        :raises ValueError: ``start`` is NaN or infinite, or beyond
            ``MAX_READING`` seconds either way of 0 (see :meth:`advance`)."""
        check_seconds_type("ManualClock(start)", start, allow_none=False)
        try:
            finite = math.isfinite(start)
        except OverflowError:  # (an int no float holds)
            finite = True
        if not finite:
            raise PoolValueError(f"ManualClock(start) must be a finite number of seconds, got {start!r}")
        if not abs(start) <= MAX_READING:
            raise PoolValueError(
                f"ManualClock(start) must be within {MAX_READING:.0f} seconds of 0, where a float still holds a "
                f"microsecond, got {start!r}"
            )
        self._now = start
        self._due: list[tuple[float, int, _ManualTimer, Callable[[], None]]] = []
        self._seq = itertools.count()

    def now(self) -> float:
        """The clock's time in seconds: ``start``, plus every ``advance()``."""
        return self._now

    def call_at(self, when: float, callback: Callable[[], None]) -> Timer:
        """Schedule ``callback()`` for when :meth:`advance` reaches ``when``
        (seconds); a ``when`` already past runs at the next ``advance()``, even
        ``advance(0)``. Returns a timer whose ``cancel()`` drops it."""
        timer = _ManualTimer()
        heapq.heappush(self._due, (when, next(self._seq), timer, callback))
        return timer

    def advance(self, seconds: float) -> None:
        """Move the clock ``seconds`` forward, running each callback due by
        then, in due order (ties in scheduling order), with :meth:`now`
        reading each callback's ``when`` (the current time, for one already
        past) while it runs; a callback may
        schedule more, which run too if due. Synchronous: a callback that
        wakes a task (a future's result) takes effect when the test next
        yields to the loop (``await asyncio.sleep(0)``).

        A callback that raises does not stop the advance: as the event loop
        goes on past a callback that raised, every other due callback runs
        and the clock reaches its target; then the error is raised from
        ``advance()`` (where the loop would log it, the test sees it: a
        warning turned into an error, a pool callback's bug). Several:
        raised together, an :class:`ExceptionGroup` (a
        :class:`BaseExceptionGroup` if one is not an ``Exception``) of
        them in the order they were raised. ``KeyboardInterrupt`` and
        ``SystemExit`` propagate at once, as from the loop (the clock then
        reads that callback's ``when``; later callbacks stay due), with
        the errors raised before it as its ``__context__``. A callback's
        own ``advance()`` never moves the clock back.

        :raises Exception: what a callback raised (see above).
        :raises TypeError: ``seconds`` is not a number (bool included).
        :raises ValueError: ``seconds`` is negative or NaN (the clock is
            monotonic: it never moves back), or so large that the clock
            would read past ``MAX_READING`` seconds (infinity included):
            there a float no longer holds a microsecond, so a lease's
            deadline would equal its start (and at infinity every duration
            would be NaN). To run every timer, advance past the last one."""
        target = self._now + validate_timeout("ManualClock.advance(seconds)", seconds, allow_none=False)
        if not target <= MAX_READING:
            raise PoolValueError(
                f"ManualClock.advance(seconds) would move the clock past {MAX_READING:.0f} seconds ({seconds!r} "
                f"after {self._now!r}), where a float no longer holds a microsecond; to run every timer, "
                "advance past the last one (a timer due past that reading never runs)"
            )
        errors: list[BaseException] = []
        while self._due and self._due[0][0] <= target:
            when, _, timer, callback = heapq.heappop(self._due)
            self._now = max(self._now, when)
            if not timer.cancelled:
                try:
                    callback()
                except (KeyboardInterrupt, SystemExit) as interrupt:
                    if errors and interrupt.__context__ is None:
                        # (The errors collected so far stay reachable from it,
                        # where the loop would have logged them: review h267.)
                        interrupt.__context__ = _one_error(errors)
                    raise
                except BaseException as exc:  # (asyncio's Handle._run: the loop goes on)
                    errors.append(exc)
        # (max: a callback's own advance() may have moved it further: never back; review h267)
        self._now = max(self._now, target)
        if errors:
            raise _one_error(errors)


def _one_error(errors: list[BaseException]) -> BaseException:
    """What :meth:`ManualClock.advance` raises for the callbacks' errors:
    the one, or an exception group of them in the order they were raised
    (a ``BaseExceptionGroup`` builds an ``ExceptionGroup`` when all are
    ``Exception``)."""
    if len(errors) == 1:
        return errors[0]
    return BaseExceptionGroup(f"{len(errors)} callbacks raised in ManualClock.advance()", errors)
