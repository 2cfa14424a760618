"""The lease hot path: acquire and release, for the asyncpg face.

:class:`Leaser` runs what ``Pool.acquire()`` and ``Pool.release()`` do on
every lease: it asks the state core (``_state.py``) for a connection or a
place in the wait queue, builds the proxy, arms the lease's timers, runs
``setup=``; on release it detaches the proxy, asks the core for the release
outcome and carries it out with the runner (a reset driven in the releasing
task, see ``_detach``, or a pool task's reset or close).

The face makes one per pool and hands it the core, the runner, the reporter,
the clock and the checked settings; ``PoolAcquireContext`` calls
:meth:`Leaser.acquire` and :meth:`Leaser.release` directly, so moving the hot
path here costs a lease no Python call (docs/design.md, "The hot path").
The only setting that changes at run time, ``capture_stack``, lives here
alone (``Pool.capture_stack`` reads it and writes it through
:meth:`Leaser.set_capture_stack`); sizes and generations
are the core's, connect arguments the face's.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Protocol

from asyncpg.exceptions import ConnectionDoesNotExistError

from . import _internals as _pg
from . import _sites, _stack, _workers
from ._clock import Clock
from ._detach import NOT_STARTED, _Driver, already_ended, closing_now, loop_pass, released, retrieve
from ._durations import release_timeout, validate_timeout
from ._holder import Face
from ._internals import CLEAN, DIRTY, MUST_RESET, UNUSABLE, USED_UP, RawConnection
from ._options import DEFAULT as _DEFAULT  # left out: "the pool's setting" (None: no limit)
from ._options import PoolConfig
from ._reporting import Reporter
from ._state import (
    OPEN_LEASE,
    Closed,
    Inadmissible,
    Lease,
    Outcome,
    Overloaded,
    Phases,
    PoolState,
    SlotLost,
    Unavailable,
    Waiter,
)
from .errors import (
    EventLoopMismatchError,
    PoolClosedError,
    PoolInterfaceError,
    PoolOverloadedError,
    PoolTimeoutError,
    ServerUnavailableError,
)
from .proxy import PoolConnectionProxy

if TYPE_CHECKING:
    from ._runner import Runner

# (A module global: one load and a C call per acquire.)
_running_loop = asyncio.get_running_loop

# Every this many releases that return with nothing to wait for (a lease that
# ran no statement), one takes a loop pass instead (Leaser.pass_loop).
LOOP_PASS_EVERY = 32


class Receiver(Protocol):
    """Where ``async with pool.acquire()`` keeps its connection (the face's
    ``PoolAcquireContext``), set once the lease is handed over."""

    connection: PoolConnectionProxy | None


class Leaser:
    """One pool's acquire and release (the face's ``PoolAcquireContext`` and
    ``Pool.release`` call it)."""

    __slots__ = (
        "face", "state", "runner", "loop", "create_future", "now", "reporter", "listeners", "pending_events", "name", "slot_holders", "drain",
        "spawn", "lease_timeout", "leak_warning_after", "acquire_timeout", "reset_timeout", "max_queries",
        "custom_reset", "site_caps", "capture_stack", "setup", "proxy_class", "call_at", "until_pass",
        "in_setup", "extras", "reset_done",
    )

    def __init__(
        self,
        face: Face,
        config: PoolConfig,
        state: PoolState,
        runner: Runner,
        clock: Clock,
        loop: asyncio.AbstractEventLoop,
        reporter: Reporter,
        proxy_class: type[PoolConnectionProxy],
        setup: Callable[[PoolConnectionProxy], Awaitable[None]] | None,
    ) -> None:
        # The pool a proxy's holder must name for release() to accept it.
        self.face = face
        self.state = state
        self.runner = runner
        self.loop = loop
        self.create_future = loop.create_future  # (bound once: the contended acquire's wait)
        self.now = clock.now
        self.call_at = clock.call_at
        self.reporter = reporter
        # The same list as the reporter's: release() checks it on the hot path.
        self.listeners = reporter.listeners
        # The reporter's events not yet delivered (the same deque): acquire()
        # checks it on the contended hot path.
        self.pending_events = reporter.pending
        self.name = config.name
        # The runner's, bound here for the hot path (no attribute chain per lease).
        self.slot_holders = runner.slot_holders
        self.drain = runner.drain
        self.spawn = runner.spawn
        self.reset_done = runner.reset_done  # (the driver's then=: no bound method made per release)
        # The checked settings the hot path reads, fixed for the pool's life,
        # as attributes of their own (no attribute chain per lease).
        self.lease_timeout = config.lease_timeout
        self.leak_warning_after = config.leak_warning_after
        self.acquire_timeout = config.acquire_timeout
        self.reset_timeout = config.reset_timeout
        self.max_queries = config.max_queries
        self.custom_reset = config.custom_reset
        self.site_caps = config.site_caps
        self.setup = setup
        # Settable at any time through Pool.capture_stack (set_capture_stack):
        # kept here only.
        self.set_capture_stack(config.capture_stack)
        # Leases whose setup= hook is running: get_idle_size() counts their
        # connections, as asyncpg's pool does (see Pool.get_idle_size).
        self.in_setup = 0
        self.proxy_class = proxy_class
        # Releases with nothing to wait for left until the one that takes a
        # loop pass: counted down from LOOP_PASS_EVERY, the others returning
        # released(), a coroutine that returns at once (see pass_loop).
        # (Down, not up: its truth is the test, no comparison per release.)
        self.until_pass = LOOP_PASS_EVERY

    def set_capture_stack(self, on: bool) -> None:
        """``capture_stack``, and ``extras``: whether an acquire does more
        than hand the connection over, whatever its arguments (leak
        warnings, the acquire stack, ``setup=``): one check per acquire on
        the hot path when none is on."""
        self.capture_stack = on
        self.extras = self.leak_warning_after is not None or bool(on) or self.setup is not None

    # ------------------------------------------------------------- acquire

    async def acquire(
        self,
        timeout: Any = _DEFAULT,
        lease_timeout: Any = _DEFAULT,
        context: Receiver | None = None,
        site: str | None = None,
        stack: _stack.Caller | None = None,
        flagged: int = 0,
    ) -> PoolConnectionProxy:
        if timeout is _DEFAULT:
            # The pool's acquire_timeout bounds the wait (and the setup=
            # hook) only. A timeout= given here also bounds this lease's
            # release, as asyncpg's acquire(timeout=) does; the pool-wide
            # option, safepool's own, does not: a short one (a fail-fast
            # acquire) would fail and close every reset slower than it,
            # after the lease's writes committed (helper-174).
            timeout = self.acquire_timeout
            release_budget = None
        else:
            release_budget = timeout
            if timeout is not None:
                timeout = validate_timeout("timeout", timeout)
                if type(release_budget) is not int:
                    # (An int goes on as given: an overridden reset() gets
                    # acquire(timeout=7) as 7, as from asyncpg's pool.)
                    release_budget = timeout
        if lease_timeout is _DEFAULT:
            lease_timeout = self.lease_timeout
        elif lease_timeout is not None:
            lease_timeout = validate_timeout("lease_timeout", lease_timeout, positive=True)
        state = self.state
        if state.phase is not Phases.OPEN:
            if state.phase is Phases.CLOSING:
                raise PoolClosedError("pool is closing")
            self.check_init()
        if _running_loop() is not self.loop:
            raise EventLoopMismatchError(
                f"pool {self.name!r} was created on another event loop than the one running this acquire: "
                "a pool works only on its own loop (in tests, a pool fixture must not outlive the tests' loop)"
            )
        if self.site_caps and site is None:
            site = _sites.current_site() or _sites.caller_site(2)
        now = self.now()
        deadline = None if timeout is None else now + timeout
        while True:
            try:
                lease = state.try_acquire(now, site)
            except Closed:
                raise PoolClosedError("pool is closing") from None
            if state.actions:
                self.drain()
            if lease is not None:
                break
            # Wait in the queue (inlined: no coroutine frame of its own on
            # the contended hot path).
            future = self.create_future()
            try:
                waiter = state.enqueue(future, now, None if deadline is None else max(0.0, deadline - now), site)
            except Overloaded as exc:
                if state.actions:
                    self.drain()  # (waiters the adaptive queue shed before refusing this one)
                if isinstance(exc, Inadmissible):
                    raise PoolOverloadedError(self.reporter.shed_message("refused at once: " + str(exc))) from None
                raise PoolOverloadedError(
                    self.reporter.busy_message(str(exc) or "wait queue is full", now)) from None
            except Unavailable as exc:
                if state.actions:
                    self.drain()
                raise self.reporter.unavailable_error(exc.last_error, now) from exc.last_error
            except Closed:
                raise PoolClosedError("pool is closing") from None
            # (deadline: the waiter's is set with it, and only then.)
            if (state.actions or deadline is not None or state.connect_failures or self.pending_events
                    or state.connects_to_watch):
                # Also arms the timer: for the waiter's deadline, for the next
                # connect attempt after a failure, or for a connect under way
                # the waiter depends on (presumed lost at its hedge delay, and
                # no action says so). None other depends on a waiter.
                self.drain()
            try:
                await future
            except BaseException as exc:
                # (future.exception() also marks the pool's error retrieved
                # where it is not what the task got: never received, not
                # counted, and spares the loop's log.)
                if future.done() and not future.cancelled() and future.exception() is exc:
                    self.delivered(waiter, exc)  # (not the hot path: the pool's error reached the caller)
                    raise
                # Cancelled while waiting, or after the grant (or the pool's
                # error) but before resuming, or an error thrown into the
                # awaiting coroutine (GeneratorExit from its close(), a
                # throw()): the core gets the connection back (anyio's
                # pattern; asyncio.Queue.get's bare except, which asyncpg's
                # pool waits in, takes its getter off too).
                state.cancel_waiter(waiter, self.now())
                self.drain()
                raise
            try:
                lease = state.claim(waiter, self.now())
                break
            except SlotLost:
                # The granted connection died before this task resumed: try
                # again with what is left of the timeout. The lost claim gave
                # its site's place back (a queue policy): tasks at the site's
                # cap may now wait on a connect under way or on the next
                # probe, deadlines no action announces; drained here, not by
                # the retry's enqueue, which a refusal skips (review s62).
                self.drain()
            now = self.now()
        slot = lease.slot
        holder = self.slot_holders[slot]
        holder.release_timeout = release_budget
        if holder.orphan_checks:
            holder.orphan_checks = 0
            holder.orphan_reported = False
        if holder.init_context is not None:
            # A connection class with an is_closed() of its own (its
            # init_context is () for good: see Holder): asked before the
            # handover, as asyncpg's holder.acquire() asks it; one that says
            # closed is given up and another connection is acquired.
            if holder.own_is_closed and self.closed_at_handover(lease):
                return await self.acquire_again(
                    deadline, release_budget, lease_timeout, context, site, stack, flagged + 1
                )
            # The connection's first lease: what its connect set in the pool
            # task's context (init=, connect=) is set in this task's, as
            # asyncpg's pool runs them in the acquiring task (review h261).
            for var, value in holder.init_context:
                var.set(value)
            holder.init_context = () if holder.own_is_closed else None
        proxy = self.proxy_class(holder, slot.connection, lease)
        if lease_timeout is not None or self.extras:
            if self.capture_stack:
                # The caller of pool.acquire() and its task, taken at that call
                # (an acquire awaited in a task of its own runs here in that one).
                if stack is None:
                    captured, task = _stack.capture(), asyncio.current_task()
                else:
                    captured, task = stack
                    if task is None:
                        task = asyncio.current_task()
                state.note_caller(
                    lease, captured, None if task is None else task.get_name(),
                    None if task is None else weakref.ref(task),
                )
            if self.setup is not None:
                # Its statements are the lease's: a SET it runs is reset on
                # release like any other (the clean mark is per connection).
                if deadline is None:
                    await self.run_setup(proxy, lease)
                else:
                    await self.run_setup_until(proxy, lease, deadline, timeout)
                if holder.lease_callbacks:
                    # The termination listeners and query loggers it registered
                    # are the pool's setup, not the lease's code: as init='s, they
                    # do not keep a lost proxy's connection from being reclaimed.
                    _pg.disown_callbacks(holder.lease_callbacks, lease.id)
                # The lease starts when its caller gets the connection: its
                # lease_timeout and leak_warning_after count from here, not
                # from before the pool's own hook, which could otherwise run
                # out inside acquire() (review h263).
                lease.acquired_at = self.now()
                if lease.state in OPEN_LEASE:  # (not ended meanwhile: pool.terminate(), release_lease())
                    self.start_clocks(lease, lease_timeout)
            elif lease_timeout is not None or self.leak_warning_after is not None:
                # self.start_clocks(lease, lease_timeout), inlined (the hot path).
                due = state.arm_lease(lease, lease_timeout, self.leak_warning_after)
                timer_at = self.runner.timer_at
                if timer_at is None or (due is not None and due < timer_at):
                    self.runner.arm_timer()  # (else the armed timer comes first and re-arms: no heap scan per lease)
        if context is not None:
            context.connection = proxy
        return proxy

    def closed_at_handover(self, lease: Lease) -> bool:
        """Whether the connection of ``lease``, just taken (idle, or handed
        on by a release), says it is closed: its class's own ``is_closed()``
        (a health flag a listener, a watchdog or another connection's
        callback set while it was idle). asyncpg's ``holder.acquire()``
        (0.29-0.32) asks it before every handover and opens a new connection
        in its place (review h277). Here the lease is ended and its slot
        discarded: the connection is terminated and its place stays counted
        towards ``max_size`` until the backend has exited (asyncpg's pool
        leaves the flagged one open beside its replacement), and the caller
        acquires again. An ``is_closed()`` that raises: the connection goes
        back to the pool as it was and the acquire raises the error, as
        asyncpg's (its holder back in the queue)."""
        state = self.state
        try:
            closed = lease.slot.connection.is_closed()
        except BaseException:
            state.release(lease, self.now(), Outcome.CLEAN)
            self.drain()
            raise
        if closed:
            state.discard(lease.slot, self.now())
            self.drain()
        return bool(closed)

    async def acquire_again(
        self, deadline: float | None, release_budget: Any, lease_timeout: float | None,
        context: Receiver | None, site: str | None, stack: _stack.Caller | None, flagged: int,
    ) -> PoolConnectionProxy:
        """The acquire after :meth:`closed_at_handover` gave a connection up
        (``flagged``: how many so far): with what is left of the first one's
        deadline; the lease's release keeps the first one's budget (its
        ``timeout=``, else None). More than ``max_size`` given up in one
        acquire: a class whose ``is_closed()`` calls its new connections
        closed too, which asyncpg's acquire refuses as it connects
        (``ConnectionDoesNotExistError``): raised, not retried for ever."""
        if flagged > self.state.max_size:
            raise ConnectionDoesNotExistError("connection was closed during pool initialization")
        timeout = None if deadline is None else max(0.0, deadline - self.now())
        proxy = await self.acquire(timeout, lease_timeout, context, site, stack, flagged)
        proxy._holder.release_timeout = release_budget
        return proxy

    def start_clocks(self, lease: Lease, lease_timeout: float | None) -> None:
        """Arm ``lease``'s ``lease_timeout`` and ``leak_warning_after`` timers
        (seconds from ``lease.acquired_at``), if either is set."""
        if lease_timeout is not None or self.leak_warning_after is not None:
            due = self.state.arm_lease(lease, lease_timeout, self.leak_warning_after)
            timer_at = self.runner.timer_at
            if timer_at is None or (due is not None and due < timer_at):
                self.runner.arm_timer()

    def delivered(self, waiter: Waiter, error: BaseException) -> None:
        """The pool's error (a timeout, the adaptive queue's shedding, the
        breaker's refusal) reached the waiting task: counted now, as what the
        caller got (:meth:`PoolState.delivered`). A task a cancellation
        reached first, even in the same loop turn, gets ``CancelledError``
        and is never counted."""
        self.state.delivered(
            waiter,
            breaker_open=isinstance(error, ServerUnavailableError),
            shed=isinstance(error, PoolOverloadedError),
        )

    async def run_setup_until(self, proxy: PoolConnectionProxy, lease: Lease, deadline: float, timeout: float) -> None:
        """``setup=`` under what is left of the acquire's ``timeout``: asyncpg's
        ``acquire(timeout=)`` wraps the hook in its ``wait_for()`` too, so a
        hook still running at the deadline is cancelled, the connection
        closed (as after any failed ``setup=``) and the caller gets
        ``PoolTimeoutError`` (an ``asyncio.TimeoutError``). A cancellation
        from outside stays a ``CancelledError``.

        :raises safepool.PoolTimeoutError: the deadline (pool clock seconds)
            passed before the hook returned.
        :raises BaseException: the hook's own error, as :meth:`run_setup`."""
        task = asyncio.current_task()
        assert task is not None  # (acquire runs in a task)
        fired = False

        def expire() -> None:
            nonlocal fired
            fired = True
            task.cancel()

        # The pool's clock, as the wait's deadline (a manual clock in tests).
        timer = self.call_at(deadline, expire)
        failed: list[BaseException] = []
        try:
            await self.run_setup(proxy, lease, failed)
        except asyncio.CancelledError:
            # Ours only if no other cancel is pending (asyncio.timeout's rule).
            if fired and task.uncancel() == 0:
                if failed and not isinstance(failed[0], asyncio.CancelledError):
                    # The hook raised in time; the deadline came while its
                    # connection was being closed. asyncpg's acquire raises
                    # the hook's error there (its close, cut short by the
                    # wait_for(), re-raises it from a finally:).
                    raise failed[0] from None
                self.state.setup_timed_out()
                raise PoolTimeoutError(
                    f"pool {self.name!r}: timed out in the setup= hook: the acquire's timeout "
                    f"({timeout:g}s) ran out before it returned; its connection was closed"
                ) from None
            raise
        except BaseException:
            if fired:
                task.uncancel()  # (the hook turned the cancel into an error of its own)
            raise
        else:
            if fired:
                task.uncancel()  # (the hook swallowed the cancel: its lease stands)
        finally:
            timer.cancel()

    async def run_setup(
        self, proxy: PoolConnectionProxy, lease: Lease, failed: list[BaseException] | None = None
    ) -> None:
        """``failed``: gets the hook's error before the close is waited for."""
        self.in_setup += 1
        try:
            try:
                await self.setup(proxy)  # type: ignore[misc]
            finally:
                self.in_setup -= 1
        except BaseException as error:
            if isinstance(error, Exception):
                self.reporter.scrub(error)  # (its message may quote the DSN, as an init= hook's)
            if failed is not None:
                failed.append(error)
            # The connection's state is unknown: close it, as asyncpg does,
            # and wait for the close (asyncpg awaits it too), so the proxy
            # answers is_closed() with True. The close runs in a pool task: a
            # second cancel cannot cut it short, and the slot counts until
            # the backend is gone (a cancelled setup query is waited for).
            if lease.active:
                slot = lease.slot
                done = self.loop.create_future()
                self.runner.closes_done[slot] = done
                self.state.release(lease, self.now(), Outcome.DISCARD)
                self.drain()
                if closing_now():
                    # A coroutine being closed in the hook (coro.close(), its
                    # pending task collected): nothing can wait there; the
                    # close goes on in its pool task (review h263).
                    done.add_done_callback(retrieve)
                else:
                    await asyncio.wait([done])
            raise

    # ------------------------------------------------------------- release

    def release(self, connection: Any, timeout: float | None = None) -> Awaitable[None]:
        """``Pool.release()`` (its docstring says what it does): ends the lease
        now and returns what the caller awaits until the release is done. Not
        a coroutine: ``PoolAcquireContext.__aexit__`` returns its awaitable
        itself (the reset's driver, which raises the reset's error; a
        resolved future when there is nothing to wait for), so a release
        costs no coroutine frame of its own (docs/design.md, "The hot path").

        The core decides what becomes of the connection (``release_outcome``);
        the runner and the workers carry it out: a reset driven in the
        caller's task (see ``_detach``), a pool task's reset or close (a
        future it resolves), or nothing to wait for (handed on, or dropped,
        at once). One function with the detach, not two: a call less per
        lease."""
        if not isinstance(connection, PoolConnectionProxy) or (holder := connection._holder)._pool is not self.face:
            raise PoolInterfaceError(
                f"Pool.release() received invalid connection: {connection!r} is not a member of this pool"
            )
        con: RawConnection = connection._raw
        if con is None:
            # Released twice, or the pool ended the lease (terminate, lease
            # timeout) first: a no-op, as asyncpg's, that the leak guards note.
            if self.listeners:
                self.reporter.emit_event("late_release", lease_id=connection._lease.id)
                self.reporter.deliver()
            return released()
        state = self.state
        if state.phase is not Phases.OPEN:
            self.check_init()  # (which lets a closing pool's release through)
        if timeout is None:
            timeout = holder.release_timeout
        else:
            if type(timeout) is not float:
                timeout = release_timeout(timeout)  # before the detach: a TypeError leaves the lease as it was
            # The release's budget replaces the acquire's, also for a reset
            # retried a loop step later (Runner.reset_after_a_loop_pass).
            holder.release_timeout = timeout
        # A query logger's records come by call_soon; asyncpg's release takes
        # a loop pass (its shielded task), so they have been delivered when it
        # returns. safepool's takes none of its own: with a logger left on
        # the connection, take that one pass too (no cost without one).
        # (Its truth now, as a bool, not bool()'s call: a close the
        # hand-on's drain makes clears the set before finish_release reads it.)
        logged = True if con._query_loggers else False
        # connection._detach(), inlined (the hot path): later calls raise.
        # The connection keeps its weak reference to the proxy until the
        # reset is over, as asyncpg's release detaches its proxy after the
        # reset (PoolConnectionHolder._release()): a termination listener
        # called because the connection died during the reset gets the
        # lease's proxy. Cleared where no reset follows (below), and by
        # Runner.reset_done.
        connection._raw = None
        lease = connection._lease
        if lease.state not in OPEN_LEASE:
            # Taken back by the lease timeout while being released (the
            # take-back ran asyncpg's _on_release already).
            return self.finish_release(None, True) if logged else released()
        busy = holder.watched or holder.copies
        if busy:
            # A statement (or a COPY, or a prepare()) of the lease still runs
            # (proxy.watch, proxy._copying's count): it may leave a
            # transaction, or answer late; auto and rollback modes would
            # skip the reset. (Its reset goes to a pool task: see below.)
            holder.clean_mark = -1
        try:
            # What the connection needs (the core's Observed, as _pg's ints), in one look
            # at it (the hot path: no call): asyncpg's Connection._on_release()
            # first (invalidate the lease's prepared statements and cursors,
            # a counter they check, and warn of listeners left registered;
            # without listeners only the counter), then the protocol's state.
            # With own_release_checks False (no is_closed() nor _on_release()
            # in place of asyncpg's: see _pg.overrides), asyncpg's is_closed()
            # is read inline too; else the connection's own are called
            # (_pg.released_unusable).
            # (listening: read once, again below: nothing between adds a listener.)
            if listening := (con._listeners or con._log_listeners):
                con._on_release()
            else:
                con._pool_release_ctr += 1
            protocol = con._protocol
            if (
                _pg.released_unusable(con, holder, listening) if holder.own_release_checks
                else protocol is None or con._aborted or not protocol.is_connected()
            ):
                check = UNUSABLE
            elif (queries := protocol.queries_count) >= self.max_queries:
                check = USED_UP
            elif protocol._is_cancelling() or protocol.is_in_transaction() or con._top_xact is not None:
                check = MUST_RESET
            else:
                check = CLEAN if queries == holder.clean_mark else DIRTY
        except Warning as warning:
            # asyncpg's warning of listeners left registered, turned into an
            # error (filterwarnings = error): raised after the detach, it left
            # the lease open for good (asyncpg's pool loses the connection
            # too). Release as usual without the listeners, then raise it.
            _pg.clear_listeners(con)
            connection._raw = con
            # (_on_release() is not called again: a connection class's own,
            # which raised it, would raise it again, for ever.)
            own_on_release, holder.own_on_release = holder.own_on_release, False
            try:
                again = self.release(connection, timeout)
            finally:
                holder.own_on_release = own_on_release
            return self.raise_after(again, warning)
        # state.release_outcome(lease, check, marked), inlined (the hot path:
        # a call less per lease): the core's policy table, or DISCARD for a
        # connection of an expired generation.
        if lease.slot.generation == state.generation:
            outcome = state.outcomes[holder.clean_mark == -1][check]
        else:
            outcome = Outcome.DISCARD
        done: asyncio.Future[None] | None  # (set on each path that returns below)
        if outcome is Outcome.NEEDS_RESET:
            # asyncpg reports an unmanaged open transaction from release(),
            # through the loop's exception handler: scheduled here, from the
            # releasing task, to come where asyncpg's shielded task reports it
            # (after callbacks already queued). (A custom reset reports it
            # itself, in a pool task, as asyncpg's.)
            # (The check above saw a cancelled query as MUST_RESET.)
            # A custom reset runs in a pool task (holder.task_reset). So does
            # the reset of a connection class with an execute() of its own
            # (task_reset too), which gets it as asyncpg 0.30+ sends it:
            # execute(query), with no timeout=, under the release's budget
            # (a pool task's asyncio.timeout). So does one with a query
            # logger (asyncpg 0.30+): the logger's record of the reset is
            # then asyncpg's (timeout None; a budget that runs out is a
            # CancelledError there, the TimeoutError the caller's).
            # (Last: _pg.in_call, inlined: the hot path. A fetch-family call
            # of another task between two of its steps, its prepare answered
            # and its bind not sent, leaves the protocol idle: a reset sent
            # now would take the call's turn, and the call would fail with
            # asyncpg's "another operation is in progress". asyncpg's release resets in a
            # shielded task, whose first step comes after the call's: the
            # call goes on, the reset is refused, and the connection is
            # given up once the call ends. So does this one, in a pool task.
            # So too while a counted call of the lease runs (busy, above): a
            # COPY or a prepare() holds no statement section, and between
            # its steps (a prepare's answer and its type introspection, or
            # the COPY's statement; a file opening) the protocol is idle
            # too: review s70.)
            if (holder.task_reset or (logged and _pg.RESET_UNDER_BUDGET)
                    or (check == MUST_RESET and (holder.split_rollback or _pg.is_cancelling(con)))
                    or con._stmt_exclusive_section._acquired
                    or busy):
                runner = self.runner
                hooks = None
                if self.custom_reset:
                    rollback = False
                else:
                    # What the inline reset below sends (reset_plan): a
                    # connection class's own reset query in every mode, and
                    # in rollback mode the ROLLBACK of a marked lease (a
                    # Parse without Sync). The pool's hooks alone sent
                    # neither in rollback mode (hooks.full is the mode's).
                    # An open transaction is reported, and asyncpg's
                    # Transaction let go, in the pool task's first step, as
                    # asyncpg's reset does in its shielded task: a call of
                    # the lease whose next step is queued first still finds
                    # it (asyncpg < 0.32's cursor checks it before its bind).
                    full, rollback = state.reset_plan(
                        holder.clean_mark == -1, _pg.transaction_open(con)
                    )
                    if full:
                        hooks = runner.hooks.ended
                # (lease.slot: the holder's, read where needed: no lookup in slot_holders)
                done = runner.resets_done[lease.slot] = self.loop.create_future()
                state.release(lease, self.now(), outcome)
                # The released proxy stays the one the connection's callbacks
                # get while the pool task resets (a termination listener, if
                # the connection is lost meanwhile), as asyncpg's release
                # detaches its proxy after the reset (review h236).
                _pg.attach_released(con, connection, holder)
                self.spawn(runner.reset_slot(
                    holder, con, timeout, rollback, done, connection, hooks=hooks, report=True
                ))
            else:
                # The common case: one statement, ROLLBACK (if a transaction
                # is open) and the reset query in one message, driven in the
                # caller's task (no task, no loop hop; see _detach).
                query = holder.reset_text  # (None: also the modes other than "full": see Holder)
                if check == MUST_RESET:
                    rollback = _pg.warn_open_transaction(con, deferred=True)
                    if rollback:
                        query = None  # (planned below, with the ROLLBACK)
                else:
                    rollback = False
                    if listening:
                        _pg.clear_listeners(con)
                budget = timeout if timeout is not None else self.reset_timeout
                if query is None:
                    full, rollback = state.reset_plan(holder.clean_mark == -1, rollback)
                    query = _workers.reset_message(holder.reset_query, full, rollback)
                # (else asyncpg's reset query alone: the common case, without a
                # call; reset_plan's answer in full mode with no transaction open)
                if query:
                    # The statement, then Runner.reset_done with its error
                    # (the driver calls it: no wrapper coroutine's frame).
                    # asyncpg's execute(query) with no arguments awaits its
                    # protocol's query() (after a closed check the check above
                    # made, and with a query logger, which it would tell):
                    # without its coroutine frame where it is asyncpg's.
                    limit = budget
                    if budget is not None and _pg.RESET_UNDER_BUDGET:
                        command_timeout = holder.command_timeout
                        if command_timeout is not None and command_timeout < budget:
                            limit = command_timeout  # (asyncpg 0.30+: both limits hold)
                    if logged:
                        statement = con.execute(query, timeout=limit)
                    else:
                        statement = con._protocol.query(query, limit)
                    # Its first step sends the reset now, before the
                    # bookkeeping below: that runs while the server works,
                    # not between its round trips (docs/performance.md,
                    # "Send first, count after").
                    try:
                        first = statement.send(None)
                    except BaseException as exc:  # (refused at once: the driver raises it, as before)
                        statement = already_ended(exc)
                        first = NOT_STARTED
                else:
                    statement = None
                now = self.now()
                state.release(lease, now, outcome)
                if state.actions or state.connects_to_watch:
                    self.drain()
                if budget is None and holder.command_timeout is None:
                    # No limit asked for: asyncpg would wait forever. The
                    # runner's watchdog (one pool timer, not one per
                    # statement) aborts a reset still running after
                    # DEFAULT_RESET_TIMEOUT: a silent network cannot hold a slot.
                    # (Real time, the loop's: with another pool clock, the
                    # holder records the loop's reading instead, IOStampHolder.)
                    holder.reset_since = now
                    if self.runner.reset_watchdog is None:
                        self.runner.watch_resets()
                    # No timer on the statement either: asyncpg's done
                    # callback on its waiter has nothing to do unless the
                    # waiter is cancelled, which only a pool task's
                    # cancel can do (the driver puts it back then).
                    quiet = holder.waiter_completed
                else:
                    quiet = None
                if statement is not None:
                    # The reset driven in this task until it is cancelled (then a
                    # pool task finishes it): cancelling the await never cuts the
                    # reset short. The driver raises the reset's error.
                    # (The proxy too: a failed reset closes the connection
                    # with it attached, as asyncpg's release terminates it.)
                    driver = _Driver(
                        statement, self.spawn, self.reset_done, (holder, con, connection, None), True, quiet, first
                    )  # (None: the error's place, last, in then's arguments; see _Driver)
                    return self.finish_release(driver, True) if logged else driver  # type: ignore[return-value]
                # Nothing to send: the reset is done (reset_done hands the
                # connection on; with no error it returns no error to raise).
                self.runner.reset_done(holder, con, None, None)
                return self.finish_release(None, True) if logged else released()
        else:
            done = None
            con._proxy = None  # (no reset: the proxy is detached now; see the top)
            if outcome is Outcome.CLEAN:
                if listening:
                    _pg.clear_listeners(con)
            elif check != UNUSABLE:  # (DISCARD, of a usable connection)
                # max_queries or an expired generation: asyncpg closes the
                # connection gracefully before release() returns, with the
                # proxy still attached: its termination listeners get the
                # proxy (Runner.close_slot lets go of it after the close).
                done = self.loop.create_future()
                self.runner.closes_done[lease.slot] = done
                _pg.attach_released(con, connection, holder)
                # asyncpg's release calls close(timeout=) (None without a
                # budget): so does this close (a connection class's close()
                # may require or record the keyword; review h277).
                holder.close_timeout = True
                if timeout is not None and (_pg.CLOSE_UNDER_BUDGET or holder.own_close):
                    # asyncpg's release closes it with Connection.close(
                    # timeout=) under the release's budget (else the
                    # acquire's), and raises its TimeoutError: bounded alike.
                    # (On asyncpg 0.29-0.31 only a connection class's own
                    # close() gets it, as from asyncpg's release: see
                    # _internals.CLOSE_UNDER_BUDGET, and _internals.terminate
                    # for asyncpg's close(timeout=) that runs out there.)
                    holder.close_budget = timeout
                    holder.close_raises = True
                elif timeout is not None:
                    # (asyncpg 0.29-0.31: the close keeps the pool's bound;
                    # the wait for a call still in flight before it, which
                    # asyncpg's release does not make, takes the release's.)
                    holder.calls_budget = timeout
                elif holder.own_close:
                    # No budget: a connection class's own close() that raises
                    # (or refuses timeout=None) fails the release, as
                    # asyncpg's release raises it (review h283).
                    holder.close_raises = True
            state.release(lease, self.now(), outcome)
        if state.actions or state.connects_to_watch or (
            state.max_inactive_lifetime and len(state.slot_set) > state.min_size
        ):
            # (Runner.after_hand_on's three tests, alike: no call when none holds.)
            self.runner.after_hand_on()
        if logged or done is not None:
            return self.finish_release(done, logged)
        self.until_pass -= 1
        return released() if self.until_pass else self.pass_loop()

    def pass_loop(self) -> Awaitable[None]:
        """What every LOOP_PASS_EVERY-th release with nothing to wait for
        returns: a loop pass (:func:`_detach.loop_pass`). asyncpg's release always
        suspends the task (its shielded reset round trip, 0.29-0.32), so a
        loop of leases that run no statement and await nothing else let
        other tasks run there; here it would never let them (a program
        waiting in it for another task's event hung for ever). One pass in
        32 bounds that at a loop iteration's cost spread over 32 leases. Not
        in a coroutine being closed, where no wait can be made (see
        finish_release)."""
        self.until_pass = LOOP_PASS_EVERY
        if closing_now():
            return released()
        return loop_pass()

    async def raise_after(self, release: Awaitable[None], error: Exception) -> None:
        await release
        raise error

    async def finish_release(self, done: Awaitable[Any] | None, logged: bool) -> None:
        """A release's wait off the hot path: for a plain future that the
        pool's task resolves (with the error to raise, or None), and with a
        query logger's loop pass at the end."""
        if closing_now():
            # A coroutine being closed releases (see _Driver.__await__):
            # nothing can wait there, so neither for the pool task's reset
            # nor the logger's loop pass (Python raised "coroutine ignored
            # GeneratorExit"). A driver hands its reset to a pool task.
            if type(done) is _Driver:
                await done
            elif isinstance(done, asyncio.Future):
                # (Its error, if the reset fails, is the pool's to log: not
                # "Future exception was never retrieved" as well.)
                done.add_done_callback(retrieve)
            return
        error: Exception | None = None
        if done is not None:
            try:
                error = await done
            except Exception as exc:  # (a cancellation passes: no loop pass then)
                error = exc
            except BaseException:
                # Cancelled, or closed (GeneratorExit: the leak guard's
                # release, a collected task) while waiting: the pool's task
                # goes on, and its error is the pool's to log, not also
                # asyncio's "Future exception was never retrieved" (review h263).
                if isinstance(done, asyncio.Future):
                    done.add_done_callback(retrieve)
                raise
        if logged:
            await asyncio.sleep(0)
        if error is not None:
            raise error

    # ------------------------------------------------------------ phases

    def check_init(self) -> None:
        phase = self.state.phase
        if phase is Phases.OPEN or phase is Phases.CLOSING:
            return
        if phase is Phases.STARTING:
            raise PoolInterfaceError(
                "pool is being initialized, but not yet ready: "
                "likely there is a race between creating a pool and using it"
            )
        if phase is Phases.NEW:
            raise PoolInterfaceError("pool is not initialized")
        raise PoolClosedError("pool is closed")
