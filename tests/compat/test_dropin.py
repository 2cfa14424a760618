"""Drop-in scenarios: programs written against asyncpg's pool must get asyncpg's outcome.

Each test runs on both pools (``flavour`` / ``make_pool`` from test_parity.py)
and asserts, once, the value asyncpg gives. State is checked from the server's
side through a separate session (``admin``) right after the lease ends, since
that is when the next holder, or another session, can observe it.
Recovery after a server restart is covered in tests/faults.
"""

from __future__ import annotations

import asyncio
import contextvars
import gc
import io
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import anyio
import asyncpg
import pytest
import pytest_asyncio

from tests._util import MakePool, skip_before_asyncpg
from tests.compat import test_parity as parity

# test_parity.py's flavour fixture (both pools); make_pool is tests/conftest.py's.
flavour = parity.flavour

pytestmark = pytest.mark.asyncio

DEFAULT_SEARCH_PATH = '"$user", public'


@pytest.fixture
def uniq() -> str:
    """A fresh SQL identifier suffix: tables and channels are shared by both pools' runs."""
    return uuid.uuid4().hex[:12]


@pytest_asyncio.fixture
async def admin(pg_dsn: str) -> AsyncIterator[asyncpg.Connection]:
    """A raw session outside the pool, to observe the pool's sessions from the server."""
    con = await asyncpg.connect(pg_dsn)
    try:
        yield con
    finally:
        await con.close()


@pytest_asyncio.fixture
async def table(admin: asyncpg.Connection, uniq: str) -> AsyncIterator[Callable[[str], Awaitable[str]]]:
    """``await table("(id int primary key)")``: a fresh table, dropped after the test
    (request it before ``make_pool``, so the pools are gone, with their locks, first)."""
    made: list[str] = []

    async def make(columns: str) -> str:
        name = f"dropin_{uniq}_{len(made)}"
        await admin.execute(f"CREATE TABLE {name} {columns}")
        made.append(name)
        return name

    yield make
    for name in made:
        await admin.execute(f"DROP TABLE IF EXISTS {name}")


@pytest_asyncio.fixture
async def loop_reports() -> AsyncIterator[list[str]]:
    """Messages sent to the loop's exception handler (asyncpg reports an
    unmanaged open transaction found at release there)."""
    loop = asyncio.get_running_loop()
    reports: list[str] = []
    loop.set_exception_handler(lambda _loop, context: reports.append(str(context.get("message"))))
    try:
        yield reports
    finally:
        loop.set_exception_handler(None)


async def lease(pool: Any, how: str, body: Callable[[Any], Awaitable[None]]) -> None:
    """Run ``body(con)`` in one lease ended by ``pool.release()`` or by ``async with``."""
    if how == "release":
        con = await pool.acquire()
        try:
            await body(con)
        finally:
            await pool.release(con)
    else:
        async with pool.acquire() as con:
            await body(con)


# ------------------------------------------------- 1. session state ends with the lease


async def test_a_leased_connection_is_a_pool_connection_proxy(make_pool: MakePool) -> None:
    """Code branches on asyncpg's proxy class, e.g. "release it if it came from
    a pool, else close it" (seen in public code): on safepool's pool it must
    release, not close the pool's connection (each request would then open a
    new backend)."""
    pool = await make_pool(min_size=1, max_size=1)
    con = await pool.acquire()
    pid = con.get_server_pid()
    assert isinstance(con, asyncpg.pool.PoolConnectionProxy)
    assert isinstance(con, asyncpg.Connection)
    if isinstance(con, asyncpg.pool.PoolConnectionProxy):
        await pool.release(con)
    else:
        await con.close()
    async with pool.acquire() as again:
        assert again.get_server_pid() == pid
        assert isinstance(again, asyncpg.pool.PoolConnectionProxy)


async def test_an_acquire_context_is_asyncpg_s_pool_acquire_context(make_pool: MakePool) -> None:
    """``pool.acquire()`` is an ``asyncpg.pool.PoolAcquireContext`` on both
    pools (code and annotations name that class, as they name its proxy),
    with asyncpg's attributes: ``timeout``, ``connection``, ``done``."""
    pool = await make_pool(min_size=1, max_size=1)
    ctx = pool.acquire(timeout=5)
    assert isinstance(ctx, asyncpg.pool.PoolAcquireContext)
    assert (ctx.timeout, ctx.connection, ctx.done) == (5, None, False)
    async with ctx as con:
        assert isinstance(con, asyncpg.pool.PoolConnectionProxy)
        assert ctx.connection is con
    assert (ctx.connection, ctx.done) == (None, True)
    assert pool.acquire().timeout is None


