"""Code that leaks connections: every line marked `expect: SPnnn` must be reported
by `python -m safepool check`, with that code, and nothing else in this file."""

import asyncio
import contextlib


async def customer_orders(pool, customer_id):
    # The incident's handler: the early return skips the release.
    con = await pool.acquire()  # expect: SP001 return
    customer = await con.fetchrow("SELECT * FROM customers WHERE id = $1", customer_id)
    if customer["archived"]:
        return {"customer": customer_id, "orders": []}
    orders = await con.fetch("SELECT * FROM orders WHERE customer = $1", customer_id)
    await pool.release(con)
    return {"customer": customer_id, "orders": orders}


async def raises_before_release(pool, value):
    con = await pool.acquire()  # expect: SP001 raise
    if value < 0:
        raise ValueError(value)
    await con.execute("SELECT $1", value)
    await pool.release(con)


async def exception_skips_release(pool):
    con = await pool.acquire()  # expect: SP001 exception
    await con.execute("UPDATE counters SET n = n + 1")
    await pool.release(con)


async def never_released(self_pool, app):
    con = await app.db_pool.acquire()  # expect: SP002
    return await con.fetchval("SELECT 1")


async def thrown_away(pool):
    await pool.acquire()  # expect: SP003


async def not_awaited(pool):
    pool.acquire()  # expect: SP004


async def context_never_entered(pool):
    ctx = pool.acquire()  # expect: SP004
    return ctx.timeout


async def gap_before_try(pool):
    con = await pool.acquire()  # expect: SP001 line
    await con.execute("SET search_path = app")
    try:
        await con.execute("SELECT 1")
    finally:
        await pool.release(con)


async def return_in_a_branch_before_try(pool, flag):
    con = await pool.acquire()  # expect: SP001 line+2
    if flag:
        return None
    try:
        await con.execute("SELECT 1")
    finally:
        await pool.release(con)


async def wait_for_without_release(pool):
    con = await asyncio.wait_for(pool.acquire(), timeout=5)  # expect: SP002
    await con.execute("SELECT 1")


async def walrus(pool):
    if (con := await pool.acquire()) is not None:  # expect: SP001
        await con.execute("SELECT 1")
        await pool.release(con)


@contextlib.asynccontextmanager
async def connection(pool):
    con = await pool.acquire()  # expect: SP001 yield
    yield con
    await pool.release(con)


class Repository:
    def __init__(self, pool):
        self._pool = pool

    async def count(self):
        con = await self._pool.acquire()  # expect: SP001
        n = await con.fetchval("SELECT count(*) FROM items")
        await self._pool.release(con)
        return n


async def created_here(dsn, create_pool):
    db = await create_pool(dsn)
    con = await db.acquire()  # expect: SP002
    await con.execute("SELECT 1")


async def annotated(database: "asyncpg.Pool"):  # noqa: F821
    con = await database.acquire()  # expect: SP002
    await con.execute("SELECT 1")


async def gathered_one_released(pool):
    # Two connections at once, unpacked: the second is never released (and
    # the first is lost if the second acquire fails).
    first, second = await asyncio.gather(
        pool.acquire(),  # expect: SP001
        pool.acquire(),  # expect: SP002
    )
    try:
        return await first.fetchval("SELECT 1") + await second.fetchval("SELECT 2")
    finally:
        await pool.release(first)


async def entered_by_hand(pool):
    # The context's __aenter__ acquires; nothing calls its __aexit__.
    ctx = pool.acquire()  # expect: SP002
    con = await ctx.__aenter__()
    return await con.fetchval("SELECT 1")


async def continue_skips_release(pool, jobs):
    for job in jobs:
        con = await pool.acquire()  # expect: SP001 continue
        if job.skipped:
            continue
        await con.execute("SELECT $1", job.id)
        await pool.release(con)


async def break_skips_release(pool, queue):
    while True:
        con = await pool.acquire()  # expect: SP001 break
        if queue.empty():
            break
        await con.execute("SELECT $1", queue.get_nowait())
        await pool.release(con)


