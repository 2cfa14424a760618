"""``safepool top``: what a mutation review of render.py, cli.py and
snapshot.py's grouping (s63, helper-199) found untested: the plain and
rich views' exact content, the options' bounds and defaults as
docs/metrics.md lists them, the views' choice and shape, the refresh
schedule, the exit codes and the target's description. No server: the
connection is a stand-in."""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import types
from datetime import UTC, datetime
from io import StringIO
from typing import Any

import asyncpg
import pytest

from safepool.top import cli, main
from safepool.top.render import render_plain, render_rich
from safepool.top.snapshot import ServerInfo, Session, Snapshot, Thresholds, aggregate, format_age

SERVER = ServerInfo(
    version="18.0",
    user="me",
    database="db",
    address="h:5432",
    max_connections=20,
    superuser_reserved_connections=3,
    reserved_connections=2,
)
NOW = datetime(2024, 3, 10, 15, 30, tzinfo=UTC)
SESSIONS = [
    Session("orders", "idle", state_age=200.0),
    Session("orders", "idle in transaction", state_age=5.0, transaction_age=6.0, query="SELECT 2"),
    Session("orders", "active", True, 12.0, 75.0, 30.0, query="SELECT 1"),
    Session("orders", "idle in transaction", state_age=70.0, transaction_age=80.0, query="UPDATE t SET x = 1"),
    Session("", "idle", state_age=3.0, query=""),
    Session("", None),
]


@pytest.fixture(autouse=True)
def terminal_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "80")
    monkeypatch.delenv("LINES", raising=False)
    for name in ("FORCE_COLOR", "NO_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE", "JUPYTER_COLUMNS", "JUPYTER_LINES"):
        monkeypatch.delenv(name, raising=False)


def snapshot() -> Snapshot:
    return aggregate(SESSIONS, SERVER, NOW, Thresholds(idle_in_transaction=60))


HEADER = [
    "me@db on h:5432 · PostgreSQL 18.0 · 2024-03-10 15:30:00 UTC · every 2s",
    "connections 6 / 15 (40%) · max_connections 20, 3 reserved for superusers, 2 for pg_use_reserved_connections",
    "by state: active 1, idle in transaction 2, idle 2, hidden 1 · waiting on locks 1",
]
ROWS = [
    "  orders       active                   1        1       12s   1m15s      30s",
    "! orders       idle in transaction      2        -     1m10s   1m20s        -",
    "  orders       idle                     1        -     3m20s       -        -",
    "  (none)       idle                     1        -      3.0s       -        -",
    "  (none)       (hidden)                 1        -         -       -        -",
]
QUERIES = [
    "  orders / active: SELECT 1",
    "  orders / idle in transaction: UPDATE t SET x = 1",
    "  (none) / idle: (no query since it connected)",
]
LEAK = (
    "warning: orders: 2 idle in transaction, the oldest for 1m10s (over 1m00s): "
    "a leaked connection or a forgotten transaction?"
)
NOTE = (
    "note: 1 session(s) of other roles hide their state: connect as a role with pg_read_all_stats "
    "(or pg_monitor) to see them"
)


# --- the plain view --------------------------------------------------------


def test_the_plain_view_line_by_line() -> None:
    """Every column in its place (docs/metrics.md's table), right-aligned
    figures, ``(none)``/``(hidden)``, the queries section and the alerts
    (``!`` for a warning, ``-`` for a note)."""
    assert render_plain(snapshot(), 2.0).splitlines() == [
        *HEADER,
        "",
        "                                           WAITING    OLDEST  OLDEST  LONGEST",
        "  APPLICATION  STATE                COUNT  ON LOCK  IN STATE    XACT    QUERY",
        *ROWS,
        "",
        "queries (the oldest session of each group):",
        *QUERIES,
        "",
        "! " + LEAK,
        "- " + NOTE,
    ]


def test_one_snapshot_says_no_interval() -> None:
    assert render_plain(snapshot()).splitlines()[0] == HEADER[0].removesuffix(" · every 2s")


def test_no_visible_session_reads_none() -> None:
    hidden_only = aggregate([Session("x", None)], SERVER, NOW)
    assert render_plain(hidden_only).splitlines()[2] == "by state: hidden 1 · waiting on locks 0"
    nothing = aggregate([], SERVER, NOW)
    assert render_plain(nothing).splitlines()[2] == "by state: none · waiting on locks 0"


# --- the rich view ---------------------------------------------------------


def rich_text(snap: Snapshot, width: int, error: str | None = None) -> list[str]:
    from rich.console import Console

    console = Console(width=width, record=True, color_system=None, force_terminal=False)
    console.print(render_rich(snap, 2.0, error))
    return [line.rstrip() for line in console.export_text().splitlines()]


