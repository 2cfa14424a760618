"""Where each guarded row stands in quick runs, per machine and loop.

    python -m benchmarks.standings [--runs 5] [--loop asyncio|uvloop|both] [--write]

(Needs the test extra, ``pip install -e '.[test]'``: it runs pytest, and
uvloop for ``--loop uvloop``.)

Every row with an issue-14 target is guarded where it stands plus the noise
margin (``guard_at`` in ``_harness.py``), so that a 25% regression fails CI.
Where a row stands depends on the machine: the same code put the contended
row at 0.88x asyncpg on one 2-core Intel Xeon and at 0.81-0.85x on one
2-core AMD EPYC (medians of quick runs), so one machine's standings would leave the other's guards too loose (or
too tight). ``standings.json`` keeps them per CPU model (the ``model name``
of ``/proc/cpuinfo``, as the table's machine line shows it) and loop: the
median of that many quick runs.

The CPU model does not say how fast a host runs Python. On 2026-12-02 the
same 2-core AMD EPYC model ran the interpreter 2.5 times slower in the
afternoon than in the morning (``interpreter_probe()``: 19-29 µs against
about 9), while the kernel and the server slowed far less; every ratio of
safepool against a raw connection rose with it (safepool reset_mode=auto
against a raw ``SELECT 1``: 1.11-1.21x on the usual host, 1.32-1.72x on the
slow one, for 1.42x the instructions), and CI failed on a guard set from
the usual host. So an entry may also record the probe its runs measured
(``probe_us``) and the CPU it belongs to (``cpu``, when its key is a label
of its own such as "AMD EPYC, slow host"): a run takes, among its CPU's
entries, the one recorded on the slowest host it is at least
``PROBE_MATCH`` of (an entry without a probe was recorded on the usual
host and counts as the fastest), and each row takes the loosest standing
of the entries it is that slow for: a slow host's quick runs spread wider
(the empty lease at 0.017-0.037x asyncpg's time in four runs), so its own
median may not tighten a guard below the usual host's. The usual host's
guards are untouched.

On a CPU with no standings, every row takes the loosest standing of the
known machines' usual entries (a slow host's entry is no guess at new
hardware), and the run says so in the table's header: CI stays green on
new hardware, and its guards are as loose as the loosest machine's until
this command has recorded the new one.

Run as a module, it runs the quick ratio benchmarks ``--runs`` times per
loop in processes of their own (one after another: never two benchmarks at
once), prints each row's values and median, and with ``--write`` stores the
medians for this CPU in ``standings.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import timeit
from dataclasses import dataclass
from pathlib import Path

FILE = Path(__file__).with_name("standings.json")
LOOPS = ("asyncio", "uvloop")
# The tests whose rows carry a standing (test_ratios.py): the rest take none.
TESTS = "test_1_empty_lease or test_2_query_lease or test_3_contended or test_5_safety_on_vs_off"
ROWS_ENV = "SAFEPOOL_BENCH_ROWS"  # conftest.py appends each row's value to this JSON-lines file


def cpu_model() -> str:
    """This machine's CPU model, as /proc/cpuinfo names it (elsewhere
    ``platform.processor()``, or "?"): the key of its standings, and the
    ``cpu`` of the table's machine line."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


# A run takes a slow host's entry when its probe is at least this share of
# the probe that entry was recorded with: the slow AMD EPYC host measured
# 19-29 µs over a day (its entry: a median of 27.4), the usual one about 9;
# 0.6 puts the line at 16.4 µs.
PROBE_MATCH = 0.6


def interpreter_probe(readings: int = 5) -> float:
    """How fast this host runs the Python interpreter's own loop: the
    median of ``readings`` readings, each the best of 5 timings of
    ``sum(range(1000))`` in microseconds as ``python -m timeit
    "sum(range(1000))"`` prints it (about 9 µs on the usual 2-core AMD EPYC
    host with CPython 3.11, 19-29 µs on the slow one). One reading read
    16.39 µs where six more, seconds later, read 19.5-27.7: the median
    keeps one reading from picking the guards. Takes about 0.5 s on the
    slow host."""
    timer = timeit.Timer("sum(range(1000))")
    values = [min(timer.repeat(repeat=5, number=1000)) / 1000 * 1e6 for _ in range(readings)]
    return round(statistics.median(values), 2)


