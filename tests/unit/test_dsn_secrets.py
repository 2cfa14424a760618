"""A DSN's password found in malformed URI DSNs that asyncpg misreads (the
security review's leaks, tests/integration/test_secrets_review.py, on a
real server): a scheme written without "//" (the userinfo becomes the
database's name) and a DSN without "@" (the password becomes a port)."""

from __future__ import annotations

import pytest

from safepool._secrets import mask_dsn, passwords, redact, scrub_quoted

PW = "S3cr3t-pw"

MISREAD = [
    f"postgresql:/app:{PW}@db.example/orders",
    f"postgresql:app:{PW}@db.example/orders",
    f"postgres:/app:{PW}@db.example/orders",
    f"POSTGRESQL:/app:{PW}@db.example/orders",
    f"postgresql://app:{PW}/orders",
    f"postgresql://app:{PW}",
    f"postgresql://app:{PW},replica:5433/orders",
    f"postgresql://[::1]:{PW}/orders",
]


@pytest.mark.parametrize("dsn", MISREAD)
def test_a_misread_dsns_password_is_known_and_masked(dsn: str) -> None:
    assert PW in passwords(dsn)
    assert PW not in mask_dsn(dsn)
    # What asyncpg and the server quote of it: a port, a database name.
    assert PW not in scrub_quoted(f"invalid literal for int() with base 10: '{PW}'", dsn)
    database = dsn.partition(":")[2].lstrip("/")
    assert PW not in scrub_quoted(f'database "{database}" does not exist', dsn)
    assert PW not in redact(f'database "{database}" does not exist', dsn)


@pytest.mark.parametrize("dsn", [
    "postgresql://db.example:5432/orders",
    "postgresql://db.example:5432,replica:5433/orders",
    "postgresql://[::1]:5432/orders",
    "postgresql:///orders?host=/tmp",
    "postgres://app@db.example/orders",
])
def test_a_dsn_without_a_password_shows_as_given(dsn: str) -> None:
    assert passwords(dsn) == set()
    assert mask_dsn(dsn) == dsn
    assert redact(f"could not connect: {dsn}", dsn) == f"could not connect: {dsn}"


def test_a_port_is_not_mistaken_for_a_password_beside_a_misread_one() -> None:
    dsn = f"postgresql://app:{PW},replica:5433/orders"
    assert passwords(dsn) == {PW}
    assert mask_dsn(dsn) == "postgresql://app:***,replica:5433/orders"


@pytest.mark.parametrize(("query", "shown"), [
    ("ALTER ROLE app PASSWORD 'se''cret' LOGIN", "ALTER ROLE app PASSWORD '***' LOGIN"),
    ("create user app with encrypted password E'a\\'b' valid until 'infinity'",
     "create user app with encrypted password '***' valid until 'infinity'"),
    ("ALTER ROLE app PASSWORD $pw$se'cret$pw$ LOGIN", "ALTER ROLE app PASSWORD '***' LOGIN"),
    ("ALTER ROLE app\n  PASSWORD 'cut off by the activity query limit", "ALTER ROLE app PASSWORD '***'"),
    ("ALTER ROLE app PASSWORD NULL", "ALTER ROLE app PASSWORD NULL"),
    ("SELECT 'password' AS word", "SELECT 'password' AS word"),
])
def test_top_shows_a_roles_ddl_without_its_password(query: str, shown: str) -> None:
    from safepool.top.snapshot import _one_line

    assert _one_line(query, 200) == shown


# ------------------------------------------------- review of the change (helper-164)
#
# asyncpg 0.32's reading of each DSN below was checked with
# asyncpg.connect_utils._parse_connect_dsn_and_args, and the server's answer
# on the dev server (tests/integration/test_secrets_review.py drives the pool).


def _server_error(database: str) -> str:
    return f'database "{database}" does not exist'


