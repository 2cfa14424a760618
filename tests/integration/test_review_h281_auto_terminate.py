"""Review h281: ``terminate()`` of a lease in ``reset_mode="auto"``.

The base proxy's ``terminate()`` (safepool/proxy.py, ``PoolConnectionProxy.
terminate``) first notes whether a statement is in flight
(``Holder.note_abort``): the pool then sends the backend a cancel request
only if one was (an idle backend reads the end of its socket and exits).
``WatchingProxy`` ("rollback") inherits it. ``AutoResetProxy`` did not: its
``_install_forwarders`` (safepool/_autoreset.py) skips only the names in
``AutoResetProxy.__dict__``, not those the base proxy defines itself, so
``terminate`` is replaced by a plain marking forwarder. With no reading the
close falls back to "it was leased: send a cancel request"
(``Runner`` at safepool/_runner.py, ``lost_while_leased``), so an idle lease
terminated in auto mode costs a cancel request (one more connection to the
server, or to PgBouncer per request: docs/pgbouncer.md) that full and
rollback modes do not send. Fixed: every proxy class keeps the base
proxy's own methods (``proxy.OWN_METHODS``).
"""

from __future__ import annotations

import asyncio
import contextlib

import pytest

import safepool
from safepool._autoreset import AutoResetProxy
from safepool.proxy import PoolConnectionProxy
from tests._util import hook_cancel_requests

pytest.importorskip("pglast", reason="pip install -e '.[test]' installs the auto extra")

def test_auto_proxy_keeps_the_base_proxys_terminate() -> None:
    # Held for "full" (the base proxy) and "rollback" (WatchingProxy inherits it).
    assert AutoResetProxy.terminate is PoolConnectionProxy.terminate or (
        AutoResetProxy.terminate.__code__ is PoolConnectionProxy.terminate.__code__
    )


@pytest.mark.asyncio
@pytest.mark.parametrize("mode", ["full", "rollback", "auto"])
async def test_terminate_of_an_idle_lease_sends_no_cancel_request(
    pg_dsn: str, app_name: str, monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    sent: list[int] = []

    async def counted(pid: int) -> None:
        sent.append(pid)

    hook_cancel_requests(monkeypatch, counted)
    pool = await safepool.create_pool(
        pg_dsn, min_size=0, max_size=1, reset_mode=mode, server_settings={"application_name": app_name}
    )
    try:
        con = await pool.acquire()
        await con.execute("SELECT 1")
        con.terminate()
        with contextlib.suppress(Exception):
            await pool.release(con)
        async with asyncio.timeout(5):
            async with pool.acquire() as again:
                assert await again.fetchval("SELECT 1") == 1
        # (A cancel request would have been sent before the place freed:
        # with max_size=1 the acquire above waited for it.)
        assert sent == []
    finally:
        await asyncio.wait_for(pool.close(), 10)
