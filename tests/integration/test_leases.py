"""Lease timeouts, leak-suspect warnings and reclamation of abandoned
connections, on a real PostgreSQL."""

from __future__ import annotations

import asyncio
import gc
import logging
import warnings
from typing import Any

import asyncpg
import pytest

import safepool
from safepool import LeaseExpiredError, ManualClock
from tests._util import line_of, looked_at, until

pytestmark = pytest.mark.asyncio

NOT_CAPTURED = "(acquire stack not captured: set capture_stack=True, or leak_warning_after without capture_stack=False)"


# ---------------------------------------------------------------- lease timeout


async def test_expired_lease_is_taken_back_and_holder_gets_a_clear_error(
    pools: Any, caplog: pytest.LogCaptureFixture
) -> None:
    clock = ManualClock()
    pool = await pools(min_size=1, max_size=1, lease_timeout=30.0, clock=clock)
    caplog.set_level(logging.ERROR, logger="safepool.leaks")
    con = await pool.acquire()
    await con.execute("SET application_name = 'dirty'")
    waiter = asyncio.ensure_future(pool.acquire(timeout=None))
    await until(lambda: pool.stats().waiting == 1)
    clock.advance(29.9)
    await asyncio.sleep(0)
    assert not waiter.done()
    clock.advance(0.2)  # past the deadline: taken back, reset, handed to the waiter
    second = await asyncio.wait_for(waiter, 5)
    assert await second.fetchval("SHOW application_name") != "dirty"  # it was reset
    with pytest.raises(LeaseExpiredError, match=r"held 30\.\d+s, lease_timeout is 30\.000s") as info:
        await con.fetchval("SELECT 1")
    assert isinstance(info.value, asyncpg.InterfaceError)
    await pool.release(con)  # releasing an expired lease is a harmless no-op
    await pool.release(second)
    stats = pool.stats()
    assert stats.leases_expired == 1 and stats.in_use == 0
    # Without stack capture (the default here) the report says what it
    # does not know, why, and how to learn it ("task ?" before: a new user's
    # trial; then "task unknown", which read as if the pool had lost track).
    [report] = [r.getMessage() for r in caplog.records if getattr(r, "event", None) == "lease_expired"]
    assert "; task not recorded (stack capture is off); taking the connection back" in report, report
    assert NOT_CAPTURED in report, report


async def test_lease_released_in_time_is_untouched(pools: Any) -> None:
    clock = ManualClock()
    pool = await pools(lease_timeout=10.0, clock=clock)
    async with pool.acquire() as con:
        clock.advance(9.0)
        assert await con.fetchval("SELECT 1") == 1
    clock.advance(100.0)
    await asyncio.sleep(0)
    assert pool.stats().leases_expired == 0


async def test_per_acquire_lease_timeout_overrides_the_pool_default(pools: Any) -> None:
    clock = ManualClock()
    pool = await pools(lease_timeout=100.0, clock=clock)
    short = await pool.acquire(lease_timeout=1.0)
    unlimited = await pool.acquire(lease_timeout=None)
    clock.advance(1.5)
    await until(lambda: pool.stats().leases_expired == 1)
    with pytest.raises(LeaseExpiredError):
        await short.fetchval("SELECT 1")
    clock.advance(1000.0)
    await asyncio.sleep(0)
    assert await unlimited.fetchval("SELECT 2") == 2
    await pool.release(unlimited)


@pytest.mark.realtime
async def test_long_query_past_the_deadline_is_cancelled_on_the_server(
    pools: Any, pg_dsn: str, app_name: str
) -> None:
    pool = await pools(min_size=1, max_size=1, lease_timeout=0.3)
    con = await pool.acquire()
    pid = con.get_server_pid()
    started = asyncio.get_running_loop().time()
    with pytest.raises(asyncpg.QueryCanceledError):
        await con.execute("SELECT pg_sleep(30)")
    assert asyncio.get_running_loop().time() - started < 5
    admin = await asyncpg.connect(pg_dsn)
    try:
        running = await admin.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE pid = $1 AND query LIKE '%pg_sleep(30)%' AND state = 'active'",
            pid,
        )
    finally:
        await admin.close()
    assert running == 0
    with pytest.raises(LeaseExpiredError):
        await con.fetchval("SELECT 1")
    async with pool.acquire(timeout=5) as again:
        assert again.get_server_pid() == pid  # cancelled, reset and reused, not closed
        assert await again.fetchval("SELECT 1") == 1


