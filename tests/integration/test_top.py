"""``python -m safepool top`` against the real test server: the grouping and
the counts (JSON), the plain and rich views, query text only on request, the
alarms, the error paths (one line, exit 2, never the password) and Ctrl-C.

``main()`` runs ``asyncio.run``, so the async tests call it in a worker
thread while their own loop holds the sessions it must see.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import subprocess
import sys
import time
import uuid
import zlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import asyncpg
import pytest
import pytest_asyncio

from safepool.top import cli, main
from safepool.top.cli import APPLICATION_NAME, describe_error, redact
from safepool.top.render import render_plain
from safepool.top.snapshot import ServerInfo, Session, Thresholds, aggregate, format_age

SECRET_QUERY = "SELECT 'hunter2-in-a-literal'"
SERVER = ServerInfo(
    version="18.0", user="me", database="db", address="h:5432", max_connections=20, superuser_reserved_connections=3
)
NOW = datetime(2024, 3, 10, 15, 30, tzinfo=UTC)


@pytest.fixture(autouse=True)
def terminal_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """The output's shape is this module's: rich and argparse read the
    terminal's width from COLUMNS (a CI terminal may be 40 or 400 columns),
    and rich forces colours and a terminal's behaviour on FORCE_COLOR,
    TTY_COMPATIBLE or TTY_INTERACTIVE (``"\\x1b[" not in out`` then fails).
    Tests that need a width set COLUMNS themselves."""
    monkeypatch.setenv("COLUMNS", "80")
    monkeypatch.delenv("LINES", raising=False)
    for name in ("FORCE_COLOR", "NO_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE", "JUPYTER_COLUMNS", "JUPYTER_LINES"):
        monkeypatch.delenv(name, raising=False)


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


async def run_in_thread(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = await asyncio.to_thread(main, list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def with_user(dsn: str, userinfo: str) -> str:
    """The test server's DSN with another user (and password)."""
    scheme, _, rest = dsn.partition("://")
    authority, slash, tail = rest.partition("/")
    return f"{scheme}://{userinfo}@{authority.rpartition('@')[2]}{slash}{tail}"


class Scene:
    """Sessions of one application_name: 2 idle (both ran a query with a
    secret literal), 2 idle in transaction (the first holds an advisory lock),
    1 active waiting for that lock."""

    def __init__(self, dsn: str, app_name: str) -> None:
        self.dsn = dsn
        self.app_name = app_name
        self.lock_key = zlib.crc32(app_name.encode())
        self.cons: list[asyncpg.Connection[Any]] = []
        self.waiter: asyncio.Task[str] | None = None

    async def start(self, admin: asyncpg.Connection[Any]) -> None:
        self.cons = [
            await asyncpg.connect(self.dsn, server_settings={"application_name": self.app_name}) for _ in range(5)
        ]
        idle1, idle2, holder, in_tx, waiting = self.cons
        await idle1.execute(SECRET_QUERY)
        await idle2.execute(SECRET_QUERY)
        await holder.execute(f"BEGIN; SELECT pg_advisory_xact_lock({self.lock_key})")
        await in_tx.execute("BEGIN; SELECT 1")
        self.waiter = asyncio.create_task(waiting.execute(f"SELECT pg_advisory_lock({self.lock_key})"))
        async with asyncio.timeout(5):  # until the server reports the lock wait
            while not await admin.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1 AND wait_event_type = 'Lock'",
                self.app_name,
            ):
                await asyncio.sleep(0.01)

    async def stop(self) -> None:
        if len(self.cons) == 5:
            await self.cons[2].close()  # ends the lock holder's transaction: the waiter gets the lock
        if self.waiter is not None:
            await self.waiter
        for con in self.cons:
            await con.close()


@pytest_asyncio.fixture
async def scene(pg_dsn: str, app_name: str) -> AsyncIterator[Scene]:
    admin = await asyncpg.connect(pg_dsn)
    scene = Scene(pg_dsn, app_name)
    try:
        await scene.start(admin)
        yield scene
    finally:
        await scene.stop()
        await admin.close()


def mine(report: dict[str, Any], app_name: str) -> dict[str, dict[str, Any]]:
    return {group["state"]: group for group in report["groups"] if group["application_name"] == app_name}


# --- against the server ----------------------------------------------------


