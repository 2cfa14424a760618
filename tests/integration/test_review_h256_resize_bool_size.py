"""Review h256 (a newcomer's trial): ``create_pool()`` takes a ``bool``
``max_size`` as asyncpg's pool does (``max_size=True`` is one connection,
``get_max_size()`` reads ``True``). ``Pool.resize(min_size=...)``, whose
docstring says the bound left out keeps its current value, re-checked that
stored ``True`` as if the caller had passed it and refused with "max_size
must be an int, got bool": the pool could never have its floor changed
alone. Fixed: ``resize()`` takes the current bound as an int. A bool the
caller passes to ``resize()`` itself is still refused."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

import safepool

pytestmark = pytest.mark.asyncio


async def test_resize_min_size_alone_keeps_a_bool_max_size_create_pool_accepted(
    pools: Callable[..., Any],
) -> None:
    pool = await pools(min_size=0, max_size=True)  # accepted, as by asyncpg.create_pool
    assert pool.get_max_size() == 1
    pool.resize(min_size=1)  # "either bound left out keeps its current value"
    assert (pool.get_min_size(), pool.get_max_size()) == (1, 1)


async def test_resize_still_refuses_a_bool_it_is_given(pools: Callable[..., Any]) -> None:
    pool = await pools(min_size=0, max_size=2)
    with pytest.raises(safepool.PoolTypeError, match="max_size must be an int, got bool"):
        pool.resize(max_size=True)
    assert (pool.get_min_size(), pool.get_max_size()) == (0, 2)