async def test_expired_lease_invalidates_transactions_and_statements(pools: Any) -> None:
    clock = ManualClock()
    pool = await pools(min_size=1, max_size=1, lease_timeout=5.0, clock=clock)
    con = await pool.acquire()
    stmt = await con.prepare("SELECT 1")
    tx = con.transaction()
    await tx.start()
    clock.advance(6.0)
    await until(lambda: pool.stats().idle == 1)
    with pytest.raises(asyncpg.InterfaceError):
        await stmt.fetchval()
    with pytest.raises(asyncpg.InterfaceError):
        await tx.commit()
    async with pool.acquire() as fresh:
        assert not fresh.is_in_transaction()


# ----------------------------------------------------------------- leak reports


async def test_leak_suspect_warning_names_the_acquire_line(pools: Any, caplog: pytest.LogCaptureFixture) -> None:
    clock = ManualClock()
    pool = await pools(leak_warning_after=2.0, name="suspects", clock=clock)
    caplog.set_level(logging.WARNING, logger="safepool.leaks")
    con = await pool.acquire()  # LEAK-SUSPECT-SITE
    clock.advance(1.0)
    assert not caplog.records
    clock.advance(1.5)
    [record] = [r for r in caplog.records if getattr(r, "event", None) == "leak_suspect"]
    assert f"test_leases.py:{line_of(__file__, 'LEAK-SUSPECT-SITE')}" in record.acquired_at  # type: ignore[attr-defined]
    assert "LEAK-SUSPECT-SITE" in record.getMessage()  # the source line is quoted
    assert record.pool == "suspects"  # type: ignore[attr-defined]
    [info] = pool.leases()
    assert info.age == pytest.approx(2.5) and info.acquired_at and "test_leases.py" in info.acquired_at
    await pool.release(con)
    assert pool.stats().leak_warnings == 1


async def test_a_suspect_report_with_capture_turned_off_does_not_ask_for_leak_warning_after(
    pools: Any, caplog: pytest.LogCaptureFixture
) -> None:
    # leak_warning_after set, capture_stack=False: the report's hint said
    # "set leak_warning_after or capture_stack=True", the first already set.
    clock = ManualClock()
    pool = await pools(leak_warning_after=2.0, capture_stack=False, clock=clock)
    assert not pool.capture_stack
    caplog.set_level(logging.WARNING, logger="safepool.leaks")
    con = await pool.acquire()
    clock.advance(2.5)
    [report] = [r.getMessage() for r in caplog.records if getattr(r, "event", None) == "leak_suspect"]
    assert "task not recorded (stack capture is off)" in report, report
    assert NOT_CAPTURED in report, report
    assert "set leak_warning_after or" not in report, report
    await pool.release(con)


async def test_gc_of_a_forgotten_proxy_reclaims_and_reports(pools: Any, caplog: pytest.LogCaptureFixture) -> None:
    pool = await pools(min_size=1, max_size=1, capture_stack=True)
    caplog.set_level(logging.WARNING, logger="safepool.leaks")

    async def handler_that_forgets() -> None:
        con = await pool.acquire()  # FORGOTTEN-SITE
        await con.execute("SET application_name = 'leaky'")

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        await handler_that_forgets()
        gc.collect()
        await until(lambda: pool.stats().idle == 1)
    assert pool.stats().leaks_detected == 1
    assert any(issubclass(w.category, ResourceWarning) and "FORGOTTEN-SITE" in str(w.message) for w in caught)
    [record] = [r for r in caplog.records if getattr(r, "event", None) == "leak"]
    assert f"test_leases.py:{line_of(__file__, 'FORGOTTEN-SITE')}" in record.acquired_at  # type: ignore[attr-defined]
    async with pool.acquire(timeout=2) as con:
        assert await con.fetchval("SHOW application_name") != "leaky"


