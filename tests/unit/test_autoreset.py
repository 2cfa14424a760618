"""reset_mode="auto": the statement classifier (PostgreSQL's parser, through
pglast) and the proxy's method coverage. No database: what the statements do
on a real server is tests/integration/test_autoreset_differential.py."""

from __future__ import annotations

import inspect
import sys
from typing import Any

import asyncpg
import pytest

pytest.importorskip("pglast", reason="pip install -e '.[test]' installs the auto extra")

from asyncpg import exceptions as pg_exceptions  # noqa: E402

from safepool import _autoreset, _internals  # noqa: E402
from safepool._autoreset import AutoResetProxy, method_policy, reset_reason  # noqa: E402
from safepool.errors import LeaseExpiredError  # noqa: E402
from safepool.proxy import OWN_METHODS, PoolConnectionProxy  # noqa: E402
from tests._util import asyncpg_version  # noqa: E402

NEUTRAL = [
    "SELECT 1",
    "select 1;",
    "",
    "-- only a comment",
    "SELECT $1::int",
    "SELECT now(), count(*) FROM t WHERE a > $1 GROUP BY b HAVING sum(a) > 2 ORDER BY 1 LIMIT 5",
    "SELECT * FROM t FOR UPDATE",
    "SELECT * FROM t FOR NO KEY UPDATE SKIP LOCKED",
    "SELECT * FROM t JOIN u USING (id) LEFT JOIN LATERAL (SELECT 1) x ON true",
    "VALUES (1, 'a'), (2, 'b')",
    "TABLE t",
    "INSERT INTO t (a) VALUES (1) RETURNING id",
    "INSERT INTO t (a) VALUES (1) ON CONFLICT (a) DO UPDATE SET a = EXCLUDED.a",
    "INSERT INTO t SELECT * FROM generate_series(1, 10)",
    "UPDATE t SET a = a + 1, b = lower(b) WHERE id = $1 RETURNING *",
    "DELETE FROM t WHERE id IN (SELECT id FROM u WHERE b LIKE 'x%')",
    "MERGE INTO t USING s ON t.id = s.id WHEN MATCHED THEN UPDATE SET a = s.a WHEN NOT MATCHED THEN INSERT VALUES (s.id)",
    "WITH x AS (INSERT INTO t VALUES (1) RETURNING *) SELECT * FROM x",
    "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r WHERE n < 5) SELECT * FROM r",
    "SELECT extract(year FROM now()), x AT TIME ZONE 'UTC', substring('abc' FROM 2), trim(' a '), position('b' IN 'abc')",
    "SELECT current_user, session_user, current_date, coalesce(a, 0), greatest(1, 2), nullif(a, 0) FROM t",
    "SELECT a BETWEEN 1 AND 2, a NOT BETWEEN SYMMETRIC 2 AND 1, a IS DISTINCT FROM b, b ILIKE 'x', b ~ '^a' FROM t",
    "SELECT a = ANY($1::int[]), a <> ALL(ARRAY[1, 2]), '{1}'::int[] @> ARRAY[1], '{\"a\": 1}'::jsonb ->> 'a'",
    "SELECT row_number() OVER (PARTITION BY b ORDER BY a), lag(a) OVER w FROM t WINDOW w AS (ORDER BY a)",
    "SELECT count(*) FILTER (WHERE a > 1), array_agg(a ORDER BY a), percentile_cont(0.5) WITHIN GROUP (ORDER BY a) FROM t",
    "SELECT CASE WHEN a > 0 THEN 'p' ELSE 'n' END, EXISTS (SELECT 1), (SELECT max(a) FROM t), ROW(1, 2)",
    "SELECT jsonb_build_object('a', 1), json_agg(t) FROM t",
    "SELECT * FROM t TABLESAMPLE SYSTEM (10)",
    "SELECT * FROM jsonb_to_recordset($1::jsonb) AS x(a int, b text)",
    "SELECT pg_catalog.now(), pg_catalog.lower('A')",
    "SELECT pg_sleep(0)",
    "SELECT pg_advisory_xact_lock(1), pg_try_advisory_xact_lock(2, 3)",
    "SELECT nextval('s'), currval('s'), setval('s', 1)",
    "SELECT pg_notify('c', 'payload')",
    "NOTIFY c, 'payload'",
    "SELECT set_config('app.user_id', '42', true)",
    "SELECT pg_catalog.set_config('app.user_id', $1, true)",
    "BEGIN",
    "BEGIN ISOLATION LEVEL SERIALIZABLE READ ONLY DEFERRABLE",
    "START TRANSACTION",
    "COMMIT",
    "COMMIT AND CHAIN",
    "ROLLBACK",
    "SAVEPOINT s1",
    "RELEASE SAVEPOINT s1",
    "ROLLBACK TO SAVEPOINT s1",
    "END",
    "ABORT",
    "SET LOCAL work_mem = '8MB'",
    "SET LOCAL statement_timeout TO 1000",
    "SET LOCAL app.tenant = 'x'",
    "SET LOCAL ROLE other",
    "SET TRANSACTION ISOLATION LEVEL REPEATABLE READ",
    "SET TRANSACTION SNAPSHOT '00000003-0000001B-1'",
    "SET CONSTRAINTS ALL DEFERRED",
    "SHOW work_mem",
    "SHOW ALL",
    "LOCK TABLE t IN ACCESS EXCLUSIVE MODE",
    "EXPLAIN SELECT 1",
    "EXPLAIN (ANALYZE, BUFFERS) UPDATE t SET a = 1",
    "COPY t FROM STDIN",
    "COPY t (a, b) TO STDOUT WITH (FORMAT csv, HEADER)",
    "COPY (SELECT lower(b) FROM t) TO STDOUT",
    "COPY t FROM STDIN WHERE a > 1",
    "BEGIN; SET LOCAL work_mem = '1MB'; SELECT set_config('a.b', 'c', true); COMMIT",
    "SELECT 1; SELECT 2; UPDATE t SET a = 1",
    "SELECT 'SET work_mem = 1; LISTEN x' AS not_a_statement",
    "SELECT 1 /* ; SET work_mem = 1 */",
    "SELECT 'a' SIMILAR TO 'a%', 'a' LIKE 'a' ESCAPE '#', COLLATION FOR ('a'), 'a' IS NORMALIZED, system_user",
    "SELECT * FROM JSON_TABLE('[1]'::jsonb, '$[*]' COLUMNS (a int PATH '$', NESTED PATH '$' COLUMNS (b int PATH '$')))",
    "SELECT JSON_VALUE('{}'::jsonb, '$.a'), JSON_OBJECT('a': 1), JSON_ARRAYAGG(1), '{}' IS JSON",
    "MERGE INTO t USING s ON t.id = s.id WHEN MATCHED THEN DELETE RETURNING merge_action()",
    "SELECT name, setting FROM pg_settings WHERE name = $1",
    "UPDATE t SET b = s.setting FROM pg_catalog.pg_settings AS s WHERE s.name = t.b",
    "SELECT t.a, (t).b, (t.c).d, (t.*).e, t.now, (x).nextval, (ARRAY[t.a])[1] FROM t",
    "SELECT 1 UNION SELECT 2 INTERSECT SELECT 3 EXCEPT SELECT 4",
    "SELECT 1 IN (SELECT a FROM t), 2 = ANY (SELECT a FROM t), 3 < ALL (SELECT a FROM t)",
    "SELECT a FROM t ORDER BY a USING >, b USING OPERATOR(pg_catalog.<)",
]

