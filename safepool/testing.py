"""Leak guards for test suites: a pytest plugin, a fixture and a context manager.

The plugin is registered through the ``pytest11`` entry point and does nothing
unless asked:

- ``pytest --safepool-leaks`` (or ``safepool_leaks = true`` in the ini file)
  fails every test that leaks a safepool connection;
- ``pytest --safepool-strict`` (or ``safepool_strict = true``) also fails a
  test whose pool timed out an acquire while connections were leased by tasks
  that were not running a statement;
- the ``safepool_leak_check`` fixture guards one test; the
  ``safepool_allow_leaks`` marker exempts one test from the global check;
- ``with assert_no_leaks(pool):`` (or ``async with``) guards a block.

What counts as a leak: a lease acquired while the guard was active that is
still open when the guarded code ends, whose proxy was garbage collected
unreleased (the pool reclaims it and emits a ``leak`` event), or that the pool
ended itself (``terminate()``, or a ``close()`` cancelled or timed out, which
terminates) without the code releasing it, before or after. Leases that
were already open when the guard started belong to someone else (a session
fixture's connection) and are ignored.

How the test phases are used: a lease taken in the test function itself is
checked when the test function returns; one taken by a function-scoped
fixture, when the fixtures have been torn down. Leaked leases are released
after the report, so that a pool fixture's ``close()`` does not wait forever
for them.

While a guard is active every pool captures acquire stacks, so a report names
the line that acquired each leaked connection. The plugin reaches a few of
the pool's private members for that (they are listed together below, under
"The pool's private members"); nothing is patched while no guard is active.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import re
import sys
import threading
import warnings
import weakref
from collections import Counter
from collections.abc import Callable, Coroutine, Iterable, Iterator
from dataclasses import dataclass, field
from types import FrameType, TracebackType
from typing import Any

import pytest

from .pool import Pool, live_pools
from .stats import LeaseInfo

__all__ = [
    "Leak",
    "LeakError",
    "LeakGuard",
    "assert_no_leaks",
]

FIX_HINT = (
    "Fix: acquire with `async with pool.acquire() as con:` so every path (return, exception, "
    "cancellation) releases the connection, or release it in a `finally:` block."
)
STRICT_HINT = (
    "Fix: hold a connection only while you use it: do slow non-database work (HTTP calls, sleeps, "
    "waiting on other tasks) before acquiring or after releasing."
)


class LeakError(AssertionError):
    """Connections were leaked inside a guarded test or block."""


@dataclass(frozen=True)
class Leak:
    """One problem a guard found.

    ``kind`` is ``"open"`` (acquired and still held), ``"collected"`` (the
    proxy was garbage collected unreleased; the pool reclaimed the
    connection), ``"ended"`` (the pool was terminated, or its ``close()``
    cancelled, while the lease was open, and the code never released it) or
    ``"idle_timeout"`` (strict mode: an acquire timed out while connections
    were leased and not used).
    """

    kind: str
    pool: str
    lease_id: int | None
    held: float
    task_name: str | None
    holder: str | None  # what the holding task was doing, when known
    acquired_at: str | None  # "file:line in function"
    stack: str | None  # the acquire stack, outermost first, test-runner frames removed
    detail: str = ""
    pool_ref: weakref.ref[Pool] | None = field(default=None, repr=False, compare=False)
    site: str | None = None  # the acquire site (max_site_share, acquire(site=), safepool.site)

    def describe(self) -> str:
        task = f" by task {self.task_name}" if self.task_name else ""
        if self.kind == "open":
            state = f" ({self.holder})" if self.holder else ""
            head = f"pool {self.pool!r}, lease {self.lease_id}: still held after {self.held:.3f}s{task}{state}"
            if self.detail:
                head += f"; {self.detail}"
        elif self.kind == "collected":
            head = (
                f"pool {self.pool!r}, lease {self.lease_id}: garbage collected without being released "
                f"(held {self.held:.3f}s{task}; the pool reclaimed the connection)"
            )
        elif self.kind == "ended":
            head = (
                f"pool {self.pool!r}, lease {self.lease_id}: never released; the pool ended it "
                f"(terminate(), or a close() cancelled or timed out) after {self.held:.3f}s{task}"
            )
        else:
            return f"pool {self.pool!r}: {self.detail}"
        where = self.stack or (f"  {self.acquired_at}\n" if self.acquired_at else "  (acquire stack not captured)\n")
        if self.site is not None:
            head += f"\n  acquire site: {self.site}"
        return f"{head}\n  acquired at:\n{_indent(where, '  ')}"


def format_report(leaks: list[Leak]) -> str:
    """The text of a leak failure: each leak with its acquire stack, then the fix."""
    held = sum(1 for leak in leaks if leak.kind != "idle_timeout")
    timeouts = len(leaks) - held
    parts = []
    if held:
        parts.append(f"{held} connection{'s' if held != 1 else ''} leaked")
    if timeouts:
        parts.append(f"{timeouts} acquire timeout{'s' if timeouts != 1 else ''} caused by idle leases")
    lines = [f"safepool: {' and '.join(parts)}", ""]
    by_site = Counter(leak.site for leak in leaks if leak.site is not None and leak.kind != "idle_timeout")
    if by_site:
        lines[1:1] = ["by acquire site: " + ", ".join(f"{site} ({n})" for site, n in by_site.most_common())]
    for number, leak in enumerate(leaks, 1):
        lines.extend((f"[{number}] {leak.describe().rstrip()}", ""))
    lines.append(FIX_HINT if held else STRICT_HINT)
    if held and timeouts:
        lines.append(STRICT_HINT)
    return "\n".join(lines)


# ------------------------------------------------- the pool's private members
# Everything this module reads or patches beyond the pool's public API. A
# pool-side hook would replace each (see docs/testing.md, "How it works").


def _force_capture(pool: Pool, on: bool | None) -> bool:
    """Turn acquire-stack capture on; returns the previous setting."""
    previous = bool(pool._capture_stack)
    if on is not None:
        pool._capture_stack = on
    return previous


def _pool_loop(pool: Pool) -> asyncio.AbstractEventLoop:
    return pool._loop


def _proxy_of(pool: Pool, lease_id: int) -> Any:
    """The live proxy of an open lease, or None (released, or garbage)."""
    for lease in pool._state.leases():
        if lease.id == lease_id and lease.active and lease.slot.connection is not None:
            proxy = lease.slot.connection._proxy
            if proxy is None:
                return None
            try:
                proxy._con  # noqa: B018 - a dead weak proxy raises ReferenceError
            except ReferenceError:
                return None
            return proxy
    return None


# ---------------------------------------------------------- stack handling

_FRAME_RE = re.compile(r'^  File "(?P<file>[^"]+)", line (?P<line>\d+), in (?P<name>.*)$')
_RUNNER_MODULES = ("_pytest", "pytest", "pluggy", "pytest_asyncio", "anyio", "asyncio", "pytest_timeout")


def _module_dir(name: str) -> str | None:
    module = sys.modules.get(name)
    path: str | None = getattr(module, "__file__", None) if module is not None else None
    if not path:
        return None
    if os.path.basename(path) == "__init__.py":
        return os.path.dirname(os.path.abspath(path)) + os.sep
    return os.path.abspath(path)


def _runner_prefixes() -> tuple[str, ...]:
    return tuple(p for p in (_module_dir(name) for name in _RUNNER_MODULES) if p)


def _trim_stack(text: str | None) -> str | None:
    """Drop the frames of the test runner (pytest, pluggy, asyncio, anyio) from
    a stack formatted by safepool: what is left is the user's code."""
    if not text:
        return None
    prefixes = _runner_prefixes()
    kept: list[str] = []
    skipping = False
    for line in text.splitlines():
        match = _FRAME_RE.match(line)
        if match:
            skipping = os.path.abspath(match["file"]).startswith(prefixes)
            if not skipping:
                kept.append(line)
        elif line.startswith("    ") and not skipping and kept:
            kept.append(line)
    if not kept:
        return text if text.endswith("\n") else text + "\n"
    return "\n".join(kept) + "\n"


