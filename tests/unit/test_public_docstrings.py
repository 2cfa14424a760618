"""Every public class, function, method and property of safepool's public
modules has a docstring (the house rule: public docstrings give shapes,
units, the errors raised and, for behaviour taken from elsewhere, the
source). pytest's hook functions of the plugin are pytest's API, documented
by pytest, and are left out."""

from __future__ import annotations

import dataclasses
import importlib
import inspect
from collections.abc import Iterator

import pytest
from asyncpg import connection as _pg_connection

PUBLIC_MODULES = (
    "safepool",
    "safepool.check",
    "safepool.errors",
    "safepool.events",
    "safepool.health",
    "safepool.metrics.otel",
    "safepool.metrics.prometheus",
    "safepool.pool",
    "safepool.proxy",
    "safepool.stats",
    "safepool.testing",
    "safepool.testing.guards",
)


def _public_names(module: object) -> list[str]:
    names = getattr(module, "__all__", None)
    if names is not None:
        return list(names)
    return [name for name in vars(module) if not name.startswith("_")]


def _undocumented(module_name: str) -> Iterator[str]:
    module = importlib.import_module(module_name)
    for name in _public_names(module):
        obj = getattr(module, name)
        if not (inspect.isclass(obj) or inspect.isfunction(obj)):
            continue
        # Names a module imports from elsewhere are checked where they live
        # (safepool's __all__ re-exports them: checked here too).
        if module_name != "safepool" and getattr(obj, "__module__", None) != module_name:
            continue
        if name.startswith("pytest_"):
            continue
        doc = _own_class_doc(obj) if inspect.isclass(obj) else inspect.getdoc(obj)
        if not doc:
            yield f"{module_name}.{name}"
            continue
        if not inspect.isclass(obj):
            continue
        for member, value in vars(obj).items():
            if member.startswith("_"):
                continue
            if isinstance(value, (staticmethod, classmethod)):
                value = value.__func__
            base = getattr(_pg_connection.Connection, member, None)
            if base is not None and not inspect.getdoc(base):
                # An asyncpg method the proxy forwards with asyncpg's own
                # docstring, which this asyncpg release lacks (0.29's reset()).
                continue
            # (An override with none keeps its base method's: getdoc finds it.)
            if (inspect.isfunction(value) or isinstance(value, property)) and not inspect.getdoc(value):
                yield f"{module_name}.{name}.{member}"


def _own_class_doc(cls: type) -> str | None:
    """The class's own docstring: not a base class's (which inspect.getdoc
    returns), nor the signature @dataclass writes in place of a missing one."""
    doc = vars(cls).get("__doc__")
    if doc and dataclasses.is_dataclass(cls) and doc.startswith(f"{cls.__name__}("):
        return None
    return doc


@pytest.mark.parametrize("module_name", PUBLIC_MODULES)
def test_public_api_has_docstrings(module_name: str) -> None:
    assert list(_undocumented(module_name)) == []


def test_the_check_sees_a_missing_docstring() -> None:
    # The check itself can fail: a public module with an undocumented method.
    import sys
    import types

    module = types.ModuleType("safepool_docstring_probe")

    class Documented:
        """Has a docstring; its method has none."""

        def method(self) -> None:
            pass

    @dataclasses.dataclass
    class Record:  # @dataclass gives it a __doc__: its signature
        value: int

    class Subclass(Documented):  # inspect.getdoc gives it its base's
        pass

    for cls in (Documented, Record, Subclass):
        cls.__module__ = module.__name__
        setattr(module, cls.__name__, cls)
    sys.modules[module.__name__] = module
    try:
        assert list(_undocumented(module.__name__)) == [
            "safepool_docstring_probe.Documented.method",
            "safepool_docstring_probe.Record",
            "safepool_docstring_probe.Subclass",
        ]
    finally:
        del sys.modules[module.__name__]
