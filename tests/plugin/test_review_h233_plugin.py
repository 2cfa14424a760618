"""Review h233: safepool's leak guards tried as a CI user would, each
scenario a pytester session on the embedded PostgreSQL, with a password in
the DSN that must never be printed."""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest

from tests._util import NESTED_PYTEST_ADDOPTS

pytest_plugins = ["pytester"]
pytestmark = pytest.mark.safepool_allow_leaks

SECRET = "Xy7secretPW42zz"
INI = """
[pytest]
asyncio_mode = strict
asyncio_default_fixture_loop_scope = function
"""


def with_password(dsn: str) -> str:
    parts = urlsplit(dsn)
    host = parts.netloc.rpartition("@")[2]
    user = parts.username or "postgres"
    return urlunsplit(parts._replace(netloc=f"{user}:{SECRET}@{host}"))


@pytest.fixture
def suite(pytester: pytest.Pytester, pg_dsn: str, monkeypatch: pytest.MonkeyPatch) -> pytest.Pytester:
    monkeypatch.setenv("H233_DSN", with_password(pg_dsn))
    monkeypatch.setenv("COLUMNS", "80")
    monkeypatch.setenv("PYTEST_ADDOPTS", NESTED_PYTEST_ADDOPTS)
    pytester.makeini(INI)
    return pytester


def run(suite: pytest.Pytester, *args: str) -> pytest.RunResult:
    result = suite.runpytest_subprocess("-p", "no:cacheprovider", *args)
    text = result.stdout.str() + result.stderr.str()
    if os.environ.get("H233_DUMP"):
        print(text)
    assert SECRET not in text
    return result


FUNCTION_LEAK = """
import os
import pytest, pytest_asyncio, safepool

DSN = os.environ["H233_DSN"]

@pytest_asyncio.fixture
async def pool():
    async with safepool.create_pool(DSN, min_size=1, max_size=2) as pool:
        yield pool

@pytest.mark.asyncio
async def test_leaks(pool):
    con = await pool.acquire()  # LEAK-HERE
    assert await con.fetchval("SELECT 1") == 1

@pytest.mark.asyncio
async def test_clean(pool):
    async with pool.acquire() as con:
        assert await con.fetchval("SELECT 1") == 1
"""


def test_function_leak_on(suite: pytest.Pytester) -> None:
    suite.makepyfile(test_fn=FUNCTION_LEAK)
    result = run(suite, "--safepool-leaks")
    result.assert_outcomes(failed=1, passed=1)
    assert result.ret == 1
    result.stdout.fnmatch_lines(["*_ test_leaks _*", "safepool: 1 connection leaked", "*# LEAK-HERE"])


def test_function_leak_off(suite: pytest.Pytester) -> None:
    suite.makepyfile(test_fn=FUNCTION_LEAK)
    result = run(suite)
    result.assert_outcomes(passed=2)
    assert result.ret == 0


SESSION_POOL = """
import os
import pytest, pytest_asyncio, safepool

DSN = os.environ["H233_DSN"]
KEPT = []

@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def pool():
    pool = await safepool.create_pool(DSN, min_size=1, max_size=3)
    yield pool
    import asyncio
    await asyncio.wait_for(pool.close(), 10)

@pytest.mark.asyncio(loop_scope="session")
async def test_first(pool):
    async with pool.acquire() as con:
        assert await con.fetchval("SELECT 1") == 1

@pytest.mark.asyncio(loop_scope="session")
async def test_keeps(pool):
    con = await pool.acquire()  # LEAK-KEPT
    KEPT.append(con)

@pytest.mark.asyncio(loop_scope="session")
async def test_drops(pool):
    con = await pool.acquire()  # LEAK-DROPPED
    await con.fetchval("SELECT 1")

@pytest.mark.asyncio(loop_scope="session")
async def test_last(pool):
    async with pool.acquire() as con:
        assert await con.fetchval("SELECT 2") == 2
"""


