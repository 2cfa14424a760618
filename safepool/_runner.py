"""The pool's runner: carries out what the state core asks for.

:class:`Runner` drains the core's typed actions (``match`` + ``assert_never``),
owns every pool task (connects, resets, take-backs, closes, the min_size
upkeep) and the loop timers (the core's earliest deadline, the reset
watchdog), turns the workers' outcomes (``_workers.py``) into the core's facts
and delivers events once the books are settled. Leases the application let
go of (garbage collected, expired, suspected leaks) go to its
:class:`~safepool._reclaim.Reclaimer` (``_reclaim.py``).

Cancellation rule: a pool-owned coroutine settles the books, then re-raises
``CancelledError`` (only ``terminate()`` cancels pool tasks); only
``Exception`` is a connect or reset outcome; cleanup on a cancel path is
synchronous (``terminate()``, never an awaited ``close()``).
"""

from __future__ import annotations

import asyncio
import contextvars
import decimal
import socket
import warnings
import weakref
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Any, assert_never

from . import _internals as _pg
from . import _workers
from ._clock import Clock, LoopClock, Timer
from ._detach import retrieve, settle
from ._holder import Face, Holder, IOStampHolder
from ._internals import RawConnection
from ._reclaim import Reclaimer
from ._reporting import Reporter, logger
from ._state import (
    Abandon,
    Close,
    Connect,
    Fail,
    InternalStateError,
    LeakSuspect,
    NoteServerStatus,
    Phase,
    PoolState,
    Shed,
    Slot,
    SlotState,
    TakeBack,
    TimeOut,
    Waiter,
    Wake,
)
from ._workers import DEFAULT_RESET_TIMEOUT, ResetHooks
from .errors import PoolClosedError, PoolInterfaceError, PoolOverloadedError, PoolTimeoutError

# How long close() lets connects under way finish before cancelling them.
_CONNECT_GRACE_ON_CLOSE = 0.5
# close() logs the leases it still waits for after this many seconds.
_SLOW_CLOSE = 60
# The floor upkeep's retry delays after failed connects (asyncpg 0.32's).
_FLOOR_RETRY_FIRST = 1.0
_FLOOR_RETRY_CAP = 60.0


