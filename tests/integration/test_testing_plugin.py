"""The leak guards of ``safepool.testing``: the pytest plugin run on sample
user suites with pytester (each way of leaking, pytest-asyncio and anyio,
the ini option, strict mode), and ``assert_no_leaks`` on a real PostgreSQL."""

from __future__ import annotations

import asyncio
import gc
import re
import warnings
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import pytest_asyncio

import safepool
from safepool.pool import Pool, live_pools
from safepool.testing import LeakError, _Tracker, _tracker, assert_no_leaks
from tests._util import NESTED_PYTEST_ADDOPTS, until

pytest_plugins = ["pytester"]
# These tests leak on purpose, in nested sessions and guarded blocks: a run of
# this suite with --safepool-leaks must not count those leaks against them.
pytestmark = pytest.mark.safepool_allow_leaks

SAMPLES = Path(__file__).resolve().parents[1] / "plugin" / "samples"
INI = """
[pytest]
asyncio_mode = strict
asyncio_default_fixture_loop_scope = function
{extra}
filterwarnings =
    error
"""


def line_of(sample: str, marker: str) -> int:
    """The line of a sample file that carries ``marker`` (a comment)."""
    for number, line in enumerate((SAMPLES / sample).read_text().splitlines(), 1):
        if marker in line:
            return number
    raise AssertionError(marker)


def this_line(marker: str) -> int:
    for number, line in enumerate(Path(__file__).read_text().splitlines(), 1):
        if marker in line and "this_line(" not in line:
            return number
    raise AssertionError(marker)


@pytest.fixture
def suite(pytester: pytest.Pytester, pg_dsn: str, monkeypatch: pytest.MonkeyPatch) -> pytest.Pytester:
    """A pytester directory whose tests reach the test database."""
    monkeypatch.setenv("SAFEPOOL_PLUGIN_DSN", pg_dsn)
    # The inner runs' output is read line by line, in order: pytest fits its
    # summary lines to the terminal's width (COLUMNS), and pytest-randomly,
    # where installed, shuffles the inner tests and so their reports (two
    # tests failed so). pytester itself clears PYTEST_ADDOPTS first.
    monkeypatch.setenv("COLUMNS", "80")
    monkeypatch.setenv("PYTEST_ADDOPTS", NESTED_PYTEST_ADDOPTS)
    return pytester


def add_sample(pytester: pytest.Pytester, sample: str, name: str, ini_extra: str = "") -> None:
    pytester.makefile(".py", **{name: (SAMPLES / sample).read_text()})
    pytester.makeini(INI.format(extra=ini_extra))


def assert_patches_removed() -> None:
    """After a session with the plugin on, nothing of it is left on the pool
    (unless the outer session runs with --safepool-leaks itself)."""
    if _tracker._users:
        return
    assert Pool.__dict__["__init__"].__module__ == "safepool.pool"
    assert not hasattr(Pool.__dict__["__init__"], "__wrapped__")
    assert not hasattr(Pool.__dict__["acquire"], "__wrapped__")
    assert not hasattr(Pool.__dict__["terminate"], "__wrapped__")
    assert not hasattr(Pool.__dict__["release"], "__wrapped__")
    for pool in live_pools():
        for callback in pool._reporter.listeners:
            assert getattr(getattr(callback, "func", None), "__func__", None) is not _Tracker._on_event


