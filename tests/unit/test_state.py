"""The state core driven directly: no event loop, no database."""

from __future__ import annotations

import socket
from typing import Any

import pytest

from safepool._histogram import Histogram
from safepool._state import (
    BROKEN,
    NOT_REFUSED,
    REFUSED,
    STALE_FAILURE_AFTER,
    STALE_RECHECK,
    UNREACHABLE,
    UNRESOLVED,
    Abandon,
    Action,
    Backoff,
    Close,
    Closed,
    Connect,
    Fail,
    InternalStateError,
    LeakSuspect,
    LeaseState,
    NoteServerStatus,
    Observed,
    Overloaded,
    Phase,
    PoolState,
    ReleaseOutcome,
    Shed,
    Slot,
    SlotState,
    TakeBack,
    TimeOut,
    Unavailable,
    Waiter,
    WaiterState,
    Wake,
)

CLEAN, RESET, DISCARD = ReleaseOutcome.CLEAN, ReleaseOutcome.NEEDS_RESET, ReleaseOutcome.DISCARD


def no_jitter() -> Backoff:
    return Backoff(base=1.0, cap=8.0, rng=lambda: 1.0)


# The pacing of connects while they fail (one probe at a time, backed off,
# hedged), which fail_fast=True turns on: here with its breaker never open.
# Without it (asyncpg's way) each waiting task connects for itself.
PACED = {"breaker_threshold": 10**9}


def make(max_size: int = 2, **kwargs: object) -> PoolState:
    kwargs.setdefault("backoff", no_jitter())
    return PoolState(max_size=max_size, **kwargs)  # type: ignore[arg-type]


def take(state: PoolState, kind: type[Action]) -> list[Any]:
    """The core's actions of one kind (removed from its list), oldest first."""
    taken = [a for a in state.actions if isinstance(a, kind)]
    state.actions[:] = [a for a in state.actions if not isinstance(a, kind)]
    return taken


def fields(actions: list[Any]) -> list[Any]:
    """Each action's subject (its first field: the slot, waiter or lease)."""
    return [getattr(a, a.__match_args__[0]) for a in actions]


def connect_all(state: PoolState, now: float = 0.0) -> None:
    """Complete every planned connect, as the I/O layer would."""
    while True:
        planned = take(state, Connect)
        if not planned:
            return
        for slot in fields(planned):
            state.connect_succeeded(slot, object(), now)


def fill(state: PoolState, n: int, now: float = 0.0) -> None:
    for _ in range(n):
        slot = state.add_connecting(now)
        state.connect_succeeded(slot, object(), now)


@pytest.fixture(autouse=True)
def _invariants(request: pytest.FixtureRequest) -> object:
    yield
    for value in request.node.funcargs.values():
        if isinstance(value, PoolState):
            value.check_invariants()


def test_lease_times_held_back_stay_bounded_and_all_count() -> None:
    """The release path appends each lease time to ``lease_times.pending``
    and files them every Histogram.FOLD_AT values: memory stays bounded
    whatever the number of leases, and every lease is counted."""
    state = make()
    fill(state, 1)
    leases = 3 * Histogram.FOLD_AT + 5
    for i in range(leases):
        lease = state.try_acquire(float(i))
        assert lease is not None
        state.release(lease, i + 0.5, CLEAN)
        assert len(state.lease_times.pending) < Histogram.FOLD_AT
    assert state.lease_times.count == leases and state.lease_times.max == 0.5
    assert state.wait_times.count == leases and state.wait_times.snapshot().bucket_counts[0] == leases


def test_wait_times_held_back_stay_bounded_and_all_count() -> None:
    """A waiter's claim appends its wait to ``wait_times.pending`` (filed
    every Histogram.FOLD_AT values, or when read): every wait counts, with
    its value, and memory stays bounded."""
    state = make(max_size=1)
    fill(state, 1)
    held = state.try_acquire(0.0)
    assert held is not None
    waits = 3 * Histogram.FOLD_AT + 5
    for i in range(waits):
        now = float(i)
        waiter = state.enqueue(f"future {i}", now, None)
        state.release(held, now + 0.25, CLEAN)
        assert take(state, Wake) == [Wake(waiter)]
        held = state.claim(waiter, now + 0.25)
        assert len(state.wait_times.pending) < Histogram.FOLD_AT
    state.release(held, waits + 1.0, CLEAN)
    wait = state.wait_times.snapshot()
    assert wait.count == waits + 1  # (the first acquire did not wait)
    assert wait.sum == pytest.approx(0.25 * waits) and wait.max == 0.25
    assert wait.bucket_counts[0] == 1 and sum(wait.bucket_counts) == waits + 1


def test_idle_connection_is_leased_at_once() -> None:
    state = make()
    fill(state, 1)
    lease = state.try_acquire(1.0)
    assert lease is not None and lease.slot.state is SlotState.LEASED
    assert state.in_use == 1 and state.idle == 0
    state.check_invariants()
    assert state.release(lease, 2.0, CLEAN) is False
    assert state.idle == 1 and state.counters.resets_skipped == 1
    assert state.lease_times.count == 1 and state.lease_times.sum == pytest.approx(1.0)
    state.check_invariants()


def test_lifo_reuse_of_the_most_recent_connection() -> None:
    state = make()
    fill(state, 2)
    first = state.try_acquire(0)
    second = state.try_acquire(0)
    assert first and second
    state.release(first, 1, CLEAN)
    state.release(second, 2, CLEAN)
    again = state.try_acquire(3)
    assert again is not None and again.slot is second.slot


def test_waiter_triggers_a_connect_and_gets_it() -> None:
    state = make()
    assert state.try_acquire(0) is None
    waiter = state.enqueue("f", 0, None)
    [slot] = fields(take(state, Connect))
    assert state.size == 1 and state.connected() == 0
    state.connect_succeeded(slot, "conn", 0.5)
    assert take(state, Wake) == [Wake(waiter)]
    assert slot.state is SlotState.RESERVED
    lease = state.claim(waiter, 0.6)
    assert lease.slot is slot
    assert state.wait_times.max == pytest.approx(0.6)
    state.check_invariants()


def test_waiters_are_served_fifo_and_newcomers_do_not_jump_the_queue() -> None:
    state = make(max_size=1)
    fill(state, 1)
    held = state.try_acquire(0)
    assert held is not None
    waiters = [state.enqueue(i, i, None) for i in range(3)]
    state.release(held, 5, CLEAN)
    [woken] = fields(take(state, Wake))
    assert woken is waiters[0]
    # The connection is reserved for waiter 0: a newcomer must queue.
    assert state.try_acquire(5) is None
    lease = state.claim(waiters[0], 5)
    state.release(lease, 6, CLEAN)
    assert take(state, Wake) == [Wake(waiters[1])]


def test_cancel_while_waiting_removes_the_waiter() -> None:
    state = make(max_size=1)
    fill(state, 1)
    held = state.try_acquire(0)
    assert held
    waiter = state.enqueue("f", 0, None)
    state.cancel_waiter(waiter, 1)
    assert state.waiting == 0 and waiter.state is WaiterState.CANCELLED
    state.release(held, 2, CLEAN)
    assert not take(state, Wake)
    assert state.idle == 1


def test_cancel_after_grant_passes_the_connection_on() -> None:
    """The grant and the cancel race in one synchronous step (anyio's case)."""
    state = make(max_size=1)
    fill(state, 1)
    held = state.try_acquire(0)
    assert held
    first = state.enqueue("a", 0, None)
    second = state.enqueue("b", 0, None)
    state.release(held, 1, CLEAN)
    take(state, Wake)
    state.cancel_waiter(first, 1)  # granted, never claimed
    assert take(state, Wake) == [Wake(second)]
    assert state.claim(second, 2).slot is held.slot
    state.cancel_waiter(first, 3)  # a second cancel is harmless
    state.check_invariants()


def test_cancel_after_grant_with_nobody_waiting_idles_it() -> None:
    state = make(max_size=1)
    fill(state, 1)
    held = state.try_acquire(0)
    assert held
    waiter = state.enqueue("a", 0, None)
    state.release(held, 1, CLEAN)
    state.cancel_waiter(waiter, 1)
    assert state.idle == 1 and state.in_use == 0


def test_claim_of_a_cancelled_waiter_is_an_internal_error() -> None:
    state = make(max_size=1)
    waiter = state.enqueue("a", 0, None)
    state.cancel_waiter(waiter, 0)
    with pytest.raises(InternalStateError):
        state.claim(waiter, 0)


def test_overload_refuses_beyond_max_waiters() -> None:
    state = make(max_size=1, max_waiters=2)
    fill(state, 1)
    assert state.try_acquire(0)
    state.enqueue("a", 0, None)
    state.enqueue("b", 0, None)
    with pytest.raises(Overloaded):
        state.enqueue("c", 0, None)
    assert state.counters.overload_rejections == 1 and state.waiting == 2


def test_acquire_timeout_fires_at_the_deadline() -> None:
    state = make(max_size=1)
    fill(state, 1)
    assert state.try_acquire(0)
    waiter = state.enqueue("a", 10.0, timeout=2.0)
    assert state.next_deadline() == 12.0
    state.advance(11.9)
    assert not take(state, TimeOut)
    state.advance(12.0)
    assert take(state, TimeOut) == [TimeOut(waiter)]
    # Counted once its task gets the PoolTimeoutError (the I/O layer's
    # delivered()), so a cancellation that reaches it first is never counted.
    assert state.waiting == 0 and state.counters.acquire_timeouts == 0
    state.delivered(waiter)
    assert state.counters.acquire_timeouts == 1


def test_a_granted_waiter_does_not_time_out() -> None:
    state = make(max_size=1)
    fill(state, 1)
    held = state.try_acquire(0)
    assert held
    waiter = state.enqueue("a", 0, timeout=1.0)
    state.release(held, 0.5, CLEAN)
    state.advance(5.0)
    assert not take(state, TimeOut)
    assert state.claim(waiter, 5.0)


def test_release_with_reset_then_hand_off() -> None:
    state = make(max_size=1)
    fill(state, 1)
    held = state.try_acquire(0)
    assert held
    waiter = state.enqueue("a", 0, None)
    assert state.release(held, 1, RESET) is True
    assert held.slot.state is SlotState.RESETTING
    assert not take(state, Wake)
    # Resetting counts as supply: no extra connect for the waiter.
    assert not take(state, Connect)
    state.reset_done(held.slot, 2, ok=True)
    assert take(state, Wake) == [Wake(waiter)]


def test_failed_reset_closes_and_replaces_for_waiters() -> None:
    state = make(max_size=1)
    fill(state, 1)
    held = state.try_acquire(0)
    assert held
    state.enqueue("a", 0, None)
    state.release(held, 1, RESET)
    state.reset_done(held.slot, 2, ok=False)
    [closing] = fields(take(state, Close))
    assert closing is held.slot and state.size == 1  # still counted while closing
    assert not take(state, Connect)  # never above max_size
    state.closed(closing, 3)
    assert len(take(state, Connect)) == 1
    assert state.counters.resets_failed == 1


def test_discard_outcome_closes_the_connection() -> None:
    state = make(max_size=1)
    fill(state, 1)
    held = state.try_acquire(0)
    assert held
    state.release(held, 1, DISCARD)
    assert fields(take(state, Close))[0] is held.slot
    assert held.slot.state is SlotState.CLOSING


def test_lease_expiry_takes_the_connection_back() -> None:
    state = make(max_size=1)
    fill(state, 1)
    lease = state.try_acquire(0)
    assert lease
    state.arm_lease(lease, lease_timeout=5.0, warn_after=2.0)
    waiter = state.enqueue("a", 1, None)
    state.advance(2.0)
    assert take(state, LeakSuspect) == [LeakSuspect(lease)]
    state.advance(4.99)
    assert not take(state, TakeBack)
    state.advance(5.0)
    assert take(state, TakeBack) == [TakeBack(lease)]
    assert lease.expired and not lease.active and lease.slot.state is SlotState.RESETTING
    state.reset_done(lease.slot, 5.1, ok=True)
    assert take(state, Wake) == [Wake(waiter)]
    assert state.counters.leases_expired == 1 and state.counters.leak_warnings == 1


def test_lease_released_before_deadline_never_fires() -> None:
    state = make(max_size=1)
    fill(state, 1)
    lease = state.try_acquire(0)
    assert lease
    state.arm_lease(lease, lease_timeout=5.0, warn_after=1.0)
    state.release(lease, 0.5, CLEAN)
    state.advance(100)
    assert not state.actions
    assert state.next_deadline() is None


def test_timer_heap_does_not_grow_with_short_leases() -> None:
    state = make(max_size=1)
    fill(state, 1)
    for i in range(10_000):
        lease = state.try_acquire(i)
        assert lease
        state.arm_lease(lease, lease_timeout=1e6, warn_after=1e6)
        state.release(lease, i, CLEAN)
    assert len(state._timers) < 300
    assert not state._deadlines.entries and not state._warnings.entries  # released: out of the lease queues


