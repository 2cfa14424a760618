"""Helper 228: a newcomer's trial of safepool (README's replay, a small web-style
app on asyncpg's pool and then on safepool, the opt-in features as the docs
show them, bad inputs). What differed from asyncpg's pool, or from the docs,
and is not listed in docs/migration.md or docs/testing.md's limits, is pinned
here as a strict xfail.

- A ``connection_class`` overriding ``reset()`` gets the release's timeout
  as a float (``7.0``) where asyncpg's pool hands it over as given (``7``):
  safepool/_durations.py ``validate_timeout`` returns ``float(value)``, and
  safepool/_workers.py ``_send_reset`` passes that budget to ``reset()``.
- ``python -m safepool check`` reports SP002 ("never released") for a
  connection released under another local name it was bound to (``conn =
  con`` ... ``finally: await pool.release(conn)``): safepool/check.py
  ``_escapes`` does not treat a bare-name assignment as a hand-over and
  ``_releases`` matches the release's argument by the acquire's own name
  only. docs/testing.md's "Limits of the static check" does not list it.
- The DSN's password reaches log records, ``stats()``, ``health()`` and
  events when an ``init=`` hook's (or ``connect=`` callback's) error
  quotes the DSN through anything but a str argument or a str attribute
  (a tuple argument, ``RuntimeError(("cannot prepare", dsn))``; a dict
  attribute read by ``__str__``): safepool/_secrets.py
  ``scrub_connect_error`` (431-484) rewrites only str ``args`` and str
  attributes in place, and safepool/stats.py:182-188 ``describe_error``
  (the text the log at safepool/_reporting.py:245-251, the events, stats
  and health carry) uses ``str(error)`` unmasked. docs/metrics.md:547-560
  promises records and events never contain a password, also for what the
  application's own code raises on the way.
- A ``reset=`` hook's or a ``connection_class`` ``reset()``'s error that
  quotes the DSN, even as a plain str, is logged as it is: the
  ``reset_failed`` WARNING (safepool/_runner.py:466-470, ``describe_error``)
  has the password; nothing on the release path calls
  ``scrub_connect_error`` (only the connect path does, safepool/_workers.py
  158 and 183). docs/metrics.md:554-560 names a ``connection_class``'s
  errors among those masked before the pool logs them.
"""

from __future__ import annotations

import asyncio
import logging
import textwrap
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

import safepool
from safepool.check import check_source


def _recording_class(seen: list[Any]) -> type[asyncpg.Connection]:
    class Recording(asyncpg.Connection):  # type: ignore[misc]
        async def reset(self, *, timeout: Any = None) -> None:
            seen.append(timeout)
            await super().reset(timeout=timeout)

    return Recording


@pytest.mark.asyncio
async def test_asyncpg_hands_an_overridden_reset_the_timeout_as_given(pg_dsn: str) -> None:
    """The reference: asyncpg's pool passes acquire(timeout=7) to reset() as the int 7."""
    seen: list[Any] = []
    async with asyncpg.create_pool(pg_dsn, min_size=1, max_size=1, connection_class=_recording_class(seen)) as pool:
        async with pool.acquire(timeout=7) as con:
            await con.execute("SELECT 1")
    assert seen == [7] and type(seen[0]) is int


@pytest.mark.asyncio
async def test_safepool_hands_an_overridden_reset_the_timeout_as_given(pg_dsn: str) -> None:
    seen: list[Any] = []
    async with safepool.create_pool(pg_dsn, min_size=1, max_size=1, connection_class=_recording_class(seen)) as pool:
        async with pool.acquire(timeout=7) as con:
            await con.execute("SELECT 1")
        con = await pool.acquire()
        await con.execute("SELECT 1")
        await pool.release(con, timeout=5)
    assert seen == [7, 5]
    assert [type(t) for t in seen] == [int, int]


ALIASED = textwrap.dedent(
    """
    async def handler(pool):
        con = await pool.acquire()
        conn = con
        try:
            return await conn.fetchval("SELECT 1")
        finally:
            await pool.release(conn)
    """
)


def test_check_accepts_the_plain_try_finally_it_documents() -> None:
    """The same function without the alias is clean: only the alias differs."""
    plain = ALIASED.replace("    conn = con\n", "").replace("conn.", "con.").replace("release(conn)", "release(con)")
    assert check_source(plain, "app.py") == []


def test_check_follows_a_connection_released_under_another_local_name() -> None:
    findings = check_source(ALIASED, "app.py")
    assert findings == [], [f"{f.code} line {f.line}: {f.message}" for f in findings]


PASSWORD = "Xy7secretPW42zz"


def _with_password(dsn: str) -> str:
    """``dsn`` with PASSWORD as its password (the embedded server trusts local logins: it still logs in)."""
    parts = urlsplit(dsn)
    user = parts.username or "postgres"
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{user}:{PASSWORD}@{host}"))


