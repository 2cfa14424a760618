"""The pool on the fake server and the manual clock, for tests/io."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

import safepool
from safepool import ManualClock

from .fake import FakeConnection, FakeServer


async def spin(times: int = 10) -> None:
    """Let every ready callback run (the pool's tasks, the drivers)."""
    for _ in range(times):
        await asyncio.sleep(0)


class Rig:
    def __init__(self, server: FakeServer, clock: ManualClock, pool: safepool.Pool) -> None:
        self.server = server
        self.clock = clock
        self.pool = pool
        # Tasks a scenario started beside its own (tests/io/test_sweep.py
        # waits for them and checks their outcome).
        self.helpers: list[asyncio.Task[Any]] = []

    def books(self, *, size: int | None = None, idle: int | None = None, in_use: int = 0) -> None:
        """The core's invariants, and what the fake server says is open."""
        state = self.pool._state
        state.check_invariants()
        assert state.in_use == in_use
        if size is not None:
            assert state.size == size
            assert len(self.server.open()) == state.connected()
        if idle is not None:
            assert state.idle == idle

    async def lease(self, **kwargs: Any) -> Any:
        """An acquired connection (its connect completed if one was needed)."""
        task = asyncio.ensure_future(self.pool.acquire(**kwargs))
        await spin()
        while self.server.connects:
            self.server.finish_connect()
            await spin()
        return await task

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        self.helpers.append(task)
        return task


async def make_rig(server: FakeServer | None = None, **options: Any) -> Rig:
    server = server if server is not None else FakeServer()
    clock = ManualClock()
    options.setdefault("min_size", 0)
    options.setdefault("max_size", 2)
    pool = await safepool.create_pool(connect=server.connect, connection_class=FakeConnection, clock=clock, **options)
    return Rig(server, clock, pool)
