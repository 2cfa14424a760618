"""Fixtures of the fault suites: a PostgreSQL cluster per module that the
tests may stop, restart and starve (see _pg.py)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any

import pytest

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
