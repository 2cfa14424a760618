"""``max_lifetime`` in the state core: when each connection's lifetime runs
out, and what becomes of it in each state it can be in then. No event loop,
no database (tests/integration/test_max_lifetime.py runs it on PostgreSQL)."""

from __future__ import annotations

import math

import pytest

from safepool._state import (
    LIFETIME_JITTER,
    RETIRE_RETRY,
    Close,
    Connect,
    PoolState,
    SlotState,
    Wake,
)

from .test_state import CLEAN, DISCARD, RESET, connect_all, fields, fill, make, take

GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0


def expected_expiry(opened_at: float, nth: int, lifetime: float) -> float:
    """When the ``nth`` connection the pool opened (from 1) leaves."""
    return opened_at + lifetime * (1.0 - LIFETIME_JITTER * ((nth * GOLDEN) % 1.0))


@pytest.fixture(autouse=True)
def _invariants_of_every_state(monkeypatch: pytest.MonkeyPatch) -> object:
    """Every core a test makes has balanced books after each of its calls
    that moves time (the stale-timer count included)."""
    made: list[PoolState] = []
    original = PoolState.__init__

    def tracked(self: PoolState, *args: object, **kwargs: object) -> None:
        original(self, *args, **kwargs)  # type: ignore[arg-type]
        made.append(self)

    monkeypatch.setattr(PoolState, "__init__", tracked)
    yield
    for state in made:
        state.check_invariants()


def test_off_by_default_arms_nothing() -> None:
    state = make(max_size=2)
    fill(state, 2)
    assert state.max_lifetime is None
    assert all(slot.expires_at is None for slot in state.slots())
    assert state.next_deadline() is None


def test_each_connection_leaves_within_the_last_tenth_of_its_lifetime_spread_apart() -> None:
    """Ten connections opened at once: each expiry is the golden-ratio
    point of [0.9, 1.0] x max_lifetime for its place in the opening order,
    no two alike, and the first falls due first on the core's clock."""
    state = make(max_size=10, max_lifetime=100.0)
    fill(state, 10, now=5.0)
    expiries = sorted(slot.expires_at for slot in state.slots())  # type: ignore[type-var]
    assert expiries == sorted(expected_expiry(5.0, n, 100.0) for n in range(1, 11))
    assert all(95.0 <= when <= 105.0 for when in expiries)  # (type: ignore above: all set)
    assert len(set(expiries)) == 10
    # Spread evenly: no gap between neighbours above a fifth of the range.
    assert max(b - a for a, b in zip(expiries, expiries[1:], strict=False)) < 10.0 / 5
    assert state.next_deadline() == expiries[0]


def test_an_idle_connection_is_closed_when_its_lifetime_runs_out_and_replaced_to_min_size() -> None:
    state = make(max_size=2, min_size=2, max_lifetime=60.0)
    fill(state, 2)
    state.start_floor()
    first, second = sorted(state.slots(), key=lambda slot: slot.expires_at)  # type: ignore[arg-type,return-value]
    state.advance(first.expires_at - 0.001)  # type: ignore[operator]
    assert take(state, Close) == []
    state.advance(first.expires_at)  # type: ignore[arg-type]
    assert fields(take(state, Close)) == [first]
    assert first.state is SlotState.CLOSING and second.state is SlotState.IDLE
    assert state.counters.connections_retired == 1
    # The replacement waits for the close: never more than max_size at once.
    assert take(state, Connect) == []
    state.closed(first, 60.0)
    [replacement] = fields(take(state, Connect))
    state.connect_succeeded(replacement, object(), 61.0)
    assert replacement.expires_at == expected_expiry(61.0, 3, 60.0)
    assert state.counters.connections_closed == 1 and state.counters.connections_opened == 3


def test_below_max_size_the_replacement_opens_beside_the_closing_connection() -> None:
    """The closing connection counts towards max_size until its close is
    done: at max_size (above) the replacement waits for it; with room under
    max_size it opens at once, the closing one counted beside it."""
    state = make(max_size=3, min_size=2, max_lifetime=60.0)
    fill(state, 2)
    state.start_floor()
    first = min(state.slots(), key=lambda slot: slot.expires_at)  # type: ignore[arg-type,return-value]
    state.advance(first.expires_at)  # type: ignore[arg-type]
    assert fields(take(state, Close)) == [first]
    [replacement] = fields(take(state, Connect))
    assert state.size == 3 == state.max_size and first.state is SlotState.CLOSING

