"""Fixtures shared by the integration tests."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest_asyncio

import safepool


@pytest_asyncio.fixture
async def pools(pg_dsn: str, app_name: str) -> AsyncIterator[Callable[..., Any]]:
    created: list[safepool.Pool] = []

    async def make(**kwargs: Any) -> safepool.Pool:
        kwargs.setdefault("min_size", 1)
        kwargs.setdefault("max_size", 2)
        kwargs.setdefault("server_settings", {"application_name": app_name})
        pool = await safepool.create_pool(pg_dsn, **kwargs)
        created.append(pool)
        return pool

    yield make
    for pool in created:
        pool._state.check_invariants()
        pool.terminate()
