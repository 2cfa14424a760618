"""Review h274: the static check (`python -m safepool check`) on code a user
writes, aiming at what earlier reviews did not cover. Each test here shows a
bug, as an xfail(strict=True) until fixed."""

from __future__ import annotations

import textwrap

import pytest

from safepool.check import check_source


def _codes(source: str) -> list[tuple[int, str]]:
    return [(f.line, f.code) for f in check_source(textwrap.dedent(source))]


# A release in the `finally:` that runs only on some paths is SP001 when the
# path is chosen by an `if` (`finally: if ok: await pool.release(con)`,
# docs/testing.md, the SP001 row). safe_release (safepool/check.py:1331)
# looks only for an `ast.If` on the way up from the release to the
# `finally:`: any other statement or expression that runs the release
# conditionally is taken as releasing on every path.

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


@pytest.mark.xfail(strict=True, reason=(
    "review h274: a release in `finally:` that runs only on some paths (an `except` handler, a `match` "
    "case, a conditional expression, `and`, a loop body) is taken as releasing on every path: "
    "safepool/check.py:1331 (_Checker.safe_release) knows only `ast.If` as a condition"
))
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
# con)`) counts as a release wherever it is (safepool/check.py:1293:
# `release.func.attr in _CLEANUP_REGISTRATIONS` returns True at once),
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


@pytest.mark.xfail(strict=True, reason=(
    "review h274: an AsyncExitStack registration of the release counts wherever it is: an await before "
    "it, an `if` or an `except` around it are not looked at (safepool/check.py:1293, _Checker.safe_release)"
))
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
# (safepool/check.py:1562) looks for a `finally:` only in the acquire's own
# block, not in the `with` that follows it.

SPAN = """
    async def f(pool, tracer):
        con = await pool.acquire()
        with tracer.start_as_current_span("query"):
            try:
                return await con.fetchval("SELECT 1")
            finally:
                await pool.release(con)
"""


@pytest.mark.xfail(strict=True, reason=(
    "review h274: with the `try:`/`finally:` inside a `with` after the acquire, the SP001 message says the "
    "`return` inside that `try:` leaves without releasing, though its `finally:` releases "
    "(safepool/check.py:1562, _Checker.unreleased_exit)"
))
def test_a_return_inside_the_releasing_try_is_not_named_as_skipping_the_release() -> None:
    messages = [f.message for f in check_source(textwrap.dedent(SPAN))]
    assert not any("the return at line 6" in message for message in messages), messages