RESET = [
    ("SET work_mem = '8MB'", "SET work_mem (not LOCAL)"),
    ("SET SESSION work_mem = '8MB'", "not LOCAL"),
    ("SET TIME ZONE 'UTC'", "not LOCAL"),
    ("SET search_path TO x", "not LOCAL"),
    ("SET ROLE other", "SET role"),
    ("SET SESSION AUTHORIZATION other", "not LOCAL"),
    ("SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY", "SESSION CHARACTERISTICS"),
    ("SET LOCAL search_path TO evil, pg_catalog", "changes how later statements are read"),
    ("SET LOCAL standard_conforming_strings = off", "changes how later statements are read"),
    ("RESET work_mem", "RESET"),
    ("RESET ALL", "RESET"),
    ("RESET ROLE", "RESET"),
    ("BEGIN; SET work_mem = '1MB'; COMMIT", "not LOCAL"),
    ("SELECT 1; SET work_mem = '1MB'", "not LOCAL"),
    ("SELECT set_config('a.b', 'c', false)", "is_local is not the literal true"),
    ("SELECT set_config('a.b', 'c', $1)", "is_local is not the literal true"),
    ("SELECT set_config('a.b', 'c', 'true')", "is_local is not the literal true"),
    ("SELECT set_config($1, 'c', true)", "computed setting name"),
    ("SELECT set_config('search_path', 'evil', true)", "changes how later statements are read"),
    ("SELECT set_config(setting_name => 'a.b', new_value => 'c', is_local => true)", "computed setting name"),
    ("SELECT set_config('a.b', 'c')", "three positional"),
    ("SELECT pg_advisory_lock(1)", "pg_advisory_lock()"),
    ("SELECT pg_advisory_lock_shared(1, 2)", "pg_advisory_lock_shared()"),
    ("SELECT pg_try_advisory_lock(1)", "pg_try_advisory_lock()"),
    ("SELECT pg_advisory_unlock(1)", "pg_advisory_unlock()"),
    ("SELECT pg_advisory_unlock_all()", "pg_advisory_unlock_all()"),
    ("SELECT * FROM t WHERE pg_try_advisory_lock(id)", "pg_try_advisory_lock()"),
    ("SELECT setseed(0.5)", "setseed()"),
    ("SELECT dblink_connect('x')", "dblink_connect()"),
    ("SELECT lo_open(1, 131072)", "lo_open()"),
    ("SELECT myfunc()", "myfunc()"),
    ("SELECT a FROM t WHERE myfunc(a)", "myfunc()"),
    ("SELECT * FROM myfunc()", "myfunc()"),
    ("SELECT public.lower('a')", "public.lower()"),
    ("SELECT pg_temp.f()", "pg_temp.f()"),
    ("SELECT db.pg_catalog.now()", "db.pg_catalog.now()"),
    ("SELECT count(*) FROM t WHERE a OPERATOR(myschema.===) 1", "operator myschema.==="),
    ("SELECT a <=> b FROM t", "operator <=>"),
    # Operators outside an A_Expr: of a subquery comparison, of ORDER BY USING
    # (the sort calls the comparison function of the operator's family).
    ("SELECT 1 === ANY (SELECT a FROM t)", "operator ==="),
    ("SELECT ROW(1, 2) OPERATOR(myschema.=) ALL (SELECT a, b FROM t)", "operator myschema.="),
    ("SELECT a FROM t ORDER BY a USING <<<", "operator <<<"),
    ("SELECT a FROM t ORDER BY a USING OPERATOR(myschema.<)", "operator myschema.<"),
    ("SELECT array_agg(a ORDER BY a USING <<<) FROM t", "operator <<<"),
    ("SELECT row_number() OVER (ORDER BY a USING <<<) FROM t", "operator <<<"),
    ("SELECT * FROM t TABLESAMPLE my_method (10)", "TABLESAMPLE method"),
    ("UPDATE t SET a = myfunc(a)", "myfunc()"),
    ("INSERT INTO t VALUES (myfunc())", "myfunc()"),
    ("WITH x AS (SELECT pg_advisory_lock(1)) SELECT 1", "pg_advisory_lock()"),
    ("SELECT (SELECT pg_advisory_lock(1))", "pg_advisory_lock()"),
    ("SELECT 1 INTO TEMP x", "SELECT INTO"),
    ("SELECT 1 INTO x", "SELECT INTO"),
    # INTO on the leftmost SELECT of a set operation is the statement's.
    ("SELECT 1 INTO TEMP x UNION SELECT 2", "SELECT INTO"),
    ("(SELECT 1 INTO TEMP x) UNION ALL SELECT 2 INTERSECT SELECT 3", "SELECT INTO"),
    ("EXPLAIN ANALYZE SELECT 1 INTO TEMP x EXCEPT SELECT 2", "SELECT INTO"),
    # pg_settings' rule runs set_config(name, setting, false).
    ("UPDATE pg_settings SET setting = '1MB' WHERE name = 'work_mem'", "pg_settings"),
    ("UPDATE ONLY pg_catalog.pg_settings AS s SET setting = '1MB'", "pg_settings"),
    ("WITH u AS (UPDATE pg_settings SET setting = '1MB' WHERE name = 'work_mem' RETURNING 1) SELECT 1", "pg_settings"),
    ("EXPLAIN ANALYZE UPDATE pg_settings SET setting = '1MB' WHERE name = 'work_mem'", "pg_settings"),
    # Attribute notation: (x).f is f(x), t.f is f(t), with no call node.
    ("SELECT (42).pg_advisory_lock", "attribute notation"),
    ("SELECT t.pg_try_advisory_lock FROM t", "attribute notation"),
    ("SELECT (t.a).pg_advisory_lock_shared FROM t", "attribute notation"),
    ("SELECT (ARRAY[42])[1].pg_advisory_unlock", "attribute notation"),
    ("SELECT (0.5).setseed", "attribute notation"),
    ("SELECT ('SELECT v FROM t').ts_stat", "attribute notation"),
    ("SELECT (1).lo_unlink", "attribute notation"),
    ("SELECT ('conn').dblink_connect", "attribute notation"),
    ("UPDATE t SET a = 1 WHERE (t.id).pg_try_advisory_lock", "attribute notation"),
    ("LISTEN c", "ListenStmt"),
    ("UNLISTEN *", "UnlistenStmt"),
    ("DECLARE c CURSOR WITH HOLD FOR SELECT 1", "DeclareCursorStmt"),
    ("DECLARE c CURSOR FOR SELECT 1", "DeclareCursorStmt"),
    ("FETCH 1 FROM c", "FetchStmt"),
    ("CLOSE c", "ClosePortalStmt"),
    ("CLOSE ALL", "ClosePortalStmt"),
    ("PREPARE p AS SELECT 1", "PrepareStmt"),
    ("EXECUTE p", "ExecuteStmt"),
    ("DEALLOCATE ALL", "DeallocateStmt"),
    ("CREATE TEMP TABLE x (a int)", "CreateStmt"),
    ("CREATE TEMPORARY VIEW v AS SELECT 1", "ViewStmt"),
    ("CREATE TEMP SEQUENCE s", "CreateSeqStmt"),
    ("CREATE TABLE pg_temp.x (a int)", "CreateStmt"),
    ("CREATE TABLE x (a int)", "CreateStmt"),
    ("CREATE TEMP TABLE x AS SELECT 1", "CreateTableAsStmt"),
    ("DISCARD ALL", "DiscardStmt"),
    ("DISCARD TEMP", "DiscardStmt"),
    ("DO $$ BEGIN PERFORM 1; END $$", "DoStmt"),
    ("CALL myproc()", "CallStmt"),
    ("LOAD 'auto_explain'", "LoadStmt"),
    ("TRUNCATE t", "TruncateStmt"),
    ("VACUUM t", "VacuumStmt"),
    ("ALTER ROLE current_user SET work_mem = '1MB'", "AlterRoleSetStmt"),
    ("PREPARE TRANSACTION 'g'", "two-phase"),
    ("COMMIT PREPARED 'g'", "two-phase"),
    ("EXPLAIN ANALYZE SELECT pg_advisory_lock(1)", "pg_advisory_lock()"),
    ("EXPLAIN CREATE TEMP TABLE x AS SELECT 1", "CreateTableAsStmt"),
    ("EXPLAIN EXECUTE p", "ExecuteStmt"),
    ("COPY t FROM '/tmp/data'", "server file or program"),
    ("COPY t TO PROGRAM 'cat'", "server file or program"),
    ("COPY (SELECT pg_advisory_lock(1)) TO STDOUT", "pg_advisory_lock()"),
    ("COPY t FROM STDIN WHERE myfunc(a)", "myfunc()"),
    ("SELEC 1", "does not parse"),
    ("SELECT 'unterminated", "does not parse"),
    ("SELECT 1; SELEC 2", "does not parse"),
    # Read with standard_conforming_strings=off this holds a SET; the parser
    # (and the server as configured by default) reads one string literal:
    # neutral here, which is why AutoResetProxy checks the setting.
]