class _ConnectFailed(Exception):
    """An application's error that keeps the connect parameters, and shows them."""

    def __init__(self, params: dict[str, str]) -> None:
        super().__init__("the connection could not be prepared")
        self.params = params

    def __str__(self) -> str:
        return f"cannot prepare a connection with {self.params}"


@pytest.mark.parametrize(
    "make_error",
    [
        pytest.param(lambda dsn: RuntimeError(("cannot prepare", dsn)), id="tuple-argument"),
        pytest.param(lambda dsn: _ConnectFailed({"dsn": dsn}), id="dict-attribute"),
    ],
)
@pytest.mark.asyncio
async def test_an_init_hook_error_quoting_the_dsn_is_masked_in_records_stats_and_health(
    pg_dsn: str, caplog: pytest.LogCaptureFixture, make_error: Any
) -> None:
    dsn = _with_password(pg_dsn)
    calls = 0

    async def init(con: asyncpg.Connection) -> None:
        nonlocal calls
        calls += 1
        if calls > 1:  # create_pool's first connection is fine, the next one fails
            raise make_error(dsn)

    caplog.set_level(logging.DEBUG, logger="safepool")
    events: list[Any] = []
    pool = await safepool.create_pool(dsn, min_size=1, max_size=2, init=init)
    try:
        pool.add_listener(events.append)
        async with pool.acquire():
            with pytest.raises(Exception) as raised:
                async with pool.acquire():
                    pass
        stats = repr(pool.stats())
        health = repr((await pool.health(probe=False)).to_dict())
    finally:
        pool.terminate()
    assert calls >= 2 and isinstance(raised.value, (RuntimeError, _ConnectFailed))
    assert any("init hook failed" in r.getMessage() for r in caplog.records)  # the failure was logged
    assert PASSWORD not in "\n".join(r.getMessage() for r in caplog.records)
    assert PASSWORD not in repr(events)
    assert PASSWORD not in stats
    assert PASSWORD not in health


class _ResetQuotesTheDsn(asyncpg.Connection):  # type: ignore[misc]
    dsn = ""

    async def reset(self, *, timeout: Any = None) -> None:
        raise ValueError(f"cannot reset the session of {self.dsn}")


@pytest.mark.parametrize("how", ["reset-hook", "connection-class"])
@pytest.mark.asyncio
async def test_a_reset_error_quoting_the_dsn_is_masked_in_the_reset_failed_record(
    pg_dsn: str, caplog: pytest.LogCaptureFixture, how: str
) -> None:
    dsn = _with_password(pg_dsn)

    async def reset(con: asyncpg.Connection) -> None:
        raise ValueError(f"cannot reset the session of {dsn}")

    kwargs: dict[str, Any]
    if how == "reset-hook":
        kwargs = {"reset": reset}
    else:
        _ResetQuotesTheDsn.dsn = dsn
        kwargs = {"connection_class": _ResetQuotesTheDsn}
    caplog.set_level(logging.DEBUG, logger="safepool")
    pool = await safepool.create_pool(dsn, min_size=1, max_size=1, **kwargs)
    try:
        with pytest.raises(ValueError):
            async with pool.acquire() as con:
                await con.fetchval("SELECT 1")
    finally:
        pool.terminate()
    assert any("reset failed" in r.getMessage() for r in caplog.records)  # the failure was logged
    assert PASSWORD not in "\n".join(r.getMessage() for r in caplog.records)


@pytest.mark.asyncio
async def test_a_connect_callback_error_quoting_the_dsn_in_a_tuple_is_masked(
    pg_dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    dsn = _with_password(pg_dsn)
    calls = 0

    async def connect(*args: Any, **kwargs: Any) -> asyncpg.Connection:
        nonlocal calls
        calls += 1
        if calls > 1:  # create_pool's first connect succeeds; the floor's second one fails
            raise ConnectionError(("the proxy refused", dsn))
        return await asyncpg.connect(*args, **kwargs)

    caplog.set_level(logging.DEBUG, logger="safepool")
    pool = await safepool.create_pool(dsn, min_size=2, max_size=2, connect=connect)
    try:
        for _ in range(100):
            if any("connect failed" in r.getMessage() for r in caplog.records):
                break
            await asyncio.sleep(0.01)
        stats = repr(pool.stats())
        health = repr((await pool.health(probe=False)).to_dict())
    finally:
        pool.terminate()
    assert any("connect failed" in r.getMessage() for r in caplog.records)  # the failure was logged
    assert PASSWORD not in "\n".join(r.getMessage() for r in caplog.records)
    assert PASSWORD not in stats
    assert PASSWORD not in health
