"""Pool events (log records and listener callbacks), and the promise that no
password or query parameter reaches any of safepool's outputs: logs, events,
warnings, metrics, health reports, error messages, repr(pool)."""

from __future__ import annotations

import asyncio
import gc
import logging
import uuid
import warnings
from collections.abc import AsyncIterator, Iterator
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
import pytest_asyncio
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from prometheus_client import CollectorRegistry, generate_latest

import safepool
from safepool import LeaseExpiredError, ManualClock
from safepool.metrics.otel import instrument
from safepool.metrics.prometheus import register
from tests._util import until, until_in_pg_sleep

pytestmark = pytest.mark.asyncio

# Built from pieces so that no source line quoted in a stack or traceback
# (acquire sites, leak reports) can contain the secret itself.
SECRET = "".join(["s3cr", "etPW"])
PARAMETER = "".join(["param", "S3cret"])


def with_credentials(dsn: str, user: str, password: str | None, *, port: str | None = None) -> str:
    parts = urlsplit(dsn)
    hostport = parts.netloc.rpartition("@")[2]
    if port is not None:
        hostport = f"127.0.0.1:{port}"
    auth = user if password is None else f"{user}:{password}"
    return urlunsplit(parts._replace(netloc=f"{auth}@{hostport}"))


@pytest_asyncio.fixture
async def secret_user(pg_dsn: str) -> AsyncIterator[str]:
    """A login role whose password is SECRET."""
    role = f"sp_secret_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(pg_dsn)
    try:
        await admin.execute(f"CREATE ROLE {role} LOGIN PASSWORD '{SECRET}'")
        yield role
        await admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = $1", role
        )
        await admin.execute(f"DROP ROLE IF EXISTS {role}")
    finally:
        await admin.close()


