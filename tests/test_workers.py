"""The README's test command runs ``-n auto``: two pytest-xdist workers with
an embedded server each, and one worker when SAFEPOOL_TEST_DSN names a
server they would share (tests/conftest.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import pytest_xdist_auto_num_workers

ROOT = Path(__file__).resolve().parent.parent


def test_auto_is_two_workers_with_embedded_servers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SAFEPOOL_TEST_DSN", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    assert pytest_xdist_auto_num_workers(None) == 2  # type: ignore[arg-type]
    monkeypatch.setattr(os, "cpu_count", lambda: 1)
    assert pytest_xdist_auto_num_workers(None) == 1  # type: ignore[arg-type]


def test_auto_is_one_worker_on_a_shared_server(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SAFEPOOL_TEST_DSN", "postgresql://postgres@db.invalid/postgres")
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    assert pytest_xdist_auto_num_workers(None) == 1  # type: ignore[arg-type]


def test_many_workers_on_a_shared_server_is_a_usage_error() -> None:
    env = {**os.environ, "SAFEPOOL_TEST_DSN": "postgresql://postgres:hunter2@db.invalid/postgres"}
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-n", "2", "--collect-only", "-q", "tests/test_workers.py"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == pytest.ExitCode.USAGE_ERROR, result.stdout + result.stderr
    assert "SAFEPOOL_TEST_DSN names one server, which 2 pytest-xdist workers would share" in result.stderr
    assert "hunter2" not in result.stdout + result.stderr
