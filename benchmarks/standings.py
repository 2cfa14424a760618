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

On a CPU with no standings, every row takes the loosest standing of the
known machines (the run says so in the table's header): CI stays green on
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


@dataclass(frozen=True)
class Standings:
    """The standings one run's guards are set from: ``rows`` maps a row's key
    (``"query"``, ``"contended"``...) to a ratio; ``machine`` is the CPU
    model they were recorded on, or None when this CPU has none recorded
    and each row takes the loosest known machine's."""

    rows: dict[str, float]
    machine: str | None

    def __getitem__(self, key: str) -> float:
        return self.rows[key]

    @property
    def note(self) -> str:
        """One line for the table's header: whose standings the guards use."""
        if self.machine is not None:
            return f"this machine's standings ({self.machine})"
        return ("the loosest known machine's standings: none recorded for this CPU "
                "(python -m benchmarks.standings --write records them)")


def load(path: Path = FILE) -> dict[str, dict[str, dict[str, float]]]:
    """``{cpu model: {loop: {row key: ratio}}}`` from ``standings.json``."""
    machines = json.loads(path.read_text())["machines"]
    return {cpu: {loop: dict(entry[loop]) for loop in LOOPS} for cpu, entry in machines.items()}


def for_machine(cpu: str, loop: str, path: Path = FILE) -> Standings:
    """The standings for ``cpu`` on ``loop`` ("asyncio" or "uvloop"); for an
    unknown CPU, each row's loosest (highest) standing over the known ones.
    Raises ``KeyError`` for an unknown loop."""
    machines = load(path)
    if cpu in machines:
        return Standings(machines[cpu][loop], cpu)
    keys = {key for entry in machines.values() for key in entry[loop]}
    return Standings({key: max(entry[loop][key] for entry in machines.values() if key in entry[loop])
                      for key in keys}, None)


def _run_once(loop: str, rows_file: Path) -> None:
    command = [sys.executable, "-m", "pytest", "benchmarks/test_ratios.py", "-k", TESTS, "-p", "no:randomly",
               "-p", "no:cacheprovider", "-q", "--loop", loop]
    env = {**os.environ, ROWS_ENV: str(rows_file)}
    env.pop("SAFEPOOL_BENCH", None)  # quick mode: what CI runs
    # A guard failing is no reason to stop recording (the new machine's rows
    # may stand past the loosest known machine's): the values are written
    # before the test asserts.
    subprocess.run(command, cwd=FILE.parent.parent, env=env, check=False, stdout=subprocess.DEVNULL)


def record(runs: int, loops: list[str]) -> dict[str, dict[str, list[float]]]:
    """Run the quick benchmarks ``runs`` times per loop, alternating the loops;
    returns ``{loop: {row key: [ratio per run]}}`` (a row's first attempt:
    a retry's better value would bias the median down)."""
    values: dict[str, dict[str, list[float]]] = {loop: {} for loop in loops}
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
                    values[loop].setdefault(row["standing"], []).append(row["first"])
                print(f"run {run + 1}/{runs} on {loop}: "
                      + ", ".join(f"{key} {v[-1]:.3f}" for key, v in sorted(values[loop].items())), flush=True)
    return values


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.standings", description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="quick runs per loop (default 5)")
    parser.add_argument("--loop", choices=(*LOOPS, "both"), default="both", help="the loop(s) to record (default both)")
    parser.add_argument("--write", action="store_true", help="store the medians for this CPU in standings.json")
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    loops = list(LOOPS) if args.loop == "both" else [args.loop]
    cpu = cpu_model()
    if args.write and cpu not in load() and len(loops) < len(LOOPS):
        parser.error(f"{cpu} has no standings yet: record both loops (--loop both) to write them")
    values = record(args.runs, loops)
    medians = {loop: {key: round(statistics.median(v), 3) for key, v in sorted(values[loop].items())}
               for loop in loops}
    for loop in loops:
        print(f"{cpu}, {loop}, medians of {args.runs} quick runs:")
        for key, median in medians[loop].items():
            spread = ", ".join(f"{v:.3f}" for v in values[loop][key])
            print(f"  {key:<16} {median:.3f}  ({spread})")
    if args.write:
        data = json.loads(FILE.read_text())
        entry = data["machines"].setdefault(cpu, {})
        for loop in loops:
            entry[loop] = medians[loop]
            entry.setdefault("runs", {})[loop] = args.runs
        FILE.write_text(json.dumps(data, indent=2) + "\n")
        print(f"wrote {FILE.name} for {cpu}")


if __name__ == "__main__":
    main()
