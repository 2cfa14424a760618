"""The read size, measured where it matters (docs/performance.md, "Reads").

    MALLOC_MMAP_THRESHOLD_=131072 python -m benchmarks.reads DSN

asyncio's selector transport reads with ``recv(256 KiB)``. glibc's malloc
serves that with mmap while its threshold is at the default 128 KiB; the
threshold rises (for the life of the process) only once a larger mmapped
block is freed, which may or may not have happened in a given application.
``MALLOC_MMAP_THRESHOLD_`` (a glibc tunable) holds it at the default, so the
run sees the state a process starts in. safepool's connections read at most
64 KiB (``safepool._internals.READ_SIZE``), which malloc always serves from
the heap.

Contenders, interleaved as in the ratio benchmarks: asyncpg's pool, safepool,
and safepool with asyncio's 256 KiB reads; each does benchmark 3's contended
workload (100 tasks, max_size=10, ``SELECT 1`` per lease). Prints one JSON
object: the contenders' median seconds per lease and the paired ratios.
Benchmark 3 runs it in full mode, on asyncio (uvloop's reads are libuv's).
"""

from __future__ import annotations

import argparse
import asyncio
import json

from safepool import _internals

from ._harness import Contender, measure_interleaved, paired_ratio
from ._workloads import CONTENDED_TASKS, Contended, PoolFactory, asyncpg_pool, safepool_pool

ASYNCIO_READ_SIZE = 256 * 1024


def _with_read_size(make_pool: PoolFactory, size: int) -> PoolFactory:
    async def make() -> object:
        saved, _internals.READ_SIZE = _internals.READ_SIZE, size
        try:
            return await make_pool()
        finally:
            _internals.READ_SIZE = saved

    return make


def measure(dsn: str, rounds: int, leases_per_task: int) -> dict[str, float]:
    contenders: list[Contender] = [
        Contended("asyncpg", asyncpg_pool(dsn)),
        Contended("safepool", safepool_pool(dsn)),
        Contended("safepool 256k", _with_read_size(safepool_pool(dsn), ASYNCIO_READ_SIZE)),
    ]
    loop = asyncio.new_event_loop()
    try:
        m = measure_interleaved(loop, contenders, rounds=rounds,
                                sizes={c.name: CONTENDED_TASKS * leases_per_task for c in contenders})
    finally:
        loop.close()
    return {
        "asyncpg": m["asyncpg"].median,
        "safepool": m["safepool"].median,
        "safepool_256k": m["safepool 256k"].median,
        "safepool_vs_asyncpg": paired_ratio(m["safepool"], m["asyncpg"]),
        "reads_256k_vs_64k": paired_ratio(m["safepool 256k"], m["safepool"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dsn", help="the PostgreSQL to measure against")
    parser.add_argument("--rounds", type=int, default=9, help="interleaved rounds (default 9)")
    parser.add_argument("--leases-per-task", type=int, default=20, help="leases per task per round (default 20)")
    args = parser.parse_args()
    print(json.dumps(measure(args.dsn, args.rounds, args.leases_per_task)))


if __name__ == "__main__":
    main()
