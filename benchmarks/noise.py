"""A run's own noise: identical contenders, measured as the ratio benchmarks
measure (docs/performance.md, "The run's own noise").

    python -m benchmarks.noise DSN                  # four safepool pools
    python -m benchmarks.noise DSN --raw            # four raw connections (the floor's statements)
    python -m benchmarks.noise DSN --runs 5 --rounds 41

Each run opens ``--pools`` contenders that differ in nothing but their
connections (each its own server backend), times them interleaved in
rotating order (``_harness.measure_interleaved``: benchmark 2's query
lease, ``SELECT 1`` then the release's reset, or with ``--raw`` a raw
connection sending ``SELECT 1`` and asyncpg's reset query), and prints the
median paired ratio of each against the first: where they stray from 1.00x
is the noise a single run's ratios carry, whatever the number of rounds.
Prints one JSON object per run.
"""

from __future__ import annotations

import argparse
import asyncio
import json

from ._harness import Contender, measure_interleaved, paired_ratio
from ._workloads import Lease, RawConnection, safepool_pool


def run_once(dsn: str, contenders: int, rounds: int, leases: int, raw: bool) -> dict[str, object]:
    """One run: ``{"per_lease_us": [...], "vs_first": [...]}`` (the second
    list one shorter: each contender's median paired ratio to the first)."""
    measured: list[Contender] = []
    for index in range(contenders):
        contender: Contender
        if raw:
            contender = RawConnection(dsn, reset=True)
        else:
            contender = Lease("safepool", safepool_pool(dsn), query=True)
        contender.name = f"{contender.name} {index}"
        measured.append(contender)
    loop = asyncio.new_event_loop()
    try:
        m = measure_interleaved(loop, measured, rounds=rounds, sizes={c.name: leases for c in measured})
    finally:
        loop.close()
    first = m[measured[0].name]
    return {
        "per_lease_us": [round(m[c.name].median * 1e6, 1) for c in measured],
        "vs_first": [round(paired_ratio(m[c.name], first), 3) for c in measured[1:]],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dsn", help="the PostgreSQL to measure against")
    parser.add_argument("--pools", type=int, default=4, help="identical contenders per run (default 4)")
    parser.add_argument("--runs", type=int, default=3, help="runs, each with fresh contenders (default 3)")
    parser.add_argument("--rounds", type=int, default=21, help="interleaved rounds per run (default 21)")
    parser.add_argument("--leases", type=int, default=1000, help="leases per contender per round (default 1000)")
    parser.add_argument("--raw", action="store_true", help="raw connections instead of safepool pools")
    args = parser.parse_args()
    for _ in range(args.runs):
        print(json.dumps(run_once(args.dsn, args.pools, args.rounds, args.leases, args.raw)), flush=True)


if __name__ == "__main__":
    main()