class Capture(logging.Handler):
    """Every record of every logger, as the text a log pipeline could see."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []
        self.texts: list[str] = []
        self.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
        self.texts.append(self.format(record))  # message, args and formatted traceback
        self.texts.append(repr(vars(record)))  # extra= fields, raw args


@pytest.fixture
def capture() -> Iterator[Capture]:
    handler = Capture()
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    try:
        yield handler
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)


async def test_listeners_get_every_event_with_its_fields(pg_dsn: str, app_name: str) -> None:
    clock = ManualClock()
    refuse = False

    async def connect(*args: Any, **kwargs: Any) -> Any:
        if refuse:
            raise ConnectionRefusedError("connection refused (test)")
        return await asyncpg.connect(*args, **kwargs)

    events: list[dict[str, Any]] = []
    pool = await safepool.create_pool(
        pg_dsn, name="events", min_size=1, max_size=2, clock=clock, lease_timeout=30.0, leak_warning_after=10.0,
        connect=connect, server_settings={"application_name": app_name}, wait_on_connect_error=True,
    )
    try:
        pool.add_listener(events.append)
        con = await pool.acquire()
        clock.advance(11.0)
        clock.advance(20.0)
        await until(lambda: pool.stats().idle == 1)
        assert [e["event"] for e in events] == ["leak_suspect", "lease_expired"]
        suspect, expired = events
        assert suspect["pool"] == "events" and suspect["held_seconds"] == pytest.approx(10.0)
        assert "test_metrics_events.py" in suspect["acquired_at"] and suspect["lease_id"] == expired["lease_id"]
        assert expired["held_seconds"] == pytest.approx(30.0)
        with pytest.raises(LeaseExpiredError):
            await con.fetchval("SELECT 1")

        events.clear()
        refuse = True
        first = await pool.acquire()
        # Needs a second connection: refused; it waits (wait_on_connect_error).
        waiter = asyncio.ensure_future(pool.acquire(timeout=None))
        await until(lambda: bool(events))
        await pool.release(first)
        await pool.release(await waiter)
        # The refusal, then the breaker's transition: the pool still has a
        # connection, so it is backing off, not down.
        assert events == [
            {"event": "connect_failed", "pool": "events",
             "error": "ConnectionRefusedError: connection refused (test)", "consecutive_failures": 1},
            {"event": "server_status", "pool": "events", "from": "up", "to": "backing_off"},
        ]
    finally:
        pool.terminate()


class Refusing:
    """A ``connect=`` that opens asyncpg connections until ``on`` is set,
    then raises ConnectionRefusedError (nothing listening)."""

    def __init__(self) -> None:
        self.on = False

    async def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.on:
            raise ConnectionRefusedError("connection refused (test)")
        return await asyncpg.connect(*args, **kwargs)


async def _backing_off(
    pg_dsn: str, app_name: str, name: str, min_size: int, refusing: Refusing, events: list[dict[str, Any]]
) -> tuple[Any, Any]:
    """A pool (max_size 2, wait_on_connect_error) with one connection leased,
    then backing off: the next acquire's connect was refused and it timed
    out. Returns the pool and the leased connection; events go to ``events``."""
    pool = await safepool.create_pool(
        pg_dsn, name=name, min_size=min_size, max_size=2, connect=refusing, wait_on_connect_error=True,
        server_settings={"application_name": app_name},
    )
    try:
        pool.add_listener(events.append)
        first = await pool.acquire()
        refusing.on = True
        with pytest.raises(safepool.PoolTimeoutError):
            await pool.acquire(timeout=0.2)  # its connect is refused: backing off
    except BaseException:
        pool.terminate()
        raise
    return pool, first


async def test_server_status_event_when_the_last_connection_goes_while_backing_off(
    pg_dsn: str, app_name: str
) -> None:
    """Backing off (connects refused, one connection left), then that
    connection closes: stats() and health() say ``down`` at once, and so must
    the ``server_status`` event and log record, not only whenever the next
    connect fails (never, with nobody waiting and no min_size to restore)."""
    refusing = Refusing()
    events: list[dict[str, Any]] = []
    pool, first = await _backing_off(pg_dsn, app_name, "status", 0, refusing, events)
    try:
        assert pool.stats().server_status == "backing_off"
        assert {"event": "server_status", "pool": "status", "from": "up", "to": "backing_off"} in events
        events.clear()
        first.terminate()  # the last connection goes (as a server would drop it)
        await pool.release(first)
        await until(lambda: pool.get_size() == 0)
        assert pool.stats().server_status == "down"
        assert [e for e in events if e["event"] == "server_status"] == [
            {"event": "server_status", "pool": "status", "from": "backing_off", "to": "down"}
        ]
        refusing.on = False
        assert await pool.fetchval("SELECT 1") == 1
        assert [e for e in events if e["event"] == "server_status"][-1] == {
            "event": "server_status", "pool": "status", "from": "down", "to": "up"
        }
    finally:
        pool.terminate()


async def test_a_failing_listener_is_logged_and_the_others_still_run(
    pg_dsn: str, capture: Capture
) -> None:
    clock = ManualClock()
    pool = await safepool.create_pool(pg_dsn, name="listeners", min_size=1, max_size=1, clock=clock,
                                      leak_warning_after=1.0)
    try:
        seen: list[str] = []

        def broken(event: dict[str, Any]) -> None:
            raise RuntimeError("listener bug")

        pool.add_listener(broken)
        pool.add_listener(lambda event: seen.append(event["event"]))
        con = await pool.acquire()
        clock.advance(2.0)
        assert seen == ["leak_suspect"]
        failed = [r for r in capture.records if "event listener failed" in r.getMessage()]
        assert len(failed) == 1 and "RuntimeError: listener bug" in failed[0].getMessage()
        assert failed[0].exc_info is None  # formatted: no traceback keeps the pool's frames alive
        # Structured as every record of the pool (docs/metrics.md, Events):
        # a JSON log formatter routes on event and pool.
        assert (getattr(failed[0], "event", None), getattr(failed[0], "pool", None)) == ("listener_failed", "listeners")

        def broken_sink(value: float) -> None:
            raise RuntimeError("sink bug")

        pool.add_timing_sink("lease", broken_sink)
        await pool.release(con)
        await until(lambda: any("timing sink failed" in r.getMessage() for r in capture.records))
        sink = next(r for r in capture.records if "timing sink failed" in r.getMessage())
        assert (getattr(sink, "event", None), getattr(sink, "pool", None)) == ("timing_sink_failed", "listeners")
        con = await pool.acquire()
        records = [r for r in capture.records if getattr(r, "event", None) == "leak_suspect"]
        assert records and records[0].name == "safepool.leaks" and records[0].pool == "listeners"  # type: ignore[attr-defined]
        await pool.release(con)
    finally:
        pool.terminate()


async def test_no_password_or_query_parameter_anywhere(
    pg_dsn: str, secret_user: str, capture: Capture
) -> None:
    dsn = with_credentials(pg_dsn, secret_user, SECRET)
    assert SECRET in dsn
    outputs: list[str] = []  # everything safepool shows an operator, besides the logs
    events: list[dict[str, Any]] = []
    clock = ManualClock()
    registry = CollectorRegistry()
    unreachables: list[safepool.Pool] = []
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    # No name: the default name must not be derived from the DSN either.
    pool = await safepool.create_pool(
        dsn, min_size=1, max_size=2, clock=clock, lease_timeout=30.0, leak_warning_after=10.0,
    )
    by_keyword = await safepool.create_pool(with_credentials(pg_dsn, secret_user, None), password=SECRET,
                                            min_size=1, max_size=1)
    try:
        for p in (pool, by_keyword):
            p.add_listener(events.append)
            p.add_listener(lambda event: 1 / 0)  # a broken listener: its traceback is logged
        collector = register(pool, by_keyword, registry=registry)
        instrument(pool, by_keyword, meter_provider=provider)
        assert await pool.fetchval("SELECT current_user") == secret_user
        assert await by_keyword.fetchval("SELECT $1::text", PARAMETER) == PARAMETER

        # Leak suspect, then lease expiry while a query with a parameter runs.
        con = await pool.acquire()
        running = asyncio.ensure_future(con.fetchval("SELECT pg_sleep(30)::text || $1::text", PARAMETER))
        await until_in_pg_sleep(pg_dsn, con.get_server_pid())
        clock.advance(11.0)
        clock.advance(20.0)
        with pytest.raises((LeaseExpiredError, asyncpg.QueryCanceledError)) as expired:
            await asyncio.wait_for(running, 10)
        outputs.append(f"{expired.value!r} {expired.value}")
        # The kept error's traceback refers to the connection: the pool
        # reclaims only connections nothing outside it refers to.
        del expired, running
        await until(lambda: pool.stats().in_use == 0 and pool.stats().resetting == 0)

        # A connection dropped without release: reclaimed, logged, warned.
        async def forget() -> None:
            leaked = await pool.acquire()
            await leaked.fetchval("SELECT $1::text", PARAMETER)

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            await forget()
            gc.collect()
            await until(lambda: pool.stats().leaks_detected == 1 and pool.stats().in_use == 0)
        outputs.extend(str(w.message) for w in caught)

        # Pool exhausted: the timeout message says who holds what.
        a, b = await pool.acquire(), await pool.acquire()
        waiter = asyncio.ensure_future(pool.acquire(timeout=None))
        await until(lambda: pool.stats().waiting == 1)
        clock.advance(6.0)
        report = await pool.health(probe_timeout=0.1)
        outputs += [repr(report), str(report.to_dict())]
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        with pytest.raises(safepool.PoolTimeoutError) as timeout:
            await _timeout(pool, clock)
        outputs.append(str(timeout.value))
        await pool.release(a)
        await pool.release(b)

        # Unreachable servers, with the password in the DSN: refused at pool
        # creation, refused later (the pool logs and emits connect_failed),
        # and a DSN the driver cannot even parse.
        for bad in (with_credentials(pg_dsn, secret_user, SECRET, port="1"),
                    with_credentials(pg_dsn, secret_user, SECRET, port="notaport")):
            try:
                await safepool.create_pool(bad, min_size=1, max_size=1)
            except Exception as exc:  # what the application sees, chained causes included
                outputs.append(f"{exc!r} {exc} {exc.__cause__!r} {exc.__context__!r}")
            else:
                raise AssertionError("the pool was created on an unreachable server")
            unreachable = await safepool.create_pool(bad, min_size=0, max_size=1)
            unreachables.append(unreachable)
            unreachable.add_listener(events.append)
            collector.add(unreachable)
            for _ in range(2):
                try:
                    await unreachable.fetchval("SELECT 1")
                except Exception as exc:
                    outputs.append(f"{exc!r} {exc} {exc.__cause__!r} {exc.__context__!r}")
                else:
                    raise AssertionError("a query ran on an unreachable server")
            report = await unreachable.health(probe_timeout=0.5)
            assert report.status == "failing"
            outputs += [repr(report), str(report.to_dict()), repr(unreachable)]
        assert any(e["event"] == "connect_failed" for e in events)

        outputs += [repr(pool), repr(by_keyword), repr(pool.stats()), repr(pool.leases())]
        outputs.append(generate_latest(registry).decode())
        data = reader.get_metrics_data()
        assert data is not None
        outputs.append(data.to_json())
    finally:
        for p in (pool, by_keyword, *unreachables):
            p.terminate()
        provider.shutdown()

    outputs += [repr(event) for event in events]
    outputs += capture.texts
    kinds = {e["event"] for e in events}
    assert {"leak_suspect", "lease_expired", "leak", "connect_failed"} <= kinds
    assert any("event listener failed" in text for text in capture.texts)
    assert any("Traceback" in text for text in capture.texts)
    for text in outputs:
        assert SECRET not in text, text
        assert PARAMETER not in text, text


async def _timeout(pool: safepool.Pool, clock: ManualClock) -> None:
    attempt = asyncio.ensure_future(pool.acquire(timeout=1.0))
    await until(lambda: pool.stats().waiting >= 1)
    clock.advance(1.5)
    await attempt


async def test_breaker_transitions_are_logged_and_emitted(pg_dsn: str, caplog: pytest.LogCaptureFixture) -> None:
    """down when the last connection is gone and connects fail; up again after a success."""
    refuse = False

    async def connect(*args: object, **kwargs: object) -> object:
        if refuse:
            raise ConnectionRefusedError("refused (test)")
        return await asyncpg.connect(*args, **kwargs)

    caplog.set_level(logging.INFO, logger="safepool")
    events: list[dict[str, object]] = []
    clock = ManualClock()
    pool = await safepool.create_pool(pg_dsn, min_size=0, max_size=1, connect=connect, clock=clock,
                                      name="breaker", backoff=safepool.Backoff(base=1.0, cap=1.0, rng=lambda: 1.0))
    pool.add_listener(events.append)
    try:
        refuse = True
        with pytest.raises(ConnectionRefusedError):
            await pool.acquire()
        refuse = False
        clock.advance(1.0)  # past the backoff
        async with pool.acquire(timeout=5) as con:
            assert await con.fetchval("SELECT 1") == 1
        transitions = [(e["from"], e["to"]) for e in events if e["event"] == "server_status"]
        assert transitions == [("up", "down"), ("down", "up")]
        logged = [(r.levelno, getattr(r, "to", None)) for r in caplog.records if getattr(r, "event", None) == "server_status"]
        assert logged == [(logging.WARNING, "down"), (logging.INFO, "up")]
    finally:
        pool.terminate()


async def test_terminate_reports_unreleased_leases_and_late_releases(pg_dsn: str) -> None:
    pool = await safepool.create_pool(pg_dsn, name="ending", min_size=1, max_size=2, capture_stack=True)
    events: list[dict[str, Any]] = []
    pool.add_listener(events.append)
    kept = await pool.acquire()  # never released before the terminate
    returned = await pool.acquire()
    await pool.release(returned)
    pool.terminate()
    [ended] = [e for e in events if e["event"] == "lease_ended"]
    assert ended["lease_id"] == kept._lease.id and ended["reason"] == "terminate"
    assert ended["pool"] == "ending" and ended["held_seconds"] >= 0
    assert "test_metrics_events.py" in ended["acquired_at"] and "kept = await pool.acquire()" in ended["stack"]
    await pool.release(kept)  # a no-op, as in asyncpg; the guards learn of it
    await pool.release(returned)  # released twice: a no-op too
    late = [e["lease_id"] for e in events if e["event"] == "late_release"]
    assert late == [kept._lease.id, returned._lease.id]


async def test_closing_a_pool_while_backing_off_reports_no_server_status(pg_dsn: str, app_name: str) -> None:
    """close() of a pool whose connects fail closes its last connections: not
    a change in the server's state, so no server_status event or record."""
    events: list[dict[str, Any]] = []
    pool, first = await _backing_off(pg_dsn, app_name, "closing", 1, Refusing(), events)
    try:
        await pool.release(first)
        assert pool.stats().server_status == "backing_off"
        events.clear()
        await asyncio.wait_for(pool.close(), 10)
        assert [e for e in events if e["event"] == "server_status"] == []
    finally:
        pool.terminate()
