"""``python -m safepool top [DSN]``: options, the connection, the refresh loop,
and what the operator sees when something goes wrong.

Exit codes: 0 when done (``--once``, ``--count``, ``--json``); 2 for a bad
option, DSN or an unusable server, as one line on stderr without a traceback
and without the password; 130 on Ctrl-C.

Once the first snapshot is on screen, a failed refresh (the server restarts,
the network drops) does not end the live view: the last snapshot stays, with
the error above the table, and the next refresh reconnects. That is when the
view is needed most. ``--json`` fails fast instead: scripts want the exit code.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import signal
import sys
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

import asyncpg

from .render import render_plain, render_rich
from .snapshot import Snapshot, Thresholds, fetch

if TYPE_CHECKING:
    from rich.console import Console

from .._cli import Exit as _Exit
from .._cli import Parser as _Parser
from .._cli import UsageError as _UsageError
from .._cli import number as _cli_number
from .._cli import silence_stdout
from .._cli import usage_text as _usage_text
from .._secrets import redact
from .._secrets import scrub_quoted as _scrub_quoted
from .._secrets import split as _split
from .._secrets import widest_userinfo as _widest_userinfo

PROG = "python -m safepool top"
MIN_INTERVAL, MAX_INTERVAL = 0.01, 86_400.0  # seconds between refreshes
APPLICATION_NAME = "safepool top"
_CLEAR_SCREEN = "\x1b[H\x1b[2J"


class _Failure(Exception):
    """A message for the operator, already free of secrets."""


def _number(low: float, high: float, *, integer: bool = False, low_open: bool = False) -> Callable[[str], float]:
    kind = "an integer" if integer else "a number of seconds" if high == float("inf") else "a number"
    bound = f"> {low:g}" if low_open else f">= {low:g}"
    if high != float("inf"):
        bound += f" and <= {high:g}"
    return _cli_number(
        low, high, integer=integer, low_open=low_open, unparsable=f"expected {kind}", out_of_range=f"must be {bound}"
    )


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    parser = _Parser(
        prog=prog,
        description=(
            "A server's client connections grouped by application_name and state, from pg_stat_activity: "
            "counts, how long the oldest has been in its state, transaction and query ages, lock waits, "
            "and the total against max_connections. Alias: python -m safepool watch."
        ),
        epilog=(
            "Query text is never shown unless --show-queries is given. Prefer PGPASSWORD or ~/.pgpass "
            "to a password in the DSN (other users can read command lines). A role with pg_read_all_stats "
            "(or pg_monitor) sees every session; others see their own role's sessions in full."
        ),
    )
    parser.add_argument(
        "dsn",
        nargs="?",
        default=None,
        metavar="DSN",
        help="postgresql://user@host:port/database; without it, the PG* environment variables",
    )
    parser.add_argument(
        "-n",
        "--interval",
        # Bounded: a near-zero interval queries the server in a tight loop,
        # and an infinite one never refreshes (a day is the longest).
        type=_number(MIN_INTERVAL, MAX_INTERVAL),
        default=2.0,
        metavar="SECONDS",
        help=f"seconds between refreshes, {MIN_INTERVAL:g} to {MAX_INTERVAL:g} (default 2)",
    )
    runs = parser.add_mutually_exclusive_group()
    runs.add_argument("--once", action="store_true", help="print one snapshot and exit")
    runs.add_argument(
        "--count", type=_number(1, float("inf"), integer=True), default=None, metavar="N", help="stop after N refreshes"
    )
    parser.add_argument(
        "--json",
        action="store_true",
        help="one JSON object per snapshot, one per line (a single snapshot unless --count)",
    )
    parser.add_argument("--plain", action="store_true", help="plain text without colours (the default without rich)")
    parser.add_argument(
        "--show-queries",
        action="store_true",
        help="show the query of each group's oldest session, truncated (may contain secrets; the literal "
        "after PASSWORD and the passwords of connection strings inside literals are masked; comments are "
        "shown as they are)",
    )
    parser.add_argument(
        "--query-width",
        type=_number(10, 10_000, integer=True),
        default=80,
        metavar="CHARS",
        help="truncate queries to this many characters (default 80)",
    )
    parser.add_argument(
        "--idle-in-transaction-warn",
        type=_number(0, float("inf")),
        default=60.0,
        metavar="SECONDS",
        help="flag groups idle in transaction for at least this long: the signature of a leak (default 60)",
    )
    parser.add_argument(
        "--usage-warn",
        type=_number(0, 100, low_open=True),
        default=80.0,
        metavar="PERCENT",
        help="warn when connections reach this share of the slots open to ordinary roles (default 80)",
    )
    parser.add_argument(
        "--timeout",
        type=_number(0, float("inf"), low_open=True),
        default=5.0,
        metavar="SECONDS",
        help="to connect, and for each refresh's queries (default 5)",
    )
    return parser


# --- secrets ---------------------------------------------------------------


def describe_target(dsn: str | None) -> str:
    """``user@host:port/database`` from the DSN, without the password."""
    if not dsn:
        return "the server (PG* environment variables)"
    parts = _split(dsn)
    if parts is None:
        return "the server"
    userinfo, hostport, tail = parts
    if _widest_userinfo(dsn) != userinfo:
        # More than one unescaped "@": the host and database asyncpg reads
        # may be pieces of the password ("user:p@ss/word@host/db": host
        # "ss", database "word@host/db").
        return 'the server (the DSN has more than one "@": write one in a password as %40)'
    path, _, query = tail.partition("?")
    database = unquote(path.partition("#")[0].lstrip("/"))
    if not hostport:
        hosts = [value for key, _, value in (item.partition("=") for item in query.split("&")) if key == "host"]
        hostport = unquote(hosts[0]) if hosts else "localhost"
    user = unquote(userinfo.partition(":")[0])
    if hostport.startswith("/"):  # a Unix socket directory
        target = (f"{user}@" if user else "") + (database or "default database") + f" on socket {hostport}"
    else:
        target = (f"{user}@" if user else "") + hostport + (f"/{database}" if database else "")
    return redact(target, dsn)


def describe_error(exc: BaseException, dsn: str | None, timeout: float) -> str:
    """One line for the operator: what failed, where, and a hint when one helps."""
    target = describe_target(dsn)
    lines = str(exc).strip().splitlines()
    detail = _scrub_quoted(lines[0], dsn) if lines else type(exc).__name__
    if isinstance(exc, asyncpg.TooManyConnectionsError):
        message = (
            f"{target} refuses new connections: {detail} (a superuser can still connect through the reserved slots)"
        )
    elif isinstance(exc, asyncpg.InvalidAuthorizationSpecificationError | asyncpg.InvalidPasswordError):
        message = f"authentication failed for {target}: {detail}"
    elif isinstance(exc, asyncpg.PostgresError):
        message = f"{target}: {detail}"
    elif isinstance(exc, asyncpg.ClientConfigurationError | ValueError):
        message = detail if detail.startswith("invalid DSN") else f"invalid DSN: {detail}"
    elif isinstance(exc, TimeoutError):
        message = f"{target} did not answer within {timeout:g}s"
    elif isinstance(exc, OSError):
        message = f"cannot connect to {target}: {detail}"
    elif isinstance(exc, asyncpg.InterfaceError):
        message = f"connection to {target} failed: {detail}"
    else:
        message = f"{target}: {type(exc).__name__}: {detail}"
    return redact(message, dsn)


# --- the connection --------------------------------------------------------


class _Source:
    """One connection, opened on demand and dropped after a failed refresh,
    so the next refresh starts from a clean connection."""

    def __init__(self, args: argparse.Namespace, thresholds: Thresholds) -> None:
        self._args = args
        self._thresholds = thresholds
        self._con: asyncpg.Connection[Any] | None = None

    async def snapshot(self) -> Snapshot:
        args = self._args
        try:
            if self._con is None or self._con.is_closed():
                self._con = await asyncpg.connect(
                    args.dsn,
                    timeout=args.timeout,
                    command_timeout=args.timeout,
                    server_settings={"application_name": APPLICATION_NAME},
                    # Unnamed statements: behind PgBouncer in transaction
                    # mode a named one (asyncpg numbers them per process)
                    # collides with one an earlier run left on the same
                    # server connection; two queries per refresh need no cache.
                    statement_cache_size=0,
                )
            return await fetch(
                self._con, self._thresholds, show_queries=args.show_queries, query_width=args.query_width
            )
        except Exception as exc:
            self._drop()
            raise _Failure(describe_error(exc, args.dsn, args.timeout)) from None

    def _drop(self) -> None:
        if self._con is not None:
            self._con.terminate()
            self._con = None

    async def close(self) -> None:
        con, self._con = self._con, None
        if con is None or con.is_closed():
            return
        try:
            await con.close(timeout=min(self._args.timeout, 2.0))
        except Exception:  # a connection the server already dropped: nothing to tell the operator
            con.terminate()
        except BaseException:
            con.terminate()
            raise


# --- the loop --------------------------------------------------------------


async def _every(interval: float, count: int | None, step: Callable[[int], Awaitable[None]]) -> None:
    """Run ``step(i)`` ``count`` times (forever if None), ``interval`` apart, without drift."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    done = 0
    while True:
        await step(done)
        done += 1
        if count is not None and done >= count:
            return
        delay = start + done * interval - loop.time()
        if delay < 0:  # a slow refresh: start the schedule again from now
            start, delay = loop.time() - done * interval, 0.0
        await asyncio.sleep(delay)