def test_each_way_of_leaking_fails_with_the_acquire_line(suite: pytest.Pytester) -> None:
    add_sample(suite, "leaky_asyncio.py", "test_leaky")
    result = suite.runpytest("--safepool-leaks", "-p", "no:cacheprovider")
    result.assert_outcomes(failed=4, passed=5, errors=1)
    ways = {
        "test_no_release": ("LEAK-NO-RELEASE", "handler_without_release"),
        "test_exception_path": ("LEAK-EXCEPTION", "handler_with_early_exit"),
        "test_forgotten_proxy": ("LEAK-FORGOTTEN", "forget"),
        "test_cancelled_task": ("LEAK-CANCELLED", "worker"),
    }
    for test, (marker, function) in ways.items():
        result.stdout.fnmatch_lines([
            f"*_ {test} _*",
            "safepool: 1 connection leaked",
            "[[]1] pool 'pool-*', lease *",
            "  acquired at:",
            f'*File "*test_leaky.py", line {line_of("leaky_asyncio.py", marker)}, in {function}',
            f"*# {marker}",
            "Fix: acquire with `async with pool.acquire() as con:`*",
        ])
    result.stdout.fnmatch_lines([
        "*ERROR at teardown of test_fixture_leaks*",
        "*acquired by fixture 'held_connection', whose teardown did not release it (the fixture defined at test_leaky.py:*)",
        "  acquired at:",
        f'*File "*test_leaky.py", line {line_of("leaky_asyncio.py", "LEAK-FIXTURE")}, in held_connection',
    ])
    failed = {match[1] for line in result.outlines if (match := re.match(r"(?:FAILED|ERROR) test_leaky.py::(\w+)", line))}
    assert failed == {*ways, "test_fixture_leaks"}
    assert "Exception in callback" not in result.stdout.str()  # the pool's ResourceWarning is silenced
    # The guards reported each of those: no section repeats them.
    assert "leaked outside the tests' leak checks" not in result.stdout.str()
    assert_patches_removed()


MODULE_FIXTURE_LEAK = """
import asyncio
import gc
import os

import pytest
import pytest_asyncio

import safepool

DSN = os.environ["SAFEPOOL_PLUGIN_DSN"]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def pool():
    pool = await safepool.create_pool(DSN, min_size=1, max_size=2, name="module-pool")
    yield pool
    gc.collect()
    await asyncio.wait_for(pool.close(), 10)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def con(pool):
    con = await pool.acquire()  # MODULE-LEAK
    yield con


@pytest.mark.asyncio(loop_scope="module")
async def test_uses_it(con):
    assert await con.fetchval("SELECT 1") == 1


@pytest.mark.asyncio(loop_scope="module")
async def test_last(pool):
    # The module's fixtures are torn down after this test: a test that took
    # `con` as an argument would keep it alive until then.
    async with pool.acquire() as con:
        assert await con.fetchval("SELECT 1") == 1
"""


def test_a_wider_scoped_fixtures_leak_is_reported_with_the_check_on(suite: pytest.Pytester) -> None:
    """A module-scoped fixture that never released its connection passed a
    --safepool-leaks run without a word (the guards check each test and its
    function-scoped fixtures; the count of reclaimed connections ran only
    with the check off, where it would have named it): the run's section
    now counts it, with its line."""
    suite.makeini(INI.format(extra=""))
    suite.makepyfile(test_module_leak=MODULE_FIXTURE_LEAK)
    result = suite.runpytest("--safepool-leaks", "-p", "no:cacheprovider", "-W", "ignore::ResourceWarning")
    result.assert_outcomes(passed=2)
    line = next(n for n, text in enumerate(MODULE_FIXTURE_LEAK.lstrip("\n").splitlines(), 1) if "MODULE-LEAK" in text)
    result.stdout.fnmatch_lines([
        "*- safepool -*",
        "safepool: 1 connection leaked outside the tests' leak checks: garbage collected without being released, "
        "and taken back by its pool ('module-pool' 1).",
        f"acquired at (1 of 1 known): *test_module_leak.py:{line} in con (1)",
        "The leak check covers each test and its function-scoped fixtures: a module-, class- or session-scoped "
        "fixture must release what it acquires in its own teardown*",
    ])


def test_off_by_default(suite: pytest.Pytester) -> None:
    add_sample(suite, "leaky_asyncio.py", "test_leaky")
    # Left out: without the plugin, the leaked fixture connection makes its
    # pool's close() wait (the sample's 10 s guard would fail it).
    result = suite.runpytest("-p", "no:cacheprovider", "-W", "ignore::ResourceWarning", "-k", "not fixture_leaks")
    result.assert_outcomes(passed=8, deselected=1)
    # Nothing fails; the pools took back the four leaked connections
    # (test_no_release, test_exception_path, test_forgotten_proxy,
    # test_cancelled_task: one pool each), and the run says so at its end.
    result.stdout.fnmatch_lines([
        "*- safepool -*",
        "safepool: 4 connections leaked during this run: garbage collected without being released, "
        "and taken back by their pools ('pool-*' 1, 'pool-*' 1, 'pool-*' 1, 'pool-*' 1).",
        "Run pytest with --safepool-leaks to fail each test that leaks*",
    ])
    assert "leak check on" not in result.stdout.str()
    assert_patches_removed()


