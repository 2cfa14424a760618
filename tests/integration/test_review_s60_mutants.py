"""Review s60, hand-made mutation review: behaviour of the pool that no test
caught (or only indirectly) when it was broken on purpose (one small edit
of safepool/ at a time, the suite run against it). Each test here fails
against the mutation named in its docstring and passes against the code
as it is. One mutation survived because its line had no effect: a bug,
fixed (the reset watchdog's abort and its cancel request, below).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import warnings
from typing import Any

import asyncpg
import pytest

import safepool
from safepool import ManualClock
from safepool.health import check_health
from tests._util import release_resetting_on_server, sleeping_reset_connection_class, until, until_in_pg_sleep

pytestmark = pytest.mark.asyncio


def _events(caplog: pytest.LogCaptureFixture, name: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if getattr(r, "event", None) == name]


async def test_a_second_lost_proxy_on_the_same_connection_is_reported_as_in_use_too(
    pools: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A proxy garbage collected while its connection is still in use (here
    a listener is registered) is reported once per lost lease
    (``leak_suspect``, "still in use"), then kept leased until
    ``release_lease()``. The report's once-only flag and the re-check count
    are the connection's holder's, so the next lease must start them
    afresh (``Leaser.acquire`` does).

    Mutation killed: ``Leaser.acquire`` no longer resets
    ``holder.orphan_checks`` / ``holder.orphan_reported`` for a new lease:
    the second lost proxy on the connection was never reported."""
    pool = await pools(min_size=1, max_size=1)
    caplog.set_level(logging.WARNING, logger="safepool.leaks")
    [holder] = pool._runner.slot_holders.values()

    async def handler_that_forgets() -> int:
        con = await pool.acquire(timeout=5)
        await con.add_listener("orders", lambda *args: None)
        (lease,) = pool.leases()
        return int(lease.id)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        for round_ in (1, 2):
            lease_id = await handler_that_forgets()
            checks = holder.orphan_checks
            gc.collect()
            # The pool looked at the lost proxy's connection (its reclaim,
            # queued by the collection, ran and scheduled a re-check).
            await until(lambda checks=checks: holder.orphan_checks > checks)
            assert pool.stats().in_use == 1 and [info.collected for info in pool.leases()] == [True]
            assert len(_events(caplog, "leak_suspect")) == round_
            assert await pool.release_lease(lease_id) is True
            await until(lambda: pool.stats().idle == 1)
    assert pool.stats().leaks_detected == 2


async def test_a_statement_free_lease_after_a_reset_one_skips_the_reset(pools: Any) -> None:
    """After a reset, the connection is known clean again at its current
    statement count (``Runner.reset_done`` renews the holder's clean mark):
    a following lease that runs no statement is handed on with no round
    trip (``resets_skipped``), as the docs promise.

    Mutation killed: ``Runner.reset_done`` no longer renews
    ``holder.clean_mark``: every lease after the first reset one was reset
    again, a round trip per lease. Of the suite, only the instruction
    budget (``test_bytecode_budget``) noticed, as a cost; this says what
    the pool promises."""
    pool = await pools(min_size=1, max_size=1)
    async with pool.acquire() as con:
        await con.execute("SELECT 1")
    before = pool.stats()
    for _ in range(3):
        async with pool.acquire():
            pass
    after = pool.stats()
    assert (after.resets - before.resets, after.resets_skipped - before.resets_skipped) == (0, 3)


async def test_health_counts_a_lease_held_exactly_leak_suspect_after_as_a_suspect(pools: Any) -> None:
    """``check_health(leak_suspect_after=)``: "degraded when a lease has been
    held this many seconds or longer". On a manual clock a lease is held
    exactly that long.

    Mutation killed: ``>=`` turned into ``>`` in ``check_health``'s leak
    suspects: a lease held exactly the threshold was not reported."""
    clock = ManualClock()
    pool = await pools(min_size=1, max_size=1, clock=clock)
    async with pool.acquire(timeout=5):
        clock.advance(2.0)
        report = await check_health(pool, probe=False, leak_suspect_after=2.0)
        assert [r.code for r in report.reasons] == ["leak_suspects"]
        assert report.status == "degraded"
    report = await check_health(pool, probe=False, leak_suspect_after=2.0)
    assert report.reasons == ()


_SleepingReset = sleeping_reset_connection_class()


