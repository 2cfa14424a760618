"""The pytest hooks of the leak guards (the ``pytest11`` entry point is
``safepool.testing``, which re-exports these).

- ``pytest --safepool-leaks`` (or ``safepool_leaks = true`` in the ini file)
  fails every test that leaks a safepool connection;
- ``pytest --safepool-strict`` (or ``safepool_strict = true``) also fails a
  test whose pool timed out an acquire while connections were leased by tasks
  that were not running a statement;
- the ``safepool_leak_check`` fixture guards one test; the
  ``safepool_allow_leaks`` marker exempts one test from the global check;
- without either option, nothing fails, but a run in which pools reclaimed
  leaked connections ends with a short "safepool" section that counts them
  (from the pools' ``Leaked`` events) and names the option; under
  pytest-xdist each worker's count reaches the controller.

How the test phases are used: a lease taken in the test function itself is
checked when the test function returns. One taken by a function-scoped
fixture's setup is that fixture's (the innermost being set up when it was
taken, told apart from others of its name by its definition), but need not
be released by its own teardown, only before its pool is closed: it is
checked right before the teardown of the function-scoped fixture whose setup
created its pool, or, for another pool (a wider-scoped fixture's, one made
in the test function), once the test's function-scoped fixtures and
finalizers are all torn down. Leaked leases are released after the report,
so that a pool fixture's ``close()`` does not wait forever for them. A test function that leaks then
skips or fails as expected (xfail) keeps that outcome, and its leak is an
error at teardown; an xfail-marked test that passes but leaks fails.

A lease is the test's whose code started the task holding it (the tracker's
task factory notes where each task was created): one held by a task an
earlier test left running, or one created outside any test, does not fail
the test during which it is found, but the run, with a section of its own
at the end (LeakGuard.claim_tasks, take_unattributed).
"""

from __future__ import annotations

import functools
import inspect
import itertools
import warnings
import weakref
from collections import Counter
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from _pytest.outcomes import Failed as _Failed  # pytest.fail.Exception, named for the type checker
else:
    _Failed = pytest.fail.Exception

from ..events import Leaked, PoolEvent
from ..pool import Pool, live_pools, on_pool_created
from .guards import LeakGuard, format_report, release_leaked
from .tracker import _tracker

__all__ = [
    "pytest_addoption",
    "pytest_configure",
    "pytest_fixture_post_finalizer",
    "pytest_fixture_setup",
    "pytest_report_header",
    "pytest_runtest_call",
    "pytest_runtest_makereport",
    "pytest_runtest_protocol",
    "pytest_sessionfinish",
    "pytest_terminal_summary",
    "pytest_testnodedown",
    "pytest_unconfigure",
    "safepool_leak_check",
]

_SETTINGS = pytest.StashKey["_Settings"]()
_GUARD = pytest.StashKey[LeakGuard]()
_REPORT = pytest.StashKey[str]()  # the leak failure of the test function, for pytest_runtest_makereport
# The leaks of a test function that raised (failed, skipped, xfailed), for
# pytest_runtest_makereport: shown with a failure; with a skip or an expected
# failure, whose output pytest does not show, moved to teardown (_DEFERRED),
# where the leak check's fixture reports them as an error.
_CALL_LEAKS = pytest.StashKey[str]()
_DEFERRED = pytest.StashKey[str]()
_ACTIVE = pytest.StashKey[LeakGuard]()  # on the config: the guard of the test running now
_RECLAIM_WARNING = r"pool .*: a connection was garbage collected without being released"
_TALLY = pytest.StashKey["_LeakTally"]()
_WORKER_OUTPUT = "safepool_leaks_reclaimed"  # pytest-xdist's workeroutput key
# The pytest sessions configured in this process, innermost last: pytester's
# in-process runs configure one inside a test of another. Only the innermost
# counts leaks: an inner run reports its own (a count, or failures with its
# check on), and the outer run must not repeat them in its section.
_SESSIONS: list[pytest.Config] = []


