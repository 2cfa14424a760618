"""benchmarks/instructions.py, the load-independent view of a lease's cost:
each workload runs on a real PostgreSQL, and under Valgrind (where it is
installed) a lease counts a plausible number of machine instructions."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from benchmarks import instructions


@pytest.mark.asyncio
@pytest.mark.parametrize("workload", instructions.WORKLOADS)
async def test_every_workload_runs(pg_dsn: str, workload: str) -> None:
    await instructions._run(pg_dsn, workload, 100)


@pytest.mark.skipif(shutil.which("valgrind") is None, reason="valgrind is not installed")
def test_a_raw_select_counts_tens_of_thousands_of_instructions(pg_dsn: str) -> None:
    # A raw SELECT 1 takes about 100,000 here (Python 3.11, asyncpg 0.32):
    # the bounds catch a count of the warm-up alone, or of the whole
    # process. Two Python start-ups under Valgrind take about 40 s of the
    # suite's CPU; the uvloop child is run without it (below).
    assert 20_000 < instructions.per_lease(pg_dsn, "raw", 200) < 1_000_000


def test_the_uvloop_child_runs_its_leases_on_uvloop(pg_dsn: str) -> None:
    # What Valgrind runs for --loop uvloop, without Valgrind: the child must
    # run its leases to the end on uvloop's loop (it prints the loop's class).
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.instructions", "--child", "raw", "--leases", "5",
         "--loop", "uvloop", "--say-loop", pg_dsn],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "uvloop.Loop"
