"""Leases the application let go of: reclaimed, taken back, or suspected.

:class:`Reclaimer` carries out what happens to a lease the application did
not end itself: a proxy garbage collected while leased (reclaimed once its
connection is provably abandoned), a lease past ``lease_timeout`` (taken
back) and one past ``leak_warning_after`` (reported). The runner owns one and
dispatches the core's ``TakeBack`` and ``LeakSuspect`` actions to it; the
reset that follows a reclaim or take-back is the runner's.
"""

from __future__ import annotations

import asyncio
import warnings
from collections.abc import Callable, Coroutine
from typing import Any, Protocol

from . import _internals as _pg
from . import _workers
from ._clock import Clock
from ._holder import Holder
from ._internals import RawConnection
from ._reporting import Reporter, leak_logger, logger
from ._state import Lease, Phase, PoolState, Slot
from ._workers import DEFAULT_RESET_TIMEOUT, ResetHooks

# A garbage-collected proxy whose connection is still in use is checked again
# after these delays (seconds, doubling), until it is provably abandoned.
_ORPHAN_RECHECK_FIRST = 0.05
_ORPHAN_RECHECK_CAP = 2.0


def _holder_of(lease: Lease) -> str:
    """``task T, site 'S'`` of a report (what is known: the task with stack
    capture, the site with site caps or ``acquire(site=)``). Without stack
    capture the task is not recorded (naming it would cost every acquire),
    and the report says so: ``task not recorded (stack capture is off)``;
    the stack that follows says how to turn it on."""
    if lease.task_name is not None:
        task = f"task {lease.task_name}"
    elif lease.stack is None:  # capture_stack was off at the acquire
        task = "task not recorded (stack capture is off)"
    else:
        task = "no asyncio task"  # captured, outside any task
    parts = [task]
    if lease.site is not None:
        parts.append(f"site {lease.site!r}")
    return ", ".join(parts)


class Resets(Protocol):
    """What the reclaimer needs of the runner: the holders, its clock of
    real I/O, its pool tasks, its drain, and its reset of a connection and
    the end of one."""

    slot_holders: dict[Slot, Holder]
    io_clock: Clock

    def spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[Any]: ...

    def drain(self) -> None: ...

    def reset_slot(
        self, holder: Holder, con: RawConnection, timeout: float | None, rollback: bool, *,
        hooks: ResetHooks | None = None,
    ) -> Coroutine[Any, Any, None]: ...

    def reset_done(
        self, holder: Holder, con: RawConnection, proxy: Any, error: BaseException | None, log: bool = True
    ) -> BaseException | None: ...