class LeakFailed(_Failed):
    """The leak check's failure (pytest's, as ``pytest.fail()`` raises): its
    own class, so that pytest_runtest_makereport can tell it from the test's
    own failure, which an ``xfail`` mark expects (the leak is not)."""

    __module__ = "builtins"  # as pytest's outcomes: "LeakFailed: ..." in the short summary


@dataclass(frozen=True)
class _Settings:
    leaks: bool
    strict: bool


class _LeakTally:
    """Counts, per pool, the leaked connections pools took back (their
    :class:`~safepool.events.Leaked` events) while the leak check is off:
    a listener on every pool, those alive now and those created later (no
    event is built without one, and leaks are rare: nothing per lease)."""

    def __init__(self, config: pytest.Config, checking: bool = False) -> None:
        self.config = config
        # The tests' guards (the leak check on, or a test's
        # safepool_leak_check fixture) report the leaks of each test and its
        # function-scoped fixtures: the tally counts the others (a module-
        # or session-scoped fixture's, found between tests or during one),
        # which no guard reports (_guard_reports).
        self.checking = checking
        self.guarded = 0  # guards running now (safepool_leak_check)
        # Keyed per pool, not per name: default names come from id(pool),
        # which a later pool reuses, and two pools may share a name. Key:
        # (xdist worker id or "", the pool's number in that process, name).
        self.pools: Counter[tuple[str, int, str]] = Counter()
        self.sites: Counter[str] = Counter()  # acquire sites, where the pool captured them
        self.exempt = False  # a test marked safepool_allow_leaks runs
        # Leaks the tests' guards found held by a task that the test running
        # then did not start (another test's, left running; or one created
        # outside any test): each "[n] ..." report, with the test that left
        # its task running. Reported at the end of the run, which fails.
        self.unattributed: list[str] = []
        # pytest-xdist workers that went down before they finished (crashed,
        # or killed): their counts never reached the controller.
        self.lost: list[str] = []
        self._numbers = itertools.count()
        self._listening: weakref.WeakKeyDictionary[Pool, Callable[[PoolEvent], None]] = weakref.WeakKeyDictionary()
        self._unhook = on_pool_created(self.watch)
        for pool in live_pools():
            self.watch(pool)

    def watch(self, pool: Pool) -> None:
        if pool not in self._listening:
            listener = functools.partial(self.on_event, next(self._numbers), weakref.ref(pool))
            self._listening[pool] = listener
            pool.add_event_listener(listener)

    def on_event(self, number: int, pool_ref: weakref.ref[Pool], event: PoolEvent) -> None:
        if (
            isinstance(event, Leaked) and not self.exempt and not self._guard_reports(pool_ref(), event.lease.id)
            and _SESSIONS and _SESSIONS[-1] is self.config
        ):
            self.pools["", number, event.pool] += 1
            if event.lease.acquired_at is not None:
                self.sites[event.lease.acquired_at] += 1

    def _guard_reports(self, pool: Pool | None, lease_id: int) -> bool:
        """Whether the guard running now (with the check on, or a test's
        safepool_leak_check fixture) reports this leak itself: its test
        fails with it, not to be counted here again. A wider-scoped
        fixture's lease, open before the guard started, is not its. Nor
        one that an ``assert_no_leaks`` block running now reports (its
        LeakError says it already: review h274)."""
        if pool is not None and any(guard.covers(pool, lease_id) for guard in _tracker.guards()):
            return True
        if not self.guarded:
            return False
        guard = self.config.stash.get(_ACTIVE, None)
        return guard is None or pool is None or guard.covers(pool, lease_id)

    def stop(self) -> None:
        self._unhook()
        for pool, listener in list(self._listening.items()):
            try:
                pool.remove_event_listener(listener)
            except ValueError:
                pass
        self._listening = weakref.WeakKeyDictionary()


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
    _SESSIONS.append(config)
    if settings.leaks:
        # Watch pools from the start of the session: pools made by session
        # fixtures capture acquire stacks too.
        _tracker.acquire(strict=settings.strict)
    config.stash[_TALLY] = _LeakTally(config, checking=settings.leaks)