def _rich_console() -> Console | None:
    if importlib.util.find_spec("rich") is None:
        return None
    from rich.console import Console

    return Console()


async def _run(args: argparse.Namespace) -> int:
    thresholds = Thresholds(idle_in_transaction=args.idle_in_transaction_warn, usage_warning=args.usage_warn / 100)
    count: int | None = 1 if args.once or (args.json and args.count is None) else args.count
    source = _Source(args, thresholds)
    try:
        if args.json:
            await _every(args.interval, count, lambda _: _print_json(source))
            return 0
        interval = None if count == 1 else args.interval
        console = None if args.plain else _rich_console()
        if console is None:
            await _plain_view(source, interval, count)
        elif console.is_terminal and count != 1:
            await _live_view(source, console, args.interval, count)
        else:
            await _stream_view(source, console, interval, count)
        return 0
    finally:
        await source.close()


async def _print_json(source: _Source) -> None:
    snapshot = await source.snapshot()
    sys.stdout.write(json.dumps(snapshot.to_dict()) + "\n")
    sys.stdout.flush()


def _refresh_failed(failure: _Failure) -> str:
    return f"refresh failed at {datetime.now():%H:%M:%S}: {failure}; retrying"


async def _next(source: _Source, last: Snapshot | None) -> tuple[Snapshot, str | None]:
    """The next snapshot, or the last one and the error: only the first refresh must succeed."""
    try:
        return await source.snapshot(), None
    except _Failure as failure:
        if last is None:
            raise
        return last, _refresh_failed(failure)