def _stack_from_log(message: str) -> str | None:
    """The acquire stack inside a ``safepool.leaks`` log message."""
    marker = "acquired at:\n"
    index = message.find(marker)
    return message[index + len(marker):] if index >= 0 else None


def _indent(text: str, prefix: str) -> str:
    return "".join(prefix + line + "\n" for line in text.splitlines())


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


def _holder_activity(task_name: str | None, loop: asyncio.AbstractEventLoop) -> tuple[str, str]:
    """(state, description) of the task holding a lease. state is "query"
    (inside asyncpg: running a statement), "running", "idle" (suspended
    elsewhere), "ended" (no such task any more) or "unknown"."""
    if task_name is None:
        return "unknown", "holding task unknown (stack capture was off)"
    if loop.is_closed():
        return "ended", "its event loop is closed"
    current = asyncio.current_task(loop)
    for task in asyncio.all_tasks(loop):
        if task.get_name() != task_name:
            continue
        if task is current:
            return "running", "running"
        frames = _await_chain(task)
        if _ASYNCPG_DIR and any(f.f_code.co_filename.startswith(_ASYNCPG_DIR) for f in frames):
            return "query", "running a statement"
        skip = tuple(p for p in (_module_dir(n) for n in _SKIP_FOR_WHERE) if p)
        for frame in reversed(frames):
            filename = frame.f_code.co_filename
            if not os.path.abspath(filename).startswith(skip):
                return "idle", (
                    f"not in the database: waiting at {filename}:{frame.f_lineno} in {frame.f_code.co_name}"
                )
        return "idle", "not in the database"
    return "ended", "the task has ended without releasing it"


