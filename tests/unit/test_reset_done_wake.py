"""``PoolState.reset_done(..., wake=False)``, the runner's contended hot path
(``Runner.reset_done``): when the reset connection goes to the head waiter
and no action was queued before, the core returns that waiter, granted,
instead of queueing its ``Wake``, and the runner wakes it itself
(``Runner.wake``). Every record must be what ``wake=True`` (the default, and
every other caller's) leaves: the same slot, lease and waiter states, the
same counters and samples, the same actions once the returned waiter's
``Wake`` is counted in, and the invariants after every step.

Two cores are driven through the same random walk (acquires, waits with and
without a deadline, cancels, claims, releases with a reset, resets that end
well or fail, time passing, and actions carried out late, so that some
resets end with actions still queued), one finishing every reset with
``wake=True``, the other with ``wake=False``; after each step both are read
alike, by slot id, lease id and waiter number."""

from __future__ import annotations

import dataclasses
import random
from typing import Any

import pytest

from safepool._state import (
    Backoff,
    Close,
    Connect,
    Lease,
    PoolState,
    ReleaseOutcome,
    Slot,
    SlotState,
    Waiter,
    WaiterState,
    Wake,
)


class Walk:
    """One core and what the walk knows of it (its waiters in arrival order,
    its open leases, the slots whose reset is under way)."""

    def __init__(self, wake: bool) -> None:
        self.wake = wake
        self.state = PoolState(max_size=3, backoff=Backoff(base=1.0, cap=8.0, rng=lambda: 1.0))
        self.waiters: list[Waiter] = []
        self.leases: list[Lease] = []
        self.resetting: list[Slot] = []
        self.returned: list[int] = []  # waiter numbers reset_done handed back (wake=False)
        for _ in range(3):
            slot = self.state.add_connecting(0.0)
            self.state.connect_succeeded(slot, object(), 0.0)

    def number(self, waiter: Waiter) -> int:
        return next(i for i, w in enumerate(self.waiters) if w is waiter)

    def describe(self, action: Any) -> tuple[str, Any]:
        subject = getattr(action, action.__match_args__[0])
        if isinstance(subject, Waiter):
            return type(action).__name__, ("waiter", self.number(subject))
        if isinstance(subject, Slot):
            return type(action).__name__, ("slot", subject.id)
        if isinstance(subject, Lease):
            return type(action).__name__, ("lease", subject.id)
        return type(action).__name__, None

    def books(self) -> dict[str, Any]:
        state = self.state
        return {
            "slots": sorted((slot.id, slot.state.value, slot.lease.id if slot.lease else None) for slot in state.slots()),
            "waiters": [(w.state.value, w.slot.id if w.slot else None) for w in self.waiters],
            "leases": [(lease.id, lease.state.value) for lease in self.leases],
            "counters": dataclasses.asdict(state.counters),
            "waiting": state.waiting,
            "idle": state.idle,
            "wait_times": (list(state.wait_times.pending), state.wait_times.zeros),
            "lease_times": list(state.lease_times.pending),
            "actions": [self.describe(action) for action in state.actions],
            "returned": list(self.returned),
        }

    # -- the steps (each takes the walk's own random choices, the same for both)

    def acquire(self, now: float, timeout: float | None) -> None:
        lease = self.state.try_acquire(now)
        if lease is not None:
            self.leases.append(lease)
        else:
            self.waiters.append(self.state.enqueue(object(), now, timeout))

    def claim(self, index: int, now: float) -> None:
        granted = [w for w in self.waiters if w.state is WaiterState.GRANTED and w.slot is not None]
        if granted:
            waiter = granted[index % len(granted)]
            if waiter.slot is not None and waiter.slot.state is SlotState.RESERVED:
                self.leases.append(self.state.claim(waiter, now))

    def cancel(self, index: int, now: float) -> None:
        live = [w for w in self.waiters if w.state in (WaiterState.WAITING, WaiterState.GRANTED)]
        if live:
            self.state.cancel_waiter(live[index % len(live)], now)

    def release(self, index: int, now: float) -> None:
        held = [lease for lease in self.leases if lease.active]
        if held:
            lease = held[index % len(held)]
            if self.state.release(lease, now, ReleaseOutcome.NEEDS_RESET):
                self.resetting.append(lease.slot)

    def finish(self, index: int, now: float, ok: bool) -> None:
        if not self.resetting:
            return
        slot = self.resetting.pop(index % len(self.resetting))
        queued_before = bool(self.state.actions)
        result = self.state.reset_done(slot, now, ok, self.wake)
        if isinstance(result, Waiter):
            assert not self.wake and ok and not queued_before
            assert result.state is WaiterState.GRANTED and result.slot is slot
            assert slot.state is SlotState.RESERVED
            self.returned.append(self.number(result))
            # What the runner's wake carries out, as the Wake would have been.
            self.state.actions.append(Wake(result))
        else:
            assert isinstance(result, bool)

    def advance(self, now: float) -> None:
        self.state.advance(now)

    def carry_out(self, now: float) -> None:
        """The I/O layer's part: connects succeed, closes end; the other
        actions are only taken (their futures are the walk's objects)."""
        while self.state.actions:
            actions = self.state.actions[:]
            self.state.actions.clear()
            for action in actions:
                if isinstance(action, Connect):
                    self.state.connect_succeeded(action.slot, object(), now)
                elif isinstance(action, Close):
                    self.state.closed(action.slot, now)