@pytest.mark.parametrize("runner", ["wait_for", "gather", "ensure_future"])
async def test_acquire_run_as_a_task_of_its_own_names_its_caller(pools: Any, runner: str) -> None:
    """asyncio.gather(), ensure_future() and (before Python 3.12) wait_for()
    run the acquire as a task of its own, whose stack below the acquire is
    the event loop's: the acquire site is the caller of pool.acquire(), for
    leases(), leak reports and bulkhead sites alike, not whatever runs the loop."""
    pool = await pools(min_size=1, max_size=2, capture_stack=True, max_site_share=1)

    async def orders() -> Any:
        if runner == "wait_for":
            return await asyncio.wait_for(pool.acquire(), 5)  # TASK-RUN-SITE-wait_for
        if runner == "gather":
            [con] = await asyncio.gather(pool.acquire())  # TASK-RUN-SITE-gather
            return con
        return await asyncio.ensure_future(pool.acquire())  # TASK-RUN-SITE-ensure_future

    con = await orders()
    [info] = pool.leases()
    assert info.acquired_at is not None
    assert info.acquired_at.endswith(f"test_leases.py:{line_of(__file__, f'TASK-RUN-SITE-{runner}')} in orders"), info.acquired_at
    assert info.site is not None and info.site.endswith(".orders"), info.site
    await pool.release(con)

    # A pool method run as a task's own coroutine: its caller is on no stack,
    # so the method is named, not the code that runs the loop.
    query = asyncio.ensure_future(pool.fetchval("SELECT pg_sleep(0.2)"))
    await until(lambda: pool.stats().in_use == 1)
    [info] = pool.leases()
    assert info.acquired_at is not None and info.acquired_at.endswith("in fetchval"), info.acquired_at
    assert info.site == "safepool.pool.Pool.fetchval"
    await query


async def test_exception_path_leak_is_reclaimed(pools: Any) -> None:
    pool = await pools(min_size=1, max_size=1)

    async def handler(fail: bool) -> int:
        con = await pool.acquire()
        if fail:
            raise RuntimeError("early exit skips the release")  # the postmortem's bug
        await pool.release(con)
        return 1

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        with pytest.raises(RuntimeError):
            await handler(fail=True)
        gc.collect()  # the traceback held the frame; once dropped, the proxy goes
        await until(lambda: pool.stats().idle == 1)
    assert await handler(fail=False) == 1
    assert pool.stats().leaks_detected == 1


async def test_a_proxy_in_a_reference_cycle_is_reclaimed_and_a_released_one_reports_nothing(pools: Any) -> None:
    # The leak report comes from the proxy's weak reference (its callback),
    # which the garbage collector calls for cyclic garbage too; a release
    # drops the weak reference first, so a released proxy's death is silent.
    pool = await pools(min_size=1, max_size=1)

    class Request:
        connection: Any = None

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        gc.disable()  # the cycle below must wait for the collect, not be found by chance
        try:
            request = Request()
            request.connection = await pool.acquire()
            request.me = request  # type: ignore[attr-defined]  # a cycle holds the proxy
            del request
        finally:
            gc.enable()
        assert pool.stats().leaks_detected == 0  # (only the collector finds a cycle)
        gc.collect()
        await until(lambda: pool.stats().idle == 1)
    assert pool.stats().leaks_detected == 1
    released = await pool.acquire()
    await pool.release(released)
    del released
    gc.collect()
    await asyncio.sleep(0)
    assert pool.stats().leaks_detected == 1 and pool.stats().idle == 1


async def test_dropped_proxy_with_an_abandoned_transaction_is_reclaimed_and_rolled_back(
    pools: Any, caplog: pytest.LogCaptureFixture
) -> None:
    # asyncpg keeps a started transaction as the connection's _top_xact, and
    # the transaction refers back to the connection: that cycle alone kept the
    # connection leased forever, so the pytest leak guard could not release it
    # and a pool fixture's close() hung.
    pool = await pools(min_size=1, max_size=1)
    caplog.set_level(logging.WARNING, logger="safepool.leaks")

    async def handler_that_forgets() -> Any:
        con = await pool.acquire()
        transaction = con.transaction()
        await transaction.start()  # never committed nor rolled back
        await con.execute("SET LOCAL application_name = 'in-transaction'")
        return transaction

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        kept = await handler_that_forgets()
        gc.collect()
        # While the application still holds the transaction, the connection is in use.
        await until(lambda: any(getattr(r, "event", None) == "leak_suspect" for r in caplog.records))
        assert pool.stats().in_use == 1
        del kept
        gc.collect()
        await until(lambda: pool.stats().idle == 1)
    assert pool.stats().leaks_detected == 1
    async with pool.acquire(timeout=2) as con:
        assert not con.is_in_transaction()
        assert await con.fetchval("SHOW application_name") != "in-transaction"