def test_a_leased_connection_keeps_its_lease_and_is_closed_when_released() -> None:
    """The lifetime never cuts a lease short: the connection is closed when
    it comes back, whatever the release would have done with it."""
    for outcome in (CLEAN, RESET, DISCARD):
        state = make(max_size=1, max_lifetime=10.0)
        fill(state, 1)
        lease = state.try_acquire(1.0)
        assert lease is not None
        state.advance(20.0)
        assert take(state, Close) == [] and lease.active and lease.slot.state is SlotState.LEASED
        assert state.counters.connections_retired == 1
        # The release's outcome is decided by the core from what the I/O
        # layer saw: an expired connection is discarded, not reset.
        assert state.release_outcome(lease, 3, marked=False) is DISCARD
        assert state.release(lease, 21.0, outcome) is (outcome is RESET)
        if outcome is RESET:
            assert take(state, Close) == []
            assert state.reset_done(lease.slot, 22.0, ok=True)
        assert fields(take(state, Close)) == [lease.slot]


def test_a_connection_granted_to_a_waiter_when_its_lifetime_runs_out_serves_that_lease_then_closes() -> None:
    state = make(max_size=1, max_lifetime=10.0)
    fill(state, 1)
    held = state.try_acquire(1.0)
    assert held is not None
    waiter = state.enqueue("task", 1.0, None)
    state.release(held, 2.0, CLEAN)
    assert take(state, Wake) == [Wake(waiter)]
    state.advance(20.0)  # (before the woken task runs)
    lease = state.claim(waiter, 20.0)
    assert take(state, Close) == []
    state.release(lease, 21.0, CLEAN)
    assert fields(take(state, Close)) == [lease.slot]


@pytest.mark.parametrize("ending", ["expire_connections", "connection lost", "resize", "terminate"])
def test_a_connection_closed_before_its_lifetime_runs_out_leaves_no_live_timer(ending: str) -> None:
    """Its timer entry goes stale (and is counted so: check_invariants) and
    never fires: no retirement counted, nothing closed twice. (resize keeps
    one connection: that one's lifetime runs out as usual.)"""
    state = make(max_size=2, max_lifetime=10.0)
    fill(state, 2)
    lease = state.try_acquire(0.0)
    assert lease is not None
    if ending == "expire_connections":
        state.expire_connections()
        state.release(lease, 1.0, CLEAN)
    elif ending == "connection lost":
        state.connection_lost(lease.slot, 1.0)
        for slot in state.slots():
            if slot is not lease.slot:
                state.connection_lost(slot, 1.0)
    elif ending == "resize":
        state.resize(1, 1.0)
        state.release(lease, 1.0, CLEAN)
    else:
        state.set_phase(state.phase.CLOSING)
        state.begin_close(RuntimeError("closing"))
        state.terminate(1.0)
    closing = fields(take(state, Close))
    assert closing and all(slot.expires_at is None for slot in closing)
    state.check_invariants()
    survivors = [slot for slot in state.slots() if slot.state is SlotState.IDLE]
    assert len(survivors) == (1 if ending == "resize" else 0)
    state.advance(100.0)
    assert state.counters.connections_retired == len(survivors)
    assert fields(take(state, Close)) == survivors


def test_a_connection_being_reset_when_its_lifetime_runs_out_closes_after_the_reset() -> None:
    state = make(max_size=1, max_lifetime=10.0)
    fill(state, 1)
    lease = state.try_acquire(1.0)
    assert lease is not None
    assert state.release(lease, 2.0, RESET)
    state.advance(20.0)
    assert take(state, Close) == [] and lease.slot.state is SlotState.RESETTING
    assert state.reset_done(lease.slot, 21.0, ok=True)
    assert fields(take(state, Close)) == [lease.slot]


def test_connections_opened_for_waiters_get_their_lifetime_too() -> None:
    state = make(max_size=2, max_lifetime=30.0)
    waiter = state.enqueue("task", 0.0, None)
    connect_all(state, now=4.0)
    [slot] = [w.slot for w in fields(take(state, Wake))]
    assert slot is not None and waiter.slot is slot
    assert slot.expires_at == expected_expiry(4.0, 1, 30.0)


def test_while_connects_fail_a_connection_whose_lifetime_ran_out_is_kept_until_one_succeeds() -> None:
    """A server that refuses new connections (full of another client's, as
    in the incident) must not cost the pool its working ones: they stay,
    looked at again every RETIRE_RETRY seconds, and leave once a connect
    succeeded."""
    state = make(max_size=3, max_lifetime=10.0)
    fill(state, 2)
    failing = state.add_connecting(1.0)
    state.connect_failed(failing, 1.0, OSError("the server refuses"))
    take(state, Connect)
    state.advance(20.0)
    state.advance(20.0 + RETIRE_RETRY)
    assert take(state, Close) == [] and state.counters.connections_retired == 0
    assert sorted(slot.expires_at for slot in state.slots()) == [20.0 + 2 * RETIRE_RETRY] * 2
    assert state.idle == 2
    opened = state.add_connecting(21.5)
    state.connect_succeeded(opened, object(), 21.5)
    state.advance(20.0 + 2 * RETIRE_RETRY)
    assert len(take(state, Close)) == 2 and state.counters.connections_retired == 2
    assert opened.state is SlotState.IDLE
