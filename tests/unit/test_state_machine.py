"""Model-based test of the state core: hypothesis drives ``PoolState`` through
every operation the I/O layer can perform, in any order, and checks the
invariants plus model-level properties after every step.

The machine plays both the application (acquire, claim, cancel, release, lose
a proxy) and the I/O layer (complete or fail connects, resets and closes,
notice a dead connection, fire timers). It keeps its own books of what it was
told to do (the actions) and checks them against the core's.

Properties checked after every step, besides ``check_invariants()``:

* the pool never opens a slot beyond ``max_size`` (``size`` only grows while
  ``size <= max_size``);
* waiters are granted at most once, in enqueue order (FIFO); with site caps,
  in enqueue order among the sites under their cap (a waiter whose site is
  under its cap is never passed over); with the adaptive queue, nobody older
  than the granted waiter is left waiting once it has waited a whole interval
  (so every waiter without a timeout is served eventually), and only waiters
  with a timeout are shed;
* a site never holds more than its cap (``ceil(share * max_size)``);
* no slot is leased twice; every lease the application holds matches its slot;
* every planned connect, close and reset is accounted for, exactly once;
* a waiting task always has something that will wake it (a connect, a reset,
  a lease, a close, or a timer), so nobody waits forever;
* timers fire at or after their deadline, never before, and ``next_deadline``
  never lies beyond a pending deadline;
* once a timer has fired (``advance(now)``: the ``advance`` and
  ``fire_next_deadline`` rules, the start-up's, the settling's),
  ``next_deadline`` is later than ``now``, or None: the runner re-arms its
  timer for it, and one at an instant already past fires again at once, a
  busy loop if ``advance`` does nothing there (the hedge timer did, fixed in
  6ceadc5). Checked by ``test_state_fuzz.check_timer_moved_on``, which lets
  one known defect through (while each re-fire gives a connect up:
  test_review_s61_timer_walks.py).

The clock starts at a reading drawn from ``START_READINGS`` (awkward ones
too, where a start plus a delay rounds), not only at 0.0. ``breaker`` is
drawn None too (fail_fast off, the default: connects unpaced, given up when
presumed lost), which the machine had never drawn; with it, the timer check
catches the hedge timer's spin of 6ceadc5 reverted (not within CI's 600
examples: the capped walks of test_state_fuzz are CI's guard there).

At the end of every example the machine settles the pool (releases all, lets
every connect, reset and close finish) and checks it is quiescent.

``CappedPoolMachine`` is the machine biased towards site caps, a black hole's
connects given up, and idle connections beside tasks waiting at their sites'
caps: a shape the plain machine never reached, where a real defect was (fixed
in 3660b0f).

CI runs a derandomized, bounded number of examples; ``SAFEPOOL_LONG=1`` runs
many more with a random seed.
"""

from __future__ import annotations

