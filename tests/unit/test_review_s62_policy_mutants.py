"""Mutation review of safepool/_policy.py (review s62): each test here kills
a hand-made mutant of the wait policies that the suite let through, by
asserting what docs/backpressure.md promises ("Bulkheads per acquire
site", "Adaptive queue"). The state core driven directly, as in
tests/unit/test_state.py: no event loop, no database, time as plain
numbers (binary fractions where a test sits on a boundary)."""

from __future__ import annotations

import gc
import weakref
from typing import Any

import pytest

from safepool._policy import AdaptiveQueue
from safepool._state import Backoff, Overloaded, PoolState, ReleaseOutcome, Shed, WaiterState
from tests.unit.test_state import _invariants  # noqa: F401 (autouse: each test's PoolState is checked)

CLEAN = ReleaseOutcome.CLEAN
WAITING, GRANTED, FAILED = WaiterState.WAITING, WaiterState.GRANTED, WaiterState.FAILED


def make(max_size: int, *, share: float | None = None, target: float | None = None, interval: float = 0.1,
         max_waiters: int | None = None, open_: int | None = None) -> PoolState:
    """A core with ``open_`` (default ``max_size``) connections open."""
    state = PoolState(
        max_size=max_size,
        max_site_share=share,
        adaptive=None if target is None else AdaptiveQueue(target, interval),
        max_waiters=max_waiters,
        backoff=Backoff(rng=lambda: 1.0),
    )
    for _ in range(max_size if open_ is None else open_):
        state.connect_succeeded(state.add_connecting(0.0), object(), 0.0)
    return state


def sheds(state: PoolState) -> list[Any]:
    return [a.waiter for a in state.actions if isinstance(a, Shed)]


# ------------------------------------------------------------- bulkheads


@pytest.mark.parametrize(("share", "max_size", "cap"), [(0.14, 50, 7), (0.28, 25, 7), (0.56, 25, 14), (0.5, 3, 2)])
def test_site_cap_is_ceil_of_share_times_max_size_without_float_error(share: float, max_size: int, cap: int) -> None:
    """docs: "one acquire site holds at most ceil(s * max_size)
    connections". 0.14 * 50 is 7.000000000000001 in floats: a plain ceil
    gives 8. (Mutant: ``math.ceil(share * max_size)`` without the epsilon.)
    The site gets its cap of leases, and the next acquire of the site waits
    while connections sit idle."""
    state = make(max_size, share=share)
    assert state.site_cap == cap
    assert all(state.try_acquire(0.0, "a") for _ in range(cap))
    assert state.try_acquire(0.0, "a") is None
    assert state.try_acquire(0.0, "b") is not None  # another site is served


def test_a_capped_sites_waiters_count_no_room_toward_its_share_of_max_waiters() -> None:
    """docs: "Room under max_size ... is only for sites under their cap: no
    connection is opened for a capped site's waiters, so each of them
    counts, toward max_waiters and toward its site's share". max_size=4
    with 2 open (room for 2 more), share 0.5 (cap 2), max_waiters=2 (a
    site's share: 1). Site "a" at its cap may queue one task; the second
    is refused. (Mutant: the site's room taken as the pool's room whatever
    its cap, admitting the second.)"""
    state = make(4, share=0.5, max_waiters=2, open_=2)
    assert state.try_acquire(0.0, "a") and state.try_acquire(0.0, "a")
    first = state.enqueue(object(), 0.0, None, "a")
    with pytest.raises(Overloaded, match="share"):
        state.enqueue(object(), 0.0, None, "a")
    assert first.state is WAITING and state.counters.overload_rejections == 1


def test_site_usage_lists_exactly_top_sites_without_an_other_row() -> None:
    """docs ("Where it shows"): stats().sites is "the 10 busiest sites ...
    then "other" summing the rest". With exactly ``top`` sites there is no
    rest: no ("other", 0, 0) row, which exporters would publish as a series
    of its own. (Mutant: ``len(rows) < top``.)"""
    state = make(4, share=0.25)
    for site in "abc":
        assert state.try_acquire(0.0, site) is not None
    assert sorted(state.site_usage(3)) == [("a", 1, 0), ("b", 1, 0), ("c", 1, 0)]
    assert [row[0] for row in state.site_usage(2)] == ["a", "b", "other"]