async def test_dropped_proxy_with_a_listener_is_reclaimed_when_release_lease_asks(
    pools: Any, caplog: pytest.LogCaptureFixture
) -> None:
    # A listener keeps a dropped proxy's connection leased (the callback may
    # still run); the pytest leak guard could not release it, and a pool
    # fixture's close() hung. Asked by release_lease(), the pool drops the
    # listeners, as a release does, and takes the connection back.
    pool = await pools(min_size=1, max_size=1)
    caplog.set_level(logging.WARNING, logger="safepool.leaks")
    heard: list[str] = []

    async def handler_that_forgets() -> int:
        con = await pool.acquire()
        await con.add_listener("orders", lambda *args: heard.append(args[-1]))
        (lease,) = pool.leases()
        return int(lease.id)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        lease_id = await handler_that_forgets()
        gc.collect()
        await until(lambda: any(getattr(r, "event", None) == "leak_suspect" for r in caplog.records))
        assert pool.stats().in_use == 1 and [info.collected for info in pool.leases()] == [True]
        assert await pool.release_lease(lease_id) is True
        await until(lambda: pool.stats().idle == 1)
    assert await pool.release_lease(lease_id) is False  # ended: nothing to do
    assert pool.stats().leaks_detected == 1
    async with pool.acquire(timeout=2) as con:
        assert await con.fetch("SELECT pg_listening_channels()") == []
        await con.execute("NOTIFY orders, 'after'")
        assert await con.fetchval("SELECT 1") == 1  # a round trip: a notification would have come by now
    assert heard == []
    await asyncio.wait_for(pool.close(), 10)


@pytest.mark.parametrize("leftover", ["exception", "statement", "transaction"])
async def test_an_earlier_leases_leftovers_do_not_keep_lost_proxies_from_being_reclaimed(
    pools: Any, caplog: pytest.LogCaptureFixture, leftover: str
) -> None:
    # A lost proxy's connection is in use while anything outside the pool
    # refers to it. An exception of an earlier lease, kept (an error list, a
    # last_error attribute, an error reporter's queue), refers to it through
    # asyncpg's finished frames; an earlier lease's prepared statement or
    # transaction object through its _connection. None can use it again, yet
    # each kept every later lost proxy's connection leased.
    pool = await pools(min_size=1, max_size=1)
    caplog.set_level(logging.WARNING, logger="safepool.leaks")
    kept: list[Any] = []
    async with pool.acquire() as con:
        if leftover == "exception":
            with pytest.raises(asyncpg.DivisionByZeroError) as info:
                await con.execute("SELECT 1/0")
            kept.append(info.value)
        elif leftover == "statement":
            kept.append(await con.prepare("SELECT 1"))
        else:
            transaction = con.transaction()
            async with transaction:
                kept.append(transaction)
    del con

    async def handler_that_forgets(query: bool) -> Any:
        con = await pool.acquire(timeout=2)
        await con.execute("SET application_name = 'leaky'")
        return con.fetchval("SELECT 41 + 1") if query else None  # a query not started yet

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        await handler_that_forgets(query=False)
        gc.collect()
        await until(lambda: pool.stats().idle == 1)
        assert pool.stats().leaks_detected == 1
        assert not [r for r in caplog.records if getattr(r, "event", None) == "leak_suspect"]

        # Still refused for what can use the connection: a query's coroutine.
        pending = await handler_that_forgets(query=True)
        await looked_at(pool)
        assert pool.stats().in_use == 1 and [info.collected for info in pool.leases()] == [True]
        assert await pending == 42
        del pending
        gc.collect()
        await until(lambda: pool.stats().idle == 1)
    assert pool.stats().leaks_detected == 2 and len(kept) == 1
    async with pool.acquire(timeout=2) as con:
        assert await con.fetchval("SHOW application_name") != "leaky"


