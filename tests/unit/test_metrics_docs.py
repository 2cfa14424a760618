"""docs/metrics.md against the Prometheus exporter: every exported counter is
in the metric table, and the documented failure alert counts every way an
acquire fails for lack of a connection.

A new user found safepool_shed_total and safepool_admission_rejections_total
exported but undocumented, and the SafepoolAcquireFailures alert reading 0
while the adaptive queue (the recommended configuration) failed 196 of 200
acquires with PoolOverloadedError.
"""

from __future__ import annotations

import re
from pathlib import Path

from safepool.metrics.prometheus import COUNTERS

DOC = (Path(__file__).resolve().parents[2] / "docs" / "metrics.md").read_text()

# Counters of acquires that failed without a connection (PoolTimeoutError,
# PoolOverloadedError); ServerUnavailableError has SafepoolServerDown.
ACQUIRE_FAILURES = ("acquire_timeouts", "overload_rejections", "shed", "admission_rejections")


def test_every_exported_counter_is_in_the_metric_table() -> None:
    table = {m.group(1) for m in re.finditer(r"^\| `(safepool_\w+?)(?:\{[\w, ]+\})?` \|", DOC, re.MULTILINE)}
    missing = [f"safepool_{name}_total" for _, name, _ in COUNTERS if f"safepool_{name}_total" not in table]
    assert missing == []


def test_the_acquire_failure_alert_counts_every_failed_acquire() -> None:
    alert = re.search(r"- alert: SafepoolAcquireFailures\n\s+expr: (.*?)\n\s+# ", DOC, re.DOTALL)
    assert alert, "docs/metrics.md lost the SafepoolAcquireFailures alert"
    fields = {field for field, _, _ in COUNTERS}
    for name in ACQUIRE_FAILURES:
        assert name in fields
        assert f"rate(safepool_{name}_total[5m])" in alert.group(1), name


def _table(header: str) -> list[str]:
    """The first cells of the table under ``header`` (its column names row)."""
    rows = DOC.split(header + "\n", 1)[1].split("\n\n", 1)[0].splitlines()[1:]
    return [m.group(1) for row in rows if (m := re.match(r"^\| `(\w+)` \|", row))]


def test_health_codes_are_in_the_health_table_and_stats_rows_are_stats_fields() -> None:
    """19017ba put the new ``server_full`` health reason's row in the
    ``stats()`` field table (where it read as a field ``stats().server_full``,
    which does not exist) and left the health reason table without it."""
    import dataclasses
    import inspect

    from safepool import health
    from safepool.stats import PoolStats

    source = inspect.getsource(health)
    emitted = set(re.findall(r'HealthReason\(\s*"(\w+)"', source))
    assert "server_full" in emitted
    assert sorted(emitted - set(_table("| code | status | when |"))) == []
    fields = {f.name for f in dataclasses.fields(PoolStats)}
    assert sorted(set(_table("| field | unit | meaning |")) - fields) == []


def test_every_metric_family_and_instrument_has_its_row() -> None:
    """Every family the Prometheus collector describes, and every instrument
    PoolInstruments creates, has its row in docs/metrics.md (with no pool
    and no server: a family with no sample, such as
    safepool_connect_failing while connects succeed, is checked too)."""
    from typing import Any

    from safepool.metrics.otel import COUNTERS as OTEL_COUNTERS
    from safepool.metrics.otel import PoolInstruments
    from safepool.metrics.prometheus import PoolCollector

    prometheus = _table_names(r"safepool_\w+?", r"\{[\w, ]+\}")
    described = {m.name + ("_total" if m.type == "counter" else "") for m in PoolCollector().describe()}
    assert "safepool_connect_failing" in described
    assert sorted(described - prometheus) == []

    created: list[str] = []

    class Meter:
        def __getattr__(self, kind: str) -> Any:
            assert kind.startswith("create_"), kind

            def create(name: str, *args: Any, **kwargs: Any) -> object:
                created.append(name)
                return object()

            return create

    class Provider:
        def get_meter(self, *args: Any, **kwargs: Any) -> Meter:
            return Meter()

    PoolInstruments(meter_provider=Provider(), record_times=False)  # type: ignore[arg-type]
    assert "safepool.connect.failing" in created
    # A row names the instrument, or "safepool.<counter>" for every counter.
    rows = _table_names(r"[\w.]+", r"\{[\w.=]+\}")
    counters = {name for _, name, _, _ in OTEL_COUNTERS}
    assert sorted(set(created) - rows - counters) == []


def _table_names(name: str, labels: str) -> set[str]:
    """The metric names that open a row of a table in docs/metrics.md."""
    return {m.group(1) for m in re.finditer(rf"^\| `({name})(?:{labels})?` \|", DOC, re.MULTILINE)}


def test_only_a_five_character_code_is_taken_for_a_sqlstate() -> None:
    """The exporters put ``last_connect_sqlstate`` in a label: an error
    that happens to carry some other ``sqlstate`` attribute (a connect=
    callable's own) must not make a label value of it."""
    import asyncpg

    from safepool.stats import sqlstate

    class Odd(Exception):
        def __init__(self, code: object) -> None:
            self.sqlstate = code

    assert sqlstate(asyncpg.TooManyConnectionsError("too many connections")) == "53300"
    assert sqlstate(Odd("28P01")) == "28P01"
    for code in ("password=hunter2", "5330", "533000", "53 00", "p4ss1", 53300, None):
        assert sqlstate(Odd(code)) is None, code
    assert sqlstate(ConnectionRefusedError()) is None
