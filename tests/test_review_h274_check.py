"""Review h274: the static check (`python -m safepool check`) on code a user
writes, aiming at what earlier reviews did not cover. Each test here showed
a bug, as an xfail(strict=True) until fixed (all three fixed by h275, with
sibling tests for the other constructs of each kind)."""

from __future__ import annotations

import textwrap

import pytest

from safepool.check import Finding, check_source


def _codes(source: str) -> list[tuple[int, str]]:
    return [(f.line, f.code) for f in check_source(textwrap.dedent(source))]


# A release in the `finally:` that runs only on some paths is SP001 when the
# path is chosen by an `if` (`finally: if ok: await pool.release(con)`,
# docs/testing.md, the SP001 row). safe_release (safepool/check.py:1331)
# looked only for an `ast.If` on the way up from the release to the
# `finally:`: any other statement or expression that runs the release
# conditionally was taken as releasing on every path (fixed by h275).

CONDITIONAL_RELEASES_IN_FINALLY = [
    pytest.param("""
        async def f(pool):
            con = await pool.acquire()
            try:
                return await con.fetchval("SELECT 1")
            finally:
                try:
                    await con.execute("UNLISTEN *")
                except Exception:
                    await pool.release(con)
    """, id="released-only-when-the-cleanup-fails"),
    pytest.param("""
        async def f(pool, mode):
            con = await pool.acquire()
            try:
                return await con.fetchval("SELECT 1")
            finally:
                match mode:
                    case "rw":
                        await pool.release(con)
    """, id="match-without-a-catch-all"),
    pytest.param("""
        async def f(pool, ok):
            con = await pool.acquire()
            try:
                return await con.fetchval("SELECT 1")
            finally:
                await pool.release(con) if ok else None
    """, id="conditional-expression"),
    pytest.param("""
        async def f(pool, ok):
            con = await pool.acquire()
            try:
                return await con.fetchval("SELECT 1")
            finally:
                ok and await pool.release(con)
    """, id="and-short-circuit"),
    pytest.param("""
        async def f(pool, items):
            con = await pool.acquire()
            try:
                return await con.fetchval("SELECT 1")
            finally:
                for _ in items:
                    await pool.release(con)
                    break
    """, id="for-over-a-maybe-empty-iterable"),
]


@pytest.mark.parametrize("source", CONDITIONAL_RELEASES_IN_FINALLY)
def test_a_release_in_finally_that_runs_only_on_some_paths_is_reported(source: str) -> None:
    assert [code for _, code in _codes(source)] == ["SP001"]


def test_the_if_form_of_a_conditional_release_in_finally_is_reported() -> None:
    """The control: the same shape with an `if`, reported as documented."""
    assert _codes("""
        async def f(pool, ok):
            con = await pool.acquire()
            try:
                return await con.fetchval("SELECT 1")
            finally:
                if ok:
                    await pool.release(con)
    """) == [(3, "SP001")]


# An AsyncExitStack registration (`stack.push_async_callback(pool.release,
# con)`) counted as a release wherever it was (safepool/check.py:1293:
# `release.func.attr in _CLEANUP_REGISTRATIONS` returned True at once;
# fixed by h275),
# where a `finally:` must come right after the acquire and run on every
# path. A statement that fails between the acquire and the registration,
# or a registration under a condition or in an `except` handler, leaves
# the connection unregistered, and so never released.

EXIT_STACK_GAPS = [
    pytest.param("""
        import contextlib
        async def f(pool):
            async with contextlib.AsyncExitStack() as stack:
                con = await pool.acquire()
                await con.execute("SET search_path TO app")
                stack.push_async_callback(pool.release, con)
                return await con.fetchval("SELECT 1")
    """, id="await-before-the-registration"),
    pytest.param("""
        import contextlib
        async def f(pool, ok):
            async with contextlib.AsyncExitStack() as stack:
                con = await pool.acquire()
                if ok:
                    stack.push_async_callback(pool.release, con)
                return await con.fetchval("SELECT 1")
    """, id="registered-under-an-if"),
    pytest.param("""
        import contextlib
        async def f(pool):
            async with contextlib.AsyncExitStack() as stack:
                con = await pool.acquire()
                try:
                    await con.execute("SET search_path TO app")
                except Exception:
                    stack.push_async_callback(pool.release, con)
                return 1
    """, id="registered-only-in-an-except-handler"),
]


@pytest.mark.parametrize("source", EXIT_STACK_GAPS)
def test_an_exit_stack_registration_after_a_step_or_under_a_condition_is_reported(source: str) -> None:
    assert [code for _, code in _codes(source)] == ["SP001"]


