"""The pool's bookkeeping as a plain state machine.

Design note. Nothing here awaits, sleeps or touches the network. Every method
takes ``now`` from the pool's injected clock, changes the books, and appends
what the I/O layer must do to ``actions`` (open a connection, wake a waiter,
close or take back a connection). Because the I/O layer cannot interleave
inside a method, every race (a grant and a cancel, a release and an expiry)
is one ordered sequence of calls that a unit test can replay without a loop
or a database.

Every server connection the pool owns is a :class:`Slot` in exactly one
:class:`SlotState`; ``_TRANSITIONS`` lists the legal moves and ``_move`` is the
only place a state changes. A slot counts towards ``size`` from the moment a
connect is planned until its close has finished, so the server never sees more
than ``max_size`` connections from one pool, even while some are being
replaced.
"""

from __future__ import annotations

import enum
import heapq
import itertools
import math
import operator
import random
import sys
import types
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar, cast

from ._durations import validate_timeout
from ._histogram import Histogram
from .errors import PoolTypeError, PoolValueError

if TYPE_CHECKING:
    from ._policy import AdaptiveQueue, WaitPolicy
    from ._stack import Captured


_E = TypeVar("_E", bound=enum.Enum)


def fast_members(cls: type[_E]) -> type[_E]:
    """``cls``'s members as a module's attributes, for the hot path's
    member reads (``S.IDLE``). On CPython 3.11 every attribute read on an
    enum class goes through ``EnumType.__getattr__``'s slot hook, about 45 ns
    more than a plain class attribute: 20 reads per lease, a fifth of an
    empty lease. A plain class is still read through ``type_getattro`` and
    the type's method cache at each read (3.11 specializes no attribute
    read on a class), where a module attribute is read by the specialized
    ``LOAD_ATTR_MODULE``: a module takes 3,600 instructions fewer per
    contended lease (callgrind, ``python -m benchmarks.instructions``).
    3.12 dropped the hook (python/cpython#106762), specializes reads on a
    class (``LOAD_ATTR_CLASS``) and gets the enum itself. Only for member
    reads: the result is not the enum (no iteration, no lookup by value,
    no isinstance)."""
    if sys.version_info >= (3, 12):
        return cls
    members = types.ModuleType(f"{cls.__module__}.{cls.__name__}Members", f"The members of {cls.__qualname__}.")
    vars(members).update(cls.__members__)
    return cast("type[_E]", members)


_lease_id = operator.attrgetter("id")

# Histogram.FOLD_AT as a module global for the hot path (see fast_members).
_FOLD_AT = Histogram.FOLD_AT


class SlotState(enum.Enum):
    # Members are singletons: identity hashing is exact, and C-fast, where
    # Enum's own __hash__ is Python code on the hot path (dict lookups in _move).
    __hash__ = object.__hash__

    CONNECTING = "connecting"  # a connect is under way for this place
    IDLE = "idle"  # connected, in the idle stack
    RESERVED = "reserved"  # handed to a waiter whose task has not resumed yet
    LEASED = "leased"  # held by application code through a proxy
    RESETTING = "resetting"  # released or taken back; the reset is under way
    CLOSING = "closing"  # the close is under way; still counts towards size
    CLOSED = "closed"  # gone; no longer counted


S = fast_members(SlotState)
_TRANSITIONS: dict[SlotState, frozenset[SlotState]] = {
    S.CONNECTING: frozenset({S.IDLE, S.RESERVED, S.CLOSING, S.CLOSED}),
    S.IDLE: frozenset({S.LEASED, S.RESERVED, S.CLOSING}),  # RESERVED: a site's waiters left its cap
    S.RESERVED: frozenset({S.LEASED, S.IDLE, S.RESERVED, S.CLOSING}),
    S.LEASED: frozenset({S.RESETTING, S.IDLE, S.RESERVED, S.CLOSING}),
    S.RESETTING: frozenset({S.IDLE, S.RESERVED, S.CLOSING}),
    S.CLOSING: frozenset({S.CLOSED}),
    S.CLOSED: frozenset(),
}


class LeaseState(enum.Enum):
    """Where a lease is in its life; a lease never returns from an end state.

    HELD and SUSPECT are the lease's open states (application code holds the
    connection); the other four say how it ended."""

    __hash__ = object.__hash__  # (as SlotState: C-fast lookups in _LEASE_MOVES)

    HELD = "held"  # the application holds the connection through a proxy
    SUSPECT = "suspect"  # still held, past leak_warning_after: reported as a leak suspect
    RELEASED = "released"  # release() (or a failed setup) ended it
    EXPIRED = "expired"  # the lease timeout ended it: the pool took the connection back
    RECLAIMED = "reclaimed"  # its proxy was garbage collected while held: a leak
    DISCARDED = "discarded"  # the connection died, or the pool was terminated


L = fast_members(LeaseState)
OPEN_LEASE = frozenset({L.HELD, L.SUSPECT})
_ENDS = frozenset({L.RELEASED, L.EXPIRED, L.RECLAIMED, L.DISCARDED})
_LEASE_MOVES: dict[LeaseState, frozenset[LeaseState]] = {
    L.HELD: _ENDS | {L.SUSPECT},
    L.SUSPECT: _ENDS,
    L.RELEASED: frozenset(),
    L.EXPIRED: frozenset(),
    L.RECLAIMED: frozenset(),
    L.DISCARDED: frozenset(),
}


_LOSABLE = frozenset({S.IDLE, S.LEASED, S.RESERVED})


class InternalStateError(AssertionError):
    """A transition the state table forbids: a bug in safepool, never the user's."""


class ServerStatus(enum.Enum):
    UP = "up"
    BACKING_OFF = "backing_off"  # connects fail, but the pool still has connections
    DOWN = "down"  # connects fail and the pool has no connection left


class ReleaseOutcome(enum.Enum):
    """What becomes of a connection coming back (decided by
    :meth:`PoolState.release_outcome`)."""

    CLEAN = "clean"  # no statement ran: hand it on without a reset
    NEEDS_RESET = "needs_reset"
    DISCARD = "discard"  # broken, too old or too used: close it


class Observed(enum.IntEnum):
    """What the I/O layer saw of a released connection, in one look at its
    protocol (the facts :meth:`PoolState.release_outcome` decides on)."""

    UNUSABLE = 0  # closed, or its protocol is gone
    USED_UP = 1  # reached max_queries
    MUST_RESET = 2  # a transaction is open, or a cancelled query has not answered
    DIRTY = 3  # statements ran since the session was last known clean
    CLEAN = 4  # no statement since then


# Member reads on the hot path (see fast_members).
Outcome = fast_members(ReleaseOutcome)
Seen = fast_members(Observed)
# The values release_outcome compares with, as plain ints: one global read
# each per release, not a read of a member as well.
_USED_UP, _MUST_RESET, _CLEAN = int(Observed.USED_UP), int(Observed.MUST_RESET), int(Observed.CLEAN)

RESET_MODES = ("full", "rollback", "auto")


def _release_policy(mode: str, always_reset: bool, observed: int, marked: bool) -> ReleaseOutcome:
    """What :meth:`PoolState.release_outcome` decides for a lease's slot of
    the current generation, by the pool's ``reset_mode`` and
    ``always_reset``, what the I/O layer observed, and whether the lease
    marked itself (tabulated once per pool: see ``PoolState.outcomes``)."""
    if observed <= _USED_UP:
        return Outcome.DISCARD
    if observed == _MUST_RESET or always_reset:
        return Outcome.NEEDS_RESET
    if observed == _CLEAN or (mode != "full" and not marked):
        return Outcome.CLEAN
    # (A marked lease in rollback mode: a statement of it raised, or it
    # prepared one, and may have left the backend in the implicit
    # transaction of a Parse: its ROLLBACK ends it.)
    return Outcome.NEEDS_RESET


class Phase(enum.Enum):
    """The pool's lifecycle: one value, not a flag per question."""

    NEW = "new"  # created; `await pool` (or create_pool) not run yet
    STARTING = "starting"  # the first connections are being opened
    OPEN = "open"
    CLOSING = "closing"  # close() under way: acquires refused, leases close as they come back
    CLOSED = "closed"  # closed, terminated, or failed to start


Phases = fast_members(Phase)

_PHASES: dict[Phase, frozenset[Phase]] = {
    Phase.NEW: frozenset({Phase.STARTING, Phase.CLOSING, Phase.CLOSED}),
    Phase.STARTING: frozenset({Phase.OPEN, Phase.CLOSING, Phase.CLOSED}),
    Phase.OPEN: frozenset({Phase.CLOSING, Phase.CLOSED}),
    Phase.CLOSING: frozenset({Phase.CLOSING, Phase.CLOSED}),
    Phase.CLOSED: frozenset(),
}


class Slot:
    __slots__ = (
        "id", "state", "connection", "generation", "created_at", "idle_since", "lease", "owner", "failed_connect",
        "expires_at", "adopted", "trigger", "abandoned", "answered",
    )

    def __init__(self, slot_id: int, generation: int, now: float) -> None:
        self.id = slot_id
        self.state = SlotState.CONNECTING
        self.connection: Any = None
        self.generation = generation
        self.created_at = now
        self.idle_since = now
        self.lease: Lease | None = None
        self.owner: Waiter | None = None  # while CONNECTING: the waiting task it is opened for
        # Whether its owner took it over (_adopt: opened for min_size or for
        # a task that gave up), rather than being the task it was opened for.
        self.adopted = False
        # While CONNECTING, with a queue policy (max_site_share, the adaptive
        # queue; connects have no owner there, the policy picks the task for
        # every free connection): the waiting task whose demand it was opened
        # for, the one its failure fails (none if that task no longer waits).
        self.trigger: Waiter | None = None
        # While CONNECTING: the core gave the connect up (an Abandon: its
        # task taker presumed it lost) and the I/O layer cancels it. It still
        # counts towards max_size until the I/O layer reports its end
        # (connect_cancelled), so no connect starts beside its socket.
        self.abandoned = False
        # While CONNECTING: the server answered (the connection is open, and
        # init= runs on it): never presumed lost (_abandon_lost).
        self.answered = False
        # CLOSING a connection its connect failed on (init= raised): never
        # opened for the pool (not in connected(), connections_opened or
        # connections_closed), yet its backend counts towards max_size.
        self.failed_connect = False
        # When its max_lifetime runs out (pool clock seconds), while that
        # timer is in the core's heap; None otherwise (off, fired, closing).
        self.expires_at: float | None = None

    def __repr__(self) -> str:
        return f"<Slot {self.id} {self.state.value}>"


class Lease:
    __slots__ = (
        "id", "slot", "acquired_at", "deadline", "warn_at", "_stack", "_task_name", "_task_ref",
        "state", "site", "__weakref__",
    )

    # Who took the lease, with stack capture on (PoolState.note_caller):
    # set then only, not in __init__ (three stores less per lease), and
    # read, off the hot path, through the properties below (None unset).
    _stack: Captured | None
    _task_name: str | None
    _task_ref: Any

    def __init__(self, lease_id: int, slot: Slot, now: float, site: str | None = None) -> None:
        self.id = lease_id
        self.slot = slot
        self.acquired_at = now
        self.deadline: float | None = None
        self.warn_at: float | None = None
        self.state = L.HELD  # moved only by PoolState, by the table _LEASE_MOVES
        self.site = site  # the acquire site (set with site caps, or acquire(site=))

    @property
    def stack(self) -> Captured | None:
        """The acquire stack, ``_stack.capture()`` (resolved when reported); None without stack capture."""
        return getattr(self, "_stack", None)

    @property
    def task_name(self) -> str | None:
        """The acquiring task's name (with stack capture)."""
        return getattr(self, "_task_name", None)

    @property
    def task_ref(self) -> Any:
        """A ``weakref.ref`` to the acquiring task (with stack capture)."""
        return getattr(self, "_task_ref", None)

    def age(self, now: float) -> float:
        return now - self.acquired_at

    @property
    def active(self) -> bool:
        """Still held (HELD or SUSPECT)."""
        return self.state in OPEN_LEASE

    @property
    def expired(self) -> bool:
        return self.state is L.EXPIRED

    @property
    def warned(self) -> bool:
        """Reported as a leak suspect, and still held."""
        return self.state is L.SUSPECT


class WaiterState(enum.Enum):
    WAITING = "waiting"
    GRANTED = "granted"
    TIMED_OUT = "timed_out"
    CANCELLED = "cancelled"
    FAILED = "failed"


W = fast_members(WaiterState)


class Waiter:
    """One task waiting for a connection; ``future`` is opaque to the core."""

    __slots__ = ("future", "enqueued_at", "eligible_at", "deadline", "slot", "state", "site", "seq", "shed", "connect")

    # Read by the queue policy alone (_policy.py), or with one (shed), and
    # set for the waiters it admits (PoolState._policy_admit), not here:
    # three stores less per waiter. eligible_at: since when its site has
    # been under its cap (max_site_share): the adaptive queue sheds by the
    # time waited there, not while capped. seq: arrival order within the
    # wait policy. shed: deadline is the adaptive queue's target, not the
    # caller's timeout.
    eligible_at: float
    seq: int
    shed: bool

    def __init__(self, future: Any, now: float, deadline: float | None, site: str | None = None) -> None:
        self.future = future
        self.enqueued_at = now
        self.deadline = deadline
        self.slot: Slot | None = None
        self.state = W.WAITING
        self.site = site
        self.connect: Slot | None = None  # while WAITING: the connect opened for it (its slot)


