"""Seeded random walks through the state core: no event loop, no database.

Each seed draws a pool configuration and a walk of operations, as an
application and the I/O layer (``_runner.Runner``) would perform them in some
interleaving: acquire, claim, cancel, release, lose a proxy; finish or fail a
connect, a reset, a close; notice a dead connection; let time pass; resize,
expire, close, terminate; the floor upkeep's connect after failures.
``IOLayer`` below carries out the core's actions as the runner does.

It complements the hypothesis state machine (test_state_machine.py) with
longer walks from plain seeds: it found a defect the machine had not reached
(the floor upkeep's connect, opened while a task that arrived during the
backoff waited without a connect, was left ownerless; fixed in 34dd1ef).

Checked after every step: ``check_invariants()``; the pool never grows beyond
``max_size``; nobody waits with nothing under way and no timer armed; a task
waiting without a connect of its own is never left without one while there is
room and no backoff; no site is granted or leases a connection beyond its cap.
Once a timer has fired (``advance(now)``, then the I/O layer's drain: the
start-up's, ``advance``, ``fire_timer``, the settling's), ``next_deadline()``
is later than ``now``, or None: the runner re-arms its timer for it, and one
at an instant already past fires again at once (a busy loop, if that
``advance`` does nothing: the hedge timer did, fixed in 6ceadc5). See
``check_timer_moved_on``: one known defect is let through there, and only
while each re-fire gives a connect up (test_review_s61_timer_walks.py).
At the end the pool is settled (everything released, every connect, reset and
close finished) and must be quiescent.

The capped walks (``capped_walk``) draw from generators of their own, biased
towards site caps, a black hole's connects given up, and idle connections
beside tasks waiting at their sites' caps: a shape the plain walks never
reached, where a real defect was (fixed in 3660b0f).

Each walk's clock starts at a reading drawn from ``START_READINGS`` (a
generator of its own: every other draw of a seed's walk is as it was), not
only 0.0: sums such as a start plus the hedge delay round differently there
(helper-185 walked the core at such readings to find the hedge timer's spin).

CI runs a fixed list of seeds; ``SAFEPOOL_LONG=1`` runs many more. A failure
names the seed and its last steps; ``walk(seed)`` (``capped_walk(seed)``)
replays it.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import assert_never

import pytest

from safepool._policy import AdaptiveQueue
from safepool._state import (
    Abandon,
    Backoff,
    Close,
    Closed,
    Connect,
    Fail,
    LeakSuspect,
    Lease,
    NoteServerStatus,
    Overloaded,
    Phase,
    PoolState,
    ReleaseOutcome,
    Shed,
    Slot,
    SlotLost,
    SlotState,
    TakeBack,
    TimeOut,
    Unavailable,
    Waiter,
    WaiterState,
    Wake,
)

LONG = bool(os.environ.get("SAFEPOOL_LONG"))
S = SlotState
W = WaiterState

STEPS = 150
CI_SEEDS = range(400)
LONG_SEEDS = range(400, 20_000)
CAPPED_CI_SEEDS = range(150)  # (capped_walk's)
CAPPED_LONG_SEEDS = range(150, 10_000)
SHOWN_STEPS = 15  # the last steps a failure message lists
# The clock readings a walk starts at (drawn per seed): awkward ones too.
START_READINGS = [0.0, 0.1, 1000.0, 1000.1, 1023.9, 12345.678, 1e9 + 0.1]


class WalkFailed(AssertionError):
    """A walk broke a property; the message names the seed and its last steps."""


@dataclass(frozen=True)
class Config:
    max_size: int
    min_size: int
    init_size: int
    max_connecting: int | None
    max_waiters: int | None
    breaker_threshold: int | None
    wait_on_connect_error: bool
    max_inactive_lifetime: float
    max_site_share: float | None
    adaptive: tuple[float, float] | None
    max_lifetime: float | None = None

    @classmethod
    def draw(cls, rng: random.Random, lifetime_rng: random.Random | None = None) -> Config:
        """``lifetime_rng``: draws max_lifetime (added later: a generator of
        its own leaves every other draw of a seed's walk as it was)."""
        max_size = rng.randint(1, 4)
        policy = rng.random() < 0.2  # site caps or the adaptive queue, sometimes
        return cls(
            max_size=max_size,
            min_size=rng.randint(0, max_size),
            init_size=rng.randint(0, max_size),
            max_connecting=rng.choice([None, 1, 2]),
            max_waiters=rng.choice([None, None, 0, 2]),
            breaker_threshold=rng.choice([None, 1, 3]),
            wait_on_connect_error=rng.random() < 0.5,
            max_inactive_lifetime=rng.choice([0.0, 2.0]),
            max_site_share=rng.choice([None, 0.5, 1.0]) if policy else None,
            adaptive=rng.choice([None, (0.05, 0.3)]) if policy else None,
            max_lifetime=None if lifetime_rng is None else lifetime_rng.choice([None, None, 0.5, 4.0]),
        )

    @classmethod
    def draw_capped(cls, rng: random.Random) -> Config:
        """A capped walk's configuration (see capped_walk): a quarter of
        max_size a site (one connection, or two), sometimes with the adaptive
        queue too; no idle lifetime, a low floor."""
        max_size = rng.randint(4, 5)
        return cls(
            max_size=max_size,
            min_size=rng.randint(0, 1),
            init_size=rng.randint(1, max_size),
            max_connecting=rng.choice([None, None, 2]),
            max_waiters=rng.choice([None, None, None, 4]),
            breaker_threshold=rng.choice([None, 3]),
            wait_on_connect_error=rng.random() < 0.5,
            max_inactive_lifetime=0.0,
            max_site_share=0.25,
            adaptive=rng.choice([None, None, (0.05, 0.3)]),
        )

    def make_state(self) -> PoolState:
        return PoolState(
            max_size=self.max_size,
            min_size=self.min_size,
            max_connecting=self.max_connecting,
            max_waiters=self.max_waiters,
            breaker_threshold=self.breaker_threshold,
            wait_on_connect_error=self.wait_on_connect_error,
            max_inactive_lifetime=self.max_inactive_lifetime,
            backoff=Backoff(base=0.5, cap=4.0, rng=lambda: 0.5),
            max_site_share=self.max_site_share,
            adaptive=None if self.adaptive is None else AdaptiveQueue(*self.adaptive),
            max_lifetime=self.max_lifetime,
        )


class IOLayer:
    """What the runner and the application hold: connects, resets and closes
    under way, leases held, tasks waiting or woken. ``drain`` carries out
    the core's actions as ``Runner.drain`` does."""

    def __init__(self, state: PoolState) -> None:
        self.state = state
        self.connecting: list[Slot] = []
        self.closing: list[Slot] = []
        self.resetting: list[Slot] = []
        self.held: list[Lease] = []
        self.waiters: list[Waiter] = []  # tasks waiting in Leaser.acquire (not yet resumed)
        self.woken: list[Waiter] = []  # granted, their task not resumed yet
        self.upkeep_running = False  # Runner.restore_floor
        self.upkeep_slot: Slot | None = None  # the connect it awaits
        self.terminating = False  # Runner.terminate_all: closes abort at once
        # (Capped walks) the share of connects a black hole swallows (drawn
        # with ``rng``), and the ones it swallowed: never answered.
        self.swallow = 0.0
        self.rng: random.Random | None = None
        self.swallowed: set[int] = set()

    def drain(self) -> None:
        state = self.state
        while state.actions:
            actions, state.actions = state.actions, []
            woken = len(self.woken)
            for action in actions:
                match action:
                    case Connect(slot):
                        self.connecting.append(slot)
                        if self.swallow and self.rng is not None and self.rng.random() < self.swallow:
                            self.swallowed.add(slot.id)
                    case Abandon(slot):
                        # The I/O layer cancels the connect; it ends later
                        # (finish_connect: cancelled, or an outcome its hook
                        # made of the cancellation), counted until then.
                        assert slot.state is S.CONNECTING and slot.abandoned and slot.owner is None
                    case Close(slot):
                        if self.terminating:
                            state.closed(slot, 0.0)  # (no await: the connection is aborted)
                        else:
                            self.closing.append(slot)
                    case Wake(waiter):
                        self.woken.append(waiter)
                    case TakeBack(lease):
                        # The reclaimer resets the connection taken back.
                        self.held.remove(lease)
                        self.resetting.append(lease.slot)
                    case TimeOut(waiter) | Fail(waiter, _) | Shed(waiter, _):
                        self.waiters.remove(waiter)  # its task raises
                    case LeakSuspect(_):
                        pass  # a warning only
                    case NoteServerStatus():
                        assert state.failure_went_stale  # (the runner logs and emits the status)
                    case _:
                        assert_never(action)
            for waiter in self.woken[woken:]:
                self.check_site_cap(waiter.site)

    def in_use(self, site: str | None) -> int:
        """Connections ``site`` holds: leases, and grants not claimed yet."""
        held = sum(1 for lease in self.held if lease.site == site)
        return held + sum(1 for w in self.woken if w.state is W.GRANTED and w.slot is not None and w.site == site)

    def check_site_cap(self, site: str | None) -> None:
        """Checked after the call that granted or leased a connection to
        ``site``: grants only add to a site's count within one call, so a
        site within its cap now was within it at each grant (a site over its
        cap after a resize is granted nothing)."""
        cap = self.state.site_cap
        if cap is not None:
            in_use = self.in_use(site)
            assert in_use <= cap, f"site {site} holds {in_use} connections, over its cap {cap}"


class Walk:
    """One seeded walk: the configuration, the steps, the checks."""

    def __init__(self, seed: int, steps: int = STEPS, capped: bool = False) -> None:
        self.seed = seed
        self.steps = steps
        self.capped = capped
        if capped:
            # (A generator of its own: the plain walks' seeds walk as they did.)
            self.rng = random.Random(f"capped {seed}")
            self.config = Config.draw_capped(self.rng)
            self.operations = CAPPED_OPERATIONS
            self.weights = [
                w if op in _ESSENTIAL else w * self.rng.choice(_SWARM)
                for op, w in zip(CAPPED_OPERATIONS, CAPPED_WEIGHTS, strict=True)
            ]
        else:
            self.rng = random.Random(seed)
            self.config = Config.draw(self.rng, random.Random(f"max_lifetime {seed}"))
            self.operations, self.weights = OPERATIONS, WEIGHTS
        self.state = self.config.make_state()
        self.io = IOLayer(self.state)
        if capped:
            self.io.swallow, self.io.rng = self.rng.choice([0.3, 0.5, 0.8]), self.rng
        self.now = random.Random(f"start {seed} {capped}").choice(START_READINGS)
        self.trace: list[str] = []

    # ------------------------------------------------------------ running

    def run(self) -> None:
        try:
            self.start()
            for _ in range(self.steps):
                size_before = self.state.size
                self.step()
                self.io.drain()
                if self.state.size > size_before:
                    assert self.state.size <= self.state.max_size, (
                        f"grew to {self.state.size} slots, max_size {self.state.max_size}"
                    )
                self.check()
            self.trace.append("settle")
            self.settle()
        except Exception as exc:
            raise WalkFailed(self.describe(exc)) from exc

    def describe(self, exc: BaseException) -> str:
        last = self.trace[-SHOWN_STEPS:]
        skipped = len(self.trace) - len(last)
        lines = [
            f"seed {self.seed}, step {len(self.trace)}: {type(exc).__name__}: {exc}",
            f"config: {self.config}",
            f"state: {self.state.phase.value}, size {self.state.size}/{self.state.max_size}, "
            f"waiting {self.state.waiting}, connect_failures {self.state.connect_failures}, "
            f"now {self.now:g}, backoff_until {self.state.backoff_until:g}",
            f"last steps{f' (after {skipped} more)' if skipped else ''}:",
            *(f"  {i}. {step}" for i, step in enumerate(last, skipped + 1)),
            f"replay: tests.unit.test_state_fuzz.Walk({self.seed}, steps={self.steps}"
            f"{', capped=True' if self.capped else ''}).run()",
        ]
        return "\n".join(lines)

    def note(self, detail: str) -> None:
        """Add what the current step did to its trace entry."""
        self.trace[-1] += f": {detail}"

    def start(self) -> None:
        """Runner.open: the start-up connects (all awaited), then the floor
        upkeep; acquires are refused until the pool is OPEN."""
        state, io = self.state, self.io
        self.trace.append("start-up")
        state.set_phase(Phase.STARTING)
        init_size = min(max(self.config.init_size, self.config.min_size), self.config.max_size)
        slots = [state.add_connecting(self.now) for _ in range(init_size)]
        for i, slot in enumerate(slots):
            # The first must succeed (else creation fails); the rest may not.
            if i == 0 or self.rng.random() < 0.8:
                state.connect_succeeded(slot, object(), self.now)
                self.note(f"connect {slot.id} ok")
            else:
                state.connect_failed(slot, self.now, ConnectionRefusedError("refused"))
                self.note(f"connect {slot.id} failed")
            io.drain()
        state.start_floor()
        state.advance(self.now)
        self.timer_fired()
        state.set_phase(Phase.OPEN)
        self.check()

    # ------------------------------------------------------------- steps

    def step(self) -> None:
        op = self.rng.choices(self.operations, self.weights)[0]
        entry = f"t={self.now:g} {op}"
        self.trace.append(entry)
        getattr(self, op)()
        if self.trace[-1] == entry:
            self.note("nothing to do")

    def acquire(self) -> None:
        if self.capped:
            rng = self.rng
            if rng.random() < 0.4:
                # The hog's task (see HOG): at its site's cap, it waits
                # however many connections are idle, and may wait long.
                self.try_acquire(rng.choice([None, 1.0]), HOG)
            else:
                # (Short timeouts: a task gives up in the black hole and
                # leaves its connect to nobody.)
                self.try_acquire(rng.choice([None, 0.05, 0.2, 0.2, 1.0]), rng.choice(CAPPED_SITES[1:]))
            return
        self.try_acquire(self.rng.choice([None, None, 0.5, 2.0]), self.rng.choice(["a", "b"]))

    def try_acquire(self, timeout: float | None, site: str) -> None:
        """Leaser.acquire: an idle connection at once, else a wait."""
        state = self.state
        try:
            lease = state.try_acquire(self.now, site)
        except Closed:
            self.note("closed")
            return
        if lease is not None:
            self.io.held.append(lease)
            self.io.check_site_cap(site)
            self.note(f"lease {lease.id} on slot {lease.slot.id}")
            return
        try:
            waiter = state.enqueue(object(), self.now, timeout, site)
        except (Overloaded, Unavailable, Closed) as exc:
            self.note(f"refused ({type(exc).__name__})")
            return
        self.io.waiters.append(waiter)
        self.note(f"waits (timeout {timeout}, site {site}, own connect {_slot_name(waiter.connect)})")

    def claim(self) -> None:
        """A woken task resumes (Leaser.acquire's claim)."""
        io = self.io
        if not io.woken:
            return
        waiter = io.woken.pop(self.rng.randrange(len(io.woken)))
        assert waiter.state is W.GRANTED  # (a cancel takes it out of woken)
        io.waiters.remove(waiter)
        try:
            lease = self.state.claim(waiter, self.now)
        except SlotLost:
            # The connection died before the task resumed: it tries again.
            self.note("slot lost, acquires again")
            self.try_acquire(None, waiter.site or "a")
            return
        io.held.append(lease)
        self.note(f"lease {lease.id} on slot {lease.slot.id}")

    def cancel(self) -> None:
        """task.cancel() while waiting, or after the grant before resuming."""
        io = self.io
        if not io.waiters:
            return
        waiter = self.rng.choice(io.waiters)
        was = waiter.state
        self.state.cancel_waiter(waiter, self.now)
        io.waiters.remove(waiter)
        if waiter in io.woken:
            io.woken.remove(waiter)
        self.note(f"a {was.value} task")

    def _take_lease(self) -> Lease | None:
        held = self.io.held
        if not held:
            return None
        i = self.rng.randrange(len(held))
        if self.capped and held[i].site == HOG and self.rng.random() < 0.85:
            return None  # (see HOG: it keeps its connection, mostly)
        return held.pop(i)

    def release(self) -> None:
        lease = self._take_lease()
        if lease is None:
            return
        if self.capped:
            # (Mostly kept: connections closed go into the black hole.)
            outcome = self.rng.choices(list(ReleaseOutcome), [6, 3, 2])[0]
        else:
            outcome = self.rng.choice(list(ReleaseOutcome))
        if self.state.release(lease, self.now, outcome):
            self.io.resetting.append(lease.slot)
        self.note(f"lease {lease.id} ({outcome.name})")

    def lose_proxy(self) -> None:
        """The proxy was garbage collected while leased."""
        lease = self._take_lease()
        if lease is None:
            return
        if self.state.reclaim(lease, self.now):
            self.io.resetting.append(lease.slot)
        self.note(f"lease {lease.id}")

    def arm_lease(self) -> None:
        held = [lease for lease in self.io.held if lease.deadline is None and lease.warn_at is None]
        if not held:
            return
        lease = self.rng.choice(held)
        lease_timeout = self.rng.choice([None, 0.1, 1.0, 3.0])
        warn_after = self.rng.choice([None, 0.5, 2.0])
        self.state.arm_lease(lease, lease_timeout, warn_after)
        self.note(f"lease {lease.id} (timeout {lease_timeout}, warn after {warn_after})")

    def finish_connect(self) -> None:
        """Runner.connect_slot: a connect ends (or is cancelled, once closing)."""
        io, state, rng = self.io, self.state, self.rng
        if not io.connecting:
            return
        if self.capped:
            # A swallowed connect ends only once the core gave it up and the
            # I/O layer cancelled it (the cancellation is local), and that
            # may take a while (so its end meets the pool as it is by then).
            ending = [i for i, s in enumerate(io.connecting) if s.abandoned or s.id not in io.swallowed]
            i = rng.choice(ending) if ending else None
            if i is None or (io.connecting[i].abandoned and rng.random() < 0.9):
                self.note("no answer")
                return
            slot = io.connecting.pop(i)
        else:
            slot = io.connecting.pop(rng.randrange(len(io.connecting)))
        roll = rng.random()
        if slot.abandoned and slot.state is S.CONNECTING and roll < 0.5:
            state.connect_cancelled(slot, self.now)
            self.note(f"slot {slot.id} cancelled (abandoned)")
        elif state.closing and roll < 0.3:
            state.connect_cancelled(slot)
            self.note(f"slot {slot.id} cancelled")
        elif roll < 0.7:
            state.connect_succeeded(slot, object(), self.now)
            self.note(f"slot {slot.id} ok")
        else:
            refused = rng.random() < 0.5
            state.connect_failed(slot, self.now, ConnectionRefusedError("refused"), refused)
            self.note(f"slot {slot.id} failed (refused={refused})")
            if state.floor_deficit() and state.started and not io.upkeep_running:
                io.upkeep_running = True  # Runner spawns restore_floor
        if slot is io.upkeep_slot:
            io.upkeep_slot = None
            if not state.floor_deficit():
                io.upkeep_running = False

    def floor_upkeep(self) -> None:
        """Runner.restore_floor wakes (after 1, 2, 4 ... s in real time)."""
        io, state = self.io, self.state
        if not io.upkeep_running or io.upkeep_slot is not None:
            return
        if state.closing or not state.floor_deficit():
            io.upkeep_running = False
            self.note("ends")
            return
        slot = state.plan_floor_connect(self.now)
        if slot is not None:
            io.connecting.append(slot)
            io.upkeep_slot = slot
        self.note(f"connect {_slot_name(slot)}")

    def finish_reset(self) -> None:
        io = self.io
        if not io.resetting:
            return
        slot = io.resetting.pop(self.rng.randrange(len(io.resetting)))
        if slot.state is not S.RESETTING:
            return  # discarded meanwhile (terminate): the reset task stops
        ok = self.rng.random() < (0.95 if self.capped else 0.8)
        self.state.reset_done(slot, self.now, ok)
        self.note(f"slot {slot.id} (ok={ok})")

    def finish_close(self) -> None:
        io = self.io
        if not io.closing:
            return
        slot = io.closing.pop(self.rng.randrange(len(io.closing)))
        self.state.closed(slot, self.now)
        self.note(f"slot {slot.id}")

    def connection_lost(self) -> None:
        """asyncpg reported a dead connection (Runner.connection_lost)."""
        losable = sorted(
            (s for s in self.state.slots() if s.state in (S.IDLE, S.LEASED, S.RESERVED)), key=lambda s: s.id
        )
        if not losable:
            return
        slot = self.rng.choice(losable)
        lease = slot.lease
        self.state.connection_lost(slot, self.now)
        if lease is not None:
            self.io.held.remove(lease)  # its proxy is detached: the release is a no-op
        self.note(f"slot {slot.id}")

    def advance(self) -> None:
        # (Capped walks: mostly steps about the hedge delay, 0.1 s.)
        self.now += self.rng.choice([0.05, 0.1, 0.1, 0.3] if self.capped else [0.05, 0.3, 1.0, 3.0])
        self.state.advance(self.now)
        self.timer_fired()
        self.note(f"to t={self.now:g}")

    def fire_timer(self) -> None:
        """The runner's timer fires at the next deadline."""
        when = self.state.next_deadline()
        if when is not None and when > self.now:
            self.now = when
        self.state.advance(self.now)
        self.timer_fired()
        self.note(f"at t={self.now:g}")

    def timer_fired(self) -> None:
        """``advance(now)`` ran: the I/O layer drains, then re-arms its timer
        (check_timer_moved_on)."""
        self.io.drain()
        check_timer_moved_on(self.state, self.now)

    def resize(self) -> None:
        if self.state.closing:
            return
        max_size = self.rng.randint(4, 5) if self.capped else self.rng.randint(1, 4)
        min_size = self.rng.choice([None, self.rng.randint(0, max_size)])
        self.state.resize(max_size, self.now, min_size)
        self.note(f"max_size={max_size}, min_size={min_size}")

    def expire_connections(self) -> None:
        self.state.expire_connections()

    def begin_close(self) -> None:
        """Runner.close_all: waiters fail, the floor upkeep stops."""
        if self.state.closing:
            return
        self.state.begin_close(RuntimeError("pool is closing"))
        self.io.upkeep_running = False

    def terminate(self) -> None:
        """Runner.terminate_all: every slot given up at once."""
        state, io = self.state, self.io
        if state.phase is Phase.CLOSED:
            return
        io.terminating = True
        state.begin_close(RuntimeError("pool is closed"))
        io.upkeep_running = False
        for slot in state.terminate(self.now):
            state.closed(slot, self.now)  # its close task is cancelled: aborted
        io.drain()
        io.closing = []
        io.connecting = [s for s in io.connecting if s.state is not S.CLOSED]
        io.held = [lease for lease in io.held if lease.active]
        state.set_phase(Phase.CLOSED)

    # ------------------------------------------------------------ checks

    def check(self) -> None:
        state = self.state
        state.check_invariants()
        if state.waiting:
            assert not state.closing, "waiters survived close"
            busy = sum(state.count(s) for s in (S.CONNECTING, S.RESETTING, S.LEASED, S.RESERVED, S.CLOSING))
            if busy == 0 and not any(w.state is W.GRANTED for w in self.io.woken):
                # (A granted task whose connection was lost still resumes: its
                # retry acquires again.) Only a connect retry can help now.
                assert state.next_deadline() is not None, "tasks wait with nothing under way and no timer armed"
        self.check_unbound_waiters_have_connects()
        if state.max_lifetime is not None:
            for slot in state.slots():
                if slot.state is S.IDLE:
                    assert slot.expires_at is not None and slot.expires_at > self.now, (
                        f"slot {slot.id} is idle past its max_lifetime"
                    )

    def check_unbound_waiters_have_connects(self) -> None:
        """A task waiting without a connect of its own gets one while the pool
        has room, no backoff holds connects back, and the throttle allows."""
        state = self.state
        if self.config.max_site_share is not None or self.config.adaptive is not None:
            return  # (their queue decides who is served: no connects of one's own)
        if state.closing or (state.connect_failures and self.now < state.backoff_until):
            return
        unbound = sum(1 for w in self.io.waiters if w.state is W.WAITING and w.connect is None)
        if not unbound:
            return
        limit = 1 if state.connect_failures else (state.max_connecting or state.max_size)
        # (Connects given up, being cancelled, count towards max_size and
        # max_connecting until they end.)
        connecting = state.count(S.CONNECTING)
        assert state.size >= state.max_size or connecting >= limit, (
            f"{unbound} task(s) wait without a connect: size {state.size}/{state.max_size}, "
            f"{connecting} connecting (limit {limit})"
        )

    def settle(self) -> None:
        """Release everything and let every connect, reset and close finish
        (time passing for backoffs and timeouts); the pool must go quiet."""
        state, io = self.state, self.io
        # A pool with max_lifetime replaces its connections for good: the
        # ones opened from now on live on, so the pool can go quiet (the
        # lifetimes running out first while it settles).
        state.max_lifetime = None
        for _ in range(300):
            progressed = False
            for waiter in list(io.woken):
                io.woken.remove(waiter)
                io.waiters.remove(waiter)
                try:
                    io.held.append(state.claim(waiter, self.now))
                except SlotLost:
                    pass  # (its retry would only wait like the others)
                progressed = True
                self.settled_one()
            for lease in list(io.held):
                io.held.remove(lease)
                if state.release(lease, self.now, ReleaseOutcome.CLEAN):
                    io.resetting.append(lease.slot)
                progressed = True
                self.settled_one()
            for slot in list(io.resetting):
                io.resetting.remove(slot)
                if slot.state is S.RESETTING:
                    state.reset_done(slot, self.now, True)
                progressed = True
                self.settled_one()
            for slot in list(io.connecting):
                io.connecting.remove(slot)
                state.connect_succeeded(slot, object(), self.now)
                progressed = True
                self.settled_one()
            for slot in list(io.closing):
                io.closing.remove(slot)
                state.closed(slot, self.now)
                progressed = True
                self.settled_one()
            if progressed:
                continue
            if state.connect_failures and (floor_slot := state.plan_floor_connect(self.now)) is not None:
                # The floor upkeep's connect. (Even when no upkeep task runs:
                # Runner spawns one only when a connect fails while below
                # min_size, so a floor lost otherwise during a backoff, or to a
                # failed start-up connect, waits for demand.)
                io.connecting.append(floor_slot)
                continue
            if state.waiting or state.next_deadline() is not None:
                self.now += 10.0  # let backoffs, timeouts and idle lifetimes pass
                state.advance(self.now)
                self.timer_fired()
                self.settled_one()
                continue
            break
        assert state.waiting == 0, f"{state.waiting} task(s) still wait after settling"
        assert state.in_use == 0, f"{state.in_use} connection(s) still in use after settling"
        for busy in (S.CONNECTING, S.RESETTING, S.CLOSING, S.RESERVED, S.LEASED):
            assert state.count(busy) == 0, f"{busy.value} left after settling"
        assert state.idle == state.size <= state.max_size
        if state.closing:
            assert state.size == 0, "connections left after close"
        else:
            assert state.size >= state.min_size, f"{state.size} connections, below min_size {state.min_size}"

    def settled_one(self) -> None:
        self.io.drain()
        self.check()


def check_timer_moved_on(state: PoolState, now: float) -> None:
    """Checked once a timer has fired (``advance(now)``, its actions drained):
    ``next_deadline()`` is later than ``now``, or None. The runner arms its
    one timer for it; one at an instant already past fires again at once,
    and if ``advance`` does nothing there it is re-armed for that instant
    again: a busy loop (the hedge timer at max_connecting with a connect
    given up, fixed in 6ceadc5). A deadline ``advance`` cannot act on
    before an I/O outcome is reported must not be reported at all.

    (Also used by test_state_machine.py.)"""
    when = state.next_deadline()
    assert when is None or when > now, (
        f"once its timer fired at {now!r}, next_deadline() is {when!r}: the runner re-arms for an instant already past"
    )


# Operation names (Walk's methods) and their weights.
_OPERATION_WEIGHTS: dict[str, float] = {
    "acquire": 5,
    "claim": 4,
    "cancel": 2,
    "release": 3,
    "lose_proxy": 1,
    "arm_lease": 1,
    "finish_connect": 4,
    "finish_reset": 2,
    "finish_close": 2,
    "connection_lost": 1,
    "advance": 1,
    "fire_timer": 1,
    "resize": 1,
    "expire_connections": 1,
    "floor_upkeep": 2,
    # Rare: a closed pool has little left to explore.
    "begin_close": 0.2,
    "terminate": 0.2,
}
OPERATIONS = list(_OPERATION_WEIGHTS)
WEIGHTS = list(_OPERATION_WEIGHTS.values())

# The capped walks' (see capped_walk): more acquires, claims and releases,
# time about the hedge delay; little resizing, closing or losing.
_CAPPED_OPERATION_WEIGHTS: dict[str, float] = {
    **_OPERATION_WEIGHTS,
    "acquire": 5,
    "claim": 4,
    "release": 3,
    "finish_reset": 3,
    "lose_proxy": 0.5,
    "arm_lease": 0.5,
    "connection_lost": 0.3,
    "advance": 2,
    "fire_timer": 2,
    "resize": 0.3,
    "expire_connections": 0.1,
    "begin_close": 0.01,
    "terminate": 0.01,
}
CAPPED_OPERATIONS = list(_CAPPED_OPERATION_WEIGHTS)
CAPPED_WEIGHTS = list(_CAPPED_OPERATION_WEIGHTS.values())
# Swarm testing: each capped walk scales each other operation's weight by
# one of _SWARM (so some are left out), which reaches more shapes than one
# mix; the essential ones keep theirs.
_ESSENTIAL = {
    "acquire", "claim", "release", "finish_connect", "finish_reset", "finish_close", "advance", "fire_timer",
    "begin_close", "terminate",
}
_SWARM = [0, 0, 0.3, 1, 3]
# The capped walks' sites. The first, HOG, holds on to its connections
# (rarely given back): at its cap, its tasks wait beside whatever else the
# pool does.
CAPPED_SITES = ["a", "b", "c", "d"]
HOG = CAPPED_SITES[0]


def _slot_name(slot: Slot | None) -> str:
    return "none" if slot is None else str(slot.id)


def walk(seed: int) -> None:
    """Run one seed's walk; raises WalkFailed naming the seed and its last steps."""
    Walk(seed).run()


def capped_walk(seed: int) -> None:
    """A capped walk: biased towards a shape the plain walks never reached,
    where an abandoned connect's end handed an idle connection to a task at
    its site's cap (fixed in 3660b0f): site caps below max_size, four sites
    (one hogging its connections, its tasks waiting at its cap), some
    connects swallowed by a black hole and given up (Abandon) once their
    tasks left and others waited for the hedge delay, their cancellations
    ending late, while releases and answered connects leave connections
    idle. Some 4% of the walks reach it."""
    Walk(seed, capped=True).run()


@pytest.mark.parametrize("seed", CI_SEEDS)
def test_random_walk(seed: int) -> None:
    walk(seed)


def _walks_pass(run: Callable[[int], object], seeds: Sequence[int]) -> None:
    """Every seed's walk: the failures counted, the first one shown."""
    failures = []
    for seed in seeds:
        try:
            run(seed)
        except WalkFailed as exc:
            failures.append(str(exc))
    assert not failures, f"{len(failures)} of {len(seeds)} seeds failed; the first:\n{failures[0]}"


@pytest.mark.skipif(not LONG, reason="SAFEPOOL_LONG=1 runs many more seeds")
def test_random_walks_long() -> None:
    _walks_pass(walk, LONG_SEEDS)


def test_capped_walks() -> None:
    """CI's capped walks (capped_walk), in one test: a few milliseconds each."""
    _walks_pass(capped_walk, CAPPED_CI_SEEDS)


@pytest.mark.skipif(not LONG, reason="SAFEPOOL_LONG=1 runs many more seeds")
def test_capped_walks_long() -> None:
    _walks_pass(capped_walk, CAPPED_LONG_SEEDS)


def _plan_floor_connect_before_34dd1ef(self: PoolState, now: float) -> Slot | None:
    """plan_floor_connect without 34dd1ef's fix: its connect is not adopted."""
    if not self.floor_deficit() or self.count(S.CONNECTING) or self.size >= self.max_size:
        return None
    return self.add_connecting(now)


def test_the_walk_catches_the_unadopted_floor_connect(monkeypatch: pytest.MonkeyPatch) -> None:
    """The check can fail: with 34dd1ef reverted, seed 7 leaves the floor
    upkeep's connect ownerless while a task waits without one (seed 7 passes
    with the fix: it is among CI_SEEDS). (Seed 0 did, at step 118, until the
    walk kept abandoned connects under way until they end, 2026-12-05.)"""
    assert 7 in CI_SEEDS
    monkeypatch.setattr(PoolState, "plan_floor_connect", _plan_floor_connect_before_34dd1ef)
    with pytest.raises(WalkFailed) as failed:
        walk(7)
    message = str(failed.value)
    assert message.startswith("seed 7, step 90: InternalStateError: a connect nobody waits for while a task waits")
    assert "floor_upkeep: connect" in message.splitlines()[-2]
    assert message.endswith("Walk(7, steps=150).run()")


def _connect_cancelled_before_3660b0f(self: PoolState, slot: Slot, now: float | None = None) -> None:
    """connect_cancelled without 3660b0f's fix: an abandoned connect's end
    serves idle connections by the default queue's rule, policy or not."""
    if slot.state is S.CONNECTING:
        owner = slot.owner
        slot.trigger = None
        if owner is not None:
            self._unbind(owner)
        self._move(slot, S.CLOSED)
        self._slots.discard(slot)
        if (owner is not None or slot.abandoned) and now is not None and not self.closing:
            self._serve_unbound(now)
            self._plan_connects(now)


def test_the_capped_walk_catches_an_abandoned_connect_serving_a_capped_site(monkeypatch: pytest.MonkeyPatch) -> None:
    """The capped walks reach the shape: with 3660b0f reverted, capped seed
    51 hands an idle connection to the hog's task, waiting at its site's
    cap, when an abandoned connect's cancellation ends at step 127 (it
    passes with the fix: it is among CAPPED_CI_SEEDS). Of CAPPED_CI_SEEDS, 6
    fail so (4 of them as they settle); the plain walks, 20,000 seeds, never
    did."""
    assert 51 in CAPPED_CI_SEEDS
    monkeypatch.setattr(PoolState, "connect_cancelled", _connect_cancelled_before_3660b0f)
    with pytest.raises(WalkFailed) as failed:
        capped_walk(51)
    message = str(failed.value)
    assert message.startswith("seed 51, step 127: AssertionError: site a holds 3 connections, over its cap 2")
    assert "finish_connect: slot 9 cancelled (abandoned)" in message.splitlines()[-2]
    assert message.endswith("Walk(51, steps=150, capped=True).run()")
