"""Review h205 of the password rule (no password in safepool's errors, logs,
events, stats, health, metrics, CLI output).

Leaks found (strict xfails): the text of an exception raised on the pool's
connect path by the application's own code (an ``init=`` hook, a ``setup=``
hook, a ``connect=`` callback, a ``connection_class``) goes unredacted into
what safepool itself produces: ``stats().last_connect_error``, the health
report, the ``safepool`` log records, the ``connect_failed`` events, and
the error the pool re-raises. Such a message quoting the pool's DSN
("cannot set up {dsn}") is ordinary; the pool knows its DSN and masks its
password elsewhere (the leak reports' stacks), but here:

* ``init=``: ``_workers.connect`` scrubs only what ``open_connection``
  raised (safepool/_workers.py:148), never the hook's error (raised at
  safepool/_workers.py:172-196);
* ``connect=`` and ``connection_class``: scrubbed by
  ``_secrets.scrub_connect_error``, which masks quoted pieces of the DSN
  only (``scrub_quoted``): an unquoted DSN in the message stays;
* ``setup=``: the health probe writes the error's first line as is
  (safepool/health.py:316, whose comment says "never a DSN").

The same for a failing event listener: the "event listener failed"
record formats its traceback as is (safepool/_reporting.py:301-302), its
message (the pool's DSN) and its source lines (a password literal, which a
leak report's stack masks) unmasked. And a password cut by an unescaped
"#" or "/" whose first piece is any substring of the rest of the DSN
("ternal" of the host "db.internal") is echoed by asyncpg's port error:
scrub_quoted keeps it (safepool/_secrets.py:375).

And an over-redaction: the CLIs mask the password's value wherever it
stands as a word in an error (``_secrets.redact`` via
safepool/top/cli.py:197), so a password that is a word of the error text
("failed") garbles the message, and the mask points at the password
("Connect call *** ('127.0.0.1', ...)" says it is "failed").

The other attacks (a refused, unresolvable or black-holed server; a bad
port; a database that does not exist; the breaker; every password form:
percent-encoded, raw special characters, query, keyword, unicode,
multi-host) were handled: the passing tests below guard them.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

import asyncpg
import pytest

import safepool

REPO = Path(__file__).resolve().parents[2]
# "@", ":", "/", "?", "#", "%" and "%40" (an escape that must not be decoded twice).
SECRET = "S3cr#t:p@ss/w?rd%40-h205"
ENCODED = quote(SECRET, safe="")
NEEDLES = (SECRET, ENCODED, "S3cr#t", "w?rd", "rd%2540")


def _where(pg_dsn: str) -> tuple[str, int]:
    parts = urlsplit(pg_dsn)
    query = {key: values[-1] for key, values in parse_qs(parts.query).items()}
    host = query.get("host") or parts.hostname or "localhost"
    port = int(query.get("port") or parts.port or 5432)
    return host, port


def _dsn(pg_dsn: str, password: str = ENCODED, database: str = "postgres") -> str:
    """The test server's DSN with ``password`` (the server trusts: any works)."""
    host, port = _where(pg_dsn)
    user = urlsplit(pg_dsn).username or "postgres"
    if host.startswith("/"):
        return f"postgresql://{user}:{password}@/{database}?host={quote(host)}&port={port}"
    return f"postgresql://{user}:{password}@{host}:{port}/{database}"


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _leaks(text: str) -> list[str]:
    return [needle for needle in NEEDLES if needle in text]


def _error_text(exc: BaseException) -> str:
    out = []
    seen: set[int] = set()
    error: BaseException | None = exc
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        out += [str(error), repr(error), repr(error.args)]
        error = error.__cause__ or error.__context__
    return "\n".join(out)


class Surfaces:
    """What a pool produced, by surface."""

    def __init__(self) -> None:
        self.texts: dict[str, list[str]] = {}

    def add(self, where: str, obj: Any) -> None:
        text = _error_text(obj) if isinstance(obj, BaseException) else obj if isinstance(obj, str) else repr(obj)
        self.texts.setdefault(where, []).append(text)

    def leaks(self, where: str) -> list[str]:
        assert self.texts.get(where), f"nothing captured for {where!r}: {sorted(self.texts)}"
        return _leaks("\n".join(self.texts[where]))