async def test_a_listener_closure_from_init_dropped_at_release_leaves_no_query_unseen(pools: Any) -> None:
    # The pool counts a connection's references once, when it joins; a lost
    # proxy's connection with more is in use. An init= hook's log listener
    # that closes over the connection was in that count, and the first
    # release drops it (asyncpg's reset, with its warning): from then on every
    # count was one short, and a lost proxy whose query had not started yet
    # (its coroutine the one reference) was reclaimed under it.
    async def init(con: Any) -> None:
        con.add_log_listener(lambda _, message: print(con, message))

    pool = await pools(min_size=1, max_size=1, init=init)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # asyncpg: "released to the pool but has 1 active log listener"
        async with pool.acquire():
            pass

    async def handler_that_forgets() -> Any:
        con = await pool.acquire(timeout=2)
        return con.fetchval("SELECT 41 + 1")  # a query not started yet

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        pending = await handler_that_forgets()
        await looked_at(pool)
        assert pool.stats().in_use == 1 and pool.stats().leaks_detected == 0
        assert await pending == 42
        del pending
        gc.collect()
        await until(lambda: pool.stats().idle == 1)
    assert pool.stats().leaks_detected == 1


async def test_cancelled_task_holding_a_lease_without_context_manager(pools: Any) -> None:
    pool = await pools(min_size=1, max_size=1)
    acquired = asyncio.Event()

    async def worker() -> None:
        con = await pool.acquire()
        acquired.set()
        await asyncio.sleep(3600)
        await pool.release(con)  # never reached

    task = asyncio.ensure_future(worker())
    await acquired.wait()
    task.cancel()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        await asyncio.gather(task, return_exceptions=True)
        del task
        gc.collect()
        await until(lambda: pool.stats().idle == 1)
    assert pool.stats().leaks_detected == 1


async def test_cancelled_inside_async_with_releases_normally(pools: Any) -> None:
    pool = await pools(min_size=1, max_size=1)
    inside = asyncio.Event()

    async def worker() -> None:
        async with pool.acquire() as con:
            await con.execute("SELECT 1")
            inside.set()
            await asyncio.sleep(3600)

    task = asyncio.ensure_future(worker())
    await inside.wait()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await until(lambda: pool.stats().idle == 1)
    assert pool.stats().leaks_detected == 0 and pool.stats().released == 1


@pytest.mark.realtime
async def test_outage_scenario_leaks_never_exhaust_the_server(
    pools: Any, server_count: Any, app_name: str
) -> None:
    """The postmortem in miniature: a handler leaks on some requests; with a
    lease timeout the pool keeps serving and never exceeds max_size."""
    pool = await pools(min_size=0, max_size=3, lease_timeout=0.2, acquire_timeout=3.0)
    leaked: list[Any] = []  # holds proxies so GC does not rescue them: only the timeout can
    served = 0

    async def request(i: int) -> None:
        nonlocal served
        con = await pool.acquire()
        await con.fetchval("SELECT 1")
        if i % 5 == 0:
            leaked.append(con)
            return
        await pool.release(con)
        served += 1

    for batch in range(8):
        await asyncio.gather(*(request(batch * 10 + i) for i in range(10)))
        assert await server_count(app_name) <= 3
    assert served == 64
    assert pool.stats().leases_expired >= 1
    await until(lambda: pool.stats().in_use == 0, timeout=5)


async def test_every_lease_report_names_the_task_and_the_site(pools: Any, caplog: pytest.LogCaptureFixture) -> None:
    # The leak-suspect report named the task; the lease-timeout and garbage-
    # collection reports named neither task nor site, in their message (an
    # operator reading plain logs had the acquire line only).
    clock = ManualClock()
    pool = await pools(min_size=0, max_size=2, leak_warning_after=5.0, lease_timeout=30.0, clock=clock)
    caplog.set_level(logging.WARNING, logger="safepool.leaks")

    async def loses() -> None:
        await pool.acquire(site="GET /lost")

    async def keeps() -> Any:
        return await pool.acquire(site="GET /kept")

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        await asyncio.create_task(loses(), name="request-1")
        gc.collect()
        await until(lambda: pool.stats().leaks_detected == 1)
    kept = await asyncio.create_task(keeps(), name="request-2")
    clock.advance(5.0)
    await until(lambda: pool.stats().leak_warnings == 1)
    clock.advance(25.0)
    await until(lambda: pool.stats().leases_expired == 1)
    messages = {getattr(r, "event", None): r.getMessage() for r in caplog.records}
    assert "; task request-1, site 'GET /lost'; acquired at:" in messages["leak"]
    assert "; task request-2, site 'GET /kept'; acquired at:" in messages["leak_suspect"]
    assert "; task request-2, site 'GET /kept'; taking the connection back" in messages["lease_expired"]
    await pool.release(kept)



