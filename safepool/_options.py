"""Argument checks of the pool's own options (asyncpg's are in the face)."""

from __future__ import annotations

from typing import Any

from ._policy import AdaptiveQueue

QUEUE_POLICIES = ("fifo", "adaptive")
# queue_policy="adaptive": CoDel's delay target and interval (seconds); see
# docs/backpressure.md for the measurements behind them.
DEFAULT_QUEUE_TARGET = 0.01
DEFAULT_QUEUE_INTERVAL = 0.1


def validate_timeout(name: str, value: Any, *, allow_none: bool = True) -> float | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number of seconds or None, got {type(value).__name__}")
    if value != value or value < 0:  # NaN or negative
        raise ValueError(f"{name} must be >= 0 seconds, got {value!r}")
    return float(value)


def validate_site_share(share: Any) -> None:
    if share is None:
        return
    if isinstance(share, bool) or not isinstance(share, (int, float)):
        raise TypeError(f"max_site_share must be a number or None, got {type(share).__name__}")
    if not 0 < share <= 1:
        raise ValueError(
            f"max_site_share must be > 0 and <= 1 (the fraction of max_size one acquire site may hold), "
            f"got {share!r}"
        )


def adaptive_queue(policy: Any, target: Any, interval: Any) -> AdaptiveQueue | None:
    if policy not in QUEUE_POLICIES:
        raise ValueError(f"queue_policy must be one of {QUEUE_POLICIES}, got {policy!r}")
    target = validate_timeout("queue_target", target, allow_none=False)
    interval = validate_timeout("queue_interval", interval, allow_none=False)
    if not target or not interval:
        raise ValueError("queue_target and queue_interval must be > 0 seconds")
    if target >= interval:
        raise ValueError(
            f"queue_target ({target}s) must be shorter than queue_interval ({interval}s): "
            "the queue counts as standing only after a whole interval"
        )
    return AdaptiveQueue(target, interval) if policy == "adaptive" else None


def check_sizes(
    min_size: Any, max_size: Any, init_size: Any, max_queries: Any, max_inactive_connection_lifetime: Any
) -> int:
    """asyncpg's checks and messages, in asyncpg's order (types first:
    asyncpg compares without checking, so a wrong type would fail with
    "'<=' not supported ..." or at first use). Returns init_size."""
    for size_name, size in (("max_size", max_size), ("min_size", min_size), ("init_size", init_size)):
        if not isinstance(size, int) and not (size is None and size_name == "init_size"):
            raise TypeError(f"{size_name} must be an int, got {size!r}")
    for number_name, number in (
        ("max_queries", max_queries),
        ("max_inactive_connection_lifetime", max_inactive_connection_lifetime),
    ):
        if not isinstance(number, (int, float)):
            raise TypeError(f"{number_name} must be a number, got {number!r}")
        if number != number:
            raise ValueError(f"{number_name} must not be NaN")
    if max_size <= 0:
        raise ValueError("max_size is expected to be greater than zero")
    if min_size < 0:
        raise ValueError("min_size is expected to be greater or equal to zero")
    if min_size > max_size:
        raise ValueError("min_size is greater than max_size")
    if init_size is None:
        init_size = min_size
    if init_size < 0:
        raise ValueError("init_size is expected to be greater or equal to zero")
    if init_size > max_size:
        raise ValueError("init_size is greater than max_size")
    if init_size < min_size:
        raise ValueError("init_size is smaller than min_size")
    if max_queries <= 0:
        raise ValueError("max_queries is expected to be greater than zero")
    if max_inactive_connection_lifetime < 0:
        raise ValueError("max_inactive_connection_lifetime is expected to be greater or equal to zero")
    return int(init_size)


def check_options(
    max_waiters: Any, max_connecting: Any, fail_fast: Any, wait_on_connect_error: Any, reset_mode: Any,
    reset_modes: tuple[str, ...],
) -> int | None:
    """safepool's own options; returns ``max_waiters`` (checked)."""
    if max_waiters is not None and (
        isinstance(max_waiters, bool) or not isinstance(max_waiters, int) or max_waiters < 0
    ):
        raise ValueError(f"max_waiters must be an int >= 0 or None, got {max_waiters!r}")
    if max_connecting is not None and (
        isinstance(max_connecting, bool) or not isinstance(max_connecting, int) or max_connecting < 1
    ):
        raise ValueError(f"max_connecting must be an int >= 1 or None, got {max_connecting!r}")
    for flag_name, flag in (("fail_fast", fail_fast), ("wait_on_connect_error", wait_on_connect_error)):
        if not isinstance(flag, bool):
            raise TypeError(f"{flag_name} must be True or False, got {flag!r}")
    if reset_mode not in reset_modes:
        raise ValueError(f"reset_mode must be one of {reset_modes}, got {reset_mode!r}")
    return max_waiters
