#!/usr/bin/env python3
"""The version matrix: safepool's suites on every supported Python x asyncpg.

Usage: python3 .ci/matrix.py        (from .ci/run, after the README test command)

Each cell runs safepool's suites on asyncio with one Python and one pinned
asyncpg: the unit, io, compat and fault-storm suites (``CELL_SUITES``) on a
diagonal that meets every Python and every asyncpg, the compat suite but
its drop-in file elsewhere; one more cell runs on uvloop, with the newest pair, what
depends on the loop (``UVLOOP_SUITES``: the io and compat suites, the
cancellation storms, the reset and lease suites). At the end it
prints the table (rows Python, columns asyncpg; cells passed/failed/skipped
and wall time) and exits non-zero if any cell failed.

Environments live in .ci/.venvs/ (git-ignored) and are reused while nothing
they were built from changed:

- ``py3.X/``: one venv per Python with ``pip install -e '.[test]'``; rebuilt
  when pyproject.toml, the interpreter or this script's ``LAYOUT`` changes
  (a hash of them sits in ``py3.X/.matrix-stamp``).
- ``py3.X/asyncpg-V/``: the pinned asyncpg alone (``pip install --no-deps
  --target``), put first on PYTHONPATH for that cell, so the cells of one
  Python share the venv and differ only in asyncpg.

A time budget: .ci/run sets SAFEPOOL_CI_DEADLINE (seconds since the epoch)
so that it stays under 15 minutes on a slow host. A cell that would start
with less left than it takes (``Cell.min_seconds``) is not started, so a
short budget goes to the short cells. A cell still running at the deadline
is interrupted (SIGINT: pytest writes the report of the tests that ran); a
failure among those fails the cell, else the cell is reported as cut by the
budget (the table says "budget"; it does not fail the run). A
failed test is not run again with under ``RERUN_MIN_SECONDS`` left: its
failure stands. Cells start in the order of their worth (``rank``), so a
slow day cuts the off-diagonal cells first. If the budget cut every cell,
the run says so loudly.

Knobs (environment): SAFEPOOL_MATRIX_JOBS (cells at once, default 3: see
docs/compatibility.md for the measurement), SAFEPOOL_MATRIX_PYTHONS and
SAFEPOOL_MATRIX_ASYNCPG (comma-separated subsets, e.g. "3.13" / "0.29.0"),
SAFEPOOL_MATRIX_UVLOOP=0 (skip the uvloop cell).
"""

from __future__ import annotations

import concurrent.futures
import glob
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