# ------------------------------------------------------------- the tracker


@dataclass
class _Ended:
    """A lease open when its pool was terminated."""

    seq: int
    pool_id: int
    pool_name: str
    info: LeaseInfo
    released: bool = False  # by the code, after the terminate


@dataclass
class _Watch:
    capture_before: bool
    listener: Callable[[dict[str, Any]], None]


class _LeakLogHandler(logging.Handler):
    """Keeps the full acquire stack of GC-reclaimed leases: the pool's ``leak``
    event carries only the innermost site; its log message has the stack."""

    def __init__(self, tracker: _Tracker) -> None:
        super().__init__(logging.WARNING)
        self._tracker = tracker

    def emit(self, record: logging.LogRecord) -> None:
        if getattr(record, "event", None) != "leak":
            return
        try:
            stack = _stack_from_log(record.getMessage())
        except Exception:
            return
        self._tracker.note_stack(str(getattr(record, "pool", "")), getattr(record, "lease_id", None), stack)


class _Tracker:
    """Process-wide: pools are process-wide (``live_pools()``). Installed while
    at least one guard (or the session option) uses it."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._users = 0
        self._strict_users = 0
        self._watched: weakref.WeakKeyDictionary[Pool, _Watch] = weakref.WeakKeyDictionary()
        self._original_init: Any = None
        self._original_busy: Any = None
        self._handler: _LeakLogHandler | None = None
        self._seq = 0
        # (seq, pool, kind, payload): "leak" events and strict-mode timeouts.
        self.records: list[tuple[int, weakref.ref[Pool], str, dict[str, Any]]] = []
        self._stacks: dict[tuple[str, Any], str | None] = {}
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
                self._install()
            if strict:
                self._strict_users += 1
                if self._strict_users == 1:
                    self._install_strict()
            for pool in live_pools():
                self.watch(pool)

    def release(self, *, strict: bool = False) -> None:
        with self._lock:
            if strict:
                self._strict_users -= 1
                if self._strict_users == 0:
                    self._uninstall_strict()
            self._users -= 1
            if self._users == 0:
                self._uninstall()

    def _install(self) -> None:
        original = Pool.__dict__["__init__"]
        tracker = self

        @functools.wraps(original)
        def __init__(pool: Pool, *args: Any, **kwargs: Any) -> None:
            original(pool, *args, **kwargs)
            tracker.watch(pool)

        self._original_init = (original, __init__)
        setattr(Pool, "__init__", __init__)  # noqa: B010 - mypy refuses assigning to a method
        self._handler = _LeakLogHandler(self)
        logging.getLogger("safepool.leaks").addHandler(self._handler)

    def _uninstall(self) -> None:
        if self._original_init is not None:
            original, wrapper = self._original_init
            if Pool.__dict__.get("__init__") is wrapper:
                setattr(Pool, "__init__", original)  # noqa: B010
            self._original_init = None
        if self._handler is not None:
            logging.getLogger("safepool.leaks").removeHandler(self._handler)
            self._handler = None
        for pool, watch in list(self._watched.items()):
            _force_capture(pool, watch.capture_before)
            try:
                pool.remove_listener(watch.listener)
            except ValueError:
                pass
        self._watched.clear()
        self.records.clear()
        self._stacks.clear()
        self._ended.clear()

    def _install_strict(self) -> None:
        # The pool builds its PoolTimeoutError message at the moment an acquire
        # times out: the one place where "who holds what" can be looked at.
        original = Pool.__dict__.get("_busy_message")
        if original is None:
            logging.getLogger("safepool").warning("leak guard: this pool version cannot report idle-lease timeouts")
            return
        tracker = self

        @functools.wraps(original)
        def _busy_message(pool: Pool, *args: Any, **kwargs: Any) -> str:
            message: str = original(pool, *args, **kwargs)
            what = args[0] if args else kwargs.get("what", "")
            if isinstance(what, str) and what.startswith("timed out"):
                try:
                    tracker.note_timeout(pool, message)
                except Exception:  # a test helper must never break the pool
                    logging.getLogger("safepool").debug("leak guard: timeout inspection failed", exc_info=True)
            return message

        self._original_busy = (original, _busy_message)
        setattr(Pool, "_busy_message", _busy_message)  # noqa: B010

    def _uninstall_strict(self) -> None:
        if self._original_busy is not None:
            original, wrapper = self._original_busy
            if Pool.__dict__.get("_busy_message") is wrapper:
                setattr(Pool, "_busy_message", original)  # noqa: B010
            self._original_busy = None

    # pools and events -------------------------------------------------------

    def watch(self, pool: Pool) -> None:
        with self._lock:
            if pool in self._watched:
                return
            listener = functools.partial(self._on_event, weakref.ref(pool))
            self._watched[pool] = _Watch(_force_capture(pool, True), listener)
            pool.add_listener(listener)

    def _on_event(self, pool_ref: weakref.ref[Pool], event: dict[str, Any]) -> None:
        kind = event.get("event")
        if kind == "leak":
            self._record(pool_ref, "leak", dict(event))
        elif kind == "lease_ended":
            pool = pool_ref()
            if pool is not None:
                self.note_ended(pool, event)
        elif kind == "late_release":
            self.note_late_release(pool_ref, event["lease_id"])

    def _record(self, pool_ref: weakref.ref[Pool], kind: str, payload: dict[str, Any]) -> None:
        with self._lock:
            self._seq += 1
            self.records.append((self._seq, pool_ref, kind, payload))

    def note_stack(self, pool_name: str, lease_id: Any, stack: str | None) -> None:
        with self._lock:
            self._stacks[(pool_name, lease_id)] = stack
            if len(self._stacks) > 1000:
                self._stacks.pop(next(iter(self._stacks)))

    def stack_for(self, pool_name: str, lease_id: Any) -> str | None:
        with self._lock:
            return self._stacks.get((pool_name, lease_id))

    def note_timeout(self, pool: Pool, message: str) -> None:
        loop = _pool_loop(pool)
        holders = []
        for info in pool.leases():
            state, doing = _holder_activity(info.task_name, loop)
            holders.append((info, state, doing))
        self._record(weakref.ref(pool), "timeout", {"message": message, "holders": holders})

    def note_ended(self, pool: Pool, event: dict[str, Any]) -> None:
        """The pool's ``lease_ended`` event: terminate() ended a lease the
        code had not released (close() terminates when cancelled or failing)."""
        info = LeaseInfo(
            id=event["lease_id"], age=event["held_seconds"], deadline_in=None, task_name=event["task_name"],
            acquired_at=event["acquired_at"], stack=event["stack"], site=event.get("site"),
        )
        with self._lock:
            if not self._guards:
                return
            self._seq += 1
            entry = _Ended(self._seq, id(pool), pool.name, info)
            self._ended[(entry.pool_id, info.id)] = entry
            for guard in self._guards:
                guard.note_ended(pool, [entry])

    def note_late_release(self, pool_ref: weakref.ref[Pool], lease_id: int) -> None:
        """The pool's ``late_release`` event: the code released a lease after
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