@pytest.fixture(autouse=True)
def _fresh_cache() -> Any:
    _autoreset.cache_clear()
    yield
    _autoreset.cache_clear()


@pytest.mark.parametrize("sql", NEUTRAL)
def test_neutral(sql: str) -> None:
    assert reset_reason(sql) is None


@pytest.mark.parametrize(("sql", "why"), RESET)
def test_needs_reset(sql: str, why: str) -> None:
    reason = reset_reason(sql)
    assert reason is not None
    assert why in reason


def test_every_statement_of_a_string_must_be_neutral() -> None:
    assert reset_reason("SELECT 1; SELECT 2") is None
    assert reset_reason("SELECT 1; LISTEN c; SELECT 2") is not None
    assert reset_reason("BEGIN; SELECT 1; SET work_mem = 1; COMMIT") is not None
    assert reset_reason("SELECT 1;;;") is None


def test_not_a_string() -> None:
    assert reset_reason(None) is not None
    assert reset_reason(b"SELECT 1") is not None
    assert reset_reason(["SELECT 1"]) is not None  # unhashable


def test_cache_is_bounded_and_keeps_the_newest() -> None:
    for i in range(_autoreset.CACHE_SIZE + 100):
        reset_reason(f"SELECT {i}")
    assert _autoreset.cache_len() == _autoreset.CACHE_SIZE
    assert f"SELECT {_autoreset.CACHE_SIZE + 99}" in _autoreset._cache
    assert "SELECT 0" not in _autoreset._cache