PYTHONS = ("3.11", "3.12", "3.13")
ASYNCPG = ("0.29.0", "0.30.0", "0.31.0", "0.32.0")
# The fault-storm suite (cancellation storms: where asyncpg's internals
# matter most) with the unit, io and compat suites on the diagonal (below);
# the whole fault suite runs in the README run
# (newest pair) and in the uvloop cell. Keeps .ci/run under 15 minutes.
CELL_SUITES = (
    "tests/unit", "tests/io", "tests/compat", "tests/faults/test_cancellation.py",
    # (How each asyncpg tells the pool of a terminate(): 0.32 through its
    # holder later, 0.29-0.31 from terminate()'s own cleanup; about 1 s.)
    "tests/faults/test_abort_mid_statement.py",
    # What safepool let reach the loop's exception handler, or hang, under
    # faults with asyncpg < 0.32 (reviews h234 and h236; about 8 s), and three cells
    # of the cancellation matrix that fail there without its fix (a setup
    # hook cancelled twice: about 3 s; the whole matrix takes minutes).
    "tests/faults/test_review_h234_loop_errors.py", "tests/faults/test_review_h236.py",
    # (A lease's ROLLBACK awaiting asyncpg < 0.32's cancellation futures once
    # the pool closed its connection: review h253; about 4 s.)
    "tests/integration/test_review_h253_rollback_hang.py",
    # (A connection_class's close() statements and the pool's late cancel
    # request; the close's budget differs before 0.32: review h257; about 9 s.)
    "tests/integration/test_review_h257_close_runs_statement.py",
    "tests/faults/test_cancel_matrix.py::test_tiny_budgets[setup-anyio_deadline]",
    "tests/faults/test_cancel_matrix.py::test_cancel_matrix[setup_lock-cancel_twice_spaced-cancel_then_unblock]",
    "tests/faults/test_cancel_matrix.py::test_cancel_matrix[setup_event-anyio_scope-cancel_then_unblock]",
)
# The io sweep (every suspension point, cancelled five ways) is a cell's
# longest suite: 25-55 s on the 2-core CI machine. In the full matrix the
# whole CELL_SUITES run on a diagonal, one Python per older asyncpg, so every
# asyncpg and every Python meets each suite; the newest asyncpg gets them
# from the README run (the whole suite) and the uvloop cell. The other cells
# run the compat suite without its drop-in file (OFF_DIAGONAL_SUITES:
# asyncpg's own pool tests, the parity tests and random programs, the ORM
# findings; the drop-in suite, 10-13 s a cell, meets every Python and every
# asyncpg on the diagonal), which keeps .ci/run under 15 minutes
# (docs/compatibility.md).
DIAGONAL = {("3.11", "0.29.0"), ("3.12", "0.30.0"), ("3.13", "0.31.0")}
OFF_DIAGONAL_SUITES = (
    "tests/compat/test_asyncpg_suite.py",
    "tests/compat/test_parity.py",
    "tests/compat/test_parity_fuzz.py",
    "tests/compat/test_orm_findings.py",
)
# On uvloop, what depends on the loop: cancellation (every await point, and
# the storms on a real server), the reset driver and lease timers, and the
# compat suite. The server-side fault suites (restart, network faults) and
# the other integration suites run in the README's command (asyncio).
UVLOOP_SUITES = (
    "tests/io",
    "tests/compat",
    "tests/faults/test_cancellation.py",
    "tests/integration/test_reset.py",
    "tests/integration/test_reset_auto.py",
    "tests/integration/test_leases.py",
)
# Pairs that asyncpg itself does not support: shown, not run.
UNSUPPORTED = {("3.13", "0.29.0"): "asyncpg 0.29 has no Python 3.13 build (wheels up to 3.12, Cython 0.29)"}
CELL_TIMEOUT = 900  # s; a cell takes 1-2 minutes
# A cell starts only with at least this much left before the CI deadline:
# about what it took beside two other cells and the ORM suites on the slow
# host of 2026-12-02 (the off-diagonal cells 42-84 s, the uvloop cell 174 s,
# the diagonal's 222-244 s), so that a short budget goes to cells that can
# finish in it instead of to cells it would stop half-way.
MIN_CELL_SECONDS = 60.0  # the off-diagonal cells (OFF_DIAGONAL_SUITES)
MIN_UVLOOP_CELL_SECONDS = 150.0
MIN_DIAGONAL_CELL_SECONDS = 180.0
RERUN_MIN_SECONDS = 30.0  # a failed test is not run again with less left: its failure stands
MAX_RERUNS = 3  # a cell with more failures than this is not run again
LAYOUT = "1"  # bump to rebuild every cached venv

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / ".ci" / ".venvs"
LOGS = CACHE / "logs"
_print_lock = threading.Lock()


def say(message: str) -> None:
    with _print_lock:
        print(f"matrix: {message}", flush=True)


@dataclass
class Cell:
    python: str
    asyncpg: str
    suites: tuple[str, ...] = CELL_SUITES
    loop: str = "asyncio"
    passed: int = 0
    failed: int = 0
    skipped: int = 0
    seconds: float = 0.0
    status: str = "pending"  # pending, ok, failed, error, n/a, readme, budget
    note: str = ""
    log: Path = field(default_factory=Path)
    flaky: list[str] = field(default_factory=list)  # failed, then passed when run again

    @property
    def min_seconds(self) -> float:
        """The time left before the CI deadline this cell needs to start."""
        if self.suites == OFF_DIAGONAL_SUITES:
            return MIN_CELL_SECONDS
        return MIN_UVLOOP_CELL_SECONDS if self.loop != "asyncio" else MIN_DIAGONAL_CELL_SECONDS

    @property
    def name(self) -> str:
        loop = "" if self.loop == "asyncio" else f"-{self.loop}"
        return f"py{self.python}-asyncpg{self.asyncpg}{loop}"

    def text(self) -> str:
        if self.status == "n/a":
            return "n/a"
        if self.status == "readme":
            return "README run"
        if self.status == "budget":
            return f"budget ({self.seconds:.0f}s)" if self.seconds else "budget (not run)"
        if self.status == "error":
            return f"ERROR ({self.note})"
        mark = "" if self.status == "ok" else "FAIL "
        rerun = f" ({len(self.flaky)} rerun)" if self.flaky else ""
        return f"{mark}{self.passed}/{self.failed}/{self.skipped} {self.seconds:.0f}s{rerun}"