def test_lease_timers_armed_out_of_order_fire_in_time_order() -> None:
    """Lease timers armed in the order they fall due (one lease_timeout for
    all) wait in a queue each; one armed earlier than the queue's last (a
    shorter lease_timeout= of its own) goes to the heap. Whichever holds
    them, advance() fires them in time order, a lease's deadline before its
    own warning at the same time, and a waiter's deadline among them."""
    state = make(max_size=6)
    fill(state, 5)
    leases = [state.try_acquire(0.0) for _ in range(5)]
    timeouts = [5.0, 1.0, 6.0, 3.0, 2.0]  # 1.0, 3.0 and 2.0 go to the heap
    warnings = [4.0, 4.0, 4.0, 4.0, 2.0]  # the last at 2.0 with its own deadline
    for lease, timeout, warn in zip(leases, timeouts, warnings, strict=True):
        assert lease
        assert state.arm_lease(lease, timeout, warn) == min(timeout, warn)
    assert len(state._deadlines.entries) == 2 and len(state._timers) == 4
    state.enqueue(object(), 0.0, 2.5)  # a waiter with a 2.5 s deadline (the pool has a slot to open)
    take(state, Connect)
    fired: list[tuple[float, str, Any]] = []
    for now in (0.5, 1.0, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 7.0):
        state.advance(now)
        for action in list(state.actions):
            if isinstance(action, (TakeBack, LeakSuspect, TimeOut)):
                subject = fields([action])[0]
                fired.append((now, type(action).__name__, getattr(subject, "id", "waiter")))
        state.actions.clear()
        state.check_invariants()
    ids = [lease.id for lease in leases if lease]
    assert fired == [
        (1.0, "TakeBack", ids[1]),
        (2.0, "TakeBack", ids[4]),  # its deadline, and so no warning for it
        (2.5, "TimeOut", "waiter"),
        (3.0, "TakeBack", ids[3]),
        (4.0, "LeakSuspect", ids[0]),
        (4.0, "LeakSuspect", ids[2]),
        (5.0, "TakeBack", ids[0]),
        (6.0, "TakeBack", ids[2]),
    ]
    assert state.next_deadline() is None
    assert not state._deadlines.entries and not state._warnings.entries and state._stale_timers == 0


def test_gc_reclaim_counts_a_leak_and_resets() -> None:
    state = make(max_size=1)
    fill(state, 1)
    lease = state.try_acquire(0)
    assert lease
    assert state.reclaim(lease, 3) is True
    assert state.counters.leaks_detected == 1 and lease.slot.state is SlotState.RESETTING
    assert state.reclaim(lease, 4) is False  # already ended: nothing to do


def test_connect_failure_with_no_connection_fails_waiters_then_opens_circuit() -> None:
    state = make(max_size=2, breaker_threshold=2)
    waiter = state.enqueue("a", 0, None)
    [slot] = fields(take(state, Connect))
    error = ConnectionRefusedError("refused")
    state.connect_failed(slot, 0, error)
    assert take(state, Fail) == [Fail(waiter, error)]
    assert state.size == 0 and state.server_status(0).value == "down"
    # One failure is not an outage (asyncpg retries at the next acquire):
    # the waiter queues and the retry comes after the backoff.
    second = state.enqueue("b", 0.1, None)
    assert not take(state, Connect)
    state.advance(1.0)
    [retry] = fields(take(state, Connect))
    state.connect_failed(retry, 1.0, error)
    # Two in a row: the circuit opens with this failure; its waiter fails
    # as the ones after it will (ServerUnavailableError, by the runner).
    assert take(state, Fail) == [Fail(second, error, breaker_open=True)]
    # The circuit is open until the backoff passes; fail fast.
    with pytest.raises(Unavailable) as info:
        state.enqueue("c", 1.1, None)
    assert info.value.last_error is error and info.value.retry_in == pytest.approx(1.9)
    # After the backoff, a new waiter probes with a single connect; the
    # waiters of a failed probe fail as the circuit's refusals do.
    d = state.enqueue("d", 3.0, None)
    e = state.enqueue("e", 3.0, None)
    [probe] = fields(take(state, Connect))
    state.connect_failed(probe, 3.0, error)
    assert take(state, Fail) == [Fail(d, error, breaker_open=True), Fail(e, error, breaker_open=True)]
    assert state.counters.unavailable_rejections == 1  # c; the waiters once their tasks get the error:
    for failed in (second, d, e):
        state.delivered(failed, breaker_open=True)
    assert state.counters.unavailable_rejections == 4  # second, c, d, e
    # A probe that connects closes the circuit: the next failure's waiter
    # gets the error itself again (one failure is not an outage).
    state.advance(100.0)
    f = state.enqueue("f", 100.0, None)
    [probe] = fields(take(state, Connect))
    state.connect_succeeded(probe, "conn", 100.0)
    assert take(state, Wake) == [Wake(f)]


def test_with_the_circuit_open_hedges_do_not_keep_waiters_from_its_error() -> None:
    """fail_fast in a black hole: the probes time out, hedges beside them are
    always under way, so no failure found "no connect under way" and the
    waiters never got ServerUnavailableError: each waited out its own
    timeout (a hedge's owner got the raw TimeoutError). With the circuit
    open, a failure fails the waiters, as the single probe's did."""
    backoff = Backoff(base=0.1, cap=2.0, rng=lambda: 1.0, hedge_after=0.1)
    state = make(max_size=4, breaker_threshold=3, backoff=backoff)
    now, under_way, failed = 0.0, [], []
    while now < 5.0:
        state.enqueue(object(), now, 3.0)
        under_way += fields(take(state, Connect))
        failed += take(state, Fail)
        assert not take(state, TimeOut), f"a waiter waited out its timeout at t={now:g}"
        now = round(now + 0.05, 6)
        for slot in [s for s in under_way if s.created_at + 1.0 <= now]:  # connect timeout=1
            under_way.remove(slot)
            state.connect_failed(slot, now, TimeoutError(), UNREACHABLE)
        state.advance(now)
    assert len([f for f in failed if f.breaker_open]) > 50


def test_backoff_doubles_up_to_the_cap() -> None:
    backoff = no_jitter()
    assert [backoff.delay(n) for n in range(1, 6)] == [1.0, 2.0, 4.0, 8.0, 8.0]
    jittered = Backoff(base=1.0, cap=8.0, rng=lambda: 0.0)
    assert jittered.delay(3) == 2.0


def test_refused_connects_retry_within_the_refused_cap() -> None:
    backoff = Backoff(base=0.1, cap=2.0, refused_cap=0.05, unreachable_cap=0.01, rng=lambda: 1.0)
    # A refusal the server sends (57P03 starting up, 53300 out of slots)
    # costs it a backend each: soon at first, doubling to the refused_cap.
    assert [backoff.delay(n, refused=REFUSED) for n in range(1, 6)] == [0.01, 0.02, 0.04, 0.05, 0.05]
    assert all(backoff.delay(n, refused=True) == 0.05 for n in range(4, 200))
    # Nothing listening (a restart): the kernel refuses, the server pays
    # nothing; retried sooner, so the pool serves as soon as it listens.
    assert all(backoff.delay(n, refused=UNREACHABLE) == 0.01 for n in range(1, 200))
    assert backoff.delay(100) == 2.0  # timeouts and the rest back off to the cap
    assert Backoff(rng=lambda: 0.0).delay(1, refused=UNREACHABLE) == 0.005  # half of it fixed


def test_the_server_refusals_backoff_grows_while_they_go_on_and_restarts_after() -> None:
    """A restart: nothing listens (retried every 10 ms), then the server
    refuses while it starts up (57P03: 10, 20, 40, 50, 50 ms: each costs it a
    backend process), then accepts. The refusals' count starts over after
    any other outcome."""
    backoff = Backoff(base=0.1, cap=2.0, refused_cap=0.05, unreachable_cap=0.01, rng=lambda: 1.0)
    state = make(max_size=1, backoff=backoff, **PACED)
    state.enqueue("w", 0.0, None)
    now = 0.0

    def fail(error: BaseException, kind: int) -> float:
        nonlocal now
        [slot] = fields(take(state, Connect))
        state.connect_failed(slot, now, error, kind)
        take(state, Fail)
        state.enqueue("w", now, None)  # (a waiter again: the next probe is due at backoff_until)
        delay = state.backoff_until - now
        now = state.backoff_until
        state.advance(now)
        return round(delay, 6)

    down, starting = ConnectionRefusedError(111, "refused"), OSError("57P03")
    assert [fail(down, UNREACHABLE) for _ in range(3)] == [0.01, 0.01, 0.01]
    assert [fail(starting, REFUSED) for _ in range(5)] == [0.01, 0.02, 0.04, 0.05, 0.05]
    assert fail(down, UNREACHABLE) == 0.01
    assert fail(starting, REFUSED) == 0.01  # (started over)


def test_a_waiter_after_a_long_outage_is_probed_within_the_cap() -> None:
    state = make(max_size=2, backoff=Backoff(base=0.1, cap=2.0, rng=lambda: 1.0), **PACED)
    now = 0.0
    for _ in range(200):  # minutes of failed connects, each with a task waiting
        state.enqueue(object(), now, None)
        now = max(now, state.backoff_until)
        state.advance(now)
        [slot] = fields(take(state, Connect))
        state.connect_failed(slot, now, TimeoutError())
        take(state, Fail)
    # The server is back just after the last failure: a new waiter's probe
    # comes within the cap, not after an ever longer backoff.
    state.enqueue(object(), now, None)
    when = state.next_deadline()
    assert when is not None and when - now <= 2.0
    state.advance(when)
    [probe] = fields(take(state, Connect))
    state.connect_succeeded(probe, object(), when)
    assert take(state, Wake)


def test_connects_under_way_together_fail_as_one_round_of_the_backoff() -> None:
    """Four connects a restart breaks at once are one piece of news: the
    backoff's exponent counts them once (the first delay, not the fourth),
    while the stats still count four failures in a row."""
    state = make(max_size=4)
    for name in "abcd":
        state.enqueue(name, 0.0, None)
    slots = fields(take(state, Connect))
    assert len(slots) == 4
    for slot in slots:
        state.connect_failed(slot, 0.5, ConnectionResetError(104, "reset"))
    assert state.connect_failures == 4 and state.backoff_level == 1
    assert state.backoff_until == 1.0  # delay(1) = 1.0 from the attempts' start; delay(4) would be 8.0
    # The next probe started after the last failure: its failure is news.
    state.enqueue("e", 1.0, None)
    state.advance(1.0)
    [probe] = fields(take(state, Connect))
    state.connect_failed(probe, 1.1, ConnectionResetError(104, "reset"))
    assert state.backoff_level == 2 and state.backoff_until == 1.0 + 2.0


def test_the_backoff_runs_from_the_attempts_start() -> None:
    """gRPC's connection backoff: the delay spaces the attempts' starts. A
    connect that hung past its delay is followed at once; one that failed
    quickly waits out the rest of it."""
    state = make(max_size=1, **PACED)
    state.enqueue("a", 0.0, None)
    [slot] = fields(take(state, Connect))
    state.connect_failed(slot, 5.0, ConnectionResetError(104, "reset"))  # delay(1) = 1.0, from 0.0
    assert take(state, Fail)
    state.enqueue("b", 5.0, None)
    [slot] = fields(take(state, Connect))  # at once
    assert slot.created_at == 5.0
    state.connect_failed(slot, 5.1, ConnectionResetError(104, "reset"))  # delay(2) = 2.0, from 5.0
    take(state, Fail)
    state.enqueue("c", 5.1, None)
    assert not take(state, Connect) and state.next_deadline() == 7.0


def test_a_timed_out_connect_is_followed_at_once_one_at_a_time() -> None:
    """No answer within timeout= (a black hole): the attempt's own wait
    spaced it from the next, which starts at once, not after a backoff
    grown to the cap (issue 14 note: 1-1.6 s after a black hole healed,
    where asyncpg's pool, which connects on every acquire, took 40 ms)."""
    backoff = Backoff(base=0.1, cap=2.0, refused_cap=0.05, unreachable_cap=0.01, rng=lambda: 1.0, hedge_after=None)
    state = make(max_size=2, backoff=backoff)
    now = 0.0
    for _ in range(50):
        state.enqueue(object(), now, None)
        [slot] = fields(take(state, Connect))
        assert slot.created_at == now
        now += 0.5  # the connect timeout
        state.connect_failed(slot, now, TimeoutError(), UNREACHABLE)
        take(state, Fail)
        assert state.backoff_until <= now


def test_a_probe_unanswered_for_the_hedge_delay_gets_another_beside_it() -> None:
    """While connects fail, one probe at a time; once the newest has gone
    unanswered for hedge_after (at least twice the slowest connect that
    succeeded) another starts beside it, up to max_size under way: a healed
    black hole is served within about hedge_after, not the lost connect's
    timeout. Nothing is planned while the pool is full (no timer spins)."""
    backoff = Backoff(base=0.1, cap=2.0, unreachable_cap=0.01, rng=lambda: 1.0, hedge_after=0.1)
    state = make(max_size=3, backoff=backoff, **PACED)
    state.connect_times.record(0.2)  # a connect that succeeded earlier took 0.2 s: hedge after 0.4 s
    state.enqueue("a", 0.0, None)
    [first] = fields(take(state, Connect))
    state.connect_failed(first, 0.01, ConnectionRefusedError(111, "refused"), UNREACHABLE)
    take(state, Fail)
    for name in "bcd":
        state.enqueue(name, 1.0, None)
    state.advance(1.0)
    [probe] = fields(take(state, Connect))  # one, for three waiters
    assert state.next_deadline() == pytest.approx(1.4)
    state.advance(1.39)
    assert not take(state, Connect)
    state.advance(1.4)
    [hedge] = fields(take(state, Connect))
    assert state.next_deadline() == pytest.approx(1.8)
    state.advance(1.8)
    [last] = fields(take(state, Connect))
    assert state.size == 3 and state.next_deadline() is None  # full: nothing to plan
    # The network heals: the newest answers, the lost ones stay until their timeout.
    state.connect_succeeded(last, object(), 1.85)
    assert len(take(state, Wake)) == 1
    for slot in (probe, hedge):
        state.connect_failed(slot, 2.0, TimeoutError(), UNREACHABLE)
    state.check_invariants()


