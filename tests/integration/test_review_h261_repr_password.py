"""Review h261: a password holding a backslash is shown, escaped, where an
error quotes it with ``repr()``.

An application's error often quotes its settings with ``!r`` (``f"cannot
apply {settings!r}"``, a dict holding the password). ``repr()`` writes a
backslash as two, so the message holds ``h261\\\\s3cret-pw``, not the
password's text, and the pool's masking (``_secrets.redact_known`` ->
``_masked_in_text``, safepool/_secrets.py:207-215, which looks for the
password as written only; ``Reporter.describe``, safepool/_reporting.py:106,
and ``Reporter.scrub``, safepool/_reporting.py:94, both go through it)
leaves it. ``scrub_quoted`` (safepool/_secrets.py:384), which reads a
quoted piece as the string it is the ``repr()`` of, runs for a connect's
own errors only. So the password, one unescape away, reaches the pool's own
outputs, which promise never to show it (docs/metrics.md:
``stats().last_connect_error`` "never the DSN or a password"; the
``safepool`` logger's record of the failed ``init=``, which asyncpg's pool
does not log at all; ``describe_error()``, "with this pool's password
masked however the error holds it"). The same message with a password
without a backslash comes out masked (``'password': '***'``), as the
control test shows. Fixed: the password is masked in each of its written
forms (``_secrets._written_forms``: repr and ascii, also twice over, JSON,
%-encoded); the siblings below quote it each way.

Runs on the suite's server with ``password=`` (its authentication does not
read it: no role needed). Every wait is bounded."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any
from urllib.parse import quote, quote_plus

import pytest

import safepool

pytestmark = pytest.mark.asyncio

WITH_BACKSLASH = "h261\\s3cret-pw"
PLAIN = "h261s3cret-pw"


async def _outputs(pg_dsn: str, password: str, caplog: pytest.LogCaptureFixture) -> list[str]:
    failing = False

    async def init(con: Any) -> None:
        if failing:
            raise ValueError(f"cannot apply settings {({'user': 'app', 'password': password})!r}")

    pool = await asyncio.wait_for(
        safepool.create_pool(pg_dsn, password=password, min_size=0, max_size=1, init=init), 10
    )
    try:
        failing = True
        with caplog.at_level(logging.DEBUG, logger="safepool"), pytest.raises(ValueError):
            await asyncio.wait_for(pool.fetchval("SELECT 1"), 10)
        described = pool.describe_error(ValueError(f"settings {({'password': password})!r}"))
        return [str(pool.stats().last_connect_error), described, *(r.getMessage() for r in caplog.records)]
    finally:
        await asyncio.wait_for(pool.close(), 10)


def _shown(outputs: list[str]) -> list[str]:
    return [text for text in outputs if "s3cret" in text]


async def test_a_plain_password_quoted_with_repr_is_masked(pg_dsn: str, caplog: pytest.LogCaptureFixture) -> None:
    outputs = await _outputs(pg_dsn, PLAIN, caplog)
    assert any("'password': '***'" in text for text in outputs)
    assert _shown(outputs) == []


async def test_a_backslash_password_quoted_with_repr_is_masked(pg_dsn: str, caplog: pytest.LogCaptureFixture) -> None:
    outputs = await _outputs(pg_dsn, WITH_BACKSLASH, caplog)
    assert _shown(outputs) == []


def _quoted_each_way(password: str) -> dict[str, str]:
    """An application's error text quoting the password each way code does."""
    settings = {"user": "app", "password": password}
    return {
        "repr": f"cannot apply {settings!r}",
        "ascii": f"cannot apply {ascii(settings)}",
        "repr-of-repr": repr(ValueError(f"cannot apply {settings!r}")),
        "json": f"cannot apply {json.dumps(settings)}",
        "json-unicode": f"cannot apply {json.dumps(settings, ensure_ascii=False)}",
        "quote": f"cannot reach postgresql://app:{quote(password, safe='')}@db/x",
        "quote-plus": f"form body password={quote_plus(password)}&x=1",
    }


@pytest.mark.parametrize(
    "password",
    [WITH_BACKSLASH, "h261\ts3cret-pw", "h261'quo\"te-s3cret", "h261\u00e9-s3cret-\u00fc", "h261 s3cret/pw+&="],
    ids=["backslash", "tab", "quotes", "non-ascii", "url-specials"],
)
async def test_a_password_quoted_any_way_is_masked_by_describe_error(pg_dsn: str, password: str) -> None:
    pool = await asyncio.wait_for(safepool.create_pool(pg_dsn, password=password, min_size=0, max_size=1), 10)
    try:
        for how, text in _quoted_each_way(password).items():
            described = pool.describe_error(ValueError(text))
            assert "s3cret" not in described, (how, described)
            assert "***" in described, (how, described)
    finally:
        await asyncio.wait_for(pool.close(), 10)