def find_python(version: str) -> str | None:
    """The interpreter for ``version`` (e.g. "3.12"): pyenv's versions first,
    then ``python3.12`` on PATH; None when there is none that runs."""
    roots = [os.environ.get("PYENV_ROOT", ""), str(Path.home() / ".pyenv")]
    candidates = []
    for root in filter(None, roots):
        found = sorted(glob.glob(f"{root}/versions/{version}.*/bin/python{version}"), reverse=True)
        candidates += [c for c in found if Path(c).parent.parent.name.replace(".", "").isdigit()]
    on_path = shutil.which(f"python{version}")
    if on_path:
        candidates.append(on_path)
    for candidate in candidates:
        check = subprocess.run(
            [candidate, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
            capture_output=True, text=True,
        )
        if check.returncode == 0 and check.stdout.strip() == version:
            return candidate
    return None


def deadline() -> float:
    """SAFEPOOL_CI_DEADLINE (seconds since the epoch), or infinity."""
    return float(os.environ.get("SAFEPOOL_CI_DEADLINE") or "inf")


def left() -> float:
    """Seconds until the CI deadline (infinity without one)."""
    return deadline() - time.time()


STOPPED = -2  # run_logged's status for a run interrupted at its timeout (interrupt_first)
INTERRUPT_GRACE = 20.0  # s a pytest run interrupted at the deadline gets to write its report


def run_logged(
    cmd: list[str], log: Path, *, env: dict[str, str] | None = None, timeout: float, interrupt_first: bool = False
) -> int:
    """Run ``cmd`` with its output appended to ``log``; on timeout, kill its
    process group (-9). With ``interrupt_first``, send SIGINT first and wait
    up to ``INTERRUPT_GRACE`` seconds: pytest then stops as after Ctrl-C and
    still writes its JUnit report of the tests that ran (``STOPPED``)."""
    with open(log, "a") as out:
        out.write(f"$ {' '.join(cmd)}\n")
        out.flush()
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            status = -9
            if interrupt_first:
                os.killpg(proc.pid, signal.SIGINT)
                try:
                    proc.wait(timeout=INTERRUPT_GRACE)
                    status = STOPPED
                except subprocess.TimeoutExpired:
                    pass
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # (and whatever it left behind in its group)
            except ProcessLookupError:
                pass
            proc.wait()
            out.write(f"\nmatrix: {'interrupted' if status == STOPPED else 'killed'} after {timeout:.0f} s\n")
            return status


def stamp_of(python: str) -> str:
    version = subprocess.run([python, "-c", "import sys; print(sys.version)"], capture_output=True, text=True).stdout
    digest = hashlib.sha256()
    for part in (LAYOUT, version, str(ROOT), (ROOT / "pyproject.toml").read_text()):
        digest.update(part.encode() + b"\0")
    return digest.hexdigest()


def ensure_venv(version: str) -> Path:
    """The cached venv for ``version`` with safepool[test], built if stale."""
    python = find_python(version)
    if python is None:
        raise RuntimeError(f"no Python {version} found (pyenv versions or python{version} on PATH)")
    venv = CACHE / f"py{version}"
    stamp_file = venv / ".matrix-stamp"
    stamp = stamp_of(python)
    if stamp_file.exists() and stamp_file.read_text() == stamp and (venv / "bin" / "python").exists():
        return venv
    say(f"building {venv.relative_to(ROOT)} (Python {version})")
    shutil.rmtree(venv, ignore_errors=True)
    log = LOGS / f"venv-py{version}.log"
    log.unlink(missing_ok=True)
    started = time.monotonic()
    if run_logged([python, "-m", "venv", str(venv)], log, timeout=300) != 0 or run_logged(
        [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "-e", ".[test]"], log, timeout=1200
    ) != 0:
        raise RuntimeError(f"installing safepool[test] on Python {version} failed; see {log}")
    stamp_file.write_text(stamp)
    say(f"built {venv.relative_to(ROOT)} in {time.monotonic() - started:.0f} s")
    return venv


def ensure_asyncpg(venv: Path, version: str) -> Path:
    """A directory holding asyncpg ``version`` alone, for PYTHONPATH."""
    target = venv / f"asyncpg-{version}"
    done = target / ".matrix-complete"
    if done.exists():
        return target
    shutil.rmtree(target, ignore_errors=True)
    log = LOGS / f"{venv.name}-asyncpg{version}-install.log"
    log.unlink(missing_ok=True)
    cmd = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-deps", "--only-binary", "asyncpg",
           "--target", str(target), f"asyncpg=={version}"]
    if run_logged(cmd, log, timeout=600) != 0:
        shutil.rmtree(target, ignore_errors=True)
        raise RuntimeError(f"no installable asyncpg {version} for {venv.name} (see {log.relative_to(ROOT)})")
    done.write_text(version)
    return target


