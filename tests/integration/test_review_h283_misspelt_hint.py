"""Review h283: the misspelt-keyword hint 3175f93 adds to asyncpg's
``TypeError`` (``_options.misspelt_keyword_hint``, applied in
``_workers.connect``). Held: the hint only ever names a parameter from a
fixed list (no value, no DSN piece: nothing of the password but a password
that is itself such a name, which asyncpg's part of the message shows
unscrubbed as well); a ``connect=`` callback's TypeError is left alone.
Two that do not hold: a ``connection_class``'s own TypeError gets the hint
(the message is no longer asyncpg's pool's), and ``connect_args``, the
name of ``Pool.__init__``'s ``*connect_args``, is offered as an option of
``create_pool()``, which has none by that name.
"""

from __future__ import annotations

import inspect
from typing import Any

import asyncpg
import pytest

import safepool

pytestmark = [
    pytest.mark.asyncio,
    # (asyncpg leaves the transport of a connection whose class raised in __init__ to the collector)
    pytest.mark.filterwarnings("ignore::ResourceWarning"),
    pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
]


async def _error(factory: Any, dsn: str, **kwargs: Any) -> TypeError:
    with pytest.raises(TypeError) as raised:
        pool = await factory(dsn, min_size=1, max_size=1, **kwargs)
        pool.terminate()
    return raised.value


def _class_with_a_typo_of_its_own(made: list[Any]) -> type:
    class Typo(asyncpg.Connection):  # type: ignore[misc]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            made.append(self)  # (asyncpg leaves its transport open: aborted by the test)

            def configure(*, lease_timeout: float = 0.0) -> None:
                pass

            configure(lease_timout=1)  # type: ignore[call-arg]

    return Typo


async def test_a_connection_class_typeerror_is_left_alone(pg_dsn: str) -> None:
    made: list[Any] = []
    cls = _class_with_a_typo_of_its_own(made)
    try:
        theirs = await _error(asyncpg.create_pool, pg_dsn, connection_class=cls)
        ours = await _error(safepool.create_pool, pg_dsn, connection_class=cls)
    finally:
        for raw in made:
            if not raw._aborted and raw._protocol is not None:
                raw._abort()
    assert type(ours) is type(theirs) is TypeError
    assert str(ours) == str(theirs)


async def test_a_misspelt_keyword_with_a_connection_class(pg_dsn: str) -> None:
    """A typo of create_pool()'s with a connection_class given: the same
    message as without one."""

    class Plain(asyncpg.Connection):  # type: ignore[misc]
        pass

    theirs = await _error(asyncpg.create_pool, pg_dsn, connection_class=Plain, lease_timout=1)
    ours = await _error(safepool.create_pool, pg_dsn, connection_class=Plain, lease_timout=1)
    assert str(ours) == f"{theirs} (did you mean lease_timeout=, an option of safepool.create_pool()?)"


@pytest.mark.parametrize("keyword", ["connect_args", "connect_arg"])
async def test_the_hint_offers_only_keywords_create_pool_takes(pg_dsn: str, keyword: str) -> None:
    ours = await _error(safepool.create_pool, pg_dsn, **{keyword: 1})
    message = str(ours)
    # It offered connect_args= (Pool.__init__'s *connect_args) before the fix;
    # now a keyword create_pool() takes, or none when none is close.
    if "did you mean " not in message:
        assert message == f"connect() got an unexpected keyword argument '{keyword}'"
        return
    offered = message.split("did you mean ", 1)[1].split("=", 1)[0]
    takes = set(inspect.signature(safepool.create_pool).parameters) | set(inspect.signature(asyncpg.connect).parameters)
    assert offered in takes, f"offered {offered}=, which create_pool() refuses as unknown too"


async def test_the_hint_shows_no_password(pg_dsn: str) -> None:
    """The password and the DSN's never reach the hint (values are not in it)."""
    secret = "s3cret-pw-h283"
    ours = await _error(safepool.create_pool, pg_dsn, password=secret, pasword=secret)
    assert secret not in str(ours)
    assert str(ours).endswith("(did you mean password=, a keyword of asyncpg.connect()?)")
