"""The pool's cancel request over TLS (``_internals.send_cancel_request``):
PostgreSQL ends it with an orderly close, so one request counts as
delivered, on both loops (a request whose connection ended any other way is
sent again: tests/io/test_cancel_request.py). Also asyncpg's own SSL pool
test, on both pools, and an RST under a TLS lease.

The embedded server is built without SSL: these tests run a Debian
PostgreSQL (``/usr/lib/postgresql/<version>/bin``) with a throwaway
self-signed certificate, and skip, with the reason, where there is none or
no ``openssl``."""

from __future__ import annotations

import asyncio
import glob
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest

from safepool import _internals
from tests._util import until_in_pg_sleep

from ._pg import Cluster

pytestmark = [pytest.mark.asyncio, pytest.mark.realtime]


def _debian_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"))
    return Path(found[-1]).parent if found else None


@pytest.fixture(scope="module")
def tls_cluster() -> Iterator[Cluster]:
    bindir = _debian_bin()
    if bindir is None or shutil.which("openssl") is None:
        pytest.skip("needs a Debian PostgreSQL built with SSL (/usr/lib/postgresql/*/bin) and openssl")
    cluster = Cluster()
    cluster.bin = bindir
    try:
        cluster.init()
        key, cert = cluster.data / "server.key", cluster.data / "server.crt"
        subprocess.run(
            ["openssl", "req", "-new", "-x509", "-days", "2", "-nodes", "-subj", "/CN=localhost",
             "-keyout", str(key), "-out", str(cert)],
            check=True, capture_output=True, timeout=60,
        )
        if cluster.user is not None:
            shutil.chown(key, cluster.user)
            shutil.chown(cert, cluster.user)
        os.chmod(key, 0o600)
        with (cluster.data / "postgresql.conf").open("a") as conf:
            conf.write("ssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n")
        (cluster.data / "pg_hba.conf").write_text("hostssl all postgres 127.0.0.1/32 trust\n")
        cluster.start()
        yield cluster
    finally:
        cluster.cleanup()


@pytest.mark.parametrize("sslmode", ["prefer", "require"])
async def test_a_cancel_request_over_tls_is_closed_in_order_and_cancels(tls_cluster: Cluster, sslmode: str) -> None:
    con = await asyncpg.connect(f"{tls_cluster.admin_dsn}?sslmode={sslmode}")
    try:
        assert con._protocol.is_ssl
        statement = asyncio.ensure_future(con.execute("SELECT pg_sleep(30)"))
        await until_in_pg_sleep(f"{tls_cluster.admin_dsn}?sslmode=require", con.get_server_pid(), timeout=10)
        key = _internals.cancel_key(con)
        assert key is not None
        ended = await _internals.send_cancel_request(con, key)
        assert ended is None, f"the server's close of a TLS cancel request was not an orderly one: {ended!r}"
        with pytest.raises(asyncpg.QueryCanceledError):
            await asyncio.wait_for(statement, 10)
    finally:
        await con.close()


@pytest.mark.parametrize("flavour", ["asyncpg", "safepool"])
async def test_pool_over_tls_recovers_from_cancelled_statements(tls_cluster: Cluster, flavour: str) -> None:
    """asyncpg's own ``_test_pool`` of its SSL tests (tests/test_connect.py,
    which needs a cluster asyncpg manages itself), on both pools: 100 tasks
    on ``max_size=10`` over TLS, each lease's statement cut short by its
    ``timeout=`` (asyncpg's cancel request over TLS), the connection then
    serving the next statement."""
    import safepool

    factory = asyncpg.create_pool if flavour == "asyncpg" else safepool.create_pool
    pool = await factory(f"{tls_cluster.admin_dsn}?sslmode=require", min_size=5, max_size=10)

    async def worker(n: int) -> tuple[bool, int, int]:
        async with pool.acquire() as con:
            first = await con.fetchval("SELECT $1::int", n)
            with pytest.raises(TimeoutError):
                await con.execute("SELECT pg_sleep(5)", timeout=0.2)
            return con._protocol.is_ssl, first, await con.fetchval("SELECT $1::int + 1", n)

    try:
        results = await asyncio.wait_for(asyncio.gather(*(worker(n) for n in range(100))), 60)
        assert results == [(True, n, n + 1) for n in range(100)]
        assert pool.get_size() <= 10
    finally:
        await asyncio.wait_for(pool.close(), 10)


async def test_reset_under_a_tls_lease_cancels_its_backend_with_one_request(
    tls_cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An RST under a lease whose backend runs a statement, over TLS: the
    pool's cancel request (one: the server closes it in order) ends the
    statement before the slot's replacement is leased."""
    import safepool
    from tests._util import hook_cancel_requests

    from ._pg import count_backends
    from ._proxy import FaultProxy

    requests: list[int] = []

    async def sent(pid: int) -> None:
        requests.append(pid)

    hook_cancel_requests(monkeypatch, sent)
    admin = await asyncpg.connect(f"{tls_cluster.admin_dsn}?sslmode=require")
    try:
        async with FaultProxy(tls_cluster.port) as proxy:
            dsn = f"postgresql://postgres@127.0.0.1:{proxy.port}/postgres?sslmode=require"
            pool = await safepool.create_pool(
                dsn, min_size=0, max_size=1, server_settings={"application_name": "tls-lease"}
            )
            try:
                con = await pool.acquire()
                pid = con.get_server_pid()
                statement = asyncio.ensure_future(con.execute("SELECT pg_sleep(30)"))
                await until_in_pg_sleep(f"{tls_cluster.admin_dsn}?sslmode=require", pid, timeout=10)
                assert proxy.reset_all() == 1
                with pytest.raises((asyncpg.ConnectionDoesNotExistError, ConnectionError)):
                    await statement
                await pool.release(con)
                async with asyncio.timeout(10), pool.acquire() as replacement:
                    assert await replacement.fetchval("SELECT 1") == 1
                    async with asyncio.timeout(2):  # (the signalled backend's own exit)
                        while await admin.fetchval(
                            "SELECT state = 'active' FROM pg_stat_activity WHERE pid = $1", pid
                        ):
                            await asyncio.sleep(0.005)
                    assert await count_backends(admin, "tls-lease") <= 1
                assert requests == [pid]
            finally:
                await asyncio.wait_for(pool.close(), 10)
    finally:
        await admin.close()
