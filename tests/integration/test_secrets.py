"""A password in the DSN (or in ``password=``) never shows up in anything the
pool produces: error messages and their causes, log records (message, args
and extra fields), warnings, leak and lease reports, listener events, reprs
of the pool, its connections, stats and leases, health reports, metrics.

The module runs its own cluster with scram-sha-256 authentication (so the
password is really used, and a wrong one is really refused) and scans
everything it captured for the password, raw and URL-encoded.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import traceback
import warnings
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import asyncpg
import pytest

import safepool
from tests._util import until
from tests.faults._pg import APP_PASSWORD, APP_USER, Cluster, free_port, start_cluster

WRONG_PASSWORD = "Wr0ng-hunter2-7xq!"


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    c = start_cluster()
    try:
        yield c
    finally:
        c.cleanup()


class Transcript:
    """Everything the test saw, as text."""

    def __init__(self) -> None:
        self.texts: list[tuple[str, str]] = []
        self.caplog: pytest.LogCaptureFixture | None = None

    def add(self, where: str, obj: Any) -> None:
        if isinstance(obj, BaseException):
            text = "".join(traceback.format_exception(obj))
            text += f"\n{obj!r}\n{obj.args!r}"
            cause = obj.__cause__ or obj.__context__
            while cause is not None:
                text += f"\n{cause!r} {cause.args!r}"
                cause = cause.__cause__ or cause.__context__
        else:
            text = obj if isinstance(obj, str) else repr(obj)
        self.texts.append((where, text))

    def add_records(self, records: list[logging.LogRecord]) -> None:
        formatter = logging.Formatter("%(name)s %(levelname)s %(message)s")
        for record in records:
            self.add(f"log {record.name}", formatter.format(record))
            self.add(f"log args {record.name}", repr(record.args))
            self.add(f"log extra {record.name}", repr(record.__dict__))

    def expect(self, *wheres: str) -> None:
        """These reports were really produced (the scan is not vacuous)."""
        seen = {where for where, _ in self.texts}
        missing = [w for w in wheres if not any(s.startswith(w) for s in seen)]
        assert not missing, f"not captured: {missing}"

    def assert_clean(self, *secrets: str) -> None:
        if self.caplog is not None:
            self.add_records(self.caplog.records)
            self.expect("log safepool")
        assert self.texts, "nothing was captured"
        needles = {s for secret in secrets for s in (secret, quote(secret, safe=""), quote(secret))}
        leaks = [(where, text) for where, text in self.texts for n in needles if n in text]
        assert not leaks, f"secret found in: {[w for w, _ in leaks]}\n{leaks[0][1][:2000]}"


@pytest.fixture
def transcript(caplog: pytest.LogCaptureFixture) -> Iterator[Transcript]:
    caplog.set_level(logging.DEBUG)
    t = Transcript()
    t.caplog = caplog
    yield t


async def _exercise(pool: safepool.Pool, t: Transcript, cluster: Cluster) -> None:
    """Drive the pool through everything that reports: leases, a lease
    timeout, a leak, a timeout, overload, stats, health, metrics."""
    events: list[dict[str, Any]] = []
    pool.add_listener(events.append)
    t.add("repr(pool)", pool)
    t.add("str(pool)", str(pool))
    async with pool.acquire() as con:
        t.add("repr(proxy)", con)
        t.add("str(proxy)", str(con))
        t.add("repr(raw)", con._con)
        t.add("settings", con.get_settings().__dict__ if hasattr(con.get_settings(), "__dict__") else "")
        assert await con.fetchval("SELECT current_user") == APP_USER
        # The timeout message lists who holds what (and from where).
        try:
            await pool.acquire(timeout=0.05)
        except safepool.PoolTimeoutError as exc:
            t.add("PoolTimeoutError", exc)
    t.add("repr(released proxy)", con)

    # A lease timeout: the holder's next call fails with LeaseExpiredError.
    async with pool.acquire(lease_timeout=0.05) as con:
        await until(lambda: pool.stats().leases_expired == 1)
        try:
            await con.fetchval("SELECT 1")
        except safepool.LeaseExpiredError as exc:
            t.add("LeaseExpiredError", exc)
        t.add("repr(expired proxy)", con)

    # A leaked proxy: garbage collected while leased.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        leaked = await pool.acquire()
        del leaked
        gc.collect()
        for _ in range(50):
            await asyncio.sleep(0.01)
            if pool.stats().leaks_detected:
                break
        assert pool.stats().leaks_detected == 1
    for w in caught:
        t.add(f"warning {w.category.__name__}", str(w.message))

    t.add("stats", pool.stats())
    t.add("leases", pool.leases())
    t.add("health", await pool.health())
    t.add("events", events)
    try:
        from prometheus_client import CollectorRegistry, generate_latest

        from safepool.metrics.prometheus import register
    except ImportError:
        pass
    else:
        registry = CollectorRegistry()
        register(pool, registry=registry)
        t.add("prometheus", generate_latest(registry).decode())


@pytest.mark.parametrize("how", ["dsn", "keyword"])
@pytest.mark.asyncio
@pytest.mark.realtime  # an acquire timeout and a lease timeout of 50 ms, on the loop's clock
async def test_password_never_appears_in_pool_output(
    cluster: Cluster, transcript: Transcript, how: str, capsys: pytest.CaptureFixture[str]
) -> None:
    dsn, kwargs = cluster.dsn(), {}
    if how == "keyword":
        dsn, kwargs = f"postgresql://{APP_USER}@127.0.0.1:{cluster.port}/postgres", {"password": APP_PASSWORD}
    pool = await safepool.create_pool(dsn, min_size=1, max_size=1, max_waiters=1, capture_stack=True, **kwargs)
    try:
        await _exercise(pool, transcript, cluster)
        # Overload: one task waits already (max_waiters=1), the next is refused.
        async with pool.acquire():
            waiter = asyncio.create_task(pool.fetchval("SELECT 1"))
            await until(lambda: pool.stats().waiting == 1)
            try:
                await pool.acquire()
            except safepool.PoolOverloadedError as exc:
                transcript.add("PoolOverloadedError", exc)
            waiter.cancel()
        # The server goes away: connect errors, logs and fail-fast errors.
        pool.set_connect_args(
            f"postgresql://{APP_USER}:{quote(APP_PASSWORD, safe='')}@127.0.0.1:{free_port()}/postgres", **kwargs
        )
        await pool.expire_connections()
        for _ in range(5):
            try:
                await pool.fetchval("SELECT 1")
            except Exception as exc:
                transcript.add("acquire on a dead server", exc)
            await asyncio.sleep(0.05)
        transcript.add("repr(pool) while down", pool)
        transcript.add("health while down", await pool.health())
    finally:
        await asyncio.wait_for(pool.close(), 10)
    transcript.add("repr(closed pool)", pool)
    try:
        await pool.acquire()
    except safepool.PoolClosedError as exc:
        transcript.add("PoolClosedError", exc)
    out, err = capsys.readouterr()
    transcript.add("stdout", out)
    transcript.add("stderr", err)
    transcript.expect(
        "PoolTimeoutError", "LeaseExpiredError", "warning ResourceWarning", "PoolOverloadedError",
        "acquire on a dead server", "PoolClosedError", "health", "events",
    )
    transcript.assert_clean(APP_PASSWORD)


def test_the_scan_finds_a_planted_secret() -> None:
    t = Transcript()
    t.add("exc", ValueError(f"dsn=postgresql://app:{quote(APP_PASSWORD, safe='')}@host/db"))
    with pytest.raises(AssertionError, match="secret found"):
        t.assert_clean(APP_PASSWORD)


async def create_pool_raises_it_masked(
    transcript: Transcript, dsn: str, echoed: list[str], error: type[BaseException] = ValueError
) -> BaseException:
    """asyncpg's own connect error for ``dsn`` quotes one of ``echoed``
    (pieces of its password); safepool's ``create_pool()`` raises the same
    class with them masked ("***"), kept in ``transcript``. Returns it."""
    with pytest.raises(error) as info:
        await asyncpg.connect(dsn)
    assert any(piece in str(info.value) for piece in echoed)  # asyncpg's own error echoes it
    with pytest.raises(type(info.value)) as raised:
        await safepool.create_pool(dsn, min_size=1, max_size=2)
    transcript.add("create_pool", raised.value)
    assert "***" in str(raised.value)
    return raised.value


async def background_connects_fail_masked(transcript: Transcript, dsn: str, error: type[BaseException]) -> None:
    """A pool on ``dsn`` that starts empty: its acquire raises ``error``;
    the acquire's error, ``health()`` and the events go to ``transcript``,
    which then holds what create_pool, the acquire, health and the events
    said."""
    pool = await safepool.create_pool(dsn, min_size=0, max_size=2)
    events: list[dict[str, Any]] = []
    pool.add_listener(events.append)
    try:
        with pytest.raises(error) as acquired:
            await pool.fetchval("SELECT 1", timeout=5)
        transcript.add("acquire", acquired.value)
        transcript.add("health", (await pool.health(probe_timeout=1)).to_dict())
        transcript.add("events", events)
    finally:
        await asyncio.wait_for(pool.close(), 10)
    transcript.expect("create_pool", "acquire", "health", "events")


@pytest.mark.asyncio
async def test_wrong_password_error_does_not_echo_it(cluster: Cluster, transcript: Transcript) -> None:
    bad = f"postgresql://{APP_USER}:{quote(WRONG_PASSWORD, safe='')}@127.0.0.1:{cluster.port}/postgres"
    with pytest.raises(asyncpg.InvalidPasswordError) as info:
        await safepool.create_pool(bad, min_size=1, max_size=2)
    transcript.add("create_pool", info.value)
    # A pool that starts empty meets the wrong password at acquire time.
    pool = await safepool.create_pool(bad, min_size=0, max_size=2)
    try:
        for _ in range(4):
            try:
                await pool.fetchval("SELECT 1")
            except Exception as exc:
                transcript.add("acquire", exc)
        transcript.add("repr(pool)", pool)
        transcript.add("stats", pool.stats())
    finally:
        await asyncio.wait_for(pool.close(), 10)
    transcript.assert_clean(WRONG_PASSWORD, APP_PASSWORD)


@pytest.mark.asyncio
@pytest.mark.parametrize("separator", ["/", "#", "?"])
async def test_a_malformed_dsn_error_does_not_echo_the_password(
    pg_dsn: str, transcript: Transcript, separator: str
) -> None:
    # A password holding an unescaped "/", "#" or "?" makes asyncpg's DSN
    # parser quote a piece of it: "invalid literal for int() with base 10:
    # 'hunter2'", "bad query field: 'Zq9x@host/db'".
    bad = f"postgresql://{APP_USER}:hunter2{separator}Zq9x@127.0.0.1:5432/postgres"
    await create_pool_raises_it_masked(transcript, bad, ["hunter2", "Zq9x"])

    # The same DSN given to a running pool: its connects fail in the
    # background (logged, emitted, in health) and at acquire.
    pool = await safepool.create_pool(pg_dsn, min_size=1, max_size=2)
    events: list[dict[str, Any]] = []
    pool.add_listener(events.append)
    try:
        pool.set_connect_args(dsn=bad)
        await pool.expire_connections()
        with pytest.raises(ValueError) as acquired:
            await pool.fetchval("SELECT 1", timeout=5)
        transcript.add("acquire", acquired.value)
        await until(lambda: pool.stats().connect_errors >= 2)
        transcript.add("health", await pool.health(probe_timeout=1))
        transcript.add("events", events)
        transcript.add("stats", pool.stats())
    finally:
        await asyncio.wait_for(pool.close(), 10)
    transcript.expect("create_pool", "acquire", "health", "events")
    transcript.assert_clean("hunter2", "Zq9x")


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("password", "pieces"),
    [
        ("Hunt%33r/Zq9x", ["Hunt3r"]),  # %-escaped: the error quotes it decoded
        ("Hun%2Fter2/Zq9x", ["Hun/ter2"]),
        ("Hunt3r\\Zx9q/Wd", ["Hunt3r", "Zx9q"]),  # repr() doubles the backslash
        ("Hunt3r'a\"Zx9q/Wd", ["Hunt3r", "Zx9q"]),  # both quotes: repr() escapes one
        ("Hunt3r\tZx9q/Wd", ["Hunt3r", "Zx9q"]),
    ],
)
async def test_a_malformed_dsn_error_does_not_echo_an_escaped_password(
    transcript: Transcript, password: str, pieces: list[str]
) -> None:
    # asyncpg quotes the piece with repr() after decoding %xx escapes, so
    # the quoted text is not the DSN's own.
    bad = f"postgresql://{APP_USER}:{password}@127.0.0.1:5432/postgres"
    await create_pool_raises_it_masked(transcript, bad, pieces)
    transcript.assert_clean(*pieces)


@pytest.mark.asyncio
async def test_a_query_password_holding_an_ampersand_is_not_echoed(transcript: Transcript) -> None:
    # ?password=hunter2&Zq9x: the query parser takes "Zq9x" for a field of
    # its own and quotes it ("bad query field: 'Zq9x'").
    bad = f"postgresql://{APP_USER}@127.0.0.1:5432/postgres?password=hunter2&Zq9x"
    await create_pool_raises_it_masked(transcript, bad, ["Zq9x"])
    transcript.assert_clean("hunter2", "Zq9x")


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("dsn", "pieces"),
    [
        # An unescaped "@" then "?" in the password: asyncpg reads the host
        # "Zq9x" and the query "Wv8k@127.0.0.1:5432/postgres", and quotes it
        # ("bad query field: 'Wv8k@127.0.0.1:5432/postgres'"); the query
        # looked like the DSN's own, not a piece of its password.
        (f"postgresql://{APP_USER}:hunter2@Zq9x?Wv8k@127.0.0.1:5432/postgres", ["hunter2", "Zq9x", "Wv8k"]),
        (f"postgresql://{APP_USER}:hunter2@Zq9x/?Wv8k@127.0.0.1:5432/postgres", ["hunter2", "Zq9x", "Wv8k"]),
        # A query password holding a space, then an unescaped "&": the
        # space ended the password as the scrub read it.
        (f"postgresql://{APP_USER}@127.0.0.1:5432/postgres?password=hunter2 Zq9x&Wv8k", ["hunter2", "Zq9x", "Wv8k"]),
        # An "@" and an unescaped "&" in a query password: the "@" is the
        # query's, not the end of a userinfo password.
        (f"postgresql://{APP_USER}@127.0.0.1:5432/postgres?password=hunter2@Zq9x&Wv8k", ["hunter2", "Zq9x", "Wv8k"]),
        # An "@" then ":" and "?": asyncpg reads the port "Zq9x"; the "@"
        # after the "?" is in a field's key, not a query value.
        (f"postgresql://{APP_USER}:hunter2@:Zq9x?Wv8k@127.0.0.1:5432/postgres?host=h", ["hunter2", "Zq9x", "Wv8k"]),
    ],
    ids=[
        "at-then-question-mark", "at-then-slash-question-mark", "query-space-then-ampersand",
        "query-at-then-ampersand", "at-then-port-then-question-mark",
    ],
)
async def test_a_misparsed_password_is_not_echoed_by_the_pool(
    transcript: Transcript, dsn: str, pieces: list[str]
) -> None:
    await create_pool_raises_it_masked(transcript, dsn, ["Wv8k", "Zq9x"])
    # In the background too: logged, emitted, in health.
    await background_connects_fail_masked(transcript, dsn, ValueError)
    transcript.assert_clean(*pieces)


@pytest.mark.asyncio
@pytest.mark.parametrize("password", ["hunter2@/Zq9x", 'hunter2@/Zq9x"Wv8k'], ids=["plain", "double-quote"])
async def test_a_database_misread_from_the_password_is_not_echoed(
    cluster: Cluster, transcript: Transcript, password: str
) -> None:
    # The password "hunter2@/Zq9x" unescaped, the host in the query: asyncpg
    # reads the password "hunter2" and the database "Zq9x@/postgres". A
    # server that trusts the role (here: postgres on loopback) never asks
    # for the password and names the database: 'database "Zq9x@/postgres"
    # does not exist', a piece of the password. The server does not escape
    # a double quote in it ('database "Zq9x"Wv8k@/postgres" does not exist').
    dsn = f"postgresql://postgres:{password}@/postgres?host=127.0.0.1&port={cluster.port}"
    raised = await create_pool_raises_it_masked(transcript, dsn, ["Zq9x"], asyncpg.InvalidCatalogNameError)
    transcript.add("create_pool fields", raised.__dict__)
    await background_connects_fail_masked(transcript, dsn, asyncpg.InvalidCatalogNameError)
    transcript.assert_clean("hunter2", "Zq9x", "Wv8k")


@pytest.mark.asyncio
async def test_an_at_sign_in_the_query_does_not_hide_the_database(cluster: Cluster) -> None:
    # The scrub reads a password to the DSN's last "@", except for one in a
    # well-formed query ("?application_name=a@b"): the database the
    # server names is not masked there.
    dsn = f"postgresql://postgres:x@127.0.0.1:{cluster.port}/sp_no_such_db?application_name=a@b"
    with pytest.raises(asyncpg.InvalidCatalogNameError) as raised:
        await safepool.create_pool(dsn, min_size=1, max_size=2)
    assert str(raised.value) == 'database "sp_no_such_db" does not exist'
