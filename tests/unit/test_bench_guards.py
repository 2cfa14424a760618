"""The benchmark guards (benchmarks/_harness.py): tight enough that a 25%
regression of a targeted row fails CI (issue 14's "done when")."""

from __future__ import annotations

import ast
import json
from collections.abc import Callable
from pathlib import Path

import pytest

from benchmarks import standings
from benchmarks._harness import FULL, QUICK, Row, cpu_ticks, guard_at, guard_for, wait_for_quiet, with_retry

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


def _target_call(row: ast.Call, method: str = "bench.target") -> ast.Call | None:
    """The ``bench.target(target, key)`` a row unpacks (``**bench.target(...)``),
    or the ``method`` given (``bench.standing_guard``), if any."""
    for keyword in row.keywords:
        value = keyword.value
        if keyword.arg is None and isinstance(value, ast.Call) and ast.unparse(value.func) == method:
            return value
    return None


def _guarded_by_the_next_row(row: ast.Call, rows: list[ast.Call]) -> bool:
    """A row with a target and no guard (``None``) whose next row in the file
    unpacks ``bench.standing_guard(key)``: row 1, whose ratio against asyncpg
    moves with the host, guarded by the empty lease against the minimal pool."""
    if len(row.args) < 5 or not (isinstance(row.args[4], ast.Constant) and row.args[4].value is None):
        return False
    after = [other for other in rows if other.lineno > row.lineno]
    return bool(after) and _target_call(min(after, key=lambda r: r.lineno), "bench.standing_guard") is not None


def test_every_targeted_row_takes_its_guard_from_its_standing_or_guard_for() -> None:
    # No hand-written "standing" number far above the target: each Row(...)
    # with a target unpacks bench.target(target, key) (guard_at on the
    # machine's standing), or passes guard_for(target) or (memory) the
    # target itself.
    rows = _row_calls()
    assert len(rows) >= 10
    for row in rows:
        if _target_call(row) is not None or _target_call(row, "bench.standing_guard") is not None:
            continue
        if _guarded_by_the_next_row(row, rows):
            continue
        target, guard = row.args[3], row.args[4]
        if isinstance(target, ast.Constant) and target.value is None:
            continue
        if isinstance(guard, ast.Call):
            assert ast.unparse(guard.func) == "guard_for", ast.unparse(row)
            assert ast.unparse(guard.args[0]) == ast.unparse(target), ast.unparse(row)
        else:
            assert ast.unparse(guard) == ast.unparse(target), ast.unparse(row)


# Rows with an issue-6 target (O(1) scaling, no growth in memory): guarded
# at target + 20% or at the target itself, whatever they stand at.
_ISSUE_6 = ("4 scaling", "6 memory")


def _targeted_rows(loop: str) -> list[tuple[str, float, str]]:
    """(row, target, standing key) for every Row that unpacks
    ``bench.target(...)`` in test_ratios.py, its target evaluated as on ``loop``."""
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
        call = _target_call(row)
        if call is None:
            companion = _target_call(row, "bench.standing_guard")
            if companion is not None:
                # No target of its own: it guards the row before it (checked
                # by test_every_targeted_row_takes_its_guard_...).
                assert isinstance(companion.args[0], ast.Constant), ast.unparse(row)
                label = f"{ast.unparse(row.args[0])} {ast.unparse(row.args[1])[:60]} ({loop})"
                found.append((label, 0.0, companion.args[0].value))
            continue
        target_node, key_node = call.args
        target = target_node.value if isinstance(target_node, ast.Constant) else names[ast.unparse(target_node)]
        assert isinstance(target, float) and isinstance(key_node, ast.Constant), ast.unparse(row)
        assert isinstance(key_node.value, str), ast.unparse(row)
        label = f"{ast.unparse(row.args[0])} {ast.unparse(row.args[1])[:60]} ({loop})"
        found.append((label, target, key_node.value))
    return found


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_every_targeted_row_fails_on_a_25_percent_regression_from_where_it_stands(loop: str) -> None:
    # The claim of docs/performance.md ("Do the guards catch a regression?"):
    # CI fails on a 25% regression of any row with an issue-14 target, met or
    # missed, on every machine with standings, even when the run measures it
    # 2% under where it stands (the median of quick runs: half of them
    # measure it under).
    rows = _targeted_rows(loop)
    assert len(rows) >= 8
    machines = standings.load()
    assert len(machines) >= 2
    loose = []
    for cpu, entry in machines.items():
        for label, target, key in rows:
            stands = entry[loop][key]
            guard = guard_at(target, stands)
            if guard >= stands * 0.98 * 1.25:
                loose.append(f"{cpu}, {label}: stands {stands}, guard {guard}")
    assert not loose, "a 25% regression passes:\n" + "\n".join(loose)


