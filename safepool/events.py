"""Typed pool events: what ``Pool.add_event_listener(callback)`` delivers.

One frozen class per kind. Every event has ``pool`` (the pool's name) and a
class-level ``kind`` (the name the dict listeners of ``Pool.add_listener``
know it by). The pool delivers events after its books are settled: never
from inside its action loop, so a callback sees the pool in a consistent
state and may call into it (``stats()``, ``leases()``, ``terminate()``).
Callbacks run on the pool's event loop thread; an exception in one is logged
(``event listener failed``) and the others still run.

Events never carry a password, a DSN or query parameters: errors are reduced
to the exception type and the first line of its message.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from .stats import LeaseInfo, PoolStats

__all__ = [
    "AcquireTimedOut",
    "ConnectFailed",
    "LateRelease",
    "LeakSuspected",
    "Leaked",
    "LeaseEnded",
    "LeaseEvent",
    "LeaseExpired",
    "PoolClosed",
    "PoolEvent",
    "ServerStatusChanged",
]


@dataclass(frozen=True, slots=True)
class PoolEvent:
    """The base of every event."""

    kind: ClassVar[str] = ""
    pool: str  # the pool's name

    def to_dict(self) -> dict[str, Any] | None:
        """The event as ``Pool.add_listener`` callbacks get it (a dict with
        ``event`` and ``pool``), or None for a kind those callbacks never
        received (they are not sent new kinds)."""
        return {"event": self.kind, "pool": self.pool}


@dataclass(frozen=True, slots=True)
class ConnectFailed(PoolEvent):
    """A connection attempt failed."""

    kind: ClassVar[str] = "connect_failed"
    error: str  # exception type and first line of its message
    consecutive_failures: int  # PoolStats.consecutive_connect_failures after this failure

    def to_dict(self) -> dict[str, Any] | None:
        return {"event": self.kind, "pool": self.pool, "error": self.error,
                "consecutive_failures": self.consecutive_failures}


@dataclass(frozen=True, slots=True)
class ServerStatusChanged(PoolEvent):
    """The pool's view of the server changed: ``"up"``, ``"backing_off"``
    (connects fail, connections are left) or ``"down"``."""

    kind: ClassVar[str] = "server_status"
    previous: str
    status: str

    def to_dict(self) -> dict[str, Any] | None:
        return {"event": self.kind, "pool": self.pool, "from": self.previous, "to": self.status}


@dataclass(frozen=True, slots=True)
class LeaseEvent(PoolEvent):
    """An event about one lease. ``lease`` is the lease as ``Pool.leases()``
    describes it at the moment of the event (``lease.age``: seconds held;
    ``lease.stack``: the full acquire stack when stacks are captured;
    ``lease.task``: the task that acquired it, if still alive). Its dict
    form (``to_dict()``) has ``event``, ``pool``, ``lease_id``,
    ``held_seconds``, ``acquired_at``, ``task_name`` and ``site``, plus
    ``collected`` for ``leak_suspect`` and ``reason`` and ``stack`` for
    ``lease_ended``."""

    lease: LeaseInfo

    @property
    def held_seconds(self) -> float:
        """Seconds the lease had been held when the event was made
        (``lease.age``)."""
        return self.lease.age

    def to_dict(self) -> dict[str, Any] | None:
        lease = self.lease
        return {"event": self.kind, "pool": self.pool, "lease_id": lease.id, "held_seconds": lease.age,
                "acquired_at": lease.acquired_at, "task_name": lease.task_name, "site": lease.site}


@dataclass(frozen=True, slots=True)
class LeakSuspected(LeaseEvent):
    """A lease is still held after ``leak_warning_after`` (``collected``
    False), or its proxy was garbage collected while the connection is still
    in use (``collected`` True: it stays leased until that use ends)."""

    kind: ClassVar[str] = "leak_suspect"
    collected: bool = False

    def to_dict(self) -> dict[str, Any] | None:
        payload = LeaseEvent.to_dict(self)
        assert payload is not None
        # Tells the two apart: only collected=False ones are counted in
        # stats().leak_warnings.
        payload["collected"] = self.collected
        return payload


@dataclass(frozen=True, slots=True)
class LeaseExpired(LeaseEvent):
    """A lease outlived its ``lease_timeout`` (seconds) and was taken back."""

    kind: ClassVar[str] = "lease_expired"
    lease_timeout: float = 0.0


@dataclass(frozen=True, slots=True)
class Leaked(LeaseEvent):
    """A leased connection's proxy was garbage collected unreleased; the
    pool reclaimed the connection."""

    kind: ClassVar[str] = "leak"


@dataclass(frozen=True, slots=True)
class LeaseEnded(LeaseEvent):
    """The pool ended a lease the code had not released (``reason``
    ``"terminate"``: ``terminate()``, or a ``close()`` cut short)."""

    kind: ClassVar[str] = "lease_ended"
    reason: str = "terminate"

    def to_dict(self) -> dict[str, Any] | None:
        fields = LeaseEvent.to_dict(self)
        assert fields is not None
        fields["reason"] = self.reason
        fields["stack"] = self.lease.stack
        return fields


@dataclass(frozen=True, slots=True)
class LateRelease(PoolEvent):
    """``release()`` of a lease that was already ended (released twice,
    terminated, taken back): a no-op, as in asyncpg."""

    kind: ClassVar[str] = "late_release"
    lease_id: int

    def to_dict(self) -> dict[str, Any] | None:
        return {"event": self.kind, "pool": self.pool, "lease_id": self.lease_id}


@dataclass(frozen=True, slots=True)
class AcquireTimedOut(PoolEvent):
    """An acquire gave up waiting (``PoolTimeoutError``), with the pool's
    sizes and every lease held at that moment (oldest first): who held the
    connections the waiter did not get. Not sent to dict listeners."""

    kind: ClassVar[str] = "acquire_timeout"
    waited: float  # seconds
    max_size: int
    in_use: int
    idle: int
    connecting: int
    waiting: int  # tasks still waiting, this one excluded
    max_waiters: int | None
    leases: tuple[LeaseInfo, ...]

    def to_dict(self) -> dict[str, Any] | None:
        return None


@dataclass(frozen=True, slots=True)
class PoolClosed(PoolEvent):
    """The pool closed: ``close()`` ended (its connections closed, its tasks
    done) or ``terminate()`` ran. ``stats`` is its last
    :class:`~safepool.PoolStats`: what it counted to the end, which no later
    read of a collected pool can give (the OpenTelemetry instruments carry
    it into the series of a pool re-created under the same name). Sent
    once per pool. Not sent to dict listeners."""

    kind: ClassVar[str] = "pool_closed"
    stats: PoolStats

    def to_dict(self) -> dict[str, Any] | None:
        return None
