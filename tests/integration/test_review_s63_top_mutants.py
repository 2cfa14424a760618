"""``safepool top`` against the test server: what a mutation review (s63,
helper-199) found untested in snapshot.py's activity query (which
backends are counted, which wait is a lock wait, which ages apply) and a
query shown whole when it was cut."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import asyncpg
import pytest

from safepool.top import main


async def report(capsys: pytest.CaptureFixture[str], *argv: str) -> dict[str, Any]:
    code = await asyncio.to_thread(main, ["--once", "--json", *argv])
    out, err = capsys.readouterr()
    assert (code, err) == (0, "")
    result: dict[str, Any] = json.loads(out)
    return result


def mine(result: dict[str, Any], app_name: str) -> dict[str | None, dict[str, Any]]:
    return {group["state"]: group for group in result["groups"] if group["application_name"] == app_name}


def with_user(dsn: str, userinfo: str) -> str:
    scheme, _, rest = dsn.partition("://")
    authority, slash, tail = rest.partition("/")
    return f"{scheme}://{userinfo}@{authority.rpartition('@')[2]}{slash}{tail}"


@pytest.mark.asyncio
async def test_background_processes_are_not_counted(pg_dsn: str, capsys: pytest.CaptureFixture[str]) -> None:
    """The checkpointer, the WAL writer... have their own slots: as a
    superuser (every session visible) nothing is hidden, and the total is
    the groups' sum."""
    admin = await asyncpg.connect(pg_dsn)
    try:
        row = await admin.fetchrow("SELECT host(inet_server_addr()) AS host, inet_server_port() AS port")
        assert row is not None
        host, port = row["host"], row["port"]
    finally:
        await admin.close()
    result = await report(capsys, pg_dsn)
    assert result["server"]["address"] == (f"{host}:{port}" if host is not None else "local socket")
    assert result["hidden"] == 0
    assert all(group["state"] is not None for group in result["groups"])


@pytest.mark.asyncio
async def test_other_roles_sessions_are_counted_hidden(pg_dsn: str, capsys: pytest.CaptureFixture[str]) -> None:
    """To a role without pg_read_all_stats, another role's session shows no
    backend_type: it is counted, as hidden (docs/metrics.md, Privileges)."""
    admin = await asyncpg.connect(pg_dsn)
    role = "sp_s63_viewer"
    try:
        await admin.execute(f"DROP ROLE IF EXISTS {role}; CREATE ROLE {role} LOGIN PASSWORD 'sp_s63_pw'")
        result = await report(capsys, "--show-queries", with_user(pg_dsn, f"{role}:sp_s63_pw"))
        assert result["hidden"] >= 1  # (the admin connection, at least)
        hidden = mine(result, "")[None]
        assert hidden["count"] >= 1
        assert "query" not in hidden  # (not "<insufficient privilege>")
        assert result["total"] == sum(group["count"] for group in result["groups"])
    finally:
        await admin.execute(f"DROP ROLE IF EXISTS {role}")
        await admin.close()


@pytest.mark.asyncio
async def test_a_session_without_application_name_and_its_ages(pg_dsn: str, capsys: pytest.CaptureFixture[str]) -> None:
    """An empty application_name is grouped under "" (``(none)``); an idle
    session has no transaction or query age; a session in an LWLock or IO
    wait is not waiting on a lock."""
    con = await asyncpg.connect(pg_dsn, server_settings={"application_name": ""})
    try:
        await con.execute("SELECT 1")
        result = await report(capsys, pg_dsn)
    finally:
        await con.close()
    idle = mine(result, "")["idle"]
    assert idle["count"] >= 1
    assert (idle["oldest_transaction_age_seconds"], idle["longest_query_seconds"]) == (None, None)
    assert idle["waiting_on_lock"] == 0


@pytest.mark.asyncio
async def test_only_active_sessions_have_a_query_age(
    pg_dsn: str, app_name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """LONGEST QUERY: for ``active`` sessions only (docs/metrics.md); an idle
    in transaction session has a query_start too, and no query running."""
    con = await asyncpg.connect(pg_dsn, server_settings={"application_name": app_name})
    try:
        await con.execute("BEGIN; SELECT 1")
        result = await report(capsys, pg_dsn)
        await con.execute("ROLLBACK")
    finally:
        await con.close()
    group = mine(result, app_name)["idle in transaction"]
    assert group["longest_query_seconds"] is None
    assert group["oldest_transaction_age_seconds"] is not None


# A bug until s63 (fixed): a query cut by the server's left() whose collapsed
# whitespace then fit the width showed whole, without its ellipsis.
@pytest.mark.asyncio
async def test_a_query_indented_past_the_fetched_text_is_shown_cut(
    pg_dsn: str, app_name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A query whose first query-width x 4 characters are mostly whitespace
    (an indented, generated statement): the server's left() cuts it, the
    whitespace collapses, and what is left fits the width: it showed as a
    whole statement ("SELECT 1"), without the "…" that says it was cut."""
    con = await asyncpg.connect(pg_dsn, server_settings={"application_name": app_name})
    try:
        await con.execute("SELECT 1" + " " * 400 + "AS one")
        result = await report(capsys, "--show-queries", "--query-width", "20", pg_dsn)
    finally:
        await con.close()
    assert mine(result, app_name)["idle"]["query"] in ("SELECT 1 AS one", "SELECT 1 …", "SELECT 1…")