async def test_row_lock_is_gone_right_after_the_block(
    table: Any, make_pool: MakePool, loop_reports: list[str]
) -> None:
    t = await table("(id int primary key)")
    pool = await make_pool(min_size=2, max_size=2)
    await pool.execute(f"INSERT INTO {t} VALUES (1)")
    other = await pool.acquire()
    refused = 0
    try:
        for _ in range(50):
            with pytest.raises(ValueError):
                async with pool.acquire() as con:
                    await con.execute("BEGIN")
                    await con.fetch(f"SELECT * FROM {t} WHERE id = 1 FOR UPDATE")
                    raise ValueError
            try:
                await other.fetch(f"SELECT * FROM {t} WHERE id = 1 FOR UPDATE NOWAIT")
            except asyncpg.LockNotAvailableError:
                refused += 1
    finally:
        await pool.release(other)
    assert refused == 0, f"the row was still locked right after the block in {refused} of 50 rounds"
    assert sum("active transaction" in message for message in loop_reports) == 50


@pytest.mark.parametrize("how", ["release", "async with"])
async def test_advisory_lock_is_gone_right_after_release(
    make_pool: MakePool, admin: asyncpg.Connection, how: str
) -> None:
    pool = await make_pool(min_size=1, max_size=1)
    key = uuid.uuid4().int % 2**62
    held = 0
    for _ in range(10):
        await lease(pool, how, lambda con: con.execute("SELECT pg_advisory_lock($1)", key))
        if await admin.fetchval("SELECT pg_try_advisory_lock($1)", key):
            await admin.execute("SELECT pg_advisory_unlock($1)", key)
        else:
            held += 1
    assert held == 0, f"another session could not take the advisory lock right after release in {held} of 10 rounds"


class NotificationRecorder(asyncpg.Connection):  # type: ignore[misc]
    """Records every notification the server delivers to the session,
    listener or not (asyncpg's protocol calls ``_process_notification`` for each)."""

    delivered: dict[str, list[str]] = {}

    def _process_notification(self, pid: int, channel: str, payload: str) -> None:
        self.delivered.setdefault(channel, []).append(payload)
        super()._process_notification(pid, channel, payload)


@pytest.mark.parametrize("how", ["release", "async with"])
async def test_listen_is_gone_right_after_release(
    make_pool: MakePool, admin: asyncpg.Connection, uniq: str, how: str
) -> None:
    pool = await make_pool(min_size=1, max_size=1, connection_class=NotificationRecorder)
    channel = f"dropin_{uniq}"
    for i in range(10):
        await lease(pool, how, lambda con: con.execute(f"LISTEN {channel}"))
        await admin.execute(f"NOTIFY {channel}, '{i}'")
    # The server sends a notification to a listening session before the reply
    # to that session's next statement: after this one, all have arrived.
    async with pool.acquire() as con:
        assert await con.fetchval("SELECT count(*) FROM pg_listening_channels()") == 0
    assert NotificationRecorder.delivered.pop(channel, []) == []


@pytest.mark.parametrize("how", ["release", "async with"])
async def test_open_transaction_is_ended_right_after_release(
    make_pool: MakePool, admin: asyncpg.Connection, loop_reports: list[str], how: str
) -> None:
    pool = await make_pool(min_size=1, max_size=1)
    states: list[str] = []
    pids: list[int] = []

    async def body(con: Any) -> None:
        pids.append(con.get_server_pid())
        await con.execute("BEGIN")
        await con.execute("SELECT 1")

    for _ in range(10):
        await lease(pool, how, body)
        states.append(await admin.fetchval("SELECT state FROM pg_stat_activity WHERE pid = $1", pids[-1]))
    assert states == ["idle"] * 10
    assert sum("active transaction" in message for message in loop_reports) == 10


# ------------------------------------------- 2. a connection running a statement is in use


@pytest.mark.realtime
@pytest.mark.filterwarnings("ignore::ResourceWarning")
async def test_statement_outlives_its_dropped_proxy(table: Any, make_pool: MakePool) -> None:
    t2 = await table("(a int)")
    pool = await make_pool(min_size=1, max_size=3)
    assert await (await pool.acquire()).fetchval("SELECT 42 FROM pg_sleep(0.3)") == 42
    assert await (await pool.acquire()).execute(f"INSERT INTO {t2} SELECT 1 FROM pg_sleep(0.3)") == "INSERT 0 1"
    assert await pool.fetchval(f"SELECT count(*) FROM {t2}") == 1


