"""A peer that vanishes without a FIN or an RST, for ``tcp_keepalive``'s
test: run as ``unshare -n python -m tests.faults._vanish LOOP`` (root, Linux).

In that network namespace (the server's) it starts a cluster on loopback, a
forwarder on 10.115.0.2 and a veth pair to a second namespace (the
client's), where it runs :func:`client`. To vanish, the server's end of the
veth gets a queue of length 0: everything the server's side sends (answers,
ACKs) is dropped there, while the client's probes still leave (a drop on
the client's own side would be "local congestion" to its kernel, which
then retries its probes without counting them). Prints one JSON line per
case: what a statement waiting on the connection got, and after how long."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
from typing import Any

import safepool

CASES: dict[str, dict[str, Any]] = {
    # name: the pool's options
    "count": {"tcp_keepalive": safepool.TcpKeepalive(idle=2, interval=1, count=2)},
    # user_timeout in place of count: the first probe sent 3 s or more after
    # the peer last answered fails it (3 s), not the fifth probe (7 s).
    "user_timeout": {"tcp_keepalive": safepool.TcpKeepalive(idle=2, interval=1, count=5, user_timeout=3)},
    # No keepalive: the lease's take-back sends a cancel request the server
    # never gets; the connection is closed when the reset's time runs out.
    "lease_timeout": {"lease_timeout": 2.0, "reset_timeout": 2.0},
}


def run(*args: str) -> None:
    subprocess.run(args, check=True, stdout=subprocess.DEVNULL)


async def client(dsn: str, server_pid: str) -> None:
    def queue(op: str) -> None:
        run("nsenter", "-t", server_pid, "-n", "tc", "qdisc", op, "dev", "vserver", "root",
            *(("pfifo", "limit", "0") if op == "add" else ()))

    # The cases run at once, on one vanish (the queue holds every
    # connection's traffic): each its own pool and clock. (One after the
    # other, they took 15 s of the README command's tests per loop.)
    async with contextlib.AsyncExitStack() as stack:
        pools = {name: await stack.enter_async_context(safepool.create_pool(dsn, min_size=1, max_size=1, **options))
                 for name, options in CASES.items()}
        leased = {name: await pool.acquire() for name, pool in pools.items()}
        statements = {name: asyncio.ensure_future(con.fetchval("SELECT pg_sleep(60)")) for name, con in leased.items()}
        await asyncio.sleep(0.3)  # sent and acknowledged: the connections are quiet
        queue("add")
        started = time.monotonic()

        async def outcome(statement: asyncio.Future[Any]) -> tuple[str, float]:
            try:
                await asyncio.wait_for(asyncio.shield(statement), 15)
                got = "answer"
            except TimeoutError:
                got = "nothing"
            except Exception as exc:
                got = type(exc).__name__
            return got, time.monotonic() - started

        outcomes = dict(zip(statements, await asyncio.gather(*map(outcome, statements.values())), strict=True))
        queue("del")
        for name, (got, seconds) in outcomes.items():
            statement, pool = statements[name], pools[name]
            if not statement.done():
                statement.cancel()
            if name != "lease_timeout":  # (taken back)
                await pool.release(leased[name], timeout=5)
            async with pool.acquire() as again:
                works = await again.fetchval("SELECT 1") == 1
            print(json.dumps({"case": name, "got": got, "seconds": seconds, "next_lease_works": works}), flush=True)


async def forward(port: int) -> None:
    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except OSError:
            pass
        finally:
            writer.close()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", port)
        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    await asyncio.start_server(handle, "10.115.0.2", 6543)


async def _in_a_namespace_of_its_own(pid: int, timeout: float = 10.0) -> None:
    """Until process ``pid`` (``unshare -n``) runs in a network namespace
    other than this process's: moving the veth end into its namespace
    before it unshared would move it into this one. (Was: a 0.2 s sleep.)"""
    own = os.readlink("/proc/self/ns/net")
    async with asyncio.timeout(timeout):
        while os.readlink(f"/proc/{pid}/ns/net") == own:
            await asyncio.sleep(0.005)


async def server(cluster: Any, loop_name: str) -> None:
    holder: Any = None
    try:
        run("ip", "link", "add", "vserver", "type", "veth", "peer", "name", "vclient")
        run("ip", "addr", "add", "10.115.0.2/24", "dev", "vserver")
        run("ip", "link", "set", "vserver", "up")
        await forward(cluster.port)
        holder = await asyncio.create_subprocess_exec("unshare", "-n", "sleep", "300")
        await _in_a_namespace_of_its_own(holder.pid)
        run("ip", "link", "set", "vclient", "netns", str(holder.pid))
        ns = ("nsenter", "-t", str(holder.pid), "-n")
        run(*ns, "ip", "link", "set", "lo", "up")
        run(*ns, "ip", "addr", "add", "10.115.0.1/24", "dev", "vclient")
        run(*ns, "ip", "link", "set", "vclient", "up")
        dsn = cluster.dsn().replace(f"127.0.0.1:{cluster.port}", "10.115.0.2:6543")
        child = await asyncio.create_subprocess_exec(
            *ns, sys.executable, "-m", "tests.faults._vanish", "client", loop_name, dsn, str(os.getpid())
        )
        await child.wait()
    finally:
        if holder is not None:
            holder.kill()
            await holder.wait()


if __name__ == "__main__":
    if sys.argv[1] == "client":
        main = client(sys.argv[3], sys.argv[4])
        loop_name = sys.argv[2]
    else:
        from ._pg import start_cluster

        run("ip", "link", "set", "lo", "up")
        loop_name = sys.argv[1]
        cluster = start_cluster()
        main = server(cluster, loop_name)
    try:
        if loop_name == "uvloop":
            import uvloop

            uvloop.run(main)
        else:
            asyncio.run(main)
    finally:
        if sys.argv[1] != "client":
            cluster.cleanup()
