"""pytest plugin for .ci/orm: run an ORM's own test suite on asyncpg's pool or on safepool's.

Loaded with ``-p safepool_redirect`` (this folder and the safepool checkout on
PYTHONPATH). ``ORM_SUITE_POOL=safepool`` applies the recipe of
docs/migration.md ("Using safepool under an ORM that creates asyncpg pools"):
``asyncpg.create_pool = safepool.create_pool``, nothing else, before any test
module imports the ORM. ``ORM_SUITE_POOL=asyncpg`` (the default) leaves
asyncpg's pool in place. Either way the plugin writes ``ORM_SUITE_REPORT``
(JSON) at the end of the session:

- ``outcomes``: test ids by outcome (passed, failed, error, skipped, xfailed,
  xpassed), so the driver can name the tests whose outcome differs;
- ``pools``: pools created through ``asyncpg.create_pool`` and, as a check of
  the redirect, how many of asyncpg's own ``Pool`` objects were constructed
  (must be 0 on the safepool run);
- ``events``: every safepool pool event (``pool.add_listener``), tagged with
  the test that was running;
- ``records``: warnings of the ``safepool`` loggers (``safepool.leaks``
  included) and of ``asyncpg.pool``, and errors of ``asyncio`` (where both
  pools report "Resetting connection with an active transaction"), tagged
  the same way.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import asyncpg
import asyncpg.pool
import pytest

POOL = os.environ.get("ORM_SUITE_POOL", "asyncpg")
REPORT = os.environ.get("ORM_SUITE_REPORT")

_current_test = "(outside tests)"
_outcomes: dict[str, list[str]] = {name: [] for name in ("passed", "failed", "error", "skipped", "xfailed", "xpassed")}
_events: list[dict[str, Any]] = []
_records: list[dict[str, Any]] = []
_pools = {"created": 0, "asyncpg_pool_objects": 0}


def _on_event(event: dict[str, Any]) -> None:
    _events.append({"test": _current_test, **{key: _jsonable(value) for key, value in event.items()}})


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return repr(value)


if POOL == "safepool":
    import safepool

    # The recipe itself is the one line below; the wrapper only adds the
    # listener that collects the pool's events for the report.
    def _create_pool(*args: Any, **kwargs: Any) -> safepool.Pool:
        pool = safepool.create_pool(*args, **kwargs)
        pool.add_listener(_on_event)
        _pools["created"] += 1
        return pool

    asyncpg.create_pool = _create_pool
elif POOL == "asyncpg":
    _asyncpg_create_pool = asyncpg.create_pool

    def _create_pool(*args: Any, **kwargs: Any) -> asyncpg.pool.Pool:
        _pools["created"] += 1
        return _asyncpg_create_pool(*args, **kwargs)

    asyncpg.create_pool = _create_pool
else:
    raise RuntimeError(f"ORM_SUITE_POOL must be asyncpg or safepool, not {POOL!r}")

# Counts asyncpg's own pools on both runs: on the safepool run any such pool
# is one the redirect missed (an ORM that bound create_pool at import time).
_asyncpg_pool_init = asyncpg.pool.Pool.__init__


def _counting_init(self: Any, *args: Any, **kwargs: Any) -> None:
    _pools["asyncpg_pool_objects"] += 1
    _asyncpg_pool_init(self, *args, **kwargs)


asyncpg.pool.Pool.__init__ = _counting_init  # type: ignore[method-assign]


class _Collector(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        _records.append(
            {
                "test": _current_test,
                "logger": record.name,
                "level": record.levelname,
                "event": getattr(record, "event", None),
                "message": message.splitlines()[0] if message else "",
            }
        )


_collector = _Collector(logging.WARNING)
for _name, _level in (("safepool", logging.WARNING), ("asyncpg.pool", logging.WARNING), ("asyncio", logging.ERROR)):
    _logger = logging.getLogger(_name)
    _logger.addHandler(_collector)
    if _logger.level == logging.NOTSET or _logger.level > _level:
        _logger.setLevel(_level)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_logstart(nodeid: str, location: Any) -> None:
    global _current_test
    _current_test = nodeid


def pytest_runtest_logfinish(nodeid: str, location: Any) -> None:
    global _current_test
    _current_test = f"(after {nodeid})"


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    xfail = hasattr(report, "wasxfail")
    if report.when == "call":
        if xfail:
            _outcomes["xfailed" if report.skipped else "xpassed"].append(report.nodeid)
        elif report.outcome in ("passed", "failed", "skipped"):
            _outcomes[report.outcome].append(report.nodeid)
    elif report.failed:
        _outcomes["error"].append(f"{report.nodeid} ({report.when})")
    elif report.skipped and report.when == "setup":
        _outcomes["xfailed" if xfail else "skipped"].append(report.nodeid)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if not REPORT:
        return
    with open(REPORT, "w", encoding="utf-8") as file:
        json.dump(
            {
                "pool": POOL,
                "exitstatus": int(exitstatus),
                "outcomes": _outcomes,
                "pools": _pools,
                "events": _events,
                "records": _records,
            },
            file,
            indent=1,
        )
