"""The combined-fault stress tool (``tests/faults/stress_combined.py``, a
manual tool pytest does not collect) still runs: a short seeded run of each
loop finds nothing. It once drifted from the runner it wraps
(``Runner.slot_closed`` gained an argument): every close then raised inside
the pool's task and its runs hung, unnoticed until a review used it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

TOOL = Path(__file__).with_name("stress_combined.py")
ROOT = TOOL.parents[2]


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_a_short_stress_run_finds_nothing(pg_dsn: str, loop: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, str(TOOL), "--dsn", pg_dsn, "--seed", "3", "--ops", "300", "--loop", loop],
        capture_output=True, text=True, timeout=60, env=env, cwd=ROOT,
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    assert lines, done.stdout[-2000:] + done.stderr[-2000:]
    report = json.loads(lines[-1])
    assert report["n_findings"] == 0, report["findings"]
    assert done.returncode == 0
    assert report["outcomes"].get("ok", 0) > 0  # it did work
    assert report["counters"]["acquired"] > 0