# --------------------------------------------------------------- the guard


class LeakGuard:
    """Watches pools for leases that are not released between :meth:`start`
    and :meth:`stop`. Made by :func:`assert_no_leaks` and the
    ``safepool_leak_check`` fixture."""

    def __init__(self, pools: Iterable[Pool] | None = None, *, strict: bool = False) -> None:
        self._only: weakref.WeakSet[Pool] | None = weakref.WeakSet(pools) if pools is not None else None
        self.strict = strict
        self.seq0 = 0
        self._mark_seq = 0
        self._started = False
        self._baseline: weakref.WeakKeyDictionary[Pool, set[int]] = weakref.WeakKeyDictionary()
        self._mark: weakref.WeakKeyDictionary[Pool, set[int]] = weakref.WeakKeyDictionary()
        self._reported: set[tuple[int, int | None, str]] = set()
        # Leases acquired by each function-scoped fixture's setup, checked when
        # that fixture is torn down (before the next one's teardown, which may
        # close the pool and would wait for them forever).
        self._by_fixture: dict[str, list[tuple[weakref.ref[Pool], int]]] = {}
        self._pending: list[Leak] = []
        # Leases its pool ended while this guard ran, that were not held when
        # it started: (lease, held when the test function started).
        self._ended: list[tuple[_Ended, bool]] = []

    # lifecycle ---------------------------------------------------------------

    def start(self) -> LeakGuard:
        if self._started:
            raise RuntimeError("this leak guard is already started")
        _tracker.acquire(strict=self.strict)
        self._started = True
        self.seq0 = _tracker.seq
        self._baseline = self._snapshot()
        self._mark_seq = self.seq0
        self._mark = self._baseline
        _tracker.add_guard(self)
        return self

    def stop(self) -> None:
        if not self._started:
            return
        self._started = False
        _tracker.remove_guard(self)
        _tracker.release(strict=self.strict)

    def mark(self) -> None:
        """Check only what is acquired from now on in :meth:`leaks` with
        ``since_mark=True`` (the plugin marks the start of the test function)."""
        self._mark_seq = _tracker.seq
        self._mark = self._snapshot()

    def _pools(self) -> list[Pool]:
        pools = live_pools()
        if self._only is not None:
            pools = [pool for pool in pools if pool in self._only]
        return pools

    def _snapshot(self) -> weakref.WeakKeyDictionary[Pool, set[int]]:
        snapshot: weakref.WeakKeyDictionary[Pool, set[int]] = weakref.WeakKeyDictionary()
        for pool in self._pools():
            snapshot[pool] = {info.id for info in pool.leases()}
        return snapshot

    def fixture_setup(self, name: str) -> Callable[[], None]:
        """Call before a fixture's setup; call what it returns after it."""
        before = self._snapshot()

        def done() -> None:
            acquired = [
                (weakref.ref(pool), lease_id)
                for pool, ids in self._snapshot().items()
                for lease_id in ids - before.get(pool, set())
            ]
            if acquired:
                self._by_fixture.setdefault(name, []).extend(acquired)

        return done

    def fixture_finished(self, name: str) -> None:
        """A fixture was torn down: what its setup acquired must be released."""
        leaks = []
        for pool_ref, lease_id in self._by_fixture.pop(name, []):
            pool = pool_ref()
            if pool is None:
                continue
            for info in pool.leases():
                if info.id == lease_id and self._first_time(pool, lease_id, "open"):
                    _state, doing = _holder_activity(info.task_name, _pool_loop(pool))
                    leaks.append(Leak(
                        kind="open", pool=pool.name, lease_id=lease_id, held=info.age, task_name=info.task_name,
                        holder=None, acquired_at=info.acquired_at, stack=_trim_stack(info.stack),
                        detail=f"acquired by fixture {name!r}, whose teardown did not release it",
                        pool_ref=pool_ref, site=info.site,
                    ))
        if leaks:
            release_leaked(leaks)
            self._pending.extend(leaks)

    def note_ended(self, pool: Pool, ended: list[_Ended]) -> None:
        """The pool is being terminated with these leases open (the tracker
        calls this, before they vanish from ``pool.leases()``)."""
        if not self._started or (self._only is not None and pool not in self._only):
            return
        before, marked = self._baseline.get(pool, set()), self._mark.get(pool, set())
        self._ended.extend((entry, entry.info.id in marked) for entry in ended if entry.info.id not in before)

    # findings ----------------------------------------------------------------

    def leaks(self, *, since_mark: bool = False) -> list[Leak]:
        """What leaked since :meth:`start` (or :meth:`mark`) and was not reported
        yet by this guard. Reports nothing twice."""
        baseline = self._mark if since_mark else self._baseline
        seq0 = self._mark_seq if since_mark else self.seq0
        found: list[Leak] = []
        if not since_mark:
            found.extend(self._pending)
            self._pending.clear()
        for pool in self._pools():
            before = baseline.get(pool, set())
            loop = _pool_loop(pool)
            for info in pool.leases():
                if info.id in before or not self._first_time(pool, info.id, "open"):
                    continue
                _state, doing = _holder_activity(info.task_name, loop)
                found.append(Leak(
                    kind="open", pool=pool.name, lease_id=info.id, held=info.age, task_name=info.task_name,
                    holder=doing, acquired_at=info.acquired_at, stack=_trim_stack(info.stack),
                    pool_ref=weakref.ref(pool), site=info.site,
                ))
        for entry, held_at_mark in self._ended:
            if entry.released or (since_mark and (entry.seq <= self._mark_seq or held_at_mark)):
                continue
            key = (entry.pool_id, entry.info.id, "open")
            if key in self._reported:
                continue
            self._reported.add(key)
            info = entry.info
            found.append(Leak(
                kind="ended", pool=entry.pool_name, lease_id=info.id, held=info.age, task_name=info.task_name,
                holder=None, acquired_at=info.acquired_at, stack=_trim_stack(info.stack), site=info.site,
            ))
        for seq, pool_ref, kind, payload in list(_tracker.records):
            source = pool_ref()
            if seq <= seq0 or source is None or (self._only is not None and source not in self._only):
                continue
            if kind == "leak":
                lease_id = payload.get("lease_id")
                if lease_id in baseline.get(source, set()):
                    continue
                if (id(source), lease_id, "open") in self._reported or not self._first_time(source, lease_id, "gc"):
                    continue
                found.append(Leak(
                    kind="collected", pool=source.name, lease_id=lease_id,
                    held=float(payload.get("held_seconds") or 0.0), task_name=payload.get("task_name"),
                    holder=None, acquired_at=payload.get("acquired_at"),
                    stack=_trim_stack(_tracker.stack_for(source.name, lease_id)), site=payload.get("site"),
                ))
            elif kind == "timeout" and self.strict:
                leak = self._timeout_leak(source, seq, payload)
                if leak is not None:
                    found.append(leak)
        return found

    def _first_time(self, pool: Pool, lease_id: int | None, what: str) -> bool:
        key = (id(pool), lease_id, what)
        if key in self._reported:
            return False
        self._reported.add(key)
        return True

    def _timeout_leak(self, pool: Pool, seq: int, payload: dict[str, Any]) -> Leak | None:
        holders = payload["holders"]
        idle = [(info, doing) for info, state, doing in holders if state in ("idle", "ended")]
        if not idle or not self._first_time(pool, -seq, "timeout"):
            return None
        # "pool 'x': timed out waiting for a connection after 0.100s: max_size=1, ...; oldest leases: ..."
        message = str(payload["message"]).split("; oldest leases")[0]
        message = message.split(": ", 1)[1] if message.startswith("pool ") else message
        lines = [f"{message}; {len(idle)} of {len(holders)} leased connection(s) ran no statement:"]
        for info, doing in idle:
            task = f" by task {info.task_name}" if info.task_name else ""
            lines.append(f"  lease {info.id}, held {info.age:.3f}s{task}, {doing}; acquired at:")
            lines.append(_indent(_trim_stack(info.stack) or "  (acquire stack not captured)\n", "  ").rstrip("\n"))
        return Leak(
            kind="idle_timeout", pool=pool.name, lease_id=None, held=0.0, task_name=None, holder=None,
            acquired_at=None, stack=None, detail="\n".join(lines),
        )

    def check(self, *, since_mark: bool = False) -> None:
        """Raise :class:`LeakError` now if anything leaked (and release the
        leaked connections)."""
        leaks = self.leaks(since_mark=since_mark)
        if leaks:
            release_leaked(leaks)
            raise LeakError(format_report(leaks))

    # context manager -----------------------------------------------------------

    def __enter__(self) -> LeakGuard:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            leaks = self.leaks()
            if leaks:
                release_leaked(leaks)
                report = format_report(leaks)
                if exc is None:
                    raise LeakError(report)
                exc.add_note(report)
        finally:
            self.stop()

    async def __aenter__(self) -> LeakGuard:
        return self.start()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        # A proxy dropped inside the block is reclaimed in a loop callback:
        # let it run, so the report says "garbage collected" when it was.
        try:
            await asyncio.sleep(0)
            await asyncio.sleep(0)
        finally:
            self.__exit__(exc_type, exc, tb)


