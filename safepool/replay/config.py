"""What a replay run is made of: the scenarios, their settings, the pool
configurations compared (the recommended one lives here, and only here),
and the replay's one error type."""

from __future__ import annotations

import inspect
import math
from dataclasses import asdict, dataclass, replace
from typing import Any

import safepool

# The pools the replay compares, in the order they run.
POOLS = ("asyncpg", "safepool")
POOL_LABELS = {"asyncpg": "asyncpg.create_pool", "safepool": "safepool.create_pool"}

# The failure kinds, in the order ``--scenario all`` runs them.
SCENARIOS = ("leak", "stuck", "surge", "restart")
SCENARIO_TITLES = {
    "leak": "Connection leak (early return skips release)",
    "stuck": "Stuck task (a background task holds its connection while an upstream call hangs)",
    "surge": "Traffic surge (5x what the pool can serve, 1 s client deadline)",
    "restart": "Database restart under load",
}

# pg_stat_activity tells the pools' connections apart by application_name.
MONITOR_APP_NAME = "safepool-replay-monitor"

MIN_SIZE = 2  # both pools' min_size: leaked connections then show as new server connections

# Both pools' acquire timeout: half the tightest client deadline (1 s, the
# surge's). safepool takes it as ``acquire_timeout``; asyncpg's pool has no
# such option, so the service passes it to each ``acquire(timeout=...)``, as
# a real service on asyncpg would (runner.AcquireTimeout). Without it
# asyncpg's queue waits for ever, and the comparison would show the cost of
# a missing setting, not of the pool. asyncpg's per-call timeout also
# bounds the lease's release (its reset); safepool's pool-wide one does not
# (reset_timeout does). No scenario's reset comes near it (docs/replay.md).
ACQUIRE_TIMEOUT = 0.5


def app_name(pool: str) -> str:
    return f"safepool-replay-{pool}"


class ReplayError(Exception):
    """A failure the command reports in one line, with its exit code."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass(frozen=True, slots=True)
class ReplayConfig:
    """One scenario's settings. Times in seconds, rates in requests per second."""

    scenario: str = "leak"
    duration: float = 12.0  # seconds of load, for each pool
    rate: float = 50.0  # requests per second (surge: the rate before and after the surge)
    leak_probability: float = 0.1  # leak, stuck: share of requests on the faulty line once the fault starts
    leak_start: float = 3.0  # when the fault starts (leak, stuck: the faulty line; surge: the surge; restart: the stop)
    pool_size: int = 10  # max_size of both pools
    lease_timeout: float | None = None  # overrides the recommended configuration's
    leak_warning_after: float | None = None  # overrides the recommended configuration's
    request_timeout: float = 2.0  # the service's per-request deadline; past it, HTTP 500
    client_deadline: float | None = None  # the client gives up after this; None: request_timeout + 3
    surge_factor: float = 5.0  # surge: the arrival rate during the surge, as a multiple of the capacity
    surge_duration: float = 4.0  # surge: how long the surge lasts
    query_time: float = 0.25  # surge: how long each request holds its connection (pg_sleep)
    downtime: float = 2.0  # restart: how long the server stays down
    seed: int = 1
    dsn: str | None = None

    @property
    def client_timeout(self) -> float:
        """Longer than the service's own deadline unless the scenario sets a tighter one."""
        return self.client_deadline if self.client_deadline is not None else self.request_timeout + 3.0

    @property
    def capacity(self) -> float:
        """surge: requests per second the pool can serve (max_size / query_time)."""
        return self.pool_size / self.query_time

    @property
    def surge_end(self) -> float:
        return self.leak_start + self.surge_duration

    def rate_at(self, t: float) -> float:
        """The arrival rate at ``t`` seconds into the run."""
        if self.scenario == "surge" and self.leak_start <= t < self.surge_end:
            return self.surge_factor * self.capacity
        return self.rate

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["dsn"] = "embedded" if self.dsn is None else "external"  # never echo credentials
        data["client_timeout"] = self.client_timeout
        if self.scenario == "surge":
            data["capacity"] = self.capacity
        return data


