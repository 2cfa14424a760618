"""Helper h276: siblings of the three bugs review h274 found in the pytest
plugin (tests/plugin/test_review_h274_plugin.py), each a small user suite
run with pytester on the real PostgreSQL:

- the fixture that created a pool answers for its own connections in its
  own teardown (other fixtures' are still checked before that teardown);
- a connection is blamed on the test that started the task holding it (a
  task, or a callback, it left running), not on the test running when it
  is found; a task a fixture started is the fixture's business until the
  fixtures are torn down;
- a leak is reported by one guard only (an ``assert_no_leaks`` block and
  the plugin's check, or the check-off count)."""

from __future__ import annotations

import pytest

from tests._util import NESTED_PYTEST_ADDOPTS, PYTESTER_INI

pytest_plugins = ["pytester"]
# The inner runs leak on purpose.
pytestmark = pytest.mark.safepool_allow_leaks


@pytest.fixture
def suite(pytester: pytest.Pytester, pg_dsn: str, monkeypatch: pytest.MonkeyPatch) -> pytest.Pytester:
    monkeypatch.setenv("H276_DSN", pg_dsn)
    monkeypatch.setenv("COLUMNS", "200")
    monkeypatch.setenv("PYTEST_ADDOPTS", NESTED_PYTEST_ADDOPTS)
    pytester.makeini(PYTESTER_INI)
    return pytester


def run(suite: pytest.Pytester, *args: str) -> pytest.RunResult:
    return suite.runpytest_subprocess("-p", "no:cacheprovider", "--timeout=60", *args)


# ------------------------------------------- the fixture that created its pool

# It hands out (pool, con); another fixture takes a connection of that pool
# and never releases it: that one is still reported (and released) before
# the creating fixture's close(), which would wait for it for ever.
CREATOR_AND_ANOTHER = """
import os, pytest, pytest_asyncio, safepool

@pytest_asyncio.fixture
async def db():
    async with safepool.create_pool(os.environ["H276_DSN"], min_size=1, max_size=3) as pool:
        async with pool.acquire() as con:
            yield pool, con

@pytest_asyncio.fixture
async def other(db):
    pool, _ = db
    return await pool.acquire()  # OTHER-LEAK

@pytest.mark.asyncio
async def test_uses_both(db, other):
    _, con = db
    assert await con.fetchval("SELECT 1") == await other.fetchval("SELECT 1")
"""


def test_another_fixtures_lease_of_the_creators_pool_is_still_checked_before_its_teardown(
    suite: pytest.Pytester,
) -> None:
    suite.makepyfile(test_creator=CREATOR_AND_ANOTHER)
    result = run(suite, "--safepool-leaks")
    result.assert_outcomes(passed=1, errors=1)
    out = result.stdout.str()
    assert "safepool: 1 connection leaked" in out
    assert "OTHER-LEAK" in out
    assert "acquired by fixture 'other'" in out
    assert "acquired by fixture 'db'" not in out


# The creating fixture keeps its connection (its teardown neither releases
# it nor closes the pool): reported once its teardown ran, as a fixture
# whose teardown did not release it, not as "torn down before" itself.
CREATOR_KEEPS = """
import os, pytest, pytest_asyncio, safepool
POOLS = []

@pytest_asyncio.fixture
async def con():
    pool = await safepool.create_pool(os.environ["H276_DSN"], min_size=1, max_size=2)
    POOLS.append(pool)
    yield await pool.acquire()  # CREATOR-KEEPS

@pytest.mark.asyncio
async def test_uses_con(con):
    assert await con.fetchval("SELECT 1") == 1
"""


def test_a_connection_the_creating_fixture_keeps_is_its_leak_after_its_teardown(suite: pytest.Pytester) -> None:
    suite.makepyfile(test_keeps=CREATOR_KEEPS)
    result = run(suite, "--safepool-leaks")
    result.assert_outcomes(passed=1, errors=1)
    out = result.stdout.str()
    assert "ERROR at teardown of test_uses_con" in out
    assert "acquired by fixture 'con', whose teardown did not release it" in out
    assert "which created its pool" not in out
    assert "CREATOR-KEEPS" in out