def test_session_pool_blames_the_right_tests(suite: pytest.Pytester) -> None:
    suite.makepyfile(test_session=SESSION_POOL)
    result = run(suite, "--safepool-leaks")
    result.assert_outcomes(failed=2, passed=2)
    result.stdout.fnmatch_lines(["*_ test_keeps _*", "safepool: 1 connection leaked", "*# LEAK-KEPT"])
    result.stdout.fnmatch_lines(["*_ test_drops _*", "safepool: 1 connection leaked", "*# LEAK-DROPPED"])


ANYIO = """
import os
import pytest, safepool

DSN = os.environ["H233_DSN"]

@pytest.fixture
def anyio_backend():
    return "asyncio"

@pytest.fixture
async def pool(anyio_backend):
    async with safepool.create_pool(DSN, min_size=1, max_size=2) as pool:
        yield pool

@pytest.mark.anyio
async def test_anyio_leak(pool):
    con = await pool.acquire()  # LEAK-ANYIO
    await con.fetchval("SELECT 1")
    keep = con

@pytest.mark.anyio
async def test_anyio_clean(pool):
    async with pool.acquire() as con:
        await con.fetchval("SELECT 1")
"""


def test_anyio_leak(suite: pytest.Pytester) -> None:
    suite.makepyfile(test_anyio=ANYIO)
    result = run(suite, "--safepool-leaks")
    result.assert_outcomes(failed=1, passed=1)
    result.stdout.fnmatch_lines(["*_ test_anyio_leak*_*", "safepool: 1 connection leaked", "*# LEAK-ANYIO"])


FIXTURE_TEARDOWN = """
import os
import pytest, pytest_asyncio, safepool

DSN = os.environ["H233_DSN"]

@pytest_asyncio.fixture
async def pool():
    async with safepool.create_pool(DSN, min_size=1, max_size=2) as pool:
        yield pool

@pytest_asyncio.fixture
async def audit(pool):
    yield
    con = await pool.acquire()  # LEAK-TEARDOWN
    await con.execute("SELECT 1")

@pytest.mark.asyncio
async def test_uses_audit(pool, audit):
    async with pool.acquire() as con:
        await con.fetchval("SELECT 1")
"""


def test_fixture_teardown_leak(suite: pytest.Pytester) -> None:
    suite.makepyfile(test_fixture_teardown=FIXTURE_TEARDOWN)
    result = run(suite, "--safepool-leaks")
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(["*safepool: 1 connection leaked*", "*# LEAK-TEARDOWN"])


FAIL_AND_LEAK = """
import os
import pytest, pytest_asyncio, safepool

DSN = os.environ["H233_DSN"]
KEPT = []

@pytest_asyncio.fixture
async def pool():
    async with safepool.create_pool(DSN, min_size=1, max_size=2) as pool:
        yield pool

@pytest.mark.asyncio
async def test_fails_and_leaks(pool):
    con = await pool.acquire()  # LEAK-FAILING
    KEPT.append(con)
    assert await con.fetchval("SELECT 1") == 2
"""


def test_fail_and_leak(suite: pytest.Pytester) -> None:
    suite.makepyfile(test_fail_leak=FAIL_AND_LEAK)
    result = run(suite, "--safepool-leaks")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*assert 1 == 2*", "*Captured safepool leaks call*", "*# LEAK-FAILING"])


def test_ini_option(suite: pytest.Pytester) -> None:
    suite.makepyfile(test_fn=FUNCTION_LEAK)
    suite.makepyprojecttoml(
        '[tool.pytest.ini_options]\nasyncio_mode = "strict"\nasyncio_default_fixture_loop_scope = "function"\n'
        "safepool_leaks = true      # safepool_strict = true for strict mode\n"
    )
    os.remove(suite.path / "tox.ini")
    result = run(suite)
    result.assert_outcomes(failed=1, passed=1)


