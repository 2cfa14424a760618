"""Turns the runs' raw records into the numbers the replay reports: a
per-second timeline, a summary per pool, the side-by-side table and the
verdict lines per scenario, JSON."""

from __future__ import annotations

import math
import os
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

from rich.console import Console, ConsoleOptions, RenderResult
from rich.table import Table
from rich.text import Text

from .config import POOL_LABELS, SCENARIO_TITLES, ReplayConfig, describe_options
from .load import TRANSPORT_ERROR, RequestRecord
from .runner import PoolRun

HEALTHY = 0.99  # a second counts as healthy when at least 99% of its answers succeeded
LEAK_EVENTS = ("leak", "lease_expired", "leak_suspect")
LEAK_EVENT_NAMES = {
    "leak": "reclaimed when garbage collected (leak)",
    "lease_expired": "taken back after lease_timeout (lease_expired)",
    "leak_suspect": "warned about (leak_suspect: held past leak_warning_after)",
}
TAIL = 4.0  # "the end of the load": its last seconds


def tail_seconds(config: ReplayConfig) -> float:
    """How many seconds "the end of the load" spans: its last ``TAIL``
    seconds, or the whole load when that is shorter (a ``ReplayConfig``
    built by hand; the CLI asks at least 5 s). The table's row says this many."""
    return min(TAIL, config.duration)


# The targets safepool is held to (issue 15), per scenario.
TARGET_SUCCESS = 0.99  # leak, stuck: success of non-leaking requests
TARGET_GOODPUT = 0.90  # surge: goodput during the surge, as a share of the pool's capacity
TARGET_SERVING_AGAIN = 1.0  # restart: seconds from the server accepting connections to a served request


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
    scenario: str
    pool: str
    label: str
    options: str  # the pool's configuration, as printed
    requests: int
    leaking_requests: int  # on the faulty line (leak, stuck)
    success: float  # share of all requests answered 2xx
    success_non_leaking: float  # the same, leaving out requests on the faulty line
    success_tail: float | None  # the share in the load's last tail_seconds(config) seconds
    errors: dict[str, int]  # "500", "503", "other", "transport"
    p50_ms: float | None  # latency of non-leaking requests, answered or failed
    p99_ms: float | None
    failure_p50_ms: float | None  # median time to failure of the failed requests
    goodput_rps: float  # 2xx answers per second received during the fault window (client deadline met)
    goodput_share: float | None  # surge: goodput_rps / the pool's capacity
    first_failure_s: float | None  # after the fault started; None: no failure
    recovery_s: float | None  # see recovery(); None: n/a or never
    recovered: bool
    serving_again_s: float | None  # restart: from the server accepting connections to the first 2xx answer
    marks: dict[str, float]  # fault, stopped, accepting (seconds since the run started)
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


def timeline(run: PoolRun, records: list[RequestRecord] | None = None) -> list[Second]:
    """Per-second counts of ``records`` (default: all of the run's)."""
    by_second: dict[int, list[RequestRecord]] = {}
    for record in run.records if records is None else records:
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


def fault_window(config: ReplayConfig) -> tuple[float, float]:
    """The answers a scenario's goodput counts, by the time they came back."""
    if config.scenario == "surge":
        return config.leak_start, config.surge_end
    if config.scenario == "restart":
        return 0.0, config.duration
    return config.leak_start, config.duration


def recovery(seconds: list[Second], first_failure: float | None, since: float) -> tuple[float | None, bool]:
    """(seconds to recovery, recovered): from ``since`` (or the first failure,
    if later) to the end of the last second whose success rate was under 99%;
    not recovered when that second is one of the last two with answers."""
    if first_failure is None:
        return None, True
    since = max(since, first_failure)
    unhealthy = [s.t for s in seconds if s.requests and (s.success or 0.0) < HEALTHY and s.t + 1 > since]
    answered = sorted(s.t for s in seconds if s.requests)
    last_bad = max(unhealthy, default=None)
    if last_bad is None:
        return 0.0, True  # isolated failures: no second fell below the bar
    if last_bad in answered[-2:]:
        # Still failing when the load stopped. (The last two seconds with
        # answers, as said above: not the last second's number less one,
        # which a second without answers before it let pass; review s63.)
        return None, False
    return max(0.0, last_bad + 1 - since), True