def test_cache_answers_without_parsing_again(monkeypatch: pytest.MonkeyPatch) -> None:
    assert reset_reason("SELECT 41") is None
    assert reset_reason("SET work_mem = 1") is not None

    def fail(sql: str) -> str:
        raise AssertionError(f"parsed again: {sql}")

    monkeypatch.setattr(_autoreset, "_parse_json", fail)
    assert reset_reason("SELECT 41") is None
    assert reset_reason("SET work_mem = 1") is not None


def test_long_text_needs_a_reset_without_being_parsed_or_cached() -> None:
    sql = "SELECT 1" + " " * _autoreset.MAX_CACHED_LENGTH
    assert "not parsed" in (reset_reason(sql) or "")
    assert _autoreset.cache_len() == 0


def test_missing_pglast_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_autoreset, "_parse_json", None)
    monkeypatch.setitem(sys.modules, "pglast.parser", None)  # import fails
    monkeypatch.setitem(sys.modules, "pglast", None)
    with pytest.raises(ImportError, match=r"pip install 'safepool\[auto\]'"):
        _autoreset.require_parser()
    with pytest.raises(ImportError, match=r"safepool\[auto\]"):
        reset_reason("SELECT 1 + 1")


def test_module_import_does_not_import_pglast() -> None:
    import subprocess

    code = "import sys, safepool._autoreset; print('pglast' in sys.modules)"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert run.stdout.strip() == "False"