def after_a_lost_connect(max_size: int) -> PoolState:
    """A pool (hedge_after 0.1 s, no jitter) whose first connect, for task
    "a" at 0.0, timed out at 0.01: connects now fail."""
    backoff = Backoff(base=0.1, cap=2.0, unreachable_cap=0.01, rng=lambda: 1.0, hedge_after=0.1)
    state = make(max_size=max_size, backoff=backoff)
    state.enqueue("a", 0.0, None)
    [first] = fields(take(state, Connect))
    state.connect_failed(first, 0.01, TimeoutError(), UNREACHABLE)
    take(state, Fail)
    return state


def test_a_hedge_that_answers_serves_the_task_waiting_on_the_lost_probe() -> None:
    """One task waits; the probe for it is lost in a black hole and the
    hedge beside it answers: the hedge's connection serves that task at
    once. (It went idle: the task waited for its own connect, the lost
    probe, to its timeout, 60 s by default, and the hedge served nobody.)"""
    state = after_a_lost_connect(max_size=3)
    waiter = state.enqueue("b", 1.0, None)
    [probe] = fields(take(state, Connect))
    assert probe.owner is waiter
    state.advance(1.1)
    [hedge] = fields(take(state, Connect))
    state.connect_succeeded(hedge, object(), 1.12)
    assert take(state, Wake) == [Wake(waiter)]
    assert probe.owner is None  # the lost probe, when it answers, goes idle or to the next task
    state.connect_failed(probe, 61.0, TimeoutError(), UNREACHABLE)
    state.check_invariants()


def test_a_task_arriving_after_the_heal_gets_a_connect_of_its_own_not_the_lost_probe() -> None:
    """After the black hole heals, the probes it swallowed are still under
    way (until their timeout=, 60 s by default). A task that arrives then
    does not wait on one of them (a connect nobody waits for, under way
    longer than the hedge delay: presumed lost): it is cancelled (asyncpg's
    pool cancelled it with the acquire that gave up) and the task connects
    for itself, once the cancellation has ended it (until then it counts
    towards max_size). (It took the lost probe over, and waited on it
    until a connection was released.)"""
    state = after_a_lost_connect(max_size=4)
    b = state.enqueue("b", 1.0, None)
    state.advance(1.15)
    probe, hedge = fields(take(state, Connect))
    state.connect_succeeded(hedge, object(), 1.2)  # the heal: the hedge answers, the probe is lost
    assert take(state, Wake) == [Wake(b)]
    c = state.enqueue("c", 1.3, None)
    assert take(state, Abandon) == [Abandon(probe)] and probe.state is SlotState.CONNECTING and probe.abandoned
    # (Room under max_size: its own connect starts at once, beside the
    # abandoned one, which counts until the I/O layer reports its end.)
    [own] = fields(take(state, Connect))
    assert probe.owner is None and c.connect is own and own.owner is c and not own.adopted
    assert state.size == 3  # the hedge's connection (b's lease), the probe, c's own
    state.connect_cancelled(probe, 1.31)  # the I/O layer cancelled it
    assert probe.state is SlotState.CLOSED and state.size == 2 and not take(state, Connect)
    assert not take(state, Fail)
    state.connect_succeeded(own, object(), 1.35)
    assert take(state, Wake) == [Wake(c)]


def test_without_hedging_one_probe_at_a_time() -> None:
    state = make(max_size=3, backoff=Backoff(rng=lambda: 1.0, hedge_after=None), **PACED)
    state.enqueue("a", 0.0, None)
    [first] = fields(take(state, Connect))
    state.connect_failed(first, 0.01, ConnectionRefusedError(111, "refused"), UNREACHABLE)
    take(state, Fail)
    state.enqueue("b", 1.0, None)
    state.enqueue("c", 1.0, None)
    state.advance(1.0)
    assert len(take(state, Connect)) == 1
    assert state.next_deadline() is None
    state.advance(100.0)
    assert not take(state, Connect)


def test_connects_the_heal_of_a_black_hole_breaks_are_retried_at_once() -> None:
    """The sequence of a CI run that recovered in 235 ms where asyncpg's
    pool took 43 ms: probes time out in a black hole (timeout=0.5, a hedge
    every 0.1 s), one starts just after the last timeout, and the heal
    resets those under way (ConnectionResetError). The reset of a probe
    younger than the last failure was news: it raised the backoff a level
    as "any other failure" (0.2-0.4 s from its start), and its age counted
    as a slow answer (hedges 2 x 0.4 s apart). A broken connect is retried
    within unreachable_cap, and says nothing of how fast the server answers."""
    backoff = Backoff(base=0.1, cap=2.0, unreachable_cap=0.01, rng=lambda: 1.0, hedge_after=0.1)
    state = make(max_size=4, backoff=backoff, **PACED)
    now, under_way = 0.0, []

    def news_at_heal() -> bool:  # a probe started after the last failure
        return any(s.created_at > state.connect_failed_at for s in under_way)

    while now < 2.0 or not news_at_heal():  # two seconds of black hole, four tasks waiting
        while state.waiting < 4:
            state.enqueue(object(), now, None)
        under_way += fields(take(state, Connect))
        take(state, Fail)
        now = round(now + 0.01, 6)
        for slot in [s for s in under_way if s.created_at + 0.5 <= now]:
            under_way.remove(slot)
            state.connect_failed(slot, now, TimeoutError(), UNREACHABLE)
        state.advance(now)
    youngest = max(s.created_at for s in under_way)
    for slot in under_way:  # the heal resets every connect under way
        state.connect_failed(slot, now, ConnectionResetError(104, "reset"), BROKEN)
    take(state, Fail)
    assert state.backoff_until <= youngest + 0.01, round(state.backoff_until - now, 3)
    assert state.failed_answer_max == 0.0
    state.enqueue(object(), now, None)  # (the tasks got the reset: the next acquire)
    state.advance(max(now, state.backoff_until))
    [probe] = fields(take(state, Connect))
    state.connect_succeeded(probe, object(), probe.created_at + 0.005)
    state.check_invariants()


def test_a_proxy_whose_server_is_down_is_retried_as_a_refusal() -> None:
    """An HAProxy-like proxy whose server is down accepts every connect and
    closes or resets it. Its connects backed off as any failure (0.01, 0.1,
    0.2, ... 2 s): after a 2.5 s outage the pool served again 0.5 s after the
    server came back (asyncpg's pool, which connects on every acquire: 7-25
    ms). They are retried as the server's refusals are (each costs the
    proxy an accept, less than a refusal's backend process): within
    unreachable_cap, doubling up to refused_cap; any other failure in between
    starts the count over."""
    backoff = Backoff(base=0.1, cap=2.0, refused_cap=0.05, unreachable_cap=0.01, rng=lambda: 1.0)
    assert [backoff.delay(n, refused=BROKEN) for n in range(1, 8)] == [0.01, 0.02, 0.04, 0.05, 0.05, 0.05, 0.05]
    state = make(max_size=1, backoff=backoff)
    now, delays = 0.0, []
    for kind in [BROKEN] * 4 + [UNREACHABLE, BROKEN, REFUSED, BROKEN]:
        state.enqueue("w", now, None)
        state.advance(now)
        [slot] = fields(take(state, Connect))
        state.connect_failed(slot, now, ConnectionResetError(104, "reset"), kind)
        take(state, Fail)
        delays.append(round(state.backoff_until - now, 6))
        now = state.backoff_until
    assert delays == [0.01, 0.02, 0.04, 0.05, 0.01, 0.01, 0.02, 0.04]
    assert now < 0.3  # (the old schedule: 0.72 s)
    while now < 2.5:  # 2.5 s of resets: the next probe still comes within refused_cap
        state.enqueue("w", now, None)
        state.advance(now)
        [slot] = fields(take(state, Connect))
        state.connect_failed(slot, now, ConnectionResetError(104, "reset"), BROKEN)
        take(state, Fail)
        assert state.backoff_until - now <= 0.05 + 1e-9
        now = state.backoff_until
    assert state.failed_answer_max == 0.0  # (a reset is no answer: no hedge delay from it)


def test_a_name_that_does_not_resolve_backs_off_after_one_quick_retry() -> None:
    """A host name that does not resolve: one retry within unreachable_cap
    (a resolver's hiccup), then the backoff of any failure up to its cap
    (the resolver would pay for quick retries); any other failure in between
    starts the count over."""
    backoff = Backoff(base=0.1, cap=2.0, unreachable_cap=0.01, rng=lambda: 1.0)
    assert [backoff.delay(n, refused=UNRESOLVED) for n in range(1, 8)] == [0.01, 0.1, 0.2, 0.4, 0.8, 1.6, 2.0]
    state = make(max_size=1, backoff=backoff)
    now, delays = 0.0, []
    for kind in [UNRESOLVED] * 4 + [UNREACHABLE, UNRESOLVED]:
        state.enqueue("w", now, None)
        state.advance(now)
        [slot] = fields(take(state, Connect))
        state.connect_failed(slot, now, socket.gaierror(-2, "Name or service not known"), kind)
        take(state, Fail)
        delays.append(round(state.backoff_until - now, 6))
        now = state.backoff_until
    assert delays == [0.01, 0.1, 0.2, 0.4, 0.01, 0.01]
    assert state.failed_answer_max == 0.0


def test_a_server_that_answers_slowly_with_an_error_is_not_hedged() -> None:
    """Hedging is for connects that go unanswered (a black hole). A server
    that answers every connect with an error after 0.3 s (a slow login
    refused) is not losing them:
    one probe at a time, and the backoff grows to its cap. (With hedges
    every 0.1 s beside probes that fail 0.3 s later, no failure was ever
    news: backoff_level stayed 1 and the pool made 10 logins a second
    forever, where it made one per backoff before.)"""
    backoff = Backoff(base=0.1, cap=2.0, rng=lambda: 1.0, hedge_after=0.1)
    state = make(max_size=4, backoff=backoff, **PACED)
    now = 0.0
    under_way: list[Any] = []
    while now < 20.0:
        while state.waiting < 3:
            state.enqueue(object(), now, None)
        under_way += fields(take(state, Connect))
        assert len([s for s in under_way if s.state is SlotState.CONNECTING]) <= 1 or not state.connect_failures
        take(state, Fail)
        due = [s.created_at + 0.3 for s in under_way if s.state is SlotState.CONNECTING]
        deadline = state.next_deadline()
        now = min(due + ([deadline] if deadline is not None else []))
        answered = [s for s in under_way if s.state is SlotState.CONNECTING and s.created_at + 0.3 <= now]
        for slot in answered:
            state.connect_failed(slot, now, RuntimeError("password authentication failed"))
        state.advance(now)
    assert state.backoff_level >= 4
    assert len(under_way) <= 20, f"{len(under_way)} connects in 20 s"


@pytest.mark.parametrize(("failure", "paced"), [
    ("init", False), ("init", True), ("refused", False), ("unreachable", False), ("program", False),
])
def test_each_failed_connect_is_one_waiting_tasks_and_fails_it_alone(failure: str, paced: bool) -> None:
    """Connects that all fail, under steady demand (three tasks always
    waiting, max_size=4, min_size=2): without pacing (asyncpg's way: its
    acquire connects its holder itself), and with it after an init= hook's
    error (the server answered), each connect is one waiting task's, starts
    at once, and fails that task only; so the connects are as many as the
    failed acquires, never more, and the floor adds none. One exception:
    the floor's first connect, which the second task took over, fails no
    task (whether the hook, the program's own mistake or the server failed
    it): on asyncpg's pool the floor's upkeep connects a holder of its own,
    and the task connects for itself, at once here, and gets its own
    connect's error."""
    state = make(max_size=4, min_size=2, **(PACED if paced else {}))
    state.floor_enabled = True
    now, connects, failed, took_over = 0.0, 0, 0, 0
    # Each connect fails 0.3 s after it started; the program's own mistake
    # (a misspelled keyword) at once, before any I/O: a slower one would be
    # hedged (hedge_after), as a connect unanswered, since nothing answered.
    took = 0.001 if failure == "program" else 0.3
    for _ in range(17):
        while state.waiting < 3:
            state.enqueue(object(), now, None)
        started = fields(take(state, Connect))
        connects += len(started)
        assert all(slot.owner is not None for slot in started), "a connect nobody waits for"
        now += took
        adopted = sum(slot.adopted for slot in started)
        for slot in started:
            if failure == "init":
                state.connect_failed(slot, now, LookupError("init failed"), in_init=True)
            elif failure == "program":
                state.connect_failed(slot, now, TypeError("unexpected keyword"), program=True)
            else:
                kind = REFUSED if failure == "refused" else UNREACHABLE
                state.connect_failed(slot, now, ConnectionRefusedError(111, "refused"), kind)
        assert len(take(state, Fail)) == len(started) - adopted
        failed += len(started) - adopted
        took_over += adopted
        assert state.server_status(now).value == ("up" if failure == "init" else "down")
        state.advance(now)
    # (Unreachable: a hedge started beside connects under way, for nobody,
    # is taken over by the next task, and fails no task either.)
    assert connects == 3 * 17 and failed == connects - took_over
    assert took_over == 1 if failure != "unreachable" else 1 <= took_over <= 17


