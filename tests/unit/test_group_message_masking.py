"""An exception group's message quoting the DSN is masked in place
(``_secrets.scrub_connect_error``, review h231): its message is read-only,
so the group's class is swapped for a subclass that gives the masked one.
What else the application sees of the group stays."""

from __future__ import annotations

import pickle
import traceback
from typing import Any

import pytest

from safepool import _secrets

PASSWORD = "grp-Secret-4411"
DSN = f"postgresql://app:{PASSWORD}@db.internal:5432/orders"


def _scrubbed(group: BaseException) -> BaseException:
    try:
        raise group
    except BaseException as raised:
        _secrets.scrub_connect_error(raised, DSN, quoted=False)
        return raised


def test_the_message_str_and_traceback_are_masked_and_the_rest_stays() -> None:
    inner = ValueError(f"cannot prepare {DSN}")
    group = ExceptionGroup(f"init failed for {DSN}", [inner, KeyError("k")])
    group.add_note("a note")
    cause = RuntimeError("cause")
    group.__cause__ = cause
    scrubbed = _scrubbed(group)
    assert scrubbed is group and group.exceptions[0] is inner and group.__cause__ is cause
    assert isinstance(group, ExceptionGroup)
    assert (type(group).__module__, type(group).__name__, type(group).__qualname__) == (
        "builtins", "ExceptionGroup", "ExceptionGroup")
    shown = str(group) + repr(group) + group.message + "".join(traceback.format_exception(group))
    assert PASSWORD not in shown
    assert str(group) == "init failed for postgresql://app:***@db.internal:5432/orders (2 sub-exceptions)"
    assert group.message == "init failed for postgresql://app:***@db.internal:5432/orders"
    assert "ExceptionGroup: init failed for postgresql://app:***@" in "".join(traceback.format_exception(group))
    assert group.__notes__ == ["a note"] and group.__traceback__ is not None


def test_except_star_and_split_derive_masked_groups() -> None:
    group = ExceptionGroup(f"failed {DSN}", [ValueError("v"), KeyError("k")])
    _scrubbed(group)
    values, rest = group.split(ValueError)
    assert values is not None and rest is not None
    assert PASSWORD not in values.message + rest.message + str(values) + str(rest)
    assert str(rest) == "failed postgresql://app:***@db.internal:5432/orders (1 sub-exception)"
    seen: list[str] = []
    try:
        raise group
    except* ValueError as caught:
        seen.append(str(caught))
    except* KeyError as caught:
        seen.append(str(caught))
    assert len(seen) == 2 and all(PASSWORD not in text for text in seen)


def test_a_nested_group_and_a_scrub_repeated() -> None:
    nested = ExceptionGroup(f"inner {DSN}", [OSError("x")])
    group = ExceptionGroup("outer", [nested])
    _scrubbed(group)
    _scrubbed(group)  # (the second scrub keeps one swapped class)
    assert type(nested).__mro__[1] is ExceptionGroup
    assert str(group) == "outer (1 sub-exception)"  # (unchanged: nothing to mask, no class swapped)
    assert type(group) is ExceptionGroup
    assert PASSWORD not in "".join(traceback.format_exception(group))


class AppGroup(ExceptionGroup):  # type: ignore[type-arg]
    """An application's group, with a constructor and a derive of its own."""

    def __new__(cls, errors: list[Exception], dsn: str) -> AppGroup:
        self = super().__new__(cls, f"app failed on {dsn}", errors)
        self.dsn_seen = dsn
        return self

    def __init__(self, errors: list[Exception], dsn: str) -> None:
        super().__init__(f"app failed on {dsn}", errors)

    def derive(self, excs: Any) -> AppGroup:
        return AppGroup(list(excs), "derived")


def test_an_application_group_class_keeps_its_own_derive() -> None:
    group = AppGroup([ValueError("v"), KeyError("k")], DSN)
    _scrubbed(group)
    assert isinstance(group, AppGroup) and type(group).__name__ == "AppGroup"
    assert PASSWORD not in str(group) + group.message + group.dsn_seen
    values, _ = group.split(ValueError)
    assert isinstance(values, AppGroup) and values.message == "app failed on derived"


def test_a_masked_group_pickles_as_its_own_class() -> None:
    group = ExceptionGroup(f"failed {DSN}", [ValueError("v")])
    _scrubbed(group)
    again = pickle.loads(pickle.dumps(group))
    assert type(again) is ExceptionGroup
    assert PASSWORD not in str(again)


def test_a_base_exception_group_is_left_as_it_is() -> None:
    """``BaseExceptionGroup`` itself (a static type) keeps its class: its
    args are masked, its message cannot be (the pool scrubs only what an
    ``except Exception`` caught, which such a group never is)."""
    group = BaseExceptionGroup(f"failed {DSN}", [KeyboardInterrupt()])
    _scrubbed(group)
    assert type(group) is BaseExceptionGroup
    assert PASSWORD not in repr(group.args)


@pytest.mark.parametrize("count", [1, 2, 3])
def test_str_counts_as_the_built_in_one(count: int) -> None:
    errors = [ValueError(str(n)) for n in range(count)]
    plain = str(ExceptionGroup("m", errors))
    group = ExceptionGroup(f"m {DSN}", errors)
    _scrubbed(group)
    assert str(group).replace(" postgresql://app:***@db.internal:5432/orders", "") == plain
