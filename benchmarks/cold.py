"""What Python costs between two round trips (docs/performance.md).

    python -m benchmarks.cold DSN [--calls 60 120]

The lean pool of the calibration (``_workloads.LeanPool``) against the same
pool doing N small, distinct Python calls more per release (each a function
of its own that bumps a counter: the shape of a pool's bookkeeping). Prints,
for each N, the calls' cost in a tight loop and what they add to a query
lease's client CPU time (median over interleaved rounds of the paired
difference). It tests whether calls made between round trips, while the
server process shares the cores, cost more than their tight-loop price. On
the project's 2-core machine the answer is noise-bound: 0.6-3.5x over six
runs of 60 calls (docs/performance.md, "What limits each benchmark").
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import timeit
from collections.abc import Callable
from typing import Any

import asyncpg

from ._harness import Contender, measure_interleaved
from ._workloads import LeanPool, Lease, PoolFactory, lean_pool


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


def _busy_lean_pool(dsn: str, work: Callable[[], None]) -> PoolFactory:
    async def make() -> Any:
        return _BusyLeanPool([await asyncpg.connect(dsn)], work)

    return make


def measure(dsn: str, calls: int, rounds: int = 41) -> tuple[float, float]:
    """(tight-loop seconds, added client CPU seconds per query lease) for
    ``calls`` calls, the leases measured interleaved as in the ratio
    benchmarks (``_harness.measure_interleaved``)."""
    work = distinct_calls(calls)
    tight = min(timeit.repeat(work, number=20_000, repeat=5)) / 20_000
    contenders: list[Contender] = [
        Lease("lean", lean_pool(dsn, size=1), query=True),
        Lease("busy", _busy_lean_pool(dsn, work), query=True),
    ]
    loop = asyncio.new_event_loop()
    try:
        m = measure_interleaved(loop, contenders, rounds=rounds, batch_seconds=0.2)
    finally:
        loop.close()
    added = statistics.median(b - a for a, b in zip(m["lean"].cpu_per_op, m["busy"].cpu_per_op, strict=True))
    return tight, added


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dsn", help="the PostgreSQL to measure against")
    parser.add_argument("--calls", type=int, nargs="+", default=[60, 120], help="extra calls per release")
    args = parser.parse_args()
    for calls in args.calls:
        tight, added = measure(args.dsn, calls)
        print(f"{calls} calls: {tight * 1e6:.1f} µs in a tight loop, {added * 1e6:.1f} µs added per query lease "
              f"({added / tight:.1f}x)")


if __name__ == "__main__":
    main()