def test_off_by_default_a_clean_run_has_no_safepool_section(suite: pytest.Pytester) -> None:
    add_sample(suite, "leaky_asyncio.py", "test_leaky")
    result = suite.runpytest("-p", "no:cacheprovider", "-k", "clean")
    result.assert_outcomes(passed=3, deselected=6)
    assert "leaked during this run" not in result.stdout.str()


LEAK_ALLOWED = """
import gc
import os

import pytest

import safepool

DSN = os.environ["SAFEPOOL_PLUGIN_DSN"]

pytestmark = pytest.mark.asyncio


@pytest.mark.safepool_allow_leaks
async def test_leaks_on_purpose():
    pool = await safepool.create_pool(DSN, min_size=1, max_size=1, name="on-purpose")
    await pool.acquire()  # dropped at once: reclaimed
    gc.collect()
    async with pool.acquire() as con:  # the reclaimed connection
        assert await con.fetchval("SELECT 1") == 1
    await pool.close()
"""


def test_off_by_default_tests_marked_to_leak_are_not_counted(suite: pytest.Pytester) -> None:
    add_sample(suite, "leaky_asyncio.py", "test_leaky")
    suite.makepyfile(test_allowed=LEAK_ALLOWED)
    result = suite.runpytest("-p", "no:cacheprovider", "-W", "ignore::ResourceWarning", "test_allowed.py")
    result.assert_outcomes(passed=1)
    assert "leaked during this run" not in result.stdout.str()
    # The same test unmarked is counted.
    suite.makepyfile(test_allowed=LEAK_ALLOWED.replace("@pytest.mark.safepool_allow_leaks\n", ""))
    result = suite.runpytest("-p", "no:cacheprovider", "-W", "ignore::ResourceWarning", "test_allowed.py")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["safepool: 1 connection leaked during this run:*taken back by its pool ('on-purpose' 1)."])
    assert "acquired at (" not in result.stdout.str()  # (the pool captured no stack)


def test_off_by_default_a_leak_the_fixture_failed_is_not_counted_again(suite: pytest.Pytester) -> None:
    # With the check off, a test that asks for safepool_leak_check fails
    # with its leak; the run's summary counted the same leak again and
    # suggested --safepool-leaks, as if nothing had reported it (review s58).
    fixture_guarded = LEAK_ALLOWED.replace(
        "@pytest.mark.safepool_allow_leaks\nasync def test_leaks_on_purpose():",
        "async def test_leaks_on_purpose(safepool_leak_check):",
    )
    assert fixture_guarded != LEAK_ALLOWED
    suite.makeini(INI.format(extra=""))
    suite.makepyfile(test_guarded=fixture_guarded)
    result = suite.runpytest("-p", "no:cacheprovider", "-W", "ignore::ResourceWarning", "test_guarded.py")
    result.assert_outcomes(failed=1)
    out = result.stdout.str()
    assert "connection leaked" in out  # (the fixture's report)
    assert "leaked during this run" not in out and "Run pytest with --safepool-leaks" not in out
    # A pool that captures stacks names the line.
    suite.makepyfile(test_allowed=LEAK_ALLOWED.replace("@pytest.mark.safepool_allow_leaks\n", "").replace(
        'name="on-purpose"', 'name="on-purpose", capture_stack=True'
    ))
    result = suite.runpytest("-p", "no:cacheprovider", "-W", "ignore::ResourceWarning", "test_allowed.py")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["acquired at (1 of 1 known): *test_allowed.py:* in test_leaks_on_purpose (1)"])


def test_off_by_default_pools_of_one_name_are_counted_apart(suite: pytest.Pytester) -> None:
    """The section counts per pool, not per name: default names come from
    id(pool), which a later pool reuses once the first is garbage (the four
    leaking pools of test_off_by_default were shown as three, one with 2),
    and a program may name two pools alike."""
    suite.makeini(INI.format(extra=""))
    suite.makepyfile(test_twins=LEAK_ALLOWED.replace("@pytest.mark.safepool_allow_leaks\n", "").replace(
        "async def test_leaks_on_purpose():", "@pytest.mark.parametrize('twin', [1, 2])\nasync def test_leaks_on_purpose(twin):"
    ))
    result = suite.runpytest("-p", "no:cacheprovider", "-W", "ignore::ResourceWarning")
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(
        ["safepool: 2 connections leaked during this run:*taken back by their pools ('on-purpose' 1, 'on-purpose' 1)."]
    )


