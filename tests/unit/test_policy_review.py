"""Review of the adaptive queue together with site caps (docs/backpressure.md,
"Adaptive queue": "With max_site_share, the queue is the waiters of sites
under their cap: while its site is at its cap, a waiter neither makes it
stand (waiters of capped sites alone leave it empty) nor is shed or refused
by deadline-aware admission; each waits up to its own timeout"). The state
core driven directly: no event loop, no database, time as plain numbers."""

from __future__ import annotations

import pytest

from safepool._policy import AdaptiveQueue
from safepool._state import Backoff, PoolState, ReleaseOutcome, Shed, WaiterState, Wake

CLEAN = ReleaseOutcome.CLEAN


def capped_adaptive(max_size: int) -> PoolState:
    state = PoolState(
        max_size=max_size,
        max_site_share=0.5,
        adaptive=AdaptiveQueue(0.01, 0.1),
        backoff=Backoff(rng=lambda: 1.0),
    )
    for _ in range(max_size):
        state.connect_succeeded(state.add_connecting(0.0), object(), 0.0)
    return state


@pytest.mark.parametrize("max_size", [1, 2, 4])
def test_a_capped_sites_waiter_is_served_when_its_site_leaves_the_cap(max_size: int) -> None:
    """Site "a" holds its cap; its next task waits (timeout 5 s) while no
    task of a site under its cap waits: the queue is empty. A second later
    one of "a"'s leases ends. Its waiter must get a connection (the one
    released, or an idle one). It was shed with PoolOverloadedError
    instead, its message saying "the wait queue has not been empty for
    1.000s", and the pool was left with idle connections: max_size=1 and
    any share (every waiter of a one-site program is capped) sheds every
    task that waited longer than queue_interval."""
    state = capped_adaptive(max_size)
    held = [state.try_acquire(0.0, "a") for _ in range(state.site_cap or 0)]
    assert all(held) and state.try_acquire(0.0, "a") is None
    waiter = state.enqueue(object(), 0.0, 5.0, "a")
    assert not waiter.shed and waiter.deadline == 5.0
    state.release(held[0], 1.0, CLEAN)  # type: ignore[arg-type]
    assert not [a for a in state.actions if isinstance(a, Shed)], [a.reason for a in state.actions if isinstance(a, Shed)]
    assert waiter.state is WaiterState.GRANTED
    assert [a.waiter for a in state.actions if isinstance(a, Wake)] == [waiter]
    state.check_invariants()


def test_a_capped_sites_waiter_is_served_when_resize_raises_the_cap() -> None:
    """docs/backpressure.md, "Resizing at run time": "grow: waiters get new
    connections at once". Site "a" at its cap (1 of max_size=2), its next
    task waiting 1 s with nobody else waiting, an idle connection beside
    it; resize(max_size=4) raises the cap to 2. The waiter must get the
    idle connection; it was shed."""
    state = capped_adaptive(2)
    assert state.try_acquire(0.0, "a") is not None
    waiter = state.enqueue(object(), 0.0, 5.0, "a")
    state.resize(4, 1.0)
    assert state.site_cap == 2
    assert waiter.state is WaiterState.GRANTED, [getattr(a, "reason", a) for a in state.actions]
    state.check_invariants()


def test_a_capped_sites_waiter_keeps_its_timeout_while_the_queue_stands() -> None:
    """"A route at its cap with acquire_timeout=5 thus fails after 5 s, not
    after queue_target". Site "a" holds its cap (2 of 4); site "b" (under
    its cap) has had a task waiting for 0.5 s: the queue stands. "a"'s next
    task (timeout 5 s) must wait up to 5 s; it got the 0.01 s target and
    was shed with PoolOverloadedError at 0.51 s."""
    state = capped_adaptive(4)
    assert state.try_acquire(0.0, "a") and state.try_acquire(0.0, "a")
    assert state.try_acquire(0.0, "b") and state.try_acquire(0.0, "c")
    state.enqueue(object(), 0.0, None, "b")  # untimed: never shed, the queue stands
    waiter = state.enqueue(object(), 0.5, 5.0, "a")
    state.advance(0.52)
    assert waiter.state is WaiterState.WAITING, [getattr(a, "reason", a) for a in state.actions]
    assert waiter.deadline == 5.5 and not waiter.shed
    state.check_invariants()


def test_a_waiter_is_judged_by_its_wait_since_its_site_left_the_cap() -> None:
    """A site's waiters waited at its cap, which sheds nobody: once
    resize() lifts the cap they join the queue, and a standing queue sheds
    them only after queue_target more (they were shed at the next arrival,
    their whole wait counted)."""
    state = capped_adaptive(4)
    assert state.try_acquire(0.0, "a") and state.try_acquire(0.0, "a")
    assert state.try_acquire(0.0, "b") and state.try_acquire(0.0, "c")
    state.enqueue(object(), 0.0, None, "b")  # untimed, under its cap: the queue stands from 0.1 on
    capped = state.enqueue(object(), 0.0, 5.0, "a")
    state.resize(6, 1.0)  # cap 3: "a" is under it, a connect is planned for its waiter
    assert state.site_cap == 3
    state.enqueue(object(), 1.005, 5.0, "d")  # an arrival in the standing queue
    assert capped.state is WaiterState.WAITING, [getattr(a, "reason", a) for a in state.actions]
    state.enqueue(object(), 1.02, 5.0, "e")  # queue_target after it joined: the next arrival sheds it
    assert capped.state is WaiterState.FAILED and capped in [a.waiter for a in state.actions if isinstance(a, Shed)]
    state.check_invariants()
