"""`python -m safepool top --show-queries` and a connection string's quoted
password in a dollar-quoted or escape string (helper-218, a fresh user's
review).

`top --help` says "connection strings' passwords are masked", and
test_dsn_secrets pins a quoted value inside a standard literal, where SQL
doubles the quotes (`'host=h password=''Zq9 secretX'''`). libpq quotes a
value holding a space with single quotes (`password='Zq9 secretX'`); written
inside a dollar quote (`dblink_connect($$host=h password='...'$$)`, `CREATE
SUBSCRIPTION s CONNECTION $$...$$`) the quotes stay single, and in an escape
string they are backslash-escaped (`E'... password=\\'...\\''`). There
safepool/top/snapshot.py's _CONNINFO_PASSWORD (line 265) matches neither a
doubled quote nor an unquoted run, so the value is shown: the dollar quote
as `password=*** secretX'` (the part after the space), the escape string as
`password=***'Zq9 secretX\\'` (all of it); with spaces around "=" inside a
dollar quote (`password = '...'`) all of it too.

The same docstring (snapshot._mask_secrets) says a string that leaves the
password to what follows it has every later literal of the statement
masked when it names a role or user, and it does so for a concatenation
(`'host=h user=u password=' || 'Zq9secretX'`), but not for format()'s
placeholder in a connection string (`format('host=h user=u password=%s',
'Zq9secretX')`): the placeholder is masked, the argument shown.
"""

from __future__ import annotations

import pytest

SECRET = "Zq9 secretX"


@pytest.mark.parametrize("query", [
    f"SELECT dblink_connect($$host=h user=u password='{SECRET}' dbname=d$$)",
    f"CREATE SUBSCRIPTION s CONNECTION $c$host=h password='{SECRET}'$c$ PUBLICATION p",
    f"SELECT dblink_connect(E'host=h user=u password=\\'{SECRET}\\' dbname=d')",
    f"SELECT dblink_connect($$host=h user=u password = '{SECRET}'$$)",
    f"COPY t FROM PROGRAM $$PGPASSWORD='{SECRET}' psql -h h -c 'SELECT 1'$$",
])
def test_top_masks_a_quoted_conninfo_password_in_a_dollar_quote_or_escape_string(query: str) -> None:
    from safepool.top.snapshot import _one_line

    shown = _one_line(query, 300)
    assert "secretX" not in shown and "Zq9" not in shown, shown


@pytest.mark.parametrize("query", [
    "SELECT dblink_connect(format('host=h user=u password=%s', 'Zq9secretX'))",
    "SELECT dblink_connect('c', format('host=h user=%I password=%L', 'app', 'Zq9secretX'))",
])
def test_top_masks_a_conninfo_password_given_to_format(query: str) -> None:
    from safepool.top.snapshot import _one_line

    assert "Zq9secretX" not in _one_line(query, 300)


def test_top_masks_a_conninfo_password_concatenated_after_it() -> None:
    """(The concatenation the format() case above should match: it passes.)"""
    from safepool.top.snapshot import _one_line

    assert "Zq9secretX" not in _one_line("SELECT dblink_connect('host=h user=u password=' || 'Zq9secretX')", 300)


# Siblings of the cases above: each way a string can quote a connection
# string's value (libpq's single quotes with backslash escapes, an unquoted
# run with one, a shell's double quotes), each way SQL can quote that string
# (standard, escape, dollar quotes, nested in a DO block's body), and a
# format() placeholder by position or with no user named.
@pytest.mark.parametrize("query", [
    "SELECT dblink_connect($$host=h password='Zq9 \\' secretX' dbname=d$$)",
    "SELECT dblink_connect($$host=h password=Zq9\\ secretX dbname=d$$)",
    "SELECT dblink_connect($$host=h PASSWORD\t=\t'Zq9 secretX'$$)",
    "COPY t FROM PROGRAM 'PGPASSWORD=\"Zq9 secretX\" psql -h h'",
    "COPY t FROM PROGRAM $$PGPASSWORD=Zq9secretX psql -h h$$",
    "DO $do$ BEGIN PERFORM dblink_connect($$host=h password='Zq9 secretX'$$); END $do$",
    "DO $do$ BEGIN PERFORM dblink_connect('host=h password=''Zq9 secretX'''); END $do$",
    "SELECT dblink_connect(E'host=h password=\\'Zq9 \\\\\\' secretX\\'')",
    "SELECT dblink_connect(E'host=h password=\\'Zq9\\040secretX\\'')",  # (an octal escape's space)
    "SELECT dblink_connect(E'host=h password=\\x27Zq9 secretX\\x27')",  # (a hexadecimal escape's quotes)
    "SELECT dblink_connect(E'host=h password=\\u0027Zq9 secretX\\u0027')",
    "SELECT dblink_connect(format('host=h password=%1$s', 'Zq9secretX'))",
    "SELECT dblink_connect(format($f$host=h password = %L$f$, 'Zq9secretX'))",
    "SELECT dblink_connect($$host=h password='Zq9 secret",  # (cut by the server's truncation)
])
def test_top_masks_every_quoting_of_a_conninfo_password(query: str) -> None:
    from safepool.top.snapshot import _one_line

    shown = _one_line(query, 300)
    assert shown is not None and "secret" not in shown and "Zq9" not in shown, shown
    assert "***" in shown, shown


@pytest.mark.parametrize("query, shown", [
    # Not a password's value: shown as written.
    ("SELECT $$the password is checked$$", "SELECT $$the password is checked$$"),
    ("SELECT 'password' = $1", "SELECT 'password' = $1"),
    ("SELECT dblink_connect($$host=h user=u dbname=d$$)", "SELECT dblink_connect($$host=h user=u dbname=d$$)"),
    ("SELECT E'it\\'s a \\x41\\n'", "SELECT E'it\\'s a \\x41\\n'"),
    # The rest of the connection string stays readable.
    ("SELECT dblink_connect($$host=h password='a b' dbname=d$$)",
     "SELECT dblink_connect($$host=h password=*** dbname=d$$)"),
])
def test_top_shows_what_is_no_password_as_written(query: str, shown: str) -> None:
    from safepool.top.snapshot import _one_line

    assert _one_line(query, 300) == shown
