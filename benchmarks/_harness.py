"""Interleaved, paired measurement and the ratio table.

Design note. Absolute times mean little on a shared machine: a neighbour's
test run can slow a batch by 2x. So every claim is a ratio between two
contenders measured in the same rounds: each round times one batch of every
contender, back to back, in a rotating order, and a ratio is the median over
rounds of the per-round ratio. A slow spell then hits both sides of a pair
and cancels out; what remains is the noise *within* a round, which the median
over rounds damps.

Times are taken inside the event loop (``perf_counter`` around the batch), so
``run_until_complete``'s own start and stop cost is not counted; setup and
teardown (opening pools, spawning waiting tasks) are never timed.
"""

from __future__ import annotations

import asyncio
import gc
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from .standings import cpu_model


@dataclass(frozen=True)
class Mode:
    """How long to measure. Quick mode is the CI guard; full mode is for the record."""

    name: str
    batch_seconds: float  # wall time aimed at for one timed batch
    rounds: int  # rounds for the cheap benchmarks
    slow_rounds: int  # rounds for the benchmarks whose setup is expensive (scaling)
    contended_rounds: int
    leases_per_task: int  # contended benchmarks: leases each of the 100 tasks takes per round
    handoffs: int  # scaling and floor benchmarks: empty leases or hand-offs per round
    memory_leases: int
    retries: int  # re-measure up to this many times before failing a guard
    calibrate: bool  # also measure the lean pool (issue 14's calibration rows; reported only)


QUICK = Mode("quick", batch_seconds=0.02, rounds=21, slow_rounds=5, contended_rounds=7, leases_per_task=10, handoffs=10_000,
             memory_leases=50_000, retries=2, calibrate=False)
FULL = Mode("full", batch_seconds=0.2, rounds=41, slow_rounds=15, contended_rounds=21, leases_per_task=50, handoffs=50_000,
            memory_leases=1_000_000, retries=0, calibrate=True)

# A guard is the target plus this much, for noise (see docs/performance.md).
NOISE_MARGIN = 0.20


class Contender:
    """One side of a comparison.

    ``run(n)`` does n operations. ``setup``/``teardown`` bracket the whole
    measurement, or every round when ``per_round`` is true (for contenders
    whose state must be rebuilt, like thousands of parked tasks)."""

    name: str = "?"
    per_round: bool = False

    async def setup(self) -> None:
        return None

    async def run(self, n: int) -> None:
        raise NotImplementedError

    async def teardown(self) -> None:
        return None

    async def settle(self) -> None:
        """Wait (timed) for work the last batch left running in the background."""
        return None

    def start_timing(self) -> None:
        """Called after calibration, before the first timed round: drop samples the probes left."""
        return None

    async def close(self) -> None:
        """Called once after the last round (per-round contenders keep a pool here)."""
        return None


@dataclass
class Measurement:
    name: str
    n: int  # operations per batch
    per_op: list[float] = field(default_factory=list)  # wall seconds per operation, one entry per round
    cpu_per_op: list[float] = field(default_factory=list)  # this process's CPU seconds per operation

    @property
    def median(self) -> float:
        return statistics.median(self.per_op)

    @property
    def cpu_median(self) -> float:
        return statistics.median(self.cpu_per_op)


def paired_ratio(a: Measurement, b: Measurement, *, cpu: bool = False) -> float:
    """Median over rounds of a's time over b's time in the same round
    (wall time, or with ``cpu`` this process's CPU time: the client's own
    work, without the server's and without time spent waiting for it)."""
    xs, ys = (a.cpu_per_op, b.cpu_per_op) if cpu else (a.per_op, b.per_op)
    return statistics.median(x / y for x, y in zip(xs, ys, strict=True))


async def _timed(contender: Contender, n: int) -> tuple[float, float]:
    start, start_cpu = time.perf_counter(), time.process_time()
    await contender.run(n)
    # Work the batch started but left to the pool's own tasks (safepool's
    # background resets) is part of its cost: wait for it inside the timing.
    await contender.settle()
    return time.perf_counter() - start, time.process_time() - start_cpu


