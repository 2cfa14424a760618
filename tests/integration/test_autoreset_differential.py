"""reset_mode="auto", differentially on a real server: run each statement of
a corpus through AutoResetProxy on a clean session, fingerprint the session
(what a full reset would clear) before and after, and check that no statement
the proxy left unmarked changed it.

The fingerprint: session-level settings (pg_settings, source 'session'),
LISTEN channels, the session's advisory locks, open cursors, SQL-level
prepared statements (asyncpg's protocol-level ones are not user state),
objects in the session's temporary schema, current_user and session_user.
An open transaction is rolled back before the second fingerprint, as the pool
does on release of an unmarked lease.
"""

from __future__ import annotations

import io
import itertools
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import pytest
import pytest_asyncio

pytest.importorskip("pglast", reason="pip install -e '.[test]' installs the auto extra")

from safepool import _autoreset  # noqa: E402
from safepool._autoreset import AutoResetProxy  # noqa: E402

pytestmark = pytest.mark.asyncio(loop_scope="module")

FINGERPRINT = """
SELECT
  (SELECT coalesce(array_agg(name || '=' || setting ORDER BY name), '{{}}') FROM pg_settings
     WHERE source = 'session' AND name NOT IN ({transaction_settings})) AS settings,
  (SELECT coalesce(array_agg(c ORDER BY c), '{{}}') FROM pg_listening_channels() AS c) AS channels,
  (SELECT coalesce(array_agg(concat_ws(':', classid, objid, objsubid, mode)
                             ORDER BY concat_ws(':', classid, objid, objsubid, mode)), '{{}}')
     FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()) AS advisory_locks,
  (SELECT coalesce(array_agg(name ORDER BY name), '{{}}') FROM pg_cursors) AS cursors,
  (SELECT coalesce(array_agg(name ORDER BY name), '{{}}') FROM pg_prepared_statements WHERE from_sql) AS prepared,
  (SELECT coalesce(array_agg(relname::text ORDER BY relname), '{{}}') FROM pg_class
     WHERE relnamespace = pg_my_temp_schema()) AS temp_relations,
  (SELECT coalesce(array_agg(proname::text ORDER BY proname), '{{}}') FROM pg_proc
     WHERE pronamespace = pg_my_temp_schema()) AS temp_functions,
  ARRAY[{custom_settings}] AS custom_settings,
  current_user::text AS current_user,
  session_user::text AS session_user
""".format(
    transaction_settings="'transaction_isolation', 'transaction_read_only', 'transaction_deferrable'",
    custom_settings=", ".join(
        f"coalesce(current_setting('ar.{name}', true), '')"
        for name in ("custom", "by_function", "by_procedure", "do", "local", "flag")
    ),
)
# Custom settings (ar.*) are not in pg_settings. Once set, even with
# set_config(..., true), a custom setting stays defined with value '' (so
# current_setting() without missing_ok no longer fails): a full reset
# (RESET ALL) leaves that as well, so '' and undefined compare equal here.
# SET TRANSACTION leaves these with source 'session' (and their default value)
# once its transaction ends; every transaction starts them afresh from the
# default_transaction_* settings, which are fingerprinted.


class StubHolder:
    """What the proxy touches of the pool's holder: the clean mark, and the
    counts of COPY calls and watched statements under way."""

    def __init__(self) -> None:
        self.clean_mark = 0
        self.copies = 0
        self.watched = 0

    # The proxy's weak-reference callback (a leak report): none here, where
    # proxies are dropped unreleased at the end of each check.
    proxy_collected = None
    # Whether the connection's class has asyncpg's methods of its own
    # (Holder.own_methods): not asyncpg's Connection's, nor the fake's here.
    own_methods = False


@dataclass
class Case:
    sql: str
    expect: str  # "neutral": must classify neutral; "changes": must change the session (and so be marked);
    # "either": the classifier may mark it or not (if not, it must not change the session)
    method: str = "execute"
    kwargs: dict[str, Any] = field(default_factory=dict)
    args: tuple[Any, ...] = ()


@dataclass
class Outcome:
    case: Case
    marked: bool
    changed: list[str]
    error: str | None


# ------------------------------------------------------------------ corpus

