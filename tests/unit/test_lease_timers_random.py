"""Lease timers under random schedules: pool-level and per-acquire
lease_timeout mixed (so deadlines land in their queue and in the heap), leak
warnings, releases of every outcome, reclaims, discards, expire_connections,
terminate, and a clock that stands still or jumps. Each timer must fire once,
not early, in time order, and none may be lost."""

from __future__ import annotations

import random
from typing import Any

import pytest

from safepool._state import (
    Backoff,
    Close,
    Connect,
    LeakSuspect,
    LeaseState,
    PoolState,
    ReleaseOutcome,
    TakeBack,
)

OUTCOMES = (ReleaseOutcome.CLEAN, ReleaseOutcome.NEEDS_RESET, ReleaseOutcome.DISCARD)


class Run:
    def __init__(self, seed: int) -> None:
        self.rnd = random.Random(seed)
        size = self.rnd.randint(1, 6)
        self.state = PoolState(max_size=size, backoff=Backoff(base=1.0, cap=8.0, rng=lambda: 1.0))
        for _ in range(size):
            slot = self.state.add_connecting(0.0)
            self.state.connect_succeeded(slot, object(), 0.0)
        self.now = 0.0
        self.timeout = self.rnd.choice([None, 5.0, 1.0])  # the pool's lease_timeout
        self.warn = self.rnd.choice([None, 3.0, 0.5, 5.0])  # its leak_warning_after
        self.open: dict[int, Any] = {}
        self.fired: set[tuple[str, int]] = set()

    def handle(self) -> None:
        state = self.state
        for action in list(state.actions):
            if isinstance(action, TakeBack):
                lease = action.lease
                assert ("deadline", lease.id) not in self.fired, "a deadline fired twice"
                assert lease.deadline is not None and lease.deadline <= self.now, "a deadline fired early"
                self.fired.add(("deadline", lease.id))
                del self.open[lease.id]
                state.reset_done(lease.slot, self.now, True)
            elif isinstance(action, LeakSuspect):
                lease = action.lease
                assert ("warning", lease.id) not in self.fired, "a warning fired twice"
                assert lease.warn_at is not None and lease.warn_at <= self.now, "a warning fired early"
                # Its deadline at or before the warning comes first and ends the lease.
                assert lease.deadline is None or lease.deadline > lease.warn_at, "a warning after its deadline"
                self.fired.add(("warning", lease.id))
            elif isinstance(action, Connect):
                state.connect_succeeded(action.slot, object(), self.now)
            elif isinstance(action, Close):
                state.closed(action.slot, self.now)
        state.actions.clear()

    def step(self, index: int) -> None:
        rnd, state = self.rnd, self.state
        op = rnd.random()
        if op < 0.35:
            lease = state.try_acquire(self.now)
            if lease is not None:
                choices = [self.timeout] * 3 + [None, 0.5, 2.0, 10.0, 5.0]
                # leak_warning_after is one per pool; other values reach the
                # warnings' heap path as leases armed out of acquire order would.
                warn = self.warn if self.warn is None or rnd.random() < 0.7 else rnd.choice([0.25, 1.0, 2.0, 6.0])
                state.arm_lease(lease, rnd.choice(choices), warn)
                self.open[lease.id] = lease
        elif op < 0.6 and self.open:
            lease = self.open.pop(rnd.choice(list(self.open)))
            if state.release(lease, self.now, rnd.choice(OUTCOMES)):
                state.reset_done(lease.slot, self.now, rnd.random() < 0.9)
        elif op < 0.65 and self.open:
            lease = self.open.pop(rnd.choice(list(self.open)))
            assert state.reclaim(lease, self.now)
            state.reset_done(lease.slot, self.now, True)
        elif op < 0.68:
            state.expire_connections()
        elif op < 0.695 and index > 300:
            for slot in state.terminate(self.now):
                state.closed(slot, self.now)
            self.open.clear()
            state.actions.clear()
        elif op < 0.7 and self.open:
            lease = self.open.pop(rnd.choice(list(self.open)))
            state.discard(lease.slot, self.now)
        else:
            self.now += rnd.choice([0.0, 0.0, 0.25, 0.5, 1.0, 3.0, 7.0])
            state.advance(self.now)
        self.handle()
        state.check_invariants()
        pending = [lease.deadline for lease in self.open.values() if lease.deadline is not None]
        pending += [lease.warn_at for lease in self.open.values()
                    if lease.warn_at is not None and lease.state is LeaseState.HELD]  # fmt: skip
        if pending:
            due = state.next_deadline()
            assert due is not None and due <= min(pending), "the I/O layer's timer would wake too late"


@pytest.mark.parametrize("seed", range(0, 200, 40))
def test_lease_timers_fire_once_in_order_and_none_is_lost(seed: int) -> None:
    for run_seed in range(seed, seed + 40):
        run = Run(run_seed)
        for index in range(400):
            run.step(index)
        run.now += 1000.0
        run.state.advance(run.now)
        run.handle()
        run.state.check_invariants()
        for lease in run.open.values():
            assert lease.deadline is None, f"seed {run_seed}: lease {lease.id}'s deadline was lost"
            assert lease.warn_at is None or ("warning", lease.id) in run.fired, f"seed {run_seed}: a warning was lost"


def test_queued_deadline_comes_before_its_own_warning_in_the_heap() -> None:
    """The one tie the queues add: a lease's deadline in its queue and its
    warning in the heap (due before the warnings' last) at the same time.
    The deadline ends the lease; no warning for it."""
    state = PoolState(max_size=2, backoff=Backoff(base=1.0, cap=8.0, rng=lambda: 1.0))
    for _ in range(2):
        slot = state.add_connecting(0.0)
        state.connect_succeeded(slot, object(), 0.0)
    long = state.try_acquire(0.0)
    short = state.try_acquire(0.0)
    assert long and short
    state.arm_lease(long, None, 10.0)  # the warnings' queue ends at 10
    state.arm_lease(short, 4.0, 4.0)  # deadline queued, warning to the heap
    state.advance(4.0)
    assert [(type(a).__name__, getattr(a, "lease", None)) for a in state.actions] == [("TakeBack", short)]
    state.check_invariants()