@pytest.mark.filterwarnings("ignore::ResourceWarning")
async def test_cursor_and_transaction_outlive_their_dropped_proxy(
    make_pool: MakePool, admin: asyncpg.Connection
) -> None:
    pool = await make_pool(min_size=1, max_size=2)
    con = await pool.acquire()
    transaction = con.transaction()
    await transaction.start()
    cursor = await con.cursor("SELECT generate_series(1, 30)")
    del con
    gc.collect()
    await admin.execute("SELECT 1")  # lets the loop run what the collection scheduled
    first = [r[0] for r in await cursor.fetch(10)]
    await admin.execute("SELECT 1")
    second = [r[0] for r in await cursor.fetch(10)]
    await transaction.commit()
    assert (first, second) == (list(range(1, 11)), list(range(11, 21)))


# ---------------------------------------------- 3. a connection with callbacks is in use


# A real program only prints warnings: turned into errors, asyncpg's
# InterfaceWarning ("released to the pool but has 1 active listener") would
# abort a pool's reclaim of the connection halfway and hide what it does.
@pytest.mark.filterwarnings("ignore::ResourceWarning")
@pytest.mark.filterwarnings("ignore::asyncpg.InterfaceWarning")
@pytest.mark.parametrize("callback", ["listener", "log_listener", "termination_listener", "query_logger"])
async def test_callbacks_outlive_their_dropped_proxy(
    make_pool: MakePool, admin: asyncpg.Connection, uniq: str, callback: str
) -> None:
    pool = await make_pool(min_size=1, max_size=2)
    fired = asyncio.Event()
    seen: list[str] = []

    def record(value: str) -> None:
        seen.append(value)
        fired.set()

    con = await pool.acquire()
    pid = con.get_server_pid()
    channel = f"dropin_{uniq}"
    keep: Any = None  # an object of the lease's own that the application keeps
    if callback == "listener":
        await con.add_listener(channel, lambda _con, _pid, _channel, payload: record(payload))
    elif callback == "log_listener":
        con.add_log_listener(lambda _con, message: record(message.message))
        keep = await con.prepare("DO $$ BEGIN RAISE NOTICE 'dropin notice'; END $$")
    elif callback == "termination_listener":
        con.add_termination_listener(lambda _con: record("terminated"))
    else:
        con.add_query_logger(lambda logged: record(logged.query))
        keep = con.transaction()
    del con
    gc.collect()
    await admin.execute("SELECT 1")  # lets the loop run what the collection scheduled

    if callback == "listener":
        await admin.execute(f"NOTIFY {channel}, 'hello'")
        expected = ["hello"]
    elif callback == "log_listener":
        await keep.fetch()
        expected = ["dropin notice"]
    elif callback == "termination_listener":
        assert await admin.fetchval("SELECT pg_terminate_backend($1)", pid)
        expected = ["terminated"]
    else:
        await keep.start()
        await keep.commit()
        expected = ["BEGIN;", "COMMIT;"]
    try:
        async with asyncio.timeout(1):
            while len(seen) < len(expected):
                fired.clear()
                await fired.wait()
    except TimeoutError:
        pass  # reported by the assertion below
    assert seen == expected


# ----------------------------------------------- 4. hook state does not outlive the lease

tenant: contextvars.ContextVar[str | None] = contextvars.ContextVar("tenant", default=None)


async def test_setup_hook_state_does_not_leak_to_the_next_lease(make_pool: MakePool) -> None:
    async def setup(con: Any) -> None:
        if tenant.get() is not None:
            await con.execute(f"SET search_path TO {tenant.get()}")

    pool = await make_pool(min_size=1, max_size=1, setup=setup)
    token = tenant.set("tenant_a")
    try:
        async with pool.acquire():
            pass  # the tenant's lease runs no statement of its own
    finally:
        tenant.reset(token)
    async with pool.acquire() as con:
        assert await con.fetchval("SHOW search_path") == DEFAULT_SEARCH_PATH


async def test_init_hook_settings_last_until_the_first_release(make_pool: MakePool) -> None:
    async def init(con: Any) -> None:
        await con.execute("SET search_path TO from_init")

    pool = await make_pool(min_size=1, max_size=1, init=init)
    async with pool.acquire():
        pass
    # asyncpg's release resets the session (RESET ALL): init's SET is gone.
    async with pool.acquire() as con:
        assert await con.fetchval("SHOW search_path") == DEFAULT_SEARCH_PATH


