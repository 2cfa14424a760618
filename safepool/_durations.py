"""Duration arguments in seconds, checked as create_pool() checks its
own, and the numbers of other types it takes: a leaf module (no pool
state), so that the extensions (health) and the settings' own classes
(TcpKeepalive) check their options the same way without importing the
pool's internals (tests/test_architecture.py)."""

from __future__ import annotations

import operator
from numbers import Integral, Real
from typing import Any, Literal, overload

from .errors import PoolTypeError, PoolValueError


def plain_int(value: Any) -> Any:
    """An int for an integral number of another type (numpy's integers);
    anything else as it is."""
    return operator.index(value) if isinstance(value, Integral) and not isinstance(value, int) else value


def plain_number(value: Any) -> Any:
    """An int for an integral number of another type (numpy's integers), a
    float for another real one (numpy's floats, a Fraction), as asyncpg's
    pool takes them for its sizes and limits; anything else as it is, for
    the caller's checks to refuse."""
    if isinstance(value, (int, float)) or not isinstance(value, Real):
        return value
    return plain_int(value) if isinstance(value, Integral) else float(value)


class DurationTooLarge(PoolValueError, OverflowError):
    """A duration given as an int no float can hold (``10**400``): out of
    range, so a :class:`~safepool.PoolValueError` as the other durations out of range; and an
    ``OverflowError``, which asyncpg's pool raises for such an
    ``acquire(timeout=)`` (asyncpg 0.29-0.32: "int too large to convert to
    float"), so code that catches that keeps working."""


@overload
def validate_timeout(
    name: str, value: Any, *, allow_none: Literal[False], positive: bool = False, none: str = ...
) -> float: ...
@overload
def validate_timeout(
    name: str, value: Any, *, allow_none: bool = True, positive: bool = False, none: str = ...
) -> float | None: ...
def validate_timeout(
    name: str, value: Any, *, allow_none: bool = True, positive: bool = False, none: str = "turns it off"
) -> float | None:
    """A duration in seconds (None: no limit, where ``allow_none``;
    ``none`` says what None does, in the messages: "turns it off").

    :raises TypeError: not a number (bool included).
    :raises ValueError: NaN, negative, 0 where ``positive``, or an int too
        large for a float (then :class:`DurationTooLarge`, an
        ``OverflowError`` too, as asyncpg's pool raises one there)."""
    if value is None and allow_none:
        return None
    check_seconds_type(name, value, allow_none)
    _check_range(name, value, value, allow_none, positive, none)
    try:
        seconds = float(value)
    except OverflowError:  # an int no float holds: out of range, as a negative one is
        off = f" (None {none})" if allow_none else ""
        raise DurationTooLarge(f"{name} is too large for a number of seconds{off}") from None
    if type(value) is not float and type(value) is not int:
        # Again as the float it becomes: a type's own __float__ may differ.
        _check_range(name, seconds, value, allow_none, positive, none)
    return seconds


def _check_range(name: str, number: Any, value: Any, allow_none: bool, positive: bool, none: str) -> None:
    if positive and not number > 0:  # (NaN too)
        off = f" (None {none})" if allow_none else ""
        raise PoolValueError(f"{name} must be > 0 seconds{off}, got {value!r}")
    if number != number or number < 0:  # NaN or negative
        raise PoolValueError(f"{name} must be >= 0 seconds, got {value!r}")


def release_timeout(value: Any) -> float:
    """``release(timeout=)`` other than None: seconds, as asyncpg 0.32's
    release takes them (its reset runs under ``asyncio.timeout``), so 0,
    negative and NaN leave no time for a reset (``TimeoutError`` from it).

    An int is returned as given, the other numbers as floats: asyncpg's
    release hands the budget to an overridden ``reset(timeout=)`` as given.

    :raises TypeError: not a number (bool included: asyncpg would take
        True as 1 second, as acquire(timeout=True) is refused here too).
    :raises OverflowError: an int no float can hold."""
    check_seconds_type("timeout", value)
    seconds = float(value)
    return value if type(value) is int else seconds


def check_seconds_type(name: str, value: Any, allow_none: bool = True) -> None:
    """What every duration argument must be: a real number (an int or a
    float; numpy's scalars and a Fraction too, which asyncpg's pool takes as
    its timeouts), not a bool."""
    if isinstance(value, bool) or not (isinstance(value, (int, float)) or isinstance(value, Real)):
        none = " or None" if allow_none else ""
        raise PoolTypeError(f"{name} must be a number of seconds{none}, got {type(value).__name__}")
