"""The benchmark guards (benchmarks/_harness.py): tight enough that a 25%
regression of a targeted row fails CI (issue 14's "done when")."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from benchmarks._harness import guard_at, guard_for

RATIOS = Path(__file__).parents[2] / "benchmarks" / "test_ratios.py"


def test_a_met_row_is_guarded_at_its_target_plus_the_margin() -> None:
    assert guard_at(0.2, 0.17) == guard_for(0.2) == 0.24
    assert guard_at(1.2, 1.2) == 1.44


@pytest.mark.parametrize("target, stands_at", [(0.85, 0.92), (1.05, 1.09), (0.75, 0.87), (0.03, 0.034)])
def test_a_missed_row_fails_on_a_25_percent_regression_from_where_it_stands(target: float, stands_at: float) -> None:
    guard = guard_at(target, stands_at)
    assert stands_at < guard < stands_at * 1.25
    assert guard < stands_at * 0.97 * 1.25  # still caught when measured 3% under where it stands


def test_every_targeted_row_takes_its_guard_from_guard_at_or_guard_for() -> None:
    # No hand-written "standing" number far above the target: each Row(...)
    # with a target passes guard_at(target, bench.stands(asyncio, uvloop)),
    # guard_for(target), or (memory) the target itself.
    rows = [node for node in ast.walk(ast.parse(RATIOS.read_text()))
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "Row"]
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