DOC_EXAMPLES = """
import os
import pytest, pytest_asyncio, safepool
from safepool.testing import assert_no_leaks, LeakError

DSN = os.environ["H233_DSN"]

@pytest.fixture
def dsn():
    return DSN

@pytest_asyncio.fixture
async def pool():
    async with safepool.create_pool(DSN, min_size=1, max_size=2) as pool:
        yield pool

async def checkout(pool, cart):
    con = await pool.acquire()  # LEAK-CHECKOUT
    return await con.fetchval("SELECT 1")

async def handler(pool):
    con = await pool.acquire()  # LEAK-HANDLER
    return await con.fetchval("SELECT 1")

cart = None

@pytest.mark.asyncio
async def test_checkout(safepool_leak_check, pool):   # this test only
    await checkout(pool, cart)
    safepool_leak_check.check()                       # optional: check mid-test

@pytest.mark.asyncio
async def test_handler(pool):
    async with assert_no_leaks(pool):     # or `with`; no argument: every pool
        await handler(pool)

@pytest.mark.asyncio
@pytest.mark.safepool_allow_leaks  # never releasing is the bug under test (--safepool-leaks would report it)
async def test_a_stuck_handler_loses_its_connection_at_the_lease_timeout(dsn: str) -> None:
    clock = safepool.ManualClock()  # time moves only when the test says so
    async with safepool.create_pool(dsn, min_size=1, max_size=1, lease_timeout=30.0, clock=clock) as pool:
        con = await pool.acquire()  # safepool: ignore (the leak under test: never released)
        clock.advance(29.0)  # seconds, at once: no real sleep
        assert await con.fetchval("SELECT 1") == 1  # still its lease at 29 s
        clock.advance(1.0)  # 30 s: the pool takes the connection back
        with pytest.raises(safepool.LeaseExpiredError):
            await con.fetchval("SELECT 1")
        async with pool.acquire(timeout=5.0) as other:  # the next request is served
            assert await other.fetchval("SELECT 2") == 2
"""


def test_doc_examples(suite: pytest.Pytester) -> None:
    suite.makepyfile(test_docs=DOC_EXAMPLES)
    result = run(suite)
    result.assert_outcomes(failed=2, passed=1)
    result.stdout.fnmatch_lines(["*_ test_checkout _*", "*# LEAK-CHECKOUT"])
    result.stdout.fnmatch_lines(["*_ test_handler _*", "*# LEAK-HANDLER"])


TEARDOWN_KEPT = """
import os
import pytest, pytest_asyncio, safepool
import asyncio

DSN = os.environ["H233_DSN"]
KEPT = []

@pytest_asyncio.fixture
async def pool():
    pool = await safepool.create_pool(DSN, min_size=1, max_size=2)
    yield pool
    await asyncio.wait_for(pool.close(), 3)

@pytest_asyncio.fixture
async def audit(pool):
    yield
    KEPT.append(await pool.acquire())  # LEAK-TEARDOWN-KEPT

@pytest.mark.asyncio
async def test_uses_audit(pool, audit):
    async with pool.acquire() as con:
        await con.fetchval("SELECT 1")

@pytest.mark.asyncio
async def test_after(pool):
    async with pool.acquire() as con:
        await con.fetchval("SELECT 1")
"""


def test_fixture_teardown_kept(suite: pytest.Pytester) -> None:
    suite.makepyfile(test_teardown_kept=TEARDOWN_KEPT)
    result = run(suite, "--safepool-leaks")
    text = result.stdout.str()
    assert "TimeoutError" not in text
    assert "the pool ended it" not in text
    result.assert_outcomes(passed=2, errors=1)
    result.stdout.fnmatch_lines(["*ERROR at teardown of test_uses_audit*", "*safepool: 1 connection leaked*",
                                 "*# LEAK-TEARDOWN-KEPT"])


OFF_WITH_STACKS = """
import os, gc
import pytest, pytest_asyncio, safepool

DSN = os.environ["H233_DSN"]

@pytest_asyncio.fixture
async def pool():
    async with safepool.create_pool(DSN, min_size=1, max_size=2, capture_stack=True) as pool:
        yield pool

async def handler_without_release(pool):
    con = await pool.acquire()  # LEAK-OFF
    return await con.fetchval("SELECT 1")

@pytest.mark.asyncio
async def test_no_release(pool):
    assert await handler_without_release(pool) == 1
"""