def _first_failure_at(records: list[RequestRecord], since: float) -> float | None:
    """When the first of ``records`` that failed at or after ``since`` ended."""
    return min((r.done for r in records if not r.ok and r.done >= since), default=None)


def summarize(run: PoolRun, config: ReplayConfig) -> Summary:
    records = run.records
    seconds = timeline(run)
    non_leaking = [r for r in records if not r.leaking]
    fault = run.marks.get("fault", config.leak_start)
    first_failure = _first_failure_at(records, fault)
    since = {"surge": config.surge_end, "restart": run.marks.get("accepting", fault)}.get(config.scenario, fault)
    if config.scenario == "stuck":
        # The payments fail for as long as the provider hangs, on either pool:
        # recovery is measured on the other requests, the target's subject.
        recovery_s, recovered = recovery(timeline(run, non_leaking), _first_failure_at(non_leaking, fault), since)
    else:
        recovery_s, recovered = recovery(seconds, first_failure, since)
    serving_again: float | None = None
    if "accepting" in run.marks:
        accepted = run.marks["accepting"]
        served = [r.done for r in records if r.ok and r.done >= accepted]
        serving_again = min(served) - accepted if served else None
    low, high = fault_window(config)
    window = [r for r in records if low <= r.done < high]
    goodput = sum(r.ok for r in window) / (high - low) if high > low else 0.0
    # The load's own end: restart's load runs on past --duration while the
    # server is slow to come back ("load_extended"), and its last seconds are
    # those, not the ones before --duration.
    load_end = run.marks.get("load_extended", config.duration)
    tail = [r for r in records if r.sent >= load_end - tail_seconds(config)]
    events = Counter(str(event["event"]) for event in run.events if event["event"] in LEAK_EVENTS)
    sites = Counter(
        _relative_site(str(event.get("acquired_at")))
        for event in run.events
        if event["event"] in LEAK_EVENTS
    )
    connections = [s.server_connections for s in run.samples if s.server_connections is not None]
    latencies = [r.latency * 1000 for r in non_leaking]
    return Summary(
        scenario=config.scenario,
        pool=run.pool,
        label=POOL_LABELS[run.pool],
        options=describe_options(run.pool, config),
        requests=len(records),
        leaking_requests=len(records) - len(non_leaking),
        success=_share(sum(r.ok for r in records), len(records)),
        success_non_leaking=_share(sum(r.ok for r in non_leaking), len(non_leaking)),
        success_tail=_share(sum(r.ok for r in tail), len(tail)) if tail else None,
        errors=dict(Counter(error_kind(r.status) for r in records if not r.ok)),
        p50_ms=percentile(latencies, 50),
        p99_ms=percentile(latencies, 99),
        failure_p50_ms=percentile([r.latency * 1000 for r in records if not r.ok], 50),
        goodput_rps=goodput,
        goodput_share=goodput / config.capacity if config.scenario == "surge" else None,
        first_failure_s=None if first_failure is None else first_failure - fault,
        recovery_s=recovery_s,
        recovered=recovered,
        serving_again_s=serving_again,
        marks=dict(run.marks),
        peak_server_connections=max(connections, default=None),
        leaked=run.leaked,
        leaks_detected=run.leaks_taken_back(),
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
    """A share as a percentage to a tenth, rounded down (less a hair of
    float noise: 0.29 is 29.0%): rounded to nearest, 98.99% printed as
    "99.0%" beside a missed >= 99.0% target (review s63)."""
    return "-" if value is None else f"{math.floor(1000 * value + 1e-6) / 10:.1f}%"


def _ms(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value / 1000:.2f} s" if value >= 1000 else f"{value:.0f} ms"


_ERROR_NAMES = {"500": "HTTP 500", "503": "HTTP 503", "other": "other HTTP", "transport": "no answer in time"}


def _errors(summary: Summary) -> str:
    if not summary.errors:
        return "none"
    return ", ".join(f"{count} {_ERROR_NAMES[kind]}" for kind, count in sorted(summary.errors.items()))


def _first_failure(summary: Summary) -> str:
    if summary.first_failure_s is None:
        return "none"
    return f"{summary.first_failure_s:+.1f} s"


def _recovery(summary: Summary) -> str:
    if summary.recovered and summary.recovery_s is None:
        return "n/a (no failure)"
    if not summary.recovered:
        return "never (still failing at the end)"
    return f"{summary.recovery_s:.1f} s"


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f} s"


