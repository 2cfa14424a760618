"""Review s61, the timer check made permanent in the state core's walks
(helper-188): once a timer has fired (``advance(now)``), ``next_deadline()``
is later than ``now``, or None (test_state_fuzz.check_timer_moved_on, used
by the random walks and the hypothesis machine, whose clocks now start at
awkward readings too). The runner arms its one timer for the next deadline;
one at an instant already past fires again at once.

Run strictly (no allowance), the walks found one more such deadline, at any
clock reading: some 4% of the capped walks and a few plain ones with a
queue policy, resolved by one to three re-fires at the same instant (each
gives a connect up, so no busy loop; the walks let it through on that
condition until it is fixed)."""

from __future__ import annotations

from safepool._state import Abandon, Connect, TimeOut

from .test_state import fields, make, take


def test_the_orphan_timer_moves_on_once_it_fired() -> None:
    """A queue policy (``max_site_share=1.0``), ``max_size=3``, unpaced.
    Three tasks of site b (``timeout=0.05``) each start a connect at 0.0,
    unanswered (a black hole), and time out at 0.05: three orphans. Task D
    arrives at 0.06, the pool full: it is the one eligible task no connect
    was opened for, so the oldest orphan is presumed lost at 0.0 + 0.1
    (the hedge delay), the deadline armed. When that timer fires at 0.1,
    advance gives the oldest up (an ``Abandon``); the next deadline must
    then be later than 0.1, or None (D has no timeout). It was 0.1 again:
    the next orphan, as old, was given up only at a second fire at 0.1, the
    third at a third (the walks' strict check saw up to three), though
    D needs one connect, and the others might still answer. Fixed: a
    connect given up, while it is being cancelled, still backs the task it
    was counted for in ``_orphans()``: one is given up, the others stay
    until another task needs them
    (test_state.py::test_with_a_queue_policy_only_as_many_lost_connects_are_cancelled_as_tasks_need)."""
    state = make(max_size=3, max_site_share=1.0)
    for _ in range(3):
        state.enqueue(object(), 0.0, 0.05, "b")
    assert len(take(state, Connect)) == 3
    state.advance(0.05)
    assert len(take(state, TimeOut)) == 3
    state.enqueue(object(), 0.06, None, "b")
    assert not state.actions  # the pool is full: no connect of D's own
    assert state.next_deadline() == 0.0 + 0.1
    state.advance(0.1)
    assert len(fields(take(state, Abandon))) == 1  # one task waits: one connect given up
    deadline = state.next_deadline()
    assert deadline is None or deadline > 0.1, f"due again at {deadline!r} once the timer fired at 0.1"

