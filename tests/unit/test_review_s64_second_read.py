"""Review s64, second read: ``@safepool.site`` on a plain function and the
check's class-scope and same-line changes. The first fix wrapped what a
plain function returns (a coroutine, any async context manager) and changed
what callers observe: the tests of the site wrapper below failed on it, and
pin the narrower fix (only an ``asynccontextmanager`` function's context
manager, the same object). Four tests were strict xfails of older misses of
the check, fixed in s65 (with their siblings below); the others pin what held."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import textwrap
import warnings
from typing import Any

import pytest

import safepool
from safepool._sites import current_site
from safepool.check import check_source


@pytest.fixture
def flavour() -> str:
    return "safepool"


# ------------------------------------------------------------ site wrapper


async def _inner() -> str | None:
    return current_site()


def _plain() -> Any:
    return _inner()


def test_closing_the_unstarted_coroutine_warns_nothing() -> None:
    decorated = safepool.site("s")(_plain)
    for fn in (_plain, decorated):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            coroutine = fn()
            coroutine.close()
            del coroutine
            gc.collect()
        assert [str(w.message) for w in caught] == [], fn


def test_a_sync_and_async_context_manager_still_works_in_with() -> None:
    @safepool.site("s")
    def value() -> Any:
        return contextlib.nullcontext(5)

    with value() as got:
        assert got == 5


@pytest.mark.asyncio
async def test_a_getter_of_an_existing_lock_returns_that_lock() -> None:
    lock = asyncio.Lock()

    @safepool.site("s")
    def get_lock() -> asyncio.Lock:
        return lock

    assert get_lock() is lock
    assert isinstance(get_lock(), asyncio.Lock)


@pytest.mark.asyncio
async def test_a_getter_of_the_pool_returns_the_pool(make_pool: Any) -> None:
    pool = await make_pool()

    @safepool.site("s")
    def get_pool() -> Any:
        return pool

    got = get_pool()
    assert got is pool
    assert isinstance(got, safepool.Pool)


@pytest.mark.asyncio
async def test_attribute_writes_reach_the_acquire_context(make_pool: Any) -> None:
    pool = await make_pool()

    @safepool.site("s")
    def acquire() -> Any:
        return pool.acquire()

    ctx = acquire()
    ctx.timeout = 5
    assert ctx.timeout == 5
    async with ctx:
        pass


@pytest.mark.asyncio
async def test_held_await_and_async_with_of_a_returned_acquire_count_under_the_site(make_pool: Any) -> None:
    pool = await make_pool(max_size=2, max_site_share=1.0)

    @safepool.site("reports")
    def acquire() -> Any:
        return pool.acquire()

    con = await acquire()
    try:
        assert [lease.site for lease in pool.leases()] == ["reports"]
        async with acquire() as con2:
            assert sorted(lease.site for lease in pool.leases()) == ["reports", "reports"]
            assert current_site() is None
            assert await con2.fetchval("SELECT 1") == 1
    finally:
        await pool.release(con)
    assert pool.leases() == []
    assert current_site() is None


@pytest.mark.asyncio
async def test_held_cancelled_in_aenter_wait_and_exceptions(make_pool: Any) -> None:
    pool = await make_pool(min_size=1, max_size=1)

    @safepool.site("s")
    def acquire() -> Any:
        return pool.acquire()

    held = await pool.acquire()

    async def enter() -> None:
        async with acquire():
            pass

    task = asyncio.create_task(enter())
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await pool.release(held)
    with pytest.raises(KeyError):
        async with acquire():
            raise KeyError
    assert pool.leases() == []
    async with acquire() as con:
        assert await con.fetchval("SELECT 2") == 2


# ------------------------------------------------------------------- check


def _lines(source: str) -> list[int]:
    return [f.line for f in check_source(textwrap.dedent(source))]


def test_check_sees_a_class_attribute_alias_called_through_self() -> None:
    assert _lines("""
        pool = None

        class Repo:
            other = pool.acquire

            async def get(self):
                con = await self.other()
                return await con.fetchval("SELECT 1")
    """) == [8]


def test_check_sees_a_global_alias() -> None:
    assert _lines("""
        pool = None

        def setup():
            global acq
            acq = pool.acquire

        async def use():
            con = await acq()
            return 1
    """) == [9]


def test_check_sees_a_nonlocal_alias() -> None:
    assert _lines("""
        pool = None

        def outer():
            g = None
            def set_():
                nonlocal g
                g = pool.acquire
            async def use():
                con = await g()
                return 1
            return set_, use
    """) == [10]


def test_check_an_acquire_inside_its_release_is_not_never_released() -> None:
    findings = check_source(textwrap.dedent("""
        pool = None

        async def f():
            await pool.release(con := await pool.acquire())
    """))
    assert all(f.code != "SP002" for f in findings), [f.to_text() for f in findings]



@pytest.mark.parametrize(("source", "expected"), [
    pytest.param("""
        pool = None
        async def f():
            global acq
            acq = pool.acquire
            con = await acq()
            return 1
    """, [6], id="global-alias-called-where-assigned"),
    pytest.param("""
        pool = None
        acq = len
        def f():
            acq = pool.acquire
        async def use():
            con = await acq([])
            return 1
    """, [], id="a-local-alias-is-not-the-modules-name"),
    pytest.param("""
        pool = None
        def outer():
            g = None
            async def set_use():
                nonlocal g
                g = pool.acquire
                con = await g()
                return 1
            return set_use
    """, [8], id="nonlocal-alias-called-where-assigned"),
    pytest.param("""
        pool = None
        def outer():
            g = None
            class K:
                def set_(self):
                    nonlocal g
                    g = pool.acquire
            async def use():
                con = await g()
                return 1
            return K, use
    """, [10], id="nonlocal-alias-set-in-a-method"),
    pytest.param("""
        pool = None
        class Repo:
            other = pool.acquire
            @classmethod
            async def get(cls):
                con = await cls.other()
                return 1
    """, [7], id="class-attribute-alias-through-cls"),
    pytest.param("""
        pool = None
        async def f():
            await pool.release(await pool.acquire())
            await pool.release(connection=(con := await pool.acquire()))
    """, [], id="acquired-inside-the-release-call"),
    pytest.param("""
        pool = None
        async def f():
            print(con := await pool.acquire())
    """, [4], id="walrus-in-another-call-still-never-released"),
])
def test_check_alias_scopes_and_releases_around_the_acquire(source: str, expected: list[int]) -> None:
    assert _lines(source) == expected

def test_held_check_scoping_and_same_line_order() -> None:
    assert _lines("""
        pool = None
        acq = pool.acquire

        class Outer:
            acq = len
            class Inner:
                async def m(self):
                    con = await acq()
                    return 1

        class C:
            acq = len
            async def m(self):
                def inner():
                    return acq
                con = await acq()
                return 1

        def factory():
            acq = len
            class D:
                acq = pool.acquire
                async def m(self):
                    con = await acq()
                    return 1
            return D

        async def semi():
            con = await pool.acquire(); await pool.release(con)

        async def before(con):
            await pool.release(con); con = await pool.acquire()
            return 1
    """) == [9, 17, 30, 33]


def test_the_returned_coroutine_keeps_its_name() -> None:
    coroutine = safepool.site("s")(_plain)()
    try:
        assert coroutine.__qualname__ == "_inner"
    finally:
        inner = coroutine.cr_frame.f_locals.get("coroutine")  # the user's, which close() leaves open
        coroutine.close()
        if inner is not None:
            inner.close()
