"""The pool's record of one open connection: what asyncpg sees as its holder.

One :class:`Holder` per connected slot, made by the runner when a connect
succeeds. asyncpg's ``Connection`` talks to it (``_release_on_close()``, and
``proxy._holder._pool`` to drop caches); the face, the runner and the
reclaimer keep here what the state core does not need to know about a
connection (its clean mark, orphan checks, reset watchdog start).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

from . import _internals as _pg
from ._compat import HolderCompat
from ._internals import RawConnection
from ._state import Lease, Slot
from .errors import PoolInterfaceError

if TYPE_CHECKING:
    from ._runner import Runner


class Face(Protocol):
    """What a holder's pool (the asyncpg face) offers: asyncpg's connection
    reaches it through ``holder._pool`` to drop caches."""

    def _drop_statement_cache(self) -> None: ...

    def _drop_type_cache(self) -> None: ...


class Holder(HolderCompat):  # HolderCompat: asyncpg's holder._in_use & co., read-only
    """What asyncpg's Connection expects of its pool holder: it calls
    ``_release_on_close()`` when the connection dies, and reaches the pool
    through ``proxy._holder._pool`` to drop statement and type caches."""

    __slots__ = ("_pool", "_runner", "_slot", "_con", "clean_mark", "base_refs", "base_callbacks", "lease_callbacks",
                 "release_timeout",
                 "orphan_checks", "orphan_reported", "orphaned_at", "unresponsive", "close_budget", "close_raises", "close_timeout",
                 "calls_budget", "lost_while_leased", "busy_elsewhere",
                 "cancel_key", "abort_in_flight", "cleaned_up",
                 "reset_since",
                 "command_timeout", "reset_query", "reset_text", "split_rollback", "own_is_closed", "own_on_release", "own_close",
                 "own_release_checks", "task_reset", "own_methods", "proxy_collected",
                 "copies", "watched", "waiter_completed", "init_context", "__weakref__")

    def __init__(self, pool: Face, runner: Runner, slot: Slot, con: RawConnection, clean_mark: int) -> None:
        self._pool = pool
        self._runner = runner
        self._slot = slot
        self._con: RawConnection | None = con
        # asyncpg's statement counter when the session was last known to be
        # as the pool leaves it (opened, before init=; or just reset). A
        # release that finds the counter moved must reset; -1: always reset.
        self.clean_mark = clean_mark
        # The connection's reference count while only the pool holds it.
        self.base_refs = 0
        # Its termination listeners and query loggers then (_pg.callback_baseline):
        # not a lease's, they never make a lost proxy's connection in use.
        self.base_callbacks: _pg.Baseline = None
        # The lease id that registered each termination listener and query
        # logger of a lease ((kind, asyncpg's entry): _pg._note_callback),
        # None until one does. asyncpg's release keeps both kinds: once
        # their lease ended they are the connection's, as the baseline's.
        self.lease_callbacks: dict[Any, int] | None = None
        # release(timeout=None) defaults to the acquire's timeout (asyncpg).
        self.release_timeout: float | None = None
        # How often a garbage-collected proxy's connection was found still in
        # use (0: not orphaned).
        self.orphan_checks = 0
        self.orphan_reported = False
        # When the lease's proxy was garbage collected (a deferred reclaim's
        # report dates the collection by it; read while orphan_checks > 0).
        self.orphaned_at = 0.0
        # A reset or take-back timed out: no graceful close, abort it.
        self.unresponsive = False
        # asyncpg ended the connection itself and cleaned up after it
        # (Connection._cleanup, which calls _release_on_close: its socket
        # was lost, or the lease terminated or closed it): the pool's close
        # leaves it as it is, as asyncpg's pool does.
        self.cleaned_up = False
        # Bound on the close's wait for a cancelled query's answer (None:
        # the pool's reset timeout): see _workers.CANCEL_ANSWER_GRACE.
        self.close_budget: float | None = None
        # A release waits for the close under its own budget (max_queries, an
        # expired generation, with a release or acquire timeout): the close's
        # error (TimeoutError) is raised from release(), as asyncpg's release
        # raises what Connection.close(timeout=) raised.
        self.close_raises = False
        # The close passes close(timeout=...) (None without a budget), as
        # asyncpg's pool closes such a connection: a release's close
        # (max_queries, an expired generation), and an expired connection's
        # (asyncpg's next acquire closes it with close(timeout=None)). Its
        # other closes (Pool.close(), a failed setup= or init=) call close()
        # with no argument, as asyncpg's. One to asyncpg's own close(); a
        # connection class's own may require or record the keyword (review
        # h277).
        self.close_timeout = False
        # asyncpg 0.29-0.31 (no close under the release's budget, see
        # _internals.CLOSE_UNDER_BUDGET): the release's budget still bounds
        # the close's wait for a call of the lease in flight (review h258).
        self.calls_budget: float | None = None
        # The socket died under a lease (reset or aborted, not closed in
        # order by the peer): its backend may still run a query.
        self.lost_while_leased = False
        # Its release's reset was refused: a statement of the lease still
        # runs in another task. The close waits for that statement to end
        # (_workers.statement_ended) before asyncpg's close() is called.
        self.busy_elsewhere = False
        # The backend's cancel key, read once now: an abort drops it with
        # asyncpg's protocol, and a cancel request may still be due then.
        self.cancel_key = _pg.cancel_key(con)
        # Whether a statement was in flight when the connection was aborted
        # (the user's terminate() through the proxy, the reset watchdog):
        # read just before the abort, which clears it (None: not aborted so).
        self.abort_in_flight: bool | None = None
        # When a release's unbounded reset started, on the reset watchdog's
        # clock (Runner.io_clock: the loop's; see IOStampHolder).
        self.reset_since: float | None = None
        # Fixed for the connection's life: read once here, not per release.
        self.command_timeout = _pg.command_timeout(con)
        self.reset_query = _pg.reset_query_getter(con)
        # asyncpg's own reset query is fixed by the server's capabilities,
        # known once connected: read once here, for the full mode's inline
        # reset (None when the connection class overrides the getter, which
        # then runs on every reset, and in the other modes, whose resets
        # Leaser.release plans per lease: one check less per release there).
        # A reset query of the connection class's own may refuse to run in
        # a transaction block (DISCARD ALL): the ROLLBACK of an open
        # transaction goes in a message of its own before it, as asyncpg's
        # Connection._reset sends it, in a pool task (review h269). asyncpg's
        # own query runs in the block of one "ROLLBACK; ..." message.
        self.split_rollback = _pg.overrides_reset_query(type(con))
        self.reset_text: str | None = (
            None if runner.state.reset_mode != "full" or self.split_rollback else self.reset_query()
        )
        # Each read once here, for the connection's life (a patch of asyncpg's
        # Connection made later is seen by the next connection), each a
        # method the connection's class has in place of asyncpg's: its own,
        # or a patch of asyncpg's class itself (_pg.overrides).
        cls = type(con)
        # False: asyncpg's is_closed(), whose work the hot path does inline.
        self.own_is_closed = _pg.overrides(cls, "is_closed")
        # False: asyncpg's _on_release(), which the hot path does inline when
        # no listener is left (its counter); True: the release calls it, as
        # asyncpg's pool does (_pg.released_unusable).
        self.own_on_release = _pg.overrides(cls, "_on_release")
        # The hot path's one test for both (Leaser.release).
        self.own_release_checks = self.own_is_closed or self.own_on_release
        # A close() in place of asyncpg's: on asyncpg 0.29-0.31 a release
        # that closes the connection passes it the release's budget, as
        # asyncpg's release does (_internals.CLOSE_UNDER_BUDGET: asyncpg's
        # own close() keeps the pool's bound there).
        self.own_close = _pg.overrides(cls, "close")
        # Whether every reset runs in a pool task (Leaser.release): with a
        # custom reset (a reset= hook, a connection class's own reset()), or
        # a connection class's own execute() (or the _check_open() it calls
        # first), which gets the reset as asyncpg 0.30+ sends it, where the
        # inline reset would await the protocol's query() without them. One
        # test per release.
        self.task_reset = runner.hooks.custom or _pg.overrides(cls, "execute") or _pg.overrides(cls, "_check_open")
        # reset_mode="auto": whether the connection's class has any of
        # asyncpg's Connection methods in place of asyncpg's, whose
        # statements the proxy cannot see: every lease of it is marked
        # (_autoreset.AutoResetProxy). Read here, not per lease.
        self.own_methods = runner.state.reset_mode == "auto" and _pg.overrides_connection_methods(cls)
        # asyncpg's done callback on a statement's waiter, which a reset
        # with no timer leaves off while the releasing task drives it.
        self.waiter_completed = _pg.waiter_completed_callback(con)
        # COPY and prepare() calls of the lease under way (proxy._copying):
        # a take-back waits for them as for asyncpg's statement section, and
        # a release made meanwhile resets in a pool task.
        self.copies = 0
        # Statements of the auto and rollback modes' proxies under way
        # (proxy.watch): a release while one runs is marked for its reset.
        self.watched = 0
        # The callback of each proxy's weak reference (bound once, not per lease).
        self.proxy_collected = self._proxy_collected
        # The context variables the connect (init=, a connect= callback, the
        # connection class) set in its pool task, as ((var, value), ...), for
        # the first lease's task to take (Leaser.acquire); None: none, and
        # no look at the connection at acquire. A connection class with an
        # is_closed() of its own has () for good (after the first lease's
        # variables): every acquire asks it before the connection is handed
        # out, as asyncpg's holder does (a health flag set while the
        # connection was idle: review h277), in the acquire's one test of
        # this attribute (no test of its own on the hot path).
        self.init_context: tuple[tuple[Any, Any], ...] | None = () if self.own_is_closed else None

    def _release_on_close(self) -> None:
        self._con = None
        self.cleaned_up = True
        self._runner.connection_lost(self._slot)

    def let_go(self) -> None:
        """The connection is being closed and no lease holds it: drop what
        this holder kept of it (the bound methods its releases call, which
        hold the connection and its asyncpg protocol; the callbacks
        ``init=``, a connection class or a lease registered, which may refer
        to it), so a released proxy that the program keeps does not keep a
        closed connection alive through this holder. Only a release or a
        reclaim of an open lease reads them, and a closing slot has none."""
        self.reset_query = _closed_reset_query
        self.waiter_completed = None
        self.base_callbacks = None
        self.lease_callbacks = None
        self.init_context = None

    def note_abort(self, con: RawConnection) -> None:
        """``con`` is about to be aborted: record whether its backend may
        still run a statement (the close then sends it a cancel request)."""
        if self.abort_in_flight is None and con._protocol is not None:
            self.abort_in_flight = self.statement_in_flight(con)

    def in_flight_at_abort(self, con: RawConnection) -> bool:
        """Whether ``con``'s backend may run a statement: as read just before
        the abort (:meth:`note_abort`), else as it reads now."""
        if self.abort_in_flight is not None:
            return self.abort_in_flight
        return self.statement_in_flight(con)

    def statement_in_flight(self, con: RawConnection) -> bool:
        """Whether ``con``'s backend may run a statement: asyncpg awaits an
        answer (:func:`_internals.statement_in_flight`), or a COPY of the
        lease's runs (between its chunks, its sink or source runs and
        asyncpg awaits nothing, but the backend goes on)."""
        return self.copies > 0 or _pg.statement_in_flight(con)

    def _proxy_collected(self, ref: Any) -> None:
        """A proxy of this connection was garbage collected. Still its
        connection's proxy (``con._proxy``, the weak reference): it was
        never released, and the lease it held is abandoned. A release or a
        detach drops the weak reference first, so a released proxy's death
        calls nothing (no finalizer per lease); except during the reset a
        release drives in its task, which keeps it until the reset ends
        (``Leaser.release``): the lease has no slot then (below)."""
        slot = self._slot
        con = slot.connection
        if con is None or con._proxy is not ref:
            return
        lease = slot.lease
        if lease is None:
            # A setup hook's proxy whose acquire was given up (cancelled
            # while the hook ran): no lease to reclaim, but a dead weak
            # reference left on the connection made asyncpg < 0.32's
            # cleanup (``_proxy._holder._release_on_close()``, at its close
            # or terminate) raise ReferenceError (review h234). Let go of
            # it, as a release does.
            con._proxy = None
            return
        self.orphaned_at = self._runner.now()  # (a clock read: safe inside the collector)
        proxy_class = self._runner.reclaimer.proxy_class
        if proxy_class is not None and lease.active:
            # The lease's stand-in now, not when the reclaimer runs: a
            # notification read before then handed its listener the
            # connection itself (con._proxy a dead weak reference), which
            # a take-back cannot cut off (review h207's test, on uvloop
            # under load). Only con._proxy changes: no pool state.
            _pg.stand_in(con, proxy_class(self, con, lease))
        self._abandoned(lease)

    def _abandoned(self, lease: Lease) -> None:
        # Runs inside the garbage collector, possibly in the middle of the
        # pool's own bookkeeping: only schedule, never touch state here.
        runner = self._runner
        try:
            runner.loop.call_soon_threadsafe(runner.reclaimer.reclaim, lease)
        except RuntimeError:
            pass  # the loop is closed: the process is shutting down


# The slot of Holder.reset_since (its member descriptor), read and written
# through by IOStampHolder's property.
_RESET_SINCE = Holder.__dict__["reset_since"]


class IOStampHolder(Holder):
    """The holder of a pool whose clock is not the loop's (a ManualClock).

    A release stamps ``reset_since`` with the pool clock's reading it has at
    hand (``Leaser.release``: no second clock read per lease), which with
    the default clock is the loop's time, the reset watchdog's. Here it is
    not: the watchdog runs on the loop's time (``Runner.io_clock``: a
    manual clock's jumps say nothing about a reset on the wire, review
    h263), so a start is recorded on that clock instead, whatever value
    the release gives."""

    __slots__ = ()

    @property
    def reset_since(self) -> float | None:
        return _RESET_SINCE.__get__(self, Holder)  # type: ignore[no-any-return]

    @reset_since.setter
    def reset_since(self, value: float | None) -> None:
        _RESET_SINCE.__set__(self, None if value is None else self._runner.io_clock.now())


def _closed_reset_query() -> str:
    """A closed connection's reset query getter (see :meth:`Holder.let_go`):
    never called, as no release resets a closing connection."""
    raise PoolInterfaceError("the connection is closed: it has no reset query")
