"""Review h269: a patch of asyncpg's own ``Connection`` class is bypassed by
safepool's release.

Instrumentation and site-wide fixes patch methods on ``asyncpg.Connection``
itself rather than passing a ``connection_class``: Sentry's
``AsyncPGIntegration.setup_once()`` does ``asyncpg.Connection.execute =
_wrap_execute(asyncpg.Connection.execute)`` and records a span for each
``execute(query)`` without arguments. asyncpg's pool resets a released
connection through those methods (``Connection.reset()``, which calls
``self.execute(reset_query)``), so the patched methods run on every
release, as they would for a subclass overriding them.

safepool decides whether a connection class has "a method of its own" by
comparing the class's attribute with ``asyncpg.Connection``'s current one
(``_pg.overrides``, safepool/_internals.py:775, read for ``execute`` at
safepool/_holder.py:129; ``reset`` at safepool/_options.py:291): a patch of
asyncpg's class itself reads as asyncpg's own, and the release then sends
the reset to asyncpg's protocol directly (safepool/_leasing.py:627), so
a patched ``execute()`` is not called (no span for the reset) and a patched
``reset()`` never runs (the session state it restores is missing from the
next lease). Patching a subclass passed as ``connection_class`` works on
both pools (controls below; tests/integration/test_reset.py).

Fixed: ``_pg.overrides`` now tells asyncpg's own functions by their code
(a plain function in asyncpg's package, or the function this import found
there) rather than by identity with asyncpg's current attribute, so a patch
of asyncpg's class, made before or after safepool's import, is an override
wherever the pool would otherwise do asyncpg's work itself. The siblings
below pin each such shortcut: ``is_closed()``, ``_on_release()`` (which the
release did inline even for a subclass's own), the reset query's getter,
``_reset()`` (asyncpg 0.30+), ``_check_open()``, ``terminate()`` and
``close()`` at the idle expiry, reset_mode="auto"'s trust in asyncpg's
methods, and both orders of import.
"""

from __future__ import annotations

import asyncio
import functools
import os
import subprocess
import sys
import textwrap
import types
from typing import Any

import asyncpg
import pytest

import safepool
from safepool import _internals
from tests._util import asyncpg_version, until

pytestmark = pytest.mark.asyncio

FLAVOURS = ["asyncpg", "safepool"]


class AppConnection(asyncpg.Connection):  # type: ignore[misc]
    """A connection class of the application's (for the controls)."""


def _reset_query(con: Any) -> str:
    """asyncpg's reset query for ``con`` (0.29's getter is private)."""
    getter = con.get_reset_query if hasattr(asyncpg.Connection, "get_reset_query") else con._get_reset_query
    return str(getter())


def _factory(flavour: str) -> Any:
    return asyncpg.create_pool if flavour == "asyncpg" else safepool.create_pool


def _record_execute(monkeypatch: pytest.MonkeyPatch, cls: type, seen: list[str]) -> None:
    """Sentry's patch: a wrapper around ``cls.execute`` that records each
    query sent without arguments."""
    original = cls.execute

    async def execute(self: Any, query: str, *args: Any, **kwargs: Any) -> Any:
        if not args:
            seen.append(query)
        return await original(self, query, *args, **kwargs)

    monkeypatch.setattr(cls, "execute", execute)


async def _executes_seen_at_release(flavour: str, dsn: str, connection_class: type, seen: list[str]) -> list[str]:
    pool = await asyncio.wait_for(_factory(flavour)(dsn, min_size=1, max_size=1, connection_class=connection_class), 10)
    try:
        async with pool.acquire(timeout=5) as con:
            reset_query = _reset_query(con)
            assert await con.fetchval("SELECT 1") == 1  # (a statement: both pools reset this lease)
            seen.clear()
        return [query for query in seen if query == reset_query]
    finally:
        pool.terminate()