def test_a_failed_connect_with_nothing_left_fails_only_its_task() -> None:
    """max_size=1, nothing open, three tasks waiting, and the server refuses
    the first's connect: that task alone gets the error, and the second's
    connect starts at once (asyncpg's pool: its acquire connects for
    itself), which serves it if the server accepts; the third waits for
    its release. (With fail_fast's pacing, the failure is the probe's
    outcome for every waiting task, and the next connect is backed off.)"""
    state = make(max_size=1)
    first, second, third = (state.enqueue(name, 0, None) for name in "abc")
    [slot] = fields(take(state, Connect))
    assert slot.owner is first
    refused = ConnectionRefusedError(111, "refused")
    state.connect_failed(slot, 0.001, refused, REFUSED)
    assert take(state, Fail) == [Fail(first, refused)]
    [retry] = fields(take(state, Connect))
    assert retry.owner is second and state.next_deadline() is None
    state.connect_succeeded(retry, object(), 0.002)
    assert take(state, Wake) == [Wake(second)]
    assert state.waiting == 1 and state.server_status(0.002).value == "up"
    state.check_invariants()

    paced = make(max_size=1, **PACED)
    waiters = [paced.enqueue(name, 0, None) for name in "abc"]
    [slot] = fields(take(paced, Connect))
    paced.connect_failed(slot, 0.001, refused, REFUSED)
    assert take(paced, Fail) == [Fail(waiter, refused) for waiter in waiters]
    assert not take(paced, Connect)


def test_an_init_failure_fails_its_owner_now_and_closes_its_connection_counted() -> None:
    """init= raised on an open connection: the task it was for gets the
    error at once, the next waits on for a connect of its own (asyncpg's
    acquire opens its own). The slot closes that connection and counts
    towards max_size until closed() (no connect beside its backend), though
    the pool never opened it (not connected(), not in connections_opened
    or _closed); then the next task's connect starts, with no backoff."""
    state = make(max_size=1)
    owner = state.enqueue("a", 0, None)
    other = state.enqueue("b", 0, None)
    [slot] = fields(take(state, Connect))
    error, con = LookupError("init failed"), object()
    assert state.connect_failed(slot, 0.1, error, in_init=True, connection=con)
    assert take(state, Close) == [Close(slot)]
    assert take(state, Fail) == [Fail(owner, error)]
    assert slot.state is SlotState.CLOSING and slot.connection is con and slot.failed_connect
    assert (state.size, state.connected(), state.waiting) == (1, 0, 1)
    assert state.init_failing and state.server_status(0.1).value == "up"
    assert not take(state, Connect), "a connect beside the closing backend"
    assert state.closed(slot, 0.2) and not state.closed(slot, 0.2)
    [retry] = fields(take(state, Connect))
    assert retry.owner is other
    c = state.counters
    assert (c.connections_opened, c.connections_closed, c.connect_errors) == (0, 0, 1)


def test_an_init_failure_of_a_connect_taken_over_fails_no_task() -> None:
    """The task a connect was for gave up, another took it over, and the
    hook raised: asyncpg's pool cancels the hook with the acquire that ran
    it, and the other acquire connects for itself. So the taker gets no
    error: it waits on, for a connect of its own, started at once."""
    state = make(max_size=1)
    gone = state.enqueue("a", 0, None)
    [slot] = fields(take(state, Connect))
    taker = state.enqueue("b", 0, None)
    state.cancel_waiter(gone, 0.05)
    assert slot.owner is taker and slot.adopted
    assert state.connect_failed(slot, 0.1, LookupError("init failed"), in_init=True, connection=object())
    assert not take(state, Fail) and state.waiting == 1
    assert state.closed(slot, 0.1)
    [own] = fields(take(state, Connect))
    assert own.owner is taker and not own.adopted
    error = LookupError("init failed")
    assert state.connect_failed(own, 0.2, error, in_init=True, connection=object())
    assert take(state, Fail) == [Fail(taker, error)]


@pytest.mark.parametrize("program", [False, True], ids=["init", "program"])
def test_with_wait_on_connect_error_a_task_waiting_on_backs_the_connects_off(program: bool) -> None:
    """wait_on_connect_error=True, a connection leased: an init= error (or
    the program's own mistake) fails no task, the task waits for the leased
    one, so the next connect waits for the backoff (not started at once,
    the next and the next: a login storm for as long as the task waits)."""
    state = make(max_size=2, wait_on_connect_error=True)
    state.enqueue("holder", 0, None)
    connect_all(state)
    take(state, Wake)
    waiter = state.enqueue("w", 0, None)
    [slot] = fields(take(state, Connect))
    error = TypeError("typo") if program else LookupError("init failed")
    assert state.connect_failed(
        slot, 0.01, error, in_init=not program, connection=None if program else object(), program=program
    )
    if not program:
        assert state.closed(slot, 0.01)
    assert not take(state, Fail) and waiter.state is WaiterState.WAITING
    assert not take(state, Connect), "a connect at once, beside the backoff"
    assert state.backoff_until > 0.01 and state.next_deadline() == state.backoff_until
    state.advance(state.backoff_until)
    assert len(take(state, Connect)) == 1


def test_an_init_failure_on_an_abandoned_connect_leaves_the_connection_to_the_caller() -> None:
    """terminate() abandoned the connect meanwhile: nothing to count or
    close in the core; False tells the I/O layer to abort the connection."""
    state = make(max_size=1)
    state.enqueue("a", 0, None)
    [slot] = fields(take(state, Connect))
    state.connect_cancelled(slot)
    assert not state.connect_failed(slot, 0.1, LookupError("init failed"), in_init=True, connection=object())
    assert slot.connection is None and state.size == 0 and not take(state, Close)


def test_floor_alone_is_restored_on_the_upkeep_schedule_after_failures() -> None:
    state = make(max_size=3, min_size=1)
    state.floor_enabled = True
    state.advance(0)
    [slot] = fields(take(state, Connect))
    state.connect_failed(slot, 0, ConnectionRefusedError())
    # Nobody waits: no timer-driven retry; the pool's upkeep task asks.
    assert state.next_deadline() is None and state.floor_deficit()
    state.advance(100)
    assert not take(state, Connect)
    retry = state.plan_floor_connect(100)
    assert retry is not None and state.plan_floor_connect(100) is None  # one at a time
    state.connect_succeeded(retry, object(), 100)
    assert not state.floor_deficit() and state.plan_floor_connect(101) is None


def test_connect_failure_fails_the_task_it_was_for_even_with_connections_leased() -> None:
    """As asyncpg's acquire raises its own connect's error (a task holding
    one connection and asking for a second on a full server must not wait
    for itself forever)."""
    state = make(max_size=2)
    fill(state, 1)
    held = state.try_acquire(0)
    assert held
    first = state.enqueue("a", 0, None)  # its arrival opens the connect: the connect is its own
    [slot] = fields(take(state, Connect))
    second = state.enqueue("b", 0, None)  # no second connect: max_size; it waits for a release
    error = OSError("53300")
    state.connect_failed(slot, 0, error)
    assert take(state, Fail) == [Fail(first, error)]
    assert state.waiting == 1 and state.server_status(0).value == "backing_off"
    # The failed connect's place is the second's connect now, as asyncpg's
    # holder is the next acquire's, which connects it.
    [retry] = fields(take(state, Connect))
    assert retry.owner is second
    state.release(held, 1, CLEAN)
    assert not take(state, Wake) and state.idle == 1
    state.connect_succeeded(retry, object(), 2)
    assert take(state, Wake) == [Wake(second)]
    state.check_invariants()


# A connect opened for a task is that task's (asyncpg: an acquire that finds
# no connection connects an unconnected holder itself); released connections
# serve the head waiter without a connect of its own.


def test_a_connect_goes_to_the_task_it_was_opened_for_even_after_a_release() -> None:
    state = make(max_size=2)
    fill(state, 1)
    held = state.try_acquire(0)
    assert held
    first = state.enqueue("a", 0, None)
    [slot] = fields(take(state, Connect))
    second = state.enqueue("b", 0, None)  # max_size: no connect of its own
    state.release(held, 1, CLEAN)
    assert take(state, Wake) == [Wake(second)]  # not the older first: it waits for its connect
    state.connect_succeeded(slot, object(), 2)
    assert take(state, Wake) == [Wake(first)] and first.slot is slot


def test_a_release_with_only_connecting_tasks_waiting_goes_idle_and_a_newcomer_takes_it() -> None:
    state = make(max_size=2)
    fill(state, 1)
    held = state.try_acquire(0)
    assert held
    waiter = state.enqueue("a", 0, None)
    [slot] = fields(take(state, Connect))
    state.release(held, 1, CLEAN)
    assert not take(state, Wake) and state.idle == 1 and state.waiting == 1
    newcomer = state.try_acquire(1)  # as asyncpg's queue hands a connected holder to a new acquire
    assert newcomer is not None and newcomer.slot is held.slot
    state.connect_succeeded(slot, object(), 2)
    assert take(state, Wake) == [Wake(waiter)]


@pytest.mark.parametrize("leave", ["cancel", "timeout"])
def test_a_connect_whose_task_gives_up_goes_to_the_newest_task_without_one(leave: str) -> None:
    state = make(max_size=2)
    fill(state, 1)
    held = state.try_acquire(0)
    assert held
    owner = state.enqueue("a", 0, None if leave == "cancel" else 0.05)  # its arrival opens the connect
    later = state.enqueue("b", 0, None)  # max_size: no connect of its own
    [slot] = fields(take(state, Connect))
    assert owner.connect is slot and later.connect is None
    if leave == "cancel":
        state.cancel_waiter(owner, 0.05)
    else:
        state.advance(0.05)
        assert take(state, TimeOut) == [TimeOut(owner)]
    assert later.connect is slot and not take(state, Connect)  # adopted, no second connect
    state.release(held, 0.06, CLEAN)
    assert not take(state, Wake) and state.idle == 1
    state.connect_succeeded(slot, object(), 0.08)  # (within the hedge delay, 0.1 s: not presumed lost)
    assert take(state, Wake) == [Wake(later)]


def give_up(state: PoolState, waiter: Waiter, leave: str, now: float) -> None:
    """The waiting task gives up at ``now``: cancelled, or its deadline
    (``now``, as enqueued) passed."""
    if leave == "cancel":
        state.cancel_waiter(waiter, now)
    else:
        state.advance(now)
        assert [t.waiter for t in take(state, TimeOut)] == [waiter]


@pytest.mark.parametrize("leave", ["cancel", "timeout"])
def test_a_connect_taken_over_and_unanswered_for_the_hedge_delay_is_cancelled(leave: str) -> None:
    """The connect a task gave up on, taken over by the next task (as
    above), goes unanswered for the hedge delay (0.1 s): presumed lost (a
    black hole's), it is cancelled, as asyncpg's pool cancels it with the
    acquire that gave up, and the task connects for itself. Kept, such
    connects held the pool's places until their ``timeout=`` (60 s by
    default) while the server answered new connects."""
    state = make(max_size=2)
    fill(state, 1)
    held = state.try_acquire(0)
    assert held
    owner = state.enqueue("a", 0, None if leave == "cancel" else 0.05)
    later = state.enqueue("b", 0, None)
    [slot] = fields(take(state, Connect))
    give_up(state, owner, leave, 0.05)
    assert later.connect is slot and slot.adopted
    assert state.next_deadline() == pytest.approx(0.1)
    state.advance(0.1)
    assert take(state, Abandon) == [Abandon(slot)] and slot.abandoned and slot.owner is None
    # Counted until its end is reported: no connect beside its socket.
    assert state.size == 2 and not take(state, Connect) and later.connect is None
    if leave == "cancel":
        state.connect_cancelled(slot, 0.15)
    else:  # its hook ignored the cancellation: the I/O layer aborts what it opened
        assert state.connect_succeeded(slot, object(), 0.15) is False
    assert slot.state is SlotState.CLOSED and state.counters.connections_opened == 1
    [own] = fields(take(state, Connect))
    assert later.connect is own and not own.adopted and state.count(SlotState.CONNECTING) == 1
    state.connect_succeeded(own, object(), 0.3)
    assert take(state, Wake) == [Wake(later)]


def test_a_connect_taken_over_whose_server_answered_is_not_presumed_lost() -> None:
    """A connect whose connection is open, its init= hook running (slowly:
    0.2 s here, twice the hedge delay), was answered: it is no black hole's,
    and its taker waits for it, however long the hook takes. (Cancelled as
    lost, a burst through a slow hook ended with fewer connections open
    than asyncpg's pool: test_a_burst_that_opened_connections_ends_with_them_open.)"""
    state = make(max_size=1)
    owner = state.enqueue("a", 0, None)
    later = state.enqueue("b", 0, None)
    [slot] = fields(take(state, Connect))
    state.connect_answered(slot)  # at 0.01: the login succeeded; init= runs
    state.cancel_waiter(owner, 0.05)
    assert later.connect is slot and slot.adopted
    assert state.next_deadline() is None
    state.advance(0.3)
    assert not take(state, Abandon) and later.connect is slot
    state.connect_succeeded(slot, object(), 0.3)
    assert take(state, Wake) == [Wake(later)]


@pytest.mark.parametrize("end", ["cancelled", "failed", "succeeded"])
def test_an_abandoned_connect_ends_as_cancelled_whatever_its_task_reports(end: str) -> None:
    """However the cancelled connect's task ends (cancelled; its init= hook
    turned the cancellation into an error; or ignored it and returned), the
    slot closes without a failure of the server's or any task's, the I/O
    layer aborts what it opened (False), and the tasks waiting get connects
    of their own then, not before (max_size: 1)."""
    state = make(max_size=1)
    owner = state.enqueue("a", 0, None)
    later = state.enqueue("b", 0, None)
    [slot] = fields(take(state, Connect))
    state.cancel_waiter(owner, 0.01)
    assert later.connect is slot
    state.advance(0.2)
    assert take(state, Abandon) == [Abandon(slot)] and not take(state, Connect)
    assert state.next_deadline() is None  # (nothing to time: its end is the I/O layer's to report)
    if end == "cancelled":
        state.connect_cancelled(slot, 0.21)
    elif end == "failed":
        assert state.connect_failed(slot, 0.21, LookupError("hook"), in_init=True, connection=object()) is False
    else:
        assert state.connect_succeeded(slot, object(), 0.21) is False
    assert slot.state is SlotState.CLOSED and not take(state, Fail) and not take(state, Close)
    assert state.connect_failures == 0 and state.counters.connect_errors == 0
    [own] = fields(take(state, Connect))
    assert own.owner is later
    state.check_invariants()


