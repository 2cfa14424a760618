"""Run asyncpg's own pool tests against safepool.

Usage: python tests/compat/asyncpg_suite.py ASYNCPG_TESTS_DIR [RESULT_JSON]

asyncpg's test base binds its pool class as a default argument, so the swap
happens before the tests import it: ``asyncpg.create_pool``, ``asyncpg.Pool``
and ``asyncpg.pool.Pool`` become safepool's, and the default ``pool_class`` of
``asyncpg._testbase.create_pool`` / ``ConnectedTestCase.create_pool`` too.
Needs PGHOST / PGUSER / PGDATABASE of a running server.
"""

from __future__ import annotations

import json
import sys
import unittest
from typing import Any


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
    tests_dir = argv[1]
    result_path = argv[2] if len(argv) > 2 else None
    patch_asyncpg()
    sys.path.insert(0, tests_dir)
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
