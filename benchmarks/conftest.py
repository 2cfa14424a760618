"""Benchmark fixtures, the quick/full switch, and the ratio table's output.

Quick mode (the default) is the CI guard: it runs inside the normal
``pytest`` run in about a minute. Full mode (``--safepool-bench-full`` or
``SAFEPOOL_BENCH=full``) measures longer, turns pytest-benchmark on, and
writes ``benchmarks/results/latest.json`` (pytest-benchmark's JSON, not
committed), ``benchmarks/results/latest-<loop>.md`` and the table in
``docs/performance.md``.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from tests.conftest import pg_dsn, pg_server  # noqa: F401  (the same server fixtures as the tests)

from . import standings
from ._harness import (
    FULL,
    NOISE_MARGIN,
    QUICK,
    Mode,
    Row,
    guard_at,
    machine_info,
    render_markdown,
    render_text,
    wait_for_quiet,
    with_retry,
)
from .standings import Standings

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "benchmarks" / "results"
PERFORMANCE_DOC = ROOT / "docs" / "performance.md"
FULL_COMMAND = "python -m pytest benchmarks --safepool-bench-full"
QUICK_COMMAND = "python -m pytest benchmarks"

def begin_mark(loop: str) -> str:
    return f"<!-- benchmark results ({loop}): begin (written by the full mode; do not edit by hand) -->"


def end_mark(loop: str) -> str:
    return f"<!-- benchmark results ({loop}): end -->"



@dataclass
class Report:
    mode: Mode
    rows: list[Row] = field(default_factory=list)
    machine: dict[str, str] = field(default_factory=dict)
    started: float = field(default_factory=time.time)


_REPORT = pytest.StashKey[Report]()


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--safepool-bench-full",
        action="store_true",
        default=False,
        help="safepool benchmarks: long measurement; write benchmarks/results/ and docs/performance.md",
    )
    try:
        parser.addoption(
            "--loop",
            choices=("asyncio", "uvloop"),
            default="asyncio",
            help="event loop for the asyncio tests: asyncio's default loop (default) or uvloop",
        )
    except ValueError:
        pass  # tests/conftest.py added it: a run of both directories


def _mode(config: pytest.Config) -> Mode:
    if config.getoption("--safepool-bench-full", default=False) or os.environ.get("SAFEPOOL_BENCH") == "full":
        return FULL
    return QUICK


def pytest_configure(config: pytest.Config) -> None:
    mode = _mode(config)
    config.stash[_REPORT] = Report(mode)
    if mode is FULL:
        # pytest-benchmark reads these in its own (trylast) pytest_configure.
        config.option.benchmark_enable = True
        if getattr(config.option, "benchmark_json", None) is None:
            RESULTS_DIR.mkdir(parents=True, exist_ok=True)
            config.option.benchmark_json = RESULTS_DIR / "latest.json"


ON_A_WORKER = (
    "the benchmarks time the pools on a machine no test is loading, and a pytest-xdist worker shares it "
    f"with the others: run `{QUICK_COMMAND}` on its own, without -n (the README's test command runs them "
    "in its second run, `python -m pytest -m solo tests benchmarks`)"
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    benchmarks = [item for item in items if item.path.is_relative_to(Path(__file__).parent)]
    if hasattr(config, "workerinput"):  # a pytest-xdist worker: `pytest -n auto` with benchmarks in testpaths
        mark = pytest.mark.skip(reason=ON_A_WORKER)
    elif config.stash[_REPORT].mode is FULL:
        mark = pytest.mark.timeout(1800)
    else:
        return
    for item in benchmarks:
        item.add_marker(mark)


@dataclass
class Bench:
    """What a ratio benchmark needs: the loop, the server, the mode, and the
    table its rows go to."""

    loop: asyncio.AbstractEventLoop
    dsn: str = field(repr=False)  # a failing benchmark's traceback shows the Bench: never a password
    mode: Mode
    report: Report

    @property
    def loop_name(self) -> str:
        """``uvloop`` or ``asyncio``: the loop the ratios were measured on."""
        return "uvloop" if type(self.loop).__module__.startswith("uvloop") else "asyncio"

    @property
    def uvloop(self) -> bool:
        return self.loop_name == "uvloop"

    @cached_property
    def standings(self) -> Standings:
        """Where the guarded rows stand in quick runs on this machine's CPU
        and this run's loop (``benchmarks/standings.json``)."""
        return standings.for_machine(standings.cpu_model(), self.loop_name, probe_us=self.probe_us)

    @cached_property
    def probe_us(self) -> float:
        """This host's ``standings.interpreter_probe()``, µs, measured once
        per session before the first benchmark (it picks the standings)."""
        return standings.interpreter_probe()

    def target(self, target: float, standing: str) -> dict[str, Any]:
        """A row's ``target``, ``guard`` and ``standing`` keywords, for a row
        with an issue-14 target: guarded where the row keyed ``standing``
        stands on this machine and loop plus the margin (``guard_at``)."""
        return {"target": target, "guard": guard_at(target, self.standings[standing]), "standing": standing}

    def standing_guard(self, standing: str) -> dict[str, Any]:
        """A row's ``target``, ``guard`` and ``standing`` keywords, for a row
        with no target of its own that guards a targeted row whose ratio
        moves with the host (row 1): guarded where it stands plus the margin."""
        return {"target": None, "guard": round(self.standings[standing] * (1 + NOISE_MARGIN), 3), "standing": standing}

    def check(self, measure: Callable[[], list[Row]]) -> None:
        """Measure (retrying twice in quick mode while a guard fails), record the
        rows for the table, and fail if any ratio is past its guard."""
        rows = with_retry(self.mode, measure)
        self.report.rows.extend(rows)
        # python -m benchmarks.standings: the rows it takes medians of
        _record_for_standings(*({"standing": row.standing, "first": row.attempts[0]}
                                for row in rows if row.standing is not None))
        failed = [row for row in rows if row.failed]
        assert not failed, "benchmark ratios past their guard:\n" + "\n".join(
            f"  {row.bench}: {row.metric} = {row.value:.3f} > guard {row.guard} ({row.detail}; attempts {row.attempts}; "
            f"CPU time stolen by the hypervisor in each {row.steal})"
            for row in failed
        )