# Actions for the I/O layer, drained from PoolState.actions after each call.
# ----------------------------------------------------------------- actions
# What the core asks the I/O layer to do: one type per kind, dispatched by the
# runner with ``match`` and ``assert_never`` (a new kind that the runner does
# not handle is a type error, not a silent no-op).


@dataclass(frozen=True, slots=True)
class Connect:
    """Open a connection for ``slot``; report connect_succeeded / connect_failed."""

    slot: Slot


@dataclass(frozen=True, slots=True)
class Close:
    """Close ``slot``'s connection, then report closed(slot). ``idle_expired``:
    an idle connection past ``max_inactive_connection_lifetime``, which
    asyncpg's pool terminates (no ``close()``; see ``Runner.close_slot``)."""

    slot: Slot
    idle_expired: bool = False


@dataclass(frozen=True, slots=True)
class Abandon:
    """Cancel ``slot``'s connect: the core gave it up (``Slot.abandoned``).
    It still counts towards max_size until its end is reported, as
    connect_cancelled (connect_succeeded / connect_failed then close it
    too, returning False: the I/O layer aborts what it opened)."""

    slot: Slot


@dataclass(slots=True)
class Wake:
    """Resolve the waiter's future: ``waiter.slot`` is reserved for it.

    Not frozen, unlike the other actions: one is made per contended lease,
    and a frozen dataclass's ``__init__`` sets its field through
    ``object.__setattr__`` (about 1,300 instructions more per lease)."""

    waiter: Waiter


@dataclass(frozen=True, slots=True)
class TimeOut:
    """Fail the waiter with a timeout (its deadline passed)."""

    waiter: Waiter


@dataclass(frozen=True, slots=True)
class Fail:
    """Fail the waiter with ``error`` (a connect error, the pool closing).
    ``breaker_open``: a connect failed with no connection left and the
    circuit breaker's threshold reached (``fail_fast``): the waiter gets
    ``ServerUnavailableError``, as an acquire arriving in the backoff does."""

    waiter: Waiter
    error: BaseException
    breaker_open: bool = False


@dataclass(frozen=True, slots=True)
class TakeBack:
    """The lease expired: cancel its query, reset, then report reset_done."""

    lease: Lease


@dataclass(frozen=True, slots=True)
class LeakSuspect:
    """The lease is held longer than leak_warning_after: report it."""

    lease: Lease


@dataclass(frozen=True, slots=True)
class Shed:
    """The adaptive queue gave up on the waiter: fail it as overloaded, saying why."""

    waiter: Waiter
    reason: str
    waiting: int  # tasks waiting when it was shed, itself included (the message's count)


@dataclass(frozen=True, slots=True)
class NoteServerStatus:
    """Report the server status: the failure view went stale by time alone
    (backing_off -> up: see :meth:`PoolState.server_status`), with no
    connect event to report it."""


Action = Connect | Close | Abandon | Wake | TimeOut | Fail | TakeBack | LeakSuspect | Shed | NoteServerStatus


class Overloaded(Exception):
    """The wait queue is at max_waiters (the I/O layer raises the public error).

    ``str()`` is the reason when a wait policy refused the task (a site's
    share of max_waiters; see Inadmissible)."""


class Inadmissible(Overloaded):
    """Deadline-aware admission: the task cannot be served within its timeout
    at the pool's measured drain rate."""


class Unavailable(Exception):
    """No connection and connects are backing off (carries the last connect error)."""

    def __init__(self, last_error: BaseException | None, retry_in: float) -> None:
        super().__init__(last_error)
        self.last_error = last_error
        self.retry_in = retry_in


class Closed(Exception):
    """The pool is closing or closed."""


class SlotLost(Exception):
    """claim(): the connection granted to the waiter was discarded before its
    task resumed (connection lost, pool terminated); acquire again."""


@dataclass
class Counters:
    """What happened since the pool started. Leases handed out and leases
    released are not counted here: each has a sample of its own already,
    their histogram's (see :attr:`PoolState.acquired`)."""

    acquire_timeouts: int = 0
    overload_rejections: int = 0
    unavailable_rejections: int = 0
    leases_expired: int = 0
    leaks_detected: int = 0
    leak_warnings: int = 0
    connections_opened: int = 0
    connections_closed: int = 0
    connect_errors: int = 0
    resets: int = 0
    resets_skipped: int = 0
    resets_failed: int = 0
    shed: int = 0  # waiters the adaptive queue failed after its target delay
    admission_rejections: int = 0  # refused at once: not servable within their timeout
    leases_discarded: int = 0  # leases ended by the pool: their connection was lost, or terminate()
    connections_retired: int = 0  # connections whose max_lifetime ran out (closed then, or when given back)


# How a connect failed, for its backoff (_internals.refusal tells).
NOT_REFUSED, REFUSED, UNREACHABLE, BROKEN, UNRESOLVED = 0, 1, 2, 3, 4


@dataclass
class Backoff:
    """Exponential backoff with jitter between failed connects, for pools
    that pace their connects while they fail (``fail_fast=True`` or
    ``wait_on_connect_error=True``). By default a pool connects for each
    waiting task at once, as asyncpg's pool (0.32) does on every acquire,
    and only ``hedge_after`` applies: a connect unanswered that long gets
    another beside it while tasks wait.

    Each delay runs from the start of the attempt that failed, not its end
    (gRPC's connection backoff protocol, doc/connection-backoff.md, backs
    off "the start time of connection attempts"), and connects that were
    under way together count as one failure. While connects fail the pool
    makes one attempt at a time, and starts another beside it once the
    newest has gone unanswered for ``hedge_after`` seconds (a "hedged
    request": J. Dean and L. A. Barroso, "The Tail at Scale", CACM 2013), up
    to ``max_size`` (and ``max_connecting``) under way; ``None``: never.

    A refused connect ends at once, so it is retried soon: the pool serves
    again about as soon as the server accepts, as asyncpg's pool (which
    connects on every acquire) does. Nothing answering (nothing listening:
    the server is down or restarting, the kernel refuses, the server pays
    nothing; no route to its host, down or rebooting; or no answer within
    the connect timeout ``timeout=``: a black hole, whose attempt waited out
    the timeout already) is retried within ``unreachable_cap`` seconds of
    the attempt's start. A refusal the server sends (starting up or
    shutting down, 57P03, or ending a start-up as it goes down, 57P01 and
    57P02; out of connection slots, 53300) costs it a backend process each: retried within
    ``unreachable_cap`` at first, then doubling up to ``refused_cap`` while
    they go on (a restart's start-up lasts milliseconds, a crash recovery
    minutes). A connect broken before the server answered (reset, aborted,
    closed mid-start-up: the network path or a proxy in it broke, as when a
    black hole heals, or an HAProxy-like proxy whose server is down accepts
    and closes) is retried as a refusal: a proxy pays an accept, less than
    the server's backend process, and serves again as soon as its server
    does. A host name that did not resolve (the resolver, not the server,
    would pay for quick retries) is retried within ``unreachable_cap``
    once, then backs off as other failures while it goes on. Any other
    failure (a wrong password, a missing database, an SSL upgrade refused,
    an ``init=`` hook's error) backs off up to ``cap`` seconds.

    :param base: seconds, the first delay's ceiling for other failures,
        doubled per failure (default 0.1).
    :param cap: seconds, the most any delay for other failures reaches
        (default 2.0).
    :param refused_cap: seconds, the most a delay after refusals reaches
        (default 0.05).
    :param unreachable_cap: seconds, the ceiling after an unreachable
        server, and the first one after a refusal (default 0.01).
    :param rng: returns a float in [0, 1), the random half of each delay
        (default ``random.random``).
    :param hedge_after: seconds > 0 (default 0.1), or None: never hedge.
    :raises TypeError: a field is not a number of seconds (``rng`` not
        callable).
    :raises ValueError: a field negative or NaN; ``hedge_after`` not > 0.
    """

    base: float = 0.1
    # The cap bounds recovery: once the server accepts again, the next probe
    # comes within cap seconds (issue 4 asks for < 5 s after any outage).
    cap: float = 2.0
    refused_cap: float = 0.05
    unreachable_cap: float = 0.01
    rng: Callable[[], float] = field(default=random.random)
    # (After rng, which came before it.) While connects fail, a connect
    # unanswered this long (seconds; at least twice the slowest connect that
    # succeeded, or failed with an answer) is presumed lost and another
    # starts beside it, up to max_size under way: a black hole that heals is
    # served within about this long, where waiting for the lost connect's
    # timeout= would take up to that timeout. None: never.
    hedge_after: float | None = 0.1

    def __post_init__(self) -> None:
        """:raises TypeError: a field not a number of seconds (``rng`` not
        callable).
        :raises ValueError: a negative or NaN one; ``hedge_after`` not > 0."""
        for name in ("base", "cap", "refused_cap", "unreachable_cap"):
            validate_timeout(f"Backoff.{name}", getattr(self, name), allow_none=False)
        validate_timeout("Backoff.hedge_after", self.hedge_after, positive=True)
        if not callable(self.rng):
            raise PoolTypeError(f"Backoff.rng must be a callable returning a float in [0, 1), got {self.rng!r}")

    def delay(self, failures: int, refused: int = NOT_REFUSED) -> float:
        """Seconds to wait before the next connect, after ``failures``
        (>= 1) failed ones in a row (for ``REFUSED``, the server's refusals
        in a row), of which half is fixed and half drawn from ``rng``
        ("equal jitter": M. Brooker, "Exponential Backoff And Jitter", AWS
        Architecture Blog, 2015). Its ceiling: ``base * 2 ** (failures - 1)``
        capped at ``cap``; ``unreachable_cap`` for ``UNREACHABLE``;
        ``unreachable_cap * 2 ** (failures - 1)`` capped at ``refused_cap``
        for ``REFUSED`` (or True) and ``BROKEN``; for ``UNRESOLVED``,
        ``unreachable_cap`` for the first, then ``base * 2 ** (failures - 2)``
        capped at ``cap``."""
        exponent = min(failures - 1, 30)
        if not refused:
            ceiling = min(self.cap, self.base * 2.0**exponent)
        elif refused == UNREACHABLE:
            ceiling = self.unreachable_cap
        elif refused == UNRESOLVED:
            ceiling = min(self.cap, self.base * 2.0 ** (exponent - 1)) if exponent else self.unreachable_cap
        else:
            ceiling = min(self.refused_cap, self.unreachable_cap * 2.0**exponent)
        # Half fixed, half random: spreads many app processes' retries apart
        # while keeping a floor so a dead server is not hammered.
        return float(ceiling * (0.5 + 0.5 * self.rng()))


_LEASE_DEADLINE, _LEASE_WARNING, _WAITER_DEADLINE, _SLOT_EXPIRY, _STALE_FAILURE = 0, 1, 2, 3, 4

# A failed connect stops speaking for the server (server_status goes back to
# "up" from "backing_off") once the pool wants no connection and this many
# seconds have passed since it failed (and its backoff is over): no connect
# will come to refresh the view. 60 s is asyncpg's longest reconnect delay
# (the min_size upkeep's retry cap, _runner._FLOOR_RETRY_CAP) and health()'s
# default connect_error_window.
STALE_FAILURE_AFTER = 60.0
# Seconds between looks at a failure view that is due to go stale while the
# pool still wants a connection (PoolState.wants_connection): usually that
# connect's outcome reports the status first; this catches the rest (a
# connect cancelled, one held back by max_connecting).
STALE_RECHECK = 1.0

# max_lifetime: each connection's is cut by up to this share, so connections
# opened together are not all replaced together (see PoolState._arm_lifetime).
LIFETIME_JITTER = 0.1
# Seconds between looks at a connection whose max_lifetime ran out while
# connects failed (it is kept until one succeeds: PoolState._retire).
RETIRE_RETRY = 1.0
_GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0
# The generation of a connection whose max_lifetime ran out while in use: no
# generation the pool reaches (expire_connections() counts up from 0), so it
# is closed, not reused, when its lease or reset ends.
_RETIRED = -1


class _DueQueue:
    """Lease timers of one kind armed in the order they fall due, the common
    case (one ``lease_timeout`` or ``leak_warning_after`` for every lease):
    ``entries`` maps a lease id to ``(when, lease)`` in arming order, so its
    first entry falls due first. Arming is one store and ending a lease one
    pop, where the heap pushes, and then pops a stale entry. While a timer
    due later than the others is queued (a longer ``lease_timeout=`` of one
    acquire), those armed after it and due before it go to the heap, as
    every timer did before, until the queue empties."""

    __slots__ = ("entries", "last")

    def __init__(self) -> None:
        self.entries: dict[int, tuple[float, Lease]] = {}
        self.last = 0.0  # when the last timer queued falls due

    def add(self, when: float, lease: Lease) -> bool:
        """Queue the timer; False if it falls due before the last one queued
        (it goes to the heap then)."""
        if when < self.last and self.entries:
            return False
        self.last = when
        self.entries[lease.id] = (when, lease)
        return True

    def head(self) -> tuple[float, Lease] | None:
        """The timer that falls due first, ``(when, lease)``; None if none."""
        return next(iter(self.entries.values()), None)


def _slot_id(slot: Slot) -> int:
    return slot.id


