"""TCP keepalive on the pool's connections (``create_pool(tcp_keepalive=)``).

A connection whose peer vanished without a FIN or an RST (a failover that
moved the address, a NAT or load balancer that dropped an idle mapping, a
host that lost power) looks alive to the client: the next query waits for
an answer that never comes, until the kernel gives up retransmitting
(about 15 minutes on Linux's defaults) or, if the request was already
acknowledged, for ever. libpq turns TCP keepalive on for every connection;
asyncpg sets none (MagicStack/asyncpg#606). With ``tcp_keepalive`` the pool
sets the socket options on each new TCP connection, so the kernel probes a
quiet connection and fails it once the peer stops answering (tcp(7):
``SO_KEEPALIVE``, ``TCP_KEEPIDLE``, ``TCP_KEEPINTVL``, ``TCP_KEEPCNT``,
``TCP_USER_TIMEOUT``). asyncpg then sees the connection lost, and the pool
replaces it. Nothing on the hot path: the options are set once per connect.
"""

from __future__ import annotations

import math
import socket
from dataclasses import dataclass
from numbers import Integral, Real
from typing import Any

from ._durations import plain_int, plain_number
from ._logging import guarded_logger
from .errors import PoolTypeError, PoolValueError

logger = guarded_logger("safepool")

# The kernel's ranges (Linux, net/ipv4/tcp.c): whole seconds for the idle
# time and the interval, probes up to 127, the user timeout in milliseconds.
_MAX_SECONDS = 32767
_MAX_PROBES = 127
_MAX_USER_TIMEOUT = (2**31 - 1) / 1000.0

# macOS names the idle time TCP_KEEPALIVE; Linux and Windows TCP_KEEPIDLE.
_IDLE_OPTION: int | None = getattr(socket, "TCP_KEEPIDLE", None) or getattr(socket, "TCP_KEEPALIVE", None)
_TCP_FAMILIES = (socket.AF_INET, socket.AF_INET6)
# (level, option) -> its name, for the log of one the platform refuses.
_OPTION_NAMES = {
    (level, getattr(socket, name)): name
    for level, name in (
        (socket.SOL_SOCKET, "SO_KEEPALIVE"), (socket.IPPROTO_TCP, "TCP_KEEPIDLE"),
        (socket.IPPROTO_TCP, "TCP_KEEPALIVE"), (socket.IPPROTO_TCP, "TCP_KEEPINTVL"),
        (socket.IPPROTO_TCP, "TCP_KEEPCNT"), (socket.IPPROTO_TCP, "TCP_USER_TIMEOUT"),
    )
    if hasattr(socket, name)
}


def _seconds(name: str, value: Any, most: float) -> float:
    """``value``, checked, as a plain int or float (numpy's numbers and a
    Fraction too: create_pool() takes them for its sizes and durations)."""
    if isinstance(value, bool) or not isinstance(value, Real):
        raise PoolTypeError(f"TcpKeepalive.{name} must be a number of seconds, got {type(value).__name__}")
    seconds: float = plain_number(value)
    if not 0 < seconds <= most:  # (NaN too)
        raise PoolValueError(f"TcpKeepalive.{name} must be > 0 and <= {most} seconds, got {value!r}")
    return seconds