def _probe(loop: asyncio.AbstractEventLoop, contender: Contender, n: int) -> float:
    if contender.per_round:
        loop.run_until_complete(contender.setup())
    try:
        return loop.run_until_complete(_timed(contender, n))[0]
    finally:
        if contender.per_round:
            loop.run_until_complete(contender.teardown())


def _calibrate(loop: asyncio.AbstractEventLoop, contender: Contender, seconds: float) -> int:
    """Pick a batch size that takes about ``seconds``; the probes double as
    warm-up. The best of three probes at the last size sets it, so one burst
    of load on the machine does not shrink every batch."""
    n = 16
    while _probe(loop, contender, n) < seconds / 4 and n < 1 << 22:
        n *= 4
    elapsed = min(_probe(loop, contender, n) for _ in range(3))
    return max(1, round(n * seconds / max(elapsed, 1e-9)))


def measure_interleaved(
    loop: asyncio.AbstractEventLoop,
    contenders: list[Contender],
    *,
    rounds: int,
    batch_seconds: float | None = None,
    sizes: dict[str, int] | None = None,
) -> dict[str, Measurement]:
    """Time every contender once per round, in a rotating order.

    Batch sizes come from ``sizes`` (by name) or are calibrated to about
    ``batch_seconds``."""
    results: dict[str, Measurement] = {}
    persistent = [c for c in contenders if not c.per_round]
    for contender in persistent:
        loop.run_until_complete(contender.setup())
    try:
        for contender in contenders:
            if sizes is not None and contender.name in sizes:
                n = sizes[contender.name]
                if not contender.per_round:
                    _probe(loop, contender, min(n, 100))  # warm-up (calibration warms the others)
            else:
                assert batch_seconds is not None, f"no batch size for {contender.name}"
                n = _calibrate(loop, contender, batch_seconds)
            results[contender.name] = Measurement(contender.name, n)
            contender.start_timing()
        count = len(contenders)
        for round_no in range(rounds):
            shift = round_no % count
            for contender in contenders[shift:] + contenders[:shift]:
                measurement = results[contender.name]
                if contender.per_round:
                    loop.run_until_complete(contender.setup())
                gc.collect()
                try:
                    elapsed, cpu = loop.run_until_complete(_timed(contender, measurement.n))
                finally:
                    if contender.per_round:
                        loop.run_until_complete(contender.teardown())
                measurement.per_op.append(elapsed / measurement.n)
                measurement.cpu_per_op.append(cpu / measurement.n)
    finally:
        for contender in persistent:
            loop.run_until_complete(contender.teardown())
        for contender in contenders:
            loop.run_until_complete(contender.close())
    return results


# ------------------------------------------------------------------ the table


@dataclass
class Row:
    """One line of the ratio table. Lower is better for every value."""

    bench: str  # e.g. "1 empty lease"
    metric: str  # what the value is, e.g. "safepool / asyncpg time per lease"
    value: float
    target: float | None  # the goal (None: reported only)
    guard: float | None  # CI fails above this (None: not guarded)
    detail: str = ""  # the absolute numbers behind the ratio
    unit: str = "x"
    attempts: list[float] = field(default_factory=list)
    standing: str | None = None  # the key its guard's standing has in standings.json
    steal: list[float | None] = field(default_factory=list)  # per attempt: share of CPU time stolen (with_retry)

    @property
    def guard_text(self) -> str:
        return _fmt(self.guard, self.unit)

    @property
    def failed(self) -> bool:
        return self.guard is not None and self.value > self.guard

    @property
    def status(self) -> str:
        if self.failed:
            return "FAIL"
        if self.target is None:
            # (A row with no target of its own may guard one that has:
            # row 1's guard, where the row stands plus the margin.)
            return "reported" if self.guard is None else "within guard"
        return "met" if self.value <= self.target else "missed"


