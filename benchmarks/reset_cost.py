"""What the reset round trip costs, and whether any statement with the same
effect costs less (docs/performance.md, "The reset round trip has no cheaper
equivalent").

    python -m benchmarks.reset_cost DSN [--rounds 31] [--batch 200]

On one raw asyncpg connection, each candidate runs ``--batch`` times per
round, the candidates interleaved round by round. Prints each candidate's
median µs per statement and the median of its per-round ratios against
asyncpg's reset query (the second round trip of every query lease in
``reset_mode="full"``, safepool's default, as on asyncpg's pool).
Candidates that drop a part of the reset are there to price that part; only
those that keep all four effects could replace it.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

import asyncpg

THE_THREE = "CLOSE ALL;\nUNLISTEN *;\nRESET ALL;"

# (label, statement, whether it has the reset's whole effect)
CANDIDATES = (
    ("asyncpg's reset query", "SELECT pg_advisory_unlock_all();\n" + THE_THREE, True),
    ("SELECT FROM pg_advisory_unlock_all(); + the other three", "SELECT FROM pg_advisory_unlock_all();\n" + THE_THREE,
     True),
    ("DO $$ ... PERFORM pg_advisory_unlock_all() ... $$; + the other three",
     "DO $$BEGIN PERFORM pg_advisory_unlock_all(); END$$;\n" + THE_THREE, True),
    ("CLOSE ALL; UNLISTEN *; RESET ALL (no unlock)", THE_THREE, False),
    ("RESET ALL alone", "RESET ALL", False),
    ("SELECT 1, simple query", "SELECT 1", False),
)


async def measure(dsn: str, rounds: int, batch: int) -> dict[str, list[float]]:
    """µs per statement, per round, for each candidate and for ``SELECT 1``
    as a prepared statement (``fetchval``)."""
    connection = await asyncpg.connect(dsn)
    try:
        times: dict[str, list[float]] = {label: [] for label, _, _ in CANDIDATES}
        times["SELECT 1, prepared (fetchval)"] = []
        for _ in range(rounds):
            for label, statement, _ in CANDIDATES:
                start = time.perf_counter()
                for _ in range(batch):
                    await connection.execute(statement)
                times[label].append((time.perf_counter() - start) / batch * 1e6)
            start = time.perf_counter()
            for _ in range(batch):
                await connection.fetchval("SELECT 1")
            times["SELECT 1, prepared (fetchval)"].append((time.perf_counter() - start) / batch * 1e6)
        return times
    finally:
        await connection.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dsn", help="a PostgreSQL DSN (one connection)")
    parser.add_argument("--rounds", type=int, default=31)
    parser.add_argument("--batch", type=int, default=200, help="statements per candidate per round")
    args = parser.parse_args()
    times = asyncio.run(measure(args.dsn, args.rounds, args.batch))
    reference = times[CANDIDATES[0][0]]
    whole = {label for label, _, keeps in CANDIDATES if keeps}
    for label, per_round in times.items():
        ratio = statistics.median(x / y for x, y in zip(per_round, reference, strict=True))
        mark = "" if label in whole else "  (not the whole reset)"
        print(f"{label:72s} {statistics.median(per_round):7.1f} µs  {ratio:.2f}x{mark}")


if __name__ == "__main__":
    main()
