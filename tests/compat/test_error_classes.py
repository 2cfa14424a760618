"""Every error safepool raises of its own is a ``safepool.PoolError`` and the
class asyncpg's pool raises in the same situation.

A bad argument is a ``PoolValueError`` (a ``ValueError``) or a
``PoolTypeError`` (a ``TypeError``), both ``PoolArgumentError``; misuse that
asyncpg answers with ``asyncpg.InterfaceError`` is a ``PoolInterfaceError``.
Where asyncpg's pool refuses the same thing, both pools are run and the
builtin class and message compared; the rest is safepool's own API. Last, a
scan of the source keeps the rule for code written later: safepool raises no
bare ``ValueError``, ``TypeError`` or ``InterfaceError``.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

import asyncpg
import pytest

import safepool
from safepool import health
from safepool.metrics.prometheus import PoolCollector
from tests._util import MakePool
from tests.compat.test_parity import flavour

__all__ = ["flavour"]  # (the fixture, used by name; make_pool is tests/conftest.py's)

PACKAGE = Path(safepool.__file__).resolve().parent


def assert_pool_error(error: BaseException, builtin: type[BaseException]) -> None:
    """``error`` is what ``except builtin`` and ``except safepool.PoolError``
    both catch, of the safepool class for that builtin."""
    assert isinstance(error, builtin)
    expected = {
        ValueError: safepool.PoolValueError,
        TypeError: safepool.PoolTypeError,
        asyncpg.InterfaceError: safepool.PoolInterfaceError,
    }[builtin]
    assert isinstance(error, expected), f"{type(error).__mro__} is not a {expected.__name__}"
    assert isinstance(error, safepool.PoolError)


def builtin_of(error: BaseException) -> type[BaseException]:
    """The class asyncpg's pool raised, or the non-safepool class safepool's
    error subclasses first."""
    return next(cls for cls in type(error).__mro__ if not cls.__module__.startswith("safepool"))


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "kwargs, builtin",
    [
        ({"max_size": 0}, ValueError),
        ({"min_size": -1}, ValueError),
        ({"min_size": 3, "max_size": 2}, ValueError),
        ({"max_queries": 0}, ValueError),
        ({"max_inactive_connection_lifetime": -1}, ValueError),
    ],
    ids=["max_size-0", "min_size-negative", "min-above-max", "max_queries-0", "inactive-lifetime-negative"],
)
async def test_a_bad_size_or_limit_is_asyncpg_s_value_error_and_a_pool_error(
    make_pool: MakePool, flavour: str, kwargs: dict[str, Any], builtin: type[Exception]
) -> None:
    with pytest.raises(Exception) as caught:
        await make_pool(**kwargs)
    # asyncpg 0.29-0.32 checks these itself: same class and message on both.
    assert builtin_of(caught.value) is builtin
    if flavour == "safepool":
        assert_pool_error(caught.value, builtin)


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "kwargs, builtin",
    [
        ({"lease_timeout": 0}, ValueError),
        ({"lease_timeout": "1"}, TypeError),
        ({"acquire_timeout": -1}, ValueError),
        ({"max_lifetime": 0}, ValueError),
        ({"max_lifetime": 10**400}, ValueError),
        ({"reset_mode": "sometimes"}, ValueError),
        ({"queue_policy": "lifo"}, ValueError),
        ({"max_site_share": 2}, ValueError),
        ({"max_waiters": "10"}, TypeError),
        ({"tcp_keepalive": 60}, TypeError),
        ({"name": 7}, TypeError),
    ],
    ids=lambda value: value.__name__ if isinstance(value, type) else next(iter(value)),
)
async def test_a_bad_safepool_option_is_a_pool_argument_error(
    pg_dsn: str, kwargs: dict[str, Any], builtin: type[Exception]
) -> None:
    with pytest.raises(safepool.PoolArgumentError) as caught:
        await safepool.create_pool(pg_dsn, **kwargs)
    assert_pool_error(caught.value, builtin)


def test_a_bad_keepalive_or_backoff_field_is_a_pool_argument_error() -> None:
    with pytest.raises(safepool.PoolValueError):
        safepool.TcpKeepalive(count=0)
    with pytest.raises(safepool.PoolTypeError):
        safepool.TcpKeepalive(idle="60")  # type: ignore[arg-type]
    with pytest.raises(safepool.PoolValueError):
        safepool.Backoff(cap=-1)
    with pytest.raises(safepool.PoolValueError):
        safepool.site("")
    with pytest.raises(safepool.PoolTypeError):
        safepool.site(5)  # type: ignore[arg-type]
    with pytest.raises(safepool.PoolTypeError, match="decorates a function"):
        safepool.site("checkout")(5)  # type: ignore[type-var]  # (taken, it failed at each call)



def test_a_bad_manual_clock_argument_is_a_pool_argument_error() -> None:
    """ManualClock's start and advance() are checked as durations are: a str
    was a bare TypeError from ``+`` (or taken, failing at the first timer), a
    negative or NaN step moved the monotonic clock back or broke it."""
    clock = safepool.ManualClock()
    with pytest.raises(safepool.PoolTypeError, match="seconds"):
        clock.advance("1")  # type: ignore[arg-type]
    with pytest.raises(safepool.PoolTypeError):
        clock.advance(True)
    with pytest.raises(safepool.PoolValueError, match=">= 0"):
        clock.advance(-1.0)
    with pytest.raises(safepool.PoolValueError):
        clock.advance(float("nan"))
    assert clock.now() == 1000.0  # (refused before moving)
    clock.advance(0)
    clock.advance(2)
    assert clock.now() == 1002.0
    with pytest.raises(safepool.PoolTypeError):
        safepool.ManualClock("0")  # type: ignore[arg-type]
    with pytest.raises(safepool.PoolValueError):
        safepool.ManualClock(float("nan"))
    assert safepool.ManualClock(-5).now() == -5  # (any origin)

@pytest.mark.asyncio
@pytest.mark.parametrize(
    "timeout, builtin", [(-1, ValueError), ("1", TypeError), (float("nan"), ValueError)], ids=["negative", "str", "nan"]
)
async def test_a_bad_acquire_timeout_is_a_pool_argument_error(
    pg_dsn: str, timeout: Any, builtin: type[Exception]
) -> None:
    async with safepool.create_pool(pg_dsn, min_size=1, max_size=1) as pool:
        with pytest.raises(safepool.PoolArgumentError) as caught:
            await pool.acquire(timeout=timeout)
        assert_pool_error(caught.value, builtin)
        assert pool.stats().in_use == 0


@pytest.mark.asyncio
async def test_misuse_asyncpg_refuses_is_a_pool_interface_error_with_asyncpg_s_message(
    make_pool: MakePool, flavour: str
) -> None:
    pool = await make_pool()
    other = await make_pool()
    con = await pool.acquire()
    await pool.release(con)
    errors: list[BaseException] = []
    with pytest.raises(asyncpg.InterfaceError) as used:
        await con.fetchval("SELECT 1")
    errors.append(used.value)
    assert str(used.value) == "cannot call Connection.fetchval(): connection has been released back to the pool"
    held = await other.acquire()
    try:
        with pytest.raises(asyncpg.InterfaceError) as foreign:
            await pool.release(held)
        errors.append(foreign.value)
        assert "is not a member of this pool" in str(foreign.value)
    finally:
        await other.release(held)
    context = pool.acquire()
    async with context:
        with pytest.raises(asyncpg.InterfaceError) as twice:
            await context.__aenter__()
        errors.append(twice.value)
        assert str(twice.value) == "a connection is already acquired"
    if flavour == "safepool":
        for error in errors:
            assert_pool_error(error, asyncpg.InterfaceError)


@pytest.mark.asyncio
async def test_an_acquire_before_init_is_a_pool_interface_error(pg_dsn: str) -> None:
    pool = safepool.create_pool(pg_dsn, min_size=0, max_size=1)
    with pytest.raises(asyncpg.InterfaceError, match="pool is not initialized") as caught:
        await pool.acquire()
    assert_pool_error(caught.value, asyncpg.InterfaceError)
    await pool
    await pool.close()


@pytest.mark.asyncio
async def test_a_connect_callback_returning_no_connection_is_a_pool_interface_error(pg_dsn: str) -> None:
    async def connect(*args: Any, **kwargs: Any) -> Any:
        con = await asyncpg.connect(*args, **kwargs)
        await con.close()
        return object()

    with pytest.raises(asyncpg.InterfaceError, match="expected pool connect callback to return") as caught:
        await safepool.create_pool(pg_dsn, min_size=1, max_size=1, connect=connect)
    assert_pool_error(caught.value, asyncpg.InterfaceError)


@pytest.mark.asyncio
async def test_safepool_s_own_api_refuses_bad_arguments_with_pool_argument_errors(pg_dsn: str) -> None:
    async with safepool.create_pool(pg_dsn, min_size=0, max_size=1) as pool:
        with pytest.raises(safepool.PoolTypeError):
            pool.add_listener(1)  # type: ignore[arg-type]
        with pytest.raises(safepool.PoolValueError):
            pool.remove_listener(print)
        with pytest.raises(safepool.PoolTypeError):
            pool.capture_stack = "yes"  # type: ignore[assignment]
        with pytest.raises(safepool.PoolValueError):
            pool.acquire(site="")
        with pytest.raises(safepool.PoolTypeError):
            pool.acquire(site=5)  # type: ignore[arg-type]
        con = await pool.acquire()
        with pytest.raises(safepool.PoolTypeError):
            await pool.release(con, timeout="1")  # type: ignore[arg-type]
        assert pool.stats().in_use == 1  # (refused before the release: the lease stands)
        await pool.release(con)
        with pytest.raises(safepool.PoolTypeError):
            PoolCollector(pool)  # type: ignore[arg-type]
        with pytest.raises(safepool.PoolTypeError, match="stacks must be True or False, got 'x'"):
            pool.leases(stacks="x")  # type: ignore[arg-type]  (was taken, as a true value)
        with pytest.raises(safepool.PoolTypeError):
            await health.check_health(pool, probe="yes")  # type: ignore[arg-type]
        assert pool.stats().in_use == 0



@pytest.mark.asyncio
async def test_a_kind_or_pool_list_of_the_wrong_type_is_a_pool_type_error(pg_dsn: str) -> None:
    """Arguments that failed in a dict lookup or an iteration, with Python's
    bare TypeError ("unhashable type: 'list'", "'int' object is not
    iterable"): the safepool class, still a TypeError."""
    from safepool.metrics import PoolSet
    from safepool.testing import LeakGuard

    async with safepool.create_pool(pg_dsn, min_size=0, max_size=1) as pool:
        with pytest.raises(safepool.PoolTypeError, match="kind must be one of"):
            pool.add_timing_sink([], print)  # type: ignore[arg-type]
        with pytest.raises(safepool.PoolTypeError, match="kind must be one of"):
            pool.remove_timing_sink({}, print)  # type: ignore[arg-type]
        with pytest.raises(safepool.PoolValueError):  # (a hashable one: as before)
            pool.add_timing_sink("waits", print)
    for make in (PoolCollector, PoolSet, LeakGuard):
        with pytest.raises(safepool.PoolTypeError, match="iterable of pools"):
            make(5)  # type: ignore[arg-type]
    with pytest.raises(safepool.PoolTypeError, match="expected a safepool pool"):
        LeakGuard([5])  # type: ignore[list-item]


def test_a_leak_guard_started_twice_is_a_pool_error_and_a_runtime_error() -> None:
    from safepool.testing import LeakGuard

    guard = LeakGuard().start()
    try:
        with pytest.raises(RuntimeError, match="this leak guard is already started") as caught:
            guard.start()
        assert isinstance(caught.value, safepool.PoolError)
    finally:
        guard.stop()


# safepool's modules whose parsers raise argparse's errors (argparse turns
# them into a usage message and exit status 2).
CLI_MODULES = {"_cli.py", "replay/cli.py"}
BARE = {"ValueError", "TypeError", "InterfaceError"}


# Bare builtins safepool raises on purpose, as asyncpg's pool does there:
# (module, class) -> why.
ASYNCPG_S_OWN = {
    ("_workers.py", "TimeoutError"): "a release's spent budget: asyncpg 0.32's close(timeout=)/reset raise TimeoutError",
    ("_detach.py", "RuntimeError"): "a coroutine awaited twice: Python's own message for coroutines",
}


def test_safepool_constructs_no_bare_error_in_any_shape() -> None:
    """The rule, kept for code written later: safepool names its own class
    (a subclass of the builtin or asyncpg's), never ``ValueError``,
    ``TypeError`` or ``InterfaceError`` themselves, nor ``TimeoutError`` or
    ``RuntimeError``: raised (``raise X(...)``, ``raise X``), returned by a
    helper, or built elsewhere and raised later (``error = ValueError(...)``,
    ``future.set_exception(TypeError(...))``). Only the asyncpg-parity ones
    listed in ASYNCPG_S_OWN."""
    watched = BARE | {"TimeoutError", "RuntimeError"}
    found: dict[tuple[str, str], list[int]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE).as_posix()
        if relative in CLI_MODULES:
            continue
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            target = node.func if isinstance(node, ast.Call) else node.exc if isinstance(node, ast.Raise) else None
            name = target.attr if isinstance(target, ast.Attribute) else target.id if isinstance(target, ast.Name) else ""
            if name in watched:
                found.setdefault((relative, name), []).append(node.lineno)
    unexpected = {key: lines for key, lines in found.items() if key not in ASYNCPG_S_OWN}
    assert not unexpected, unexpected
