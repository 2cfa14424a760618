"""Fixtures shared by the integration tests."""

from __future__ import annotations

import socket
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest_asyncio

import safepool


@pytest_asyncio.fixture
async def pools(pg_dsn: str, app_name: str) -> AsyncIterator[Callable[..., Any]]:
    created: list[safepool.Pool] = []

    async def make(**kwargs: Any) -> safepool.Pool:
        kwargs.setdefault("min_size", 1)
        kwargs.setdefault("max_size", 2)
        kwargs.setdefault("server_settings", {"application_name": app_name})
        pool = await safepool.create_pool(kwargs.pop("dsn", pg_dsn), **kwargs)
        created.append(pool)
        return pool

    yield make
    for pool in created:
        pool._state.check_invariants()
        pool.terminate()


class RefusedRole:
    """A login role the server refuses with SQLSTATE 53300 (``CONNECTION
    LIMIT 0``: "too many connections for role", as a full server answers),
    and a DSN that logs in as it with a password. ``await admit()`` lifts
    the limit: its connects succeed from then on."""

    def __init__(self, admin: Any, name: str, password: str, dsn: str) -> None:
        self.admin, self.name, self.password, self.dsn = admin, name, password, dsn

    async def admit(self) -> None:
        await self.admin.execute(f"ALTER ROLE {self.name} CONNECTION LIMIT -1")


@pytest_asyncio.fixture
async def refused_role(pg_dsn: str) -> AsyncIterator[RefusedRole]:
    name = f"sp_full_{uuid.uuid4().hex[:10]}"  # unique: the server may be shared
    password = f"pw-{uuid.uuid4().hex}"
    parts = urlsplit(pg_dsn)
    dsn = urlunsplit(parts._replace(netloc=f"{name}:{password}@{parts.netloc.rpartition('@')[2]}"))
    admin = await asyncpg.connect(pg_dsn)
    await admin.execute(f"CREATE ROLE {name} LOGIN CONNECTION LIMIT 0 PASSWORD '{password}'")
    try:
        yield RefusedRole(admin, name, password, dsn)
    finally:
        await admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = $1", name
        )
        await admin.execute(f"DROP ROLE IF EXISTS {name}")
        await admin.close()


def closed_port() -> int:
    """A local TCP port nothing listens on: a connect there is refused
    (``ConnectionRefusedError``: no SQLSTATE, the server never answered)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def dsn_to_closed_port(pg_dsn: str, password: str) -> str:
    """``pg_dsn``'s user with ``password``, aimed at :func:`closed_port` on
    127.0.0.1 (no server reads the password)."""
    parts = urlsplit(pg_dsn)
    user = parts.username or "postgres"
    return urlunsplit(parts._replace(netloc=f"{user}:{password}@127.0.0.1:{closed_port()}", query=""))
