"""Where a lease's client CPU goes, sampled with Linux perf (docs/performance.md).

    python3.12 -m benchmarks.attribution DSN [--workload contended|query] [--seconds 6] [--repeat 3]

Needs ``perf`` on the PATH and Python 3.12 or later, whose ``-X perf`` lets
perf name Python functions (https://docs.python.org/3/howto/perf_profiling.html).
Each pool (safepool, the lean pool of the calibration, asyncpg's pool) runs
the workload in a process of its own under ``perf record -e cpu-clock
--call-graph dwarf`` (1000 samples a second of CPU), with glibc's mmap
thresholds fixed (so that no pool's reads map, unmap or trim memory: that
is ``benchmarks.reads``'s subject). Only the samples taken while the workload runs
count (perf's clock is CLOCK_MONOTONIC, the child reports its window).
The pools' runs are interleaved ``--repeat`` times; the table gives medians.

Each sample is charged to the innermost Python function on its stack (its
code and the C code it calls: its self time), or, when the sample is in the
kernel, to the system call it is in. Prints, per pool, microseconds of CPU
per lease by bucket: the pool's own Python, asyncpg, asyncio, and the
``sendto`` / ``recvfrom`` / ``epoll_wait`` system calls; then safepool's own
functions. The perf trampolines make each Python call dearer (a contended
lease runs about 1.2x slower under them): compare buckets across pools, not
totals with the ratio benchmarks.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from typing import Any

import asyncpg

import safepool

from ._workloads import CONTENDED_TASKS, SAFETY_ON, LeanPool

SAMPLES_PER_SECOND = 1000
# On request also "safepool auto" (reset_mode="auto") and "safepool safety"
# (benchmark 5's lease timeout, leak warning and stack capture).
POOLS = ("safepool", "lean pool", "asyncpg")
# One bucket per source of a sample; a Python function's bucket is its file's.
_FILE_BUCKETS = (
    ("/safepool/", "safepool"),
    ("benchmarks/_workloads.py", "lean pool"),
    ("/asyncpg/", "asyncpg"),
    ("/asyncio/", "asyncio"),
    ("/selectors.py", "asyncio"),
    ("benchmarks/attribution.py", "workload"),
)
_SYSCALLS = ("sendto", "recvfrom", "epoll_wait")
_SAMPLE_HEADER = re.compile(r"^\S.*?\s(\d+\.\d+):\s")
_FRAME = re.compile(r"^\s+[0-9a-f]+\s+(.*?)(?:\+0x[0-9a-f]+)?\s+\((.*)\)$")


# ----------------------------------------------------------------- the child


async def _make_pool(kind: str, dsn: str) -> Any:
    if kind == "safepool":
        return await safepool.create_pool(dsn, min_size=10, max_size=10)
    if kind == "safepool auto":
        return await safepool.create_pool(dsn, min_size=10, max_size=10, reset_mode="auto")
    if kind == "safepool safety":
        return await safepool.create_pool(dsn, min_size=10, max_size=10, **SAFETY_ON)
    if kind == "asyncpg":
        return await asyncpg.create_pool(dsn, min_size=10, max_size=10)
    return LeanPool([await asyncpg.connect(dsn) for _ in range(10)])


async def _child(kind: str, workload: str, seconds: float, dsn: str) -> dict[str, float]:
    pool = await _make_pool(kind, dsn)

    async def lease() -> None:
        async with pool.acquire() as con:
            await con.fetchval("SELECT 1")

    async def batch() -> int:
        if workload == "query":
            for _ in range(500):
                await lease()
            return 500

        async def worker() -> None:
            for _ in range(20):
                await lease()

        await asyncio.gather(*(worker() for _ in range(CONTENDED_TASKS)))
        return CONTENDED_TASKS * 20

    await batch()  # warm: statement caches, free lists
    leases, start = 0, time.monotonic()
    while time.monotonic() - start < seconds:
        leases += await batch()
    end = time.monotonic()
    await pool.close()
    return {"leases": leases, "start": start, "end": end}


# ---------------------------------------------------------------- the parent


def _bucket(stack: list[tuple[str, str]]) -> tuple[str, str]:
    """(bucket, function) of one sample; ``stack`` is innermost first, as
    (symbol, object) pairs."""
    if stack and stack[0][1] == "[kernel.kallsyms]":
        for symbol, _ in stack:
            for call in _SYSCALLS:
                if symbol == f"__x64_sys_{call}":
                    return f"kernel: {call}", call
        return "kernel: other", ""
    for symbol, _ in stack:
        if symbol.startswith("py::"):
            function, _, path = symbol[4:].partition(":")
            for fragment, bucket in _FILE_BUCKETS:
                if fragment in path:
                    return bucket, function
            return "other Python", function
    return "other", ""


def _samples(script: str, start: float, end: float) -> Iterator[list[tuple[str, str]]]:
    """The stacks of ``perf script`` output taken within [start, end]."""
    stack: list[tuple[str, str]] = []
    keep = False
    for line in script.splitlines():
        header = _SAMPLE_HEADER.match(line)
        if header:
            stamp = float(header.group(1))
            keep, stack = start <= stamp <= end, []
            continue
        if not line.strip():
            if keep and stack:
                yield stack
            keep, stack = False, []
            continue
        frame = _FRAME.match(line)
        if keep and frame:
            stack.append((frame.group(1), frame.group(2).rsplit("/", 1)[-1]))
    if keep and stack:
        yield stack


def attribute(kind: str, workload: str, seconds: float, dsn: str, python: str) -> dict[str, Any]:
    """Run one pool's workload under perf; returns its leases and the µs of
    CPU per lease by bucket and by (bucket, function)."""
    path = os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")]))
    # Fixed, so that neither pool's reads map or trim memory (benchmarks.reads measures that).
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="4194304", MALLOC_TRIM_THRESHOLD_="67108864", PYTHONPATH=path)
    with tempfile.TemporaryDirectory() as tmp:
        data = os.path.join(tmp, "perf.data")
        child = subprocess.run(
            ["perf", "record", "-q", "-k", "CLOCK_MONOTONIC", "-e", "cpu-clock", "-F", str(SAMPLES_PER_SECOND),
             "--call-graph", "dwarf,16384", "-o", data, "--",
             python, "-X", "perf", "-m", "benchmarks.attribution", "--child", kind, workload, str(seconds), dsn],
            env=env, check=True, capture_output=True, text=True,
        )
        window = json.loads(child.stdout.strip().splitlines()[-1])
        script = subprocess.run(["perf", "script", "-i", data], check=True, capture_output=True, text=True).stdout
    per_sample = 1e6 / SAMPLES_PER_SECOND / window["leases"]  # µs of CPU per lease that one sample stands for
    buckets: collections.Counter[str] = collections.Counter()
    functions: collections.Counter[tuple[str, str]] = collections.Counter()
    for stack in _samples(script, window["start"], window["end"]):
        bucket, function = _bucket(stack)
        buckets[bucket] += per_sample
        functions[bucket, function] += per_sample
    return {"leases": window["leases"], "wall_per_lease": (window["end"] - window["start"]) / window["leases"] * 1e6,
            "buckets": buckets, "functions": functions}


def _median(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Each bucket's and function's median over repeated runs of one pool."""
    def median_of(key: str) -> collections.Counter[Any]:
        names = {name for run in runs for name in run[key]}
        return collections.Counter({name: statistics.median(run[key][name] for run in runs) for name in names})

    return {"leases": sum(run["leases"] for run in runs),
            "wall_per_lease": statistics.median(run["wall_per_lease"] for run in runs),
            "buckets": median_of("buckets"), "functions": median_of("functions")}