@pytest.mark.asyncio
async def test_json_groups_sessions_by_application_and_state(
    scene: Scene, pg_dsn: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = await run_in_thread(capsys, "--once", "--json", pg_dsn)
    assert (code, err) == (0, "")
    report = json.loads(out)
    groups = mine(report, scene.app_name)
    assert {state: group["count"] for state, group in groups.items()} == {
        "active": 1,
        "idle in transaction": 2,
        "idle": 2,
    }
    assert groups["active"]["waiting_on_lock"] == 1
    assert groups["active"]["longest_query_seconds"] >= 0
    assert groups["idle in transaction"]["waiting_on_lock"] == 0
    assert groups["idle in transaction"]["oldest_transaction_age_seconds"] >= 0
    assert groups["idle in transaction"]["alert"] is False  # younger than the 60 s default
    assert groups["idle"]["oldest_transaction_age_seconds"] is None
    assert groups["idle"]["longest_query_seconds"] is None
    assert all("query" not in group for group in report["groups"])
    assert "hunter2" not in out

    admin = await asyncpg.connect(pg_dsn)
    try:
        max_connections = int(await admin.fetchval("SHOW max_connections"))
        reserved = int(await admin.fetchval("SHOW superuser_reserved_connections"))
    finally:
        await admin.close()
    server = report["server"]
    assert server["max_connections"] == max_connections
    assert server["superuser_reserved_connections"] == reserved
    assert server["available"] == max_connections - reserved - server["reserved_connections"]
    # The scene's five sessions, the fixture's admin connection and top's own.
    assert report["total"] >= 7
    assert report["total"] == sum(group["count"] for group in report["groups"])
    assert report["by_state"]["idle in transaction"] >= 2
    assert report["waiting_on_lock"] >= 1
    assert mine(report, APPLICATION_NAME)["active"]["count"] >= 1
    # top's own session changed state just after its snapshot's now(): its
    # ages were a few ms below zero (a new user saw -0.002 s).
    ages = [value for group in report["groups"] for key, value in group.items() if key.endswith("_seconds")]
    assert ages and all(age is None or age >= 0 for age in ages)
    assert not any(scene.app_name in alert["message"] for alert in report["alerts"])


@pytest.mark.asyncio
async def test_old_idle_in_transaction_is_flagged(
    scene: Scene, pg_dsn: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = await run_in_thread(capsys, "--once", "--json", "--idle-in-transaction-warn", "0", pg_dsn)
    assert code == 0
    report = json.loads(out)
    groups = mine(report, scene.app_name)
    assert groups["idle in transaction"]["alert"] is True
    assert groups["idle"]["alert"] is False and groups["active"]["alert"] is False
    assert report["level"] == "warning"
    assert any(
        scene.app_name in alert["message"] and "idle in transaction" in alert["message"] for alert in report["alerts"]
    )


@pytest.mark.asyncio
async def test_usage_near_max_connections_is_flagged(
    scene: Scene, pg_dsn: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = await run_in_thread(capsys, "--once", "--json", "--usage-warn", "0.001", pg_dsn)
    assert code == 0
    report = json.loads(out)
    assert report["level"] in ("warning", "critical")
    assert any("max_connections" in alert["message"] for alert in report["alerts"])


@pytest.mark.asyncio
async def test_queries_only_on_request_and_truncated(
    scene: Scene, pg_dsn: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = await run_in_thread(capsys, "--once", "--json", "--show-queries", "--query-width", "20", pg_dsn)
    assert code == 0
    groups = mine(json.loads(out), scene.app_name)
    assert all(len(group["query"]) <= 20 for group in groups.values())
    assert groups["idle in transaction"]["query"] == "BEGIN; SELECT pg_ad…"  # the oldest: the lock holder
    assert groups["idle"]["query"].startswith("SELECT 'hunter2")

    code, out, _ = await run_in_thread(capsys, "--once", "--plain", "--show-queries", pg_dsn)
    assert code == 0
    assert f"{scene.app_name} / idle: {SECRET_QUERY}" in out


@pytest.mark.asyncio
async def test_a_session_that_ran_nothing_says_so_in_the_queries(pg_dsn: str, capsys: pytest.CaptureFixture[str]) -> None:
    # Its query is empty in pg_stat_activity: the plain view printed
    # "app / idle: " with nothing after the colon.
    app_name = f"sp-fresh-{uuid.uuid4().hex[:8]}"
    fresh = await asyncpg.connect(pg_dsn, server_settings={"application_name": app_name})
    try:
        code, out, _ = await run_in_thread(capsys, "--once", "--plain", "--show-queries", pg_dsn)
        assert code == 0
        assert f"  {app_name} / idle: (no query since it connected)\n" in out
        code, out, _ = await run_in_thread(capsys, "--once", "--json", "--show-queries", pg_dsn)
        assert mine(json.loads(out), app_name)["idle"]["query"] == ""
    finally:
        await fresh.close()


@pytest.mark.asyncio
@pytest.mark.parametrize("view", ["--plain", "rich"])
async def test_one_snapshot_as_text(
    view: str, scene: Scene, pg_dsn: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "120")  # rich: no wrapped application names
    argv = ["--once", "--idle-in-transaction-warn", "0", pg_dsn]
    code, out, err = await run_in_thread(capsys, *([view] if view != "rich" else []), *argv)
    assert (code, err) == (0, "")
    assert "\x1b[" not in out  # not a terminal: no colours, no cursor moves
    assert "max_connections" in out and "waiting on locks" in out
    rows = [" ".join(line.lstrip("! ").split()) for line in out.splitlines()]
    rows = [row for row in rows if row.startswith(scene.app_name + " ")]
    assert len(rows) == 3, out
    # application, state, count, waiting on a lock, then the ages
    assert rows[0].startswith(f"{scene.app_name} active 1 1 ")
    assert rows[1].startswith(f"{scene.app_name} idle in transaction 2 - ")
    assert rows[2].startswith(f"{scene.app_name} idle 2 - ")
    assert "hunter2" not in out
    assert f"{scene.app_name}: 2 idle in transaction" in out
    if view == "--plain":
        assert any(line.startswith("! " + scene.app_name) for line in out.splitlines())


@pytest.mark.asyncio
@pytest.mark.parametrize("view", ["--plain", "rich"])
async def test_application_names_that_read_as_markup_are_shown_as_they_are(
    view: str, pg_dsn: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Any client names itself: the rich view (the default with rich
    installed) took application names as rich markup, so one named "[/]"
    ended top with a MarkupError traceback (exit code 1), and "[red]x[/red]"
    showed as "x"."""
    monkeypatch.setenv("COLUMNS", "160")
    tag = uuid.uuid4().hex[:8]
    names = [f"[/]{tag}", f"[red]{tag}[/red]", f"[link=http://example.invalid]{tag}"]
    clients = [await asyncpg.connect(pg_dsn, server_settings={"application_name": name}) for name in names]
    try:
        code, out, err = await run_in_thread(
            capsys, *([view] if view != "rich" else []), "--once", "--show-queries", pg_dsn
        )
        assert (code, err) == (0, "")
        for name in names:
            assert f"  {name} " in out, out
            assert f"  {name} / idle: " in out, out
    finally:
        for client in clients:
            await client.close()


@pytest.mark.asyncio
@pytest.mark.parametrize("view", ["--plain", "rich"])
async def test_control_characters_in_a_query_never_reach_the_terminal(
    view: str, pg_dsn: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Any client writes the query text --show-queries prints: its escape
    sequences went to the operator's terminal as they were (clear the
    screen, set the window title, ...)."""
    monkeypatch.setenv("COLUMNS", "200")
    app_name = f"sp-escape-{uuid.uuid4().hex[:8]}"
    client = await asyncpg.connect(pg_dsn, server_settings={"application_name": app_name})
    try:
        await client.execute("SELECT 1 /* \x1b[2J\x1b]0;title\x07 one\ntwo \u202eend */")
        code, out, err = await run_in_thread(
            capsys, *([view] if view != "rich" else []), "--once", "--show-queries", pg_dsn
        )
        assert (code, err) == (0, "")
        line = next(line for line in out.splitlines() if line.startswith(f"  {app_name} / idle: "))
        assert line.endswith("SELECT 1 /* ?[2J?]0;title? one two ?end */"), line
        assert "\x1b" not in out and "\x07" not in out and "\u202e" not in out
    finally:
        await client.close()


@pytest.mark.asyncio
async def test_count_prints_that_many_snapshots(pg_dsn: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = await run_in_thread(capsys, "--json", "--count", "3", "--interval", "0.05", pg_dsn)
    assert code == 0
    snapshots = [json.loads(line) for line in out.splitlines()]
    assert len(snapshots) == 3
    assert snapshots[0]["taken_at"] < snapshots[1]["taken_at"] < snapshots[2]["taken_at"]

    code, out, _ = await run_in_thread(capsys, "--plain", "--count", "2", "--interval", "0.05", pg_dsn)
    assert code == 0
    assert out.count("max_connections") == 2


@pytest.mark.asyncio
@pytest.mark.realtime
async def test_live_view_survives_a_terminated_connection(pg_dsn: str, capsys: pytest.CaptureFixture[str]) -> None:
    admin = await asyncpg.connect(pg_dsn)
    try:
        runner = asyncio.create_task(asyncio.to_thread(main, ["--plain", "--count", "3", "--interval", "0.4", pg_dsn]))
        # Until the first snapshot is taken: top's session is idle after its second query.
        first_taken = """SELECT pid FROM pg_stat_activity
                         WHERE application_name = $1 AND state = 'idle' AND query LIKE '%FROM pg_stat_activity%'"""
        async with asyncio.timeout(5):
            while not (pid := await admin.fetchval(first_taken, APPLICATION_NAME)):
                await asyncio.sleep(0.01)
        assert await admin.fetchval("SELECT pg_terminate_backend($1)", pid)
        code = await runner
    finally:
        await admin.close()
    out, err = capsys.readouterr()
    assert (code, err) == (0, "")
    assert out.count("max_connections") == 3  # the next refreshes reconnected (or showed the last snapshot)


# --- errors ----------------------------------------------------------------


def assert_one_line_error(code: int, out: str, err: str, *secrets: str) -> str:
    assert code == 2
    assert out == ""
    assert len(err.splitlines()) == 1, err
    assert err.startswith("python -m safepool top: ")
    assert "Traceback" not in err
    for secret in secrets:
        assert secret not in err
    return err


def test_unreachable_server(capsys: pytest.CaptureFixture[str]) -> None:
    err = assert_one_line_error(*run(capsys, "--once", "postgresql://u:secretpw@127.0.0.1:1/x"), "secretpw")
    assert "cannot connect to u@127.0.0.1:1/x" in err


@pytest.mark.parametrize(
    ("dsn", "secrets", "expected"),
    [
        ("not a dsn", (), "invalid DSN"),
        ("mysql://u:secretpw@h/x", ("secretpw",), "invalid DSN"),
        ("postgresql://u:secretpw@127.0.0.1:notaport/x", ("secretpw",), "invalid DSN"),
        ("postgresql://u:s/cr?t@pw@127.0.0.1:1/x", ("s/cr", "cr?t", "t@pw"), ""),
        ("postgresql://u:secret%40pw@[::1/x", ("secret", "%40pw", "@pw"), "invalid DSN"),
        ("postgresql://u@127.0.0.1:1/x?password=secretpw", ("secretpw",), "127.0.0.1:1"),
    ],
)
def test_bad_dsn(dsn: str, secrets: tuple[str, ...], expected: str, capsys: pytest.CaptureFixture[str]) -> None:
    err = assert_one_line_error(*run(capsys, "--once", dsn), *secrets)
    assert expected in err


def test_authentication_failure(pg_dsn: str, capsys: pytest.CaptureFixture[str]) -> None:
    dsn = with_user(pg_dsn, "sp_no_such_role:secretpw")
    err = assert_one_line_error(*run(capsys, "--once", "--json", dsn), "secretpw")
    assert "authentication failed for sp_no_such_role@" in err


def test_missing_database(pg_dsn: str, capsys: pytest.CaptureFixture[str]) -> None:
    scheme, _, rest = pg_dsn.partition("://")
    authority, _, tail = rest.partition("/")
    query = tail.partition("?")[2]
    dsn = f"{scheme}://{authority}/sp_no_such_db" + (f"?{query}" if query else "")
    err = assert_one_line_error(*run(capsys, "--once", dsn))
    assert 'database "sp_no_such_db" does not exist' in err


@pytest.mark.parametrize(
    "argv",
    [
        ["--interval", "0", "x"],
        ["--interval", "nan", "x"],
        ["--interval", "inf", "x"],  # would never refresh
        ["--interval", "1e-9", "x"],  # would query the server in a tight loop
        ["--interval", "86401", "x"],
        ["--count", "0", "x"],
        ["--once", "--count", "2", "x"],
        ["--usage-warn", "150", "x"],
        ["--query-width", "3", "x"],
        ["--bogus", "x"],
        ["--interval", "postgresql://u:secretpw@h/x"],
        ["x", "postgresql://u:secretpw@h/x"],
    ],
)
def test_bad_options(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    err = assert_one_line_error(*run(capsys, *argv), "secretpw")
    assert "error: " in err


@pytest.mark.parametrize("interval", ["0.01", "86400"])
def test_interval_bounds_are_accepted(interval: str) -> None:
    assert cli.build_parser().parse_args(["--interval", interval]).interval == float(interval)


def test_watch_is_named_watch_in_its_usage_and_errors(capsys: pytest.CaptureFixture[str]) -> None:
    from safepool.__main__ import main as safepool_main

    assert safepool_main(["watch", "--help"]) == 0
    assert capsys.readouterr().out.startswith("usage: python -m safepool watch ")
    assert safepool_main(["watch", "--interval", "0", "x"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("python -m safepool watch: error: argument -n/--interval: must be >= 0.01 and <= 86400")


def test_help(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "--help")
    assert code == 0
    assert "--show-queries" in out and "pg_stat_activity" in out


@pytest.mark.realtime
def test_ctrl_c_exits_130_without_a_traceback(pg_dsn: str) -> None:
    process = subprocess.Popen(
        [sys.executable, "-m", "safepool", "watch", "--plain", "--interval", "0.2", pg_dsn],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # A child started from a non-interactive shell may inherit an ignored SIGINT.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        assert process.stdout is not None
        deadline = time.monotonic() + 15
        while "max_connections" not in process.stdout.readline():  # the first snapshot is out
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=10)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err


# --- without a server ------------------------------------------------------


def test_format_age() -> None:
    assert [format_age(s) for s in (None, -1, 0.42, 12.9, 192, 7500, 3 * 86400 + 4 * 3600)] == [
        "-", "0.0s", "0.4s", "12s", "3m12s", "2h05m", "3d04h",
    ]  # fmt: skip


def test_aggregate_levels_and_hidden_sessions() -> None:
    leaked = [Session("orders", "idle in transaction", state_age=300.0, transaction_age=301.0) for _ in range(14)]
    others = [Session("", None), Session("", None), Session("reports", "active", True, 5.0, 5.0, 5.0)]
    snapshot = aggregate(leaked + others, SERVER, NOW, Thresholds(idle_in_transaction=60))
    assert (snapshot.total, snapshot.hidden, snapshot.server.available) == (17, 2, 17)
    assert snapshot.level == "critical" and snapshot.usage_level == "critical"
    assert [(g.application_name, g.state, g.count) for g in snapshot.groups] == [
        ("orders", "idle in transaction", 14),
        ("", None, 2),
        ("reports", "active", 1),
    ]
    assert snapshot.groups[0].alert and snapshot.groups[0].oldest_transaction_age == 301.0
    assert [alert.level for alert in snapshot.alerts] == ["critical", "warning", "note"]
    assert "new connections are refused" in snapshot.alerts[0].message
    text = render_plain(snapshot)
    assert "(hidden)" in text and "pg_read_all_stats" in text and "! orders" in text

    calm = aggregate(others, SERVER, NOW)
    assert calm.level == "ok" and [alert.level for alert in calm.alerts] == ["note"]
    busy = aggregate(leaked[:13] + others, SERVER, NOW, Thresholds(idle_in_transaction=600))
    assert busy.level == "warning" and not busy.groups[0].alert
    assert busy.to_dict()["usage"] == round(16 / 17, 4)


def test_errors_name_the_target_but_not_the_password() -> None:
    dsn = "postgresql://app:pa%24%24word@db.internal:5432/orders"
    too_many = describe_error(asyncpg.TooManyConnectionsError("sorry, too many clients already"), dsn, 5)
    assert too_many.startswith("app@db.internal:5432/orders refuses new connections: sorry, too many clients")
    assert "superuser" in too_many
    assert describe_error(TimeoutError(), dsn, 5) == "app@db.internal:5432/orders did not answer within 5s"
    assert describe_error(TimeoutError(), "postgresql://db:5432/x", 2) == "db:5432/x did not answer within 2s"
    leaky = ValueError("bad value 'pa$$word' and pa%24%24word in postgresql://app:pa%24%24word@db.internal/orders")
    text = describe_error(leaky, dsn, 5)
    assert "pa$$" not in text and "%24%24" not in text and "word" not in text.replace("password", "")
    assert redact("postgres://x:y@h/db?password=z&sslmode=require", None) == (
        "postgres://x:***@h/db?password=***&sslmode=require"
    )


@pytest.mark.parametrize(
    ("password", "error", "shown"),
    [
        # A short password is in many words and numbers: masking it there
        # spelled it out ("h******8@***27.0.0.***:***" for "1", "***uthentic***tion
        # f***iled" for "a").
        ("1", ConnectionRefusedError(111, "Connect call failed ('127.0.0.1', 1)"),
         "cannot connect to app@127.0.0.1:1/x: [Errno 111] Connect call failed ('127.0.0.1', 1)"),
        ("a", asyncpg.InvalidPasswordError('password authentication failed for user "app"'),
         'authentication failed for app@127.0.0.1:1/x: password authentication failed for user "app"'),
        # Equal to the user: masking the user told the password.
        ("app", asyncpg.InvalidPasswordError('password authentication failed for user "app"'),
         'authentication failed for app@127.0.0.1:1/x: password authentication failed for user "app"'),
        # Inside a longer word: not the password.
        ("enti", asyncpg.InvalidPasswordError('password authentication failed for user "app"'),
         'authentication failed for app@127.0.0.1:1/x: password authentication failed for user "app"'),
    ],
)
def test_errors_do_not_point_at_the_password_by_masking_other_text(
    password: str, error: BaseException, shown: str
) -> None:
    assert describe_error(error, f"postgresql://app:{password}@127.0.0.1:1/x", 5) == shown


def test_a_dsn_with_two_at_signs_is_not_described_by_its_misread_host() -> None:
    # "u:s3cr@pw/w0rd@host/x", a password holding an unescaped "@" and "/":
    # asyncpg reads the host "pw" and the database "w0rd@host/x", and the
    # target named them: pieces of the password.
    import socket

    text = describe_error(socket.gaierror(-2, "Name or service not known"), "postgresql://u:s3cr@pw/w0rd@127.0.0.1:1/x", 5)
    assert "s3cr" not in text and "pw/" not in text and "w0rd" not in text, text
    assert text.startswith('cannot connect to the server (the DSN has more than one "@"'), text


def test_a_dsn_in_another_options_usage_error_is_shown_without_its_password(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Only the first DSN among the arguments was looked at; the pattern
    # alone misses a password holding a space.
    err = assert_one_line_error(
        *run(capsys, "postgresql://u@127.0.0.1:1/x", "--interval", "postgresql://u:s3 cret@h/x"), "s3 cret", "cret@"
    )
    assert "postgresql://u:***@h/x" in err, err
    # A query password holding a "#" and a space: all of it.
    err = assert_one_line_error(*run(capsys, "--interval", "postgresql://u@h/x?password=s3#cr et"), "s3", "cr et")
    assert "got 'postgresql://u@h/x?password=***'" in err, err


class FlakySource:
    """Stands for cli._Source: snapshots, except for the refreshes listed in ``failing``."""

    def __init__(self, failing: set[int]) -> None:
        self.failing = failing
        self.calls = 0

    async def snapshot(self) -> Any:
        self.calls += 1
        if self.calls in self.failing:
            raise cli._Failure("h:5432 did not answer within 5s")
        sessions = [Session("orders", "idle", state_age=float(self.calls))] * self.calls
        return aggregate(sessions, SERVER, NOW)


@pytest.mark.asyncio
@pytest.mark.parametrize("view", ["plain", "rich"])
async def test_a_failed_refresh_keeps_the_last_snapshot_on_screen(
    view: str, capsys: pytest.CaptureFixture[str]
) -> None:
    source = FlakySource(failing={2})
    if view == "plain":
        await cli._plain_view(source, 0.001, 3)  # type: ignore[arg-type]
    else:
        from rich.console import Console

        await cli._stream_view(source, Console(width=120), 0.001, 3)  # type: ignore[arg-type]
    out = capsys.readouterr().out
    assert out.count("max_connections") == 3
    assert out.count("refresh failed at ") == 1 and "h:5432 did not answer within 5s; retrying" in out
    counts = [line.split()[2] for line in out.splitlines() if line.lstrip("! ").startswith("orders ")]
    assert counts == ["1", "1", "3"]  # the failed refresh shows the last good snapshot


@pytest.mark.asyncio
async def test_the_first_refresh_must_succeed() -> None:
    with pytest.raises(cli._Failure):
        await cli._plain_view(FlakySource(failing={1}), 0.001, 3)  # type: ignore[arg-type]


def test_a_narrow_terminal_keeps_the_application_names_and_states() -> None:
    from rich.console import Console

    from safepool.top.render import render_rich

    sessions = [
        Session("orders-api", "idle in transaction", state_age=72.0, transaction_age=72.0),
        Session("billing-worker", "idle", state_age=32.0),
        Session("billing-worker", "active", True, 32.0, 32.0, 32.0),
    ]
    snapshot = aggregate(sessions, SERVER, NOW)
    console = Console(width=60, record=True, color_system=None, force_terminal=False)
    console.print(render_rich(snapshot))
    text = console.export_text()
    for name in ("orders-api", "billing-worker"):
        assert name in text, text  # which application holds the connections: the view's point
    assert "idle in transaction" in text, text
    assert "1m12s" in text, text  # ages are not cut short


@pytest.mark.realtime
def test_sigterm_leaves_the_live_view_with_the_cursor_shown(pg_dsn: str) -> None:
    import os
    import pty
    import select

    pid, fd = pty.fork()
    if pid == 0:  # the child: the live view needs a terminal
        try:
            os.environ["COLUMNS"], os.environ["LINES"] = "120", "40"
            # A terminal that moves the cursor: rich's live view hides and
            # shows it on any TERM but "dumb" or "unknown" (a CI shell's).
            os.environ["TERM"] = "xterm-256color"
            os.execv(sys.executable, [sys.executable, "-m", "safepool", "top", "--interval", "0.2", pg_dsn])
        finally:
            os._exit(127)
    output = b""
    deadline = time.monotonic() + 15
    terminated = False
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([fd], [], [], 0.1)
            if ready:
                try:
                    data = os.read(fd, 65536)
                except OSError:  # the child is gone and the terminal closed
                    break
                if not data:
                    break
                output += data
            if not terminated and b"max_connections" in output:
                os.kill(pid, signal.SIGTERM)
                terminated = True
    finally:
        exited, status = os.waitpid(pid, os.WNOHANG)
        if exited == 0:  # still running
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            _, status = os.waitpid(pid, 0)
        os.close(fd)
    assert terminated, output
    assert b"\x1b[?25l" in output  # rich hid the cursor for the live view
    assert output.rfind(b"\x1b[?25h") > output.rfind(b"\x1b[?25l"), output[-300:]
    assert os.waitstatus_to_exitcode(status) in (0, 143), status  # an exit of its own, not death by signal
    assert b"Traceback" not in output


@pytest.mark.parametrize("width", [120, 60])
def test_the_rich_view_marks_leak_suspects_without_colour(width: int) -> None:
    from rich.console import Console

    from safepool.top.render import render_plain, render_rich

    sessions = [
        Session("orders-api", "idle in transaction", state_age=72.0, transaction_age=72.0),
        Session("billing-worker", "idle", state_age=32.0),
    ]
    snapshot = aggregate(sessions, SERVER, NOW)
    assert {group.application_name: group.alert for group in snapshot.groups} == {
        "orders-api": True, "billing-worker": False,
    }
    # Piped (no colour), the red style is gone: the row keeps the plain view's "!".
    console = Console(width=width, record=True, color_system=None, force_terminal=False)
    console.print(render_rich(snapshot))
    lines = console.export_text().splitlines()
    marked = [line.strip() for line in lines if line.strip().startswith("! ") and "warning" not in line]
    assert [line.split()[1] for line in marked] == ["orders-api"], lines
    plain = [line for line in render_plain(snapshot).splitlines() if line.startswith("! ") and "orders-api" in line]
    assert plain, render_plain(snapshot)
