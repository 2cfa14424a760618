"""Correct code: `python -m safepool check` must report nothing here."""

import asyncio
import contextlib
import functools

import pytest
import pytest_asyncio

import safepool


async def with_context_manager(pool):
    async with pool.acquire() as con:
        return await con.fetchval("SELECT 1")


async def with_context_manager_and_timeout(pool):
    async with pool.acquire(timeout=2) as con, con.transaction():
        await con.execute("SELECT 1")


async def release_in_finally(pool):
    con = await pool.acquire()
    try:
        return await con.fetchval("SELECT 1")
    finally:
        await pool.release(con)


async def acquire_inside_try(pool):
    con = None
    try:
        con = await pool.acquire()
        await con.execute("SELECT 1")
    finally:
        if con is not None:
            await pool.release(con)


async def exit_stack(pool):
    async with contextlib.AsyncExitStack() as stack:
        con = await stack.enter_async_context(pool.acquire())
        await con.execute("SELECT 1")


async def exit_stack_callback(pool):
    async with contextlib.AsyncExitStack() as stack:
        con = await pool.acquire()
        stack.push_async_callback(pool.release, con)
        await con.execute("SELECT 1")


async def context_variable(pool):
    ctx = pool.acquire(timeout=5)
    async with ctx as con:
        await con.execute("SELECT 1")


def connection(pool):
    # A wrapper: the caller uses it with `async with`.
    return pool.acquire()


async def hand_over(pool):
    # Ownership moves to the caller.
    con = await pool.acquire()
    await con.execute("SET search_path = app")
    return con


class Session:
    def __init__(self, pool):
        self.pool = pool
        self.con = None

    async def open(self):
        # Stored on the object; released by close(). Not followed.
        self.con = await self.pool.acquire()

    async def close(self):
        await self.pool.release(self.con)


@pytest_asyncio.fixture
async def con(pool):
    # pytest resumes a fixture after the test even when the test failed.
    con = await pool.acquire()
    yield con
    await pool.release(con)


async def close_instead_of_release(pool):
    con = await pool.acquire()
    try:
        await con.execute("SELECT 1")
    finally:
        await con.close()


async def locks_are_not_pools(lock, pool_lock):
    await lock.acquire()
    await pool_lock.acquire()
    lock.release()
    pool_lock.release()


async def suppressed(pool):
    con = await pool.acquire()  # safepool: ignore (released by the request middleware)
    return con.fetchval("SELECT 1")


async def release_by_keyword(pool):
    con = await pool.acquire()
    try:
        await con.execute("SELECT 1")
    finally:
        await pool.release(connection=con)


async def walrus_then_try_finally(pool):
    # The `try:` first in the body of the `if` that acquires: nothing between.
    if (con := await pool.acquire()) is not None:
        try:
            return await con.fetchval("SELECT 1")
        finally:
            await pool.release(con)


async def gathered_with_return_exceptions(pool):
    # Every result comes back, connection or exception: each connection is released.
    first, second = await asyncio.gather(pool.acquire(), pool.acquire(), return_exceptions=True)
    try:
        if isinstance(first, BaseException) or isinstance(second, BaseException):
            raise LookupError("no connection")
        return await first.fetchval("SELECT 1") + await second.fetchval("SELECT 2")
    finally:
        if not isinstance(first, BaseException):
            await pool.release(first)
        if not isinstance(second, BaseException):
            await pool.release(second)


async def entered_and_exited_by_hand(pool):
    ctx = pool.acquire()
    con = await ctx.__aenter__()
    try:
        return await con.fetchval("SELECT 1")
    finally:
        await ctx.__aexit__(None, None, None)


async def continue_inside_async_with(pool, jobs):
    for job in jobs:
        async with pool.acquire() as con:
            if job.skipped:
                continue
            await con.execute("SELECT $1", job.id)


async def continue_inside_try_finally(pool, jobs):
    for job in jobs:
        con = await pool.acquire()
        try:
            if job.skipped:
                continue
            await con.execute("SELECT $1", job.id)
        finally:
            await pool.release(con)


