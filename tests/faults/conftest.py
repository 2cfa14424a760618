"""Fixtures of the fault suites: a PostgreSQL cluster per module that the
tests may stop, restart and starve (see _pg.py)."""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator, Iterator
from typing import Any

import asyncpg
import pytest
import pytest_asyncio

from ._pg import Cluster, start_cluster


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    c = start_cluster()
    try:
        yield c
    finally:
        c.cleanup()


@pytest.fixture
def running(cluster: Cluster) -> Iterator[Cluster]:
    """The module's cluster, started again after the test if it stopped it."""
    if not cluster.is_running():
        cluster.start()
    try:
        yield cluster
    finally:
        if not cluster.is_running():
            cluster.start()


@pytest.fixture
def report(request: pytest.FixtureRequest) -> Any:
    """``report(**figures)``: print measured figures and, when
    SAFEPOOL_FAULT_REPORT names a file, append them to it as a JSON line."""

    def emit(**figures: Any) -> None:
        line = {"test": request.node.nodeid, **figures}
        print(json.dumps(line))
        path = os.environ.get("SAFEPOOL_FAULT_REPORT")
        if path:
            with open(path, "a") as f:
                f.write(json.dumps(line) + "\n")

    return emit


@pytest_asyncio.fixture
async def admin(running: Cluster, app_name: str) -> AsyncIterator[asyncpg.Connection]:
    """A superuser connection to the running cluster, for pg_stat_activity
    (``count_backends``) and pg_terminate_backend. Every backend of the
    test's ``app_name`` is terminated after the test: one a bug left
    running its statement must not outlive it."""
    con = await asyncpg.connect(running.admin_dsn)
    try:
        yield con
    finally:
        await con.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1", app_name
        )
        await con.close()
