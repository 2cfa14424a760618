"""create_pool()'s class arguments, refused with a typed error: no server
needed (the checks run in ``Pool.__init__``, before any connect)."""

from __future__ import annotations

from typing import Any

import pytest

import safepool


@pytest.mark.parametrize("argument", ["connection_class", "record_class"])
@pytest.mark.parametrize("value", [5, "asyncpg.Connection", None])
@pytest.mark.asyncio
async def test_a_class_argument_that_is_not_a_class_is_a_pool_type_error(argument: str, value: Any) -> None:
    with pytest.raises(safepool.PoolTypeError, match=argument):  # (a TypeError too, as asyncpg raises)
        safepool.create_pool("postgresql://nobody@127.0.0.1:1/none", min_size=0, **{argument: value})
