"""What a replay run is made of: its settings and its one error type."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

# The pools the replay compares, in the order they run.
POOLS = ("asyncpg", "safepool")
POOL_LABELS = {"asyncpg": "asyncpg.create_pool", "safepool": "safepool.create_pool"}

# pg_stat_activity tells the pools' connections apart by application_name.
MONITOR_APP_NAME = "safepool-replay-monitor"


def app_name(pool: str) -> str:
    return f"safepool-replay-{pool}"


class ReplayError(Exception):
    """A failure the command reports in one line, with its exit code."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass(frozen=True, slots=True)
class ReplayConfig:
    duration: float = 25.0  # seconds of load, for each pool
    rate: float = 50.0  # requests per second
    leak_probability: float = 0.05  # share of requests that take the leaking branch once the leak starts
    leak_start: float = 5.0  # seconds into each run when the buggy branch starts being hit
    pool_size: int = 10  # min_size = max_size, for both pools
    lease_timeout: float = 5.0  # safepool only
    leak_warning_after: float = 1.0  # safepool only
    request_timeout: float = 2.0  # the service's per-request deadline; past it, HTTP 500
    seed: int = 1
    dsn: str | None = None

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["dsn"] = "embedded" if self.dsn is None else "external"  # never echo credentials
        return data