# --------------------------------------------------------------- the proxy


def _public_methods() -> list[str]:
    return [
        name
        for name in dir(asyncpg.Connection)
        if not name.startswith("_") and inspect.isfunction(getattr(asyncpg.Connection, name))
    ]


def test_every_public_connection_method_has_a_policy() -> None:
    methods = set(_public_methods())
    sql = set(_autoreset.SQL_METHODS) | _autoreset.COPY_METHODS
    neutral = _autoreset.NEUTRAL_METHODS
    # The lists name only real methods (a typo would silently mark), some of
    # them added in asyncpg 0.30.
    newer = {"fetchmany", "get_reset_query"} if asyncpg_version() < (0, 30) else set()
    assert sql - newer <= methods and neutral - newer <= methods
    sql, neutral = sql & methods, neutral & methods
    marks = methods - sql - neutral
    assert sql | neutral | marks == methods
    assert {"add_listener", "remove_listener", "reset", "reload_schema_state", "set_type_codec"} <= marks
    for name in methods:
        if name in OWN_METHODS:
            # The base proxy's own (terminate()): inherited (review h281).
            assert getattr(AutoResetProxy, name) is getattr(PoolConnectionProxy, name)
        else:
            assert getattr(AutoResetProxy, name).__wrapped__ is getattr(asyncpg.Connection, name)
        expected = (
            "sql"
            if name in _autoreset.SQL_METHODS
            else "copy"
            if name in _autoreset.COPY_METHODS
            else ("neutral" if name in neutral else "marks")
        )
        assert method_policy(name) == expected
    # A method a later asyncpg adds marks the lease.
    assert method_policy("some_new_method") == "marks"


