"""Leak guards for test suites: a pytest plugin, a fixture and a context manager.

The plugin is registered through the ``pytest11`` entry point (this module)
and does nothing unless asked: ``pytest --safepool-leaks`` /
``--safepool-strict``, the ``safepool_leak_check`` fixture, the
``safepool_allow_leaks`` marker (docs/testing.md). ``with
assert_no_leaks(pool):`` (or ``async with``) guards a block.

Three parts, each on the pool's public observation surface only:
:mod:`safepool.testing.guards` (the guards, no pytest import),
:mod:`safepool.testing.tracker` (process-wide, fed by the pools' events) and
:mod:`safepool.testing.plugin` (the pytest hooks, loaded here only when
pytest is installed).
"""

from __future__ import annotations

from .guards import FIX_HINT, STRICT_HINT, Leak, LeakError, LeakGuard, assert_no_leaks, format_report, release_leaked
from .tracker import _Tracker, _tracker

__all__ = [
    "Leak",
    "LeakError",
    "LeakGuard",
    "assert_no_leaks",
]

try:
    import pytest as _pytest  # noqa: F401 - the hooks need it; the guards do not
except ImportError:  # pragma: no cover - the guards work without pytest
    pass
else:
    from .plugin import (  # noqa: F401 - pytest finds the hooks and fixtures on this module
        _safepool_leak_autocheck,
        pytest_addoption,
        pytest_configure,
        pytest_fixture_post_finalizer,
        pytest_fixture_setup,
        pytest_report_header,
        pytest_runtest_call,
        pytest_runtest_makereport,
        pytest_runtest_protocol,
        pytest_sessionfinish,
        pytest_terminal_summary,
        pytest_testnodedown,
        pytest_unconfigure,
        safepool_leak_check,
    )

_unused = (FIX_HINT, STRICT_HINT, format_report, release_leaked, _Tracker, _tracker)  # re-exported names