def fetch_asyncpg_sources(versions: tuple[str, ...]) -> None:
    """asyncpg's own tests for the compat suite, from each release's source
    distribution, into its cache (tests/compat/asyncpg_suite.py), fetched
    with this interpreter: pip builds an sdist's metadata on download, which
    on a Python that asyncpg's pinned Cython has no wheel for means compiling
    Cython in every cell."""
    log = LOGS / "asyncpg-sources.log"
    log.unlink(missing_ok=True)
    cmd = [sys.executable, str(ROOT / "tests" / "compat" / "asyncpg_suite.py"), "--fetch", *versions]
    if run_logged(cmd, log, timeout=900) != 0:
        say(f"could not fetch every asyncpg source distribution (see {log.relative_to(ROOT)})")


def junit_failures(path: Path) -> list[str]:
    """Node ids of the failed tests in a JUnit XML report."""
    failed = []
    for case in ET.parse(path).getroot().iter("testcase"):
        if case.find("failure") is None and case.find("error") is None:
            continue
        parts = (case.get("classname") or "").split(".")
        for cut in range(len(parts), 0, -1):  # the module is the longest prefix that is a file
            if (ROOT / Path(*parts[:cut])).with_suffix(".py").is_file():
                failed.append("::".join(["/".join(parts[:cut]) + ".py", *parts[cut:], case.get("name", "")]))
                break
        else:
            return []  # not mapped back to a node id: no rerun
    return failed


def junit_counts(path: Path) -> tuple[int, int, int]:
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    tests = failed = skipped = 0
    for suite in suites:
        tests += int(suite.get("tests", 0))
        failed += int(suite.get("failures", 0)) + int(suite.get("errors", 0))
        skipped += int(suite.get("skipped", 0))
    return tests - failed - skipped, failed, skipped