# ------------------------------------ 5. cancelling a running query leaves one backend


async def _sleeping(admin: asyncpg.Connection, app_name: str) -> list[asyncpg.Record]:
    return await admin.fetch(
        "SELECT pid, state, query FROM pg_stat_activity WHERE application_name = $1", app_name
    )


@pytest.mark.realtime
@pytest.mark.parametrize(
    "how",
    ["cancel", "double cancel", "asyncio.timeout", "wait_for", "anyio.CancelScope", "anyio.move_on_after"],
)
async def test_cancelled_query_leaves_no_extra_backend(
    make_pool: MakePool, admin: asyncpg.Connection, app_name: str, how: str
) -> None:
    pool = await make_pool(min_size=1, max_size=1, server_settings={"application_name": app_name})
    loop = asyncio.get_running_loop()
    handles: list[Any] = []

    async def query() -> None:
        async with pool.acquire() as con:
            await con.execute("SELECT pg_sleep(5)")

    async def worker() -> None:
        if how == "asyncio.timeout":
            async with asyncio.timeout(None) as deadline:
                handles.append(deadline)
                await query()
        elif how == "anyio.CancelScope":
            with anyio.CancelScope() as scope:
                handles.append(scope)
                await query()
        elif how == "anyio.move_on_after":
            with anyio.move_on_after(0.2):
                await query()
        else:
            await query()

    task = asyncio.ensure_future(asyncio.wait_for(worker(), 0.2) if how == "wait_for" else worker())
    async with asyncio.timeout(3):
        while not any(r["state"] == "active" and "pg_sleep" in r["query"] for r in await _sleeping(admin, app_name)):
            await asyncio.sleep(0.01)
    if how in ("cancel", "double cancel"):
        task.cancel()
        if how == "double cancel":
            await asyncio.sleep(0)
            task.cancel()
    elif how == "asyncio.timeout":
        handles[0].reschedule(loop.time())
    elif how == "anyio.CancelScope":
        handles[0].cancel()
    # wait_for and move_on_after cancel at their 0.2 s deadline, started before the query.

    start = loop.time()
    samples: list[tuple[float, list[asyncpg.Record]]] = []
    while loop.time() - start < 0.6:  # a replacement backend would show within ms; the cancel, too
        samples.append((loop.time() - start, await _sleeping(admin, app_name)))
        await asyncio.sleep(0.02)
    await asyncio.wait({task}, timeout=1)
    assert task.done(), "the cancelled task is still running"
    await asyncio.gather(task, return_exceptions=True)
    most = max(len(rows) for _, rows in samples)
    assert most <= 1, f"{most} backends at once for the pool's application_name"
    still = [r["pid"] for t, rows in samples if t >= 0.4 for r in rows if r["state"] == "active" and "pg_sleep" in r["query"]]
    assert not still, f"pg_sleep still running 0.4 s after the cancellation (backends {sorted(set(still))})"
    async with asyncio.timeout(2):
        assert await pool.fetchval("SELECT 1") == 1


# --------------------------------------------- 6. defaults do not break a working program


@pytest.mark.realtime
async def test_many_concurrent_statements_on_default_settings(table: Any, make_pool: MakePool) -> None:
    t3 = await table("(a int)")
    pool = await make_pool(min_size=10, max_size=10)
    results = await asyncio.gather(
        *(pool.execute(f"INSERT INTO {t3} VALUES ($1)", i) for i in range(1500)), return_exceptions=True
    )
    errors = [r for r in results if isinstance(r, BaseException)]
    assert not errors, f"{len(errors)} of 1500 statements failed, first: {errors[0]!r}"
    assert await pool.fetchval(f"SELECT count(*) FROM {t3}") == 1500


# ----------------------------- 8. the same task gets the same connection back (LIFO)


async def test_temp_table_is_there_in_the_next_lease(make_pool: MakePool) -> None:
    pool = await make_pool(min_size=1, max_size=10)
    async with pool.acquire() as con:
        await con.execute("CREATE TEMP TABLE dropin_tmp (a int)")
    async with pool.acquire() as con:
        assert await con.execute("INSERT INTO dropin_tmp VALUES (1)") == "INSERT 0 1"


async def test_sequential_leases_use_one_connection(make_pool: MakePool, app_name: str, server_count: Any) -> None:
    pool = await make_pool(min_size=1, max_size=10, server_settings={"application_name": app_name})
    pids = set()
    for _ in range(20):
        async with pool.acquire() as con:
            pids.add(await con.fetchval("SELECT pg_backend_pid()"))
    assert len(pids) == 1
    assert await server_count(app_name) == 1