# Expressions with no column references: valid in every template below.
NEUTRAL_EXPRESSIONS = [
    "1",
    "now()",
    "clock_timestamp()",
    "statement_timestamp()",
    "lower('A')",
    "upper('a')",
    "length('abc')",
    "concat('a', 1, now())",
    "concat_ws(',', 'a', 'b')",
    "substring('abcdef' FROM 2 FOR 3)",
    "trim('  a  ')",
    "replace('abc', 'b', 'x')",
    "split_part('a,b', ',', 2)",
    "regexp_replace('abc', 'b', 'x')",
    "md5('x')",
    "format('%s-%s', 1, 2)",
    "to_char(now(), 'YYYY')",
    "date_trunc('day', now())",
    "extract(epoch FROM now())",
    "now() AT TIME ZONE 'UTC'",
    "age(now(), now() - interval '1 day')",
    "make_date(2024, 1, 2)",
    "coalesce(NULL, 2)",
    "nullif(1, 1)",
    "greatest(1, 2, 3)",
    "least(1, 2)",
    "abs(-1) + round(2.5) + floor(1.5) + ceil(1.2)",
    "mod(power(2, 10)::int, 7) + 10 % 7",
    "random() < 2",
    "gen_random_uuid() IS NOT NULL",
    "current_setting('work_mem')",
    "pg_backend_pid() > 0",
    "current_user",
    "session_user",
    "current_date",
    "version() LIKE 'PostgreSQL%'",
    "jsonb_build_object('a', 1) ->> 'a'",
    "'{\"a\": [1, 2]}'::jsonb @> '{\"a\": [1]}'",
    "to_jsonb(ARRAY[1, 2])",
    "json_build_array(1, 'x')",
    "array_length(ARRAY[1, 2, 3], 1)",
    "array_to_string(ARRAY[1, 2], ',')",
    "cardinality(ARRAY[1])",
    "(SELECT count(*) FROM generate_series(1, 3))",
    "(SELECT string_agg(x::text, ',' ORDER BY x) FROM generate_series(1, 3) AS x)",
    "(SELECT max(x) FILTER (WHERE x < 3) FROM unnest(ARRAY[1, 2, 3]) AS x)",
    "EXISTS (SELECT 1 FROM ar_t)",
    "CASE WHEN random() > 2 THEN 'x' ELSE 'y' END",
    "ROW(1, 'a') IS NOT NULL",
    "pg_sleep(0) IS NULL",
    "txid_current() > 0",
    "pg_try_advisory_xact_lock(4242)",
    "1 BETWEEN 0 AND 2",
    "'abc' ILIKE 'A%'",
    "'abc' ~ '^a'",
    "3 = ANY(ARRAY[1, 2, 3])",
    "set_config('ar.local', 'x', true)",
    "'abc' SIMILAR TO 'a%'",
    "JSON_VALUE('{\"a\": 1}'::jsonb, '$.a')",
    "'{}' IS JSON",
    "pg_notify('ar_channel', 'x') IS NULL",
    "nextval('ar_s') > 0",
]
NEUTRAL_TEMPLATES = [
    "SELECT {e}",
    "SELECT {e} FROM ar_t",
    "BEGIN; SELECT {e}; COMMIT",
    "WITH c AS (SELECT {e} AS v) SELECT * FROM c",
]
NEUTRAL_STATEMENTS = [
    "INSERT INTO ar_t (id, a, b) VALUES (1000 + floor(random() * 1000000)::int, 1, 'x') ON CONFLICT (id) DO NOTHING",
    "INSERT INTO ar_t (id, a, b) SELECT 2000000 + g, g, 'g' FROM generate_series(1, 3) AS g ON CONFLICT (id) "
    "DO UPDATE SET a = EXCLUDED.a + 1",
    "UPDATE ar_t SET a = a + 1 WHERE id = 1 RETURNING *",
    "UPDATE ar_t SET b = lower(b) || 'x' WHERE id IN (SELECT id FROM ar_t WHERE a > 100)",
    "DELETE FROM ar_t WHERE id = -1",
    "MERGE INTO ar_t USING (VALUES (1, 5)) AS s(id, a) ON ar_t.id = s.id WHEN MATCHED THEN UPDATE SET a = s.a "
    "WHEN NOT MATCHED THEN INSERT (id, a, b) VALUES (s.id, s.a, 'm')",
    "WITH moved AS (UPDATE ar_t SET a = a WHERE id = 1 RETURNING id) SELECT count(*) FROM moved",
    "SELECT * FROM ar_t FOR UPDATE",
    "BEGIN; SELECT * FROM ar_t WHERE id = 1 FOR UPDATE; UPDATE ar_t SET a = 0 WHERE id = 1; COMMIT",
    "BEGIN; SELECT * FROM ar_t FOR SHARE SKIP LOCKED; ROLLBACK",
    "SELECT row_number() OVER (ORDER BY id), sum(a) OVER () FROM ar_t",
    "VALUES (1, 'a'), (2, 'b')",
    "TABLE ar_t",
    "BEGIN",
    "BEGIN ISOLATION LEVEL SERIALIZABLE",
    "START TRANSACTION READ ONLY",
    "COMMIT",
    "ROLLBACK",
    "BEGIN; SAVEPOINT s1; SELECT 1; RELEASE SAVEPOINT s1; COMMIT",
    "BEGIN; SAVEPOINT s1; SELECT 1; ROLLBACK TO SAVEPOINT s1; COMMIT",
    "BEGIN; SET TRANSACTION ISOLATION LEVEL REPEATABLE READ; SELECT 1; COMMIT",
    "BEGIN; SET CONSTRAINTS ALL DEFERRED; COMMIT",
    "BEGIN; LOCK TABLE ar_t IN SHARE MODE; COMMIT",
    "BEGIN; SELECT pg_advisory_xact_lock(77); COMMIT",
    "SELECT pg_advisory_xact_lock(78)",
    "BEGIN; SELECT pg_advisory_xact_lock_shared(79); SELECT pg_try_advisory_xact_lock(80, 81); COMMIT",
    "BEGIN; SELECT set_config('ar.flag', 'on', true); SELECT current_setting('ar.flag'); COMMIT",
    "SELECT set_config('statement_timeout', '5s', true)",
    "SHOW work_mem",
    "SHOW ALL",
    "SHOW search_path",
    "SHOW transaction_isolation",
    "EXPLAIN SELECT * FROM ar_t",
    "EXPLAIN (ANALYZE, COSTS OFF) SELECT count(*) FROM ar_t",
    "EXPLAIN (ANALYZE) UPDATE ar_t SET a = a WHERE id = 1",
    "NOTIFY ar_channel",
    "NOTIFY ar_channel, 'payload'",
    "SELECT 1; SELECT 2; SELECT now()",
    "SELECT 'SET work_mem = ''64kB''; LISTEN x' AS text_not_statements",
    "SELECT 1 /* ; SET work_mem = '64kB' */",
    "SELECT nextval('ar_s'), currval('ar_s'), lastval()",
    "SELECT name, setting FROM pg_settings WHERE name = 'work_mem'",
    "UPDATE ar_t SET a = a FROM pg_catalog.pg_settings AS s WHERE s.name = ar_t.b",
    "SELECT ar_t.a, (ar_t).b, (ar_t.*).id, (ROW(1, 2)).f1 FROM ar_t",
    "SELECT 1 AS a UNION SELECT 2 INTERSECT SELECT 2",
    "SELECT 1 IN (SELECT id FROM ar_t), 2 = ANY (SELECT id FROM ar_t), 3 < ALL (SELECT id FROM ar_t)",
    "SELECT id FROM ar_t ORDER BY id USING >, a USING OPERATOR(pg_catalog.<)",
    # Review h239: more statement kinds and clauses, all neutral.
    "COPY (SELECT id FROM ar_t) TO STDOUT",
    "COPY ar_t TO STDOUT (FORMAT csv, HEADER)",
    "BEGIN; COMMIT AND CHAIN",
    "SELECT * FROM JSON_TABLE('[1, 2]'::jsonb, '$[*]' COLUMNS (x int PATH '$'))",
    "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r WHERE n < 3) CYCLE n SET c USING p SELECT n FROM r",
    "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r WHERE n < 3) SEARCH DEPTH FIRST BY n SET o "
    "SELECT n FROM r",
    "SELECT a, b, GROUPING(a, b), count(*) FROM ar_t GROUP BY CUBE (a, b)",
    "SELECT * FROM ar_t TABLESAMPLE SYSTEM (50) REPEATABLE (1)",
    "SELECT 1 WHERE 1 OPERATOR(pg_catalog.=) 1",
]
SETTINGS = [
    ("work_mem", "'1234kB'"),
    ("statement_timeout", "'31s'"),
    ("lock_timeout", "'7s'"),
    ("timezone", "'Asia/Tokyo'"),
    ("search_path", "'pg_catalog'"),
    ("application_name", "'ar_app'"),
    ("datestyle", "'SQL, DMY'"),
    ("extra_float_digits", "'2'"),
    ("random_page_cost", "'1.5'"),
    ("enable_seqscan", "'off'"),
    ("default_transaction_isolation", "'serializable'"),
    ("ar.custom", "'on'"),
    ("intervalstyle", "'iso_8601'"),
    ("client_min_messages", "'warning'"),
    ("idle_in_transaction_session_timeout", "'50s'"),
]
# Expected to leave the session changed (and so to be marked). {role}: a role
# the test user may switch to.
CHANGING_STATEMENTS = [
    "SELECT pg_advisory_lock(101)",
    "SELECT pg_advisory_lock(102, 103)",
    "SELECT pg_advisory_lock_shared(104)",
    "SELECT pg_try_advisory_lock(105)",
    "SELECT pg_try_advisory_lock_shared(106)",
    "SELECT pg_try_advisory_lock(107, 108)",
    "BEGIN; SELECT pg_advisory_lock(109); COMMIT",
    "SELECT count(*) FROM ar_t WHERE pg_try_advisory_lock(id)",
    "LISTEN ar_a",
    'LISTEN "Ar Quoted"',
    "BEGIN; LISTEN ar_b; COMMIT",
    "BEGIN; DECLARE ar_c CURSOR WITH HOLD FOR SELECT 1; COMMIT",
    "BEGIN; DECLARE ar_d CURSOR WITH HOLD FOR SELECT * FROM ar_t; COMMIT",
    "PREPARE ar_p AS SELECT 1",
    "PREPARE ar_q(int) AS SELECT $1 + 1",
    "BEGIN; PREPARE ar_r AS SELECT now(); COMMIT",
    "CREATE TEMP TABLE ar_tmp (a int)",
    "CREATE TEMPORARY VIEW ar_tmpv AS SELECT 1 AS a",
    "CREATE TEMP SEQUENCE ar_tmps",
    "CREATE TABLE pg_temp.ar_tmp2 (a int)",
    "SELECT 1 AS a INTO TEMP ar_tmp3",
    "CREATE TEMP TABLE ar_tmp4 AS SELECT * FROM ar_t",
    "CREATE FUNCTION pg_temp.ar_f() RETURNS int LANGUAGE sql AS 'SELECT 1'",
    "SET ROLE {role}",
    "SET SESSION AUTHORIZATION {role}",
    "BEGIN; SET ROLE {role}; COMMIT",
    "SET SESSION CHARACTERISTICS AS TRANSACTION ISOLATION LEVEL SERIALIZABLE",
    "SELECT ar_set()",
    "SELECT * FROM ar_set()",
    "SELECT id FROM ar_t WHERE ar_set() IS NULL",
    "DO $$ BEGIN PERFORM set_config('ar.do', '1', false); END $$",
    "CALL ar_proc()",
    # pg_settings has a rule: an UPDATE of it runs set_config(..., false).
    "UPDATE pg_settings SET setting = '1235kB' WHERE name = 'work_mem'",
    "BEGIN; UPDATE pg_catalog.pg_settings SET setting = 'Asia/Tokyo' WHERE name = 'TimeZone'; COMMIT",
    "EXPLAIN (ANALYZE) UPDATE pg_settings AS s SET setting = 'ar_v' WHERE s.name = 'application_name'",
    # Attribute notation: (x).f is f(x), with no function call in the text.
    "SELECT (112::bigint).pg_advisory_lock",
    "SELECT (x).pg_try_advisory_lock FROM (VALUES (113::bigint)) AS v(x)",
    "SELECT ('SELECT to_tsvector(''a'') FROM (SELECT pg_advisory_lock(114)) AS x').ts_stat",
    # INTO on the leftmost SELECT of a set operation: the server takes it
    # for the whole statement.
    "SELECT 1 AS a INTO TEMP ar_tmp5 UNION SELECT 2",
    "EXPLAIN ANALYZE (SELECT 1 AS a INTO TEMP ar_tmp6) INTERSECT SELECT 1 EXCEPT SELECT 2",
    # A user operator outside an A_Expr: of a subquery comparison (its
    # function), or of ORDER BY USING (its btree family's comparison function).
    "SELECT 1 === ANY (SELECT id FROM ar_t)",
    "SELECT ROW(1) OPERATOR({schema}.===) ALL (SELECT id FROM ar_t)",
    "SELECT id FROM ar_t ORDER BY id USING <<<",
    "SELECT array_agg(id ORDER BY id USING OPERATOR({schema}.>>>)) FROM ar_t",
    "SELECT row_number() OVER (ORDER BY id USING <<<) FROM ar_t",
    # Review h239: names spelt with Unicode escapes, quotes or dollar quotes,
    # and calls in every clause a statement can hide one in.
    'SELECT U&"pg_adv\\0069sory_lock"(119)',
    'SELECT pg_catalog."pg_advisory_lock"(120)',
    'SELECT (121::bigint).U&"pg_adv\\0069sory_lock"',
    "SELECT set_config(U&'work\\005fmem', '1236kB', false)",
    "SELECT set_config($$work_mem$$, '1237kB', false)",
    "SELECT set_config('work_mem', '1239kB', NOT true)",
    "SELECT * FROM ar_t, LATERAL (SELECT pg_advisory_lock(ar_t.id + 130)) AS l",
    "SELECT id FROM ar_t ORDER BY pg_try_advisory_lock(id + 140)",
    "UPDATE ar_t SET a = a WHERE id = 1 RETURNING pg_advisory_lock(150)",
    "INSERT INTO ar_t (id, a, b) VALUES (1, 1, 'x') ON CONFLICT (id) DO UPDATE SET b = pg_advisory_lock(151)::text",
    "VALUES (pg_advisory_lock(152))",
    "SELECT sum(id) OVER (ORDER BY pg_try_advisory_lock(153)) FROM ar_t",
    "WITH x AS (SELECT pg_advisory_lock(154)) SELECT * FROM x",
    "EXPLAIN (ANALYZE) SELECT pg_advisory_lock(155)",
    "SELECT 1; SELECT pg_advisory_lock(156); SELECT 2",
    "SELECT count(*) FILTER (WHERE pg_try_advisory_lock(157)) FROM ar_t",
    "SELECT CASE WHEN true THEN pg_advisory_lock(158) END",
    "SELECT 1 -- ; comment\n; SELECT pg_advisory_lock(159)",
    "SELECT $q$;$q$; /* ; */ SELECT pg_advisory_lock(160)",
    "SELECT 1 FROM ar_t WHERE id IN (SELECT 1 WHERE pg_advisory_lock(161) IS NULL)",
    "SELECT * FROM ROWS FROM (pg_advisory_lock(162), generate_series(1, 2))",
    "SELECT (SELECT pg_advisory_lock(163))",
    "SELECT ARRAY[pg_try_advisory_lock(164)]",
    'SELECT pg_advisory_lock(165)::text COLLATE "C"',
    "SELECT * FROM JSON_TABLE(jsonb_build_array(pg_advisory_lock(166)::text), '$[*]' COLUMNS (x text PATH '$'))",
    "MERGE INTO ar_t USING (VALUES (1)) AS s(id) ON ar_t.id = s.id WHEN MATCHED AND pg_try_advisory_lock(167) "
    "THEN DO NOTHING",
    "DELETE FROM ar_t WHERE id = -1 OR pg_try_advisory_lock(168) IS NULL",
    "SELECT 1 INTO TEMP ar_tmp7 FROM ar_t",
    "WITH a AS (SELECT 1 AS x) SELECT x INTO TEMP ar_tmp8 FROM a",
]
# Marked by the classifier; the session may or may not end up changed.
EITHER_STATEMENTS = [
    "RESET ALL",
    "RESET work_mem",
    "DISCARD ALL",
    "DISCARD TEMP",
    "UNLISTEN *",
    "CLOSE ALL",
    "DEALLOCATE ALL",
    "SELECT pg_advisory_unlock_all()",
    "SELECT pg_advisory_unlock(1)",
    "SELECT setseed(0.5)",
    "SELECT ar_noop()",
    "SELECT public.lower('A')",
    "TRUNCATE ar_empty",
    "VACUUM ar_empty",
    "CREATE TABLE ar_perm_{n} (a int)",
    "SELEC 1",
    "SELECT 1/0",
    "SELECT * FROM ar_missing",
    "SET LOCAL work_mem = 'bogus'",
    "BEGIN; SET work_mem = '99kB'; SELECT 1/0; COMMIT",
    "SET LOCAL search_path TO pg_catalog",
    "SELECT set_config('search_path', 'pg_catalog', true)",
    "BEGIN; SET LOCAL ROLE {role}; COMMIT",
    "SELECT 1 INTO ar_perm_into_{n}",
    # Review h239: transaction-local role changes (neutral to the classifier).
    "BEGIN; SET LOCAL SESSION AUTHORIZATION {role}; COMMIT",
    "BEGIN; SELECT set_config('role', '{role}', true); COMMIT",
]