NESTED_OUTER = '''
import gc
import os

import pytest

import safepool

pytest_plugins = ["pytester"]
DSN = os.environ["SAFEPOOL_PLUGIN_DSN"]

INNER = """
import gc, os, pytest, safepool

@pytest.mark.asyncio
async def test_inner_leaks():
    pool = await safepool.create_pool(os.environ["SAFEPOOL_PLUGIN_DSN"], min_size=1, max_size=1, name="inner")
    await pool.acquire()  # dropped at once: reclaimed
    gc.collect()
    async with pool.acquire():
        pass
    await pool.close()
"""


@pytest.mark.parametrize("inner_args", [[], ["--safepool-leaks"]])
def test_runs_a_leaking_suite(pytester, inner_args):
    pytester.makeini("[pytest]\\nasyncio_mode = strict\\nasyncio_default_fixture_loop_scope = function\\n")
    pytester.makepyfile(test_inner=INNER)
    result = pytester.runpytest("-p", "no:cacheprovider", "-W", "ignore::ResourceWarning", *inner_args)
    # The inner run reports its leak itself: a count, or a failure.
    result.stdout.fnmatch_lines(["*1 connection leaked*"])


@pytest.mark.asyncio
async def test_outer_leaks():
    pool = await safepool.create_pool(DSN, min_size=1, max_size=1, name="outer")
    await pool.acquire()  # dropped at once: reclaimed
    gc.collect()
    async with pool.acquire():
        pass
    await pool.close()
'''


def test_off_by_default_a_nested_run_counts_its_own_leaks_only(suite: pytest.Pytester) -> None:
    """pytester's in-process runs (a plugin's own test suite): the inner run
    reports its leaks (a count, or failures with its check on); the outer
    run counts its own leak, not the inner runs' again."""
    suite.makeini(INI.format(extra=""))
    suite.makepyfile(test_nested=NESTED_OUTER)
    result = suite.runpytest_subprocess("-p", "no:cacheprovider", "-W", "ignore::ResourceWarning")
    result.assert_outcomes(passed=3)
    result.stdout.fnmatch_lines(
        ["safepool: 1 connection leaked during this run:*taken back by its pool ('outer' 1)."]
    )


def test_ini_option_in_a_fresh_process(suite: pytest.Pytester) -> None:
    add_sample(suite, "leaky_asyncio.py", "test_leaky", "safepool_leaks = true")
    result = suite.runpytest_subprocess("-p", "no:cacheprovider", "-k", "no_release or clean_finally")
    result.assert_outcomes(failed=1, passed=1, deselected=7)
    result.stdout.fnmatch_lines([
        "safepool: leak check on",
        "*",
        f'*File "*test_leaky.py", line {line_of("leaky_asyncio.py", "LEAK-NO-RELEASE")}, in handler_without_release',
    ])


def test_under_pytest_xdist_each_worker_fails_its_leaking_tests(suite: pytest.Pytester) -> None:
    """Users' suites often run on pytest-xdist workers (safepool's own does):
    the check runs in each worker, and the controller prints the acquire line."""
    add_sample(suite, "leaky_asyncio.py", "test_leaky", "safepool_leaks = true")
    result = suite.runpytest_subprocess("-n", "2", "-p", "no:cacheprovider")
    result.assert_outcomes(failed=4, passed=5, errors=1)
    result.stdout.fnmatch_lines(["*2 workers*"])
    for marker, function in (
        ("LEAK-NO-RELEASE", "handler_without_release"),
        ("LEAK-EXCEPTION", "handler_with_early_exit"),
        ("LEAK-FORGOTTEN", "forget"),
        ("LEAK-CANCELLED", "worker"),
    ):
        result.stdout.fnmatch_lines(
            [f'*File "*test_leaky.py", line {line_of("leaky_asyncio.py", marker)}, in {function}']
        )


