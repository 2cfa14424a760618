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


@pytest.mark.xfail(
    strict=True,
    reason="top --show-queries shows a conninfo's single-quoted password inside a dollar quote or E'' string "
    "(safepool/top/snapshot.py _CONNINFO_PASSWORD only knows doubled quotes)",
)
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


@pytest.mark.xfail(
    strict=True,
    reason="top --show-queries masks a conninfo's format() placeholder (password=%s) instead of its argument "
    "(safepool/top/snapshot.py: _PLACEHOLDER is only looked for right after the word PASSWORD)",
)
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