async def loop_after_the_acquire_is_not_blamed(pool, rows):
    con = await pool.acquire()  # expect: SP001 exception
    for row in rows:
        if row is None:
            continue  # this loop's own `continue` stays inside the function body
        await con.execute("SELECT $1", row)
    await pool.release(con)


async def entered_by_hand_inline(pool):
    # The context object is thrown away: only a release of `con` gives it back.
    con = await pool.acquire().__aenter__()  # expect: SP002
    await con.execute("SELECT 1")


async def entered_by_hand_and_thrown_away(pool):
    await pool.acquire().__aenter__()  # expect: SP003


async def aliased_pool(app):
    store = app.state.pool
    con = await store.acquire()  # expect: SP002
    await con.execute("SELECT 1")


async def aiohttp_app_key(request):
    con = await request.app["pool"].acquire()  # expect: SP002
    return await con.fetchval("SELECT 1")


async def release_in_finally_under_an_unrelated_condition(pool, ok):
    con = await pool.acquire()  # expect: SP001 when
    try:
        await con.execute("SELECT 1")
    finally:
        if ok:
            await pool.release(con)


async def entered_inside_wait_for(pool):
    # A timeout around the context entered by hand: the context is thrown
    # away, only a release of `con` gives the connection back.
    con = await asyncio.wait_for(pool.acquire().__aenter__(), 1)  # expect: SP002
    await con.execute("SELECT 1")


async def entered_inside_wait_for_and_thrown_away(pool):
    await asyncio.wait_for(pool.acquire().__aenter__(), timeout=1)  # expect: SP003


async def shielded_inside_wait_for(pool):
    con = await asyncio.wait_for(asyncio.shield(pool.acquire()), 1)  # expect: SP002
    await con.execute("SELECT 1")


async def entered_inside_wait_for_in_a_loop(pool, jobs):
    for job in jobs:
        con = await asyncio.wait_for(pool.acquire().__aenter__(), 1)  # expect: SP001 continue
        if job.skipped:
            continue
        await con.execute("SELECT $1", job.id)
        await pool.release(con)


async def finally_after_a_statement_in_a_loop(pool, jobs):
    # The loop body's `try:` starts one statement late.
    for job in jobs:
        con = await pool.acquire()  # expect: SP001 line
        await con.execute("SELECT $1", job.schema)
        try:
            await con.execute("SELECT $1", job.id)
        finally:
            await pool.release(con)


async def release_in_a_lambda_before_continue(pool, jobs, later):
    # The lambda releases later, if ever: the `continue` leaves holding it.
    for job in jobs:
        con = await pool.acquire()  # expect: SP001 line+3
        if job.skipped:
            later.append(lambda con=con: pool.release(con))
            continue
        try:
            await con.execute("SELECT $1", job.id)
        finally:
            await pool.release(con)


async def release_in_a_nested_function_before_return(pool, early):
    # give_back() is never called: the return leaves holding the connection.
    con = await pool.acquire()  # expect: SP001 return
    if early:
        async def give_back():
            await pool.release(con)
        return None
    await con.execute("SELECT 1")
    await pool.release(con)


async def test_acquire_then_something_raises(self, pool):
    # Not the statement expected to raise: the acquire got a connection.
    with self.assertRaises(ValueError):
        await pool.acquire()  # expect: SP003
        int("x")


async def acquired_in_an_if_then_awaited_before_the_try(pool, need):
    con = None
    if need:
        con = await pool.acquire()  # expect: SP001 line
        await con.execute("SET search_path = app")
    try:
        await con.execute("SELECT 1")
    finally:
        if con is not None:
            await pool.release(con)


async def acquired_again_after_the_release(pool):
    con = await pool.acquire()
    try:
        await con.execute("SELECT 1")
    finally:
        await pool.release(con)
    con = await pool.acquire()  # expect: SP001
    await con.execute("SELECT 2")


async def used_once_and_thrown_away(pool):
    return await (await pool.acquire()).fetchval("SELECT 1")  # expect: SP003


