"""What the pool tells people: log lines, error messages and typed events.

One :class:`Reporter` per pool. Events queue here and are handed to the
listeners by :meth:`Reporter.deliver`, which the runner calls once the books
are settled (never from inside its action loop). Nothing here changes the
core's state: it only reads it.
"""

from __future__ import annotations

import asyncio
import logging
import math
import traceback
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from . import _secrets, _stack
from . import events as _events
from ._logging import guarded_logger
from ._state import Lease, PoolState, SlotState, Waiter
from .errors import ServerUnavailableError, refuse_awaitable
from .stats import LeaseInfo, describe_error

# Seconds between WARNING records of failed connects while they go on
# failing (the others are logged at DEBUG).
CONNECT_WARNING_INTERVAL = 1.0
# How many earlier connect arguments' secrets a pool masks (Reporter.retire_connect_args).
RETIRED_KEPT = 8

logger = guarded_logger("safepool")
leak_logger = guarded_logger("safepool.leaks")
_asyncpg_logger = guarded_logger("asyncpg.pool")

_LEASE_EVENTS: dict[str, type[_events.LeaseEvent]] = {
    cls.kind: cls
    for cls in (_events.LeakSuspected, _events.LeaseExpired, _events.Leaked, _events.LeaseEnded)
}
_POOL_EVENTS: dict[str, Callable[..., _events.PoolEvent]] = {
    cls.kind: cls
    for cls in (_events.ConnectFailed, _events.ServerStatusChanged, _events.LateRelease, _events.PoolClosed)
}


class DictListener:
    """A ``Pool.add_listener`` callback, fed the dict form of typed events."""

    __slots__ = ("callback",)

    def __init__(self, callback: Callable[[dict[str, Any]], None]) -> None:
        self.callback = callback

    def __call__(self, event: _events.PoolEvent) -> object:
        payload = event.to_dict()
        return None if payload is None else self.callback(payload)


