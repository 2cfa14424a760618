"""Review s64: mutation review of safepool/_keepalive.py. Mutants that
survived the existing tests, killed here.

The ranges' upper ends were only tested from outside (32768, 128), so a
``<`` for ``<=`` went unnoticed; :func:`apply` was only exercised through a
pool whose kernel takes SO_KEEPALIVE, so the paths for a socket with none
to set, SO_KEEPALIVE itself refused, and the log's option names and first
error were not checked. No server: :func:`apply` gets a real TCP socket
(unconnected; the kernel keeps the options all the same), behind a stand-in
for asyncpg's transport, and reads them back with ``getsockopt``.
"""

from __future__ import annotations

import logging
import socket
from types import SimpleNamespace
from typing import Any

import pytest

from safepool import TcpKeepalive
from safepool._keepalive import apply

linux_only = pytest.mark.skipif(not hasattr(socket, "TCP_USER_TIMEOUT"), reason="Linux's TCP options")


class Refusing(socket.socket):
    """A real socket whose listed options the "platform" refuses, each with
    its own error."""

    def __init__(self, refuse: dict[tuple[int, int], OSError], family: int = socket.AF_INET) -> None:
        super().__init__(family, socket.SOCK_STREAM)
        self.refuse = refuse

    def setsockopt(self, level: int, option: int, value: Any, *rest: Any) -> None:  # type: ignore[override]
        if (level, option) in self.refuse:
            raise self.refuse[level, option]
        super().setsockopt(level, option, value, *rest)


def connection(sock: socket.socket | None) -> Any:
    """A stand-in for an asyncpg connection: its ``_transport`` hands out
    ``sock`` as asyncio's transports do (``get_extra_info("socket")``)."""
    return SimpleNamespace(_transport=SimpleNamespace(get_extra_info=lambda key: sock if key == "socket" else None))


def keepalive_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if getattr(r, "event", None) == "keepalive_failed"]


def test_the_upper_ends_of_the_ranges_are_taken() -> None:
    """The docstring's "at most 32,767", "1-127" and the kernel's largest
    user timeout (2**31 - 1 ms) are themselves allowed."""
    settings = TcpKeepalive(idle=32767, interval=32767, count=127, user_timeout=(2**31 - 1) / 1000)
    assert (settings.idle, settings.interval, settings.count) == (32767, 32767, 127)
    if hasattr(socket, "TCP_USER_TIMEOUT"):
        assert (socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, 2**31 - 1) in settings.socket_options()
    assert TcpKeepalive(count=1).count == 1


@linux_only
def test_an_option_the_platform_lacks_is_left_out(monkeypatch: pytest.MonkeyPatch) -> None:
    """No TCP_USER_TIMEOUT on this platform: no option is asked for in its
    place (a ``None`` option would make every setsockopt after it fail)."""
    monkeypatch.delattr(socket, "TCP_USER_TIMEOUT")
    monkeypatch.delattr(socket, "TCP_KEEPCNT")
    tcp = socket.IPPROTO_TCP
    assert TcpKeepalive(idle=5, interval=2, count=4, user_timeout=3).socket_options() == [
        (socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1),
        (tcp, socket.TCP_KEEPIDLE, 5),
        (tcp, socket.TCP_KEEPINTVL, 2),
    ]


@pytest.mark.parametrize(
    "con",
    [SimpleNamespace(), SimpleNamespace(_transport=None), connection(None)],
    ids=["no transport attribute", "transport None", "transport without a socket"],
)
def test_a_connection_without_a_socket_is_left_alone(con: Any) -> None:
    assert apply(con, TcpKeepalive(), "p") is False


def test_a_unix_socket_is_left_alone() -> None:
    left, right = socket.socketpair(socket.AF_UNIX)
    with left, right:
        assert apply(connection(left), TcpKeepalive(), "p") is False


@linux_only
@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_INET6])
def test_a_tcp_socket_gets_every_option(family: int, caplog: pytest.LogCaptureFixture) -> None:
    if family == socket.AF_INET6 and not socket.has_ipv6:
        pytest.skip("no IPv6")
    with socket.socket(family, socket.SOCK_STREAM) as sock, caplog.at_level(logging.WARNING, logger="safepool"):
        assert apply(connection(sock), TcpKeepalive(idle=7, interval=3, count=5, user_timeout=2.5), "p") is True
        tcp = socket.IPPROTO_TCP
        assert (
            sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
            sock.getsockopt(tcp, socket.TCP_KEEPIDLE),
            sock.getsockopt(tcp, socket.TCP_KEEPINTVL),
            sock.getsockopt(tcp, socket.TCP_KEEPCNT),
            sock.getsockopt(tcp, socket.TCP_USER_TIMEOUT),
        ) == (1, 7, 3, 5, 2500)
    assert keepalive_records(caplog) == []


@linux_only
def test_options_refused_are_named_and_the_first_error_is_shown(caplog: pytest.LogCaptureFixture) -> None:
    """Two options refused: the log names both as tcp(7) does, shows the
    first one's error, and the connection keeps the rest (SO_KEEPALIVE on)."""
    tcp = socket.IPPROTO_TCP
    refuse = {
        (tcp, socket.TCP_KEEPIDLE): OSError(92, "first refusal"),
        (tcp, socket.TCP_USER_TIMEOUT): OSError(95, "second refusal"),
    }
    with Refusing(refuse) as sock, caplog.at_level(logging.WARNING, logger="safepool"):
        assert apply(connection(sock), TcpKeepalive(idle=7, interval=3, count=5, user_timeout=2), "named") is True
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
        assert (sock.getsockopt(tcp, socket.TCP_KEEPINTVL), sock.getsockopt(tcp, socket.TCP_KEEPCNT)) == (3, 5)
    [record] = keepalive_records(caplog)
    assert record.levelno == logging.WARNING
    assert record.pool == "named"  # type: ignore[attr-defined]
    assert record.getMessage() == (
        "pool 'named': could not set TCP keepalive option TCP_KEEPIDLE, TCP_USER_TIMEOUT on a connection"
        " ([Errno 92] first refusal); the other keepalive options are set"
    )


@linux_only
@pytest.mark.parametrize("also_refused", [False, True], ids=["alone", "with the others"])
def test_so_keepalive_refused_means_the_connection_is_used_without(
    also_refused: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """SO_KEEPALIVE itself refused: False, and the log says the connection
    is used without keepalive (the other options do nothing without it)."""
    tcp = socket.IPPROTO_TCP
    refuse = {(socket.SOL_SOCKET, socket.SO_KEEPALIVE): OSError(95, "no keepalive here")}
    if also_refused:
        refuse[tcp, socket.TCP_KEEPCNT] = OSError(92, "nor this")
    with Refusing(refuse) as sock, caplog.at_level(logging.WARNING, logger="safepool"):
        assert apply(connection(sock), TcpKeepalive(), "off") is False
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 0
    [record] = keepalive_records(caplog)
    names = "SO_KEEPALIVE, TCP_KEEPCNT" if also_refused else "SO_KEEPALIVE"
    assert record.getMessage() == (
        f"pool 'off': could not set TCP keepalive option {names} on a connection"
        " ([Errno 95] no keepalive here); it is used without"
    )
