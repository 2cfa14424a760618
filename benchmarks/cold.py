"""What Python costs between two round trips (docs/performance.md).

    python -m benchmarks.cold DSN [--calls 60 120]

The lean pool of the calibration (``_workloads.LeanPool``) against the same
pool doing N small, distinct Python calls more per release (each a function
of its own that bumps a counter: the shape of a pool's bookkeeping). Prints,
for each N, the calls' cost in a tight loop and what they add to a query
lease's client CPU time (median over interleaved rounds of the paired
difference). Between round trips the server process runs on the same cores
and evicts the client's caches, so the same calls cost several times their
tight-loop price: the measured basis of the "cold" arithmetic in
docs/performance.md.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
import timeit
from collections.abc import Callable
from typing import Any

import asyncpg

from ._workloads import LeanPool


class _Counter:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0


def distinct_calls(n: int) -> Callable[[], None]:
    """A function that makes ``n`` calls, each to a different function."""
    namespace: dict[str, Any] = {}
    exec("\n".join(f"def f{i}(c):\n    c.value += 1" for i in range(n)), namespace)  # noqa: S102
    functions = [namespace[f"f{i}"] for i in range(n)]
    counter = _Counter()

    def work() -> None:
        for function in functions:
            function(counter)

    return work


class _BusyLeanPool(LeanPool):
    def __init__(self, connections: list[asyncpg.Connection], work: Callable[[], None]) -> None:
        super().__init__(connections)
        self._work = work

    async def _put(self, con: asyncpg.Connection) -> None:
        self._work()
        await super()._put(con)


async def _cpu_per_lease(pool: LeanPool, n: int) -> float:
    start = time.process_time()
    for _ in range(n):
        async with pool.acquire() as con:
            await con.fetchval("SELECT 1")
    return (time.process_time() - start) / n


async def measure(dsn: str, calls: int, rounds: int = 11, leases: int = 2000) -> tuple[float, float]:
    """(tight-loop seconds, added client CPU seconds per query lease) for ``calls`` calls."""
    work = distinct_calls(calls)
    tight = min(timeit.repeat(work, number=20_000, repeat=5)) / 20_000
    lean = LeanPool([await asyncpg.connect(dsn)])
    busy = _BusyLeanPool([await asyncpg.connect(dsn)], work)
    try:
        added = []
        for round_no in range(rounds):
            pair = (lean, busy) if round_no % 2 else (busy, lean)
            cpu = {id(pool): await _cpu_per_lease(pool, leases) for pool in pair}
            added.append(cpu[id(busy)] - cpu[id(lean)])
    finally:
        await lean.close()
        await busy.close()
    return tight, statistics.median(added)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dsn", help="the PostgreSQL to measure against")
    parser.add_argument("--calls", type=int, nargs="+", default=[60, 120], help="extra calls per release")
    args = parser.parse_args()
    for calls in args.calls:
        tight, added = asyncio.run(measure(args.dsn, calls))
        print(f"{calls} calls: {tight * 1e6:.1f} µs in a tight loop, {added * 1e6:.1f} µs added per query lease "
              f"({added / tight:.1f}x)")


if __name__ == "__main__":
    main()