def test_coroutine_marking_as_the_base_proxy() -> None:
    # (inspect.markcoroutinefunction is 3.12+; on 3.11 neither proxy is marked.)
    for name in _public_methods():
        ours, base = getattr(AutoResetProxy, name), getattr(PoolConnectionProxy, name)
        assert inspect.iscoroutinefunction(ours) == inspect.iscoroutinefunction(base), name


@pytest.fixture(autouse=True)
def _fake_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    # The proxy reads a parameter through asyncpg's ConnectionSettings'
    # own __getattr__, which takes only that class; _Settings stands in for
    # it here (the real one: tests/integration/test_reset_auto.py).
    monkeypatch.setattr(_autoreset, "_read_setting", getattr)


class _Settings:
    def __init__(self, standard_strings: str) -> None:
        self.standard_conforming_strings = standard_strings


class FakeConnection:
    """Stands in for the raw connection: records each forwarded call. (What
    the statements do on a server is the integration test's business.)"""

    def __init__(self, standard_strings: str = "on") -> None:
        self.calls: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = []
        self._settings = _Settings(standard_strings)
        self._protocol = _Protocol()

    def _set_proxy(self, proxy: Any) -> None:
        pass

    def get_settings(self) -> _Settings:
        return self._settings


class _Protocol:
    queries_count = 0  # (the wrappers compare it before and after a call)


def _fake_method(name: str) -> Any:
    def method(self: FakeConnection, *args: Any, **kwargs: Any) -> str:
        self.calls.append((name, args, kwargs))
        return name

    async def coroutine_method(self: FakeConnection, *args: Any, **kwargs: Any) -> str:
        return method(self, *args, **kwargs)

    return coroutine_method if inspect.iscoroutinefunction(getattr(asyncpg.Connection, name)) else method


for _name in _public_methods():
    if _name != "get_settings":
        setattr(FakeConnection, _name, _fake_method(_name))


class FakeHolder:
    def __init__(self) -> None:
        self.clean_mark = 7
        self.watched = 0
        self.copies = 0

    # The proxy's weak-reference callback (a leak report): none here, where
    # proxies are dropped unreleased at the end of each check.
    proxy_collected = None
    # Whether the connection's class has asyncpg's methods of its own
    # (Holder.own_methods): not asyncpg's Connection's, nor the fake's here.
    own_methods = False


def _sent(result: Any) -> Any:
    """A forwarded coroutine method comes back wrapped (proxy.watch), which
    calls the connection's method at its first step: run it (the fake's
    methods never wait) for the fake connection to record the call."""
    if inspect.iscoroutine(result):
        try:
            result.send(None)
        except StopIteration as stop:
            return stop.value
        raise AssertionError("a fake connection's method waited")
    return result