@pytest.mark.parametrize("flavour", FLAVOURS)
async def test_a_patched_connection_execute_sees_the_reset(
    flavour: str, pg_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[str] = []
    _record_execute(monkeypatch, asyncpg.Connection, seen)
    assert len(await _executes_seen_at_release(flavour, pg_dsn, asyncpg.Connection, seen)) == 1


@pytest.mark.parametrize("flavour", ["asyncpg", "safepool"])
async def test_control_a_patched_connection_class_execute_sees_the_reset(
    flavour: str, pg_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[str] = []
    _record_execute(monkeypatch, AppConnection, seen)
    assert len(await _executes_seen_at_release(flavour, pg_dsn, AppConnection, seen)) == 1


def _patch_reset(monkeypatch: pytest.MonkeyPatch, cls: type) -> None:
    """A site-wide fix: every released connection gets the application's
    schema back (a tenant's search_path set by a lease is never inherited)."""
    original = cls.reset

    async def reset(self: Any, *, timeout: float | None = None) -> None:
        await original(self, timeout=timeout)
        await self.execute("SET search_path TO pg_catalog, public")

    monkeypatch.setattr(cls, "reset", reset)


async def _search_path_after_a_lease(flavour: str, dsn: str, connection_class: type) -> str:
    pool = await asyncio.wait_for(_factory(flavour)(dsn, min_size=1, max_size=1, connection_class=connection_class), 10)
    try:
        async with pool.acquire(timeout=5) as con:
            await con.execute("SET search_path TO tenant_42")
        async with pool.acquire(timeout=5) as con:
            return str(await con.fetchval("SHOW search_path"))
    finally:
        pool.terminate()


@pytest.mark.parametrize("flavour", FLAVOURS)
async def test_a_patched_connection_reset_runs_at_release(
    flavour: str, pg_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    _patch_reset(monkeypatch, asyncpg.Connection)
    assert await _search_path_after_a_lease(flavour, pg_dsn, asyncpg.Connection) == "pg_catalog, public"


@pytest.mark.parametrize("flavour", ["asyncpg", "safepool"])
async def test_control_a_patched_connection_class_reset_runs_at_release(
    flavour: str, pg_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    _patch_reset(monkeypatch, AppConnection)
    assert await _search_path_after_a_lease(flavour, pg_dsn, AppConnection) == "pg_catalog, public"


# ---------------------------------------------------------------- overrides()


class _ObjectWrapper:
    """A wrapper object in the class, as wrapt's FunctionWrapper (what
    OpenTelemetry's asyncpg instrumentation installs): not a function, yet
    it passes for the one it wraps (its ``__class__``, ``__code__``, name)."""

    def __init__(self, wrapped: Any, seen: list[str] | None = None) -> None:
        self.__wrapped__ = wrapped
        self._seen = seen
        functools.update_wrapper(self, wrapped)

    @property  # type: ignore[misc]
    def __class__(self) -> type:  # noqa: D105
        return types.FunctionType

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__wrapped__, name)

    def __get__(self, instance: Any, owner: Any) -> Any:
        return self if instance is None else functools.partial(self, instance)

    def __call__(self, con: Any, query: str, *args: Any, **kwargs: Any) -> Any:
        if self._seen is not None and not args:
            self._seen.append(query)
        return self.__wrapped__(con, query, *args, **kwargs)


def _overridden(connection_class: type) -> list[str]:
    """The names of asyncpg's Connection methods ``connection_class`` has in
    place of asyncpg's."""
    return [name for name in _internals.CONNECTION_METHODS if _internals.overrides(connection_class, name)]


async def test_overrides_tells_asyncpg_s_own_functions_by_their_code(monkeypatch: pytest.MonkeyPatch) -> None:
    assert _overridden(asyncpg.Connection) == []
    assert not _internals.overrides(asyncpg.Connection, "query_logger")  # (contextlib's wrapper of asyncpg's)
    assert not _internals.overrides(asyncpg.Connection, "add_query_logger")  # (safepool's own patch)
    original = asyncpg.Connection.execute

    class Rebound(asyncpg.Connection):  # type: ignore[misc]
        execute = original

    assert not _internals.overrides(Rebound, "execute")

    @functools.wraps(original)
    async def wrapped(self: Any, *args: Any, **kwargs: Any) -> Any:
        return await original(self, *args, **kwargs)

    for patch in (wrapped, _ObjectWrapper(original)):
        monkeypatch.setattr(asyncpg.Connection, "execute", patch)
        assert _internals.overrides(asyncpg.Connection, "execute")
        assert _internals.overrides(AppConnection, "execute")  # (inherited: asyncpg's pool calls it)
        assert _overridden(asyncpg.Connection) == ["execute"]
    # Another of asyncpg's functions in its place is not asyncpg's execute.
    monkeypatch.setattr(asyncpg.Connection, "execute", asyncpg.Connection.fetch)
    assert _internals.overrides(asyncpg.Connection, "execute")
    monkeypatch.undo()
    assert not _internals.overrides(asyncpg.Connection, "execute")


_IMPORT_ORDER = """
from __future__ import annotations
import asyncio, functools, sys, types
from typing import Any
import asyncpg

seen = []
original = asyncpg.Connection.execute

async def function(self, query, *args, **kwargs):
    if not args:
        seen.append(query)
    return await original(self, query, *args, **kwargs)

{wrapper}

def patch():
    asyncpg.Connection.execute = function if sys.argv[3] == "function" else ObjectWrapper(original, seen)

if sys.argv[2] == "before":
    patch()
import safepool
if sys.argv[2] == "after":
    patch()

async def main():
    pool = await safepool.create_pool(sys.argv[1], min_size=1, max_size=1)
    try:
        async with pool.acquire(timeout=5) as con:
            getter = con.get_reset_query if hasattr(asyncpg.Connection, "get_reset_query") else con._get_reset_query
            reset_query = getter()
            assert await con.fetchval("SELECT 1") == 1
            seen.clear()
        print(sum(query == reset_query for query in seen))
    finally:
        pool.terminate()

asyncio.run(main())
"""


@pytest.mark.parametrize("kind", ["function", "object"])
@pytest.mark.parametrize("order", ["before", "after"])
async def test_a_patch_made_before_or_after_safepool_s_import_sees_the_reset(pg_dsn: str, order: str, kind: str) -> None:
    """Sentry may be initialised before safepool is imported or after it:
    a wrapper function (Sentry's) or a wrapper object (wrapt's, as
    OpenTelemetry's) gets the release's reset either way."""
    import inspect

    wrapper = textwrap.dedent(inspect.getsource(_ObjectWrapper)).replace("_ObjectWrapper", "ObjectWrapper")
    script = _IMPORT_ORDER.replace("{wrapper}", wrapper)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path for path in sys.path if path)}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", script, str(pg_dsn), order, kind,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, err.decode()
    assert out.decode().strip() == "1"


# ---------------------------------------------------------------- is_closed()


@pytest.mark.parametrize("flavour", FLAVOURS)
async def test_a_patched_connection_is_closed_is_asked_at_release(
    flavour: str, pg_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A health flag patched onto asyncpg's is_closed(): a connection it
    calls closed at release is given up and replaced (asyncpg's release
    asks is_closed(); safepool's read asyncpg's fields inline)."""
    if flavour == "asyncpg" and asyncpg_version() < (0, 32):
        pytest.skip("asyncpg < 0.32's pool never replaces it (test_reset.py's control says so)")
    retired = {"now": False}
    original = asyncpg.Connection.is_closed

    def is_closed(self: Any) -> bool:
        return retired["now"] or original(self)

    monkeypatch.setattr(asyncpg.Connection, "is_closed", is_closed)
    pool = await asyncio.wait_for(_factory(flavour)(pg_dsn, min_size=1, max_size=1), 10)
    try:
        async with pool.acquire(timeout=5) as con:
            first = await con.fetchval("SELECT pg_backend_pid()")
            retired["now"] = True
        retired["now"] = False
        async with pool.acquire(timeout=5) as con:
            assert await con.fetchval("SELECT pg_backend_pid()") != first
    finally:
        retired["now"] = False
        pool.terminate()


# ---------------------------------------------------------------- _on_release()


def _record_on_release(monkeypatch: pytest.MonkeyPatch, cls: type, calls: list[int]) -> None:
    original = cls._on_release

    def _on_release(self: Any, *args: Any, **kwargs: Any) -> None:
        calls.append(1)
        original(self, *args, **kwargs)

    monkeypatch.setattr(cls, "_on_release", _on_release)


async def _on_release_calls(flavour: str, dsn: str, connection_class: type, calls: list[int]) -> int:
    pool = await asyncio.wait_for(_factory(flavour)(dsn, min_size=1, max_size=1, connection_class=connection_class), 10)
    try:
        for _ in range(2):
            async with pool.acquire(timeout=5) as con:
                assert await con.fetchval("SELECT 1") == 1
        return len(calls)
    finally:
        pool.terminate()


@pytest.mark.parametrize("patched", ["asyncpg.Connection", "connection_class"])
@pytest.mark.parametrize("flavour", FLAVOURS)
async def test_a_patched_on_release_runs_at_every_release(
    flavour: str, patched: str, pg_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """asyncpg's pool calls the connection's _on_release() at every release;
    safepool's did its work inline when no listener was left, for a
    subclass's own too."""
    calls: list[int] = []
    cls = asyncpg.Connection if patched == "asyncpg.Connection" else AppConnection
    _record_on_release(monkeypatch, cls, calls)
    assert await _on_release_calls(flavour, pg_dsn, cls, calls) == 2


async def test_an_on_release_that_warns_releases_once_then_raises(
    pg_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A patched _on_release() that raises a warning (turned into an error):
    the release goes on without calling it again, then raises it, and the
    connection is back in the pool (asyncpg's pool loses it: safepool only)."""
    calls: list[int] = []
    original = asyncpg.Connection._on_release

    class Released(Warning):
        pass

    def _on_release(self: Any, *args: Any, **kwargs: Any) -> None:
        calls.append(1)
        original(self, *args, **kwargs)
        raise Released("released")

    pool = await asyncio.wait_for(safepool.create_pool(pg_dsn, min_size=1, max_size=1), 10)
    try:
        monkeypatch.setattr(asyncpg.Connection, "_on_release", _on_release)
        await pool.expire_connections()  # (the next connection's holder sees the patch)
        con = await pool.acquire(timeout=5)
        assert await con.fetchval("SELECT 1") == 1
        with pytest.raises(Released):
            await pool.release(con)
        assert calls == [1]
        await until(lambda: pool.get_idle_size() == 1)
        monkeypatch.undo()
        async with pool.acquire(timeout=5) as con:
            assert await con.fetchval("SELECT 1") == 1
    finally:
        pool.terminate()


# ---------------------------------------------------------------- the reset's parts


async def _calls_at_release(flavour: str, dsn: str, calls: list[str], leases: int = 3) -> list[str]:
    pool = await asyncio.wait_for(_factory(flavour)(dsn, min_size=1, max_size=1), 10)
    try:
        seen: list[str] = []
        for _ in range(leases):
            async with pool.acquire(timeout=5) as con:
                assert await con.fetchval("SELECT 1") == 1
                calls.clear()
            seen += calls
        return seen
    finally:
        pool.terminate()


@pytest.mark.parametrize("flavour", FLAVOURS)
async def test_a_patched_reset_query_getter_is_asked_at_every_reset(
    flavour: str, pg_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """asyncpg's reset asks get_reset_query() (0.29: _get_reset_query())
    at every release; safepool's read it once per connection."""
    name = "get_reset_query" if hasattr(asyncpg.Connection, "get_reset_query") else "_get_reset_query"
    original = getattr(asyncpg.Connection, name)
    calls: list[str] = []

    def getter(self: Any) -> str:
        calls.append(name)
        return str(original(self))

    monkeypatch.setattr(asyncpg.Connection, name, getter)
    assert await _calls_at_release(flavour, pg_dsn, calls) == [name] * 3


@pytest.mark.parametrize("flavour", FLAVOURS)
async def test_a_patched_private_reset_runs_at_release(
    flavour: str, pg_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """asyncpg 0.30+'s reset() calls _reset() first (0.32's pool calls it
    before a reset= hook): a patch of it runs at every release."""
    if not hasattr(asyncpg.Connection, "get_reset_query"):
        pytest.skip("asyncpg 0.29 has no Connection._reset()")
    original = asyncpg.Connection._reset
    calls: list[str] = []

    async def _reset(self: Any) -> None:
        calls.append("_reset")
        await original(self)

    monkeypatch.setattr(asyncpg.Connection, "_reset", _reset)
    assert await _calls_at_release(flavour, pg_dsn, calls) == ["_reset"] * 3


@pytest.mark.parametrize("flavour", FLAVOURS)
async def test_a_patched_check_open_runs_at_release(
    flavour: str, pg_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reset's execute() (and 0.30+'s _reset()) asks _check_open()
    first; safepool's inline reset awaited the protocol's query without it."""
    original = asyncpg.Connection._check_open
    calls: list[str] = []

    def _check_open(self: Any) -> None:
        calls.append("_check_open")
        original(self)

    monkeypatch.setattr(asyncpg.Connection, "_check_open", _check_open)
    seen = await _calls_at_release(flavour, pg_dsn, calls)
    assert seen and set(seen) == {"_check_open"}


# ---------------------------------------------------------------- terminate() and close()


def _record_pids(monkeypatch: pytest.MonkeyPatch, name: str, pids: list[int]) -> None:
    original = getattr(asyncpg.Connection, name)
    if name == "terminate":
        def method(self: Any) -> None:
            pids.append(self.get_server_pid())
            original(self)
    else:
        async def method(self: Any, *, timeout: float | None = None) -> None:  # type: ignore[misc]
            pids.append(self.get_server_pid())
            await original(self, timeout=timeout)
    monkeypatch.setattr(asyncpg.Connection, name, method)


@pytest.mark.parametrize("flavour", FLAVOURS)
@pytest.mark.parametrize("name", ["terminate", "close"])
async def test_patched_terminate_and_close_at_the_idle_expiry(
    flavour: str, name: str, pg_dsn: str, app_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past max_inactive_connection_lifetime asyncpg's pool calls the
    connection's terminate() (never close()); safepool closes a connection
    of asyncpg's own in its own way, and calls terminate() for a class with
    a close() or terminate() of its own: so for a patched one too."""
    pids: list[int] = []
    _record_pids(monkeypatch, name, pids)
    pool = await asyncio.wait_for(_factory(flavour)(
        pg_dsn, min_size=0, max_size=1, max_inactive_connection_lifetime=0.1,
        server_settings={"application_name": app_name},
    ), 10)
    try:
        async with pool.acquire(timeout=5) as con:
            pid = await con.fetchval("SELECT pg_backend_pid()")
        await until(lambda: pool.get_size() == 0)
        await asyncio.sleep(0.05)
        assert pids == ([pid] if name == "terminate" else [])
    finally:
        pool.terminate()


# ---------------------------------------------------------------- reset_mode="auto"


async def test_auto_mode_does_not_trust_a_patched_asyncpg_method(
    pg_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """reset_mode="auto" skips the reset of a lease whose statements leave
    the session as it was, as the proxy reads them; a connection class with
    asyncpg's methods of its own is never trusted (what they send is
    unknown), and nor is a patch of asyncpg's class: here fetchval() sends
    a statement of its own in place of the one asked for."""
    pytest.importorskip("pglast")
    original = asyncpg.Connection.fetchval

    async def fetchval(self: Any, query: str, *args: Any, **kwargs: Any) -> Any:
        if query == "SELECT 1":
            await original(self, "SELECT set_config('search_path', 'tenant_42', false)")
            return 1
        return await original(self, query, *args, **kwargs)

    monkeypatch.setattr(asyncpg.Connection, "fetchval", fetchval)
    pool = await asyncio.wait_for(safepool.create_pool(pg_dsn, min_size=1, max_size=1, reset_mode="auto"), 10)
    try:
        async with pool.acquire(timeout=5) as con:  # (a new connection's first lease is always reset)
            assert (await con.fetchrow("SELECT 1"))[0] == 1
        async with pool.acquire(timeout=5) as con:
            assert await con.fetchval("SELECT 1") == 1
        async with pool.acquire(timeout=5) as con:
            assert (await con.fetchrow("SHOW search_path"))[0] != "tenant_42"
    finally:
        pool.terminate()
