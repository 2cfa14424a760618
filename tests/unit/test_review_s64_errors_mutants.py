"""Review s64: mutation review of safepool/errors.py. Mutants that survived
the existing tests, killed here.

The argument checks shared by the pool, the exporters, health and testing
(``check_is_pool``, ``check_flag``, ``check_callable``, ``pool_list``) were
tested through their callers on a few inputs each: what counts as a pool
(a ``str`` name *and* a callable ``stats``), the asyncpg hint only for
asyncpg's objects, and ``pool_list``'s three outcomes (one pool, not
iterable, an error raised inside the iteration) are written out here. No
server.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import asyncpg
import pytest

import safepool
from safepool.errors import check_callable, check_flag, check_is_pool, pool_list


class Poolish:
    name = "p"

    def stats(self) -> None:
        return None


class NamedOnly:
    name = "p"
    stats = None


class StatsOnly:
    name = 3

    def stats(self) -> None:
        return None


def test_the_classes_are_asyncpgs_too() -> None:
    assert issubclass(safepool.PoolValueError, safepool.PoolArgumentError)
    assert issubclass(safepool.PoolValueError, ValueError)
    assert issubclass(safepool.PoolTypeError, safepool.PoolArgumentError)
    assert issubclass(safepool.PoolTypeError, TypeError)
    assert issubclass(safepool.PoolArgumentError, safepool.PoolError)
    for cls in (safepool.PoolInterfaceError, safepool.PoolClosedError, safepool.LeaseExpiredError,
                safepool.EventLoopMismatchError):
        assert issubclass(cls, safepool.PoolError) and issubclass(cls, asyncpg.InterfaceError)
    assert issubclass(safepool.EventLoopMismatchError, RuntimeError)
    assert issubclass(safepool.PoolTimeoutError, asyncio.TimeoutError)
    assert issubclass(safepool.ServerUnavailableError, ConnectionError)
    assert not issubclass(safepool.PoolOverloadedError, asyncio.TimeoutError)


def test_a_pool_is_a_str_name_and_a_callable_stats() -> None:
    check_is_pool(Poolish(), "here()")  # (no error)
    for bad in (NamedOnly(), StatsOnly(), None):
        kind = f"{type(bad).__module__}.{type(bad).__qualname__}"
        with pytest.raises(safepool.PoolTypeError) as raised:
            check_is_pool(bad, "here()")
        assert str(raised.value) == f"here() expected a safepool pool, got {kind}"


def test_only_asyncpgs_objects_get_the_migration_hint() -> None:
    namespace: dict[str, Any] = {"__name__": "asyncpg.fake"}
    exec("class Pool:\n    pass\n", namespace)
    with pytest.raises(safepool.PoolTypeError) as raised:
        check_is_pool(namespace["Pool"](), "check_health()")
    assert str(raised.value) == (
        "check_health() expected a safepool pool, got asyncpg.fake.Pool: an asyncpg pool has no statistics or"
        " leases to read; create it with safepool.create_pool() (docs/migration.md; for an ORM's pools, rebind"
        " asyncpg.create_pool)"
    )


def test_a_flag_is_a_bool() -> None:
    assert check_flag("live", True) is True
    assert check_flag("live", False) is False
    for bad in (1, 0, "yes", None):
        with pytest.raises(safepool.PoolTypeError, match=f"^live must be True or False, got {bad!r}$"):
            check_flag("live", bad)


def test_a_callback_is_callable() -> None:
    check_callable("callback", print)
    check_callable("callback", Poolish)
    with pytest.raises(safepool.PoolTypeError, match="^callback must be callable, got str$"):
        check_callable("callback", "print")


def test_pool_list_takes_any_iterable_of_pools() -> None:
    one, two = Poolish(), Poolish()
    assert pool_list((one, two)) == [one, two]
    assert pool_list(iter([two])) == [two]
    assert pool_list([]) == []


@pytest.mark.parametrize(("where", "prefix"), [("", ""), ("LeakGuard()", "LeakGuard() ")])
def test_pool_list_refuses_one_pool_and_what_is_not_iterable(where: str, prefix: str) -> None:
    with pytest.raises(safepool.PoolTypeError) as raised:
        pool_list(Poolish(), where)
    assert str(raised.value) == f"{prefix}expected an iterable of pools, got one pool: pass [pool]"
    with pytest.raises(safepool.PoolTypeError) as raised:
        pool_list(3, where)
    assert str(raised.value) == f"{prefix}expected an iterable of pools, got int"
    assert raised.value.__cause__ is None and raised.value.__suppress_context__


def test_a_type_error_inside_the_iteration_is_passed_through() -> None:
    """Not the argument's type: the iterable's own error, unchanged."""

    def pools() -> Iterator[Any]:
        yield Poolish()
        raise TypeError("broken generator")

    with pytest.raises(TypeError, match="^broken generator$") as raised:
        pool_list(pools(), "LeakGuard()")
    assert not isinstance(raised.value, safepool.PoolTypeError)


class NamedGroup(list[Any]):
    """An iterable with a ``name`` but no ``stats()``: not one pool."""

    name = "group"


class GroupWithStats(list[Any]):
    """An iterable with a ``stats()`` but no ``str`` name: not one pool."""

    def stats(self) -> None:
        return None


def test_an_iterable_with_only_one_of_a_pools_attributes_is_listed() -> None:
    one = Poolish()
    assert pool_list(NamedGroup([one])) == [one]
    assert pool_list(GroupWithStats([one])) == [one]