def test_site_usage_lists_a_given_site_first_whatever_its_rank() -> None:
    """A timed-out task's message names its own site's cap (review h270):
    ``first`` is listed first, within ``top``; the others keep their rank,
    and the rest is summed as "other"."""
    state = make(4, share=0.25)
    for site in "abcd":
        assert state.try_acquire(0.0, site) is not None
    for site in "aabbcc":
        state.enqueue(object(), 0.0, None, site)
    assert [row[0] for row in state.site_usage(3)] == ["a", "b", "c", "other"]
    assert state.site_usage(3, "d") == [("d", 1, 0), ("a", 1, 2), ("b", 1, 2), ("other", 1, 2)]
    assert [row[0] for row in state.site_usage(3, "b")] == ["b", "a", "c", "other"]
    assert [row[0] for row in state.site_usage(3, "nowhere")] == ["a", "b", "c", "other"]  # (no book: no row)


def test_settled_waiters_of_a_site_that_holds_connections_are_not_kept() -> None:
    """A cancelled waiter's future (and a failed one's error, with the
    caller's frames) must not be kept by its site's book while the site
    holds a connection (memory stays bounded, as the core's own queue's:
    _state._compact_waiters). 1001 tasks of site "a" queue behind its cap,
    1000 give up: at most a few dozen of their futures may remain
    referenced; once the last one is served, none. (Mutants: remove()
    without _compact; the compaction of a mostly settled queue skipped;
    the settled entries a pick leaves behind kept.)"""

    class Future:
        pass

    state = make(2, share=0.5)
    held = state.try_acquire(0.0, "a")
    assert held is not None and state.try_acquire(0.0, "b") is not None
    last = state.enqueue(Future(), 0.0, None, "a")  # served at the end
    refs = []
    for i in range(1000):
        future = Future()
        refs.append(weakref.ref(future))
        waiter = state.enqueue(future, 0.0, None, "a")
        if i:  # (the first stays queued behind ``last`` until the others are gone)
            state.cancel_waiter(waiter, 0.0)
        else:
            first = waiter
    del future, waiter
    gc.collect()
    assert sum(ref() is not None for ref in refs) < 100
    state.cancel_waiter(first, 0.0)
    del first
    state.release(held, 1.0, CLEAN)  # "a" leaves its cap: ``last`` is served
    assert last.state is GRANTED
    gc.collect()
    assert [ref for ref in refs if ref() is not None] == []


# ---------------------------------------------------------- adaptive queue



def test_a_quiet_spell_is_not_measured_as_a_gap_between_hand_ons() -> None:
    """docs ("Deadline-aware admission"): the drain rate is "an EWMA of the
    time between connections handed to waiters, measured only while tasks
    wait; ... a quiet spell with nobody waiting is no stall". Nine hand-ons
    0.1 s apart while tasks wait (10/s); the pool then idles for 100 s and
    one task waits briefly. A task arriving with timeout 0.5 s and nobody
    ahead fits at 10/s: it must be admitted. It was refused (fixed in
    review s62): the 99 s quiet spell entered the average (gap ~10 s). (The integration twin:
    tests/integration/test_review_s62_adaptive_quiet_spell.py.)"""
    state = make(1, target=1.0, interval=10.0)
    lease = state.try_acquire(0.0)
    assert lease is not None
    now = 0.0
    waiters = [state.enqueue(object(), 0.0, None) for _ in range(10)]
    for waiter in waiters:
        now += 0.1
        state.release(lease, now, CLEAN)
        assert waiter.state is GRANTED
        lease = state.claim(waiter, now)
    state.release(lease, 1.1, CLEAN)  # nobody waits: the connection goes idle
    lease = state.try_acquire(100.0)
    assert lease is not None
    brief = state.enqueue(object(), 100.0, None)
    state.release(lease, 100.1, CLEAN)
    lease = state.claim(brief, 100.1)
    admitted = state.enqueue(object(), 100.2, 0.5)
    assert admitted.state is WAITING and state.counters.admission_rejections == 0


def test_a_hand_on_that_finds_only_capped_waiters_ends_the_measured_backlog() -> None:
    """The same promise where the core does consult the policy on an idle
    hand-on: a capped site's task waits (its site at its cap: not in the
    queue), so a released connection goes through the policy, which finds
    no eligible waiter and idles it. That hand-on ends the backlog: the
    100 s that follow, with no eligible task waiting, are not a gap between
    hand-ons, and a task with timeout 0.5 s and nobody ahead is admitted
    (10/s measured before). (Mutants: note_hand_on keeping the last
    hand-on when nobody waited; pick() passing backlog=True always.)"""
    state = make(2, share=0.5, target=1.0, interval=10.0)  # cap 1
    held = state.try_acquire(0.0, "y")
    lease = state.try_acquire(0.0, "x")
    assert held is not None and lease is not None
    now = 0.0
    waiters = [state.enqueue(object(), 0.0, None, f"w{i}") for i in range(10)]
    for waiter in waiters:
        now += 0.1
        state.release(lease, now, CLEAN)
        assert waiter.state is GRANTED
        lease = state.claim(waiter, now)
    state.release(lease, 1.1, CLEAN)
    lease = state.try_acquire(1.1, "a")
    assert lease is not None
    capped = state.enqueue(object(), 1.1, None, "a")  # "a" at its cap
    state.release(held, 1.2, CLEAN)  # only the capped task waits: idled by the policy
    held = state.try_acquire(100.0, "y")
    assert held is not None
    brief = state.enqueue(object(), 100.0, None, "z")
    state.release(held, 100.1, CLEAN)
    held = state.claim(brief, 100.1)
    admitted = state.enqueue(object(), 100.2, 0.5, "q")
    assert admitted.state is WAITING and state.counters.admission_rejections == 0
    assert capped.state is WAITING