def pytest_unconfigure(config: pytest.Config) -> None:
    if config in _SESSIONS:
        _SESSIONS.remove(config)
    settings = config.stash.get(_SETTINGS, None)
    if settings is not None and settings.leaks:
        _tracker.release(strict=settings.strict)
    tally = config.stash.get(_TALLY, None)
    if tally is not None:
        tally.stop()


def pytest_sessionfinish(session: pytest.Session) -> None:
    tally = session.config.stash.get(_TALLY, None)
    workeroutput = getattr(session.config, "workeroutput", None)  # a pytest-xdist worker's
    if tally is not None and workeroutput is not None:
        pools = [[number, name, count] for (_, number, name), count in tally.pools.items()]
        workeroutput[_WORKER_OUTPUT] = {"pools": pools, "sites": dict(tally.sites), "unattributed": tally.unattributed}
    if tally is not None and tally.unattributed and session.exitstatus == pytest.ExitCode.OK:
        # A leak no test failed for (its task outlived the test that started
        # it): the run fails all the same (pytest_terminal_summary says why).
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: Any) -> None:
    """pytest-xdist's controller: add a finished worker's count, or note
    that a worker went down before it could send one (``error`` set: it
    crashed or was killed; what it counted is lost)."""
    tally = node.config.stash.get(_TALLY, None)
    if tally is None:
        return
    worker = str(getattr(getattr(node, "gateway", None), "id", id(node)))
    counts = getattr(node, "workeroutput", {}).get(_WORKER_OUTPUT)
    if counts:
        tally.pools.update({(worker, number, name): count for number, name, count in counts["pools"]})
        tally.sites.update(counts["sites"])
        tally.unattributed.extend(counts.get("unattributed", ()))
    elif error is not None:
        tally.lost.append(worker)


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    tally = config.stash.get(_TALLY, None)
    if tally is not None and tally.unattributed:
        _unattributed_section(terminalreporter, tally.unattributed)
    if tally is None or not (tally.pools or tally.lost):
        return
    if not tally.pools:
        terminalreporter.section("safepool", sep="-")
        terminalreporter.line(_lost_line(tally.lost))
        return
    total = sum(tally.pools.values())
    shown = ", ".join(f"{name!r} {count}" for (_, _, name), count in tally.pools.most_common(5))
    more = f" and {len(tally.pools) - 5} more pools" if len(tally.pools) > 5 else ""
    terminalreporter.section("safepool", sep="-")
    when = "outside the tests' leak checks" if tally.checking else "during this run"
    terminalreporter.line(
        f"safepool: {total} connection{'s' if total != 1 else ''} leaked {when}: garbage "
        f"collected without being released, and taken back by {'their pools' if len(tally.pools) > 1 else 'its pool'} "
        f"({shown}{more})."
    )
    if tally.sites:
        known = sum(tally.sites.values())
        sites = ", ".join(f"{site} ({count})" for site, count in tally.sites.most_common(5))
        terminalreporter.line(f"acquired at ({known} of {total} known): {sites}")
    if tally.lost:
        terminalreporter.line(_lost_line(tally.lost))
    if tally.checking:
        terminalreporter.line(
            "The leak check covers each test and its function-scoped fixtures: a module-, class- or "
            "session-scoped fixture must release what it acquires in its own teardown (safepool's docs/testing.md)."
        )
        return
    terminalreporter.line(
        "Run pytest with --safepool-leaks to fail each test that leaks, with the line that acquired "
        "the connection (safepool's docs/testing.md)."
    )


