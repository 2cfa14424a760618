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
import contextvars
import functools
import inspect
import logging
import os
import sys
import threading
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import FrameType
from typing import TYPE_CHECKING, Any, TypeVar

from ..errors import PoolTimeoutError
from ..events import AcquireTimedOut, LateRelease, Leaked, LeaseEnded, LeaseExpired, PoolEvent
from ..pool import Pool, live_pools, on_pool_created
from ..stats import LeaseInfo

if TYPE_CHECKING:
    from .guards import LeakGuard

_T = TypeVar("_T")

# How long the guards wait for a pool's event loop running in another thread
# (a TestClient's portal, a server thread) to run what they ask of it.
LOOP_TIMEOUT = 5.0

_log = logging.getLogger("safepool")


def _module_dir(name: str) -> str | None:
    module = sys.modules.get(name)
    path: str | None = getattr(module, "__file__", None) if module is not None else None
    if not path:
        return None
    if os.path.basename(path) == "__init__.py":
        return os.path.dirname(os.path.abspath(path)) + os.sep
    return os.path.abspath(path)


# ------------------------------------------------------ the pool's thread


def on_pool_loop(pool: Pool, function: Callable[[], _T]) -> _T:
    """Run ``function()`` where ``pool`` may be touched: on its event loop's
    thread. Directly when this is that thread, or when the loop is not
    running (stopped, or closed: nothing else touches the pool then); else
    (the loop runs in another thread: a TestClient's portal, a server
    thread) scheduled on the loop, waiting up to :data:`LOOP_TIMEOUT`
    seconds (``Pool.call_threadsafe``).

    :raises safepool.PoolTimeoutError: the loop did not run it in time.
    :raises Exception: what ``function`` raised."""
    return pool.call_threadsafe(function, LOOP_TIMEOUT)


def read_on_pool_loop(pool: Pool, function: Callable[[], _T]) -> _T:
    """:func:`on_pool_loop` for a read (``pool.leases()``): if the loop, in
    another thread, does not answer in time (it is blocked), read from here
    after all, logging a warning: a blocked loop is not changing the pool."""
    try:
        return on_pool_loop(pool, function)
    except PoolTimeoutError:
        _log.warning(
            "leak guard: pool %r's event loop, running in another thread, did not answer within %g s; "
            "reading its leases from this thread", pool.name, LOOP_TIMEOUT,
        )
        return function()


# ------------------------------------------------------ what tasks are doing

_ASYNCPG_DIR = _module_dir("asyncpg")
_SKIP_FOR_WHERE = ("safepool", "asyncio", "anyio")


def _await_chain(task: asyncio.Task[Any]) -> list[FrameType]:
    """The frames a suspended task is waiting in, outermost first."""
    return _coro_frames(task.get_coro())


def _coro_frames(awaitable: Any) -> list[FrameType]:
    frames: list[FrameType] = []
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


_MAX_WAITED_ON = 64  # tasks followed from one holder: more is not worth walking


def _tasks_waited_on(task: asyncio.Task[Any]) -> list[asyncio.Task[Any]]:
    """The tasks a suspended task is waiting for, transitively: the chain of
    coroutines ends at the future the task is blocked on (``Task._fut_waiter``,
    which CPython's C and Python tasks both have), and that future is another
    task (``await task``), or a future that tasks complete from a done
    callback: ``asyncio.shield()``'s outer future (its inner task's callback
    holds it), ``asyncio.wait_for()``'s waiter on Python 3.11 (the task
    running the awaitable), ``asyncio.gather()``'s future (its children),
    ``asyncio.wait()``/``as_completed()``'s waiter, and a ``TaskGroup``'s
    ``__aexit__`` (the group's tasks: their callback is a method of the group,
    which holds the future). A future completed otherwise (an Event, a Queue,
    a lock, a thread, an executor) has no task behind it to follow: the holder
    is waiting on something that is not a statement. Read on the tasks' loop
    thread (strict mode's event, the guards' checks, both there)."""
    found: list[asyncio.Task[Any]] = []
    seen = {id(task)}
    pending = [task]
    while pending and len(found) < _MAX_WAITED_ON:
        waiter = getattr(pending.pop(), "_fut_waiter", None)
        if waiter is None or not asyncio.isfuture(waiter) or waiter.done():
            continue
        if isinstance(waiter, asyncio.Task):
            helpers: list[asyncio.Task[Any]] = [waiter]
        else:
            try:
                others = asyncio.all_tasks(waiter.get_loop())
            except RuntimeError:  # its loop is closed
                others = set()
            helpers = [
                other for other in others
                if id(other) not in seen and not other.done() and _completes(other, waiter)
            ]
        for helper in helpers:
            if id(helper) not in seen and not helper.done():
                seen.add(id(helper))
                found.append(helper)
                pending.append(helper)
    return found[:_MAX_WAITED_ON]


