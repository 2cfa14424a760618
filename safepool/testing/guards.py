"""Leak guards: ``assert_no_leaks`` and :class:`LeakGuard` (no pytest import).

What counts as a leak: a lease acquired while the guard was active that is
still open when the guarded code ends, whose proxy was garbage collected
unreleased (the pool reclaims it and emits a ``Leaked`` event), or that the
pool ended itself (``terminate()``, or a ``close()`` cancelled or timed out,
which terminates; or its ``lease_timeout``, which takes the connection back)
without the code releasing it, before or after. Leases that
were already open when the guard started belong to someone else (a session
fixture's connection) and are ignored.

While a guard is active every pool captures acquire stacks, so a report names
the line that acquired each leaked connection. Everything here uses the
pool's public observation surface (docs/api.md, "Observing a pool").
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import os
import re
import weakref
from collections import Counter
from collections.abc import Callable, Coroutine, Hashable, Iterable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

from ..errors import PoolError, PoolTimeoutError, check_is_pool, pool_list
from ..events import Leaked
from ..pool import Pool, live_pools, on_pool_created
from ..stats import LeaseInfo
from . import tracker
from .tracker import (
    TaskOrigin,
    TimedOut,
    _Ended,
    _module_dir,
    _tracker,
    holder_activity,
    on_pool_loop,
    read_on_pool_loop,
)

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
LIVE_HINT = (
    "Fix: the task holding it is still running (a background task, or one the code did not await): "
    "end it before the check (await it, or cancel it and await it), and have it release on every path "
    "(`async with pool.acquire() as con:`)."
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
    proxy was garbage collected unreleased; the pool takes the connection
    back, once nothing uses it), ``"ended"`` (the pool was terminated, or its ``close()``
    cancelled, while the lease was open, or its ``lease_timeout`` took the
    connection back, and the code never released it) or
    ``"idle_timeout"`` (strict mode: an acquire timed out while connections
    were leased and not used; its text is in ``detail``). ``held`` is in
    seconds (0.0 for ``"idle_timeout"``); ``lease_id`` is
    :attr:`safepool.LeaseInfo.id` (None for ``"idle_timeout"``).
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
    # An open lease's holding task, as safepool.testing.tracker.holder_activity
    # says: "query", "running", "idle", "returned", "ended" or "unknown"; None otherwise.
    holder_state: str | None = None
    # Set by release_leaked() when the leaked connection could not be
    # released (its pool's loop, in another thread, did not run the release).
    release_error: str | None = None

    def describe(self) -> str:
        """The leak report, as the plugin prints it: a line naming the pool,
        the lease and how it leaked (held time in seconds, the task), the
        acquire site when one was named, then the acquire stack (its line
        alone when the stack was not captured)."""
        task = f" by task {self.task_name}" if self.task_name else ""
        if self.kind == "open":
            state = f" ({self.holder})" if self.holder else ""
            head = f"pool {self.pool!r}, lease {self.lease_id}: still held after {self.held:.3f}s{task}{state}"
            if self.detail:
                head += f"; {self.detail}"
        elif self.kind == "collected":
            head = (
                f"pool {self.pool!r}, lease {self.lease_id}: garbage collected without being released "
                f"(held {self.held:.3f}s{task}; the pool takes the connection back)"
            )
            if self.detail:
                head += f"; {self.detail}"
        elif self.kind == "ended":
            how = self.detail or "terminate(), or a close() cancelled or timed out"
            head = (
                f"pool {self.pool!r}, lease {self.lease_id}: never released; the pool ended it "
                f"({how}) after {self.held:.3f}s{task}"
            )
        else:
            return f"pool {self.pool!r}: {self.detail}"
        where = self.stack or (f"  {self.acquired_at}\n" if self.acquired_at else "  (acquire stack not captured)\n")
        if self.site is not None:
            head += f"\n  acquire site: {self.site}"
        if self.release_error is not None:
            head += f"\n  {self.release_error}"
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
    # A holder still alive elsewhere (running a statement, or suspended in
    # another task) may well be inside its `async with`: the fix is to end
    # that task, not the acquire's form.
    live = sum(1 for leak in leaks if leak.kind == "open" and leak.holder_state in ("idle", "query"))
    if held > live:
        lines.append(FIX_HINT)
    if live:
        lines.append(LIVE_HINT)
    if timeouts:
        lines.append(STRICT_HINT)
    return "\n".join(lines)


# ---------------------------------------------------------- stack handling

_FRAME_RE = re.compile(r'^  File "(?P<file>[^"]+)", line (?P<line>\d+), in (?P<name>.*)$')
_RUNNER_MODULES = ("_pytest", "pytest", "pluggy", "pytest_asyncio", "anyio", "asyncio", "pytest_timeout")


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


def _indent(text: str, prefix: str) -> str:
    return "".join(prefix + line + "\n" for line in text.splitlines())


# --------------------------------------------------------------- the guard


class GuardStartedError(PoolError, RuntimeError):
    """:meth:`LeakGuard.start` of a guard already started: a ``RuntimeError``
    (what it raised before) and, as every error safepool raises of its own,
    a :class:`safepool.PoolError`."""


@dataclass
class _Setup:
    """A fixture being set up while a guard runs (:meth:`LeakGuard.fixture_setup`)."""

    key: Hashable
    name: str
    where: str | None
    track: bool
    before: weakref.WeakKeyDictionary[Pool, set[int]]
    # (id(pool), lease id) of the leases that fixtures set up inside this one
    # (request.getfixturevalue() in its setup) took: theirs, not this one's.
    inner: set[tuple[int, int]] = field(default_factory=set)
    # The pools created while this was the innermost fixture being set up.
    created: list[weakref.ref[Pool]] = field(default_factory=list)


@dataclass
class _FixtureLeases:
    name: str
    where: str | None
    leases: list[tuple[weakref.ref[Pool], int]]
    torn_down: bool = False  # the fixture's teardown ran


def _origin_detail(origin: TaskOrigin | None, current: str | None) -> str:
    """What a report says of a lease held by a task the test during which it
    was found did not start (``current``: that test's name)."""
    site = f", created at {origin.site}" if origin is not None and origin.site else ""
    found = f"found during {current}" if current else "found during another test"
    if origin is None or origin.test is None:
        return (
            f"its task was created outside any test (by a module-, class- or session-scoped fixture, "
            f"or between tests){site}; {found}, which is not blamed for it"
        )
    by = f" ({origin.by})" if origin.by else ""
    return (
        f"its task was started by test {origin.label}{by}{site} and left running after that test ended; "
        f"{found}, which is not blamed for it"
    )


def _fixture_detail(entry: _FixtureLeases, closer: str | None = None) -> str:
    """What a leak report says of a fixture's lease: the fixture, where it is
    defined, and when it was found held (``closer``: the fixture that created
    its pool, about to be torn down)."""
    where = f" (the fixture defined at {entry.where})" if entry.where else ""
    if entry.torn_down or closer is None:
        return f"acquired by fixture {entry.name!r}, whose teardown did not release it{where}"
    # The pool's fixture is torn down first: set up inside this one's setup.
    return (
        f"acquired by fixture {entry.name!r}{where}, still held when fixture {closer!r}, "
        f"which created its pool, was torn down before {entry.name!r}"
    )


class LeakGuard:
    """Watches pools for leases that are not released between :meth:`start`
    and :meth:`stop`. Made by :func:`assert_no_leaks` and the
    ``safepool_leak_check`` fixture.

    :param pools: the pools to watch (None: every pool of the process,
        those created later included).
    :param strict: also report an acquire timeout while connections were
        leased by tasks not running a statement (``Leak.kind``
        ``"idle_timeout"``)."""

    def __init__(self, pools: Iterable[Pool] | None = None, *, strict: bool = False) -> None:
        """:raises TypeError: ``pools`` is not an iterable of safepool pools
        (one pool: pass ``[pool]``, or use :func:`assert_no_leaks`)."""
        self._only: weakref.WeakSet[Pool] | None = weakref.WeakSet(_pools_arg(pools)) if pools is not None else None
        self.strict = strict
        self.seq0 = 0
        self._mark_seq = 0
        self._started = False
        self._baseline: weakref.WeakKeyDictionary[Pool, set[int]] = weakref.WeakKeyDictionary()
        self._mark: weakref.WeakKeyDictionary[Pool, set[int]] = weakref.WeakKeyDictionary()
        self._baseline_ids: dict[int, set[int]] = {}
        self._mark_ids: dict[int, set[int]] = {}
        self._reported: set[tuple[int, int | None, str]] = set()
        # Leases acquired by each function-scoped fixture's setup. They are
        # the fixture's, but it need not release them itself: they are
        # checked when they must be released, before their pool is closed:
        # right before the teardown of the function-scoped fixture that
        # created the pool (pool_teardown()), or at the end of the test's
        # teardown for other pools (fixture_leaks()). Keyed by the fixture's
        # definition (the plugin passes its FixtureDef), not its name: a
        # fixture that overrides another of the same name is another fixture.
        self._by_fixture: dict[Hashable, _FixtureLeases] = {}
        # The pools each function-scoped fixture's setup created (the key as
        # in _by_fixture), with the fixture's name.
        self._created: dict[Hashable, tuple[str, list[weakref.ref[Pool]]]] = {}
        # (id(pool), lease id) -> the fixture whose setup acquired it: names
        # the fixture when the lease is found garbage collected.
        self._owners: dict[tuple[int, int], _FixtureLeases] = {}
        self._unhook_created: Callable[[], None] | None = None
        # The fixtures being set up now, innermost last: a fixture's setup
        # may set up another (request.getfixturevalue()); a lease belongs to
        # the innermost one whose setup acquired it.
        self._setting_up: list[_Setup] = []
        # (id(pool), lease id): leases taken by the setup of a function-scoped
        # fixture (checked at its teardown, not as the test function's), and
        # by that of a wider-scoped one (not this test's business at all).
        self._fixture_leases: set[tuple[int, int]] = set()
        self._foreign: set[tuple[int, int]] = set()
        self._pending: list[Leak] = []
        # Leases its pool ended while this guard ran, that were not held when
        # it started: (lease, held when the test function started).
        self._ended: list[tuple[_Ended, bool]] = []
        # The plugin's guard of one test (claim_tasks()): the tasks created
        # while it runs are its test's, and a lease held by a task another
        # test started (and left running) is not this test's leak. Found,
        # such leases are released and kept here (take_unattributed()).
        self._test: object | None = None
        self._test_label: str | None = None
        self._outer_origin: tuple[object | None, str | None, str, str] = (None, None, "", "")
        self._unattributed: list[Leak] = []

    # lifecycle ---------------------------------------------------------------

    def start(self) -> LeakGuard:
        """Start watching (returns the guard): leases acquired from now on
        and not released by :meth:`leaks` are leaks.

        :raises GuardStartedError: (a ``RuntimeError``) the guard is already started."""
        if self._started:
            raise GuardStartedError("this leak guard is already started")
        _tracker.acquire(strict=self.strict)
        self._started = True
        self.seq0 = _tracker.seq
        self._baseline = self._snapshot()
        self._mark_seq = self.seq0
        self._mark = self._baseline
        self._baseline_ids = self._mark_ids = _by_id(self._baseline)
        _tracker.add_guard(self)
        self._unhook_created = on_pool_created(self._pool_created)
        return self

    def stop(self) -> None:
        """Stop watching (a stopped guard's :meth:`stop` does nothing)."""
        if not self._started:
            return
        self._started = False
        if self._test is not None:
            if _tracker.task_origin()[0] is self._test:
                # (A pytester run inside a test: the outer test's again.)
                _tracker.set_task_origin(*self._outer_origin)
            _tracker.prune_births()
        if self._unhook_created is not None:
            self._unhook_created()
            self._unhook_created = None
        _tracker.remove_guard(self)
        _tracker.release(strict=self.strict)

    def claim_tasks(self, label: str) -> None:
        """This guard checks one test (``label``, its name; the plugin's
        guard): the tasks created from now until :meth:`stop` are that
        test's, and a lease held by a task that another test started, or
        that was created outside any test, is not reported as this test's
        leak but released and kept apart (:meth:`take_unattributed`). Where
        a task was created is known for the pools' loops the tracker watched
        before it was (a task factory notes it); a lease of a task of unknown
        origin is this test's, as before."""
        self._outer_origin = _tracker.task_origin()
        self._test = object()
        self._test_label = label
        _tracker.set_task_origin(self._test, label, "setup", "")

    def call_finished(self) -> None:
        """The test function returned (or raised): tasks created from now on
        are its teardown's."""
        if self._test is not None:
            _tracker.set_task_origin(self._test, self._test_label, "teardown", "a teardown")

    def take_unattributed(self) -> list[Leak]:
        """The leases found held by tasks this guard's test did not start
        (another test's, left running after it ended, or created outside any
        test), released when found; each is returned once."""
        taken, self._unattributed = self._unattributed, []
        return taken

    def _whose(self, info: LeaseInfo, *, since_mark: bool = False) -> tuple[str, TaskOrigin | None]:
        """Whose lease ``info`` is, by where its holding task was created:
        "test" (this test's, or not known), "later" (a task a fixture of
        this test started, found at the test function's check: checked with
        the fixtures) or "other" (another test's task, or one created
        outside any test); with the task's origin when known."""
        if self._test is None:
            return "test", None
        origin = _tracker.origin_of(info)
        if origin is None:
            return "test", None
        if origin.test is self._test:
            return ("later" if since_mark and origin.phase != "call" else "test"), origin
        return "other", origin

    def _not_ours(self, leak: Leak, origin: TaskOrigin | None) -> None:
        """Keep (released) a leak of a task this test did not start."""
        detail = _origin_detail(origin, self._test_label)
        leak = dataclasses.replace(leak, detail=f"{leak.detail}; {detail}" if leak.detail else detail)
        self._unattributed.extend(release_leaked([leak]))

    def mark(self) -> None:
        """Check only what is acquired from now on in :meth:`leaks` with
        ``since_mark=True`` (the plugin marks the start of the test function)."""
        if self._test is not None:
            _tracker.set_task_origin(self._test, self._test_label, "call", "the test function")
        self._mark_seq = _tracker.seq
        self._mark = self._snapshot()
        self._mark_ids = _by_id(self._mark)

    def _pool_created(self, pool: Pool) -> None:
        """A pool was created: note it on the innermost fixture being set up
        (the one whose teardown presumably closes it)."""
        if self._setting_up:
            self._setting_up[-1].created.append(weakref.ref(pool))

    def _pools(self) -> list[Pool]:
        pools = live_pools()
        if self._only is not None:
            pools = [pool for pool in pools if pool in self._only]
        return pools

    def _watches(self, pool: Pool) -> bool:
        """Whether this guard watches ``pool`` (every pool, or one of those given)."""
        return self._only is None or pool in self._only

    def _elsewhere(self, pool: Pool, lease_id: int, baseline: weakref.WeakKeyDictionary[Pool, set[int]]) -> bool:
        """Whether ``pool``'s lease ``lease_id`` belongs to someone else: open
        at ``baseline`` (the start, or the mark), or a wider-scoped fixture's."""
        return lease_id in baseline.get(pool, set()) or (id(pool), lease_id) in self._foreign

    def _snapshot(self) -> weakref.WeakKeyDictionary[Pool, set[int]]:
        snapshot: weakref.WeakKeyDictionary[Pool, set[int]] = weakref.WeakKeyDictionary()
        for pool in self._pools():
            snapshot[pool] = {info.id for info in read_on_pool_loop(pool, functools.partial(pool.leases, stacks=False))}
        return snapshot

    def fixture_setup(
        self, name: str, key: Hashable = None, *, where: str | None = None, track: bool = True
    ) -> Callable[[], None]:
        """Call before a fixture's setup; call what it returns after it.

        ``key`` identifies the fixture's definition (default: ``name``; two
        fixtures of one name, one overriding the other, need two keys) and
        is what :meth:`fixture_finished` and :meth:`pool_teardown` take;
        ``where`` says where it is defined, for the report. The open leases
        the setup acquired, less those of fixtures set up inside it (a nested
        call of this method), are its own: with ``track`` (a function-scoped
        fixture) they must be released before their pool is closed (see
        :meth:`pool_teardown` and :meth:`fixtures_torn_down`), by the fixture's
        teardown or anything else (a factory fixture, a finalizer); without
        (a module- or session-scoped fixture) they are not the test's business
        and never reported. The pools created while it was the innermost
        fixture being set up are its own too (see :meth:`created_pools`)."""
        frame = _Setup(name if key is None else key, name, where, track, self._snapshot())
        self._setting_up.append(frame)
        origin = _tracker.task_origin()
        if self._test is not None:
            _tracker.set_task_origin(self._test, self._test_label, "setup", f"fixture {name!r}")

        def done() -> None:
            while self._setting_up:  # pop this frame (and any an error left above it)
                if self._setting_up.pop() is frame:
                    break
            if self._test is not None:
                _tracker.set_task_origin(*origin)
            acquired = [
                (pool, lease_id)
                for pool, ids in self._snapshot().items()
                for lease_id in ids - frame.before.get(pool, set())
                if (id(pool), lease_id) not in frame.inner and not self._other_tests(pool, lease_id)
            ]
            mine = {(id(pool), lease_id) for pool, lease_id in acquired}
            if self._setting_up:
                self._setting_up[-1].inner.update(frame.inner, mine)
            if not track:
                self._foreign.update(mine)
                return
            if acquired:
                self._fixture_leases.update(mine)
                entry = self._by_fixture.setdefault(frame.key, _FixtureLeases(name, where, []))
                entry.leases.extend((weakref.ref(pool), lease_id) for pool, lease_id in acquired)
                self._owners.update(dict.fromkeys(mine, entry))
            if frame.created:
                self._created.setdefault(frame.key, (name, []))[1].extend(frame.created)

        return done

    def _other_tests(self, pool: Pool, lease_id: int) -> bool:
        """Whether ``pool``'s lease ``lease_id``, taken while a fixture was
        set up, is held by a task another test started: not the fixture's
        (found later, and kept apart)."""
        if self._test is None:
            return False
        for info in read_on_pool_loop(pool, functools.partial(pool.leases, stacks=False)):
            if info.id == lease_id:
                return self._whose(info)[0] == "other"
        return False

    def created_pools(self, key: Hashable) -> list[Pool]:
        """The pools (still alive) that the setup of the function-scoped
        fixture ``key`` created: its teardown presumably closes them, so
        :meth:`pool_teardown` must run right before it."""
        _, refs = self._created.get(key, ("", []))
        return [pool for ref in refs if (pool := ref()) is not None]

    def pool_teardown(self, key: Hashable) -> None:
        """The function-scoped fixture ``key`` is about to be torn down: its
        teardown presumably closes the pools its setup created, and a close()
        waits forever for connections still leased. The leases of those pools
        that function-scoped fixtures acquired and that are still held are
        leaks (reported by :meth:`leaks`), released now."""
        pools = self.created_pools(key)
        name, _ = self._created.pop(key, ("", []))
        if pools:
            # Not the closer's own leases: its teardown, about to run,
            # releases them before it closes the pool (`async with
            # create_pool() as pool: async with pool.acquire() as con: yield
            # con`, or release() then close()). One it does not release is
            # checked once the test's fixtures are all torn down
            # (fixtures_torn_down), as "whose teardown did not release it".
            own = self._by_fixture.get(key)
            mine = {(id(ref()), lease_id) for ref, lease_id in own.leases} if own is not None else set()
            self._check_fixture_leases(lambda pool: any(pool is each for each in pools), closer=name, skip=key)
            self._check_held_at_close(pools, name, mine)

    def _check_held_at_close(self, pools: list[Pool], closer: str, own: set[tuple[int, int]]) -> None:
        """The other leases of ``pools`` still held as ``closer``, the fixture
        that created them, is torn down: acquired during the test (not open
        at its start, nor a wider-scoped fixture's), by no fixture's setup
        (checked before this) nor the test function (checked when it
        returned). What is left was acquired in a fixture's teardown and
        kept, or by a task the test left running: the close() that follows
        would wait for them for ever (review h233). Leaks, released now.
        ``own``: (id(pool), lease id) of the closer's own leases, which its
        teardown releases (review h274)."""
        leaks: list[Leak] = []
        for pool in pools:
            for info in read_on_pool_loop(pool, pool.leases):
                lease_id = info.id
                if (id(pool), lease_id) in own or self._elsewhere(pool, lease_id, self._baseline):
                    continue
                whose, origin = self._whose(info)
                if not self._first_time(pool, lease_id, "open"):
                    continue
                if whose == "other":
                    self._not_ours(self._held_leak(pool, weakref.ref(pool), info, ""), origin)
                    continue
                if origin is not None and origin.site and origin.by:
                    # Where the holding task came from is known: say so.
                    why = f"its task was started by {origin.by}, created at {origin.site}"
                else:
                    why = (
                        "acquired after the test returned (a fixture's teardown that kept it) "
                        "or by a task the test left running"
                    )
                leaks.append(self._held_leak(pool, weakref.ref(pool), info, (
                    f"still held when fixture {closer!r}, which created its pool, was torn down: {why}"
                )))
        if leaks:
            self._pending.extend(release_leaked(leaks))

    def fixture_finished(self, key: Hashable) -> None:
        """A fixture was torn down (``key`` as given to :meth:`fixture_setup`).
        What its setup acquired is checked later, before its pool is closed
        (:meth:`pool_teardown`, :meth:`fixtures_torn_down`): something else
        may release it in between (a factory fixture, a node finalizer)."""
        entry = self._by_fixture.get(key)
        if entry is not None:
            entry.torn_down = True

    def fixtures_torn_down(self) -> None:
        """Every function-scoped fixture of the test was torn down (and the
        test's finalizers ran): the leases their setups acquired that are
        still held are leaks (reported by :meth:`leaks`), released now."""
        self._created.clear()
        self._check_fixture_leases(lambda pool: True)

    def _held_leak(self, pool: Pool, pool_ref: weakref.ref[Pool], info: LeaseInfo, detail: str) -> Leak:
        """The :class:`Leak` of ``pool``'s lease ``info``, still held when a
        fixture check found it; one whose proxy is garbage (the fixture's
        value was dropped) is not reported again as collected."""
        if info.collected:
            self._reported.add((id(pool), info.id, "gc"))
        return Leak(
            kind="collected" if info.collected else "open", pool=pool.name, lease_id=info.id,
            held=info.age, task_name=info.task_name, holder=None, acquired_at=info.acquired_at,
            stack=_trim_stack(info.stack), detail=detail, pool_ref=pool_ref, site=info.site,
        )

    def _check_fixture_leases(
        self, which: Callable[[Pool], bool], closer: str | None = None, skip: Hashable = None
    ) -> None:
        leaks: list[Leak] = []
        for key, entry in list(self._by_fixture.items()):
            if skip is not None and key == skip:
                continue
            kept: list[tuple[weakref.ref[Pool], int]] = []
            detail = _fixture_detail(entry, closer)
            for pool_ref, lease_id in entry.leases:
                pool = pool_ref()
                if pool is None:
                    continue
                if not which(pool):
                    kept.append((pool_ref, lease_id))
                    continue
                for info in read_on_pool_loop(pool, pool.leases):
                    if info.id != lease_id or not self._first_time(pool, lease_id, "open"):
                        continue
                    leaks.append(self._held_leak(pool, pool_ref, info, detail))
            if kept:
                entry.leases = kept
            else:
                del self._by_fixture[key]
        if leaks:
            self._pending.extend(release_leaked(leaks))

    def note_ended(self, pool: Pool, ended: list[_Ended]) -> None:
        """The pool ended these leases while the code held them: it is
        being terminated (the tracker calls this before they vanish from
        ``pool.leases()``), or their ``lease_timeout`` took them back."""
        if not self._started or not self._watches(pool):
            return
        before, marked = self._baseline.get(pool, set()), self._mark.get(pool, set())
        self._ended.extend((entry, entry.info.id in marked) for entry in ended if entry.info.id not in before)

    # findings ----------------------------------------------------------------

    def covers(self, pool: Pool, lease_id: int) -> bool:
        """Whether a leak of ``pool``'s lease ``lease_id`` is this guard's to
        report: it watches the pool, and the lease was not open when it
        started nor a wider-scoped fixture's (those belong to someone else)."""
        return self._started and self._watches(pool) and not self._elsewhere(pool, lease_id, self._baseline)

    def leaks(self, *, since_mark: bool = False) -> list[Leak]:
        """What leaked since :meth:`start` (or :meth:`mark`) and was not reported
        yet by this guard, as a list of :class:`Leak` (empty: nothing).
        Reports nothing twice; releases nothing (:meth:`check` does)."""
        baseline = self._mark if since_mark else self._baseline
        seq0 = self._mark_seq if since_mark else self.seq0
        found: list[Leak] = []
        if not since_mark:
            found.extend(self._pending)
            self._pending.clear()
        for pool in self._pools():
            # Read on the pool's loop thread, with what each holding task is
            # doing (its frames, the tasks it waits for): the loop may run in
            # another thread (a TestClient's portal, a server thread).
            for info, (state, doing) in read_on_pool_loop(pool, functools.partial(_leases_and_holders, pool)):
                if self._elsewhere(pool, info.id, baseline):
                    continue
                if (id(pool), info.id) in self._fixture_leases:
                    # A function-scoped fixture's, still held for the test
                    # (a mid-test check() as at the end): checked, and
                    # released if leaked, once the fixtures are torn down.
                    continue
                whose, origin = self._whose(info, since_mark=since_mark)
                if whose == "later":
                    continue  # a task a fixture started: checked with the fixtures
                if not self._first_time(pool, info.id, "open"):
                    continue
                if info.collected:
                    # Garbage collected, its reclaim not run yet (a check()
                    # right after the leak, with no await in between): the
                    # pool takes it back; say so, not "still held".
                    self._reported.add((id(pool), info.id, "gc"))
                    leak = Leak(
                        kind="collected", pool=pool.name, lease_id=info.id, held=info.age,
                        task_name=info.task_name, holder=None, acquired_at=info.acquired_at,
                        stack=_trim_stack(info.stack), site=info.site, pool_ref=weakref.ref(pool),
                        detail=self._owner_detail(id(pool), info.id),
                    )
                else:
                    leak = Leak(
                        kind="open", pool=pool.name, lease_id=info.id, held=info.age, task_name=info.task_name,
                        holder=doing, acquired_at=info.acquired_at, stack=_trim_stack(info.stack),
                        pool_ref=weakref.ref(pool), site=info.site, holder_state=state,
                    )
                self._route(found, leak, whose, origin)
        for entry, held_at_mark in self._ended:
            if entry.released or (since_mark and (entry.seq <= self._mark_seq or held_at_mark)):
                continue
            key = (entry.pool_id, entry.info.id, "open")
            if key in self._reported or entry.reported or (entry.pool_id, entry.info.id) in self._foreign:
                continue
            info = entry.info
            whose, origin = self._whose(info, since_mark=since_mark)
            if whose == "later":
                continue
            self._reported.add(key)
            entry.reported = True  # by this guard: not by another
            self._route(found, Leak(
                kind="ended", pool=entry.pool_name, lease_id=info.id, held=info.age, task_name=info.task_name,
                holder=None, acquired_at=info.acquired_at, stack=_trim_stack(info.stack), site=info.site,
                detail="" if entry.lease_timeout is None else
                f"taken back at its lease_timeout of {entry.lease_timeout:g} s",
            ), whose, origin)
        for seq, pool_ref, payload, pool_id in list(_tracker.records):
            if seq <= seq0:
                continue
            source = pool_ref()
            if source is not None and not self._watches(source):
                continue
            if not isinstance(payload, Leaked):
                if self.strict and source is not None:
                    timeout = self._timeout_leak(source, seq, payload)
                    if timeout is not None:
                        found.append(timeout)
                continue
            lease = payload.lease
            if source is None:
                # The pool is garbage since (code that made its own pool and
                # dropped it): its dropped connection was a leak all the same,
                # for a guard of every pool. Its leases open at the start (or
                # the mark) are known by its id.
                at_start = (self._mark_ids if since_mark else self._baseline_ids).get(pool_id, ())
                if self._only is not None or lease.id in at_start or (pool_id, lease.id) in self._foreign:
                    continue
            elif self._elsewhere(source, lease.id, baseline):
                continue
            if (pool_id, lease.id, "open") in self._reported or (pool_id, lease.id, "gc") in self._reported:
                continue
            if _tracker.was_reported(source, lease.id, seq):  # by another guard
                continue
            whose, origin = self._whose(lease, since_mark=since_mark)
            if whose == "later":
                continue
            self._reported.add((pool_id, lease.id, "gc"))
            _tracker.note_reported(source, lease.id, seq)
            self._route(found, Leak(
                kind="collected", pool=payload.pool, lease_id=lease.id, held=lease.age,
                task_name=lease.task_name, holder=None, acquired_at=lease.acquired_at,
                stack=_trim_stack(lease.stack), site=lease.site, pool_ref=None if source is None else pool_ref,
                detail=self._owner_detail(pool_id, lease.id),
            ), whose, origin)
        return found

    def _route(self, found: list[Leak], leak: Leak, whose: str, origin: TaskOrigin | None) -> None:
        """A leak found by :meth:`leaks`: this test's (with where its task
        came from, when a fixture or a teardown started it), or kept apart
        (another test's task, or one created outside any test)."""
        if whose == "other":
            self._not_ours(leak, origin)
            return
        if origin is not None and origin.phase != "call" and origin.by and origin.site:
            # A task a fixture (or a teardown) started, not the runner's.
            started = f"its task was started by {origin.by}, created at {origin.site}"
            leak = dataclasses.replace(leak, detail=f"{leak.detail}; {started}" if leak.detail else started)
        found.append(leak)

    def _owner_detail(self, pool_id: int, lease_id: int) -> str:
        """For a garbage-collected lease: the fixture whose setup acquired it,
        if one did (``pool_id``: its pool's id, which outlives the pool)."""
        entry = self._owners.get((pool_id, lease_id))
        return _fixture_detail(entry) if entry is not None else ""

    def _first_time(self, pool: Pool, lease_id: int | None, what: str) -> bool:
        """Whether ``pool``'s lease ``lease_id`` is reported here for the first
        time, by this guard or another (the plugin's, around an
        ``assert_no_leaks`` block): noted as reported."""
        key = (id(pool), lease_id, what)
        if key in self._reported or _tracker.was_reported(pool, lease_id):
            return False
        self._reported.add(key)
        _tracker.note_reported(pool, lease_id)
        return True

    def _timeout_leak(self, pool: Pool, seq: int, payload: TimedOut) -> Leak | None:
        holders = payload.holders
        idle = [(info, doing) for info, state, doing in holders if state in ("idle", "returned", "ended")]
        # Per guard (not _first_time): a strict assert_no_leaks block and
        # the plugin's strict check each report a timeout both saw.
        if not idle or (id(pool), -seq, "timeout") in self._reported:
            return None
        self._reported.add((id(pool), -seq, "timeout"))
        event = payload.event
        message = (
            f"timed out waiting for a connection after {event.waited:.3f}s: max_size={event.max_size}, "
            f"in use={event.in_use}, idle={event.idle}, connecting={event.connecting}, "
            f"waiting={event.waiting}, max_waiters={event.max_waiters}"
        )
        lines = [f"{message}; {len(idle)} of {len(holders)} leased connection(s) were not running a statement:"]
        before = self._baseline.get(pool, set())
        for info, doing in idle:
            task = f" by task {info.task_name}" if info.task_name else ""
            # A fixture set up before the guard (a session fixture's
            # connection) starves the pool just the same: say whose it is.
            since = ", since before this test started" if info.id in before else ""
            lines.append(f"  lease {info.id}, held {info.age:.3f}s{task}{since}, {doing}; acquired at:")
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
            raise LeakError(format_report(release_leaked(leaks)))

    # context manager -----------------------------------------------------------

    def __enter__(self) -> LeakGuard:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            leaks = self.leaks()
            if leaks:
                report = format_report(release_leaked(leaks))
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
    connections were leased but not running a statement fails it too. A
    leak found while the block raised is added to that exception as a note
    instead.

    :raises safepool.PoolTypeError: (a ``TypeError``) ``pool`` is not a
        safepool pool, None, or an iterable of safepool pools (an asyncpg
        pool, say).
    """
    if pool is None:
        return LeakGuard(strict=strict)
    if isinstance(pool, Pool):
        return LeakGuard([pool], strict=strict)
    try:
        pools = list(pool)
    except TypeError:
        check_is_pool(pool, "assert_no_leaks()")  # an asyncpg pool: say so
        raise
    for each in pools:
        check_is_pool(each, "assert_no_leaks()")
    return LeakGuard(pools, strict=strict)


def _by_id(snapshot: weakref.WeakKeyDictionary[Pool, set[int]]) -> dict[int, set[int]]:
    """A snapshot of open leases keyed by the pools' ids: what it says of a
    pool outlives the pool (see :meth:`LeakGuard.leaks`)."""
    return {id(pool): ids for pool, ids in snapshot.items()}


def _pools_arg(pools: Iterable[Pool]) -> list[Pool]:
    """LeakGuard's ``pools``, checked: iterating a pool or a number raised a
    bare TypeError, and a WeakSet of other objects "cannot create weak
    reference"."""
    listed = pool_list(pools, "LeakGuard()")
    for each in listed:
        check_is_pool(each, "LeakGuard()")
    return listed


def _leases_and_holders(pool: Pool) -> list[tuple[LeaseInfo, tuple[str, str]]]:
    """``pool.leases()``, each with what its holding task is doing
    (:func:`~safepool.testing.tracker.holder_activity`; not asked of a
    lease whose proxy was collected). On the pool's loop thread."""
    return [(info, ("", "") if info.collected else holder_activity(info)) for info in pool.leases()]


def release_leaked(leaks: Iterable[Leak]) -> list[Leak]:
    """Release the connections of open leaks, so the test's own teardown (a
    pool fixture's ``close()``) does not wait for them forever. A lease whose
    proxy is already garbage is reclaimed by the pool itself, but one with
    callbacks still registered only when asked (``Pool.release_lease``).

    Each release runs on its pool's event loop thread: directly when the loop
    is not running (or this is its thread), else scheduled on it, waiting up
    to ``LOOP_TIMEOUT`` (5) seconds (a loop in another thread: a TestClient's
    portal, a server thread). Returns the leaks, each that could not be
    released with a ``release_error`` saying why (the report shows it)."""
    result: list[Leak] = []
    for leak in leaks:
        error = _release(leak)
        result.append(leak if error is None else dataclasses.replace(leak, release_error=error))
    return result


def _release(leak: Leak) -> str | None:
    """Release one leak's connection; None, or why it could not be."""
    if leak.kind not in ("open", "collected") or leak.lease_id is None or leak.pool_ref is None:
        return None
    pool = leak.pool_ref()
    if pool is None or pool.closed:  # closed, or its loop closed: beyond use, nothing to release
        return None
    lease_id = leak.lease_id
    try:
        # The pool's own release path, on its loop's thread.
        on_pool_loop(pool, lambda: _run_to_first_wait(pool.release_lease(lease_id)))
    except PoolTimeoutError:
        logging.getLogger("safepool").warning(
            "leak guard: could not release lease %s of pool %r: its event loop did not run the release within %g s",
            lease_id, pool.name, tracker.LOOP_TIMEOUT,
        )
        return (
            f"not released: the pool's event loop, running in another thread, did not run the release within "
            f"{tracker.LOOP_TIMEOUT:g} s (is it blocked?); a close() of the pool waits for this connection"
        )
    except Exception as exc:
        logging.getLogger("safepool").debug("leak guard: could not release lease %s", lease_id, exc_info=True)
        if pool.closed:  # its loop closed meanwhile
            return None
        return f"not released: {pool.describe_error(exc)}"
    return None


def _run_to_first_wait(coro: Coroutine[Any, Any, Any]) -> None:
    """Run a coroutine that normally finishes without waiting (a release),
    on the pool's loop thread, outside of any task. If it wants to wait (a
    query cancellation in flight), give up: closing it makes the pool discard
    that connection."""
    try:
        coro.send(None)
    except StopIteration:
        return
    coro.close()
