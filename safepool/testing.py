"""pytest plugin: fail tests that leak safepool connections (work in progress)."""

from __future__ import annotations

from typing import Any


def pytest_addoption(parser: Any) -> None:
    group = parser.getgroup("safepool")
    group.addoption(
        "--safepool-leaks",
        action="store_true",
        default=False,
        help="fail every test that ends with a safepool connection still leased",
    )
