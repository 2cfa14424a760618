"""Review h259: user code (or environment conditions) raising inside
``Runner.drain()`` or the synchronous paths it calls. An error out of the
action loop loses the rest of the batch and reaches whoever called drain()
(an acquire, a release, the pool's timer). The pool must keep working:
acquires within a bound, close() ends, get_size() right.

Found: a logging handler raising on ``safepool.leaks`` kept a
``lease_timeout`` take-back from ever starting (the slot taken for good)
and, from a leak warning, left the pool's timer unarmed (an acquire's
timeout never fired). Fixed: ``Runner.drain()`` reports an action's error
to the loop's exception handler and goes on (``Runner.action_failed``), and
``Reclaimer.take_back`` starts the take-back before it logs.

Every wait is bounded (``asyncio.timeout`` / ``wait_for``)."""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import pytest

import safepool
from tests._util import loop_errors, outcome_of, raising_handler, until

pytestmark = pytest.mark.asyncio


async def backends(admin: Any, app_name: str) -> int:
    return int(await admin.fetchval("SELECT count(*) FROM pg_stat_activity WHERE application_name = $1", app_name))


# ------------------------------------------------ lease_timeout take-back


async def test_take_back_with_a_raising_leak_log_handler(pg_dsn: str, app_name: str) -> None:
    admin = await asyncpg.connect(pg_dsn)
    pool = await safepool.create_pool(
        pg_dsn, min_size=0, max_size=1, lease_timeout=0.2, server_settings={"application_name": app_name},
    )
    try:
        with loop_errors() as errors, raising_handler("safepool.leaks") as handler:
            kept = await pool.acquire()  # never released: taken back at its lease_timeout
            await until(lambda: handler.records != [], 5)
            # (Seen: pool.close() then never ends either, the slot RESETTING.)
            # The pool serves again once the connection was taken back.
            got = await outcome_of(pool.acquire(timeout=3), 5)
            assert not isinstance(got, BaseException), (got, errors)
            await pool.release(got)
            assert pool.get_size() == 1
            assert await backends(admin, app_name) <= 1
            await asyncio.wait_for(pool.close(), 5)
            del kept
        assert any(isinstance(c.get("exception"), RuntimeError) for c in errors), errors
    finally:
        pool.terminate()
        await admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1", app_name)
        await admin.close()


# ------------------------------------------------- leak_warning_after


async def test_leak_warning_with_a_raising_log_handler_keeps_acquire_timeouts(pg_dsn: str, app_name: str) -> None:
    pool = await safepool.create_pool(
        pg_dsn, min_size=0, max_size=1, leak_warning_after=0.2, server_settings={"application_name": app_name},
    )
    try:
        with loop_errors() as errors, raising_handler("safepool.leaks") as handler:
            kept = await pool.acquire()  # held past leak_warning_after
            waiter = asyncio.ensure_future(pool.acquire(timeout=1.0))
            got = await outcome_of(waiter, 5)
            assert handler.records != []
            # The acquire times out at its own timeout, whatever the log handler did.
            assert isinstance(got, safepool.PoolTimeoutError), (got, errors)
            await pool.release(kept)
            await asyncio.wait_for(pool.close(), 5)
        assert any(isinstance(c.get("exception"), RuntimeError) for c in errors), errors
    finally:
        pool.terminate()


async def test_leak_warning_with_a_raising_log_handler_is_reported(pg_dsn: str, app_name: str) -> None:
    """The pool goes on serving once the leak-suspect lease is released (the
    handler's error reaches the loop's exception handler)."""
    pool = await safepool.create_pool(
        pg_dsn, min_size=0, max_size=1, leak_warning_after=0.1, server_settings={"application_name": app_name},
    )
    try:
        with loop_errors() as errors, raising_handler("safepool.leaks") as handler:
            kept = await pool.acquire()
            await until(lambda: handler.records != [], 5)
            await pool.release(kept)
            async with pool.acquire(timeout=3) as con:
                assert await con.fetchval("SELECT 1") == 1
            assert pool.get_size() == 1
            await asyncio.wait_for(pool.close(), 5)
        assert any(isinstance(c.get("exception"), RuntimeError) for c in errors), errors
    finally:
        pool.terminate()


# ---------------------------------------------- connects, the safepool logger


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.parametrize("flavour", ["asyncpg", "safepool"])
async def test_connect_failure_with_a_raising_log_handler(flavour: str) -> None:
    """A connect fails (nothing listens) while a handler on the safepool
    logger raises: the waiting acquire still gets the connect's error, as
    with asyncpg's pool (which logs nothing there)."""
    port = free_port()
    create = asyncpg.create_pool if flavour == "asyncpg" else safepool.create_pool
    pool = await create(host="127.0.0.1", port=port, user="nobody", database="none", min_size=0, max_size=1)
    try:
        with loop_errors() as errors, raising_handler("safepool") as handler:
            got = await outcome_of(pool.acquire(), 5)
            assert isinstance(got, OSError), (got, errors)
            assert handler.records != [] or flavour == "asyncpg"
            assert pool.get_size() == 0
            got = await outcome_of(pool.acquire(timeout=2), 5)
            assert isinstance(got, OSError), (got, errors)
            await asyncio.wait_for(pool.close(), 5)
    finally:
        pool.terminate()


# ------------------------------------------------------ the reset watchdog


async def test_reset_watchdog_with_a_raising_log_handler(pg_dsn: str, app_name: str) -> None:
    """A release's unbounded reset (a minute on the server) under the reset
    watchdog, a handler on ``safepool`` that raises: the watchdog still
    aborts the reset at DEFAULT_RESET_TIMEOUT (it logs last), the release
    raises the connection's error, and the pool serves a new connection.
    (Before: its warning, logged before the abort, raised out of the
    watchdog's timer callback; the reset ran on, the release with it.)"""
    from tests._util import drive_io_timers, sleeping_reset_connection_class, until_in_pg_sleep

    clock = safepool.ManualClock()
    admin = await asyncpg.connect(pg_dsn)
    pool = await safepool.create_pool(
        pg_dsn, min_size=0, max_size=1, clock=clock, connection_class=sleeping_reset_connection_class(),
        server_settings={"application_name": app_name},
    )
    drive_io_timers(pool, clock)  # (the watchdog runs on the loop's time otherwise)
    try:
        with loop_errors() as errors, raising_handler("safepool") as handler:
            con = await pool.acquire()
            pid = con.get_server_pid()
            await con.fetchval("SELECT 1")  # dirty: the release resets (a minute on the server)
            release = asyncio.ensure_future(outcome_of(pool.release(con), 10))
            await until_in_pg_sleep(pg_dsn, pid)
            clock.advance(30.0)
            assert isinstance(await release, asyncpg.PostgresConnectionError), errors
            assert any("got no answer" in r.getMessage() for r in handler.records)
            # (Not released: its release would reset, a minute on the server.)
            again = await pool.acquire(timeout=5)
            assert again.get_server_pid() != pid
            assert await again.fetchval("SELECT 2") == 2
        # (The handler's errors went to the loop's exception handler.)
        assert errors and all(isinstance(c.get("exception"), RuntimeError) for c in errors), errors
    finally:
        pool.terminate()
        await admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1", app_name)
        await admin.close()
