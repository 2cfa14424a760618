"""asyncpg's own pool tests, run against safepool.

Downloads the source distribution of the installed asyncpg (it holds
tests/test_pool.py; the wheel ships only asyncpg._testbase), swaps the pool
class (see asyncpg_suite.py) and runs it against the test server. Every test
must pass, unmodified, including those that read asyncpg's private pool
structures (``pool._holders``, ``holder._in_use``, ``pool._queue``, ...):
safepool answers those through a read-only view (safepool/_compat.py). The
only tests not run are the ones asyncpg itself skips against a server it does
not manage. Releases before 0.32 also test a few behaviours that 0.32
changed; safepool keeps 0.32's, and POOL_BEHAVIOUR_DIFFERENCES names those
tests per release. ``--loop uvloop`` runs asyncpg's tests on uvloop too.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import asyncpg
import pytest

from tests.compat import asyncpg_suite

HERE = Path(__file__).parent

# asyncpg skips these when PGHOST names a server it does not manage (always
# here): they start, stop and reconfigure their own clusters.
ASYNCPG_SKIPS = {
    "test_pool_auth",
    "test_full_reconnect_on_node_change_role",
    "test_standby_pool_01",
    "test_standby_cursors",
}
# Tests in each asyncpg release's tests/test_pool.py (4 of them in ASYNCPG_SKIPS).
ASYNCPG_TESTS = {"0.29": 45, "0.30": 45, "0.31": 45, "0.32": 66}
# safepool keeps asyncpg 0.32's pool semantics whatever asyncpg is installed;
# older releases' tests that check where 0.32 changed the behaviour fail on
# it, as they would on asyncpg 0.32's own pool. Each must still fail, so that
# the entry is removed once the pool changes.
_BEFORE_032 = {
    # 0.32: max_inactive_connection_lifetime keeps min_size connections open.
    "test_pool_max_inactive_time_02": "closes an idle connection below min_size",
    "test_pool_max_inactive_time_05": "closes an idle connection below min_size",
}
POOL_BEHAVIOUR_DIFFERENCES: dict[str, dict[str, str]] = {
    # (0.29's test_pool_07, "10 gathered acquires open max_size
    # connections", failed while a lease that only read proxy._con skipped
    # its reset and its connection went straight to a waiter; reading _con
    # now marks the lease for the reset, as asyncpg's pool resets every
    # lease, so the waiters get connections of their own, as on 0.29.)
    "0.29": _BEFORE_032,
    "0.30": _BEFORE_032,
    "0.31": _BEFORE_032,
    "0.32": {},
}


def _asyncpg_tests_dir() -> Path:
    # The source distribution's metadata is built on download: with a Python
    # that the pinned Cython has no wheel for, that compiles Cython (minutes);
    # .ci/matrix.py fetches them beforehand with its own Python.
    try:
        return asyncpg_suite.fetch_tests(asyncpg.__version__)
    except RuntimeError as error:
        pytest.skip(f"cannot download asyncpg {asyncpg.__version__} sources: {error}")


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
@pytest.mark.timeout(600)  # the first run of an asyncpg version downloads its sources
def test_asyncpg_pool_suite_passes_on_safepool(pg_dsn: str, tmp_path: Path, loop_name: str) -> None:
    series = ".".join(asyncpg.__version__.split(".")[:2])
    if series not in ASYNCPG_TESTS:
        pytest.fail(f"asyncpg {asyncpg.__version__}: add its test count and differences to this module")
    known = POOL_BEHAVIOUR_DIFFERENCES[series]
    tests_dir = _asyncpg_tests_dir()
    results = tmp_path / "results.json"
    env = {**os.environ, **_libpq_env(pg_dsn), "PYTHONWARNINGS": "ignore"}
    if loop_name == "uvloop":
        env["USE_UVLOOP"] = "1"  # asyncpg's test base then runs on uvloop
    run = subprocess.run(
        [sys.executable, str(HERE / "asyncpg_suite.py"), str(tests_dir), str(results)],
        capture_output=True, text=True, timeout=600, env=env, cwd=tests_dir,
    )
    outcome: dict[str, str] = json.loads(results.read_text())
    by_name = {test_id.rsplit(".", 1)[-1]: status for test_id, status in outcome.items()}
    failed = sorted(name for name, status in by_name.items() if status not in ("passed", "skipped"))
    skipped = sorted(name for name, status in by_name.items() if status == "skipped")
    passed = sum(1 for status in by_name.values() if status == "passed")
    print(f"\nasyncpg {asyncpg.__version__} test_pool.py on safepool: {passed} passed, "
          f"{len(failed)} failed ({len(known)} known pool differences), "
          f"{len(skipped)} skipped by asyncpg")
    unexpected = sorted(set(failed) - set(known))
    assert not unexpected, f"asyncpg tests failed on safepool: {unexpected}\n{run.stderr[-4000:]}"
    fixed = sorted(set(known) - set(failed))
    assert not fixed, f"these pass now: remove them from POOL_BEHAVIOUR_DIFFERENCES: {fixed}"
    assert set(skipped) <= ASYNCPG_SKIPS, f"skipped, but not by asyncpg's own rule: {set(skipped) - ASYNCPG_SKIPS}"
    total = ASYNCPG_TESTS[series]
    assert len(by_name) == total, f"{len(by_name)} of asyncpg's {total} tests reported"
    assert passed == total - len(ASYNCPG_SKIPS) - len(known)


# asyncpg's pool tests in its other modules (asyncpg_suite.OTHER_MODULES):
# the same 10 in 0.29-0.32 (three of test_adversity, through asyncpg's TCP
# proxy; five of test_listeners; two of test_cache_invalidation). The ones
# that fail on safepool by design, with the reason; each must still fail.
OTHER_TESTS = 10
OTHER_DIFFERENCES = {
    # asyncpg's release sends its reset query after every lease, so an empty
    # lease on a black-holed network times out there. safepool's sends
    # nothing after a lease that ran no statement (docs/migration.md, "What
    # differs is only cost"), so there is nothing to time out.
    "test_pool_acquire_timeout": "empty leases under a network black hole: no reset, so no TimeoutError",
    "test_pool_release_timeout": "an empty lease's release under a network black hole: no reset, so no TimeoutError",
}


@pytest.fixture(scope="module")
def tcp_cluster() -> Any:
    """A server of its own on loopback TCP (asyncpg's proxy needs a TCP
    upstream; the session's embedded server listens on a socket only)."""
    from tests.faults._pg import start_cluster

    cluster = start_cluster()
    try:
        yield cluster
    finally:
        cluster.cleanup()


@pytest.mark.realtime
@pytest.mark.timeout(600)
def test_asyncpg_other_pool_tests_pass_on_safepool(tcp_cluster: Any, tmp_path: Path, loop_name: str) -> None:
    tests_dir = _asyncpg_tests_dir()
    results = tmp_path / "results.json"
    env = {
        **os.environ, "PGHOST": "127.0.0.1", "PGPORT": str(tcp_cluster.port), "PGUSER": "postgres",
        "PGDATABASE": "postgres", "PYTHONWARNINGS": "ignore",
    }
    env.pop("PGPASSWORD", None)
    if loop_name == "uvloop":
        env["USE_UVLOOP"] = "1"

    def run_them() -> tuple[subprocess.CompletedProcess[str], dict[str, str], list[str]]:
        run = subprocess.run(
            [sys.executable, str(HERE / "asyncpg_suite.py"), str(tests_dir), str(results), "--other-modules"],
            capture_output=True, text=True, timeout=600, env=env, cwd=tests_dir,
        )
        outcome: dict[str, str] = json.loads(results.read_text())
        by_name = {test_id.rsplit(".", 1)[-1]: status for test_id, status in outcome.items()}
        return run, by_name, sorted(name for name, status in by_name.items() if status != "passed")

    run, by_name, failed = run_them()
    if set(failed) - set(OTHER_DIFFERENCES):
        # test_adversity's tests time themselves (assertRunUnder, 0.5 s
        # acquire timeouts): a loaded machine can fail one. Once more; a
        # failure that stands fails this test.
        first = sorted(set(failed) - set(OTHER_DIFFERENCES))
        first_stderr = run.stderr
        run, by_name, failed = run_them()
        print(f"\nfailed, then run again: {first}\n{first_stderr[-4000:]}")
    print(f"\nasyncpg {asyncpg.__version__} pool tests of {', '.join(asyncpg_suite.OTHER_MODULES)} on safepool: "
          f"{len(by_name) - len(failed)} passed, {len(failed)} failed ({len(OTHER_DIFFERENCES)} known differences)")
    unexpected = sorted(set(failed) - set(OTHER_DIFFERENCES))
    assert not unexpected, f"asyncpg tests failed on safepool: {unexpected}\n{run.stderr[-4000:]}"
    fixed = sorted(set(OTHER_DIFFERENCES) - set(failed))
    assert not fixed, f"these pass now: remove them from OTHER_DIFFERENCES: {fixed}"
    assert len(by_name) == OTHER_TESTS, f"{len(by_name)} of asyncpg's {OTHER_TESTS} pool tests reported: {sorted(by_name)}"