@dataclass(frozen=True)
class Standings:
    """The standings one run's guards are set from: ``rows`` maps a row's key
    (``"query"``, ``"contended"``...) to a ratio; ``machine`` is the CPU
    model they were recorded on, or None when this CPU has none recorded
    and each row takes the loosest known machine's."""

    rows: dict[str, float]
    machine: str | None
    probe_us: float | None = None  # the probe the entry was recorded with, if it recorded one
    merged: list[str] | None = None  # the entries whose loosest standings ``rows`` holds, if more than one

    def __getitem__(self, key: str) -> float:
        return self.rows[key]

    @property
    def note(self) -> str:
        """One line for the table's header: whose standings the guards use."""
        if self.machine is not None:
            recorded = f", recorded at a probe of {self.probe_us} µs" if self.probe_us is not None else ""
            also = ""
            if self.merged and len(self.merged) > 1:
                also = f"; each row the loosest of {' and '.join(self.merged)}"
            return f"this machine's standings ({self.machine}{recorded}{also})"
        return ("the loosest known machine's standings: none recorded for this CPU "
                "(python -m benchmarks.standings --write records them)")


def load(path: Path = FILE) -> dict[str, dict[str, dict[str, float]]]:
    """``{entry: {loop: {row key: ratio}}}`` from ``standings.json`` (an
    entry is a CPU model, or a label of a host of one: ``entries()``)."""
    machines = json.loads(path.read_text())["machines"]
    return {label: {loop: dict(entry[loop]) for loop in LOOPS} for label, entry in machines.items()}


def entries(path: Path = FILE) -> dict[str, tuple[str, float | None]]:
    """``{entry: (cpu model, probe in µs or None)}`` from ``standings.json``."""
    machines = json.loads(path.read_text())["machines"]
    return {label: (entry.get("cpu", label), entry.get("probe_us")) for label, entry in machines.items()}


def for_machine(cpu: str, loop: str, path: Path = FILE, probe_us: float | None = None) -> Standings:
    """The standings for ``cpu`` on ``loop`` ("asyncio" or "uvloop") on a
    host whose ``interpreter_probe()`` measured ``probe_us`` (None: the
    usual host): among the CPU's entries, the one with the highest recorded
    probe that ``probe_us`` is at least ``PROBE_MATCH`` of, an entry without
    a probe counting as 0 (the usual host); each row takes the loosest
    standing of every entry that ``probe_us`` qualifies for. For an unknown
    CPU, each row's loosest (highest) standing over the usual entries (those
    without a probe). Raises ``KeyError`` for an unknown loop."""
    machines = load(path)
    known = entries(path)
    mine = [(probe or 0.0, label, probe) for label, (model, probe) in known.items() if model == cpu]
    if mine:
        fits = [entry for entry in mine if entry[0] == 0.0 or (probe_us is not None and probe_us >= PROBE_MATCH * entry[0])]
        fits = fits or [min(mine)]
        _, label, probe = max(fits)
        # A slow host's quick runs spread wider (its speed varies within a
        # run): each row takes the loosest of its standings on the entries
        # this host is as slow as, never a tighter guard than the usual host's.
        return Standings(_loosest([machines[entry][loop] for _, entry, _ in fits]), label, probe,
                         [entry for _, entry, _ in sorted(fits)])
    usual = [machines[label][loop] for label, (_, probe) in known.items() if probe is None]
    return Standings(_loosest(usual), None)


def _loosest(standings: list[dict[str, float]]) -> dict[str, float]:
    """Each row's highest standing over ``standings`` (a row missing from
    some takes the others')."""
    keys = {key for rows in standings for key in rows}
    return {key: max(rows[key] for rows in standings if key in rows) for key in keys}


