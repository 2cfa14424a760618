"""The pool's arguments: asyncpg's checks (with asyncpg's messages), the
pool's own options, and :class:`PoolConfig`, the checked settings that
``Pool.__init__`` (:func:`configure`) builds its parts from.
"""

from __future__ import annotations

import difflib
import inspect
import math
import re
from dataclasses import dataclass
from typing import Any, cast

from asyncpg import connection as _pg_connection
from asyncpg import protocol as _pg_protocol

from . import _internals as _pg
from . import _keepalive
from ._durations import plain_int, plain_number, validate_timeout
from ._keepalive import TcpKeepalive
from ._policy import AdaptiveQueue
from ._state import RESET_MODES, Backoff, PoolState
from .errors import PoolTypeError, PoolValueError, check_flag

QUEUE_POLICIES = ("fifo", "adaptive")
# queue_policy="adaptive": CoDel's delay target and interval (seconds); see
# docs/backpressure.md for the measurements behind them.
DEFAULT_QUEUE_TARGET = 0.01
DEFAULT_QUEUE_INTERVAL = 0.1
# fail_fast=True: consecutive failed connects, with no connection left, after
# which acquires fail at once with ServerUnavailableError.
BREAKER_THRESHOLD = 3
class _PoolSetting:
    """The value of an argument left out (max_waiters; acquire()'s timeout
    and lease_timeout): "the pool's setting". One instance, compared by
    identity; its repr is what ``help(pool.acquire)`` shows."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "<the pool's setting>"


DEFAULT: Any = _PoolSetting()


def validate_site_share(share: Any) -> float | None:
    """``max_site_share``, checked; a real number of another type (numpy's, a
    Fraction) as the int or float it is, as the sizes take it."""
    if share is None:
        return None
    share = plain_number(share)
    if isinstance(share, bool) or not isinstance(share, (int, float)):
        raise PoolTypeError(f"max_site_share must be a number or None, got {type(share).__name__}")
    if not 0 < share <= 1:
        raise PoolValueError(
            f"max_site_share must be > 0 and <= 1 (the fraction of max_size one acquire site may hold), "
            f"got {share!r}"
        )
    return share


def adaptive_queue(policy: Any, target: Any, interval: Any) -> AdaptiveQueue | None:
    if policy not in QUEUE_POLICIES:
        raise PoolValueError(f"queue_policy must be one of {QUEUE_POLICIES}, got {policy!r}")
    target = validate_timeout("queue_target", target, allow_none=False, positive=True)
    interval = validate_timeout("queue_interval", interval, allow_none=False, positive=True)
    if policy == "fifo" and (target, interval) != (DEFAULT_QUEUE_TARGET, DEFAULT_QUEUE_INTERVAL):
        # (Taken and dropped, the setting would look in force: a pool that
        # forgot queue_policy="adaptive" would get no sign of it.)
        given = [
            f"{name}={value}s"
            for name, value, default in (
                ("queue_target", target, DEFAULT_QUEUE_TARGET),
                ("queue_interval", interval, DEFAULT_QUEUE_INTERVAL),
            )
            if value != default
        ]  # (only what the caller set: review h286 read a default it had not passed as its own)
        raise PoolValueError(
            f"queue_target and queue_interval apply only with queue_policy='adaptive' "
            f"(queue_policy is {policy!r}; got {', '.join(given)})"
        )
    if target >= interval:
        raise PoolValueError(
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
            raise PoolTypeError(f"{size_name} must be an int, got {size!r}")
    for number_name, number in (
        ("max_queries", max_queries),
        ("max_inactive_connection_lifetime", max_inactive_connection_lifetime),
    ):
        if not isinstance(number, (int, float)):
            raise PoolTypeError(f"{number_name} must be a number, got {number!r}")
        if number != number:
            raise PoolValueError(f"{number_name} must not be NaN")
    if max_size <= 0:
        raise PoolValueError("max_size is expected to be greater than zero")
    if min_size < 0:
        raise PoolValueError("min_size is expected to be greater or equal to zero")
    if min_size > max_size:
        raise PoolValueError("min_size is greater than max_size")
    if init_size is None:
        init_size = min_size
    if init_size < 0:
        raise PoolValueError("init_size is expected to be greater or equal to zero")
    if init_size > max_size:
        raise PoolValueError("init_size is greater than max_size")
    if init_size < min_size:
        raise PoolValueError("init_size is smaller than min_size")
    if max_queries <= 0:
        raise PoolValueError("max_queries is expected to be greater than zero")
    if max_inactive_connection_lifetime < 0:
        raise PoolValueError("max_inactive_connection_lifetime is expected to be greater or equal to zero")
    return int(init_size)


def check_options(
    max_waiters: Any, max_connecting: Any, fail_fast: Any, wait_on_connect_error: Any, reset_mode: Any,
    reset_modes: tuple[str, ...],
) -> tuple[int | None, int | None]:
    """safepool's own options; returns ``max_waiters`` and ``max_connecting``
    (checked, as ints: an integer of another type, numpy's, taken as the
    sizes take it)."""
    # TypeError for a wrong type, ValueError for a wrong value (as the sizes).
    max_waiters, max_connecting = plain_int(max_waiters), plain_int(max_connecting)
    for bound_name, bound, least in (("max_waiters", max_waiters, 0), ("max_connecting", max_connecting, 1)):
        if bound is None:
            continue
        if isinstance(bound, bool) or not isinstance(bound, int):
            raise PoolTypeError(f"{bound_name} must be an int >= {least} or None, got {bound!r}")
        if bound < least:
            raise PoolValueError(f"{bound_name} must be an int >= {least} or None, got {bound!r}")
    check_flag("fail_fast", fail_fast)
    check_flag("wait_on_connect_error", wait_on_connect_error)
    if reset_mode not in reset_modes:
        raise PoolValueError(f"reset_mode must be one of {reset_modes}, got {reset_mode!r}")
    return cast("int | None", max_waiters), cast("int | None", max_connecting)  # (checked above)


_UNEXPECTED_KEYWORD = re.compile(r"unexpected keyword argument '([^']+)'")


def misspelt_keyword_hint(error: TypeError) -> str | None:
    """What to tell a caller whose keyword reached :func:`asyncpg.connect`
    unknown (``create_pool(lease_timout=5)``): ``create_pool()`` hands every
    keyword it does not know to asyncpg's connect, which raises ``TypeError``
    at the first connect, as with asyncpg's pool. Returns the words to add
    to ``error``'s message, naming the option or connect keyword the name
    is closest to (:func:`difflib.get_close_matches`), or None when there is
    none close or ``error`` is not about a keyword."""
    text = str(error)
    if not text.startswith("connect() got an unexpected keyword argument "):
        return None  # (a connection_class's own __init__, run inside connect(): its error, left alone)
    found = _UNEXPECTED_KEYWORD.search(text)
    if found is None:
        return None
    from .pool import Pool  # (not at import: pool imports this module)

    def keywords(function: Any) -> list[str]:
        kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        return [p.name for p in inspect.signature(function).parameters.values() if p.kind in kinds]

    ours = [name for name in keywords(Pool.__init__) if name != "self"]
    theirs = [name for name in keywords(_pg_connection.connect) if name not in ours]
    match = difflib.get_close_matches(found.group(1), ours + theirs, n=1, cutoff=0.75)
    if not match:
        return None
    where = "an option of safepool.create_pool()" if match[0] in ours else "a keyword of asyncpg.connect()"
    return f"did you mean {match[0]}=, {where}?"


def check_resize(max_size: Any, min_size: Any) -> tuple[int, int | None]:
    """``Pool.resize()``'s arguments, as ints (an integer of another type,
    numpy's, taken as create_pool() takes it)."""
    # TypeError for a wrong type, ValueError for a wrong value, as create_pool().
    max_size, min_size = plain_int(max_size), plain_int(min_size)
    if isinstance(max_size, bool) or not isinstance(max_size, int):
        raise PoolTypeError(f"max_size must be an int, got {type(max_size).__name__}")
    if max_size <= 0:
        raise PoolValueError(f"max_size must be an int > 0, got {max_size!r}")
    if min_size is not None and (isinstance(min_size, bool) or not isinstance(min_size, int)):
        raise PoolTypeError(f"min_size must be an int, got {type(min_size).__name__}")
    if min_size is not None and not 0 <= min_size <= max_size:
        raise PoolValueError(f"min_size must be an int between 0 and max_size, got {min_size!r}")
    return max_size, min_size


