"""safepool: a resilient drop-in replacement for asyncpg's connection pool."""

from __future__ import annotations

from ._clock import Clock, ManualClock
from ._histogram import Distribution
from ._keepalive import TcpKeepalive
from ._sites import site
from ._state import Backoff
from .errors import (
    EventLoopMismatchError,
    LeaseExpiredError,
    PoolArgumentError,
    PoolClosedError,
    PoolError,
    PoolInterfaceError,
    PoolOverloadedError,
    PoolTimeoutError,
    PoolTypeError,
    PoolValueError,
    ServerUnavailableError,
)
from .pool import Pool, PoolAcquireContext, create_pool
from .proxy import PoolConnectionProxy
from .stats import LeaseInfo, PoolOptions, PoolStats, SiteStats

__version__ = "0.1.0"

__all__ = [
    "Backoff",
    "TcpKeepalive",
    "Clock",
    "Distribution",
    "EventLoopMismatchError",
    "LeaseExpiredError",
    "LeaseInfo",
    "ManualClock",
    "Pool",
    "PoolAcquireContext",
    "PoolArgumentError",
    "PoolClosedError",
    "PoolConnectionProxy",
    "PoolOptions",
    "PoolError",
    "PoolInterfaceError",
    "PoolOverloadedError",
    "PoolStats",
    "PoolTimeoutError",
    "PoolTypeError",
    "PoolValueError",
    "ServerUnavailableError",
    "SiteStats",
    "create_pool",
    "site",
]