def run_cell(cell: Cell, venv: Path, overlay: Path) -> None:
    cell.log = LOGS / f"{cell.name}.log"
    cell.log.unlink(missing_ok=True)
    xml = LOGS / f"{cell.name}.xml"
    xml.unlink(missing_ok=True)
    # The hypothesis model of the core (pure Python, the same on every
    # asyncpg) runs its full 600 examples in the README's test command; a
    # cell runs 100, to keep .ci/run under 15 minutes; so too the random
    # programs of the differential parity test (40 there, 5 here: each
    # cell its own seeds, past the README command's, so the matrix adds
    # programs instead of repeating them).
    place = PYTHONS.index(cell.python) * len(ASYNCPG) + ASYNCPG.index(cell.asyncpg)
    place += (cell.loop != "asyncio") * len(PYTHONS) * len(ASYNCPG)
    env = {
        **os.environ, "PYTHONPATH": str(overlay), "SAFEPOOL_MODEL_EXAMPLES": "100", "SAFEPOOL_PARITY_PROGRAMS": "5",
        "SAFEPOOL_PARITY_FIRST": str(40 + 5 * place),
    }
    env.pop("VIRTUAL_ENV", None)
    # A short, private --basetemp: pytest's default (/tmp/pytest-of-USER/pytest-N/, N growing with every
    # session on the machine) can push a test's embedded PostgreSQL socket path past the 107-byte limit.
    basetemp = tempfile.mkdtemp(prefix="spm-")
    pytest = [str(venv / "bin" / "python"), "-m", "pytest", "-q", f"--loop={cell.loop}", "-o", "junit_family=xunit2",
              f"--basetemp={basetemp}"]
    cmd = [*pytest, *cell.suites, f"--junitxml={xml}"]
    say(f"{cell.name}: running {' '.join(cell.suites)} on {cell.loop}")
    started = time.monotonic()
    limit = min(CELL_TIMEOUT, left())
    budgeted = limit < CELL_TIMEOUT  # a timeout now is the CI deadline's, not the cell's own
    rc = run_logged(cmd, cell.log, env=env, timeout=limit, interrupt_first=budgeted)
    cell.seconds = time.monotonic() - started
    if budgeted and rc in (STOPPED, -9):
        # Stopped at the deadline: the tests that finished still count. A
        # failure among them fails the cell (a regression that slows a cell
        # down must not hide behind the budget); none, and the cell was cut.
        shutil.rmtree(basetemp, ignore_errors=True)
        if xml.exists():
            cell.passed, cell.failed, cell.skipped = junit_counts(xml)
        if cell.failed:
            cell.status, cell.note = "failed", f"{cell.failed} failed before the CI deadline stopped the cell"
        else:
            cell.status = "budget"
            cell.note = f"stopped at the CI deadline after {cell.seconds:.0f} s, {cell.passed} passed until then"
        say(f"{cell.name}: {cell.note}")
        if cell.status == "failed":
            show_log_tail(cell)
        return
    if xml.exists():
        cell.passed, cell.failed, cell.skipped = junit_counts(xml)
        failed = junit_failures(xml) if rc == 1 else []
        if failed and left() < RERUN_MIN_SECONDS:
            cell.note = f"no rerun of its {len(failed)} failed test(s): under {RERUN_MIN_SECONDS:.0f} s left"
            say(f"{cell.name}: {cell.note}")
        elif failed and len(failed) <= MAX_RERUNS:
            # Timing-sensitive tests on a shared machine: run the failed ones
            # once more; the table says how many passed only then.
            rerun_xml = LOGS / f"{cell.name}-rerun.xml"
            rerun_xml.unlink(missing_ok=True)
            say(f"{cell.name}: {len(failed)} failed, running them again: {' '.join(failed)}")
            rerun = [*pytest, *failed, f"--junitxml={rerun_xml}"]
            rerun_rc = run_logged(rerun, cell.log, env=env, timeout=min(CELL_TIMEOUT, left()))
            if rerun_rc == 0:
                cell.flaky = failed
                cell.passed += len(failed)
                cell.failed = 0
                rc = 0
            cell.seconds = time.monotonic() - started
    shutil.rmtree(basetemp, ignore_errors=True)
    if rc == 0 and cell.passed > 0:
        cell.status = "ok"
    elif xml.exists() and (cell.failed or rc != 0):
        cell.status = "failed"
        cell.failed = max(cell.failed, 1)
    else:
        cell.status, cell.note = "error", f"pytest exit {rc}"
    say(f"{cell.name}: {cell.status}, {cell.passed} passed, {cell.failed} failed, {cell.skipped} skipped "
        f"in {cell.seconds:.0f} s")
    if cell.status != "ok":
        show_log_tail(cell)


def show_log_tail(cell: Cell) -> None:
    """Print the last 40 lines of a cell's log (a cell that did not pass)."""
    tail = cell.log.read_text(errors="replace").splitlines()[-40:]
    with _print_lock:
        print(f"---- {cell.log.relative_to(ROOT)} (last 40 lines)", *tail, "----", sep="\n", flush=True)


