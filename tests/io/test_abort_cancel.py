"""A leased connection aborted while its statement runs (the user's
``terminate()`` through the proxy): the pool sends its backend a cancel
request and counts the slot until the request was delivered, for
``_workers.cancel_timeout`` at most (helper-148). On the fake server, with
the cancel request replaced by a future the test resolves (or never does)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio
from asyncpg import exceptions as _pg_exceptions

from safepool import _internals, _workers
from tests._util import until

from .rig import Rig, make_rig, spin

# The fake rig tells the pool of the abort as asyncpg 0.32 does (the
# protocol's _connection_ended(), after terminate()); asyncpg 0.29-0.31 tell
# it from terminate()'s own cleanup, which the fake does not drive. The same
# behaviour on a real server, on every asyncpg the matrix runs:
# tests/faults/test_abort_mid_statement.py.
pytestmark = [
    pytest.mark.asyncio,
    pytest.mark.skipif(not _internals.HAS_POOL_HOLDER, reason="asyncpg 0.32+: the fake drives 0.32's abort path"),
]


class CancelRequests:
    """Stands in for ``_internals.cancel_running_query``: each request waits
    for ``delivered`` (never set: a server that never answers)."""

    def __init__(self) -> None:
        self.keys: list[Any] = []
        self.delivered = asyncio.Event()

    async def __call__(self, con: Any, key: Any = None) -> None:
        self.keys.append(key)
        await self.delivered.wait()


@pytest_asyncio.fixture
async def requests(monkeypatch: pytest.MonkeyPatch) -> CancelRequests:
    fake = CancelRequests()
    monkeypatch.setattr(_internals, "cancel_running_query", fake)
    return fake


@pytest_asyncio.fixture
async def rig() -> AsyncIterator[Rig]:
    made = await make_rig(max_size=1)
    yield made
    made.pool.terminate()
    await spin()
    made.pool._state.check_invariants()
    assert not made.server.open()


async def _terminate_mid_statement(rig: Rig) -> tuple[Any, asyncio.Task[Any]]:
    """A lease whose statement is in flight, terminated through its proxy
    (as asyncpg's terminate(): the abort fails the statement and tells the
    holder); returns the aborted connection and the acquire now waiting."""
    proxy = await rig.lease()
    raw = proxy._raw
    statement = asyncio.ensure_future(proxy.execute("SELECT pg_sleep(60)"))
    await spin()
    # The fake's protocol exposes its waiter: in flight, as asyncpg's is.
    raw._protocol.waiter = rig.server.statements[-1][2]
    proxy.terminate()
    raw._connection_ended()
    await spin()
    with pytest.raises(_pg_exceptions.ConnectionDoesNotExistError):
        await statement
    second = asyncio.ensure_future(rig.pool.acquire(timeout=60))
    await spin()
    return raw, second


async def test_the_slot_counts_until_the_cancel_request_was_delivered(rig: Rig, requests: CancelRequests) -> None:
    raw, second = await _terminate_mid_statement(rig)
    assert requests.keys == [(raw._protocol.backend_pid, raw._protocol.backend_secret)]
    assert rig.pool._state.size == 1 and not rig.server.connects  # no replacement yet
    requests.delivered.set()
    await spin()
    assert len(rig.server.connects) == 1  # the replacement, once delivered
    rig.server.finish_connect()
    await rig.pool.release(await second)
    rig.books(size=1, idle=1)


async def test_an_undelivered_cancel_request_frees_the_slot_after_its_timeout(
    rig: Rig, requests: CancelRequests, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_workers, "LOST_BACKEND_CANCEL_TIMEOUT", 0.05)
    assert _workers.cancel_timeout(None) == 0.05  # (no reset_timeout: the default bound)
    _raw, second = await _terminate_mid_statement(rig)
    assert len(requests.keys) == 1 and not rig.server.connects
    # (never delivered: the server unreachable; the request's bound is loop
    # time, asyncio.timeout, not the pool's clock: polled, with a timeout)
    await until(lambda: len(rig.server.connects) >= 1)
    assert len(rig.server.connects) == 1  # the slot was freed: the replacement connects
    rig.server.finish_connect()
    await rig.pool.release(await second)
    rig.books(size=1, idle=1)


async def test_terminate_with_no_statement_in_flight_sends_no_cancel_request(
    rig: Rig, requests: CancelRequests
) -> None:
    proxy = await rig.lease()
    raw = proxy._raw
    proxy.terminate()
    raw._connection_ended()
    await spin()
    second = asyncio.ensure_future(rig.pool.acquire(timeout=60))
    await spin()
    assert requests.keys == []
    assert len(rig.server.connects) == 1  # the slot was freed at once
    rig.server.finish_connect()
    await rig.pool.release(await second)
    rig.books(size=1, idle=1)


async def test_close_waits_for_the_cancel_request(rig: Rig, requests: CancelRequests) -> None:
    _raw, second = await _terminate_mid_statement(rig)
    second.cancel()
    await spin()
    closing = asyncio.ensure_future(rig.pool.close())
    await asyncio.sleep(0.05)
    assert not closing.done() and rig.pool._state.size == 1
    requests.delivered.set()
    await asyncio.wait_for(closing, 5)
    assert rig.pool._state.size == 0
