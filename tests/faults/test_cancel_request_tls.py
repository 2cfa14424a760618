"""The pool's cancel request over TLS (``_internals.send_cancel_request``):
PostgreSQL ends it with an orderly close, so one request counts as
delivered, on both loops (a request whose connection ended any other way is
sent again: tests/io/test_cancel_request.py).

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
        admin = await asyncpg.connect(f"{tls_cluster.admin_dsn}?sslmode=require")
        try:
            async with asyncio.timeout(10):
                while await admin.fetchval(
                    "SELECT wait_event FROM pg_stat_activity WHERE pid = $1", con.get_server_pid()
                ) != "PgSleep":
                    await asyncio.sleep(0.005)
        finally:
            await admin.close()
        key = _internals.cancel_key(con)
        assert key is not None
        ended = await _internals.send_cancel_request(con, key)
        assert ended is None, f"the server's close of a TLS cancel request was not an orderly one: {ended!r}"
        with pytest.raises(asyncpg.QueryCanceledError):
            await asyncio.wait_for(statement, 10)
    finally:
        await con.close()