def test_the_rich_view_line_by_line() -> None:
    lines = rich_text(snapshot(), 200, "refresh failed at 10:00:00: boom; retrying")
    assert lines == [
        *HEADER,
        "refresh failed at 10:00:00: boom; retrying",
        "                                         WAITING    OLDEST  OLDEST  LONGEST",
        "APPLICATION  STATE                COUNT  ON LOCK  IN STATE    XACT    QUERY",
        "─" * 75,
        "orders       active                   1        1       12s   1m15s      30s",
        "! orders     idle in transaction      2        -     1m10s   1m20s        -",
        "orders       idle                     1        -     3m20s       -        -",
        "(none)       idle                     1        -      3.0s       -        -",
        "(none)       (hidden)                 1        -         -       -        -",
        "queries (the oldest session of each group):",
        *QUERIES,
        LEAK,
        NOTE,
    ]


def test_the_narrow_rich_view_stacks_each_group_on_two_labelled_lines() -> None:
    lines = rich_text(snapshot(), 60)
    start = lines.index("orders / active")
    assert lines[start : start + 10] == [
        "orders / active",
        "  on lock 1 · in state 12s · xact 1m15s · query 30s",
        "! orders / idle in transaction (2)",
        "  in state 1m10s · xact 1m20s · query -",
        "orders / idle",
        "  in state 3m20s · xact - · query -",
        "(none) / idle",
        "  in state 3.0s · xact - · query -",
        "(none) / (hidden)",
        "  in state - · xact - · query -",
    ]


def test_the_table_is_kept_at_exactly_its_own_width() -> None:
    """The table where the terminal is wide enough for it: 75 columns fit
    in 75 (the stacked rows only below that)."""
    assert "─" * 75 in rich_text(snapshot(), 75)
    assert "orders / active" in rich_text(snapshot(), 74)


def test_the_rich_view_styles() -> None:
    """The connections line is coloured by the connection count alone
    (docs: yellow near the limit, red full), not by a leak suspect's
    warning; the lock line stands out only when a session waits; hidden
    rows are dim."""
    snap = snapshot()
    assert (snap.level, snap.usage_level) == ("warning", "ok")
    parts = render_rich(snap).renderables  # type: ignore[union-attr]
    assert parts[1].style == "green"
    assert parts[2].style == "bold magenta"
    calm = aggregate([Session("a", "idle", state_age=1.0), Session("b", None)], SERVER, NOW)
    parts = render_rich(calm).renderables  # type: ignore[union-attr]
    assert parts[2].style == ""
    table = parts[3].table
    assert [row.style for row in table.rows] == ["", "dim"]


# --- options (docs/metrics.md's table) -------------------------------------


def test_option_defaults() -> None:
    args = cli.build_parser().parse_args([])
    assert (args.interval, args.query_width, args.idle_in_transaction_warn, args.usage_warn, args.timeout) == (
        2.0,
        80,
        60.0,
        80.0,
        5.0,
    )
    assert (args.dsn, args.once, args.count, args.json, args.plain, args.show_queries) == (
        None,
        False,
        None,
        False,
        False,
        False,
    )


@pytest.mark.parametrize(
    "argv",
    [
        ["--interval", "0.009"],
        ["--interval", "86400.5"],
        ["--count", "0"],
        ["--query-width", "9"],
        ["--query-width", "10001"],
        ["--usage-warn", "0"],
        ["--usage-warn", "100.5"],
        ["--timeout", "0"],
        ["--idle-in-transaction-warn", "-1"],
    ],
)
def test_out_of_range(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*argv, "x"]) == 2
    assert "error: argument" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv",
    [
        ["--count", "1"],
        ["--query-width", "10"],
        ["--query-width", "10000"],
        ["--usage-warn", "100"],
        ["--usage-warn", "0.5"],
        ["--timeout", "0.1"],
        ["--idle-in-transaction-warn", "0"],
    ],
)
def test_in_range(argv: list[str]) -> None:
    cli.build_parser().parse_args(argv)


# --- the views, with a stand-in for the connection -------------------------