def _done_callbacks(future: asyncio.Future[Any]) -> list[Any]:
    """A pending future's done callbacks (CPython keeps them as
    ``(callback, context)`` pairs; None when there are none)."""
    entries = getattr(future, "_callbacks", None) or ()
    return [entry[0] if isinstance(entry, tuple) else entry for entry in entries]


def _completes(future: asyncio.Future[Any], target: asyncio.Future[Any], depth: int = 3) -> bool:
    """Whether completing ``future`` completes ``target``: one of its done
    callbacks holds ``target``, or holds a pending future (not a task) that
    completes it in turn (``wait_for(shield(...))`` on 3.11: the inner task
    completes shield's outer future, which completes wait_for's waiter)."""
    for callback in _done_callbacks(future):
        held = list(_held_by(callback))
        if any(value is target for value in held):
            return True
        if depth > 1 and any(
            asyncio.isfuture(value) and not isinstance(value, asyncio.Task) and value is not future
            and not value.done() and _completes(value, target, depth - 1)
            for value in held
        ):
            return True
    return False


def _held_by(callback: Any, depth: int = 2) -> Iterator[Any]:
    """What a done callback holds: a partial's function and arguments, a
    closure's cells, a bound method's object and that object's attributes
    (a ``TaskGroup``'s ``_on_task_done`` holds the group, which holds the
    future its ``__aexit__`` waits on). Not another task's wakeup: a task
    that awaits this one is not waited for by it."""
    if depth <= 0:
        return
    if isinstance(callback, functools.partial):
        for part in (callback.func, *callback.args, *callback.keywords.values()):
            yield part
            yield from _held_by(part, depth - 1)
        return
    for cell in getattr(callback, "__closure__", None) or ():
        try:
            yield cell.cell_contents
        except ValueError:  # an empty cell
            continue
    owner = getattr(callback, "__self__", None)
    if owner is None or isinstance(owner, type) or asyncio.isfuture(owner):
        return
    yield owner
    try:
        yield from vars(owner).values()  # an object's attributes (asyncio's, when followed at all)
    except TypeError:  # no instance attributes (slots, a C object)
        return


def _in_asyncpg(frames: list[FrameType]) -> bool:
    asyncpg_dir = _ASYNCPG_DIR
    return asyncpg_dir is not None and any(f.f_code.co_filename.startswith(asyncpg_dir) for f in frames)


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
    running a statement; or waiting for a task that is, see
    :func:`_tasks_waited_on`), "running", "idle" (suspended elsewhere), "returned"
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
    if _in_asyncpg(frames):
        return "query", "running a statement"
    # Waiting for tasks that run on its behalf (asyncio.shield(), wait_for()
    # on 3.11, gather(), a TaskGroup): one of them inside asyncpg counts. The
    # pool cannot tell which connection that statement runs on: a holder
    # waiting for a task that queries on another connection is not reported
    # either (strict mode does not fail a test on a guess).
    for helper in _tasks_waited_on(task):
        if _in_asyncpg(_await_chain(helper)):
            return "query", f"running a statement (in task {helper.get_name()}, which it waits for)"
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


# ------------------------------------------------------- where tasks come from


@dataclass(frozen=True)
class TaskOrigin:
    """Where a task was created, as the tracker's task factory saw it:
    during which test (``test``, the token a guard claimed with
    :meth:`_Tracker.set_task_origin`, and ``label``, the test's name; both
    None outside any test), in which of its phases (``phase``: "setup",
    "call", "teardown"; ``by``: "fixture 'name'", "the test function"), and
    at which line of the code that created it (``site``; None when the test
    runner created it: pytest-asyncio running a test or fixture). A task
    created by code that runs on behalf of an earlier test (a task it
    started, or a callback scheduled from one: ``call_later()``,
    ``call_soon()``, a done callback, which run in the context of the code
    that scheduled them) is that test's: the origin travels in a context
    variable set in each new task's context. anyio's test runner task, which
    runs every test and fixture, has none: what it creates is the running
    test's."""

    test: object | None
    label: str | None
    phase: str
    by: str
    site: str | None


