"""safepool's own Python per lease, in bytecode instructions: a budget that
no host's speed moves (docs/performance.md, "The hot path's bytecode budget").

    python -m benchmarks.bytecodes DSN            # print the counts and the budget
    python -m benchmarks.bytecodes DSN --write    # record them as the budget
    python -m benchmarks.bytecodes DSN --census contended   # every frame's, by group and function

The time guards of ``benchmarks/test_ratios.py`` stand where the row stands
on the machine plus 20%, and a host that runs Python slower moves every
row against a raw connection (docs/performance.md, "A slow host"). This
count does not move: the interpreter executes the same instructions of
safepool's code for the same lease on any host, loaded or idle, on asyncio
or uvloop. ``sys.settrace`` with ``f_trace_opcodes`` counts each bytecode
instruction executed in a frame whose code lives in safepool's package
(``safepool/*.py`` and its subpackages: asyncpg's Cython, asyncio's Python
and the caller's code are not counted), over ``LEASES`` leases of each
workload after a warm-up, and divides. The counts of one tree agree to
within 0.05% from run to run.

A lease in which safepool executes more than ``OVER`` (5%) above its budget
fails ``tests/integration/test_bytecode_budget.py``, as does one more than
``UNDER`` (10%) below it: a cut is recorded with ``--write`` and the budget
follows it down, so it never drifts loose. Budgets are per Python minor
version and asyncpg minor version (bytecode differs between Pythons, and
``safepool/_compat.py`` takes other paths on other asyncpg versions); a
pair without one is skipped by the test, which says how to record it.

What it does not see: the cost of an instruction (a slow C call counts one),
and asyncpg's or the kernel's work per lease. ``benchmarks.instructions``
(Valgrind) sees those, in minutes; this takes seconds and runs in every
test run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections import Counter
from collections.abc import Callable, Coroutine
from pathlib import Path
from types import FrameType
from typing import Any, TypeVar

import asyncpg

import safepool

from ._workloads import MAX_SIZE, SAFETY_ON, contended_leases, serial_leases

LEASES = 400  # per workload; the contended one runs CONTENDED_TASKS tasks of LEASES // CONTENDED_TASKS
WARM_UP = 50
OVER = 1.05  # a count past budget * OVER fails
UNDER = 0.90  # a count under budget * UNDER fails too: record the cut
WORKLOADS = ("empty", "query", "auto", "safety", "contended")
BUDGETS = Path(__file__).with_name("bytecodes.json")
_PACKAGE = os.path.dirname(os.path.abspath(safepool.__file__)) + os.sep


class _Counter:
    """A ``sys.settrace`` tracer that counts the opcode events of safepool's frames."""

    def __init__(self) -> None:
        self.instructions = 0
        self._mine: dict[str, bool] = {}  # one entry per source file

    def on_call(self, frame: FrameType, event: str, arg: Any) -> Any:
        # 'call' comes for every new frame and every resumed coroutine
        # frame; a coroutine's frame keeps f_trace_opcodes once set.
        filename = frame.f_code.co_filename
        mine = self._mine.get(filename)
        if mine is None:
            mine = self._mine[filename] = self._counts(filename)
        if not mine:
            return None
        frame.f_trace_opcodes = True
        frame.f_trace_lines = False
        return self._on_event

    def _counts(self, filename: str) -> bool:
        return filename.startswith(_PACKAGE)

    def _on_event(self, frame: FrameType, event: str, arg: Any) -> Any:
        if event == "opcode":
            self.instructions += 1
        return self._on_event


class _Census(_Counter):
    """Counts the opcode events of every frame, the pool's or not (asyncio's
    event loop, asyncpg's Python, the workload's own loop), per function."""

    def __init__(self) -> None:
        super().__init__()
        self.by_function: Counter[tuple[str, str]] = Counter()  # (source file, qualified name)

    def _counts(self, filename: str) -> bool:
        return True

    def _on_event(self, frame: FrameType, event: str, arg: Any) -> Any:
        if event == "opcode":
            self.instructions += 1
            code = frame.f_code
            self.by_function[(code.co_filename, code.co_qualname)] += 1
        return self._on_event