# Shortened so that ``--scenario all`` (both pools, four scenarios) takes
# about two minutes on a small machine.
SCENARIO_DEFAULTS: dict[str, ReplayConfig] = {
    "leak": ReplayConfig("leak", duration=12, rate=50, leak_probability=0.1, leak_start=3),
    "stuck": ReplayConfig("stuck", duration=12, rate=50, leak_probability=0.05, leak_start=3),
    # capacity 10 / 0.25 s = 40 req/s: 20 req/s before and after, 200 req/s for 4 s.
    "surge": ReplayConfig(
        "surge", duration=10, rate=20, leak_probability=0, leak_start=3, client_deadline=1.0, query_time=0.25
    ),
    "restart": ReplayConfig("restart", duration=10, rate=50, leak_probability=0, leak_start=3, downtime=2.0),
}


def scenario_config(name: str, **overrides: Any) -> ReplayConfig:
    """The scenario's defaults with ``overrides`` (None values are ignored)."""
    return replace(SCENARIO_DEFAULTS[name], **{k: v for k, v in overrides.items() if v is not None})


# --------------------------------------------------- the pools compared


def pool_accepts(option: str) -> bool:
    """Whether this safepool's ``create_pool`` knows ``option`` (the
    bulkhead and the adaptive queue are newer than the rest)."""
    return option in inspect.signature(safepool.Pool.__init__).parameters


def recommended_options(config: ReplayConfig) -> dict[str, Any]:
    """safepool's recommended configuration for a web service, beyond the
    pool's size: the same for every scenario (docs/replay.md explains each).

    - ``lease_timeout``: longer than the service's request deadline (in-request
      leases end by then), so it only takes back connections held outside any
      request: a stuck background task, a reference kept by mistake.
    - ``leak_warning_after``: names the acquire site of any lease held longer.
    - ``acquire_timeout``: half the tightest client deadline; a request served
      after its client gave up is wasted work.
    - ``max_waiters``: a queue the pool can drain within the acquire timeout
      (a few waiters per connection); one more is refused at once.
    - ``fail_fast``: while the server is down, refuse at once instead of queueing.
    - ``max_site_share`` (bulkhead) and ``queue_policy="adaptive"`` (CoDel with
      deadline-aware admission), when this safepool has them.
    """
    options: dict[str, Any] = {
        "lease_timeout": config.lease_timeout if config.lease_timeout is not None else config.request_timeout + 1.0,
        "leak_warning_after": config.leak_warning_after if config.leak_warning_after is not None else 1.0,
        "acquire_timeout": ACQUIRE_TIMEOUT,
        "max_waiters": 4 * config.pool_size,
        "fail_fast": True,
    }
    if pool_accepts("max_site_share"):
        options["max_site_share"] = 0.5
    if pool_accepts("queue_policy"):
        options["queue_policy"] = "adaptive"
    return options


def pool_options(pool: str, config: ReplayConfig) -> dict[str, Any]:
    """``create_pool`` keyword arguments for ``pool`` ("asyncpg": its defaults;
    its acquire timeout goes to each ``acquire()``, see ``ACQUIRE_TIMEOUT``)."""
    options: dict[str, Any] = {"min_size": min(MIN_SIZE, config.pool_size), "max_size": config.pool_size}
    if pool == "safepool":
        options |= recommended_options(config)
    return options


def describe_options(pool: str, config: ReplayConfig) -> str:
    """The configuration as printed in the table."""
    options = pool_options(pool, config)
    text = ", ".join(f"{key}={_fmt(value)}" for key, value in options.items())
    if pool == "safepool":
        return text
    return f"{text}, acquire(timeout={_fmt(ACQUIRE_TIMEOUT)}) (defaults otherwise)"


def _fmt(value: Any) -> str:
    if isinstance(value, float) and math.isfinite(value) and value == int(value):
        return f"{value:g}"
    return repr(value)
