"""``tcp_keepalive``: the socket options the kernel holds for each of the
pool's TCP connections (read back with getsockopt), on this module's
cluster over TCP. What the kernel then does with a peer that stops
answering is its own (tcp(7)); the last test has a peer vanish (between
two network namespaces, where it can run: root on Linux) and times the
failure."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import asyncpg
import pytest

import safepool
from safepool import TcpKeepalive

from ._pg import Cluster

pytestmark = pytest.mark.asyncio


def kernel_options(connection: Any) -> tuple[int, int, int, int, int]:
    """SO_KEEPALIVE, TCP_KEEPIDLE, TCP_KEEPINTVL, TCP_KEEPCNT and
    TCP_USER_TIMEOUT of a pooled connection's socket, as the kernel has them."""
    raw = connection._raw if isinstance(connection, safepool.PoolConnectionProxy) else connection._con
    sock = raw._transport.get_extra_info("socket")
    return (
        sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
        sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
        sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL),
        sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT),
        sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT),
    )


async def options_of_every_connection(pool: Any, size: int) -> list[tuple[int, int, int, int, int]]:
    """Every connection of the pool, leased at once (``size`` of them)."""
    leases = [pool.acquire() for _ in range(size)]
    connections = [await lease.__aenter__() for lease in leases]
    try:
        assert len({con.get_server_pid() for con in connections}) == size
        return [kernel_options(con) for con in connections]
    finally:
        for lease in leases:
            await lease.__aexit__(None, None, None)


@pytest.mark.skipif(not hasattr(socket, "TCP_USER_TIMEOUT"), reason="Linux's TCP options")
@pytest.mark.parametrize(
    ("keepalive", "expected"),
    [
        (TcpKeepalive(idle=30, interval=5, count=4, user_timeout=20.5), (1, 30, 5, 4, 20500)),
        (TcpKeepalive(idle=0.2, interval=1.5), (1, 1, 2, 3, 0)),  # (whole seconds, rounded up)
        (True, (1, 60, 10, 3, 0)),  # the defaults; no user timeout: the system's (0)
    ],
    ids=["set", "rounded up", "True"],
)
async def test_every_connection_the_pool_opens_gets_the_keepalive(
    running: Cluster, keepalive: Any, expected: tuple[int, ...]
) -> None:
    async with safepool.create_pool(running.dsn(), min_size=2, max_size=2, tcp_keepalive=keepalive) as pool:
        assert pool.options.tcp_keepalive == (TcpKeepalive() if keepalive is True else keepalive)
        assert await options_of_every_connection(pool, 2) == [expected, expected]
        # Their replacements too (opened later, by the pool's own tasks).
        await pool.expire_connections()
        assert await options_of_every_connection(pool, 2) == [expected, expected]
        assert pool.stats().connections_opened == 4


@pytest.mark.skipif(not hasattr(socket, "TCP_USER_TIMEOUT"), reason="Linux's TCP options")
async def test_by_default_the_sockets_are_as_asyncpgs_pool_leaves_them(running: Cluster) -> None:
    async with asyncpg.create_pool(running.dsn(), min_size=1, max_size=1) as theirs:
        async with theirs.acquire() as con:
            asyncpg_options = kernel_options(con)
    async with safepool.create_pool(running.dsn(), min_size=1, max_size=1) as ours:
        assert ours.options.tcp_keepalive is None
        async with ours.acquire() as con:
            assert kernel_options(con) == asyncpg_options
    assert asyncpg_options[0] == 0  # (asyncpg sets no keepalive: MagicStack/asyncpg#606)