async def test_a_reset_the_watchdog_aborts_gets_its_backend_a_cancel_request(pg_dsn: str, app_name: str) -> None:
    """No reset_timeout, release timeout or command_timeout: the reset runs
    in the releasing task under the runner's watchdog (30 s, on the loop's
    time; here on the test's clock: ``release_resetting_on_server``), which
    aborts it. Its statement runs on the server: after the
    abort the backend must get a cancel request (docs/reliability.md: "a
    connection aborted with a statement in flight gets a cancel request
    after the abort and its slot counts until the server closed the
    request's socket"; the reset watchdog is named there).

    Mutation that survived every test: dropping ``holder.unresponsive =
    True`` from ``Runner.check_resets``. The line had no effect: the reset's
    driver then reported the abort's ConnectionDoesNotExistError, and
    ``Runner.reset_done`` overwrote the flag (not a timeout), so the slot
    was freed at once with no cancel request and the backend ran its
    statement on beside the replacement (max_size + 1 on the server). Now
    ``reset_done`` keeps the watchdog's flag."""
    async with release_resetting_on_server(pg_dsn, app_name) as (_, admin, clock, pid, release):
        clock.advance(30.0)  # the watchdog aborts it
        with pytest.raises(asyncpg.PostgresConnectionError):
            await asyncio.wait_for(release, 5)
        # The cancel request interrupts the backend's pg_sleep (the server
        # state polled; without one it sleeps its minute out).
        async with asyncio.timeout(3):
            while await admin.fetchval("SELECT wait_event FROM pg_stat_activity WHERE pid = $1", pid) == "PgSleep":
                await asyncio.sleep(0.01)


async def test_a_take_back_with_a_reset_hook_that_sends_nothing_cancels_the_running_statement(
    pools: Any, pg_dsn: str
) -> None:
    """A ``reset=`` hook may send nothing (it resets only what it knows was
    set). A take-back's reset must still send something, a ``ROLLBACK``
    first: asyncpg refusing it is the only sign that the holder's statement
    still runs, which the take-back then cancels before the connection is
    handed on (``_workers.take_back``). Sent nothing, the take-back found
    the connection "free" and handed it on with the statement running.

    Mutation killed: the take-back's ``rollback`` ignores ``hooks.custom``
    (``rollback = con.is_in_transaction()``)."""
    hooked: list[int] = []

    async def reset(con: Any) -> None:
        hooked.append(con.get_server_pid())  # (resets nothing: sends nothing)

    clock = ManualClock()
    pool = await pools(min_size=1, max_size=1, reset=reset, clock=clock)
    con = await pool.acquire(timeout=5, lease_timeout=10)
    pid = con.get_server_pid()
    holder = asyncio.ensure_future(con.execute("SELECT pg_sleep(60)"))
    try:
        await until_in_pg_sleep(pg_dsn, pid)
        clock.advance(10.0)  # the lease expires: taken back
        with pytest.raises((asyncpg.QueryCanceledError, safepool.LeaseExpiredError)):
            await asyncio.wait_for(holder, 5)
        async with pool.acquire(timeout=5) as again:
            assert again.get_server_pid() == pid  # kept, and free
            assert await again.fetchval("SELECT 1") == 1
        assert hooked and pool.stats().leases_expired == 1
    finally:
        holder.cancel()


async def test_a_used_up_connection_released_with_no_budget_while_its_statement_runs_gets_it_cancelled(
    pools: Any, pg_dsn: str
) -> None:
    """A lease's connection that reached ``max_queries`` is closed when it
    comes back, under the release's budget. Released with ``timeout=0``
    while a statement of the lease still runs in another task, the close
    gives up at once (asyncpg's ``close(timeout=0)`` raises TimeoutError
    and aborts); the backend still runs that statement, so the pool sends
    it a cancel request, bounded by the budget if it is > 0, else by its
    own bound (``_workers.cancel_timeout``), not by the spent budget.

    Mutation killed: ``cancel_timeout`` returns a budget of 0 as it is:
    the cancel request timed out before it was sent, and the backend ran
    its statement on beside the slot's replacement. (asyncpg 0.29-0.31: the
    close keeps the pool's own bound and the release does not raise; the
    statement is cancelled all the same.)"""
    pool = await pools(min_size=1, max_size=1, max_queries=2)
    con = await pool.acquire(timeout=5)
    pid = con.get_server_pid()
    await con.fetchval("SELECT 1")
    running = asyncio.ensure_future(con.execute("SELECT pg_sleep(60)"))  # its second statement: used up
    try:
        await until_in_pg_sleep(pg_dsn, pid)
        if safepool._internals.CLOSE_UNDER_BUDGET:
            with pytest.raises(TimeoutError):
                await pool.release(con, timeout=0)
        else:
            # asyncpg 0.29-0.31: the release's close keeps the pool's own
            # bound (_internals.CLOSE_UNDER_BUDGET), not the spent budget:
            # it cancels the statement, closes, and does not raise.
            await asyncio.wait_for(pool.release(con, timeout=0), 10)
        with pytest.raises((asyncpg.PostgresError, asyncpg.InterfaceError, OSError)):
            await asyncio.wait_for(running, 5)
        admin = await asyncpg.connect(pg_dsn)
        try:
            # The cancel request interrupts the backend's pg_sleep (the
            # server state polled; without one it sleeps its minute out).
            async with asyncio.timeout(5):
                while await admin.fetchval(
                    "SELECT wait_event FROM pg_stat_activity WHERE pid = $1", pid
                ) == "PgSleep":
                    await asyncio.sleep(0.01)
        finally:
            await admin.execute("SELECT pg_terminate_backend($1)", pid)
            await admin.close()
    finally:
        running.cancel()