@pytest.fixture
def records(caplog: pytest.LogCaptureFixture) -> Iterator[pytest.LogCaptureFixture]:
    caplog.set_level(logging.DEBUG)
    yield caplog


async def _drive(pool: safepool.Pool, records: pytest.LogCaptureFixture, events: list[Any]) -> Surfaces:
    s = Surfaces()
    for _ in range(2):
        with pytest.raises(Exception) as raised:
            await pool.fetchval("SELECT 1", timeout=5)
        s.add("raised", raised.value)
    s.add("stats", pool.stats())
    health = await pool.health(probe_timeout=2)
    s.add("health", health.to_dict())
    await asyncio.sleep(0)  # (events are delivered once the books settle)
    s.add("events", events)
    formatter = logging.Formatter("%(name)s %(levelname)s %(message)s")
    for record in records.records:
        if record.name.startswith(("safepool", "asyncpg")):
            s.add("logs", formatter.format(record) + " " + repr(record.__dict__))
    return s


SURFACES = ["stats", "health", "logs", "events", "raised"]


async def _surfaces(dsn: str, records: pytest.LogCaptureFixture, **options: Any) -> Surfaces:
    """What a pool with ``options`` (a failing hook) produced, by surface."""
    pool = await safepool.create_pool(dsn, min_size=0, max_size=1, **options)
    events: list[Any] = []
    pool.add_listener(events.append)
    try:
        return await _drive(pool, records, events)
    finally:
        pool.terminate()


def _xfail(reason: str) -> Any:
    return pytest.mark.xfail(strict=True, reason=reason)


# ------------------------------------------------------- hooks: the leaks


@pytest.mark.asyncio
@pytest.mark.parametrize("surface", SURFACES)
async def test_an_init_hook_error_quoting_the_dsn_hides_the_password(
    pg_dsn: str, records: pytest.LogCaptureFixture, surface: str
) -> None:
    dsn = _dsn(pg_dsn)

    async def init(con: Any) -> None:
        raise RuntimeError(f"cannot prepare a session on {dsn}")

    assert not (await _surfaces(dsn, records, init=init)).leaks(surface)


@pytest.mark.asyncio
@pytest.mark.parametrize("surface", SURFACES)
async def test_a_connect_callback_error_quoting_the_dsn_hides_the_password(
    pg_dsn: str, records: pytest.LogCaptureFixture, surface: str
) -> None:
    dsn = _dsn(pg_dsn)

    async def connect(*args: Any, **kwargs: Any) -> Any:
        raise ConnectionError(f"no route to {args[0] if args else kwargs.get('dsn')}")

    assert not (await _surfaces(dsn, records, connect=connect)).leaks(surface)


@pytest.mark.asyncio
@pytest.mark.parametrize("surface", SURFACES)
async def test_a_connection_class_error_quoting_the_dsn_hides_the_password(
    pg_dsn: str, records: pytest.LogCaptureFixture, surface: str
) -> None:
    dsn = _dsn(pg_dsn)

    class Refusing(asyncpg.Connection):  # type: ignore[misc]
        def __init__(self, protocol: Any, transport: Any, *args: Any, **kwargs: Any) -> None:
            self._aborted = True  # (asyncpg's __del__ reads it)
            transport.close()  # (asyncpg leaves it open when connection_class raises)
            raise RuntimeError(f"refusing {dsn}")

    assert not (await _surfaces(dsn, records, connection_class=Refusing)).leaks(surface)