def guard_for(target: float) -> float:
    """The guard of a row whose target is within reach: the target plus the margin."""
    return round(target * (1 + NOISE_MARGIN), 3)


def guard_at(target: float, stands_at: float) -> float:
    """The guard of a row with a target, given where quick runs on this loop
    put it (``stands_at``, a ratio): where it stands plus the margin, met or
    missed, so a regression of 25% from there fails as long as the run
    measures it less than 4% under ``stands_at`` (1.20 / 1.25 = 0.96), which is
    why ``stands_at`` is the median of recent quick runs, not their worst.
    A met row is then never guarded looser than ``guard_for(target)``; one
    that meets its target by far is guarded well under it (target + 20% would
    let a 25% regression through: the p99 wait stands at 0.18x, target 0.2x).
    The target decides the row's status, not its guard: it is an argument so
    that each call names the row's target next to where the row stands (and
    tests/unit/test_bench_guards.py checks the two agree)."""
    return round(stands_at * (1 + NOISE_MARGIN), 3)


def _fmt(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    if unit == "x":
        return f"{value:.2f}x" if value >= 0.1 else f"{value:.3f}x"
    if unit == "B":
        return f"{value:,.1f} B"
    return f"{value:.3g} {unit}"


def render_markdown(rows: Iterable[Row]) -> str:
    lines = [
        "| benchmark | ratio (lower is better) | measured | target | guard | status | absolute numbers |",
        "|---|---|---:|---:|---:|---|---|",
    ]
    for row in rows:
        value = _fmt(row.value, row.unit)
        if len(row.attempts) > 1:
            value += " (retried: " + ", ".join(_fmt(a, row.unit) for a in row.attempts) + ")"
        lines.append(
            f"| {row.bench} | {row.metric} | {value} | {_fmt(row.target, row.unit)} | "
            f"{row.guard_text} | {row.status} | {row.detail} |"
        )
    return "\n".join(lines) + "\n"


def render_text(rows: list[Row]) -> str:
    """The table for the terminal: fixed-width columns, no markdown."""
    header = (
        "benchmark",
        "ratio (lower is better)",
        "measured",
        "target",
        "guard",
        "status",
        "absolute (each side's median; a ratio is the median of per-round ratios)",
    )
    body = [
        (
            row.bench,
            row.metric,
            _fmt(row.value, row.unit) + (" (retried)" if len(row.attempts) > 1 else ""),
            _fmt(row.target, row.unit),
            row.guard_text,
            row.status,
            row.detail,
        )
        for row in rows
    ]
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header) - 1)]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=False)) + "  " + line[-1]
        for line in [header, *body]
    )


def us(seconds: float) -> str:
    return f"{seconds * 1e6:.1f} µs"


# --------------------------------------------------------------- the machine


def cpu_ticks() -> tuple[int, int] | None:
    """(busy, total) jiffies of all CPUs from ``/proc/stat``'s first line;
    None elsewhere. Busy: user, nice, system, irq and softirq; total adds
    idle, iowait and steal (time the hypervisor gave elsewhere: not this
    machine's processes, and no wait here would end it). Guest time is
    already in user's (proc(5))."""
    fields = _cpu_fields()
    if fields is None:
        return None
    user, nice, system, idle, iowait, irq, softirq, steal = fields
    busy = user + nice + system + irq + softirq
    return busy, busy + idle + iowait + steal


