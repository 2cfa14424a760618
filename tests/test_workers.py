"""The README's test command runs ``-n auto``: a pytest-xdist worker per core
and one more, three at most, with an embedded server each; one worker on one
core, and when SAFEPOOL_TEST_DSN names a server they would share
(tests/conftest.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests._util import NESTED_PYTEST_ADDOPTS
from tests.conftest import pytest_xdist_auto_num_workers

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(("cores", "workers"), [(16, 3), (3, 3), (2, 3)])
def test_auto_is_three_workers_with_embedded_servers(
    monkeypatch: pytest.MonkeyPatch, cores: int, workers: int
) -> None:
    monkeypatch.delenv("SAFEPOOL_TEST_DSN", raising=False)
    monkeypatch.delenv("PYTEST_XDIST_AUTO_NUM_WORKERS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)))
    assert pytest_xdist_auto_num_workers(None) == workers  # type: ignore[arg-type]
    # A process limited to one core (taskset, a container's CPU set) gets one
    # worker, however many cores the machine has.
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    assert pytest_xdist_auto_num_workers(None) == 1  # type: ignore[arg-type]


def test_auto_leaves_an_explicit_count_to_xdist(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SAFEPOOL_TEST_DSN", raising=False)
    monkeypatch.setenv("PYTEST_XDIST_AUTO_NUM_WORKERS", "3")
    assert pytest_xdist_auto_num_workers(None) is None  # type: ignore[arg-type]


def test_auto_is_one_worker_on_a_shared_server(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SAFEPOOL_TEST_DSN", "postgresql://postgres@db.invalid/postgres")
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    assert pytest_xdist_auto_num_workers(None) == 1  # type: ignore[arg-type]


def run_pytest(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args],
        cwd=ROOT, env={**os.environ, "PYTEST_ADDOPTS": NESTED_PYTEST_ADDOPTS, **(env or {})}, capture_output=True,
        text=True, timeout=120,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("workers", "args"),
    [
        (2, ["-n", "2"]),
        (3, ["--numprocesses=3"]),
        (2, ["-n", "3", "--maxprocesses=2"]),
        (2, ["--tx", "2*popen", "--dist", "load"]),
        (2, ["--tx", "popen", "--tx", "popen"]),
    ],
)
def test_many_workers_on_a_shared_server_is_a_usage_error(workers: int, args: list[str]) -> None:
    dsn = "postgresql://postgres:hunter2@db.invalid/postgres"
    result = run_pytest(*args, "--collect-only", "-q", "tests/test_workers.py", env={"SAFEPOOL_TEST_DSN": dsn})
    assert result.returncode == pytest.ExitCode.USAGE_ERROR, result.stdout + result.stderr
    assert f"SAFEPOOL_TEST_DSN names one server, which {workers} pytest-xdist workers would share" in result.stderr
    assert "hunter2" not in result.stdout + result.stderr


def test_one_worker_by_maxprocesses_is_no_usage_error_on_a_shared_server() -> None:
    """``-n 3 --maxprocesses 1`` starts one worker (xdist caps -n by it)."""
    dsn = "postgresql://postgres:hunter2@db.invalid/postgres"
    result = run_pytest("-n", "3", "--maxprocesses=1", "--collect-only", "-q", "tests/test_workers.py",
                        env={"SAFEPOOL_TEST_DSN": dsn})  # fmt: skip
    assert result.returncode == pytest.ExitCode.OK, result.stdout + result.stderr


def test_help_is_not_a_usage_error_on_a_shared_server() -> None:
    result = run_pytest("-n", "2", "--help", env={"SAFEPOOL_TEST_DSN": "postgresql://postgres@db.invalid/postgres"})
    assert result.returncode == 0, result.stderr
    assert "--loop" in result.stdout


def test_benchmarks_on_xdist_workers_skip_and_say_how_to_run_them() -> None:
    """`pytest -n auto` alone collects the benchmarks too (testpaths): on a
    worker they would time the pools beside the other worker's tests."""
    result = run_pytest("-n", "2", "-rs", "benchmarks/test_ratios.py")
    assert result.returncode == 0, result.stdout + result.stderr
    assert " passed" not in result.stdout and " failed" not in result.stdout
    assert "run `python -m pytest benchmarks` on its own, without -n" in result.stdout


def test_solo_tests_skip_on_xdist_workers_and_run_in_the_solo_run() -> None:
    """A test marked solo measures against the machine: beside another
    worker's tests the adaptive queue's goodput fell to 0.81-0.88 of the
    capacity it measured (ci-60)."""
    select = ["tests/integration/test_blast_radius.py", "-k", "adaptive_queue_keeps"]
    on_workers = run_pytest("-n", "2", "-rs", *select)
    assert on_workers.returncode == 0, on_workers.stdout + on_workers.stderr
    assert "1 skipped" in on_workers.stdout and "a solo test" in on_workers.stdout
    solo = run_pytest("-m", "solo", "--co", "-q", *select)
    assert "1/" in solo.stdout and "tests collected" in solo.stdout, solo.stdout


def test_every_benchmark_runs_in_the_solo_run() -> None:
    """The README command's second run selects ``-m solo``: a benchmark
    without the mark would run in neither of its two runs."""
    result = run_pytest("-m", "not solo", "--co", "-q", "benchmarks")
    assert result.returncode == pytest.ExitCode.NO_TESTS_COLLECTED, result.stdout + result.stderr


def test_a_failing_test_does_not_print_the_servers_password() -> None:
    """pytest prints a failing test's arguments (``pg_dsn = '...'``): the
    DSN fixture's repr leaves SAFEPOOL_TEST_DSN's password out. (A server
    that refuses connections: the test fails at once.)"""
    dsn = "postgresql://postgres:hunter2@127.0.0.1:1/postgres"
    done = run_pytest(
        "tests/integration/test_docs_examples.py::test_pgbouncer_settings_work_on_a_plain_server_too",
        env={"SAFEPOOL_TEST_DSN": dsn},
    )
    assert done.returncode == 1, done.stdout[-2000:]
    assert "pg_dsn = 'postgresql://postgres:***@127.0.0.1:1/postgres'" in done.stdout, done.stdout[-2000:]
    assert "hunter2" not in done.stdout + done.stderr