async def acquired_on_each_turn_released_after_the_loop(pool, jobs):
    con = None
    try:
        for job in jobs:
            con = await pool.acquire()  # expect: SP001
            await con.execute("SELECT $1", job)
    finally:
        if con is not None:
            await pool.release(con)


async def gathered_both_released_but_lost_if_one_fails(pool):
    # If the second acquire times out, gather() raises and the first
    # connection, acquired all the same, is returned to nobody.
    first, second = await asyncio.gather(pool.acquire(), pool.acquire())  # expect: SP001
    try:
        return await first.fetchval("SELECT 1") + await second.fetchval("SELECT 2")
    finally:
        await pool.release(first)
        await pool.release(second)


async def gathered_with_another_query(pool, other_pool):
    con, count = await asyncio.gather(pool.acquire(), other_pool.fetchval("SELECT 1"))  # expect: SP001
    try:
        await con.execute("SELECT $1", count)
    finally:
        await pool.release(con)


async def acquire_errors_mapped_but_a_query_in_the_same_try(pool):
    # The SET can fail after the acquire: the handler then returns holding it.
    try:
        con = await pool.acquire()  # expect: SP001 line
        await con.execute("SET statement_timeout = 1000")
    except OSError:
        return None
    try:
        return await con.fetchval("SELECT 1")
    finally:
        await pool.release(con)


async def acquire_errors_mapped_but_the_finally_awaits(pool, metrics):
    try:
        con = await pool.acquire()  # expect: SP001 line+4
    except OSError:
        return None
    finally:
        await metrics.flush()
    try:
        return await con.fetchval("SELECT 1")
    finally:
        await pool.release(con)


async def acquire_aliased_to_a_name(pool):
    # `acq = pool.acquire`: calling the alias acquires all the same.
    acq = pool.acquire
    con = await acq()  # expect: SP002
    await con.execute("SELECT 1")


async def acquire_aliased_with_its_timeout(self):
    from functools import partial

    acquire = partial(self.pool.acquire, timeout=2)
    con = await acquire()  # expect: SP001 return
    row = await con.fetchrow("SELECT 1 AS archived")
    if row["archived"]:
        return None
    await self.pool.release(con)
    return row


async def acquire_aliased_to_a_lambda(pool):
    get = lambda: pool.acquire(timeout=1)  # noqa: E731
    con = await get()  # expect: SP002
    await con.execute("SELECT 1")


class AcquireAliasedOnTheInstance:
    def __init__(self, pool):
        self._acquire = pool.acquire

    async def fetch(self):
        con = await self._acquire()  # expect: SP002
        return await con.fetchval("SELECT 1")


async def acquire_alias_called_in_a_nested_function(pool):
    acq = pool.acquire

    async def inner():
        con = await acq()  # expect: SP002
        await con.execute("SELECT 1")

    await inner()


async def acquired_in_a_conditional_expression(pool, need):
    con = await pool.acquire() if need else None  # expect: SP002
    if con is not None:
        await con.execute("SELECT 1")


async def acquired_from_one_of_two_pools(primary_pool, replica_pool, write):
    con = await (primary_pool.acquire() if write else replica_pool.acquire())  # expect: SP002
    await con.execute("SELECT 1")


async def acquired_from_an_item_of_pools(self):
    # A string key names the item (`app["pool"]`); `pools["primary"]` is an
    # item of pools all the same.
    con = await self.pools["primary"].acquire()  # expect: SP002
    await con.execute("SELECT 1")


async def finally_awaits_before_the_release(pool):
    # A failing UNLISTEN (the connection broke) or a cancellation there
    # skips the release.
    con = await pool.acquire()  # expect: SP001 skipped
    try:
        await con.execute("LISTEN jobs")
    finally:
        await con.execute("UNLISTEN *")
        await pool.release(con)


async def finally_awaits_before_the_release_under_an_if(pool):
    con = None
    try:
        con = await pool.acquire()  # expect: SP001 skipped
        await con.execute("SELECT 1")
    finally:
        if con is not None:
            await con.reset()
            await pool.release(con)