def _proxy(standard_strings: str = "on") -> tuple[AutoResetProxy, FakeConnection, FakeHolder]:
    con, holder = FakeConnection(standard_strings), FakeHolder()
    return AutoResetProxy(holder, con, object()), con, holder  # type: ignore[arg-type]


def test_neutral_sql_leaves_the_mark_and_is_forwarded() -> None:
    proxy, con, holder = _proxy()
    _sent(proxy.fetchval("SELECT 1"))
    _sent(proxy.execute("UPDATE t SET a = $1", 1, timeout=2))
    _sent(proxy.executemany(command="INSERT INTO t VALUES ($1)", args=[(1,)]))
    _sent(proxy.fetch(query="SELECT now()"))
    proxy.transaction(isolation="serializable")
    _sent(proxy.copy_from_table("t", output=b""))
    _sent(proxy.copy_to_table("t", source=b"", where="a > 1"))
    _sent(proxy.copy_from_query("SELECT lower(b) FROM t WHERE a = 1", output=b"", format="csv", null="-", header=True))
    assert holder.clean_mark == 7
    assert [c[0] for c in con.calls] == [
        "fetchval",
        "execute",
        "executemany",
        "fetch",
        "transaction",
        "copy_from_table",
        "copy_to_table",
        "copy_from_query",
    ]
    assert con.calls[1] == ("execute", ("UPDATE t SET a = $1", 1), {"timeout": 2})
    proxy._detach()


@pytest.mark.parametrize(
    ("method", "args", "kwargs"),
    [
        ("execute", ("SET work_mem = 1",), {}),
        ("execute", (), {"query": "LISTEN c"}),
        ("fetchval", ("SELECT pg_advisory_lock(1)",), {}),
        ("fetchrow", ("SELECT set_config('a.b', 'c', false)",), {}),
        ("fetch", ("SELECT myfunc()",), {}),
        ("fetchmany", ("SELECT myfunc($1)", [(1,)]), {}),
        ("executemany", ("SELECT pg_advisory_lock($1)", [(1,)]), {}),
        ("prepare", ("SELECT myfunc()",), {}),
        ("cursor", ("SELECT myfunc()",), {}),
        ("execute", (None,), {}),
        ("copy_from_query", ("SELECT pg_advisory_lock(1)",), {"output": b""}),
        # The query is pasted into COPY (...) TO STDOUT: a ')' ends it early.
        ("copy_from_query", ("SELECT 1) TO STDOUT; SET work_mem = 1; COPY (SELECT 1",), {"output": b""}),
        ("copy_to_table", ("t",), {"source": b"", "where": "myfunc(a)"}),
        ("copy_records_to_table", ("t",), {"records": [], "where": "true; SET work_mem = 1"}),
        # asyncpg inlines the arguments, replacing $n in string literals too.
        ("copy_from_query", ("SELECT $1::text, '$1'", "x"), {"output": b""}),
        # HEADER (and OIDS, FREEZE) go into the statement unquoted.
        ("copy_from_table", ("t",), {"output": b"", "header": "true); SET work_mem = 1; --"}),
        ("copy_to_table", ("t",), {"source": b"", "freeze": "true) WHERE myfunc(a) --"}),
        # After a query ending in a -- comment, a line break in a quoted
        # option value ends that comment.
        ("copy_from_query", ("SELECT 1) TO STDOUT --",), {"output": b"", "null": "x\n; SET work_mem = 1; --"}),
        ("copy_from_query", ("SELECT 1",), {"output": b"", "force_quote": ["a", "b\rc"]}),
        ("add_listener", ("c", print), {}),
        ("remove_listener", ("c", print), {}),
        ("reset", (), {}),
        ("reload_schema_state", (), {}),
        ("set_type_codec", ("json",), {"encoder": str, "decoder": str}),
    ],
)
def test_state_changing_calls_mark_the_lease(method: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    if not hasattr(asyncpg.Connection, method):
        pytest.skip(f"asyncpg {asyncpg.__version__} has no Connection.{method}()")
    proxy, con, holder = _proxy()
    _sent(getattr(proxy, method)(*args, **kwargs))
    assert holder.clean_mark == -1
    assert con.calls == [(method, args, kwargs)]
    proxy._detach()


def test_other_attributes_mark_the_lease() -> None:
    # What the proxy does not forward as a Connection method: a private
    # attribute, or a connection_class's helper that runs SQL unseen.
    proxy, con, holder = _proxy()
    con.set_tenant = lambda tenant: ("set_tenant", tenant)  # type: ignore[attr-defined]
    assert proxy.set_tenant(5) == ("set_tenant", 5)
    assert holder.clean_mark == -1
    proxy._detach()
    with pytest.raises(pg_exceptions.InterfaceError):
        proxy.set_tenant  # noqa: B018


class _Helpers(asyncpg.Connection):  # type: ignore[misc]
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)

    async def set_tenant(self, tenant: int) -> None:
        await self.execute("SELECT set_config('app.tenant', $1, false)", str(tenant))