async def test_four_sequential_tasks_use_at_most_four_connections(
    make_pool: MakePool, app_name: str, server_count: Any
) -> None:
    pool = await make_pool(min_size=1, max_size=10, server_settings={"application_name": app_name})

    async def task() -> None:
        for _ in range(20):
            async with pool.acquire() as con:
                await con.execute("SELECT 1")

    await asyncio.gather(*(task() for _ in range(4)))
    assert await server_count(app_name) <= 4


# ------------------------------------- 9. what asyncpg's statement counter does not see


@pytest.mark.parametrize("how", ["copy_from_query", "copy_records_to_table"])
async def test_copy_that_changes_the_session_is_reset(
    how: str, table: Any, make_pool: MakePool, admin: asyncpg.Connection, uniq: str
) -> None:
    """asyncpg's protocol does not count COPY as a statement, yet a COPY's
    query (or a trigger it fires) can take a session lock or change a setting."""
    key = int(uniq[:8], 16)
    pool = await make_pool(min_size=1, max_size=1)
    if how == "copy_from_query":
        await pool.copy_from_query(
            f"SELECT pg_advisory_lock({key}), set_config('search_path', 'dropin_evil', false)", output=io.BytesIO()
        )
    else:
        t = await table("(a int)")
        function = f"dropin_lock_{uniq}"
        await admin.execute(
            f"CREATE FUNCTION {function}() RETURNS trigger LANGUAGE plpgsql AS "
            f"$$ BEGIN PERFORM pg_advisory_lock({key}); RETURN NEW; END $$; "
            f"CREATE TRIGGER {function} BEFORE INSERT ON {t} FOR EACH ROW EXECUTE FUNCTION {function}()"
        )
        try:
            await pool.copy_records_to_table(t, records=[(1,)])
        finally:
            await admin.execute(f"DROP TRIGGER {function} ON {t}; DROP FUNCTION {function}()")
    # Right after the lease, another session can take the lock.
    assert await admin.fetchval("SELECT pg_try_advisory_lock($1)", key) is True
    await admin.execute("SELECT pg_advisory_unlock($1)", key)
    async with pool.acquire() as con:
        assert await con.fetchval("SHOW search_path") == DEFAULT_SEARCH_PATH


async def test_connection_class_reset_sees_the_lease_state(make_pool: MakePool, loop_reports: list[str]) -> None:
    seen: list[tuple[bool, float | None]] = []

    class Recording(asyncpg.Connection):  # type: ignore[misc]
        async def reset(self, *, timeout: float | None = None) -> None:
            seen.append((self.is_in_transaction(), timeout))
            await super().reset(timeout=timeout)

    pool = await make_pool(min_size=1, max_size=1, connection_class=Recording)
    async with pool.acquire(timeout=5) as con:
        await con.execute("BEGIN")
    assert seen == [(True, 5)]
    assert [m for m in loop_reports if m.startswith("Resetting connection with an active transaction")]
    async with pool.acquire() as con:
        assert not con.is_in_transaction()


async def test_overridden_reset_query_runs_after_every_lease(make_pool: MakePool) -> None:
    skip_before_asyncpg((0, 30), "Connection.get_reset_query() (0.29: the private _get_reset_query())")
    class Marking(asyncpg.Connection):  # type: ignore[misc]
        def get_reset_query(self) -> str:
            return "SET application_name = 'dropin_was_reset'"

    pool = await make_pool(min_size=1, max_size=1, connection_class=Marking)
    async with pool.acquire():
        pass  # no statement: asyncpg resets all the same
    async with pool.acquire() as con:
        assert await con.fetchval("SHOW application_name") == "dropin_was_reset"


async def test_refused_connect_raises_while_another_connection_is_leased(
    make_pool: MakePool, admin: asyncpg.Connection, uniq: str
) -> None:
    """A task holding one connection asks for a second on a server (here a
    role) with no room: asyncpg's acquire raises the server's error, it does
    not wait for the task's own connection."""
    role = f"dropin_{uniq}"
    await admin.execute(f"CREATE ROLE {role} LOGIN CONNECTION LIMIT 1")
    try:
        pool = await make_pool(min_size=1, max_size=2, user=role)
        held = await pool.acquire()
        with pytest.raises(asyncpg.TooManyConnectionsError):
            async with asyncio.timeout(5):
                await pool.acquire()
        await pool.release(held)
        pool.terminate()
    finally:
        await admin.execute(f"DROP ROLE {role}")
