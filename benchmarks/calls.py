"""Python calls per lease, counted with cProfile (docs/performance.md).

    python -m benchmarks.calls DSN

Counts the calls of an empty lease, a query lease (``SELECT 1`` and the
full reset) and a contended lease (100 tasks on max_size=10), for safepool
and for the lean pool of the calibration (``_workloads.LeanPool``). A call
count is a machine-independent measure of the pool's own work: each call
costs 0.1-0.5 µs here depending on how cold the caches are.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
from collections.abc import Awaitable, Callable

import safepool

from ._workloads import contended_leases, lean_pool, serial_leases

LEASES = 2000


async def _count(run: Callable[[int], Awaitable[None]]) -> float:
    await run(100)  # warm: statement caches, free lists
    profile = cProfile.Profile()
    profile.enable()
    await run(LEASES)
    profile.disable()
    return pstats.Stats(profile).total_calls / LEASES  # type: ignore[attr-defined,no-any-return]


async def main(dsn: str) -> None:
    pools = {
        "safepool": await safepool.create_pool(dsn, min_size=10, max_size=10),
        "lean pool": await lean_pool(dsn)(),
    }
    print(f"{'pool':10s} {'empty':>7s} {'query':>7s} {'contended':>10s}  (Python calls per lease)")
    for name, pool in pools.items():
        empty = await _count(serial_leases(pool, query=False))
        query = await _count(serial_leases(pool, query=True))
        contended = await _count(contended_leases(pool))
        print(f"{name:10s} {empty:7.1f} {query:7.1f} {contended:10.1f}")
        await pool.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dsn", help="a PostgreSQL DSN (the pools open 10 connections each)")
    asyncio.run(main(parser.parse_args().dsn))