async def _plain_view(source: _Source, interval: float | None, count: int | None) -> None:
    clear = interval is not None and sys.stdout.isatty()
    last: Snapshot | None = None

    async def step(index: int) -> None:
        nonlocal last
        last, error = await _next(source, last)
        text = render_plain(last, interval)
        if error is not None:
            text = f"! {error}\n" + text
        if clear:
            text = _CLEAR_SCREEN + text
        elif index:
            text = "\n" + text
        sys.stdout.write(text)
        sys.stdout.flush()

    await _every(interval or 0.0, count, step)


async def _stream_view(source: _Source, console: Console, interval: float | None, count: int | None) -> None:
    last: Snapshot | None = None

    async def step(index: int) -> None:
        nonlocal last
        last, error = await _next(source, last)
        if index:
            console.print()
        console.print(render_rich(last, interval, error))

    await _every(interval or 0.0, count, step)


async def _live_view(source: _Source, console: Console, interval: float, count: int | None) -> None:
    from rich.live import Live

    last, _ = await _next(source, None)
    with Live(render_rich(last, interval), console=console, auto_refresh=False) as live:

        async def step(index: int) -> None:
            nonlocal last
            error = None
            if index:  # the first snapshot is already on screen
                last, error = await _next(source, last)
            live.update(render_rich(last, interval, error), refresh=True)

        await _every(interval, count, step)


_STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


async def _stoppable(view: Awaitable[int], stopped: list[int]) -> int:
    """``view``, cancelled by SIGTERM or SIGHUP (its number appended to
    ``stopped``) as Ctrl-C cancels it: the loop's signal handler cancels
    the task at its next await, so the live view is left in order (the
    cursor shown again, the connection closed). Outside the main thread
    (main() called from another thread) no handler can be installed."""
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None

    def stop(number: int) -> None:
        stopped.append(number)
        task.cancel()

    for number in _STOP_SIGNALS:
        try:
            loop.add_signal_handler(number, stop, number)
        except (ValueError, RuntimeError):  # (not the main thread)
            break
    return await view


def main(argv: list[str], prog: str = PROG) -> int:
    """Entry point of ``python -m safepool top`` and ``watch`` (``prog``: the
    command's name in usage and errors); returns the exit code."""
    try:
        args = build_parser(prog).parse_args(argv)
    except _UsageError as error:
        sys.stderr.write(f"{prog}: error: {_usage_text(error, argv)}\n")
        return 2
    except _Exit as done:
        return done.code
    # SIGTERM (kill, timeout, a supervisor) and SIGHUP (the terminal closed)
    # end the view as Ctrl-C does: the live view is left (the cursor shown
    # again, the connection closed), exit 128 + the signal's number. The
    # default handlers killed the process with rich's cursor still hidden.
    stopped: list[int] = []
    try:
        return asyncio.run(_stoppable(_run(args), stopped))
    except _Failure as failure:
        sys.stderr.write(f"{prog}: {failure}\n")
        return 2
    except asyncio.CancelledError:
        if not stopped:
            raise
        sys.stderr.write("\n")
        return 128 + stopped[0]
    except KeyboardInterrupt:
        sys.stderr.write("\n")
        return 130
    except BrokenPipeError:  # `... | head`: the reader has what it wanted
        silence_stdout()
        return 0