def corpus(role: str, schema: str) -> list[Case]:
    cases: list[Case] = []
    methods = itertools.cycle(["execute", "fetch", "fetchval", "fetchrow"])
    for template, expression in itertools.product(NEUTRAL_TEMPLATES, NEUTRAL_EXPRESSIONS):
        sql = template.format(e=expression)
        cases.append(Case(sql, "neutral", "execute" if ";" in sql else next(methods)))
    cases += [Case(sql, "neutral") for sql in NEUTRAL_STATEMENTS]
    for name, value in SETTINGS:
        cases.append(
            Case(f"BEGIN; SET LOCAL {name} = {value}; SELECT 1; COMMIT", "neutral")
            if name != "search_path"
            else Case(f"BEGIN; SET LOCAL {name} = {value}; COMMIT", "either")
        )
        cases.append(Case(f"SET {name} = {value}", "changes"))
        cases.append(Case(f"BEGIN; SET {name} = {value}; COMMIT", "changes"))
        cases.append(Case(f"SELECT set_config('{name}', {value}::text, false)", "changes", "fetchval"))
    cases += [Case(sql.format(role=role, schema=schema), "changes") for sql in CHANGING_STATEMENTS]
    cases += [Case(sql.format(role=role, n=uuid.uuid4().hex[:8]), "either") for sql in EITHER_STATEMENTS]
    # The COPY methods: the SQL the proxy sees is asyncpg's COPY statement.
    cases += [
        Case("SELECT id, lower(b) FROM ar_t", "neutral", "copy_from_query", {"output": io.BytesIO()}),
        Case("SELECT pg_advisory_lock(110)", "changes", "copy_from_query", {"output": io.BytesIO()}),
        Case("ar_empty", "neutral", "copy_records_to_table", {"records": [(1,)], "where": "a > 0"}),
        Case(
            "ar_empty",
            "changes",
            "copy_records_to_table",
            {"records": [(1,)], "where": "pg_try_advisory_lock(111) IS NOT NULL"},
        ),
        Case("ar_empty", "neutral", "copy_to_table", {"source": io.BytesIO(b"5\n")}),
        Case("ar_t", "neutral", "copy_from_table", {"output": io.BytesIO()}),
        Case("ar_t", "neutral", "copy_from_table", {"output": io.BytesIO(), "format": "csv", "header": True}),
        Case(
            "SELECT * FROM ar_t", "neutral", "copy_from_query", {"output": io.BytesIO(), "format": "csv", "null": "-"}
        ),
        # asyncpg inlines copy_from_query()'s arguments by replacing every $n
        # of the text, in string literals too: the server runs another text.
        Case(
            "SELECT $1::text AS v, '$1' AS w",
            "changes",
            "copy_from_query",
            {"output": io.BytesIO()},
            (", pg_advisory_lock(115) AS z, ",),
        ),
        # HEADER is pasted in unquoted; after a query ending in a -- comment
        # a line break in a quoted option ends the comment.
        Case(
            "ar_t",
            "changes",
            "copy_from_table",
            {"output": io.BytesIO(), "format": "csv", "header": "true); SELECT pg_advisory_lock(116); --"},
        ),
        Case(
            "ar_empty",
            "changes",
            "copy_to_table",
            {"source": io.BytesIO(b""), "format": "csv", "header": "true); SELECT pg_advisory_lock(117); --"},
        ),
        Case(
            "SELECT 1) TO STDOUT --",
            "changes",
            "copy_from_query",
            {"output": io.BytesIO(), "format": "csv", "null": "x\n; SELECT pg_advisory_lock(118); --"},
        ),
    ]
    return cases