async def finally_catches_exception_only_before_the_release(pool, log):
    # A cancellation of the UNLISTEN is not an Exception: it skips the release.
    con = await pool.acquire()  # expect: SP001 skipped
    try:
        await con.execute("LISTEN jobs")
    finally:
        try:
            await con.execute("UNLISTEN *")
        except Exception:
            log.exception("unlisten")
        await pool.release(con)


async def connection_replaced_inside_the_try(pool):
    # The stale connection is replaced, not released: the `finally:` gives
    # back the new one only.
    con = await pool.acquire()  # expect: SP001 again
    try:
        if con.is_closed():
            con = await pool.acquire()
        await con.execute("SELECT 1")
    finally:
        await pool.release(con)


async def connection_name_reused_by_a_loop(pool, others):
    con = await pool.acquire()  # expect: SP001 again
    try:
        for con in others:
            await con.execute("SELECT 1")
    finally:
        await pool.release(con)


async def connection_name_reused_by_async_with(pool, replica_pool):
    con = await pool.acquire()  # expect: SP001 again
    try:
        async with replica_pool.acquire() as con:
            await con.execute("SELECT 1")
    finally:
        await pool.release(con)


async def two_acquires_into_one_name_in_one_try(pool):
    try:
        con = await pool.acquire()  # expect: SP001 again
        await con.execute("SELECT 1")
        con = await pool.acquire()
        await con.execute("SELECT 2")
    finally:
        await pool.release(con)


async def fallback_acquire_then_a_query_before_the_try(pool, PoolTimeoutError):
    try:
        con = await pool.acquire(timeout=0.1)
    except PoolTimeoutError:
        con = await pool.acquire(timeout=30)  # expect: SP001 line
        await con.execute("SET statement_timeout = 1000")
    try:
        await con.execute("SELECT 1")
    finally:
        await pool.release(con)


async def finally_closes_another_object_before_the_release(pool, session):
    con = await pool.acquire()  # expect: SP001 skipped
    try:
        await con.execute("SELECT 1")
    finally:
        await session.close()
        await pool.release(con)


async def db_session_middleware(request, call_next):
    # Stored on the request and released in this function, not in `finally:`:
    # an exception in the handler leaks it.
    request.state.con = await request.app.state.pool.acquire()  # expect: SP001 exception
    response = await call_next(request)
    await request.app.state.pool.release(request.state.con)
    return response


class ConnectionOnTheInstance:
    async def run(self):
        self.con = await self.pool.acquire()  # expect: SP001 return
        if await self.con.fetchval("SELECT 1"):
            return 1
        await self.pool.release(self.con)
        return 0


async def acquired_by_a_task_nobody_awaits(pool):
    asyncio.ensure_future(pool.acquire())  # expect: SP003


async def gathered_from_a_generator_and_dropped(pool):
    # Warming the pool up: three connections acquired and never released.
    await asyncio.gather(*(pool.acquire() for _ in range(3)))  # expect: SP003


async def acquire_context_awaited_later(pool):
    ctx = pool.acquire(timeout=1)  # expect: SP001 return
    con = await ctx
    if await con.fetchval("SELECT 1"):
        return None
    await pool.release(con)


async def released_when_a_flag_set_too_late_says_so(pool):
    # The SET can fail before the flag is set: the connection is then kept.
    acquired = False
    try:
        con = await pool.acquire()  # expect: SP001 when
        await con.execute("SET statement_timeout = 1000")
        acquired = True
    finally:
        if acquired:
            await pool.release(con)


async def release_skipped_for_a_closed_connection(pool):
    # A connection the server closed still holds its pool slot (asyncpg's
    # pool and safepool alike) until it is released: this leaks the slot.
    con = None
    try:
        con = await pool.acquire()  # expect: SP001 when
        await con.execute("SELECT 1")
    finally:
        if con is not None and not con.is_closed():
            await pool.release(con)
