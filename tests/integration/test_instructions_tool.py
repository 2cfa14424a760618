"""benchmarks/instructions.py, the load-independent view of a lease's cost:
each workload runs on a real PostgreSQL, and under Valgrind (where it is
installed) a lease counts a plausible number of machine instructions."""

from __future__ import annotations

import shutil

import pytest

from benchmarks import instructions


@pytest.mark.asyncio
@pytest.mark.parametrize("workload", instructions.WORKLOADS)
async def test_every_workload_runs(pg_dsn: str, workload: str) -> None:
    await instructions._run(pg_dsn, workload, 100)


@pytest.mark.skipif(shutil.which("valgrind") is None, reason="valgrind is not installed")
@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_a_raw_select_counts_tens_of_thousands_of_instructions(pg_dsn: str, loop: str) -> None:
    # A raw SELECT 1 takes about 100,000 here (Python 3.11, asyncpg 0.32;
    # about 70,000 on uvloop): the bounds catch a count of the warm-up
    # alone, or of the whole process.
    assert 20_000 < instructions.per_lease(pg_dsn, "raw", 200, loop) < 1_000_000