def _leaks(summary: Summary) -> str:
    if summary.pool == "asyncpg":
        return "none (asyncpg's pool has no leak detection)"
    kinds = ", ".join(
        f"{summary.leak_events[name]} {LEAK_EVENT_NAMES[name]}" for name in LEAK_EVENTS if name in summary.leak_events
    )
    return f"{summary.leaks_detected}: {kinds}" if kinds else "0"


def _whole_pool(summary: Summary, config: ReplayConfig) -> bool:
    """Whether asyncpg's pool lost every connection: its count stops there
    only because no later request got a connection to leak."""
    return summary.pool == "asyncpg" and summary.leaked >= config.pool_size


def _held(summary: Summary, config: ReplayConfig) -> str:
    """Connections leaked (or stuck) over the run, and how many came back:
    asyncpg's count stops at the pool size (nothing is left to take), while
    safepool's goes on, as each connection it takes back can be taken again."""
    if summary.pool == "asyncpg":
        if _whole_pool(summary, config):
            # A new user read "10" beside safepool's "47" as asyncpg leaking less.
            return f"{summary.leaked} = the whole pool, none given back: every later request failed"
        return f"{summary.leaked}, none given back"
    # The rest were taken less than lease_timeout (stuck) or a collection
    # (leak) before the load stopped: the pool had no reason to act yet.
    held = summary.leaked - summary.leaks_detected
    still = f", {held} still held when the load stopped" if held > 0 else ""
    each = "leaking request" if summary.scenario == "leak" else "stuck payment"
    every = f" (every {each})" if summary.leaked == summary.leaking_requests else ""
    return f"{summary.leaked}{every}, {summary.leaks_detected} taken back{still}"


def _site(summary: Summary) -> str:
    if not summary.leak_sites:
        return "-"
    return "\n".join(site for site, _ in Counter(summary.leak_sites).most_common(2))


def _goodput(summary: Summary) -> str:
    text = f"{summary.goodput_rps:.1f} req/s"
    if summary.goodput_share is not None:
        text += f" ({_pct(summary.goodput_share)} of capacity)"
    return text


FAULTY_LINE = {"leak": "leaking branch", "stuck": "stuck payments"}
# The requests the success target counts: those that did not take part in
# the fault (surge and restart have no such line: all requests).
HEALTHY_LINE = {"leak": "non-leaking requests", "stuck": "requests other than payments"}


def _subject(scenario: str) -> str:
    return HEALTHY_LINE.get(scenario, "requests")


