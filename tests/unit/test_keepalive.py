"""``TcpKeepalive``'s checks and the socket options it asks for (no
database: tests/faults/test_keepalive.py reads them back from the kernel)."""

from __future__ import annotations

import math
import socket
from typing import Any

import pytest

import safepool
from safepool import TcpKeepalive
from safepool._keepalive import check


@pytest.mark.parametrize(
    ("kwargs", "error", "text"),
    [
        ({"idle": 0}, ValueError, "TcpKeepalive.idle must be > 0 and <= 32767 seconds, got 0"),
        ({"idle": -1.0}, ValueError, "TcpKeepalive.idle"),
        ({"idle": math.nan}, ValueError, "TcpKeepalive.idle"),
        ({"idle": 32768}, ValueError, "TcpKeepalive.idle"),
        ({"idle": True}, TypeError, "TcpKeepalive.idle must be a number of seconds, got bool"),
        ({"idle": "30"}, TypeError, "TcpKeepalive.idle must be a number of seconds, got str"),
        ({"interval": 0.0}, ValueError, "TcpKeepalive.interval"),
        ({"interval": math.inf}, ValueError, "TcpKeepalive.interval"),
        ({"count": 0}, ValueError, "TcpKeepalive.count must be between 1 and 127, got 0"),
        ({"count": 128}, ValueError, "TcpKeepalive.count"),
        ({"count": 1.5}, TypeError, "TcpKeepalive.count must be an int, got float"),
        ({"count": True}, TypeError, "TcpKeepalive.count"),
        ({"user_timeout": 0}, ValueError, "TcpKeepalive.user_timeout"),
        ({"user_timeout": 3e6}, ValueError, "TcpKeepalive.user_timeout"),
        # The bound as it is: "<= 2.14748e+06" (%g) read as below values it takes.
        (
            {"user_timeout": 2147483.7},
            ValueError,
            "TcpKeepalive.user_timeout must be > 0 and <= 2147483.647 seconds, got 2147483.7",
        ),
        ({"user_timeout": "5"}, TypeError, "TcpKeepalive.user_timeout"),
    ],
)
def test_bad_settings_are_refused_with_the_field_named(kwargs: dict[str, Any], error: type, text: str) -> None:
    with pytest.raises(error) as raised:
        TcpKeepalive(**kwargs)
    assert str(raised.value).startswith(text)


@pytest.mark.asyncio
@pytest.mark.parametrize("value", ["yes", 1, 30.0, {"idle": 30}, (60, 10, 3)])
async def test_create_pool_refuses_anything_but_a_tcp_keepalive_or_a_bool(value: Any) -> None:
    with pytest.raises(TypeError, match="tcp_keepalive must be a safepool.TcpKeepalive, True, False or None"):
        safepool.create_pool("postgresql://app:s3cret@localhost/db", tcp_keepalive=value)


def test_true_means_the_defaults_and_false_none() -> None:
    assert check(True) == TcpKeepalive(idle=60.0, interval=10.0, count=3, user_timeout=None)
    assert check(False) is None and check(None) is None
    mine = TcpKeepalive(idle=5)
    assert check(mine) is mine


@pytest.mark.skipif(not hasattr(socket, "TCP_USER_TIMEOUT"), reason="Linux's TCP options")
def test_the_socket_options_in_the_kernels_units() -> None:
    """Whole seconds rounded up (the kernel takes no less than 1), the user
    timeout in milliseconds; no TCP_USER_TIMEOUT when it is None."""
    tcp = socket.IPPROTO_TCP
    assert TcpKeepalive(idle=0.2, interval=9.01, count=5, user_timeout=0.0005).socket_options() == [
        (socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1),
        (tcp, socket.TCP_KEEPIDLE, 1),
        (tcp, socket.TCP_KEEPINTVL, 10),
        (tcp, socket.TCP_KEEPCNT, 5),
        (tcp, socket.TCP_USER_TIMEOUT, 1),
    ]
    assert (tcp, socket.TCP_USER_TIMEOUT, 0) not in TcpKeepalive().socket_options()
    assert len(TcpKeepalive().socket_options()) == 4


def test_the_settings_repr_shows_them() -> None:
    assert repr(TcpKeepalive(idle=30)) == "TcpKeepalive(idle=30, interval=10.0, count=3, user_timeout=None)"


def test_the_number_types_the_pools_other_settings_take() -> None:
    """numpy's scalars and a Fraction, as create_pool() takes them for its
    sizes and durations (one settings table, read with numpy or pandas,
    feeds them all): TcpKeepalive refused them ("must be an int, got
    int64"). Kept as plain ints and floats."""
    from fractions import Fraction

    numpy = pytest.importorskip("numpy")
    settings = TcpKeepalive(
        idle=numpy.float32(30.0), interval=Fraction(5, 2), count=numpy.int64(4), user_timeout=numpy.int32(20)
    )
    assert settings == TcpKeepalive(idle=30.0, interval=2.5, count=4, user_timeout=20)
    assert [type(getattr(settings, name)) for name in ("idle", "interval", "count", "user_timeout")] == [
        float, float, int, int,
    ]
    assert [value for _, _, value in settings.socket_options()][1:4] == [30, 3, 4]
    with pytest.raises(TypeError, match="TcpKeepalive.count must be an int, got float64"):
        TcpKeepalive(count=numpy.float64(3.0))
    with pytest.raises(TypeError, match="TcpKeepalive.idle must be a number of seconds, got bool"):
        TcpKeepalive(idle=numpy.bool_(True))
    with pytest.raises(ValueError, match="TcpKeepalive.count must be between 1 and 127, got 0"):
        TcpKeepalive(count=numpy.int64(0))