# Misread DSNs the change covers or that were covered before: what asyncpg
# or the server quotes of them is masked.
@pytest.mark.parametrize(("dsn", "quoted"), [
    # Three or four slashes: the userinfo is the database's name ("/app:...").
    (f"postgresql:///app:{PW}@db.example/orders", _server_error(f"app:{PW}@db.example/orders")),
    (f"postgresql:////app:{PW}@db.example/orders", _server_error(f"/app:{PW}@db.example/orders")),
    # A backslash for a slash: the same.
    (f"postgresql:\\\\app:{PW}@db.example/orders", _server_error(f"\\\\app:{PW}@db.example/orders")),
    (f"postgresql:/\\app:{PW}@db.example/orders", _server_error(f"\\app:{PW}@db.example/orders")),
    # No "//" and no "@": the database "app:pw/orders".
    (f"postgresql:app:{PW}/orders", _server_error(f"app:{PW}/orders")),
    (f"postgresql:/app:{PW}/orders", _server_error(f"app:{PW}/orders")),
    # No "@" in the authority, one in the query: the password is the port.
    (f"postgresql://app:{PW}/orders?application_name=a@b", f"invalid literal for int() with base 10: '{PW}'"),
    # A scheme without "//" and a trailing space (kept in the database name).
    (f"postgresql:/app:{PW}@db.example/orders ", _server_error(f"app:{PW}@db.example/orders ")),
])
def test_other_misread_dsns_are_masked(dsn: str, quoted: str) -> None:
    assert PW not in redact(scrub_quoted(quoted, dsn), dsn)
    assert PW not in mask_dsn(dsn)


@pytest.mark.parametrize("dsn", [
    f" postgresql:/app:{PW}@db.example/orders",
    f"\tpostgresql:/app:{PW}@db.example/orders",
    f"\npostgres:app:{PW}@db.example/orders",
    f"postgre\tsql:/app:{PW}@db.example/orders",
])
def test_a_scheme_without_slashes_after_a_blank_is_masked(dsn: str) -> None:
    quoted = _server_error(f"app:{PW}@db.example/orders")
    assert PW not in redact(scrub_quoted(quoted, dsn), dsn)
    assert PW not in mask_dsn(dsn)


@pytest.mark.parametrize("dsn", [f"postgresql:///app:{PW}/orders", f"postgresql:////app:{PW}/orders",
                                 f"postgres:///app:{PW}"])
def test_three_slashes_without_an_at_sign_are_masked(dsn: str) -> None:
    database = dsn.partition(":///")[2]
    assert PW not in redact(scrub_quoted(_server_error(database), dsn), dsn)
    assert PW not in mask_dsn(dsn)


# Valid DSNs: errors quoting their host, port, database or user stay as they are.
@pytest.mark.parametrize(("dsn", "text"), [
    ("postgresql://h1:5432,h2:5433/orders", "Multiple exceptions: Connect call failed ('h2', 5433)"),
    ("postgresql://h1,h2:5433/orders", "[Errno -2] Name or service not known: 'h1'"),
    ("postgresql://[::1]:5432/orders", "Connect call failed ('::1', 5432, 0, 0)"),
    ("postgresql://user1@[fe80::1%25eth0]:5432/orders", 'role "user1" does not exist'),
    ("postgresql:///orders?host=/tmp", "[Errno 2] No such file or directory: '/tmp/.s.PGSQL.5432'"),
    ("postgresql://%2Ftmp/orders", _server_error("orders")),
    ("postgres:///orders", _server_error("orders")),
    ("POSTGRESQL://app:pw123456@db.example/orders", 'password authentication failed for user "app"'),
    ("postgresql:///orders?service=prod", 'definition of service "prod" not found'),
    ("postgresql://failed:5432/authentication", _server_error("authentication")),
    ("postgresql://app:secretpw@exist/does", _server_error("does")),
    ("postgresql://db.example/orders?application_name=w@n1", _server_error("orders")),
])
def test_a_valid_dsns_error_is_not_masked(dsn: str, text: str) -> None:
    assert redact(scrub_quoted(text, dsn), dsn) == text