def test_a_capped_sites_waiters_joining_the_queue_start_its_standing_clock() -> None:
    """docs: "while its site is at its cap, a waiter neither makes it stand
    (waiters of capped sites alone leave it empty)". Site "a" at its cap
    has had a task waiting since 0 s, nobody else waits; at 1 s resize()
    lifts the cap and it joins the queue, which was empty until then. A
    task of site "d" arriving 5 ms later finds a queue that has not stood
    for queue_interval: it keeps its own 5 s timeout. (Mutant: the queue's
    last empty moment not moved to when the capped waiters joined: the
    newcomer got queue_target=0.01 s, to be shed at 1.015 s.)"""
    state = make(4, share=0.5, target=0.01, interval=0.1)
    for site in ("a", "a", "b", "c"):
        assert state.try_acquire(0.0, site) is not None
    capped = state.enqueue(object(), 0.0, 5.0, "a")
    state.resize(6, 1.0)  # cap 3: "a" is under it
    newcomer = state.enqueue(object(), 1.005, 5.0, "d")
    assert not newcomer.shed and newcomer.deadline == pytest.approx(6.005)
    assert capped.state is WAITING and newcomer.state is WAITING


def test_a_capped_sites_waiter_is_not_shed_by_an_arrival_in_a_standing_queue() -> None:
    """docs: "while its site is at its cap, a waiter ... nor is shed ...;
    each waits up to its own timeout". Site "a" at its cap; an untimed
    task of site "b" keeps the queue standing; "a"'s task (timeout 5 s)
    waits from 0.5 s; a task of "d" arrives at 0.6 s, when "a"'s has waited
    ten times queue_target. "a"'s must still wait. (Mutant: the shedding
    pass not skipping sites at their cap.)"""
    state = make(4, share=0.5, target=0.01, interval=0.1)
    for site in ("a", "a", "b", "c"):
        assert state.try_acquire(0.0, site) is not None
    state.enqueue(object(), 0.0, None, "b")
    capped = state.enqueue(object(), 0.5, 5.0, "a")
    state.enqueue(object(), 0.6, 5.0, "d")
    assert capped.state is WAITING and capped not in sheds(state)
    assert capped.deadline == 5.5


def test_an_untimed_head_does_not_shield_a_stale_waiter_behind_it() -> None:
    """docs: "waiters that already waited longer than queue_target are shed
    (when a connection is handed on or a task arrives)"; waiters without a
    timeout are never shed. An untimed task waits from 0 s, a task with a
    5 s timeout from 0.05 s (before the queue stood: its own timeout); at
    0.2 s, the queue standing, a task arrives: the timed one, 0.15 s into
    its wait, is shed. (Mutant: only the stale waiters at the head of the
    queue shed, the untimed head shielding the rest.)"""
    state = make(1, target=0.01, interval=0.1)
    assert state.try_acquire(0.0) is not None
    untimed = state.enqueue(object(), 0.0, None)
    timed = state.enqueue(object(), 0.05, 5.0)
    assert timed.deadline == pytest.approx(5.05) and not timed.shed
    state.enqueue(object(), 0.2, 5.0)
    assert timed.state is FAILED and sheds(state) == [timed]
    assert untimed.state is WAITING


def test_a_waiter_that_waited_exactly_the_target_is_not_shed() -> None:
    """docs: "waiters that already waited longer than queue_target are
    shed". queue_target=0.5, queue_interval=1 (binary fractions: exact). An
    untimed task waits from 0 s, a task with a 5 s timeout from 0.75 s
    (before the queue stood: its own timeout); at 1 s a lease ends and the
    untimed one is served, leaving the timed one at the head of a queue
    not empty since 0 s. At 1.25 s, the queue standing, a task arrives: the
    timed one has waited exactly the target, not longer, and keeps
    waiting; at 1.375 s it has waited longer and the next arrival sheds
    it. (Mutant: ``>=`` in the staleness test.)"""
    state = make(1, target=0.5, interval=1.0)
    lease = state.try_acquire(0.0)
    assert lease is not None
    untimed = state.enqueue(object(), 0.0, None)
    timed = state.enqueue(object(), 0.75, 5.0)
    assert timed.deadline == 5.75 and not timed.shed
    state.release(lease, 1.0, CLEAN)
    assert untimed.state is GRANTED
    state.enqueue(object(), 1.25, 5.0)
    assert timed.state is WAITING and sheds(state) == []
    state.enqueue(object(), 1.375, 5.0)
    assert timed.state is FAILED and sheds(state) == [timed]


