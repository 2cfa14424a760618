"""Turns the runs' raw records into the numbers the replay reports: a
per-second timeline, a summary per pool, the side-by-side table, JSON."""

from __future__ import annotations

import math
import os
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

from rich.console import Console
from rich.table import Table

from .config import POOL_LABELS, ReplayConfig
from .load import TRANSPORT_ERROR, RequestRecord
from .runner import PoolRun

HEALTHY = 0.99  # a second counts as healthy when at least 99% of its answers succeeded


def error_kind(status: int) -> str:
    if status == 500:
        return "500"
    if status == 503:
        return "503"
    if status == TRANSPORT_ERROR:
        return "transport"
    return "other"


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100)."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


@dataclass(slots=True)
class Second:
    t: int  # answers completed in [t, t+1) seconds since the run started
    requests: int
    ok: int
    errors_500: int
    errors_503: int
    errors_other: int
    p50_ms: float | None
    p99_ms: float | None
    server_connections: int | None
    pool_in_use: int | None
    waiting: int | None
    in_flight: int | None
    leaks_detected: int | None

    @property
    def success(self) -> float | None:
        return self.ok / self.requests if self.requests else None


@dataclass(slots=True)
class Summary:
    pool: str
    label: str
    requests: int
    leaking_requests: int
    success: float  # share of all requests answered 2xx
    success_non_leaking: float  # the same, leaving out requests that hit the buggy branch
    success_last_10s: float | None  # the share in the last 10 seconds of the load
    errors: dict[str, int]  # "500", "503", "other", "transport"
    p50_ms: float | None
    p99_ms: float | None
    first_failure_s: float | None  # after the leak started; None: no failure
    recovery_s: float | None  # from the first failure to the last unhealthy second's end; None: n/a
    recovered: bool
    peak_server_connections: int | None
    leaked: int  # connections the service left unreleased
    leaks_detected: int  # safepool: leak + lease_expired events
    leak_events: dict[str, int]
    leak_sites: dict[str, int]  # acquired_at -> events
    leak_report: str | None
    log_records: int  # warnings and errors logged during the run (safepool.leaks included)
    timeline: list[Second] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["timeline"] = [asdict(second) | {"success": second.success} for second in self.timeline]
        return data


def timeline(run: PoolRun) -> list[Second]:
    by_second: dict[int, list[RequestRecord]] = {}
    for record in run.records:
        by_second.setdefault(int(record.done), []).append(record)
    samples = {int(round(sample.t)) - 1: sample for sample in run.samples}  # the sample at t closes second t-1
    last = max([*by_second, *samples], default=-1)
    seconds = []
    for t in range(last + 1):
        records = by_second.get(t, [])
        kinds = Counter(error_kind(r.status) for r in records if not r.ok)
        latencies = [r.latency * 1000 for r in records]
        sample = samples.get(t)
        seconds.append(
            Second(
                t=t,
                requests=len(records),
                ok=sum(r.ok for r in records),
                errors_500=kinds["500"],
                errors_503=kinds["503"],
                errors_other=kinds["other"] + kinds["transport"],
                p50_ms=percentile(latencies, 50),
                p99_ms=percentile(latencies, 99),
                server_connections=sample.server_connections if sample else None,
                pool_in_use=sample.in_use if sample else None,
                waiting=sample.waiting if sample else None,
                in_flight=sample.in_flight if sample else None,
                leaks_detected=sample.leaks_detected if sample else None,
            )
        )
    return seconds


def summarize(run: PoolRun, config: ReplayConfig) -> Summary:
    records = run.records
    seconds = timeline(run)
    non_leaking = [r for r in records if not r.leaking]
    failures = sorted(r.done for r in records if not r.ok)
    first_failure = failures[0] if failures else None
    unhealthy = [s.t for s in seconds if s.requests and (s.success or 0.0) < HEALTHY]
    recovered = True
    recovery: float | None = None
    if first_failure is not None:
        last_bad = max(unhealthy, default=None)
        last_second = max((s.t for s in seconds if s.requests), default=0)
        if last_bad is not None and last_bad >= last_second - 1:
            recovered = False  # still failing when the load stopped
        elif last_bad is not None:
            recovery = max(0.0, last_bad + 1 - first_failure)
        else:
            recovery = 0.0  # isolated failures: no second fell below the bar
    tail = [r for r in records if r.sent >= config.duration - 10]
    events = Counter(str(event["event"]) for event in run.events)
    sites = Counter(
        _relative_site(str(event.get("acquired_at")))
        for event in run.events
        if event["event"] in ("leak", "lease_expired", "leak_suspect")
    )
    connections = [s.server_connections for s in run.samples if s.server_connections is not None]
    latencies = [r.latency * 1000 for r in records]
    return Summary(
        pool=run.pool,
        label=POOL_LABELS[run.pool],
        requests=len(records),
        leaking_requests=len(records) - len(non_leaking),
        success=_share(sum(r.ok for r in records), len(records)),
        success_non_leaking=_share(sum(r.ok for r in non_leaking), len(non_leaking)),
        success_last_10s=_share(sum(r.ok for r in tail), len(tail)) if tail else None,
        errors=dict(Counter(error_kind(r.status) for r in records if not r.ok)),
        p50_ms=percentile(latencies, 50),
        p99_ms=percentile(latencies, 99),
        first_failure_s=None if first_failure is None else first_failure - config.leak_start,
        recovery_s=recovery,
        recovered=recovered,
        peak_server_connections=max(connections, default=None),
        leaked=run.leaked,
        leaks_detected=events["leak"] + events["lease_expired"],
        leak_events=dict(events),
        leak_sites=dict(sites),
        leak_report=run.leak_report,
        log_records=run.log_records,
        timeline=seconds,
    )