@dataclass(frozen=True, slots=True)
class PoolConfig:
    """A pool's settings, checked. The sizes here are the initial ones
    (``resize()`` changes the core's)."""

    name: str
    init_size: int
    min_size: int
    max_size: int
    max_queries: int
    max_inactive_lifetime: float
    max_lifetime: float | None
    tcp_keepalive: TcpKeepalive | None
    lease_timeout: float | None
    leak_warning_after: float | None
    acquire_timeout: float | None
    reset_timeout: float | None
    backend_exit_timeout: float
    capture_stack: bool
    max_waiters: int | None
    max_connecting: int | None
    fail_fast: bool
    wait_on_connect_error: bool
    reset_mode: str
    backoff: Backoff | None
    max_site_share: float | None
    adaptive: AdaptiveQueue | None
    # A user reset= hook, or a connection class with its own reset(), is
    # called as asyncpg calls it (asyncpg's own rollback first, in the
    # hook's case); it and an overridden get_reset_query() run on every
    # release as with asyncpg, statement or not.
    custom_reset: bool
    always_reset: bool

    @property
    def site_caps(self) -> bool:
        return self.max_site_share is not None

    def new_state(self) -> PoolState:
        """The state core these settings describe."""
        return PoolState(
            max_size=self.max_size,
            min_size=self.min_size,
            max_waiters=self.max_waiters,
            max_connecting=self.max_connecting,
            max_inactive_lifetime=self.max_inactive_lifetime,
            max_lifetime=self.max_lifetime,
            backoff=self.backoff,
            breaker_threshold=BREAKER_THRESHOLD if self.fail_fast else None,
            wait_on_connect_error=self.wait_on_connect_error,
            max_site_share=self.max_site_share,
            adaptive=self.adaptive,
            reset_mode=self.reset_mode,
            always_reset=self.always_reset,
        )