@pytest.fixture(scope="session")
def bench_loop(pytestconfig: pytest.Config) -> Iterator[asyncio.AbstractEventLoop]:
    # A plain loop, not pytest-asyncio's: pytest-benchmark times sync calls,
    # so every batch is loop.run_until_complete(...). --loop uvloop: uvloop's.
    if pytestconfig.getoption("--loop") == "uvloop":
        import uvloop

        loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    else:
        loop = asyncio.new_event_loop()
    try:
        yield loop
    finally:
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()


@pytest.fixture(scope="session")
def bench_mode(pytestconfig: pytest.Config) -> Mode:
    return pytestconfig.stash[_REPORT].mode


@pytest.fixture(scope="session")
def bench(pytestconfig: pytest.Config, bench_loop: asyncio.AbstractEventLoop, pg_dsn: str) -> Bench:  # noqa: F811
    report = pytestconfig.stash[_REPORT]

    async def server_version() -> str:
        con = await asyncpg.connect(pg_dsn)
        try:
            return str(await con.fetchval("SHOW server_version"))
        finally:
            await con.close()

    bench = Bench(bench_loop, pg_dsn, report.mode, report)
    if not report.machine:
        version = bench_loop.run_until_complete(server_version())
        busy, waited = wait_for_quiet(max_wait=120.0)
        report.machine = machine_info(version)
        report.machine["other processes at start"] = (
            "?" if busy is None else f"{busy} CPUs busy after waiting {waited:.0f} s (at most 120) for under 0.3")
        report.machine["event loop"] = bench.loop_name
        report.machine["interpreter probe"] = f"sum(range(1000)) {bench.probe_us} µs"
        report.machine["guards"] = bench.standings.note
        _record_for_standings({"probe_us": bench.probe_us})  # each run's probe, with its rows
    return bench