# The test function leaks a connection of the creating fixture's pool: it
# fails with it, and the fixture's close() does not wait for it.
CREATOR_TEST_LEAKS = """
import os, pytest, pytest_asyncio, safepool
POOL = []

@pytest_asyncio.fixture
async def con():
    async with safepool.create_pool(os.environ["H276_DSN"], min_size=1, max_size=3) as pool:
        POOL.append(pool)
        async with pool.acquire() as con:
            yield con

@pytest.mark.asyncio
async def test_leaks(con):
    await POOL[0].acquire()  # TEST-LEAK
"""


def test_the_test_functions_leak_of_the_creators_pool_fails_it_and_does_not_hang(suite: pytest.Pytester) -> None:
    suite.makepyfile(test_fn_leak=CREATOR_TEST_LEAKS)
    result = run(suite, "--safepool-leaks")
    result.assert_outcomes(failed=1)
    out = result.stdout.str()
    assert "TEST-LEAK" in out
    assert "acquired by fixture 'con'" not in out


# ------------------------------------- a task, or a callback, that outlives its test

LATE_HEADER = """
import asyncio, os, pytest, pytest_asyncio, safepool
KEEP = []

@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def pool():
    pool = await safepool.create_pool(os.environ["H276_DSN"], min_size=1, max_size=3)
    yield pool
    await asyncio.wait_for(pool.close(), 5)

async def late_worker(pool):
    await asyncio.sleep(0.05)
    KEEP.append(await pool.acquire())  # LATE-ACQUIRE
"""

# Runs after test_a (pytest keeps the file's order).
TEST_B = """
@pytest.mark.asyncio(loop_scope="session")
async def test_b_innocent(pool):
    await asyncio.sleep(0.3)
    async with pool.acquire() as con:
        assert await con.fetchval("SELECT 1") == 1
"""

LATE_TASK = LATE_HEADER + """
@pytest.mark.asyncio(loop_scope="session")
async def test_a_fires_and_forgets(pool):
    asyncio.ensure_future(late_worker(pool))  # STARTED-HERE
"""

LATE_CALLBACK = LATE_HEADER + """
@pytest.mark.asyncio(loop_scope="session")
async def test_a_fires_and_forgets(pool):
    loop = asyncio.get_running_loop()
    loop.call_later(0.05, lambda: KEEP.append(asyncio.ensure_future(late_worker(pool))))
"""

LATE_CHILD = LATE_HEADER + """
async def parent(pool):
    await asyncio.sleep(0.05)
    KEEP.append(asyncio.ensure_future(late_worker(pool)))  # the child starts during test_b

@pytest.mark.asyncio(loop_scope="session")
async def test_a_fires_and_forgets(pool):
    KEEP.append(asyncio.ensure_future(parent(pool)))
"""


# The session's loop has a task factory of the suite's own: the plugin's
# wraps it (the suite's still makes every task).
LATE_TASK_OWN_FACTORY = LATE_TASK.replace(
    "async def pool():\n    pool = await",
    "async def pool():\n"
    "    made = []\n"
    "    def factory(loop, coro, **kwargs):\n"
    "        made.append(1)\n"
    "        return asyncio.Task(coro, loop=loop, **kwargs)\n"
    "    asyncio.get_running_loop().set_task_factory(factory)\n"
    "    pool = await",
).replace("    await asyncio.wait_for(pool.close(), 5)", "    await asyncio.wait_for(pool.close(), 5)\n    assert made")


@pytest.mark.parametrize("source", [
    pytest.param(LATE_TASK, id="a-task-dropped"),
    pytest.param(LATE_TASK_OWN_FACTORY, id="a-task-dropped-on-a-loop-with-a-task-factory"),
    pytest.param(LATE_CALLBACK, id="a-call_later-callback-that-starts-a-task"),
    pytest.param(LATE_CHILD, id="a-task-that-starts-another"),
])
def test_a_connection_taken_by_work_an_earlier_test_left_running_is_that_tests_and_fails_the_run(
    suite: pytest.Pytester, source: str
) -> None:
    suite.makepyfile(test_late=source + TEST_B)
    result = run(suite, "--safepool-leaks")
    result.assert_outcomes(passed=2)
    assert result.ret == pytest.ExitCode.TESTS_FAILED  # the leak fails the run
    out = result.stdout.str()
    assert "leaks of tasks that outlived their test" in out
    assert "its task was started by test test_late.py::test_a_fires_and_forgets" in out
    assert "found during test_late.py::test_b_innocent, which is not blamed for it" in out
    assert "LATE-ACQUIRE" in out