def _unattributed_section(terminalreporter: Any, reports: list[str]) -> None:
    """The leaks that no test failed for: held by tasks that outlived the
    test that started them (or that no test started), found during another
    test, which is not blamed. They fail the run (pytest_sessionfinish)."""
    count = len(reports)
    terminalreporter.section("safepool: leaks of tasks that outlived their test", sep="=")
    terminalreporter.line(
        f"safepool: {count} connection{'s' if count != 1 else ''} leaked by "
        f"{'tasks' if count != 1 else 'a task'} that the test running then did not start (a task another "
        "test left running, or one created outside any test): no test fails for them, the run does."
    )
    terminalreporter.line("")
    for number, report in enumerate(reports, 1):
        terminalreporter.line(f"[{number}] {report}")
    terminalreporter.line(
        "Fix: end each task a test starts before the test ends (await it, or cancel it and await it), "
        "and have it release on every path (`async with pool.acquire() as con:`)."
    )


def _lost_line(workers: list[str]) -> str:
    """The summary's line for pytest-xdist workers that went down before
    they sent their leak counts (the count above leaves theirs out)."""
    names = ", ".join(workers)
    which = f"worker {names}" if len(workers) == 1 else f"workers {names}"
    return (
        f"safepool: {which} went down before finishing (crashed or killed): "
        "the connections leaked in it are not counted here."
    )


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
    # The tasks created from now on are this test's: a connection held by a
    # task another test left running is not this test's leak.
    guard.claim_tasks(request.node.nodeid)
    request.node.stash[_GUARD] = guard
    request.config.stash[_ACTIVE] = guard
    tally = request.config.stash.get(_TALLY, None)
    if tally is not None:
        tally.guarded += 1
    try:
        yield guard
        # Torn down after the test's function-scoped fixtures and finalizers
        # (it is set up first): the connections they acquired must have been
        # released by now, whoever released them.
        guard.fixtures_torn_down()
        leaks = guard.leaks()
    finally:
        if tally is not None:
            tally.guarded -= 1
            tally.unattributed.extend(leak.describe().rstrip() for leak in guard.take_unattributed())
        del request.node.stash[_GUARD]
        if request.config.stash.get(_ACTIVE, None) is guard:
            del request.config.stash[_ACTIVE]
        deferred = request.node.stash.get(_DEFERRED, None)
        if deferred is not None:
            del request.node.stash[_DEFERRED]
        guard.stop()
    reports = [deferred] if deferred is not None else []
    if leaks:
        reports.append(format_report(release_leaked(leaks)))
    if reports:
        raise LeakFailed("\n\n".join(reports), pytrace=False)


@pytest.fixture(autouse=True)
def _safepool_leak_autocheck(request: pytest.FixtureRequest) -> None:
    settings = request.config.stash.get(_SETTINGS, None)
    if settings is None or not settings.leaks or request.node.get_closest_marker("safepool_allow_leaks"):
        return
    request.getfixturevalue("safepool_leak_check")


@pytest.hookimpl(wrapper=True)
def pytest_fixture_setup(fixturedef: pytest.FixtureDef[Any], request: pytest.FixtureRequest) -> Iterator[Any]:
    # The guard of the test being set up: a fixture of a wider scope set up
    # now (request.getfixturevalue() in a function-scoped fixture or in the
    # test) has its module or session as request.node, not the test.
    guard = request.config.stash.get(_ACTIVE, None)
    if guard is None or fixturedef.argname == "safepool_leak_check":
        return (yield)
    function_scoped = fixturedef.scope == "function"
    done = guard.fixture_setup(
        fixturedef.argname,
        fixturedef,  # the definition: an overriding fixture and the one it overrides share a name
        where=_fixture_location(fixturedef, request.config) if function_scoped else None,
        track=function_scoped,
    )
    try:
        return (yield)
    finally:
        done()
        if function_scoped and guard.created_pools(fixturedef):
            # It created pools (a pool fixture): its teardown presumably
            # closes them, and close() would wait forever for the fixtures'
            # connections still leased. Added after the fixture's own
            # teardown (pytest ran its setup): run before it.
            fixturedef.addfinalizer(functools.partial(guard.pool_teardown, fixturedef))