def test_off_by_default_under_pytest_xdist_the_controller_counts_every_workers_leaks(
    suite: pytest.Pytester,
) -> None:
    add_sample(suite, "leaky_asyncio.py", "test_leaky")
    result = suite.runpytest_subprocess(
        "-n", "2", "-p", "no:cacheprovider", "-W", "ignore::ResourceWarning", "-k", "not fixture_leaks"
    )
    result.assert_outcomes(passed=8)
    result.stdout.fnmatch_lines(["*2 workers*", "safepool: 4 connections leaked during this run:*"])


CRASHES = """
import os


def test_crashes():
    os._exit(3)  # a worker killed mid-run (the OOM killer, a segfault)
"""


def test_off_by_default_under_pytest_xdist_a_crashed_workers_count_is_said_to_be_lost(
    suite: pytest.Pytester,
) -> None:
    """A worker that goes down before it finishes never sends its count: the
    section says so, beside the other workers' counts, instead of passing
    the count off as the whole run's."""
    add_sample(suite, "leaky_asyncio.py", "test_leaky")
    suite.makepyfile(test_crash=CRASHES)
    result = suite.runpytest_subprocess(
        "-n", "2", "-p", "no:cacheprovider", "-W", "ignore::ResourceWarning", "-k", "not fixture_leaks",
        "--max-worker-restart", "1",
    )
    result.assert_outcomes(passed=8, failed=1)  # (xdist reports the crashed test as failed)
    result.stdout.fnmatch_lines([
        "safepool: * leaked during this run:*",
        "safepool: worker gw? went down before finishing (crashed or killed): "
        "the connections leaked in it are not counted here.",
    ])
    # With nothing leaked elsewhere, the section is that line alone.
    result = suite.runpytest_subprocess(
        "-n", "2", "-p", "no:cacheprovider", "-k", "crashes or clean", "--max-worker-restart", "1",
    )
    result.assert_outcomes(passed=3, failed=1)
    result.stdout.fnmatch_lines([
        "*- safepool -*",
        "safepool: worker gw? went down before finishing (crashed or killed): "
        "the connections leaked in it are not counted here.",
    ])
    assert "leaked during this run" not in result.stdout.str()


def test_anyio_plugin(suite: pytest.Pytester) -> None:
    add_sample(suite, "leaky_anyio.py", "test_leaky_anyio")
    result = suite.runpytest("--safepool-leaks", "-p", "no:cacheprovider")
    result.assert_outcomes(failed=1, passed=1)
    result.stdout.fnmatch_lines([
        "*_ test_leaks _*",
        "safepool: 1 connection leaked",
        f'*File "*test_leaky_anyio.py", line {line_of("leaky_anyio.py", "LEAK-ANYIO")}, in test_leaks',
    ])
    # anyio runs every test and fixture in one runner task, alive between
    # tests: the test returned without releasing, and the fix is the
    # acquire's form, not "end the background task" (which there is none of).
    result.stdout.fnmatch_lines([
        "*still held after *s by task * (the code that acquired it returned without releasing it;"
        " the task runs on in anyio's test runner)",
        "Fix: acquire with `async with pool.acquire() as con:`*",
    ])
    result.stdout.no_fnmatch_line("Fix: the task holding it is still running*")
    assert_patches_removed()


def test_strict_mode_fails_timeouts_caused_by_idle_leases(suite: pytest.Pytester) -> None:
    add_sample(suite, "strict_timeouts.py", "test_strict_timeouts")
    relaxed = suite.runpytest("--safepool-leaks", "-p", "no:cacheprovider")
    relaxed.assert_outcomes(passed=2)
    strict = suite.runpytest("--safepool-strict", "-p", "no:cacheprovider")
    strict.assert_outcomes(failed=1, passed=1)
    strict.stdout.fnmatch_lines([
        "*_ test_holder_idles_while_another_task_times_out _*",
        "safepool: 1 acquire timeout caused by idle leases",
        "*timed out waiting for a connection after 0.1*s: max_size=1*; 1 of 1 leased connection(s) were not running a statement:",
        "*lease *, held *s by task *, not in the database: waiting at "
        f"*test_strict_timeouts.py:{line_of('strict_timeouts.py', 'IDLE-HOLDER')} in slow_handler; acquired at:",
        f'*File "*test_strict_timeouts.py", line {line_of("strict_timeouts.py", "STRICT-ACQUIRE")}, in slow_handler',
        "Fix: hold a connection only while you use it*",
    ])
    assert_patches_removed()


