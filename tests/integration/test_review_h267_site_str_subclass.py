"""Review h267: a site name that is a str subclass (an ``enum.StrEnum``
member: ``class Site(StrEnum): CHECKOUT = "checkout"``, the usual way to keep
site names to a bounded set, as docs/metrics.md asks).

``Pool.acquire`` documents ``PoolTypeError`` for a ``site`` "neither a str
nor None", and ``safepool.site(name)`` takes any str (``isinstance``), a
StrEnum member included, which then reaches the pool through the context
variable as the site of every acquire in it. ``acquire(site=)`` itself
checks ``type(site) is not str`` (safepool/pool.py:298, kept by 6682a01's
encodability check) and refuses the same value with
``PoolTypeError: site must be a non-empty str or None, got <Site.CHECKOUT:
'checkout'>``.
"""

from __future__ import annotations

import enum
from typing import Any

import pytest

import safepool

pytestmark = pytest.mark.asyncio


class Site(enum.StrEnum):
    CHECKOUT = "checkout"


async def test_acquire_takes_a_str_enum_site(pools: Any) -> None:
    pool = await pools(max_size=2, max_site_share=0.5)
    async with pool.acquire(site=Site.CHECKOUT) as con:
        assert await con.fetchval("SELECT 1") == 1
        assert [info.site for info in pool.leases(stacks=False)] == ["checkout"]


async def test_control_safepool_site_takes_the_same_str_enum(pools: Any) -> None:
    pool = await pools(max_size=2, max_site_share=0.5)
    with safepool.site(Site.CHECKOUT):
        async with pool.acquire() as con:
            assert await con.fetchval("SELECT 1") == 1
            assert [info.site for info in pool.leases(stacks=False)] == ["checkout"]
    async with pool.acquire(site="checkout") as con:  # a plain str: taken
        assert await con.fetchval("SELECT 1") == 1
