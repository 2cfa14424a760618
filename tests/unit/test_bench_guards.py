"""The benchmark guards (benchmarks/_harness.py): tight enough that a 25%
regression of a targeted row fails CI (issue 14's "done when")."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from benchmarks._harness import guard_at, guard_for

RATIOS = Path(__file__).parents[2] / "benchmarks" / "test_ratios.py"


def test_a_met_row_is_guarded_where_it_stands_never_past_its_target_plus_the_margin() -> None:
    assert guard_at(0.2, 0.17) == 0.204 < guard_for(0.2)
    assert guard_at(1.2, 1.2) == guard_for(1.2) == 1.44


@pytest.mark.parametrize("target, stands_at", [(0.85, 0.92), (1.05, 1.09), (0.75, 0.87), (0.03, 0.034)])
def test_a_missed_row_fails_on_a_25_percent_regression_from_where_it_stands(target: float, stands_at: float) -> None:
    guard = guard_at(target, stands_at)
    assert stands_at < guard < stands_at * 1.25
    assert guard < stands_at * 0.97 * 1.25  # still caught when measured 3% under where it stands


def _row_calls(tree: ast.AST | None = None) -> list[ast.Call]:
    """Every ``Row(...)`` call in test_ratios.py (or in ``tree``, parsed from it)."""
    tree = ast.parse(RATIOS.read_text()) if tree is None else tree
    return [node for node in ast.walk(tree) if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "Row"]


def test_every_targeted_row_takes_its_guard_from_guard_at_or_guard_for() -> None:
    # No hand-written "standing" number far above the target: each Row(...)
    # with a target passes guard_at(target, bench.stands(asyncio, uvloop)),
    # guard_for(target), or (memory) the target itself.
    rows = _row_calls()
    assert len(rows) >= 10
    for row in rows:
        target, guard = row.args[3], row.args[4]
        if isinstance(target, ast.Constant) and target.value is None:
            continue
        if isinstance(guard, ast.Call):
            assert guard.func.id in ("guard_at", "guard_for"), ast.unparse(row)
            assert ast.unparse(guard.args[0]) == ast.unparse(target), ast.unparse(row)
            if guard.func.id == "guard_at":
                stands = guard.args[1]
                assert ast.unparse(stands.func) == "bench.stands" and len(stands.args) == 2, ast.unparse(row)
        else:
            assert ast.unparse(guard) == ast.unparse(target), ast.unparse(row)


# Rows with an issue-6 target (O(1) scaling, no growth in memory): guarded
# at target + 20% or at the target itself, whatever they stand at.
_ISSUE_6 = ("4 scaling", "6 memory")


def _targeted_rows(loop: str) -> list[tuple[str, float, float, float]]:
    """(row, target, where it stands, guard) for every Row with a target and
    a guard_at guard in test_ratios.py, evaluated as on ``loop``."""
    tree = ast.parse(RATIOS.read_text())
    uvloop = loop == "uvloop"
    # A target may be a local set per loop (floor_target = 1.20 if bench.uvloop else 1.05).
    names: dict[str, object] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            value = node.value
            if isinstance(value, ast.IfExp) and ast.unparse(value.test) == "bench.uvloop":
                value = value.body if uvloop else value.orelse
            if isinstance(value, ast.Constant):
                names[node.targets[0].id] = value.value
    found = []
    for row in _row_calls(tree):
        guard = row.args[4]
        if not (isinstance(guard, ast.Call) and getattr(guard.func, "id", None) == "guard_at"):
            continue
        target_node = row.args[3]
        target = target_node.value if isinstance(target_node, ast.Constant) else names[ast.unparse(target_node)]
        stands_node = guard.args[1]
        assert isinstance(stands_node, ast.Call) and all(isinstance(a, ast.Constant) for a in stands_node.args), (
            ast.unparse(row)
        )
        stands = stands_node.args[1 if uvloop else 0].value
        label = f"{ast.unparse(row.args[0])} {ast.unparse(row.args[1])[:60]} ({loop})"
        assert isinstance(target, float) and isinstance(stands, float)
        found.append((label, target, stands, guard_at(target, stands)))
    return found


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_every_targeted_row_fails_on_a_25_percent_regression_from_where_it_stands(loop: str) -> None:
    # The claim of docs/performance.md ("Do the guards catch a regression?"):
    # CI fails on a 25% regression of any row with an issue-14 target, met or
    # missed, even when the run measures it 2% under where it stands (the
    # median of quick runs: half of them measure it under).
    rows = _targeted_rows(loop)
    assert len(rows) >= 8
    loose = [f"{label}: stands {stands}, guard {guard} >= {stands * 0.98 * 1.25:.4f}"
             for label, _target, stands, guard in rows if guard >= stands * 0.98 * 1.25]
    assert not loose, "a 25% regression passes:\n" + "\n".join(loose)


def test_only_issue_6_rows_take_a_guard_without_a_standing() -> None:
    # guard_for(target) ignores where the row stands: a row that meets its
    # target by far would pass a 25% regression. Only issue 6's rows may.
    for row in _row_calls():
        target, guard = row.args[3], row.args[4]
        if isinstance(target, ast.Constant) and target.value is None:
            continue
        if not (isinstance(guard, ast.Call) and getattr(guard.func, "id", None) == "guard_at"):
            assert ast.literal_eval(row.args[0]) in _ISSUE_6, ast.unparse(row)
