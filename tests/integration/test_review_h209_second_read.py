"""Review helper-209: a second read of the day's changes (cccb2f0..HEAD).

What did not hold (strict xfails until s65 fixed each: the release marks a
lease whose COPY runs too; refuse_awaitable refuses coroutines only; the
scrub writes an OSError's strerror and filenames and enters exception
groups; scrub_quoted's password-piece rule needs 4 characters or more; an
inspect error reads as not async):

- (b) auto mode: a release while the lease's own neutral COPY still runs in
  another task hands the connection on unreset: Holder.watched counts the
  SQL methods' statements, not COPYs (_autoreset._copying_watched counts
  Holder.copies), and Leaser.release marks the lease on watched alone.
- (c) refuse_awaitable takes any awaitable a plain callback returns for a
  dropped coroutine: a listener that returns the Task it started (the
  PoolTypeError's own advice, as a lambda) is logged as failed.
- (a) the in-place scrub writes an OSError's args, but OSError(errno,
  message) formats str() from strerror: the password stays in str(error).
- (a) scrub_quoted, now on every setup=/init= error, masks a quoted piece
  that is any substring of the password, one character too: a server error's
  quoted value ("b") is garbled to "***".
- (a) the scrub does not enter an ExceptionGroup: an init= hook's TaskGroup
  error quoting the DSN keeps the password in its sub-exception.
- (c) errors.is_coroutine_function raises TypeError (inspect) for a sync
  Mock spec'd on a plain function: such a listener or hook is refused.

Passing (what held): the stand-in proxy of a lost lease (release_lease in
every reset mode, terminate, a callback releasing its stand-in, a running
statement's lost lease reclaimed, the stand-in collected each time); a
one-argument OSError masked; a quoted value not in the password kept.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest
import pytest_asyncio

import safepool

pytestmark = pytest.mark.asyncio


@pytest_asyncio.fixture
async def table(pg_dsn: str) -> AsyncIterator[str]:
    name = f"h209_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(pg_dsn)
    try:
        await admin.execute(f"CREATE TABLE {name} (a int)")
        yield name
    finally:
        await admin.execute(f"DROP TABLE IF EXISTS {name}")
        await admin.close()


# ------------------------------------------- (b) a COPY under way at release


COPY_IN_FLIGHT = (
    "auto mode: a release while the lease's own neutral COPY (copy_to_table with an async source) still runs "
    "in another task hands the connection on unreset (_autoreset._copying_watched counts Holder.copies, not "
    "Holder.watched, and Leaser.release marks the lease on watched alone): the next lease's first statement "
    "fails with 'another operation is in progress'"
)


@pytest.mark.parametrize(
    "mode", ["auto", "rollback"]
)
async def test_release_while_the_leases_copy_runs_hands_on_a_usable_connection(
    pg_dsn: str, table: str, mode: str
) -> None:
    pool = await safepool.create_pool(pg_dsn, min_size=1, max_size=1, reset_mode=mode)
    gate = asyncio.Event()
    started = asyncio.Event()

    async def source() -> AsyncIterator[bytes]:
        yield b"1\n"
        started.set()
        await gate.wait()
        yield b"2\n"

    copy: asyncio.Future[Any] | None = None
    try:
        async with pool.acquire() as con:
            await con.fetchval("SELECT 1")
        with contextlib.suppress(asyncpg.InterfaceError):
            async with pool.acquire() as con:
                copy = asyncio.ensure_future(con.copy_to_table(table, source=source()))
                await asyncio.wait_for(started.wait(), 10)
                # The source goes on 0.3 s later, on its own (not after the
                # release: the release waits for the COPY, up to 30 s).
                asyncio.get_running_loop().call_later(0.3, gate.set)
                # The lease ends (a program bug: the COPY's task still runs).
        async with pool.acquire(timeout=10) as again:
            assert await again.fetchval("SELECT 1") == 1
            gate.set()
            with contextlib.suppress(Exception):  # (full mode: asyncpg's own error of a closed transport)
                await asyncio.wait_for(copy, 10)
            assert await again.fetchval("SELECT 2") == 2
    finally:
        gate.set()
        if copy is not None and not copy.done():
            copy.cancel()
            with contextlib.suppress(BaseException):
                await copy
        pool.terminate()  # (a close waits out the close of the connection the COPY was on)


# ------------------------------------- (c) a plain callback that returns a Task


TASK_REFUSED = (
    "a plain listener that starts its work as the PoolTypeError's own message advises "
    "(lambda event: loop.create_task(...)) returns the Task, which refuse_awaitable (errors.py) takes for a "
    "dropped coroutine: the listener is logged as failed ('event listener failed ... which the pool does not "
    "await: the work it stands for was not done') though its task was scheduled and runs"
)


async def test_a_listener_returning_the_task_it_started_is_not_logged_as_failed(
    pg_dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    pool = await safepool.create_pool(pg_dsn, min_size=1, max_size=1)
    handled: list[Any] = []

    async def handle(event: Any) -> None:
        handled.append(event)

    try:
        loop = asyncio.get_running_loop()
        pool.add_event_listener(lambda event: loop.create_task(handle(event)))
        con = await pool.acquire()
        await pool.release(con)
        await pool.release(con)  # a late release: an event (LateRelease)
        await asyncio.sleep(0.05)
        assert handled  # the work was done
        assert not [r for r in caplog.records if "listener failed" in r.getMessage()]
    finally:
        await asyncio.wait_for(pool.close(), 10)


async def test_a_listener_returning_a_coroutine_is_logged_and_the_coroutine_closed(
    pg_dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    pool = await safepool.create_pool(pg_dsn, min_size=1, max_size=1)
    handled: list[Any] = []

    async def handle(event: Any) -> None:
        handled.append(event)

    try:
        pool.add_event_listener(lambda event: handle(event))
        con = await pool.acquire()
        await pool.release(con)
        await pool.release(con)  # a late release: an event (LateRelease)
        await asyncio.sleep(0.05)
        assert not handled
        assert [r for r in caplog.records if "listener failed" in r.getMessage()]
    finally:
        await asyncio.wait_for(pool.close(), 10)


# ------------------------------------------------- (e) the lost lease's StandIn


async def _lost_with_a_listener(pool: Any, channel: str, callback: Any) -> tuple[int, int]:
    """A lease adds a notification listener and loses its proxy; returns
    (lease id, backend pid) once the pool installed the stand-in."""
    import gc
    import warnings

    from safepool import _internals

    async def handler() -> tuple[int, int]:
        con = await pool.acquire()  # safepool: ignore (lost under test)
        await con.add_listener(channel, callback)
        return con._lease.id, con.get_server_pid()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        lease_id, pid = await handler()
        gc.collect()
        [holder] = pool._runner.slot_holders.values()
        async with asyncio.timeout(5):
            while holder.orphan_checks < 1:
                await asyncio.sleep(0.005)
    [slot] = pool._runner.slot_holders
    assert type(slot.connection._proxy) is _internals.StandIn
    return lease_id, pid


def _stand_in_ref(pool: Any) -> Any:
    import weakref

    [slot] = pool._runner.slot_holders
    return weakref.ref(slot.connection._proxy.proxy)


@pytest.mark.parametrize("mode", ["full", "auto", "rollback"])
async def test_release_lease_of_a_stand_in_lease_reclaims_it_and_lets_the_stand_in_go(
    pg_dsn: str, mode: str
) -> None:
    import gc
    import warnings

    pool = await safepool.create_pool(pg_dsn, min_size=1, max_size=1, reset_mode=mode)
    try:
        lease_id, pid = await _lost_with_a_listener(pool, "h209_a", lambda *args: None)
        [info] = pool.leases()
        assert info.collected
        stand_in = _stand_in_ref(pool)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ResourceWarning)
            assert await pool.release_lease(lease_id) is True
        gc.collect()
        assert stand_in() is None
        assert not pool.leases()
        async with pool.acquire(timeout=5) as con:
            assert con.get_server_pid() == pid and await con.fetchval("SELECT 1") == 1
            assert con._con._listeners == {} or not any(con._con._listeners.values())
    finally:
        await asyncio.wait_for(pool.close(), 10)


async def test_terminate_with_a_stand_in_installed_leaves_no_cycle(pg_dsn: str) -> None:
    import gc

    pool = await safepool.create_pool(pg_dsn, min_size=1, max_size=1)
    await _lost_with_a_listener(pool, "h209_b", lambda *args: None)
    [slot] = pool._runner.slot_holders
    con = slot.connection
    stand_in = _stand_in_ref(pool)
    pool.terminate()
    assert con._proxy is None
    gc.collect()
    assert stand_in() is None


async def test_a_callback_that_releases_its_stand_in(pg_dsn: str) -> None:
    import asyncpg as _asyncpg

    pool = await safepool.create_pool(pg_dsn, min_size=1, max_size=1)
    admin = await _asyncpg.connect(pg_dsn)
    done = asyncio.Event()
    errors: list[BaseException] = []

    async def release_it(con: Any) -> None:
        try:
            await con.remove_listener("h209_c", on_notification)
            await pool.release(con)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)
        done.set()

    def on_notification(con: Any, pid: int, channel: str, payload: str) -> None:
        asyncio.get_running_loop().create_task(release_it(con))

    try:
        _, pid = await _lost_with_a_listener(pool, "h209_c", on_notification)
        await admin.execute("NOTIFY h209_c")
        await asyncio.wait_for(done.wait(), 5)
        assert errors == []
        assert not pool.leases()
        async with pool.acquire(timeout=5) as con:
            assert con.get_server_pid() == pid and await con.fetchval("SELECT 1") == 1
        await asyncio.sleep(0.3)  # the re-check timer finds the lease ended
        pool._state.check_invariants()
    finally:
        await admin.close()
        await asyncio.wait_for(pool.close(), 10)


# ------------------------------------- (a) an OSError quoting the DSN (errno form)


OSERROR_SCRUB = (
    "_secrets.scrub_connect_error masks an OSError's args in place, but OSError(errno, message) formats "
    "str() from its strerror (and filename) members, which the args write does not change and which are not "
    "in __dict__: an init= hook's OSError(errno.EIO, f'cannot prepare {dsn}') reaches the caller (and the "
    "pool's log) with the password in str(error), while error.args shows it masked"
)


async def test_an_init_hooks_errno_oserror_quoting_the_dsn_is_masked(
    refused_role: Any, caplog: pytest.LogCaptureFixture
) -> None:
    import errno

    await refused_role.admit()
    dsn = refused_role.dsn

    async def init(con: Any) -> None:
        raise OSError(errno.EIO, f"cannot prepare {dsn}")

    with pytest.raises(OSError) as raised:
        pool = await safepool.create_pool(dsn, min_size=1, max_size=1, init=init)
        pool.terminate()
    assert refused_role.password not in repr(raised.value.args)  # (the args are masked)
    assert refused_role.password not in str(raised.value)
    assert refused_role.password not in caplog.text


async def test_an_init_hooks_one_argument_oserror_quoting_the_dsn_is_masked(
    refused_role: Any, caplog: pytest.LogCaptureFixture
) -> None:
    await refused_role.admit()
    dsn = refused_role.dsn

    async def init(con: Any) -> None:
        raise ConnectionError(f"cannot prepare {dsn}")

    with pytest.raises(ConnectionError) as raised:
        pool = await safepool.create_pool(dsn, min_size=1, max_size=1, init=init)
        pool.terminate()
    assert refused_role.password not in str(raised.value)
    assert "cannot prepare postgresql://" in str(raised.value)
    assert refused_role.password not in caplog.text


# ------------------------------ (a) a server error's quoted value, over-masked


QUOTED_OVERMASK = (
    "_secrets.scrub_quoted, now run on every setup= hook error (Leaser.run_setup: Reporter.scrub) and init= "
    "hook error, masks any quoted piece that is a substring of the password, a single character too: a "
    "setup= hook's server error 'invalid input syntax for type integer: \"b\"' reaches acquire()'s caller as "
    "'... integer: \"***\"' when the password holds a 'b' (garbled, and pointing at the password's letters)"
)


async def test_a_setup_hooks_server_error_keeps_a_short_quoted_value(refused_role: Any) -> None:
    await refused_role.admit()
    letter = next(c for c in refused_role.password[3:] if c.isalpha())

    async def setup(con: Any) -> None:
        await con.execute(f"SELECT '{letter}'::int")

    pool = await safepool.create_pool(refused_role.dsn, min_size=1, max_size=1, setup=setup)
    try:
        with pytest.raises(asyncpg.InvalidTextRepresentationError) as raised:
            async with pool.acquire():
                pass
        assert f'"{letter}"' in str(raised.value)
    finally:
        pool.terminate()


async def test_a_setup_hooks_server_error_keeps_a_quoted_value_not_in_the_password(refused_role: Any) -> None:
    await refused_role.admit()

    async def setup(con: Any) -> None:
        await con.execute("SELECT 'xyz'::int")

    pool = await safepool.create_pool(refused_role.dsn, min_size=1, max_size=1, setup=setup)
    try:
        with pytest.raises(asyncpg.InvalidTextRepresentationError) as raised:
            async with pool.acquire():
                pass
        assert '"xyz"' in str(raised.value)
    finally:
        pool.terminate()


@pytest.mark.parametrize("mode", ["full", "auto", "rollback"])
async def test_a_lost_proxys_running_statement_ends_and_the_stand_in_lease_is_reclaimed(
    pg_dsn: str, mode: str
) -> None:
    import gc
    import warnings

    from safepool import _internals

    pool = await safepool.create_pool(pg_dsn, min_size=1, max_size=1, reset_mode=mode)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ResourceWarning)
            statement = (await pool.acquire()).fetchval(  # safepool: ignore (lost under test)
                "SELECT set_config('application_name', 'h209 lost', false) FROM pg_sleep(0.3)"
            )
            running = asyncio.ensure_future(statement)
            del statement
            gc.collect()
            [slot] = pool._runner.slot_holders
            async with asyncio.timeout(5):
                while type(slot.connection._proxy) is not _internals.StandIn:
                    await asyncio.sleep(0.005)
            stand_in = _stand_in_ref(pool)
            assert await asyncio.wait_for(running, 5) == "h209 lost"
            del running
            gc.collect()
            async with asyncio.timeout(10):
                while pool.leases():
                    await asyncio.sleep(0.01)
        gc.collect()
        assert stand_in() is None
        async with pool.acquire(timeout=5) as con:
            assert await con.fetchval("SELECT current_setting('application_name')") != "h209 lost"
        pool._state.check_invariants()
    finally:
        await asyncio.wait_for(pool.close(), 10)


# ------------------------------------ (c) a sync Mock spec'd on a function


SPEC_MOCK = (
    "errors.is_coroutine_function calls inspect.iscoroutinefunction, which raises TypeError for a Mock "
    "spec'd on a plain function (Mock(spec=handler): isinstance(mock, FunctionType) holds, and its "
    "__code__.co_flags is a Mock): add_event_listener/add_listener/add_timing_sink/on_pool_created refuse this "
    "sync callable with a bare TypeError ('unsupported operand type(s) for &'), which check_callable accepted"
)


def _handler(event: Any) -> None:
    pass


async def test_a_mock_specd_on_a_plain_function_is_a_listener(pg_dsn: str) -> None:
    from unittest import mock

    pool = await safepool.create_pool(pg_dsn, min_size=1, max_size=1)
    try:
        listener = mock.Mock(spec=_handler)
        pool.add_event_listener(listener)
        con = await pool.acquire()
        await pool.release(con)
        await pool.release(con)  # a late release: an event
        await asyncio.sleep(0.05)
        assert listener.call_count == 1
    finally:
        await asyncio.wait_for(pool.close(), 10)


async def test_a_mock_specd_on_a_plain_function_is_a_created_hook() -> None:
    from unittest import mock

    from safepool.pool import on_pool_created

    remove = on_pool_created(mock.Mock(spec=_handler))
    remove()


async def test_callables_told_apart(pg_dsn: str) -> None:
    """What held: sync callables accepted (a class, a bound method, a partial
    of a plain function, a builtin method, a plain Mock), coroutine
    functions refused (a partial of one, an AsyncMock, an async __call__)."""
    import functools
    from unittest import mock

    class Sync:
        def __call__(self, event: Any) -> None:
            pass

    class Async:
        async def __call__(self, event: Any) -> None:
            pass

    async def handle(event: Any) -> None:
        pass

    pool = await safepool.create_pool(pg_dsn, min_size=1, max_size=1)
    try:
        for ok in (Sync, Sync(), functools.partial(_handler), [].append, mock.Mock(), mock.MagicMock(), print):
            pool.add_event_listener(ok)
            pool.remove_event_listener(ok)
        for refused in (handle, functools.partial(handle), mock.AsyncMock(), Async()):
            with pytest.raises(safepool.PoolTypeError):
                pool.add_event_listener(refused)
    finally:
        await asyncio.wait_for(pool.close(), 10)


# ------------------------------- (a) an init= hook's error group quoting the DSN


GROUP_SCRUB = (
    "_secrets.scrub_connect_error walks an error's __cause__/__context__ chain but not an ExceptionGroup's "
    "sub-exceptions: an init= hook that prepares in an asyncio.TaskGroup raises an ExceptionGroup whose "
    "RuntimeError(f'cannot prepare {dsn}') reaches create_pool()'s caller (and any traceback of it) with the "
    "password, where the same error raised bare is masked"
)


async def test_an_init_hooks_error_group_quoting_the_dsn_is_masked(refused_role: Any) -> None:
    import traceback

    await refused_role.admit()
    dsn = refused_role.dsn

    async def prepare() -> None:
        raise RuntimeError(f"cannot prepare {dsn}")

    async def init(con: Any) -> None:
        async with asyncio.TaskGroup() as group:
            group.create_task(prepare())

    with pytest.raises(BaseExceptionGroup) as raised:
        pool = await safepool.create_pool(dsn, min_size=1, max_size=1, init=init)
        pool.terminate()
    shown = "".join(traceback.format_exception(raised.value))
    assert "cannot prepare" in shown
    assert refused_role.password not in shown
