"""Gaps found in the pytest plugin's leak check by running small user
suites under it (pytester, pytest-asyncio, a real PostgreSQL): clean suites
it failed, and leaks it let pass; each first test of a group was the bug
as found (an xfail until fixed), the others its siblings."""

from __future__ import annotations

import asyncio
import time

import pytest

import safepool
from safepool.testing import LeakGuard
from tests._util import NESTED_PYTEST_ADDOPTS, PYTESTER_INI, source_line_of

pytest_plugins = ["pytester"]
# The inner runs leak on purpose; an outer run with --safepool-leaks must not
# count them against these tests.
pytestmark = pytest.mark.safepool_allow_leaks


# The imports every sample suite starts with (an inner test file's own).
SAMPLE_HEADER = """
import asyncio
import os
import time

import pytest
import pytest_asyncio

import safepool
from safepool.testing import LeakGuard


"""

CONFTEST = SAMPLE_HEADER + """
@pytest_asyncio.fixture
async def pool():
    pool = await safepool.create_pool(os.environ["SAFEPOOL_PLUGIN_DSN"], min_size=1, max_size=3)
    yield pool
    await asyncio.wait_for(pool.close(), 10)


@pytest_asyncio.fixture
async def con(pool):
    async with pool.acquire() as con:  # released at teardown: clean
        yield con
"""


@pytest.fixture
def suite(pytester: pytest.Pytester, pg_dsn: str, monkeypatch: pytest.MonkeyPatch) -> pytest.Pytester:
    monkeypatch.setenv("SAFEPOOL_PLUGIN_DSN", pg_dsn)
    # The inner runs' output is read line by line, in order: pytest fits its
    # summary lines to the terminal's width (COLUMNS), and pytest-randomly,
    # where installed, shuffles the inner tests and so their reports (two
    # tests failed so). pytester itself clears PYTEST_ADDOPTS first.
    monkeypatch.setenv("COLUMNS", "80")
    monkeypatch.setenv("PYTEST_ADDOPTS", NESTED_PYTEST_ADDOPTS)
    pytester.makeini(PYTESTER_INI)
    pytester.makeconftest(CONFTEST)
    return pytester


OVERRIDE = SAMPLE_HEADER + """
@pytest_asyncio.fixture
async def con(con):  # extends the conftest's fixture of the same name
    await con.execute("SELECT 1")
    yield con


@pytest.mark.asyncio
async def test_uses_the_overriding_fixture(con):
    assert await con.fetchval("SELECT 1") == 1
"""


def passes_with_and_without_the_check(suite: pytest.Pytester, **files: str) -> None:
    """The suite passes without the leak check (so it is clean), and with
    it: no leak is reported."""
    suite.makepyfile(**files)
    assert suite.runpytest("-p", "no:cacheprovider").ret == 0
    suite.runpytest("--safepool-leaks", "-p", "no:cacheprovider").assert_outcomes(passed=1)


def test_an_overriding_fixture_of_the_same_name_is_not_reported(suite: pytest.Pytester) -> None:
    passes_with_and_without_the_check(suite, test_override=OVERRIDE)


OVERRIDE_LEAK = SAMPLE_HEADER + """
KEPT = []  # keeps the leaked connection's proxy alive: reported as held, not collected


@pytest_asyncio.fixture  # OVERRIDE-DEF
async def con(con, pool):  # extends the conftest's clean fixture, and leaks one of its own
    extra = await pool.acquire()  # OVERRIDE-LEAK
    KEPT.append(extra)
    yield con


@pytest.mark.asyncio
async def test_uses_the_leaky_override(con):
    assert await con.fetchval("SELECT 1") == 1
"""


