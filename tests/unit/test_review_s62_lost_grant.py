"""Review s62 (helper-190): a lost grant whose task is refused when it
queues again. ``Leaser.acquire`` (safepool/_leasing.py) claims a granted
connection when the task resumes; if the connection died in between
(``PoolState.claim`` raises ``SlotLost``) the task loops: ``try_acquire``
(drained only for actions), then ``enqueue``. Queued, it drains for the
waiter's deadline, connect failures or ``connects_to_watch``; refused
(``Overloaded``, ``Inadmissible``, ``Unavailable``) it drains only if
``state.actions``. The s61 drain audit took the lost claim as "drained as
an enqueue", which holds only when the enqueue succeeds.

The core's half, pinned here: the lost claim gives the site's place back
(``_policy_released``), so the site's tasks waiting at its cap become
eligible, which can create a deadline with no action announcing it, and
the re-enqueue is then refused with still no action:

- a connect under way that nobody waits on becomes an orphan, presumed
  lost at its start plus the hedge delay (``_lost_orphan_at``), and
  ``connects_to_watch`` is set; the refusal is ``max_waiters``'
  ``Overloaded`` or the adaptive queue's ``Inadmissible``;
- while connects fail and are paced (``fail_fast``), with no connect
  under way, the next probe is due at the backoff's end
  (``next_deadline``'s ``backoff_until``: a task now needs a connect);
  the refusal is the breaker's ``Unavailable`` (no connection left), and
  ``connects_to_watch`` stays False.

Each test ends where ``Leaser.acquire`` ends: no action, a deadline
``next_deadline()`` reports before any timer the I/O layer armed. The
I/O layer's half (nothing drains, the eligible task is stranded) is
reproduced on a real server in
tests/faults/test_review_s62_lost_grant.py (xfail until the Leaser
drains after a lost claim)."""

from __future__ import annotations

from safepool._policy import AdaptiveQueue
from safepool._state import (
    Close,
    Connect,
    Inadmissible,
    Lease,
    Overloaded,
    PoolState,
    ReleaseOutcome,
    Slot,
    SlotLost,
    TimeOut,
    Unavailable,
    WaiterState,
    Wake,
)

from .test_state import fields, make, take

CLEAN = ReleaseOutcome.CLEAN


def lose(state: PoolState, slot: Slot, now: float) -> None:
    """The I/O layer saw ``slot``'s connection die (``Runner.connection_lost``:
    it drains, and the Close is taken)."""
    state.connection_lost(slot, now)
    assert fields(take(state, Close)) == [slot]