def test_an_at_sign_in_the_query_of_a_dsn_with_a_port_masks_nothing() -> None:
    dsn = "postgresql://db.example:5432/orders?application_name=w@n1"
    assert redact(scrub_quoted(_server_error("orders"), dsn), dsn) == _server_error("orders")
    assert mask_dsn(dsn) == dsn


def test_mask_dsn_keeps_a_keyword_dsns_other_fields() -> None:
    assert mask_dsn("host=db password=pw1234 dbname=orders") == "host=db password=*** dbname=orders"


@pytest.mark.parametrize("dsn", ["postgresql:/app:pw1234@db.example/orders", "postgres:app:pw1234@db.example/x"])
def test_mask_dsn_keeps_a_scheme_as_written(dsn: str) -> None:
    assert mask_dsn(dsn) == dsn.replace("pw1234", "***")


@pytest.mark.parametrize("dsn", ["postgresql:db.example/orders", f"postgresql:/app:{PW}@db.example/orders"])
def test_describe_target_does_not_name_a_host_asyncpg_did_not_read(dsn: str) -> None:
    from safepool.top.cli import describe_target

    assert "db.example" not in describe_target(dsn)


# check's findings quote the pool expression: ordinary code stays as written.
_CHECKED = """\
import safepool


async def a():
    con = await (await safepool.create_pool("postgresql://app@db/x")).acquire()
    return await con.fetchval("SELECT 1")


async def b(user, host):
    con = await (await safepool.create_pool(f"postgresql://{user}@{host}:5432/x")).acquire()
    return await con.fetchval("SELECT 1")


async def c(dsn, password_hint):
    con = await (await safepool.create_pool(dsn, password_hint=password_hint)).acquire()
    return await con.fetchval("SELECT 1")
"""


def test_check_findings_show_ordinary_pool_expressions_as_written() -> None:
    from safepool.check import check_source

    shown = " ".join(f.message + " " + f.hint for f in check_source(_CHECKED))
    for expression in ("create_pool('postgresql://app@db/x')", "create_pool(f'postgresql://{user}@{host}:5432/x')",
                       "create_pool(dsn, password_hint=password_hint)"):
        assert expression in shown
    assert "***" not in shown


@pytest.mark.parametrize("value", ["settings.db_password", 'os.environ["DB_PASSWORD"]', "get_secret()"])
def test_check_findings_keep_a_password_keyword_whose_value_is_code(value: str) -> None:
    from safepool.check import check_source

    source = (
        "import safepool\n\n\nasync def f(dsn, settings, os, get_secret):\n"
        f"    con = await (await safepool.create_pool(dsn, password={value})).acquire()\n"
        "    return await con.fetchval('SELECT 1')\n"
    )
    [finding] = check_source(source)
    assert "***" not in finding.message + finding.hint


def test_check_findings_keep_a_port_and_query_with_an_at_sign() -> None:
    from safepool.check import check_source

    dsn = "postgresql://pg.example.com:5432/db?user=app@pgsrv&sslmode=require"
    source = (
        "import safepool\n\n\nasync def f():\n"
        f"    con = await (await safepool.create_pool('{dsn}')).acquire()\n"
        "    return await con.fetchval('SELECT 1')\n"
    )
    [finding] = check_source(source)
    assert dsn in finding.message + finding.hint


# top --show-queries: ordinary SQL with the word PASSWORD stays as it is.
@pytest.mark.parametrize("query", [
    "SELECT password FROM users WHERE id = $1",
    "UPDATE users SET password = $1 WHERE id = $2",
    "SELECT * FROM t WHERE note = 'forgot password' AND code = 'ABC'",
    "INSERT INTO audit(msg) VALUES ('changed password'), ('other value')",
    "/* check password */ SELECT 'keep me'",
    "COMMENT ON COLUMN users.password IS 'password hash (bcrypt)'",
    "ALTER ROLE \"PASSWORD\" LOGIN",
    "SELECT check_password('x')",
    "-- rotate the password\nSELECT 'keep me' FROM t",
])
def test_top_shows_ordinary_sql_with_the_word_password(query: str) -> None:
    from safepool.top.snapshot import _one_line

    assert _one_line(query, 300) == " ".join(query.split())