@pytest.mark.asyncio
async def test_a_setup_hook_error_quoting_the_dsn_stays_out_of_health(pg_dsn: str) -> None:
    dsn = _dsn(pg_dsn)

    async def setup(con: Any) -> None:
        raise RuntimeError(f"setup failed for {dsn}")

    pool = await safepool.create_pool(dsn, min_size=1, max_size=1, setup=setup)
    try:
        health = await pool.health(probe_timeout=2)
    finally:
        pool.terminate()
    assert any(reason.code == "probe_failed" for reason in health.reasons)
    assert not _leaks(repr(health.to_dict()))


# --------------------------------------- connect failures: handled (guards)


def _refused(pg_dsn: str) -> str:
    return f"postgresql://u:{ENCODED}@127.0.0.1:{_closed_port()}/db"


DSNS = {
    # name: (dsn builder, connect kwargs, create_pool kwargs)
    "refused, userinfo password": (_refused, {}, {"fail_fast": True}),
    "refused, raw special characters": (
        lambda d: f"postgresql://u:{SECRET}@127.0.0.1:{_closed_port()}/db", {}, {}
    ),
    "refused, query password": (
        lambda d: f"postgresql://u@127.0.0.1:{_closed_port()}/db?password={ENCODED}", {}, {"fail_fast": True}
    ),
    "refused, password keyword": (
        lambda d: f"postgresql://u@127.0.0.1:{_closed_port()}/db", {"password": SECRET}, {"fail_fast": True}
    ),
    "refused, multi-host": (
        lambda d: f"postgresql://u:{ENCODED}@127.0.0.1:{_closed_port()},127.0.0.1:{_closed_port()}/db", {}, {}
    ),
    "refused, unicode": (lambda d: f"postgresql://u:{SECRET}-пароль@127.0.0.1:{_closed_port()}/db", {}, {}),
    "unresolvable host": (lambda d: f"postgresql://u:{ENCODED}@no-such-host.invalid:5432/db", {}, {}),
    "bad port": (lambda d: f"postgresql://u:{ENCODED}@127.0.0.1:notaport/db", {}, {}),
    "black hole timeout": (lambda d: f"postgresql://u:{ENCODED}@10.255.255.1:5432/db", {}, {"timeout": 0.2}),
    "no such database": (lambda d: _dsn(d, database="sp_h205_no_such_db"), {}, {}),
    "no such database, password keyword": (
        lambda d: _dsn(d, database="sp_h205_no_such_db").replace(":" + ENCODED + "@", "@"), {"password": SECRET}, {}
    ),
}


@pytest.mark.asyncio
@pytest.mark.parametrize("case", sorted(DSNS))
async def test_connect_failures_hide_the_password(pg_dsn: str, records: pytest.LogCaptureFixture, case: str) -> None:
    build, connect_kwargs, pool_kwargs = DSNS[case]
    dsn = build(pg_dsn)
    events: list[Any] = []
    s = Surfaces()
    try:
        pool = await safepool.create_pool(dsn, min_size=0, max_size=1, **connect_kwargs, **pool_kwargs)
    except Exception as exc:  # a DSN asyncpg refuses at once
        s.add("raised", exc)
    else:
        pool.add_listener(events.append)
        try:
            for _ in range(4):  # (fail_fast: the breaker opens, ServerUnavailableError)
                with pytest.raises(Exception) as raised:
                    await pool.fetchval("SELECT 1", timeout=5)
                s.add("raised", raised.value)
            s.add("stats", pool.stats())
            s.add("repr", repr(pool))
            s.add("health", (await pool.health(probe_timeout=1)).to_dict())
            from prometheus_client import CollectorRegistry, generate_latest

            from safepool.metrics.prometheus import register

            registry = CollectorRegistry()
            register(pool, registry=registry)
            s.add("prometheus", generate_latest(registry).decode())
            await asyncio.sleep(0)
            s.add("events", events)
        finally:
            await asyncio.wait_for(pool.close(), 5)
    for record in records.records:
        s.add("logs", record.getMessage() + " " + repr(record.__dict__))
    for where in s.texts:
        assert not s.leaks(where), where
    if pool_kwargs.get("fail_fast"):
        assert any("ServerUnavailableError" in t for t in s.texts["raised"])