def test_an_exit_stack_registration_right_after_the_acquire_is_accepted() -> None:
    """The control: registered at once, as documented."""
    assert _codes("""
        import contextlib
        async def f(pool):
            async with contextlib.AsyncExitStack() as stack:
                con = await pool.acquire()
                stack.push_async_callback(pool.release, con)
                await con.execute("SET search_path TO app")
                return await con.fetchval("SELECT 1")
    """) == []


# A `try:`/`finally:` that releases, inside a synchronous `with` right after
# the acquire (a tracing span, a lock): the finding names the `return`
# inside that `try:` as leaving without the release, which is false (the
# `finally:` releases on that return). unreleased_exit
# (safepool/check.py:1562) looked for a `finally:` only in the acquire's own
# block, not in the `with` that follows it (fixed by h275: the message names
# the `with`, entered between the acquire and the `try:`).

SPAN = """
    async def f(pool, tracer):
        con = await pool.acquire()
        with tracer.start_as_current_span("query"):
            try:
                return await con.fetchval("SELECT 1")
            finally:
                await pool.release(con)
"""


def test_a_return_inside_the_releasing_try_is_not_named_as_skipping_the_release() -> None:
    messages = [f.message for f in check_source(textwrap.dedent(SPAN))]
    assert not any("the return at line 6" in message for message in messages), messages


# -- h275: the other constructs of each kind -----------------------------------
#
# A release counts only where it runs on every path out of the `finally:`
# (and a registration only where it runs on every path right after the
# acquire): each construct that runs its part on some paths only, flagged,
# and beside it the same construct where every path releases, accepted.

_FINALLY = """
    import asyncio
    import contextlib


    async def f(pool, ok, mode, items, lock, log, get_pool, budget):
        con = await pool.acquire()
        try:
            return await con.fetchval("SELECT 1")
        finally:
{cleanup}
"""


def _in_finally(cleanup: str) -> list[Finding]:
    body = textwrap.indent(textwrap.dedent(cleanup).strip("\n"), " " * 12)
    return check_source(textwrap.dedent(_FINALLY.format(cleanup=body)))


RELEASED_ON_SOME_PATHS_IN_FINALLY = [
    pytest.param("""
        if ok:
            await pool.release(con)
        elif mode:
            await pool.release(con)
    """, id="if-elif-without-else"),
    pytest.param("""
        if ok:
            await pool.release(con)
        else:
            await con.execute("UNLISTEN *")
            await pool.release(con)
    """, id="the-other-branch-steps-first"),
    pytest.param("""
        match mode:
            case "rw":
                await pool.release(con)
            case _ if ok:
                await pool.release(con)
    """, id="match-catch-all-with-a-guard"),
    pytest.param("""
        match mode:
            case "rw":
                pass
            case _:
                await pool.release(con)
    """, id="match-a-case-without-the-release"),
    pytest.param("""
        None if ok else await pool.release(con)
    """, id="conditional-expression-else-branch"),
    pytest.param("""
        ok or await pool.release(con)
    """, id="or-short-circuit"),
    pytest.param("""
        while ok:
            await pool.release(con)
            break
    """, id="while-with-a-test"),
    pytest.param("""
        for item in items:
            if item:
                break
        else:
            await pool.release(con)
    """, id="for-else-after-a-break"),
    pytest.param("""
        [await pool.release(con) for _ in items]
    """, id="comprehension"),
    pytest.param("""
        assert ok, await pool.release(con)
    """, id="assert-message"),
    pytest.param("""
        try:
            await con.execute("UNLISTEN *")
        except Exception:
            pass
        else:
            await pool.release(con)
    """, id="try-else-after-a-step"),
    pytest.param("""
        async with lock:
            await pool.release(con)
    """, id="inside-an-async-with"),
    pytest.param("""
        with contextlib.suppress(Exception):
            await con.execute("UNLISTEN *")
            await pool.release(con)
    """, id="after-a-step-in-a-suppressing-with"),
    pytest.param("""
        if await con.fetchval("SELECT pg_is_in_recovery()"):
            await pool.release(con)
        else:
            await pool.release(con)
    """, id="an-await-in-the-test-of-its-if"),
    pytest.param("""
        log(await con.fetchval("SELECT 1"), await pool.release(con))
    """, id="an-await-before-it-in-its-statement"),
    pytest.param("""
        await pool.release(con, timeout=await budget())
    """, id="an-await-in-its-arguments"),
]