def _rows(config: ReplayConfig, max_connections: int) -> list[tuple[str, Any]]:
    scenario = config.scenario
    rows: list[tuple[str, Any]] = [("configuration", lambda s: s.options)]
    if scenario in FAULTY_LINE:
        rows.append((f"requests ({FAULTY_LINE[scenario]})", lambda s: f"{s.requests} ({s.leaking_requests})"))
    else:
        rows.append(("requests", lambda s: str(s.requests)))
    # The surge asks more than the pool can serve: low success on both sides.
    over = f" (surge: {config.surge_factor:g}x capacity)" if scenario == "surge" else ""
    rows.append((f"success, all requests{over}", lambda s: _pct(s.success)))
    if scenario in HEALTHY_LINE:
        rows.append((f"success, {HEALTHY_LINE[scenario]}", lambda s: _pct(s.success_non_leaking)))
    latency = "p50 / p99 latency" + (f" ({HEALTHY_LINE[scenario]})" if scenario in HEALTHY_LINE else "")
    # The stuck payments fail for as long as the fault lasts, on either pool:
    # rows over every request say so (recovery and the target leave them out).
    payments = " (payments included)" if scenario == "stuck" else ""
    rows += [
        (f"success, last {tail_seconds(config):g} s of load{payments}", lambda s: _pct(s.success_tail)),
        ("errors", _errors),
        (latency, lambda s: f"{_ms(s.p50_ms)} / {_ms(s.p99_ms)}"),
        ("median time to failure", lambda s: _ms(s.failure_p50_ms)),
    ]
    if scenario == "surge":
        rows.append(("goodput during the surge", _goodput))
    elif scenario == "restart":
        rows.append(("goodput", _goodput))
    else:
        rows.append(("goodput after the fault started", _goodput))
    rows.append((f"first failure after the fault started{payments}", _first_failure))
    if scenario == "restart":
        rows.append(
            (
                "server down / accepting again at",
                lambda s: (
                    f"t={s.marks.get('stopped', float('nan')):.1f} s / t={s.marks.get('accepting', float('nan')):.1f} s"
                    + (f" (load ran on to t={s.marks['load_extended']:.1f} s)" if "load_extended" in s.marks else "")
                ),
            )
        )
        rows.append(("serving again after it accepted", lambda s: _seconds(s.serving_again_s)))
        rows.append(("back to >= 99% success after it accepted", _recovery))
    elif scenario == "surge":
        rows.append(("back to >= 99% success after the surge", _recovery))
    elif scenario == "stuck":
        # The payments keep failing while the fault lasts, on either pool:
        # recovery counts the other requests (summarize()).
        rows.append(("time to recovery (requests other than payments)", _recovery))
    else:
        rows.append(("time to recovery", _recovery))
    peak = f"peak server connections (max_connections={max_connections})"  # the server's limit
    rows.append((peak, lambda s: str(s.peak_server_connections or "-")))
    if scenario in FAULTY_LINE:
        held = "leaked" if scenario == "leak" else "taken by stuck tasks"
        rows += [
            (f"connections {held} (over the run)", lambda s: _held(s, config)),
            ("caught by the pool", _leaks),
            ("leak source (acquired at)", _site),
        ]
    return rows


def title(config: ReplayConfig) -> str:
    head = f"{config.scenario}: {SCENARIO_TITLES[config.scenario]}"
    if config.scenario == "leak":
        detail = (
            f"{config.duration:g} s per pool at {config.rate:g} req/s, {100 * config.leak_probability:g}% of "
            f"requests leak from t={config.leak_start:g} s"
        )
    elif config.scenario == "stuck":
        detail = (
            f"{config.duration:g} s per pool at {config.rate:g} req/s, {100 * config.leak_probability:g}% are "
            f"payments; the provider hangs from t={config.leak_start:g} s"
        )
    elif config.scenario == "surge":
        detail = (
            f"{config.duration:g} s per pool; capacity {config.capacity:g} req/s ({config.pool_size} connections x "
            f"{1000 * config.query_time:g} ms); {config.rate:g} req/s, then {config.surge_factor * config.capacity:g} "
            f"req/s from t={config.leak_start:g} s for {config.surge_duration:g} s; client deadline "
            f"{config.client_timeout:g} s"
        )
    else:
        detail = (
            f"{config.duration:g} s per pool at {config.rate:g} req/s; the server stops at t={config.leak_start:g} s "
            f"and starts again {config.downtime:g} s later"
        )
    return f"{head}\n{detail}; pool size {config.pool_size}, service deadline {config.request_timeout:g} s"


def build_table(summaries: list[Summary], config: ReplayConfig, max_connections: int) -> ReportTable:
    """The scenario's table: the pools side by side, or, on a terminal too
    narrow for that (about 104 columns), one pool under the other."""
    return ReportTable(summaries, config, max_connections)


POOL_COLUMN = 24  # characters: a pool's column side by side (its values fold within it)