@pytest.mark.parametrize(("query", "shown"), [
    ("CREATE ROLE x ENCRYPTED PASSWORD 'SCRAM-SHA-256$4096:abc$def:ghi' LOGIN",
     "CREATE ROLE x ENCRYPTED PASSWORD '***' LOGIN"),
    ("ALTER ROLE app PASSWORD\t'Zq9secretX'", "ALTER ROLE app PASSWORD '***'"),
    ("CREATE USER MAPPING FOR app SERVER s OPTIONS (user 'u', password 'Zq9secretX')",
     "CREATE USER MAPPING FOR app SERVER s OPTIONS (user 'u', password '***')"),
])
def test_top_masks_other_password_literals(query: str, shown: str) -> None:
    from safepool.top.snapshot import _one_line

    assert _one_line(query, 300) == shown


@pytest.mark.parametrize("query", [
    "SELECT 'Enter your password ' || name, 'x' AS hint FROM users",
    "COMMENT ON COLUMN users.pw IS 'the password ' 'continued'",
    "SELECT $$reset password $$ || name FROM users",
])
def test_top_does_not_mask_sql_after_the_word_password_in_a_literal(query: str) -> None:
    from safepool.top.snapshot import _one_line

    assert _one_line(query, 300) == " ".join(query.split())


@pytest.mark.parametrize("query", [
    "ALTER ROLE app PASSWORD'Zq9secretX'",
    "ALTER ROLE app PASSWORD U&'Zq9secretX'",
    "ALTER ROLE app PASSWORD /* rotated */ 'Zq9secretX'",
    "ALTER ROLE app PASSWORD -- rotated\n 'Zq9secretX'",
    "ALTER ROLE app PASSWORD 'Zq9sec'\n'retX'",
    "ALTER ROLE app PASSWORD $$Zq9secretX$$",
    "ALTER ROLE app PASSWORD $tag$Zq9secretX$tag$ LOGIN",
    "ALTER ROLE app PASSWORD E'Zq9\\'secretX'",
    "ALTER ROLE app PASSWORD 'Zq9''secretX'",
    "ALTER ROLE app PASSWORD\x0b'Zq9secretX'",
    "ALTER ROLE app PASSWORD\x0c'Zq9secretX'",
    "ALTER ROLE app PASSWORD 'Zq9sec' -- c\n'retX'",
    "ALTER ROLE app PASSWORD 'Zq9sec'\n-- c\n'retX'",
    "ALTER ROLE app PASSWORD 'Zq9sec'\n\r\n'retX'",
    # Cut off by left(query, N).
    "ALTER ROLE app PASSWORD 'Zq9secretX",
    "ALTER ROLE app PASSWORD $$Zq9secretX",
    "ALTER ROLE app PASSWORD E'Zq9\\'secretX",
])
def test_top_masks_every_spelling_of_a_role_password(query: str) -> None:
    from safepool.top.snapshot import _one_line

    shown = _one_line(query, 300)
    assert "Zq9" not in shown and "secretX" not in shown and "retX" not in shown


@pytest.mark.parametrize("query", [
    "CREATE SUBSCRIPTION s CONNECTION 'host=h password=Zq9secretX dbname=d' PUBLICATION p",
    "SELECT dblink_connect('host=h user=u password=Zq9secretX')",
    "SELECT * FROM dblink('postgresql://u:Zq9secretX@h/d', 'select 1') AS t(x int)",
])
def test_top_masks_a_connection_strings_password(query: str) -> None:
    from safepool.top.snapshot import _one_line

    assert "Zq9secretX" not in _one_line(query, 300)


