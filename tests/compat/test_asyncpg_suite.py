"""asyncpg's own pool tests, run against safepool.

Downloads the source distribution of the installed asyncpg (it holds
tests/test_pool.py; the wheel ships only asyncpg._testbase), swaps the pool
class (see asyncpg_suite.py) and runs it against the test server. Every test
that uses only public API must pass; the ones that reach into asyncpg's pool
internals are listed below, and each is checked to really do so.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import asyncpg
import pytest

HERE = Path(__file__).parent

# Tests that read asyncpg's private pool structures (pool._holders,
# pool._queue, holder._in_use, holder._inactive_callback): they cannot pass
# against any other pool implementation. Their scenarios that matter (a task
# cancelled in acquire or release returns the connection; min_size floor
# restored after losses; idle lifetime) are covered with public API in
# test_parity.py.
PRIVATE_API_TESTS = {
    "test_pool_04",
    "test_pool_expire_connections",
    "test_pool_floor_reconnect_honors_expired_generation",
    "test_pool_gc_does_not_restore_min_size",
    "test_pool_handles_query_cancel_in_release",
    "test_pool_handles_task_cancel_in_acquire_with_timeout",
    "test_pool_handles_task_cancel_in_release",
    "test_pool_max_inactive_time_01",
    "test_pool_max_inactive_time_02",
    "test_pool_max_inactive_time_03",
    "test_pool_min_size_backs_off_on_target_attribute_mismatch",
    "test_pool_min_size_keeps_connections_alive",
    "test_pool_min_size_reconnect_after_expiry",
    "test_pool_min_size_restored_after_idle_connection_loss",
    "test_pool_min_size_restored_after_multiple_losses",
    "test_pool_min_size_retries_closed_connection",
    "test_pool_min_size_retries_failed_reconnect",
    "test_pool_min_size_reuses_retained_connections",
    "test_pool_min_size_zero_allows_full_expiry",
    "test_pool_release_after_protocol_abort",
    "test_pool_shutdown_cancels_floor_reconnect",
    "test_pool_shutdown_cleans_idle_connections",
}
_PRIVATE_MARKERS = re.compile(r"\._holders|\._queue|\._in_use|\._inactive_callback")


def _asyncpg_tests_dir() -> Path:
    cache = Path(os.environ.get("SAFEPOOL_COMPAT_CACHE", Path(tempfile.gettempdir()) / "safepool-compat"))
    version = asyncpg.__version__
    tests_dir = cache / f"asyncpg-{version}" / "tests"
    if (tests_dir / "test_pool.py").exists():
        return tests_dir
    cache.mkdir(parents=True, exist_ok=True)
    download = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
         f"asyncpg=={version}", "-d", str(cache)],
        capture_output=True, text=True, timeout=300,
    )
    archive = cache / f"asyncpg-{version}.tar.gz"
    if download.returncode != 0 or not archive.exists():
        pytest.skip(f"cannot download asyncpg {version} sources: {download.stderr.strip()[-300:]}")
    with tarfile.open(archive) as tar:
        members = [m for m in tar.getmembers() if "/tests/" in m.name]
        tar.extractall(cache, members=members, filter="data")
    return tests_dir


def _libpq_env(dsn: str) -> dict[str, str]:
    url = urlparse(dsn)
    query = parse_qs(url.query)
    env = {
        "PGHOST": query.get("host", [url.hostname or "localhost"])[0],
        "PGUSER": url.username or "postgres",
        "PGDATABASE": (url.path or "/postgres").lstrip("/") or "postgres",
    }
    if url.port:
        env["PGPORT"] = str(url.port)
    if url.password:
        env["PGPASSWORD"] = url.password
    return env


@pytest.mark.realtime
def test_asyncpg_pool_suite_passes_on_safepool(pg_dsn: str, tmp_path: Path) -> None:
    tests_dir = _asyncpg_tests_dir()
    source = (tests_dir / "test_pool.py").read_text()
    for name in PRIVATE_API_TESTS:
        body = re.search(rf"def {name}\(.*?(?=\n    (?:async )?def |\nclass |\Z)", source, re.S)
        assert body is not None, f"{name} is no longer in asyncpg's suite: update PRIVATE_API_TESTS"
        assert _PRIVATE_MARKERS.search(body.group(0)), f"{name} uses only public API: it must pass"

    results = tmp_path / "results.json"
    env = {**os.environ, **_libpq_env(pg_dsn), "PYTHONWARNINGS": "ignore"}
    run = subprocess.run(
        [sys.executable, str(HERE / "asyncpg_suite.py"), str(tests_dir), str(results)],
        capture_output=True, text=True, timeout=600, env=env, cwd=tests_dir,
    )
    outcome: dict[str, str] = json.loads(results.read_text())
    by_name = {test_id.rsplit(".", 1)[-1]: status for test_id, status in outcome.items()}
    failed_public = sorted(
        name for name, status in by_name.items()
        if status not in ("passed", "skipped") and name not in PRIVATE_API_TESTS
    )
    passed = sum(1 for status in by_name.values() if status == "passed")
    print(f"\nasyncpg {asyncpg.__version__} test_pool.py on safepool: {passed} passed, "
          f"{len(PRIVATE_API_TESTS)} use private internals, "
          f"{sum(1 for s in by_name.values() if s == 'skipped')} skipped by asyncpg")
    assert not failed_public, f"public-API tests failed: {failed_public}\n{run.stderr[-4000:]}"
    assert passed >= 39