def assert_no_leaks(pool: Pool | Iterable[Pool] | None = None, *, strict: bool = False) -> LeakGuard:
    """A context manager (``with`` or ``async with``) that raises
    :class:`LeakError` if code inside it leaks a connection of ``pool`` (a pool,
    several, or ``None`` for every pool of the process, including pools
    created inside the block).

    ```python
    async with assert_no_leaks(pool):
        await handler(pool)
    ```

    Stack capture is on for the guarded pools while the block runs, so the
    error names the line of each leaked ``acquire()``. Leaked connections are
    released after the report. With ``strict=True`` an acquire timeout while
    connections were leased but not running a statement fails it too.
    """
    if pool is None:
        return LeakGuard(strict=strict)
    if isinstance(pool, Pool):
        return LeakGuard([pool], strict=strict)
    return LeakGuard(pool, strict=strict)


def release_leaked(leaks: Iterable[Leak]) -> None:
    """Release the connections of open leaks, so the test's own teardown (a
    pool fixture's ``close()``) does not wait for them forever. Best effort: a
    lease whose proxy is already garbage is reclaimed by the pool itself."""
    for leak in leaks:
        if leak.kind != "open" or leak.lease_id is None or leak.pool_ref is None:
            continue
        pool = leak.pool_ref()
        if pool is None or _pool_loop(pool).is_closed():
            continue
        try:
            proxy = _proxy_of(pool, leak.lease_id)
            if proxy is not None:
                _run_to_first_wait(pool.release(proxy))
        except Exception:
            logging.getLogger("safepool").debug("leak guard: could not release lease %s", leak.lease_id, exc_info=True)


