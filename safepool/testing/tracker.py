"""The leak guards' process-wide tracker, fed by the pools' typed events.

Pools are process-wide (``live_pools()``), so is the tracker. While at least
one guard (or the session option) uses it, it watches every pool (those that
exist, and through ``on_pool_created`` those created later): it turns stack
capture on, and listens to the events a guard needs (``Leaked``,
``LeaseEnded``, ``LeaseExpired``, ``LateRelease``, and in strict mode
``AcquireTimedOut``).
It uses the pool's public observation surface only; no pytest import.
"""

from __future__ import annotations

import asyncio
import functools
import os
import sys
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from types import FrameType
from typing import TYPE_CHECKING, Any

from ..events import AcquireTimedOut, LateRelease, Leaked, LeaseEnded, LeaseExpired, PoolEvent
from ..pool import Pool, live_pools, on_pool_created
from ..stats import LeaseInfo

if TYPE_CHECKING:
    from .guards import LeakGuard


def _module_dir(name: str) -> str | None:
    module = sys.modules.get(name)
    path: str | None = getattr(module, "__file__", None) if module is not None else None
    if not path:
        return None
    if os.path.basename(path) == "__init__.py":
        return os.path.dirname(os.path.abspath(path)) + os.sep
    return os.path.abspath(path)


# ------------------------------------------------------ what tasks are doing

_ASYNCPG_DIR = _module_dir("asyncpg")
_SKIP_FOR_WHERE = ("safepool", "asyncio", "anyio")


def _await_chain(task: asyncio.Task[Any]) -> list[FrameType]:
    """The frames a suspended task is waiting in, outermost first."""
    frames: list[FrameType] = []
    awaitable: Any = task.get_coro()
    for _ in range(200):  # an await chain deeper than this is not worth walking
        if awaitable is None:
            break
        frame = (
            getattr(awaitable, "cr_frame", None)
            or getattr(awaitable, "gi_frame", None)
            or getattr(awaitable, "ag_frame", None)
        )
        if isinstance(frame, FrameType):
            frames.append(frame)
        awaitable = (
            getattr(awaitable, "cr_await", None)
            or getattr(awaitable, "gi_yieldfrom", None)
            or getattr(awaitable, "ag_await", None)
        )
    return frames


def _in_anyio_test_runner(frame: FrameType) -> bool:
    """``frame`` (a task's outermost) is anyio's pytest runner task's loop
    (``TestRunner._run_tests_and_fixtures``, anyio 4). Not any anyio frame:
    a task group's task starts in anyio's wrapper too, and when the coroutine
    it runs has no frame to walk (an async generator's ``asend()``, a
    compiled coroutine), the wrapper is all the chain shows of a live task."""
    anyio_dir = _module_dir("anyio")
    return (
        anyio_dir is not None
        and frame.f_code.co_name == "_run_tests_and_fixtures"
        and os.path.abspath(frame.f_code.co_filename).startswith(anyio_dir)
    )


def holder_activity(info: LeaseInfo) -> tuple[str, str]:
    """(state, description) of the task holding a lease (``info.task``, a
    weak reference taken at acquire). state is "query" (inside asyncpg:
    running a statement), "running", "idle" (suspended elsewhere), "returned"
    (suspended in anyio's test runner: the code that acquired has returned),
    "ended" (no such task any more) or "unknown"."""
    if info.task_ref is None:
        return "unknown", "holding task unknown (stack capture was off)"
    task = info.task
    if task is None or task.done():
        return "ended", "the task has ended without releasing it"
    loop = task.get_loop()
    if loop.is_closed():
        return "ended", "its event loop is closed"
    if task is asyncio.current_task(loop):
        return "running", "running"
    frames = _await_chain(task)
    if _ASYNCPG_DIR and any(f.f_code.co_filename.startswith(_ASYNCPG_DIR) for f in frames):
        return "query", "running a statement"
    skip = tuple(p for p in (_module_dir(n) for n in _SKIP_FOR_WHERE) if p)
    for frame in reversed(frames):
        filename = frame.f_code.co_filename
        if not os.path.abspath(filename).startswith(skip):
            return "idle", f"not in the database: waiting at {filename}:{frame.f_lineno} in {frame.f_code.co_name}"
    if frames and _in_anyio_test_runner(frames[0]):
        # anyio's pytest plugin runs every test and fixture in one runner
        # task, which waits in anyio between them: the test (or fixture)
        # that acquired has returned without releasing, like a task that
        # ended; no background task is holding it.
        return "returned", (
            "the code that acquired it returned without releasing it; the task runs on in anyio's test runner"
        )
    return "idle", "not in the database"


# ------------------------------------------------------------- the tracker


@dataclass
class _Ended:
    """A lease the pool ended while the code held it: at a terminate, or
    taken back at its ``lease_timeout`` (``lease_timeout``, seconds, set)."""

    seq: int
    pool_id: int
    pool_name: str
    info: LeaseInfo
    released: bool = False  # by the code, after the pool ended it
    lease_timeout: float | None = None


@dataclass
class _Watch:
    capture_before: bool
    listener: Callable[[PoolEvent], None]