@dataclass(frozen=True, slots=True)
class TcpKeepalive:
    """TCP keepalive settings for a pool's connections over TCP
    (``create_pool(tcp_keepalive=TcpKeepalive(...))``; ``True`` takes these
    defaults). The same knobs as libpq's ``keepalives_idle``,
    ``keepalives_interval``, ``keepalives_count`` and ``tcp_user_timeout``.

    With the defaults, a connection whose peer stopped answering fails
    about ``idle + interval * count`` = 90 seconds after it went quiet; a
    statement waiting for its answer then raises asyncpg's connection error
    instead of waiting for ever. Connections over a Unix-domain socket have
    no TCP and are left alone; options the platform lacks are skipped.

    :param idle: seconds a connection is quiet before the first probe
        (rounded up to whole seconds; at most 32,767).
    :param interval: seconds between probes (rounded up to whole seconds).
    :param count: unanswered probes before the kernel fails the connection
        (1-127).
    :param user_timeout: seconds sent data may go unacknowledged before the
        kernel fails the connection (``TCP_USER_TIMEOUT``, Linux; rounded
        up to milliseconds); None leaves the system's (about 15 minutes of
        retransmissions on Linux's defaults). Keep it above the longest
        network stall you want to ride out. Set, Linux also uses it in
        place of ``count`` for the probes (tcp(7)): the connection fails
        once a probe went unanswered and ``user_timeout`` passed since the
        peer last answered (``idle=30, interval=10, user_timeout=30``: after about
        40 seconds, not 60).
    :raises TypeError: a value of the wrong type.
    :raises ValueError: a value out of range."""

    idle: float = 60.0
    interval: float = 10.0
    count: int = 3
    user_timeout: float | None = None

    def __post_init__(self) -> None:
        # (numpy's numbers kept as plain ones: frozen, hence object.__setattr__)
        object.__setattr__(self, "idle", _seconds("idle", self.idle, _MAX_SECONDS))
        object.__setattr__(self, "interval", _seconds("interval", self.interval, _MAX_SECONDS))
        count = self.count
        if isinstance(count, bool) or not isinstance(count, Integral):
            raise PoolTypeError(f"TcpKeepalive.count must be an int, got {type(count).__name__}")
        count = plain_int(count)
        if not 1 <= count <= _MAX_PROBES:
            raise PoolValueError(f"TcpKeepalive.count must be between 1 and {_MAX_PROBES}, got {count!r}")
        object.__setattr__(self, "count", count)
        if self.user_timeout is not None:
            object.__setattr__(self, "user_timeout", _seconds("user_timeout", self.user_timeout, _MAX_USER_TIMEOUT))

    def socket_options(self) -> list[tuple[int, int, int]]:
        """``(level, option, value)`` for ``setsockopt``, those this
        platform has: what :func:`apply` sets."""
        options = [(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)]
        for option, value in (
            (_IDLE_OPTION, math.ceil(self.idle)),
            (getattr(socket, "TCP_KEEPINTVL", None), math.ceil(self.interval)),
            (getattr(socket, "TCP_KEEPCNT", None), self.count),
            (
                getattr(socket, "TCP_USER_TIMEOUT", None),
                None if self.user_timeout is None else math.ceil(self.user_timeout * 1000),
            ),
        ):
            if option is not None and value is not None:
                options.append((socket.IPPROTO_TCP, option, value))
        return options


def check(value: Any) -> TcpKeepalive | None:
    """``create_pool(tcp_keepalive=)``: None or False (off), True (the
    defaults) or a :class:`TcpKeepalive`.

    :raises TypeError: anything else."""
    if value is None or value is False:
        return None
    if value is True:
        return TcpKeepalive()
    if not isinstance(value, TcpKeepalive):
        raise PoolTypeError(f"tcp_keepalive must be a safepool.TcpKeepalive, True, False or None, got {type(value).__name__}")
    return value


def apply(con: Any, keepalive: TcpKeepalive, pool_name: str) -> bool:
    """Set ``keepalive`` on ``con``'s socket; False when it has none to set
    (a Unix-domain socket, or a connection class without a transport), or
    the platform refused SO_KEEPALIVE itself. Each option is set on its own:
    one the platform refuses is logged at WARNING, by name, and the others
    are set all the same; the connection is kept (keepalive is a safety
    net, not a condition of the connect)."""
    transport = getattr(con, "_transport", None)
    sock = None if transport is None else transport.get_extra_info("socket")
    if sock is None or sock.family not in _TCP_FAMILIES:
        return False
    refused: list[str] = []
    error: OSError | None = None
    for level, option, value in keepalive.socket_options():
        try:
            sock.setsockopt(level, option, value)
        except OSError as exc:
            refused.append(_OPTION_NAMES.get((level, option), str(option)))
            error = error or exc
    if not refused:
        return True
    off = refused[0] == "SO_KEEPALIVE"
    logger.warning(
        "pool %r: could not set TCP keepalive option %s on a connection (%s); %s",
        pool_name, ", ".join(refused), error,
        "it is used without" if off else "the other keepalive options are set",
        extra={"event": "keepalive_failed", "pool": pool_name},
    )
    return not off