# ------------------------------------------------------------------ fixtures


@dataclass
class Env:
    dsn: str
    schema: str
    role: str


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def env(pg_dsn: str) -> AsyncIterator[Env]:
    schema = f"ar_{uuid.uuid4().hex[:10]}"
    role = f"ar_role_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(pg_dsn)
    try:
        await admin.execute(f"""
            CREATE SCHEMA {schema};
            SET search_path = {schema};
            CREATE TABLE ar_t (id int PRIMARY KEY, a int, b text);
            INSERT INTO ar_t VALUES (1, 1, 'one'), (2, 2, 'two');
            CREATE TABLE ar_empty (a int);
            CREATE SEQUENCE ar_s;
            CREATE FUNCTION ar_set() RETURNS text LANGUAGE sql
                AS $$ SELECT set_config('ar.by_function', 'yes', false) $$;
            CREATE FUNCTION ar_noop() RETURNS int LANGUAGE sql AS 'SELECT 1';
            CREATE PROCEDURE ar_proc() LANGUAGE plpgsql
                AS $$ BEGIN PERFORM set_config('ar.by_procedure', 'yes', false); END $$;
            CREATE VIEW ar_v AS SELECT ar_set() AS v;
            CREATE FUNCTION ar_attr(ar_t) RETURNS text LANGUAGE sql
                AS $$ SELECT set_config('ar.by_function', 'attribute', false) $$;
            CREATE FUNCTION ar_op(int, int) RETURNS bool LANGUAGE sql
                AS $$ SELECT set_config('ar.by_function', 'operator', false) IS NOT NULL $$;
            CREATE OPERATOR === (LEFTARG = int, RIGHTARG = int, FUNCTION = ar_op);
            CREATE FUNCTION ar_cmp(int, int) RETURNS int LANGUAGE sql
                AS $$ SELECT btint4cmp($1, $2) + length(set_config('ar.by_function', 'compare', false)) * 0 $$;
            CREATE OPERATOR <<< (LEFTARG = int, RIGHTARG = int, FUNCTION = int4lt);
            CREATE OPERATOR <<<= (LEFTARG = int, RIGHTARG = int, FUNCTION = int4le);
            CREATE OPERATOR ==== (LEFTARG = int, RIGHTARG = int, FUNCTION = int4eq);
            CREATE OPERATOR >>>= (LEFTARG = int, RIGHTARG = int, FUNCTION = int4ge);
            CREATE OPERATOR >>> (LEFTARG = int, RIGHTARG = int, FUNCTION = int4gt);
            CREATE OPERATOR CLASS ar_ops FOR TYPE int USING btree AS OPERATOR 1 <<<, OPERATOR 2 <<<=,
                OPERATOR 3 ====, OPERATOR 4 >>>=, OPERATOR 5 >>>, FUNCTION 1 ar_cmp(int, int);
            CREATE TABLE ar_trig (a int);
            CREATE FUNCTION ar_trig_f() RETURNS trigger LANGUAGE plpgsql
                AS $$ BEGIN PERFORM pg_advisory_lock(4711); RETURN NEW; END $$;
            CREATE TRIGGER ar_trig_t BEFORE INSERT ON ar_trig FOR EACH ROW EXECUTE FUNCTION ar_trig_f();
            CREATE ROLE {role};
            GRANT {role} TO current_user;
            GRANT USAGE ON SCHEMA {schema} TO {role};
            GRANT SELECT ON ALL TABLES IN SCHEMA {schema} TO {role};
        """)
        yield Env(pg_dsn, schema, role)
    finally:
        await admin.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE; DROP ROLE IF EXISTS {role}")
        await admin.close()