def test_a_connect_opened_for_min_size_is_adopted_by_a_task_arriving_at_a_full_pool() -> None:
    state = make(max_size=2, min_size=2)
    fill(state, 1)
    state.floor_enabled = True
    held = state.try_acquire(0)
    assert held
    state.advance(0)
    [floor] = fields(take(state, Connect))
    assert floor.owner is None
    waiter = state.enqueue("a", 0, None)  # the pool is full (one leased, one connecting)
    assert waiter.connect is floor and not take(state, Connect)
    state.release(held, 1, CLEAN)
    assert not take(state, Wake)  # its connect, not the release, serves it
    state.connect_succeeded(floor, object(), 2)
    assert take(state, Wake) == [Wake(waiter)]


def test_a_failed_connect_fails_its_own_task_and_leaves_the_others_waiting() -> None:
    state = make(max_size=3)
    fill(state, 1)
    held = state.try_acquire(0)
    assert held
    first = state.enqueue("a", 0, None)
    second = state.enqueue("b", 0, None)
    first_connect, second_connect = fields(take(state, Connect))
    assert (first.connect, second.connect) == (first_connect, second_connect)
    error = OSError("refused")
    state.connect_failed(first_connect, 0, error)
    assert take(state, Fail) == [Fail(first, error)] and second.connect is second_connect


def test_with_wait_on_connect_error_the_task_of_a_failed_connect_takes_an_idle_connection() -> None:
    state = make(max_size=2, wait_on_connect_error=True)
    fill(state, 1)
    held = state.try_acquire(0)
    assert held
    waiter = state.enqueue("a", 0, None)
    [slot] = fields(take(state, Connect))
    state.release(held, 1, CLEAN)  # idle: the only waiter waits for its connect
    assert state.idle == 1 and not take(state, Wake)
    state.connect_failed(slot, 2, OSError("53300"))
    assert not take(state, Fail) and take(state, Wake) == [Wake(waiter)] and waiter.slot is held.slot


def test_a_connect_of_an_expired_generation_closes_and_its_task_waits_on() -> None:
    state = make(max_size=2)
    fill(state, 1)
    held = state.try_acquire(0)
    assert held
    waiter = state.enqueue("a", 0, None)
    [slot] = fields(take(state, Connect))
    state.expire_connections()
    state.connect_succeeded(slot, object(), 1)
    assert fields(take(state, Close)) == [slot] and waiter.state is WaiterState.WAITING
    assert waiter.connect is None
    state.closed(slot, 2)
    [replacement] = fields(take(state, Connect))
    assert waiter.connect is replacement


def test_a_floor_upkeep_connect_is_adopted_by_a_task_waiting_in_a_backoff() -> None:
    """Pool's floor upkeep (plan_floor_connect, after a failed connect) runs
    whoever waits: a task that arrived during the backoff, with no connect
    of its own, takes the upkeep's connect as its own."""
    state = make(max_size=2, min_size=2, **PACED)
    fill(state, 2)
    state.floor_enabled = True
    held = state.try_acquire(0)
    lost = state.try_acquire(0)
    assert held and lost
    state.discard(lost.slot, 0)
    state.closed(fields(take(state, Close))[0], 0)
    [floor] = fields(take(state, Connect))
    state.connect_failed(floor, 0, OSError("timeout"))  # a backoff of 1 s; held keeps serving
    waiter = state.enqueue("a", 0.1, None)  # in the backoff: no connect planned for it
    assert not take(state, Connect) and waiter.connect is None
    upkeep = state.plan_floor_connect(0.5)
    assert upkeep is not None and waiter.connect is upkeep
    state.check_invariants()
    state.release(held, 0.6, CLEAN)  # it waits for its connect (as asyncpg's acquire would)
    assert not take(state, Wake) and state.idle == 1
    state.connect_succeeded(upkeep, object(), 0.7)
    assert take(state, Wake) == [Wake(waiter)] and waiter.slot is upkeep


def refused_beside_a_lease() -> tuple[PoolState, Any, Any]:
    """``wait_on_connect_error=True``, ``max_size=2``: one connection leased
    (the lease), a task waiting (the waiter), and the connect opened for it
    refused at t=0: ``(state, lease, waiter)``."""
    state = make(max_size=2, wait_on_connect_error=True)
    fill(state, 1)
    held = state.try_acquire(0)
    assert held
    waiter = state.enqueue("a", 0, None)
    [slot] = fields(take(state, Connect))
    state.connect_failed(slot, 0, OSError("53300"))
    return state, held, waiter


def test_wait_on_connect_error_keeps_waiters_while_connections_exist() -> None:
    """Opt-in: a refused connect (e.g. too_many_connections) does not fail
    callers while leased connections will come back."""
    state, held, waiter = refused_beside_a_lease()
    assert not take(state, Fail)
    assert state.server_status(0).value == "backing_off"
    state.release(held, 1, CLEAN)
    assert take(state, Wake) == [Wake(waiter)]


def test_the_probe_after_a_backoff_is_the_oldest_waiters() -> None:
    """A connect planned when the backoff ends (and the next ones, after a
    failure or a success) answers no arrival: it goes to the task that has
    waited longest, not to the last one that queued during the backoff,
    which was served first (and, without wait_on_connect_error, got the
    failure of a connect an older task would have made on asyncpg's pool)."""
    state, held, first = refused_beside_a_lease()
    later = [state.enqueue(i, 0.5, None) for i in range(3)]  # (during the backoff: no connect)
    assert not take(state, Connect)
    state.advance(state.backoff_until)
    [probe] = fields(take(state, Connect))
    state.connect_succeeded(probe, "conn", state.backoff_until + 0.1)
    assert take(state, Wake) == [Wake(first)]
    state.release(held, state.backoff_until + 0.2, CLEAN)
    assert take(state, Wake) == [Wake(later[0])]


def test_healthy_pool_opens_a_connection_per_waiter_up_to_max_size() -> None:
    state = make(max_size=4)
    for i in range(6):
        state.enqueue(i, 0, None)
    assert len(take(state, Connect)) == 4


def test_connects_are_throttled_by_max_connecting() -> None:
    state = make(max_size=10, max_connecting=2)
    for i in range(6):
        state.enqueue(i, 0, None)
    assert len(take(state, Connect)) == 2
    assert state.size == 2


def test_never_more_than_max_size_slots() -> None:
    state = make(max_size=3, max_connecting=10)
    for i in range(10):
        state.enqueue(i, 0, None)
    assert len(take(state, Connect)) == 3
    assert state.size == 3


def test_min_size_floor_is_kept_once_enabled() -> None:
    state = make(max_size=4, min_size=2)
    state.advance(0)
    assert not take(state, Connect)
    state.floor_enabled = True
    state.advance(0)
    assert len(take(state, Connect)) == 2


def test_idle_connections_above_min_size_close_after_lifetime() -> None:
    state = make(max_size=3, min_size=1, max_inactive_lifetime=10.0)
    fill(state, 3, now=0)
    assert state.next_deadline() == 10.0
    state.advance(10.0)
    assert len(take(state, Close)) == 2
    assert state.idle == 1


def test_an_idle_lifetime_falls_due_at_the_time_next_deadline_names() -> None:
    """The timer's time (idle_since + lifetime) and advance()'s test must
    agree in floating point: 0.3 + 2.0 == 2.3, but 2.3 - 0.3 < 2.0, so the
    timer fired at 2.3 closed nothing and was armed at 2.3 again (a spin
    until the clock moved on; the random walk's seed 198 with a spin check)."""
    state = make(max_size=2, min_size=0, max_inactive_lifetime=2.0)
    fill(state, 1, now=0.3)
    assert state.next_deadline() == 2.3
    state.advance(2.3)
    assert len(take(state, Close)) == 1
    assert state.next_deadline() is None


def test_expire_connections_replaces_idle_now_and_leased_on_release() -> None:
    state = make(max_size=2)
    fill(state, 2)
    lease = state.try_acquire(0)
    assert lease
    state.expire_connections()
    assert len(take(state, Close)) == 1
    state.release(lease, 1, CLEAN)
    assert fields(take(state, Close))[0] is lease.slot


def test_a_replacement_connect_and_a_grown_pools_go_to_the_oldest_waiters() -> None:
    """Connects no arrival asked for (a closed connection's replacement, a
    pool grown by resize()) serve the queue in order, as asyncpg's pool
    hands a lost holder to its oldest waiter; for the newest, the last
    arrivals were served before every older task."""
    state = make(max_size=1)
    fill(state, 1)
    held = state.try_acquire(0)
    assert held is not None
    waiters = [state.enqueue(i, i, None) for i in range(4)]
    state.connection_lost(held.slot, 5)
    [slot] = fields(take(state, Close))
    state.closed(slot, 5)
    [new] = fields(take(state, Connect))
    state.connect_succeeded(new, "conn", 6)
    assert take(state, Wake) == [Wake(waiters[0])]
    state.resize(3, 7)
    planned = fields(take(state, Connect))
    assert len(planned) == 2
    for slot in planned:
        state.connect_succeeded(slot, "conn", 8)
    assert take(state, Wake) == [Wake(waiters[1]), Wake(waiters[2])]


def test_close_fails_waiters_and_refuses_newcomers() -> None:
    state = make(max_size=1)
    fill(state, 1)
    lease = state.try_acquire(0)
    assert lease
    waiter = state.enqueue("a", 0, None)
    marker = RuntimeError("closing")
    state.begin_close(marker)
    assert take(state, Fail) == [Fail(waiter, marker)]
    with pytest.raises(Closed):
        state.try_acquire(1)
    state.release(lease, 1, CLEAN)
    [slot] = fields(take(state, Close))
    state.closed(slot, 2)
    assert state.size == 0


def test_resize_shrinks_idle_now_and_leased_later_without_dropping_leases() -> None:
    state = make(max_size=4)
    fill(state, 4)
    leases = [state.try_acquire(0) for _ in range(3)]
    state.resize(2, 1)
    closes = take(state, Close)
    assert len(closes) == 1  # the only idle one
    assert state.size == 4 and state.in_use == 3  # no lease dropped
    for lease in leases:
        assert lease
        state.release(lease, 2, CLEAN)
    closes += take(state, Close)
    assert len(closes) == 2
    for slot in fields(closes):
        state.closed(slot, 3)
    assert state.size == 2 and state.idle == 2


def test_illegal_transition_is_refused() -> None:
    state = make()
    fill(state, 1)
    [slot] = list(state.slots())
    with pytest.raises(InternalStateError):
        state.reset_done(slot, 0, ok=True)


def test_release_of_an_ended_lease_is_an_internal_error() -> None:
    state = make()
    fill(state, 1)
    lease = state.try_acquire(0)
    assert lease
    state.release(lease, 1, CLEAN)
    with pytest.raises(InternalStateError):
        state.release(lease, 2, CLEAN)


def test_release_checks_the_lease_table_by_its_open_states() -> None:
    # PoolState.release tests ``old not in OPEN_LEASE``, not the table
    # (the hot path): the states _LEASE_MOVES lets move to RELEASED must be
    # exactly the open ones.
    from safepool._state import _LEASE_MOVES, OPEN_LEASE

    assert {old for old, ends in _LEASE_MOVES.items() if LeaseState.RELEASED in ends} == set(OPEN_LEASE)


# ------------------------------------------------------- lease states

L = LeaseState


def _lease_ended(how: LeaseState, warned_first: bool) -> tuple[PoolState, Any]:
    """A lease of a fresh pool, ended ``how`` (after its leak warning fired,
    with ``warned_first``), as the I/O layer would end it."""
    state = make()
    fill(state, 1)
    lease = state.try_acquire(0)
    assert lease and lease.state is L.HELD and lease.active
    state.arm_lease(lease, 5.0, 1.0)
    if warned_first:
        state.advance(1.0)
        assert take(state, LeakSuspect) == [LeakSuspect(lease)]
        assert lease.state is L.SUSPECT and lease.active and lease.warned
    if how is L.RELEASED:
        state.release(lease, 2.0, CLEAN)
    elif how is L.EXPIRED:
        state.advance(5.0)  # (its warning at 1.0 fires first, if it has not)
        assert take(state, TakeBack) == [TakeBack(lease)]
        take(state, LeakSuspect)
        state.reset_done(lease.slot, 5.0, ok=True)
    elif how is L.RECLAIMED:
        assert state.reclaim(lease, 2.0)
        state.reset_done(lease.slot, 2.0, ok=True)
    else:
        slot = lease.slot
        state.discard(slot, 2.0)
        take(state, Close)
        state.closed(slot, 2.0)
    return state, lease


@pytest.mark.parametrize("warned_first", [False, True], ids=["held", "suspect"])
@pytest.mark.parametrize("how", [L.RELEASED, L.EXPIRED, L.RECLAIMED, L.DISCARDED], ids=lambda s: s.value)
def test_a_lease_ends_in_the_state_that_names_how(how: LeaseState, warned_first: bool) -> None:
    state, lease = _lease_ended(how, warned_first)
    assert lease.state is how
    assert not lease.active and not lease.warned
    assert lease.expired is (how is L.EXPIRED)
    assert lease.id not in {open_lease.id for open_lease in state.leases()}