def test_every_machine_has_a_standing_for_every_guarded_row_and_no_other() -> None:
    keys = {key for loop in ("asyncio", "uvloop") for _label, _target, key in _targeted_rows(loop)}
    for cpu, entry in standings.load().items():
        for loop in ("asyncio", "uvloop"):
            assert set(entry[loop]) == keys, (cpu, loop)


def test_an_unknown_cpu_takes_each_rows_loosest_known_standing(tmp_path: Path) -> None:
    path = tmp_path / "standings.json"
    path.write_text(json.dumps({"machines": {
        "fast": {"asyncio": {"query": 0.80, "p99": 0.20}, "uvloop": {"query": 0.9, "p99": 0.1}},
        "slow": {"asyncio": {"query": 0.95, "p99": 0.15}, "uvloop": {"query": 1.0, "p99": 0.3}},
    }}))
    known = standings.for_machine("fast", "asyncio", path)
    assert known.rows == {"query": 0.80, "p99": 0.20} and known.machine == "fast"
    assert "fast" in known.note
    unknown = standings.for_machine("new", "uvloop", path)
    assert unknown.rows == {"query": 1.0, "p99": 0.3} and unknown.machine is None
    assert "none recorded for this CPU" in unknown.note


def test_a_slow_host_of_a_known_cpu_takes_the_entry_recorded_at_its_speed(tmp_path: Path) -> None:
    # The CPU model does not say how fast the host runs Python: an entry
    # recorded on a slow host of the model (its probe, µs) is taken by runs
    # whose probe is at least PROBE_MATCH of it, and only by them.
    path = tmp_path / "standings.json"
    path.write_text(json.dumps({"machines": {
        "EPYC": {"asyncio": {"auto_raw": 1.19, "empty": 0.029}, "uvloop": {"auto_raw": 1.23, "empty": 0.033}},
        "EPYC, slow host": {"cpu": "EPYC", "probe_us": 20.0,
                            "asyncio": {"auto_raw": 1.40, "empty": 0.022},
                            "uvloop": {"auto_raw": 1.45, "empty": 0.030}},
        "Xeon": {"asyncio": {"auto_raw": 1.15, "empty": 0.03}, "uvloop": {"auto_raw": 1.16, "empty": 0.03}},
    }}))
    usual = standings.for_machine("EPYC", "asyncio", path, probe_us=9.0)
    assert usual.rows == {"auto_raw": 1.19, "empty": 0.029} and usual.machine == "EPYC" and usual.probe_us is None
    assert standings.for_machine("EPYC", "asyncio", path, probe_us=11.9).machine == "EPYC"  # under 0.6 x 20
    assert standings.for_machine("EPYC", "asyncio", path).machine == "EPYC"  # no probe: the usual host
    for probe in (12.0, 20.0, 35.0):
        slow = standings.for_machine("EPYC", "uvloop", path, probe_us=probe)
        # Each row the looser of the two: the slow host's auto_raw, the usual host's empty.
        assert slow.rows == {"auto_raw": 1.45, "empty": 0.033} and slow.machine == "EPYC, slow host", probe
        assert "recorded at a probe of 20.0 µs" in slow.note and "the loosest of EPYC and EPYC, slow host" in slow.note
    # Another CPU's entries are never taken, whatever the probe.
    assert standings.for_machine("Xeon", "asyncio", path, probe_us=30.0).rows == {"auto_raw": 1.15, "empty": 0.03}
    # An unknown CPU takes the loosest standing over the usual entries: a
    # slow host's is no guess at new hardware.
    assert standings.for_machine("new", "asyncio", path, probe_us=30.0).rows == {"auto_raw": 1.19, "empty": 0.03}


