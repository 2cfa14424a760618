"""The surge replay's "back to >= 99% success after the surge" when the
load stops soon after the surge (helper-218, a fresh user's review).

`python -m safepool replay --scenario surge` accepts any `--duration` and
`--leak-start` whose surge (4 s) ends within the duration
(safepool/replay/cli.py:171 refuses only `surge_end > duration`), the suite's
own surge test among them (`--duration 6 --leak-start 1`). But
report.recovery() (safepool/replay/report.py:174) says "still failing at the
end" whenever the last unhealthy second is one of the last two with
answers, and the surge's last second always is when at most a second or so
of load follows it: both pools' rows then read "never (still failing at the
end)" and both verdicts "never recovered", as they did on a fresh run of
those arguments (asyncpg 26.0%, safepool 25.4% success; both goodputs over
96% of capacity), though no run that short can show a recovery. Below, a
pool that serves every request from the second the surge ends is told it
never recovered. Refusing such a window (exit 2), or saying the recovery
was not measured, would both do.
"""

from __future__ import annotations

import pytest

from safepool.replay.config import ReplayConfig
from safepool.replay.load import RequestRecord
from safepool.replay.report import summarize
from safepool.replay.runner import PoolRun


def _surge_run(config: ReplayConfig) -> PoolRun:
    """20 req/s, all served; during the surge 200 req/s, one in five served;
    from the surge's end on, all served again at once."""
    run = PoolRun("safepool")
    t = 0.0
    i = 0
    while t < config.duration:
        surging = config.leak_start <= t < config.surge_end
        ok = not surging or i % 5 == 0
        run.records.append(RequestRecord(t, t + 0.01, 200 if ok else 503, False))
        t += 1 / 200 if surging else 1 / 20
        i += 1
    return run


@pytest.mark.xfail(
    strict=True,
    reason="replay surge: --duration 6 --leak-start 1 is accepted (cli.py:171) but report.recovery() (report.py:174) "
    "cannot see a recovery in the 1 s after the surge: 'never recovered' for a pool serving everything at once",
)
def test_a_surge_run_too_short_to_show_recovery_is_refused_or_not_called_unrecovered() -> None:
    from safepool.replay.cli import _check, _UsageError

    config = ReplayConfig("surge", duration=6, rate=20, leak_probability=0, leak_start=1, client_deadline=1.0)
    try:
        _check(config)
    except _UsageError:
        return  # refused with a usage error: fine
    summary = summarize(_surge_run(config), config)
    assert summary.recovered, "a pool serving every request from the surge's end was reported as never recovered"


def test_the_same_pool_with_the_default_window_recovers() -> None:
    """(The control: with the default 3 s after the surge, it does.)"""
    config = ReplayConfig("surge", duration=10, rate=20, leak_probability=0, leak_start=3, client_deadline=1.0)
    summary = summarize(_surge_run(config), config)
    assert summary.recovered and summary.recovery_s is not None and summary.recovery_s <= 1.0