@pytest.mark.parametrize("how", [L.RELEASED, L.EXPIRED, L.RECLAIMED, L.DISCARDED], ids=lambda s: s.value)
def test_an_ended_lease_never_moves_again(how: LeaseState) -> None:
    """Every end state is final: a second release, a reclaim, or a timer of
    the ended lease is refused or ignored, never applied."""
    state, lease = _lease_ended(how, warned_first=False)
    with pytest.raises(InternalStateError, match=f"illegal lease transition {how.value} -> released"):
        state.release(lease, 9.0, CLEAN)
    assert state.reclaim(lease, 9.0) is False
    state.advance(100.0)  # its deadline and warning are stale now
    assert not take(state, TakeBack) and not take(state, LeakSuspect)
    assert lease.state is how


def test_stale_lease_timers_are_counted_once() -> None:
    """A lease that expired after its warning leaves no timer behind; the
    stale-timer count (which drives heap compaction) must not go up for it
    (it was counted twice before the lease states)."""
    state, lease = _lease_ended(L.EXPIRED, warned_first=True)
    assert state.next_deadline() is None
    assert state._stale_timers == 0


def test_timer_heap_counts_stale_entries_exactly_through_a_compaction() -> None:
    """Leases that expire in one advance() drop their warning timers: past 64
    stale entries the heap is compacted in the middle of advance(), which
    keeps popping the same list. check_invariants() compares the stale count
    with the heap's dead entries (and runs after this test too)."""
    state = make(max_size=100)
    fill(state, 100)
    leases = [state.try_acquire(0.0) for _ in range(100)]
    for lease in leases:
        assert lease
        state.arm_lease(lease, 1.0, 5.0)
    # A waiter with a deadline that is cancelled: its entry goes stale too.
    waiter = state.enqueue(object(), 0.0, 10.0)
    state.cancel_waiter(waiter, 0.0)
    state.check_invariants()
    state.advance(1.0)
    assert len(take(state, TakeBack)) == 100
    state.check_invariants()
    assert state._stale_timers < 65  # compacted on the way
    assert state.next_deadline() is None  # nothing live is left
    state.check_invariants()


def test_ended_leases_do_not_stay_in_the_timer_heap() -> None:
    """Leases with a deadline and a warning, released one after another:
    their stale entries are popped from the head as they go, so the heap (and
    the ended leases it refers to, captured stacks included) stays small,
    and the stale count is exact after every release (the count was once one
    too high when a compaction ran between a lease's two entries)."""
    state = make(max_size=1)
    fill(state, 1)
    for i in range(300):
        lease = state.try_acquire(float(i))
        assert lease
        state.arm_lease(lease, 60.0, 30.0)
        state.release(lease, float(i), CLEAN)
        state.check_invariants()
        assert len(state._timers) <= 10, (i, len(state._timers))


# ------------------------------------------------- site caps (bulkheads)


def sited(max_size: int = 4, share: float = 0.5, **kwargs: object) -> PoolState:
    return make(max_size, max_site_share=share, **kwargs)


def test_site_cap_holds_a_site_and_serves_others_ahead_of_it() -> None:
    state = sited()
    fill(state, 4)
    a1, a2 = state.try_acquire(0, "a"), state.try_acquire(0, "a")
    assert a1 and a2 and state.site_cap == 2
    # "a" is at its cap: it waits although two connections are idle.
    assert state.try_acquire(0, "a") is None
    blocked = state.enqueue(object(), 0, None, "a")
    assert state.idle == 2 and state.waiting == 1
    # Another site is not held up by it: it takes an idle connection at once.
    b1 = state.try_acquire(1, "b")
    assert b1 is not None
    b2 = state.try_acquire(1, "b")
    assert b2 is not None and state.try_acquire(1, "b") is None
    later = state.enqueue(object(), 2, None, "b")
    # A "b" release goes to the later "b" waiter: "a" is still at its cap.
    state.release(b1, 3, CLEAN)
    assert later.state is WaiterState.GRANTED and blocked.state is WaiterState.WAITING
    # An "a" release makes its waiter eligible: it gets that connection.
    state.release(a1, 4, CLEAN)
    assert blocked.state is WaiterState.GRANTED
    assert [row[:2] for row in state.site_usage()] == [("a", 2), ("b", 2)]
    state.check_invariants()


def test_a_site_leaving_its_cap_gets_an_idle_connection_at_once() -> None:
    state = sited()
    fill(state, 4)
    a1, a2 = state.try_acquire(0, "a"), state.try_acquire(0, "a")
    assert a1 and a2
    waiter = state.enqueue(object(), 0, None, "a")
    # The lease ends with a reset: the slot is busy, but idle ones exist.
    assert state.release(a1, 1, RESET) is True
    assert waiter.state is WaiterState.GRANTED and take(state, Wake)
    state.check_invariants()


def test_site_share_rounds_up_and_follows_resize() -> None:
    state = sited(max_size=10, share=0.3)
    assert state.site_cap == 3
    state.resize(4, 0)
    assert state.site_cap == 2
    assert sited(max_size=3, share=0.1).site_cap == 1


def test_a_capped_site_takes_at_most_its_share_of_max_waiters() -> None:
    state = sited(max_size=2, share=0.5, max_waiters=4)
    fill(state, 2)
    assert state.try_acquire(0, "a") is not None
    state.enqueue(object(), 0, None, "a")
    state.enqueue(object(), 0, None, "a")
    with pytest.raises(Overloaded, match="share"):
        state.enqueue(object(), 0, None, "a")
    state.enqueue(object(), 0, None, "b")  # the other site still has room
    assert state.counters.overload_rejections == 1


def policy_pool(policy: str, max_size: int) -> PoolState:
    if policy == "sites":
        return sited(max_size=max_size, share=1.0)
    return adaptive(max_size=max_size, target=10.0)


@pytest.mark.parametrize("policy", ["sites", "adaptive"])
def test_with_a_queue_policy_a_failed_connect_fails_the_task_it_was_opened_for(policy: str) -> None:
    """With a queue policy connects have no owner (the policy picks the task
    for each free connection), yet a failed one fails only the task whose
    arrival opened it, as asyncpg's acquire raises its own connect's error:
    not the newest waiting task (before 2026-12-05)."""
    state = policy_pool(policy, 2)
    first = state.enqueue(object(), 0.0, None, "a")
    second = state.enqueue(object(), 0.0, None, "a")
    one, two = fields(take(state, Connect))
    assert (one.owner, two.owner) == (None, None) and (one.trigger, two.trigger) == (first, second)
    refused = ConnectionRefusedError(111, "refused")
    state.connect_failed(one, 0.01, refused, REFUSED)
    assert take(state, Fail) == [Fail(first, refused)]
    assert second.state is WaiterState.WAITING and not take(state, Connect)
    state.connect_succeeded(two, object(), 0.02)
    assert second.state is WaiterState.GRANTED
    state.check_invariants()


@pytest.mark.parametrize("in_init", [False, True])
@pytest.mark.parametrize("policy", ["sites", "adaptive"])
def test_with_a_queue_policy_a_connect_whose_task_gave_up_fails_no_task(policy: str, in_init: bool) -> None:
    """max_size=1: the first task's connect is under way when a second
    queues, then the first gives up. The connect fails (refused, or its
    init= hook raised): on asyncpg's pool that connect was cancelled with
    the acquire that opened it, and the second connects for itself. So here
    the error is nobody's, and a connect opened for the second starts at
    once (before 2026-12-05 the second got that error)."""
    state = policy_pool(policy, 1)
    first = state.enqueue(object(), 0.0, None, "a")
    [slot] = fields(take(state, Connect))
    second = state.enqueue(object(), 0.0, None, "a")
    state.cancel_waiter(first, 0.01)
    error: BaseException = LookupError("init failed") if in_init else ConnectionRefusedError(111, "refused")
    kind = NOT_REFUSED if in_init else REFUSED
    state.connect_failed(slot, 0.02, error, kind, in_init=in_init, connection=object() if in_init else None)
    assert not take(state, Fail) and second.state is WaiterState.WAITING
    if in_init:
        [close] = fields(take(state, Close))
        state.closed(close, 0.03)
    [retry] = fields(take(state, Connect))
    assert retry.trigger is second
    state.connect_succeeded(retry, object(), 0.04)
    assert second.state is WaiterState.GRANTED
    state.check_invariants()


@pytest.mark.parametrize("policy", ["sites", "adaptive"])
def test_with_a_queue_policy_a_connect_whose_task_was_served_otherwise_fails_no_task(policy: str) -> None:
    """A task served by a released connection while the connect opened for
    it was under way: that connect's failure is nobody's (the policy serves
    the others from what is free), and the next waiting task's own connect
    starts."""
    state = policy_pool(policy, 2)
    fill(state, 1)
    lease = state.try_acquire(0.0, "a")
    assert lease is not None
    first = state.enqueue(object(), 0.0, None, "a")
    [slot] = fields(take(state, Connect))
    assert slot.trigger is first
    state.release(lease, 0.01, CLEAN)
    assert first.state is WaiterState.GRANTED
    later = state.enqueue(object(), 0.02, None, "a")
    state.connect_failed(slot, 0.03, ConnectionRefusedError(111, "refused"), REFUSED)
    assert not take(state, Fail) and later.state is WaiterState.WAITING
    [retry] = fields(take(state, Connect))
    assert retry.trigger is later
    state.check_invariants()


@pytest.mark.parametrize("leave", ["timeout", "cancel"])
@pytest.mark.parametrize("policy", ["sites", "adaptive"])
def test_with_a_queue_policy_a_connect_nobody_waits_on_is_cancelled_after_the_hedge_delay(
    policy: str, leave: str
) -> None:
    """The queue's counterpart of the abandoned take-over: the task whose
    arrival opened a connect gives up (its acquire timed out in a black
    hole), a second task waits, and the connect goes unanswered for the
    hedge delay (0.1 s): presumed lost, it is cancelled, and the second
    task's own connect starts once the cancellation has ended it (until
    then it counts towards max_size). Kept, it held the pool's one place
    until its ``timeout=`` (60 s by default) after the network healed."""
    state = policy_pool(policy, 1)
    first = state.enqueue(object(), 0.0, None if leave == "cancel" else 0.05, "a")
    [slot] = fields(take(state, Connect))
    give_up(state, first, leave, 0.05)
    assert not take(state, Abandon)
    second = state.enqueue(object(), 0.06, None, "a")
    assert not take(state, Connect) and state.next_deadline() == pytest.approx(0.1)
    state.advance(0.1)
    assert take(state, Abandon) == [Abandon(slot)] and slot.abandoned and slot.trigger is None
    assert state.size == 1 and not take(state, Connect) and state.next_deadline() is None
    state.connect_cancelled(slot, 0.11)
    [own] = fields(take(state, Connect))
    assert own.trigger is second
    state.connect_succeeded(own, object(), 0.12)
    assert second.state is WaiterState.GRANTED and state.counters.connections_opened == 1
    state.check_invariants()


@pytest.mark.parametrize("policy", ["sites", "adaptive"])
def test_with_a_queue_policy_a_connect_is_kept_while_its_task_waits_or_nobody_else_does(policy: str) -> None:
    """Not presumed lost however long it takes: a connect whose task still
    waits (its own acquire bounds it), one nobody else waits for (nothing
    to gain), and one the server answered (init= running)."""
    state = policy_pool(policy, 2)
    first = state.enqueue(object(), 0.0, None, "a")
    [own] = fields(take(state, Connect))
    assert state.next_deadline() is None
    state.advance(5.0)
    assert not take(state, Abandon)
    state.cancel_waiter(first, 5.0)  # nobody waits now
    assert state.next_deadline() is None
    state.advance(10.0)
    assert not take(state, Abandon)
    state.connect_answered(own)
    later = state.enqueue(object(), 10.0, None, "a")
    assert not take(state, Connect)  # (the answered connect serves it)
    assert state.next_deadline() is None
    state.advance(20.0)
    assert not take(state, Abandon) and not own.abandoned
    state.connect_succeeded(own, object(), 20.0)
    assert later.state is WaiterState.GRANTED
    state.check_invariants()


@pytest.mark.parametrize("policy", ["sites", "adaptive"])
def test_with_a_queue_policy_only_as_many_lost_connects_are_cancelled_as_tasks_need(policy: str) -> None:
    """max_size=2, both connects' tasks gave up, one task waits: only the
    older connect is cancelled (one connect serves one task); the younger
    stays and may still answer. A second waiting task has the other cancelled
    too, once it has been unanswered for the hedge delay."""
    state = policy_pool(policy, 2)
    first = state.enqueue(object(), 0.0, 0.05, "a")
    second = state.enqueue(object(), 0.02, 0.05, "a")
    older, younger = fields(take(state, Connect))
    assert (older.trigger, younger.trigger) == (first, second)
    state.advance(0.07)
    assert [t.waiter for t in take(state, TimeOut)] == [first, second]
    third = state.enqueue(object(), 0.08, None, "a")
    assert state.next_deadline() == pytest.approx(0.1)
    state.advance(0.2)
    assert take(state, Abandon) == [Abandon(older)] and not younger.abandoned
    fourth = state.enqueue(object(), 0.21, None, "a")
    assert take(state, Abandon) == [Abandon(younger)]
    state.connect_cancelled(older, 0.22)
    state.connect_cancelled(younger, 0.22)
    assert sorted(s.trigger is not None for s in fields(take(state, Connect))) == [True, True]
    assert {third.state, fourth.state} == {WaiterState.WAITING}
    state.check_invariants()


# ------------------------------------------------------ adaptive queue


def adaptive(max_size: int = 1, target: float = 0.01, interval: float = 0.1, **kwargs: object) -> PoolState:
    from safepool._policy import AdaptiveQueue

    return make(max_size, adaptive=AdaptiveQueue(target, interval), **kwargs)


