"""Review h249: a cancel request of a take-back that arrives late.

``_workers._once_free`` (s75) runs its cancel requests beside its retries:
the take-back's reset is tried again every 5 ms while a request is still
on its way. When the lease's statement ends by itself while its cancel
request is slow to arrive (a new connection to the server takes long: a
TLS handshake, a distant server, a busy postmaster), the reset is sent at
once and the request reaches the backend during the reset: a ``reset=``
hook (or any reset taking a while) is cancelled, the take-back fails
(``QueryCanceledError``), and the connection is closed instead of handed
on. Before s75 the request was awaited before the reset was tried again
(it reached an idle backend, which ignores it), and the connection was
handed on.

What is fine, checked here too: the take-back waits for its request before
it hands the connection on, so the next lease's statement is never
cancelled by it.

Deterministic: a proxy delays every new connection after the pool's by
0.4 s.

Fixed in s75: _once_free sends nothing while its cancel request is on its way.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

import safepool

from ._pg import Cluster
from ._proxy import FaultProxy

pytestmark = [pytest.mark.asyncio]


class DelayingProxy(FaultProxy):
    def __init__(self, upstream_port: int, delay: float) -> None:
        super().__init__(upstream_port)
        self.delay = delay
        self.count = 0

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.count += 1
        if self.count > 1:
            await asyncio.sleep(self.delay)
        await super()._handle(reader, writer)


async def _take_back(cluster: Cluster, app_name: str, hook_sleep: float | None, caplog: Any) -> tuple[int, int, Any]:
    async def reset(con: Any) -> None:
        if hook_sleep is not None:
            await con.execute(f"SELECT pg_sleep({hook_sleep})")

    async with DelayingProxy(cluster.port, 0.4) as proxy:
        pool = await safepool.create_pool(
            cluster.dsn(port=proxy.port), min_size=1, max_size=1, reset=reset,
            server_settings={"application_name": app_name},
        )
        try:
            con = await pool.acquire(lease_timeout=0.2)
            pid = con.get_server_pid()
            with caplog.at_level(logging.WARNING, logger="safepool"):
                try:
                    await con.fetchval("SELECT pg_sleep(0.35)")  # ends by itself before its cancel arrives
                except Exception:  # noqa: BLE001
                    pass
                async with pool.acquire(timeout=10, lease_timeout=None) as con2:
                    next_pid = con2.get_server_pid()
                    outcome: Any = await con2.fetchval("SELECT 'next lease' FROM pg_sleep(0.5)")
        finally:
            pool.terminate()
    return pid, next_pid, outcome


async def test_the_next_lease_is_not_cancelled(running: Cluster, app_name: str, caplog: Any) -> None:
    pid, next_pid, outcome = await _take_back(running, app_name, None, caplog)
    assert outcome == "next lease"
    assert next_pid == pid  # (taken back, handed on)


async def test_a_late_cancel_request_does_not_cancel_the_take_backs_reset(
    running: Cluster, app_name: str, caplog: Any
) -> None:
    pid, next_pid, outcome = await _take_back(running, app_name, 0.5, caplog)
    assert outcome == "next lease"
    assert "could not take back" not in caplog.text, caplog.text
    assert next_pid == pid