# The checkout (or site-packages) that holds safepool/: sites under it are
# shown relative to it ("safepool/replay/app.py:53 in customer_orders").
_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))) + os.sep


def _relative_site(site: str) -> str:
    return site[len(_ROOT):] if site.startswith(_ROOT) else site


def _share(part: int, whole: int) -> float:
    return part / whole if whole else 1.0


# ------------------------------------------------------------------ output


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _ms(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value / 1000:.2f} s" if value >= 1000 else f"{value:.0f} ms"


def _errors(summary: Summary) -> str:
    if not summary.errors:
        return "none"
    names = {"500": "HTTP 500", "503": "HTTP 503", "other": "other HTTP", "transport": "no answer"}
    return ", ".join(f"{count} {names[kind]}" for kind, count in sorted(summary.errors.items()))


def _first_failure(summary: Summary) -> str:
    if summary.first_failure_s is None:
        return "none"
    return f"{summary.first_failure_s:+.1f} s"


def _recovery(summary: Summary) -> str:
    if summary.first_failure_s is None:
        return "n/a (no failure)"
    if not summary.recovered:
        return "never (still failing at the end)"
    return f"{summary.recovery_s:.1f} s"


def _leaks(summary: Summary) -> str:
    if summary.pool == "asyncpg":
        return "none (asyncpg's pool has no leak detection)"
    kinds = ", ".join(f"{count} {name}" for name, count in sorted(summary.leak_events.items()))
    return f"{summary.leaks_detected} ({kinds})" if kinds else "0"


def _site(summary: Summary) -> str:
    if not summary.leak_sites:
        return "-"
    return "\n".join(site for site, _ in Counter(summary.leak_sites).most_common(2))


def build_table(summaries: list[Summary], config: ReplayConfig, max_connections: int) -> Table:
    table = Table(
        title=(
            f"Connection-leak replay: {config.duration:g} s per pool at {config.rate:g} req/s, "
            f"{100 * config.leak_probability:g}% of requests leak from t={config.leak_start:g} s, "
            f"pool size {config.pool_size}"
        ),
        title_justify="left",
    )
    table.add_column("", no_wrap=True)
    for summary in summaries:
        table.add_column(summary.label, overflow="fold", min_width=24)
    rows: list[tuple[str, Any]] = [
        ("requests (leaking branch)", lambda s: f"{s.requests} ({s.leaking_requests})"),
        ("success, all requests", lambda s: _pct(s.success)),
        ("success, non-leaking requests", lambda s: _pct(s.success_non_leaking)),
        ("success, last 10 s of load", lambda s: _pct(s.success_last_10s)),
        ("errors", _errors),
        ("p50 / p99 latency", lambda s: f"{_ms(s.p50_ms)} / {_ms(s.p99_ms)}"),
        ("first failure after the leak started", _first_failure),
        ("time to recovery", _recovery),
        (f"peak server connections (max {max_connections})", lambda s: str(s.peak_server_connections or "-")),
        ("connections leaked by the service", lambda s: str(s.leaked)),
        ("leaks detected by the pool", _leaks),
        ("leak source (acquired at)", _site),
    ]
    for name, render in rows:
        table.add_row(name, *(render(summary) for summary in summaries))
    return table


def verdicts(summaries: list[Summary]) -> list[str]:
    """One sentence per pool, from the measured numbers."""
    lines = []
    for s in summaries:
        if s.first_failure_s is None:
            outcome = "served every request"
        else:
            outcome = (
                f"first failure {s.first_failure_s:+.1f} s after the leak started, "
                f"{_pct(s.success_last_10s)} success in the last 10 s"
                + ("; never recovered" if not s.recovered else f"; recovered in {s.recovery_s:.1f} s")
            )
        if s.leaks_detected:
            named = f"; named the leak: {_site(s).splitlines()[0]}"
        elif s.leaked:
            named = "; the leak went unnoticed"
        else:
            named = ""
        lines.append(
            f"{s.label}: {s.leaked} connections leaked, {_pct(s.success_non_leaking)} of non-leaking "
            f"requests succeeded; {outcome}{named}."
        )
    return lines


def print_report(console: Console, summaries: list[Summary], config: ReplayConfig, max_connections: int) -> None:
    console.print(build_table(summaries, config, max_connections))
    for line in verdicts(summaries):
        console.print(line, highlight=False, markup=False)
    reports = [s.leak_report for s in summaries if s.leak_report]
    if reports:
        console.print("\nsafepool's first leak report (logger safepool.leaks), innermost frames:", markup=False)
        console.print(trim_report(reports[0]), highlight=False, markup=False, soft_wrap=True)


def trim_report(text: str, frames: int = 2) -> str:
    """The report's first line and its innermost frames (a frame is a
    'File ...' line and its source line)."""
    lines = text.rstrip().splitlines()
    starts = [i for i, line in enumerate(lines) if line.lstrip().startswith("File ")]
    if len(starts) <= frames:
        return "\n".join(lines)
    return "\n".join([lines[0], "  ...", *lines[starts[-frames] :]])


def as_json(summaries: list[Summary], config: ReplayConfig, max_connections: int, wall_s: float) -> dict[str, Any]:
    return {
        "config": config.as_dict(),
        "max_connections": max_connections,
        "wall_seconds": round(wall_s, 1),
        "pools": {s.pool: s.as_dict() for s in summaries},
        "verdicts": verdicts(summaries),
    }
