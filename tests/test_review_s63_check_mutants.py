"""Mutation review of ``safepool/check.py`` (the static leak check): tests
that kill mutants the other check tests let live, one decision each, and the
false positives and misses the review found, fixed since."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from safepool.check import check_source, main


def found(source: str, **kwargs: str) -> list[tuple[int, str]]:
    return [(f.line, f.code) for f in check_source(textwrap.dedent(source), **kwargs)]


# -- which receivers are pools ------------------------------------------------


def test_the_default_pool_name_pattern_ignores_case() -> None:
    source = """
    async def f(self):
        con = await self.replicaPool.acquire()
        await con.execute("SELECT 1")
    """
    assert found(source) == [(3, "SP002")]


@pytest.mark.parametrize("factory", ["Lock", "RLock", "Semaphore", "BoundedSemaphore", "Condition", "CapacityLimiter"])
def test_a_name_bound_to_a_lock_or_semaphore_is_not_a_pool(factory: str) -> None:
    source = f"""
    import asyncio

    worker_pool = asyncio.{factory}()


    async def f():
        await worker_pool.acquire()
    """
    assert found(source) == []
    # The same statement on a pool is thrown away: SP003.
    assert found(source.replace(f"asyncio.{factory}()", "object()")) == [(8, "SP003")]


def test_a_pool_created_without_await_is_a_pool() -> None:
    source = """
    import asyncpg


    async def f(dsn):
        db = asyncpg.create_pool(dsn)
        await db
        con = await db.acquire()
        await con.execute("SELECT 1")
    """
    assert found(source) == [(8, "SP002")]


def test_a_pool_entered_with_async_with_create_pool_is_a_pool() -> None:
    source = """
    import asyncpg


    async def f(dsn):
        async with asyncpg.create_pool(dsn) as db:
            con = await db.acquire()
            await con.execute("SELECT 1")
    """
    assert found(source) == [(7, "SP002")]


def test_an_annotation_that_only_starts_with_pool_is_not_a_pool() -> None:
    source = """
    async def f(db: PoolManager, other: asyncpg.Pool):
        await db.acquire()
        await other.acquire()
    """
    assert found(source) == [(4, "SP003")]


def test_an_app_key_typed_as_a_pool_whatever_its_name() -> None:
    source = """
    import asyncpg
    from aiohttp import web

    DB = web.AppKey("db", asyncpg.Pool)
    WORKERS = web.AppKey("workers", ThreadPoolExecutor)


    async def f(request):
        con = await request.app[DB].acquire()
        await con.execute("SELECT 1")


    async def g(request):
        await request.app[WORKERS].acquire()
    """
    assert found(source) == [(10, "SP002")]


# -- the suppression comment --------------------------------------------------


def test_the_suppression_comment_without_spaces_and_not_a_longer_word() -> None:
    leak = "async def f(pool):\n    await pool.acquire(){}\n    return 1\n"
    assert check_source(leak.format("  #safepool:ignore")) == []
    assert [f.line for f in check_source(leak.format("  # safepool: ignored"))] == [2]
    assert [f.line for f in check_source(leak.format("  # safepool: ignores-nothing"))] == [2]


def test_the_suppression_comment_on_the_last_line_of_the_file() -> None:
    assert check_source("async def f(pool):\n    await pool.acquire()  # safepool: ignore") == []


def test_the_suppression_comment_on_the_first_or_the_acquire_line_of_a_statement() -> None:
    first = "async def f(pool):\n    con = (  # safepool: ignore\n        await pool.acquire()\n    )\n"
    acquire = "async def f(pool):\n    con = (\n        await pool.acquire()  # safepool: ignore\n    )\n"
    bare = "async def f(pool):\n    con = (\n        await pool.acquire()\n    )\n"
    assert [(f.line, f.code) for f in check_source(bare)] == [(3, "SP002")]
    assert check_source(first) == []
    assert check_source(acquire) == []


# -- findings: order, hints, redaction ----------------------------------------


def test_findings_on_one_line_come_in_column_order() -> None:
    source = "async def f(pool):\n    await (await pool.acquire()).fetch(1); await pool.acquire()\n"
    assert [(f.line, f.col, f.code) for f in check_source(source)] == [(2, 18, "SP003"), (2, 50, "SP003")]


def test_the_sp004_hint_of_a_context_variable_names_a_connection() -> None:
    [finding] = check_source("async def f(pool):\n    ctx = pool.acquire()\n    return ctx.timeout\n")
    assert finding.code == "SP004"
    assert finding.hint == (
        "`con = await pool.acquire()` (then release it in `finally:`), or `async with pool.acquire() as con:`")


def test_the_hint_for_a_connection_stored_on_an_object() -> None:
    source = """
    async def middleware(request, handler, pool):
        request.state.con = await pool.acquire()
        response = await handler(request)
        await pool.release(request.state.con)
        return response
    """
    [finding] = check_source(textwrap.dedent(source))
    assert (finding.line, finding.code) == (3, "SP001")
    assert finding.hint == (
        "release it in a `finally:` block right after the acquire (`try: ... finally: await "
        "pool.release(request.state.con)`), or acquire into a local name: `async with pool.acquire() as con:`")


def test_a_dsn_password_in_a_finding_message_is_masked() -> None:
    source = (
        "import safepool\n\n\nasync def f():\n"
        "    await (await safepool.create_pool('postgresql://app:s3cret@db/x')).acquire()\n"
    )
    [finding] = check_source(source)
    assert finding.code == "SP003"
    assert "s3cret" not in finding.message and "s3cret" not in finding.hint
    assert "postgresql://app:***@db/x" in finding.message


# -- releases the check accepts -----------------------------------------------


@pytest.mark.parametrize("registration", [
    "stack.callback(con.terminate)",
    "stack.push_async_callback(con.close)",
    "stack.callback(pool.release, con)",
    "stack.push(lambda *exc: pool.release(con))",
    "stack.push_async_exit(lambda *exc: pool.release(con))",
])
def test_a_release_registered_with_an_exit_stack(registration: str) -> None:
    source = f"""
    import contextlib


    async def f(pool):
        async with contextlib.AsyncExitStack() as stack:
            con = await pool.acquire()
            {registration}
            await con.execute("SELECT 1")
    """
    assert found(source) == []
    assert found(source.replace(registration, "print(con)")) == [(7, "SP002")]


def test_a_release_of_another_connection_wrapped_in_wait_for_is_not_a_step() -> None:
    source = """
    import asyncio


    async def f(pool):
        a = b = None
        try:
            a = await pool.acquire()
            b = await pool.acquire()
            await b.execute("SELECT 1")
        finally:
            await asyncio.wait_for(pool.release(a), 5)
            await pool.release(b)
    """
    assert found(source) == []
    # Any other await there comes before the release of `b`, and can fail first.
    assert found(source.replace("pool.release(a), 5", "a.close(), 5")) == [(9, "SP001")]


def test_assert_raises_regex_expects_the_acquire_to_fail() -> None:
    source = """
    class T:
        async def test_times_out(self):
            with self.assertRaisesRegex(TimeoutError, "timed out"):
                await self.pool.acquire(timeout=0.01)
    """
    assert found(source) == []


# -- connections that leave the function --------------------------------------


@pytest.mark.parametrize("escape", [
    "cons.append(con)", "cons.add(con)", "queue.put_nowait(con)", "await queue.put(con)",
    "cons.extend(con)", "cons.insert(0, con)", "cons.appendleft(con)", "cache.setdefault(key, con)",
])
def test_a_connection_put_in_a_container_has_left(escape: str) -> None:
    source = f"""
    async def f(pool, cons, queue, cache, key):
        con = await pool.acquire()
        {escape}
    """
    assert found(source) == []
    assert found(source.replace(escape, "print(con)")) == [(3, "SP002")]


# -- the command line ----------------------------------------------------------


def test_cli_a_walk_skips_site_packages(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    leak = "async def f(pool):\n    await pool.acquire()\n"
    for name in ("lib/site-packages/dep/x.py", "src/app.py"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(leak)
    monkeypatch.chdir(tmp_path)
    assert main(["--format", "json", "."]) == 1
    report = json.loads(capsys.readouterr().out)
    assert [Path(f["path"]).as_posix() for f in report["findings"]] == ["src/app.py"]
    assert report["files_scanned"] == 1


# -- asyncio.gather -------------------------------------------------------------


def test_a_gather_of_one_acquire_drops_nothing() -> None:
    source = """
    import asyncio


    async def f(pool):
        con, = await asyncio.gather(pool.acquire())
        try:
            await con.execute("SELECT 1")
        finally:
            await pool.release(con)
    """
    assert found(source) == []


def test_return_exceptions_false_still_drops_the_other_results() -> None:
    source = """
    import asyncio


    async def f(pool):
        a, b = await asyncio.gather(pool.acquire(), pool.acquire(), return_exceptions=False)
        try:
            await a.execute("SELECT 1")
        finally:
            await pool.release(a)
            await pool.release(b)
    """
    findings = check_source(textwrap.dedent(source))
    assert [(f.line, f.col, f.code) for f in findings] == [(6, 33, "SP001"), (6, 49, "SP001")]
    assert all("`gather()` raises before the `try:`" in f.message for f in findings)


# -- aliases of acquire ---------------------------------------------------------


def test_a_local_name_shadows_a_module_level_acquire_alias() -> None:
    source = """
    acquire = pool.acquire


    async def f(factory):
        acquire = factory.make
        res = await acquire()
        await res.execute("SELECT 1")


    async def g():
        con = await acquire()
        await con.execute("SELECT 1")
    """
    assert found(source) == [(12, "SP002")]


# -- tests of the connection in the finally -----------------------------------


_GUARDED = """
import asyncpg