def _run_to_first_wait(coro: Coroutine[Any, Any, Any]) -> None:
    """Run a coroutine that normally finishes without waiting (a release),
    outside of any running loop. If it wants to wait (a query cancellation in
    flight), give up: closing it makes the pool discard that connection."""
    try:
        coro.send(None)
    except StopIteration:
        return
    coro.close()


# ------------------------------------------------------------ pytest plugin

_SETTINGS = pytest.StashKey["_Settings"]()
_GUARD = pytest.StashKey[LeakGuard]()
_RECLAIM_WARNING = r"pool .*: a connection was garbage collected without being released"


@dataclass(frozen=True)
class _Settings:
    leaks: bool
    strict: bool


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("safepool", "safepool connection leak checks")
    group.addoption(
        "--safepool-leaks",
        action="store_true",
        default=None,
        help="fail every test that ends with a safepool connection it acquired still not released "
        "(or garbage collected unreleased), showing where it was acquired",
    )
    group.addoption(
        "--safepool-strict",
        action="store_true",
        default=None,
        help="like --safepool-leaks, and also fail a test in which an acquire timed out while connections "
        "were leased by tasks not running a statement",
    )
    parser.addini("safepool_leaks", type="bool", default=False, help="same as --safepool-leaks")
    parser.addini("safepool_strict", type="bool", default=False, help="same as --safepool-strict")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "safepool_allow_leaks: exempt this test from the --safepool-leaks check (it leaks on purpose)"
    )
    strict = bool(config.getoption("--safepool-strict") or config.getini("safepool_strict"))
    leaks = strict or bool(config.getoption("--safepool-leaks") or config.getini("safepool_leaks"))
    settings = _Settings(leaks=leaks, strict=strict)
    config.stash[_SETTINGS] = settings
    if settings.leaks:
        # Watch pools from the start of the session: pools made by session
        # fixtures capture acquire stacks too.
        _tracker.acquire(strict=settings.strict)


