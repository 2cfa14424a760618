"""The example of docs/getting-started.md, run by tests/integration/test_docs_examples.py."""

from __future__ import annotations

# --8<-- [start:quickstart]
import asyncio
import sys

import safepool


async def main(dsn: str) -> int:
    async with safepool.create_pool(
        dsn,
        name="app",  # shows up in logs, metrics and error messages
        min_size=2,
        max_size=10,
        acquire_timeout=5.0,  # fail a request after 5 s without a connection
        lease_timeout=30.0,  # take back a connection held longer than 30 s
        leak_warning_after=10.0,  # log where a connection held 10 s was acquired
    ) as pool:
        # One statement: the pool acquires and releases for you.
        answer = await pool.fetchval("SELECT 40 + 2")

        # Several statements on one connection.
        async with pool.acquire() as con:
            rows = await con.fetch("SELECT generate_series(1, $1) AS n", 3)

        print(pool.stats().acquired, "connections handed out")
        return int(answer) + len(rows)


if __name__ == "__main__":  # python quickstart.py postgresql://user:password@host/db
    print(asyncio.run(main(sys.argv[1])))
# --8<-- [end:quickstart]