async def test_a_report_without_stack_capture_says_the_task_was_not_recorded(
    pools: Any, caplog: pytest.LogCaptureFixture
) -> None:
    # The task is recorded with the stack: without capture the garbage-
    # collection report said "task unknown", as if the pool had lost it.
    pool = await pools(min_size=0, max_size=1)
    assert not pool.capture_stack
    caplog.set_level(logging.WARNING, logger="safepool.leaks")

    async def loses() -> None:
        await pool.acquire()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        await asyncio.create_task(loses(), name="request-1")
        gc.collect()
        await until(lambda: pool.stats().leaks_detected == 1)
    [report] = [r.getMessage() for r in caplog.records if getattr(r, "event", None) == "leak"]
    assert "; task not recorded (stack capture is off); acquired at:\n" in report, report
    assert NOT_CAPTURED in report, report


# -------------------------------------------------------------------- leases()


async def test_leases_lists_holders_without_secrets(pools: Any) -> None:
    pool = await pools(capture_stack=True, lease_timeout=60.0)
    con = await pool.acquire()
    await con.fetchval("SELECT $1::text", "secret-parameter")
    [info] = pool.leases()
    assert info.deadline_in is not None and 59 < info.deadline_in <= 60
    assert info.task_name
    assert "secret-parameter" not in repr(info)
    await pool.release(con)
    assert pool.leases() == []


# -------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "kwargs, error",
    [
        ({"lease_timeout": -1}, ValueError),
        ({"lease_timeout": 0}, ValueError),
        ({"lease_timeout": float("nan")}, ValueError),
        ({"lease_timeout": "5"}, TypeError),
        ({"leak_warning_after": -0.5}, ValueError),
        ({"acquire_timeout": -1}, ValueError),
        ({"max_waiters": -1}, ValueError),
        ({"max_connecting": 0}, ValueError),
        ({"reset_mode": "nope"}, ValueError),
    ],
)
async def test_bad_options_fail_at_creation(pg_dsn: str, kwargs: dict[str, Any], error: type[Exception]) -> None:
    with pytest.raises(error, match=next(iter(kwargs))):
        safepool.create_pool(pg_dsn, **kwargs)


async def test_bad_per_acquire_lease_timeout(pools: Any) -> None:
    pool = await pools()
    with pytest.raises(ValueError, match="lease_timeout"):
        await pool.acquire(lease_timeout=-3)
    assert pool.stats().in_use == 0
    assert await pool.fetchval("SELECT 1") == 1


# ------------------------------------------- what a taken-back lease leaves


@pytest.mark.parametrize("reset_mode", ["full", "rollback", "auto"])
@pytest.mark.parametrize("ended_by", ["lease_timeout", "garbage_collection"])
async def test_a_lease_the_pool_ends_leaves_no_session_state_in_any_reset_mode(
    pools: Any, pg_dsn: str, reset_mode: str, ended_by: str
) -> None:
    """A lease taken back by ``lease_timeout``, or reclaimed after its proxy
    was garbage collected, never ran its own clean-up (the ``finally:`` that
    unlocks, UNLISTENs, resets the role): the pool cannot know what was
    half-way, so it sends the full reset in every mode. In rollback mode it
    sent only a ROLLBACK: the session advisory lock stayed held by an idle
    pooled connection (the next lease of it got the lock again at once,
    advisory locks being re-entrant per session, beside the task waiting
    for it elsewhere), and the LISTENs went on, with no callback left."""
    clock = ManualClock()
    pool = await pools(min_size=1, max_size=1, lease_timeout=10.0, clock=clock, reset_mode=reset_mode)
    admin = await asyncpg.connect(pg_dsn)
    try:
        async def holder() -> int:
            con = await pool.acquire()
            await con.execute("SELECT pg_advisory_lock(872401)")
            await con.execute("LISTEN h87_sql_channel")
            await con.add_listener("h87_api_channel", lambda *args: None)
            await con.execute("SET application_name = 'h87-dirty'")
            # add_listener()'s callback counts as in use until release_lease(),
            # and the lease timeout takes this one back: keep it then.
            pid: int = con.get_server_pid()
            if ended_by == "lease_timeout":
                holder.kept = con  # type: ignore[attr-defined]
            return pid

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ResourceWarning)
            warnings.simplefilter("ignore", asyncpg.InterfaceWarning)
            pid = await holder()
            if ended_by == "lease_timeout":
                clock.advance(11.0)
            else:
                gc.collect()
                await looked_at(pool)
                [info] = pool.leases()
                assert await pool.release_lease(info.id)
            await until(lambda: pool.stats().idle == 1)
        async with pool.acquire(timeout=5) as con:
            assert con.get_server_pid() == pid
            assert await con.fetch("SELECT pg_listening_channels()") == []
            assert await con.fetchval("SHOW application_name") != "h87-dirty"
            assert not con.is_in_transaction()
        assert await admin.fetchval(
            "SELECT count(*) FROM pg_locks WHERE pid = $1 AND locktype = 'advisory'", pid
        ) == 0
        stats = pool.stats()
        assert (stats.leases_expired, stats.leaks_detected) == (
            (1, 0) if ended_by == "lease_timeout" else (0, 1)
        )
    finally:
        await admin.close()