import os
from collections import Counter
from typing import Any, assert_never

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from safepool._policy import AdaptiveQueue
from safepool._state import (
    _STALE_FAILURE,
    STALE_FAILURE_AFTER,
    STALE_RECHECK,
    Abandon,
    Backoff,
    Close,
    Closed,
    Connect,
    Fail,
    LeakSuspect,
    Lease,
    LeaseState,
    NoteServerStatus,
    Overloaded,
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

from .test_state_fuzz import check_timer_moved_on

LONG = bool(os.environ.get("SAFEPOOL_LONG"))
S = SlotState
# The clock readings the machine starts at: awkward ones too.
START_READINGS = [0.0, 0.1, 1000.1, 1023.9, 12345.678]

times = st.sampled_from([0.0, 0.05, 0.3, 1.0, 2.5, 7.0])
timeouts = st.one_of(st.none(), st.sampled_from([0.0, 0.5, 1.0, 4.0]))
index = st.integers(min_value=0, max_value=1_000)
sites = st.sampled_from(["a", "b", "c"])
# CappedPoolMachine's sites; the first, HOG, hogs its connections.
CAPPED_SITES = ["a", "b", "c", "d"]
HOG = CAPPED_SITES[0]


class PoolMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0
        self.connecting: list[Slot] = []
        self.closing: list[Slot] = []
        self.resetting: list[Slot] = []
        self.held: list[Lease] = []
        self.stale_noted = False  # NoteServerStatus came for the current failure view
        self.armed: set[int] = set()
        self.waiters: list[Waiter] = []  # enqueue order
        self.woken: list[Waiter] = []  # granted, not yet claimed or cancelled
        self.grants: Counter[int] = Counter()
        self.claimed: set[int] = set()
        self.startup_slots: set[int] = set()  # Runner.open's explicit connects: not throttled  # waiters whose task resumed and claimed (or failed to)
        self.enqueue_order: dict[int, int] = {}
        self.last_size = 0
        self.sites: dict[int, str] = {}  # waiter or lease id -> site
        self.connect_owner: Waiter | None = None  # the task a finishing connect was opened for

    # ------------------------------------------------------------ set-up

    @initialize(
        max_size=st.integers(1, 4),
        min_size=st.integers(0, 4),
        init_size=st.integers(0, 4),
        max_waiters=st.one_of(st.none(), st.integers(0, 5)),
        max_connecting=st.one_of(st.none(), st.integers(1, 3)),
        lifetime=st.sampled_from([0.0, 2.0]),
        breaker=st.one_of(st.none(), st.integers(1, 3)),
        jitter=st.sampled_from([0.0, 0.5, 1.0]),
        share=st.sampled_from([None, None, 0.25, 0.5, 1.0]),
        adaptive=st.sampled_from([None, None, (0.05, 0.3)]),
        wait_on_error=st.booleans(),
        start=st.sampled_from(START_READINGS),
    )
    def setup(
        self,
        max_size: int,
        min_size: int,
        init_size: int,
        max_waiters: int | None,
        max_connecting: int | None,
        lifetime: float,
        breaker: int | None,
        jitter: float,
        share: float | None,
        adaptive: tuple[float, float] | None,
        wait_on_error: bool,
        start: float = 0.0,
    ) -> None:
        self.now = start
        min_size = min(min_size, max_size)
        self.share = share
        self.adaptive = adaptive
        self.state = PoolState(
            max_size=max_size,
            min_size=min_size,
            max_waiters=max_waiters,
            max_connecting=max_connecting,
            max_inactive_lifetime=lifetime,
            backoff=Backoff(base=0.5, cap=4.0, rng=lambda: jitter),
            breaker_threshold=breaker,
            wait_on_connect_error=wait_on_error,
            max_site_share=share,
            adaptive=None if adaptive is None else AdaptiveQueue(*adaptive),
        )
        # What Runner.open does (pool start-up): explicit connects, then the floor upkeep.
        for _ in range(min(max(init_size, min_size), max_size)):
            slot = self.state.add_connecting(self.now)
            self.startup_slots.add(id(slot))
            self.connecting.append(slot)
        self.last_size = self.state.size
        self._drain()

    # --------------------------------------------------------- the books

    def _drain(self) -> None:
        """Take the core's actions, as Pool._drain would, and check each."""
        state = self.state
        actions, state.actions = state.actions, []
        planned = False
        # While connects fail and the pool paces them (fail_fast,
        # wait_on_connect_error), one probe at a time, and a hedge beside
        # those under way only once the newest went unanswered long enough.
        # (Unpaced, as on asyncpg's pool, or after an init= failure or the
        # program's own mistake that failed its task: each waiting task gets
        # a connect of its own; the backoff is then over, its level 0.)
        probing = state.backoff_level > 0 and state._pacing()
        newest = max((s.created_at for s in self.connecting if s.state is S.CONNECTING), default=None)
        hedge = state.backoff.hedge_after
        for action in actions:
            match action:
                case Connect(slot):
                    assert slot.state is S.CONNECTING
                    assert slot not in self.connecting
                    if probing and newest is not None:
                        assert hedge is not None and self.now >= newest + hedge, "hedged too early"
                    self.connecting.append(slot)
                    planned = True
                case Abandon(slot):
                    # The I/O layer cancels the connect; it ends later
                    # (finish_connect), counted towards max_size until then.
                    assert slot.state is S.CONNECTING and slot.abandoned and slot.owner is None
                    assert slot in self.connecting
                case Close(slot):
                    assert slot.state is S.CLOSING
                    assert slot not in self.closing, "closed twice"
                    self.closing.append(slot)
                case Wake(waiter):
                    assert waiter.state is WaiterState.GRANTED
                    assert waiter.slot is not None and waiter.slot.state is S.RESERVED
                    self.grants[id(waiter)] += 1
                    assert self.grants[id(waiter)] == 1, "a waiter was granted twice"
                    self._check_order(waiter)
                    self.woken.append(waiter)
                case TimeOut(waiter):
                    assert waiter.state is WaiterState.TIMED_OUT
                    assert waiter.deadline is not None and waiter.deadline <= self.now, "timed out early"
                case Fail(waiter, _):
                    assert waiter.state is WaiterState.FAILED
                case Shed(waiter, _):
                    assert self.adaptive is not None, "shed without the adaptive queue"
                    assert waiter.state is WaiterState.FAILED
                    assert waiter.deadline is not None, "a waiter without a timeout was shed"
                    assert self.now - waiter.enqueued_at >= self.adaptive[0] - 1e-9, "shed before the target"
                case TakeBack(lease):
                    assert lease.state is LeaseState.EXPIRED and lease.expired and not lease.active
                    assert lease.deadline is not None and lease.deadline <= self.now, "lease taken back early"
                    assert lease.slot.state is S.RESETTING
                    self.held.remove(lease)
                    self.resetting.append(lease.slot)
                case LeakSuspect(lease):
                    # It may have expired later in the same advance (its warning
                    # came first, and is still reported).
                    assert lease.active or lease.expired
                    assert lease.warn_at is not None and lease.warn_at <= self.now
                case NoteServerStatus():
                    # The failure view went stale: reported once, "up" then,
                    # STALE_FAILURE_AFTER after the last failure at the soonest.
                    assert state.failure_went_stale and state.server_status(self.now).value == "up"
                    assert self.now >= state.connect_failed_at + STALE_FAILURE_AFTER
                    assert not self.stale_noted, "the stale failure view was reported twice"
                    self.stale_noted = True
                case _:  # pragma: no cover
                    assert_never(action)
        if planned:
            # Connects are throttled, and none is tried during a backoff.
            assert self.now >= state.backoff_until or not probing, "connect during backoff"
            if probing:
                fresh = [s for s in self.connecting if s.state is S.CONNECTING and self.now < s.created_at + (hedge or 0)]
                assert len(fresh) <= 1, f"{len(fresh)} probes started within the hedge delay"
            else:
                limit = state.max_connecting or state.max_size
                started = [s for s in self.connecting if id(s) not in self.startup_slots]
                assert len(started) <= limit, f"{len(started)} concurrent connects, limit {limit}"
        size = state.size
        if size > self.last_size:
            assert size <= state.max_size, f"grew to {size} slots, max_size {state.max_size}"
        self.last_size = size

    def _in_use(self, site: str) -> int:
        """Connections the site holds: leases, and grants not yet claimed."""
        # (Not a lease the core took back, its TakeBack not drained yet: an
        # expiry frees the site's place, and a grant it allows comes first.)
        held = sum(1 for lease in self.held if lease.active and self.sites.get(id(lease)) == site)
        granted = sum(
            1 for w in self.waiters
            if w.state is WaiterState.GRANTED and id(w) not in self.claimed and w.slot is not None
            and self.sites.get(id(w)) == site
        )
        return held + granted

    def _under_cap(self, site: str) -> bool:
        cap = self.state.site_cap
        return cap is None or self._in_use(site) < cap

    def _check_order(self, waiter: Waiter) -> None:
        """Checked after the call that granted ``waiter``: grants only add to
        a site's count within one call, so a site under its cap now was under
        it at the grant too."""
        state = self.state
        site = self.sites[id(waiter)]
        if state.site_cap is not None:
            assert self._in_use(site) <= state.site_cap, f"site {site} over its cap {state.site_cap}"
        if waiter is self.connect_owner:
            return  # granted the connect opened for it (asyncpg's order: its own connect)
        rank = self.enqueue_order[id(waiter)]
        # Released connections go to the head waiter without a connect of its own.
        earlier = [w for w in self.waiters[:rank] if w.state is WaiterState.WAITING and w.connect is None]
        if self.share is not None:
            # Only waiters of sites at their cap may be passed over.
            earlier = [w for w in earlier if self._under_cap(self.sites[id(w)])]
        if self.adaptive is None:
            assert not earlier, "FIFO violated: an earlier waiter under its site's cap still waits"
        else:
            interval = self.adaptive[1]
            for w in earlier:
                assert self.now - w.enqueued_at <= interval + 1e-9, "an old waiter was passed over"

    @staticmethod
    def _pick(items: list[Any], i: int) -> Any:
        return items[i % len(items)]

    # ------------------------------------------------- application side

    @rule(timeout=timeouts, site=sites)
    def acquire(self, timeout: float | None, site: str) -> None:
        state = self.state
        usable_idle = any(
            s.state is S.IDLE and s.generation == state.generation for s in state.slots()
        )
        nobody_waits = not any(
            w.state is WaiterState.WAITING and self._under_cap(self.sites[id(w)]) for w in self.waiters
        )
        under_cap = self._under_cap(site)
        try:
            lease = state.try_acquire(self.now, site)
        except Closed:
            assert state.closing
            return
        if lease is not None:
            assert lease.slot.state is S.LEASED
            assert under_cap, "a site at its cap leased an idle connection"
            self.sites[id(lease)] = site
            self.held.append(lease)
            self._drain()
            return
        assert not (usable_idle and nobody_waits and under_cap), "an idle connection was refused with nobody waiting"
        waiting_before = state.waiting
        room = max(0, state.max_size - state.size + state.count(S.CLOSING)) + state.count(S.CONNECTING)
        try:
            waiter = state.enqueue(object(), self.now, timeout, site)
        except Overloaded as exc:
            if str(exc).startswith("cannot be served"):
                assert self.adaptive is not None and timeout is not None
            elif str(exc).startswith("site"):
                assert self.share is not None and state.max_waiters is not None
            else:
                # Refused only when it would queue behind busy connections:
                # the room under max_size serves only waiters under their
                # site's cap (no connect is opened for a capped site).
                eligible = sum(
                    1
                    for w in self.waiters
                    if w.state is WaiterState.WAITING and self._under_cap(self.sites[id(w)])
                )
                queued = (waiting_before - eligible + (not under_cap)) + max(0, eligible + under_cap - room)
                assert state.max_waiters is not None and queued > state.max_waiters
        except Unavailable:
            serving = state.size - state.count(S.CONNECTING) - state.count(S.CLOSING)
            assert serving == 0 and state.connect_failures > 0
        else:
            self.sites[id(waiter)] = site
            self.enqueue_order[id(waiter)] = len(self.waiters)
            self.waiters.append(waiter)
        self._drain()

    @precondition(lambda self: self.woken)
    @rule(i=index)
    def claim(self, i: int) -> None:
        waiter = self._pick(self.woken, i)
        self.woken.remove(waiter)
        if waiter.state is not WaiterState.GRANTED:
            return  # cancelled meanwhile: the I/O layer never claims it
        self.claimed.add(id(waiter))
        assert waiter.slot is not None
        if waiter.slot.state is not S.RESERVED:
            # Its connection was lost between the grant and the resume.
            try:
                self.state.claim(waiter, self.now)
            except SlotLost:
                assert waiter.slot is None
            else:  # pragma: no cover
                raise AssertionError("claim of a lost slot succeeded")
        else:
            lease = self.state.claim(waiter, self.now)
            assert lease.slot.state is S.LEASED
            self.sites[id(lease)] = self.sites[id(waiter)]
            self.held.append(lease)
        self._drain()

    @precondition(lambda self: any(id(w) not in self.claimed for w in self.waiters))
    @rule(i=index)
    def cancel(self, i: int) -> None:
        """task.cancel() / asyncio.timeout at any moment before the task
        resumes, granted or not (after the claim it holds a lease instead)."""
        waiter = self._pick([w for w in self.waiters if id(w) not in self.claimed], i)
        self.state.cancel_waiter(waiter, self.now)
        if waiter in self.woken and waiter.state is not WaiterState.GRANTED:
            self.woken.remove(waiter)
        self._drain()

    @precondition(lambda self: self.held)
    @rule(i=index, outcome=st.sampled_from(list(ReleaseOutcome)))
    def release(self, i: int, outcome: ReleaseOutcome) -> None:
        lease = self._pick(self.held, i)
        self.held.remove(lease)
        needs_reset = self.state.release(lease, self.now, outcome)
        assert lease.state is LeaseState.RELEASED
        if needs_reset:
            assert outcome is ReleaseOutcome.NEEDS_RESET
            self.resetting.append(lease.slot)
        self._drain()

    @precondition(lambda self: self.held)
    @rule(i=index)
    def lose_proxy(self, i: int) -> None:
        """The proxy was garbage collected while leased."""
        lease = self._pick(self.held, i)
        self.held.remove(lease)
        assert self.state.reclaim(lease, self.now) is True
        assert self.state.reclaim(lease, self.now) is False
        assert lease.state is LeaseState.RECLAIMED
        self.resetting.append(lease.slot)
        self._drain()

    @precondition(lambda self: any(lease.id not in self.armed for lease in self.held))
    @rule(i=index, lease_timeout=st.one_of(st.none(), st.sampled_from([0.1, 1.0, 3.0])),
          warn_after=st.one_of(st.none(), st.sampled_from([0.5, 2.0])))
    def arm_lease(self, i: int, lease_timeout: float | None, warn_after: float | None) -> None:
        lease = self._pick([x for x in self.held if x.id not in self.armed], i)
        self.armed.add(lease.id)
        self.state.arm_lease(lease, lease_timeout, warn_after)
        self._drain()

    # ---------------------------------------------------------- I/O side

    @precondition(lambda self: self.connecting)
    @rule(i=index, ok=st.sampled_from([True, True, False, None, "program"]))
    def finish_connect(self, i: int, ok: bool | str | None) -> None:
        """``ok`` None: the init= hook raised on the open connection, which
        the slot then closes (still counted) while its waiters get the error.
        "program": the connect failed on the program's own mistake (a
        misspelled connect keyword), which is handled as an init= error."""
        slot = self._pick(self.connecting, i)
        self.connecting.remove(slot)
        assert slot.state is S.CONNECTING
        if slot.abandoned:
            # Cancelled by the I/O layer (an Abandon): it ends as cancelled,
            # whatever its task reports (its hook may have made an error or
            # a connection of the cancellation); no task fails.
            waiting = [w for w in self.state._waiters if w.state is WaiterState.WAITING]
            if ok is True:
                assert self.state.connect_succeeded(slot, object(), self.now) is False
            elif ok is False:
                self.state.connect_cancelled(slot, self.now)
            else:
                assert self.state.connect_failed(slot, self.now, LookupError("hook"), in_init=True) is False
            assert slot.state is S.CLOSED
            assert not [w for w in waiting if w.state is WaiterState.FAILED], "an abandoned connect failed a task"
            self._drain()
            return
        owner = slot.owner
        assert owner is None or (owner.state is WaiterState.WAITING and owner.connect is slot)
        self.connect_owner = owner
        # With a queue policy: the task whose arrival opened it (or None).
        trigger = slot.trigger
        assert trigger is None or self.state._policy is not None
        waiting = [w for w in self.state._waiters if w.state is WaiterState.WAITING]
        if ok == "program":
            adopted = slot.adopted
            assert self.state.connect_failed(slot, self.now, TypeError("typo"), program=True)
            assert slot.state is S.CLOSED and slot.owner is None
            assert owner is None or owner.state is not WaiterState.WAITING or self.state.wait_on_connect_error or adopted
        elif ok:
            self.state.connect_succeeded(slot, object(), self.now)
            if owner is not None and owner.state is not WaiterState.GRANTED:
                assert slot.state is S.CLOSING, "a connect went past the task it was opened for"
            elif owner is not None:
                assert owner.slot is slot, "a connect went past the task it was opened for"
        elif ok is None:
            # (A connect its owner took over, opened for min_size or for a
            # task that gave up, is not its acquire's: the owner waits on,
            # for a connect of its own, as on asyncpg's pool.)
            adopted = slot.adopted
            assert self.state.connect_failed(slot, self.now, LookupError("init failed"), in_init=True, connection=object())
            assert slot.state is S.CLOSING and slot.failed_connect, "the backend init= failed on stopped counting"
            assert slot in set(self.state.slots()) and slot.owner is None
            assert owner is None or owner.state is not WaiterState.WAITING or self.state.wait_on_connect_error or adopted
        else:
            adopted = slot.adopted
            self.state.connect_failed(slot, self.now, ConnectionRefusedError("refused"))
            if not self.state._pacing():
                # asyncpg's way: the error is its own task's, and only its.
                # (A connect its owner took over is not its acquire's: the
                # owner waits on, as in the init= branch above. Reached
                # once the machine drew breaker=None, fail_fast off.)
                failed = [w for w in waiting if w.state is WaiterState.FAILED]
                assert len(failed) <= 1, "a failed connect failed tasks other than its own"
                assert owner is None or owner.state is WaiterState.FAILED or adopted
        if ok is not True and self.state._policy is not None and not self.state.wait_on_connect_error and (
            ok is not False or not self.state._pacing()
        ):
            # With a queue policy the error is the task's whose arrival opened
            # the connect, if it still waits, and nobody else's.
            failed = [w for w in waiting if w.state is WaiterState.FAILED]
            assert failed == ([trigger] if trigger in waiting else []), "not the task the connect was opened for"
        try:
            self._drain()
        finally:
            self.connect_owner = None

    @precondition(lambda self: self.connecting)
    @rule(i=index)
    def answer_connect(self, i: int) -> None:
        """The server answered a connect: its connection is open, init= runs."""
        slot = self._pick(self.connecting, i)
        self.state.connect_answered(slot)
        self._drain()

    @precondition(lambda self: self.connecting and self.state.closing)
    @rule(i=index)
    def cancel_connect(self, i: int) -> None:
        """Pool.terminate() cancels the connect tasks (only after begin_close)."""
        slot = self._pick(self.connecting, i)
        self.connecting.remove(slot)
        self.state.connect_cancelled(slot)
        self._drain()

    @precondition(lambda self: self.resetting)
    @rule(i=index, ok=st.booleans())
    def finish_reset(self, i: int, ok: bool) -> None:
        slot = self._pick(self.resetting, i)
        self.resetting.remove(slot)
        if slot.state is not S.RESETTING:
            return  # discarded while resetting: Pool._reset_slot stops here too
        self.state.reset_done(slot, self.now, ok)
        self._drain()

    @precondition(lambda self: self.closing)
    @rule(i=index)
    def finish_close(self, i: int) -> None:
        slot = self._pick(self.closing, i)
        self.closing.remove(slot)
        self.state.closed(slot, self.now)
        self._drain()

    @precondition(lambda self: any(s.state in (S.IDLE, S.LEASED, S.RESERVED) for s in self.state.slots()))
    @rule(i=index)
    def connection_lost(self, i: int) -> None:
        """asyncpg reported a dead connection (Pool._connection_lost)."""
        slots = sorted(
            (s for s in self.state.slots() if s.state in (S.IDLE, S.LEASED, S.RESERVED)), key=lambda s: s.id
        )
        slot = self._pick(slots, i)
        lease = slot.lease
        self.state.discard(slot, self.now)
        if lease is not None:
            # The holder's proxy is detached; its release is a no-op.
            assert lease.state is LeaseState.DISCARDED and not lease.active
            self.held.remove(lease)
        self._drain()

    @rule(dt=times)
    def advance(self, dt: float) -> None:
        self.now += dt
        self.state.advance(self.now)
        self._timer_fired()

    def _timer_fired(self) -> None:
        """``advance(now)`` ran: its actions drained, the runner re-arms its
        timer, which must be later than now (check_timer_moved_on; checked
        before CappedPoolMachine's _drain answers connects: those are events
        of their own)."""
        self._take_actions()
        check_timer_moved_on(self.state, self.now)
        self._drain()

    def _take_actions(self) -> None:
        """The core's actions taken and checked, no I/O outcome reported."""
        PoolMachine._drain(self)

    @rule()
    def fire_next_deadline(self) -> None:
        """Jump exactly to the next deadline, as the pool's timer does."""
        when = self.state.next_deadline()
        if when is not None and when > self.now:
            self.now = when
        self.state.advance(self.now)
        self._timer_fired()

    @rule(max_size=st.integers(1, 5), min_size=st.one_of(st.none(), st.integers(0, 5)))
    def resize(self, max_size: int, min_size: int | None) -> None:
        if min_size is not None:
            self.state.min_size = min(min_size, max_size)  # Pool.resize validates this
        self.state.resize(max_size, self.now)
        self.last_size = min(self.last_size, self.state.size)
        self._drain()

    @rule()
    def expire_connections(self) -> None:
        self.state.expire_connections()
        self._drain()

    @precondition(lambda self: self.state.connect_failures and self.state.floor_deficit())
    @rule()
    def floor_upkeep(self) -> None:
        """Pool's floor upkeep task after a failed connect (restore_floor):
        one connect towards min_size, whoever waits meanwhile."""
        slot = self.state.plan_floor_connect(self.now)
        if slot is not None:
            self.startup_slots.add(id(slot))  # (an explicit connect, as at start-up: not throttled)
            self.connecting.append(slot)
        self._drain()

    @precondition(lambda self: not self.state.floor_enabled)
    @rule()
    def finish_init(self) -> None:
        self.state.floor_enabled = True
        self.state.advance(self.now)
        self._timer_fired()

    @precondition(lambda self: not self.state.closing)
    @rule()
    def begin_close(self) -> None:
        self.state.begin_close(RuntimeError("pool is closing"))
        self._drain()

    # -------------------------------------------------------- invariants

    @invariant()
    def books_balance(self) -> None:
        state = self.state
        state.check_invariants()
        # The server status: backing_off only while the last failure is
        # recent or the pool wants a connection (a connect will refresh the
        # view); once that is no longer so, the stale-failure timer is due
        # within STALE_RECHECK, so the runner reports the change.
        status = state.server_status(self.now).value
        if state.connect_failures == 0 or state.failure_went_stale:
            assert status == "up"
        if not state.failure_went_stale:
            self.stale_noted = False
        if status == "backing_off":
            assert state.wants_connection() or self.now < state.stale_failure_at()
            [due] = [when for when, _, kind, _ in state._timers if kind == _STALE_FAILURE]
            assert due <= max(self.now, state.stale_failure_at()) + STALE_RECHECK
        assert sum(state.count(s) for s in SlotState if s is not S.CLOSED) == state.size
        # A connection init= failed on counts towards max_size while it
        # closes, but was never the pool's: not opened, closed nor connected.
        failed = sum(1 for s in state.slots() if s.failed_connect)
        assert state.connected() == state.size - state.count(S.CONNECTING) - failed
        c = state.counters
        assert c.connections_opened - c.connections_closed == state.connected()
        # The machine's books agree with the core's.
        assert all(s.state is S.CONNECTING for s in self.connecting)
        assert len(self.connecting) == state.count(S.CONNECTING)
        assert all(s.state is S.CLOSING for s in self.closing)
        assert len(self.closing) == state.count(S.CLOSING)
        live_resets = [s for s in self.resetting if s.state is S.RESETTING]
        assert len(live_resets) == state.count(S.RESETTING)
        assert len(set(map(id, live_resets))) == len(live_resets)
        # No slot leased twice; every held lease matches its slot.
        slots = [lease.slot for lease in self.held]
        assert len(set(map(id, slots))) == len(slots), "a slot is leased twice"
        for lease in self.held:
            assert lease.state in (LeaseState.HELD, LeaseState.SUSPECT), lease.state
            assert lease.active and lease.slot.lease is lease and lease.slot.state is S.LEASED
        # Every reserved slot belongs to exactly one granted waiter.
        granted = [w for w in self.waiters if w.state is WaiterState.GRANTED and id(w) not in self.claimed]
        reserved = [w.slot for w in granted if w.slot is not None and w.slot.state is S.RESERVED]
        assert len(set(map(id, reserved))) == len(reserved) == state.count(S.RESERVED)
        assert state.in_use == len(self.held) + len(reserved)
        assert state.waiting == sum(1 for w in self.waiters if w.state is WaiterState.WAITING)

    @invariant()
    def nobody_waits_forever(self) -> None:
        state = self.state
        if not state.waiting:
            return
        assert not state.closing, "waiters survived close"
        busy = sum(state.count(s) for s in (S.CONNECTING, S.RESETTING, S.LEASED, S.RESERVED, S.CLOSING))
        if busy == 0 and not any(w.state is WaiterState.GRANTED for w in self.woken):
            # (A granted waiter whose connection was lost is still to resume:
            # its claim fails, frees its site's place and plans a connect.)
            # Nothing will come back: only a connect retry can help, and a
            # timer must be armed for it.
            when = state.next_deadline()
            assert when is not None, "waiters wait with nothing under way and no timer armed"

    @invariant()
    def next_deadline_is_not_late(self) -> None:
        state = self.state
        pending = [w.deadline for w in self.waiters if w.state is WaiterState.WAITING and w.deadline is not None]
        pending += [lease.deadline for lease in self.held if lease.deadline is not None and not lease.expired]
        pending += [lease.warn_at for lease in self.held if lease.warn_at is not None and not lease.warned]
        if pending:
            when = state.next_deadline()
            assert when is not None and when <= min(pending)

    @invariant()
    def sites_within_their_caps(self) -> None:
        state = self.state
        if state.site_cap is None:
            assert state.site_usage() == []
            return
        usage = {name: (held, waiting) for name, held, waiting in state.site_usage()}
        for site in CAPPED_SITES:
            held, waiting = usage.get(site, (0, 0))
            assert held == self._in_use(site), f"site {site}: core counts {held} in use"
            assert waiting == sum(
                1 for w in self.waiters if w.state is WaiterState.WAITING and self.sites[id(w)] == site
            )

    # ------------------------------------------------------------ settle

    def teardown(self) -> None:
        if not hasattr(self, "state"):
            return
        state = self.state
        for _ in range(200):
            progressed = False
            # One operation at a time, each drained (and checked) before the next.
            for waiter in list(self.woken):
                self.woken.remove(waiter)
                self.claimed.add(id(waiter))
                if waiter.state is WaiterState.GRANTED:
                    try:
                        lease = state.claim(waiter, self.now)
                        self.sites[id(lease)] = self.sites[id(waiter)]
                        self.held.append(lease)
                    except SlotLost:
                        pass
                self._drain()
                progressed = True
            for lease in list(self.held):
                self.held.remove(lease)
                if state.release(lease, self.now, ReleaseOutcome.CLEAN):
                    self.resetting.append(lease.slot)
                self._drain()
                progressed = True
            for slot in list(self.resetting):
                self.resetting.remove(slot)
                if slot.state is S.RESETTING:
                    state.reset_done(slot, self.now, True)
                self._drain()
                progressed = True
            for slot in list(self.connecting):
                self.connecting.remove(slot)
                self.connect_owner = slot.owner
                state.connect_succeeded(slot, object(), self.now)
                self._drain()
                self.connect_owner = None
                progressed = True
            for slot in list(self.closing):
                self.closing.remove(slot)
                state.closed(slot, self.now)
                self._drain()
                progressed = True
            self._drain()
            if not progressed and state.connect_failures and (slot := state.plan_floor_connect(self.now)):
                self.connecting.append(slot)  # what Pool's floor upkeep task does
                continue
            if not progressed:
                if state.waiting or state.next_deadline() is not None:
                    self.now += 10.0  # let backoffs, timeouts and lifetimes pass
                    state.advance(self.now)
                    self._timer_fired()
                    continue
                break
        self.books_balance()
        assert state.waiting == 0
        assert state.in_use == 0
        for busy in (S.CONNECTING, S.RESETTING, S.CLOSING, S.RESERVED, S.LEASED):
            assert state.count(busy) == 0, f"{busy.value} left after settling"
        assert state.idle == state.size <= state.max_size
        if state.closing:
            assert state.size == 0
        elif state.floor_enabled:
            assert state.size >= state.min_size


class CappedPoolMachine(PoolMachine):
    """The machine biased towards a shape the plain one never reached, where
    an abandoned connect's end handed an idle connection to a task at its
    site's cap (fixed in 3660b0f; see test_state_fuzz.capped_walk): a
    quarter of max_size a site (one connection, or two) and four sites, the
    first (HOG) hogging its connections (its tasks wait at its cap beside
    idle connections); a black hole swallowing connects (toggle_black_hole,
    lose_a_connect) until the core gives them up, their cancellations ending
    late. Resets, closes and the connects answered end at once (the plain
    machine interleaves them); the pool does not close."""

    def __init__(self) -> None:
        super().__init__()
        self.black_hole = False  # new connects are swallowed while it lasts
        self.swallowed: set[int] = set()  # (Slot.id) unanswered until given up

    @initialize(
        max_size=st.integers(4, 5),
        init_size=st.integers(1, 5),
        adaptive=st.sampled_from([None, None, (0.05, 0.3)]),
        wait_on_error=st.booleans(),
        start=st.sampled_from(START_READINGS),
    )
    def setup(
        self, max_size: int, init_size: int, adaptive: tuple[float, float] | None, wait_on_error: bool, start: float,
    ) -> None:
        PoolMachine.setup(
            self, max_size=max_size, min_size=1, init_size=init_size, max_waiters=None, max_connecting=None,
            lifetime=0.0, breaker=3, jitter=0.5, share=0.25, adaptive=adaptive, wait_on_error=wait_on_error,
            start=start,
        )
        # The pool opens (its start-up connects answered: _drain), and the
        # hog takes its share.
        self.state.floor_enabled = True
        self.state.advance(self.now)
        self._timer_fired()
        for _ in range(self.state.site_cap or 0):
            PoolMachine.acquire(self, timeout=None, site=HOG)

    def _take_actions(self) -> None:
        known = {s.id for s in self.connecting}
        super()._drain()
        if self.black_hole:
            self.swallowed.update(s.id for s in self.connecting if s.id not in known)

    def _drain(self) -> None:
        while True:
            self._take_actions()
            answered = [s for s in self.connecting if not s.abandoned and s.id not in self.swallowed]
            if self.resetting:
                slot = self.resetting.pop()
                if slot.state is S.RESETTING:
                    self.state.reset_done(slot, self.now, True)
            elif self.closing:
                self.state.closed(self.closing.pop(), self.now)
            elif answered:
                slot = answered[0]
                self.connecting.remove(slot)
                self.connect_owner = slot.owner
                try:
                    self.state.connect_succeeded(slot, object(), self.now)
                    super()._drain()
                finally:
                    self.connect_owner = None
            else:
                return

    begin_close = None  # type: ignore[assignment]  # (no rule: the pool does not close here)

    @rule()
    def toggle_black_hole(self) -> None:
        self.black_hole = not self.black_hole

    @rule(site=st.sampled_from(CAPPED_SITES[1:]), wait=st.sampled_from([0.0, 0.1]))
    def lose_a_connect(self, site: str, wait: float) -> None:
        """A task arrives, its connect goes into the black hole, it gives up
        (its timeout); another task of its site arrives and waits ``wait``:
        past the hedge delay (0.1 s), the connect is given up (an Abandon),
        if nothing served the task meanwhile."""
        black_hole, self.black_hole = self.black_hole, True
        PoolMachine.acquire(self, timeout=0.05, site=site)
        self.black_hole = black_hole
        PoolMachine.advance(self, dt=0.05)
        PoolMachine.acquire(self, timeout=0.2, site=site)
        PoolMachine.advance(self, dt=wait)

    @rule(timeout=st.sampled_from([None, 1.0]))
    def acquire_hog(self, timeout: float | None) -> None:
        PoolMachine.acquire(self, timeout=timeout, site=HOG)

    @rule(timeout=st.sampled_from([0.05, 0.2, 0.2, 1.0]), site=st.sampled_from(CAPPED_SITES[1:]))
    def acquire(self, timeout: float | None, site: str) -> None:
        """(Short timeouts: tasks come and go, a task gives up in the black
        hole and leaves its connect to nobody.)"""
        PoolMachine.acquire(self, timeout=timeout, site=site)

    @rule(dt=st.sampled_from([0.05, 0.1, 0.3, 1.0]))
    def advance(self, dt: float) -> None:
        """(About the hedge delay, 0.1 s.)"""
        PoolMachine.advance(self, dt=dt)

    @precondition(lambda self: any(s.abandoned for s in self.connecting))
    @rule(i=index, ok=st.sampled_from([True, True, False, None, "program"]), late=st.sampled_from([True, True, False]))
    def finish_connect(self, i: int, ok: bool | str | None, late: bool) -> None:
        """Only a connect given up ends here (the others are answered at
        once, or swallowed), and mostly late: the pool moves on meanwhile."""
        if late:
            return
        slot = self._pick([s for s in self.connecting if s.abandoned], i)
        PoolMachine.finish_connect(self, i=self.connecting.index(slot), ok=ok)

    @precondition(lambda self: self.held)
    @rule(
        i=index, outcome=st.sampled_from([ReleaseOutcome.CLEAN, ReleaseOutcome.NEEDS_RESET, ReleaseOutcome.DISCARD]),
        keep=st.sampled_from([True, True, True, False]),
    )
    def release(self, i: int, outcome: ReleaseOutcome, keep: bool) -> None:
        """(The hog keeps its connection, mostly.)"""
        if keep and self.sites.get(id(self._pick(self.held, i))) == HOG:
            return
        PoolMachine.release(self, i=i, outcome=outcome)


# The core is pure Python, the same on every asyncpg: the version matrix
# (.ci/matrix.py) runs fewer examples per cell (SAFEPOOL_MODEL_EXAMPLES),
# the README's test command the full 600.
EXAMPLES = int(os.environ.get("SAFEPOOL_MODEL_EXAMPLES", "600"))



def _machine_settings(examples: int, long_examples: int) -> settings:
    """Derandomized runs of ``examples`` (``long_examples`` with SAFEPOOL_LONG=1)."""
    return settings(
        max_examples=long_examples if LONG else examples,
        stateful_step_count=80 if LONG else 50,
        derandomize=not LONG,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow],
    )


PoolMachine.TestCase.settings = _machine_settings(EXAMPLES, 2_000)
TestPoolStateMachine = PoolMachine.TestCase

# CappedPoolMachine: a few examples in CI (its rules kept working; the
# capped walks of test_state_fuzz are CI's guard of its shape), many with
# SAFEPOOL_LONG=1: 1,000 examples reach the shape some 20 to 40 times.
CAPPED_EXAMPLES = int(os.environ.get("SAFEPOOL_CAPPED_MODEL_EXAMPLES", "25"))
CappedPoolMachine.TestCase.settings = _machine_settings(CAPPED_EXAMPLES, 1_000)
TestCappedPoolMachine = CappedPoolMachine.TestCase
