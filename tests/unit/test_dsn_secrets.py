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