async def test_a_taken_back_lease_takes_its_query_loggers_and_termination_listeners_with_it(pools: Any) -> None:
    """A lease timeout that cuts ``with con.query_logger(log):`` short: the
    holder's block has not exited (a stuck holder may never exit it), so its
    logger stayed on the connection and was handed every later lease's
    statements with their arguments (another tenant's data), and its
    termination listener was called with a later lease's connection. The
    take-back drops the callbacks the lease itself registered; those of the
    connection (``init=``'s) stay."""
    clock = ManualClock()
    kept_logs: list[Any] = []
    pool = await pools(
        min_size=1, max_size=1, lease_timeout=5.0, clock=clock,
        init=lambda con: _async_none(con.add_query_logger(lambda record: kept_logs.append(record.args))),
    )
    seen: list[Any] = []
    terminated: list[Any] = []
    con = await pool.acquire()
    inside, leave = asyncio.Event(), asyncio.Event()

    async def holder() -> None:
        con.add_termination_listener(terminated.append)
        with con.query_logger(lambda record: seen.append(record.args)):
            await con.fetchval("SELECT 1")
            inside.set()
            await leave.wait()

    task = asyncio.create_task(holder())
    await inside.wait()
    clock.advance(6.0)  # the lease expires while the holder is inside the block
    async with pool.acquire(timeout=5) as next_lease:
        assert await next_lease.fetchval("SELECT $1::text", "next-lease-secret") == "next-lease-secret"
        next_lease.terminate()
    await until(lambda: pool.stats().in_use == 0)
    leave.set()
    await asyncio.wait_for(task, 5)  # its block's exit removes nothing it should not
    assert all("next-lease-secret" not in args for args in seen), seen
    assert terminated == []
    assert ("next-lease-secret",) in kept_logs  # init='s logger is the connection's: kept
    assert pool.stats().leases_expired == 1


async def _async_none(_: Any) -> None:
    return None


async def test_a_taken_back_lease_leaves_init_callbacks_it_registered_again(pools: Any) -> None:
    """A lease that adds the query logger and termination listener init=
    already registered (the same functions: asyncpg's add is then a no-op,
    its callbacks being a set) does not make them its own: the take-back
    removed them, and every later lease of the connection went unlogged
    (a release keeps them, as asyncpg's)."""
    clock = ManualClock()
    logged: list[Any] = []
    terminated: list[Any] = []

    def log(record: Any) -> None:
        logged.append(record.args)

    async def init(con: Any) -> None:
        con.add_query_logger(log)
        con.add_termination_listener(terminated.append)

    pool = await pools(min_size=1, max_size=1, lease_timeout=5.0, clock=clock, init=init)
    con = await pool.acquire()
    con.add_query_logger(log)
    con.add_termination_listener(terminated.append)
    await con.fetchval("SELECT 1")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", asyncpg.InterfaceWarning)
        clock.advance(6.0)
        await until(lambda: pool.stats().idle == 1)
    async with pool.acquire(timeout=5) as next_lease:
        assert await next_lease.fetchval("SELECT $1::text", "logged") == "logged"
        next_lease.terminate()
    # (asyncpg calls query loggers and termination listeners soon after)
    await until(lambda: ("logged",) in logged and len(terminated) == 1)  # init='s are still the connection's
    assert pool.stats().leases_expired == 1


