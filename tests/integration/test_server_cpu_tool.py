"""benchmarks/server_cpu.py, the two cores' budget of a contended lease: the
pools' backends are found and their CPU read, on a real PostgreSQL."""

from __future__ import annotations

import os

import pytest

import safepool
from benchmarks import server_cpu


def test_backend_cpu_reads_a_process_time_on_a_cpu() -> None:
    before = server_cpu.backend_cpu([os.getpid()])
    sum(range(2_000_000))
    assert server_cpu.backend_cpu([os.getpid()]) > before
    assert server_cpu.backend_cpu([2**22 + 1]) == 0.0  # (above the kernel's pid_max: no such process)


@pytest.mark.asyncio
async def test_server_pids_names_every_backend_of_a_pool_and_gives_the_connections_back(pg_dsn: str) -> None:
    async with safepool.create_pool(pg_dsn, min_size=0, max_size=server_cpu.MAX_SIZE) as pool:
        pids = await server_cpu.server_pids(pool)
        assert len(set(pids)) == server_cpu.MAX_SIZE
        listed = await pool.fetchval("SELECT array_agg(pid) FROM pg_stat_activity")
        assert set(pids) <= set(listed)
        assert pool.get_idle_size() == server_cpu.MAX_SIZE


def test_every_contender_is_measured(pg_dsn: str) -> None:
    result = server_cpu.measure(pg_dsn, rounds=1, leases_per_task=2)
    assert set(result) == {"asyncpg", "drop-in minimum", "safepool"}
    for figures in result.values():
        assert figures["wall_us"] > 0 and figures["client_cpu_us"] > 0
        assert figures["bound_us"] >= figures["client_cpu_us"]
        if "SAFEPOOL_TEST_DSN" not in os.environ:  # (the embedded server runs here: /proc sees its backends)
            assert figures["server_cpu_us"] > 0