def _fixture_location(fixturedef: pytest.FixtureDef[Any], config: pytest.Config) -> str | None:
    """"file:line" of a fixture's function, relative to the rootdir when
    under it: tells apart fixtures of the same name in a leak report."""
    try:
        code = getattr(inspect.unwrap(fixturedef.func), "__code__", None)
    except ValueError:  # a __wrapped__ cycle
        return None
    if code is None:
        return None
    path = Path(code.co_filename)
    try:
        path = path.relative_to(config.rootpath)
    except ValueError:
        pass
    return f"{path}:{code.co_firstlineno}"


def pytest_fixture_post_finalizer(fixturedef: pytest.FixtureDef[Any], request: pytest.FixtureRequest) -> None:
    guard = request.config.stash.get(_ACTIVE, None) if fixturedef.scope == "function" else None
    if guard is not None:
        guard.fixture_finished(fixturedef)


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
        guard.call_finished()
        leaks = guard.leaks(since_mark=True)
        if leaks:
            leaks = release_leaked(leaks)
            # Shown with the test's failure; moved to teardown if the test
            # skipped or failed as expected (pytest_runtest_makereport).
            item.stash[_CALL_LEAKS] = format_report(leaks)
        raise
    guard.call_finished()
    leaks = guard.leaks(since_mark=True)
    if leaks:
        report = format_report(release_leaked(leaks))
        if item.get_closest_marker("xfail") is not None:
            report += (
                "\n\nThe test is marked xfail and passed: the leak fails it all the same "
                "(the mark expects the test's own failure, not a leak)."
            )
        item.stash[_REPORT] = report
        raise LeakFailed(report, pytrace=False)
    return result


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Generator[None, object, object]:
    tally = item.config.stash.get(_TALLY, None)
    if tally is None or not item.get_closest_marker("safepool_allow_leaks"):
        return (yield)
    tally.exempt = True
    try:
        return (yield)
    finally:
        tally.exempt = False


@pytest.hookimpl(wrapper=True, tryfirst=True)  # outermost: sees the report once an xfail mark is applied
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report: pytest.TestReport = yield
    if call.excinfo is not None and isinstance(call.excinfo.value, LeakFailed) and not report.failed:
        # An xfail mark took the leak check's failure for the test's own
        # expected failure (in the call, or at teardown): a leak is a
        # failure whatever the mark says.
        report.outcome = "failed"
        if hasattr(report, "wasxfail"):
            del report.wasxfail
    if call.when != "call":
        return report
    leaks = item.stash.get(_REPORT, None)
    if leaks is not None:
        del item.stash[_REPORT]
        if report.failed:
            # A unittest TestCase that failed on its own (an assertion, a
            # tearDown whose close() timed out on the leaked connection) is
            # reported with its own error in place of the leak failure: keep
            # the leak report.
            if leaks not in str(report.longrepr):
                report.sections.append(("Captured safepool leaks call", leaks))
        else:
            # A unittest TestCase runs as one call that returns: pytest's
            # unittest support put its skipTest() or expectedFailure in
            # place of the leak failure. Fail the teardown with the leak.
            _defer_to_teardown(item, report, leaks)
    leaks = item.stash.get(_CALL_LEAKS, None)
    if leaks is not None:
        del item.stash[_CALL_LEAKS]
        if report.failed:
            report.sections.append(("Captured safepool leaks call", leaks))
        else:
            # Skipped (pytest.skip()) or an expected failure (xfail): pytest
            # shows neither's output. Fail the teardown with the leak.
            _defer_to_teardown(item, report, leaks)
    return report


def _defer_to_teardown(item: pytest.Item, report: pytest.TestReport, leaks: str) -> None:
    """The call's leak report, for the leak check at teardown to raise: the
    test skipped or failed as expected, and pytest shows neither's output."""
    how = "failed as expected (xfail)" if hasattr(report, "wasxfail") else "was skipped"
    item.stash[_DEFERRED] = f"{leaks}\n\nThe test function leaked, then {how}: the leak is reported here, at teardown."