class ReportTable:
    """A rich renderable that picks its layout at the width it is printed
    at: rich crops a table's lines at the console's width, and the
    side-by-side one showed 4 characters of safepool's column on an
    80-column terminal, none of either pool's at 40 (review h282)."""

    def __init__(self, summaries: list[Summary], config: ReplayConfig, max_connections: int) -> None:
        self.summaries = summaries
        self.config = config
        self.max_connections = max_connections

    def side_by_side(self) -> Table:
        table = Table(title=title(self.config), title_justify="left")
        table.add_column("", no_wrap=True)
        for summary in self.summaries:
            table.add_column(summary.label, overflow="fold", min_width=POOL_COLUMN)
        for name, render in _rows(self.config, self.max_connections):
            table.add_row(name, *(render(summary) for summary in self.summaries))
        return table

    def stacked(self) -> list[Text | Table]:
        """The scenario's title, then one table per pool, titled with its label."""
        parts: list[Text | Table] = [Text(title(self.config))]
        for summary in self.summaries:
            table = Table(title=summary.label, title_justify="left", title_style="bold", show_header=False)
            table.add_column("", overflow="fold", ratio=1)
            table.add_column("", overflow="fold", ratio=1)
            for name, render in _rows(self.config, self.max_connections):
                table.add_row(name, render(summary))
            parts.append(table)
        return parts

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        # Side by side needs the labels unbroken and each pool's column
        # POOL_COLUMN wide, plus each cell's padding (2) and the borders.
        labels = max(len(name) for name, _ in _rows(self.config, self.max_connections))
        needed = labels + 2 + len(self.summaries) * (POOL_COLUMN + 2) + len(self.summaries) + 2
        if options.max_width >= needed:
            yield self.side_by_side()
        else:
            yield from self.stacked()


def target(summary: Summary, config: ReplayConfig) -> tuple[str, bool]:
    """The scenario's target (issue 15), and whether this run met it."""
    if config.scenario in ("leak", "stuck"):
        return f">= {_pct(TARGET_SUCCESS)} success of {_subject(config.scenario)}", (
            summary.success_non_leaking >= TARGET_SUCCESS
        )
    if config.scenario == "surge":
        return f"goodput >= {_pct(TARGET_GOODPUT)} of capacity", (summary.goodput_share or 0.0) >= TARGET_GOODPUT
    return f"serving again within {TARGET_SERVING_AGAIN:g} s of the server accepting connections", (
        summary.serving_again_s is not None and summary.serving_again_s <= TARGET_SERVING_AGAIN
    )


def verdicts(summaries: list[Summary], config: ReplayConfig) -> list[str]:
    """One sentence per pool, from the measured numbers: success of
    non-leaking requests, goodput, p99, time to recovery, the leaking line."""
    lines = []
    for s in summaries:
        over = f" (the surge sent {config.surge_factor:g}x capacity)" if config.scenario == "surge" else ""
        parts = [
            f"{_pct(s.success_non_leaking)} of {_subject(config.scenario)} succeeded{over}",
            f"goodput {_goodput(s)}",
            f"p99 {_ms(s.p99_ms)}",
        ]
        if config.scenario == "surge":
            # Both pools give up after the same acquire timeout, so goodput
            # alone may not tell them apart: how fast a refusal comes does.
            parts.append(f"median time to failure {_ms(s.failure_p50_ms)}")
        if config.scenario == "restart":
            if s.serving_again_s is None:
                parts.append("never served again after the server came back")
            else:
                parts.append(f"serving again {s.serving_again_s:.2f} s after the server accepted connections")
        if s.recovered and s.recovery_s is None:
            parts.append("no failure" if config.scenario != "stuck" else "no failure of requests other than payments")
        elif not s.recovered:
            parts.append("never recovered")
        else:
            parts.append(f"recovered in {s.recovery_s:.1f} s")
        if config.scenario in FAULTY_LINE:
            noun = "leak" if config.scenario == "leak" else "stuck lease"
            if s.leaks_detected:
                parts.append(f"named the {noun}: {_site(s).splitlines()[0]}")
            elif s.leak_sites:
                # Warned about only (leak_suspect: a lease_timeout too long to
                # take anything back in the run), not unnoticed (review s63).
                parts.append(f"warned about the {noun}, took nothing back: {_site(s).splitlines()[0]}")
            elif s.leaked:
                whole = " (the whole pool)" if _whole_pool(s, config) else ""
                parts.append(
                    f"{s.leaked} connections {'leaked' if config.scenario == 'leak' else 'stuck'}{whole}, unnoticed"
                )
        line = f"{config.scenario} / {s.label}: " + "; ".join(parts)
        name, met = target(s, config)
        if s.pool == "safepool":
            line += f". Target ({name}): {'met' if met else 'MISSED'}"
        else:
            # safepool's "met" alone read as a gain where asyncpg's pool meets
            # the target too (the surge, with the same acquire timeout; restart).
            line += f". Against the same target: {'met' if met else 'missed'}"
        lines.append(line + ".")
    return lines


