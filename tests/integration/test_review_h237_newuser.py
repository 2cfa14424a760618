"""Helper 237: a newcomer's trial of safepool, side by side with asyncpg's
pool (bad arguments, closed pools, foreign and double releases, terminated
backends, passwords in DSNs, the CLI, the pytest plugin, the docs' snippets).
What differed from asyncpg's pool or from the docs, and is not listed in
docs/migration.md, is pinned here as a strict xfail.

- ``create_pool(reset_timeout=-1)`` (or NaN) is refused with "reset_timeout
  must be >= 0 seconds", but ``reset_timeout=0`` is refused too ("must be > 0
  seconds"): the first message names a value the option does not take.
  safepool/_options.py:274-276 validates with ``validate_timeout(...)``
  (non-negative) and refuses 0 afterwards, where lease_timeout and
  max_lifetime use ``positive=True`` (one message for -1, NaN and 0).
"""

from __future__ import annotations

import math

import pytest

import safepool

# Never connected to: the arguments are checked when create_pool() is called.
DSN = "postgresql://app@127.0.0.1:1/app"


@pytest.mark.xfail(
    strict=True,
    reason=(
        "safepool/_options.py:274-276: reset_timeout=-1 or NaN is refused as 'must be >= 0 seconds', "
        "but 0 is refused as well ('must be > 0 seconds'): the message points at a value that fails too"
    ),
)
@pytest.mark.parametrize("value", [-1, -0.5, math.nan])
def test_a_refused_reset_timeout_names_the_range_it_takes(value: float) -> None:
    with pytest.raises(safepool.PoolValueError) as refused:
        safepool.create_pool(DSN, reset_timeout=value)
    # Whatever the message says is allowed must be allowed: 0 is not.
    with pytest.raises(safepool.PoolValueError):
        safepool.create_pool(DSN, reset_timeout=0)
    assert ">= 0" not in str(refused.value), str(refused.value)


@pytest.mark.parametrize("value", [-1, 0, math.nan])
def test_lease_timeout_and_max_lifetime_refuse_0_and_negatives_alike(value: float) -> None:
    """The options that need a positive duration say so for every value they
    refuse (the consistency reset_timeout lacks, above)."""
    for option in ("lease_timeout", "max_lifetime"):
        with pytest.raises(safepool.PoolValueError, match=f"{option} must be > 0 seconds"):
            safepool.create_pool(DSN, **{option: value})