async def released_before_continue(pool, jobs):
    for job in jobs:
        con = await pool.acquire()
        if job.skipped:
            await pool.release(con)
            continue
        try:
            await con.execute("SELECT $1", job.id)
        finally:
            await pool.release(con)


async def release_in_finally_under_the_not_none_guard(pool):
    con = None
    try:
        con = await pool.acquire()
        await con.execute("SELECT 1")
    finally:
        if con is not None:
            await pool.release(con)


async def release_in_finally_in_the_else_of_a_none_test(pool):
    con = None
    try:
        con = await pool.acquire()
        await con.execute("SELECT 1")
    finally:
        if con is None:
            pass
        else:
            await pool.release(con)


async def release_in_finally_on_both_branches(pool, fast):
    con = await pool.acquire()
    try:
        await con.execute("SELECT 1")
    finally:
        if fast:
            await pool.release(con, timeout=1)
        else:
            await pool.release(con)


class UnitOfWork:
    def __init__(self, con):
        self.con = con


async def returned_wrapped_in_an_object(pool):
    # Ownership leaves with the object: not followed (docs: limits).
    con = await pool.acquire()
    return UnitOfWork(con)


async def stored_in_a_tuple_in_a_cache(pool, cache):
    con = await pool.acquire()
    cache["primary"] = (con, pool)


async def aliased_pool_with_async_with(app):
    database = app.state.pool
    async with database.acquire() as con:
        await con.execute("SELECT 1")


async def entered_inside_wait_for_released_in_a_loop(pool, jobs):
    for job in jobs:
        con = await asyncio.wait_for(pool.acquire().__aenter__(), 1)
        try:
            await con.execute("SELECT $1", job.id)
        finally:
            await pool.release(con)


async def shielded_inside_wait_for_released_in_a_loop(pool, jobs):
    async for job in jobs:
        con = await asyncio.wait_for(asyncio.shield(pool.acquire()), 1)
        try:
            if job.skipped:
                continue
            await con.execute("SELECT $1", job.id)
        except LookupError:
            break
        finally:
            await pool.release(con)


async def released_in_a_loop_then_returns(pool, jobs):
    for job in jobs:
        con = await pool.acquire()
        try:
            await con.execute("SELECT $1", job.id)
        finally:
            await pool.release(con)
        if job.last:
            return job
    raise LookupError("no last job")


async def nested_function_between_the_acquire_and_the_try(pool):
    # The nested function's await runs when it is called, inside the `try:`.
    con = await pool.acquire()

    async def pause():
        await asyncio.sleep(0)

    try:
        await pause()
        await con.execute("SELECT 1")
    finally:
        await pool.release(con)


async def test_acquire_times_out(pool):
    # The block's last statement is expected to raise: no connection to release.
    with pytest.raises(TimeoutError):
        await pool.acquire(timeout=0.1)
    with pytest.raises(TimeoutError, match="timed out"):
        con = await pool.acquire(timeout=0.1)  # noqa: F841


class AcquireTimesOut:
    async def test_it(self):
        with self.assertRaises(TimeoutError):
            await self.pool.acquire(timeout=0.1)


async def acquired_only_when_needed(pool, need):
    # The acquire is the last statement of an `if`; the `try:` follows the `if`.
    con = None
    if need:
        con = await pool.acquire()
    try:
        if con is not None:
            await con.execute("SELECT 1")
    finally:
        if con is not None:
            await pool.release(con)


async def acquired_in_an_elif_branch(pool, cached, replica):
    if cached is not None:
        con = None
    elif replica:
        con = await pool.acquire(timeout=1)
    else:
        con = await pool.acquire()
    try:
        return cached or await con.fetchval("SELECT 1")
    finally:
        if con is not None:
            await pool.release(con)


async def exit_stack_callback_lambda(pool):
    # The stack calls the lambda and awaits the release it returns.
    async with contextlib.AsyncExitStack() as stack:
        con = await pool.acquire()
        stack.push_async_callback(lambda: pool.release(con, timeout=5))
        await con.execute("SELECT 1")