def render(results: dict[str, dict[str, Any]], top: int) -> str:
    """The markdown table of ``attribute``'s results (pools as columns), and
    safepool's own ``top`` functions."""
    names = list(results)

    def row(label: str, cells: Iterable[str]) -> str:
        return f"| {label} | " + " | ".join(cells) + " |"

    order = sorted({b for r in results.values() for b in r["buckets"]},
                   key=lambda b: -max(r["buckets"][b] for r in results.values()))
    lines = [row("µs of CPU per lease", names), "|---" * (len(names) + 1) + "|"]
    lines += [row(bucket, (f"{results[n]['buckets'][bucket]:.1f}" for n in names)) for bucket in order]
    lines.append(row("**sum**", (f"**{sum(results[n]['buckets'].values()):.1f}**" for n in names)))
    lines.append(row("wall time per lease (µs, under perf)", (f"{results[n]['wall_per_lease']:.1f}" for n in names)))
    for name in (n for n in names if n.startswith("safepool") and top):
        own = [(us, f) for (b, f), us in results[name]["functions"].items() if b == "safepool"]
        lines += ["", f"{name}'s own functions, top {top} (µs of CPU per lease):", ""]
        lines += [f"    {us:5.2f}  {function}" for us, function in sorted(own, reverse=True)[:top]]
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        kind, workload, seconds, dsn = sys.argv[2:6]
        print(json.dumps(asyncio.run(_child(kind, workload, float(seconds), dsn))))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dsn", help="the PostgreSQL to measure against (each pool opens 10 connections)")
    parser.add_argument("--workload", choices=("contended", "query"), default="contended",
                        help="contended: 100 tasks on max_size=10; query: one task (default contended)")
    parser.add_argument("--seconds", type=float, default=6.0, help="seconds of workload per pool (default 6)")
    parser.add_argument("--pools", default=",".join(POOLS), help=f"comma-separated, of {', '.join(POOLS)}")
    parser.add_argument("--repeat", type=int, default=3, help="runs per pool, interleaved; medians (default 3)")
    parser.add_argument("--top", type=int, default=15, help="safepool functions to list (default 15)")
    parser.add_argument("--python", default=sys.executable,
                        help="a Python 3.12+ that imports safepool and asyncpg (default: this one)")
    args = parser.parse_args()
    if shutil.which("perf") is None:
        parser.error("needs Linux perf on the PATH")
    version = subprocess.run([args.python, "-c", "import sys; print(sys.version_info >= (3, 12))"],
                             check=True, capture_output=True, text=True).stdout.strip()
    if version != "True":
        parser.error(f"{args.python} is older than 3.12 (no -X perf): pass --python")
    kinds = args.pools.split(",")
    runs: dict[str, list[dict[str, Any]]] = {kind: [] for kind in kinds}
    for _ in range(args.repeat):  # interleaved, so that a noisy minute hits every pool
        for kind in kinds:
            runs[kind].append(attribute(kind, args.workload, args.seconds, args.dsn, args.python))
    print(render({kind: _median(r) for kind, r in runs.items()}, args.top))


if __name__ == "__main__":
    main()
