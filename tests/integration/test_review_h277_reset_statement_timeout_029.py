"""Review h277: on asyncpg 0.29, a release's reset that safepool runs in a
pool task is not asyncpg 0.29's ``Connection.reset()``.

asyncpg 0.29's release calls ``Connection.reset(timeout=budget)`` (the
release's ``timeout=``, else the acquire's), which sends ONE statement:
``self.execute("ROLLBACK;\\n" + reset_query, timeout=timeout)`` (the
``ROLLBACK;`` only with a transaction open). The explicit ``timeout=``
replaces the connection's ``command_timeout`` for that statement, and a
connection class with an ``execute()`` of its own sees that one call.
(asyncpg 0.30 split it: ``_reset()`` sends ``execute("ROLLBACK")``, then
``execute(reset_query)`` with no ``timeout=``, under ``compat.timeout(budget)``,
so ``command_timeout`` bounds each statement too.)

safepool's inline reset follows 0.29 (``_internals.RESET_UNDER_BUDGET``,
safepool/_leasing.py:631), but its pool-task reset does not: it always sends
0.30's statements, ``await con.execute("ROLLBACK")`` and
``await con.execute(query)`` with no ``timeout=``, under
``asyncio.timeout(budget)`` (safepool/_workers.py:706, :745, :749). That path
is taken for a connection class with an ``execute()`` of its own
(``holder.task_reset``) and for a lease that leaves a transaction open on a
class with a reset query of its own (``holder.split_rollback``), among others
(safepool/_leasing.py:569). On 0.29 then:

- with ``command_timeout`` shorter than the reset query and a release budget
  that covers it, asyncpg's release returns and keeps the connection;
  safepool's reset is cut by ``command_timeout``, the connection is closed
  and ``release()`` raises ``TimeoutError``;
- the class's ``execute()`` sees ``("ROLLBACK", {})`` and
  ``(reset_query, {})`` where asyncpg 0.29 calls it once, with
  ``"ROLLBACK;\\n" + reset_query`` and ``timeout=budget``.

On 0.30+ both pools behave alike (controls: the same tests pass there).
"""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import pytest

import safepool
from tests._util import asyncpg_version

pytestmark = pytest.mark.asyncio

ON_029 = asyncpg_version() < (0, 30)
GETTER = "get_reset_query" if hasattr(asyncpg.Connection, "get_reset_query") else "_get_reset_query"
RESET_QUERY = "SELECT pg_sleep(0.3)"


def _connection_class(calls: list[tuple[str, dict[str, Any]]], own_execute: bool) -> type:
    class SlowResetConnection(asyncpg.Connection):  # type: ignore[misc]
        pass

    # The reset query of the class's own (0.29 reads the private getter).
    setattr(SlowResetConnection, GETTER, lambda self: RESET_QUERY)
    if own_execute:
        async def execute(self: Any, query: str, *args: Any, **kwargs: Any) -> Any:
            if not args:
                calls.append((query, dict(kwargs)))
            return await asyncpg.Connection.execute(self, query, *args, **kwargs)

        SlowResetConnection.execute = execute  # type: ignore[method-assign]
    return SlowResetConnection


async def _run(flavour: str, pg_dsn: str, open_transaction: bool, own_execute: bool) -> Any:
    calls: list[tuple[str, dict[str, Any]]] = []
    factory = asyncpg.create_pool if flavour == "asyncpg" else safepool.create_pool
    pool = await factory(
        pg_dsn, min_size=1, max_size=1, command_timeout=0.1,
        connection_class=_connection_class(calls, own_execute),
    )
    try:
        con = await pool.acquire()
        pid = con.get_server_pid()
        if open_transaction:
            await con.execute("BEGIN")
        del calls[:]
        try:
            await asyncio.wait_for(pool.release(con, timeout=5), 10)
            outcome = "returned"
        except Exception as exc:
            outcome = type(exc).__name__
        # (Not released: on 0.30+ every reset of this class runs out.)
        again = await asyncio.wait_for(pool.acquire(), 10)
        kept = again.get_server_pid() == pid
        return outcome, kept, [(query, kwargs) for query, kwargs in calls]
    finally:
        pool.terminate()


async def test_open_transaction_on_a_class_with_its_own_reset_query(pg_dsn: str) -> None:
    expected = await _run("asyncpg", pg_dsn, open_transaction=True, own_execute=False)
    if ON_029:
        assert expected[:2] == ("returned", True)  # (the control: asyncpg 0.29's release keeps it)
    assert await _run("safepool", pg_dsn, open_transaction=True, own_execute=False) == expected


@pytest.mark.parametrize("open_transaction", [False, True], ids=["idle", "open-transaction"])
async def test_a_class_with_its_own_execute(pg_dsn: str, open_transaction: bool) -> None:
    expected = await _run("asyncpg", pg_dsn, open_transaction=open_transaction, own_execute=True)
    if ON_029:
        rollback = "ROLLBACK;\n" if open_transaction else ""
        assert expected == ("returned", True, [(rollback + RESET_QUERY, {"timeout": 5})])
    assert await _run("safepool", pg_dsn, open_transaction=open_transaction, own_execute=True) == expected
