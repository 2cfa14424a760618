"""How a failed connect is classified for its backoff (safepool._internals.refusal):
nothing answering (nothing listening, or no answer within the connect
timeout), a refusal the server sends, or anything else."""

from __future__ import annotations

import asyncpg
import pytest

from safepool._internals import refusal
from safepool._state import BROKEN, NOT_REFUSED, REFUSED, UNREACHABLE


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
    ],
    ids=repr,
)
def test_connect_failures_are_told_apart_for_their_backoff(error: BaseException, kind: int) -> None:
    assert refusal(error) == kind