def _step(rng: random.Random, walks: list[Walk], now: float) -> float:
    """One random step, the same for every walk (its own arguments drawn once)."""
    kind = rng.choice(["acquire", "acquire", "claim", "claim", "cancel", "release", "release", "finish",
                       "finish", "finish", "advance", "carry_out"])
    index = rng.randrange(1000)
    args: tuple[Any, ...]
    if kind == "acquire":
        args = (now, rng.choice([None, None, 0.5, 3.0]))
    elif kind == "finish":
        args = (index, now, rng.random() < 0.85)
    elif kind in ("advance", "carry_out"):
        if kind == "advance":
            now += rng.choice([0.1, 0.6, 2.0])
        args = (now,)
    else:
        args = (index, now)
    for walk in walks:
        getattr(walk, kind)(*args)
    return now


@pytest.mark.parametrize("seed", range(60))
def test_wake_false_leaves_the_records_wake_true_leaves(seed: int) -> None:
    rng = random.Random(seed)
    walks = [Walk(wake=True), Walk(wake=False)]
    now = 0.0
    for _ in range(300):
        now = _step(rng, walks, now)
        for walk in walks:
            walk.state.check_invariants()
        with_wake, without = (walk.books() for walk in walks)
        returned = without.pop("returned")
        assert with_wake.pop("returned") == []
        assert with_wake == without
        walks[1].returned = returned
    # The walk reached the fast path, and the fallback with actions queued.
    assert walks[1].returned, "no reset ended with the head waiter handed back"


def test_wake_false_queues_the_wake_after_actions_queued_before() -> None:
    """An action already queued goes first: the core queues the Wake after
    it, as wake=True does, and returns True."""
    walk = Walk(wake=False)
    state = walk.state
    for _ in range(3):
        walk.acquire(0.0, None)
    walk.acquire(0.0, None)  # waits
    [waiter] = walk.waiters
    walk.release(0, 1.0)
    [slot] = walk.resetting
    marker = Close(Slot(999, 0, 0.0))  # (any action queued before)
    state.actions.append(marker)
    assert state.reset_done(slot, 2.0, True, False) is True
    assert state.actions == [marker, Wake(waiter)]
    state.actions.clear()
    assert waiter.state is WaiterState.GRANTED and slot.state is SlotState.RESERVED


def test_wake_false_returns_true_when_nobody_waits_and_false_when_given_up() -> None:
    walk = Walk(wake=False)
    state = walk.state
    walk.acquire(0.0, None)
    walk.release(0, 1.0)
    [slot] = walk.resetting
    assert state.reset_done(slot, 2.0, True, False) is True
    assert slot.state is SlotState.IDLE and not state.actions
    walk.resetting.clear()
    walk.acquire(3.0, None)
    walk.release(1, 4.0)
    [slot] = walk.resetting
    state.terminate(5.0)
    state.actions.clear()
    assert state.reset_done(slot, 6.0, True, False) is False