def configure(
    name: str,
    *,
    min_size: Any,
    max_size: Any,
    init_size: Any,
    max_queries: Any,
    max_inactive_connection_lifetime: Any,
    connection_class: Any,
    record_class: Any,
    reset: Any,
    max_lifetime: Any,
    tcp_keepalive: Any,
    lease_timeout: Any,
    leak_warning_after: Any,
    capture_stack: Any,
    max_waiters: Any,
    acquire_timeout: Any,
    max_connecting: Any,
    fail_fast: Any,
    wait_on_connect_error: Any,
    reset_mode: Any,
    reset_timeout: Any,
    backend_exit_timeout: Any,
    backoff: Any,
    max_site_share: Any,
    queue_policy: Any,
    queue_target: Any,
    queue_interval: Any,
) -> PoolConfig:
    """Check ``Pool``'s arguments (asyncpg's first, in asyncpg's order, with
    its messages) and return the settings.

    :raises TypeError: an argument of the wrong type.
    :raises ValueError: an argument out of range."""
    min_size, max_size, init_size, max_queries = (
        plain_number(min_size), plain_number(max_size), plain_number(init_size), plain_number(max_queries)
    )
    max_inactive_connection_lifetime = plain_number(max_inactive_connection_lifetime)
    init_size = check_sizes(min_size, max_size, init_size, max_queries, max_inactive_connection_lifetime)
    # (A non-class too: issubclass() alone raised its bare TypeError.)
    if not isinstance(connection_class, type) or not issubclass(connection_class, _pg_connection.Connection):
        raise PoolTypeError(
            f"connection_class is expected to be a subclass of asyncpg.Connection, got {connection_class!r}"
        )
    if not isinstance(record_class, type) or not issubclass(record_class, _pg_protocol.Record):
        raise PoolTypeError(f"record_class is expected to be a subclass of asyncpg.Record, got {record_class!r}")
    # The setter of Pool.capture_stack already refused what create_pool() took.
    if capture_stack is not None and not isinstance(capture_stack, bool):
        raise PoolTypeError(f"capture_stack must be True, False or None, got {capture_stack!r}")
    lease_timeout = validate_timeout("lease_timeout", lease_timeout, positive=True)
    max_lifetime = validate_timeout("max_lifetime", max_lifetime, positive=True)
    if max_lifetime == math.inf:
        max_lifetime = None  # (never: as None, with no timer at infinity)
    leak_warning_after = validate_timeout("leak_warning_after", leak_warning_after)
    acquire_timeout = validate_timeout("acquire_timeout", acquire_timeout)
    # 0 would fail every reset (each release then closes its connection and
    # raises TimeoutError): refused, as lease_timeout=0, with one message for
    # every value refused (review h237); None means the default.
    reset_timeout = validate_timeout("reset_timeout", reset_timeout, positive=True, none="means the default")
    backend_exit_timeout = validate_timeout("backend_exit_timeout", backend_exit_timeout, allow_none=False)
    if backend_exit_timeout == math.inf:
        # (a peer that never answers, a cut network, would hold the place for ever)
        raise PoolValueError(f"backend_exit_timeout must be a finite number of seconds (0: no wait), got {backend_exit_timeout!r}")
    if max_waiters is DEFAULT:
        # Unbounded, as asyncpg: a bound can fail a call that works on
        # asyncpg's pool (1,500 gathered queries on 10 connections), so it
        # is opt-in (docs/backpressure.md recommends one for services).
        max_waiters = None
    max_waiters, max_connecting = check_options(
        max_waiters, max_connecting, fail_fast, wait_on_connect_error, reset_mode, RESET_MODES
    )
    if backoff is not None and not isinstance(backoff, Backoff):
        raise PoolTypeError(f"backoff must be a safepool.Backoff or None, got {type(backoff).__name__}")
    adaptive = adaptive_queue(queue_policy, queue_target, queue_interval)
    max_site_share = validate_site_share(max_site_share)
    # A reset of the connection class's own: its reset(), or (asyncpg 0.30+)
    # the _reset() that asyncpg's reset() calls first, a subclass's or a
    # patch of asyncpg's Connection itself (_pg.overrides): the release then
    # calls reset(), as asyncpg's pool does, instead of sending asyncpg's
    # reset query itself. Read once, for the pool's life.
    custom_reset = reset is not None or _pg.overrides(connection_class, "reset") or (
        _pg.HAS_PUBLIC_RESET_QUERY and _pg.overrides(connection_class, "_reset")
    )
    return PoolConfig(
        name=name,
        init_size=init_size,
        min_size=min_size,
        max_size=max_size,
        max_queries=max_queries,
        max_inactive_lifetime=max_inactive_connection_lifetime,
        max_lifetime=max_lifetime,
        tcp_keepalive=_keepalive.check(tcp_keepalive),
        lease_timeout=lease_timeout,
        leak_warning_after=leak_warning_after,
        acquire_timeout=acquire_timeout,
        reset_timeout=reset_timeout,
        backend_exit_timeout=backend_exit_timeout,
        capture_stack=capture_stack if capture_stack is not None else leak_warning_after is not None,
        max_waiters=max_waiters,
        max_connecting=max_connecting,
        fail_fast=fail_fast,
        wait_on_connect_error=wait_on_connect_error,
        reset_mode=reset_mode,
        backoff=backoff,
        max_site_share=max_site_share,
        adaptive=adaptive,
        custom_reset=custom_reset,
        always_reset=custom_reset or _pg.overrides_reset_query(connection_class),
    )