# _mask_secrets, statements PostgreSQL 18 accepts (checked in a rolled-back
# transaction) whose password still shows.
def test_top_masks_a_password_after_a_literal_ending_in_a_backslash() -> None:
    from safepool.top.snapshot import _one_line

    assert "Zq9secretX" not in _one_line("SELECT '\\'; ALTER ROLE app PASSWORD 'Zq9secretX'", 300)


def test_top_masks_a_password_after_a_nested_comment() -> None:
    from safepool.top.snapshot import _one_line

    assert "Zq9secretX" not in _one_line("/* /* */ 'a */ ALTER ROLE app PASSWORD 'Zq9secretX'", 300)


def test_top_masks_a_password_after_a_comment_ended_by_a_carriage_return() -> None:
    from safepool.top.snapshot import _one_line

    assert "Zq9secretX" not in _one_line("ALTER ROLE app PASSWORD -- rotated\r'Zq9secretX'", 300)


def test_top_masks_a_password_literal_continued_after_a_carriage_return() -> None:
    from safepool.top.snapshot import _one_line

    assert "retX" not in _one_line("ALTER ROLE app PASSWORD 'Zq9sec'\r'retX'", 300)


def test_top_masks_a_password_in_a_dollar_quote_with_a_non_ascii_tag() -> None:
    from safepool.top.snapshot import _one_line

    assert "Zq9secretX" not in _one_line("ALTER ROLE app PASSWORD $é$Zq9secretX$é$", 300)


def test_top_masks_a_user_mappings_quoted_password_option() -> None:
    from safepool.top.snapshot import _one_line

    query = "CREATE USER MAPPING FOR app SERVER s OPTIONS (user 'u', \"password\" 'Zq9secretX')"
    assert "Zq9secretX" not in _one_line(query, 300)


@pytest.mark.parametrize("query", ["ALTER ROLE app PASSWORD 'Zq9secretX\\", "ALTER ROLE app PASSWORD E'Zq9secretX\\"])
def test_top_masks_a_password_cut_off_after_a_backslash(query: str) -> None:
    from safepool.top.snapshot import _one_line

    assert "Zq9secretX" not in _one_line(query, 300)


@pytest.mark.parametrize("query", [
    "SELECT dblink_connect('host=h user=u password = Zq9secretX')",
    "SELECT dblink_connect('host=h password=''Zq9 secretX'' dbname=d')",
])
def test_top_masks_a_connection_strings_spaced_or_quoted_password(query: str) -> None:
    from safepool.top.snapshot import _one_line

    assert "secretX" not in _one_line(query, 300)


def test_top_shows_literals_after_one_ending_in_a_backslash() -> None:
    from safepool.top.snapshot import _one_line

    query = "SELECT 'C:\\', 'reset password', 'keep me'"
    assert _one_line(query, 300) == query


def test_top_masks_a_long_run_of_escaped_quotes_in_linear_time() -> None:
    import time

    from safepool.top.snapshot import _one_line

    query = "'" + "\\'" * 10_000 + "\\"
    start = time.perf_counter()
    _one_line(query, 80)
    assert time.perf_counter() - start < 1.0  # (linear: ~0.01 s; quadratic: ~2 s)


def test_top_masks_a_literal_of_many_uri_starts_in_linear_time() -> None:
    import time

    from safepool.top.snapshot import _one_line

    query = "SELECT '" + "://a:" * 20_000 + "'"
    start = time.perf_counter()
    _one_line(query, 80)
    assert time.perf_counter() - start < 1.0  # (linear: ~0.02 s; quadratic: ~2 s)


@pytest.mark.parametrize(("query", "shown"), [
    ("ALTER ROLE app PASSWORD 'Zq9secretX' VALID UNTIL 'infinity'",
     "ALTER ROLE app PASSWORD '***' VALID UNTIL 'infinity'"),
    ("SELECT $1, $2 FROM users WHERE password = $3 AND note = 'it''s'",
     "SELECT $1, $2 FROM users WHERE password = $3 AND note = 'it''s'"),
    ("ALTER ROLE app PASSWORD NULL", "ALTER ROLE app PASSWORD NULL"),
    ("ALTER ROLE app PASSWORD /* cut off", "ALTER ROLE app PASSWORD /* cut off"),
])
def test_top_masks_only_the_password_literal(query: str, shown: str) -> None:
    from safepool.top.snapshot import _one_line

    assert _one_line(query, 300) == shown


