"""Opt-in wait-queue policies of the state core: bulkheads per acquire site
(``max_site_share``) and the adaptive queue (``queue_policy="adaptive"``).

Design note. This is part of the state core (see ``_state.py``): nothing here
awaits, sleeps or touches the network, and time comes in as ``now``.
``PoolState`` consults a :class:`WaitPolicy` only when one of the two features
is configured, so the default path stays one attribute check.

Waiters are kept per site (one book, keyed ``None``, without site caps), each
book a deque in arrival order whose settled entries are skipped lazily. A
book is *eligible* while its site holds fewer connections than the cap;
``eligible`` counts the waiting tasks of eligible books, which is what the
core treats as "somebody waits" (a capped site's waiters never hold up the
others, and an idle connection may sit next to them).

The adaptive queue is CoDel as Facebook applied it to server queues
(Nichols & Jacobson, "Controlling Queue Delay", ACM Queue 2012; Maurer,
"Fail at Scale", ACM Queue 2015): while the queue has not been empty for
``interval`` seconds it is *standing*; a waiter then gets ``target`` seconds
instead of its own timeout, waiters that already waited longer than
``target`` are shed, and the newest waiter is served first (adaptive LIFO:
the oldest ones are the likeliest to have given up). Waiters without a
timeout are never shed, and the oldest waiter is served first once it has
waited ``interval``, so every waiter without a timeout is served eventually.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable

# _state imports this module only when a policy is configured, after it has
# loaded: no import cycle.
from ._state import Inadmissible, Overloaded, Waiter, WaiterState

_WAITING = WaiterState.WAITING

# Below this many measured hand-ons the drain rate is unknown: admit.
_MIN_RATE_SAMPLES = 8
_EWMA_WEIGHT = 0.1  # weight of the newest gap between hand-ons under backlog


class AdaptiveQueue:
    """CoDel parameters, and what the queue measured: when it was last empty
    and how fast it drains (seconds between connections handed to waiters)."""

    __slots__ = ("target", "interval", "last_empty", "gap", "samples", "last_hand_on")

    def __init__(self, target: float, interval: float) -> None:
        self.target = target
        self.interval = interval
        self.last_empty = -math.inf
        self.gap = 0.0  # EWMA of the seconds between hand-ons while tasks wait
        self.samples = 0
        self.last_hand_on: float | None = None  # None: the last hand-on found nobody waiting

    def standing(self, now: float) -> bool:
        return now - self.last_empty > self.interval

    def note_hand_on(self, now: float, backlog: bool) -> None:
        """A connection is handed on (``backlog``: to a waiting task). The
        gap since the last one counts only the time tasks waited: from the
        last moment the queue was empty, if later. A hand-on that idles a
        connection with nobody waiting may not come here (the core idles
        it inline), so a drained backlog, a quiet spell and a new backlog
        show only as ``last_empty`` moving on (set as the last waiter is
        served, by each acquire finding nobody waiting, and by the first
        waiter to arrive)."""
        if backlog and self.last_hand_on is not None:
            gap = now - max(self.last_hand_on, self.last_empty)
            self.gap = gap if self.samples == 0 else self.gap + _EWMA_WEIGHT * (gap - self.gap)
            self.samples += 1
        self.last_hand_on = now if backlog else None

    def drain_gap(self, now: float) -> float | None:
        """Seconds per connection handed on, or None while unknown. Nothing
        handed on while tasks wait for over three average gaps counts as
        that slow: the connections are held by something that does not end.
        The stall runs from the last hand-on or the last moment the queue
        was empty, whichever is later: time in which nobody waited says
        nothing about the drain rate (a backlog that drained, then a quiet
        second, is no stall of a second)."""
        if self.samples < _MIN_RATE_SAMPLES:
            return None
        since = self.last_empty if self.last_hand_on is None else max(self.last_hand_on, self.last_empty)
        stalled = now - since
        if stalled > 3 * self.gap and since != -math.inf:
            return stalled
        return self.gap


class SiteBook:
    """One acquire site's connections in use and waiting tasks."""

    __slots__ = ("name", "held", "waiting", "queue")

    def __init__(self, name: str | None) -> None:
        self.name = name
        self.held = 0  # leased or reserved for one of its waiters
        self.waiting = 0  # live waiters in ``queue``
        self.queue: deque[Waiter] = deque()