# Where a source file's instructions are filed in a census, by path.
CENSUS_GROUPS = ("safepool", "asyncio", "selectors", "asyncpg", "workload", "other")


def census_group(filename: str) -> str:
    """One of ``CENSUS_GROUPS`` for a code object's ``co_filename``."""
    if filename.startswith(_PACKAGE):
        return "safepool"
    if f"{os.sep}asyncio{os.sep}" in filename:
        return "asyncio"
    if filename.endswith(f"{os.sep}selectors.py"):
        return "selectors"
    if f"{os.sep}asyncpg{os.sep}" in filename:
        return "asyncpg"
    if filename.startswith(os.path.dirname(os.path.abspath(__file__)) + os.sep):
        return "workload"
    return "other"


async def census(dsn: str, workload: str, leases: int = LEASES) -> tuple[float, dict[tuple[str, str], float]]:
    """Every bytecode instruction the process executes per lease of
    ``workload``, not only safepool's: ``(total, {(file, function): per
    lease})``. What the pool's share of the client's Python is, beside the
    event loop's and asyncpg's (docs/performance.md, "What limits each
    benchmark"); C code (asyncpg's protocol, the kernel) is not seen."""
    counter = await _traced(dsn, workload, leases, _Census)
    return counter.instructions / leases, {key: n / leases for key, n in counter.by_function.items()}


def _print_census(workload: str, total: float, functions: dict[tuple[str, str], float], top: int = 25) -> None:
    groups = dict.fromkeys(CENSUS_GROUPS, 0.0)
    for (filename, _), n in functions.items():
        groups[census_group(filename)] += n
    print(f"every bytecode instruction per {workload} lease: {total:,.1f}")
    for group in CENSUS_GROUPS:
        if groups[group]:
            print(f"  {group:10s} {groups[group]:9,.1f}  {groups[group] / total:6.1%}")
    print(f"the {top} functions that execute the most:")
    for (filename, name), n in sorted(functions.items(), key=lambda item: -item[1])[:top]:
        print(f"  {n:9,.1f}  {census_group(filename):10s} {name} ({os.path.basename(filename)})")


async def _open(dsn: str, workload: str) -> tuple[Any, Callable[[int], Coroutine[Any, Any, None]]]:
    if workload == "contended":
        pool = await safepool.create_pool(dsn, min_size=MAX_SIZE, max_size=MAX_SIZE)
        return pool, contended_leases(pool)
    options = {"auto": {"reset_mode": "auto"}, "safety": SAFETY_ON}.get(workload, {})
    pool = await safepool.create_pool(dsn, min_size=1, max_size=1, **options)
    return pool, serial_leases(pool, query=workload != "empty")


async def count(dsn: str, workload: str, leases: int = LEASES) -> float:
    """Bytecode instructions safepool executes per lease of ``workload``
    (one of ``WORKLOADS``), on a pool of its own that it closes. Each run
    is a task of its own, so the acquire stack that ``safety`` captures is
    the same wherever this is called from. Replaces any tracer for the
    run and restores it after."""
    return (await _traced(dsn, workload, leases, _Counter)).instructions / leases


_C = TypeVar("_C", bound=_Counter)