def _record_for_standings(*lines: dict[str, Any]) -> None:
    """Append ``lines`` as JSON lines to the file ``python -m
    benchmarks.standings`` named in ``standings.ROWS_ENV``; nothing without it."""
    record = os.environ.get(standings.ROWS_ENV)
    if record:
        with open(record, "a") as out:
            out.writelines(json.dumps(line) + "\n" for line in lines)


# ------------------------------------------------------------------ output


def _results_markdown(report: Report) -> str:
    machine = "\n".join(f"| {key} | {value} |" for key, value in report.machine.items())
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(report.started))
    return (
        f"Measured {when}, {report.mode.name} mode, with `{FULL_COMMAND}`.\n\n"
        f"| machine | |\n|---|---|\n{machine}\n\n"
        f"{render_markdown(report.rows)}\n"
        f"Lower is better in every row. Guard: where the row stands in quick runs on this loop + "
        f"{NOISE_MARGIN:.0%}, met or missed (scaling and memory: the target + {NOISE_MARGIN:.0%}, or the "
        "target; rows without a target are reported, not guarded). Absolute numbers are medians over rounds; see docs/performance.md.\n"
    )


def _write_results(report: Report) -> list[Path]:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    loop = report.machine.get("event loop", "asyncio")
    latest = RESULTS_DIR / f"latest-{loop}.md"
    body = _results_markdown(report)
    latest.write_text(f"# Latest full benchmark run ({loop})\n\n" + body)
    written = [latest]
    if PERFORMANCE_DOC.exists():
        text = PERFORMANCE_DOC.read_text()
        begin, end_ = begin_mark(loop), end_mark(loop)
        start, end = text.find(begin), text.find(end_)
        if 0 <= start < end:
            PERFORMANCE_DOC.write_text(text[: start + len(begin)] + "\n" + body + text[end:])
            written.append(PERFORMANCE_DOC)
    return written


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> Iterator[None]:
    # A full-mode run of some ratio benchmarks only (-k test_2) timed nothing
    # with pytest-benchmark, which would then warn that it has nothing to
    # save, and the suite's filterwarnings=error makes that fail the run.
    # (A wrapper that runs first: pytest-benchmark saves in its own wrapper.)
    benchmarks = getattr(session.config, "_benchmarksession", None)
    if benchmarks is not None and not benchmarks.benchmarks:
        benchmarks.json = None
    yield


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    report = config.stash.get(_REPORT, None)
    if report is None or not report.rows:
        return
    terminalreporter.write_sep("=", f"safepool benchmark ratios ({report.mode.name} mode)")
    terminalreporter.write_line(" | ".join(f"{key}: {value}" for key, value in report.machine.items()))
    for line in render_text(report.rows).splitlines():
        terminalreporter.write_line(line)
    complete = len({row.bench.split()[0] for row in report.rows}) == 7
    if report.mode is FULL and complete:
        for path in _write_results(report):
            terminalreporter.write_line(f"wrote {path.relative_to(ROOT)}")
    elif report.mode is FULL:
        terminalreporter.write_line("not all seven benchmarks ran: results files left unchanged")


def pytest_benchmark_update_json(config: pytest.Config, benchmarks: Any, output_json: dict[str, Any]) -> None:
    report = config.stash.get(_REPORT, None)
    if report is not None:
        output_json["safepool_ratios"] = [
            {k: getattr(row, k) for k in ("bench", "metric", "value", "target", "guard", "detail", "unit", "attempts")}
            for row in report.rows
        ]
        output_json["safepool_machine"] = report.machine