# The origin of the code running now: set in the context of each task the
# tracker's factory makes; a callback copies the context it was scheduled in.
_ORIGIN: contextvars.ContextVar[TaskOrigin | None] = contextvars.ContextVar("safepool_task_origin", default=None)
# anyio's test runner task's: what it creates is the running test's.
_RUNNER = TaskOrigin(None, None, "", "", None)

_SKIP_FOR_SITE = ("asyncio", "anyio", "contextlib", "safepool")
_RUNNERS = ("pytest_asyncio", "_pytest", "pluggy")


@functools.lru_cache(maxsize=4096)
def _site_kind(filename: str) -> str:
    """"runner" (a test runner's file), "skip" (asyncio's, anyio's,
    safepool's) or "code": run for every task created, hence cached."""
    path = os.path.abspath(filename)
    runners = tuple(p for p in (_module_dir(n) for n in _RUNNERS) if p)
    if runners and path.startswith(runners):
        return "runner"
    skip = tuple(p for p in (_module_dir(n) for n in _SKIP_FOR_SITE) if p)
    return "skip" if skip and path.startswith(skip) else "code"


def _creation_site(frame: FrameType | None) -> str | None:
    """The innermost frame of the code creating a task, asyncio's, anyio's
    and safepool's own frames skipped: "file:line in name"; None when that
    code is the test runner's (pytest-asyncio running a test or a fixture)."""
    for _ in range(100):
        if frame is None:
            return None
        kind = _site_kind(frame.f_code.co_filename)
        if kind == "runner":
            return None
        if kind == "code":
            return f"{frame.f_code.co_filename}:{frame.f_lineno} in {frame.f_code.co_name}"
        frame = frame.f_back
    return None


def _is_runner_coro(coro: Any) -> bool:
    """Whether ``coro`` is anyio's pytest runner task's (it runs every test
    and fixture: what it creates is the test's running then)."""
    frame = getattr(coro, "cr_frame", None)
    return isinstance(frame, FrameType) and _in_anyio_test_runner(frame)


def _make_task(
    tracker_ref: weakref.ref[_Tracker], previous: Callable[..., Any] | None,
    loop: asyncio.AbstractEventLoop, coro: Any, **kwargs: Any,
) -> asyncio.Task[Any]:
    """The task factory the tracker sets on the loops of the pools it
    watches: the loop's own (or the factory set before) makes the task, and
    the tracker notes where it came from (:class:`TaskOrigin`), in the
    task's context too (``context=``, as ``loop.create_task()`` takes it)."""
    tracker = tracker_ref()
    origin: TaskOrigin | None = None
    if tracker is not None:
        try:
            origin = tracker.origin_for(coro, _creation_site(inspect.currentframe()))
            context = kwargs.get("context")
            if context is not None:  # the task runs in this one
                context.run(_ORIGIN.set, origin)
        except Exception:  # a context entered elsewhere: attribution is best effort
            _log.debug("leak guard: could not note where a task was created", exc_info=True)
    # Without a context given, the task copies the current one: set the
    # origin in it for that moment (the factory's signature unchanged, for
    # a factory set before that takes no context).
    token = _ORIGIN.set(origin) if origin is not None and kwargs.get("context") is None else None
    try:
        task: asyncio.Task[Any] = (
            previous(loop, coro, **kwargs) if previous is not None else asyncio.Task(coro, loop=loop, **kwargs)
        )
    finally:
        if token is not None:
            _ORIGIN.reset(token)
    if tracker is not None and origin is not None and origin is not _RUNNER:
        tracker.note_birth(task, origin)
    return task


def _birth_ended(tracker_ref: weakref.ref[_Tracker], origin: TaskOrigin, task: asyncio.Task[Any]) -> None:
    tracker = tracker_ref()
    if tracker is not None:
        tracker.note_task_ended(task.get_name(), origin)


# ------------------------------------------------------------- the tracker


def _install(pool: Pool, watch: _Watch) -> None:
    pool.capture_stack = True
    pool.add_event_listener(watch.listener)