class _OwnFetch(_Helpers):
    async def fetch(self, query: str, *args: Any, **kwargs: Any) -> Any:
        return await super().fetch(query, *args, **kwargs)


class _OwnPrivate(asyncpg.Connection):  # type: ignore[misc]
    async def _execute(self, *args: Any, **kwargs: Any) -> Any:
        return await super()._execute(*args, **kwargs)


def test_a_connection_class_overriding_asyncpg_methods_is_never_trusted() -> None:
    # The proxy forwards to the connection's own methods (and asyncpg's call
    # its private ones): an override may send anything.
    assert not _internals.overrides_connection_methods(asyncpg.Connection)
    assert not _internals.overrides_connection_methods(_Helpers)  # new methods: marked when used
    assert _internals.overrides_connection_methods(_OwnFetch)
    assert _internals.overrides_connection_methods(_OwnPrivate)
    assert not _internals.overrides_connection_methods(FakeConnection)


def test_a_session_without_standard_strings_always_resets() -> None:
    proxy, _, holder = _proxy(standard_strings="off")
    assert holder.clean_mark == -1
    proxy._detach()


def test_a_server_that_never_reported_standard_strings_gets_the_reset() -> None:
    # No ParameterStatus for it: asyncpg's settings raise AttributeError. The
    # proxy is built after the lease was granted, so it must not raise (the
    # lease would be lost); it counts the setting as off.
    con, holder = FakeConnection(), FakeHolder()
    del con._settings.standard_conforming_strings
    proxy = AutoResetProxy(holder, con, object())  # type: ignore[arg-type]
    assert holder.clean_mark == -1
    proxy._detach()


def test_released_and_expired_errors_as_the_base_proxy() -> None:
    proxy, con, holder = _proxy()
    proxy._detach()
    with pytest.raises(pg_exceptions.InterfaceError, match="released back to the pool"):
        proxy.fetchval("SELECT 1")
    with pytest.raises(pg_exceptions.InterfaceError, match="released back to the pool"):
        proxy.add_listener("c", print)
    with pytest.raises(pg_exceptions.InterfaceError, match="released back to the pool"):
        proxy.is_closed()
    assert holder.clean_mark == 7 and con.calls == []
    proxy, con, holder = _proxy()
    proxy._expire("lease_timeout of 1.000s expired")
    with pytest.raises(LeaseExpiredError, match=r"cannot call Connection.execute\(\): lease_timeout"):
        proxy.execute("SET work_mem = 1")
    with pytest.raises(LeaseExpiredError):
        proxy.copy_to_table("t", source=b"")
    assert holder.clean_mark == 7 and con.calls == []


def test_isinstance_connection_as_the_base_proxy() -> None:
    proxy, _, _ = _proxy()
    assert isinstance(proxy, asyncpg.Connection)
    proxy._detach()