def test_adaptive_queue_is_fifo_until_the_queue_stands() -> None:
    state = adaptive()
    fill(state, 1)
    lease = state.try_acquire(0)
    assert lease is not None
    first = state.enqueue(object(), 0.0, 1.0)
    second = state.enqueue(object(), 0.05, 1.0)
    assert first.deadline == 1.0  # not standing yet: the caller's timeout
    state.release(lease, 0.06, CLEAN)
    assert first.state is WaiterState.GRANTED and second.state is WaiterState.WAITING


def test_standing_queue_sheds_old_waiters_serves_newest_and_shortens_timeouts() -> None:
    state = adaptive()
    fill(state, 1)
    lease = state.try_acquire(0)
    assert lease is not None
    old = state.enqueue(object(), 0.0, 1.0)
    untimed = state.enqueue(object(), 0.01, None)
    # 0.15 s later the queue has not been empty for a whole interval.
    newcomer = state.enqueue(object(), 0.15, 1.0)
    assert newcomer.shed and newcomer.deadline == pytest.approx(0.16)
    assert old.state is WaiterState.FAILED  # shed: it waited longer than the target
    shed = take(state, Shed)
    assert [a.waiter for a in shed] == [old] and "queue_target=0.01" in shed[0].reason
    # The untimed waiter waited a whole interval: it is served before the newcomer.
    state.release(lease, 0.155, CLEAN)
    assert untimed.state is WaiterState.GRANTED
    lease = state.claim(untimed, 0.155)
    newest = state.enqueue(object(), 0.156, 1.0)
    state.release(lease, 0.157, CLEAN)
    # LIFO: the newest waiter first.
    assert newest.state is WaiterState.GRANTED and newcomer.state is WaiterState.WAITING
    # The newcomer gets the target delay, not its timeout, and fails as shed.
    state.advance(0.16)
    assert newcomer.state is WaiterState.FAILED
    assert fields(take(state, Shed))[0] is newcomer
    # Counted as their tasks get the PoolOverloadedError (delivered()).
    for failed in (old, newcomer):
        state.delivered(failed, shed=True)
    assert state.counters.shed == 2


def test_a_shed_says_how_long_the_queue_stood_and_how_many_waited_when_it_was_shed() -> None:
    """The shed that emptied the queue said "the wait queue has not been
    empty for 0.000s" (its reason was worded after its removal marked the
    queue empty), and every message of a mass shed read the counts after
    the whole pass: "waiting=0" for 290 tasks shed from a standing queue."""
    state = adaptive()
    fill(state, 1)
    lease = state.try_acquire(0)
    assert lease is not None
    first = state.enqueue(object(), 0.0, 1.0)
    second = state.enqueue(object(), 0.001, 1.0)
    third = state.enqueue(object(), 0.002, 1.0)
    state.release(lease, 0.15, CLEAN)  # the queue stands: all three waited past the target
    shed = take(state, Shed)
    # The newest, whom this hand-on serves (LIFO), is spared.
    assert fields(shed) == [first, second] and third.state is WaiterState.GRANTED
    assert ["empty for 0.150s" in action.reason for action in shed] == [True, True], [a.reason for a in shed]
    assert [action.waiting for action in shed] == [3, 2]
    state.release(state.claim(third, 0.15), 0.15, CLEAN)
    # A newcomer left alone in a standing queue is shed at its target delay.
    lease = state.try_acquire(0.15)
    assert lease is not None
    untimed = state.enqueue(object(), 0.151, None)  # never shed: the queue stands from 0.15 on
    newcomer = state.enqueue(object(), 0.3, 1.0)
    assert newcomer.shed
    state.release(lease, 0.305, CLEAN)  # to the untimed waiter (it waited a whole interval)
    assert untimed.state is WaiterState.GRANTED
    state.advance(0.31)
    late = [a for a in take(state, Shed) if a.waiter is newcomer]
    assert len(late) == 1 and "empty for 0.159s" in late[0].reason, late[0].reason
    assert late[0].waiting == 1


def test_a_hand_on_in_a_standing_queue_serves_the_waiter_it_would_shed_last() -> None:
    """max_size=1, one lease held 0.5 s, one task waiting (timeout 5 s)
    since 0.0: the queue stands when the lease ends. The waiter was shed
    there and the connection went idle: a failure nobody gained from.
    The hand-on now serves the newest waiter (LIFO) whatever it waited,
    and sheds only the stale ones before it (CoDel never drops the last
    packet queued either)."""
    state = adaptive()
    fill(state, 1)
    lease = state.try_acquire(0)
    assert lease is not None
    lone = state.enqueue(object(), 0.0, 5.0)
    state.release(lease, 0.5, CLEAN)
    assert not take(state, Shed) and lone.state is WaiterState.GRANTED
    # Two waiters, both stale: the older is shed, the newer served.
    lease = state.claim(lone, 0.5)
    older = state.enqueue(object(), 0.5, 5.0)
    newer = state.enqueue(object(), 0.6, 5.0)
    state.release(lease, 1.0, CLEAN)
    assert fields(take(state, Shed)) == [older] and newer.state is WaiterState.GRANTED
    state.check_invariants()


def test_untimed_waiters_are_never_shed() -> None:
    state = adaptive()
    fill(state, 1)
    lease = state.try_acquire(0)
    assert lease is not None
    state.enqueue(object(), 0.0, 1.0)
    untimed = state.enqueue(object(), 0.2, None)
    assert untimed.deadline is None and not untimed.shed
    state.advance(5.0)
    assert untimed.state is WaiterState.WAITING


def test_deadline_aware_admission_refuses_what_the_drain_rate_cannot_serve() -> None:
    state = adaptive(max_size=1, interval=10.0, target=1.0)
    fill(state, 1)
    lease = state.try_acquire(0)
    assert lease is not None
    now = 0.0
    # Ten hand-ons 0.1 s apart while tasks wait: 10 connections/s.
    waiters = [state.enqueue(object(), now, None) for _ in range(12)]
    for waiter in waiters[:10]:
        now += 0.1
        state.release(lease, now, CLEAN)
        assert waiter.state is WaiterState.GRANTED
        lease = state.claim(waiter, now)
    # Two wait; a third would be served in ~0.3 s: a 0.2 s timeout is refused at once.
    with pytest.raises(Overloaded, match=r"2 task\(s\) ahead.*10 connections/s"):
        state.enqueue(object(), now, 0.2)
    assert state.counters.admission_rejections == 1
    state.enqueue(object(), now, 0.5)  # 0.3 s fits in 0.5 s


@pytest.mark.parametrize(
    ("mode", "observed", "marked", "expected"),
    [
        # full (asyncpg's policy): reset after any statement; nothing to do after none
        ("full", Observed.CLEAN, False, CLEAN),
        ("full", Observed.DIRTY, False, RESET),
        ("full", Observed.MUST_RESET, False, RESET),
        ("full", Observed.USED_UP, False, DISCARD),
        ("full", Observed.UNUSABLE, False, DISCARD),
        # rollback: only an open transaction (or a cancelled query) is worth a round trip
        ("rollback", Observed.DIRTY, False, CLEAN),
        ("rollback", Observed.MUST_RESET, False, RESET),
        # ... or a marked lease (a statement raised, or prepare(): a Parse may wait for its Sync)
        ("rollback", Observed.DIRTY, True, RESET),
        # auto: a dirty lease resets only when its proxy marked it
        ("auto", Observed.DIRTY, False, CLEAN),
        ("auto", Observed.DIRTY, True, RESET),
        ("auto", Observed.MUST_RESET, False, RESET),
        ("auto", Observed.CLEAN, True, CLEAN),
    ],
)
def test_release_policy(mode: str, observed: Observed, marked: bool, expected: ReleaseOutcome) -> None:
    state = make(reset_mode=mode)
    fill(state, 1)
    lease = state.try_acquire(0.0)
    assert lease is not None
    assert state.release_outcome(lease, observed, marked) is expected
    # and the reset's content follows the same policy
    full = mode == "full" or (mode == "auto" and marked)
    assert state.reset_plan(marked, False) == (full, marked and not full)
    assert state.reset_plan(marked, True) == (full, True)
    state.release(lease, 0.0, expected)
    connect_all(state)


def test_release_policy_resets_for_hooks_and_discards_an_expired_generation() -> None:
    state = make(always_reset=True)
    fill(state, 1)
    lease = state.try_acquire(0.0)
    assert lease is not None
    # a reset= hook or a connection class's reset() runs after every lease, as in asyncpg
    assert state.release_outcome(lease, Observed.CLEAN, False) is RESET
    assert state.release_outcome(lease, Observed.DIRTY, False) is RESET
    state.expire_connections()
    assert state.release_outcome(lease, Observed.CLEAN, False) is DISCARD
    state.release(lease, 0.0, DISCARD)


def test_auto_mode_sends_a_connection_class_reset_query_after_every_lease() -> None:
    # docs/reset-modes.md: auto mode never skips your own reset code. A class
    # overriding get_reset_query() (always_reset) gets its query sent after
    # an unmarked lease too, as in full mode; a ROLLBACK only when needed.
    state = make(reset_mode="auto", always_reset=True)
    assert state.reset_plan(False, False) == (True, False)
    assert state.reset_plan(False, True) == (True, True)
    assert state.reset_plan(True, False) == (True, False)


def test_an_unknown_reset_mode_is_refused() -> None:
    with pytest.raises(ValueError, match="reset_mode"):
        make(reset_mode="sometimes")


def test_the_lifecycle_is_one_phase_with_legal_moves_only() -> None:
    state = make()
    assert state.phase is Phase.NEW and not state.started and not state.closing
    state.set_phase(Phase.STARTING)
    assert not state.started
    state.set_phase(Phase.OPEN)
    assert state.started and not state.closing
    with pytest.raises(InternalStateError, match="open -> starting"):
        state.set_phase(Phase.STARTING)
    state.begin_close(RuntimeError("closing"))
    assert state.phase is Phase.CLOSING and state.closing
    state.set_phase(Phase.CLOSED)
    assert state.closing and state.started
    with pytest.raises(InternalStateError):
        state.set_phase(Phase.OPEN)
    state.begin_close(RuntimeError("again"))  # terminate() after close(): a no-op move
    assert state.phase is Phase.CLOSED


def test_fast_members_reads_the_same_members_without_the_enum_class() -> None:
    """The hot path's member reads (S.IDLE, Outcome.CLEAN...) give the enum's
    own members; on 3.11 through a plain class (no EnumType.__getattr__ hook)."""
    import enum
    import sys

    from safepool import _state

    pairs = [
        (_state.S, _state.SlotState), (_state.L, _state.LeaseState), (_state.W, _state.WaiterState),
        (_state.Outcome, _state.ReleaseOutcome), (_state.Seen, _state.Observed), (_state.Phases, _state.Phase),
    ]
    for fast, cls in pairs:
        assert all(getattr(fast, name) is member for name, member in cls.__members__.items())
        assert isinstance(fast, enum.EnumType) is (sys.version_info >= (3, 12))


def test_a_connect_abandoned_outside_a_close_leaves_its_task_served() -> None:
    """A KeyboardInterrupt in a connect (the only abandon outside close() and
    terminate()): its task waits on, and an idle connection serves it."""
    state = make(max_size=2)
    fill(state, 1)
    held = state.try_acquire(0)
    assert held
    waiter = state.enqueue("a", 0, None)
    [slot] = fields(take(state, Connect))
    state.release(held, 1, CLEAN)  # idle: the only waiter waits for its own connect
    assert state.idle == 1 and waiter.connect is slot
    state.connect_cancelled(slot, 2)
    assert take(state, Wake) == [Wake(waiter)] and waiter.slot is held.slot


def capped_site_under_way() -> tuple[PoolState, Waiter, Slot, Slot]:
    """max_size=3, one connection per site: a task of site "z" holds the
    one open connection, two of "x" queue and their connects start; "z"
    releases, so the first "x" task is served and the second, its site now
    at its cap, waits on. Returns the state, that second task, and the
    connects opened for the first (nobody's now) and for the second."""
    state = sited(max_size=3, share=1 / 3)
    fill(state, 1)
    held = state.try_acquire(0.0, "z")
    assert held is not None
    first = state.enqueue(object(), 0.0, None, "x")
    second = state.enqueue(object(), 0.0, None, "x")
    served_for, own = fields(take(state, Connect))
    assert (served_for.trigger, own.trigger) == (first, second)
    state.release(held, 0.01, CLEAN)
    assert first.state is WaiterState.GRANTED and state.site_cap == 1
    return state, second, served_for, own


def test_with_site_caps_a_capped_task_s_connect_does_not_cover_an_eligible_task() -> None:
    """max_size=3, one connection per site: a task of site "z" holds the
    one open connection, two of "x" queue and their connects go into a
    black hole; "z" releases, so the first "x" task is served and the
    second, its site now at its cap, waits on. A task of "y" queues: no
    connect is its own, and the one opened for the served "x" task is
    nobody's. That one is presumed lost after the hedge delay (0.1 s) and
    cancelled: the "x" task's own connect does not cover the "y" task (it
    may serve it, but only once the black hole answers). Before, a task
    waiting at its site's cap counted as covering one eligible task, and
    the "y" task waited for the swallowed connects' ``timeout=``."""
    state, second, served_for, own = capped_site_under_way()
    other = state.enqueue(object(), 0.02, None, "y")
    assert not take(state, Connect) and state.next_deadline() == pytest.approx(0.1)
    state.advance(0.1)
    assert take(state, Abandon) == [Abandon(served_for)] and not own.abandoned
    state.connect_cancelled(served_for, 0.11)
    # The capped task's connect, as old, is next: its task cannot take its
    # connection, and the eligible one has none of its own. Its replacement
    # starts at once: the pool has room beside the one being cancelled.
    assert take(state, Abandon) == [Abandon(own)]
    [retry] = fields(take(state, Connect))
    assert retry.trigger is other and state.size == 3
    state.connect_cancelled(own, 0.115)
    state.connect_succeeded(retry, object(), 0.12)
    assert other.state is WaiterState.GRANTED and second.state is WaiterState.WAITING
    state.check_invariants()