async def test_an_option_the_kernel_refuses_is_logged_and_the_connection_kept(
    running: Cluster, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A platform without one of the options: the pool says so once per
    connection and uses it without keepalive (the connect does not fail)."""
    refused = [(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1), (socket.IPPROTO_TCP, 9999, 1)]
    monkeypatch.setattr(TcpKeepalive, "socket_options", lambda self: refused)
    with caplog.at_level(logging.WARNING, logger="safepool"):
        async with safepool.create_pool(
            running.dsn(), name="refused", min_size=1, max_size=1, tcp_keepalive=True
        ) as pool:
            assert await pool.fetchval("SELECT 1") == 1
    [record] = [r for r in caplog.records if getattr(r, "event", None) == "keepalive_failed"]
    assert record.getMessage().startswith("pool 'refused': could not set TCP keepalive option 9999 on a connection (")
    assert "Protocol not available" in record.getMessage() or "not supported" in record.getMessage()
    assert running.dsn().split("@")[0].split(":")[-1] not in record.getMessage()  # (no password)


@pytest.mark.skipif(not hasattr(socket, "TCP_USER_TIMEOUT"), reason="Linux's TCP options")
async def test_an_option_refused_leaves_the_others_set_and_the_log_says_which(
    running: Cluster, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A platform without one option (TCP_USER_TIMEOUT, say): the options
    after it were skipped, and the log said the connection was used
    "without" keepalive while SO_KEEPALIVE was on. Each is set on its own;
    the log names the one refused."""
    tcp = socket.IPPROTO_TCP
    options = [(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1), (tcp, 9999, 1), (tcp, socket.TCP_KEEPIDLE, 7)]
    monkeypatch.setattr(TcpKeepalive, "socket_options", lambda self: options)
    with caplog.at_level(logging.WARNING, logger="safepool"):
        async with safepool.create_pool(
            running.dsn(), name="partly", min_size=1, max_size=1, tcp_keepalive=True
        ) as pool:
            async with pool.acquire() as con:
                assert kernel_options(con)[:2] == (1, 7)
    [record] = [r for r in caplog.records if getattr(r, "event", None) == "keepalive_failed"]
    message = record.getMessage()
    assert message.startswith("pool 'partly': could not set TCP keepalive option 9999 on a connection (")
    assert message.endswith("; the other keepalive options are set")


def _can_vanish_a_peer() -> bool:
    """Root on Linux with unshare, nsenter, ip and tc, and veth pairs."""
    if sys.platform != "linux" or os.geteuid() != 0:
        return False
    if not all(shutil.which(tool) for tool in ("unshare", "nsenter", "ip", "tc")):
        return False
    probe = subprocess.run(
        ["unshare", "-n", "ip", "link", "add", "va", "type", "veth", "peer", "name", "vb"], capture_output=True
    )
    return probe.returncode == 0


@pytest.mark.slow
@pytest.mark.realtime
@pytest.mark.skipif(not _can_vanish_a_peer(), reason="needs root, network namespaces and veth (Linux)")
@pytest.mark.parametrize("loop_name", ["asyncio", "uvloop"])
async def test_a_statement_on_a_connection_whose_peer_vanished_fails_in_keepalives_time(loop_name: str) -> None:
    """The kernel's side, on a real peer that stops answering (its answers
    and ACKs dropped on the way, tests/faults/_vanish.py): a statement
    waiting for its answer raises asyncpg's connection error after about
    ``idle + interval * count``; with ``user_timeout`` set, Linux fails it
    once a probe went unanswered and ``user_timeout`` passed since the peer
    last answered, in place of ``count`` (docs/best-practices.md). Without keepalive, a
    ``lease_timeout`` ends it only ``reset_timeout`` later. The pool's next
    lease gets a new connection."""
    if loop_name == "uvloop":
        pytest.importorskip("uvloop")
    done = await asyncio.to_thread(
        subprocess.run,
        ["unshare", "-n", sys.executable, "-m", "tests.faults._vanish", loop_name],
        capture_output=True, text=True, timeout=90, cwd=Path(__file__).parents[2],
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    results = {r["case"]: r for r in map(json.loads, lines)}
    assert set(results) == {"count", "user_timeout", "lease_timeout"}, done.stderr[-2000:]
    for result in results.values():
        assert result["got"] == "ConnectionDoesNotExistError"
        assert result["next_lease_works"]
    # Quiet since 0.3 s before the peer vanished: idle=2 + 2 probes 1 s apart.
    assert 2.5 < results["count"]["seconds"] < 5.5
    # user_timeout=3 ends it at the probe 3 s after the last answer; count=5
    # alone would have waited 7 s.
    assert 1.8 < results["user_timeout"]["seconds"] < 4.5
    # Without keepalive, lease_timeout=2 does not end it at 2 s: the
    # take-back's cancel request cannot reach the server; the connection is
    # closed once reset_timeout=2 more ran out (docs/runbook.md).
    assert 3.0 < results["lease_timeout"]["seconds"] < 5.5