async def _connect(env: Env) -> asyncpg.Connection:
    # No statement cache: DISCARD ALL in the corpus must not break asyncpg's
    # own statements; the search_path is a connection parameter (source
    # 'client'), not a session change.
    return await asyncpg.connect(
        env.dsn, statement_cache_size=0, server_settings={"search_path": f"{env.schema}, public"}
    )


async def _fingerprint(con: asyncpg.Connection) -> dict[str, Any]:
    return dict(await con.fetchrow(FINGERPRINT))


async def _run(con: asyncpg.Connection, case: Case) -> Outcome:
    holder = StubHolder()
    proxy = AutoResetProxy(holder, con, object())  # type: ignore[arg-type]
    before = await _fingerprint(con)
    error: str | None = None
    try:
        if case.method in ("copy_records_to_table", "copy_to_table", "copy_from_table"):
            await getattr(proxy, case.method)(case.sql, **case.kwargs)
        elif case.method == "copy_from_query":
            await proxy.copy_from_query(case.sql, *case.args, **case.kwargs)
        else:
            await getattr(proxy, case.method)(case.sql)
    except (asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        error = f"{type(exc).__name__}: {exc}"
    finally:
        proxy._detach()
    if con.is_in_transaction():
        await con.execute("ROLLBACK")  # what the pool does for an unmarked lease
    after = await _fingerprint(con)
    changed = [key for key in before if before[key] != after[key]]
    return Outcome(case, holder.clean_mark == -1, changed, error)


# ------------------------------------------------------------------ tests


async def test_no_unmarked_statement_changes_the_session(env: Env) -> None:
    cases = corpus(env.role, env.schema)
    outcomes: list[Outcome] = []
    con = await _connect(env)
    try:
        for case in cases:
            outcome = await _run(con, case)
            outcomes.append(outcome)
            if outcome.marked or outcome.changed:
                await con.close()  # a fresh session for the next statement
                con = await _connect(env)
    finally:
        await con.close()

    leaks = [(o.case.sql, o.changed) for o in outcomes if not o.marked and o.changed]
    assert not leaks, f"unmarked statements changed the session: {leaks}"

    changing = [o for o in outcomes if o.case.expect == "changes"]
    assert len(changing) >= 60
    not_changed = [(o.case.sql, o.error) for o in changing if not o.changed]
    assert not not_changed, f"corpus statements expected to change the session did not: {not_changed}"
    assert all(o.marked for o in changing)

    neutral = [o for o in outcomes if o.case.expect == "neutral"]
    wrongly_marked = [o.case.sql for o in neutral if o.marked]
    assert not wrongly_marked, f"neutral statements marked: {wrongly_marked}"
    neutral_errors = [(o.case.sql, o.error) for o in neutral if o.error]
    assert not neutral_errors, f"neutral corpus statements failed on the server: {neutral_errors}"

    assert len(outcomes) >= 300
    marked = [o for o in outcomes if o.marked]
    print(
        f"\nauto-reset differential: {len(outcomes)} statements, {len(outcomes) - len(marked)} unmarked "
        f"(all left the session unchanged), {len(marked)} marked ({sum(1 for o in marked if o.changed)} "
        f"changed the session, {sum(1 for o in marked if not o.changed)} did not), "
        f"{sum(1 for o in outcomes if o.error)} failed on the server; {len(changing)} written to change it "
        f"(all marked), {len(neutral)} written to be neutral (none marked)"
    )


async def test_blind_spots_are_real(env: Env) -> None:
    """What docs/reset-modes.md says the classifier cannot see: a view whose
    definition calls a session-changing function, a trigger, and a user
    function called in attribute notation (ar_t.ar_attr is ar_attr(ar_t)).
    All are neutral to the classifier and all change the session."""
    for case, changed in (
        (Case("SELECT * FROM ar_v", "either", "fetch"), ["custom_settings"]),
        (Case("INSERT INTO ar_trig VALUES (1)", "either"), ["advisory_locks"]),
        (Case("SELECT ar_t.ar_attr FROM ar_t", "either", "fetch"), ["custom_settings"]),
    ):
        con = await _connect(env)
        try:
            outcome = await _run(con, case)
            assert not outcome.marked and outcome.changed == changed, case.sql
        finally:
            await con.close()


async def test_allowlists_name_built_ins(env: Env) -> None:
    con = await _connect(env)
    try:
        if con.get_server_version().major < 18:
            pytest.skip("the allowlists name functions of PostgreSQL 18")
        functions = await con.fetch(
            "SELECT DISTINCT proname FROM pg_proc WHERE pronamespace = 'pg_catalog'::regnamespace "
            "AND proname = ANY($1::text[])",
            sorted(_autoreset._NEUTRAL_FUNCTIONS),
        )
        assert {r[0] for r in functions} == set(_autoreset._NEUTRAL_FUNCTIONS)
        # Attribute notation calls a one-argument function with no call in
        # the text: every volatile one off the allowlist must be caught.
        volatile = await con.fetch(
            "SELECT DISTINCT proname FROM pg_proc WHERE pronamespace = 'pg_catalog'::regnamespace "
            "AND provolatile = 'v' AND prokind = 'f' AND pronargs >= 1 AND pronargs - pronargdefaults <= 1 "
            "AND proargtypes[0] <> 'internal'::regtype"
        )
        uncaught = [
            r[0]
            for r in volatile
            if r[0] not in _autoreset._NEUTRAL_FUNCTIONS
            and _autoreset._field_reason({"String": {"sval": r[0]}}) is None
        ]
        assert not uncaught
        operators = await con.fetch(
            "SELECT DISTINCT oprname FROM pg_operator WHERE oprnamespace = 'pg_catalog'::regnamespace"
        )
        assert {r[0] for r in operators} == set(_autoreset._BUILTIN_OPERATORS)
    finally:
        await con.close()
