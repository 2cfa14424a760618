"""Review h256 (a newcomer's trial): ``create_pool()`` takes a ``bool``
``max_size`` as asyncpg's pool does (``max_size=True`` is one connection,
``get_max_size()`` reads ``True``), but ``Pool.resize(min_size=...)``, which
its docstring says keeps the bound left out at its current value, then
re-checks that stored ``True`` as if the caller had passed it, and refuses
with "max_size must be an int, got bool": the pool can never have its floor
changed alone. Cause: ``safepool/pool.py`` ``resize()`` fills a missing
``max_size`` from ``self._state.max_size`` before ``check_resize()``
(``safepool/_options.py``), which rejects ``bool``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

pytestmark = pytest.mark.asyncio


@pytest.mark.xfail(
    strict=True,
    reason="resize(min_size=) re-validates the stored max_size: a bool max_size that create_pool() "
    "accepted (as asyncpg does) makes it raise PoolTypeError 'max_size must be an int, got bool'",
)
async def test_resize_min_size_alone_keeps_a_bool_max_size_create_pool_accepted(
    pools: Callable[..., Any],
) -> None:
    pool = await pools(min_size=0, max_size=True)  # accepted, as by asyncpg.create_pool
    assert pool.get_max_size() == 1
    pool.resize(min_size=1)  # "either bound left out keeps its current value"
    assert (pool.get_min_size(), pool.get_max_size()) == (1, 1)
