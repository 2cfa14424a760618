"""Review h282: the replay's table on a terminal of ordinary width.

``python -m safepool replay`` prints its table at the terminal's width (only
files and pipes get 120 columns: safepool/replay/cli.py, ``_run``). The table
needs about 104: its label column does not wrap (the longest label, "peak
server connections (max_connections=30)", is 44 characters) and each pool's
column is at least 24 wide (safepool/replay/report.py:454-457,
``build_table``). rich then crops every line at the width: on an 80-column
terminal (the default of most terminal windows, where the README's first
command is run) the second column, safepool's, shows its first four
characters ("safe", "100.", "20 ("); at 40 columns both pools' columns are
gone, and the table is its row labels alone. (The tests of the report print
it 300 columns wide.)
"""

from __future__ import annotations

from io import StringIO

import pytest
from rich.console import Console

from safepool.replay.config import ReplayConfig
from safepool.replay.load import RequestRecord
from safepool.replay.report import build_table, summarize
from safepool.replay.runner import PoolRun


def _table(width: int) -> str:
    config = ReplayConfig(scenario="leak", duration=10, leak_start=0, pool_size=4)
    runs = {pool: PoolRun(pool, events=[]) for pool in ("asyncpg", "safepool")}
    runs["asyncpg"].leaked = 4
    runs["safepool"].leaked = 5
    runs["safepool"].events = [{"event": "leak", "acquired_at": "app.py:1"}] * 5
    for run in runs.values():
        run.records += [RequestRecord(i / 10, i / 10 + 0.01, 200, i < 5) for i in range(20)]
    out = StringIO()
    # As on a terminal of that width (the replay's Console() reads it from the terminal).
    Console(file=out, width=width, highlight=False).print(
        build_table([summarize(r, config) for r in runs.values()], config, 30)
    )
    return out.getvalue()


def test_the_table_shows_both_pools_at_120_columns() -> None:
    text = _table(120)
    assert "safepool.create_pool" in text and "asyncpg.create_pool" in text
    assert text.count("20 (5)") == 2
    assert "app.py:1" in text  # safepool named the leak


@pytest.mark.parametrize("width", [80, 40])
def test_the_table_shows_both_pools_on_a_narrower_terminal(width: int) -> None:
    text = _table(width)
    assert max(len(line) for line in text.splitlines()) <= width
    assert "safepool.create_pool" in text and "asyncpg.create_pool" in text, text
    assert text.count("20 (5)") == 2, text  # each pool's requests
    assert "app.py:1" in text, text  # the leak source safepool named
