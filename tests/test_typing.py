"""Users' code type-checks against safepool as against asyncpg's pool:
``pool: asyncpg.Pool = await safepool.create_pool(...)`` is accepted, and
a lease's methods are typed (tests/typing_cases/user_code.py, checked with
mypy --strict against this checkout's safepool and asyncpg-stubs)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CASES = Path(__file__).resolve().parent / "typing_cases"


def test_user_code_type_checks_with_mypy(tmp_path: Path) -> None:
    pytest.importorskip("mypy")
    try:
        metadata.version("asyncpg-stubs")
    except metadata.PackageNotFoundError:
        pytest.skip("asyncpg-stubs is not installed (pip install -e '.[test]')")
    run = subprocess.run(
        [
            sys.executable, "-m", "mypy", "--strict", "--config-file", os.devnull,
            "--cache-dir", str(tmp_path / "cache"), "--python-version", "3.11",
            str(CASES / "user_code.py"),
        ],
        cwd=ROOT,
        env={**os.environ, "MYPYPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stdout + run.stderr


def test_user_code_type_checks_with_pyright() -> None:
    """The same file under pyright (not a test dependency: skipped unless
    ``pyright`` is on PATH or PYRIGHT names it)."""
    pyright = os.environ.get("PYRIGHT") or shutil.which("pyright")
    if pyright is None:
        pytest.skip("pyright is not installed (pip install pyright; or set PYRIGHT to its path)")
    run = subprocess.run(
        [pyright, "--pythonpath", sys.executable, str(CASES / "user_code.py")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stdout + run.stderr
