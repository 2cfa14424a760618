"""Where a contended lease's time goes on two cores: the client's CPU and the
server's (docs/performance.md, "The two cores' budget").

    python -m benchmarks.server_cpu DSN [--rounds 9] [--leases-per-task 40]

Benchmark 3's contended workload (100 tasks, max_size=10, ``SELECT 1`` per
lease, full reset) on asyncpg's pool, the drop-in minimum and safepool,
interleaved as in the ratio benchmarks. Per lease it reports the wall time,
this process's CPU (``time.process_time``) and the CPU of the pool's ten
backends (their time on a CPU from ``/proc/<pid>/schedstat``, in
nanoseconds, so the server must run on this machine). On a machine with ``nproc`` cores no schedule
can do a lease in less than ``max(client, (client + server) / nproc)``: the
client is one thread, and the two sums share the cores. Prints one JSON
object: per contender, the medians over rounds, in microseconds.

glibc's malloc threshold for serving a request with ``mmap`` is raised to
1 MiB first (``mallopt``), the state of a process in which it has risen (the
benchmark suite's: docs/performance.md, "Reads"): asyncpg's pool and the
drop-in minimum read with asyncio's 256 KiB ``recv()``, which otherwise costs
an ``mmap`` per read in a fresh process, and the ratios swung by 40%
between runs.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import json
import os
import statistics
from typing import Any

from ._harness import measure_interleaved
from ._workloads import (
    CONTENDED_TASKS,
    MAX_SIZE,
    Contended,
    PoolFactory,
    asyncpg_pool,
    dropin_minimum_pool,
    safepool_pool,
)

M_MMAP_THRESHOLD = -3  # glibc's mallopt() parameter (malloc.h)


def raise_mmap_threshold(size: int = 1 << 20) -> bool:
    """Have glibc's malloc serve requests below ``size`` bytes from its heap
    (``mallopt(M_MMAP_THRESHOLD, size)``); False where that is not glibc."""
    try:
        libc = ctypes.CDLL(None)
        return bool(libc.mallopt(M_MMAP_THRESHOLD, size))
    except (OSError, AttributeError):
        return False


def backend_cpu(pids: list[int]) -> float:
    """Seconds the processes ``pids`` have run on a CPU (the first field of
    ``/proc/<pid>/schedstat``: nanoseconds, where ``/proc/<pid>/stat``
    counts 10 ms ticks); one that exited counts 0."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/schedstat") as schedstat:
                total += int(schedstat.read().split()[0])
        except FileNotFoundError:
            continue
    return total / 1e9


async def server_pids(pool: Any) -> list[int]:
    """The backend process ids of a pool's connections (all ``MAX_SIZE``)."""
    connections = getattr(pool, "_connections", None)
    if connections is not None:  # the drop-in minimum: its connections, plain
        return [con.get_server_pid() for con in connections]
    leases = [await pool.acquire() for _ in range(MAX_SIZE)]
    try:
        return [con.get_server_pid() for con in leases]
    finally:
        for con in leases:
            await pool.release(con)


class ServerTimed(Contended):
    """:class:`Contended`, also reading its backends' CPU around each batch."""

    def __init__(self, name: str, make_pool: PoolFactory) -> None:
        super().__init__(name, make_pool)
        self.pids: list[int] = []
        self.server_seconds: list[float] = []  # one per batch

    async def setup(self) -> None:
        await super().setup()
        self.pids = await server_pids(self.pool)

    async def run(self, n: int) -> None:
        before = backend_cpu(self.pids)
        await super().run(n)
        self.server_seconds.append(backend_cpu(self.pids) - before)

    def start_timing(self) -> None:
        super().start_timing()
        self.server_seconds.clear()


def measure(dsn: str, rounds: int, leases_per_task: int) -> dict[str, dict[str, float]]:
    contenders = [
        ServerTimed("asyncpg", asyncpg_pool(dsn)),
        ServerTimed("drop-in minimum", dropin_minimum_pool(dsn)),
        ServerTimed("safepool", safepool_pool(dsn)),
    ]
    n = CONTENDED_TASKS * leases_per_task
    loop = asyncio.new_event_loop()
    try:
        measured = measure_interleaved(loop, list(contenders), rounds=rounds, sizes={c.name: n for c in contenders})
    finally:
        loop.close()
    cores = os.cpu_count() or 1
    out: dict[str, dict[str, float]] = {}
    for contender in contenders:
        m = measured[contender.name]
        # (The per-op lists and server_seconds hold the same batches, in order.)
        client = statistics.median(m.cpu_per_op) * 1e6
        server = statistics.median(contender.server_seconds) / n * 1e6
        out[contender.name] = {
            "wall_us": m.median * 1e6,
            "client_cpu_us": client,
            "server_cpu_us": server,
            "bound_us": max(client, (client + server) / cores),
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dsn", help="a PostgreSQL DSN of a server on this machine (the pools open 10 connections each)")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--leases-per-task", type=int, default=40)
    args = parser.parse_args()
    raise_mmap_threshold()
    print(json.dumps(measure(args.dsn, args.rounds, args.leases_per_task), indent=2))


if __name__ == "__main__":
    main()
