"""Review h239: reset_mode="auto", statements the classifier calls neutral
that leave session state to the next lease.

Two routes the list "What auto mode cannot see" (docs/reset-modes.md) does
not name:

* A user **operator class** called through a built-in: a range type whose
  ``subtype_opclass`` has a SQL comparison function. Range input (a cast, a
  literal for a range column, ``pg_input_is_valid``, ``jsonb_populate_record``),
  ``ORDER BY`` the range column, and the built-in operator ``@>`` all call
  that function. The statement text names no user function, operator or
  cast (the docs list "user-defined casts and operators", and domains). The
  same holds for any user base type's default btree/hash operator class
  (ORDER BY, GROUP BY, IN, array_position...), which needs a superuser to
  create the type; the range type needs none.
* **Contrib modules' GUC setters** in attribute notation: pg_trgm's
  ``(0.4::real).set_limit`` sets ``pg_trgm.similarity_threshold``, isn's
  ``(true).isn_weak`` sets ``isn.weak``, both at session level. The docs say
  extension functions called as fields are not caught "other than
  dblink's"; these two are GUC setters of modules shipped with PostgreSQL
  (a scan of all 43 contrib modules of PostgreSQL 18 found no other
  session-changing one-argument volatile function off the pg_/lo_/dblink
  prefixes), as cheap to name in ``_FIELD_CALL_NAMES``
  (safepool/_autoreset.py) as dblink's prefix.

Each is checked on a real pool: the next lease saw the setting under
"auto", and not under "full" (asyncpg's RESET ALL clears it). The first is
documented as a blind spot (the classifier reads no catalog) and pinned as
one; the second was fixed in s73 (both names in ``_FIELD_CALL_NAMES``).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest
import pytest_asyncio

import safepool

pytest.importorskip("pglast", reason="pip install -e '.[test]' installs the auto extra")

pytestmark = pytest.mark.asyncio(loop_scope="module")

RANGE_STATEMENTS = [
    "SELECT '[1,2)'::h239_range",
    "SELECT r FROM h239_rt ORDER BY r",
    "SELECT count(*) FROM h239_rt WHERE r @> 2",
    "SELECT pg_input_is_valid('[1,2)', 'h239_range')",
    """SELECT jsonb_populate_record(NULL::h239_rt, '{"r": "[1,3)"}')""",
    "INSERT INTO h239_rt VALUES ('[7,9)')",
]
FLAG = "SELECT coalesce(current_setting('h239.flag', true), '')"


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def schema(pg_dsn: str) -> AsyncIterator[str]:
    name = f"h239_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(pg_dsn)
    try:
        await admin.execute(f"""
            CREATE SCHEMA {name};
            SET search_path = {name};
            CREATE FUNCTION h239_cmp(int, int) RETURNS int LANGUAGE sql
                AS $$ SELECT btint4cmp($1, $2) + length(set_config('h239.flag', 'cmp', false)) * 0 $$;
            CREATE OPERATOR <<< (LEFTARG = int, RIGHTARG = int, FUNCTION = int4lt);
            CREATE OPERATOR <<<= (LEFTARG = int, RIGHTARG = int, FUNCTION = int4le);
            CREATE OPERATOR ==== (LEFTARG = int, RIGHTARG = int, FUNCTION = int4eq);
            CREATE OPERATOR >>>= (LEFTARG = int, RIGHTARG = int, FUNCTION = int4ge);
            CREATE OPERATOR >>> (LEFTARG = int, RIGHTARG = int, FUNCTION = int4gt);
            CREATE OPERATOR CLASS h239_ops FOR TYPE int USING btree AS OPERATOR 1 <<<, OPERATOR 2 <<<=,
                OPERATOR 3 ====, OPERATOR 4 >>>=, OPERATOR 5 >>>, FUNCTION 1 h239_cmp(int, int);
            CREATE TYPE h239_range AS RANGE (subtype = int4, subtype_opclass = h239_ops);
            CREATE TABLE h239_rt (r h239_range);
            INSERT INTO h239_rt VALUES ('[1,5)'), ('[2,3)');
        """)
        yield name
    finally:
        await admin.execute(f"DROP SCHEMA IF EXISTS {name} CASCADE")
        await admin.close()


async def _next_lease_sees(pg_dsn: str, schema: str, mode: str, statement: str, probe: str) -> Any:
    pool = await safepool.create_pool(
        pg_dsn, min_size=1, max_size=1, reset_mode=mode, server_settings={"search_path": f"{schema}, public"}
    )
    try:
        async with pool.acquire():
            pass  # the first lease of a connection always resets: spend it
        async with pool.acquire() as con:
            # execute(): the simple protocol, no result types for asyncpg to
            # introspect (an introspection would mark the lease by itself).
            await con.execute(statement)
        async with pool.acquire() as con:
            return await con.fetchval(probe)
    finally:
        await asyncio.wait_for(pool.close(), 10)


@pytest.mark.parametrize("statement", RANGE_STATEMENTS)
async def test_range_subtype_opclass_is_reset_by_full_mode(pg_dsn: str, schema: str, statement: str) -> None:
    assert await _next_lease_sees(pg_dsn, schema, "full", statement, FLAG) == ""


@pytest.mark.parametrize("statement", RANGE_STATEMENTS)
async def test_range_subtype_opclass_is_a_blind_spot_of_auto_mode(pg_dsn: str, schema: str, statement: str) -> None:
    """Documented (docs/reset-modes.md, "What auto mode cannot see":
    operator classes): the text names no user function, and the classifier
    reads no catalog. Pinned so the docs' claim stays checked on a real
    server: the next lease sees the setting under auto."""
    assert await _next_lease_sees(pg_dsn, schema, "auto", statement, FLAG) == "cmp"


# Contrib modules' GUC setters of one argument, callable as a field:
# (extension, statement, probe, the setting's default).
EXTENSION_FIELDS = [
    ("pg_trgm", "SELECT (0.4::real).set_limit", "SELECT current_setting('pg_trgm.similarity_threshold')", "0.3"),
    ("isn", "SELECT (true).isn_weak", "SELECT current_setting('isn.weak')", "off"),
]


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def extension_schemas(pg_dsn: str) -> AsyncIterator[dict[str, str]]:
    """A schema per contrib module of EXTENSION_FIELDS that this server has
    and this database does not have yet (created, then dropped)."""
    admin = await asyncpg.connect(pg_dsn)
    schemas: dict[str, str] = {}
    try:
        for extension, *_ in EXTENSION_FIELDS:
            installed = await admin.fetchval("SELECT count(*) FROM pg_extension WHERE extname = $1", extension)
            available = await admin.fetchval("SELECT count(*) FROM pg_available_extensions WHERE name = $1", extension)
            if installed or not available:
                continue
            name = f"h239{extension}_{uuid.uuid4().hex[:8]}"
            await admin.execute(f"CREATE SCHEMA {name}; CREATE EXTENSION {extension} SCHEMA {name}")
            schemas[extension] = name
        yield schemas
    finally:
        for extension, name in schemas.items():
            await admin.execute(f"DROP EXTENSION IF EXISTS {extension}; DROP SCHEMA IF EXISTS {name} CASCADE")
        await admin.close()


def _schema_of(schemas: dict[str, str], extension: str) -> str:
    if extension not in schemas:
        pytest.skip(f"{extension} is not available, or installed in this database already (its schema unknown)")
    return schemas[extension]


@pytest.mark.parametrize(("extension", "statement", "probe", "default"), EXTENSION_FIELDS)
async def test_contrib_guc_setter_as_a_field_is_reset_by_full_mode(
    pg_dsn: str, extension_schemas: dict[str, str], extension: str, statement: str, probe: str, default: str
) -> None:
    schema = _schema_of(extension_schemas, extension)
    assert await _next_lease_sees(pg_dsn, schema, "full", statement, probe) == default


@pytest.mark.parametrize(("extension", "statement", "probe", "default"), EXTENSION_FIELDS)
async def test_contrib_guc_setter_as_a_field_is_reset_by_auto_mode(
    pg_dsn: str, extension_schemas: dict[str, str], extension: str, statement: str, probe: str, default: str
) -> None:
    schema = _schema_of(extension_schemas, extension)
    assert await _next_lease_sees(pg_dsn, schema, "auto", statement, probe) == default