def _cpu_fields() -> list[int] | None:
    """The first eight jiffy counts of ``/proc/stat``'s "cpu" line (user,
    nice, system, idle, iowait, irq, softirq, steal; proc(5)), None where
    there is no such file."""
    try:
        with open("/proc/stat") as stat:
            fields = [int(x) for x in stat.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    return fields + [0] * (8 - len(fields))


def steal_ticks() -> tuple[int, int] | None:
    """(steal, total) jiffies of all CPUs from ``/proc/stat``'s first line
    (see ``cpu_ticks``), None elsewhere: the time a virtual machine's CPUs
    ran someone else's work, which no wait here ends."""
    fields = _cpu_fields()
    return None if fields is None else (fields[7], sum(fields))


def tick_share(before: tuple[int, int] | None, after: tuple[int, int] | None) -> float | None:
    """The share of the total jiffies between two readings of ``cpu_ticks``
    or ``steal_ticks`` that went to their first count (0.0 to 1.0), or None
    when a reading is missing or no time passed."""
    if before is None or after is None or after[1] <= before[1]:
        return None
    return (after[0] - before[0]) / (after[1] - before[1])


def wait_for_quiet(
    max_wait: float = 60.0,
    busy_cores: float = 0.3,
    sample: float = 1.0,
    ticks: Callable[[], tuple[int, int] | None] = cpu_ticks,
    sleep: Callable[[float], None] = time.sleep,
    cores: int | None = None,
) -> tuple[float | None, float]:
    """Wait until the machine is quiet before timing: until the other
    processes use under ``busy_cores`` CPUs (this one idles meanwhile)
    over a ``sample``-second window, for at most ``max_wait`` seconds.
    Returns (the cores busy in the last window, or None without
    ``/proc/stat``; seconds waited). On 2 cores a background job (CI's pip
    builds, a test run finishing) skews the ratios against a raw connection
    most: it leaves the client and its server backend one core to share,
    which makes the round trip cheaper and the pool's Python no cheaper."""
    cores = cores or os.cpu_count() or 1  # (all of them: /proc/stat's first line counts every CPU)
    waited = 0.0
    while True:
        before = ticks()
        sleep(sample)
        share = tick_share(before, ticks())
        if share is None:
            return None, waited + sample
        busy = share * cores
        waited += sample
        if busy < busy_cores or waited >= max_wait:
            return round(busy, 2), waited


def machine_info(server_version: str) -> dict[str, str]:
    import asyncpg

    cpu = cpu_model()
    try:
        load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        load = "?"
    return {
        "nproc": str(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()),
        "cpu": cpu,
        "os": f"{platform.system()} {platform.release()}",
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "asyncpg": asyncpg.__version__,
        "postgresql": server_version,
        "load average at start": load,
    }


def with_retry(
    mode: Mode,
    measure: Callable[[], list[Row]],
    settle: Callable[[], object] = lambda: wait_for_quiet(max_wait=10.0),
    ticks: Callable[[], tuple[int, int] | None] = steal_ticks,
) -> list[Row]:
    """Measure; while a guard fails and the mode allows (``mode.retries``),
    let the machine settle (``settle``: wait for the other processes to
    quiet down, at most 10 s: CI's 15 minutes bound the retries) and
    measure again, keeping row by row the best value: a row fails only if
    it failed every attempt. A regression does; a neighbour's burst of
    load rarely lasts through three attempts (CI of 2026-12-04: the p99
    wait row measured 0.38x and 0.48x against its 0.26x guard in two
    attempts 20 s apart, 0.18x in the run before). Each row's
    ``attempts`` lists every attempt's value and ``steal`` the share of CPU
    time the hypervisor gave elsewhere during each (``/proc/stat``; None
    where unknown), for the failure message."""
    rows: list[Row] = []
    for attempt in range(mode.retries + 1):
        if attempt:
            settle()
        before = ticks()
        again = measure()
        share = tick_share(before, ticks())
        steal = None if share is None else round(share, 3)
        if not rows:
            rows = again
            for row in rows:
                row.attempts, row.steal = [row.value], [steal]
        else:
            for kept, new in zip(rows, again, strict=True):
                kept.attempts.append(new.value)
                kept.steal.append(steal)
                if new.value < kept.value:
                    kept.value, kept.detail = new.value, new.detail
        if not any(row.failed for row in rows):
            break
    return rows