@pytest.mark.parametrize("cleanup", RELEASED_ON_SOME_PATHS_IN_FINALLY)
def test_other_releases_in_finally_on_some_paths_only_are_reported(cleanup: str) -> None:
    assert [(f.line, f.code) for f in _in_finally(cleanup)] == [(7, "SP001")]


RELEASED_ON_EVERY_PATH_IN_FINALLY = [
    pytest.param("""
        if ok:
            await pool.release(con)
        elif mode:
            await pool.release(con)
        else:
            await pool.release(con)
    """, id="if-elif-else"),
    pytest.param("""
        match mode:
            case "rw":
                await pool.release(con)
            case _:
                await pool.release(con)
    """, id="match-with-a-catch-all"),
    pytest.param("""
        await (pool.release(con) if ok else asyncio.wait_for(pool.release(con), 5))
    """, id="conditional-expression-both-branches"),
    pytest.param("""
        await pool.release(con) if con is not None else None
    """, id="conditional-expression-on-the-connection"),
    pytest.param("""
        con and await pool.release(con)
    """, id="and-on-the-connection"),
    pytest.param("""
        con is None or await pool.release(con)
    """, id="or-on-no-connection"),
    pytest.param("""
        while True:
            await pool.release(con)
            break
    """, id="while-true"),
    pytest.param("""
        for item in items:
            log(item)
        else:
            await pool.release(con)
    """, id="for-else-without-a-break"),
    pytest.param("""
        try:
            await pool.release(con)
        except Exception:
            log("release failed")
    """, id="first-in-a-try-body"),
    pytest.param("""
        try:
            await con.execute("UNLISTEN *")
        except BaseException:
            await pool.release(con)
            raise
        else:
            await pool.release(con)
    """, id="except-base-exception-and-else"),
    pytest.param("""
        async with asyncio.timeout(5):
            await pool.release(con)
    """, id="under-a-deadline"),
    pytest.param("""
        with contextlib.suppress(Exception):
            await pool.release(con)
    """, id="first-in-a-suppressing-with"),
    pytest.param("""
        await asyncio.shield(pool.release(con))
    """, id="shielded"),
    pytest.param("""
        await (await get_pool()).release(con)
    """, id="a-pool-expression-that-awaits"),
]


@pytest.mark.parametrize("cleanup", RELEASED_ON_EVERY_PATH_IN_FINALLY)
def test_releases_in_finally_on_every_path_are_accepted(cleanup: str) -> None:
    assert _in_finally(cleanup) == []


@pytest.mark.parametrize(("cleanup", "says"), [
    ("await pool.release(con) if ok else None", "only when `ok` (line 11)"),
    ("ok or await pool.release(con)", "only when `ok` is false (line 11)"),
    ("for _ in items:\n    await pool.release(con)", "only when the `for` loop at line 11 runs its body"),
    ("match mode:\n    case 1:\n        await pool.release(con)", "only in some cases of the `match` at line 11"),
    ("try:\n    await con.execute('UNLISTEN *')\nexcept Exception:\n    await pool.release(con)",
     "only in the `except` handler at line 13, when its `try:` fails"),
])
def test_the_condition_of_a_release_in_finally_is_named(cleanup: str, says: str) -> None:
    [finding] = _in_finally(cleanup)
    assert finding.message.startswith(f"connection `con` is released in a `finally:` block {says}"), finding.message


_STACK = """
    import contextlib


    async def f(pool, ok, items, need, log):
        async with contextlib.AsyncExitStack() as stack:
{body}
            await con.execute("SELECT 1")
"""


def _in_stack(body: str) -> list[Finding]:
    body = textwrap.indent(textwrap.dedent(body).strip("\n"), " " * 12)
    return check_source(textwrap.dedent(_STACK.format(body=body)))


