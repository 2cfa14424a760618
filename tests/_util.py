"""Small helpers shared by the test modules."""

from __future__ import annotations

import asyncio
from collections.abc import Callable


async def until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    """Poll a public observable (pool sizes, stats) that offers no event to wait on."""
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.005)