class Reporter:
    """A pool's messages and event queue; reads the core, never writes it."""

    __slots__ = (
        "name", "state", "loop", "listeners", "pending", "delivering", "site_caps", "server_status",
        "connect_warned_at", "connect_args", "retired_secrets",
    )

    def __init__(self, name: str, state: PoolState, loop: asyncio.AbstractEventLoop, site_caps: bool) -> None:
        self.name = name
        self.state = state
        self.loop = loop
        self.site_caps = site_caps
        # Typed event callbacks (dict listeners are wrapped): events queue in
        # ``pending`` and are delivered once the books are settled.
        self.listeners: list[Callable[[_events.PoolEvent], object]] = []
        self.pending: deque[_events.PoolEvent] = deque()
        self.delivering = False
        # The server status last reported (the core's breaker view).
        self.server_status = "up"
        # When a failed connect was last logged at WARNING (see connect_failed).
        self.connect_warned_at = -math.inf
        # The pool's connect arguments as they are now, ``(args, kwargs)``
        # (set by the pool: set_connect_args() changes them): their password
        # is masked in the stacks a report shows.
        self.connect_args: Callable[[], tuple[Sequence[Any], Mapping[str, Any]]] = lambda: ((), {})
        # Those of earlier connect arguments (retire_connect_args).
        self.retired_secrets: list[tuple[object, object, list[object]]] = []

    def format_stack(self, captured: _stack.Captured | None) -> str:
        """:func:`_stack.format_stack` without the pool's password, should
        the application's source lines show it (a DSN written on the
        acquire's line): its DSN's, and its ``password=`` argument's unless
        another argument shows the same value (see ``_secrets.redact_known``)."""
        return _secrets.redact_known(_stack.format_stack(captured), *self.connect_secrets())

    def scrub(self, error: BaseException) -> None:
        """Mask the pool's password in ``error``'s message in place (a hook's
        error quoting the DSN; :func:`_secrets.scrub_connect_error`, without
        the quoted pieces only a connect's own errors hold)."""
        _secrets.scrub_connect_error(error, *self.connect_secrets(), quoted=False)

    def describe(self, error: BaseException | None) -> str:
        """:func:`stats.describe_error` of ``error`` without the pool's
        password (its DSN's and its ``password=`` argument's, and those of
        the connect arguments :meth:`retire_connect_args` kept), for what the
        pool logs, reports and counts: the error may be the application's
        own (a ``connect=`` callback's, an ``init=`` or ``reset=`` hook's, a
        ``connection_class``'s), its message built from a DSN held in a
        tuple or another object, which :meth:`scrub` cannot rewrite in
        place (review h228)."""
        text = _secrets.redact_known(describe_error(error), *self.connect_secrets())
        for secrets in self.retired_secrets:
            text = _secrets.redact_known(text, *secrets)
        return text

    def retire_connect_args(self) -> None:
        """The connect arguments are about to change (``set_connect_args()``):
        keep their secrets, for :meth:`describe` to mask in the errors of
        connects made with them, which ``stats()``, ``health()`` and the
        breaker's refusal describe when read (review h231). The last
        ``RETIRED_KEPT`` sets only (a rotation a day for years must not grow
        without bound)."""
        secrets = self.connect_secrets()
        if secrets not in self.retired_secrets:
            self.retired_secrets.append(secrets)
            del self.retired_secrets[:-RETIRED_KEPT]

    def redact(self, text: str) -> str:
        """``text`` (a formatted traceback, a hook's error) as the pool may
        log or report it: without its password (its DSN's and its
        ``password=`` argument's) nor a password literal in a source line
        (:func:`_secrets.redact_traceback`)."""
        return _secrets.redact_traceback(text, *self.connect_secrets())

    def connect_secrets(self) -> tuple[object, object, list[object]]:
        """The pool's connect arguments as they are now, as the redactions
        take them (:func:`_secrets.connect_secrets`)."""
        args, kwargs = self.connect_args()
        return _secrets.connect_secrets(args, kwargs)

    # ----------------------------------------------------------- messages

    def describe_oldest(self, now: float, limit: int) -> str:
        leases = sorted(self.state.leases(), key=lambda lease: lease.acquired_at)[:limit]
        if not leases:
            return "no connection is leased"
        parts = []
        for lease in leases:
            if lease.stack:
                where = _stack.acquire_site(lease.stack)
                if lease.site is not None:
                    where = f"{where} (site {lease.site!r})"
            elif lease.site is not None:
                where = f"site {lease.site!r}"  # (its name, where capture_stack is off: no "unknown site" beside it)
            else:
                where = "unknown site (capture_stack is off)"
            task = f", task {lease.task_name}" if lease.task_name else ""
            parts.append(f"{now - lease.acquired_at:.3f}s at {where}{task}")
        return "oldest leases: " + "; ".join(parts)

    def busy_message(self, what: str, now: float, waiter: Waiter | None = None) -> str:
        state = self.state
        if waiter is not None and self.listeners:
            # An acquire timed out (the only caller with a waiter): who holds what, now.
            self.pending.append(_events.AcquireTimedOut(
                self.name, now - waiter.enqueued_at, state.max_size, state.in_use, state.idle,
                state.count(SlotState.CONNECTING), state.waiting, state.max_waiters,
                tuple(sorted((self.lease_info(lease, now) for lease in state.leases()), key=lambda i: -i.age)),
            ))
        waited = f" after {now - waiter.enqueued_at:.3f}s" if waiter is not None else ""
        sites = ""
        if self.site_caps:
            # (A timed-out task's own site first: the cap it waited at.)
            rows = state.site_usage(3, None if waiter is None else waiter.site)
            usage = ", ".join(f"{name}: {held} in use, {waiting} waiting" for name, held, waiting in rows)
            sites = f", site cap={state.site_cap} ({usage})"
        # Connections still closing hold their places (an init= failure's,
        # a slow close): named when there are any, else a full pool that
        # times out reads as an empty one.
        closing = state.count(SlotState.CLOSING)
        closing_text = f", closing={closing}" if closing else ""
        return (
            f"pool {self.name!r}: {what}{waited}: max_size={state.max_size}, in use={state.in_use}, "
            f"idle={state.idle}, connecting={state.count(SlotState.CONNECTING)}{closing_text}, waiting={state.waiting}, "
            f"max_waiters={state.max_waiters}{sites}; {self.describe_oldest(now, 3)}"
        )

    def warn_slow_close(self, now: float) -> None:
        """close() has waited a minute: say for which leases."""
        logger.warning(
            "pool %r: close() is taking over 60 seconds: %d connection(s) not released. %s",
            self.name, len(list(self.state.leases())), self.describe_oldest(now, 3),
            extra={"event": "slow_close", "pool": self.name},
        )

    def warn_close_cut_short(self, now: float, reason: BaseException) -> None:
        """close() was cancelled (a shutdown deadline, ``wait_for()``) or
        failed while leases were still held: the pool terminates now, and
        their holders get ``ConnectionDoesNotExistError``. Says whose they
        were, as the slow-close warning does."""
        held = len(list(self.state.leases()))
        if not held:
            return
        why = "cancelled" if isinstance(reason, asyncio.CancelledError) else self.describe(reason)
        logger.warning(
            "pool %r: close() was cut short (%s) with %d connection(s) not released: terminating them. %s",
            self.name, why, held, self.describe_oldest(now, 3),
            extra={"event": "close_cut_short", "pool": self.name, "leases": held},
        )

    def shed_message(self, why: str, waiting: int | None = None) -> str:
        # Cheaper than busy_message (no lease listing): under a surge the
        # adaptive queue sheds thousands of waiters a second. ``waiting``: the
        # count when the core shed the task; read after a shedding pass, the
        # state said "waiting=0" for every task that pass shed.
        state = self.state
        return (
            f"pool {self.name!r}: {why}: max_size={state.max_size}, in use={state.in_use}, "
            f"waiting={state.waiting if waiting is None else waiting}"
        )

    def unavailable_error(self, last_error: BaseException | None, now: float) -> ServerUnavailableError:
        """The ``fail_fast`` refusal (circuit open), its ``__cause__`` the
        last connect error: for an acquire arriving in the backoff, and for
        the waiters of a probe connect that failed."""
        retry_in = max(0.0, self.state.backoff_until - now)
        error = ServerUnavailableError(
            f"pool {self.name!r} has no connection and the server refuses new ones "
            f"(last error: {self.describe(last_error)}); next attempt in {retry_in:.2f}s"
        )
        error.__cause__ = last_error
        return error

    def event_fields(self, event: str, lease: Lease, held: float) -> dict[str, Any]:
        """The ``extra=`` of a lease's log record."""
        return {
            "event": event,
            "pool": self.name,
            "lease_id": lease.id,
            "held_seconds": held,
            "acquired_at": _stack.acquire_site(lease.stack) if lease.stack else None,
            "task_name": lease.task_name,
            "site": lease.site,
        }

    def lease_info(self, lease: Lease, now: float, stacks: bool = True) -> LeaseInfo:
        return LeaseInfo(
            id=lease.id,
            age=now - lease.acquired_at,
            deadline_in=None if lease.deadline is None else lease.deadline - now,
            task_name=lease.task_name,
            acquired_at=_stack.acquire_site(lease.stack) if lease.stack else None,
            stack=self.format_stack(lease.stack) if lease.stack and stacks else None,
            site=lease.site,
            task_ref=lease.task_ref,
        )

    # ------------------------------------------------------------- events

    def connect_failed(self, error: BaseException, now: float, *, raised: bool, waited: bool) -> None:
        """Log and emit a failed connect (and any server status change).
        ``raised``: the error is raised to the caller (create_pool's first
        connect), who has it; logged at DEBUG then, as asyncpg logs nothing
        (a service retrying create_pool at start-up gets no stderr lines).
        ``waited``: tasks were waiting when it failed (they get the error, as
        from asyncpg's acquire): not the min_size upkeep's connect (nobody
        can start waiting while it fails, so none wait afterwards either)."""
        described = self.describe(error)
        # One WARNING per CONNECT_WARNING_INTERVAL while connects go on
        # failing, the first at once; the others at DEBUG. Unpaced, as on
        # asyncpg's pool, a server that is down fails a connect per acquire,
        # hundreds a second under load: each caller has its error, and the
        # count in the message says how many failed since.
        level = logging.DEBUG
        if not raised and (
            self.state.connect_failures == 1 or now - self.connect_warned_at >= CONNECT_WARNING_INTERVAL
        ):
            level = logging.WARNING
            self.connect_warned_at = now
        logger.log(
            level,
            "pool %r: the init hook failed on a new connection (%s), which the pool closes; %d consecutive failures"
            if self.state.init_failing else "pool %r: connect failed (%s); %d consecutive failures",
            self.name, described, self.state.connect_failures,
            extra={"event": "connect_failed", "pool": self.name, "error": described},
        )
        if self.state.floor_enabled and self.state.min_size and not waited and not self.state.closing:
            # Nobody waits, and create_pool() has returned: the min_size
            # upkeep's connect (create_pool's own failures raise, unlogged, as
            # in asyncpg). asyncpg logs these on its own logger, and
            # monitoring of asyncpg programs reads it. (Without a floor, the
            # connect was a task's that gave up: asyncpg's pool cancelled it.)
            _asyncpg_logger.warning("Failed to restore the pool connection floor; retrying (%s)", described)
        self.emit_event("connect_failed", error=described, consecutive_failures=self.state.connect_failures)
        self.note_server_status(now, quiet=raised)

    def note_server_status(self, now: float, quiet: bool = False) -> None:
        """Log and emit the breaker's transitions: up, backing_off, down
        (``quiet``: logged at DEBUG, see :meth:`connect_failed`)."""
        status = self.state.server_status(now).value
        previous, self.server_status = self.server_status, status
        if status == previous:
            return
        level = logging.DEBUG if quiet else logging.INFO if status == "up" else logging.WARNING
        logger.log(
            level, "pool %r: server status %s -> %s", self.name, previous, status,
            extra={"event": "server_status", "pool": self.name, "from": previous, "to": status},
        )
        self.emit_event("server_status", **{"from": previous, "to": status})


    def emit(self, event: str, lease: Lease, held: float, **extra: Any) -> None:
        """Queue a lease event (delivered by :meth:`deliver`, after the books settle)."""
        if self.listeners:
            info = self.lease_info(lease, lease.acquired_at + held)
            self.pending.append(_LEASE_EVENTS[event](self.name, info, **extra))

    def emit_event(self, event: str, **fields: Any) -> None:
        """Queue a pool event (delivered by :meth:`deliver`, after the books settle)."""
        if not self.listeners:
            return
        if event == "server_status":
            fields = {"previous": fields["from"], "status": fields["to"]}
        self.pending.append(_POOL_EVENTS[event](self.name, **fields))
        if len(self.pending) == 1:
            # Every emitter is followed by a drain or a deliver(); this is
            # the safety net should one not be.
            try:
                self.loop.call_soon(self.deliver)
            except RuntimeError:
                pass  # the loop is closed

    def deliver(self) -> None:
        """Hand queued events to the listeners, in order. Never runs inside
        the action loop; a listener that calls into the pool (even one that
        emits more events) sees settled books, and its events follow."""
        if self.delivering:
            return
        self.delivering = True
        pending = self.pending
        try:
            while pending:
                event = pending.popleft()
                for callback in list(self.listeners):
                    try:
                        result = callback(event)
                        if result is not None:
                            refuse_awaitable("an event listener", result)
                    except (SystemExit, KeyboardInterrupt):
                        raise  # (as asyncio's Handle._run: the program is asked to stop)
                    except BaseException:
                        # CancelledError too (a listener reading a cancelled
                        # future's result): logged as asyncio reports a
                        # callback's, and the other listeners still get it.
                        # Formatted now: a record holding the traceback would keep the
                        # callers' frames, and the connections they refer to, alive.
                        logger.error(
                            "pool %r: event listener failed\n%s", self.name, self.redact(traceback.format_exc().rstrip()),
                            extra={"event": "listener_failed", "pool": self.name},
                        )
        finally:
            self.delivering = False