def error_legend(summaries: list[Summary], config: ReplayConfig) -> str | None:
    """What each error kind in the table's "errors" row means, for those that
    occur: a reader who has not seen the service cannot tell a 500 from a 503."""
    meaning = {
        "500": f"the service failed the request (its {config.request_timeout:g} s deadline passed, or a query "
        "or connect raised)",
        "503": "the pool gave no connection (asyncpg: its acquire timeout passed; safepool: wait queue full, "
        "acquire_timeout passed or server down) and the service said so",
        "transport": f"the client gave up after its {config.client_timeout:g} s deadline",
        "other": "another HTTP status",
    }
    kinds = sorted({kind for s in summaries for kind in s.errors})
    if not kinds:
        return None
    return "errors: " + "; ".join(f"{_ERROR_NAMES[kind]}: {meaning[kind]}" for kind in kinds) + "."


def notes(config: ReplayConfig) -> list[str]:
    """What the table cannot say for itself, in a line: why success is low
    on both sides of the surge, and what the restart scenario is for (a new
    user's trial, 2026-12-03, read both as safepool failing)."""
    if config.scenario == "surge":
        return [
            f"note: during the surge the load is {config.surge_factor:g}x what the pool can serve, so on any pool "
            f"at most about {100 / config.surge_factor:.0f}% of the surge's requests can succeed (the row also counts "
            "the requests before and after it): compare goodput and the median time to failure, not success."
        ]
    if config.scenario == "restart":
        return [
            "note: no gain is expected here: both pools reconnect once the server is back. safepool's target is to "
            "be as quick (its circuit breaker, fail_fast, must not delay that); what it changes is the answer while "
            "the server is down: 503 (unavailable, retry later), not 500."
        ]
    return []


def print_report(console: Console, summaries: list[Summary], config: ReplayConfig, max_connections: int) -> None:
    console.print(build_table(summaries, config, max_connections))
    for line in notes(config):
        console.print(line, highlight=False, markup=False)
    legend = error_legend(summaries, config)
    if legend is not None:
        console.print(legend, highlight=False, markup=False)
    for line in verdicts(summaries, config):
        console.print(line, highlight=False, markup=False)
    reports = [s.leak_report for s in summaries if s.leak_report]
    if reports and config.scenario in FAULTY_LINE:
        console.print("\nsafepool's first leak report (logger safepool.leaks), innermost frames:", markup=False)
        console.print(trim_report(reports[0]), highlight=False, markup=False, soft_wrap=True)


def trim_report(text: str, frames: int = 2) -> str:
    """The report's first line and its innermost frames (a frame is a
    'File ...' line and its source line), files under the checkout shown
    relative to it, as the "leak source" row shows them."""
    lines = [line.replace(f'File "{_ROOT}', 'File "', 1) for line in text.rstrip().splitlines()]
    starts = [i for i, line in enumerate(lines) if line.lstrip().startswith("File ")]
    if len(starts) <= frames:
        return "\n".join(lines)
    return "\n".join([lines[0], "  ...", *lines[starts[-frames] :]])


def scenario_json(summaries: list[Summary], config: ReplayConfig, max_connections: int) -> dict[str, Any]:
    targets: dict[str, Any] = {}
    for summary in summaries:
        name, met = target(summary, config)
        targets[summary.pool] = {"target": name, "met": met}
    return {
        "title": title(config),
        "config": config.as_dict(),
        "max_connections": max_connections,
        "pools": {s.pool: s.as_dict() for s in summaries},
        "notes": notes(config),
        "verdicts": verdicts(summaries, config),
        "safepool_target": targets.get("safepool"),
        "asyncpg_target": targets.get("asyncpg"),  # the same target, for comparison
    }
