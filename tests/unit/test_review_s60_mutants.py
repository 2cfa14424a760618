"""Review s60, hand-made mutation review, the state core's part: behaviour
no test caught when it was broken on purpose (one small edit of
safepool/_state.py at a time). Driven as tests/unit/test_state.py drives
the core: no event loop, no database, ``now`` passed in."""

from __future__ import annotations

from typing import Any

from safepool._state import Action, Backoff, Close, PoolState, ReleaseOutcome

CLEAN = ReleaseOutcome.CLEAN


def _make(max_size: int) -> PoolState:
    return PoolState(max_size=max_size, backoff=Backoff(base=1.0, cap=8.0, rng=lambda: 1.0))


def _take(state: PoolState, kind: type[Action]) -> list[Any]:
    taken = [a for a in state.actions if isinstance(a, kind)]
    state.actions[:] = [a for a in state.actions if not isinstance(a, kind)]
    return taken


def test_oldest_wait_age_skips_a_task_that_stopped_waiting_at_the_head() -> None:
    """``stats().oldest_wait_age`` (health's "saturated", the exporters'
    oldest wait) is the age of the longest-waiting task that still waits.
    A task that gave up stays in the core's queue until it is compacted
    (settled waiters are skipped lazily): it must not count.

    Mutation killed: ``oldest_waiter_age`` no longer skips settled waiters
    (the cancelled head's age was reported)."""
    state = _make(max_size=1)
    slot = state.add_connecting(0.0)
    state.connect_succeeded(slot, object(), 0.0)
    held = state.try_acquire(0.0)
    assert held is not None
    first = state.enqueue("first", 0.0, None)
    state.enqueue("second", 5.0, None)
    state.cancel_waiter(first, 6.0)
    assert state.waiting == 1
    assert state.oldest_waiter_age(10.0) == 5.0
    state.check_invariants()


def test_a_shrink_closes_the_least_recently_used_idle_connections_first() -> None:
    """``resize()`` to fewer connections closes idle ones now, oldest
    (least recently used) first: the connection kept is the one used last,
    as the idle stack hands out the most recently used one first (LIFO).

    Mutation killed: ``resize`` closes from the other end of the idle
    stack (the most recently used first)."""
    state = _make(max_size=3)
    slots = []
    for _ in range(3):
        slot = state.add_connecting(0.0)
        state.connect_succeeded(slot, object(), 0.0)
        slots.append(slot)
    # Lease all three, then release them in a known order: the last one
    # released is the most recently used.
    leases = [state.try_acquire(1.0) for _ in range(3)]
    assert all(lease is not None for lease in leases)
    order = sorted(leases, key=lambda lease: lease.slot.id)  # type: ignore[union-attr]
    for when, lease in enumerate(order, start=2):
        state.release(lease, float(when), CLEAN)  # type: ignore[arg-type]
    state.actions.clear()
    state.resize(1, 10.0)
    closed = [action.slot for action in _take(state, Close)]
    assert closed == [order[0].slot, order[1].slot]  # type: ignore[union-attr]
    kept = state.try_acquire(11.0)
    assert kept is not None and kept.slot is order[2].slot  # type: ignore[union-attr]
    state.check_invariants()