EXIT_STACK_REGISTRATIONS_ON_SOME_PATHS = [
    pytest.param("""
        con = await pool.acquire()
        for _ in items:
            stack.push_async_callback(pool.release, con)
    """, "only when the `for` loop at line 8 runs its body", id="in-a-loop"),
    pytest.param("""
        con = await pool.acquire()
        stack.push_async_callback(pool.release, con) if ok else None
    """, "only when `ok` (line 8)", id="conditional-expression"),
    pytest.param("""
        con = await pool.acquire()
        ok and stack.push_async_callback(pool.release, con)
    """, "only when `ok` (line 8)", id="and-short-circuit"),
    pytest.param("""
        con = await pool.acquire()
        match ok:
            case True:
                stack.push_async_callback(pool.release, con)
    """, "only in some cases of the `match` at line 8", id="match"),
    pytest.param("""
        con = await pool.acquire()
        if not ok:
            return None
        stack.push_async_callback(pool.release, con)
    """, "but line 9 between the acquire and that registration", id="a-return-before-it"),
    pytest.param("""
        con = await pool.acquire()
        async with contextlib.AsyncExitStack() as inner:
            inner.push_async_callback(pool.release, con)
    """, "but line 8 between the acquire and that registration", id="inside-an-async-with-entered-after-the-acquire"),
    # As a `try:` inside a `with` after the acquire is not taken as right
    # after it (see SPAN), nor is a registration inside one.
    pytest.param("""
        con = await pool.acquire()
        with contextlib.ExitStack() as inner:
            inner.callback(con.terminate)
    """, "but line 8 between the acquire and that registration", id="inside-a-with-entered-after-the-acquire"),
]


@pytest.mark.parametrize(("body", "says"), EXIT_STACK_REGISTRATIONS_ON_SOME_PATHS)
def test_other_exit_stack_registrations_on_some_paths_are_reported(body: str, says: str) -> None:
    [finding] = _in_stack(body)
    assert (finding.line, finding.code) == (7, "SP001")
    assert finding.message.startswith("connection `con` is registered for release with an exit stack at line ")
    assert says in finding.message, finding.message
    assert "enter_async_context(pool.acquire())" in finding.hint


EXIT_STACK_REGISTRATIONS_ON_EVERY_PATH = [
    pytest.param("""
        con = await pool.acquire()
        log("acquired")
        stack.push_async_callback(pool.release, con)
    """, id="after-a-step-that-cannot-fail"),
    pytest.param("""
        con = await pool.acquire()
        try:
            stack.push_async_callback(pool.release, con)
        except Exception:
            raise
    """, id="first-in-a-try-body"),
    pytest.param("""
        con = await pool.acquire()
        if con is not None:
            stack.push_async_callback(pool.release, con)
    """, id="under-a-test-of-the-connection"),
    pytest.param("""
        con = None
        if need:
            con = await pool.acquire()
            stack.push_async_callback(pool.release, con)
    """, id="acquired-and-registered-in-a-branch"),
    pytest.param("""
        try:
            con = await pool.acquire()
        except TimeoutError:
            return None
        stack.push_async_callback(pool.release, con)
    """, id="after-a-try-that-handles-the-acquire-s-errors"),
    pytest.param("""
        con = await pool.acquire()
        stack.push_async_callback(lambda: pool.release(con))
    """, id="a-lambda"),
    pytest.param("""
        if (con := await pool.acquire()) is not None:
            stack.push_async_callback(pool.release, con)
    """, id="first-in-the-body-of-the-if-that-acquires"),
]


@pytest.mark.parametrize("body", EXIT_STACK_REGISTRATIONS_ON_EVERY_PATH)
def test_exit_stack_registrations_on_every_path_right_after_the_acquire_are_accepted(body: str) -> None:
    assert _in_stack(body) == []


def test_the_with_around_the_releasing_try_is_named() -> None:
    [finding] = check_source(textwrap.dedent(SPAN))
    assert finding.message == ("connection `con` is released in a `finally:` block, but line 4 between the "
                               "acquire and that `try:` can fail or leave first")
    [finding] = check_source(textwrap.dedent(SPAN.replace("with tracer", "async with tracer")))
    assert "but line 4 between the acquire and that `try:`" in finding.message


def test_a_step_inside_the_with_before_the_releasing_try_is_named() -> None:
    source = """
        async def f(pool, tracer, ok):
            con = await pool.acquire()
            with tracer.start_as_current_span("query"):
                if not ok:
                    return None
                try:
                    return await con.fetchval("SELECT 1")
                finally:
                    await pool.release(con)
    """
    [finding] = check_source(textwrap.dedent(source))
    assert "but line 6 between the acquire and that `try:`" in finding.message, finding.message


def test_a_return_inside_a_releasing_try_nested_deeper_is_not_named() -> None:
    source = """
        async def f(pool, tracer, ok):
            con = await pool.acquire()
            with tracer.start_as_current_span("query"):
                if ok:
                    try:
                        return await con.fetchval("SELECT 1")
                    finally:
                        await pool.release(con)
    """
    [finding] = check_source(textwrap.dedent(source))
    assert finding.code == "SP001"
    assert "the return at line 7" not in finding.message, finding.message
