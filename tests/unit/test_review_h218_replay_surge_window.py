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
was not measured, would both do. Fixed: a surge run must leave 3 s of load
after the surge (cli.AFTER_SURGE), else it is refused with a usage error.
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


@pytest.mark.parametrize("duration, leak_start", [(6, 1), (7.9, 1), (8.9, 2), (9.5, 3)])
def test_a_surge_run_too_short_to_show_recovery_is_refused(duration: float, leak_start: float) -> None:
    from safepool.replay.cli import _check, _UsageError

    config = ReplayConfig("surge", duration=duration, rate=20, leak_probability=0, leak_start=leak_start,
                          client_deadline=1.0)
    with pytest.raises(_UsageError, match=r"must leave 3 s after the surge .* to see whether the pool recovers"):
        _check(config)


@pytest.mark.parametrize("duration, leak_start", [(8, 1), (10, 3), (12, 3)])
def test_the_shortest_surge_run_allowed_shows_a_recovery(duration: float, leak_start: float) -> None:
    from safepool.replay.cli import _check

    config = ReplayConfig("surge", duration=duration, rate=20, leak_probability=0, leak_start=leak_start,
                          client_deadline=1.0)
    _check(config)  # (accepted)
    summary = summarize(_surge_run(config), config)
    assert summary.recovered and summary.recovery_s is not None and summary.recovery_s <= 1.0


def test_the_same_pool_with_the_default_window_recovers() -> None:
    """(The control: with the default 3 s after the surge, it does.)"""
    config = ReplayConfig("surge", duration=10, rate=20, leak_probability=0, leak_start=3, client_deadline=1.0)
    summary = summarize(_surge_run(config), config)
    assert summary.recovered and summary.recovery_s is not None and summary.recovery_s <= 1.0