def test_a_lost_grant_refused_by_max_waiters_leaves_an_orphans_lost_deadline_with_no_action() -> None:
    """``max_size=10``, ``max_site_share=0.1`` (a cap of 1), ``max_waiters=1``.
    Sites A, B and C each queue two tasks, D one with ``timeout=0.05``:
    seven connects. The first of each of A, B, C is served (a grant), so
    the second of each waits at its site's cap: three tasks beside
    ``max_waiters=1`` (admitted while their sites were under their caps).
    D's task times out: its connect (no answer: a black hole) is nobody's,
    and no eligible task waits, so nothing watches it. The others' second
    connects answer, go idle, and die. Then A's granted connection dies
    before its task resumes: the claim is lost, A is under its cap again,
    A's second task is eligible and D's connect its orphan, presumed lost
    at 0.0 + the hedge delay (twice the slowest connect: 0.12).
    ``connects_to_watch`` is set and no action says so. The task queues
    again and is refused (two tasks wait at B's and C's caps, over
    ``max_waiters=1``), still with no action: the I/O layer drains for
    neither, and nothing arms a timer for 0.12."""
    state = make(max_size=10, max_site_share=0.1, max_waiters=1)
    assert state.site_cap == 1
    names = ["a1", "a2", "b1", "b2", "c1", "c2", "d"]
    waiters, connects = {}, {}
    for name in names:
        assert state.try_acquire(0.0, name[0]) is None
        waiters[name] = state.enqueue(object(), 0.0, 0.05 if name == "d" else None, name[0])
        [connects[name]] = fields(take(state, Connect))
    for name in ("a1", "b1", "c1"):
        state.connect_succeeded(connects[name], object(), 0.01)
        assert fields(take(state, Wake)) == [waiters[name]]
    state.claim(waiters["b1"], 0.01)
    state.claim(waiters["c1"], 0.01)
    state.advance(0.05)
    assert fields(take(state, TimeOut)) == [waiters["d"]]
    for name in ("a2", "b2", "c2"):
        state.connect_succeeded(connects[name], object(), 0.06)
        assert not state.actions  # (no eligible task: idle)
        lose(state, connects[name], 0.06)
        state.closed(connects[name], 0.06)
        assert not state.actions
    state.connects_to_watch = False  # (drained)
    assert state.next_deadline() is None  # no timer: nothing is due
    lose(state, connects["a1"], 0.07)
    assert state.next_deadline() is None
    # Leaser.acquire: the task resumes and claims.
    try:
        state.claim(waiters["a1"], 0.07)
        raise AssertionError("the claim of a dead connection succeeded")
    except SlotLost:
        pass
    assert waiters["a2"].state is WaiterState.WAITING and state._policy.is_eligible(waiters["a2"])  # type: ignore[union-attr]
    lost_at = 0.0 + 2 * 0.06
    assert state.next_deadline() == lost_at  # the orphan: connects["d"], presumed lost then
    assert state.connects_to_watch and not state.actions
    assert state.try_acquire(0.07, "a") is None
    assert not state.actions  # (Leaser: no drain)
    try:
        state.enqueue(object(), 0.07, None, "a")
        raise AssertionError("queued: the refusal this test is about did not happen")
    except Overloaded as exc:
        assert not isinstance(exc, Inadmissible)
    assert not state.actions  # (Leaser's except Overloaded: no drain)
    assert state.connects_to_watch  # set, and nobody will drain for it
    assert state.next_deadline() == lost_at


def test_a_lost_grant_refused_by_the_adaptive_admission_leaves_an_orphans_lost_deadline_with_no_action() -> None:
    """``max_size=2``, ``max_site_share=0.5`` (a cap of 1), the adaptive
    queue (``interval`` long: never standing). Ten hand-ons 0.5 s apart
    measure the drain rate (a connection per ~0.3-0.5 s). Task A1
    (``timeout=0.6``) and task B queue; a connection dies and its
    replacement starts for A1 (no answer: a black hole); a release serves
    A1 (a grant), B gives up, and A2 queues at A's cap: the connect is
    nobody's, and no eligible task waits. A1's granted connection dies
    before it resumes: the claim is lost, A2 is eligible and the connect
    its orphan, presumed lost at its start + 0.1 (the hedge delay), with
    ``connects_to_watch`` set and no action. A1 queues again with 0.45 s
    left and one task ahead: the deadline-aware admission refuses it
    (``Inadmissible``), still with no action."""
    state = make(max_size=2, max_site_share=0.5, adaptive=AdaptiveQueue(0.05, 1000.0))

    def lease_at(site: str, now: float) -> Lease:
        state.enqueue(object(), now, None, site)
        for slot in fields(take(state, Connect)):
            state.connect_succeeded(slot, object(), now)
        [waiter] = fields(take(state, Wake))
        return state.claim(waiter, now)

    held_q = lease_at("q", 0.0)
    lease = lease_at("p", 0.0)
    queued = [state.enqueue(object(), 0.0, None, f"s{i}") for i in range(10)]
    for i in range(9):
        now = 0.5 * (i + 1)
        state.release(lease, now, CLEAN)
        assert fields(take(state, Wake)) == [queued[i]]
        lease = state.claim(queued[i], now)
    state.cancel_waiter(queued[9], 4.6)
    gap = state._policy.adaptive.gap  # type: ignore[union-attr]
    assert 0.3 / 2 < 0.45 < 2 * 0.3 < 2 * gap and gap < 0.6  # (A1 admitted first, refused then)
    a1 = state.enqueue(object(), 5.0, 0.6, "a")
    b = state.enqueue(object(), 5.0, 10.0, "b")
    lose(state, held_q.slot, 5.1)
    state.closed(held_q.slot, 5.1)
    [orphan] = fields(take(state, Connect))
    assert orphan.trigger is a1
    state.release(lease, 5.12, CLEAN)
    assert fields(take(state, Wake)) == [a1]
    state.cancel_waiter(b, 5.12)
    a2 = state.enqueue(object(), 5.13, None, "a")
    assert not state.actions and not state._policy.is_eligible(a2)  # type: ignore[union-attr]
    state.connects_to_watch = False  # (drained)
    assert state.next_deadline() is None
    lose(state, a1.slot, 5.14)
    assert state.next_deadline() is None
    try:
        state.claim(a1, 5.15)
        raise AssertionError("the claim of a dead connection succeeded")
    except SlotLost:
        pass
    lost_at = 5.1 + 0.1
    assert state.next_deadline() == lost_at
    assert state.connects_to_watch and not state.actions
    assert state.try_acquire(5.15, "a") is None
    assert not state.actions
    try:
        state.enqueue(object(), 5.15, 5.6 - 5.15, "a")
        raise AssertionError("queued: the refusal this test is about did not happen")
    except Inadmissible:
        pass
    assert not state.actions and state.connects_to_watch
    assert state.next_deadline() == lost_at


