"""``tcp_keepalive`` on the test server's own address: over a Unix-domain
socket (the embedded server's) there is no TCP to keep alive, and the
pool's connections work as without it (tests/faults/test_keepalive.py
covers TCP)."""

from __future__ import annotations

import socket
from typing import Any

import pytest

import safepool

pytestmark = pytest.mark.asyncio


async def test_a_pool_with_keepalive_works_on_any_address(pools: Any) -> None:
    pool = await pools(min_size=1, max_size=1, tcp_keepalive=True)
    async with pool.acquire() as con:
        assert await con.fetchval("SELECT 41 + 1") == 42
        sock = con._raw._transport.get_extra_info("socket")
        if sock.family == socket.AF_UNIX:
            assert safepool._keepalive.apply(con._raw, safepool.TcpKeepalive(), "p") is False
        else:  # (SAFEPOOL_TEST_DSN over TCP)
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
    assert pool.options.tcp_keepalive == safepool.TcpKeepalive()