async def test_a_taken_back_holders_query_logger_block_leaves_the_next_lease_its_logger(pools: Any) -> None:
    """A holder taken back inside ``with con.query_logger(audit):`` leaves
    the block later, once the connection is another lease's. The block is
    bound to the connection itself, so its exit removed ``audit`` from the
    next lease, inside that lease's own ``with con.query_logger(audit):``
    (a module's audit logger, the same function): its statements went
    unlogged. The take-back removed the holder's logger already; the
    expired block's exit removes nothing."""
    clock = ManualClock()
    pool = await pools(min_size=1, max_size=1, lease_timeout=5.0, clock=clock)
    audited: list[Any] = []

    def audit(record: Any) -> None:
        audited.append(record.args)

    inside, leave = asyncio.Event(), asyncio.Event()

    async def holder() -> None:
        con = await pool.acquire()
        with con.query_logger(audit):
            await con.fetchval("SELECT 1")
            inside.set()
            await leave.wait()

    task = asyncio.create_task(holder())
    await inside.wait()
    clock.advance(6.0)  # taken back inside the block
    async with pool.acquire(timeout=5) as next_lease:
        with next_lease.query_logger(audit):
            leave.set()
            await asyncio.wait_for(task, 5)  # the expired holder leaves its block
            assert await next_lease.fetchval("SELECT $1::text", "audited") == "audited"
            await until(lambda: ("audited",) in audited)
    assert pool.stats().leases_expired == 1
    # (a released lease's block, as asyncpg's, still removes on exit)
    async with pool.acquire(timeout=5) as con:
        with con.query_logger(audit):
            pass
        assert not con._con._query_loggers


def _dsn_with_password(pg_dsn: str, password: str) -> str:
    """``pg_dsn`` logging in with ``password`` (the test server trusts the
    role: the password is never checked, only carried)."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(pg_dsn)
    user = parts.username or "postgres"
    return urlunsplit(parts._replace(netloc=f"{user}:{password}@{parts.netloc.rpartition('@')[2]}"))


async def test_a_leak_report_does_not_print_the_password_written_on_the_acquire_line(
    pg_dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    # docs/leases.md: "Passwords and query parameters are never part of it";
    # every other surface scrubs the pool's password (tests/integration/test_secrets.py).
    caplog.set_level(logging.WARNING, logger="safepool.leaks")
    clock = ManualClock()
    async with safepool.create_pool(_dsn_with_password(pg_dsn, "s3cret-on-the-line"), min_size=1, max_size=1, leak_warning_after=5.0, clock=clock) as pool, pool.acquire() as con:  # noqa: E501
        assert await con.fetchval("SELECT 1") == 1
        clock.advance(6.0)  # held past leak_warning_after: the leak_suspect report
        [report] = [r.getMessage() for r in caplog.records if getattr(r, "event", None) == "leak_suspect"]
        assert "test_leases.py" in report, report
        assert "s3cret-on-the-line" not in report, report


def _outer_frame_with_a_password(pool: Any, password: str) -> Any:
    return _acquire_and_hold(pool, dsn=f"postgresql://app:{password}@db.internal/orders")


async def _acquire_and_hold(pool: Any, dsn: str) -> Any:
    return await pool.acquire()


async def test_a_leak_report_masks_passwords_written_on_any_line_of_the_stack(
    pg_dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The siblings: a password on an outer frame's line (a DSN passed down
    by the caller; here, one of another server), as a keyword's string
    literal, and in a dict, in the lease_expired and leak_suspect reports
    and in the ``stack`` of ``leases()``-side events."""
    caplog.set_level(logging.WARNING, logger="safepool.leaks")
    clock = ManualClock()
    settings = {"password": "dict-s3cret-value", "min_size": 1}  # the report may show this line: masked
    async with safepool.create_pool(pg_dsn, max_size=1, leak_warning_after=5.0, lease_timeout=20.0, clock=clock, min_size=settings["min_size"]) as pool:  # noqa: E501
        con = await _outer_frame_with_a_password(pool, password="kw-s3cret-value")
        clock.advance(6.0)
        clock.advance(21.0)
        reports = [r.getMessage() for r in caplog.records if getattr(r, "event", None) in ("leak_suspect", "lease_expired")]
        assert len(reports) == 2, reports
        for report in reports:
            assert "_outer_frame_with_a_password" in report and "_acquire_and_hold" in report, report
            assert "kw-s3cret-value" not in report and "dict-s3cret-value" not in report, report
            assert 'password="kw-s3cret-value"' not in report
            assert "postgresql://app:***@db.internal/orders" in report or "password=***" in report, report
        del con