def test_entries_with_different_rows_give_each_row_its_loosest_standing(tmp_path: Path) -> None:
    # A row added to the benchmarks and recorded on one entry only must not
    # break every benchmark of a host that takes two entries (KeyError).
    path = tmp_path / "standings.json"
    path.write_text(json.dumps({"machines": {
        "EPYC": {"asyncio": {"query": 0.88}, "uvloop": {"query": 0.93}},
        "EPYC, slow host": {"cpu": "EPYC", "probe_us": 20.0,
                            "asyncio": {"query": 0.82, "new_row": 1.3}, "uvloop": {"query": 0.84}},
    }}))
    assert standings.for_machine("EPYC", "asyncio", path, probe_us=25.0).rows == {"query": 0.88, "new_row": 1.3}


def test_the_interpreter_probe_times_the_interpreters_own_loop() -> None:
    # Microseconds for sum(range(1000)): a thousand iterations of the
    # interpreter's loop take between 0.5 µs (no machine this century runs
    # it faster) and 1 ms (a machine that slow cannot run the benchmarks).
    assert 0.5 < standings.interpreter_probe() < 1000


def test_only_issue_6_rows_take_a_guard_without_a_standing() -> None:
    # guard_for(target) ignores where the row stands: a row that meets its
    # target by far would pass a 25% regression. Only issue 6's rows may.
    rows = _row_calls()
    for row in rows:
        if _target_call(row) is not None or _guarded_by_the_next_row(row, rows):
            continue
        if _target_call(row, "bench.standing_guard") is not None:
            continue  # no target: guarded where it stands
        target = row.args[3]
        if not (isinstance(target, ast.Constant) and target.value is None):
            assert ast.literal_eval(row.args[0]) in _ISSUE_6, ast.unparse(row)


def test_the_empty_lease_is_guarded_against_the_minimal_pool() -> None:
    # Row 1's ratio against asyncpg moves with the host's Python speed, not
    # only with the code (0.022-0.070x for one tree on one CPU model): its
    # guard is the next row, Python against Python in the same run.
    rows = sorted(_row_calls(), key=lambda r: r.lineno)
    empty = [row for row in rows if isinstance(row.args[0], ast.Constant) and row.args[0].value == "1 empty lease"]
    assert len(empty) == 2
    assert ast.literal_eval(empty[0].args[3]) == 0.03 and _guarded_by_the_next_row(empty[0], rows)
    guard = _target_call(empty[1], "bench.standing_guard")
    assert guard is not None and ast.literal_eval(guard.args[0]) == "empty_minimal"