def test_an_overriding_fixture_that_leaks_is_reported_once_with_its_definition(suite: pytest.Pytester) -> None:
    suite.makepyfile(test_override_leak=OVERRIDE_LEAK)
    result = suite.runpytest("--safepool-leaks", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines([
        "*ERROR at teardown of test_uses_the_leaky_override*",
        "safepool: 1 connection leaked",
        "*acquired by fixture 'con', whose teardown did not release it (the fixture defined at "
        f"test_override_leak.py:{source_line_of(OVERRIDE_LEAK, 'OVERRIDE-DEF')})",
        "  acquired at:",
        f'*File "*test_override_leak.py", line {source_line_of(OVERRIDE_LEAK, "OVERRIDE-LEAK")}, in con',
    ])
    assert result.stdout.lines.count("safepool: 1 connection leaked") == 1  # the conftest's con, released, is not blamed


THREE_LEVELS = SAMPLE_HEADER + """
@pytest_asyncio.fixture
async def con(con):  # the module's, over the conftest's
    yield con


class TestInAClass:
    @pytest_asyncio.fixture
    async def con(self, con):  # the class's, over the module's
        await con.execute("SELECT 1")
        yield con

    @pytest.mark.asyncio
    async def test_uses_the_class_fixture(self, con):
        assert await con.fetchval("SELECT 1") == 1


@pytest.mark.asyncio
async def test_uses_the_module_fixture(con):
    assert await con.fetchval("SELECT 1") == 1
"""


def test_fixtures_of_one_name_at_three_levels_are_told_apart(suite: pytest.Pytester) -> None:
    suite.makepyfile(test_three_levels=THREE_LEVELS)
    result = suite.runpytest("--safepool-leaks", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=2)


DYNAMIC = SAMPLE_HEADER + """
@pytest.fixture
def wrapper(request):
    con = request.getfixturevalue("con")  # set up inside this fixture's setup
    yield con


@pytest.mark.asyncio
async def test_uses_the_wrapper(wrapper):
    assert await wrapper.fetchval("SELECT 1") == 1
"""


def test_a_fixture_requested_dynamically_inside_another_is_not_blamed_on_it(suite: pytest.Pytester) -> None:
    passes_with_and_without_the_check(suite, test_dynamic=DYNAMIC)


DYNAMIC_INNER_LEAK = SAMPLE_HEADER + """
@pytest_asyncio.fixture
async def leaky(pool):
    con = await pool.acquire()  # INNER-LEAK
    yield con


@pytest.fixture
def wrapper(request):
    con = request.getfixturevalue("con")  # clean
    request.getfixturevalue("leaky")  # leaks: its lease is its own, not the wrapper's
    yield con


@pytest.mark.asyncio
async def test_uses_the_wrapper(wrapper):
    assert await wrapper.fetchval("SELECT 1") == 1
"""


def test_a_fixture_that_leaks_inside_another_is_blamed_alone(suite: pytest.Pytester) -> None:
    suite.makepyfile(test_inner_leak=DYNAMIC_INNER_LEAK)
    result = suite.runpytest("--safepool-leaks", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines([
        "*ERROR at teardown of test_uses_the_wrapper*",
        "safepool: 1 connection leaked",
        "*acquired by fixture 'leaky', whose teardown did not release it*",
        f'*File "*test_inner_leak.py", line {source_line_of(DYNAMIC_INNER_LEAK, "INNER-LEAK")}, in leaky',
    ])
    assert "fixture 'wrapper'" not in result.stdout.str()
    assert result.stdout.lines.count("safepool: 1 connection leaked") == 1


WIDER_SCOPE = SAMPLE_HEADER + """
@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def shared_con():  # held for the module, released at its teardown
    pool = await safepool.create_pool(os.environ["SAFEPOOL_PLUGIN_DSN"], min_size=1, max_size=1)
    async with pool.acquire() as con:
        yield con
    await asyncio.wait_for(pool.close(), 10)


@pytest.fixture
def wrapper(request):
    return request.getfixturevalue("shared_con")  # set up inside the first test's wrapper


def test_first(wrapper):
    assert wrapper is not None


def test_second(wrapper):
    assert wrapper is not None
"""


def test_a_wider_scoped_fixture_set_up_inside_a_function_fixture_is_not_reported(suite: pytest.Pytester) -> None:
    suite.makepyfile(test_wider=WIDER_SCOPE)
    result = suite.runpytest("--safepool-leaks", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=2)
    assert "leaked" not in result.stdout.str()


IN_THE_TEST = """
def test_requests_a_fixture_in_its_body(request):
    con = request.getfixturevalue("con")  # the fixture's lease, released at its teardown
    assert con is not None
"""


def test_a_fixture_requested_in_the_test_function_is_not_the_tests_leak(suite: pytest.Pytester) -> None:
    suite.makepyfile(test_in_the_test=IN_THE_TEST)
    result = suite.runpytest("--safepool-leaks", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)


SKIPS_AFTER_LEAK = SAMPLE_HEADER + """
@pytest.mark.asyncio
async def test_skips_after_leaking(pool):
    con = await pool.acquire()  # SKIP-LEAK
    await con.fetchval("SELECT 1")
    pytest.skip("feature flag off")
"""


def test_a_test_that_leaks_then_skips_is_reported(suite: pytest.Pytester) -> None:
    suite.makepyfile(test_skips=SKIPS_AFTER_LEAK)
    result = suite.runpytest("--safepool-leaks", "-p", "no:cacheprovider", "-rA")
    assert "SKIP-LEAK" in result.stdout.str(), result.stdout.str()


SKIP_VARIANTS = SAMPLE_HEADER + """
@pytest.mark.asyncio
async def test_skips_after_leaking(pool):
    con = await pool.acquire()  # SKIP-LEAK
    pytest.skip("feature flag off")


@pytest.mark.asyncio
async def test_xfails_after_leaking(pool):
    con = await pool.acquire()  # XFAIL-CALL-LEAK
    pytest.xfail("not supported here")


@pytest_asyncio.fixture
async def held(pool):
    con = await pool.acquire()  # FIXTURE-LEAK
    yield con


@pytest.mark.asyncio
async def test_skips_with_a_leaky_fixture(held):
    pytest.skip("feature flag off")
"""


def test_a_leak_then_a_skip_or_xfail_keeps_the_outcome_and_errors_at_teardown(suite: pytest.Pytester) -> None:
    suite.makepyfile(test_skip_variants=SKIP_VARIANTS)
    result = suite.runpytest("--safepool-leaks", "-p", "no:cacheprovider")
    result.assert_outcomes(skipped=2, xfailed=1, errors=3)
    for test, marker, how in [
        ("test_skips_after_leaking", "SKIP-LEAK", "was skipped"),
        ("test_xfails_after_leaking", "XFAIL-CALL-LEAK", "failed as expected (xfail)"),
    ]:
        result.stdout.fnmatch_lines([
            f"*ERROR at teardown of {test}*",
            "safepool: 1 connection leaked",
            "*",
            "  acquired at:",
            f'*File "*test_skip_variants.py", line {source_line_of(SKIP_VARIANTS, marker)}, in {test}',
            "*",
            f"The test function leaked, then {how}: the leak is reported here, at teardown.",
        ])
    result.stdout.fnmatch_lines([  # as before the fix
        "*ERROR at teardown of test_skips_with_a_leaky_fixture*",
        "safepool: 1 connection leaked",
        "*acquired by fixture 'held', whose teardown did not release it*",
        "  acquired at:",
        f'*File "*test_skip_variants.py", line {source_line_of(SKIP_VARIANTS, "FIXTURE-LEAK")}, in held',
    ])


XPASS_LEAK = SAMPLE_HEADER + """
@pytest.mark.xfail(reason="flaky upstream", strict=False)
@pytest.mark.asyncio
async def test_passes_but_leaks(pool):
    con = await pool.acquire()  # XPASS-LEAK
    assert await con.fetchval("SELECT 1") == 1
"""


def test_an_xfail_marked_test_that_passes_but_leaks_is_not_hidden_as_xfailed(suite: pytest.Pytester) -> None:
    suite.makepyfile(test_xpass=XPASS_LEAK)
    result = suite.runpytest("--safepool-leaks", "-p", "no:cacheprovider", "-rA")
    assert "XPASS-LEAK" in result.stdout.str(), result.stdout.str()
    result.assert_outcomes(failed=1)


XFAIL_VARIANTS = SAMPLE_HEADER + """
@pytest.mark.xfail(reason="flaky upstream", strict=True)
@pytest.mark.asyncio
async def test_strict_passes_but_leaks(pool):
    con = await pool.acquire()  # STRICT-LEAK
    assert await con.fetchval("SELECT 1") == 1


@pytest.mark.xfail(reason="known bug")
@pytest.mark.asyncio
async def test_fails_and_leaks(pool):
    con = await pool.acquire()  # FAILS-AND-LEAKS
    assert await con.fetchval("SELECT 1") == 2


@pytest_asyncio.fixture
async def held(pool):
    con = await pool.acquire()  # XFAIL-FIXTURE-LEAK
    yield con


@pytest.mark.xfail(reason="known bug")
@pytest.mark.asyncio
async def test_fails_with_a_leaky_fixture(held):
    assert await held.fetchval("SELECT 1") == 2


@pytest.mark.xfail(reason="known bug")
@pytest.mark.asyncio
async def test_passes_clean(pool):
    async with pool.acquire() as con:
        assert await con.fetchval("SELECT 1") == 1
"""


def test_xfail_marks_do_not_hide_leaks(suite: pytest.Pytester) -> None:
    suite.makepyfile(test_xfail_variants=XFAIL_VARIANTS)
    result = suite.runpytest("--safepool-leaks", "-p", "no:cacheprovider", "-rA")
    # A pass that leaks fails; a failure the mark expects stays xfailed, and
    # its leak (the test's or a fixture's) is an error at teardown; a clean
    # pass is an XPASS, as without the check.
    result.assert_outcomes(failed=1, xfailed=2, errors=2, xpassed=1)
    result.stdout.fnmatch_lines([
        "*_ test_strict_passes_but_leaks _*",
        "safepool: 1 connection leaked",
        "*",
        "  acquired at:",
        f'*File "*test_xfail_variants.py", line {source_line_of(XFAIL_VARIANTS, "STRICT-LEAK")}, in *',
        "*",
        "The test is marked xfail and passed: the leak fails it all the same*",
    ])
    for test, marker in [("test_fails_and_leaks", "FAILS-AND-LEAKS"),
                         ("test_fails_with_a_leaky_fixture", "XFAIL-FIXTURE-LEAK")]:
        result.stdout.fnmatch_lines([
            f"*ERROR at teardown of {test}*",
            "safepool: 1 connection leaked",
            "*",
            "  acquired at:",
            f'*File "*test_xfail_variants.py", line {source_line_of(XFAIL_VARIANTS, marker)}, in *',
        ])
    result.stdout.fnmatch_lines(["XFAIL*test_fails_and_leaks*", "XFAIL*test_fails_with_a_leaky_fixture*"],
                                consecutive=False)
    result.stdout.fnmatch_lines(["XPASS*test_passes_clean*"])


# unittest TestCases: pytest runs setUp, the test method and tearDown as one
# call that returns normally whatever the test did; a skipTest(), an
# @unittest.expectedFailure that fails, or a pytest.skip() inside the method
# reach the report through unittest's own makereport hook, which replaces the
# call's exception (here the leak check's LeakFailed) with that outcome.

UNITTEST_SKIP_XFAIL = """
import os
import unittest

import asyncio
import time

import pytest

import safepool
from safepool.testing import LeakGuard

import safepool


class Orders(unittest.IsolatedAsyncioTestCase):
    async def asyncSetUp(self):
        self.pool = await safepool.create_pool(os.environ["SAFEPOOL_PLUGIN_DSN"], min_size=1, max_size=3)

    async def asyncTearDown(self):
        self.pool.terminate()  # ends the leaked lease: "never released; the pool ended it"

    async def test_leaks_then_skips(self):
        con = await self.pool.acquire()  # UT-SKIP-LEAK
        self.skipTest("feature flag off")

    @unittest.expectedFailure
    async def test_leaks_then_fails_as_expected(self):
        con = await self.pool.acquire()  # UT-XFAIL-LEAK
        self.assertEqual(await con.fetchval("SELECT 1"), 2)

    async def test_leaks_then_pytest_skip(self):
        con = await self.pool.acquire()  # UT-PYTEST-SKIP-LEAK
        pytest.skip("feature flag off")
"""


def test_a_unittest_case_that_leaks_then_skips_or_xfails_is_reported(suite: pytest.Pytester) -> None:
    suite.makepyfile(test_unittest_skip=UNITTEST_SKIP_XFAIL)
    result = suite.runpytest("--safepool-leaks", "-p", "no:cacheprovider", "-rA")
    # Each keeps its outcome, and its leak is an error (as for a pytest test function).
    result.assert_outcomes(skipped=2, xfailed=1, errors=3)
    for marker in ("UT-SKIP-LEAK", "UT-XFAIL-LEAK", "UT-PYTEST-SKIP-LEAK"):
        assert marker in result.stdout.str(), result.stdout.str()


# A factory fixture (a pytest idiom: the fixture yields a function and cleans
# up what it made at its teardown) that another fixture calls: the lease is
# taken while the other fixture is set up, so it is blamed on it and checked
# at its teardown, before the factory's teardown releases it.

FACTORY = SAMPLE_HEADER + """
@pytest_asyncio.fixture
async def acquire(pool):
    held = []

    async def make():
        con = await pool.acquire()
        held.append(con)
        return con

    yield make
    for con in held:  # the factory releases what it handed out
        await pool.release(con)


@pytest_asyncio.fixture
async def reporting_con(acquire):
    return await acquire()


@pytest.mark.asyncio
async def test_uses_a_connection_from_the_factory(reporting_con):
    assert await reporting_con.fetchval("SELECT 1") == 1
"""


def test_a_factory_fixture_releasing_what_another_fixture_took_is_not_reported(suite: pytest.Pytester) -> None:
    passes_with_and_without_the_check(suite, test_factory=FACTORY)


# request.node.addfinalizer(): the cleanup runs in the test's teardown right
# after the fixture's own (it was registered during its setup), before the
# pool fixture's close.

NODE_FINALIZER = SAMPLE_HEADER + """
@pytest_asyncio.fixture
async def con(pool, request):  # overrides the conftest's: releases through the test item's finalizer
    con = await pool.acquire()
    loop = asyncio.get_running_loop()
    request.node.addfinalizer(lambda: loop.run_until_complete(pool.release(con)))
    return con


@pytest.mark.asyncio
async def test_uses_the_connection(con):
    assert await con.fetchval("SELECT 1") == 1
"""


def test_a_fixture_releasing_in_a_node_finalizer_is_not_reported(suite: pytest.Pytester) -> None:
    passes_with_and_without_the_check(suite, test_node_finalizer=NODE_FINALIZER)


# Their siblings: the lease is still the fixture's that took it, and checked
# before its pool is closed: if nothing released it by then, it is reported,
# naming that fixture.

FACTORY_AND_FINALIZER_LEAKS = SAMPLE_HEADER + """
@pytest_asyncio.fixture
async def acquire(pool):
    async def make():
        return await pool.acquire()  # FACTORY-LEAK

    yield make  # forgets what it handed out


@pytest_asyncio.fixture
async def reporting_con(acquire):
    return await acquire()


@pytest.mark.asyncio
async def test_factory_forgets(reporting_con):
    assert await reporting_con.fetchval("SELECT 1") == 1


@pytest_asyncio.fixture
async def noted(pool, request):
    con = await pool.acquire()  # FINALIZER-LEAK
    request.node.addfinalizer(lambda: None)  # a cleanup that does not release it
    return con


@pytest.mark.asyncio
async def test_finalizer_forgets(noted):
    assert await noted.fetchval("SELECT 1") == 1


@pytest_asyncio.fixture
async def bare_pool():
    pool = await safepool.create_pool(os.environ["SAFEPOOL_PLUGIN_DSN"], min_size=1, max_size=2)
    yield pool
    await pool.close()  # no timeout: waits for every connection to be released


@pytest_asyncio.fixture
async def held(bare_pool):
    con = await bare_pool.acquire()  # BARE-POOL-LEAK
    yield con


@pytest.mark.asyncio
async def test_bare_pool_fixture(held):
    assert await held.fetchval("SELECT 1") == 1
"""


def test_a_fixtures_lease_nobody_releases_before_its_pool_closes_is_reported_naming_the_fixture(
    suite: pytest.Pytester,
) -> None:
    suite.makepyfile(test_forgets=FACTORY_AND_FINALIZER_LEAKS)
    started = time.monotonic()
    result = suite.runpytest("--safepool-leaks", "-p", "no:cacheprovider")
    # A pool fixture's close() without a timeout did not wait for the leaked
    # connections: the check released them first.
    assert time.monotonic() - started < 8, result.stdout.str()
    result.assert_outcomes(passed=3, errors=3)
    for test, fixture, marker, function in [
        ("test_factory_forgets", "reporting_con", "FACTORY-LEAK", "make"),
        ("test_finalizer_forgets", "noted", "FINALIZER-LEAK", "noted"),
        ("test_bare_pool_fixture", "held", "BARE-POOL-LEAK", "held"),
    ]:
        result.stdout.fnmatch_lines([
            f"*ERROR at teardown of {test}*",
            "safepool: 1 connection leaked",
            "*",
            f"*acquired by fixture '{fixture}', whose teardown did not release it (the fixture defined at "
            "test_forgets.py:*)",
            "  acquired at:",
            f'*File "*test_forgets.py", line {source_line_of(FACTORY_AND_FINALIZER_LEAKS, marker)}, in {function}',
        ])


@pytest.mark.asyncio
async def test_a_pool_set_up_inside_the_fixture_that_leases_from_it_is_checked_before_its_close(
    pg_dsn: str,
) -> None:
    """A fixture whose setup sets up the pool fixture (getfixturevalue())
    then acquires from it: the pool's fixture is torn down first, so the
    lease is checked then, and the report says so. (Driven through the
    guard: pytest-asyncio cannot set up an async fixture inside another's
    setup.)"""
    guard = LeakGuard().start()
    try:
        outer_done = guard.fixture_setup("takes", "takes-key", where="test_x.py:10")
        inner_done = guard.fixture_setup("inner_pool", "pool-key", where="test_x.py:3")
        pool = await safepool.create_pool(pg_dsn, min_size=1, max_size=2)
        inner_done()
        con = await pool.acquire()
        outer_done()
        assert guard.created_pools("pool-key") == [pool]
        assert guard.created_pools("takes-key") == []
        guard.pool_teardown("pool-key")  # right before the pool fixture's teardown
        assert not pool.leases()  # released by the check: close() does not wait
        await asyncio.wait_for(pool.close(), 5)
        guard.fixtures_torn_down()
        leaks = guard.leaks()
    finally:
        guard.stop()
    assert [leak.detail for leak in leaks] == [
        "acquired by fixture 'takes' (the fixture defined at test_x.py:10), still held when fixture "
        "'inner_pool', which created its pool, was torn down before 'takes'"
    ]
    del con


# A fixture's lease of a pool that no function-scoped fixture of the test
# created (a module fixture's pool) is checked once the test's fixtures and
# finalizers are all torn down.

MODULE_POOL = SAMPLE_HEADER + """
@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def shared_pool():
    pool = await safepool.create_pool(os.environ["SAFEPOOL_PLUGIN_DSN"], min_size=1, max_size=3)
    yield pool
    await asyncio.wait_for(pool.close(), 10)


@pytest_asyncio.fixture(loop_scope="module")
async def released_later(shared_pool, request):
    con = await shared_pool.acquire()
    loop = asyncio.get_running_loop()
    request.node.addfinalizer(lambda: loop.run_until_complete(shared_pool.release(con)))
    return con


@pytest_asyncio.fixture(loop_scope="module")
async def never_released(shared_pool):
    return await shared_pool.acquire()  # MODULE-POOL-LEAK


@pytest.mark.asyncio(loop_scope="module")
async def test_released_by_a_finalizer(released_later):
    assert await released_later.fetchval("SELECT 1") == 1


@pytest.mark.asyncio(loop_scope="module")
async def test_never_released(never_released):
    assert await never_released.fetchval("SELECT 1") == 1


@pytest.mark.asyncio(loop_scope="module")
async def test_pool_is_whole_again(shared_pool):
    assert not shared_pool.leases()  # the leak was released
"""


def test_a_fixtures_lease_of_a_module_pool_is_checked_at_the_end_of_the_tests_teardown(
    suite: pytest.Pytester,
) -> None:
    suite.makepyfile(test_module_pool=MODULE_POOL)
    result = suite.runpytest("--safepool-leaks", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=3, errors=1)
    result.stdout.fnmatch_lines([
        "*ERROR at teardown of test_never_released*",
        "safepool: 1 connection leaked",
        "*",
        "*acquired by fixture 'never_released', whose teardown did not release it*",
        "  acquired at:",
        f'*File "*test_module_pool.py", line {source_line_of(MODULE_POOL, "MODULE-POOL-LEAK")}, in never_released',
    ])
    assert "test_released_by_a_finalizer" not in result.stdout.str().split("= ERRORS =")[-1]