async def gathered_into_a_list_released_item_by_item(pool):
    cons = await asyncio.gather(pool.acquire(), pool.acquire())
    try:
        return [await con.fetchval("SELECT 1") for con in cons]
    finally:
        for con in cons:
            await pool.release(con)


async def retry_loop_inside_try(pool):
    # The loop ends once an acquire succeeds: one connection, released in `finally:`.
    con = None
    try:
        for _ in range(3):
            try:
                con = await pool.acquire(timeout=1)
            except TimeoutError:
                continue
            break
        if con is not None:
            await con.execute("SELECT 1")
    finally:
        if con is not None:
            await pool.release(con)


async def retry_while_no_connection(pool):
    con = None
    try:
        while con is None:
            try:
                con = await pool.acquire(timeout=1)
            except TimeoutError:
                await asyncio.sleep(1)
        await con.execute("SELECT 1")
    finally:
        if con is not None:
            await pool.release(con)


class Crawler:
    # Semaphores named like pools: bound to a Semaphore(), they are not pools.
    def __init__(self):
        self.worker_pool = asyncio.Semaphore(5)

    async def fetch(self, url, session):
        await self.worker_pool.acquire()
        try:
            return await session.get(url)
        finally:
            self.worker_pool.release()


async def limited(task_pool: asyncio.BoundedSemaphore, work):
    await task_pool.acquire()
    try:
        await work()
    finally:
        task_pool.release()


class HTTPException(Exception):
    pass


async def acquire_errors_mapped_before_the_try(pool):
    # A handler runs only when the acquire raised: no connection to release.
    try:
        con = await pool.acquire()
    except (safepool.PoolOverloadedError, safepool.PoolTimeoutError):
        raise HTTPException(503) from None
    try:
        return await con.fetchval("SELECT 1")
    finally:
        await pool.release(con)


async def acquire_error_returns_before_the_try(pool):
    try:
        con = await pool.acquire()
    except safepool.PoolTimeoutError:
        return None
    try:
        return await con.fetchval("SELECT 1")
    finally:
        await pool.release(con)


async def acquire_error_handled_try_in_else(pool):
    try:
        con = await pool.acquire()
    except safepool.PoolTimeoutError:
        return None
    else:
        try:
            return await con.fetchval("SELECT 1")
        finally:
            await pool.release(con)


async def acquire_retried_on_connect_errors(pool):
    for _ in range(3):
        try:
            con = await pool.acquire()
        except OSError:
            continue
        try:
            return await con.fetchval("SELECT 1")
        finally:
            await pool.release(con)


async def acquire_alias_used_correctly(pool):
    acq = functools.partial(pool.acquire, timeout=2)
    async with acq() as con:
        await con.execute("SELECT 1")
    con = await acq()
    try:
        await con.execute("SELECT 1")
    finally:
        await pool.release(con)


async def a_lambda_alias_used_correctly(pool):
    get = lambda: pool.acquire(timeout=1)  # noqa: E731
    async with get() as con:
        await con.execute("SELECT 1")


async def a_lambda_alias_does_not_leak_into_other_functions(queue):
    # `get` above is an acquire in that function only: `queue.get()` and a
    # `get()` of this function are not acquires.
    get = queue.get_nowait
    job = await queue.get()
    return job, get()


async def acquired_in_a_conditional_expression_and_released(pool, need):
    con = await pool.acquire() if need else None
    try:
        if con is not None:
            await con.execute("SELECT 1")
    finally:
        if con is not None:
            await pool.release(con)


async def an_item_of_pools_used_correctly(self):
    async with self.pools["primary"].acquire() as con:
        await con.execute("SELECT 1")


async def finally_awaits_in_a_try_of_its_own_before_the_release(pool):
    con = await pool.acquire()
    try:
        await con.execute("LISTEN jobs")
    finally:
        try:
            await con.execute("UNLISTEN *")
        finally:
            await pool.release(con)