def test_off_summary_with_stacks(suite: pytest.Pytester) -> None:
    suite.makepyfile(test_off=OFF_WITH_STACKS)
    result = run(suite)
    result.assert_outcomes(passed=1)
    assert result.ret == 0
    result.stdout.fnmatch_lines([
        "*- safepool -*",
        "safepool: 1 connection leaked during this run*",
        "acquired at (1 of 1 known): *test_off.py:12 in handler_without_release (1)",
        "Run pytest with --safepool-leaks*",
    ])


SKIP_XFAIL = """
import os
import pytest, pytest_asyncio, safepool

DSN = os.environ["H233_DSN"]
KEPT = []

@pytest_asyncio.fixture
async def pool():
    async with safepool.create_pool(DSN, min_size=1, max_size=3) as pool:
        yield pool

@pytest.mark.asyncio
async def test_skips(pool):
    KEPT.append(await pool.acquire())  # LEAK-SKIP
    pytest.skip("later")

@pytest.mark.asyncio
@pytest.mark.xfail(reason="known")
async def test_xpasses(pool):
    KEPT.append(await pool.acquire())  # LEAK-XPASS
"""


def test_skip_and_xfail(suite: pytest.Pytester) -> None:
    suite.makepyfile(test_skip=SKIP_XFAIL)
    result = run(suite, "--safepool-leaks", "-rA")
    result.assert_outcomes(skipped=1, errors=1, failed=1)
    result.stdout.fnmatch_lines(["*The test function leaked, then was skipped*"])
    result.stdout.fnmatch_lines(["*The test is marked xfail and passed*"])


STRICT = """
import asyncio, os
import pytest, pytest_asyncio, safepool

DSN = os.environ["H233_DSN"]

@pytest_asyncio.fixture
async def pool():
    pool = await safepool.create_pool(DSN, min_size=1, max_size=1)
    yield pool
    await asyncio.wait_for(pool.close(), 10)

async def slow_handler(pool, started):
    async with pool.acquire() as con:  # IDLE-HOLDER
        started.set()
        await asyncio.sleep(0.3)

@pytest.mark.asyncio
async def test_reports(pool):
    started = asyncio.Event()
    task = asyncio.ensure_future(slow_handler(pool, started))
    await started.wait()
    with pytest.raises(safepool.PoolTimeoutError):
        await pool.acquire(timeout=0.1)
    await task
"""


def test_strict(suite: pytest.Pytester) -> None:
    suite.makepyfile(test_strict=STRICT)
    result = run(suite, "--safepool-strict")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["safepool: 1 acquire timeout caused by idle leases", "*# IDLE-HOLDER",
                                 "Fix: hold a connection only while you use it*"])


CONNECT_FAILS = """
import os
import pytest, safepool

DSN = os.environ["H233_BAD_DSN"]

@pytest.mark.asyncio
async def test_connect_fails():
    pool = await safepool.create_pool(DSN, min_size=1, max_size=1)
    await pool.close()
"""


