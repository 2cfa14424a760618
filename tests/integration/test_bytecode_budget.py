"""The hot path's bytecode budget (``benchmarks/bytecodes.py``): safepool's
own Python per lease, counted on a real PostgreSQL, stays within 5% above
and 10% below what ``benchmarks/bytecodes.json`` records for this Python
and asyncpg, and the guard fails a lease that runs more of safepool's
code. Unlike the time guards, the count is the same on a slow or loaded
host and on either loop, so it runs with the tests, not in the solo run."""

from __future__ import annotations

import math
from typing import Any

import pytest

from benchmarks import bytecodes
from safepool._state import PoolState


def _budget() -> dict[str, float]:
    key = bytecodes.version_key()
    budget = bytecodes.load_budgets().get(key)
    if budget is None:
        pytest.skip(f"no bytecode budget recorded for Python/asyncpg {key}: "
                    "python -m benchmarks.bytecodes DSN --write records one")
    return budget


@pytest.mark.asyncio
async def test_every_workload_stays_within_its_budget(pg_dsn: str) -> None:
    budget = _budget()
    counts = await bytecodes.count_all(pg_dsn)
    assert set(counts) == set(bytecodes.WORKLOADS)
    assert not bytecodes.verdicts(counts, budget), "\n".join(bytecodes.verdicts(counts, budget))


def _filler_in_the_package() -> Any:
    """A function whose code lives in safepool's package (so its bytecode
    counts as safepool's): ``filler(n)`` runs 3 instructions per turn."""
    source = "def filler(n):\n    for _ in range(n):\n        pass\n"
    namespace: dict[str, Any] = {}
    exec(compile(source, bytecodes._PACKAGE + "_filler.py", "exec"), namespace)
    return namespace["filler"]


@pytest.mark.asyncio
async def test_the_guard_fails_a_query_lease_that_runs_past_5_percent_over(
    pg_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Instructions added inside the release, enough to take the query
    lease 1% of its budget past the 5% over it the guard allows (about 60-110
    on Python 3.11: what the tree runs now may be up to 10% under the
    budget recorded, which a cut leaves until it is recorded again)."""
    budget = _budget()
    filler = _filler_in_the_package()
    now = await bytecodes.count(pg_dsn, "query")
    turns = math.ceil((budget["query"] * (bytecodes.OVER + 0.01) - now) / 3)
    original = PoolState.release

    def slower(self: PoolState, *args: Any, **kwargs: Any) -> Any:
        filler(turns)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(PoolState, "release", slower)
    measured = await bytecodes.count(pg_dsn, "query")
    assert measured > budget["query"] * bytecodes.OVER
    [verdict] = bytecodes.verdicts({"query": measured}, budget)
    assert verdict.startswith("query:") and "over its budget" in verdict


@pytest.mark.parametrize(
    ("ratio", "says"),
    [(1.0, None), (1.049, None), (1.06, "over its budget"), (0.91, None), (0.89, "record the cut")],
)
def test_verdicts_fail_past_5_percent_over_and_10_percent_under(ratio: float, says: str | None) -> None:
    found = bytecodes.verdicts({"query": 1000.0 * ratio}, {"query": 1000.0})
    if says is None:
        assert found == []
    else:
        [verdict] = found
        assert says in verdict


def test_a_workload_without_a_budget_is_named() -> None:
    [verdict] = bytecodes.verdicts({"auto": 770.0}, {"query": 1000.0})
    assert verdict.startswith("auto:") and "no budget" in verdict


@pytest.mark.asyncio
async def test_an_unknown_workload_is_refused(pg_dsn: str) -> None:
    with pytest.raises(ValueError, match="workload must be one of empty, query"):
        await bytecodes.count(pg_dsn, "bogus")


def test_every_recorded_budget_names_every_workload() -> None:
    for key, budget in bytecodes.load_budgets().items():
        assert set(budget) == set(bytecodes.WORKLOADS), key


@pytest.mark.asyncio
async def test_the_census_files_every_instruction_and_finds_the_pools_own(pg_dsn: str, loop_name: str) -> None:
    """``--census``: the groups add up to the total, safepool's group is what
    the budget counts, and a query lease shows the event loop and asyncpg
    too (a census that saw only safepool's frames would read them as 0).
    On uvloop the loop is compiled: asyncio's Python runs next to nothing."""
    total, functions = await bytecodes.census(pg_dsn, "query")
    groups = {group: 0.0 for group in bytecodes.CENSUS_GROUPS}
    for (filename, _), n in functions.items():
        groups[bytecodes.census_group(filename)] += n
    assert sum(groups.values()) == pytest.approx(total)
    own = await bytecodes.count(pg_dsn, "query")
    assert groups["safepool"] == pytest.approx(own, rel=0.01)
    assert groups["asyncpg"] > 50
    if loop_name == "uvloop":
        assert groups["asyncio"] < 5, groups
    else:
        assert groups["asyncio"] > 100, groups
    assert groups["safepool"] < total