def test_recording_refuses_what_it_could_not_write_before_running_anything(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # A new CPU needs both loops' standings (every guarded row on both);
    # --runs 0 measures nothing. Both are refused before any benchmark runs.
    def no_benchmarks(*args: object) -> None:
        raise AssertionError("a benchmark ran")

    monkeypatch.setattr(standings, "record", no_benchmarks)
    monkeypatch.setattr(standings, "cpu_model", lambda: "a CPU with no standings")
    with pytest.raises(SystemExit):
        standings.main(["--loop", "asyncio", "--write"])
    assert "has no standings yet: record both loops" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        standings.main(["--runs", "0"])
    assert "--runs must be at least 1" in capsys.readouterr().err


def _ticks(windows: list[tuple[int, int]]) -> Callable[[], tuple[int, int]]:
    """A /proc/stat reader whose successive (busy, total) deltas are ``windows``."""
    readings = [(0, 0)]
    for busy, total in windows:
        last = readings[-1]
        readings += [(last[0] + busy, last[1] + total)] * 2  # the window's end is the next one's start
    values = iter(readings)
    return lambda: next(values)


def test_cpu_ticks_count_steal_as_elapsed_and_not_as_busy(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # proc(5): cpu user nice system idle iowait irq softirq steal guest guest_nice
    stat = tmp_path / "stat"
    stat.write_text("cpu  100 10 20 500 30 1 2 300 50 0\ncpu0 1 2 3 4 5 6 7 8 9 10\n")
    real_open = open
    monkeypatch.setattr("builtins.open", lambda path, *a, **k: real_open(stat if path == "/proc/stat" else path, *a, **k))
    assert cpu_ticks() == (133, 963)


def test_the_benchmarks_wait_until_other_processes_leave_the_cpus_idle() -> None:
    slept: list[float] = []
    # Two cores: 1.5 busy, then 0.8, then 0.2 (under 0.3): three windows.
    busy, waited = wait_for_quiet(ticks=_ticks([(150, 200), (80, 200), (20, 200)]), sleep=slept.append, cores=2)
    assert (busy, waited, slept) == (0.2, 3.0, [1.0, 1.0, 1.0])


def test_the_wait_for_a_quiet_machine_gives_up_after_max_wait() -> None:
    slept: list[float] = []
    busy, waited = wait_for_quiet(max_wait=3.0, ticks=_ticks([(200, 200)] * 10), sleep=slept.append, cores=2)
    assert (busy, waited, len(slept)) == (2.0, 3.0, 3)


def test_without_proc_stat_the_benchmarks_do_not_wait() -> None:
    slept: list[float] = []
    assert wait_for_quiet(ticks=lambda: None, sleep=slept.append, cores=2) == (None, 1.0)


def _measures(*values: float) -> tuple[Callable[[], list[Row]], list[str]]:
    """A ``measure`` giving one guarded row (guard 1.0) per call, the values
    in turn, and the log of what ran ("measure", "settle")."""
    log: list[str] = []
    it = iter(values)

    def measure() -> list[Row]:
        log.append("measure")
        return [Row("3 contended", "p99", next(it), target=0.9, guard=1.0, detail=f"run {len(log)}")]

    return measure, log


@pytest.mark.parametrize("values, attempts, kept, failed", [
    ((0.5,), [0.5], 0.5, False),  # within its guard: measured once
    ((1.4, 0.7), [1.4, 0.7], 0.7, False),
    ((1.4, 1.6, 0.8), [1.4, 1.6, 0.8], 0.8, False),  # a burst through two attempts
    ((1.4, 1.3, 1.2), [1.4, 1.3, 1.2], 1.2, True),  # a regression fails all three
])
def test_quick_mode_measures_a_failing_benchmark_again_up_to_twice_after_settling(
    values: tuple[float, ...], attempts: list[float], kept: float, failed: bool
) -> None:
    measure, log = _measures(*values)
    jiffies = iter([(0, 100), (5, 200), (5, 200), (5, 300), (5, 300), (55, 400)])
    [row] = with_retry(QUICK, measure, settle=lambda: log.append("settle"), ticks=lambda: next(jiffies))
    assert (row.attempts, row.value, row.failed) == (attempts, kept, failed)
    assert log == ["measure", *["settle", "measure"] * (len(values) - 1)]
    assert row.steal == [0.05, 0.0, 0.5][: len(values)]
    assert row.detail == f"run {2 * attempts.index(kept) + 1}"  # the kept value's own detail


def test_full_mode_measures_once_and_steal_is_none_without_proc_stat() -> None:
    measure, log = _measures(1.4)
    [row] = with_retry(FULL, measure, settle=lambda: log.append("settle"), ticks=lambda: None)
    assert (row.attempts, row.failed, row.steal, log) == ([1.4], True, [None], ["measure"])


def test_each_row_keeps_its_own_best_attempt_and_its_detail() -> None:
    """Row by row: a row past its guard only in the first attempt passes on
    the second's value; one fine at first and worse later keeps its first
    value and detail; the benchmark is re-measured while any row fails, and
    a row fails only if every attempt was past its guard."""
    runs = iter([(1.5, 0.5, 2.0), (0.9, 0.8, 1.8), (1.2, 0.95, 1.9)])
    log: list[str] = []

    def measure() -> list[Row]:
        log.append("measure")
        values = next(runs)
        attempt = log.count("measure")
        return [Row("b", metric, value, target=None, guard=1.0, detail=f"{metric} in attempt {attempt}")
                for metric, value in zip(("recovers", "steady", "regressed"), values, strict=True)]

    recovers, steady, regressed = with_retry(QUICK, measure, settle=lambda: log.append("settle"), ticks=lambda: None)
    assert log == ["measure", "settle", "measure", "settle", "measure"]
    assert (recovers.value, recovers.detail, recovers.failed) == (0.9, "recovers in attempt 2", False)
    assert (steady.value, steady.detail, steady.attempts) == (0.5, "steady in attempt 1", [0.5, 0.8, 0.95])
    assert (regressed.value, regressed.detail, regressed.failed) == (1.8, "regressed in attempt 2", True)
    assert regressed.attempts == [2.0, 1.8, 1.9] and regressed.steal == [None, None, None]
