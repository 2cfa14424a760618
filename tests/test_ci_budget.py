""".ci/run's time budget (docs/compatibility.md): past SAFEPOOL_CI_DEADLINE
the version matrix stops its cells and the ORM driver its suites, and both
report them as cut by the budget instead of failing."""

from __future__ import annotations

import importlib.util
import stat
import sys
import time
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _load(name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def matrix(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> ModuleType:
    module = _load("ci_matrix", ROOT / ".ci" / "matrix.py")
    monkeypatch.setattr(module, "LOGS", tmp_path / "logs")
    monkeypatch.setattr(module, "ROOT", tmp_path)
    (tmp_path / "logs").mkdir()
    return module


def _sleeping_python(venv: Path) -> Path:
    """A venv whose python sleeps a minute, whatever it is asked to run."""
    python = venv / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text("#!/bin/sh\nexec sleep 60\n")
    python.chmod(python.stat().st_mode | stat.S_IEXEC)
    return venv


def test_a_cell_running_at_the_deadline_is_stopped_and_reported_as_cut(
    matrix: ModuleType, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("SAFEPOOL_CI_DEADLINE", str(time.time() + 1.0))
    # A sleep that ignores SIGINT (it does on a pytest-xdist worker, which
    # ignores it) is killed once the grace ran out: 1 s here, not 20.
    monkeypatch.setattr(matrix, "INTERRUPT_GRACE", 1.0)
    cell = matrix.Cell("3.12", "0.30.0")
    started = time.monotonic()
    matrix.run_cell(cell, _sleeping_python(tmp_path / "venv"), tmp_path)
    assert time.monotonic() - started < 30  # not the minute the cell would take
    assert cell.status == "budget" and "stopped at the CI deadline" in cell.note
    assert cell.text().startswith("budget (")


def _interruptible_python(venv: Path, failures: int) -> Path:
    """A venv whose python, run as pytest, waits to be interrupted, then
    writes a JUnit report of 3 tests, ``failures`` of them failed, as pytest
    does after Ctrl-C."""
    python = venv / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text(f"""#!{sys.executable}
import signal, sys, time
xml = next(arg.split("=", 1)[1] for arg in sys.argv if arg.startswith("--junitxml="))
def stop(*_):
    with open(xml, "w") as out:
        out.write('<testsuites><testsuite tests="3" failures="{failures}" errors="0" skipped="0"/></testsuites>')
    sys.exit(2)
signal.signal(signal.SIGINT, stop)
time.sleep(60)
""")
    python.chmod(python.stat().st_mode | stat.S_IEXEC)
    return venv


@pytest.mark.parametrize(("failures", "status"), [(0, "budget"), (1, "failed")])
def test_a_cell_stopped_at_the_deadline_keeps_the_failures_of_the_tests_that_ran(
    matrix: ModuleType, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, failures: int, status: str
) -> None:
    # A regression that slows a cell past the deadline must not hide behind
    # the budget: pytest, interrupted, reports what ran, and a failure fails.
    monkeypatch.setenv("SAFEPOOL_CI_DEADLINE", str(time.time() + 1.5))
    cell = matrix.Cell("3.12", "0.30.0")
    matrix.run_cell(cell, _interruptible_python(tmp_path / "venv", failures), tmp_path)
    assert cell.status == status, cell.note
    assert (cell.passed, cell.failed) == (3 - failures, failures)


def test_without_a_deadline_nothing_is_cut(matrix: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SAFEPOOL_CI_DEADLINE", raising=False)
    assert matrix.left() == float("inf")
    monkeypatch.setenv("SAFEPOOL_CI_DEADLINE", str(time.time() + 100))
    assert 90 < matrix.left() <= 100


def test_the_orm_driver_reports_a_suite_stopped_at_the_deadline_as_cut(tmp_path: Path) -> None:
    driver = _load("ci_orm_driver", ROOT / ".ci" / "orm_suites" / "driver.py")
    _sleeping_python(tmp_path / "venvs" / "databases")

    class Server:  # the run is stopped before the driver reads the server's log
        def log_offset(self) -> int:
            return 0

    suite = driver.suites("127.0.0.1", 5432)["databases"]
    started = time.monotonic()
    with pytest.raises(driver.BudgetCut, match="databases on safepool stopped at the CI deadline"):
        driver.run_suite(suite, "safepool", tmp_path, tmp_path, Server(), 900.0, time.time() + 1.0)
    assert time.monotonic() - started < 30


def test_ci_run_sets_a_deadline_within_fifteen_minutes_and_hands_it_on() -> None:
    script = (ROOT / ".ci" / "run").read_text()
    assert "SAFEPOOL_CI_DEADLINE=${SAFEPOOL_CI_DEADLINE:-$(( $(date +%s) + 780 ))}" in script
    assert '.ci/orm --deadline "$SAFEPOOL_CI_DEADLINE"' in script


def test_a_safepool_run_cut_long_after_asyncpgs_finished_is_a_stall_not_a_cut(tmp_path: Path) -> None:
    driver = _load("ci_orm_driver", ROOT / ".ci" / "orm_suites" / "driver.py")
    base = driver.Run("asyncpg", 100.0, 0, 10, {}, {})
    # Past twice asyncpg's time plus a minute: a stall, which fails the run.
    stalled = driver.stalled([base, driver.BudgetCut("tortoise on safepool stopped", 261.0)])
    assert stalled is not None and "still going at the CI deadline after 261 s" in stalled
    # Within it, or asyncpg's own run cut, or both: the budget's cut.
    assert driver.stalled([base, driver.BudgetCut("cut", 260.0)]) is None
    assert driver.stalled([driver.BudgetCut("cut", 50.0), driver.Run("safepool", 30.0, 0, 10, {}, {})]) is None
    assert driver.stalled([driver.BudgetCut("cut", 50.0)]) is None
