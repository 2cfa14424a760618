"""Review s61, hand-made mutation review, the auto reset's classifier
(safepool/_autoreset.py): mutations that made it call a statement neutral
and that no test caught. No database: the classifier is PostgreSQL's
parser (pglast) and rule tables."""

from __future__ import annotations

from typing import Any

import pytest

pytest.importorskip("pglast", reason="pip install -e '.[test]' installs the auto extra")

from safepool import _autoreset  # noqa: E402
from safepool._autoreset import reset_reason  # noqa: E402


@pytest.fixture(autouse=True)
def _fresh_cache() -> Any:
    _autoreset.cache_clear()
    yield
    _autoreset.cache_clear()


def test_a_node_type_the_classifier_does_not_know_needs_a_reset() -> None:
    """The classifier is an allowlist: a statement is neutral only if every
    node of its parse tree is of a type listed as neutral
    (``_NEUTRAL_NODES``); anything else, including a node type a later
    PostgreSQL or pglast adds, needs the reset. ``XMLTABLE`` in a FROM
    clause parses to a ``RangeTableFunc`` node, not on the list: the
    statement is not called neutral.

    Mutation killed: ``_walk`` no longer returns for a node type outside
    ``_NEUTRAL_NODES`` (the allowlist turned into "only the checks for
    known nodes"): every unit test of the classifier still passed."""
    reason = reset_reason("SELECT * FROM XMLTABLE('/r' PASSING '<r/>' COLUMNS a int PATH 'a')")
    assert reason is not None
    assert "RangeTableFunc" in reason


@pytest.mark.parametrize(
    "setting", ["SEARCH_PATH", "Search_Path", "Standard_Conforming_Strings", "CLIENT_ENCODING"]
)
def test_set_config_of_a_setting_that_changes_how_sql_reads_is_caught_in_any_case(setting: str) -> None:
    """``set_config(name, value, true)`` is neutral only for a setting whose
    transaction-local change cannot make the classifier misread the rest of
    the transaction. PostgreSQL reads setting names case-insensitively
    (``set_config('SEARCH_PATH', 'evil, pg_catalog', true)`` sets
    search_path), so the check must too: with a schema of the user's ahead
    of pg_catalog, a later ``SELECT lower(x)`` of that transaction may call
    the user's ``lower()``, which the classifier takes for the built-in.

    Mutation killed: ``_set_config_reason`` compares the name as written
    (``setting.lower()`` dropped): the upper-case spellings were neutral."""
    reason = reset_reason(f"SELECT set_config('{setting}', 'x', true)")
    assert reason is not None
    assert "changes how later statements are read" in reason