async def f(pool):
    con = None
    try:
        con = await pool.acquire()
        await con.execute("SELECT 1")
    finally:
        if {test}:
            {body}
        else:
            {orelse}
"""


@pytest.mark.parametrize(("test", "body", "orelse"), [
    ("con != None", "await pool.release(con)", "pass"),
    ("None is not con", "await pool.release(con)", "pass"),
    ("con == None", "pass", "await pool.release(con)"),
    ("isinstance(con, (asyncpg.Connection, asyncpg.pool.PoolConnectionProxy))", "await pool.release(con)", "pass"),
])
def test_a_release_guarded_by_a_presence_test_is_on_every_path(test: str, body: str, orelse: str) -> None:
    assert found(_GUARDED.format(test=test, body=body, orelse=orelse)) == []


@pytest.mark.parametrize(("test", "body", "orelse"), [
    ("not isinstance(con, asyncpg.Connection)", "await pool.release(con)", "pass"),
    ("isinstance(con, (asyncpg.Connection, Widget))", "await pool.release(con)", "pass"),
    ("con != None", "pass", "await pool.release(con)"),
])
def test_a_release_guarded_by_another_test_is_reported(test: str, body: str, orelse: str) -> None:
    findings = check_source(_GUARDED.format(test=test, body=body, orelse=orelse))
    assert [(f.line, f.code) for f in findings] == [(8, "SP001")]
    assert findings[0].message.startswith("connection `con` is released in a `finally:` block only when")


def test_a_flag_set_after_the_acquire_guards_the_release_only_when_true() -> None:
    source = """
    async def f(pool):
        con = None
        acquired = False
        try:
            con = await pool.acquire()
            acquired = True
            await con.execute("SELECT 1")
        finally:
            if acquired:
                pass
            else:
                await pool.release(con)
    """
    assert found(source) == [(6, "SP001")]
    assert found(source.replace("if acquired:", "if not acquired:")) == []


# -- what counts as a release -----------------------------------------------------


def test_closing_the_connection_in_finally_counts_as_a_release() -> None:
    source = """
    async def f(pool):
        con = await pool.acquire()
        try:
            await con.execute("SELECT 1")
        finally:
            await con.close()
    """
    assert found(source) == []


def test_a_release_method_of_something_else_given_the_connection_second_is_not_one() -> None:
    source = """
    async def f(pool, audit):
        con = await pool.acquire()
        try:
            await con.execute("SELECT 1")
        finally:
            await audit.release("slot", con)
    """
    assert found(source) == [(3, "SP002")]


# -- connections wrapped and stored ---------------------------------------------


@pytest.mark.parametrize("leaves", [
    'cache[key] = {"con": con, "pool": pool}',
    'cache[key] = {"lease": (con, pool)}',
    "return Session(connection=con)",
    'await queue.put({"job": key, "con": con})',
])
def test_a_connection_wrapped_and_stored_has_left(leaves: str) -> None:
    source = f"""
    async def f(pool, cache, key, queue):
        con = await pool.acquire()
        {leaves}
    """
    assert found(source) == []


# -- match statements ---------------------------------------------------------------


def test_a_release_before_a_return_in_a_match_case_covers_it() -> None:
    source = """
    async def f(pool, kind):
        con = await pool.acquire()
        match kind:
            case "a":
                await pool.release(con)
                return 1
            case _:
                pass
        await pool.release(con)
    """
    [finding] = check_source(textwrap.dedent(source))
    assert (finding.line, finding.code) == (3, "SP001")
    assert finding.message.endswith("an exception or a cancellation between line 3 and line 6 skips the release")


# -- steps between the acquire and the try --------------------------------------


@pytest.mark.parametrize(("step", "line"), [
    ('if await con.fetchval("SELECT 1"):\n        pass', 3),
    ('if ready:\n        pass\n    else:\n        await con.execute("SET x = 1")', 6),
    ("async with lock:\n        pass", 3),
    ("if not ready:\n        raise RuntimeError", 4),
])
def test_a_step_between_the_acquire_and_the_try_is_named(step: str, line: int) -> None:
    source = (
        "async def f(pool, ready, lock):\n"
        "    con = await pool.acquire()\n"
        f"    {step}\n"
        "    try:\n"
        "        await con.execute('SELECT 1')\n"
        "    finally:\n"
        "        await pool.release(con)\n"
    )
    [finding] = check_source(source)
    assert (finding.line, finding.code) == (2, "SP001")
    assert finding.message == (
        f"connection `con` is released in a `finally:` block, but line {line} between the acquire and that "
        "`try:` can fail or leave first")


# -- steps in the finally before the release --------------------------------------


@pytest.mark.parametrize(("step", "line"), [
    ("await lease.release()", 7),
    ("async with lock:\n            pass", 7),
])
def test_a_step_in_the_finally_before_the_release_is_named(step: str, line: int) -> None:
    source = (
        "async def f(pool, lease, lock):\n"
        "    con = await pool.acquire()\n"
        "    try:\n"
        "        await con.execute('SELECT 1')\n"
        "    finally:\n"
        "        pass\n"
        f"        {step}\n"
        "        await pool.release(con)\n"
    )
    [finding] = check_source(source)
    assert (finding.line, finding.code) == (2, "SP001")
    assert finding.message.startswith(
        f"connection `con` is released in a `finally:` block, but line {line} in that `finally:` comes before")


def test_a_branch_of_the_finally_that_releases_first_may_await_after() -> None:
    source = """
    async def f(pool, metrics, broken):
        con = await pool.acquire()
        try:
            await con.execute("SELECT 1")
        finally:
            if broken(con):
                con.terminate()
                await metrics.incr("terminated")
            await pool.release(con)
    """
    assert found(source) == []
    assert found(source.replace("con.terminate()", "metrics.count()")) == [(3, "SP001")]


def test_a_shielded_release_of_another_connection_is_not_a_step() -> None:
    source = """
    import asyncio


    async def f(pool):
        a = b = None
        try:
            a = await pool.acquire()
            b = await pool.acquire()
        finally:
            await asyncio.shield(pool.release(a))
            await pool.release(b)
    """
    assert found(source) == []



# -- shapes of the acquire ------------------------------------------------------------


def test_an_acquire_not_awaited_in_pytest_raises_is_still_sp004() -> None:
    source = """
    import pytest


    async def test_times_out(pool):
        with pytest.raises(TimeoutError):
            pool.acquire(timeout=0.01)
    """
    assert found(source) == [(7, "SP004")]


def test_an_annotated_connection_never_released_is_sp002() -> None:
    source = """
    import asyncpg


    async def f(pool):
        con: asyncpg.Connection = await pool.acquire()
        await con.execute("SELECT 1")
    """
    assert found(source) == [(6, "SP002")]


def test_closing_a_connection_used_once_is_not_reported_as_thrown_away() -> None:
    source = """
    async def f(pool):
        await (await pool.acquire()).close()
        await (await pool.acquire()).execute("SELECT 1")
    """
    assert found(source) == [(4, "SP003")]


def test_a_gather_of_a_list_comprehension_of_acquires_as_a_statement_is_sp003() -> None:
    source = """
    import asyncio


    async def warm_up(pool):
        await asyncio.gather(*[pool.acquire() for _ in range(3)])
    """
    [finding] = check_source(textwrap.dedent(source))
    assert (finding.line, finding.code) == (6, "SP003")
    assert finding.message.startswith("the connection from `await asyncio.gather(*[pool.acquire() for _ in range(3)])`")


def test_an_acquire_context_returned_has_left() -> None:
    source = """
    def connection(pool):
        ctx = pool.acquire(timeout=5)
        return ctx
    """
    assert found(source) == []


# -- the reason given ------------------------------------------------------------------


def test_the_loop_that_acquires_on_each_turn_is_named() -> None:
    source = """
    async def f(pool, items):
        con = None
        try:
            for item in items:
                con = await pool.acquire()
                await con.execute("SELECT $1", item)
        finally:
            if con is not None:
                await pool.release(con)
    """
    [finding] = check_source(textwrap.dedent(source))
    assert (finding.line, finding.code) == (6, "SP001")
    assert finding.message.startswith("connection `con` is acquired on each turn of the loop at line 5, but released "
                                      "only in the `finally:` after that loop")


def test_a_break_before_the_release_is_named() -> None:
    source = """
    async def f(pool):
        while True:
            con = await pool.acquire()
            if await con.fetchval("SELECT 1"):
                break
            await pool.release(con)
    """
    [finding] = check_source(textwrap.dedent(source))
    assert (finding.line, finding.code) == (4, "SP001")
    assert finding.message.endswith("the `break` at line 6 skips the release")


def test_a_plain_async_generator_names_the_yield() -> None:
    source = """
    async def rows(pool):
        con = await pool.acquire()
        async for row in con.cursor("SELECT 1"):
            yield row
        await pool.release(con)
    """
    [finding] = check_source(textwrap.dedent(source))
    assert (finding.line, finding.code) == (3, "SP001")
    assert finding.message.endswith("an exception thrown in at the `yield` skips the release")


def test_the_first_release_after_the_acquire_bounds_the_gap() -> None:
    source = """
    async def handler(pool, flag):
        con = await pool.acquire()
        if flag:
            await pool.release(con)
            return None
        await con.execute("SELECT 1")
        await pool.release(con)
    """
    [finding] = check_source(textwrap.dedent(source))
    assert finding.message.endswith("an exception or a cancellation between line 3 and line 5 skips the release")


def test_a_stored_connection_released_only_when_setup_fails_has_left() -> None:
    source = """
    class Lease:
        async def __aenter__(self):
            self.con = await self.pool.acquire()
            try:
                await self.con.execute("SET search_path = app")
            except BaseException:
                await self.pool.release(self.con)
                raise
    """
    assert found(source) == []



def test_a_stored_connection_released_in_a_finally_after_a_gap_is_followed() -> None:
    source = """
    async def middleware(request, handler, pool):
        request.state.con = await pool.acquire()
        await request.state.con.execute("SET search_path = app")
        try:
            return await handler(request)
        finally:
            await pool.release(request.state.con)
    """
    [finding] = check_source(textwrap.dedent(source))
    assert (finding.line, finding.code) == (3, "SP001")
    assert finding.message == ("connection `request.state.con` is released in a `finally:` block, but line 4 "
                               "between the acquire and that `try:` can fail or leave first")



# -- the try: whose finally: releases ------------------------------------------------


def test_a_pytest_fixture_release_counts_as_teardown_only_after_its_yield() -> None:
    source = """
    import pytest


    @pytest.fixture
    async def row_count(pool):
        con = await pool.acquire()
        n = await con.fetchval("SELECT count(*) FROM t")
        await pool.release(con)
        return n
    """
    assert found(source) == [(7, "SP001")]
    # After its yield, but with a step between the acquire and the yield
    # that can fail (pytest then never runs the teardown: review h233).
    yielded = source.replace("        return n", "        yield n").replace(
        "        await pool.release(con)\n        yield n", "        yield n\n        await pool.release(con)")
    assert found(yielded) == [(7, "SP001")]
    # Nothing between them that can fail: the teardown releases.
    assert found(yielded.replace('        n = await con.fetchval("SELECT count(*) FROM t")\n', "").replace(
        "yield n", "yield con")) == []


def test_a_walrus_in_a_while_test_with_the_try_first_in_its_body() -> None:
    source = """
    async def drain(pool):
        while (con := await pool.acquire()) is not None:
            try:
                if not await con.fetchval("SELECT pending()"):
                    break
            finally:
                await pool.release(con)
    """
    assert found(source) == []


def test_the_innermost_condition_of_a_release_is_named() -> None:
    source = """
    async def f(pool, dirty, closing):
        con = await pool.acquire()
        try:
            await con.execute("SELECT 1")
        finally:
            if dirty:
                if closing:
                    await pool.release(con)
    """
    [finding] = check_source(textwrap.dedent(source))
    assert finding.message == ("connection `con` is released in a `finally:` block only when `closing` (line 8); "
                               "on the other path it is never released")


@pytest.mark.parametrize(("flag", "test"), [("acquired = False", "acquired"), ("other = True", "acquired")])
def test_only_a_name_set_to_true_right_after_the_acquire_is_a_flag(flag: str, test: str) -> None:
    source = f"""
    async def f(pool):
        con = None
        acquired = other = False
        try:
            con = await pool.acquire()
            {flag}
            await con.execute("SELECT 1")
        finally:
            if {test}:
                await pool.release(con)
    """
    assert found(source) == [(6, "SP001")]
    assert found(source.replace(flag, "acquired = True")) == []


def test_an_acquire_in_the_else_of_a_try_is_followed_to_the_next_try() -> None:
    source = """
    async def f(pool, warm):
        try:
            await warm()
        except OSError:
            return None
        else:
            con = await pool.acquire()
        try:
            return await con.fetchval("SELECT 1")
        finally:
            await pool.release(con)
    """
    assert found(source) == []


def test_a_loop_that_releases_each_turn_inside_the_try_is_not_turning() -> None:
    source = """
    async def f(pool, items):
        con = None
        try:
            for item in items:
                con = await pool.acquire()
                await con.execute("SELECT $1", item)
                await pool.release(con)
        finally:
            if con is not None:
                await pool.release(con)
    """
    # (The turning-loop rule only: the last turn's connection is released twice.)
    assert found(source) == []


def test_a_retry_loop_that_returns_with_the_connection_is_not_turning() -> None:
    source = """
    async def f(pool):
        con = None
        try:
            for attempt in range(3):
                try:
                    con = await pool.acquire(timeout=1)
                except TimeoutError:
                    continue
                return await con.fetchval("SELECT 1")
        finally:
            if con is not None:
                await pool.release(con)
    """
    assert found(source) == []
    # A `break` before the acquire does not end the turn that holds it.
    turning = source.replace("            for attempt in range(3):\n",
                             "            for attempt in range(3):\n                if attempt > 9:\n"
                             "                    break\n").replace("return await", "await")
    assert found(turning) == [(9, "SP001")]


# -- a name bound again --------------------------------------------------------------


def test_a_name_bound_again_between_the_acquire_and_the_try_is_named() -> None:
    source = """
    async def f(pool, spare):
        con = await pool.acquire()
        if spare is not None:
            con = spare
        try:
            await con.execute("SELECT 1")
        finally:
            await pool.release(con)
    """
    [finding] = check_source(textwrap.dedent(source))
    assert (finding.line, finding.code) == (3, "SP001")
    assert "`con` is bound again at line 5, before the `finally:` releases it" in finding.message


def test_a_name_bound_again_in_the_else_of_the_try_is_named() -> None:
    source = """
    async def f(pool, fallback):
        con = None
        try:
            con = await pool.acquire()
            await con.execute("SELECT 1")
        except TimeoutError:
            pass
        else:
            con = fallback
        finally:
            if con is not None:
                await pool.release(con)
    """
    [finding] = check_source(textwrap.dedent(source))
    assert (finding.line, finding.code) == (5, "SP001")
    assert "`con` is bound again at line 10" in finding.message


@pytest.mark.parametrize("comprehension", ["{con.get_server_pid() for con in others}",
                                           "list(con.get_server_pid() for con in others)"])
def test_the_name_of_a_set_comprehension_or_generator_is_its_own(comprehension: str) -> None:
    source = f"""
    async def f(pool, others):
        con = await pool.acquire()
        try:
            pids = {comprehension}
            await con.execute("SELECT $1", pids)
        finally:
            await pool.release(con)
    """
    assert found(source) == []


# -- exits after the acquire ------------------------------------------------------------


def test_the_first_exit_without_a_release_is_named() -> None:
    source = """
    async def f(pool, a, b):
        con = await pool.acquire()
        if a:
            return 1
        if b:
            return 2
        await pool.release(con)
    """
    [finding] = check_source(textwrap.dedent(source))
    assert finding.message.endswith("the return at line 5 leaves without releasing it")


def test_a_release_before_the_acquire_does_not_cover_a_later_exit() -> None:
    source = """
    async def f(pool, stale):
        con = await pool.acquire()
        await pool.release(con)
        con = await pool.acquire()
        if stale:
            return None
        await pool.release(con)
    """
    findings = check_source(textwrap.dedent(source))
    assert [(f.line, f.code) for f in findings] == [(3, "SP001"), (5, "SP001")]
    assert findings[1].message.endswith("the return at line 7 leaves without releasing it")



# -- the command line, more ----------------------------------------------------------


def test_cli_only_python_files_are_read_and_hidden_directories_are_skipped(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    leak = "async def f(pool):\n    await pool.acquire()\n"
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "notes.txt").write_text("not python (\n")
    (tmp_path / "src" / "app.py").write_text("")
    (tmp_path / "src" / ".tox" / "lib").mkdir(parents=True)
    (tmp_path / "src" / ".tox" / "lib" / "x.py").write_text(leak)
    monkeypatch.chdir(tmp_path)
    assert main(["src"]) == 0
    assert capsys.readouterr().out.strip() == "safepool check: no problems (1 file scanned)"


def test_cli_an_exclude_pattern_with_a_trailing_slash_or_dot_slash(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    leak = "async def f(pool):\n    await pool.acquire()\n"
    for name in ("src/migrations/m1.py", "src/app/a.py"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(leak)
    monkeypatch.chdir(tmp_path)
    for pattern in ("migrations/", "./src/migrations"):
        assert main(["--format", "json", "src", "--exclude", pattern]) == 1
        paths = [Path(f["path"]).as_posix() for f in json.loads(capsys.readouterr().out)["findings"]]
        assert paths == ["src/app/a.py"], pattern


def test_cli_a_pool_names_that_is_not_a_regex_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--pool-names", "(", "x.py"])
    assert exit_info.value.code == 2
    assert "--pool-names: missing ), unterminated subpattern" in capsys.readouterr().err


def test_cli_an_indentation_error_gets_no_python_version_hint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "bad.py").write_text("def f():\nreturn 1\n")
    assert main([str(tmp_path / "bad.py")]) == 2
    err = capsys.readouterr().err
    assert "IndentationError" in err and "parsed as Python" not in err


def test_cli_json_is_indented_and_missing_paths_are_counted(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--format", "json", str(tmp_path / "a"), str(tmp_path / "b")]) == 2
    out = capsys.readouterr().out
    assert out.startswith('{\n  "files_scanned": 0,\n  "findings": [],\n  "errors": [\n    {\n')
    assert main([str(tmp_path / "a"), str(tmp_path / "b")]) == 2
    assert capsys.readouterr().out.strip() == (
        f"safepool check: no problems (0 files scanned, 2 paths not found: {tmp_path / 'a'}, {tmp_path / 'b'}; "
        "errors above)")


def test_cli_two_directories_without_python_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    monkeypatch.chdir(tmp_path)
    assert main(["a", "b"]) == 2
    assert capsys.readouterr().out.strip() == (
        "safepool check: no problems (0 files scanned, 2 directories without Python files: a, b; errors above)")


# -- false positives and misses found by the review (each fixed in check.py) --


# A bug until s63 (fixed): check.py:576 and :586 (_leaves_before_release, _may_leave) count any
# `break`/`continue` in the statement as leaving, even one that only ends a loop nested in that statement
@pytest.mark.parametrize("where", ["finally", "between"])
def test_a_break_of_a_loop_nested_in_the_step_does_not_skip_the_release(where: str) -> None:
    loop = (
        "for listener in listeners:\n"
        "            if listener is None:\n"
        "                continue\n"
        "            if listener.done:\n"
        "                break\n"
        "            listener.stop()\n"
    )
    if where == "finally":
        source = (
            "async def f(pool, listeners):\n"
            "    con = await pool.acquire()\n"
            "    try:\n"
            "        await con.execute('LISTEN jobs')\n"
            "    finally:\n"
            f"        {loop}"
            "        await pool.release(con)\n"
        )
    else:
        source = (
            "async def f(pool, listeners):\n"
            "    con = await pool.acquire()\n"
            "    if True:\n"
            f"        {loop}"
            "    try:\n"
            "        await con.execute('LISTEN jobs')\n"
            "    finally:\n"
            "        await pool.release(con)\n"
        )
    # The `continue` and the `break` end the `for` inside the step, never the
    # function: the release runs on every path.
    assert check_source(source) == []


# A bug until s63 (fixed): check.py:1053-1067 (flags_acquire) takes a name set to True right after the acquire
# for 'the connection is held' even when the try: sets it False again: a release only on failure passes
def test_a_release_only_while_a_failure_flag_is_set_is_reported() -> None:
    source = """
    async def f(pool):
        con = await pool.acquire()
        failed = True
        try:
            await con.execute("SELECT 1")
            failed = False
        finally:
            if failed:
                await pool.release(con)
    """
    # On success `failed` is False: the connection is never released.
    assert found(source) == [(3, "SP001")]


# A bug until s63 (fixed): check.py:487-488 (_escapes) follows a container method's argument only when it is the
# bare name: a connection put in a queue or list inside a tuple or an object is reported as never released
@pytest.mark.parametrize("escape", [
    "await queue.put((priority, con))",
    "held.append((con, time.monotonic()))",
    "queue.put_nowait(Lease(con, pool))",
])
def test_a_connection_put_in_a_container_inside_a_tuple_has_left(escape: str) -> None:
    source = f"""
    import time


    async def f(pool, queue, held, priority):
        con = await pool.acquire()
        {escape}
    """
    # As `cache[key] = (con, pool)` (docs/testing.md): ownership moved, not reported.
    assert found(source) == []


# A bug until s63 (fixed): check.py:894 (owned_release) and :872 (the reason) ask whether a release is in any
# `except` handler of the function, also one that holds the acquire itself: a stored connection acquired and
# released in a handler is taken for one that left (not reported)
def test_a_stored_connection_acquired_and_released_in_a_handler_is_followed() -> None:
    source = """
    async def middleware(request, handler, pool):
        try:
            return await handler(request)
        except Retry:
            request.state.con = await pool.acquire()
            await handler(request)
            await pool.release(request.state.con)
    """
    assert found(source) == [(6, "SP001")]


# A bug until s63 (fixed): check.py:871-876: a connection acquired and released inside the same `except` handler
# is said to be 'released only in an `except` handler: when nothing fails, it is never released'
def test_an_acquire_and_release_in_one_handler_names_the_exception_between() -> None:
    source = """
    async def f(pool, job):
        try:
            await job.run()
        except Exception as exc:
            con = await pool.acquire()
            await con.execute("INSERT INTO failures VALUES ($1)", str(exc))
            await pool.release(con)
            raise
    """
    [finding] = check_source(textwrap.dedent(source))
    assert (finding.line, finding.code) == (6, "SP001")
    assert finding.message.endswith("an exception or a cancellation between line 6 and line 8 skips the release")


# A bug until s63 (fixed): check.py:1030/1040-1048 (rebinding, released_before): a binding that is itself one of
# the statements after the acquire (the rest of the try: body) is checked for a release before it only in the
# blocks below that statement, never in its own block: `await pool.release(con)` then `con = None` is taken for
# a connection lost
def test_releasing_early_and_clearing_the_name_inside_the_try_is_not_a_rebinding() -> None:
    source = """
    async def f(pool, notify):
        con = None
        try:
            con = await pool.acquire()
            rows = await con.fetch("SELECT 1")
            await pool.release(con)
            con = None
            await notify(rows)
        finally:
            if con is not None:
                await pool.release(con)
    """
    # The same code with the acquire before the `try:` is (rightly) not reported.
    assert found(source.replace("    con = None\n    try:\n        con = await pool.acquire()",
                                "    con = await pool.acquire()\n    try:")) == []
    assert found(source) == []


def test_a_connection_in_a_dict_passed_to_a_log_call_has_not_left() -> None:
    # A bug until s63 (fixed): any dict literal holding the connection counted
    # as it leaving the function, so logging it hid the leak.
    source = """
    import logging

    log = logging.getLogger(__name__)


    async def f(pool):
        con = await pool.acquire()
        log.info("leased", extra={"con": con})
        await con.execute("SELECT 1")
    """
    assert found(source) == [(8, "SP002")]


def test_a_connection_stored_with_update_has_left() -> None:
    source = """
    async def f(self, pool, key):
        con = await pool.acquire()
        self.connections.update({key: con})
    """
    assert found(source) == []


def test_a_callback_registered_with_the_connection_must_release_it() -> None:
    # A bug until s63 (fixed): any exit-stack callback given the connection
    # counted as its release.
    source = """
    import contextlib
    import logging

    log = logging.getLogger(__name__)


    async def f(pool):
        async with contextlib.AsyncExitStack() as stack:
            con = await pool.acquire()
            stack.callback(log.info, con)
            await con.execute("SELECT 1")
    """
    assert found(source) == [(10, "SP002")]
    assert found(source.replace("stack.callback(log.info, con)", "stack.push_async_callback(pool.release, con)")) == []
    assert found(source.replace("stack.callback(log.info, con)", "stack.push_async_callback(con.close)")) == []


def test_a_connection_stored_with_setattr_has_left() -> None:
    # A bug until s63 (fixed): reported SP002, as a connection never released.
    source = """
    async def f(holder, pool):
        con = await pool.acquire()
        setattr(holder, "con", con)
    """
    assert found(source) == []