# s65: a password of letters alone, shorter than 12, is not masked where it
# stands as a bare word (it is a word of the message there); inside a DSN,
# a password= field or quotes it is; longer ones and others are masked bare.
@pytest.mark.parametrize(("password", "text", "expected"), [
    ("failed", "Connect call failed ('127.0.0.1', 5)", "Connect call failed ('127.0.0.1', 5)"),
    ("password", 'password authentication failed for user "app"', 'password authentication failed for user "app"'),
    ("password", "cannot reach postgresql://app:password@db/x", "cannot reach postgresql://app:***@db/x"),
    ("secret", "bad query field: 'secret'", "bad query field: '***'"),
    ("correcthorsebattery", "rejected correcthorsebattery", "rejected ***"),
    ("hunter22", "rejected hunter22 for app", "rejected *** for app"),
])
def test_a_word_password_is_masked_only_where_it_cannot_be_a_word(password: str, text: str, expected: str) -> None:
    from safepool import _secrets

    error = RuntimeError(text)
    _secrets.scrub_connect_error(error, f"postgresql://app:{password}@db/x")
    assert str(error) == expected
    if "'" not in text:  # (the CLI's redact() masks no quoted piece: it has no connect error's quotes to read)
        assert _secrets.redact(text, f"postgresql://app:{password}@db/x") == expected


def test_a_password_argument_equal_to_a_word_is_left_in_a_message() -> None:
    from safepool import _secrets

    error = RuntimeError('password authentication failed for user "app"')
    _secrets.scrub_connect_error(error, "postgresql://app@db/x", "password", ["app"])
    assert str(error) == 'password authentication failed for user "app"'
    error = RuntimeError("the password Tr0ub4dor& was refused")
    _secrets.scrub_connect_error(error, "postgresql://app@db/x", "Tr0ub4dor&", ["app"])
    assert str(error) == "the password *** was refused"


def test_an_error_that_refuses_the_scrub_is_left_as_it_is() -> None:
    from safepool import _secrets

    class Frozen(Exception):
        def __setattr__(self, name: str, value: object) -> None:
            raise AttributeError(f"{name} is read-only")

    error = Frozen("cannot reach postgresql://app:Tr0ub4dor&@db/x")
    _secrets.scrub_connect_error(error, "postgresql://app:Tr0ub4dor&@db/x")  # (no error of its own)
    assert error.args == ("cannot reach postgresql://app:Tr0ub4dor&@db/x",)


def test_a_hooks_error_keeps_a_short_quoted_value_that_a_connect_error_would_lose() -> None:
    # CI run 179: a setup= hook's server error quoted one letter of the password ("Z" only there in the
    # DSN) and the pre-existing quoted-piece rule masked it. A hook's error has no misparsed DSN pieces:
    # scrubbed with quoted=False, only the DSN and the password themselves are masked.
    from safepool import _secrets

    dsn = "postgresql://app:Zq9dW7xK@db.example/orders"
    hook_error = RuntimeError('invalid input syntax for type integer: "Z" (on postgresql://app:Zq9dW7xK@db.example/orders)')
    _secrets.scrub_connect_error(hook_error, dsn, quoted=False)
    assert str(hook_error) == 'invalid input syntax for type integer: "Z" (on postgresql://app:***@db.example/orders)'
    connect_error = ValueError("invalid literal for int() with base 10: 'Z'")
    _secrets.scrub_connect_error(connect_error, dsn)
    assert str(connect_error) == "invalid literal for int() with base 10: '***'"  # (a connect's own error: as before)
