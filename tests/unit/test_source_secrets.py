"""Passwords in the application's source lines that a leak report's stack
shows (safepool._secrets.redact_source and redact_known): no server."""

from __future__ import annotations

import pytest

from safepool._secrets import redact_known, redact_source


@pytest.mark.parametrize(
    ("line", "shown"),
    [
        ('async with create_pool("postgresql://app:s3cret@db/orders") as pool:',
         'async with create_pool("postgresql://app:***@db/orders") as pool:'),
        ('pool = await create_pool(dsn, password="hunter2", user="app")',
         'pool = await create_pool(dsn, password=***, user="app")'),
        ("create_pool(password='hunter2')", "create_pool(password=***)"),
        ('create_pool(host=h, password = "pw with spaces", user=u)', "create_pool(host=h, password = ***, user=u)"),
        ('settings = {"password": "pw\\"quoted", "user": "app"}', 'settings = {"password": ***, "user": "app"}'),
        ('db_password="abc"; port = 5432', "db_password=***; port = 5432"),
        ('connect("host=db password=abc123 user=app")', 'connect("host=db password=*** user=app")'),
        ("con = await pool.acquire()", "con = await pool.acquire()"),
        ("password_hint = get_hint()", "password_hint = get_hint()"),
    ],
)
def test_a_source_line_loses_its_password_literals(line: str, shown: str) -> None:
    assert redact_source(line) == shown


def test_the_pools_own_password_is_masked_wherever_it_stands() -> None:
    """A password built elsewhere (a variable, a helper's argument) is masked
    where it stands on its own, from the DSN or the password= argument;
    one of under four characters is not (it would spell out words)."""
    text = 'dsn = with_password(base, "s3cret-value")\nother = "s3cret-values"\nkw = make("kw-pass")'
    assert redact_known(text, "postgresql://app:s3cret-value@db/x", "kw-pass") == (
        'dsn = with_password(base, "***")\nother = "s3cret-values"\nkw = make("***")'
    )
    assert redact_known("x = 'abc'", None, "abc") == "x = 'abc'"
    assert redact_known("x = 1", None, lambda: "callable") == "x = 1"


@pytest.mark.parametrize(
    "line",
    [
        'settings = {"password": r"hunter2x", "user": "app"}',
        'pool = await create_pool(dsn, password=r"hunter 2x", user="app")',
        'pool = await create_pool(dsn, password="""hunter2x""", user="app")',
    ],
)
def test_a_prefixed_or_triple_quoted_password_literal_is_masked(line: str) -> None:
    shown = redact_source(line)
    assert "hunter" not in shown and "2x" not in shown, shown


def test_a_password_argument_equal_to_the_user_is_not_spelled_out_by_the_masks() -> None:
    from safepool import _stack
    from safepool._reporting import Reporter

    def orders_view() -> _stack.Captured:
        orders = _stack.capture()  # (the source line a report shows: "orders" stands on its own)
        return orders

    captured = orders_view()
    as_dsn = Reporter.__new__(Reporter)
    as_dsn.connect_args = lambda: (("postgresql://orders:orders@db/orders",), {})
    as_kwargs = Reporter.__new__(Reporter)
    as_kwargs.connect_args = lambda: ((None,), {"user": "orders", "password": "orders", "database": "orders"})
    shown = as_kwargs.format_stack(captured)
    assert "orders = _stack.capture()" in as_dsn.format_stack(captured)
    assert "*** = _stack.capture()" not in shown, shown
