"""Mutation review of the leak guards (review s62, helper-192): tests that
kill mutants of ``safepool/testing/{tracker,guards,plugin}.py`` the existing
suites let survive. Each asserts behaviour docs/testing.md promises; the
mutant it kills is named in its docstring.

The plugin's cases run small user suites with pytester (pytest-asyncio, a
real PostgreSQL, ``ManualClock`` for the lease timeouts); the guard's run
in process."""

from __future__ import annotations

import asyncio
import gc
import warnings
import weakref
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio

import safepool
from safepool.pool import Pool
from safepool.testing import LeakError, LeakGuard, _tracker, assert_no_leaks
from tests._util import NESTED_PYTEST_ADDOPTS, PYTESTER_INI, source_line_of, until

pytest_plugins = ["pytester"]
# These tests leak on purpose, in nested sessions and guarded blocks: a run of
# this suite with --safepool-leaks must not count those leaks against them.
pytestmark = pytest.mark.safepool_allow_leaks


HEADER = """
import asyncio
import gc
import os

import pytest
import pytest_asyncio

import safepool
from safepool.testing import LeakError, assert_no_leaks

DSN = os.environ["SAFEPOOL_PLUGIN_DSN"]
CACHE = []  # connections kept on purpose: never garbage


"""


@pytest.fixture
def suite(
    inline_runs_collected: None, pytester: pytest.Pytester, pg_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> pytest.Pytester:
    """A pytester directory whose tests reach the test database (what the
    inner modules' CACHE kept is collected after pytester's teardown)."""
    monkeypatch.setenv("SAFEPOOL_PLUGIN_DSN", pg_dsn)
    monkeypatch.setenv("COLUMNS", "200")
    monkeypatch.setenv("PYTEST_ADDOPTS", NESTED_PYTEST_ADDOPTS)
    pytester.makeini(PYTESTER_INI)
    return pytester


# ------------------------------------------- a fixture's lease the pool ended

TIMED_FIXTURES = HEADER + """
@pytest_asyncio.fixture
async def timed():
    clock = safepool.ManualClock()
    pool = await safepool.create_pool(DSN, min_size=1, max_size=3, lease_timeout=30.0, clock=clock)
    yield pool, clock
    await asyncio.wait_for(pool.close(), 10)


@pytest_asyncio.fixture
async def released_late(timed):
    pool, _ = timed
    con = await pool.acquire()
    yield con
    await pool.release(con)  # after the test function's advance: late, but released


@pytest_asyncio.fixture
async def kept(timed):
    pool, _ = timed
    CACHE.append(await pool.acquire())  # KEPT-BY-FIXTURE
    yield


@pytest_asyncio.fixture
async def expired_in_setup(timed):
    pool, clock = timed
    CACHE.append(await pool.acquire())  # EXPIRED-IN-SETUP
    clock.advance(30.0)  # taken back before the test function starts
    yield


@pytest.mark.asyncio
async def test_outlives_a_lease_its_fixture_releases_late(timed, released_late):
    pool, clock = timed
    clock.advance(30.0)
    assert pool.stats().leases_expired == 1


@pytest.mark.asyncio
async def test_outlives_a_lease_its_fixture_keeps(timed, kept):
    pool, clock = timed
    clock.advance(30.0)
    assert pool.stats().leases_expired == 1


@pytest.mark.asyncio
async def test_uses_a_fixture_whose_lease_expired_in_its_setup(timed, expired_in_setup):
    pool, _ = timed
    assert pool.stats().leases_expired == 1
"""


def test_a_fixtures_lease_the_pool_took_back_is_the_fixtures_not_the_test_functions(
    suite: pytest.Pytester,
) -> None:
    """A function-scoped fixture's lease that its ``lease_timeout`` takes back
    while the test function runs (the test advances a ``ManualClock``) is the
    fixture's: released by the fixture's teardown afterwards it is no leak
    ("A lease the code releases after the pool ended it ... is not
    reported"), and kept it is the fixture's leak, an error at teardown, not
    a failure of the test function. The same for one taken back during the
    fixture's own setup, the last thing before the test function.

    Kills: guards.py ``note_ended`` recording every ended lease as not held
    at the mark (and ``leaks(since_mark=True)`` ignoring ``held_at_mark``, or
    ``mark()`` not taking a new snapshot, or the plugin not calling
    ``mark()``): the first two tests fail in the call; ``entry.seq <
    self._mark_seq`` (off by one): the third fails in the call."""
    suite.makepyfile(test_timed=TIMED_FIXTURES)
    result = suite.runpytest("--safepool-leaks", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=3, errors=2)
    errors = result.stdout.str().split("= ERRORS =", 1)[1].split("short test summary")[0]
    assert "test_outlives_a_lease_its_fixture_releases_late" not in errors
    result.stdout.fnmatch_lines([
        "*ERROR at teardown of test_outlives_a_lease_its_fixture_keeps*",
        "safepool: 1 connection leaked",
        "*never released; the pool ended it (taken back at its lease_timeout of 30 s)*",
        "  acquired at:",
        f'*File "*test_timed.py", line {source_line_of(TIMED_FIXTURES, "KEPT-BY-FIXTURE")}, in kept',
    ])
    result.stdout.fnmatch_lines([
        "*ERROR at teardown of test_uses_a_fixture_whose_lease_expired_in_its_setup*",
        "safepool: 1 connection leaked",
        "*never released; the pool ended it (taken back at its lease_timeout of 30 s)*",
        "  acquired at:",
        f'*File "*test_timed.py", line {source_line_of(TIMED_FIXTURES, "EXPIRED-IN-SETUP")}, in expired_in_setup',
    ])


# --------------------------- a fixture's proxy garbage collected in its setup

SETUP_GC = HEADER + """
@pytest_asyncio.fixture
async def pool():
    pool = await safepool.create_pool(DSN, min_size=1, max_size=2)
    yield pool
    await asyncio.wait_for(pool.close(), 10)


@pytest_asyncio.fixture
async def dropped(pool):
    async def forget():
        con = await pool.acquire()  # SETUP-GC-LEAK
        await con.execute("SELECT 1")

    await forget()
    gc.collect()
    async with asyncio.timeout(5):  # the pool takes it back in a loop callback
        while pool.leases():
            await asyncio.sleep(0.005)
    return pool


@pytest.mark.asyncio
async def test_uses_a_fixture_that_dropped_a_connection(dropped):
    assert await dropped.fetchval("SELECT 1") == 1
"""


def test_a_connection_a_fixture_dropped_in_its_setup_is_an_error_at_teardown(suite: pytest.Pytester) -> None:
    """A function-scoped fixture whose setup drops a connection unreleased
    (the pool takes it back: a ``Leaked`` event, the last before the test
    function starts) leaks: an error at teardown, not a failure of the test
    function, which took nothing.

    Kills: guards.py ``mark()`` not moving the mark's sequence number (the
    test function's check reports the setup's record), and the records'
    ``seq <= seq0`` as ``seq < seq0`` (off by one: the record made just
    before the mark is the test function's)."""
    suite.makepyfile(test_setup_gc=SETUP_GC)
    result = suite.runpytest("--safepool-leaks", "-p", "no:cacheprovider", "-W", "ignore::ResourceWarning")
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines([
        "*ERROR at teardown of test_uses_a_fixture_that_dropped_a_connection*",
        "safepool: 1 connection leaked",
        "*garbage collected without being released*",
        "  acquired at:",
        f'*File "*test_setup_gc.py", line {source_line_of(SETUP_GC, "SETUP-GC-LEAK")}, in forget',
    ])


# ---------------- a module fixture's lease ended during a test that set it up

MODULE_LEASE_ENDED = HEADER + """
@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def module_lease():
    clock = safepool.ManualClock()
    pool = await safepool.create_pool(DSN, min_size=1, max_size=2, lease_timeout=30.0, clock=clock)
    con = await pool.acquire()
    yield pool, clock
    await pool.release(con)  # at the module's end: late, the test outlived the lease
    await asyncio.wait_for(pool.close(), 10)


@pytest.fixture
def wrapper(request):
    return request.getfixturevalue("module_lease")  # a module fixture set up inside this test's fixture


@pytest.mark.asyncio(loop_scope="module")
async def test_outlives_the_module_fixtures_lease(wrapper):
    pool, clock = wrapper
    clock.advance(30.0)
    assert pool.stats().leases_expired == 1
"""


def test_a_wider_scoped_fixtures_lease_ended_during_the_test_that_set_it_up_is_not_its_business(
    suite: pytest.Pytester,
) -> None:
    """docs/testing.md: "A module-, class- or session-scoped fixture set up
    during a test (by request.getfixturevalue()) is not the test's
    business, as one set up before it"; a lease held before the test and
    ended inside it is not reported. So neither is such a fixture's lease
    that its pool's lease timeout takes back during the test (the module
    fixture releases it at the module's end).

    Kills: guards.py ``leaks()`` dropping the ``_foreign`` test for ended
    leases."""
    suite.makepyfile(test_module_lease=MODULE_LEASE_ENDED)
    result = suite.runpytest("--safepool-leaks", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)
    assert "leaked" not in result.stdout.str()


# ------------------------- a strict block under the plain (non-strict) check

STRICT_BLOCK = HEADER + """
@pytest_asyncio.fixture
async def one():
    clock = safepool.ManualClock()
    async with safepool.create_pool(DSN, min_size=1, max_size=1, clock=clock) as pool:
        yield pool, clock


@pytest.mark.asyncio
async def test_a_strict_block_reports_its_idle_timeout(one):
    pool, clock = one
    holding, done = asyncio.Event(), asyncio.Event()

    async def slow_handler():
        async with pool.acquire():
            holding.set()
            await done.wait()  # idle while holding the connection

    task = asyncio.create_task(slow_handler())
    await holding.wait()
    with pytest.raises(LeakError, match="1 acquire timeout caused by idle leases"):
        async with assert_no_leaks(pool, strict=True):
            waiting = asyncio.ensure_future(pool.acquire(timeout=5.0))
            async with asyncio.timeout(5):
                while pool.stats().waiting == 0:  # until it queues
                    await asyncio.sleep(0)
            clock.advance(5.0)
            with pytest.raises(safepool.PoolTimeoutError):
                await waiting
    done.set()
    await task
"""


def test_the_plain_check_does_not_fail_an_idle_timeout_a_strict_block_saw(suite: pytest.Pytester) -> None:
    """``--safepool-leaks`` without ``--safepool-strict`` fails no test for an
    acquire timeout, even one an ``assert_no_leaks(pool, strict=True)`` block
    in the test saw (and reported: the test expects its ``LeakError``).

    Kills: guards.py ``leaks()`` reporting the tracker's timeout records
    whatever the guard's ``strict`` (``elif self.strict:`` as ``else:``)."""
    suite.makepyfile(test_strict_block=STRICT_BLOCK)
    result = suite.runpytest("--safepool-leaks", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)
    result = suite.runpytest("--safepool-strict", "-p", "no:cacheprovider")
    result.assert_outcomes(failed=1)  # strict: the plugin's own check reports it too
    result.stdout.fnmatch_lines(["safepool: 1 acquire timeout caused by idle leases"])


# ----------------------------- check() mid-test and a fixture's connection

MID_TEST_CHECK = HEADER + """
@pytest_asyncio.fixture
async def pool():
    pool = await safepool.create_pool(DSN, min_size=1, max_size=3)
    yield pool
    await asyncio.wait_for(pool.close(), 10)


@pytest_asyncio.fixture
async def con(pool):
    async with pool.acquire() as con:  # released at teardown: clean
        yield con


@pytest.mark.asyncio
async def test_checks_mid_test(safepool_leak_check, pool, con):
    async with pool.acquire() as other:
        assert await other.fetchval("SELECT 1") == 1
    safepool_leak_check.check()  # optional: check mid-test
    assert await con.fetchval("SELECT 2") == 2  # the fixture's connection is still the test's to use
"""


def test_a_mid_test_check_leaves_a_fixtures_connection_alone(suite: pytest.Pytester) -> None:
    """docs/testing.md, "Per test, per block": ``safepool_leak_check.check()``
    is an "optional: check mid-test" of the test that requests the fixture,
    which is requested "before the fixtures it should cover". A fixture
    set up after it (the usual ``con`` fixture: ``async with
    pool.acquire() as con: yield con``) holds its connection for the test
    and releases it at its teardown: not a leak, and its leases "need not be
    released by that fixture's own teardown, only before its pool is
    closed". Found reasoning about a surviving mutant (review s62): the
    check reports the fixture's connection "still held ... (the task has
    ended without releasing it)", fails the test with ``LeakError``, and
    releases the connection, so the test's next use of it fails too. The
    same with and without ``--safepool-leaks``."""
    suite.makepyfile(test_mid=MID_TEST_CHECK)
    for args in ([], ["--safepool-leaks"]):
        result = suite.runpytest("-p", "no:cacheprovider", *args)
        result.assert_outcomes(passed=1)


# ------------------------- a dropped connection of a pool that is garbage now

POOL_GONE = HEADER + """
import weakref


async def handler():
    pool = await safepool.create_pool(DSN, min_size=1, max_size=1)
    con = await pool.acquire()  # POOL-GONE-LEAK
    await con.execute("SELECT 1")
    del con  # dropped unreleased: the pool takes it back
    gc.collect()
    async with pool.acquire(timeout=5):  # max_size=1: served once the pool took it back
        pass
    assert pool.stats().leaks_detected == 1
    await asyncio.wait_for(pool.close(), 10)
    return weakref.ref(pool)


@pytest.mark.asyncio
async def test_a_handler_with_its_own_pool_leaks():
    pool_ref = await handler()
    gc.collect()
    assert pool_ref() is None  # the pool is garbage too
"""


def test_a_connection_dropped_in_a_pool_that_is_garbage_by_the_check_still_fails_the_test(
    suite: pytest.Pytester,
) -> None:
    """docs/testing.md counts a connection "garbage collected during the test
    without a release" as a leak, whatever pool it came from (pools created
    during the test included). Found reasoning about the guard's record loop
    (review s62): when the pool itself is garbage by the time the test ends
    (a handler or helper that makes its own pool; here collected at once by
    the test's ``gc.collect()``, in a real suite whenever the collector runs
    before the check), ``--safepool-leaks`` passed the test, and the run's
    summary did not count the leak either (the tally left it to the
    guard): with the check off it was counted, with it on it was lost. A
    lease the pool ended was reported in that case (its record keeps the
    pool's name). Fixed: a record keeps its pool's id, and the guard
    reports the leak by the pool's name once the pool is garbage."""
    suite.makepyfile(test_pool_gone=POOL_GONE)
    result = suite.runpytest("--safepool-leaks", "-p", "no:cacheprovider", "-W", "ignore::ResourceWarning")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines([
        "safepool: 1 connection leaked",
        "*garbage collected without being released*",
        f'*File "*test_pool_gone.py", line {source_line_of(POOL_GONE, "POOL-GONE-LEAK")}, in handler',
    ])


@pytest.mark.asyncio
async def test_assert_no_leaks_reports_a_dropped_connection_of_a_pool_that_is_garbage_now(pg_dsn: str) -> None:
    """The same through ``assert_no_leaks()`` (every pool, "including pools
    created inside the block"): the block passes."""

    async def handler() -> weakref.ref[Pool]:
        pool = await safepool.create_pool(pg_dsn, min_size=1, max_size=1)
        await drop_a_connection(pool)
        await asyncio.wait_for(pool.close(), 10)
        return weakref.ref(pool)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        with pytest.raises(LeakError, match="garbage collected without being released"):
            async with assert_no_leaks():
                pool_ref = await handler()
                gc.collect()
                assert pool_ref() is None  # the pool is garbage too


# ------------------------------------------------ reports and the summary

LEAKS_ONCE = HEADER + """
@pytest.mark.asyncio
async def test_no_release():
    pool = await safepool.create_pool(DSN, min_size=1, max_size=2)
    CACHE.append(await pool.acquire())  # ONCE-LEAK
    CACHE.append(pool)
"""


def test_a_leaking_test_shows_its_report_once(suite: pytest.Pytester) -> None:
    """A test function that leaks fails with the leak report, shown once: the
    "Captured safepool leaks call" section is for a test that failed for its
    own reason (or a unittest case whose own error replaced the leak
    failure), not a repeat of the failure's own text.

    Kills: plugin.py ``pytest_runtest_makereport`` adding the section
    whether or not the failure already shows the report."""
    suite.makepyfile(test_once=LEAKS_ONCE)
    result = suite.runpytest("--safepool-leaks", "-p", "no:cacheprovider")
    result.assert_outcomes(failed=1)
    assert result.stdout.lines.count("safepool: 1 connection leaked") == 1, result.stdout.str()
    assert "Captured safepool leaks call" not in result.stdout.str()


FIVE_POOLS = HEADER + """
@pytest.mark.asyncio
@pytest.mark.parametrize("number", [1, 2, 3, 4, 5])
async def test_drops_a_connection(number):
    # pools 1-4 capture acquire stacks, pool 5 does not
    pool = await safepool.create_pool(
        DSN, min_size=1, max_size=1, name=f"p{number}", capture_stack=number < 5
    )

    async def forget():
        con = await pool.acquire()  # FIVE-POOLS-SITE
        await con.execute("SELECT 1")

    await forget()
    gc.collect()
    async with pool.acquire(timeout=5):  # max_size=1: served once the pool took it back
        pass
    await asyncio.wait_for(pool.close(), 10)
"""


def test_the_runs_summary_counts_five_pools_and_the_known_sites(suite: pytest.Pytester) -> None:
    """With the check off, the run's summary names each pool that took back
    a leaked connection (up to five, then "and N more pools") and says how
    many of the leaks have a known acquire site ("acquired at (1 of 4
    known)" in docs/testing.md: only pools that capture stacks know it).

    Kills: plugin.py ``pytest_terminal_summary``'s "more pools" from five
    pools on (``> 5`` as ``>= 5``: "and 0 more pools"), and its known count
    as the total."""
    suite.makepyfile(test_five=FIVE_POOLS)
    result = suite.runpytest("-p", "no:cacheprovider", "-W", "ignore::ResourceWarning")
    result.assert_outcomes(passed=5)
    site = f"test_five.py:{source_line_of(FIVE_POOLS, 'FIVE-POOLS-SITE')} in forget"
    result.stdout.fnmatch_lines([
        "safepool: 5 connections leaked during this run: garbage collected without being released, "
        "and taken back by their pools ('p1' 1, 'p2' 1, 'p3' 1, 'p4' 1, 'p5' 1).",
        f"acquired at (4 of 5 known): *{site} (4)",
    ])
    assert "more pools" not in result.stdout.str()


# ------------------------------------ the tally after a guarded test, and a
# ------------------------------------ finalizer releasing another pool's lease

GUARDED_THEN_LEAKS = HEADER + """
@pytest_asyncio.fixture
async def pool():
    pool = await safepool.create_pool(DSN, min_size=1, max_size=1, name="tallied")
    yield pool
    await asyncio.wait_for(pool.close(), 10)


@pytest.mark.asyncio
async def test_first_guarded_and_clean(safepool_leak_check, pool):
    async with pool.acquire() as con:
        assert await con.fetchval("SELECT 1") == 1


@pytest.mark.asyncio
async def test_then_drops_a_connection(pool):
    async def forget():
        con = await pool.acquire()
        await con.execute("SELECT 1")

    await forget()
    gc.collect()
    async with pool.acquire(timeout=5):  # max_size=1: served once the pool took it back
        pass
"""


def test_the_summary_counts_a_leak_of_an_unguarded_test_after_a_guarded_one(suite: pytest.Pytester) -> None:
    """With the check off, the run's summary counts every connection pools
    took back, except those a guard reported (a test's
    ``safepool_leak_check``): once the guarded test is over, the next
    test's leak is counted again.

    Kills: plugin.py ``safepool_leak_check`` not decrementing the tally's
    ``guarded`` at its teardown (later leaks taken for a guard's)."""
    suite.makepyfile(test_tallied=GUARDED_THEN_LEAKS)
    result = suite.runpytest("-p", "no:cacheprovider", "-W", "ignore::ResourceWarning")
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(["safepool: 1 connection leaked during this run: *('tallied' 1)."])


FINALIZER_AFTER_POOL = HEADER + """
@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def shared_pool():
    pool = await safepool.create_pool(DSN, min_size=1, max_size=2)
    yield pool
    await asyncio.wait_for(pool.close(), 10)


@pytest_asyncio.fixture(loop_scope="module")
async def released_later(shared_pool, request):
    con = await shared_pool.acquire()
    loop = asyncio.get_running_loop()
    request.node.addfinalizer(lambda: loop.run_until_complete(shared_pool.release(con)))
    return con


@pytest_asyncio.fixture(loop_scope="module")
async def pool():  # set up after released_later: torn down before its finalizer runs
    pool = await safepool.create_pool(DSN, min_size=1, max_size=2)
    yield pool
    await asyncio.wait_for(pool.close(), 10)


@pytest_asyncio.fixture(loop_scope="module")
async def never_released(shared_pool):
    return await shared_pool.acquire()  # MODULE-POOL-LEAK


@pytest.mark.asyncio(loop_scope="module")
async def test_uses_both(released_later, pool):
    assert await released_later.fetchval("SELECT 1") == 1
    assert await pool.fetchval("SELECT 2") == 2


@pytest.mark.asyncio(loop_scope="module")
async def test_with_a_pool_fixture_and_a_leak_of_the_module_pool(pool, never_released):
    assert await never_released.fetchval("SELECT 1") == 1
"""


def test_a_pool_fixtures_teardown_checks_only_its_own_pools_leases(suite: pytest.Pytester) -> None:
    """docs/testing.md: a fixture's lease "need not be released by that
    fixture's own teardown, only before its pool is closed ... a
    request.node.addfinalizer() that releases, is fine", and the check
    before a pool fixture's teardown covers "the pool fixture's" pools.
    Here a function-scoped ``pool`` fixture is torn down before the
    finalizer that releases another (module) pool's lease: no leak. And a
    fixture's lease of the module pool that nothing releases is still
    reported as that fixture's, once the test's fixtures are torn down,
    though a pool fixture's teardown was checked first.

    Kills: guards.py ``pool_teardown`` checking the leases of every pool
    (``which`` always true), and ``_check_fixture_leases`` forgetting the
    leases of the other pools at the first pool fixture's check (reported
    later with no fixture named)."""
    suite.makepyfile(test_finalizer_after=FINALIZER_AFTER_POOL)
    result = suite.runpytest("--safepool-leaks", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=2, errors=1)
    assert "test_uses_both" not in result.stdout.str().split("= ERRORS =", 1)[1]
    result.stdout.fnmatch_lines([
        "*ERROR at teardown of test_with_a_pool_fixture_and_a_leak_of_the_module_pool*",
        "safepool: 1 connection leaked",
        "*",
        "*acquired by fixture 'never_released', whose teardown did not release it*",
        "  acquired at:",
        f'*File "*test_finalizer_after.py", line {source_line_of(FINALIZER_AFTER_POOL, "MODULE-POOL-LEAK")}, '
        "in never_released",
    ])


# ----------------------------------------------------------- in process


@pytest_asyncio.fixture
async def pool(pg_dsn: str) -> AsyncIterator[Pool]:
    pool = await safepool.create_pool(pg_dsn, min_size=1, max_size=3)
    try:
        yield pool
    finally:
        pool.terminate()


async def drop_a_connection(pool: Pool) -> None:
    """Acquire and drop the proxy unreleased; return once the pool took the
    connection back (its ``Leaked`` event)."""

    async def forget() -> None:
        con = await pool.acquire()
        await con.execute("SELECT 1")

    await forget()
    gc.collect()
    await until(lambda: not pool.leases())


@pytest.mark.asyncio
async def test_nested_guards_keep_what_an_outer_guard_has_not_reported(pool: Pool) -> None:
    """Guards nest (the plugin's check, an ``assert_no_leaks`` block, another
    inside it): a leak the outer guard saw before the middle one started is
    still the outer's to report after the innermost one ends.

    Kills: tracker.py ``remove_guard`` pruning records up to the newest
    remaining guard's start (``max``) instead of the oldest's (``min``)."""
    outer = LeakGuard([pool]).start()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ResourceWarning)
            await drop_a_connection(pool)
        with assert_no_leaks(pool):  # started after the leak: not its business
            with assert_no_leaks(pool):
                await pool.fetchval("SELECT 1")
        assert [leak.kind for leak in outer.leaks()] == ["collected"]
    finally:
        outer.stop()


