"""Mutation review of the replay's numbers (review s63): safepool/replay/
report.py (summaries, time to recovery, "last N s", verdicts, rows, JSON)
and the pure parts of load.py and runner.py that feed it. Each test kills
hand-made mutants the suite let through, asserting values computed by hand
from hand-built records (docs/replay.md, "How to read it"). No database, no
HTTP service but a few bytes over a local socket; times are binary
fractions (sixteenths) wherever a test sits on a boundary.

The tests at the end show bugs found on the way, fixed since."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import re
from io import StringIO
from typing import Any

import pytest
from rich.console import Console

from safepool.replay import report
from safepool.replay.config import ReplayConfig, scenario_config
from safepool.replay.load import TRANSPORT_ERROR, RequestRecord, client_timeout, http_request, schedule
from safepool.replay.report import (
    _ROOT,
    Second,
    _ms,
    _rows,
    percentile,
    print_report,
    recovery,
    scenario_json,
    summarize,
    target,
    timeline,
    title,
    trim_report,
    verdicts,
)
from safepool.replay.runner import AcquireTimeout, PoolRun, Sample, _restart_observed, _sample, collecting_logs


def rec(sent: float, done: float, status: int = 200, leaking: bool = False) -> RequestRecord:
    return RequestRecord(sent, done, status, leaking)


def rows(config: ReplayConfig, summary: Any, max_connections: int = 30) -> dict[str, str]:
    return {name: render(summary) for name, render in _rows(config, max_connections)}


def sec(t: int, requests: int, ok: int) -> Second:
    return Second(t, requests, ok, requests - ok, 0, 0, None, None, None, None, None, None, None)


def seconds_of(bad: dict[int, tuple[int, int]], count: int, per_second: int = 100) -> list[Second]:
    """``count`` seconds of ``per_second`` answers, all ok but those in ``bad`` (t -> (requests, ok))."""
    return [sec(t, *bad.get(t, (per_second, per_second))) for t in range(count)]


# ------------------------------------------------------------- percentile


def test_percentile_is_the_nearest_rank_of_the_sorted_values() -> None:
    # ceil(q/100 * n): rank 3 of 5 for the median, 99 of 100 for p99.
    assert percentile([5.0, 1.0, 4.0, 2.0, 3.0], 50) == 3.0
    assert percentile([float(v) for v in range(100, 0, -1)], 99) == 99.0
    assert percentile([float(v) for v in range(1, 93)], 99) == 92.0  # ceil(91.08) = 92
    assert percentile([7.0], 99) == 7.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 0) == 1.0  # rank at least 1
    assert percentile([], 50) is None


# --------------------------------------------------------------- timeline


def test_the_timeline_buckets_answers_by_when_they_came_back_and_samples_close_the_second_before() -> None:
    run = PoolRun("safepool")
    run.records += [rec(0.0, i / 1024, 200) for i in range(1, 101)]  # second 0: 100 ok, latency i/1024 s
    run.records += [
        rec(0.875, 1.25, 503),  # sent in second 0, answered in second 1
        rec(0.5, 1.5, TRANSPORT_ERROR),
        rec(1.0, 1.75, 404),
    ]
    run.samples += [Sample(1.004, 10, 4, 1, 6, 3, 0), Sample(4.0, 10, 7, 2, 9, 5, 1)]
    seconds = timeline(run)
    assert [s.t for s in seconds] == [0, 1, 2, 3]  # up to the last sample's second, past the last answer
    first, second, empty = seconds[0], seconds[1], seconds[2]
    assert (first.requests, first.ok) == (100, 100)
    assert first.p50_ms == pytest.approx(50 / 1.024) and first.p99_ms == pytest.approx(99 / 1.024)
    assert (first.server_connections, first.pool_in_use, first.waiting, first.in_flight) == (6, 4, 1, 3)
    assert (second.requests, second.ok, second.errors_500, second.errors_503, second.errors_other) == (3, 0, 0, 1, 2)
    assert second.server_connections is None
    assert (seconds[3].server_connections, seconds[3].leaks_detected) == (9, 1)
    assert empty.requests == 0 and empty.success is None
    data = summarize(run, ReplayConfig("leak", duration=4, leak_start=1)).as_dict()
    assert data["timeline"][2]["success"] is None and data["timeline"][1]["success"] == 0.0


# --------------------------------------------------------------- recovery


def test_a_second_at_exactly_99_percent_is_healthy_and_isolated_failures_recover_at_once() -> None:
    assert recovery(seconds_of({4: (100, 99)}, 10), 4.5, 2.0) == (0.0, True)
    # 97%: under the bar (and not under a looser one).
    assert recovery(seconds_of({4: (100, 97)}, 10), 4.5, 2.0) == (0.5, True)


def test_recovery_counts_the_second_that_holds_since() -> None:
    # restart: the server accepts at 5.3 s; second 5 still failed in part.
    result, recovered = recovery(seconds_of({3: (100, 2), 4: (100, 0), 5: (100, 70)}, 10), 3.1, 5.3)
    assert recovered and result == pytest.approx(6 - 5.3)


def test_a_second_ending_exactly_at_since_is_not_counted() -> None:
    # surge: the surge ends at 7 s; second 6 (ending at 7) failed, 7 did not.
    assert recovery(seconds_of({6: (100, 50)}, 8), 3.5, 7.0) == (0.0, True)


@pytest.mark.parametrize("last_bad, expected", [(9, (None, False)), (8, (None, False)), (7, (8 - 2.5, True))])
def test_failing_in_one_of_the_last_two_seconds_is_never_recovered(last_bad: int, expected: Any) -> None:
    assert recovery(seconds_of({2: (100, 0), last_bad: (100, 50)}, 10), 2.5, 2.0) == expected


def test_seconds_without_answers_are_neither_failing_nor_the_last_ones() -> None:
    # Seconds 10 and 11 only hold samples: the last two with answers are 8 and 9.
    seconds = seconds_of({2: (100, 0), 8: (100, 50)}, 10) + [sec(10, 0, 0), sec(11, 0, 0)]
    assert recovery(seconds, 2.5, 2.0) == (None, False)
    # A second with no answers amid the load is not a failing one.
    assert recovery(seconds_of({2: (100, 0), 6: (0, 0)}, 10), 2.5, 2.0) == (3 - 2.5, True)


# --------------------------------------------------------- first failure


def test_the_first_failure_counts_from_the_fault_mark_and_includes_one_at_it() -> None:
    config = ReplayConfig("leak", duration=8, leak_start=2)
    run = PoolRun("safepool", marks={"fault": 2.5})
    run.records += [rec(s + i / 16, s + i / 16 + 1 / 64) for s in range(8) for i in range(16)]
    run.records += [rec(0.75, 1.0, 500), rec(2.25, 2.5, 500)]  # before the fault; exactly at it
    summary = summarize(run, config)
    assert summary.first_failure_s == 0.0
    assert rows(config, summary)["first failure after the fault started"] == "+0.0 s"


# ------------------------------------------------------------------ leak


def _leak_run() -> tuple[ReplayConfig, PoolRun]:
    """10 s, 10 answers a second; from t=2 s one a second leaks and fails
    (HTTP 500 after 0.5 s); one non-leaking request fails before the fault
    (HTTP 503 after 0.125 s)."""
    config = ReplayConfig("leak", duration=10, leak_start=2)
    run = PoolRun("safepool", marks={"fault": 2.0}, leaked=8)
    for s in range(10):
        for i in range(10):
            if i == 0 and s >= 2:
                run.records.append(rec(s, s + 0.5, 500, True))
            elif s == 1 and i == 1:
                run.records.append(rec(s + i / 16, s + i / 16 + 0.125, 503))
            else:
                run.records.append(rec(s + i / 16, s + i / 16 + 1 / 64))
    site = _ROOT + "safepool/replay/app.py:53 in customer_orders"
    run.events = (
        [{"event": "leak", "acquired_at": site}] * 5
        + [{"event": "leak_suspect", "acquired_at": _ROOT + "safepool/replay/app.py:99 in other"}] * 2
        + [{"event": "connect_failed"}]
    )
    return config, run


def test_leak_summary_counts_each_number_over_the_requests_docs_replay_md_says() -> None:
    config, run = _leak_run()
    summary = summarize(run, config)
    assert (summary.requests, summary.leaking_requests) == (100, 8)
    assert summary.success == pytest.approx(91 / 100)
    assert summary.success_non_leaking == pytest.approx(91 / 92)
    assert summary.errors == {"503": 1, "500": 8}
    # p50 / p99 of the non-leaking requests: 91 at 15.6 ms, one at 125 ms (rank ceil(91.08) = 92).
    assert summary.p50_ms == pytest.approx(1000 / 64) and summary.p99_ms == pytest.approx(125)
    # Median time to failure of every failed request: 8 at 500 ms, 1 at 125 ms.
    assert summary.failure_p50_ms == pytest.approx(500)
    # Goodput after the fault: 9 ok a second in [2, 10).
    assert summary.goodput_rps == pytest.approx(72 / 8)
    assert summary.first_failure_s == pytest.approx(0.5)
    # The leaking requests fail to the end: the leak scenario counts them.
    assert (summary.recovery_s, summary.recovered) == (None, False)
    assert summary.leaks_detected == 5
    assert summary.leak_events == {"leak": 5, "leak_suspect": 2}
    table = rows(config, summary)
    assert table["errors"] == "8 HTTP 500, 1 HTTP 503"
    assert table["goodput after the fault started"] == "9.0 req/s" and summary.goodput_share is None
    assert table["p50 / p99 latency (non-leaking requests)"] == "16 ms / 125 ms"
    assert table["time to recovery"] == "never (still failing at the end)"
    assert table["caught by the pool"] == (
        "5: 5 reclaimed when garbage collected (leak), 2 warned about (leak_suspect: held past leak_warning_after)"
    )
    assert table["leak source (acquired at)"] == (
        "safepool/replay/app.py:53 in customer_orders\nsafepool/replay/app.py:99 in other"
    )
    [verdict] = verdicts([summary], config)
    assert "; never recovered; named the leak: safepool/replay/app.py:53 in customer_orders." in verdict


def test_the_last_seconds_of_load_are_the_requests_sent_in_them() -> None:
    # "last 4 s of load" of a 10 s load: the requests sent at or after 6 s,
    # whenever they were answered; one sent at 5.75 s and failed at 6.25 s is not.
    config = ReplayConfig("leak", duration=10, leak_start=2)
    run = PoolRun("safepool", records=[rec(5.75, 6.25, 500), rec(6.0, 6.0625), rec(6.0, 6.5, 503)])
    run.records += [rec(6 + k / 4, 6 + k / 4 + 1 / 64) for k in range(1, 16)]
    summary = summarize(run, config)
    assert summary.success_tail == 16 / 17  # not 16 / 18, counting the one answered in them
    assert rows(config, summary)["success, last 4 s of load"] == "94.1%"


def test_a_tail_with_no_request_prints_a_dash() -> None:
    config = ReplayConfig("leak", duration=10, leak_start=2)
    run = PoolRun("safepool", records=[rec(1.0, 1.25)])
    summary = summarize(run, config)
    assert summary.success_tail is None
    assert rows(config, summary)["success, last 4 s of load"] == "-"


def test_a_safepool_run_that_caught_nothing_says_0() -> None:
    config = ReplayConfig("leak", duration=10, leak_start=2)
    summary = summarize(PoolRun("safepool", records=[rec(0.0, 0.25)]), config)
    assert rows(config, summary)["caught by the pool"] == "0"


# ----------------------------------------------------------------- surge


def test_surge_goodput_counts_the_2xx_answers_that_came_back_during_it() -> None:
    config = ReplayConfig("surge", duration=10, leak_start=3, client_deadline=1.0, query_time=0.25)  # capacity 40
    run = PoolRun("safepool", marks={"fault": 3.0})
    for s in (0, 1, 2, 8, 9):
        run.records += [rec(s + i / 16, s + i / 16 + 1 / 64) for i in range(16)]
    run.records.append(rec(2.75, 3.0))  # answered as the surge starts: counted
    run.records += [rec(3 + k / 36 - 0.25, 3 + k / 36) for k in range(1, 144)]  # 143 more ok in (3, 7)
    run.records += [rec(3 + k / 32, 3 + k / 32 + 1 / 16, 503) for k in range(1, 101)]  # 100 refused in (3, 7)
    # Second 7: the surge's stragglers; 1 failure in 17 (under 99%).
    run.records.append(rec(6.75, 7.0))  # answered as the surge ends: not counted
    run.records += [rec(7 + i / 16 - 0.25, 7 + i / 16) for i in range(1, 16)]
    run.records.append(rec(6.25, 7.25, TRANSPORT_ERROR))
    summary = summarize(run, config)
    assert summary.goodput_rps == 36.0 and summary.goodput_share == 0.9  # 144 in 4 s, of 40 req/s
    assert target(summary, config) == ("goodput >= 90.0% of capacity", True)
    assert summary.first_failure_s == pytest.approx(1 / 32 + 1 / 16)
    # From the surge's end to the end of second 7.
    assert (summary.recovery_s, summary.recovered) == (1.0, True)
    assert summary.failure_p50_ms == pytest.approx(62.5)
    table = rows(config, summary)
    assert table["back to >= 99% success after the surge"] == "1.0 s"
    assert table["goodput during the surge"] == "36.0 req/s (90.0% of capacity)"
    [verdict] = verdicts([summary], config)
    assert "; median time to failure 62 ms; recovered in 1.0 s. Target (goodput >= 90.0% of capacity): met." in verdict


def test_a_surge_that_served_nothing_shows_0_percent_of_capacity() -> None:
    config = ReplayConfig("surge", duration=10, leak_start=3, client_deadline=1.0)
    summary = summarize(PoolRun("safepool", records=[rec(3.0, 3.5, 503)]), config)
    assert rows(config, summary)["goodput during the surge"] == "0.0 req/s (0.0% of capacity)"


def test_the_titles_give_the_scenarios_rates() -> None:
    assert title(scenario_config("leak")).splitlines()[1] == (
        "12 s per pool at 50 req/s, 10% of requests leak from t=3 s; pool size 10, service deadline 2 s"
    )
    assert title(scenario_config("surge")).splitlines()[1] == (
        "10 s per pool; capacity 40 req/s (10 connections x 250 ms); 20 req/s, then 200 req/s from t=3 s for 4 s; "
        "client deadline 1 s; pool size 10, service deadline 2 s"
    )


# --------------------------------------------------------------- restart


def test_restart_serving_again_and_recovery_count_from_the_server_accepting() -> None:
    config = ReplayConfig("restart", duration=10, leak_start=3)
    run = PoolRun("safepool", marks={"fault": 3.0, "stopped": 3.125, "accepting": 5.3})
    for s in range(10):
        for i in range(16):
            done = s + i / 16 + 1 / 128
            down = 3.125 <= done < 5.375  # a 503 after it accepted too (5.32)
            run.records.append(rec(done - 1 / 128, done, 503 if down else 200))
    run.records.append(rec(5.25, 5.34))  # sent while down, served once it accepted: the first 2xx
    summary = summarize(run, config)
    assert summary.serving_again_s == pytest.approx(0.04)
    assert summary.first_failure_s == pytest.approx(0.125 + 1 / 128)
    assert summary.recovered and summary.recovery_s == pytest.approx(6 - 5.3)
    ok = sum(r.ok for r in run.records)
    assert summary.goodput_rps == pytest.approx(ok / 10)  # the whole load: [0, duration)
    [verdict] = verdicts([summary], config)
    assert "; serving again 0.04 s after the server accepted connections; recovered in 0.7 s." in verdict
    assert verdict.endswith("Target (serving again within 1 s of the server accepting connections): met.")
    row = "server down / accepting again at"
    assert rows(config, summary)[row] == "t=3.1 s / t=5.3 s"
    run.marks["load_extended"] = 12.25
    assert rows(config, summarize(run, config))[row] == "t=3.1 s / t=5.3 s (load ran on to t=12.2 s)"


# --------------------------------------------------------------- targets


def _summary(scenario: str, **changes: Any) -> Any:
    config = ReplayConfig(scenario, duration=10, leak_start=3)
    summary = summarize(PoolRun("safepool", records=[rec(0.0, 0.25)]), config)
    return dataclasses.replace(summary, **changes), config


@pytest.mark.parametrize(
    "scenario, changes, met",
    [
        ("leak", {"success_non_leaking": 0.99}, True),
        ("stuck", {"success_non_leaking": 0.9899}, False),
        ("surge", {"goodput_share": 0.9}, True),
        ("surge", {"goodput_share": 0.8999}, False),
        ("restart", {"serving_again_s": 1.0}, True),
        ("restart", {"serving_again_s": 1.5}, False),
        ("restart", {"serving_again_s": None}, False),
    ],
)
def test_each_target_holds_at_its_bound_and_not_past_it(scenario: str, changes: dict[str, Any], met: bool) -> None:
    summary, config = _summary(scenario, **changes)
    assert target(summary, config)[1] is met


def test_the_json_gives_each_pool_its_own_target_result() -> None:
    config = ReplayConfig("restart", duration=10, leak_start=3)
    summaries = [
        dataclasses.replace(_summary("restart", serving_again_s=None)[0], pool="asyncpg", label="asyncpg.create_pool"),
        _summary("restart", serving_again_s=0.25)[0],
    ]
    data = scenario_json(summaries, config, 30)
    assert data["safepool_target"]["met"] is True and data["asyncpg_target"]["met"] is False
    assert "never served again after the server came back" in data["verdicts"][0]


# ------------------------------------------------------------- the rows


def test_latencies_of_a_second_and_more_are_shown_in_seconds() -> None:
    assert (_ms(999.0), _ms(1000.0), _ms(2345.0), _ms(None)) == ("999 ms", "1.00 s", "2.35 s", "-")


def test_peak_server_connections_is_the_highest_sample_or_a_dash() -> None:
    config = ReplayConfig("leak", duration=10, leak_start=2)
    run = PoolRun("safepool", records=[rec(0.0, 0.25)])
    run.samples += [Sample(float(t), 10, 0, 0, conns, 0, 0) for t, conns in enumerate([3, None, 7, 5], 1)]
    summary = summarize(run, config)
    assert summary.peak_server_connections == 7
    assert rows(config, summary)["peak server connections (max_connections=30)"] == "7"
    summary = summarize(PoolRun("safepool", records=[rec(0.0, 0.25)]), config)
    assert rows(config, summary)["peak server connections (max_connections=30)"] == "-"


def test_trim_report_keeps_the_first_line_and_the_innermost_frames() -> None:
    frame = ['  File "a.py", line {n}, in f{n}', "    x = {n}"]
    two = "leak!\n" + "\n".join(line.format(n=n) for n in (1, 2) for line in frame)
    assert trim_report(two) == two
    three = "leak!\n" + "\n".join(line.format(n=n) for n in (1, 2, 3) for line in frame)
    assert trim_report(three).splitlines() == [
        "leak!",
        "  ...",
        '  File "a.py", line 2, in f2',
        "    x = 2",
        '  File "a.py", line 3, in f3',
        "    x = 3",
    ]


def test_trim_report_shows_the_checkouts_files_relative_to_it() -> None:
    # docs/replay.md's transcript shows them so (review h286: a real run
    # printed absolute paths); a file elsewhere keeps its path.
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(report.__file__))))
    text = (
        f'leak!\n  File "{root}/.venv/lib/routing.py", line 62, in app\n    response = await f(request)\n'
        f'  File "/elsewhere/{root}/app.py", line 9, in g\n    con = await pool.acquire()'
    )
    assert trim_report(text).splitlines() == [
        "leak!",
        '  File ".venv/lib/routing.py", line 62, in app',
        "    response = await f(request)",
        f'  File "/elsewhere/{root}/app.py", line 9, in g',
        "    con = await pool.acquire()",
    ]


def test_the_leak_report_is_printed_only_where_a_line_leaks() -> None:
    for scenario, shown in (("surge", False), ("leak", True)):
        config = ReplayConfig(scenario, duration=10, leak_start=3, client_deadline=1.0)
        run = PoolRun("safepool", records=[rec(0.0, 0.25)], leak_report="held too long")
        out = StringIO()
        print_report(Console(file=out, width=300), [summarize(run, config)], config, 30)
        assert ("safepool's first leak report" in out.getvalue()) is shown


# ------------------------------------------------------------------ load


@pytest.mark.parametrize("status, ok", [(199, False), (200, True), (299, True), (300, False), (TRANSPORT_ERROR, False)])
def test_ok_is_2xx(status: int, ok: bool) -> None:
    assert rec(0.0, 1.0, status).ok is ok
    assert rec(0.25, 1.0, status).latency == 0.75


def test_the_schedule_starts_the_faulty_line_at_leak_start_and_stops_before_duration() -> None:
    leak = schedule(ReplayConfig("leak", duration=6, rate=1, leak_probability=1.0, leak_start=3))
    assert [(r.due, r.leaking) for r in leak] == [(0, False), (1, False), (2, False), (3, True), (4, True), (5, True)]
    stuck = schedule(ReplayConfig("stuck", duration=6, rate=1, leak_probability=1.0, leak_start=3))
    assert [(r.method, r.leaking) for r in stuck] == [("POST", False)] * 3 + [("POST", True)] * 3


def test_the_surge_schedule_runs_at_its_rate_from_leak_start_for_surge_duration() -> None:
    # capacity 1 / 0.5 s = 2 req/s; the surge 2x that: 4 req/s from t=2 s for 2 s.
    config = ReplayConfig(
        "surge", duration=6, rate=1, leak_start=2, surge_duration=2, pool_size=1, query_time=0.5, surge_factor=2
    )
    assert config.rate_at(4.0) == 1 and config.rate_at(2.0) == 4
    assert [r.due for r in schedule(config)] == [0, 1, *(2 + k / 4 for k in range(8)), 4, 5]
    assert client_timeout(scenario_config("surge")) == 1.0


def test_a_status_line_that_is_not_http_is_a_transport_error() -> None:
    async def answer(reply: bytes) -> int:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(reply)
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        async with server:
            port = server.sockets[0].getsockname()[1]
            return await asyncio.wait_for(http_request("127.0.0.1", port, "GET", "/"), 5)

    assert asyncio.run(answer(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n")) == 503
    assert asyncio.run(answer(b"garbage\r\n\r\n")) == TRANSPORT_ERROR
    assert asyncio.run(answer(b"HTTP/1.1 OK\r\n\r\n")) == TRANSPORT_ERROR


# ---------------------------------------------------------------- runner


def test_asyncpgs_pool_gets_the_acquire_timeout_unless_a_call_gives_its_own() -> None:
    class Fake:
        size = 3

        def acquire(self, *, timeout: float | None = None) -> float | None:
            return timeout

    pool = AcquireTimeout(Fake(), 0.5)  # type: ignore[arg-type]
    assert (pool.acquire(), pool.acquire(timeout=2.0), pool.size) == (0.5, 2.0, 3)


def test_the_load_is_extended_only_past_the_duration() -> None:
    config = ReplayConfig("restart", duration=10, leak_start=3)
    run = PoolRun("safepool", marks={"accepting": 8.0})
    until = _restart_observed(config, run, None)  # type: ignore[arg-type]
    assert until() == 10.0 and "load_extended" not in run.marks  # exactly at --duration: not past it


def test_the_run_keeps_the_first_leak_report_and_counts_warnings_only() -> None:
    run = PoolRun("safepool")
    logger = logging.getLogger("review.s63.replay")
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        with collecting_logs(run):
            logging.getLogger("safepool.leaks").warning("first leak")
            logging.getLogger("safepool.leaks").warning("second leak")
            logger.info("not a warning")
    finally:
        logger.setLevel(level)
    assert (run.leak_report, run.log_records) == ("first leak", 2)


def test_asyncpgs_connections_in_use_are_its_size_less_its_idle_ones() -> None:
    class Pool:
        def get_size(self) -> int:
            return 5

        def get_idle_size(self) -> int:
            return 2

    class Metrics:
        in_flight = 4

    run = PoolRun("asyncpg", events=[{"event": "leak"}, {"event": "lease_expired"}, {"event": "leak_suspect"}])
    assert _sample(Pool(), run, Metrics(), 1.0, 6) == Sample(1.0, 5, 3, None, 6, 4, 2)  # type: ignore[arg-type]


# ------------------------------------------------------------------- bugs


# A bug until s63 (fixed): load.py:86 accumulates t += 1/rate in floats: the schedule drifts
def test_the_schedule_sends_rate_times_duration_requests() -> None:
    # 50 req/s for 10 s is 500 requests (t = 0, 0.02, ..., 9.98); the float
    # sum puts a 501st at t = 9.99999999999988 < 10. The surge: 20 req/s for
    # 3 s, 200 req/s for 4 s, 20 req/s for 3 s is 920 requests, 800 of them
    # in [3, 7); the schedule has 912 and 791: t reaches 2.9999999999999973,
    # still before the surge, and the surge's first request comes at 3.05.
    assert len(schedule(scenario_config("restart"))) == 500
    assert len(schedule(scenario_config("leak"))) == 600
    surge = schedule(scenario_config("surge"))
    assert sum(3 <= r.due < 7 for r in surge) == 800
    assert len(surge) == 920


# A bug until s63 (fixed): report.py:267 rounds 98.99% to '99.0%' beside 'Target (>= 99.0%): MISSED'
def test_a_missed_target_does_not_print_a_value_that_meets_it() -> None:
    # 989 of 999 non-leaking requests = 98.998998...%: under the target, and
    # the verdict says MISSED, but prints "99.0% of non-leaking requests
    # succeeded" in the same sentence. (goodput 35.99 req/s of 40 likewise
    # prints "90.0% of capacity" beside a missed 90% target.)
    summary, config = _summary("leak", success_non_leaking=989 / 999)
    [verdict] = verdicts([summary], config)
    assert verdict.endswith("Target (>= 99.0% success of non-leaking requests): MISSED.")
    shown = float(re.match(r"leak / safepool.create_pool: ([0-9.]+)% of", verdict).group(1))  # type: ignore[union-attr]
    assert shown < 99.0


# A bug until s63 (fixed): report.py:497-505: a stuck lease safepool warned about reads 'unnoticed'
def test_a_lease_the_pool_warned_about_is_not_called_unnoticed() -> None:
    # With --lease-timeout 3600 (docs/replay.md, "stuck"), safepool takes
    # nothing back but warns about each stuck lease (leak_suspect) and names
    # its acquire site; the table's rows show both ("caught by the pool":
    # "0: 5 warned about ...", "leak source": the site), while the verdict
    # says "5 connections stuck, unnoticed".
    config = ReplayConfig("stuck", duration=10, leak_start=3)
    site = _ROOT + "safepool/replay/app.py:80 in payment"
    run = PoolRun("safepool", leaked=5, events=[{"event": "leak_suspect", "acquired_at": site}] * 5)
    run.records += [rec(s + i / 16, s + i / 16 + 1 / 64) for s in range(10) for i in range(16)]
    summary = summarize(run, config)
    table = rows(config, summary)
    assert table["caught by the pool"].startswith("0: 5 warned about")
    assert table["leak source (acquired at)"] == "safepool/replay/app.py:80 in payment"
    [verdict] = verdicts([summary], config)
    assert "unnoticed" not in verdict and "safepool/replay/app.py:80 in payment" in verdict


# A bug until s63 (fixed): report.py:174 takes 'the last two' as last_second - 1, not the last two with answers
def test_not_recovered_when_the_bad_second_is_one_of_the_last_two_with_answers() -> None:
    # recovery()'s docstring: "not recovered when that second is one of the
    # last two with answers". Second 8 failed, second 9 had no answer, second
    # 10 did: 8 is one of the last two seconds with answers, yet the code
    # compares with last_second - 1 = 9 and says recovered (in 6.5 s).
    seconds = seconds_of({2: (100, 0), 8: (100, 50), 9: (0, 0)}, 11)
    assert recovery(seconds, 2.5, 2.0) == (None, False)
