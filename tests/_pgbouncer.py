"""A real PgBouncer for the tests: one process per test, on a free loopback
port, in front of a PostgreSQL server (tests/integration/test_pgbouncer.py,
tests/faults/test_pgbouncer_outage.py). Tests that need it carry
``requires_pgbouncer``: skipped, with the reason, when the binary is absent
(``apt-get install pgbouncer``; .ci/run installs it)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tests.faults._pg import free_port

requires_pgbouncer = pytest.mark.skipif(
    shutil.which("pgbouncer") is None,
    reason="pgbouncer is not installed (apt-get install pgbouncer; .ci/run installs it)",
)


class Bouncer:
    def __init__(self, upstream: dict[str, Any], root: Path, **settings: Any) -> None:
        self.port = free_port()
        self.root = root
        self.user = upstream["user"]
        server = f"host={upstream['host']} port={upstream['port']} dbname={upstream['database']}"
        server += f" user={upstream['server_user']}"
        if upstream.get("password"):
            server += f" password={upstream['password']}"
        options = {
            "listen_addr": "127.0.0.1",
            "listen_port": self.port,
            "unix_socket_dir": "",
            "auth_type": "trust",
            "auth_file": str(root / "users.txt"),
            "pool_mode": "transaction",
            "default_pool_size": 4,
            "max_client_conn": 100,
            "query_wait_timeout": 10,
            "logfile": str(root / "pgbouncer.log"),
            "pidfile": "",
            "ignore_startup_parameters": "extra_float_digits",
            **settings,
        }
        lines = ["[databases]", f"{upstream['database']} = {server}", "", "[pgbouncer]"]
        lines += [f"{key} = {value}" for key, value in options.items()]
        (root / "pgbouncer.ini").write_text("\n".join(lines) + "\n")
        (root / "users.txt").write_text(f'"{self.user}" ""\n')
        self.database = upstream["database"]
        # The server behind it, for a test's own look at its backends.
        self.server_dsn = (
            f"postgresql://{upstream['server_user']}@{upstream['host']}:{upstream['port']}/{upstream['database']}"
        )
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        run_as = None
        if os.geteuid() == 0:  # pgbouncer refuses to run as root
            run_as = "embedded_postgres" if _user_exists("embedded_postgres") else "nobody"
            for path in self.root.iterdir():
                shutil.chown(path, run_as)
            shutil.chown(self.root, run_as)
        self.proc = subprocess.Popen(
            ["pgbouncer", str(self.root / "pgbouncer.ini")],
            user=run_as, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    log = (self.root / "pgbouncer.log").read_text() if (self.root / "pgbouncer.log").exists() else ""
                    raise RuntimeError(f"pgbouncer did not start: {log[-2000:]}") from None
                time.sleep(0.02)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def dsn(self) -> str:
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{self.database}"


def _user_exists(name: str) -> bool:
    import pwd

    try:
        pwd.getpwnam(name)
        return True
    except KeyError:
        return False