async def _traced(dsn: str, workload: str, leases: int, counter_class: type[_C]) -> _C:
    """Run ``leases`` leases of ``workload`` on a pool of its own (closed
    after), under a fresh ``counter_class`` tracer, after a warm-up; the
    tracer set before is restored."""
    if workload not in WORKLOADS:
        raise ValueError(f"workload must be one of {', '.join(WORKLOADS)}, not {workload!r}")
    pool, run = await _open(dsn, workload)
    previous = sys.gettrace()
    try:
        # Python 3.12 and later trace through sys.monitoring: a frame's
        # f_trace_opcodes asks for opcode events, which come only once a
        # tracer is set after that (the first count of a process read 0.0
        # per lease on 3.12). The warm-up runs under a counter of its own.
        sys.settrace(counter_class().on_call)
        try:
            await asyncio.create_task(run(WARM_UP))
        finally:
            sys.settrace(previous)
        counter = counter_class()
        sys.settrace(counter.on_call)
        try:
            await asyncio.create_task(run(leases))
        finally:
            sys.settrace(previous)
        return counter
    finally:
        await pool.close()


async def count_all(dsn: str) -> dict[str, float]:
    """``{workload: instructions per lease}`` for every workload."""
    return {workload: await count(dsn, workload) for workload in WORKLOADS}


def version_key() -> str:
    """``"<python minor>/<asyncpg minor>"``, e.g. ``"3.11/0.32"``: the key of a budget."""
    asyncpg_minor = ".".join(asyncpg.__version__.split(".")[:2])
    return f"{sys.version_info[0]}.{sys.version_info[1]}/{asyncpg_minor}"


def load_budgets() -> dict[str, dict[str, float]]:
    """Every recorded budget, by ``version_key()``."""
    return json.loads(BUDGETS.read_text())  # type: ignore[no-any-return]


def verdicts(counts: dict[str, float], budget: dict[str, float]) -> list[str]:
    """What is wrong with ``counts`` against ``budget``, one line per workload
    past ``OVER`` or under ``UNDER`` (or without a budget); empty when all hold."""
    wrong = []
    for workload, measured in counts.items():
        allowed = budget.get(workload)
        if allowed is None:
            wrong.append(f"{workload}: {measured:,.1f} per lease, and no budget recorded for it")
        elif measured > allowed * OVER:
            wrong.append(f"{workload}: {measured:,.1f} per lease, {measured / allowed - 1:+.1%} over its "
                         f"budget of {allowed:,.1f} (fails past {OVER - 1:+.0%})")
        elif measured < allowed * UNDER:
            wrong.append(f"{workload}: {measured:,.1f} per lease, {measured / allowed - 1:+.1%} under its "
                         f"budget of {allowed:,.1f}: record the cut (python -m benchmarks.bytecodes DSN --write)")
    return wrong


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dsn", help="a PostgreSQL DSN (a workload opens up to 10 connections)")
    parser.add_argument("--write", action="store_true",
                        help=f"record the counts as this Python's and asyncpg's budget in {BUDGETS.name}")
    parser.add_argument("--census", choices=WORKLOADS, metavar="WORKLOAD",
                        help="count every frame's instructions in one workload (asyncio's and asyncpg's "
                             "too), by group and function, and print them (no budget check)")
    args = parser.parse_args()
    if args.census:
        _print_census(args.census, *asyncio.run(census(args.dsn, args.census)))
        return
    counts = asyncio.run(count_all(args.dsn))
    key = version_key()
    budgets = load_budgets()
    budget = budgets.get(key, {})
    print(f"safepool's bytecode instructions per lease (Python/asyncpg {key})")
    for workload, measured in counts.items():
        allowed = budget.get(workload)
        against = f"budget {allowed:,.1f} ({measured / allowed - 1:+.2%})" if allowed else "no budget"
        print(f"  {workload:10s} {measured:9,.1f}   {against}")
    if args.write:
        budgets[key] = {workload: round(measured, 1) for workload, measured in counts.items()}
        BUDGETS.write_text(json.dumps(budgets, indent=2, sort_keys=True) + "\n")
        print(f"recorded in {BUDGETS}")
    elif wrong := verdicts(counts, budget) if budget else []:
        print("\n".join(wrong))
        sys.exit(1)


if __name__ == "__main__":
    main()