def _rate(gap: float) -> str:
    """Connections per second for a refusal's message: whole numbers from
    about 10/s, two significant digits below (a slow drain is not "0")."""
    rate = 1.0 / gap if gap else math.inf
    return f"{rate:.0f}" if rate >= 9.5 else f"{rate:.2g}"


def site_cap(share: float, max_size: int) -> int:
    """``ceil(share * max_size)``, at least 1 (float error ignored: 0.14 * 50 is
    7.000000000000001 in floats, and the cap 7, not 8)."""
    return max(1, math.ceil(share * max_size - 1e-9))


class WaitPolicy:
    """Waiter order and admission when site caps or the adaptive queue are on.

    ``shed`` is the core's callback that fails a waiter the adaptive queue
    gives up on (it updates the waiter, the counters and the actions)."""

    def __init__(
        self,
        *,
        max_size: int,
        site_share: float | None,
        adaptive: AdaptiveQueue | None,
        shed: Callable[[Waiter, str], None],
    ) -> None:
        self.site_share = site_share
        self.cap: int | None = None if site_share is None else site_cap(site_share, max_size)
        self.adaptive = adaptive
        self.books: dict[str | None, SiteBook] = {}
        self.eligible = 0  # waiting tasks of sites under their cap
        self._shed = shed
        self._seq = 0

    # ------------------------------------------------------------ books

    def key(self, site: str | None) -> str | None:
        return site if self.cap is not None else None

    def _book(self, key: str | None) -> SiteBook:
        book = self.books.get(key)
        if book is None:
            book = self.books[key] = SiteBook(key)
        return book

    def _forget(self, book: SiteBook) -> None:
        if book.held == 0 and book.waiting == 0:
            del self.books[book.name]

    def under_cap(self, book: SiteBook) -> bool:
        return self.cap is None or book.held < self.cap

    def is_eligible(self, waiter: Waiter) -> bool:
        """Whether the waiting task's site is under its cap."""
        return self.cap is None or self.books[self.key(waiter.site)].held < self.cap

    def _note_empty(self, now: float | None) -> None:
        if self.eligible == 0 and now is not None and self.adaptive is not None:
            self.adaptive.last_empty = now

    def _change_held(self, book: SiteBook, delta: int, now: float | None) -> bool:
        """Returns True if the site's waiters just became eligible."""
        before = self.under_cap(book)
        book.held += delta
        after = self.under_cap(book)
        if before != after:
            self._crossed(book, after, now)
            self._note_empty(now)
        return after and not before and book.waiting > 0

    def _crossed(self, book: SiteBook, under: bool, now: float | None) -> None:
        """``book``'s site crossed its cap: below it now (``under``: its
        waiters join the queue) or at it (they leave the queue)."""
        if under:
            self._now_eligible(book, now)
            self.eligible += book.waiting
        else:
            self.eligible -= book.waiting

    def _now_eligible(self, book: SiteBook, now: float | None) -> None:
        """``book``'s site just fell below its cap (before ``eligible``
        counts its waiters): its waiters join the queue now. The queue of
        eligible waiters was empty until now if none waited (its waiters
        waited at the cap, which neither makes it stand nor sheds them), and
        each of them is judged by the time it waits from now on."""
        if not book.waiting or now is None:
            return
        if self.eligible == 0 and self.adaptive is not None:
            self.adaptive.last_empty = now
        for waiter in book.queue:
            waiter.eligible_at = now  # (settled ones too: harmless, skipped)

    def set_max_size(self, max_size: int, now: float | None = None) -> bool:
        """Recompute the cap; True if some site's waiters became eligible."""
        if self.site_share is None:
            return False
        before = self.eligible
        old = self.cap
        self.cap = site_cap(self.site_share, max_size)
        for book in self.books.values():
            under = self.under_cap(book)
            if (old is None or book.held < old) != under:
                self._crossed(book, under, now)
        return self.eligible > before

    # ---------------------------------------------------------- acquire

    def may_take_idle(self, site: str | None, now: float) -> bool:
        """A task may lease an idle connection at once: its site is under
        the cap and no eligible task waits (never jump the queue)."""
        if self.eligible:
            return False
        if self.adaptive is not None:
            self.adaptive.last_empty = now
        if self.cap is None:
            return True
        book = self.books.get(site)
        return book is None or book.held < self.cap

    def leased(self, site: str | None, now: float) -> None:
        """An idle connection was leased at once (after may_take_idle)."""
        self._change_held(self._book(self.key(site)), 1, now)

    def released(self, site: str | None, now: float | None) -> bool:
        """A lease or grant of ``site`` ended. True if its waiters just became
        eligible (the core then hands them idle connections)."""
        book = self.books[self.key(site)]
        woke = self._change_held(book, -1, now)
        self._forget(book)
        return woke

    def shed_standing(self, now: float) -> None:
        """While the queue stands, shed the waiters that waited longer than
        the target (before a newcomer is counted against ``max_waiters``)."""
        aq = self.adaptive
        if aq is not None and self.eligible and aq.standing(now):
            self._shed_stale(now)

    def queued_behind(self, site: str | None, waiting: int, room: int) -> int:
        """The tasks that would wait behind busy connections, a new one of
        ``site`` included, for the ``max_waiters`` bound: ``room``
        (connections the pool may still open, or is opening) serves only
        eligible waiters, as no connect is opened for a capped site's."""
        book = self.books.get(self.key(site))
        new_eligible = book is None or self.under_cap(book)
        capped = waiting - self.eligible + (0 if new_eligible else 1)
        return capped + max(0, self.eligible + new_eligible - room)

    def admit(
        self,
        waiter: Waiter,
        now: float,
        timeout: float | None,
        site: str | None,
        max_waiters: int | None,
        room: int,
    ) -> None:
        """Queue a waiter, or raise :class:`Overloaded` saying why. May
        shorten its deadline to the adaptive queue's target (``waiter.shed``)."""
        key = self.key(site)
        book = self.books.get(key)
        eligible = book is None or self.under_cap(book)
        if self.cap is not None and max_waiters is not None and book is not None:
            # The bulkhead covers the queue too: one site may take at most
            # its share of max_waiters, so it cannot lock the others out.
            limit = site_cap(self.site_share or 1.0, max_waiters) if max_waiters else 0
            # Of the room under max_size, a site may take up to its cap: a
            # site at its cap gets no connection opened for its waiters.
            site_room = min(room, self.cap - book.held) if eligible else 0
            if book.waiting >= limit + site_room:
                raise Overloaded(
                    f"site {key!r} already has {book.waiting} waiting task(s), its share "
                    f"({self.site_share}) of max_waiters={max_waiters}"
                )
        aq = self.adaptive
        if aq is not None:
            if self.eligible == 0:
                aq.last_empty = now
            elif aq.standing(now):
                self._shed_stale(now)
            if aq.standing(now):
                # Without a timeout the caller asked to wait as long as it
                # takes: it is never shed. Nor is a task of a site at its cap
                # while it stays there (it waits up to its own timeout).
                if timeout is not None and timeout > aq.target and eligible:
                    waiter.deadline = now + aq.target
                    waiter.shed = True
            elif timeout is not None and eligible:
                gap = aq.drain_gap(now)
                # In FIFO order every eligible waiter is ahead of this one.
                if gap is not None and (self.eligible + 1) * gap > timeout:
                    raise Inadmissible(
                        f"cannot be served within its timeout ({timeout:.3f}s): {self.eligible} task(s) "
                        f"ahead, the pool hands on {_rate(gap)} connections/s "
                        f"(adaptive queue, deadline-aware admission)"
                    )
        # Looked up again: shedding above may have dropped an emptied book.
        book = self._book(key)
        self._seq += 1
        waiter.seq = self._seq
        book.queue.append(waiter)
        book.waiting += 1
        if eligible:
            self.eligible += 1

    def remove(self, waiter: Waiter, now: float | None = None) -> None:
        """A waiting task left the queue (timed out, cancelled, failed)."""
        book = self.books[self.key(waiter.site)]
        self._drop(book, waiter, now)
        self._compact(book)
        self._forget(book)

    @staticmethod
    def _compact(book: SiteBook) -> None:
        """Drop the book's settled waiters: all of them once none waits (a
        site that holds a connection keeps its book, and each settled
        waiter its future and its error's traceback, the caller's frames),
        else when they are most of the queue. A new deque: a caller may be
        walking the old one."""
        queue = book.queue
        if not book.waiting:
            if queue:
                book.queue = deque()
        elif len(queue) > 32 and len(queue) > 2 * book.waiting:
            book.queue = deque(w for w in queue if w.state is _WAITING)

    def _drop(self, book: SiteBook, waiter: Waiter, now: float | None) -> None:
        book.waiting -= 1
        if self.under_cap(book):
            self.eligible -= 1
            self._note_empty(now)

    # ------------------------------------------------------------ serve

    def pick(self, now: float) -> Waiter | None:
        """The waiter to hand a free connection to (removed from the queue,
        its site charged), or None if no eligible task waits."""
        aq = self.adaptive
        if aq is not None:
            aq.note_hand_on(now, self.eligible > 0)
        if self.eligible == 0:
            return None
        newest = False
        if aq is not None and aq.standing(now):
            # The newest waiter, whom LIFO serves, is not shed by the hand-on
            # that serves it: that would fail it and leave the connection
            # idle (CoDel too never drops the last packet queued).
            spare = self._end(True)
            self._shed_stale(now, spare)
            oldest = self._end(False)
            # LIFO while the queue stands, except for a waiter (without a
            # timeout: the others were shed) that waited a whole interval.
            newest = now - oldest.enqueued_at <= aq.interval
            if not newest and oldest is not spare and self._stale(spare, now):
                # Served FIFO instead: the spared one is shed as the others.
                book = self.books[self.key(spare.site)]
                reason = self.shed_reason(spare, now)
                self._drop(book, spare, now)
                self._shed(spare, reason)
        waiter = self._end(newest)
        book = self.books[self.key(waiter.site)]
        if newest:
            book.queue.pop()
        else:
            book.queue.popleft()
        self._drop(book, waiter, now)
        self._change_held(book, 1, now)
        if not book.waiting and book.queue:
            book.queue = deque()  # (settled ones left behind a LIFO pick)
        return waiter

    def _end(self, newest: bool) -> Waiter:
        """The oldest (or newest) waiting task of the eligible sites."""
        best: Waiter | None = None
        for book in self.books.values():
            if not book.waiting or not self.under_cap(book):
                continue
            queue = book.queue
            if newest:
                while queue[-1].state is not _WAITING:
                    queue.pop()
                candidate = queue[-1]
                if best is None or candidate.seq > best.seq:
                    best = candidate
            else:
                while queue[0].state is not _WAITING:
                    queue.popleft()
                candidate = queue[0]
                if best is None or candidate.seq < best.seq:
                    best = candidate
        if best is None:  # pragma: no cover - eligible > 0 guarantees one
            raise AssertionError("eligible count is off")
        return best

    def _shed_stale(self, now: float, spare: Waiter | None = None) -> None:
        """Standing queue: fail the waiters (with a timeout) at the head of
        each eligible site that waited longer than the target, except
        ``spare`` (the one a hand-on serves: the newest of its site)."""
        aq = self.adaptive
        assert aq is not None
        for book in list(self.books.values()):
            if not self.under_cap(book):
                continue
            queue = book.queue
            while queue:
                head = queue[0]
                if head.state is not _WAITING:
                    queue.popleft()
                    continue
                if head is spare or not self._stale(head, now):
                    break
                queue.popleft()
                # Worded before the drop: the last one marks the queue empty.
                reason = self.shed_reason(head, now)
                self._drop(book, head, now)
                self._shed(head, reason)
            if queue and queue[0].deadline is None and now - queue[0].eligible_at > aq.target:
                # Waiters without a timeout (never shed) at the head do not
                # shield the stale ones behind them (settled in place: skipped
                # lazily, as a cancelled waiter). (eligible_at grows along
                # the queue: arrivals and a site's move below its cap in order.)
                for waiter in queue:  # (_drop and _shed leave the deque as it is)
                    if now - waiter.eligible_at <= aq.target:
                        break
                    if waiter.state is _WAITING and waiter.deadline is not None and waiter is not spare:
                        reason = self.shed_reason(waiter, now)
                        self._drop(book, waiter, now)
                        self._shed(waiter, reason)
            self._forget(book)

    def _stale(self, waiter: Waiter, now: float) -> bool:
        """A waiter a standing queue sheds: it has a timeout and waited
        longer than the target since its site was under its cap."""
        aq = self.adaptive
        assert aq is not None
        return waiter.deadline is not None and now - waiter.eligible_at > aq.target

    def shed_reason(self, waiter: Waiter, now: float) -> str:
        aq = self.adaptive
        assert aq is not None
        return (
            f"shed by the adaptive queue after {now - waiter.enqueued_at:.3f}s: the wait queue has not been "
            f"empty for {now - aq.last_empty:.3f}s (queue_interval={aq.interval}s), so waiters get "
            f"queue_target={aq.target}s instead of their timeout"
        )

    # ------------------------------------------------------------ stats

    def usage(self, top: int, first: str | None = None) -> list[tuple[str, int, int]]:
        """(site, in use, waiting) of the ``top`` busiest sites, busiest
        first, then ``("other", ...)`` summing the rest (bounded cardinality
        for exporters). Empty without site caps. ``first``: a site listed
        first, whatever its rank (a timed-out task's, whose message must
        name the cap it waited at: review h270)."""
        if self.cap is None:
            return []
        rows = sorted(
            ((str(b.name), b.held, b.waiting) for b in self.books.values()),
            key=lambda row: (-(row[1] + row[2]), row[0]),
        )
        if first is not None:
            name = str(self.key(first))
            rows.sort(key=lambda row: row[0] != name)  # (stable: the others keep their order)
        if len(rows) <= top:
            return rows
        # A site itself named "other" goes into the "other" row: one label,
        # one series per exporter.
        listed = [row for row in rows if row[0] != "other"][:top]
        rest = [row for row in rows if row not in listed]
        return listed + [("other", sum(r[1] for r in rest), sum(r[2] for r in rest))]

    def check(self, waiting: int) -> list[str]:
        """Inconsistencies in the books (for PoolState.check_invariants)."""
        problems = []
        if sum(b.waiting for b in self.books.values()) != waiting:
            problems.append("site books disagree with the waiting count")
        for book in self.books.values():
            live = sum(1 for w in book.queue if w.state is _WAITING)
            if live != book.waiting:
                problems.append(f"site {book.name!r}: {book.waiting} counted waiting, {live} queued")
            if book.held < 0:
                problems.append(f"site {book.name!r}: negative in-use count")
        if self.eligible != sum(b.waiting for b in self.books.values() if self.under_cap(b)):
            problems.append("eligible waiter count is off")
        return problems