def test_connect_failure_hides_password(suite: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("H233_BAD_DSN", f"postgresql://postgres:{SECRET}@127.0.0.1:1/postgres")
    suite.makepyfile(test_bad=CONNECT_FAILS)
    result = run(suite, "--safepool-leaks")
    result.assert_outcomes(failed=1)


ANYIO_KEPT = """
import os
import pytest, safepool

DSN = os.environ["H233_DSN"]
KEPT = []

@pytest.fixture
def anyio_backend():
    return "asyncio"

@pytest.fixture
async def pool(anyio_backend):
    async with safepool.create_pool(DSN, min_size=1, max_size=2) as pool:
        yield pool

@pytest.mark.anyio
async def test_anyio_keeps(pool):
    KEPT.append(await pool.acquire())  # LEAK-ANYIO-KEPT

async def rows(pool):
    async with pool.acquire() as con:
        yield await con.fetchval("SELECT 1")
        yield await con.fetchval("SELECT 2")

@pytest.mark.anyio
async def test_anyio_abandoned_generator(pool):
    agen = rows(pool)
    assert await agen.__anext__() == 1
"""


def test_anyio_kept(suite: pytest.Pytester) -> None:
    suite.makepyfile(test_anyio_kept=ANYIO_KEPT)
    result = run(suite, "--safepool-leaks")
    result.assert_outcomes(failed=1, passed=1)
    result.stdout.fnmatch_lines([
        "*_ test_anyio_keeps*_*",
        "*still held*the code that acquired it returned without releasing it*",
        "*# LEAK-ANYIO-KEPT",
        "Fix: acquire with `async with pool.acquire() as con:`*",
    ])


SESSION_FIXTURE_LEAK = """
import asyncio, gc, os
import pytest, pytest_asyncio, safepool

DSN = os.environ["H233_DSN"]

@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def pool():
    pool = await safepool.create_pool(DSN, min_size=1, max_size=3)
    yield pool
    await asyncio.wait_for(pool.close(), 10)

@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def warm(pool):
    con = await pool.acquire()  # LEAK-SESSION-FIXTURE
    await con.fetchval("SELECT 1")
    yield

@pytest.mark.asyncio(loop_scope="session")
async def test_one(pool, warm):
    async with pool.acquire() as con:
        await con.fetchval("SELECT 1")
    gc.collect()
    await asyncio.sleep(0)

@pytest.mark.asyncio(loop_scope="session")
async def test_two(pool):
    async with pool.acquire() as con:
        await con.fetchval("SELECT 1")
"""


def test_session_fixture_leak(suite: pytest.Pytester) -> None:
    suite.makepyfile(test_session_fixture=SESSION_FIXTURE_LEAK)
    result = run(suite, "--safepool-leaks")
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines([
        "*- safepool -*",
        "*leaked outside the tests' leak checks*",
        "*test_session_fixture.py:* in warm*",
    ])


REPR_IN_FAILURE = """
import os
import pytest, pytest_asyncio, safepool
from safepool.testing import assert_no_leaks

DSN = os.environ["H233_DSN"]

@pytest_asyncio.fixture
async def pool():
    async with safepool.create_pool(DSN, min_size=1, max_size=2) as pool:
        yield pool

@pytest.mark.asyncio
async def test_fails_with_pool_in_args(pool):
    async with pool.acquire() as con:
        assert (pool, con, repr(pool), str(pool)) is None

@pytest.mark.asyncio
async def test_assert_no_leaks_note(pool):
    async with assert_no_leaks(pool):
        con = await pool.acquire()  # LEAK-NOTE
        raise ValueError("boom")
"""


def test_failure_reprs_hide_password(suite: pytest.Pytester) -> None:
    suite.makepyfile(test_repr=REPR_IN_FAILURE)
    result = run(suite, "--tb=long", "-vv")
    result.assert_outcomes(failed=2)
    result.stdout.fnmatch_lines(["*ValueError: boom*"])


SETUP_KEPT = """
import os
import pytest, pytest_asyncio, safepool

DSN = os.environ["H233_DSN"]
KEPT = []

@pytest_asyncio.fixture
async def pool():
    async with safepool.create_pool(DSN, min_size=1, max_size=2) as pool:
        yield pool

@pytest_asyncio.fixture
async def seeded(pool):
    con = await pool.acquire()  # LEAK-SETUP
    KEPT.append(con)
    yield con

@pytest.mark.asyncio
async def test_seeded(seeded):
    assert await seeded.fetchval("SELECT 1") == 1

def test_finalizer_leak(request, pool):
    pass
"""


def test_fixture_setup_leak_names_the_fixture(suite: pytest.Pytester) -> None:
    suite.makepyfile(test_setup_kept=SETUP_KEPT)
    result = run(suite, "--safepool-leaks", "-k", "test_seeded")
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(["*ERROR at teardown of test_seeded*", "*fixture 'seeded'*test_setup_kept.py:12*",
                                 "*# LEAK-SETUP"])


def test_plugin_off_altogether(suite: pytest.Pytester) -> None:
    suite.makepyfile(test_fn=FUNCTION_LEAK)
    result = run(suite, "-p", "no:safepool", "--safepool-leaks")
    assert result.ret == 4  # the option is gone with the plugin: a usage error
    result = run(suite, "-p", "no:safepool")
    result.assert_outcomes(passed=2)
    assert "- safepool -" not in result.stdout.str()


def test_ini_strict(suite: pytest.Pytester) -> None:
    suite.makepyfile(test_strict=STRICT)
    suite.makeini(INI + "safepool_strict = true\n")
    result = run(suite)
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["safepool: 1 acquire timeout caused by idle leases"])