async def finally_releases_first_then_awaits(pool, metrics, log):
    con = await pool.acquire()
    try:
        await con.execute("SELECT 1")
    finally:
        log.info("done")  # not awaited: not a step the check follows
        await pool.release(con)
        await metrics.flush()


async def finally_releases_two_connections(pool):
    first = await pool.acquire()
    try:
        second = await pool.acquire()
        try:
            await second.execute("SELECT 1")
        finally:
            await pool.release(second)
    finally:
        await pool.release(first)


async def connection_replaced_after_its_release(pool):
    con = await pool.acquire()
    try:
        if con.is_closed():
            await pool.release(con)
            con = await pool.acquire()
        await con.execute("SELECT 1")
    finally:
        await pool.release(con)


async def connection_name_bound_in_the_other_branch(pool, need):
    try:
        if need:
            con = await pool.acquire()
        else:
            con = None
        if con is not None:
            await con.execute("SELECT 1")
    finally:
        if con is not None:
            await pool.release(con)


async def connection_name_bound_when_the_acquire_failed(pool):
    # The handler runs only when the first acquire failed: it holds nothing.
    try:
        con = await pool.acquire(timeout=0.1)
    except safepool.PoolTimeoutError:
        con = await pool.acquire(timeout=30)
    try:
        await con.execute("SELECT 1")
    finally:
        await pool.release(con)


async def connection_name_bound_after_the_finally(pool):
    con = await pool.acquire()
    try:
        await con.execute("SELECT 1")
    finally:
        await pool.release(con)
        con = None
    con = await pool.acquire()
    try:
        await con.execute("SELECT 2")
    finally:
        await pool.release(con)


async def db_session_middleware(request, call_next):
    request.state.con = await request.app.state.pool.acquire()
    try:
        return await call_next(request)
    finally:
        await request.app.state.pool.release(request.state.con)


class UnitOfWorkKeepsItsConnection:
    async def __aenter__(self):
        # Kept on the instance for __aexit__; released here only if the
        # setup failed.
        self.con = await self.pool.acquire()
        try:
            await self.con.execute("SET application_name = 'uow'")
        except BaseException:
            await self.pool.release(self.con)
            raise
        return self

    async def __aexit__(self, *exc):
        await self.pool.release(self.con)

    async def renew(self):
        # The old connection released, a new one kept: not a leak.
        await self.pool.release(self.con)
        self.con = await self.pool.acquire()


class ConnectionKeptWhenItWorks:
    async def reconnect(self):
        # Released only when the new connection is no good: otherwise kept.
        self.con = await self.pool.acquire()
        if not await self.ping():
            await self.pool.release(self.con)
            self.con = None


async def gathered_from_a_generator_into_a_list_and_released(pool):
    # Into one name: not followed (docs/testing.md); kept, not dropped.
    cons = await asyncio.gather(*(pool.acquire() for _ in range(3)))
    try:
        return len(cons)
    finally:
        for con in cons:
            await pool.release(con)


async def a_task_kept_and_awaited(pool):
    task = asyncio.ensure_future(pool.acquire())
    con = await task
    try:
        await con.execute("SELECT 1")
    finally:
        await pool.release(con)


async def connection_name_reused_inside_a_comprehension(pool, others):
    # A comprehension's name is its own: `con` outside it is the connection.
    con = await pool.acquire()
    try:
        return [con.get_server_pid() for con in others]
    finally:
        await pool.release(con)


async def acquire_context_awaited_later_and_released(pool):
    ctx = pool.acquire(timeout=1)
    con = await ctx
    try:
        return await con.fetchval("SELECT 1")
    finally:
        await pool.release(con)


acquire_from_pool = functools.partial(safepool.Pool.acquire)


async def a_parameter_shadows_a_module_level_acquire_alias(acquire_from_pool):
    # A name of its own here: not the module's alias of a pool's acquire.
    await acquire_from_pool()


async def released_when_a_flag_set_right_after_the_acquire_says_so(pool):
    acquired = False
    try:
        con = await pool.acquire()
        acquired = True
        await con.execute("SELECT 1")
    finally:
        if acquired:
            await pool.release(con)