@pytest.mark.asyncio
async def test_a_guard_of_one_pool_ignores_another_pools_dropped_connection(pool: Pool, pg_dsn: str) -> None:
    """``assert_no_leaks(pool)`` raises "if code inside it leaks a connection
    of ``pool``": another pool's connection dropped inside the block is not
    its business, nor another pool's lease that its ``terminate()`` ended.

    Kills: guards.py ``leaks()`` reporting ``Leaked`` records of pools the
    guard does not watch (``not self._watches(source)`` dropped), and
    ``note_ended`` taking the ended leases of any pool (its ``_watches``
    test dropped)."""
    other = await safepool.create_pool(pg_dsn, min_size=1, max_size=1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ResourceWarning)
            async with assert_no_leaks(pool):
                await drop_a_connection(other)
                kept = await other.acquire()
                other.terminate()  # ends the lease kept, never released
                await pool.fetchval("SELECT 1")
        del kept
    finally:
        other.terminate()


@pytest.mark.asyncio
async def test_a_lease_whose_task_ended_gets_the_release_fix_not_the_end_the_task_fix(pool: Pool) -> None:
    """A connection acquired by a task that has ended without releasing it
    (the task object still referenced): the report says the task ended and
    gives the first fix (``async with``), not "end that task", which is for
    a holder still alive (docs/testing.md, "The pytest plugin").

    Kills: tracker.py ``holder_activity`` not treating a done task as ended
    (``task.done()`` dropped: its empty await chain reads as idle)."""
    kept: list[Any] = []

    async def handler() -> None:
        kept.append(await pool.acquire())  # never released

    with pytest.raises(LeakError) as caught:
        async with assert_no_leaks(pool):
            task = asyncio.create_task(handler())
            await task
    text = str(caught.value)
    assert "(the task has ended without releasing it)" in text
    assert "Fix: acquire with `async with" in text
    assert "Fix: the task holding it is still running" not in text
    assert task.done()  # still referenced: its weak reference is alive