def _run_once(loop: str, rows_file: Path) -> None:
    command = [sys.executable, "-m", "pytest", "benchmarks/test_ratios.py", "-k", TESTS, "-p", "no:randomly",
               "-p", "no:cacheprovider", "-q", "--loop", loop]
    env = {**os.environ, ROWS_ENV: str(rows_file)}
    env.pop("SAFEPOOL_BENCH", None)  # quick mode: what CI runs
    # A guard failing is no reason to stop recording (the new machine's rows
    # may stand past the loosest known machine's): the values are written
    # before the test asserts.
    subprocess.run(command, cwd=FILE.parent.parent, env=env, check=False, stdout=subprocess.DEVNULL)


def record(runs: int, loops: list[str]) -> tuple[dict[str, dict[str, list[float]]], list[float]]:
    """Run the quick benchmarks ``runs`` times per loop, alternating the loops;
    returns ``{loop: {row key: [ratio per run]}}`` (a row's first attempt:
    a retry's better value would bias the median down) and the
    ``interpreter_probe()`` each run measured, in µs."""
    values: dict[str, dict[str, list[float]]] = {loop: {} for loop in loops}
    probes: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        for run in range(runs):
            for loop in loops:
                rows_file = Path(tmp) / f"{loop}-{run}.jsonl"
                _run_once(loop, rows_file)
                if not rows_file.exists():
                    raise SystemExit(
                        f"run {run + 1} on {loop} wrote no rows (needs pip install -e '.[test]'): run "
                        f"python -m pytest benchmarks/test_ratios.py --loop {loop} by hand to see why"
                    )
                for line in rows_file.read_text().splitlines():
                    row = json.loads(line)
                    if "probe_us" in row:
                        probes.append(row["probe_us"])
                    else:
                        values[loop].setdefault(row["standing"], []).append(row["first"])
                print(f"run {run + 1}/{runs} on {loop} (probe {probes[-1] if probes else '?'} µs): "
                      + ", ".join(f"{key} {v[-1]:.3f}" for key, v in sorted(values[loop].items())), flush=True)
    return values, probes


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.standings", description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="quick runs per loop (default 5)")
    parser.add_argument("--loop", choices=(*LOOPS, "both"), default="both", help="the loop(s) to record (default both)")
    parser.add_argument("--write", action="store_true", help="store the medians for this CPU in standings.json")
    parser.add_argument("--label", help="with --write: store them under this label (a slow host of this CPU, say), "
                        "with the CPU model and the runs' median probe; default: the CPU model's own entry")
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    loops = list(LOOPS) if args.loop == "both" else [args.loop]
    cpu = cpu_model()
    label = args.label or cpu
    if args.write and label not in load() and len(loops) < len(LOOPS):
        parser.error(f"{label} has no standings yet: record both loops (--loop both) to write them")
    if args.write and not args.label:
        # The CPU's own entry stands for its usual host: on a host as slow as
        # a labelled entry's, it would take that host's medians.
        now = interpreter_probe()
        slow = [name for name, (model, probe) in entries().items()
                if model == cpu and probe is not None and now >= PROBE_MATCH * probe]
        if slow:
            parser.error(f"this host runs Python as slowly as {slow[0]}'s (probe {now} µs): "
                         f"record it with --label, or on a usual day")
    values, probes = record(args.runs, loops)
    probe = round(statistics.median(probes), 2) if probes else None
    print(f"{cpu}: interpreter probe {probe} µs (median of {len(probes)} runs: {probes})")
    medians = {loop: {key: round(statistics.median(v), 3) for key, v in sorted(values[loop].items())}
               for loop in loops}
    for loop in loops:
        print(f"{cpu}, {loop}, medians of {args.runs} quick runs:")
        for key, median in medians[loop].items():
            spread = ", ".join(f"{v:.3f}" for v in values[loop][key])
            print(f"  {key:<16} {median:.3f}  ({spread})")
    if args.write:
        data = json.loads(FILE.read_text())
        entry = data["machines"].setdefault(label, {})
        if label != cpu:
            entry["cpu"] = cpu
        if args.label and probe is not None:  # the CPU's own entry stands for its usual host (module docstring)
            entry["probe_us"] = probe
        for loop in loops:
            entry[loop] = medians[loop]
            entry.setdefault("runs", {})[loop] = args.runs
        FILE.write_text(json.dumps(data, indent=2) + "\n")
        print(f"wrote {FILE.name} for {label}")


if __name__ == "__main__":
    main()