class Runner:
    """Drains the core's actions, owns the pool's tasks and timers."""

    def __init__(
        self,
        face: Face,
        state: PoolState,
        clock: Clock,
        loop: asyncio.AbstractEventLoop,
        reporter: Reporter,
        open_connection: Callable[[], Awaitable[RawConnection]],
        hooks: ResetHooks,
        *,
        reset_timeout: float | None,
        backend_exit_timeout: float = _workers.BACKEND_EXIT_GRACE,
        auto_reset: bool,
        leak_warning_after: float | None,
    ) -> None:
        self.face = face
        self.state = state
        self.clock = clock
        self.now = clock.now
        # The clock of the timers that watch real I/O (the reset watchdog,
        # the re-check of a lost proxy's connection in use): always the
        # loop's, whatever the pool's clock (a ManualClock's jumps say
        # nothing about the server; docs/testing.md lists which timer runs
        # on which clock). A test of their logic may set another
        # (tests/_util.py: drive_io_timers).
        self.io_clock: Clock = clock if isinstance(clock, LoopClock) else LoopClock(loop)
        # A release stamps a reset's start with the pool clock's reading:
        # the I/O clock's own with a LoopClock, else a holder that records
        # the I/O clock's instead (IOStampHolder).
        self.holder_class = Holder if self.io_clock is clock else IOStampHolder
        self.loop = loop
        self.reporter = reporter
        # The reporter's queue of events not yet delivered (the same deque,
        # bound here: one attribute read less per check on the hot path).
        self.pending_events = reporter.pending
        self.name = reporter.name
        self.open_connection = open_connection
        self.hooks = hooks
        self.reset_timeout = reset_timeout
        self.backend_exit_timeout = backend_exit_timeout
        self.auto_reset = auto_reset
        self.timer: Timer | None = None
        self.timer_at: float | None = None
        self.reset_watchdog: Timer | None = None
        self.tasks: set[asyncio.Task[Any]] = set()
        self.connect_tasks: set[asyncio.Task[Any]] = set()
        # The task of each connect under way in a task of its own, so the
        # core can have one cancelled (an Abandon), and those cancelled so.
        self.connect_task_of: dict[Slot, asyncio.Task[Any]] = {}
        self.abandoned: set[asyncio.Task[Any]] = set()
        self.slot_holders: dict[Slot, Holder] = {}
        # Releases and failed setups that wait for their connection's close,
        # and releases that wait for a reset in a pool task.
        self.closes_done: dict[Slot, asyncio.Future[None]] = {}
        self.resets_done: dict[Slot, asyncio.Future[None]] = {}
        # A second descriptor of each connection's socket (_workers.exit_watch),
        # to keep a closed connection's place counted until its backend exits.
        self.exit_watches: dict[Slot, socket.socket] = {}
        # Slots whose connection is closed, waiting for their backend's exit:
        # counted towards max_size, not by get_size() (asyncpg's counts open
        # connections only).
        self.exiting: set[Slot] = set()
        # Told when the loop shuts down (see watch_loop_shutdown).
        self.loop_shutdown: AsyncGenerator[None, None] | None = None
        # False for a pool opened once its loop had shut down its
        # asynchronous generators: no exit watches (see watch_loop_shutdown).
        self.watch_exits = True
        self.drained = asyncio.Event()
        self.terminating = False
        # Restores min_size after failed connects, on asyncpg's schedule.
        self.maintenance_task: asyncio.Task[Any] | None = None
        # Leases the application let go of (garbage, expired, suspect).
        self.reclaimer = Reclaimer(
            self, state, clock, reporter, hooks, reset_timeout=reset_timeout, leak_warning_after=leak_warning_after,
        )

    # --------------------------------------------------------- the actions

    def drain(self) -> None:
        """Carry out what the state core asked for, then deliver events."""
        state = self.state
        actions = state.actions
        while actions:
            batch = actions[:]
            actions.clear()
            for action in batch:
                try:
                    match action:
                        case Wake(waiter):
                            self.grant(waiter)
                        case Connect(slot):
                            if self.cancelled_from_outside():
                                # The loop is shutting down (asyncio.run() cancels
                                # every task left, then stops): a task spawned now
                                # would never run ("Task was destroyed but it is
                                # pending!"). The connect is dropped; the next pool
                                # event plans one again if the loop lives on.
                                state.connect_cancelled(slot)
                                continue
                            self.start_connect(slot)
                        case Abandon(slot):
                            task = self.connect_task_of.pop(slot, None)
                            if task is not None:
                                self.abandoned.add(task)
                                task.add_done_callback(self.abandoned.discard)
                                task.cancel()
                        case Close(slot, idle_expired):
                            self.close_slot(slot, idle_expired)
                            if state.connect_failures and not state.closing:
                                # Backing off with no connection left is down:
                                # report it now, not at the next failed connect
                                # (a pool closing is not news about the server).
                                self.reporter.note_server_status(self.now())
                        case TimeOut(waiter):
                            if not waiter.future.done():  # (else cancelled first: no timeout reaches it)
                                waiter.future.set_exception(PoolTimeoutError(self.reporter.busy_message(
                                    "timed out waiting for a connection", self.now(), waiter)))
                        case Fail(waiter, error, breaker_open):
                            if breaker_open and not waiter.future.done():
                                # fail_fast: the probe's waiters get what an
                                # acquire arriving in the backoff gets.
                                error = self.reporter.unavailable_error(error, self.now())
                            self.fail_waiter(waiter, error)
                        case TakeBack(lease):
                            self.reclaimer.take_back(lease)
                        case LeakSuspect(lease):
                            self.reclaimer.leak_suspect(lease)
                        case Shed(waiter, reason, waiting):
                            if not waiter.future.done():  # (else cancelled first: never counted)
                                waiter.future.set_exception(PoolOverloadedError(self.reporter.shed_message(reason, waiting)))
                        case NoteServerStatus():
                            # The failure view went stale (backing_off -> up) by
                            # time alone: no connect event reports it.
                            self.reporter.note_server_status(self.now())
                        case _:
                            assert_never(action)
                except Exception as failure:
                    # Code not the pool's ran inside (a logging handler or
                    # filter that raises, a connection class's override):
                    # reported, and the rest of the batch and the timer's
                    # re-arming below still happen (an error out of here left
                    # a take-back never started, a slot closing for good,
                    # the timer unarmed: reviews h258, h259).
                    self.action_failed(action, failure)
        if state.closing and state.size == 0:  # (closing first: a plain attribute, the hot path)
            self.drained.set()
        state.connects_to_watch = False  # (armed for next: the timer covers its deadlines)
        self.arm_timer()
        if self.pending_events:
            self.reporter.deliver()

    def action_failed(self, action: object, error: Exception) -> None:
        """An action of the core's raised while :meth:`drain` carried it out:
        to the loop's exception handler (scrubbed of the pool's password),
        as asyncio reports a callback's error; ``drain`` goes on. A waiting
        task the action was for gets the error (and the core its place or
        its granted connection back), rather than waiting for ever for a
        wake-up or a timeout that never comes (review h260)."""
        waiter = getattr(action, "waiter", None)  # (Wake, TimeOut, Fail, Shed)
        self.report_to_loop(f"{type(action).__name__} raised (the pool goes on)", error)
        if waiter is not None and not waiter.future.done():
            self.state.cancel_waiter(waiter, self.now())
            waiter.future.set_exception(error)

    def report_to_loop(self, what: str, error: Exception) -> None:
        """``error`` (scrubbed of the pool's password, in place) to the loop's
        exception handler, as asyncio reports a callback's error."""
        self.reporter.scrub(error)
        self.loop.call_exception_handler({"message": f"pool {self.name!r}: {what}", "exception": error})

    def cancelled_from_outside(self) -> bool:
        """The running task is one of the pool's, cancelled by something other
        than the pool (only terminate() cancels them, and it sets
        ``terminating``): asyncio.run()'s shutdown, or a program cancelling
        every task at exit."""
        task = asyncio.current_task()
        return (
            task is not None and task in self.tasks and bool(task.cancelling()) and not self.terminating
            and task not in self.abandoned
        )

    def start_connect(self, slot: Slot) -> asyncio.Task[Any]:
        """Run the slot's connect in a pool task of its own (see :meth:`connect_slot`)."""
        task = self.spawn(self.connect_slot(slot, carry_context=True))
        self.connect_tasks.add(task)
        self.connect_task_of[slot] = task
        task.add_done_callback(lambda done: self.connect_ended(slot, done))
        return task

    def connect_ended(self, slot: Slot, task: asyncio.Task[Any]) -> None:
        """A connect's task is done. One cancelled before its first step (an
        Abandon right after its Connect, in one batch of actions; close()
        or terminate()) never ran :meth:`connect_slot`'s handlers: nothing
        reported its end, and its slot would count towards max_size for
        ever (close() waiting for it). Its end is reported here."""
        self.connect_tasks.discard(task)
        self.connect_task_of.pop(slot, None)
        if slot.state is SlotState.CONNECTING:
            self.state.connect_cancelled(slot, self.now())
            self.drain()

    def grant(self, waiter: Waiter) -> bool:
        """Wake a waiter the core granted a connection (a ``Wake``). False
        when its task was cancelled while the grant was in flight: the core
        then passes the connection on, which may ask for more actions."""
        if waiter.future.done():
            self.state.cancel_waiter(waiter, self.now())
            return False
        waiter.future.set_result(None)
        return True

    def fail_waiter(self, waiter: Waiter, error: BaseException) -> None:
        if waiter.future.done():
            return
        if isinstance(error, PoolClosedError):
            error = PoolClosedError(str(error))
        # A connect error reaches the waiters as is, as asyncpg raises it from
        # acquire(): `except asyncpg.InvalidPasswordError` keeps working.
        waiter.future.set_exception(error)

    def after_hand_on(self) -> None:
        """After a connection was handed on (or idled, or closed): carry out
        the core's actions; with none, only arm the idle-lifetime timer if
        it now has something to watch (the hot path skips drain).
        (:meth:`reset_done` and ``Leaser.release`` test its three conditions
        first, to skip the call when none holds: keep them alike.)"""
        state = self.state
        actions = state.actions
        if actions:
            action = actions[0]
            if type(action) is Wake and len(actions) == 1:
                # The connection went to the head waiter, and that is all.
                actions.clear()
                self.wake(action.waiter)
                return
            self.drain()
        elif state.connects_to_watch:
            self.drain()  # (a deadline with no action: see PoolState.connects_to_watch)
        elif state.max_inactive_lifetime and len(state.slot_set) > state.min_size:  # (size, without its call)
            # An idle connection above min_size may now have a lifetime to
            # watch, due before the armed timer (a later lease deadline, a
            # connection's max_lifetime): re-armed for it, or it outlived
            # max_inactive_connection_lifetime until that timer fired.
            timer_at = self.timer_at
            if timer_at is None or ((expiry := state.idle_expiry()) is not None and expiry < timer_at):
                self.arm_timer()

    def wake(self, waiter: Waiter) -> None:
        """Carry out a hand-on's ``Wake`` of ``waiter``, the one action the
        core asked for: taken off ``actions`` (:meth:`after_hand_on`), or
        never queued (``PoolState.reset_done`` with ``wake=False``, the
        contended hot path, :meth:`reset_done`, which tries its first
        branch inline: keep the two alike). As :meth:`drain` would."""
        if not self.pending_events and not self.state.connects_to_watch:
            # drain() without its dispatch and timer check (a grant adds no
            # deadline: the waiter's own timer entry just went stale).
            try:
                # grant(), inlined, asking forgiveness: a granted waiter's
                # future is done only if its task was cancelled (no C call
                # to ask first, per lease).
                waiter.future.set_result(None)
                return
            except asyncio.InvalidStateError:
                self.state.cancel_waiter(waiter, self.now())  # (cancelled while the grant was in flight)
        else:
            self.grant(waiter)  # (what drain() does first with the Wake)
        self.drain()

    def spawn(self, coro: Awaitable[Any]) -> asyncio.Task[Any]:
        task: asyncio.Task[Any] = self.loop.create_task(coro)  # type: ignore[arg-type]
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    # ------------------------------------------------------------- timers

    def arm_timer(self) -> None:
        when = self.state.next_deadline()
        if when == self.timer_at:
            return
        if when is not None and self.timer_at is not None and self.timer_at <= when:
            # The armed callback comes first and re-arms for what is then
            # due: no need to replace a loop timer on every acquire.
            return
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.timer_at = when
        if when is not None:
            self.timer = self.clock.call_at(when, self.on_timer)

    def on_timer(self) -> None:
        self.timer = None
        self.timer_at = None
        if self.state.phase is Phase.CLOSED:
            return
        self.state.advance(self.now())
        self.drain()

    def cancel_timers(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
            self.timer_at = None
        if self.reset_watchdog is not None:
            self.reset_watchdog.cancel()
            self.reset_watchdog = None

    def watch_resets(self, oldest: float | None = None) -> None:
        """Arm the reset watchdog for a reset that began at ``oldest`` (I/O
        clock seconds; now when None) unless it is armed already. On the
        I/O clock (the loop's), not the pool's: it bounds a reset on the
        wire, real time, and a test's ManualClock.advance() to run out a
        lease must not abort another's healthy reset (review h263)."""
        if self.reset_watchdog is None and self.state.phase is not Phase.CLOSED:
            io_clock = self.io_clock
            start = io_clock.now() if oldest is None else oldest
            self.reset_watchdog = io_clock.call_at(start + DEFAULT_RESET_TIMEOUT, self.check_resets)

    def check_resets(self) -> None:
        """The reset watchdog: abort releases' resets that have run for
        DEFAULT_RESET_TIMEOUT seconds (the releasing caller then gets the
        connection's error, and the slot closes); re-arm while any run, for
        the oldest of them: each is aborted DEFAULT_RESET_TIMEOUT after its
        start, however many began while the timer was armed."""
        self.reset_watchdog = None
        now = self.io_clock.now()
        oldest: float | None = None
        for slot, holder in list(self.slot_holders.items()):
            started = holder.reset_since
            if started is None:
                continue
            # (The sum the timer was armed for, not now - started: that
            # difference may round below the timeout at the armed instant,
            # and the watchdog would re-arm for that instant for ever.)
            if now >= started + DEFAULT_RESET_TIMEOUT:
                holder.reset_since = None
                holder.unresponsive = True
                logger.warning(
                    "pool %r: a reset got no answer for %.0fs; aborting the connection",
                    self.name, now - started, extra={"event": "reset_failed", "pool": self.name},
                )
                holder.note_abort(slot.connection)  # (its reset's statement: the close cancels it on the server)
                self.terminate_reporting(slot.connection)
            elif oldest is None or started < oldest:
                oldest = started
        if oldest is not None:
            self.watch_resets(oldest)

    # -------------------------------------------------------------- resets

    async def reset_slot(
        self, holder: Holder, con: RawConnection, timeout: float | None, rollback: bool,
        done: asyncio.Future[None] | None = None, proxy: Any = None, *, hooks: ResetHooks | None = None,
        report: bool = False,
    ) -> None:
        """Reset a RESETTING slot's connection in a pool task, then hand it on
        or close it. Resolves ``done`` (the releasing caller's future) with
        None, or with the reset's error once the connection was given up
        (``done`` is in ``resets_done`` from the spawn on, for terminate()).
        ``proxy``: the released lease's, for :meth:`reset_done`. ``hooks``:
        the reset's, when not the pool's (``ResetHooks.ended``, for a
        reclaimed lease). ``report``: first report an open transaction and
        drop the listeners (``_internals.warn_open_transaction``), here as
        in asyncpg's shielded release task (``rollback`` says already
        whether one is open); a custom reset reports it itself
        (``_workers.base_reset``), unless refused below first (review h240)."""
        if report and (holder.copies or not (self.hooks if hooks is None else hooks).custom):
            _pg.warn_open_transaction(con, keep=holder.copies > 0)
        budget, statement_limit = self.reset_budget(timeout, con)
        try:
            if holder.copies:
                # A counted call of the lease (a COPY, a prepare(): proxy.COUNTED)
                # still runs, perhaps between two of its steps, where asyncpg
                # awaits nothing and would take a reset (prepare()'s type
                # introspection is several statements): refused as asyncpg
                # refuses one while a statement runs, and the connection is
                # given up once the call ends (review s70).
                error: BaseException | None = PoolInterfaceError(
                    "cannot perform operation: another operation is in progress"
                )
            else:
                error = await _workers.reset(
                    con, rollback, self.hooks if hooks is None else hooks, budget, statement_limit
                )
        except BaseException:
            # Only terminate() cancels the pool's tasks: it has discarded the slot.
            _pg.drop_released(con)
            settle(done, None)
            raise
        finally:
            self.resets_done.pop(holder._slot, None)
        if error is None:
            _pg.drop_released(con)  # (attached by the release for the reset: Leaser.release)
        # No retry a loop pass later (busy_retry): this task's first step is
        # where asyncpg's shielded release task decides, so a reset refused
        # here is refused there too, and asyncpg's release raises and gives
        # the connection up. (The retry stands in for that step only when
        # the release decided in its own: the inline reset. Review h241: a
        # cancel queued after the release reached the protocol by the retry,
        # which kept the connection.)
        self.settle_reset(holder, con, proxy, error, done, busy_retry=False)

    def reset_budget(self, timeout: float | None, con: RawConnection) -> tuple[float | None, float | None]:
        """A pool task's reset limits, ``(budget, statement_limit)`` in
        seconds: the caller's budget (release(timeout=), else the acquire's),
        or the pool's reset_timeout; with neither, asyncpg's limits apply: its
        background cancel gives up by closing the connection (then release
        returns quietly), statements are bounded by command_timeout (else
        by a 30 s safety bound: a silent network must not hold a slot forever)."""
        budget = timeout if timeout is not None else self.reset_timeout
        if budget is None and _pg.command_timeout(con) is None:
            return None, DEFAULT_RESET_TIMEOUT
        return budget, None

    def settle_reset(
        self, holder: Holder, con: RawConnection, proxy: Any, error: BaseException | None,
        done: asyncio.Future[None] | None, *, busy_retry: bool = True,
    ) -> None:
        """A pool task's reset ended: :meth:`reset_done`, then resolve the
        releasing caller's ``done`` with its outcome (at once, or once a
        failed reset's close is done)."""
        result = self.reset_done(holder, con, proxy, error, busy_retry=busy_retry)
        if isinstance(result, asyncio.Future):
            # The reset failed: the release raises once the close is done.
            result.add_done_callback(lambda failed: settle(done, failed.exception()))
            return
        settle(done, result)

    def reset_done(
        self, holder: Holder, con: RawConnection, proxy: Any, error: BaseException | None, log: bool = True,
        *, busy_retry: bool = True,
    ) -> BaseException | None:
        """A reset (or take-back) ended: hand the connection on, or close it.
        Returns the error for the releasing caller to raise once the
        connection was given up (also when the pool was terminated
        meanwhile: a statement cut off by terminate() raises asyncpg's
        ``ConnectionDoesNotExistError`` from release(), as on asyncpg's pool;
        nothing left to do then); None if handed on. ``proxy``: the released
        lease's (None for a take-back), attached while the connection is
        closed (``_pg.attach_released``), as asyncpg's release terminates a
        connection whose reset failed before it detaches the proxy."""
        holder.reset_since = None
        # The released proxy, kept attached during an inline reset (Leaser.
        # release), is detached now (a failed reset attaches it again for
        # the close, below).
        con._proxy = None
        if error is None:
            # (con.is_closed(), inlined where asyncpg's: the hot path)
            ok = not (con.is_closed() if holder.own_is_closed else con._aborted or not con._protocol.is_connected())
        elif busy_retry and proxy is not None and _pg.is_busy(error):
            return self.reset_after_a_loop_pass(holder, con, proxy, error)  # type: ignore[return-value]
        else:
            ok = False
            if isinstance(error, Exception):
                # Raised to the releasing caller: a reset= hook's or a
                # connection class's error may quote the DSN (review h231).
                self.reporter.scrub(error)
        # (wake=False: a grant to the head waiter comes back to be woken here,
        # with no Wake to build and dispatch: the contended hot path.)
        handed = self.state.reset_done(holder._slot, self.now(), ok, False)
        if not handed:
            return error  # the pool was terminated meanwhile
        if ok:
            # (Before any task can take it: the waiter is woken after this.)
            holder.clean_mark = con._protocol.queries_count  # (_pg.queries_count, inlined: the hot path)
            if handed is not True:
                # self.wake(handed), its common case inlined (the contended
                # hot path: a call less per lease; keep the two alike): no
                # event to deliver, no connect to watch, and the waiter's
                # task not cancelled meanwhile; else wake() does it all.
                if not self.pending_events and not self.state.connects_to_watch:
                    try:
                        handed.future.set_result(None)
                        return None
                    except asyncio.InvalidStateError:
                        pass  # (cancelled while the grant was in flight: wake() gives the slot on)
                self.wake(handed)
                return None
        else:
            if error is not None and log:
                logger.warning(
                    "pool %r: reset failed (%s); closing the connection", self.name, self.reporter.describe(error),
                    extra={"event": "reset_failed", "pool": self.name},
                )
            # The core closes the slot (the Close runs in drain); the close
            # waits for a cancelled query to stop on the server before the
            # slot stops counting.
            # A timeout while a cancelled query has not answered yet is the
            # release's budget running out, not a dead server: aborting now
            # would also drop asyncpg's cancel request still under way, and
            # the backend would run the query to its end beside the slot's
            # replacement. The close waits for the answer instead, for
            # CANCEL_ANSWER_GRACE at most (then it aborts, as asyncpg does
            # at once: a replacement within asyncpg's recovery time).
            timed_out = isinstance(error, TimeoutError)
            cancelling = timed_out and _pg.is_cancelling(con)
            # (Or already: the reset watchdog aborted it, and the reset ends
            # with the abort's ConnectionDoesNotExistError, no timeout; the
            # close still sends its backend a cancel request.)
            holder.unresponsive = holder.unresponsive or (timed_out and not cancelling)
            if (
                not timed_out and holder.abort_in_flight is None and not self.terminating
                and con.is_closed() and not _pg.peer_closed(con)
            ):
                # The socket was reset (an RST: a proxy, a load balancer, the
                # network) under the reset, or while the release waited for
                # a cancelled statement's answer, whose cancel request the
                # same reset may have killed (asyncpg then aborts the
                # connection itself, and the reset ends with no error of its
                # own: see _workers.reset): the backend may still run that
                # statement. As for a connection lost under a lease, the
                # close sends a cancel request of the pool's own and the slot
                # counts until it was delivered (docs/design.md, "Slot
                # states"). Not after a close the peer made in order (the
                # backend has exited) nor an abort of the pool's. Bounded by
                # CANCEL_ANSWER_GRACE, as the wait for asyncpg's own answer:
                # when asyncpg gave up on a cancel request that never came
                # (a server that accepts it and never acts), its replacement
                # is open within asyncpg's recovery time, as asyncpg's own
                # suite wants (test_pool_release_after_background_cancel_timeout).
                holder.lost_while_leased = True
                holder.close_budget = _workers.CANCEL_ANSWER_GRACE
            # Refused: a statement of the lease still runs in another task
            # (release() called while it ran). The close waits for it to end
            # first: asyncpg's close() would cancel it through its protocol,
            # and a statement whose answer was already on its way then fails
            # with InternalClientError('got result for unknown protocol state
            # 3'), where asyncpg's pool (which terminates here) raises
            # ConnectionDoesNotExistError.
            holder.busy_elsewhere = error is not None and _pg.is_busy(error)
            if cancelling:
                holder.close_budget = _workers.CANCEL_ANSWER_GRACE
            elif holder.busy_elsewhere and proxy is not None and holder.release_timeout is not None:
                # That wait is the release's: bounded by its budget (its
                # timeout=, else the acquire's), not reset_timeout's; a
                # COPY waiting for its source's next chunk held release(
                # timeout=0.2) for 30 s (s74).
                holder.close_budget = holder.release_timeout
            if proxy is not None:
                _pg.attach_released(con, proxy, holder)
                if error is not None and not cancelling:
                    # A release raises once the connection is closed (the
                    # core closes it in drain, below), as asyncpg's release
                    # terminates it before it raises: get_size() no longer
                    # counts it, and its backend is gone. (Not while a
                    # cancelled query is waited for: the release's budget
                    # ran out, it raises now, as asyncpg's.)
                    closed = self.closes_done[holder._slot] = self.loop.create_future()
                    self.after_hand_on()
                    if closed.done():
                        return error
                    failed: asyncio.Future[None] = self.loop.create_future()
                    failed.add_done_callback(retrieve)  # (a caller cancelled meanwhile awaits it no more)
                    closed.add_done_callback(lambda _: settle(failed, error))
                    return failed  # type: ignore[return-value]  # (see _Driver.__await__, reset_slot)
        # after_hand_on(), not called when none of its three tests holds
        # (the hot path: a call less per reset; keep the two alike).
        state = self.state
        if state.actions or state.connects_to_watch or (
            state.max_inactive_lifetime and len(state.slot_set) > state.min_size
        ):
            self.after_hand_on()
        return error

    def reset_after_a_loop_pass(
        self, holder: Holder, con: RawConnection, proxy: Any, error: BaseException
    ) -> asyncio.Future[None]:
        """A release's reset was refused at once: asyncpg's protocol still
        had a statement of the lease running (its waiter set). If a task
        cancelled that statement in the same loop step as the release, the
        cancel reaches the protocol only in the next step (the waiter's done
        callback sends the cancel request), and there asyncpg's release
        decides (the first step of its shielded task: asyncpg 0.29-0.32): it
        finds the statement cancelling, waits for the server's answer and
        resets; release() returns and the connection is kept. So a pool task
        looks again in its first step, queued now as asyncpg's is, and does
        the same; a statement still
        running then (not cancelled) fails the release as before, as on
        asyncpg's pool. The budget is the release's ``timeout=``, else the
        acquire's (both in ``holder.release_timeout``), else ``reset_timeout``.
        Returns the future the release awaits: resolved with None, or with
        the error once the connection was given up."""
        done: asyncio.Future[None] = self.loop.create_future()
        done.add_done_callback(retrieve)  # (a caller cancelled meanwhile awaits it no more)
        self.resets_done[holder._slot] = done
        if proxy is not None:
            _pg.attach_released(con, proxy, holder)  # (for the callbacks meanwhile, as in reset_slot)
        self.spawn(self._reset_after_a_loop_pass(holder, con, proxy, error, done))
        return done

    async def _reset_after_a_loop_pass(
        self, holder: Holder, con: RawConnection, proxy: Any, error: BaseException | None, done: asyncio.Future[None]
    ) -> None:
        budget, limit = self.reset_budget(holder.release_timeout, con)
        try:
            # No sleep(0) first: this task's first step was queued when the
            # release called reset_done, where asyncpg's release queues its
            # shielded task, so a cancel queued before it has reached the
            # protocol and one queued after it has not, as with asyncpg.
            if _pg.is_cancelling(con) and not con.is_closed():
                hooks = self.hooks
                try:
                    # The reset gets what the wait left of the budget (asyncpg
                    # 0.32's holder subtracts the wait): the release is bounded
                    # by its timeout as a whole, not once per step.
                    async with asyncio.timeout(budget):
                        budget = await _workers.cancel_answered(con, budget)
                except TimeoutError as exc:
                    error = exc
                else:
                    # What the inline reset would have sent (its reset_plan:
                    # a connection class's own reset query in every mode, a
                    # marked lease's full reset), now that the transaction
                    # status is known.
                    if hooks.custom:
                        rollback = True
                    else:
                        # (Reported already; asyncpg's Transaction, kept by a
                        # reset refused during a counted call (reset_slot),
                        # goes now, as asyncpg's reset lets go of it: a next
                        # lease's transaction() would take it for an outer
                        # one, review h240.)
                        open_xact = _pg.warn_open_transaction(con, quiet=True)
                        full, rollback = self.state.reset_plan(holder.clean_mark == -1, open_xact)
                        if full:
                            hooks = hooks.ended
                    error = await _workers.reset(con, rollback, hooks, budget, limit)
        except BaseException:
            # Only terminate() cancels the pool's tasks: it has discarded the slot.
            _pg.drop_released(con)
            settle(done, None)
            raise
        finally:
            self.resets_done.pop(holder._slot, None)
        if error is None:
            _pg.drop_released(con)
        self.settle_reset(holder, con, proxy, error, done, busy_retry=False)

    # ------------------------------------------------- connects and closes

    async def open(self, init_size: int) -> None:
        """Start-up (``Pool``'s ``_async__init__``): open ``init_size``
        connections, then start the min_size upkeep and the timers."""
        state = self.state
        self.watch_loop_shutdown()
        if init_size:
            # The first connection is awaited and its error raised, as with
            # asyncpg: a wrong DSN or password must fail pool creation.
            first = state.add_connecting(self.now())
            await self.connect_slot(first, raise_errors=True)
            # The rest may fail without failing creation: the min_size upkeep
            # retries them in the background with backoff, up to min_size.
            limit = state.max_connecting
            if limit is None or limit >= init_size - 1:
                others = [state.add_connecting(self.now()) for _ in range(init_size - 1)]
                await asyncio.gather(*(self.connect_slot(slot) for slot in others))
            else:
                # max_connecting bounds creation's connects too; each slot is
                # planned when its connect starts (its connect time, which
                # sets the hedge delay, is not the wait for its turn).
                gate = asyncio.Semaphore(limit)

                async def paced() -> None:
                    async with gate:
                        if not state.closing and state.size < state.max_size:
                            await self.connect_slot(state.add_connecting(self.now()))

                await asyncio.gather(*(paced() for _ in range(init_size - 1)))
        state.start_floor()
        state.advance(self.now())
        self.drain()

    async def connect_slot(self, slot: Slot, *, raise_errors: bool = False, carry_context: bool = False) -> bool:
        """Open the slot's connection; returns whether it is now in the pool.

        ``carry_context``: the connect runs in a pool task of its own
        (:meth:`start_connect`), where asyncpg's pool (0.29-0.32) connects
        in the acquiring task: the context variables ``init=``, a
        ``connect=`` callback or the connection class set here are handed
        to the connection's first lease, whose task sets them
        (``Holder.init_context``), as they are set in the acquirer's task
        on asyncpg's pool (review h261)."""
        state = self.state
        before = contextvars.copy_context() if carry_context else None
        # (Pool creation's first connect raises its error to create_pool()'s
        # caller: its init= failure is closed before, as asyncpg's.)
        attempt = _workers.ConnectAttempt(close_later=not raise_errors, opened=lambda: state.connect_answered(slot))
        token = _workers.CONNECT_ATTEMPT.set(attempt)
        try:
            con = await self.open_connection()
        except Exception as exc:
            failure: BaseException | None = exc
        except BaseException as exc:
            if not _workers.raised_not_cancelled(exc):
                # Cancelled (terminate(), close()), or KeyboardInterrupt: not a
                # connect outcome; settle the books and let it through.
                attempt.left_open(None)
                state.connect_cancelled(slot, self.now())
                self.drain()
                raise
            failure = exc
        else:
            failure = None
        finally:
            _workers.CONNECT_ATTEMPT.reset(token)
            # The loop's handles made during the connect (the transport's
            # reader among them) keep a copy of this context, and so the
            # attempt, for the connection's life: it must not keep the pool
            # (asyncpg's test_pool_gc_does_not_restore_min_size).
            attempt.opened = None
        # A connection init= failed on: the slot closes it (a Close, in a
        # pool task of its own, counted until the backend is gone) while its
        # waiting task gets the hook's error now.
        leftover = attempt.left_open(failure)
        if failure is not None:
            # Read before connect_failed fails the waiters: a connect that
            # tasks waited for is theirs, not the min_size upkeep's.
            waited = state.waiting > 0
            counted = state.connect_failed(
                slot, self.now(), failure, _pg.refusal(failure), attempt.init_failed, leftover,
                _pg.program_error(failure),
            )
            if counted:
                # Reported outside the except block: a failing listener's
                # traceback must not carry the connect error's full text. A
                # connect terminate() abandoned (its hook turned the
                # cancellation into an error) is no failure: not counted,
                # not logged, no connect_failed event.
                self.reporter.connect_failed(failure, self.now(), raised=raise_errors, waited=waited)
            elif leftover is not None:
                self.terminate_reporting(leftover)  # abandoned meanwhile (terminated)
            self.drain()
            self.keep_floor()
            if raise_errors:
                raise failure
            return False
        if not state.connect_succeeded(slot, con, self.now()):
            self.terminate_reporting(con)  # abandoned meanwhile (terminated, or an Abandon its connect ignored)
            # An Abandon's end frees its place: the core served its former
            # taker or planned its connect (connect_cancelled), to carry out now.
            self.drain()
            return False
        # (Before any task can take it: the hand-on's Wake runs in drain.)
        # Mark 0: statements of init= (and of a connect= callback) make the
        # first lease's release reset, as asyncpg resets after every lease.
        # reset_mode="auto" cannot see them (they run on the raw connection):
        # -1, always reset after the first lease.
        holder = self.holder_class(self.face, self, slot, con, clean_mark=-1 if self.auto_reset else 0)
        carried = None if before is None else _context_set_since(before)
        if carried:
            # This task's context ends with the task: its references to what
            # the connect set are not the pool's (base_refs, below: one to
            # the connection itself, an init= that keeps it in a variable,
            # then sank the baseline once gone; review h266).
            for var, _ in carried:
                var.set(None)
        self.slot_holders[slot] = holder
        watch = _workers.exit_watch(con) if self.watch_exits else None
        if watch is not None:
            self.exit_watches[slot] = watch
        _pg.attach_holder(con, holder)
        del con  # measured below with no reference but the pool's own
        holder.base_callbacks = _pg.callback_baseline(slot.connection)
        holder.base_refs = _pg.reference_count(slot.connection)
        if carried:
            # (Those the carried values hold go to the first lease's task:
            # the application's then, as on asyncpg's pool.)
            holder.base_refs -= sum(1 for _, value in carried if value is slot.connection)
            holder.init_context = carried
        self.reporter.note_server_status(self.now())
        self.drain()
        return True

    def keep_floor(self) -> None:
        """Start the min_size upkeep (:meth:`restore_floor`) if the pool is
        below min_size while connects fail: the core then plans no connect
        for the floor alone (only for waiting tasks, on its backoff). Called
        after start-up, a failed connect, a close and a resize: each can
        leave the pool below the floor in a backoff."""
        state = self.state
        if (
            state.connect_failures
            and state.started
            and state.floor_deficit()
            and (self.maintenance_task is None or self.maintenance_task.done())
        ):
            self.maintenance_task = self.spawn(self.restore_floor())

    async def restore_floor(self) -> None:
        """min_size upkeep once connects fail and nobody waits: one connect
        after 1, 2, 4 ... 60 s (asyncpg 0.32's floor retry schedule), until the
        floor is met. Waiting tasks do not depend on it: their connects are
        paced by the core's backoff (a refused one is retried within 10-50 ms)."""
        state = self.state
        delay = _FLOOR_RETRY_FIRST
        while True:
            await asyncio.sleep(delay)
            if self.state.phase is Phase.CLOSED or state.closing or not state.floor_deficit():
                return
            slot = state.plan_floor_connect(self.now())
            if slot is None:
                continue  # a connect is under way: look again later
            # In a task of its own, as the acquires' connects: a task that
            # took it over and finds it lost has it cancelled (an Abandon).
            task = self.start_connect(slot)
            await asyncio.wait((task,))
            if task.cancelled() or not task.result():  # failed (or abandoned)
                delay = min(delay * 2, _FLOOR_RETRY_CAP)
            else:
                delay = _FLOOR_RETRY_FIRST
            if not state.floor_deficit():
                return

    def close_slot(self, slot: Slot, idle_expired: bool = False) -> None:
        """Close ``slot``'s connection (the core's ``Close``): gracefully in a
        pool task, or aborted at once (terminate(), an unresponsive or
        already closed connection). ``idle_expired``: past
        ``max_inactive_connection_lifetime``, where asyncpg's pool (0.29-0.32,
        ``PoolConnectionHolder._deactivate_inactive_connection``) calls the
        connection's ``terminate()``, never its ``close()``: so does this
        one for a connection class with a ``close()`` or ``terminate()`` of
        its own (review h257: an override's statements ran where asyncpg's
        pool runs none). asyncpg's own class is closed in order (a Terminate
        message: the server counts a normal disconnect; nothing a program
        sees differs)."""
        holder = self.slot_holders.pop(slot, None)
        con = slot.connection
        if holder is not None:
            holder._con = None  # our own close: no _release_on_close callback
            holder.let_go()
        lost = holder is not None and holder.lost_while_leased
        unresponsive = holder is not None and holder.unresponsive
        budget = holder.close_budget if holder is not None and holder.close_budget is not None else self.reset_timeout
        key = holder.cancel_key if holder is not None else None
        if (
            con is None
            or self.terminating
            or unresponsive
            or self.cancelled_from_outside()  # (a close task now would never run: abort)
            or (_reads_closed(con) and not lost and not _pg.is_cancelling(con))
            or (idle_expired and (_pg.overrides(type(con), "close") or _pg.overrides(type(con), "terminate")))
        ):
            # An unresponsive connection (its reset or take-back ran out, or
            # the reset watchdog aborted it) whose backend may still run a
            # statement: aborted, then its backend gets a cancel request and
            # the slot counts until it was delivered. Not for terminate()
            # (synchronous, nothing waits) nor at the loop's shutdown.
            # (unresponsive: a holder's flag, so there is a holder.)
            cancel = (
                unresponsive and con is not None and key is not None
                and not (self.terminating or self.cancelled_from_outside())
                and holder is not None and holder.in_flight_at_abort(con)
            )
            if con is not None:
                if not ((self.terminating and _reads_closed(con)) or (holder is not None and holder.cleaned_up)):
                    # (terminate_all() may have aborted it already: a
                    # connection class's terminate() runs once, as on asyncpg's
                    # pool.terminate(). One asyncpg ended and cleaned up
                    # itself, lost or terminated, is left as it is, as
                    # asyncpg's pool leaves it (0.29-0.32): an abort now
                    # would take the transport from its protocol, which a
                    # COPY of the lease under way still writes to, and
                    # raised AttributeError there (review h244). A protocol
                    # aborted directly, with no cleanup, is terminated.)
                    self.terminate_reporting(con)
                _pg.drop_released(con)
            if cancel and con is not None:
                self.spawn(self.cancel_aborted(slot, con, key, _workers.cancel_timeout(budget)))
                return
            if slot in self.exit_watches and self.backend_exit_timeout > 0 and not (
                self.terminating or self.cancelled_from_outside()
            ):
                self.exiting.add(slot)  # (get_size() no longer counts it, as asyncpg's once closed)
                self.spawn(self.closed_after_exit(slot))
                return
            self.slot_closed(slot)
            return
        raises = holder is not None and holder.close_raises
        busy = holder is not None and holder.busy_elsewhere
        in_flight = holder.statement_in_flight if holder is not None else _pg.statement_in_flight
        calls_budget = holder.calls_budget if holder is not None else None
        # close(timeout=) where asyncpg's pool passes it (Holder.close_timeout):
        # a release's close, and an expired connection's, which asyncpg's
        # next acquire closes with close(timeout=None) (not during close():
        # asyncpg's Pool.close() calls close() with none).
        keyword = holder is not None and (
            holder.close_timeout or (slot.generation != self.state.generation and not self.state.closing)
        )
        if _reads_closed(con):
            # Already closed (lost, or ended by a reset or a connection
            # class's own code), its backend perhaps still running a
            # statement: the close task sends it a cancel request first, the
            # place counted towards max_size meanwhile, but not by
            # get_size(), which counts open connections, as asyncpg's does
            # once its holder heard of the close (review h277).
            self.exiting.add(slot)
        self.spawn(self.close_connection(slot, con, lost, budget, raises, busy, key, in_flight, calls_budget, keyword))

    def terminate_reporting(self, con: RawConnection) -> None:
        """``con.terminate()`` where the core closes a slot (inside
        :meth:`drain`): a connection class's ``terminate()`` that raises goes
        to the loop's exception handler, as its error does from asyncpg's
        pool, whose idle expiry calls it in a loop callback (0.29-0.32); the
        connection is aborted then all the same (an error out of ``drain``
        left the slot closing for good and the pool stuck: review h258)."""
        try:
            _pg.terminate(con)
        except Exception as error:
            self.report_to_loop("the connection class's terminate() raised; the connection was aborted", error)
            if not con._aborted:
                con._abort()

    async def cancel_aborted(
        self, slot: Slot, con: RawConnection, key: _pg.CancelKey | None, timeout: float
    ) -> None:
        """The backend of a connection the pool aborted while a statement
        ran: send it a cancel request; the slot counts until it was
        delivered (or ``timeout`` ran out: the server unreachable)."""
        try:
            await _workers.deliver_cancel(con, key, timeout)
            settle(self.closes_done.pop(slot, None), None)  # (a release returns; the place stays counted)
            await self.backend_exit(slot)
        finally:
            self.slot_closed(slot)
            self.drain()

    async def closed_after_exit(self, slot: Slot) -> None:
        """Free the place of a slot whose connection is closed once its
        backend has exited (:meth:`backend_exit`)."""
        try:
            await self.backend_exit(slot)
        finally:
            self.slot_closed(slot)
            self.drain()

    async def backend_exit(self, slot: Slot) -> None:
        """Until the server has closed its end of the slot's socket, its
        backend gone, ``backend_exit_timeout`` seconds at most (the pool's
        option, default ``_workers.BACKEND_EXIT_GRACE``; 0: no wait): a backend exits after
        its connection is closed or aborted (it reads asyncpg's Terminate or
        the socket's end once its statement ends; one ended by
        ``pg_terminate_backend`` sends its FATAL first), and its exit work
        takes time (a session's temporary tables are dropped), while the
        slot's replacement would connect beside it: ``max_size + 1`` on the
        server (review h206). Nothing to wait for without a duplicate of the
        socket (:func:`_workers.exit_watch`)."""
        watch = self.exit_watches.get(slot)
        if watch is None:
            return
        try:
            con = slot.connection
            if (con is None or _reads_closed(con)) and self.backend_exit_timeout > 0:  # (never an open connection's data)
                self.exiting.add(slot)
                await _workers.backend_gone(watch, self.backend_exit_timeout)
        finally:
            self.drop_exit_watch(slot)

    def drop_exit_watch(self, slot: Slot) -> None:
        self.exiting.discard(slot)
        watch = self.exit_watches.pop(slot, None)
        if watch is not None:
            watch.close()

    async def close_connection(
        self, slot: Slot, con: RawConnection, lost: bool, budget: float | None, raises: bool = False,
        busy: bool = False, key: _pg.CancelKey | None = None,
        in_flight: Callable[[RawConnection], bool] = _pg.statement_in_flight, calls_budget: float | None = None,
        keyword: bool = False,
    ) -> None:
        """Close; the slot counts towards max_size until the backend is gone
        (``budget``: seconds for the close, None for the default; ``raises``:
        the releasing caller waiting for it gets the close's error;
        ``busy``: another task's statement still runs on it, waited for first;
        ``in_flight``: whether a statement may run, the holder's reading;
        ``calls_budget``, ``keyword``: see :func:`_workers.close`)."""
        error: Exception | None = None
        try:
            # (A release's budget spent on a cancelled query: it raises now,
            # the slot counts until the server answered; see _workers.close.)
            error = await _workers.close(
                con, lost, budget, (lambda spent: settle(self.closes_done.pop(slot, None), spent)) if raises else None,
                busy=busy, key=key, in_flight=in_flight, calls_budget=calls_budget, keyword=keyword,
            )
            if error is not None:
                # Aborted: a release waiting for the close returns (raises)
                # now, as asyncpg's; the place stays counted until the
                # backend has exited. (A graceful close saw it exit.)
                settle(self.closes_done.pop(slot, None), error if raises else None)
            await self.backend_exit(slot)
        finally:
            _pg.drop_released(con)
            self.slot_closed(slot, error if raises else None)
            self.drain()

    def slot_closed(self, slot: Slot, error: Exception | None = None) -> None:
        """The slot's backend is gone: free its place, wake whoever waits for
        it (with ``error``, the close's, when its release raises it).
        Idempotent (terminate() may have closed it first)."""
        self.drop_exit_watch(slot)
        if self.state.closed(slot, self.now()):
            # A released proxy the program keeps holds the slot (through its
            # lease and holder): the closed connection must not stay with it
            # (asyncpg's released proxy holds no closed connection either).
            slot.connection = None
            settle(self.closes_done.pop(slot, None), error)
            self.keep_floor()

    def connection_lost(self, slot: Slot) -> None:
        """asyncpg noticed the connection died (server restart, terminate)."""
        con = slot.connection
        was_leased = self.state.connection_lost(slot, self.now())
        if was_leased is None:
            return  # the task that owns the slot's outcome sees the error
        watch = self.exit_watches.get(slot)
        if watch is not None:
            # The socket's end, which asyncpg's abort of its descriptor did
            # not send (this one keeps the socket open): an idle backend
            # exits on it, before the slot's close (at the lease's release).
            _workers.half_close(watch)
        holder = self.slot_holders.get(slot)
        if holder is not None and holder.abort_in_flight is not None:
            # Aborted by the user's terminate() through the proxy, which
            # looked first: a cancel request only if a statement was in
            # flight (an idle backend reads the end of its socket and exits).
            holder.lost_while_leased = holder.abort_in_flight
        elif was_leased and holder is not None and not (con is not None and _pg.peer_closed(con)):
            # Its backend may still run the lease's query: the close sends
            # a cancel request. Not when the peer closed in order (a FIN):
            # PostgreSQL's backend has exited, PgBouncer has dropped the
            # client and matches its cancel key to nothing, and each request
            # would cost PgBouncer one more client connection per failed
            # query of an outage (docs/pgbouncer.md).
            holder.lost_while_leased = True
        if con is not None:
            _pg.detach_proxy(con)
        self.drain()  # (the Close: after lost_while_leased is known)

    # ----------------------------------------------------------- shutdown

    async def close_all(self) -> None:
        """Close gracefully (``Pool.close()``): fail the waiters, stop the
        floor upkeep, give connects under way a short grace, then wait until
        every lease is released and every connection closed. On error or
        cancellation the caller terminates; either way it calls
        :meth:`finish_close`."""
        state = self.state
        warn_handle = self.loop.call_later(_SLOW_CLOSE, lambda: self.reporter.warn_slow_close(self.now()))
        try:
            state.begin_close(PoolClosedError("pool is closing"))
            if self.maintenance_task is not None:
                self.maintenance_task.cancel()  # nothing to keep a floor for
            self.drain()
            # Connects under way get a short grace to finish (with asyncpg
            # they belong to acquires, so they complete and run init=); one
            # that never answers (a black-holed server) must not hold close()
            # up to asyncpg's connect timeout.
            if self.connect_tasks:
                await asyncio.wait(list(self.connect_tasks), timeout=_CONNECT_GRACE_ON_CLOSE)
            for task in list(self.connect_tasks):
                task.cancel()
            self.drain()
            while state.size:
                self.drained.clear()
                self.drain()
                if state.size:
                    await self.drained.wait()
        finally:
            warn_handle.cancel()

    def finish_close(self) -> None:
        """A close ended (done, failed or terminated): the pool is closed and
        no timer stays armed."""
        if self.state.phase is not Phase.CLOSED:
            self.state.set_phase(Phase.CLOSED)
        self.cancel_timers()
        self.drop_exit_watches()
        self.unwatch_loop_shutdown()

    def watch_loop_shutdown(self) -> None:
        """Have the event loop close the exit watches' descriptors when it
        shuts down with the pool still open (``asyncio.run()``'s end,
        ``asyncio.Runner.close()``, ``uvloop.run()``, pytest-asyncio's loop
        teardown: ``loop.shutdown_asyncgens()``, which closes every
        asynchronous generator started on the loop, this one among them).
        uvloop then closes every transport as the loop closes, asyncpg's
        among them, so the backends of a pool left open exit, as they did
        before the exit watch kept a second descriptor of each socket
        (review h214). On asyncio's loop, which leaves transports open,
        nothing else changes. A loop closed without ``shutdown_asyncgens()``
        is not told: ``terminate()``, ``close()`` or garbage collection ends
        those backends. Holds the runner weakly (a pool nobody references
        is still collected).

        A pool opened once the loop has shut down its asynchronous
        generators (in the cleanup of one that ``shutdown_asyncgens()``
        closes, at ``asyncio.run()``'s end) cannot be told: the loop would
        never close this one, and its first-iteration hook warns of it
        (``ResourceWarning``: "... was scheduled after
        loop.shutdown_asyncgens() call", asyncio and uvloop alike), where
        asyncpg's pool starts no generator and warns of nothing (review
        s70). Such a pool starts no generator, and keeps no exit watches
        (``watch_exits``), so nothing of its own outlives the transports
        when the loop closes; a connection it closes stops counting at
        once, as on asyncpg's pool (docs/design.md, "Slot states").
        asyncio's loop says whether it has shut them down
        (``_asyncgens_shutdown_called``, 3.6+); uvloop's keeps it to itself,
        so there the hook's warning is the answer: caught, not passed on
        (``warnings.catch_warnings``, which swaps the process's warning
        filters for the generator's first step)."""
        shut_down = getattr(self.loop, "_asyncgens_shutdown_called", None)
        if shut_down:
            self.watch_exits = False
            return
        shutdown = _on_loop_shutdown(weakref.ref(self))
        if shut_down is not None:
            _step(shutdown.asend(None))  # (to its first yield: the loop's hook registers it)
        elif _started_late(shutdown):
            _step(shutdown.aclose())
            self.watch_exits = False
            return
        self.loop_shutdown = shutdown

    def unwatch_loop_shutdown(self) -> None:
        """Finish :meth:`watch_loop_shutdown`'s generator now (the pool
        closed, terminated, or failed to open): nothing of the pool's left
        for the loop to close, nor a task of the loop's to close it with
        once it is collected."""
        shutdown, self.loop_shutdown = self.loop_shutdown, None
        if shutdown is not None:
            _step(shutdown.aclose())  # (its finally runs now)

    def drop_exit_watches(self) -> None:
        """Close every duplicate socket descriptor left (a pool task cancelled
        before its first step never closes its own)."""
        for slot in list(self.exit_watches):
            self.drop_exit_watch(slot)

    async def join(self) -> None:
        """Wait for the pool tasks still running (after a close)."""
        if self.tasks:
            await asyncio.gather(*list(self.tasks), return_exceptions=True)

    def terminate_all(self) -> None:
        """Discard every slot (connections terminated, not closed) and cancel
        every pool task; settles the books synchronously."""
        # The sockets' duplicates first: on a loop already closed (uvloop
        # closed the transports then) the aborts below raise, and these are
        # what keeps the sockets, and so their backends, alive (review h214).
        self.drop_exit_watches()
        self.unwatch_loop_shutdown()
        state = self.state
        self.terminating = True
        state.begin_close(PoolClosedError("pool is closed"))
        now = self.now()
        if self.reporter.listeners:
            # Leases the code never released, ended here: the leak guards
            # report them (they vanish from leases() below).
            for lease in state.leases():
                self.reporter.emit("lease_ended", lease, now - lease.acquired_at, reason="terminate")
        for task in list(self.tasks):
            # A task cancelled before its first step never runs its cleanup:
            # what the tasks would settle is settled below, synchronously,
            # and their handlers find it done if they do run.
            task.cancel()
        # Proxies are cut off after their connections are terminated, as
        # asyncpg's terminate() does: a termination listener gets the proxy
        # the program holds (Connection._unwrap() at the terminate), not the
        # connection.
        connections = [slot.connection for slot in state.slots() if slot.connection is not None]
        for slot in state.terminate(now):
            # Already closing: its close task was cancelled, abort the
            # connection instead. (A connect that still completes finds its
            # slot abandoned and aborts its connection.)
            # Not one already closed whose backend the pool waits out (an
            # idle connection terminated at its inactive lifetime): asyncpg's
            # pool let go of it then, and terminate() runs once (review h258).
            if slot.connection is not None and (slot in self.slot_holders or not slot.connection.is_closed()):
                _pg.terminate(slot.connection)
            self.slot_closed(slot)
        for done in self.resets_done.values():
            settle(done, None)  # releases waiting for a pool task's reset return
        self.resets_done.clear()
        self.drain()
        for con in connections:
            _pg.detach_proxy(con)
        self.cancel_timers()


async def _on_loop_shutdown(runner: weakref.ref[Runner]) -> AsyncGenerator[None, None]:
    """Yields once; closed (by ``loop.shutdown_asyncgens()``, or by the
    pool's close), drops the runner's exit watches, if it is still there."""
    try:
        yield
    finally:
        alive = runner()
        if alive is not None:
            alive.drop_exit_watches()


def _context_set_since(before: contextvars.Context) -> tuple[tuple[Any, Any], ...] | None:
    """The context variables the running task set since ``before`` (a copy
    of its context then) and their values now; None if none. Not carried:
    one reset to unset by its token since (a variable cannot be set
    unset); one set again to the value it had (not told apart from one
    left alone); ``decimal``'s context, which Decimal arithmetic in the
    hook creates on first use (carried, it replaced the acquirer's
    ``localcontext()``; review h266)."""
    changed = tuple(
        (var, value) for var, value in contextvars.copy_context().items()
        if before.get(var, _UNSET) is not value and type(value) is not decimal.Context
    )
    return changed or None


_UNSET = object()


def _started_late(shutdown: AsyncGenerator[None, None]) -> bool:
    """Take ``shutdown``'s first step on a loop that does not say whether it
    has shut down its asynchronous generators (uvloop); True if its
    first-iteration hook warned that it has ("... was scheduled after
    loop.shutdown_asyncgens() call"). That warning is the answer, not
    passed on; any other is, as it came."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _step(shutdown.asend(None))
    late = False
    for warning in caught:
        if issubclass(warning.category, ResourceWarning) and "shutdown_asyncgens" in str(warning.message):
            late = True
        else:
            warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno,
                                   source=warning.source)
    return late


def _step(awaitable: Any) -> None:
    """Run an asynchronous generator's ``asend()``/``aclose()`` awaitable
    to its end, synchronously: the generator above never waits."""
    try:
        awaitable.send(None)
    except StopIteration:
        pass
    else:  # pragma: no cover (it never waits)
        raise InternalStateError("the loop-shutdown generator waited")


def _reads_closed(con: RawConnection) -> bool:
    """``con.is_closed()`` where the pool closes a connection; a connection
    class's ``is_closed()`` that raises reads closed (the connection is
    then aborted, not closed gracefully): raised there, it failed the Close
    and left the slot counted towards ``max_size`` for good (review h283)."""
    try:
        return bool(con.is_closed())
    except Exception:
        return True