@dataclass(frozen=True)
class TimedOut:
    """An acquire timeout seen in strict mode, with what each holder was
    doing at that moment: (lease, state, description) per lease."""

    event: AcquireTimedOut
    holders: tuple[tuple[LeaseInfo, str, str], ...]


class _Tracker:
    """Process-wide. Installed while at least one guard (or the session
    option) uses it."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._users = 0
        self._strict_users = 0
        self._watched: weakref.WeakKeyDictionary[Pool, _Watch] = weakref.WeakKeyDictionary()
        self._unhook: Callable[[], None] | None = None
        self._seq = 0
        # (seq, pool, payload, id of the pool): Leaked events, and strict-mode
        # timeouts. The id outlives the pool: a dropped connection of a pool
        # that is garbage by the check is still a leak (LeakGuard.leaks).
        self.records: list[tuple[int, weakref.ref[Pool], Leaked | TimedOut, int]] = []
        self._guards: list[LeakGuard] = []
        # Leases the pool ended (terminate) that the code has not released
        # yet, by (id(pool), lease id): a release() after the end clears one.
        self._ended: dict[tuple[int, int], _Ended] = {}

    @property
    def seq(self) -> int:
        return self._seq

    # install / uninstall ------------------------------------------------

    def acquire(self, *, strict: bool = False) -> None:
        with self._lock:
            self._users += 1
            if self._users == 1:
                self._unhook = on_pool_created(self.watch)
            if strict:
                self._strict_users += 1
            for pool in live_pools():
                self.watch(pool)

    def release(self, *, strict: bool = False) -> None:
        with self._lock:
            if strict:
                self._strict_users -= 1
            self._users -= 1
            if self._users == 0:
                self._uninstall()

    def _uninstall(self) -> None:
        if self._unhook is not None:
            self._unhook()
            self._unhook = None
        for pool, watch in list(self._watched.items()):
            pool.capture_stack = watch.capture_before
            try:
                pool.remove_event_listener(watch.listener)
            except ValueError:
                pass
        self._watched.clear()
        self.records.clear()
        self._ended.clear()

    # pools and events -------------------------------------------------------

    def watch(self, pool: Pool) -> None:
        with self._lock:
            if pool in self._watched:
                return
            listener = functools.partial(self._on_event, weakref.ref(pool))
            self._watched[pool] = _Watch(pool.capture_stack, listener)
            pool.capture_stack = True
            pool.add_event_listener(listener)

    def _on_event(self, pool_ref: weakref.ref[Pool], event: PoolEvent) -> None:
        if isinstance(event, Leaked):
            self._record(pool_ref, event)
        elif isinstance(event, (LeaseEnded, LeaseExpired)):
            pool = pool_ref()
            if pool is not None:
                self.note_ended(pool, event.lease, event.lease_timeout if isinstance(event, LeaseExpired) else None)
        elif isinstance(event, LateRelease):
            self.note_late_release(pool_ref, event.lease_id)
        elif isinstance(event, AcquireTimedOut) and self._strict_users:
            # Delivered in the loop callback that timed the acquire out: the
            # holders have not moved since.
            holders = tuple((info, *holder_activity(info)) for info in event.leases)
            self._record(pool_ref, TimedOut(event, holders))

    def _record(self, pool_ref: weakref.ref[Pool], payload: Leaked | TimedOut) -> None:
        with self._lock:
            self._seq += 1
            self.records.append((self._seq, pool_ref, payload, id(pool_ref())))

    def note_ended(self, pool: Pool, info: LeaseInfo, lease_timeout: float | None = None) -> None:
        """The pool's ``LeaseEnded`` event: terminate() ended a lease the
        code had not released (close() terminates when cancelled or failing);
        or its ``LeaseExpired`` event (``lease_timeout``, seconds): the lease
        timeout took the connection back. Either hides a missing release
        unless the code releases the lease afterwards (``LateRelease``)."""
        with self._lock:
            if not self._guards:
                return
            self._seq += 1
            entry = _Ended(self._seq, id(pool), pool.name, info, lease_timeout=lease_timeout)
            self._ended[(entry.pool_id, info.id)] = entry
            for guard in self._guards:
                guard.note_ended(pool, [entry])

    def note_late_release(self, pool_ref: weakref.ref[Pool], lease_id: int) -> None:
        """The pool's ``LateRelease`` event: the code released a lease after
        the pool had ended it (an ``async with`` unwinding from the failed
        query): not a leak."""
        pool = pool_ref()
        with self._lock:
            entry = self._ended.pop((id(pool), lease_id), None) if pool is not None else None
            if entry is not None:
                entry.released = True

    def add_guard(self, guard: LeakGuard) -> None:
        with self._lock:
            self._guards.append(guard)

    def remove_guard(self, guard: LeakGuard) -> None:
        with self._lock:
            if guard in self._guards:
                self._guards.remove(guard)
            oldest = min((g.seq0 for g in self._guards), default=self._seq)
            self.records = [record for record in self.records if record[0] > oldest]
            self._ended = {key: entry for key, entry in self._ended.items() if entry.seq > oldest}


_tracker = _Tracker()