class Reclaimer:
    """Reclaims abandoned leases, takes back expired ones, reports suspects."""

    def __init__(
        self,
        runner: Resets,
        state: PoolState,
        clock: Clock,
        reporter: Reporter,
        hooks: ResetHooks,
        *,
        reset_timeout: float | None,
        leak_warning_after: float | None,
    ) -> None:
        self.runner = runner
        self.state = state
        self.clock = clock
        self.now = clock.now
        self.reporter = reporter
        self.name = reporter.name
        self.hooks = hooks
        self.reset_timeout = reset_timeout
        self.leak_warning_after = leak_warning_after
        # The pool's proxy class (set by the pool): a lost lease's stand-in is one.
        self.proxy_class: Callable[[Holder, RawConnection, Lease], Any] | None = None
        # The pool's max_queries (set by the pool; None: no limit).
        self.max_queries: int | None = None

    def retire_if_used_up(self, slot: Slot, con: RawConnection) -> None:
        """A connection taken back or reclaimed that ran ``max_queries``
        statements is closed once its reset ends, not handed on, as a
        release closes it (review h263): its slot takes the retired
        generation, as one whose ``max_lifetime`` ran out in use."""
        limit = self.max_queries
        protocol = con._protocol
        if limit is not None and protocol is not None and protocol.queries_count >= limit:
            self.state.retire_in_use(slot)

    def reclaim(self, lease: Lease, *, asked: bool = False) -> None:
        """A proxy was garbage collected while still leased (or a re-check
        of one whose connection was still in use; ``asked``: by
        :meth:`release_orphan`, which checked it)."""
        slot = lease.slot
        if not lease.active or self.state.phase is Phase.CLOSED:
            return
        holder = self.runner.slot_holders[slot]
        if not asked and self.still_in_use(holder, slot):
            self.defer_reclaim(lease, holder, slot.connection)
            return
        con = slot.connection
        held = self.now() - lease.acquired_at
        if not self.state.reclaim(lease, self.now()):
            return
        if holder.orphan_checks:
            # Reclaimed only now, once nothing used the connection any more.
            when = (f"{holder.orphaned_at - lease.acquired_at:.3f}s after its acquire (reclaimed {held:.3f}s after "
                    "it, once nothing used the connection any more)")
        else:
            when = f"{held:.3f}s after its acquire"
        report = (
            f"pool {self.name!r}: a connection was garbage collected without being released, "
            f"{when}; {_holder_of(lease)}; acquired at:\n{self.reporter.format_stack(lease.stack)}"
        )
        _pg.detach_proxy(con)  # the proxy is gone; drop the dead weak reference
        con._on_release()
        self.retire_if_used_up(slot, con)  # (nothing of the lease runs on it now: the count is final)
        self.runner.spawn(self.runner.reset_slot(
            holder, con, None, _pg.warn_open_transaction(con, quiet=True), hooks=self.hooks.ended,
        ))
        self.runner.drain()
        # Report last: with warnings turned into errors the bookkeeping above
        # must already be done.
        leak_logger.warning(report, extra=self.reporter.event_fields("leak", lease, held))
        self.reporter.emit("leak", lease, held)
        self.reporter.deliver()
        warnings.warn(report, ResourceWarning, stacklevel=1)

    def release_orphan(self, lease_id: int) -> bool:
        """``Pool.release_lease()`` for a lease whose proxy was garbage
        collected and whose connection the pool keeps leased because
        callbacks are still registered: asked to, it drops the listeners, as
        a release does, and reclaims the connection now. Returns whether it
        did; False for any other lease (an operation or object still using
        the connection keeps it, as ever)."""
        for lease in self.state.leases():
            if lease.id != lease_id:
                continue
            slot = lease.slot  # (no local for the connection: it would count as a reference)
            if (
                not lease.active or slot.connection is None or _pg.live_proxy(slot.connection) is not None
                or self.state.phase is Phase.CLOSED
            ):
                return False
            holder = self.runner.slot_holders[slot]
            if _pg.is_cancelling(slot.connection) or self.referred_to(holder, slot):
                return False
            # What release() drops; termination listeners and query loggers stay, as there.
            _pg.clear_listeners(slot.connection)
            self.reclaim(lease, asked=True)
            return not lease.active
        return False

    def referred_to(self, holder: Holder, slot: Slot) -> bool:
        """Whether an object outside the pool (a running query's coroutine, a
        transaction, cursor or prepared statement, a callback's closure)
        still refers to the slot's connection. Measured as ``base_refs`` was
        (the caller holds no local reference). A transaction only the
        connection still refers to is abandoned with it (a cycle that would
        keep the connection leased forever)."""
        base = holder.base_refs
        if holder.lease_callbacks:
            # (Notes of callbacks a reset= hook removed: they would keep them,
            # and what they refer to, alive.)
            _pg.forget_removed_callbacks(slot.connection, holder.lease_callbacks)
        # An earlier lease's termination listeners and query loggers stay on
        # the connection (asyncpg's release keeps them) and do not count as
        # this lease's callbacks (has_callbacks); a reference one of them
        # holds to the connection (a closure over it, its bound method) does
        # count: telling it from one the program still uses would need the
        # reference counts of everything between them. The connection then
        # stays leased until lease_timeout, the safe side.
        if _pg.reference_count(slot.connection) - _pg.own_references(slot.connection) <= base:
            return False
        if _pg.in_call(slot.connection):
            return True  # a query under way: in use, and no need to look at every object
        # What refers to it may be an earlier lease's leftovers (a kept
        # exception's frames, an old prepared statement): they would keep
        # every later lost proxy's connection leased. The slow count.
        return (
            _pg.reference_count(slot.connection) - _pg.own_references(slot.connection)
            - _pg.stale_references(slot.connection) > base
        )

    def still_in_use(self, holder: Holder, slot: Slot) -> bool:
        """Whether a connection whose proxy is gone may still be in use: only
        a provably abandoned one is reclaimed (never one with an operation in
        flight, callbacks registered, or any object outside the pool still
        referring to it: a running query's coroutine, a transaction, cursor
        or prepared statement, a callback's closure)."""
        if _pg.has_callbacks(slot.connection, holder.base_callbacks, holder.lease_callbacks,
                             slot.lease.id if slot.lease is not None else -1) or _pg.is_cancelling(slot.connection):
            return True
        return self.referred_to(holder, slot)

    def defer_reclaim(self, lease: Lease, holder: Holder, con: RawConnection) -> None:
        """Check an orphaned connection still in use again later, reporting
        it once it looks like more than a query finishing."""
        # (Listener callbacks get the lease's stand-in proxy, made when the
        # proxy was collected: Holder._proxy_collected.)
        # A query still running when its proxy went (`await (await
        # pool.acquire()).fetch(...)`) ends soon and is reclaimed quietly as a
        # leak; callbacks, or use that goes on, are worth a report now.
        if not holder.orphan_reported and (
            _pg.has_callbacks(con, holder.base_callbacks, holder.lease_callbacks, lease.id) or holder.orphan_checks >= 3
        ):
            holder.orphan_reported = True
            held = self.now() - lease.acquired_at
            leak_logger.warning(
                "pool %r: a connection's proxy was garbage collected without being released, but the "
                "connection is still in use (callbacks registered, or an operation or object still "
                "refers to it); it stays leased until that ends; %s; acquired at:\n%s",
                self.name, _holder_of(lease), self.reporter.format_stack(lease.stack),
                extra=self.reporter.event_fields("leak_suspect", lease, held),
            )
            self.reporter.emit("leak_suspect", lease, held, collected=True)
            self.reporter.deliver()
        holder.orphan_checks += 1
        delay = min(_ORPHAN_RECHECK_CAP, _ORPHAN_RECHECK_FIRST * 2 ** min(holder.orphan_checks - 1, 16))
        # On the I/O clock (the loop's), not the pool's: what it waits for is
        # a real query's end, which a ManualClock never brings (review h263:
        # the connection stayed leased until the test advanced the clock).
        io_clock = self.runner.io_clock
        io_clock.call_at(io_clock.now() + delay, lambda: self.reclaim(lease))

    def take_back(self, lease: Lease) -> None:
        """The lease ran past its lease_timeout: detach its proxy, report it,
        and reset the connection in a pool task (``TakeBack``)."""
        slot = lease.slot
        con = slot.connection
        held = self.now() - lease.acquired_at
        limit = (lease.deadline or 0) - lease.acquired_at
        reason = (
            f"the lease expired: held {held:.3f}s, lease_timeout is {limit:.3f}s; "
            "the connection was taken back by the pool"
        )
        _pg.detach_proxy(con, reason)
        # Invalidates cursors, statements and transactions made through the
        # proxy (asyncpg's _on_release; its warning of listeners left comes
        # a loop pass later, not from this timer: see invalidate_taken_back).
        _pg.invalidate_taken_back(con)
        # What a release drops, as asyncpg's reset does: the holder's
        # listeners, and its transaction object (asyncpg's _top_xact; its
        # __aexit__ can no longer clear it), else the next lease's
        # transaction() would be taken for a nested one (a SAVEPOINT outside
        # any transaction). Whether a ROLLBACK is needed, the take-back asks
        # the protocol itself.
        _pg.warn_open_transaction(con, quiet=True)
        # The lease's own query loggers and termination listeners go with it
        # too (a release keeps them, as asyncpg's): its `with
        # con.query_logger():` was cut short, and would log the next leases.
        holder = self.runner.slot_holders[slot]
        _pg.drop_lease_callbacks(con, holder.lease_callbacks, lease.id, holder.base_callbacks)
        # The take-back starts before the report: a logging handler that
        # raises cannot leave the slot taken and never reset (review h259).
        self.runner.spawn(self.take_back_slot(holder, con))
        leak_logger.error(
            "pool %r: lease expired after %.3fs (lease_timeout %.3fs); %s; taking the connection back. "
            "Acquired at:\n%s",
            self.name, held, limit, _holder_of(lease), self.reporter.format_stack(lease.stack),
            extra=self.reporter.event_fields("lease_expired", lease, held),
        )
        self.reporter.emit("lease_expired", lease, held, lease_timeout=limit)

    async def take_back_slot(self, holder: Holder, con: RawConnection) -> None:
        error = await _workers.take_back(
            con, self.hooks.ended, self.reset_timeout or DEFAULT_RESET_TIMEOUT, lambda: holder.copies > 0,
            # (counted after the calls it waited for, before its own reset's statements)
            before_reset=lambda: self.retire_if_used_up(holder._slot, con),
        )
        # A call of the holder's that went on after the expiry (it passed the
        # proxy's gate before) may have made a cursor, prepared statement or
        # transaction since the expiry invalidated the lease's: it carries
        # the new counter, and would run in the next lease's session
        # (review s60). The take-back waited for the call (its reset went
        # after it, a round trip ago): invalidate again, before the hand-on.
        _pg.invalidate_lease_resources(con)
        if error is not None:
            logger.warning(
                "pool %r: could not take back an expired connection cleanly (%s); closing it",
                self.name, self.reporter.describe(error), extra={"event": "reset_failed", "pool": self.name},
            )
        # A cancel comes only from terminate(), which discarded the slot.
        self.runner.reset_done(holder, con, None, error, log=False)

    def leak_suspect(self, lease: Lease) -> None:
        """The lease ran past leak_warning_after: report it (``LeakSuspect``)."""
        held = self.now() - lease.acquired_at
        leak_logger.warning(
            "pool %r: connection held for %.3fs (leak_warning_after %.3fs), still not released; "
            "%s; acquired at:\n%s",
            self.name, held, self.leak_warning_after or 0.0, _holder_of(lease),
            self.reporter.format_stack(lease.stack),
            extra=self.reporter.event_fields("leak_suspect", lease, held),
        )
        self.reporter.emit("leak_suspect", lease, held)
