"""Review s62: the adaptive queue's drain rate counts only time in which
tasks waited (docs/backpressure.md, "Deadline-aware admission").

The core idles a connection released with nobody waiting inline, without
the policy's ``pick()``, so ``AdaptiveQueue.note_hand_on(now, backlog=False)``
is not called and ``last_hand_on`` still holds the last hand-on of the
previous backlog. The gap of the next backlog's first hand-on ran from
there, through the quiet spell: one sample of 100 s pulled the average to
~10 s, deadline-aware admission then refused every timed task, and with
nothing admitted no later gap could pull it back. The gap now runs from
the later of the last hand-on and ``last_empty`` (which the first waiter
to arrive sets). End to end: tests/integration/test_review_s62_adaptive_quiet_spell.py.
"""

from __future__ import annotations

from safepool._policy import AdaptiveQueue


def backlog(queue: AdaptiveQueue, start: float, gap: float, hand_ons: int) -> float:
    """``hand_ons`` hand-ons to waiting tasks ``gap`` seconds apart from
    ``start``; returns the last one's instant."""
    now = start
    for _ in range(hand_ons):
        queue.note_hand_on(now, True)
        now += gap
    return now - gap


def test_a_quiet_spell_between_two_backlogs_is_no_gap() -> None:
    queue = AdaptiveQueue(1.0, 10.0)
    last = backlog(queue, 0.0, 0.1, 10)
    queue.last_empty = last  # the last waiter was served
    # 100 s with nobody waiting, released connections idled inline (no
    # note_hand_on); a task arrives at an empty queue and waits 0.1 s.
    queue.last_empty = last + 100.0
    queue.note_hand_on(last + 100.1, True)
    assert queue.samples == 10
    assert abs(queue.gap - 0.1) < 1e-9
    assert queue.drain_gap(last + 100.1) is not None
    assert abs(queue.drain_gap(last + 100.1) - 0.1) < 1e-9  # type: ignore[operator]


def test_a_gap_while_tasks_waited_throughout_still_counts_whole() -> None:
    """The contrast: with tasks waiting all along (``last_empty`` before
    the last hand-on), a slow hand-on is a slow gap."""
    queue = AdaptiveQueue(1.0, 10.0)
    queue.last_empty = -1.0
    last = backlog(queue, 0.0, 0.1, 10)
    queue.note_hand_on(last + 2.0, True)
    assert abs(queue.gap - (0.1 + 0.1 * (2.0 - 0.1))) < 1e-9


def test_a_slow_drain_rate_is_named_in_the_refusal_not_rounded_to_zero() -> None:
    """The refusal names the measured rate: a connection every 4 s is
    "0.25 connections/s" (it read "0 connections/s"); a fast one a whole
    number."""
    from safepool._policy import _rate

    assert _rate(4.0) == "0.25"
    assert _rate(0.5) == "2"
    assert _rate(0.1) == "10"
    assert _rate(0.0001234) == "8104"
    assert _rate(0.0) == "inf"
