"""The static check's known limits, pinned by tests: `expect:` marks what it
reports (including false positives), `missed:` what it cannot see."""

import asyncio
import contextlib


async def released_in_except_and_after(pool):
    # Correct, but the release is not in a `finally:`: reported (false positive).
    con = await pool.acquire()  # expect: SP001
    try:
        await con.execute("SELECT 1")
    except BaseException:
        await pool.release(con)
        raise
    await pool.release(con)


async def helper_releases(pool, release_later):
    # Released by another function: reported (false positive).
    con = await pool.acquire()  # expect: SP002
    try:
        await con.execute("SELECT 1")
    finally:
        await release_later(pool, con)


async def not_named_like_a_pool(db):
    # The receiver's name does not look like a pool: not reported.
    con = await db.acquire()  # missed: no pool-like name
    await con.execute("SELECT 1")


def returns_a_connection_to_a_caller_that_leaks(pool):
    # Returned connections are not followed into the caller.
    return pool.acquire()


async def caller(pool):
    con = await returns_a_connection_to_a_caller_that_leaks(pool)  # missed: not followed
    await con.execute("SELECT 1")


async def stored_on_an_object(pool, session):
    session.con = await pool.acquire()  # missed: stored on an object


async def exit_stack_closed_early(pool):
    stack = contextlib.AsyncExitStack()
    con = await stack.enter_async_context(pool.acquire())  # missed: the stack is never closed
    await con.execute("SELECT 1")


async def unpacked_with_another_value(pool):
    # An acquire unpacked with other values is not followed.
    con, n = await pool.acquire(), 1  # missed: unpacked
    await con.execute("SELECT $1", n)


async def acquired_in_a_task(pool):
    # An acquire run as a task awaited later: the task is not followed.
    task = asyncio.ensure_future(pool.acquire())  # missed: run as a task
    con = await task
    await con.execute("SELECT 1")


async def acquired_in_a_comprehension(pool):
    # Acquires in a comprehension land in a container: not followed.
    cons = [await pool.acquire() for _ in range(3)]  # missed: in a comprehension
    await cons[0].execute("SELECT 1")


async def gathered_into_one_list(pool):
    # `asyncio.gather()`'s result is a list of connections, released item by
    # item if at all: not followed, as for a comprehension.
    cons = await asyncio.gather(pool.acquire(), pool.acquire())  # missed: gathered into a list
    await cons[0].execute("SELECT 1")


async def conditional_receiver(pool_a, replica, primary):
    # `(a if x else b).acquire()`: the receiver has no name to judge.
    con = await (replica if primary is None else primary).acquire()  # missed: conditional receiver
    await con.execute("SELECT 1")


_CON = None


async def stored_in_a_global(pool):
    # A global (or nonlocal) name outlives the function, as an attribute does.
    global _CON
    _CON = await pool.acquire()  # missed: stored in a global


def connection_kept_by_a_closure(pool):
    con = None

    async def grab():
        nonlocal con
        con = await pool.acquire()  # missed: kept in the enclosing function

    async def drop():
        await pool.release(con)

    return grab, drop


async def passed_straight_to_a_call(pool, use):
    # The connection goes to another function, which may release it or not:
    # not followed.
    return await use(await pool.acquire())  # missed: passed to a call


async def rebound_to_another_name(pool):
    # The connection goes on under another local name, which the check does
    # not follow (review h228: the release under the alias was reported):
    # a leak under the alias is missed too.
    con = await pool.acquire()  # missed: rebound to another name
    conn = con
    return await conn.fetchval("SELECT 1")
