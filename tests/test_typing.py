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


# --------------------------------------------------------------------------
# asyncpg-style annotations that type-check against safepool too (mypy
# --strict, as above, on one small snippet each; a review found each
# refused, pyright 1.1.390 agreeing on all but the last, whose
# no-any-return is a mypy --strict check).

_PRELUDE = """\
from __future__ import annotations

from typing import assert_type

import asyncpg
import asyncpg.pool

import safepool
"""


@pytest.fixture(scope="module")
def mypy_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("mypy_cache")


def _mypy_strict(snippet: str, tmp_path: Path, cache: Path) -> subprocess.CompletedProcess[str]:
    pytest.importorskip("mypy")
    try:
        metadata.version("asyncpg-stubs")
    except metadata.PackageNotFoundError:
        pytest.skip("asyncpg-stubs is not installed (pip install -e '.[test]')")
    source = tmp_path / "snippet.py"
    source.write_text(_PRELUDE + snippet)
    return subprocess.run(
        [
            sys.executable, "-m", "mypy", "--strict", "--config-file", os.devnull,
            "--cache-dir", str(cache), "--python-version", "3.11", str(source),
        ],
        cwd=ROOT,
        env={**os.environ, "MYPYPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_a_lease_is_accepted_where_asyncpg_s_pool_connection_proxy_is_annotated(
    tmp_path: Path, mypy_cache: Path
) -> None:
    run = _mypy_strict(
        """
def pid(con: asyncpg.pool.PoolConnectionProxy) -> int:
    return con.get_server_pid()


async def main(dsn: str) -> None:
    pool = await safepool.create_pool(dsn)
    async with pool.acquire() as con:
        pid(con)
""",
        tmp_path,
        mypy_cache,
    )
    assert run.returncode == 0, run.stdout + run.stderr


def test_a_setup_hook_annotated_with_asyncpg_s_proxy_is_accepted(tmp_path: Path, mypy_cache: Path) -> None:
    run = _mypy_strict(
        """
async def setup(con: asyncpg.pool.PoolConnectionProxy) -> None:
    await con.execute("SET search_path TO public")


async def main(dsn: str) -> None:
    pool = await safepool.create_pool(dsn, setup=setup)
    await pool.close()
""",
        tmp_path,
        mypy_cache,
    )
    assert run.returncode == 0, run.stdout + run.stderr


def test_pool_acquire_is_accepted_where_asyncpg_s_acquire_context_is_annotated(
    tmp_path: Path, mypy_cache: Path
) -> None:
    run = _mypy_strict(
        """
def lease(pool: safepool.Pool) -> asyncpg.pool.PoolAcquireContext:
    return pool.acquire()
""",
        tmp_path,
        mypy_cache,
    )
    assert run.returncode == 0, run.stdout + run.stderr


def test_an_awaited_acquire_is_typed_as_a_lease(tmp_path: Path, mypy_cache: Path) -> None:
    run = _mypy_strict(
        """
async def get(pool: safepool.Pool) -> safepool.PoolConnectionProxy:
    con = await pool.acquire()
    assert_type(con, safepool.PoolConnectionProxy)
    return await pool.acquire()
""",
        tmp_path,
        mypy_cache,
    )
    assert run.returncode == 0, run.stdout + run.stderr


def test_a_row_of_a_safepool_pool_returns_from_a_typed_function(tmp_path: Path, mypy_cache: Path) -> None:
    run = _mypy_strict(
        """
async def one(pool: safepool.Pool) -> asyncpg.Record | None:
    return await pool.fetchrow("SELECT 1")
""",
        tmp_path,
        mypy_cache,
    )
    assert run.returncode == 0, run.stdout + run.stderr