class PoolState:
    """Slots, leases, waiters and counters of one pool. See the module note."""

    # Slots, not a __dict__: CPython 3.11 keeps at most 30 attributes in an
    # instance's inline values; past that the instance gets a dict of its
    # own, and then no method call on it is specialized (a dict lookup and
    # a type lookup per call, every state.release(...) of the hot path).
    __slots__ = (
        "_abandoned_count", "_admission", "_bound", "_closing_count", "_connecting_count", "_deadlines", "_idle", "_ids", "_policy", "_slots", "_stale_check", "_stale_timers", "_timers",
        "_waiters", "_waiting", "_warnings", "actions", "always_reset", "backoff", "backoff_level", "backoff_until",
        "breaker_threshold", "closing", "connects_to_watch", "connect_failed_at", "connect_failures", "connect_refusals", "connect_times", "counters",
        "failed_answer_max", "failure_went_stale", "floor_enabled", "lost_before",
        "generation", "init_failing", "connect_misconfigured", "last_connect_error", "lease_times", "max_connecting", "max_inactive_lifetime",
        "max_lifetime", "max_size",
        "max_waiters", "min_size", "outcomes", "phase", "reset_mode", "server_failures", "slot_set", "wait_on_connect_error", "wait_times",
    )

    def __init__(
        self,
        *,
        max_size: int,
        min_size: int = 0,
        max_waiters: int | None = None,
        max_connecting: int | None = None,
        max_inactive_lifetime: float = 0.0,
        max_lifetime: float | None = None,
        backoff: Backoff | None = None,
        breaker_threshold: int | None = None,
        wait_on_connect_error: bool = False,
        max_site_share: float | None = None,
        adaptive: AdaptiveQueue | None = None,
        reset_mode: str = "full",
        always_reset: bool = False,
    ) -> None:
        if reset_mode not in RESET_MODES:
            raise PoolValueError(f"reset_mode must be one of {RESET_MODES}, got {reset_mode!r}")
        # Release policy: "full" resets after every lease that ran a statement
        # (asyncpg); "rollback" only ends an open transaction; "auto" resets
        # fully only a lease its proxy marked. always_reset: a reset= hook or
        # a connection class's own reset()/get_reset_query() runs after every
        # lease, as asyncpg runs it.
        self.reset_mode = reset_mode
        self.always_reset = always_reset
        # release_outcome's policy for each (marked, observed), as
        # reset_mode and always_reset are fixed for the pool's life: one
        # look-up per release, not up to five tests. Read only (the
        # adapter's release looks it up inline: see release_outcome).
        self.outcomes = tuple(
            tuple(_release_policy(reset_mode, always_reset, observed, marked) for observed in Observed)
            for marked in (False, True)
        )
        self.max_size = max_size
        self.min_size = min_size
        self.max_waiters = max_waiters
        self.max_connecting = max_connecting  # None: up to max_size at once while connects succeed
        # None: never fail an acquire early (asyncpg's behaviour: every waiter
        # waits for the next connect attempt and gets its outcome).
        self.breaker_threshold = breaker_threshold
        # False (asyncpg): a failed connect fails the task it was opened for,
        # even while other connections are leased. True: that task waits for
        # a released connection instead (a full server is not an error).
        self.wait_on_connect_error = wait_on_connect_error
        self.max_inactive_lifetime = max_inactive_lifetime
        # None (asyncpg's behaviour): a connection lives until it breaks, is
        # idle too long, reaches max_queries or is expired.
        self.max_lifetime = max_lifetime
        self.backoff = backoff or Backoff()

        self.actions: list[Action] = []
        self.counters = Counters()
        self.wait_times = Histogram()
        self.lease_times = Histogram()
        self.connect_times = Histogram()  # successful connects only

        self.generation = 0
        self.phase = Phase.NEW
        # phase is CLOSING or CLOSED: derived by set_phase (a plain attribute
        # for the hot path's checks), never written elsewhere.
        self.closing = False
        self.floor_enabled = False  # min_size upkeep starts once the pool is initialised

        self._slots: set[Slot] = set()
        # The same set, for the runner's hot path: len(state.slot_set) is
        # size without the property's call (Runner.after_hand_on). Read only.
        self.slot_set = self._slots
        # Slots CONNECTING and CLOSING, counted as they move (_move): the
        # hot path reads these two. The other states' counts are read only
        # by stats(), repr and messages, so count() finds them when asked
        # (IDLE: the idle stack's length) and no transition pays for them.
        self._connecting_count = 0
        # Of those, connects the core gave up (Slot.abandoned): they count
        # towards max_size until they end, but will serve no task.
        self._abandoned_count = 0
        self._closing_count = 0
        self._idle: deque[Slot] = deque()  # right end = most recently used (LIFO)
        self._waiters: deque[Waiter] = deque()  # may hold settled waiters: skipped lazily
        self._waiting = 0  # live waiters only
        # Live waiters with a connect of their own (Waiter.connect): as in
        # asyncpg, the task a connect is opened for waits for that connect
        # and released connections serve the others (see _bind). Without
        # site caps and the adaptive queue only; they keep one FIFO order.
        self._bound = 0
        self._timers: list[tuple[float, int, int, Any]] = []
        self._stale_timers = 0
        # Lease timers armed in the order they fall due: a queue each, not
        # the heap (_DueQueue).
        self._deadlines = _DueQueue()
        self._warnings = _DueQueue()
        # Ids of slots and leases, and the timer heap's tie-breaks, from one
        # count (1, 2, ...): next(self._ids), a C call, where the hot path's
        # lease took an increment and a read of an attribute.
        self._ids = itertools.count(1)

        self.connect_failures = 0
        # Set when a waiting task may have come to depend on a connect under
        # way (enqueue: one it took over, or a queue policy's orphan; a grant
        # while connects run: the connect its task started is now another's):
        # a deadline no action announces (presumed lost at the hedge delay),
        # so the I/O layer must drain, which arms the pool's timer and clears it.
        self.connects_to_watch = False
        # The backoff's exponent: failures in a row, counting once those of
        # connects that were under way together (a round: they started
        # before the last failure, so it is the same news), and the server's
        # refusals (57P03, 53300) in a row, counted the same way.
        self.backoff_level = 0
        self.connect_refusals = 0
        self.connect_failed_at = -math.inf  # when the last connect failed
        # The slowest connect that failed with an answer (the server's error,
        # an init= hook's) since the last success: a connect under way that
        # long is not lost, so no hedge beside it before twice that.
        self.failed_answer_max = 0.0
        # Connects started before this time are presumed lost: one started
        # later ended a run of failures before them (a healed black hole).
        self.lost_before = -math.inf
        # Of those, the run that never reached the server (the breaker's
        # count), and whether the last one reached it and failed in init=.
        self.server_failures = 0
        self.init_failing = False
        # The last connect failed on the program's own connect arguments
        # (connect_failed's ``program``): a configuration error, not the
        # server's; False once a connect succeeds.
        self.connect_misconfigured = False
        self.last_connect_error: BaseException | None = None
        self.backoff_until = 0.0
        # A _STALE_FAILURE timer is in the heap (one at most: it re-arms
        # itself for a later failure's moment, see _check_stale).
        self._stale_check = False
        # The failure view went stale (_check_stale saw it so): server_status
        # stays "up" from then until the next failure (or success), whatever
        # the demand does meanwhile (a connect for it refreshes the view).
        self.failure_went_stale = False

        # Site caps and the adaptive queue (_policy.py): None when both are
        # off, so the default paths pay one attribute check.
        self._policy: WaitPolicy | None = None
        if max_site_share is not None or adaptive is not None:
            from ._policy import WaitPolicy

            self._policy = WaitPolicy(
                max_size=max_size, site_share=max_site_share, adaptive=adaptive, shed=self._shed
            )
        # Whether enqueue() may refuse a waiter (max_waiters, a queue policy,
        # the breaker): all three are fixed for the pool's life.
        self._admission = max_waiters is not None or self._policy is not None or breaker_threshold is not None

    # ----------------------------------------------------------------- sizes

    @property
    def size(self) -> int:
        return len(self._slots)

    @property
    def acquired(self) -> int:
        """Leases handed out: each recorded its wait (0.0 when a connection
        was idle), so the wait histogram counts them, with no counter of
        their own to bump on the hot path."""
        return self.wait_times.count

    @property
    def released(self) -> int:
        """Leases ended by ``release()``: every ended lease recorded its
        duration (``_close_lease``), and those the pool ended are counted by
        how (expired, reclaimed, discarded); the rest were released."""
        c = self.counters
        return self.lease_times.count - c.leases_expired - c.leaks_detected - c.leases_discarded

    @property
    def idle(self) -> int:
        return len(self._idle)

    @property
    def waiting(self) -> int:
        return self._waiting

    def _live(self) -> int:
        """Slots that will still exist once pending closes finish."""
        return len(self._slots) - self._closing_count

    def count(self, state: SlotState) -> int:
        """Slots in ``state`` now (CLOSED: none, a closed slot is gone).
        LEASED, RESERVED and RESETTING are counted by one pass over the
        slots (at most max_size of them; see ``__init__``)."""
        if state is S.CONNECTING:
            return self._connecting_count
        if state is S.CLOSING:
            return self._closing_count
        if state is S.IDLE:
            return len(self._idle)
        return len([slot for slot in self._slots if slot.state is state])

    @property
    def in_use(self) -> int:
        """Slots LEASED or RESERVED (one pass over the slots, as count())."""
        leased, reserved = S.LEASED, S.RESERVED
        return len([slot for slot in self._slots if slot.state is leased or slot.state is reserved])

    def _serving(self) -> int:
        """Connections that can still be handed out (not being opened or closed)."""
        return len(self._slots) - self._connecting_count - self._closing_count

    def connected(self) -> int:
        """Connections that exist on the server (asyncpg's get_size()): not
        those being opened, nor those closing after their ``init=`` failed
        (asyncpg's holder gets a connection once ``init=`` returned)."""
        connected = self.size - self._connecting_count
        if self._closing_count:
            connected -= sum(1 for slot in self._slots if slot.failed_connect)
        return connected

    def server_status(self, now: float) -> ServerStatus:
        """UP while connects succeed; DOWN while they fail and no connection
        serves; BACKING_OFF while they fail and connections serve, until the
        failure view goes stale (:meth:`failure_stale`): UP again then, and
        from then on (``failure_went_stale``) until the next failure."""
        # A connect that failed in init= reached the server: it is up. Once
        # the failure view went stale, losing a connection since (to
        # max_inactive_lifetime, or the server ending it) is no connect
        # failure either: still up.
        if self.connect_failures == 0 or self.init_failing or self.failure_went_stale:
            return ServerStatus.UP
        if self._serving() == 0:
            # (Never goes stale: an acquire, or health()'s probe, connects
            # anyway and refreshes the view.)
            return ServerStatus.DOWN
        if self.failure_stale(now):
            return ServerStatus.UP
        return ServerStatus.BACKING_OFF

    def wants_connection(self) -> bool:
        """Whether the pool wants a connection now, as :meth:`_plan_connects`
        (and :meth:`next_deadline`'s next probe) and the min_size upkeep see
        it: a connect is under way, a task waits (with a queue policy: an
        eligible one) and the pool has room for one, or the pool is below
        min_size (:meth:`floor_deficit`). (Tasks waiting on a full pool wait
        for a release: no connect is planned for them.)"""
        return bool(self._connecting_count) or self.floor_deficit() or self._tasks_need_a_connect()

    def _tasks_need_a_connect(self) -> bool:
        """A task waits (with a queue policy: an eligible one) and the pool
        has room to open a connection for it."""
        waiting = self._waiting if self._policy is None else self._policy.eligible
        return bool(waiting) and len(self._slots) < self.max_size

    def stale_failure_at(self) -> float:
        """When the last failed connect stops speaking for the server if the
        pool wants no connection by then: STALE_FAILURE_AFTER after it
        failed, and not before its backoff ends."""
        return max(self.backoff_until, self.connect_failed_at + STALE_FAILURE_AFTER)

    def failure_stale(self, now: float) -> bool:
        """Connects failed, but no connect will refresh that view: the pool
        wants no connection (:meth:`wants_connection`) and the last failure
        is STALE_FAILURE_AFTER old, its backoff over. (The failure counts,
        backoff and breaker are kept: the next connect meets them.)"""
        return not self.wants_connection() and now >= self.stale_failure_at()

    def oldest_waiter_age(self, now: float) -> float:
        """How long the longest-waiting live task has waited (0.0 if none)."""
        for waiter in self._waiters:
            if waiter.state is W.WAITING:
                return now - waiter.enqueued_at
        return 0.0

    def waiting_futures(self) -> list[Any]:
        """The futures of the tasks waiting for a connection, oldest first."""
        return [waiter.future for waiter in self._waiters if waiter.state is W.WAITING]

    def leases(self) -> Iterator[Lease]:
        """The open leases, in the order they were taken (by id). Each is its
        slot's ``lease`` (no table of its own: a lease costs the hot path no
        dict insert and delete)."""
        return iter(sorted((slot.lease for slot in self._slots if slot.lease is not None), key=_lease_id))

    def slots(self) -> Iterator[Slot]:
        return iter(list(self._slots))

    # ------------------------------------------------------------ transitions

    def _new_id(self) -> int:
        return next(self._ids)

    def _move(self, slot: Slot, new: SlotState) -> None:
        old = slot.state
        if new not in _TRANSITIONS[old]:
            raise InternalStateError(f"illegal transition {old.value} -> {new.value} for {slot!r}")
        if old is S.CONNECTING:
            self._connecting_count -= 1
            if slot.abandoned:
                self._abandoned_count -= 1
        elif old is S.CLOSING:
            self._closing_count -= 1
        if new is S.CLOSING:
            self._closing_count += 1
            if slot.expires_at is not None:  # (its max_lifetime timer goes stale)
                slot.expires_at = None
                self._timer_dropped()
        slot.state = new

    # ----------------------------------------------------------------- acquire

    def try_acquire(self, now: float, site: str | None = None) -> Lease | None:
        """Lease an idle connection at once, or return None (then enqueue)."""
        if self.closing:
            raise Closed
        if self._policy is not None:
            return self._policy_try_acquire(now, site)
        # Never jump the queue: while anybody waits, newcomers wait too
        # (but for tasks waiting on connects of their own, as in asyncpg).
        if self._waiting and self._waiting > self._bound:
            return None
        idle = self._idle
        while idle:
            slot = idle.pop()
            if slot.generation != self.generation:
                self._start_close(slot)
                continue
            # The hot path: _move(IDLE -> LEASED) and _open_lease (and the
            # acquire site, when the caller named one), inlined
            # (a legal move by the table, and neither state is counted).
            slot.state = S.LEASED
            self.wait_times.zeros += 1  # record(0.0), filed when read (see Histogram)
            lease = Lease(next(self._ids), slot, now, site)
            slot.lease = lease
            return lease
        return None

    def enqueue(self, future: Any, now: float, timeout: float | None, site: str | None = None) -> Waiter:
        """Queue a waiter behind the others (FIFO); raises if it must not wait."""
        if self.closing:
            raise Closed
        # max_waiters bounds the tasks queued behind busy connections: those a
        # connect under way, or one the pool may still open, will serve, are
        # not an overload (else max_waiters=0 could never open a connection).
        if self._admission:  # (else none of the three checks below applies: one test)
            room = 0  # (read below only with a policy, which makes _admission true)
            if self.max_waiters is not None or self._policy is not None:
                if self.max_waiters is not None and self._policy is not None:
                    # A standing adaptive queue sheds its stale waiters first:
                    # they, not the newcomer (served first: adaptive LIFO), go.
                    self._policy.shed_standing(now)
                room = max(0, self.max_size - self._live()) + self._connecting_count
                if self.max_waiters is not None and (
                    self._waiting >= self.max_waiters + room
                    if self._policy is None
                    else self._policy.queued_behind(site, self._waiting, room) > self.max_waiters
                ):
                    self.counters.overload_rejections += 1
                    raise Overloaded
            if (
                self.breaker_threshold is not None
                and self.server_failures >= self.breaker_threshold
                and self._serving() == 0
                and now < self.backoff_until
            ):
                # Circuit open: nothing to hand out and no connect will be tried
                # before backoff_until, so waiting could only end in a timeout.
                if not self._live_connects():
                    self.counters.unavailable_rejections += 1
                    raise Unavailable(self.last_connect_error, self.backoff_until - now)
        waiter = Waiter(future, now, None if timeout is None else now + timeout, site)
        if self._policy is not None:
            self._policy_admit(waiter, now, timeout, room)
        self._waiters.append(waiter)
        self._waiting += 1
        if waiter.deadline is not None:
            self._push_timer(waiter.deadline, _WAITER_DEADLINE, waiter)
        # (With a full pool and no connect under way, _plan_connects has
        # nothing to do: the contended hot path.)
        if len(self._slots) < self.max_size or self._connecting_count > self._bound:
            self._plan_connects(now, arrival=True)
            if self._connecting_count:
                self.connects_to_watch = True
        return waiter

    def claim(self, waiter: Waiter, now: float) -> Lease:
        """The granted waiter's task resumed: its reserved slot becomes a lease."""
        slot = waiter.slot
        if waiter.state is not W.GRANTED or slot is None:
            raise InternalStateError(f"claim of a waiter in state {waiter.state.value}")
        if slot.state is not S.RESERVED:
            # The connection died (discard) between the grant and the task
            # resuming: the waiter holds nothing and must try again.
            waiter.slot = None
            waiter.state = W.FAILED
            if self._policy is not None:
                self._policy_released(waiter.site, now, plan=True)
            raise SlotLost
        # The contended hot path: _move(RESERVED -> LEASED), inlined (a legal
        # move by the table, checked just above; neither state is counted).
        slot.state = S.LEASED
        # wait_times.record(...), filed when read or FOLD_AT values on (see Histogram)
        waits = self.wait_times.pending
        waits.append(now - waiter.enqueued_at)
        if len(waits) >= _FOLD_AT:
            self.wait_times.fold()
        # _open_lease, inlined (the contended hot path).
        lease = Lease(next(self._ids), slot, now, waiter.site)
        slot.lease = lease
        return lease

    def setup_timed_out(self) -> None:
        """An acquire's ``timeout`` ran out while its ``setup=`` hook ran (the
        caller gets ``PoolTimeoutError``, as one that ran out waiting)."""
        self.counters.acquire_timeouts += 1

    def delivered(self, waiter: Waiter, breaker_open: bool = False, shed: bool = False) -> None:
        """The task of a waiter the core timed out, shed or refused resumed
        with that error: count it now. The counters count what callers got,
        once they got it: a task cancelled before it resumed (its future was
        done first, or a cancellation reached it in the same loop turn:
        ``wait_for`` or an ``asyncio.timeout`` with the same deadline) leaves
        with ``CancelledError`` and is never counted. Counted at the
        decision and taken back then, the counter went down between two
        reads (a scrape in between saw a Prometheus counter reset)."""
        # ``shed``: the error was the adaptive queue's PoolOverloadedError;
        # ``breaker_open``: the fail-fast ServerUnavailableError.
        c = self.counters
        if waiter.state is W.TIMED_OUT:
            c.acquire_timeouts += 1
        elif waiter.state is W.FAILED and shed:
            c.shed += 1
        elif waiter.state is W.FAILED and breaker_open:
            c.unavailable_rejections += 1

    def cancel_waiter(self, waiter: Waiter, now: float) -> None:
        """The waiting task was cancelled (or gave up). Safe at any point."""
        if waiter.state is W.WAITING:
            waiter.state = W.CANCELLED
            self._waiting -= 1
            if waiter.deadline is not None:
                self._timer_dropped()
            if self._policy is not None:
                self._policy.remove(waiter, now)
            if waiter.connect is not None:
                self._unbind(waiter)
                self._adopt()
            self._compact_waiters()
        elif waiter.state is W.GRANTED and waiter.slot is not None:
            # Granted but never claimed: pass the connection on untouched.
            slot, waiter.slot = waiter.slot, None
            waiter.state = W.CANCELLED
            if self._policy is not None:
                self._policy_released(waiter.site, now, plan=True)
            if slot.state is S.RESERVED:  # else discarded meanwhile: nothing to pass on
                self._hand_on(slot, now)

    def _open_lease(self, slot: Slot, now: float, site: str | None = None) -> Lease:
        lease = Lease(next(self._ids), slot, now, site)
        slot.lease = lease
        return lease

    def note_caller(
        self, lease: Lease, stack: Captured, task_name: str | None, task_ref: Any
    ) -> None:
        """Who took the lease (with stack capture on): its acquire stack, and
        the acquiring task's name and a weak reference to it."""
        lease._stack = stack
        lease._task_name = task_name
        lease._task_ref = task_ref

    def start_floor(self) -> None:
        """Start-up is over: from now on the pool keeps min_size connections."""
        self.floor_enabled = True

    def arm_lease(self, lease: Lease, lease_timeout: float | None, warn_after: float | None) -> float | None:
        """Start the lease's deadline and leak-suspect clocks (both optional,
        seconds from its acquire). Returns when the first of them falls due
        (None if neither is set), for the I/O layer's timer."""
        due = None
        if lease_timeout is not None:
            due = lease.deadline = lease.acquired_at + lease_timeout
            if not self._deadlines.add(due, lease):
                self._push_timer(due, _LEASE_DEADLINE, lease)
        if warn_after is not None:
            warn_at = lease.warn_at = lease.acquired_at + warn_after
            if not self._warnings.add(warn_at, lease):
                self._push_timer(warn_at, _LEASE_WARNING, lease)
            if due is None or warn_at < due:
                due = warn_at
        return due

    # ----------------------------------------------------------------- release

    def release_outcome(self, lease: Lease, observed: int, marked: bool) -> ReleaseOutcome:
        """The release policy: what becomes of ``lease``'s connection, from
        what the I/O layer observed and whether the lease marked itself
        (``reset_mode="auto"``: its SQL may have changed the session).
        ``observed`` is an :class:`Observed` value (a plain int from the
        adapter's hot path compares the same). (``Leaser.release`` runs
        these two lines inline, a call less per lease: keep them alike.)"""
        if lease.slot.generation != self.generation:
            return Outcome.DISCARD
        # (_release_policy's answer, looked up: see __init__.)
        return self.outcomes[marked][observed]

    def reset_plan(self, marked: bool, in_transaction: bool) -> tuple[bool, bool]:
        """What a reset sends: ``(full, rollback)``, asyncpg's reset query
        and/or a ROLLBACK. The ROLLBACK ends an open transaction, and in
        rollback mode also a marked lease's possible implicit transaction
        (a Parse that no Sync followed: see ``proxy.watch``)."""
        mode = self.reset_mode
        # always_reset: a connection class's own reset query runs after
        # every lease in every mode, as asyncpg's pool runs it (no mode
        # skips your own reset code).
        full = mode == "full" or self.always_reset or (mode == "auto" and marked)
        return full, in_transaction or (marked and not full)

    def release(self, lease: Lease, now: float, outcome: ReleaseOutcome) -> bool:
        """End a lease. Returns True if the I/O layer must reset the connection
        and then call :meth:`reset_done`; otherwise the slot was handed on or
        scheduled for closing."""
        # _close_lease(lease, now, L.RELEASED), inlined (the hot path: a
        # call less per lease); its timers' part stays a call (off it).
        # (The table's states that may move to RELEASED are the open ones,
        # OPEN_LEASE: one set test, no look-up in _LEASE_MOVES. The unit
        # tests check the two agree.)
        old = lease.state
        if old not in OPEN_LEASE:
            raise InternalStateError(f"illegal lease transition {old.value} -> {L.RELEASED.value} for lease {lease.id}")
        lease.state = L.RELEASED
        slot = lease.slot
        slot.lease = None
        times = self.lease_times.pending
        times.append(now - lease.acquired_at)
        if len(times) >= _FOLD_AT:
            self.lease_times.fold()
        if self._policy is not None:
            self._policy_released(lease.site, now)
        if lease.deadline is not None or lease.warn_at is not None:
            self._drop_lease_timers(lease, old, L.RELEASED)
        if outcome is Outcome.NEEDS_RESET:
            # _move(slot, S.RESETTING), inlined (the query lease's hot path):
            # from LEASED, an open lease's slot (check_invariants checks
            # it), the one state the table lets move to RESETTING; neither
            # state is counted.
            slot.state = S.RESETTING
            return True
        if outcome is Outcome.CLEAN:
            self.counters.resets_skipped += 1
            if not self._waiters and slot.generation == self.generation and not self.closing and (
                len(self._slots) - self._closing_count <= self.max_size
            ):
                # The hot path of _hand_on (nobody waits: idle it), inlined.
                slot.state = S.IDLE
                slot.idle_since = now
                self._idle.append(slot)
            else:
                self._hand_on(slot, now)
        else:
            self._start_close(slot)
        return False

    def reclaim(self, lease: Lease, now: float) -> bool:
        """A proxy was garbage collected while leased. Returns True if the
        connection must be reset (always, since nobody knows its state), False if
        the lease had already ended."""
        if lease.state not in OPEN_LEASE:
            return False
        self.counters.leaks_detected += 1
        slot = self._close_lease(lease, now, L.RECLAIMED)
        self._move(slot, S.RESETTING)
        return True

    def reset_done(self, slot: Slot, now: float, ok: bool, wake: bool = True) -> bool | Waiter:
        """A reset (or take-back) ended, ``ok`` or not. Returns False when the
        slot was given up meanwhile (the pool was terminated): nothing to do;
        else True.

        ``wake`` False (the runner's contended hot path, ``Runner.reset_done``):
        when the connection goes to the head waiter and no action was queued
        before, that waiter, granted, is returned instead of True and no
        ``Wake`` is queued for it: the caller wakes it as a ``Wake`` would
        (``Runner.after_hand_on``). Every record is the same either way."""
        if slot.state is not S.RESETTING:
            if slot.state is S.CLOSED or slot.state is S.CLOSING:
                return False
            raise InternalStateError(f"reset_done for {slot!r}")
        if ok:
            self.counters.resets += 1
            if not self._waiters and slot.generation == self.generation and not self.closing and (
                len(self._slots) - self._closing_count <= self.max_size
            ):
                # The hot path of _hand_on (nobody waits: idle it), inlined.
                slot.state = S.IDLE
                slot.idle_since = now
                self._idle.append(slot)
            else:
                return self._hand_on(slot, now, wake) or True
        else:
            self.counters.resets_failed += 1
            self._start_close(slot)
        return True

    def _move_lease(self, lease: Lease, new: LeaseState) -> LeaseState:
        """Move a lease on by the table ``_LEASE_MOVES``; returns its old state."""
        old = lease.state
        if new not in _LEASE_MOVES[old]:
            raise InternalStateError(f"illegal lease transition {old.value} -> {new.value} for lease {lease.id}")
        lease.state = new
        return old

    def _close_lease(self, lease: Lease, now: float, end: LeaseState) -> Slot:
        """End an open lease (``end``: how) and free its slot for the caller's next move."""
        old = lease.state  # _move_lease, inlined (the hot path)
        if end not in _LEASE_MOVES[old]:
            raise InternalStateError(f"illegal lease transition {old.value} -> {end.value} for lease {lease.id}")
        lease.state = end
        slot = lease.slot
        slot.lease = None
        # lease_times.record(...), filed when read or FOLD_AT values on (see Histogram)
        times = self.lease_times.pending
        times.append(now - lease.acquired_at)
        if len(times) >= _FOLD_AT:
            self.lease_times.fold()
        if self._policy is not None:
            self._policy_released(lease.site, now)
        if lease.deadline is not None or lease.warn_at is not None:
            self._drop_lease_timers(lease, old, end)
        return slot

    def _drop_lease_timers(self, lease: Lease, old: LeaseState, end: LeaseState) -> None:
        """An ended lease's timers still pending (``old``: its state before
        ``end``): the deadline unless it fired (the lease expired), the
        warning unless it fired (SUSPECT). Out of their queue, or stale in
        the heap."""
        stale = 0
        if lease.deadline is not None and end is not L.EXPIRED and self._deadlines.entries.pop(lease.id, None) is None:
            stale = 1
        if lease.warn_at is not None and old is L.HELD and self._warnings.entries.pop(lease.id, None) is None:
            stale += 1
        if stale:
            self._timer_dropped(stale)

    def _hand_on(self, slot: Slot, now: float, wake: bool = True, connecting: bool = False) -> Waiter | None:
        """A usable connection is free: give it to the head waiter, or idle it.

        Closes it instead when the pool shrank, closes, or the connection is
        of an expired generation. Returns None; with ``wake`` False and no
        action queued before, the waiter a FIFO grant chose, whose ``Wake``
        is then the caller's to carry out (see :meth:`reset_done`).
        ``connecting``: the slot is CONNECTING (connect_succeeded's), whose
        count the FIFO grant takes down (the other states are not counted)."""
        if (
            self.closing
            or slot.generation != self.generation
            or len(self._slots) - self._closing_count > self.max_size  # _live(), inlined (hot path)
        ):
            self._start_close(slot)
            return None
        if self._policy is not None:
            self._policy_hand_on(slot, now)
            return None
        if self._bound:
            self._hand_on_skipping_bound(slot, now)
            return None
        waiters = self._waiters
        while waiters:
            waiter = waiters.popleft()
            if waiter.state is not W.WAITING:
                continue
            self._waiting -= 1
            waiter.state = W.GRANTED
            waiter.slot = slot
            if waiter.deadline is not None:
                self._timer_dropped()
            # _move(slot, S.RESERVED), inlined (the contended hot path), with
            # no look-up in the table: every caller checked the slot's state
            # (CONNECTING, RESERVED, RESETTING, or LEASED: an open lease's),
            # and each may move to RESERVED.
            if connecting:  # (connect_succeeded's CONNECTING slot; the others are not counted)
                self._connecting_count -= 1
            slot.state = S.RESERVED
            if wake or self.actions:
                self.actions.append(Wake(waiter))
                return None
            return waiter
        self._move(slot, S.IDLE)
        slot.idle_since = now
        self._idle.append(slot)
        return None

    def _hand_on_skipping_bound(self, slot: Slot, now: float) -> None:
        """:meth:`_hand_on`'s last step while some waiters wait for connects
        of their own: the head waiter without one gets the connection (the
        bound ones keep their places in the queue), or it goes idle."""
        if not self._grant_head_unbound(slot) and not self._grant_head_on_lost_connect(slot):
            self._move(slot, S.IDLE)
            slot.idle_since = now
            self._idle.append(slot)

    def _grant_head_on_lost_connect(self, slot: Slot) -> bool:
        """Every waiting task waits on a connect of its own: the one waiting
        longest on a connect presumed lost (started before the connect that
        ended a run of failures: a probe a black hole swallowed, adopted
        after the pool recovered) takes the connection rather than wait out
        that connect's timeout=."""
        lost_before = self.lost_before
        if lost_before == -math.inf:
            return False  # (no recovery yet: nothing to scan)
        for index, waiter in enumerate(self._waiters):
            if waiter.state is W.WAITING and waiter.connect is not None and waiter.connect.created_at < lost_before:
                self._unbind(waiter)
                del self._waiters[index]
                self._grant(slot, waiter)
                return True
        if not any(s.state is S.CONNECTING and s.created_at < lost_before for s in self._slots):
            self.lost_before = -math.inf  # the lost connects have all ended: stop scanning
        return False

    def _grant_head_unbound(self, slot: Slot) -> bool:
        waiters = self._waiters
        for index, waiter in enumerate(waiters):
            if waiter.state is W.WAITING and waiter.connect is None:
                del waiters[index]
                self._grant(slot, waiter)
                return True
        return False

    # ---------------------------------------------------------------- connects

    def _bind(self, waiter: Waiter, slot: Slot) -> None:
        """``slot``'s connect is for ``waiter``: it gets that connection and
        no released one (asyncpg 0.29-0.32: an acquire that finds no
        connection takes an unconnected holder and connects it itself).
        Once a burst of acquires has returned, the connections opened for
        it are therefore open, as on asyncpg's pool."""
        waiter.connect = slot
        slot.owner = waiter
        self._bound += 1

    def _unbind(self, waiter: Waiter) -> Slot:
        """``waiter`` stops waiting for its connect (granted it, gave up, or
        the connect ended); the slot is left without an owner."""
        slot = waiter.connect
        assert slot is not None
        waiter.connect = None
        slot.owner = None
        self._bound -= 1
        return slot

    def _serve_unbound(self, now: float) -> None:
        """A task stopped waiting for its own connect but waits on: an idle
        connection (kept idle while only bound tasks waited) serves it, or a
        connect under way for nobody becomes its own."""
        idle = self._idle
        while idle and self._waiting > self._bound and not self.closing:
            slot = idle[-1]
            if slot.generation != self.generation:
                self._start_close(slot)
                continue
            idle.pop()
            self._grant_head_unbound(slot)
        self._adopt()

    def _unbound_waiter(self, newest: bool) -> Waiter | None:
        """The newest (else the oldest) live waiter without a connect of its own."""
        for waiter in reversed(self._waiters) if newest else self._waiters:
            if waiter.state is W.WAITING and waiter.connect is None:
                return waiter
        return None

    def _adopt(self) -> None:
        """Give connects under way that nobody waits for (opened for min_size,
        or for a task that gave up) to the oldest waiters without one, as
        asyncpg's pool hands the holder of an acquire that gave up to its
        oldest waiter (review h270: the newest was served first, and behind
        a long lease the older waited on)."""
        if self._policy is not None:
            return
        spare = self._connecting_count - self._bound
        if spare <= 0 or self._waiting <= self._bound:
            return
        for slot in sorted(
            (s for s in self._slots if s.state is S.CONNECTING and s.owner is None and not s.abandoned), key=_slot_id
        ):
            waiter = self._unbound_waiter(newest=False)
            if waiter is None:
                return
            slot.adopted = True
            self._bind(waiter, slot)

    def _plan_connects(self, now: float, arrival: bool = False) -> None:
        """Start connects for unmet demand, within max_size and max_connecting:
        each for the oldest waiter without one, or for min_size. asyncpg's
        pool hands a free holder to its oldest waiter, which connects it (a
        closed connection's replacement, a pool grown, the probe after a
        backoff, the connects after one ended). ``arrival``: planned for a
        task that just queued and found no connection, so for the newest
        waiter: asyncpg's acquire opens its own."""
        if self._connecting_count:
            if self._connecting_count > self._bound:
                self._adopt()
            if self._bound and not self._paced():
                self._abandon_lost(now)
            elif self._policy is not None and not self._paced():
                self._abandon_orphans(now)
        if len(self._slots) >= self.max_size or self.closing:
            return  # (the first test: the contended hot path, a full pool)
        paced = self._paced()
        if paced and now < self.backoff_until:
            return
        connecting = self._live_connects()
        # Like asyncpg, open a connection per unserved waiter (up to max_size):
        # resetting connections are not counted as supply, since asyncpg's
        # release holds them for the reset too.
        # (With site caps, only waiters whose site is under its cap.)
        waiting = self._waiting if self._policy is None else self._policy.eligible
        if paced:
            # Half-open: while connects fail, one probe at a time, no storm;
            # once the newest has gone unanswered for the hedge delay, it is
            # presumed lost (a black hole) and another starts beside it.
            if connecting and now < self._hedge_at():
                return
            demand = min(waiting, 1)
            room = 1
        else:
            demand = waiting - connecting
            if self.connect_failures:
                # Unpaced (see _pacing): each waiting task's own connect, as on
                # asyncpg's pool, and a hedge beside those under way once the
                # newest went unanswered for the hedge delay (asyncpg's acquire
                # that gives up aborts its connect; the next one connects anew).
                # Not the floor's: its upkeep retries it on asyncpg's slower
                # schedule (plan_floor_connect()).
                if demand <= 0 < connecting and waiting and now >= self._hedge_at():
                    demand = 1
            elif self.floor_enabled:
                demand = max(demand, self.min_size - self._live())
            room = self.max_size
        room = min(room, self.max_size - self.size)
        if self.max_connecting is not None:
            # (Connects given up, still being cancelled, count here too.)
            room = min(room, self.max_connecting - self._connecting_count)
        for _ in range(min(demand, room)):
            slot = Slot(self._new_id(), self.generation, now)
            self._slots.add(slot)
            self._connecting_count += 1
            if self._policy is None:
                if self._waiting > self._bound:
                    waiter = self._unbound_waiter(newest=arrival)
                    if waiter is not None:
                        self._bind(waiter, slot)
            else:
                slot.trigger = self._untriggered_waiter(newest=arrival)
            self.actions.append(Connect(slot))

    def _untriggered_waiter(self, newest: bool) -> Waiter | None:
        """With a queue policy: the newest (else the oldest) eligible waiting
        task that is no connect's trigger (see ``Slot.trigger``)."""
        triggers = {slot.trigger for slot in self._slots if slot.state is S.CONNECTING}
        policy = self._policy
        assert policy is not None
        for waiter in reversed(self._waiters) if newest else self._waiters:
            if waiter.state is W.WAITING and waiter not in triggers and policy.is_eligible(waiter):
                return waiter
        return None

    def _lost_adopted(self, now: float, delay: float) -> list[Slot]:
        """Connects a waiting task took over (_adopt) under way for ``delay``
        seconds (the hedge delay) by ``now``: presumed lost. (Their start plus
        the delay, not ``now`` minus it: the sum is the timer's deadline
        (:meth:`_lost_adopted_at`), and the difference may round below the
        start, so the timer fired, found nothing due, and was due again.)"""
        return [
            s for s in self._slots
            if s.state is S.CONNECTING and s.adopted and s.owner is not None and not s.answered
            and s.created_at + delay <= now
        ]

    def _abandon_lost(self, now: float) -> None:
        """Unpaced (by default): a connect a task took over (opened for a
        task that gave up, for min_size, or as a hedge) that has gone
        unanswered for the hedge delay is presumed lost (a black hole's):
        it is cancelled (an ``Abandon``), and its task gets a connect of its
        own once that cancellation has ended it (connect_cancelled: until
        then it counts towards max_size, so the pool never has more than
        max_size sockets; the I/O layer cancels at once, so that is within a
        loop iteration or two). asyncpg's pool cancelled it with the
        acquire that gave up, and each acquire connects for itself; kept,
        the connects of acquires that timed out in a black hole held the
        pool's places until their ``timeout=`` (60 s by default) while the
        server answered new ones. (A young one is kept: it may be about to
        answer, and it serves its taker sooner than a new one would.)"""
        delay = self._hedge_delay()
        if delay is None or self.closing:
            return
        while lost := self._lost_adopted(now, delay):
            for slot in lost:
                self._unbind(slot.owner)  # type: ignore[arg-type]
                self._give_up(slot)
            # An idle connection serves its former taker now; else another
            # connect nobody waits for becomes its (lost too, if as old).
            self._serve_unbound(now)

    def _live_connects(self) -> int:
        """Connects under way that the core has not given up (not abandoned)."""
        return self._connecting_count - self._abandoned_count

    def _orphans(self) -> list[Slot]:
        """With a queue policy: the unanswered connects whose trigger no
        longer waits (it gave up, was served, or there was none: min_size's)
        or waits at its site's cap, as many as the eligible waiting tasks
        that no live connect's trigger is, oldest first: the
        ones :meth:`_abandon_orphans` gives up once the hedge delay has passed.
        Empty while the pool closes."""
        if self.closing:
            return []
        policy = self._policy
        assert policy is not None
        orphans = []
        backed = 0
        for slot in self._slots:
            if slot.state is not S.CONNECTING:
                continue
            if slot.abandoned:
                # Given up, still being cancelled: its end plans the connect
                # of the task it was counted for, so it backs that task still.
                # (Not counted, the next orphan as old was named for the same
                # task, due at the instant the timer had fired: the timer
                # fired again there, once per orphan, and gave up a connect
                # that might still answer.)
                backed += 1
                continue
            trigger = slot.trigger
            if trigger is not None and trigger.state is W.WAITING and policy.is_eligible(trigger):
                backed += 1
            elif not slot.answered:
                # (Also a connect whose task waits at its site's cap: that
                # task cannot take its connection, an eligible one would. It
                # counts as supply while young, as a connect nobody waits
                # on; once presumed lost it is cancelled, so the eligible
                # task gets one of its own. Counted as backing a task, it
                # kept an eligible task waiting beside it until its
                # timeout=, 60 s, after a black hole healed.)
                orphans.append(slot)
        spare = policy.eligible - backed
        if spare <= 0 or not orphans:
            return []
        orphans.sort(key=_slot_id)  # (ids are given in creation order)
        return orphans[:spare]

    def _abandon_orphans(self, now: float) -> None:
        """With a queue policy (unpaced): the queue's counterpart of
        :meth:`_abandon_lost`. A connect has no owner there (the policy picks
        the task for each connection), so a connect whose trigger no longer
        waits (an acquire that timed out in a black hole) and that has gone
        unanswered for the hedge delay is presumed lost and cancelled (an
        ``Abandon``), while eligible tasks wait that no other connect was
        opened for; their connects start once its cancellation has ended it
        (:meth:`connect_cancelled`: until then it counts towards max_size).
        Kept, such connects held the pool's places until their ``timeout=``
        (60 s by default) after the network healed."""
        delay = self._hedge_delay()
        if delay is None:
            return
        for slot in self._orphans():
            if slot.created_at + delay > now:  # (as next_deadline's sum: see _lost_adopted)
                break  # (the rest are younger)
            self._give_up(slot)

    def _give_up(self, slot: Slot) -> None:
        """Presume ``slot``'s connect lost (:meth:`_abandon_lost`,
        :meth:`_abandon_orphans`): nobody's now, the I/O layer cancels it (an
        ``Abandon``), and it counts towards max_size until its end is
        reported (``_abandoned_count``)."""
        slot.abandoned = True
        slot.adopted = False
        slot.trigger = None
        self._abandoned_count += 1
        self.actions.append(Abandon(slot))

    def _lost_orphan_at(self) -> float | None:
        """With a queue policy: when the oldest connect :meth:`_abandon_orphans`
        would give up is presumed lost; None if there is none, or no hedging."""
        delay = self._hedge_delay()
        if delay is None:
            return None
        orphans = self._orphans()
        return orphans[0].created_at + delay if orphans else None

    def _lost_adopted_at(self) -> float | None:
        """When the oldest connect a waiting task took over is presumed lost
        (:meth:`_abandon_lost`); None if there is none, or no hedging."""
        delay = self._hedge_delay()
        if delay is None:
            return None
        adopted = self._lost_adopted(math.inf, delay)
        if not adopted:
            return None
        return min(s.created_at for s in adopted) + delay

    def _pacing(self) -> bool:
        """Whether connects for waiting tasks are paced while connects fail
        (one probe at a time after the backoff, and a failure with nothing
        left fails every waiting task): with ``fail_fast`` (the breaker needs
        probes), unless the last failure was the ``init=`` hook's (the server
        answered), and with ``wait_on_connect_error`` (a task that waits on
        after its connect failed would otherwise get another at once, and
        another). Otherwise none, as on asyncpg's pool (0.32), whose acquire
        connects its holder itself: a failed connect fails only the task it
        was for, and each other waiting task gets one of its own at once,
        so a server that stays down costs a connect per acquire, as there."""
        return self.wait_on_connect_error or (self.breaker_threshold is not None and not self.init_failing)

    def _paced(self) -> bool:
        """Whether connects are paced now: they failed (the backoff level is
        up) and the pool paces them (:meth:`_pacing`)."""
        return self.backoff_level > 0 and self._pacing()

    def _hedge_at(self) -> float:
        """While connects fail, when another connect may start beside those
        under way: the hedge delay (:meth:`_hedge_delay`) after the newest
        one started, and not before ``backoff_until``; infinity if hedging
        is off."""
        delay = self._hedge_delay()
        if delay is None:
            return math.inf
        newest = max(s.created_at for s in self._slots if s.state is S.CONNECTING and not s.abandoned)
        return max(self.backoff_until, newest + delay)

    def _hedge_delay(self) -> float | None:
        """Seconds a connect may go unanswered before it is presumed lost:
        ``Backoff.hedge_after``, at least twice the slowest connect that
        succeeded, or failed with the server's or the init= hook's answer,
        since the last success; None if hedging is off."""
        hedge_after = self.backoff.hedge_after
        if hedge_after is None:
            return None
        return max(hedge_after, 2 * max(self.connect_times.max, self.failed_answer_max))

    def floor_deficit(self) -> bool:
        """Whether the pool is below min_size (once the floor is enabled)."""
        return self.floor_enabled and not self.closing and self._live() < self.min_size

    def plan_floor_connect(self, now: float) -> Slot | None:
        """One connect towards min_size, for the I/O layer's floor upkeep
        after failures (asyncpg 0.32 retries the floor after 1, 2, 4 ... 60 s).
        None when the floor is met, or a connect is already under way."""
        if not self.floor_deficit() or self._connecting_count or self.size >= self.max_size:
            return None
        slot = self.add_connecting(now)
        # A task that arrived during the backoff has no connect of its own:
        # this one becomes its (as any connect nobody waits for).
        self._adopt()
        return slot

    def add_connecting(self, now: float) -> Slot:
        """Reserve a place for an explicit connect (pool start-up)."""
        if self.size >= self.max_size:
            raise InternalStateError("add_connecting beyond max_size")
        slot = Slot(self._new_id(), self.generation, now)
        self._slots.add(slot)
        self._connecting_count += 1
        return slot

    def connect_succeeded(self, slot: Slot, connection: Any, now: float) -> bool:
        """The connect finished. Returns False when it was abandoned meanwhile
        (the pool terminated, or the core gave it up: an ``Abandon``): the
        I/O layer then aborts the connection."""
        if slot.state is not S.CONNECTING:
            if slot.state is S.CLOSED:
                return False
            raise InternalStateError(f"connect_succeeded for {slot!r}")
        if slot.abandoned:
            self.connect_cancelled(slot, now)  # (its hook ignored the cancellation)
            return False
        slot.connection = connection
        started = slot.created_at  # when the connect was planned
        failing = self.connect_failures
        self.connect_times.record(now - started)
        slot.created_at = now
        self.counters.connections_opened += 1
        if self.max_lifetime is not None:
            self._arm_lifetime(slot, now)
        self.connect_failures = 0
        self.backoff_level = 0
        self.connect_refusals = 0
        self.connect_failed_at = -math.inf
        self.failed_answer_max = 0.0
        if failing:
            self.lost_before = started
        self.server_failures = 0
        self.init_failing = False
        self.connect_misconfigured = False
        self.backoff_until = 0.0
        self.failure_went_stale = False
        slot.trigger = None
        owner = slot.owner
        if owner is None:
            # (A hedge that answered for nobody: with every task waiting on
            # a connect of its own, one waiting on a connect started before
            # it, presumed lost, takes it: _grant_head_on_lost_connect.)
            self._hand_on(slot, now, connecting=True)
        else:
            self._unbind(owner)
            if self.closing or slot.generation != self.generation or self._live() > self.max_size:
                self._hand_on(slot, now, connecting=True)  # (it closes the connection; the owner waits on)
                self._serve_unbound(now)
            else:
                self._grant(slot, owner)  # (the owner stays in the queue, settled: skipped lazily)
                self._compact_waiters()
        self._plan_connects(now)
        return True

    def connect_failed(
        self, slot: Slot, now: float, error: BaseException, refused: int = NOT_REFUSED, in_init: bool = False,
        connection: Any = None, program: bool = False,
    ) -> bool:
        """The connect failed (a no-op if it was abandoned meanwhile).
        Unless connects are paced (:meth:`_pacing`), the error is the
        task's whose connect it was (without an owner: the newest waiting
        task's), and only its; the others wait on, each for a connect of its
        own, opened now (asyncpg 0.32's acquire connects its holder itself
        and raises its own connect's error; the next acquire connects
        again). So the connects are as many as the acquires that fail, as
        on asyncpg's pool; the min_size upkeep keeps its own schedule.
        ``refused``: ``REFUSED``, ``UNREACHABLE``, ``BROKEN``, ``UNRESOLVED``
        (see :class:`Backoff`).
        ``in_init``: the connection was open and the ``init=`` hook raised.
        The server answered: no pacing under ``fail_fast`` (only
        ``wait_on_connect_error``'s), and it does not count toward the
        breaker: the hook's error, not ServerUnavailableError, is what
        acquires get.
        ``connection``: that connection, still open: the slot closes it
        (a ``Close``; still counted, as any closing slot, until
        :meth:`closed`) while its waiters get the error now. Returns False
        when the slot was abandoned (the I/O layer then aborts
        ``connection``). ``program``: the connect failed on the program's
        own mistake (``_internals.program_error``: a misspelled connect
        keyword): as an ``init=`` error, it fails its own task only, with no
        backoff (the server was not asked; asyncpg's acquire raises it at
        once), and does not count toward the breaker, which would answer
        "the server is down" for it."""
        if slot.state is not S.CONNECTING:
            if slot.state is S.CLOSED:
                return False
            raise InternalStateError(f"connect_failed for {slot!r}")
        if slot.abandoned:
            # Given up (an Abandon), its hook turned the cancellation into
            # an error: no failure of the server's, nor any task's.
            self.connect_cancelled(slot, now)
            return False
        owner, trigger = slot.owner, slot.trigger
        slot.trigger = None
        if owner is not None:
            self._unbind(owner)
        if connection is None:
            self._move(slot, S.CLOSED)
            self._slots.discard(slot)
        else:
            slot.connection = connection
            slot.failed_connect = True
            self._start_close(slot)
        self.counters.connect_errors += 1
        self.connect_failures += 1
        if in_init:
            self.server_failures = 0
        elif not program:
            self.server_failures += 1
        self.init_failing = in_init
        self.connect_misconfigured = program
        self.last_connect_error = error
        # News: the failure view is fresh, and goes stale at its own moment
        # (a timer, so the server_status event comes then, connect or none).
        # Only while connections serve: "down" (none left: only a connect
        # brings one back, and its outcome is news) never goes stale. An
        # init= failure does (init_failing then reads False in stats(): the
        # status was "up" all along).
        self.failure_went_stale = False
        if not self._stale_check and self._serving():
            self._stale_check = True
            self._push_timer(now + STALE_FAILURE_AFTER, _STALE_FAILURE, True)  # (not None: advance() stops at None)
        # A connect that started before the last failure was under way with
        # it: its failure is the same news and does not raise the backoff
        # (ten connects refused by one restart wait as one did). The delay
        # runs from the attempt's start, not its end ("back off the start
        # time of connection attempts": gRPC's connection backoff protocol,
        # doc/connection-backoff.md): a connect that hung until its timeout
        # has waited out its delay already, so the next one starts at once,
        # at most one per timeout (one probe at a time while connects fail).
        # A connect its owner took over (_adopt: opened for min_size, or for
        # a task that gave up) is not the one its acquire opened: on
        # asyncpg's pool the hook ran in that other acquire (cancelled with
        # it), and this task's acquire connects for itself.
        # A mistake of the program's (``program``) is treated as an init=
        # hook's error: the server was not asked (it costs no login), and
        # asyncpg's acquire raises it at once, each time.
        adopted = owner is not None and slot.adopted
        if (in_init or program) and (
            adopted or not self.wait_on_connect_error
            or (self._serving() == 0 and not self._live_connects())
        ):
            # The server answered: its backoff is over, and the next task's
            # connect starts now (see above). The answer's time still counts
            # toward the hedge delay, should the server fail next.
            if in_init:
                self.failed_answer_max = max(self.failed_answer_max, now - slot.created_at)
            self.connect_failed_at = now
            self.backoff_level = self.connect_refusals = 0
            self.backoff_until = 0.0
            self._fail_own_task(owner, trigger, adopted, error, now)
            return True
        # (With wait_on_connect_error, while connections serve, the owner
        # waits on: no acquire fails, so the next connect backs off as after
        # any failure, one probe at a time; at once, a hook that always
        # fails would be a login storm for as long as a task waits.)
        if in_init:
            refused = NOT_REFUSED  # (the server answered: a timeout in init= is the hook's)
        if refused == NOT_REFUSED or refused == REFUSED:
            # The server answered (slowly, perhaps): not a black hole. (A
            # broken connect's age is when the path broke, not an answer: a
            # black hole's connects, reset as it heals, are not slow ones.)
            self.failed_answer_max = max(self.failed_answer_max, now - slot.created_at)
        news = slot.created_at >= self.connect_failed_at
        self.connect_failed_at = now
        # Refusals and broken connects count in a row of their own: the
        # first after a black hole (or other failures) is retried soon.
        quick = refused == REFUSED or refused == BROKEN or refused == UNRESOLVED
        if quick:
            self.connect_refusals += news or not self.connect_refusals
        else:
            self.connect_refusals = 0
        self.backoff_level += news or not self.backoff_level
        self.backoff_until = max(self.backoff_until, slot.created_at + self.backoff.delay(
            self.connect_refusals if quick else self.backoff_level, refused
        ))
        if not self._pacing():
            # asyncpg's pool (0.32): the error is the acquire's whose connect
            # it was, and each other waiting task connects for itself, now.
            # (The backoff above is only for the pacing modes, should one
            # apply after the next failure.) A connect its owner took over
            # (_adopt) is not its acquire's: asyncpg's pool cancelled it with
            # the acquire that gave up, and this task's acquire connects for
            # itself, as for an init= error above (a black hole's connect,
            # reset as it heals, failed the task that arrived after the heal).
            self._fail_own_task(owner, trigger, adopted, error, now)
            return True
        # A closing connection will not come back: it does not count.
        breaker_open = self.breaker_threshold is not None and self.server_failures >= self.breaker_threshold
        if self._serving() == 0 and (not self._live_connects() or breaker_open):
            # Nothing will come back to the waiters before the next attempt:
            # fail them now rather than let them wait out their timeouts.
            # (With the circuit open, connects under way do not hold them
            # either: hedges beside a lost probe, one starting every
            # hedge_after, would otherwise keep fail_fast's waiters waiting
            # to their timeouts through a black hole.)
            self._fail_waiters(error, breaker_open)
        elif not self.wait_on_connect_error:
            self._fail_owner(owner, trigger, error)
        elif owner is not None:
            self._serve_unbound(now)  # the owner waits on, for any connection
        if now >= self.backoff_until:
            self._plan_connects(now)  # (the attempt outlasted its delay: the next starts now)
        return True

    def connect_answered(self, slot: Slot) -> None:
        """The connect's connection is open (the server answered; ``init=``
        runs next): a connect taken over is then not presumed lost."""
        slot.answered = True

    def connect_cancelled(self, slot: Slot, now: float | None = None) -> None:
        """The connect was abandoned (pool terminated, or a KeyboardInterrupt
        in it): not a server failure. Outside a close, its task waits on:
        an idle connection or a new connect serves it (``now`` given)."""
        if slot.state is S.CONNECTING:
            owner = slot.owner
            slot.trigger = None
            if owner is not None:
                self._unbind(owner)
            self._move(slot, S.CLOSED)
            self._slots.discard(slot)
            if (owner is not None or slot.abandoned) and now is not None and not self.closing:
                # (An abandoned one's end frees its place: its former taker,
                # and any other waiting task, get connects of their own. With
                # a queue policy no idle connection waits for an eligible
                # task, and the default queue's serving would hand one past
                # the policy: to a task at its site's cap.)
                if self._policy is None:
                    self._serve_unbound(now)
                self._plan_connects(now)

    def _fail_own_task(
        self, owner: Waiter | None, trigger: Waiter | None, adopted: bool, error: BaseException, now: float
    ) -> None:
        """asyncpg's way (a failed connect is its own acquire's): fail the
        task the connect was for (:meth:`_fail_owner`), unless its owner
        took it over (``adopted``: it waits on, for a connect of its own),
        and plan the connects of the tasks still waiting."""
        if adopted:
            self._serve_unbound(now)
        else:
            self._fail_owner(owner, trigger, error)
        self._plan_connects(now)

    def _fail_owner(self, owner: Waiter | None, trigger: Waiter | None, error: BaseException) -> None:
        """Fail the task a failed connect was for (unbound already); with a
        queue policy its ``trigger`` if it still waits (none if it gave up:
        asyncpg's acquire that gives up cancels its connect, whose error
        nobody gets); else the newest waiting task (:meth:`_fail_newest_waiter`)."""
        if owner is None:
            if self._policy is None:
                self._fail_newest_waiter(error)
            elif trigger is not None and trigger.state is W.WAITING:
                self._settle_failed(trigger, error)
                self._waiting -= 1
            return
        self._settle_failed(owner, error)
        self._waiting -= 1
        self._adopt()

    def _fail_newest_waiter(self, error: BaseException) -> None:
        """Fail the task whose arrival a failed connect without an owner was
        for: the newest waiting one (those before it are first in line for
        released connections); never a task waiting on a connect of its own."""
        for waiter in reversed(self._waiters):
            if waiter.state is W.WAITING and waiter.connect is None:
                self._settle_failed(waiter, error)
                self._waiting -= 1
                return

    def _settle_failed(self, waiter: Waiter, error: BaseException, breaker_open: bool = False) -> None:
        waiter.state = W.FAILED
        if waiter.connect is not None:
            self._unbind(waiter)
        if self._policy is not None:
            self._policy.remove(waiter)
        if waiter.deadline is not None:
            self._timer_dropped()
        # (unavailable_rejections counts it once its task gets it: delivered())
        self.actions.append(Fail(waiter, error, breaker_open))

    def _fail_waiters(self, error: BaseException, breaker_open: bool = False) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if waiter.state is W.WAITING:
                self._settle_failed(waiter, error, breaker_open)
        self._waiting = 0

    # ------------------------------------------------------------------ closes

    def _start_close(self, slot: Slot, idle_expired: bool = False) -> None:
        if slot.state is S.IDLE:
            self._idle.remove(slot)  # O(n) but rare: expiry, shrink, close
        self._move(slot, S.CLOSING)
        self.actions.append(Close(slot, idle_expired))

    def discard(self, slot: Slot, now: float) -> None:
        """Close a slot now (broken connection noticed, pool terminate)."""
        if slot.state in (S.CLOSING, S.CLOSED, S.CONNECTING):
            return
        if slot.lease is not None:
            self.counters.leases_discarded += 1
            self._close_lease(slot.lease, now, L.DISCARDED)
        self._start_close(slot)

    def closed(self, slot: Slot, now: float) -> bool:
        """The connection of a CLOSING slot is gone: free its place. Returns
        False if it was freed already (terminate() aborted it first)."""
        if slot.state is S.CLOSED:
            return False
        self._move(slot, S.CLOSED)
        self._slots.discard(slot)
        if not slot.failed_connect:
            self.counters.connections_closed += 1
        self._plan_connects(now)  # (a replacement: the head waiter's, FIFO)
        return True

    def connection_lost(self, slot: Slot, now: float) -> bool | None:
        """The I/O layer saw the slot's connection die. An idle, reserved or
        leased slot is discarded (returns whether it was leased: its backend
        may still run the lease's query); None when a task already owns the
        slot's outcome (a connect, reset or close under way), or it is gone."""
        if slot.state not in _LOSABLE:
            return None
        was_leased = slot.state is S.LEASED
        self.discard(slot, now)
        return was_leased

    def terminate(self, now: float) -> list[Slot]:
        """Give up every slot at once (``Pool.terminate()``; the phase is
        already CLOSING). Connects under way are abandoned, open slots are
        discarded (their Close actions follow), and the slots already closing
        are returned: their close tasks are cancelled, so the I/O layer aborts
        those connections and reports :meth:`closed` itself."""
        closing = []
        for slot in list(self._slots):
            if slot.state is S.CONNECTING:
                self.connect_cancelled(slot)
            elif slot.state is S.CLOSING:
                closing.append(slot)
            else:
                self.discard(slot, now)
        return closing

    def connect_args_changed(self, now: float) -> None:
        """New connect arguments (``set_connect_args()``): the next connect
        tries them at once, as asyncpg's pool's next acquire does, instead
        of waiting out the backoff the old ones earned (review h270). The
        run of failures is kept: should the new ones fail too, the breaker
        opens again at the first failure (a half-open probe)."""
        self.backoff_until = 0.0
        self.backoff_level = self.connect_refusals = 0
        if not self.closing and self.phase is Phase.OPEN:
            self._plan_connects(now)  # (waiters held for the backoff connect now)

    def expire_connections(self) -> None:
        """Connections opened before now are replaced instead of reused."""
        self.generation += 1
        for slot in list(self._idle):
            self._start_close(slot)

    def set_phase(self, phase: Phase) -> None:
        """Move the pool's lifecycle on (the table ``_PHASES`` lists the legal moves)."""
        if phase not in _PHASES[self.phase]:
            raise InternalStateError(f"illegal phase change {self.phase.value} -> {phase.value}")
        self.phase = phase
        self.closing = phase is Phase.CLOSING or phase is Phase.CLOSED

    @property
    def started(self) -> bool:
        """asyncpg's "initialized": past start-up, successfully or not."""
        return self.phase is not Phase.NEW and self.phase is not Phase.STARTING

    def begin_close(self, error: BaseException) -> None:
        """Refuse new acquires, fail waiters, close idle connections.
        Leased ones close as they come back."""
        if self.phase is not Phase.CLOSED:
            self.set_phase(Phase.CLOSING)
        self._fail_waiters(error)
        for slot in list(self._idle):
            self._start_close(slot)

    def resize(self, max_size: int, now: float, min_size: int | None = None) -> None:
        """New sizes (``Pool.resize()``; checked by the caller)."""
        self.max_size = max_size
        if min_size is not None:
            self.min_size = min_size
        if self.min_size > max_size:
            self.min_size = max_size
        # Shrink: idle ones go now (oldest first), leased ones as they return.
        while self._live() > max_size and self._idle:
            self._start_close(self._idle[0])
        if self._policy is not None and self._policy.set_max_size(max_size, now):
            self._serve_idle(now)
        self._plan_connects(now)

    # ------------------------------------------------------------------ timers

    def _push_timer(self, when: float, kind: int, obj: Any) -> None:
        heapq.heappush(self._timers, (when, next(self._ids), kind, obj))

    def _arm_lifetime(self, slot: Slot, now: float) -> None:
        """Start the max_lifetime clock of a connection opened at ``now``. It
        runs out between ``1 - LIFETIME_JITTER`` and 1 times ``max_lifetime``
        later: the n-th connection the pool opened gets the n-th point of
        the golden-ratio sequence ``frac(n * 0.618...)`` of that range, so
        connections opened together (at start-up, after a restart) leave
        spread evenly over it, not at once (with none drawn at random: a
        test can tell when each leaves)."""
        spread = (self.counters.connections_opened * _GOLDEN) % 1.0
        slot.expires_at = when = now + self.max_lifetime * (1.0 - LIFETIME_JITTER * spread)  # type: ignore[operator]
        self._push_timer(when, _SLOT_EXPIRY, slot)

    def _retire(self, slot: Slot, now: float) -> None:
        """A connection's max_lifetime ran out: closed now if idle, else
        when its lease (or the reset after it) ends. An open lease keeps
        its connection: no statement is cut short.

        Not while connects fail (the server refuses or cannot be reached):
        a working connection is worth more than a fresh one the pool cannot
        open, so it stays, and its lifetime is looked at again
        RETIRE_RETRY seconds later, until a connect has succeeded. (A
        server full of another client's connections, the incident's, would
        otherwise take this pool's too, one lifetime at a time.)"""
        if self.connect_failures:
            slot.expires_at = when = now + RETIRE_RETRY
            self._push_timer(when, _SLOT_EXPIRY, slot)
            return
        slot.expires_at = None
        self.counters.connections_retired += 1
        if slot.state is S.IDLE:
            self._start_close(slot)
        else:
            slot.generation = _RETIRED

    def retire_in_use(self, slot: Slot) -> None:
        """Close ``slot``'s connection when its reset (or take-back) ends
        instead of handing it on: it reached ``max_queries`` outside a
        release (taken back, reclaimed). The retired generation, as for a
        ``max_lifetime`` run out in use."""
        if slot.state is S.RESETTING:
            slot.generation = _RETIRED

    def _timer_live(self, kind: int, obj: Any) -> bool:
        if kind == _SLOT_EXPIRY:
            return obj.expires_at is not None
        if kind == _WAITER_DEADLINE:
            return bool(obj.state is W.WAITING)
        if kind == _LEASE_DEADLINE:
            return obj.state in OPEN_LEASE
        if kind == _STALE_FAILURE:
            return True  # (one at most, _stale_check: it looks when it fires)
        return obj.state is L.HELD

    def _timer_dropped(self, entries: int = 1) -> None:
        """``entries`` of the timer heap stopped being live (a waiter left the
        queue, a lease ended): the one place that counts stale entries. Past
        a few, the stale ones at the head are popped (leases mostly end in
        the order their timers were armed, so that is usually all of them:
        an ended lease, its captured stack included, is not kept alive for
        long); the heap is compacted once stale entries are most of it."""
        self._stale_timers += entries
        if self._stale_timers > 8:
            self._pop_stale_head()
            if self._stale_timers > 64 and self._stale_timers > len(self._timers) // 2:
                self._compact_timers()

    def _pop_stale_head(self) -> None:
        """Pop the stale entries at the head of the timer heap."""
        timers = self._timers
        while timers and not self._timer_live(timers[0][2], timers[0][3]):
            heapq.heappop(timers)
            self._stale_timers -= 1

    def _compact_timers(self) -> None:
        # In place: advance() and next_deadline() hold the list while popping.
        self._timers[:] = [t for t in self._timers if self._timer_live(t[2], t[3])]
        heapq.heapify(self._timers)
        self._stale_timers = 0

    def _compact_waiters(self) -> None:
        # Settled waiters are skipped lazily, but not kept for good: each
        # holds its future, and a failed one its error's traceback, with
        # every frame on it (the caller's locals). With site caps or the
        # adaptive queue nothing pops this queue's head, so a pool that went
        # back to uncontended kept up to 64 of them. (A new deque, not
        # clear(): a caller may be iterating over the old one.)
        if not self._waiting:
            if self._waiters:
                self._waiters = deque()
        elif len(self._waiters) > 64 and len(self._waiters) > 2 * self._waiting:
            self._waiters = deque(w for w in self._waiters if w.state is W.WAITING)

    def idle_expiry(self) -> float | None:
        """When the longest-idle connection outlives ``max_inactive_lifetime``
        (pool clock seconds), if one above ``min_size`` is idle; else None."""
        if self.max_inactive_lifetime and self._idle and self._live() > self.min_size:
            return self._idle[0].idle_since + self.max_inactive_lifetime
        return None

    def next_deadline(self) -> float | None:
        """When :meth:`advance` next has something to do (None: nothing pending)."""
        self._pop_stale_head()
        timers = self._timers
        candidates = []
        if timers:
            candidates.append(timers[0][0])
        for queue in (self._deadlines, self._warnings):
            head = queue.head()
            if head is not None:
                candidates.append(head[0])
        idle_expiry = self.idle_expiry()
        if idle_expiry is not None:
            candidates.append(idle_expiry)
        if self.connect_failures and self._tasks_need_a_connect():
            # The next probe: after the backoff, or a hedge beside those
            # under way. (While the pool is full a slot's close re-plans, and
            # at max_connecting a connect's outcome does: a timer at a time
            # already past would fire again and again. Connects given up,
            # still being cancelled, count towards max_connecting there, as
            # in _plan_connects: their end re-plans.)
            if self.max_connecting is None or self._connecting_count < self.max_connecting:
                if not self._live_connects():
                    if self._paced():
                        candidates.append(self.backoff_until)
                elif self.backoff.hedge_after is not None:
                    candidates.append(self._hedge_at())
        if self._live_connects() and not self._paced():
            if self._bound:
                lost_at = self._lost_adopted_at()  # (a connect taken over, presumed lost then)
                if lost_at is not None:
                    candidates.append(lost_at)
            elif self._policy is not None:
                lost_at = self._lost_orphan_at()  # (the oldest connect nobody waits on, presumed lost then)
                if lost_at is not None:
                    candidates.append(lost_at)
        return min(candidates) if candidates else None

    def advance(self, now: float) -> None:
        """Fire everything due at ``now``: waiter timeouts, lease expiry and
        leak-suspect warnings, idle-lifetime closes, connect retries."""
        while True:
            kind, obj = self._pop_due(now)
            if obj is None:
                break
            if kind == _WAITER_DEADLINE:
                self._waiting -= 1
                if self._policy is not None and obj.shed:  # the adaptive queue's target delay, not the caller's timeout
                    obj.state = W.FAILED  # (counted in shed once its task gets it: delivered())
                    # Worded before remove(): removing the last waiter marks the queue empty.
                    reason = self._policy.shed_reason(obj, now)
                    self._policy.remove(obj, now)
                    self.actions.append(Shed(obj, reason, self._waiting + 1))
                    continue
                obj.state = W.TIMED_OUT
                if self._policy is not None:
                    self._policy.remove(obj, now)
                if obj.connect is not None:
                    self._unbind(obj)  # (its connect is adopted by _plan_connects below)
                self.actions.append(TimeOut(obj))  # (counted once its task gets it: delivered())
            elif kind == _SLOT_EXPIRY:
                self._retire(obj, now)
            elif kind == _LEASE_WARNING:
                self._move_lease(obj, L.SUSPECT)
                self.counters.leak_warnings += 1
                self.actions.append(LeakSuspect(obj))
            elif kind == _STALE_FAILURE:
                self._check_stale(now)
            else:
                self._expire_lease(obj, now)
        self._compact_waiters()
        if self.max_inactive_lifetime:
            idle = self._idle
            while idle and self._live() > self.min_size and idle[0].idle_since + self.max_inactive_lifetime <= now:
                self._start_close(idle[0], idle_expired=True)
        self._plan_connects(now)

    def _pop_due(self, now: float) -> tuple[int, Any]:
        """The live timer that falls due first, if by ``now``, taken off its
        heap or queue: ``(kind, waiter or lease)``; ``(0, None)`` if none.
        At the same time a lease's deadline comes before its warning (as
        pushed to the heap) and the heap before the warnings' queue."""
        self._pop_stale_head()
        timers = self._timers
        due: Any = None
        kind = 0
        when = now
        head = self._deadlines.head()
        if head is not None and head[0] <= when:
            when, due = head
            kind = _LEASE_DEADLINE
        if timers and timers[0][0] <= when and (due is None or timers[0][0] < when):
            due, kind, when = timers, timers[0][2], timers[0][0]
        head = self._warnings.head()
        if head is not None and head[0] <= when and (due is None or head[0] < when):
            due, kind = head[1], _LEASE_WARNING
        if due is None:
            return 0, None
        if due is timers:
            return kind, heapq.heappop(timers)[3]
        del (self._deadlines if kind == _LEASE_DEADLINE else self._warnings).entries[due.id]
        return kind, due

    def _check_stale(self, now: float) -> None:
        """The _STALE_FAILURE timer: if the failure view went stale by now
        (:meth:`failure_stale`), say so once (``failure_went_stale``, and a
        ``NoteServerStatus`` for the runner's event and log); if it is not
        due yet (a later failure, or a longer backoff), look again then; if
        the pool still wants a connection, every STALE_RECHECK seconds (a
        connect's outcome, should one start, reports the status itself).
        Nothing to do once a connect succeeded, or with no connection left
        ("down" is never stale: the next failure arms the timer anew). An
        ``init=`` hook's failure goes stale alike, with no note (the status
        was "up": ``stats().init_failing`` reads False from then)."""
        self._stale_check = False
        if not self.connect_failures or self.failure_went_stale or self._serving() == 0:
            return
        if self.failure_stale(now):
            self.failure_went_stale = True
            if not self.init_failing:
                self.actions.append(NoteServerStatus())
            return
        due = self.stale_failure_at()
        self._stale_check = True
        self._push_timer(due if now < due else now + STALE_RECHECK, _STALE_FAILURE, True)

    def _expire_lease(self, lease: Lease, now: float) -> None:
        self.counters.leases_expired += 1
        slot = self._close_lease(lease, now, L.EXPIRED)
        self._move(slot, S.RESETTING)
        self.actions.append(TakeBack(lease))

    # -------------------------------------------------------------- invariants

    def check_invariants(self) -> None:
        """Raise InternalStateError if the books do not add up."""

        def fail(message: str) -> None:
            raise InternalStateError(message)

        found = dict.fromkeys(SlotState, 0)
        for slot in self._slots:
            found[slot.state] += 1
        if found[S.CLOSED]:
            fail("a closed slot is still counted")
        if any(s.failed_connect and (s.state is not S.CLOSING or s.lease is not None) for s in self._slots):
            fail("a slot whose connect failed is not closing")
        for state, counted in ((S.CONNECTING, self._connecting_count), (S.CLOSING, self._closing_count)):
            if found[state] != counted:
                fail(f"{state.value}: counted {counted}, found {found[state]}")
        if self.size > self.max_size and not any(
            s.state in (S.CONNECTING, S.LEASED, S.RESETTING, S.CLOSING, S.RESERVED) for s in self._slots
        ):
            fail(f"size {self.size} > max_size {self.max_size} with nothing to shrink")
        if len(set(map(id, self._idle))) != len(self._idle):
            fail("a slot is twice in the idle stack")
        if any(s.state is not S.IDLE or s not in self._slots for s in self._idle) or len(self._idle) != found[S.IDLE]:
            fail("idle stack and idle slots disagree")
        if self._waiting != sum(1 for w in self._waiters if w.state is W.WAITING):
            fail("live waiter count is off")
        bound = [w for w in self._waiters if w.state is W.WAITING and w.connect is not None]
        if len(bound) != self._bound or any(w.connect.owner is not w or w.connect.state is not S.CONNECTING for w in bound):  # type: ignore[union-attr]
            fail("tasks waiting on their own connects are miscounted")
        if any(s.owner is not None and s.owner.connect is not s for s in self._slots):
            fail("a connect names an owner that does not wait for it")
        abandoned = sum(1 for s in self._slots if s.abandoned and s.state is S.CONNECTING)
        if abandoned != self._abandoned_count:
            fail("abandoned connects are miscounted")
        if any(s.abandoned and s.owner is not None for s in self._slots):
            fail("an abandoned connect has an owner")
        if (
            self._policy is None and self._waiting > self._bound
            and self._connecting_count - abandoned > self._bound
        ):
            fail("a connect nobody waits for while a task waits without one")
        waiting = (self._waiting - self._bound) if self._policy is None else self._policy.eligible
        if waiting and self._idle and not self.closing:
            fail("a connection is idle while tasks wait")
        if self._policy is not None:
            for problem in self._policy.check(self._waiting):
                fail(problem)
        leases = list(self.leases())
        for lease in leases:
            if lease.state not in OPEN_LEASE or lease.slot.lease is not lease or lease.slot.state is not S.LEASED:
                fail(f"lease {lease.id} does not match its slot")
        if len(leases) != found[S.LEASED]:
            fail("leases and leased slots disagree")
        checks = sum(1 for _, _, kind, _ in self._timers if kind == _STALE_FAILURE)
        if checks != self._stale_check:
            fail(f"{checks} stale-failure timers in the heap, flagged {self._stale_check}")
        if self.failure_went_stale and not self.connect_failures:
            fail("the failure view went stale with no failure")
        if self.connect_failures and not self.failure_went_stale and not self._stale_check and self._serving():
            fail("connects failing with no stale-failure timer armed")
        dead = sum(1 for _, _, kind, obj in self._timers if not self._timer_live(kind, obj))
        if dead != self._stale_timers:
            fail(f"timer heap: {dead} stale entries, counted {self._stale_timers}")
        for name, queue, pending in (
            ("deadline", self._deadlines.entries, OPEN_LEASE), ("warning", self._warnings.entries, {L.HELD}),
        ):
            times = [at for at, _ in queue.values()]
            if times != sorted(times) or any(
                lease.state not in pending or lease.id != i or lease.slot.lease is not lease
                or at != (lease.deadline if name == "deadline" else lease.warn_at)
                for i, (at, lease) in queue.items()
            ):
                fail(f"the lease {name} queue holds an ended lease, a wrong time, or is out of order")

    # ------------------------------------------ site caps, adaptive queue
    # Consulted only when configured (self._policy is not None); the
    # decisions themselves live in _policy.WaitPolicy.

    def _policy_try_acquire(self, now: float, site: str | None) -> Lease | None:
        policy = self._policy
        assert policy is not None
        if not policy.may_take_idle(site, now):
            return None
        idle = self._idle
        while idle and idle[-1].generation != self.generation:
            self._start_close(idle[-1])
        if not idle:
            return None
        slot = idle.pop()
        self._move(slot, S.LEASED)
        self.wait_times.record(0.0)
        lease = self._open_lease(slot, now, site)
        policy.leased(site, now)
        return lease

    def _policy_admit(self, waiter: Waiter, now: float, timeout: float | None, room: int) -> None:
        assert self._policy is not None
        waiter.eligible_at = now  # (the policy's fields: see Waiter)
        waiter.seq = 0
        waiter.shed = False
        try:
            self._policy.admit(waiter, now, timeout, waiter.site, self.max_waiters, room)
        except Inadmissible:
            self.counters.admission_rejections += 1
            raise
        except Overloaded:
            self.counters.overload_rejections += 1
            raise

    def _policy_hand_on(self, slot: Slot, now: float) -> None:
        assert self._policy is not None
        waiter = self._policy.pick(now)
        if waiter is None:
            self._move(slot, S.IDLE)
            slot.idle_since = now
            self._idle.append(slot)
            return
        self._grant(slot, waiter)
        self._compact_waiters()

    def _grant(self, slot: Slot, waiter: Waiter) -> None:
        self._waiting -= 1
        waiter.state = W.GRANTED
        waiter.slot = slot
        if waiter.deadline is not None:
            self._timer_dropped()
        self._move(slot, S.RESERVED)
        self.actions.append(Wake(waiter))
        if self._connecting_count:
            # (Not the FIFO hot path, which _hand_on inlines: a queue
            # policy's grant, or one beside connects bound to their tasks.)
            self.connects_to_watch = True

    def _policy_released(self, site: str | None, now: float, plan: bool = False) -> None:
        """``plan``: no slot comes back with this (a grant whose connection
        was lost): the site's waiters may need a new connection."""
        assert self._policy is not None
        if self._policy.released(site, now):
            self._serve_idle(now)
            if plan:
                self._plan_connects(now)
            if self._connecting_count:
                # Tasks of the site became eligible: a connect under way may
                # now be their orphan, presumed lost at the hedge delay.
                self.connects_to_watch = True

    def _serve_idle(self, now: float) -> None:
        """A site's waiters left its cap while connections sat idle (they
        were idle because only capped sites waited): hand them on."""
        policy = self._policy
        assert policy is not None
        idle = self._idle
        while idle and policy.eligible and not self.closing:
            slot = idle[-1]
            if slot.generation != self.generation:
                self._start_close(slot)
                continue
            waiter = policy.pick(now)
            if waiter is None:
                return
            idle.pop()
            self._grant(slot, waiter)

    def _shed(self, waiter: Waiter, reason: str) -> None:
        """The adaptive queue gave up on a waiter (its books already updated)."""
        waiter.state = W.FAILED
        self.actions.append(Shed(waiter, reason, self._waiting))
        self._waiting -= 1
        if waiter.deadline is not None:
            self._timer_dropped()  # (counted in shed once its task gets it: delivered())

    def site_usage(self, top: int = 10, first: str | None = None) -> list[tuple[str, int, int]]:
        """(site, in use, waiting) of the ``top`` busiest sites plus "other"
        (``first``, a site listed first whatever its rank); empty without
        site caps."""
        return [] if self._policy is None else self._policy.usage(top, first)

    @property
    def site_cap(self) -> int | None:
        return None if self._policy is None else self._policy.cap