FASTAPI_APP = '''
from collections.abc import AsyncIterator
import asyncio
import asyncpg
from fastapi import BackgroundTasks, Depends, FastAPI, Request
import safepool

app = FastAPI()

async def get_con(request: Request) -> AsyncIterator[asyncpg.Connection]:
    con = await request.app.state.pool.acquire()
    try:
        yield con
    finally:
        await request.app.state.pool.release(con)

async def get_con_no_finally(request: Request) -> AsyncIterator[asyncpg.Connection]:
    con = await request.app.state.pool.acquire()  # SP001
    yield con
    await request.app.state.pool.release(con)

async def get_con_ctx(request: Request) -> AsyncIterator[asyncpg.Connection]:
    async with request.app.state.pool.acquire() as con:
        yield con

async def audit(pool: safepool.Pool, user: str) -> None:
    con = await pool.acquire()  # SP002
    await con.execute("INSERT INTO audit VALUES ($1)", user)

async def refresh(pool: safepool.Pool, key: str) -> None:
    con = await pool.acquire()  # SP001
    if not key:
        return
    await con.execute("REFRESH MATERIALIZED VIEW x")
    await pool.release(con)

@app.middleware("http")
async def db_session(request: Request, call_next):
    request.state.con = await request.app.state.pool.acquire()  # SP001
    response = await call_next(request)
    await request.app.state.pool.release(request.state.con)
    return response

@app.middleware("http")
async def db_session_ok(request: Request, call_next):
    request.state.con = await request.app.state.pool.acquire()
    try:
        return await call_next(request)
    finally:
        await request.app.state.pool.release(request.state.con)

@app.post("/users/{user}")
async def create_user(user: str, tasks: BackgroundTasks, request: Request, con=Depends(get_con)):
    await con.execute("INSERT INTO users VALUES ($1)", user)
    tasks.add_task(audit, request.app.state.pool, user)
    return {"ok": True}

@app.get("/warm")
async def warm(request: Request):
    await request.app.state.pool.acquire()  # SP003
    return {}

@app.get("/fire")
async def fire(request: Request):
    async def work():
        async with request.app.state.pool.acquire() as con:
            await con.execute("SELECT pg_sleep(1)")
    asyncio.ensure_future(work())
    return {}

async def get_con_guarded(request: Request):
    con = None
    try:
        con = await request.app.state.pool.acquire()
        yield con
    finally:
        if con is not None:
            await request.app.state.pool.release(con)
'''


def test_static_check_on_a_fastapi_module(tmp_path: Path) -> None:
    import json
    import subprocess
    import sys

    path = tmp_path / "main.py"
    path.write_text(FASTAPI_APP.lstrip())
    proc = subprocess.run(
        [sys.executable, "-m", "safepool", "check", str(path), "--format", "json"],
        capture_output=True, text=True, check=False,
    )
    assert proc.returncode == 1, proc.stderr
    found = {(f["line"], f["code"]) for f in json.loads(proc.stdout)["findings"]}
    lines = FASTAPI_APP.lstrip().splitlines()
    expected = {(n, line.rsplit("# ", 1)[1]) for n, line in enumerate(lines, 1) if line.rstrip().endswith(
        ("# SP001", "# SP002", "# SP003", "# SP004"))}
    assert found == expected