def test_fixture_opt_in_without_the_option(suite: pytest.Pytester) -> None:
    add_sample(suite, "fixture_opt_in.py", "test_fixture_opt_in")
    result = suite.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(failed=1, passed=2)
    result.stdout.fnmatch_lines([
        "*_ test_guarded _*",
        f'*File "*test_fixture_opt_in.py", line {line_of("fixture_opt_in.py", "LEAK-GUARDED")}, in test_guarded',
    ])
    assert_patches_removed()


def test_leases_ended_by_the_pool_fail_with_the_acquire_line(suite: pytest.Pytester) -> None:
    """terminate(), or a close() cut short (which terminates), ends a lease the
    code never released: still a leak."""
    add_sample(suite, "ended_by_pool.py", "test_ended")
    result = suite.runpytest("--safepool-leaks", "-p", "no:cacheprovider")
    result.assert_outcomes(failed=3, passed=3)
    ways = {
        "test_terminate_after_unreleased_acquire": "ENDED-TERMINATE",
        "test_close_timing_out": "ENDED-CLOSE-TIMEOUT",
        "test_async_with_pool_exits_by_terminate": "ENDED-ASYNC-WITH",
    }
    for test, marker in ways.items():
        result.stdout.fnmatch_lines([
            f"*_ {test} _*",
            "safepool: 1 connection leaked",
            "[[]1] pool 'pool-*', lease *: never released; the pool ended it *",
            "  acquired at:",
            f'*File "*test_ended.py", line {line_of("ended_by_pool.py", marker)}, in {test}',
            f"*# {marker}",
            "Fix: acquire with `async with pool.acquire() as con:`*",
        ])
    failed = {match[1] for line in result.outlines if (match := re.match(r"FAILED test_ended.py::(\w+)", line))}
    assert failed == set(ways)
    assert_patches_removed()


# ---------------------------------------------------------- assert_no_leaks


@pytest_asyncio.fixture
async def pool(pg_dsn: str) -> AsyncIterator[Pool]:
    pool = await safepool.create_pool(pg_dsn, min_size=1, max_size=2)
    try:
        yield pool
    finally:
        pool.terminate()


@pytest.mark.asyncio
async def test_assert_no_leaks_passes_clean_code(pool: Pool) -> None:
    async with assert_no_leaks(pool):
        async with pool.acquire() as con:
            await con.fetchval("SELECT 1")
    with assert_no_leaks():
        await pool.fetchval("SELECT 1")
    assert pool.stats().in_use == 0
    assert_patches_removed()


@pytest.mark.asyncio
async def test_assert_no_leaks_of_an_asyncpg_pool_says_what_it_is(pool: Pool, pg_dsn: str) -> None:
    # A test suite whose pool fixture still makes asyncpg's pool got
    # "TypeError: 'Pool' object is not iterable".
    legacy = await asyncpg.create_pool(pg_dsn, min_size=1, max_size=1)
    try:
        with pytest.raises(TypeError, match=r"assert_no_leaks\(\) expected a safepool pool, got asyncpg\.pool\.Pool: "
                           r"an asyncpg pool .*safepool\.create_pool\(\)"):
            assert_no_leaks(legacy)
        with pytest.raises(TypeError, match="create it with safepool.create_pool"):
            assert_no_leaks([pool, legacy])
        with pytest.raises(TypeError, match=r"got builtins\.str$"):
            assert_no_leaks("pool")  # type: ignore[arg-type]
        async with assert_no_leaks([pool]):
            await pool.fetchval("SELECT 1")
    finally:
        await legacy.close()


@pytest.mark.asyncio
async def test_assert_no_leaks_names_the_line_and_releases(pool: Pool) -> None:
    kept: list[Any] = []
    with pytest.raises(LeakError) as caught:
        async with assert_no_leaks(pool):
            kept.append(await pool.acquire())  # GUARD-SITE
    text = str(caught.value)
    assert "safepool: 1 connection leaked" in text
    assert f'test_testing_plugin.py", line {this_line("GUARD-SITE")}, in test_assert_no_leaks_names' in text
    assert pool.stats().in_use == 0  # released after the report
    with pytest.raises(asyncpg.InterfaceError):
        await kept[0].fetchval("SELECT 1")