def selected(env_name: str, default: tuple[str, ...]) -> tuple[str, ...]:
    raw = os.environ.get(env_name, "").strip()
    return tuple(v.strip() for v in raw.split(",") if v.strip()) if raw else default


def table(cells: list[Cell], pythons: tuple[str, ...], versions: tuple[str, ...]) -> str:
    by_key = {(c.python, c.asyncpg, c.loop): c for c in cells}
    header = ["Python \\ asyncpg", *versions]
    rows = [header]
    rows += [[python, *(by_key[(python, v, "asyncio")].text() for v in versions)] for python in pythons]
    for cell in cells:
        if cell.loop != "asyncio":
            row = [f"{cell.python} {cell.loop}*"] + ["" for _ in versions]
            row[1 + versions.index(cell.asyncpg)] = cell.text()
            rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["| " + " | ".join(r[i].ljust(widths[i]) for i in range(len(header))) + " |" for r in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def prepare() -> int:
    """``--prepare``: build the venvs and asyncpg overlays and fetch asyncpg's
    sources, run nothing. .ci/run starts it in the background while the
    README's test command runs, and the matrix then finds them cached."""
    pythons = selected("SAFEPOOL_MATRIX_PYTHONS", PYTHONS)
    versions = selected("SAFEPOOL_MATRIX_ASYNCPG", ASYNCPG)
    LOGS.mkdir(parents=True, exist_ok=True)
    fetch_asyncpg_sources(versions)
    status = 0
    for python in reversed(pythons):
        try:
            venv = ensure_venv(python)
            for version in versions:
                if (python, version) not in UNSUPPORTED:
                    ensure_asyncpg(venv, version)
        except RuntimeError as error:
            say(f"prepare: {error}")  # the matrix run reports it again, per cell
            status = 1
    return status


def main() -> int:
    if sys.argv[1:] == ["--prepare"]:
        return prepare()
    pythons = selected("SAFEPOOL_MATRIX_PYTHONS", PYTHONS)
    versions = selected("SAFEPOOL_MATRIX_ASYNCPG", ASYNCPG)
    jobs = max(1, int(os.environ.get("SAFEPOOL_MATRIX_JOBS", "3")))
    uvloop = os.environ.get("SAFEPOOL_MATRIX_UVLOOP", "1") != "0"
    LOGS.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()

    cells = [Cell(p, v) for p in pythons for v in versions]
    # .ci/run passes the pair its README command ran on ("3.11/0.32.0"), read
    # from the project's venv rather than assumed: pyproject.toml bounds
    # asyncpg from below only, so a newer release there must not stand in
    # for the newest pinned one's cell.
    ran = os.environ.get("SAFEPOOL_MATRIX_README_RAN", "")
    ran_pair = tuple(ran.split("/", 1))
    readme_ran = any((c.python, c.asyncpg) == ran_pair for c in cells)
    readme_pair = ran_pair if readme_ran else (f"{sys.version_info.major}.{sys.version_info.minor}", versions[-1])
    for cell in cells:
        if (cell.python, cell.asyncpg) in UNSUPPORTED:
            cell.status, cell.note = "n/a", UNSUPPORTED[(cell.python, cell.asyncpg)]
        elif (cell.python, cell.asyncpg) == readme_pair and readme_ran:
            # .ci/run's README command ran the whole suite on this pair already.
            cell.status, cell.note = "readme", "the README command ran the whole suite on this pair"
    # The newest asyncpg meets every suite in the README command's run; a
    # matrix run without it (python3 .ci/matrix.py alone) runs them on that
    # pair itself.
    full = DIAGONAL if readme_ran or readme_pair[0] not in pythons else DIAGONAL | {readme_pair}
    if pythons == PYTHONS and versions == ASYNCPG:  # a subset run keeps every suite in every cell
        for cell in cells:
            if (cell.python, cell.asyncpg) not in full:
                cell.suites = OFF_DIAGONAL_SUITES
    if uvloop:
        cells.append(Cell(pythons[-1], versions[-1], suites=UVLOOP_SUITES, loop="uvloop"))

    overlay_locks = {(c.python, c.asyncpg): threading.Lock() for c in cells}

    def run(cell: Cell, venv_future: concurrent.futures.Future[Path]) -> None:
        try:
            venv = venv_future.result()
            with overlay_locks[(cell.python, cell.asyncpg)]:  # the uvloop cell shares its pair's
                overlay = ensure_asyncpg(venv, cell.asyncpg)
        except RuntimeError as error:
            cell.status, cell.note = "error", str(error)
            say(f"{cell.name}: {error}")
            return
        if left() < cell.min_seconds:
            cell.status, cell.note = "budget", (f"not started: {max(0, left()):.0f} s left before the CI deadline, "
                                                f"under the {cell.min_seconds:.0f} s it takes")
            say(f"{cell.name}: {cell.note}")
            return
        run_cell(cell, venv, overlay)

    # Venvs are built JOBS at a time, newest Python first; cells run JOBS at
    # a time as their venv is ready, longest first so that short cells fill
    # the tail (the uvloop cell, then the cells with every suite, then the
    # rest). The cells with every suite go oldest asyncpg first: the release
    # that differs most from 0.32, and the one a short budget cut every time
    # while they went newest first (3.11/0.29 in ci-99 to ci-101, which hid
    # two failures there); the rest newest Python and asyncpg first.
    def rank(cell: Cell) -> tuple[bool, bool, int, tuple[int, ...]]:
        version = tuple(int(x) for x in cell.asyncpg.split("."))
        if cell.suites != OFF_DIAGONAL_SUITES:
            return (cell.loop == "asyncio", False, 0, version)
        return (cell.loop == "asyncio", True, -pythons.index(cell.python), tuple(-x for x in version))

    order = sorted((c for c in cells if c.status not in ("n/a", "readme")), key=rank)
    with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as builds, \
            concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as runs:
        sources = builds.submit(fetch_asyncpg_sources, versions)
        venvs = {p: builds.submit(ensure_venv, p) for p in reversed(pythons)}
        sources.result()
        for future in [runs.submit(run, cell, venvs[cell.python]) for cell in order]:
            future.result()

    total = time.monotonic() - started
    print()
    print(f"Version matrix: {', '.join(CELL_SUITES)} on asyncio per cell (passed/failed/skipped, wall time);")
    if any(cell.suites == OFF_DIAGONAL_SUITES for cell in cells):
        pairs = ", ".join(f"{p}/{v}" for p, v in sorted(full))
        print(f"* all of them only in {pairs}{' and the README run' if readme_ran else ''}; the other cells run "
              f"{', '.join(OFF_DIAGONAL_SUITES)} alone.")
    if uvloop:
        print(f"* {', '.join(UVLOOP_SUITES)} on uvloop. {jobs} cell(s) at once, {total:.0f} s in all.")
    print(table(cells, pythons, versions))
    for cell in cells:
        if cell.status in ("error", "n/a", "readme", "budget"):
            print(f"{cell.name}: {cell.status}: {cell.note}")
        for test in cell.flaky:
            print(f"{cell.name}: failed, then passed when run again: {test}")
    bad = [c.name for c in cells if c.status not in ("ok", "n/a", "readme", "budget")]
    cut = [c.name for c in cells if c.status == "budget"]
    if cut:
        print(f"matrix: the CI time budget (SAFEPOOL_CI_DEADLINE) cut {len(cut)} cell(s): {', '.join(cut)}; "
              "python3 .ci/matrix.py alone runs them all")
    if cut and not any(c.status == "ok" for c in cells):
        tested = "only the README command's pair was tested" if readme_ran else "no pair was tested"
        print(f"matrix: WARNING: no cell ran to the end within the CI time budget: {tested}")
    passed = sum(c.passed for c in cells)
    failed = sum(c.failed for c in cells) + sum(1 for c in cells if c.status == "error")
    skipped = sum(c.skipped for c in cells)
    if bad:
        print(f"matrix: cells not passing: {', '.join(bad)} (logs in {LOGS.relative_to(ROOT)}/)")
    print(f"matrix: {passed} passed, {failed} failed, {skipped} skipped")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