def _unwatch(pool: Pool, watch: _Watch) -> None:
    pool.capture_stack = watch.capture_before
    try:
        pool.remove_event_listener(watch.listener)
    except ValueError:
        pass


def _on_pool_loop_or_here(pool: Pool, function: Callable[[], None]) -> None:
    """Set a pool's stack capture and event listener on its loop's thread
    (:func:`on_pool_loop`); if that loop, in another thread, is blocked, from
    here after all: each is one operation on an attribute (a flag, a list)."""
    try:
        on_pool_loop(pool, function)
    except PoolTimeoutError:
        _log.warning(
            "leak guard: pool %r's event loop, running in another thread, did not answer within %g s; "
            "setting its stack capture and event listener from this thread", pool.name, LOOP_TIMEOUT,
        )
        function()


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
    reported: bool = False  # by a guard (every guard shares this entry: one report)


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
        # What a guard reported already, whichever guard: another guard
        # running at the same time (the plugin's around an assert_no_leaks
        # block) must not report it again (review h274). Leases by pool (a
        # pool's lease ids are its own), and records (a Leaked event of a
        # pool that is garbage since) by seq.
        self._reported: weakref.WeakKeyDictionary[Pool, set[int]] = weakref.WeakKeyDictionary()
        self._reported_seqs: set[int] = set()
        # Where tasks came from (a task factory on the watched pools' loops):
        # a lease is the test's that started its task (review h274).
        self._origin: tuple[object | None, str | None, str, str] = (None, None, "", "")
        self._births: weakref.WeakKeyDictionary[asyncio.Task[Any], TaskOrigin] = weakref.WeakKeyDictionary()
        # Tasks that ended (a lease keeps only the name of a task that is
        # garbage since): by name, with the generation they ended in; kept
        # until the end of the next test (prune_births()).
        self._ended_births: dict[str, tuple[TaskOrigin, int]] = {}
        self._generation = 0
        self._factories: weakref.WeakKeyDictionary[
            asyncio.AbstractEventLoop, tuple[Callable[..., Any], Callable[..., Any] | None]
        ] = weakref.WeakKeyDictionary()

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
        # Not under the lock: watch() may wait for a pool's loop thread,
        # whose event listener takes the lock.
        for pool in live_pools():
            self.watch(pool)

    def release(self, *, strict: bool = False) -> None:
        undo: list[tuple[Pool, _Watch]] = []
        with self._lock:
            if strict:
                self._strict_users -= 1
            self._users -= 1
            if self._users == 0:
                undo = self._uninstall()
        for pool, watch in undo:  # not under the lock, as in acquire()
            _on_pool_loop_or_here(pool, functools.partial(_unwatch, pool, watch))

    def _uninstall(self) -> list[tuple[Pool, _Watch]]:
        """Stop watching: what is returned is to be undone on each pool."""
        if self._unhook is not None:
            self._unhook()
            self._unhook = None
        undo = list(self._watched.items())
        self._watched.clear()
        self.records.clear()
        self._ended.clear()
        self._reported = weakref.WeakKeyDictionary()
        self._reported_seqs.clear()
        for loop, (factory, previous) in list(self._factories.items()):
            if not loop.is_closed() and loop.get_task_factory() is factory:
                loop.set_task_factory(previous)
        self._factories = weakref.WeakKeyDictionary()
        self._births = weakref.WeakKeyDictionary()
        self._ended_births.clear()
        self._origin = (None, None, "", "")
        return undo

    # pools and events -------------------------------------------------------

    def watch(self, pool: Pool) -> None:
        with self._lock:
            if pool in self._watched:
                return
            listener = functools.partial(self._on_event, weakref.ref(pool))
            watch = _Watch(pool.capture_stack, listener)
            self._watched[pool] = watch
        _on_pool_loop_or_here(pool, functools.partial(self._install, pool, watch))

    def _install(self, pool: Pool, watch: _Watch) -> None:
        _install(pool, watch)
        self._watch_tasks()

    def _watch_tasks(self) -> None:
        """Set the task factory that notes where tasks come from on the
        running loop (the pool's: a pool built outside its loop leaves it
        unset, and its tasks' origin unknown). Wraps a factory set before."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        with self._lock:
            try:
                if loop in self._factories:
                    return
            except TypeError:  # a loop that cannot be weakly referenced
                return
            previous = loop.get_task_factory()
            factory = functools.partial(_make_task, weakref.ref(self), previous)
            if previous is not None:
                # It starts tasks as the factory it wraps does (eagerly, with
                # asyncio.eager_task_factory): the pool asks that one
                # (_internals.starts_tasks_eagerly; review h280).
                factory.__wrapped__ = previous  # type: ignore[attr-defined]
            loop.set_task_factory(factory)
            self._factories[loop] = (factory, previous)

    # where tasks come from ----------------------------------------------------

    def set_task_origin(self, test: object | None, label: str | None, phase: str = "", by: str = "") -> None:
        """Tasks created from now on are ``test``'s (None: no test's), in ``phase``."""
        with self._lock:
            self._origin = (test, label, phase, by)

    def task_origin(self) -> tuple[object | None, str | None, str, str]:
        with self._lock:
            return self._origin

    def origin_for(self, coro: Any, site: str | None) -> TaskOrigin:
        """The origin of a task being created now, running ``coro``: that of
        the code creating it when it runs for a test other than the one
        running now (a task, or a callback, an earlier test left behind),
        else the running test's, in its current phase."""
        if _is_runner_coro(coro):
            return _RUNNER
        with self._lock:
            test, label, phase, by = self._origin
        creator = _ORIGIN.get()
        if creator is not None and creator.test is not None and creator.test is not test:
            return TaskOrigin(creator.test, creator.label, creator.phase, creator.by, site)
        return TaskOrigin(test, label, phase, by, site)

    def note_birth(self, task: asyncio.Task[Any], origin: TaskOrigin) -> None:
        with self._lock:
            self._births[task] = origin
        task.add_done_callback(functools.partial(_birth_ended, weakref.ref(self), origin))

    def note_task_ended(self, name: str, origin: TaskOrigin) -> None:
        with self._lock:
            self._ended_births[name] = (origin, self._generation)

    def origin_of(self, info: LeaseInfo) -> TaskOrigin | None:
        """Where the task holding lease ``info`` was created; None when not
        known (created before the pool's loop was watched, a loop with a
        task factory set since, or anyio's test runner task, which runs
        every test). A task that is garbage since is found by its name."""
        task = info.task
        with self._lock:
            if task is not None:
                if _is_runner_coro(task.get_coro()):
                    return None
                return self._births.get(task)
            if info.task_ref is None or info.task_name is None:
                return None
            entry = self._ended_births.get(info.task_name)
            return entry[0] if entry is not None else None

    def prune_births(self) -> None:
        """A test ended: forget the tasks that ended before the last one did."""
        with self._lock:
            self._generation += 1
            self._ended_births = {
                name: entry for name, entry in self._ended_births.items() if entry[1] >= self._generation - 1
            }

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

    def note_reported(self, pool: Pool | None, key: int | None, seq: int | None = None) -> None:
        """A guard reported ``pool``'s lease ``key`` (or the record ``seq``):
        no guard reports it again."""
        with self._lock:
            if pool is not None and key is not None:
                self._reported.setdefault(pool, set()).add(key)
            if seq is not None:
                self._reported_seqs.add(seq)

    def was_reported(self, pool: Pool | None, key: int | None, seq: int | None = None) -> bool:
        """Whether a guard reported ``pool``'s lease ``key`` or the record ``seq``."""
        with self._lock:
            if pool is not None and key is not None and key in self._reported.get(pool, ()):
                return True
            return seq is not None and seq in self._reported_seqs

    def guards(self) -> list[LeakGuard]:
        """The guards running now."""
        with self._lock:
            return list(self._guards)

    def add_guard(self, guard: LeakGuard) -> None:
        with self._lock:
            self._guards.append(guard)

    def remove_guard(self, guard: LeakGuard) -> None:
        with self._lock:
            if guard in self._guards:
                self._guards.remove(guard)
            oldest = min((g.seq0 for g in self._guards), default=self._seq)
            self.records = [record for record in self.records if record[0] > oldest]
            self._reported_seqs = {seq for seq in self._reported_seqs if seq > oldest}
            if not self._guards:
                # A later guard ignores the leases open at its start.
                self._reported = weakref.WeakKeyDictionary()
            self._ended = {key: entry for key, entry in self._ended.items() if entry.seq > oldest}


_tracker = _Tracker()
