"""Machine instructions per lease, counted with Valgrind (docs/performance.md).

    python -m benchmarks.instructions DSN [--leases 3000] [--workload query ...] [--loop uvloop]

Needs ``valgrind`` on the PATH. Each workload runs twice in a process of its
own under ``valgrind --tool=callgrind``: once with ``--leases`` leases after
a warm-up, once with the warm-up alone; the difference over ``--leases`` is
the instructions one lease executes in this process (Python, asyncpg's C
code, the interpreter; not the kernel, not the server). Unlike the time
ratios, the count does not move with the machine's load or with where the
kernel places the server's backends, so it sees a change of a few hundred
instructions (0.1% of a query lease) that the interleaved timings cannot;
it does not see what an instruction costs (a cache miss, a system call).
Each workload takes about 25 s under Valgrind.

Workloads: ``floor`` (a raw connection: ``SELECT 1``, then asyncpg's reset
query), ``raw`` (a raw ``SELECT 1``), ``lean`` (the calibration's lean pool,
``_workloads.LeanPool``), ``dropin`` (the lean pool plus asyncpg's proxy and
a reset a cancel cannot cut short, ``_workloads.DropInMinimumPool``),
``asyncpg`` (its pool), and safepool's ``query``
(benchmark 2), ``safety`` (benchmark 5's lease timeout, leak warning and stack
capture), ``auto`` (``reset_mode="auto"``), ``empty`` (no statement) and
``contended`` (benchmark 3: 100 tasks on 10 connections), with
``contended-dropin`` and ``contended-asyncpg`` the same on the drop-in
minimum and on asyncpg's pool.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg

import safepool

from ._workloads import CONTENDED_TASKS, MAX_SIZE, SAFETY_ON, dropin_minimum_pool, lean_pool, reset_query

WORKLOADS = ("floor", "raw", "lean", "dropin", "asyncpg", "query", "safety", "auto", "empty", "contended",
             "contended-dropin", "contended-asyncpg")
WARM_UP = 200
_COLLECTED = re.compile(r"Collected : (\d+)")


async def _run(dsn: str, workload: str, leases: int) -> None:
    """The child's side: ``leases`` leases of ``workload`` after the warm-up."""
    if workload.startswith("contended"):
        pool: Any
        if workload == "contended-dropin":
            pool = await dropin_minimum_pool(dsn, MAX_SIZE)()
        elif workload == "contended-asyncpg":
            pool = await asyncpg.create_pool(dsn, min_size=MAX_SIZE, max_size=MAX_SIZE)
        else:
            pool = await safepool.create_pool(dsn, min_size=MAX_SIZE, max_size=MAX_SIZE)

        async def task(n: int) -> None:
            for _ in range(n):
                async with pool.acquire() as con:
                    await con.fetchval("SELECT 1")

        try:
            for n in (WARM_UP // CONTENDED_TASKS, leases // CONTENDED_TASKS):
                await asyncio.gather(*(task(n) for _ in range(CONTENDED_TASKS)))
        finally:
            await pool.close()
        return
    one: Callable[[], Awaitable[None]]
    if workload in ("floor", "raw"):
        pool = con = await asyncpg.connect(dsn)  # (closed as a pool is)
        reset = reset_query(con)  # (the floor's reset, as benchmark 2's RawConnection sends it)

        async def one() -> None:
            await con.fetchval("SELECT 1")
            if workload == "floor":
                await con.execute(reset)
    else:
        if workload == "lean":
            pool = await lean_pool(dsn, 1)()
        elif workload == "dropin":
            pool = await dropin_minimum_pool(dsn, 1)()
        elif workload == "asyncpg":
            pool = await asyncpg.create_pool(dsn, min_size=1, max_size=1)
        else:
            options = {"safety": SAFETY_ON, "auto": {"reset_mode": "auto"}}.get(workload, {})
            pool = await safepool.create_pool(dsn, min_size=1, max_size=1, **options)
        query = workload != "empty"

        async def one() -> None:
            async with pool.acquire() as con:
                if query:
                    await con.fetchval("SELECT 1")

    try:
        for _ in range(WARM_UP + leases):
            await one()
    finally:
        await pool.close()


def _collected(dsn: str, workload: str, leases: int, loop: str = "asyncio") -> int:
    valgrind = shutil.which("valgrind")
    if valgrind is None:
        raise SystemExit("valgrind is not on the PATH (Debian: apt-get install valgrind)")
    done = subprocess.run(
        [valgrind, "--tool=callgrind", "--callgrind-out-file=/dev/null", sys.executable, "-m",
         "benchmarks.instructions", "--child", workload, "--leases", str(leases), "--loop", loop, dsn],
        capture_output=True, text=True, check=True, env={**os.environ, "PYTHONHASHSEED": "0"},
    )  # fmt: skip
    match = _COLLECTED.search(done.stderr)
    if match is None:
        raise SystemExit(f"no instruction count in callgrind's output:\n{done.stderr[-2000:]}")
    return int(match.group(1))


def per_lease(dsn: str, workload: str, leases: int, loop: str = "asyncio") -> float:
    """Machine instructions of one lease of ``workload`` on ``loop`` (``"asyncio"``
    or ``"uvloop"``; see the module's docstring)."""
    return (_collected(dsn, workload, leases, loop) - _collected(dsn, workload, 0, loop)) / leases


async def _child(args: argparse.Namespace) -> None:
    await _run(args.dsn, args.child, args.leases)
    if args.say_loop:
        loop = type(asyncio.get_running_loop())
        print(f"{loop.__module__.split('.')[0]}.{loop.__name__}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dsn", help="a PostgreSQL DSN (a workload opens up to 10 connections)")
    parser.add_argument("--leases", type=int, default=3000, help="leases counted per workload (default 3000)")
    parser.add_argument("--workload", action="append", choices=WORKLOADS,
                        help="repeatable; default: all of them")  # fmt: skip
    parser.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio",
                        help="the event loop the workloads run on (default asyncio)")  # fmt: skip
    parser.add_argument("--child", choices=WORKLOADS, help=argparse.SUPPRESS)
    parser.add_argument("--say-loop", action="store_true", help=argparse.SUPPRESS)  # tests: the child prints its loop
    args = parser.parse_args()
    if args.child:
        if args.loop == "uvloop":
            import uvloop

            uvloop.run(_child(args))
        else:
            asyncio.run(_child(args))
        return
    counts: dict[str, float] = {}
    for workload in args.workload or WORKLOADS:
        counts[workload] = per_lease(args.dsn, workload, args.leases, args.loop)
        print(f"{workload:10s} {counts[workload]:>10,.0f} instructions per lease", flush=True)
    for name, over, under in (
        ("query / floor", "query", "floor"), ("query / lean", "query", "lean"), ("query / dropin", "query", "dropin"),
        ("dropin / floor", "dropin", "floor"), ("dropin / lean", "dropin", "lean"),
        ("query / asyncpg", "query", "asyncpg"),
        ("safety / query", "safety", "query"), ("auto / raw", "auto", "raw"),
    ):  # fmt: skip
        if over in counts and under in counts:
            print(f"{name:16s} {counts[over] / counts[under]:.3f}x")


if __name__ == "__main__":
    main()
