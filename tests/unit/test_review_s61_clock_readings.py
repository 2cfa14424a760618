"""Review s61, the timers at awkward clock readings (helper-185), in the
state core: no event loop, no database. The runner arms its one timer for
``PoolState.next_deadline()`` and, when it fires, calls ``advance(now)``;
a deadline that ``advance()`` leaves where it was, with nothing done, is
re-armed for an instant already past, again and again (the pool-level
reproduction, through the fault proxy's black hole on a ``ManualClock``:
tests/faults/test_review_s61_clock_readings.py). Found by the state
core's random walks run with that check (about 2% of the capped walks,
and some uncapped ones, at any clock reading). Fixed: ``next_deadline``
counts the connects given up towards ``max_connecting``, as
``_plan_connects`` does."""

from __future__ import annotations

from safepool._state import REFUSED, Abandon, Connect, Fail, TimeOut

from .test_state import fields, make, take


def test_the_hedge_deadline_moves_on_once_it_fired_with_an_abandoned_connect_at_max_connecting() -> None:
    """Unpaced, ``max_size=3``, ``max_connecting=2``. Task A
    (``timeout=0.5``) and task B wait on a connect each; B's is refused
    (B gets the error, as on asyncpg's pool; hedging is on now). At 0.5 A
    times out; task C arrives and takes A's connect over, already older
    than the hedge delay (0.1 s): it is given up (``Abandon``) and C's own
    connect starts. The given-up connect still counts towards
    ``max_connecting`` until its cancellation is reported, so at C's
    connect's hedge instant (0.6) no hedge can start: once the timer has
    fired there, the next deadline must be later (C has no timeout:
    None, or anything after 0.6, will do), not 0.6 again."""
    state = make(max_size=3, max_connecting=2)
    a = state.enqueue(object(), 0.0, 0.5)
    state.enqueue(object(), 0.0, None)
    _, refused = fields(take(state, Connect))
    state.connect_failed(refused, 0.0, ConnectionRefusedError("refused"), REFUSED)
    assert len(take(state, Fail)) == 1
    state.advance(0.5)
    assert fields(take(state, TimeOut)) == [a]
    state.enqueue(object(), 0.5, None)
    assert len(take(state, Abandon)) == 1 and len(take(state, Connect)) == 1
    hedge_at = 0.5 + 0.1  # C's connect's hedge instant (armed today; with no room it need not be)
    assert state.next_deadline() in (None, hedge_at)
    state.advance(hedge_at)
    assert not take(state, Connect)  # max_connecting: the given-up connect still counts
    deadline = state.next_deadline()
    assert deadline is None or deadline > hedge_at, f"due again at {deadline!r}: the timer spins"
