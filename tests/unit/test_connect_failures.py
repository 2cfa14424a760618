"""How a failed connect is classified for its backoff (safepool._internals.refusal):
nothing answering (nothing listening, no route to the host, or no answer
within the connect timeout), a refusal the server sends, a connect broken
before the server answered (or a name that did not resolve), or anything
else. The instances are those asyncpg 0.32 raised for real failures (on
Python 3.11; the message of each as asyncpg or asyncio formats it)."""

from __future__ import annotations

import asyncio
import socket
import ssl
import struct
from typing import Any

import asyncpg
import pytest

from safepool._internals import program_error, refusal
from safepool._state import BROKEN, NOT_REFUSED, REFUSED, UNREACHABLE, UNRESOLVED


@pytest.mark.parametrize(
    ("error", "kind"),
    [
        (ConnectionRefusedError(111, "refused"), UNREACHABLE),  # TCP: nothing listens on the port
        (FileNotFoundError(2, "no socket"), UNREACHABLE),  # Unix socket: the server removed it
        (asyncpg.CannotConnectNowError("the database system is starting up"), REFUSED),
        (asyncpg.TooManyConnectionsError("sorry, too many clients already"), REFUSED),
        (TimeoutError(), UNREACHABLE),  # no answer within timeout=: a black hole
        (OSError(110, "Connection timed out"), UNREACHABLE),  # the kernel's TCP connect timeout (a TimeoutError)
        (ConnectionResetError(104, "reset"), BROKEN),  # a proxy's RST, or a black hole healing
        (ConnectionAbortedError(103, "aborted"), BROKEN),
        (BrokenPipeError(32, "broken pipe"), BROKEN),
        (asyncpg.ConnectionDoesNotExistError("connection was closed in the middle of operation"), BROKEN),
        (asyncpg.InvalidPasswordError("password authentication failed"), NOT_REFUSED),
        # Nothing answered: the host is down (no ARP reply after 3 s on its
        # subnet), or no route to it (a router's ICMP, or none at all).
        (OSError(113, "Connect call failed ('192.0.2.77', 5432)"), UNREACHABLE),
        (OSError(113, "Connect call failed ('2001:db8::1', 5432, 0, 0)"), UNREACHABLE),
        (OSError(101, "Network is unreachable"), UNREACHABLE),
        (OSError(112, "Host is down"), UNREACHABLE),
        # A name with two addresses (localhost: ::1 and 127.0.0.1), both
        # refused: asyncio raises a plain OSError without errno.
        (
            OSError(
                "Multiple exceptions: [Errno 111] Connect call failed ('::1', 5432, 0, 0), "
                "[Errno 111] Connect call failed ('127.0.0.1', 5432)"
            ),
            UNREACHABLE,
        ),
        # ... or one address unusable here (no IPv6), the other refused.
        (
            OSError(
                "Multiple exceptions: [Errno 99] Cannot assign requested address, "
                "[Errno 111] Connect call failed ('127.0.0.1', 5432)"
            ),
            UNREACHABLE,
        ),
        (OSError("Multiple exceptions: [Errno 99] Cannot assign requested address, [Errno 13] Permission denied"), NOT_REFUSED),
        (OSError(99, "Cannot assign requested address"), NOT_REFUSED),  # this host's own configuration
        # The name did not resolve (a stopped container's name, a typo):
        # quick retries would load the resolver, not the server.
        (socket.gaierror(-2, "Name or service not known"), UNRESOLVED),
        (socket.gaierror(-3, "Temporary failure in name resolution"), UNRESOLVED),
        # The server going down while it started the connection's backend.
        (asyncpg.CannotConnectNowError("the database system is shutting down"), REFUSED),
        (asyncpg.CannotConnectNowError("the database system is in recovery mode"), REFUSED),
        (asyncpg.AdminShutdownError("terminating connection due to administrator command"), REFUSED),
        (asyncpg.CrashShutdownError("terminating connection because of crash of another server process"), REFUSED),
        # 53300 in its four messages: out of slots, for all or for this role.
        (asyncpg.TooManyConnectionsError("remaining connection slots are reserved for roles with the SUPERUSER attribute"), REFUSED),
        (asyncpg.TooManyConnectionsError('too many connections for role "limited"'), REFUSED),
        (asyncpg.TooManyConnectionsError('too many connections for database "limdb"'), REFUSED),
        # The server closed mid-start-up (fast or immediate shutdown), or
        # during the SSL request: broken before it answered.
        (ConnectionError("unexpected connection_lost() call"), BROKEN),
        (ConnectionResetError(104, "Connect call failed ('127.0.0.1', 5432)"), BROKEN),
        # Something answered the SSL request with neither S nor N (not a
        # PostgreSQL server: an HTTP port), N with ssl="require", or an error
        # (a server that could not fork): it will answer the same again.
        (ConnectionError('PostgreSQL server at "127.0.0.1:5432" rejected SSL upgrade'), NOT_REFUSED),
        (
            ConnectionError(
                'PostgreSQL server at "127.0.0.1:5432": server sent an error response during SSL exchange; '
                "check the server logs for details"
            ),
            NOT_REFUSED,
        ),
        (ssl.SSLCertVerificationError(1, "certificate verify failed"), NOT_REFUSED),
        # The server answered: a configuration error a retry will not mend.
        (asyncpg.InvalidPasswordError('password authentication failed for user "app"'), NOT_REFUSED),
        (asyncpg.InvalidCatalogNameError('database "nosuchdb" does not exist'), NOT_REFUSED),
        (asyncpg.InvalidAuthorizationSpecificationError('role "nologin" is not permitted to log in'), NOT_REFUSED),
        (
            asyncpg.InvalidAuthorizationSpecificationError(
                'pg_hba.conf rejects connection for host "127.0.0.1", user "rejected", database "rejected", no encryption'
            ),
            NOT_REFUSED,
        ),
        (asyncpg.ObjectNotInPrerequisiteStateError('database "closeddb" is not currently accepting connections'), NOT_REFUSED),
        (asyncpg.ProtocolViolationError("invalid startup packet layout"), NOT_REFUSED),
    ],
    ids=repr,
)
def test_connect_failures_are_told_apart_for_their_backoff(error: BaseException, kind: int) -> None:
    assert refusal(error) == kind