def test_a_stale_newest_waiter_is_shed_when_the_oldest_is_served_instead() -> None:
    """docs: "every waiter over the target goes at once, except the one the
    hand-on serves", and an untimed waiter that "has waited a whole
    interval" is served first. An untimed task waits from 0 s, a task with
    a 5 s timeout from 0.05 s; at 0.2 s a lease ends: the untimed one (0.2 s
    > interval) is served, so the timed one, spared from shedding only as
    the newest (LIFO's pick), is shed at that hand-on. (Mutant: the spared
    waiter left waiting when the pick went FIFO.)"""
    state = make(1, target=0.01, interval=0.1)
    lease = state.try_acquire(0.0)
    assert lease is not None
    untimed = state.enqueue(object(), 0.0, None)
    timed = state.enqueue(object(), 0.05, 5.0)
    state.release(lease, 0.2, CLEAN)
    assert untimed.state is GRANTED
    assert timed.state is FAILED and sheds(state) == [timed]


def test_lifo_serves_the_newest_waiter_across_sites() -> None:
    """docs ("Adaptive LIFO"): "While the queue stands, the newest waiter
    is served first", with max_site_share too (the queue is the waiters of
    the sites under their cap). Sites "x" and "y" hold all four
    connections (at their cap); "a" queues at 0 s and 0.02 s, "b" at
    0.01 s, each with a 5 s timeout. At 0.15 s a lease ends: "a"'s second
    task, the newest, is served; the two older ones, stale, are shed.
    (Mutant: the newest of the sites picked by the smallest arrival number.)"""
    state = make(4, share=0.5, target=0.01, interval=0.1)
    leases = [state.try_acquire(0.0, site) for site in ("x", "x", "y", "y")]
    assert all(leases)
    a1 = state.enqueue(object(), 0.0, 5.0, "a")
    b1 = state.enqueue(object(), 0.01, 5.0, "b")
    a2 = state.enqueue(object(), 0.02, 5.0, "a")
    state.release(leases[0], 0.15, CLEAN)  # type: ignore[arg-type]
    assert a2.state is GRANTED
    assert {a1.state, b1.state} == {FAILED} and set(sheds(state)) == {a1, b1}


def test_max_waiters_counts_every_capped_sites_waiter() -> None:
    """docs: max_waiters is the number of "tasks allowed to queue behind
    busy connections; one more gets PoolOverloadedError at once", and "each
    of [a capped site's waiters] counts, toward max_waiters". max_size=4,
    share 0.25 (cap 1), max_waiters=2 (a site's share: 1): four sites hold
    a connection each; one task each of "a" and "b" queues; "c"'s is one
    more and is refused. (Mutant: the newcomer of a capped site left out
    of the count: three tasks queued under max_waiters=2.)"""
    state = make(4, share=0.25, max_waiters=2)
    for site in "abcd":
        assert state.try_acquire(0.0, site) is not None
    state.enqueue(object(), 0.0, None, "a")
    state.enqueue(object(), 0.0, None, "b")
    with pytest.raises(Overloaded):
        state.enqueue(object(), 0.0, None, "c")
    assert state.counters.overload_rejections == 1


def test_max_waiters_zero_leaves_a_site_no_share_of_the_queue() -> None:
    """docs: "a site may also take at most its share of the queue
    (ceil(s * max_waiters) waiting tasks)": none with max_waiters=0, so a
    site queues only tasks a connection opened under its cap will serve.
    max_size=8 (6 more may open), share 0.25 (cap 2): site "a" holds none,
    two of its tasks wait for connects, the third is refused. (Mutant: the
    share computed as ceil(s * 0) floored at 1, admitting it.)"""
    state = make(8, share=0.25, max_waiters=0, open_=2)
    assert state.try_acquire(0.0, "x") and state.try_acquire(0.0, "y")
    state.enqueue(object(), 0.0, None, "a")
    state.enqueue(object(), 0.0, None, "a")
    with pytest.raises(Overloaded, match="share"):
        state.enqueue(object(), 0.0, None, "a")