@pytest.mark.asyncio
async def test_a_leak_held_by_a_running_task_says_to_end_the_task(pool: Pool) -> None:
    # The holder is inside its `async with` (a background task still
    # running): "use async with" would be no fix, ending the task is.
    inside, go = asyncio.Event(), asyncio.Event()

    async def background() -> None:
        async with pool.acquire():
            inside.set()
            await go.wait()

    with pytest.raises(LeakError) as caught:
        async with assert_no_leaks(pool):
            task = asyncio.create_task(background())
            await inside.wait()
    text = str(caught.value)
    assert "still held after" in text and "(not in the database: waiting at" in text
    assert "Fix: the task holding it is still running" in text
    assert "Fix: acquire with `async with" not in text
    go.set()
    await task
    assert pool.stats().in_use == 0


@pytest.mark.asyncio
@pytest.mark.parametrize("listens", [False, True])
async def test_assert_no_leaks_reports_garbage_collected_proxies(pool: Pool, listens: bool) -> None:
    # With a listener, the pool keeps a dropped proxy's connection leased: the
    # report said "reclaimed" and a fixture's close() then waited forever (a
    # new user's trial, 2026-12-02). The guard asks for it after the report.
    async def forget() -> None:
        con = await pool.acquire()  # GC-SITE
        await con.execute("SELECT 1")
        if listens:
            await con.add_listener("orders", lambda *args: None)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        with pytest.raises(LeakError, match="garbage collected without being released") as caught:
            async with assert_no_leaks(pool):
                await forget()
                gc.collect()
    assert f"line {this_line('GC-SITE')}, in forget" in str(caught.value)
    await until(lambda: pool.stats().in_use == 0 and pool.stats().resetting == 0)
    await asyncio.wait_for(pool.close(), 10)


@pytest.mark.asyncio
async def test_a_check_right_after_a_collected_leak_says_garbage_collected(pool: Pool) -> None:
    # A new user's sequence: the leaking handler, then check() with no await
    # in between. The proxy is already garbage; the pool's reclaim is queued
    # on the loop. The report said "still held ... (running)".
    async def forget() -> None:
        con = await pool.acquire()  # CHECK-GC-SITE
        await con.execute("SELECT 1")

    guard = assert_no_leaks(pool).start()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ResourceWarning)
            await forget()
            [info] = pool.leases()
            assert info.collected
            with pytest.raises(LeakError) as caught:
                guard.check()
        text = str(caught.value)
        assert "garbage collected without being released" in text and "still held" not in text
        assert f"line {this_line('CHECK-GC-SITE')}, in forget" in text
        await asyncio.sleep(0)
        assert pool.leases() == [] and pool.stats().in_use == 0  # reclaimed by the pool
        assert guard.leaks() == []  # and not reported a second time by the reclaim's record
    finally:
        guard.stop()


@pytest.mark.asyncio
async def test_assert_no_leaks_adds_its_report_to_an_exception(pool: Pool) -> None:
    kept: list[Any] = []
    with pytest.raises(RuntimeError) as caught:
        with assert_no_leaks(pool):
            kept.append(await pool.acquire())
            raise RuntimeError("the handler failed")
    assert any("safepool: 1 connection leaked" in note for note in getattr(caught.value, "__notes__", []))
    await asyncio.sleep(0)
    assert pool.stats().in_use == 0


@pytest.mark.asyncio
async def test_leases_held_before_the_guard_are_not_its_business(pool: Pool) -> None:
    con = await pool.acquire()
    try:
        with assert_no_leaks(pool) as guard:
            await pool.fetchval("SELECT 1")
            assert guard.leaks() == []
    finally:
        await pool.release(con)
    assert_patches_removed()


@pytest.mark.asyncio
async def test_assert_no_leaks_reports_a_lease_ended_by_terminate(pool: Pool) -> None:
    with pytest.raises(LeakError) as caught:
        async with assert_no_leaks(pool):
            con = await pool.acquire()  # TERMINATE-SITE
            await con.fetchval("SELECT 1")
            pool.terminate()
    text = str(caught.value)
    assert "never released; the pool ended it" in text
    assert f"line {this_line('TERMINATE-SITE')}, in test_assert_no_leaks_reports_a_lease_ended" in text
    assert_patches_removed()