@pytest.mark.asyncio
async def test_stack_capture_is_on_while_guarded_and_restored_after(pool: Pool, pg_dsn: str) -> None:
    """"While a test is guarded: every pool captures acquire stacks" (and
    ``assert_no_leaks``: "Stack capture is on for the guarded pools while
    the block runs"): a pool made with ``capture_stack=False`` captures in
    the block and no longer after it (capture costs at each acquire).

    Kills: tracker.py ``_uninstall`` not restoring ``capture_stack``."""
    plain = await safepool.create_pool(pg_dsn, min_size=1, max_size=1, capture_stack=False)
    try:
        assert not plain.capture_stack
        async with assert_no_leaks(plain):
            assert plain.capture_stack
            async with plain.acquire():
                assert plain.leases()[0].stack is not None
        if not _tracker._users:  # (an outer run with --safepool-leaks keeps every pool capturing)
            assert not plain.capture_stack
            async with plain.acquire():
                assert plain.leases()[0].stack is None
    finally:
        plain.terminate()


@pytest.mark.asyncio
async def test_a_lease_of_a_fixture_set_up_two_levels_inside_another_is_that_fixtures(pool: Pool) -> None:
    """"A fixture that sets up another inside its own setup is not blamed for
    the other's connection", however deep: ``outer`` sets up ``middle``, which
    sets up ``inner``, which acquires; the connection, dropped later, is
    reported as ``inner``'s. (Driven through the guard's fixture hooks, as
    the plugin calls them: pytest-asyncio cannot set up an async fixture
    inside another's setup.)

    Kills: guards.py ``fixture_setup``'s ``done()`` passing only its own
    leases to the enclosing fixture, not those of the fixtures inside it
    (``inner.update(frame.inner, mine)`` as ``inner.update(mine)``)."""
    guard = LeakGuard([pool]).start()
    try:
        outer_done = guard.fixture_setup("outer", where="test_x.py:1")
        middle_done = guard.fixture_setup("middle", where="test_x.py:5")
        inner_done = guard.fixture_setup("inner", where="test_x.py:9")
        kept = [await pool.acquire()]
        inner_done()
        middle_done()
        outer_done()
        guard.mark()  # the test function starts
        assert guard.leaks(since_mark=True) == []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ResourceWarning)
            kept.clear()  # the fixtures' values are dropped
            gc.collect()
            await until(lambda: not pool.leases())
        for key in ("inner", "middle", "outer"):
            guard.fixture_finished(key)
        guard.fixtures_torn_down()
        leaks = guard.leaks()
    finally:
        guard.stop()
    assert [(leak.kind, leak.detail) for leak in leaks] == [(
        "collected",
        "acquired by fixture 'inner', whose teardown did not release it (the fixture defined at test_x.py:9)",
    )]


@pytest.mark.asyncio
async def test_a_lease_reported_held_then_ended_by_terminate_is_not_reported_again(pool: Pool) -> None:
    """``LeakGuard.leaks()`` "Reports nothing twice; releases nothing": a
    lease it reported still held, that ``terminate()`` then ends, is not
    reported a second time as ended.

    Kills: guards.py ``leaks()`` keying ended leases apart from open ones
    (``"ended"`` for ``"open"``)."""
    guard = LeakGuard([pool]).start()
    try:
        con = await pool.acquire()
        assert [leak.kind for leak in guard.leaks()] == ["open"]
        pool.terminate()
        assert guard.leaks() == []
    finally:
        guard.stop()
    del con