def _fatal(code: bytes, message: bytes) -> bytes:
    body = b"SFATAL\0VFATAL\0C" + code + b"\0M" + message + b"\0\0"
    return b"E" + struct.pack("!i", len(body) + 4) + body


async def _serve(handler: Any) -> tuple[asyncio.Server, int]:
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def _reset(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.transport.abort()  # a proxy resetting every connect


async def _http(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.read(8)  # the SSL request, answered by something else than PostgreSQL
    writer.write(b"HTTP/1.1 400 Bad Request\r\n\r\n")
    await writer.drain()
    writer.close()


async def _admin_shutdown(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.read(1000)  # the startup message; the backend is told to end as it starts
    writer.write(_fatal(b"57P01", b"terminating connection due to administrator command"))
    await writer.drain()
    writer.close()


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("handler", "ssl_mode", "error_type", "kind"),
    [
        (_reset, "prefer", ConnectionResetError, BROKEN),
        (_http, "prefer", ConnectionError, NOT_REFUSED),
        (_admin_shutdown, False, asyncpg.AdminShutdownError, REFUSED),
    ],
    ids=["reset", "not-postgresql", "admin-shutdown"],
)
async def test_what_asyncpg_raises_is_told_apart(handler: Any, ssl_mode: Any, error_type: type, kind: int) -> None:
    """The table's instances, as asyncpg raises them from a loopback server."""
    server, port = await _serve(handler)
    try:
        with pytest.raises(BaseException) as caught:
            await asyncpg.connect(host="127.0.0.1", port=port, user="u", ssl=ssl_mode, timeout=5)
    finally:
        server.close()
    assert type(caught.value) is error_type, repr(caught.value)
    assert refusal(caught.value) == kind, repr(caught.value)


@pytest.mark.asyncio
async def test_a_name_whose_every_address_refuses_is_unreachable(
    monkeypatch: pytest.MonkeyPatch, loop_name: str
) -> None:
    """``localhost`` as resolved where /etc/hosts lists ::1 and 127.0.0.1,
    on a port nothing listens on: asyncio's "Multiple exceptions" OSError."""
    if loop_name == "uvloop":
        pytest.skip("asyncio's case: uvloop resolves a host name in C, not through loop.getaddrinfo, and raises "
                    "the first address's ConnectionRefusedError (refused, as one address refusing is)")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # (bound, not listening: refused)
        loop = asyncio.get_running_loop()

        async def both(host: Any, port: Any, **kwargs: Any) -> Any:
            return [
                (socket.AF_INET6, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", ("::1", port, 0, 0)),
                (socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", ("127.0.0.1", port)),
            ]

        monkeypatch.setattr(loop, "getaddrinfo", both)
        with pytest.raises(OSError) as caught:
            await asyncpg.connect(host="localhost", port=port, user="u", timeout=5)
    assert type(caught.value) is OSError and caught.value.errno is None, repr(caught.value)
    assert str(caught.value).startswith("Multiple exceptions: "), repr(caught.value)
    assert refusal(caught.value) == UNREACHABLE


@pytest.mark.parametrize(
    ("error", "programs"),
    [
        (TypeError("connect() got an unexpected keyword argument 'command_timout'"), True),
        (ValueError("invalid sslmode"), True),
        (asyncpg.ClientConfigurationError("invalid DSN"), True),  # (an InterfaceError and a ValueError)
        (AttributeError("'NoneType' object has no attribute 'host'"), True),
        (ConnectionRefusedError(111, "refused"), False),
        (TimeoutError(), False),
        (socket.gaierror(-2, "Name or service not known"), False),
        (ssl.SSLError(1, "certificate verify failed"), False),  # (an OSError)
        (asyncpg.InvalidPasswordError("password authentication failed"), False),
        (asyncpg.CannotConnectNowError("the database system is starting up"), False),
        (asyncpg.ConnectionDoesNotExistError("connection was closed in the middle of operation"), False),
        (RuntimeError("anything else"), False),
    ],
)
def test_a_connect_error_of_the_programs_own_is_told_from_the_servers(error: BaseException, programs: bool) -> None:
    """What the circuit breaker does not count (``_internals.program_error``):
    a mistake of the program's says nothing of the server."""
    assert program_error(error) is programs


@pytest.mark.parametrize(
    ("message", "kind"),
    [
        # PgBouncer's refusals that end by themselves (review h273)
        ("no more connections allowed (max_client_conn)", REFUSED),
        ("client connections exceeded (max_db_client_connections)", REFUSED),
        ("client connections exceeded (max_user_client_connections)", REFUSED),
        ('database "postgres" is disabled', REFUSED),
        ("query_wait_timeout", REFUSED),
        ("server login has been failing, try again later (server_login_retry)", REFUSED),
        ("pgbouncer cannot connect to server", REFUSED),
        ("client_login_timeout (server down)", REFUSED),
        # Its lasting ones, and a protocol violation of the server's own
        ('no such database: "orders"', NOT_REFUSED),
        ('no such user: "app"', NOT_REFUSED),
        ("unsupported startup parameter: extra_float_digits", NOT_REFUSED),
        ('database "x" is disabled for good, says a proxy that is not PgBouncer', NOT_REFUSED),
        ("invalid frontend message type 0", NOT_REFUSED),
    ],
)
def test_pgbouncers_passing_refusals_are_retried_soon(message: str, kind: int) -> None:
    assert refusal(asyncpg.ProtocolViolationError(message)) == kind
    assert refusal(asyncpg.PostgresError(message)) == NOT_REFUSED  # (only its 08P01)
