"""Run asyncpg's own pool tests against safepool.

Usage: python tests/compat/asyncpg_suite.py ASYNCPG_TESTS_DIR [RESULT_JSON] [--other-modules]
       python tests/compat/asyncpg_suite.py --fetch VERSION...   (into the cache)

``--other-modules`` runs, instead of tests/test_pool.py, the pool tests of
asyncpg's other test modules (OTHER_MODULES: each test whose code calls
``create_pool``). test_adversity's run through asyncpg's own TCP proxy and
need PGHOST / PGPORT of a server listening on TCP.

asyncpg's test base binds its pool class as a default argument, so the swap
happens before the tests import it: ``asyncpg.create_pool``, ``asyncpg.Pool``
and ``asyncpg.pool.Pool`` become safepool's, and the default ``pool_class`` of
``asyncpg._testbase.create_pool`` / ``ConnectedTestCase.create_pool`` too.
Needs PGHOST / PGUSER / PGDATABASE of a running server.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import tempfile
import unittest
from pathlib import Path
from typing import Any


def cache_dir() -> Path:
    return Path(os.environ.get("SAFEPOOL_COMPAT_CACHE", Path(tempfile.gettempdir()) / "safepool-compat"))


def fetch_tests(version: str, python: str = sys.executable) -> Path:
    """asyncpg ``version``'s tests/ directory, from its source distribution,
    downloaded once (by ``python``'s pip) into ``cache_dir()``.

    :raises RuntimeError: the download failed (the message says why).
    """
    cache = cache_dir()
    tests_dir = cache / f"asyncpg-{version}" / "tests"
    if (tests_dir / "test_pool.py").exists():
        return tests_dir
    cache.mkdir(parents=True, exist_ok=True)
    # Downloaded and unpacked aside, then moved into place in one step: the
    # version matrix may run two sessions of one asyncpg at once.
    with tempfile.TemporaryDirectory(dir=cache, prefix="download-") as scratch:
        try:
            download = subprocess.run(
                # --no-binary asyncpg, not :all:, which also refuses wheels for the
                # build requirements pip installs to read the sdist's metadata
                # (Cython compiled from source: over 10 minutes on 2 cores)
                [python, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", "asyncpg",
                 f"asyncpg=={version}", "-d", scratch],
                capture_output=True, text=True, timeout=600,
            )
        except subprocess.TimeoutExpired as exc:
            raise RuntimeError(f"pip download asyncpg=={version} took over {exc.timeout} s") from None
        archive = Path(scratch) / f"asyncpg-{version}.tar.gz"
        if download.returncode != 0 or not archive.exists():
            raise RuntimeError(download.stderr.strip()[-300:])
        with tarfile.open(archive) as tar:
            members = [m for m in tar.getmembers() if "/tests/" in m.name]
            tar.extractall(scratch, members=members, filter="data")
        try:
            os.rename(Path(scratch) / f"asyncpg-{version}", cache / f"asyncpg-{version}")
        except OSError:
            if not (tests_dir / "test_pool.py").exists():  # not another session's copy
                raise
    return tests_dir


# asyncpg's test modules besides test_pool.py that test its pool (0.29-0.32).
OTHER_MODULES = ("test_adversity", "test_listeners", "test_cache_invalidation")


def other_pool_tests() -> unittest.TestSuite:
    """The tests of OTHER_MODULES whose code calls ``create_pool``.

    asyncpg skips test_adversity's class when PGHOST is set ("using remote
    cluster for testing"): its proxied tests reconfigure a cluster asyncpg
    manages. They need only a server listening on TCP, so the modules are
    imported with PGHOST hidden and asyncpg's default cluster is the running
    server at PGHOST:PGPORT."""
    import importlib
    import inspect

    import asyncpg._testbase as testbase
    import asyncpg.cluster

    host = os.environ.pop("PGHOST")
    try:
        modules = [importlib.import_module(name) for name in OTHER_MODULES]
    finally:
        os.environ["PGHOST"] = host
    testbase._default_cluster = asyncpg.cluster.RunningCluster(host=host, port=int(os.environ.get("PGPORT", "5432")))
    suite = unittest.TestSuite()
    for module in modules:
        for case in unittest.defaultTestLoader.loadTestsFromModule(module):
            for test in case:  # type: ignore[attr-defined]
                method = getattr(test, test._testMethodName)
                if "create_pool" in inspect.getsource(method):
                    suite.addTest(test)
    return suite


def patch_asyncpg() -> None:
    import asyncpg
    import asyncpg._testbase as testbase
    import asyncpg.pool

    import safepool

    asyncpg.create_pool = safepool.create_pool
    asyncpg.Pool = safepool.Pool
    asyncpg.pool.Pool = safepool.Pool
    asyncpg.pool.create_pool = safepool.create_pool
    asyncpg.pool.PoolConnectionProxy = safepool.PoolConnectionProxy

    def swap_default(function: object) -> None:
        kwdefaults = getattr(function, "__kwdefaults__", None) or {}
        if "pool_class" in kwdefaults:
            kwdefaults["pool_class"] = safepool.Pool
        defaults = getattr(function, "__defaults__", None)
        if defaults:
            function.__defaults__ = tuple(  # type: ignore[attr-defined]
                safepool.Pool if value is asyncpg.pool.Pool.__mro__[0] else value for value in defaults
            )

    swap_default(testbase.create_pool)
    method = testbase.ConnectedTestCase.create_pool
    method.__defaults__ = tuple(
        safepool.Pool if isinstance(value, type) and value.__name__ == "Pool" else value
        for value in (method.__defaults__ or ())
    )


def main(argv: list[str]) -> int:
    if argv[1:2] == ["--fetch"]:
        failed = 0
        for version in argv[2:]:
            try:
                print(f"asyncpg {version}: {fetch_tests(version)}")
            except RuntimeError as error:
                print(f"asyncpg {version}: cannot download its sources: {error}", file=sys.stderr)
                failed += 1
        return 1 if failed else 0
    others = "--other-modules" in argv
    argv = [arg for arg in argv if arg != "--other-modules"]
    tests_dir = argv[1]
    result_path = argv[2] if len(argv) > 2 else None
    patch_asyncpg()
    sys.path.insert(0, tests_dir)
    if others:
        suite = other_pool_tests()
    else:
        import test_pool  # type: ignore[import-not-found]

        suite = unittest.defaultTestLoader.loadTestsFromModule(test_pool)
    outcome: dict[str, str] = {}

    class Recorder(unittest.TextTestResult):
        def addSuccess(self, test: unittest.TestCase) -> None:  # noqa: N802
            super().addSuccess(test)
            outcome[test.id()] = "passed"

        def addFailure(self, test: unittest.TestCase, err: object) -> None:  # noqa: N802
            super().addFailure(test, err)  # type: ignore[arg-type]
            outcome[test.id()] = "failed"

        def addError(self, test: unittest.TestCase, err: object) -> None:  # noqa: N802
            super().addError(test, err)  # type: ignore[arg-type]
            outcome[test.id()] = "error"

        def addSubTest(  # noqa: N802
            self, test: unittest.TestCase, subtest: unittest.TestCase, err: Any
        ) -> None:
            super().addSubTest(test, subtest, err)
            if err is not None:  # a failed subtest fails its test (no addSuccess follows)
                outcome[test.id()] = "failed" if issubclass(err[0], test.failureException) else "error"

        def addSkip(self, test: unittest.TestCase, reason: str) -> None:  # noqa: N802
            super().addSkip(test, reason)
            outcome[test.id()] = "skipped"

        def addExpectedFailure(self, test: unittest.TestCase, err: object) -> None:  # noqa: N802
            super().addExpectedFailure(test, err)  # type: ignore[arg-type]
            outcome[test.id()] = "expected_failure"

        def addUnexpectedSuccess(self, test: unittest.TestCase) -> None:  # noqa: N802
            super().addUnexpectedSuccess(test)
            outcome[test.id()] = "unexpected_success"

    runner = unittest.TextTestRunner(resultclass=Recorder, verbosity=1, stream=sys.stderr)
    result = runner.run(suite)
    if result_path:
        with open(result_path, "w") as fh:
            json.dump(outcome, fh, indent=1, sort_keys=True)
    return 0 if result.wasSuccessful() else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