def test_with_site_caps_a_capped_task_s_young_connect_serves_an_eligible_task() -> None:
    """As above, but the served task's connect is refused at once, and the
    server answers the other: the connect of the task waiting at its site's
    cap, young, is supply. The "y" task gets no connect of its own beside
    it (no connection more than needed) and takes its connection when it
    answers."""
    state, second, served_for, own = capped_site_under_way()
    state.connect_failed(served_for, 0.015, ConnectionRefusedError(111, "refused"), REFUSED)
    assert not take(state, Fail) and not take(state, Connect)  # (its task was served)
    other = state.enqueue(object(), 0.02, None, "y")
    assert not take(state, Connect)
    state.connect_succeeded(own, object(), 0.04)
    assert other.state is WaiterState.GRANTED and second.state is WaiterState.WAITING
    assert not take(state, Abandon) and not take(state, Connect)
    state.check_invariants()


def test_with_site_caps_an_abandoned_connect_s_end_leaves_an_idle_connection_to_the_policy() -> None:
    """max_site_share: an abandoned connect's end (connect_cancelled)
    served idle connections to the oldest waiting task by the default
    queue's rule (_serve_unbound), past the policy: here a task whose site
    was at its cap got a second connection, and the site books no longer
    added up. The idle connection stays idle until the site is under its
    cap, as any other."""
    state = sited(max_size=4, share=0.25)
    fill(state, 3)
    leases = [state.try_acquire(0.0, site) for site in "xyw"]
    assert all(leases) and state.site_cap == 1
    gone = state.enqueue(object(), 0.0, None, "z")
    [slot] = fields(take(state, Connect))
    state.cancel_waiter(gone, 0.05)
    later = state.enqueue(object(), 0.06, None, "z")
    capped = state.enqueue(object(), 0.06, None, "x")
    state.advance(0.1)
    assert take(state, Abandon) == [Abandon(slot)]
    state.release(leases[1], 0.11, CLEAN)  # (y's: the "z" task takes it)
    assert take(state, Wake) == [Wake(later)]
    state.release(leases[2], 0.12, CLEAN)  # (w's: idle, "x" is at its cap)
    assert state.idle == 1
    state.connect_cancelled(slot, 0.13)  # its cancellation took a while
    assert capped.state is WaiterState.WAITING and state.idle == 1 and not take(state, Wake)
    state.check_invariants()
    state.release(leases[0], 0.14, CLEAN)  # "x" under its cap: the idle one (or this) serves it
    assert capped.state is WaiterState.GRANTED
    state.check_invariants()


@pytest.mark.parametrize("policy", [None, "sites", "adaptive"])
def test_a_lost_connect_s_timer_is_not_due_again_when_it_fired(policy: str | None) -> None:
    """The timer that presumes a connect lost falls due at its start plus
    the hedge delay, and was checked as ``start <= now - delay``: for some
    start times (1023.902 with 0.1 s) the float subtraction rounds below the
    start, so at the deadline nothing was abandoned and the next deadline
    was that same time, already past: the runner's timer fired again and
    again (with a ManualClock, for ever within one advance())."""
    start = 1023.902
    delay = 0.1
    assert (start + delay) - delay < start  # (the rounding this needs)
    if policy is None:
        state = make(max_size=2)
        fill(state, 1, start)
        assert state.try_acquire(start)
        first = state.enqueue("a", start, None)
        later = state.enqueue("b", start, None)
        [slot] = fields(take(state, Connect))
        state.cancel_waiter(first, start)
        assert later.connect is slot
    else:
        state = policy_pool(policy, 1)
        first = state.enqueue(object(), start, None, "a")
        [slot] = fields(take(state, Connect))
        state.cancel_waiter(first, start)
        state.enqueue(object(), start, None, "a")
    due = state.next_deadline()
    assert due == start + delay
    state.advance(due)
    assert take(state, Abandon) == [Abandon(slot)]
    after = state.next_deadline()
    assert after is None or after > due


# ------------------------------------------------- a failure view gone stale


def refuse_another(state: PoolState, now: float, in_init: bool = False) -> Any:
    """A task takes the idle connection at ``now`` and a second task's
    connect is refused (53300; ``in_init``: its init= hook failed instead,
    the connection closed), then the first connection is released a second
    later, idle: nothing wants a connection after that. Returns its slot."""
    held = state.try_acquire(now)
    assert held
    state.enqueue("a", now, None)
    [slot] = fields(take(state, Connect))
    if in_init:
        state.connect_failed(slot, now, LookupError("bug in init hook"), in_init=True, connection=object())
        take(state, Close)
    else:
        state.connect_failed(slot, now, OSError("53300"))
    take(state, Fail)
    state.release(held, now + 1, CLEAN)
    return held.slot


def refused_once(min_size: int = 1, in_init: bool = False, **kwargs: Any) -> tuple[PoolState, Any]:
    """max_size=2 at its ``min_size`` (1: one connection), the floor kept,
    and :func:`refuse_another` at t=0: ``(state, the idle slot)``."""
    state = make(max_size=2, min_size=min_size, **kwargs)
    fill(state, 1)
    state.floor_enabled = True
    return state, refuse_another(state, 0, in_init)


def stale_notes(state: PoolState) -> int:
    return len(take(state, NoteServerStatus))


def test_a_failure_nothing_follows_goes_stale_after_60_s() -> None:
    """The pool idles at min_size with a connection that serves: no connect
    will come to refresh the failure view, so 60 s after the failure (its
    backoff long over) the status is "up" again. The failure counts and
    the backoff stay as they were: the next connect meets them."""
    assert STALE_FAILURE_AFTER == 60.0
    state, _ = refused_once()
    assert state.server_status(1).value == "backing_off"
    assert state.server_status(59.9).value == "backing_off"
    assert not state.failure_stale(59.9)
    assert state.server_status(60.0).value == "up" and state.failure_stale(60.0)
    assert state.connect_failures == 1 and state.connect_failed_at == 0
    level, until = state.backoff_level, state.backoff_until
    state.advance(60.0)
    assert state.server_status(60.0).value == "up"
    assert (state.connect_failures, state.backoff_level, state.backoff_until) == (1, level, until)


def test_the_stale_moment_fires_the_status_note_once() -> None:
    """A timer falls due at the stale moment: its firing asks the runner,
    once, to report the status (backing_off -> up); then no timer is left."""
    state, _ = refused_once()
    assert state.next_deadline() == 60.0
    state.advance(59.9)
    assert stale_notes(state) == 0 and state.server_status(59.9).value == "backing_off"
    state.advance(60.0)
    assert stale_notes(state) == 1 and state.failure_went_stale
    for now in (61.0, 120.0, 1000.0):
        state.advance(now)
        assert stale_notes(state) == 0 and state.server_status(now).value == "up"
    assert state.next_deadline() is None


def test_not_stale_while_a_task_waits_with_its_connect_under_way() -> None:
    """A task that arrives 61 s after the failure gets a connect (the pool
    has room): the pool wants a connection, whose outcome is news, so the
    old failure still speaks until then, however long it takes."""
    state, _ = refused_once()
    held = state.try_acquire(61)
    assert held
    waiter = state.enqueue("b", 61, None)
    [slot] = fields(take(state, Connect))
    assert state.waiting == 1 and state.wants_connection()
    for now in (61.0, 120.0, 500.0):
        state.advance(now)
        assert state.server_status(now).value == "backing_off" and stale_notes(state) == 0
    # The timer looks again every STALE_RECHECK while the pool wants one.
    assert state.next_deadline() == 500.0 + STALE_RECHECK
    state.connect_succeeded(slot, object(), 501)
    assert take(state, Wake) == [Wake(waiter)]
    assert state.server_status(501).value == "up" and state.connect_failures == 0


def test_not_stale_below_min_size() -> None:
    """Below min_size the floor upkeep connects (its outcome is news)."""
    state, _ = refused_once(min_size=2)
    assert state.floor_deficit()
    for now in (60.0, 61.0, 300.0):
        state.advance(now)
        assert state.server_status(now).value == "backing_off" and stale_notes(state) == 0
    slot = state.plan_floor_connect(300.5)
    assert slot is not None
    state.connect_failed(slot, 301, OSError("53300"))
    assert state.server_status(301).value == "backing_off"


def test_tasks_waiting_on_a_full_pool_do_not_keep_the_failure_fresh() -> None:
    """A task waiting while the pool is at max_size gets a released
    connection, not a connect (the core plans none for it): the pool wants
    no connection, so the failure view goes stale as when nobody waits."""
    state, _ = refused_once()
    state.resize(1, 2)  # full now, at its one connection
    held = state.try_acquire(2)
    assert held
    waiter = state.enqueue("b", 2, None)
    assert not take(state, Connect) and state.waiting == 1 and not state.wants_connection()
    assert state.server_status(59.9).value == "backing_off"
    state.advance(60.0)
    assert stale_notes(state) == 1 and state.server_status(60.0).value == "up"
    state.release(held, 61, CLEAN)
    assert take(state, Wake) == [Wake(waiter)]


def test_not_stale_before_the_backoff_ends() -> None:
    """Paced, with a backoff longer than 60 s: the failure speaks until the
    backoff ends (an acquire before then meets it), then goes stale."""
    state, _ = refused_once(backoff=Backoff(base=100.0, cap=100.0, rng=lambda: 1.0), **PACED)
    assert state.backoff_until == 100.0
    assert state.server_status(60.0).value == "backing_off"
    state.advance(60.0)
    assert stale_notes(state) == 0 and state.next_deadline() == 100.0
    assert state.server_status(99.9).value == "backing_off"
    state.advance(100.0)
    assert stale_notes(state) == 1 and state.server_status(100.0).value == "up"


def test_down_never_goes_stale() -> None:
    """With no connection that serves, the status stays "down": an acquire,
    or health()'s probe, connects anyway and refreshes the view. No timer."""
    state = make(max_size=1)
    state.floor_enabled = True
    state.enqueue("a", 0, None)
    [slot] = fields(take(state, Connect))
    state.connect_failed(slot, 0, ConnectionRefusedError())
    take(state, Fail)
    assert state.waiting == 0 and not state.wants_connection()
    for now in (60.0, 61.0, 3600.0):
        state.advance(now)
        assert state.server_status(now).value == "down" and stale_notes(state) == 0
    assert state.next_deadline() is None


def test_a_connection_lost_after_the_view_went_stale_is_not_down() -> None:
    """Once stale, the old failure says nothing about the server: losing
    the last connection since (here: the server ended it) is no connect
    failure, and the status stays "up" until the next connect's outcome."""
    state, idle = refused_once(min_size=0)
    state.advance(60.0)
    assert stale_notes(state) == 1
    state.connection_lost(idle, 70.0)
    assert state.idle == 0 and state.count(SlotState.CLOSING) == 1 and state.server_status(70.0).value == "up"
    state.enqueue("b", 71, None)
    [slot] = fields(take(state, Connect))
    state.connect_failed(slot, 71, ConnectionRefusedError())
    take(state, Fail)
    assert state.server_status(71).value == "down"


def test_a_new_failure_restarts_the_60_s() -> None:
    """Each failure is news: the view goes stale 60 s after the last one,
    also after it went stale once; one note per stale moment."""
    state, _ = refused_once()
    refuse_another(state, 30)
    state.advance(60.0)
    assert stale_notes(state) == 0 and state.server_status(60.0).value == "backing_off"
    assert state.next_deadline() == 90.0
    state.advance(90.0)
    assert stale_notes(state) == 1 and state.server_status(90.0).value == "up"
    # Stale, then another failure: backing off again, for 60 s.
    refuse_another(state, 100)
    assert not state.failure_went_stale and state.server_status(101).value == "backing_off"
    assert state.connect_failures == 3
    state.advance(159.9)
    assert stale_notes(state) == 0 and state.server_status(159.9).value == "backing_off"
    state.advance(160.0)
    assert stale_notes(state) == 1 and state.server_status(160.0).value == "up"


def test_a_success_ends_the_failure_view_and_its_timer_notes_nothing() -> None:
    state, _ = refused_once()
    held = state.try_acquire(10)
    assert held
    state.enqueue("b", 10, None)
    [slot] = fields(take(state, Connect))
    state.connect_succeeded(slot, object(), 11)
    assert state.server_status(11).value == "up"
    state.advance(60.0)
    assert stale_notes(state) == 0 and state.next_deadline() is None


def test_an_init_failure_goes_stale_too_with_no_status_note() -> None:
    """An ``init=`` hook that failed once (the server answered: the status
    stays "up") while a connection serves: 60 s on, with no connect wanted,
    its view goes stale as a refusal's does (``stats().init_failing`` then
    reads False: health's init_failed and safepool_init_failing end), with
    no status note (the status did not change). The failure count is kept."""
    state, _ = refused_once(in_init=True)
    assert state.init_failing and state.server_status(1).value == "up"
    assert state.next_deadline() == 60.0
    state.advance(59.9)
    assert not state.failure_went_stale
    state.advance(60.0)
    assert state.failure_went_stale and stale_notes(state) == 0
    assert state.init_failing and state.connect_failures == 1  # (the core's record; stats() reads it stale)
    assert state.server_status(60.0).value == "up" and state.next_deadline() is None