@pytest.mark.asyncio
async def test_a_lease_held_before_the_guard_and_ended_inside_it_is_not_its_business(pool: Pool) -> None:
    con = await pool.acquire()
    with assert_no_leaks(pool) as guard:
        pool.terminate()
        assert guard.leaks() == []
    with pytest.raises(asyncpg.InterfaceError):
        await con.fetchval("SELECT 1")


def test_unittest_cases_that_fail_and_leak_keep_the_leak_report(suite: pytest.Pytester) -> None:
    """unittest.IsolatedAsyncioTestCase: the check runs after asyncTearDown,
    and pytest reports a failed TestCase's own error in place of the
    plugin's; the leak report must still be there, with the acquire line."""
    add_sample(suite, "leaky_unittest.py", "test_unit")
    result = suite.runpytest(
        "--safepool-leaks", "-p", "no:cacheprovider", "-W", "ignore::pytest.PytestUnraisableExceptionWarning",
    )
    result.assert_outcomes(failed=2, passed=1)
    for test, marker, error in (
        ("OrdersTest.test_leak_then_teardown_closes_the_pool", "LEAK-UNITTEST-TEARDOWN", "TimeoutError"),
        ("FailingTest.test_fails_and_leaks", "LEAK-UNITTEST-FAILS", "AssertionError: 1 != 2"),
    ):
        result.stdout.fnmatch_lines([
            f"*_ {test} _*",
            f"*{error}*",
            "*- Captured safepool leaks call -*",
            "safepool: 1 connection leaked",
            "[[]1] pool 'pool-*', lease *",
            "  acquired at:",
            f'*File "*test_unit.py", line {line_of("leaky_unittest.py", marker)}, in test_*',
        ])
    # The sample's leaked connections die with its objects (the run's
    # recorded items among them): collect them here, quietly, not in
    # whichever test of this worker collects next (their ResourceWarnings
    # failed tests/io/test_sweep.py in CI).
    del result
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        gc.collect()


def test_strict_mode_names_a_lease_held_since_before_the_test(suite: pytest.Pytester) -> None:
    """A session fixture's idle connection starves the pool as a handler's
    would: strict mode reports the timeout, and says the lease is older than
    the test (the plain leak check ignores it)."""
    add_sample(suite, "strict_session_fixture.py", "test_session_holder")
    suite.runpytest("--safepool-leaks", "-p", "no:cacheprovider").assert_outcomes(passed=1)
    strict = suite.runpytest("--safepool-strict", "-p", "no:cacheprovider")
    strict.assert_outcomes(failed=1)
    strict.stdout.fnmatch_lines([
        "safepool: 1 acquire timeout caused by idle leases",
        "*lease *, held *s by task *, since before this test started, *; acquired at:",
        f'*File "*test_session_holder.py", line {line_of("strict_session_fixture.py", "SESSION-HOLDER")}, '
        "in reference_data",
    ])


def test_a_live_anyio_task_group_task_is_not_taken_for_the_anyio_test_runner(pg_dsn: str) -> None:
    """The "returned" verdict is for anyio's pytest runner task only. A task
    group's task also starts in anyio's own wrapper, and when what it runs
    has no frame to walk (here an async generator's asend(), driven by
    start_soon), that wrapper is all its await chain shows: it was reported
    as "returned ... in anyio's test runner", with no test runner in sight,
    while the task was alive and holding the lease."""
    anyio = pytest.importorskip("anyio")
    from safepool.testing.tracker import holder_activity

    verdicts: list[tuple[str, str]] = []

    async def main() -> None:
        async with safepool.create_pool(pg_dsn, min_size=0, max_size=1, capture_stack=True) as pool:
            holding, done = anyio.Event(), anyio.Event()

            async def consumer() -> AsyncIterator[int]:
                async with pool.acquire() as con:
                    assert await con.fetchval("SELECT 1") == 1
                    holding.set()
                    await done.wait()
                    yield 1

            stream = consumer()
            async with anyio.create_task_group() as group:
                group.start_soon(stream.asend, None)
                await holding.wait()
                [info] = pool.leases()
                assert info.task is not None and not info.task.done()
                verdicts.append(holder_activity(info))
                done.set()
            await stream.aclose()
            assert pool.leases() == [] and pool.stats().released == 1

    anyio.run(main)
    assert verdicts == [("idle", "not in the database")]