def pytest_unconfigure(config: pytest.Config) -> None:
    settings = config.stash.get(_SETTINGS, None)
    if settings is not None and settings.leaks:
        _tracker.release(strict=settings.strict)


def pytest_report_header(config: pytest.Config) -> str | None:
    settings = config.stash.get(_SETTINGS, None)
    if settings is None or not settings.leaks:
        return None
    return f"safepool: leak check on{' (strict)' if settings.strict else ''}"


@pytest.fixture
def safepool_leak_check(request: pytest.FixtureRequest) -> Iterator[LeakGuard]:
    """Fail this test if it leaks a safepool connection (what ``--safepool-leaks``
    does for every test). Request it before the fixtures it should cover:
    connections held by fixtures set up earlier are not its business.

    Yields the :class:`LeakGuard`; ``guard.check()`` checks mid-test."""
    settings = request.config.stash.get(_SETTINGS, _Settings(False, False))
    # The guard reports a reclaimed connection as a failure with its stack:
    # the pool's ResourceWarning would only repeat it (or, under
    # `filterwarnings = error`, be logged as an error in a loop callback).
    # pytest restores the warning filters after each test.
    warnings.filterwarnings("ignore", message=_RECLAIM_WARNING, category=ResourceWarning)
    guard = LeakGuard(strict=settings.strict).start()
    request.node.stash[_GUARD] = guard
    try:
        yield guard
        leaks = guard.leaks()
    finally:
        del request.node.stash[_GUARD]
        guard.stop()
    if leaks:
        release_leaked(leaks)
        pytest.fail(format_report(leaks), pytrace=False)


