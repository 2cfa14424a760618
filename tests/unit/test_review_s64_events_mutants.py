"""Review s64: mutation review of safepool/events.py. Mutants that survived
the existing tests, killed here.

The dict form each ``Pool.add_listener`` callback gets is documented key by
key (the events module and docs/events.md); the integration tests read a
few keys of a few kinds. Here every kind's ``kind``, its dict (all keys,
every value distinct so a swapped field shows) and its defaults are
written out. No server: the events are data.
"""

from __future__ import annotations

import dataclasses

import pytest

from safepool import events
from safepool.stats import LeaseInfo

LEASE = LeaseInfo(
    id=7, age=2.5, deadline_in=1.5, task_name="Task-9", acquired_at="app.py:3 in handler",
    stack='  File "app.py", line 3, in handler\n', site="GET /orders",
)
LEASE_FIELDS = {
    "lease_id": 7, "held_seconds": 2.5, "acquired_at": "app.py:3 in handler", "task_name": "Task-9",
    "site": "GET /orders",
}


def test_the_kinds_as_dict_listeners_know_them() -> None:
    assert {cls.__name__: cls.kind for cls in (
        events.PoolEvent, events.ConnectFailed, events.ServerStatusChanged, events.LeaseEvent,
        events.LeakSuspected, events.LeaseExpired, events.Leaked, events.LeaseEnded, events.LateRelease,
        events.AcquireTimedOut,
    )} == {
        "PoolEvent": "", "ConnectFailed": "connect_failed", "ServerStatusChanged": "server_status",
        "LeaseEvent": "", "LeakSuspected": "leak_suspect", "LeaseExpired": "lease_expired", "Leaked": "leak",
        "LeaseEnded": "lease_ended", "LateRelease": "late_release", "AcquireTimedOut": "acquire_timeout",
    }


def test_connect_failed_and_server_status_dicts() -> None:
    failed = events.ConnectFailed("p", error="OSError: refused", consecutive_failures=4)
    assert failed.to_dict() == {
        "event": "connect_failed", "pool": "p", "error": "OSError: refused", "consecutive_failures": 4,
    }
    status = events.ServerStatusChanged("p", previous="up", status="down")
    assert status.to_dict() == {"event": "server_status", "pool": "p", "from": "up", "to": "down"}
    assert events.PoolEvent("p").to_dict() == {"event": "", "pool": "p"}


@pytest.mark.parametrize(
    ("event", "extra"),
    [
        (events.LeakSuspected("p", LEASE), {"collected": False}),
        (events.LeakSuspected("p", LEASE, collected=True), {"collected": True}),
        (events.LeaseExpired("p", LEASE, lease_timeout=30.0), {}),
        (events.Leaked("p", LEASE), {}),
        (events.LeaseEnded("p", LEASE), {"reason": "terminate", "stack": LEASE.stack}),
        (events.LeaseEnded("p", LEASE, reason="close"), {"reason": "close", "stack": LEASE.stack}),
    ],
    ids=["leak_suspect", "leak_suspect collected", "lease_expired", "leak", "lease_ended", "lease_ended close"],
)
def test_lease_event_dicts(event: events.LeaseEvent, extra: dict[str, object]) -> None:
    assert event.to_dict() == {"event": event.kind, "pool": "p", **LEASE_FIELDS, **extra}
    assert event.held_seconds == 2.5


def test_the_defaults_and_the_rest() -> None:
    assert events.LeaseExpired("p", LEASE).lease_timeout == 0.0
    assert events.LeakSuspected("p", LEASE).collected is False
    assert events.LeaseEnded("p", LEASE).reason == "terminate"
    assert events.LateRelease("p", lease_id=12).to_dict() == {"event": "late_release", "pool": "p", "lease_id": 12}
    timed_out = events.AcquireTimedOut(
        "p", waited=1.0, max_size=2, in_use=2, idle=0, connecting=0, waiting=3, max_waiters=None, leases=(LEASE,)
    )
    assert timed_out.to_dict() is None  # (not sent to dict listeners)
    for event in (timed_out, events.LateRelease("p", 1)):
        with pytest.raises(dataclasses.FrozenInstanceError):
            event.pool = "q"  # type: ignore[misc]