def test_a_lost_grant_refused_by_the_breaker_leaves_the_probes_deadline_with_no_action() -> None:
    """``max_size=2``, ``max_site_share=0.5`` (a cap of 1), the breaker at
    one failure (``fail_fast``'s pacing). Site a holds the one connection;
    a connect of site b fails: the backoff runs to 1.0, and the only timer
    due is the stale-failure check at 60.01. A1 and A2 queue at a's cap
    (no task needs a connect: no probe is due). The release serves A1 (a
    grant) and the connection dies before A1 resumes: the claim is lost,
    A2 is eligible, and a probe is due at the backoff's end (1.0), with
    no action and ``connects_to_watch`` False (no connect under way). A1
    queues again: the breaker refuses it (no connection left, in the
    backoff, no connect under way: ``Unavailable``), still with no action.
    The I/O layer drains for neither: the timer stays at 60.01."""
    state = make(max_size=2, max_site_share=0.5, breaker_threshold=1)
    state.enqueue(object(), 0.0, None, "a")
    [slot] = fields(take(state, Connect))
    state.connect_succeeded(slot, object(), 0.0)
    [waiter] = fields(take(state, Wake))
    lease = state.claim(waiter, 0.0)
    state.enqueue(object(), 0.0, None, "b")
    [failing] = fields(take(state, Connect))
    state.connect_failed(failing, 0.01, OSError("refused"))
    state.actions.clear()  # (its task's Fail)
    state.connects_to_watch = False  # (drained)
    assert state.backoff_until == 1.0
    timer = state.next_deadline()
    assert timer == 0.01 + 60.0  # the stale-failure check
    a1 = state.enqueue(object(), 0.02, None, "a")
    state.enqueue(object(), 0.02, None, "a")
    assert not state.actions and state.next_deadline() == timer
    state.release(lease, 0.03, CLEAN)
    assert fields(take(state, Wake)) == [a1]
    lose(state, slot, 0.03)
    assert state.next_deadline() == timer
    try:
        state.claim(a1, 0.03)
        raise AssertionError("the claim of a dead connection succeeded")
    except SlotLost:
        pass
    assert state.next_deadline() == 1.0  # the probe, for the eligible task
    assert not state.actions and not state.connects_to_watch
    assert state.try_acquire(0.03, "a") is None
    assert not state.actions
    try:
        state.enqueue(object(), 0.03, None, "a")
        raise AssertionError("queued: the refusal this test is about did not happen")
    except Unavailable:
        pass
    assert not state.actions
    assert state.next_deadline() == 1.0 < timer
