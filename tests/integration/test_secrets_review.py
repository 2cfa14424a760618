"""Security review of the password rule (a password never appears in errors,
logs, leak reports, metrics, health, events, reprs, CLI output or warnings):
every way asyncpg takes a password, driven through every surface.

Some tests show leaks the review found, fixed since (a DSN asyncpg
misreads: a scheme without "//", no "@"; Pool(dsn=...); check's findings;
top --show-queries and a role's DDL); the others are surfaces checked and
found clean that tests/integration/test_secrets.py
does not cover (the other password forms: percent-encoded special
characters, a query password, a callable and a coroutine function,
PGPASSWORD, a passfile, keyword-only connect arguments, set_connect_args;
OpenTelemetry; the CLIs with a password DSN; the pytest plugin's reports).

A role with a password is created per module, so the tests hold under
trust authentication (the dev server) and under scram alike.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import subprocess
import sys
import uuid
import warnings
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

import asyncpg
import pytest
import pytest_asyncio

import safepool
from tests._util import NESTED_PYTEST_ADDOPTS, until
from tests.integration.test_secrets import Transcript

pytest_plugins = ["pytester"]

# A password with every character class a DSN must escape: "@", ":", "/",
# "#", "?", "&", "%", a space, a non-ASCII letter.
SECRET = "Rv7!p@ss:w0rd #?/é&%x-h161"
# Pieces a misparse or a partial mask could leave in sight.
PIECES = ("Rv7!p", "w0rd", "x-h161")
# A plain password for the DSN forms whose misparse is under test.
PLAIN = "S3cr3t-h161-pw"
REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Server:
    """Where the test server listens, and a role that logs in with SECRET."""

    host: str  # a hostname, an IP, or a Unix socket directory
    port: int
    role: str
    admin_dsn: str

    def netloc_and_query(self, userinfo: str, database: str, query: str = "") -> str:
        """A URI DSN on this server; a socket directory goes in ``?host=``."""
        extra = "&" + query if query else ""
        if self.host.startswith("/"):
            return f"postgresql://{userinfo}@/{database}?host={quote(self.host)}&port={self.port}{extra}"
        return f"postgresql://{userinfo}@{self.host}:{self.port}/{database}" + ("?" + query if query else "")

    def env(self, password: str) -> dict[str, str]:
        """libpq environment naming this server and the role."""
        return {"PGHOST": self.host, "PGPORT": str(self.port), "PGUSER": self.role, "PGPASSWORD": password}


def _where(pg_dsn: str) -> tuple[str, int]:
    parts = urlsplit(pg_dsn)
    query = {key: values[-1] for key, values in parse_qs(parts.query).items()}
    host = query.get("host") or parts.hostname or "localhost"
    port = int(query.get("port") or parts.port or 5432)
    return host, port


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def server(pg_dsn: str) -> AsyncIterator[Server]:
    host, port = _where(pg_dsn)
    role = f"sp_h161_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(pg_dsn)
    # Two roles: one with the special-character password, one with PLAIN.
    await admin.execute(f"CREATE ROLE {role} LOGIN PASSWORD '{SECRET}'")
    await admin.execute(f"CREATE ROLE {role}_plain LOGIN PASSWORD '{PLAIN}'")
    try:
        yield Server(host, port, role, pg_dsn)
    finally:
        await admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = ANY($1::text[])",
            [role, role + "_plain"],
        )
        await admin.execute(f"DROP ROLE IF EXISTS {role}")
        await admin.execute(f"DROP ROLE IF EXISTS {role}_plain")
        await admin.close()


@pytest.fixture
def transcript(caplog: pytest.LogCaptureFixture) -> Iterator[Transcript]:
    caplog.set_level(logging.DEBUG)  # every logger: safepool's, asyncpg's, the root's
    t = Transcript()
    t.caplog = caplog
    yield t


def _scan(t: Transcript, *secrets: str) -> None:
    t.assert_clean(*secrets)


# ---------------------------------------------------------------- the forms


def _passfile(tmp_path: Path, server: Server) -> Path:
    path = tmp_path / "pgpass"
    escaped = SECRET.replace("\\", "\\\\").replace(":", "\\:")
    path.write_text(f"*:*:*:{server.role}:{escaped}\n")
    path.chmod(0o600)
    return path


def connect_args(
    form: str, server: Server, database: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> tuple[str | None, dict[str, Any]]:
    """(dsn, connect kwargs) that log in as the role, the password given as ``form``."""
    bare = server.netloc_and_query(server.role, database)
    if form == "dsn-percent-encoded":
        return server.netloc_and_query(f"{server.role}:{quote(SECRET, safe='')}", database), {}
    if form == "query-password":
        return server.netloc_and_query(server.role, database, "password=" + quote(SECRET, safe="")), {}
    if form == "password-kwarg":
        return bare, {"password": SECRET}
    if form == "password-callable":
        return bare, {"password": lambda: SECRET}
    if form == "password-coroutine-function":

        async def password() -> str:
            await asyncio.sleep(0)
            return SECRET

        return bare, {"password": password}
    if form == "PGPASSWORD":
        monkeypatch.setenv("PGPASSWORD", SECRET)
        return bare, {}
    if form == "passfile-kwarg":
        return bare, {"passfile": str(_passfile(tmp_path, server))}
    if form == "passfile-env":
        monkeypatch.setenv("PGPASSFILE", str(_passfile(tmp_path, server)))
        return bare, {}
    if form == "keywords-only":
        return None, {
            "host": server.host, "port": server.port, "user": server.role, "password": SECRET, "database": database,
        }
    raise AssertionError(form)


FORMS = [
    "dsn-percent-encoded", "query-password", "password-kwarg", "password-callable", "password-coroutine-function",
    "PGPASSWORD", "passfile-kwarg", "passfile-env", "keywords-only",
]


async def _exercise(pool: safepool.Pool, t: Transcript, reader: Any) -> None:
    """Every surface of a working pool: reprs, a pool timeout, a lease
    timeout, a collected leak (warning, log, event), stats, leases, health,
    events (dict and typed), Prometheus, OpenTelemetry."""
    events: list[Any] = []
    pool.add_listener(events.append)
    pool.add_event_listener(events.append)
    t.add("repr(pool)", pool)
    t.add("str(pool)", str(pool))
    async with pool.acquire() as con:
        t.add("repr(proxy)", con)
        t.add("str(proxy)", str(con))
        t.add("repr(raw)", con._con)
        with pytest.raises(safepool.PoolTimeoutError) as timed_out:
            await pool.acquire(timeout=0.05)
        t.add("PoolTimeoutError", timed_out.value)
        t.add("leases", pool.leases())
    async with pool.acquire(lease_timeout=0.05) as con:
        await until(lambda: pool.stats().leases_expired >= 1)
        with pytest.raises(safepool.LeaseExpiredError) as expired:
            await con.fetchval("SELECT 1")
        t.add("LeaseExpiredError", expired.value)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        leaked = await pool.acquire()
        del leaked
        gc.collect()
        await until(lambda: pool.stats().leaks_detected >= 1)
    for w in caught:
        t.add(f"warning {w.category.__name__}", str(w.message))
    t.add("stats", pool.stats())
    t.add("str(stats)", str(pool.stats()))
    health = await pool.health()
    t.add("health", health)
    t.add("str(health)", str(health))
    t.add("health dict", health.to_dict())
    from prometheus_client import CollectorRegistry, generate_latest

    from safepool.metrics.prometheus import register

    registry = CollectorRegistry()
    register(pool, registry=registry)
    t.add("prometheus", generate_latest(registry).decode())
    t.add("otel", reader.get_metrics_data().to_json())
    t.add("events", events)
    t.add("events str", [str(e) for e in events])


@pytest.fixture
def otel() -> Iterator[tuple[Any, Any]]:
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader

    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    yield reader, provider
    provider.shutdown()


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.asyncio
@pytest.mark.safepool_allow_leaks  # the collected leak is on purpose
@pytest.mark.realtime  # 50 ms acquire and lease timeouts on the loop's clock
async def test_every_password_form_stays_out_of_every_surface(
    server: Server, transcript: Transcript, form: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    otel: tuple[Any, Any], capsys: pytest.CaptureFixture[str],
) -> None:
    from safepool.metrics.otel import instrument

    reader, provider = otel
    dsn, kwargs = connect_args(form, server, "postgres", tmp_path, monkeypatch)
    pool = await safepool.create_pool(dsn, min_size=1, max_size=1, capture_stack=True, **kwargs)
    instruments = instrument(pool, meter_provider=provider)
    try:
        async with pool.acquire() as con:
            assert await con.fetchval("SELECT current_user") == server.role  # the password was used
        await _exercise(pool, transcript, reader)
        # The server refuses what follows (a database that does not exist):
        # connect errors raised, logged, emitted, in health and in metrics.
        bad_dsn, bad_kwargs = connect_args(form, server, "sp_h161_no_such_db", tmp_path, monkeypatch)
        pool.set_connect_args(bad_dsn, **bad_kwargs)
        await pool.expire_connections()
        for _ in range(3):
            with pytest.raises(asyncpg.InvalidCatalogNameError) as refused:
                await pool.fetchval("SELECT 1", timeout=5)
            transcript.add("acquire refused", refused.value)
        transcript.add("health while refused", (await pool.health(probe_timeout=1)).to_dict())
        transcript.add("stats while refused", pool.stats())
        transcript.add("otel while refused", reader.get_metrics_data().to_json())
    finally:
        instruments.close()
        await asyncio.wait_for(pool.close(), 10)
    with pytest.raises(safepool.PoolClosedError) as closed:
        await pool.acquire()
    transcript.add("PoolClosedError", closed.value)
    out, err = capsys.readouterr()
    transcript.add("stdout", out)
    transcript.add("stderr", err)
    transcript.expect(
        "PoolTimeoutError", "LeaseExpiredError", "warning ResourceWarning", "health", "events", "prometheus",
        "otel", "acquire refused",
    )
    _scan(transcript, SECRET, *PIECES)


@pytest.mark.asyncio
async def test_set_connect_args_with_a_password_stays_out_of_the_pool_output(
    server: Server, transcript: Transcript
) -> None:
    # A pool that rotates its password at run time (asyncpg's documented use).
    first = "Fst-" + uuid.uuid4().hex
    pool = await safepool.create_pool(
        server.netloc_and_query(f"{server.role}:{quote(first, safe='')}", "sp_h161_no_such_db"), min_size=0, max_size=2
    )
    try:
        with pytest.raises(asyncpg.InvalidCatalogNameError) as refused:
            await pool.fetchval("SELECT 1", timeout=5)
        transcript.add("acquire refused", refused.value)
        pool.set_connect_args(server.netloc_and_query(server.role, "postgres"), password=SECRET)
        assert await pool.fetchval("SELECT current_user") == server.role
        transcript.add("repr(pool)", pool)
        transcript.add("stats", pool.stats())
        transcript.add("health", await pool.health())
    finally:
        await asyncio.wait_for(pool.close(), 10)
    _scan(transcript, SECRET, first, *PIECES)


# ------------------------------------------------------------------- leaks


def _listen(pool: safepool.Pool) -> list[Any]:
    events: list[Any] = []
    pool.add_listener(events.append)
    return events


def _pool_class_kwargs() -> dict[str, Any]:
    return {
        "min_size": 1, "max_size": 2, "max_queries": 50000, "max_inactive_connection_lifetime": 300.0,
        "loop": None, "connection_class": asyncpg.Connection, "record_class": asyncpg.Record,
    }


# A password holding an unescaped "/": asyncpg quotes a piece of it
# ("invalid literal for int() with base 10: 'Hunt3r'"), which the pool
# scrubs (tests/integration/test_secrets.py) when the DSN is its first
# positional argument.
MISPARSED = "postgresql://app:Hunt3r/Zq9x@127.0.0.1:5432/postgres"


@pytest.mark.asyncio
async def test_pool_class_with_a_positional_dsn_masks_a_misparsed_password(transcript: Transcript) -> None:
    with pytest.raises(ValueError) as raised:
        await safepool.Pool(MISPARSED, **_pool_class_kwargs())
    transcript.add("Pool(dsn)", raised.value)
    assert "***" in str(raised.value)
    _scan(transcript, "Hunt3r", "Zq9x")


@pytest.mark.asyncio
async def test_pool_class_with_a_keyword_dsn_masks_a_misparsed_password(transcript: Transcript) -> None:
    with pytest.raises(ValueError) as raised:
        await safepool.Pool(dsn=MISPARSED, **_pool_class_kwargs())
    transcript.add("Pool(dsn=)", raised.value)
    _scan(transcript, "Hunt3r", "Zq9x")


# --------------------------------------------------------------- the CLIs


def _cli(*argv: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    inherited = {key: value for key, value in os.environ.items() if not key.startswith("PG")}
    full_env = {**inherited, "PYTHONPATH": str(REPO), "COLUMNS": "200", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "safepool", *argv], capture_output=True, text=True, env=full_env, timeout=timeout,
        cwd=REPO,
    )


def _assert_cli_clean(result: subprocess.CompletedProcess[str], *secrets: str) -> None:
    output = result.stdout + result.stderr
    found = [s for s in secrets for form in (s, quote(s, safe=""), quote(s)) if form in output]
    assert not found, f"{found} in the output of the CLI:\n{output[:3000]}"


@pytest.mark.parametrize("form", ["dsn-percent-encoded", "query-password"])
def test_top_and_selfcheck_with_a_password_dsn_print_no_password(server: Server, form: str) -> None:
    if form == "dsn-percent-encoded":
        dsn = server.netloc_and_query(f"{server.role}:{quote(SECRET, safe='')}", "postgres")
        missing_db = server.netloc_and_query(f"{server.role}:{quote(SECRET, safe='')}", "sp_h161_no_such_db")
    else:
        dsn = server.netloc_and_query(server.role, "postgres", "password=" + quote(SECRET, safe=""))
        missing_db = server.netloc_and_query(server.role, "sp_h161_no_such_db", "password=" + quote(SECRET, safe=""))
    runs = [
        _cli("top", "--once", "--plain", dsn),
        _cli("top", "--once", "--json", dsn),
        _cli("top", "--once", missing_db),
        _cli("selfcheck", "--dsn", dsn),
        _cli("selfcheck", "--dsn", missing_db),
        _cli("top", "--once", dsn, "--timeout", dsn),  # argparse echoes a bad value
        _cli("top", "--once", dsn, dsn),  # and an extra argument
        _cli(dsn),
    ]
    assert runs[0].returncode == 0, runs[0].stderr
    assert runs[3].returncode == 0, runs[3].stderr
    assert runs[2].returncode == 2 and "does not exist" in runs[2].stderr
    for result in runs:
        _assert_cli_clean(result, SECRET, *PIECES)


def test_replay_refusing_a_password_dsn_prints_no_password(server: Server) -> None:
    missing_db = server.netloc_and_query(f"{server.role}:{quote(SECRET, safe='')}", "sp_h161_no_such_db")
    result = _cli("replay", "--dsn", missing_db, "--duration", "5", "--scenario", "leak")
    assert result.returncode == 2 and "does not exist" in result.stderr, result.stderr
    _assert_cli_clean(result, SECRET, *PIECES)


def _misparsed_cli_dsns(server: Server) -> list[tuple[str, dict[str, str]]]:
    env = server.env(PLAIN)
    env["PGUSER"] = server.role + "_plain"
    return [
        (f"postgresql:/{server.role}_plain:{PLAIN}@db.example/postgres", env),
        (f"postgresql://app:{PLAIN}/postgres", {}),
    ]


@pytest.mark.parametrize("command", ["top", "selfcheck", "replay"])
@pytest.mark.parametrize("which", [0, 1], ids=["scheme-without-slashes", "no-at-sign"])
def test_clis_with_a_misparsed_password_dsn_print_no_password(server: Server, command: str, which: int) -> None:
    dsn, env = _misparsed_cli_dsns(server)[which]
    argv = {
        "top": ["top", "--once", dsn],
        "selfcheck": ["selfcheck", "--dsn", dsn],
        "replay": ["replay", "--dsn", dsn, "--duration", "5", "--scenario", "leak"],
    }[command]
    result = _cli(*argv, env=env)
    assert result.returncode == 2, result.stderr
    _assert_cli_clean(result, PLAIN)


CHECKED_SOURCE = '''\
import safepool


async def dsn_literal():
    con = await (await safepool.create_pool("postgresql://app:{pw}@db/x")).acquire()
    return await con.fetchval("SELECT 1")


async def password_keyword(make_pool):
    con = await make_pool(user="app", password="{pw}").acquire()
    return await con.fetchval("SELECT 1")


async def thrown_away(pools):
    await pools["postgresql://app:{pw}@db/x"].acquire()
'''


@pytest.mark.parametrize("output_format", ["text", "json"])
def test_check_findings_do_not_quote_a_password_in_the_pool_expression(tmp_path: Path, output_format: str) -> None:
    (tmp_path / "app.py").write_text(CHECKED_SOURCE.format(pw=PLAIN))
    result = _cli("check", "--format", output_format, str(tmp_path))
    assert result.returncode == 1, result.stdout + result.stderr
    assert "SP002" in result.stdout and "SP003" in result.stdout
    _assert_cli_clean(result, PLAIN)


# ------------------------------------------------------ the pytest plugin

PLUGIN_SUITE = '''\
import pytest
import safepool

DSN = {dsn!r}
PASSWORD = {password!r}
BARE = {bare!r}


@pytest.mark.asyncio
async def test_leaks_with_a_dsn_password():
    pool = await safepool.create_pool(DSN, min_size=1, max_size=2, capture_stack=True)
    con = await pool.acquire()  # {dsn}
    await con.fetchval("SELECT 1")


@pytest.mark.asyncio
async def test_leaks_with_a_password_keyword():
    pool = await safepool.create_pool(BARE, password=PASSWORD, min_size=1, max_size=2, capture_stack=True)
    con = await pool.acquire()  # password="{password}"
    await con.fetchval("SELECT 1")


@pytest.mark.asyncio
async def test_idle_lease_times_an_acquire_out():
    pool = await safepool.create_pool(BARE, password=PASSWORD, min_size=1, max_size=1, capture_stack=True)
    con = await pool.acquire()  # {password}
    with pytest.raises(safepool.PoolTimeoutError):
        await pool.acquire(timeout=0.05)
    await pool.release(con)
    await pool.close()
'''


@pytest.mark.safepool_allow_leaks
def test_plugin_reports_show_no_password(
    server: Server, pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PYTHONPATH", str(REPO))  # this checkout's safepool, in the subprocess
    monkeypatch.setenv("PYTEST_ADDOPTS", NESTED_PYTEST_ADDOPTS)
    dsn = server.netloc_and_query(f"{server.role}:{quote(SECRET, safe='')}", "postgres")
    bare = server.netloc_and_query(server.role, "postgres")
    pytester.makepyfile(test_leaky=PLUGIN_SUITE.format(dsn=dsn, password=SECRET, bare=bare))
    pytester.makeini(
        "[pytest]\nasyncio_mode = strict\nasyncio_default_fixture_loop_scope = function\n"
    )
    result = pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", "--safepool-leaks", "--safepool-strict", "-rA", "-W", "ignore::ResourceWarning",
    )
    output = "\n".join(result.outlines + result.errlines)
    assert "safepool: 1 connection leaked" in output
    assert "acquire timeout caused by idle leases" in output
    assert "acquired at:" in output
    # The source lines shown are the test's own, with its literals masked.
    secret_lines = [line for line in output.splitlines() if any(p in line for p in (SECRET, quote(SECRET, safe="")))]
    # (The module's DSN = / PASSWORD = lines are not in any stack: only the
    # acquire lines are, and each carries the password.)
    assert not secret_lines, secret_lines



ROTATED = "R0tat3d-h161-" + uuid.uuid4().hex[:8]


@pytest.mark.parametrize("view", ["--plain", "--json", "rich"])
@pytest.mark.asyncio
async def test_top_show_queries_does_not_print_a_password_literal(server: Server, view: str) -> None:
    rotating = await asyncpg.connect(server.admin_dsn, server_settings={"application_name": "sp-h161-rotation"})
    try:
        await rotating.execute("BEGIN")
        await rotating.execute(f"ALTER ROLE {server.role}_plain PASSWORD '{ROTATED}'")
        argv = ["top", "--once", "--show-queries", *([view] if view != "rich" else []), server.admin_dsn]
        result = await asyncio.to_thread(_cli, *argv)
    finally:
        await rotating.execute("ROLLBACK")
        await rotating.close()
    assert result.returncode == 0, result.stderr
    assert "sp-h161-rotation" in result.stdout  # the session is in the view
    _assert_cli_clean(result, ROTATED)


# ------------------------------------- siblings of the misread DSNs (helper-164)


async def _drive_misread(dsn: str, transcript: Transcript, error: type[BaseException]) -> None:
    """create_pool(min_size=1)'s error, then a min_size=0 pool's acquire
    error, stats, health and events; the logs are scanned by _scan."""
    with pytest.raises(error) as raised:
        await safepool.create_pool(dsn, min_size=1, max_size=2)
    transcript.add("create_pool", raised.value)
    pool = await safepool.create_pool(dsn, min_size=0, max_size=2)
    events = _listen(pool)
    try:
        with pytest.raises(error) as acquired:
            await pool.fetchval("SELECT 1", timeout=5)
        transcript.add("acquire", acquired.value)
        transcript.add("stats", pool.stats())
        transcript.add("last_connect_error", pool.stats().last_connect_error)
        transcript.add("health", (await pool.health(probe_timeout=1)).to_dict())
        transcript.add("events", events)
    finally:
        await asyncio.wait_for(pool.close(), 10)


def _misread_siblings(role: str) -> dict[str, tuple[str, type[BaseException]]]:
    user = role + "_plain"
    return {
        # (The security review's leaks.)
        "scheme-one-slash": (f"postgresql:/{user}:{PLAIN}@db.example/postgres", asyncpg.InvalidCatalogNameError),
        "scheme-no-slash": (f"postgresql:{user}:{PLAIN}@db.example/postgres", asyncpg.InvalidCatalogNameError),
        "postgres-one-slash": (f"postgres:/{user}:{PLAIN}@db.example/postgres", asyncpg.InvalidCatalogNameError),
        "no-at-sign": (f"postgresql://app:{PLAIN}/postgres", ValueError),
        "three-slashes-with-at": (f"postgresql:///{user}:{PLAIN}@db.example/postgres", asyncpg.InvalidCatalogNameError),
        "four-slashes-with-at": (f"postgresql:////{user}:{PLAIN}@db.example/postgres", asyncpg.InvalidCatalogNameError),
        "backslashes": (f"postgresql:\\\\{user}:{PLAIN}@db.example/postgres", asyncpg.InvalidCatalogNameError),
        "no-slashes-no-at": (f"postgresql:{user}:{PLAIN}/postgres", asyncpg.InvalidCatalogNameError),
        "trailing-blank": (f"postgresql:/{user}:{PLAIN}@db.example/postgres ", asyncpg.InvalidCatalogNameError),
        "no-at-but-in-query": (f"postgresql://{user}:{PLAIN}/postgres?application_name=a@b", ValueError),
        # (Leaks the second review found.)
        "blank-before-scheme": (f" postgresql:/{user}:{PLAIN}@db.example/postgres", asyncpg.InvalidCatalogNameError),
        "newline-before-scheme": (f"\npostgres:{user}:{PLAIN}@db.example/postgres", asyncpg.InvalidCatalogNameError),
        "tab-in-scheme": (f"postgre\tsql:/{user}:{PLAIN}@db.example/postgres", asyncpg.InvalidCatalogNameError),
        "three-slashes-no-at": (f"postgresql:///{user}:{PLAIN}/postgres", asyncpg.InvalidCatalogNameError),
    }


@pytest.mark.parametrize("which", list(_misread_siblings("r")))
@pytest.mark.asyncio
async def test_misread_dsn_siblings_do_not_echo_the_password(
    server: Server, transcript: Transcript, monkeypatch: pytest.MonkeyPatch, which: str
) -> None:
    for key, value in server.env(PLAIN).items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("PGUSER", server.role + "_plain")
    dsn, error = _misread_siblings(server.role)[which]
    await _drive_misread(dsn, transcript, error)
    _scan(transcript, PLAIN)


@pytest.mark.parametrize("command", ["top", "selfcheck", "echo"])
@pytest.mark.parametrize("which", ["blank-before-scheme", "three-slashes-no-at"])
def test_clis_with_a_misread_dsn_sibling_print_no_password(server: Server, command: str, which: str) -> None:
    dsn, _ = _misread_siblings(server.role)[which]
    env = server.env(PLAIN)
    env["PGUSER"] = server.role + "_plain"
    argv = {"top": ["top", "--once", dsn], "selfcheck": ["selfcheck", "--dsn", dsn], "echo": [dsn]}[command]
    result = _cli(*argv, env=env)
    assert result.returncode == 2, result.stderr
    _assert_cli_clean(result, PLAIN)