class FakeSource:
    """Stands for cli._Source: records what _run gave it; snapshots of a
    growing number of idle sessions, failing on the refreshes in ``failing``."""

    instances: list[FakeSource] = []
    failing: set[int] = set()
    raising: BaseException | None = None

    def __init__(self, args: argparse.Namespace, thresholds: Thresholds) -> None:
        self.args = args
        self.thresholds = thresholds
        self.calls = 0
        self.closed = False
        FakeSource.instances.append(self)

    async def snapshot(self) -> Snapshot:
        self.calls += 1
        if FakeSource.raising is not None:
            raise FakeSource.raising
        if self.calls in FakeSource.failing:
            raise cli._Failure("h:5432 did not answer within 5s")
        return aggregate([Session("orders", "idle", state_age=1.0)] * self.calls, SERVER, NOW, self.thresholds)

    async def close(self) -> None:
        self.closed = True


@pytest.fixture
def fake_source(monkeypatch: pytest.MonkeyPatch) -> type[FakeSource]:
    FakeSource.instances = []
    FakeSource.failing = set()
    FakeSource.raising = None
    monkeypatch.setattr(cli, "_Source", FakeSource)
    return FakeSource


def test_thresholds_come_from_the_options(fake_source: type[FakeSource], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--json", "--usage-warn", "50", "--idle-in-transaction-warn", "7", "x"]) == 0
    assert fake_source.instances[0].thresholds == Thresholds(idle_in_transaction=7.0, usage_warning=0.5)
    report = json.loads(capsys.readouterr().out)
    assert report["thresholds"] == {"idle_in_transaction_seconds": 7.0, "usage_warning": 0.5}
    assert fake_source.instances[0].closed


def test_json_once_and_json_count(fake_source: type[FakeSource], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--json", "x"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 1
    assert main(["--json", "--count", "3", "--interval", "0.01", "x"]) == 0
    assert [json.loads(line)["total"] for line in capsys.readouterr().out.splitlines()] == [1, 2, 3]


def test_plain_once_prints_one_snapshot_without_an_interval(
    fake_source: type[FakeSource], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--once", "--plain", "--interval", "0.01", "x"]) == 0
    out = capsys.readouterr().out
    assert out.count("max_connections") == 1 and fake_source.instances[0].calls == 1
    assert " · every " not in out


def test_plain_refreshes_piped(fake_source: type[FakeSource], capsys: pytest.CaptureFixture[str]) -> None:
    """Not a terminal: no screen clearing, a blank line between snapshots,
    the interval in the header, a failed refresh marked ``!`` above the last
    snapshot."""
    fake_source.failing = {2}
    assert main(["--plain", "--count", "3", "--interval", "0.01", "x"]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out
    assert out.startswith("me@db on h:5432 ")
    assert out.count(" · every 0.01s\n") == 3
    # The second snapshot (the first, shown again) after a blank line, under its error; the third after a blank line.
    first, second, third = out.split("\n\n! refresh failed at ")[1].partition("\n\nme@db on h:5432 ")
    assert second and first.splitlines()[0].endswith(": h:5432 did not answer within 5s; retrying")


def test_plain_on_a_terminal_clears_the_screen(
    fake_source: type[FakeSource], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    assert main(["--plain", "--count", "2", "--interval", "0.01", "x"]) == 0
    assert capsys.readouterr().out.count("\x1b[H\x1b[2J") == 2


def recording_console(monkeypatch: pytest.MonkeyPatch) -> StringIO:
    from rich.console import Console

    file = StringIO()
    monkeypatch.setattr(
        cli, "_rich_console", lambda: Console(file=file, force_terminal=True, width=120, color_system=None)
    )
    return file


def test_plain_is_plain_even_with_rich(
    fake_source: type[FakeSource], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    file = recording_console(monkeypatch)
    assert main(["--plain", "--once", "x"]) == 0
    assert "  APPLICATION  STATE" in capsys.readouterr().out and file.getvalue() == ""


def test_once_on_a_terminal_prints_rather_than_goes_live(
    fake_source: type[FakeSource], monkeypatch: pytest.MonkeyPatch
) -> None:
    file = recording_console(monkeypatch)
    assert main(["--once", "x"]) == 0
    out = file.getvalue()
    assert out.count("max_connections") == 1 and " · every " not in out
    assert "\x1b[?25l" not in out  # no live view: the cursor is never hidden


def test_the_live_view_takes_one_snapshot_per_refresh(
    fake_source: type[FakeSource], monkeypatch: pytest.MonkeyPatch
) -> None:
    recording_console(monkeypatch)
    assert main(["--count", "2", "--interval", "0.01", "x"]) == 0
    assert fake_source.instances[0].calls == 2


def test_a_closed_pipe_exits_0(fake_source: type[FakeSource], monkeypatch: pytest.MonkeyPatch) -> None:
    class Closed(StringIO):
        def write(self, text: str) -> int:
            raise BrokenPipeError

    monkeypatch.setattr(sys, "stdout", Closed())
    assert main(["--json", "x"]) == 0


def test_sighup_ends_the_view_with_128_plus_its_number(
    fake_source: type[FakeSource], capsys: pytest.CaptureFixture[str]
) -> None:
    """docs: SIGTERM and SIGHUP (the terminal closed) end the view as Ctrl-C does."""
    import os

    hups: list[int] = []
    previous = signal.signal(signal.SIGHUP, lambda number, frame: hups.append(number))
    try:
        original = FakeSource.snapshot

        async def hang_up(self: FakeSource) -> Snapshot:
            if self.calls == 1:
                os.kill(os.getpid(), signal.SIGHUP)
            return await original(self)

        FakeSource.snapshot = hang_up  # type: ignore[method-assign]
        try:
            code = main(["--plain", "--count", "50", "--interval", "0.01", "x"])
        finally:
            FakeSource.snapshot = original  # type: ignore[method-assign]
    finally:
        signal.signal(signal.SIGHUP, previous)
    assert (code, hups) == (128 + signal.SIGHUP, [])


# --- the schedule ----------------------------------------------------------


def test_the_schedule_keeps_its_pace_and_restarts_after_a_slow_refresh(monkeypatch: pytest.MonkeyPatch) -> None:
    """Refreshes ``interval`` apart from the first, not ``interval`` after
    each (no drift); after one slower than the interval, the schedule starts
    again from then (no burst of refreshes to catch up)."""
    clock = [0.0]
    started: list[float] = []
    delays: list[float] = []

    async def sleep(delay: float) -> None:
        delays.append(round(delay, 6))
        clock[0] += max(delay, 0.0)

    loop = types.SimpleNamespace(time=lambda: clock[0])
    monkeypatch.setattr(cli, "asyncio", types.SimpleNamespace(get_running_loop=lambda: loop, sleep=sleep))

    async def step(index: int) -> None:
        started.append(round(clock[0], 6))
        clock[0] += 2.5 if index == 1 else 0.3

    asyncio.run(cli._every(1.0, 4, step))
    assert started == [0.0, 1.0, 3.5, 4.5]
    assert delays == [0.7, 0.0, 0.7]


# --- the connection --------------------------------------------------------


def test_the_connection_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """Its own application_name (docs' example shows "safepool top"), the
    timeout for connecting and for each query, and unnamed statements
    (docs/pgbouncer.md: transaction mode)."""
    seen: dict[str, Any] = {}

    async def connect(dsn: str, **kwargs: Any) -> Any:
        seen.update(kwargs, dsn=dsn)
        raise OSError("stop here")

    monkeypatch.setattr(asyncpg, "connect", connect)
    args = cli.build_parser().parse_args(["--timeout", "3", "postgresql://u@h/d"])
    with pytest.raises(cli._Failure, match="^cannot connect to u@h/d: stop here$"):
        asyncio.run(cli._Source(args, Thresholds()).snapshot())
    assert seen == {
        "dsn": "postgresql://u@h/d",
        "timeout": 3.0,
        "command_timeout": 3.0,
        "server_settings": {"application_name": "safepool top"},
        "statement_cache_size": 0,
    }


def test_closing_waits_at_most_2_seconds() -> None:
    class Connection:
        timeout: float | None = None

        def is_closed(self) -> bool:
            return False

        async def close(self, timeout: float) -> None:
            self.timeout = timeout

    source = cli._Source(cli.build_parser().parse_args(["--timeout", "30"]), Thresholds())
    con = Connection()
    source._con = con  # type: ignore[assignment]
    asyncio.run(source.close())
    assert con.timeout == 2.0


# --- the target, without the password --------------------------------------


@pytest.mark.parametrize(
    ("dsn", "target"),
    [
        (None, "the server (PG* environment variables)"),
        ("postgresql://u:pw@/db?host=/run/postgresql", "u@db on socket /run/postgresql"),
        ("postgresql://u:pw@/?host=%2Frun%2Fpg", "u@default database on socket /run/pg"),
        ("postgresql://u:pw@/db?sslmode=require&host=db.internal", "u@db.internal/db"),
        ("postgresql://u:pw@h:5433/db#frag", "u@h:5433/db"),
        ("postgresql://h/db", "h/db"),
    ],
)
def test_describe_target(dsn: str | None, target: str) -> None:
    assert cli.describe_target(dsn) == target
    assert cli.describe_error(TimeoutError(), dsn, 5) == f"{target} did not answer within 5s"


def test_format_age_boundaries() -> None:
    """Each unit from its first second: 10 s is ``10s``, a minute ``1m00s``,
    an hour ``1h00m``, a day ``1d00h``."""
    assert [format_age(s) for s in (9.94, 10.0, 59.9, 60.0, 3599.0, 3600.0, 86399.0, 86400.0)] == [
        "9.9s", "10s", "59s", "1m00s", "59m59s", "1h00m", "23h59m", "1d00h",
    ]  # fmt: skip


# --- snapshot.py: grouping, counts, ordering, alarms -----------------------


def test_a_leak_suspect_from_the_threshold_on_aborted_transactions_too() -> None:
    """docs: a group idle in transaction "for at least" the threshold; an
    aborted transaction holds its connection just the same."""
    sessions = [
        Session("a", "idle in transaction (aborted)", state_age=60.0, transaction_age=61.0),
        Session("", "idle in transaction", state_age=60.0),
        Session("b", "idle in transaction", state_age=59.9),
    ]
    snap = aggregate(sessions, SERVER, NOW, Thresholds(idle_in_transaction=60))
    assert {group.application_name: group.alert for group in snap.groups} == {"a": True, "": True, "b": False}
    assert [alert.message.split(",")[0] for alert in snap.alerts] == [
        "(no application_name): 1 idle in transaction",
        "a: 1 idle in transaction (aborted)",
    ]


def test_states_in_their_order_and_applications_by_name_on_a_tie() -> None:
    """Work first, then what holds a transaction open, then idle; unknown
    states last, by name; applications holding as many connections by name."""
    states = ["idle", "disabled", "fastpath function call", "zz", "idle in transaction (aborted)", "active", "aa"]
    states += ["idle in transaction"]
    snap = aggregate([Session("b", state) for state in states] + [Session("a", "idle")] * len(states), SERVER, NOW)
    order = [
        "active",
        "idle in transaction",
        "idle in transaction (aborted)",
        "fastpath function call",
        "disabled",
        "idle",
        "aa",
        "zz",
    ]
    assert [state for state, _ in snap.by_state] == order
    assert [(group.application_name, group.state) for group in snap.groups] == [("a", "idle")] + [
        ("b", state) for state in order
    ]


def test_usage_levels_at_their_thresholds() -> None:
    """Warning from the threshold on (12 of 15 is 80 %), critical at all of them."""

    def level(total: int, server: ServerInfo = SERVER) -> Snapshot:
        return aggregate([Session("a", "idle")] * total, server, NOW)

    assert (level(11).level, level(12).level, level(14).level, level(15).level) == (
        "ok",
        "warning",
        "warning",
        "critical",
    )
    assert level(12).alerts[0].message == (
        "12 of 15 connections in use (80%; max_connections 20, 3 reserved for superusers, "
        "2 for pg_use_reserved_connections)"
    )
    full = ServerInfo("18.0", "me", "db", "h:5432", max_connections=3, superuser_reserved_connections=3)
    assert (full.available, level(0, full).usage, level(0, full).level) == (0, 1.0, "critical")


def test_queries_cut_to_the_width_with_an_ellipsis() -> None:
    def shown(query: str) -> str | None:
        return aggregate([Session("a", "idle", query=query)], SERVER, NOW, query_width=10).groups[0].query

    assert shown("SELECT 123") == "SELECT 123"
    assert shown("SELECT 1234") == "SELECT 12…"
    assert shown("SELECT\n\t  1") == "SELECT 1"
    assert shown("SELECT '\x1b'") == "SELECT '?'"


def test_json_ages_to_the_millisecond_and_query_only_when_read() -> None:
    snap = aggregate([Session("a", "active", False, 1.23456, 2.0004, 0.0005)], SERVER, NOW)
    (group,) = snap.to_dict()["groups"]
    assert (group["oldest_state_age_seconds"], group["oldest_transaction_age_seconds"]) == (1.235, 2.0)
    assert group["longest_query_seconds"] == 0.001 and "query" not in group


@pytest.mark.parametrize(("host", "address"), [("10.0.0.5", "10.0.0.5:5433"), (None, "local socket")])
def test_the_server_address(host: str | None, address: str) -> None:
    from safepool.top.snapshot import fetch

    class Connection:
        async def fetchrow(self, sql: str) -> dict[str, Any]:
            return {
                "taken_at": NOW, "version": "18.0", "user_name": "me", "database": "db", "host": host,
                "port": 5433, "max_connections": 20, "superuser_reserved": 3, "reserved": 0,
            }  # fmt: skip

        async def fetch(self, sql: str) -> list[dict[str, Any]]:
            return []

    snap = asyncio.run(fetch(Connection()))  # type: ignore[arg-type]
    assert snap.server.address == address
    assert render_plain(snap).startswith(f"me@db on {address} · PostgreSQL 18.0 · ")