@pytest.fixture(autouse=True)
def _safepool_leak_autocheck(request: pytest.FixtureRequest) -> None:
    settings = request.config.stash.get(_SETTINGS, None)
    if settings is None or not settings.leaks or request.node.get_closest_marker("safepool_allow_leaks"):
        return
    request.getfixturevalue("safepool_leak_check")


@pytest.hookimpl(wrapper=True)
def pytest_fixture_setup(fixturedef: pytest.FixtureDef[Any], request: pytest.FixtureRequest) -> Iterator[Any]:
    guard = request.node.stash.get(_GUARD, None) if fixturedef.scope == "function" else None
    if guard is None or fixturedef.argname == "safepool_leak_check":
        return (yield)
    done = guard.fixture_setup(fixturedef.argname)
    try:
        return (yield)
    finally:
        done()


def pytest_fixture_post_finalizer(fixturedef: pytest.FixtureDef[Any], request: pytest.FixtureRequest) -> None:
    guard = request.node.stash.get(_GUARD, None) if fixturedef.scope == "function" else None
    if guard is not None:
        guard.fixture_finished(fixturedef.argname)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    guard = item.stash.get(_GUARD, None)
    if guard is None:
        return (yield)
    # The test function must release what it acquires itself: check when it
    # returns, before the fixtures' teardown (a pool fixture's close() would
    # otherwise wait forever for the leaked connections).
    guard.mark()
    try:
        result = yield
    except BaseException:
        leaks = guard.leaks(since_mark=True)
        if leaks:
            release_leaked(leaks)
            item.add_report_section("call", "safepool leaks", format_report(leaks))
        raise
    leaks = guard.leaks(since_mark=True)
    if leaks:
        release_leaked(leaks)
        pytest.fail(format_report(leaks), pytrace=False)
    return result
