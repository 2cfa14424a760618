"""Small helpers shared by the test modules."""

from __future__ import annotations

import asyncio
from collections.abc import Callable


async def until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    """Poll a public observable (pool sizes, stats) that offers no event to wait on."""
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.005)


def asyncpg_version() -> tuple[int, int]:
    """The installed asyncpg's (major, minor): the version matrix runs 0.29 to 0.32."""
    import asyncpg

    major, minor = asyncpg.__version__.split(".")[:2]
    return int(major), int(minor)


def skip_before_asyncpg(version: tuple[int, int], what: str) -> None:
    """Skip the calling test on an asyncpg older than ``version``, which lacks ``what``."""
    import pytest

    if asyncpg_version() < version:
        pytest.skip(f"asyncpg {'.'.join(map(str, version))}+: {what}")