async def test_queue_target_equal_to_queue_interval_is_refused(pg_dsn: str) -> None:
    """``queue_target`` must be shorter than ``queue_interval`` (the queue
    counts as standing only after a whole interval): equal is refused too.

    Mutation killed: ``>=`` turned into ``>`` in ``_options.adaptive_queue``."""
    with pytest.raises(ValueError, match="shorter than queue_interval"):
        safepool.create_pool(pg_dsn, queue_policy="adaptive", queue_target=0.1, queue_interval=0.1)


# Every counter of PoolStats the exporters export, by its documented name
# (docs/metrics.md): spelled out here, not read from the exporters' own
# tables, which a wrong row would fool.
_COUNTER_FIELDS = (
    "acquire_timeouts", "overload_rejections", "unavailable_rejections", "leases_expired", "leaks_detected",
    "leak_warnings", "connections_opened", "connections_closed", "connect_errors", "resets", "resets_skipped",
    "resets_failed", "shed", "admission_rejections", "leases_discarded", "connections_retired",
)


async def test_each_counter_is_exported_under_its_own_name_with_its_own_value(pools: Any, pg_dsn: str) -> None:
    """Prometheus ``safepool_<field>_total`` and OpenTelemetry
    ``safepool.<field>`` carry PoolStats' ``<field>``, for each counter, on
    a pool whose counters differ (a reset, statement-free leases, a lease
    the pool ended when its backend was terminated). The exporters' own tests compare
    each exported counter with the field their table names for it: a row
    with the wrong field passed them.

    Mutations killed: the Prometheus row of ``leases_discarded`` reads
    ``leases_expired``; the OpenTelemetry row of ``connections_retired``
    reads ``connections_closed``."""
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from safepool.metrics import otel, prometheus

    pool = await pools(name="counted", min_size=1, max_size=2)
    registry = CollectorRegistry()
    prometheus.register(pool, registry=registry)
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    instruments = otel.instrument(pool, meter_provider=provider)
    try:
        async with pool.acquire(timeout=5) as con:
            await con.execute("SELECT 1")  # reset on release
        for _ in range(2):
            async with pool.acquire(timeout=5):
                pass  # no statement: no reset
        held = await pool.acquire(timeout=5)
        admin = await asyncpg.connect(pg_dsn)
        try:
            await admin.execute("SELECT pg_terminate_backend($1)", held.get_server_pid())
        finally:
            await admin.close()
        # The server closes the socket; the pool ends the lease (discarded)
        # and its connection's close is counted.
        await until(lambda: pool.stats().leases_discarded == 1 and pool.stats().closing == 0)
        await pool.release(held)  # (a no-op: the pool ended the lease)
        stats = pool.stats()
        assert stats.leases_discarded != stats.leases_expired
        assert stats.connections_closed != stats.connections_retired
        assert (stats.resets, stats.resets_skipped) == (1, 2)

        scraped = {}
        for family in text_string_to_metric_families(generate_latest(registry).decode()):
            for sample in family.samples:
                if dict(sample.labels) == {"pool": "counted"}:
                    scraped[sample.name] = sample.value
        exported = {}
        data = reader.get_metrics_data()
        assert data is not None
        for resource in data.resource_metrics:
            for scope in resource.scope_metrics:
                for metric in scope.metrics:
                    for data_point in metric.data.data_points:
                        if metric.name.startswith("safepool.") and dict(data_point.attributes) == {
                            "db.client.connection.pool.name": "counted"
                        }:
                            exported[metric.name] = getattr(data_point, "value", None)
        for field in _COUNTER_FIELDS:
            assert scraped[f"safepool_{field}_total"] == getattr(stats, field), field
            assert exported[f"safepool.{field}"] == getattr(stats, field), field
    finally:
        instruments.close()
        provider.shutdown()