# ------------------------------------------------------------------ the CLIs


def _cli(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "safepool", *argv], capture_output=True, text=True, timeout=60, cwd=REPO
    )


def test_selfcheck_with_a_refused_password_dsn_prints_no_password() -> None:
    result = _cli("selfcheck", "--dsn", f"postgresql://u:{ENCODED}@127.0.0.1:{_closed_port()}/db")
    assert result.returncode == 2
    assert "cannot connect" in result.stderr
    assert not _leaks(result.stdout + result.stderr)


def test_top_with_a_bad_option_and_a_password_dsn_prints_no_password() -> None:
    result = _cli("top", f"postgresql://u:{SECRET}@127.0.0.1:{_closed_port()}/db", "--interval", "nope")
    assert result.returncode == 2
    assert not _leaks(result.stdout + result.stderr)


def test_a_password_that_is_a_word_of_the_error_does_not_garble_it() -> None:
    result = _cli("selfcheck", "--dsn", f"postgresql://u:failed@127.0.0.1:{_closed_port()}/db")
    assert result.returncode == 2
    assert "Connect call failed" in result.stderr, result.stderr


# ------------------------------------------ failing listeners: tracebacks


def _listener_records(records: pytest.LogCaptureFixture) -> str:
    formatter = logging.Formatter("%(name)s %(levelname)s %(message)s")
    texts = [
        formatter.format(record) for record in records.records
        if record.name.startswith("safepool") and getattr(record, "event", None) == "listener_failed"
    ]
    assert texts, "the listener's failure was not logged"
    return "\n".join(texts)


async def _fail_a_connect(dsn: str, listener: Any) -> None:
    pool = await safepool.create_pool(dsn, min_size=0, max_size=1)
    pool.add_listener(listener)
    try:
        with pytest.raises(OSError):
            await pool.fetchval("SELECT 1", timeout=5)
        await asyncio.sleep(0)
    finally:
        pool.terminate()


@pytest.mark.asyncio
async def test_a_failing_listener_quoting_the_dsn_hides_the_password(records: pytest.LogCaptureFixture) -> None:
    dsn = f"postgresql://u:{ENCODED}@127.0.0.1:{_closed_port()}/db"

    def listener(event: dict[str, Any]) -> None:
        raise RuntimeError(f"cannot alert on {event['event']} for {dsn}")

    await _fail_a_connect(dsn, listener)
    assert not _leaks(_listener_records(records))


@pytest.mark.asyncio
async def test_a_failing_listener_traceback_masks_a_password_literal(records: pytest.LogCaptureFixture) -> None:
    dsn = f"postgresql://u@127.0.0.1:{_closed_port()}/db"

    def alert(**kwargs: Any) -> None:
        raise ConnectionError("the alerting service is down")

    def listener(event: dict[str, Any]) -> None:
        alert(url="https://alerts.example/hook", user="pager", password="S3cr#t:p@ss/w?rd%40-h205")

    await _fail_a_connect(dsn, listener)
    assert not _leaks(_listener_records(records))


@pytest.mark.asyncio
async def test_a_failing_listener_is_logged_without_the_connect_password(records: pytest.LogCaptureFixture) -> None:
    # (guard) the listener's own error says nothing secret: the record shows none.
    dsn = f"postgresql://u:{ENCODED}@127.0.0.1:{_closed_port()}/db"

    def listener(event: dict[str, Any]) -> None:
        raise RuntimeError(f"cannot alert on {event}")

    await _fail_a_connect(dsn, listener)
    assert not _leaks(_listener_records(records))


# ------------------------------------ a misparsed password's leading piece


@pytest.mark.asyncio
async def test_a_misparsed_password_piece_that_is_a_substring_of_the_host_is_masked(
    records: pytest.LogCaptureFixture,
) -> None:
    password = "ternal#Kx7Q2pZ"
    dsn = f"postgresql://app:{password}@db.internal:5432/app"
    pool = await safepool.create_pool(dsn, min_size=0, max_size=1)
    try:
        with pytest.raises(ValueError) as raised:
            await pool.fetchval("SELECT 1", timeout=5)
        assert "invalid literal for int()" in str(raised.value)
        text = _error_text(raised.value) + repr(pool.stats())
    finally:
        pool.terminate()
    assert "'ternal'" not in text, text