ASYNCIO_GENERATOR = """
import os
import pytest, pytest_asyncio, safepool

DSN = os.environ["H233_DSN"]

@pytest_asyncio.fixture
async def pool():
    async with safepool.create_pool(DSN, min_size=1, max_size=2) as pool:
        yield pool

async def rows(pool):
    async with pool.acquire() as con:  # LEAK-AGEN
        yield await con.fetchval("SELECT 1")
        yield await con.fetchval("SELECT 2")

@pytest.mark.asyncio
async def test_abandoned_generator(pool):
    agen = rows(pool)
    assert await agen.__anext__() == 1
"""


def test_abandoned_generator_under_pytest_asyncio(suite: pytest.Pytester) -> None:
    suite.makepyfile(test_agen=ASYNCIO_GENERATOR)
    result = run(suite, "--safepool-leaks")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*# LEAK-AGEN"])


STRICT_SESSION_HOLDER = """
import asyncio, os
import pytest, pytest_asyncio, safepool

DSN = os.environ["H233_DSN"]

@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def pool():
    pool = await safepool.create_pool(DSN, min_size=1, max_size=1)
    yield pool
    await asyncio.wait_for(pool.close(), 10)

@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def held(pool):
    con = await pool.acquire()  # SESSION-HOLDER
    yield con
    await pool.release(con)

@pytest.mark.asyncio(loop_scope="session")
async def test_starved(pool, held):
    with pytest.raises(safepool.PoolTimeoutError):
        await pool.acquire(timeout=0.1)
"""


def test_strict_counts_a_session_fixtures_idle_connection(suite: pytest.Pytester) -> None:
    suite.makepyfile(test_strict_session=STRICT_SESSION_HOLDER)
    result = run(suite, "--safepool-strict")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["safepool: 1 acquire timeout caused by idle leases", "*since before this test started*"])


def run_check(tmp_path: Path, source: str) -> set[tuple[int, str]]:
    import json
    import subprocess
    import sys
    path = tmp_path / "conftest_like.py"
    path.write_text(source.lstrip())
    proc = subprocess.run(
        [sys.executable, "-m", "safepool", "check", str(path), "--format", "json"],
        capture_output=True, text=True, check=False,
    )
    assert proc.returncode in (0, 1), proc.stderr
    return {(f["line"], f["code"]) for f in json.loads(proc.stdout)["findings"]}


# The same connection set-up step, outside a fixture: SP001 (the first step
# that can raise between the acquire and its `try:`), as docs/testing.md says.
SETUP_STEP_PLAIN = '''
async def session(pool):
    con = await pool.acquire()
    await con.execute("SET search_path TO test")
    try:
        yield con
    finally:
        await pool.release(con)
'''

# In a pytest fixture: pytest runs the code after the `yield` only if the
# setup reached it. A statement before the `yield` that raises (a broken
# connection, a bad SET) leaves the connection acquired and never released;
# a statement after the `yield` that raises skips the release as well.
SETUP_STEP_FIXTURE = '''
import pytest_asyncio

@pytest_asyncio.fixture
async def con(pool):
    con = await pool.acquire()
    await con.execute("SET search_path TO test")
    yield con
    await pool.release(con)

@pytest_asyncio.fixture
async def con2(pool):
    con = await pool.acquire()
    yield con
    await con.execute("RESET ALL")
    await pool.release(con)
'''


def test_static_check_setup_step_outside_a_fixture(tmp_path: Path) -> None:
    assert run_check(tmp_path, SETUP_STEP_PLAIN) == {(2, "SP001")}


def test_static_check_fixture_with_a_step_before_yield_or_release(tmp_path: Path) -> None:
    assert run_check(tmp_path, SETUP_STEP_FIXTURE) == {(5, "SP001"), (12, "SP001")}
