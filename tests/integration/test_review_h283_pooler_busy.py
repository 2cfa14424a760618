"""Review h283: health()'s ``pooler_busy`` (77cfc8a) reads every refusal
``_internals.pooler_busy`` lists as PgBouncer being full or paused, "the
server behind it may be fine". The list (made for the connect backoff,
review h273) also holds PgBouncer's words for a server it cannot reach:
"pgbouncer cannot connect to server", "server login has been failing",
and ``query_wait_timeout`` for a login waiting on a server that never
answers. With the server behind PgBouncer down, health() should say so.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest

import safepool
from safepool.health import check_health
from tests._pgbouncer import Bouncer, requires_pgbouncer

from .conftest import closed_port

pytestmark = [pytest.mark.asyncio, pytest.mark.realtime, requires_pgbouncer]


def _bouncer_root() -> Path:
    root = Path(tempfile.mkdtemp(prefix="safepool-pgbouncer-"))
    root.chmod(0o755)
    return root


async def test_a_server_down_behind_pgbouncer_reads_server_down(pg_dsn: str) -> None:
    root = _bouncer_root()
    # PgBouncer in front of a server that is down: nothing listens on its port.
    upstream = {"host": "127.0.0.1", "port": closed_port(), "database": "postgres", "user": "app",
                "password": None, "server_user": "postgres"}
    bouncer = Bouncer(upstream, root, query_wait_timeout=1, server_login_retry=0.2)
    bouncer.start()
    try:
        pool = await safepool.create_pool(bouncer.dsn(), min_size=0, max_size=2, statement_cache_size=0)
        try:
            errors = []
            for _ in range(3):
                try:
                    async with pool.acquire(timeout=5) as con:
                        await con.fetchval("SELECT 1")
                except Exception as exc:
                    errors.append(type(exc).__name__)
            assert errors == ["ProtocolViolationError"] * 3
            stats = pool.stats()
            assert stats.server_status == "down" and stats.size == 0
            report = await check_health(pool, probe=False)
            codes = [reason.code for reason in report.reasons]
            assert report.status == "failing"
            assert "server_down" in codes, codes
            assert "pooler_busy" not in codes, report.reasons
        finally:
            pool.terminate()
    finally:
        bouncer.stop()
        shutil.rmtree(root, ignore_errors=True)