@pytest.mark.asyncio
async def test_a_misparsed_password_piece_not_in_the_dsn_is_masked() -> None:
    # (guard) the same cut password, its piece found nowhere else in the DSN.
    dsn = "postgresql://app:Qw7ternalZ#Kx7Q2pZ@db.internal:5432/app"
    pool = await safepool.create_pool(dsn, min_size=0, max_size=1)
    try:
        with pytest.raises(ValueError) as raised:
            await pool.fetchval("SELECT 1", timeout=5)
        text = _error_text(raised.value) + repr(pool.stats())
    finally:
        pool.terminate()
    assert "Qw7ternalZ" not in text and "Kx7Q2pZ" not in text, text


# --------------------------------------------- s65: the fixes' siblings


@pytest.mark.asyncio
async def test_a_setup_hook_error_quoting_the_dsn_is_raised_without_the_password(pg_dsn: str) -> None:
    # The error is the hook's own object (same type and identity), its message masked in place.
    dsn = _dsn(pg_dsn)
    raised_by_hook: list[BaseException] = []

    async def setup(con: Any) -> None:
        error = RuntimeError(f"setup failed for {dsn}")
        raised_by_hook.append(error)
        raise error

    pool = await safepool.create_pool(dsn, min_size=1, max_size=1, setup=setup)
    try:
        with pytest.raises(RuntimeError) as raised:
            async with pool.acquire():
                pass
    finally:
        pool.terminate()
    assert raised.value is raised_by_hook[0]
    assert str(raised.value).startswith("setup failed for postgresql://postgres:***@")
    assert not _leaks(_error_text(raised.value))


@pytest.mark.asyncio
async def test_an_init_hook_error_quoting_a_password_argument_is_masked(pg_dsn: str) -> None:
    # The password given as password=, not in the DSN; a word of letters that long is masked too.
    secret = "correcthorsebatterystaple"

    async def init(con: Any) -> None:
        raise RuntimeError(f"the role's password {secret} has expired")

    pool = await safepool.create_pool(pg_dsn, min_size=0, max_size=1, init=init, password=secret)
    try:
        with pytest.raises(RuntimeError) as raised:
            await pool.fetchval("SELECT 1", timeout=5)
        text = _error_text(raised.value) + repr(pool.stats())
    finally:
        pool.terminate()
    assert secret not in text and "the role's password *** has expired" in str(raised.value), text


@pytest.mark.asyncio
async def test_a_failing_pool_created_hook_and_timing_sink_are_logged_without_the_password(
    pg_dsn: str, records: pytest.LogCaptureFixture,
) -> None:
    dsn = _dsn(pg_dsn)

    def hook(pool: Any) -> None:
        raise RuntimeError(f"cannot watch {dsn}")

    def sink(seconds: float) -> None:
        raise ConnectionError("exporter down", dict(password="S3cr#t:p@ss/w?rd%40-h205"))

    remove = safepool.pool.on_pool_created(hook)
    try:
        pool = await safepool.create_pool(dsn, min_size=1, max_size=1)
    finally:
        remove()
    pool.add_timing_sink("wait", sink)
    try:
        assert await pool.fetchval("SELECT 1") == 1
        await asyncio.sleep(0)  # (the sinks run in a loop callback of their own)
        await asyncio.sleep(0)
    finally:
        pool.terminate()
    texts = {
        getattr(record, "event", None): logging.Formatter("%(message)s").format(record)
        for record in records.records if record.name.startswith("safepool")
    }
    assert "cannot watch postgresql://postgres:***@" in texts["created_hook_failed"], texts
    assert 'dict(password=***)' in texts["timing_sink_failed"], texts
    assert not _leaks("\n".join(texts.values())), texts