def test_a_task_a_test_leaves_holding_a_connection_is_still_that_tests_leak(suite: pytest.Pytester) -> None:
    """The same task, acquiring while its own test still runs: that test fails."""
    suite.makepyfile(test_own=LATE_TASK.replace(
        "asyncio.ensure_future(late_worker(pool))  # STARTED-HERE",
        "KEEP.append(asyncio.ensure_future(late_worker(pool)))\n    await asyncio.sleep(0.2)",
    ) + TEST_B)
    result = run(suite, "--safepool-leaks")
    result.assert_outcomes(passed=1, failed=1)
    out = result.stdout.str()
    assert "FAILED test_own.py::test_a_fires_and_forgets" in out
    assert "LATE-ACQUIRE" in out
    assert "leaks of tasks that outlived their test" not in out


# A function-scoped fixture starts a worker task that holds a connection
# while the test runs; the fixture's teardown stops it. The connection is not
# the test function's leak (it was, checked when the test function returned,
# and released out from under the worker).
FIXTURE_WORKER = """
import asyncio, os, pytest, pytest_asyncio, safepool

@pytest_asyncio.fixture
async def pool():
    async with safepool.create_pool(os.environ["H276_DSN"], min_size=1, max_size=3) as pool:
        yield pool

async def work(pool, holding):
    await asyncio.sleep(0.05)  # acquires once the test function runs
    async with pool.acquire() as con:
        holding.set()
        await con.execute("SELECT 1")
        await asyncio.sleep(3600)

@pytest_asyncio.fixture
async def worker(pool):
    holding = asyncio.Event()
    task = asyncio.create_task(work(pool, holding))  # WORKER-STARTED
    yield holding
    {teardown}

@pytest.mark.asyncio
async def test_with_a_worker(worker):
    await worker.wait()
"""


def test_a_task_a_fixture_started_and_stops_is_no_leak(suite: pytest.Pytester) -> None:
    suite.makepyfile(test_worker=FIXTURE_WORKER.replace(
        "{teardown}", "task.cancel()\n    with pytest.raises(asyncio.CancelledError):\n        await task"
    ))
    result = run(suite, "--safepool-leaks")
    result.assert_outcomes(passed=1)
    assert "leaked" not in result.stdout.str()


def test_a_task_a_fixture_started_and_leaves_holding_is_reported_at_teardown(suite: pytest.Pytester) -> None:
    suite.makepyfile(test_worker=FIXTURE_WORKER.replace("{teardown}", "KEEP = task"))
    result = run(suite, "--safepool-leaks")
    result.assert_outcomes(passed=1, errors=1)
    out = result.stdout.str()
    assert "ERROR at teardown of test_with_a_worker" in out
    assert "its task was started by fixture 'worker', created at" in out
    assert "in worker" in out


# ------------------------------------------------------ one leak, one report

BLOCK_GC = """
import os, pytest, pytest_asyncio, safepool
from safepool.testing import assert_no_leaks

@pytest_asyncio.fixture
async def pool():
    async with safepool.create_pool(os.environ["H276_DSN"], min_size=1, max_size=3) as pool:
        yield pool

async def handler_drops(pool):
    con = await pool.acquire()  # DROPPED-HERE
    return await con.fetchval("SELECT 1")

@pytest.mark.asyncio
async def test_block_drops({fixtures}):
    async with assert_no_leaks(pool):
        await handler_drops(pool)
"""


def test_a_collected_leak_inside_assert_no_leaks_is_not_counted_again_with_the_check_off(
    suite: pytest.Pytester,
) -> None:
    suite.makepyfile(test_block_gc=BLOCK_GC.replace("{fixtures}", "pool"))
    result = run(suite)
    result.assert_outcomes(failed=1)
    out = result.stdout.str()
    assert "LeakError: safepool: 1 connection leaked" in out
    assert "leaked during this run" not in out  # the check-off count


def test_a_collected_leak_inside_assert_no_leaks_is_reported_once_under_the_fixture(suite: pytest.Pytester) -> None:
    suite.makepyfile(test_block_gc=BLOCK_GC.replace("{fixtures}", "safepool_leak_check, pool"))
    result = run(suite)
    result.assert_outcomes(failed=1)
    out = result.stdout.str()
    assert "LeakError: safepool: 1 connection leaked" in out
    assert "Captured safepool leaks call" not in out
    assert "ERROR at teardown" not in out
