"""Helper 231: a hunt for the pool's password in what safepool raises,
logs, reports and exports (after review h228's fix, commit 72bb9df: the
pool's line for an error is masked when written).

Pinned (they pass): a failed connect to a closed port with the password
given every way (``password=``, in the DSN, percent-encoded with "@" and
"/", as a ``?password=`` query parameter, a DSN without one plus
``password=``, the DSN as ``dsn=``) in the raised error and its chain (``create_pool``'s and an
acquire's), the log records (message, fields, traceback), events,
``stats()``, ``health()``, ``repr(pool)``, ``pool.options``,
``pool.leases()``, the Prometheus exposition and the OpenTelemetry points;
the same after ``set_connect_args()`` rotated to another password (a DSN,
then keywords); an ``init=`` hook's ``ExceptionGroup`` quoting the DSN
(its sub-exceptions, its ``args``, the pool's records, stats and health);
an error keeping the DSN in a ``__slots__`` attribute (the pool's lines);
an ``init=`` hook's error whose ``__cause__`` and ``__context__`` quote
the DSN or the ``password=`` value (masked down the chain);
the leak warning and the leak report with the password on the acquire
line; the leak report of a lease whose ``reset=`` hook quotes the DSN.

Leaks found, fixed the same day (the tests below pass): a PEP 678 note on
a hook's or ``connect=`` callback's error (``__notes__`` is now rewritten
with the other str attributes); after ``set_connect_args()``, a connect
error that quoted the old password in a tuple (``stats()``, ``health()``
and the breaker's refusal mask the last connect arguments' secrets too,
``Reporter.retire_connect_args``); ``health()``'s ``probe_failed`` reason
(``str(exc)``: now ``Reporter.describe``); a ``reset=`` hook's or a
connection class's ``reset()`` error raised to the releasing code (now
scrubbed in ``Runner.reset_done``).

Strict xfail, documented (docs/metrics.md): an ``init=`` hook's
``ExceptionGroup`` whose own message quotes the DSN is raised with the
password in ``str()`` and its traceback: a group's ``str()`` reads its
read-only ``message`` (its ``args`` and sub-exceptions come back masked,
and the pool's lines are).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import traceback
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import asyncpg
import pytest

import safepool
from safepool.testing import LeakError, assert_no_leaks

from .conftest import closed_port

PASSWORD = "h231-Secret-9f3kq7"
pytestmark = pytest.mark.asyncio


def _with_password(pg_dsn: str, password: str = PASSWORD) -> str:
    parts = urlsplit(pg_dsn)
    user = parts.username or "postgres"
    return urlunsplit(parts._replace(netloc=f"{user}:{quote(password, safe='')}@{parts.netloc.rpartition('@')[2]}"))


def _user(pg_dsn: str) -> str:
    return urlsplit(pg_dsn).username or "postgres"


def _everything(error: BaseException | None) -> str:
    if error is None:
        return ""
    return "".join(traceback.format_exception(error)) + repr(error) + repr(getattr(error, "__dict__", {}))


def _records(caplog: pytest.LogCaptureFixture) -> str:
    out = []
    for record in caplog.records:
        out.append(record.getMessage())
        out.append(repr(record.__dict__))
        if record.exc_info:
            out.append("".join(traceback.format_exception(*record.exc_info)))
    return "\n".join(out)


def _closed_port_connect_args(pg_dsn: str, how: str, password: str) -> tuple[tuple[Any, ...], dict[str, Any]]:
    port = closed_port()
    user = _user(pg_dsn)
    if how == "kwarg":
        return (), {"host": "127.0.0.1", "port": port, "user": user, "password": password, "database": "postgres"}
    if how == "dsn-and-kwarg":
        return (f"postgresql://{user}@127.0.0.1:{port}/postgres",), {"password": password}
    if how == "dsn":
        return (f"postgresql://{user}:{quote(password, safe='')}@127.0.0.1:{port}/postgres",), {}
    if how == "dsn-percent":
        return (f"postgresql://{user}:{quote(password + '@/x', safe='')}@127.0.0.1:{port}/postgres",), {}
    if how == "query":
        return (f"postgresql://{user}@127.0.0.1:{port}/postgres?password={quote(password, safe='')}",), {}
    if how == "dsn-keyword":
        return (), {"dsn": f"postgresql://{user}:{quote(password, safe='')}@127.0.0.1:{port}/postgres"}
    raise AssertionError(how)


async def _collect_prometheus_and_otel(pool: safepool.Pool) -> str:
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from prometheus_client import CollectorRegistry, generate_latest

    from safepool.metrics.otel import instrument
    from safepool.metrics.prometheus import register

    registry = CollectorRegistry()
    register(pool, registry=registry)
    text = generate_latest(registry).decode()
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    try:
        instrument(pool, meter_provider=provider)
        data = reader.get_metrics_data()
        text += repr(data.to_json() if data is not None else None)
    finally:
        provider.shutdown()
    assert "safepool" in text
    return text


@pytest.mark.parametrize("how", ["kwarg", "dsn-and-kwarg", "dsn", "dsn-percent", "query", "dsn-keyword"])
async def test_a_failed_connect_to_a_closed_port_keeps_the_password_out_of_everything(
    pg_dsn: str, caplog: pytest.LogCaptureFixture, how: str
) -> None:
    args, kwargs = _closed_port_connect_args(pg_dsn, how, PASSWORD)
    caplog.set_level(logging.DEBUG)
    events: list[Any] = []
    # create_pool's own connect fails: raised.
    with pytest.raises(OSError) as first:
        await safepool.create_pool(*args, min_size=1, max_size=2, **kwargs)
    assert PASSWORD not in _everything(first.value)
    # A pool with no floor: the acquire's connect fails, with events, stats and health.
    pool = await safepool.create_pool(*args, min_size=0, max_size=2, fail_fast=True, **kwargs)
    try:
        pool.add_listener(events.append)
        typed: list[Any] = []
        pool.add_event_listener(typed.append)
        errors = []
        for _ in range(2):
            with pytest.raises(Exception) as raised:
                await pool.acquire(timeout=2)
            errors.append(raised.value)
        await asyncio.sleep(0)
        seen = "\n".join(_everything(e) for e in errors)
        seen += repr(pool) + repr(pool.stats()) + repr(pool.options) + repr(events) + repr(typed)
        seen += repr((await pool.health(probe=False)).to_dict())
        seen += repr(pool.leases())
        seen += await _collect_prometheus_and_otel(pool)
    finally:
        pool.terminate()
    assert pool.stats().connect_failures if hasattr(pool.stats(), "connect_failures") else True
    assert PASSWORD not in seen
    assert PASSWORD not in _records(caplog)


async def test_set_connect_args_rotation_masks_the_new_password_in_a_failed_connect(
    pg_dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    old = "h231-Old-Secret-77aa"
    caplog.set_level(logging.DEBUG)
    pool = await safepool.create_pool(_with_password(pg_dsn, old), min_size=0, max_size=2)
    try:
        async with pool.acquire() as con:
            assert await con.fetchval("SELECT 1") == 1
        args, kwargs = _closed_port_connect_args(pg_dsn, "dsn", PASSWORD)
        pool.set_connect_args(*args, **kwargs)
        await pool.expire_connections()
        with pytest.raises(OSError) as raised:
            await pool.acquire(timeout=2)
        seen = _everything(raised.value) + repr(pool.stats()) + repr((await pool.health(probe=False)).to_dict())
        # And rotated to a password= keyword with no DSN.
        args, kwargs = _closed_port_connect_args(pg_dsn, "kwarg", PASSWORD)
        pool.set_connect_args(**kwargs)
        with pytest.raises(OSError) as raised:
            await pool.acquire(timeout=2)
        seen += _everything(raised.value) + repr(pool.stats())
    finally:
        pool.terminate()
    for secret in (PASSWORD, old):
        assert secret not in seen
        assert secret not in _records(caplog)


async def _init_group_failure(pg_dsn: str) -> tuple[ExceptionGroup, str]:
    dsn = _with_password(pg_dsn)
    calls = 0

    async def init(con: asyncpg.Connection) -> None:
        nonlocal calls
        calls += 1
        if calls > 1:
            raise ExceptionGroup(
                f"init failed for {dsn}", [ValueError(f"cannot prepare {dsn}"), KeyError(PASSWORD)]
            )

    pool = await safepool.create_pool(dsn, min_size=1, max_size=2, init=init)
    try:
        async with pool.acquire():
            with pytest.raises(ExceptionGroup) as raised:
                async with pool.acquire():
                    pass
        seen = repr(pool.stats()) + repr((await pool.health(probe=False)).to_dict())
    finally:
        pool.terminate()
    return raised.value, seen


async def test_an_init_hook_exception_group_quoting_the_dsn_is_masked_where_the_pool_says_it(
    pg_dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    group, seen = await _init_group_failure(pg_dsn)
    assert "init hook failed" in _records(caplog)
    # The pool's records, stats and health; the group's sub-exceptions and its args.
    assert PASSWORD not in seen + _records(caplog)
    assert PASSWORD not in "".join(traceback.format_exception(group.exceptions[0])) + repr(group.exceptions)
    assert PASSWORD not in repr(group.args)


async def test_an_init_hook_exception_group_message_quoting_the_dsn_is_masked(pg_dsn: str) -> None:
    group, _ = await _init_group_failure(pg_dsn)
    assert PASSWORD not in str(group)
    assert PASSWORD not in "".join(traceback.format_exception(group))


@pytest.mark.parametrize("hook", ["init", "setup", "connect"])
async def test_a_hook_error_with_a_note_quoting_the_dsn_is_masked(pg_dsn: str, hook: str) -> None:
    dsn = _with_password(pg_dsn)
    calls = 0

    def failure() -> RuntimeError:
        error = RuntimeError("cannot prepare the session")
        error.add_note(f"while connecting to {dsn}")
        return error

    async def init(con: asyncpg.Connection) -> None:
        nonlocal calls
        calls += 1
        if calls > 1:
            raise failure()

    async def setup(con: Any) -> None:
        raise failure()

    async def connect(*args: Any, **kwargs: Any) -> asyncpg.Connection:
        nonlocal calls
        calls += 1
        if calls > 1:
            raise failure()
        return await asyncpg.connect(*args, **kwargs)

    hooks: dict[str, Any] = {"init": {"init": init}, "setup": {"setup": setup}, "connect": {"connect": connect}}[hook]
    pool = await safepool.create_pool(dsn, min_size=1, max_size=2, **hooks)
    try:
        async with pool.acquire() if hook != "setup" else _nothing():
            with pytest.raises(RuntimeError) as raised:
                async with pool.acquire():
                    pass
    finally:
        pool.terminate()
    assert "cannot prepare" in str(raised.value)
    assert PASSWORD not in _everything(raised.value)


class _nothing:
    async def __aenter__(self) -> None:
        return None

    async def __aexit__(self, *exc: object) -> None:
        return None


async def test_the_leak_warning_and_lease_timeout_mask_a_dsn_on_the_acquire_line(
    pg_dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    dsn = _with_password(pg_dsn)
    caplog.set_level(logging.DEBUG)
    pool = await safepool.create_pool(dsn, min_size=1, max_size=1, capture_stack=True, leak_warning_after=0.05)
    events: list[Any] = []
    try:
        pool.add_listener(events.append)
        con = await pool.acquire(); secret = PASSWORD; note = f"postgresql://app:{PASSWORD}@db/x"  # noqa: E702
        await asyncio.sleep(0.2)
        seen = repr(pool.leases()) + repr(events) + repr(secret and note and None)
        await pool.release(con)
    finally:
        pool.terminate()
    assert any("leak" in r.getMessage().lower() for r in caplog.records) or events
    assert PASSWORD not in seen
    assert PASSWORD not in _records(caplog)


async def test_the_leak_report_masks_a_dsn_on_the_acquire_line(pg_dsn: str) -> None:
    dsn = _with_password(pg_dsn)
    pool = await safepool.create_pool(dsn, min_size=1, max_size=1)
    try:
        with pytest.raises(LeakError) as raised:
            async with assert_no_leaks(pool):
                con = await pool.acquire(); where = PASSWORD  # noqa: E702
                assert where
    finally:
        pool.terminate()
    assert "leaked" in str(raised.value)
    assert PASSWORD not in str(raised.value)
    del con


async def test_the_leak_report_masks_a_reset_hook_error_quoting_the_dsn(
    pg_dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    dsn = _with_password(pg_dsn)

    async def reset(con: asyncpg.Connection) -> None:
        raise ValueError(f"cannot reset the session of {dsn}")

    caplog.set_level(logging.DEBUG)
    pool = await safepool.create_pool(dsn, min_size=1, max_size=1, reset=reset)
    try:
        with pytest.raises(LeakError) as raised:
            async with assert_no_leaks(pool):
                con = await pool.acquire()
                await con.fetchval("SELECT 1")
    finally:
        pool.terminate()
    report = str(raised.value)
    assert "leaked" in report
    assert PASSWORD not in report
    assert PASSWORD not in _records(caplog)
    del con


class _SlotsError(Exception):
    """An error keeping its DSN in a slot (no ``__dict__`` entry)."""

    __slots__ = ("dsn",)

    def __init__(self, dsn: str) -> None:
        super().__init__("cannot prepare the session")
        self.dsn = dsn

    def __str__(self) -> str:
        return f"cannot prepare the session on {self.dsn}"


async def test_an_init_hook_error_with_the_dsn_in_a_slot_is_masked_where_the_pool_says_it(
    pg_dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    dsn = _with_password(pg_dsn)
    calls = 0

    async def init(con: asyncpg.Connection) -> None:
        nonlocal calls
        calls += 1
        if calls > 1:
            raise _SlotsError(dsn)

    caplog.set_level(logging.DEBUG)
    pool = await safepool.create_pool(dsn, min_size=1, max_size=2, init=init)
    try:
        async with pool.acquire():
            with pytest.raises(_SlotsError):
                async with pool.acquire():
                    pass
        seen = repr(pool.stats()) + repr((await pool.health(probe=False)).to_dict())
    finally:
        pool.terminate()
    assert "init hook failed" in _records(caplog)
    assert PASSWORD not in seen + _records(caplog)


def _rotation_connect(old_password: str, error: type[Exception] = PermissionError) -> Any:
    async def connect(*args: Any, **kwargs: Any) -> asyncpg.Connection:
        if kwargs.get("password") == old_password:
            # A proxy's (or a secrets manager's) own error quoting the
            # credentials it was given, in a tuple: not rewritable in place
            # (docs/metrics.md), masked when the pool's line is written.
            if issubclass(error, ConnectionRefusedError):  # with its errno: the server refused, the breaker opens
                raise error(errno.ECONNREFUSED, "credentials rejected", (kwargs.get("user"), kwargs["password"]))
            raise error(("credentials rejected", kwargs.get("user"), kwargs["password"]))
        return await asyncpg.connect(*args, **kwargs)

    return connect


async def test_stats_and_health_mask_the_old_password_after_set_connect_args(pg_dsn: str) -> None:
    user = _user(pg_dsn)
    pool = await safepool.create_pool(
        pg_dsn, user=user, password=PASSWORD, min_size=0, max_size=2, connect=_rotation_connect(PASSWORD)
    )
    try:
        with pytest.raises(PermissionError):
            await pool.acquire(timeout=2)
        before = repr(pool.stats()) + repr((await pool.health(probe=False)).to_dict())
        # The credentials are rotated after the failure, as an application does.
        pool.set_connect_args(pg_dsn, user=user, password="h231-New-Secret-31xq")
        seen = repr(pool.stats()) + repr((await pool.health(probe=False)).to_dict())
    finally:
        pool.terminate()
    assert "credentials rejected" in before and PASSWORD not in before  # masked while these are the arguments
    assert "credentials rejected" in seen
    assert PASSWORD not in seen


async def _until_the_breaker_refuses(pool: Any) -> safepool.ServerUnavailableError:
    """Acquire until the refused connects open the breaker (at most five
    tries); its refusal."""
    for _ in range(5):
        with pytest.raises((ConnectionRefusedError, safepool.ServerUnavailableError)) as refused:
            await pool.acquire(timeout=2)
        if isinstance(refused.value, safepool.ServerUnavailableError):
            return refused.value
    raise AssertionError("the breaker did not open")


async def test_the_breaker_refusal_masks_the_old_password_after_set_connect_args(pg_dsn: str) -> None:
    user = _user(pg_dsn)
    pool = await safepool.create_pool(
        pg_dsn, user=user, password=PASSWORD, min_size=0, max_size=2, fail_fast=True,
        # Half a second between the connects (refused: "nothing listening"); three open the breaker.
        backoff=safepool.Backoff(base=1.0, cap=1.0, refused_cap=1.0, unreachable_cap=1.0, rng=lambda: 0.0),
        connect=_rotation_connect(PASSWORD, ConnectionRefusedError),
    )
    try:
        refusal = await _until_the_breaker_refuses(pool)
        assert PASSWORD not in str(refusal)  # masked while these are the pool's arguments
        pool.set_connect_args(pg_dsn, user=user, password="h231-New-Secret-31xq")
        # (Since review h270 the new arguments are tried at once, not after
        # the old ones' backoff: the rotated password connects.)
        async with pool.acquire(timeout=2) as con:
            assert await con.fetchval("SELECT 1") == 1
    finally:
        pool.terminate()


async def test_a_refusal_after_rotating_to_another_rejected_password_masks_both(pg_dsn: str) -> None:
    """The new arguments' probe fails too (h270: tried at once): the
    breaker opens again on its error, which quotes the new password; neither
    the old nor the new shows."""
    user = _user(pg_dsn)
    new = "h231-New-Secret-31xq"

    async def connect(*args: Any, **kwargs: Any) -> asyncpg.Connection:
        raise ConnectionRefusedError(errno.ECONNREFUSED, "credentials rejected", (kwargs.get("user"), kwargs["password"]))

    pool = await safepool.create_pool(
        pg_dsn, user=user, password=PASSWORD, min_size=0, max_size=2, fail_fast=True,
        backoff=safepool.Backoff(base=1.0, cap=1.0, refused_cap=1.0, unreachable_cap=1.0, rng=lambda: 0.0),
        connect=connect,
    )
    seen: list[str] = []
    try:
        await _until_the_breaker_refuses(pool)
        pool.set_connect_args(pg_dsn, user=user, password=new)
        for _ in range(2):  # the probe's own error, then the refusal of the circuit it opened again
            with pytest.raises((ConnectionRefusedError, safepool.ServerUnavailableError)) as refused:
                await pool.acquire(timeout=2)
            seen.append(pool.describe_error(refused.value) + str(refused.value) + repr(pool.stats()))
    finally:
        pool.terminate()
    assert isinstance(refused.value, safepool.ServerUnavailableError)
    assert all("credentials rejected" in text for text in seen)
    assert not any(PASSWORD in text or new in text for text in seen)


def _failing_hooks(dsn: str, how: str) -> dict[str, Any]:
    """Hooks whose error quotes the DSN: ``tuple`` in a tuple argument
    (not rewritable in place), ``group`` in an ExceptionGroup's message."""

    def error() -> Exception:
        if how == "tuple":
            return ConnectionError(("the proxy refused", dsn))
        return ExceptionGroup(f"cannot prepare the session on {dsn}", [ValueError("bad statement")])

    async def connect(*args: Any, **kwargs: Any) -> asyncpg.Connection:
        raise error()

    async def setup(con: Any) -> None:
        raise error()

    return {"connect": connect} if how == "tuple" else {"setup": setup}


@pytest.mark.parametrize("how", ["tuple", "group"])
async def test_the_health_probe_masks_a_hook_error_quoting_the_dsn(
    pg_dsn: str, caplog: pytest.LogCaptureFixture, how: str
) -> None:
    dsn = _with_password(pg_dsn)
    caplog.set_level(logging.DEBUG)
    pool = await safepool.create_pool(dsn, min_size=0, max_size=1, **_failing_hooks(dsn, how))
    try:
        report = await pool.health(probe=True, probe_timeout=2.0)
        stats = repr(pool.stats())
    finally:
        pool.terminate()
    probe = [reason.message for reason in report.reasons if reason.code == "probe_failed"]
    others = [reason.message for reason in report.reasons if reason.code != "probe_failed"]
    assert len(probe) == 1 and "the probe failed" in probe[0]
    # What the pool logs and counts of the same error is masked (review h228).
    assert PASSWORD not in stats + _records(caplog) + repr(others)
    assert PASSWORD not in probe[0], probe[0]


class _ResetQuotesTheDsn(asyncpg.Connection):  # type: ignore[misc]
    dsn = ""

    async def reset(self, *, timeout: Any = None) -> None:
        raise ValueError(f"cannot reset the session of {self.dsn}")


@pytest.mark.parametrize("how", ["reset-hook", "connection-class"])
async def test_a_reset_error_quoting_the_dsn_is_raised_masked(pg_dsn: str, how: str) -> None:
    dsn = _with_password(pg_dsn)

    async def reset(con: asyncpg.Connection) -> None:
        raise ValueError(f"cannot reset the session of {dsn}")

    kwargs: dict[str, Any]
    if how == "reset-hook":
        kwargs = {"reset": reset}
    else:
        _ResetQuotesTheDsn.dsn = dsn
        kwargs = {"connection_class": _ResetQuotesTheDsn}
    pool = await safepool.create_pool(dsn, min_size=1, max_size=1, **kwargs)
    try:
        with pytest.raises(ValueError) as raised:
            async with pool.acquire() as con:
                await con.fetchval("SELECT 1")
    finally:
        pool.terminate()
    assert "cannot reset" in str(raised.value)
    assert PASSWORD not in _everything(raised.value)


@pytest.mark.parametrize("where", ["dsn-keyword", "password-keyword"])
async def test_an_init_hook_error_caused_by_one_quoting_the_secret_is_masked_down_the_chain(
    pg_dsn: str, caplog: pytest.LogCaptureFixture, where: str
) -> None:
    # The DSN given as dsn=, or the password as password= (with a DSN without one).
    kwargs: dict[str, Any] = (
        {"dsn": _with_password(pg_dsn)} if where == "dsn-keyword" else {"dsn": pg_dsn, "password": PASSWORD}
    )
    secret = kwargs["dsn"] if where == "dsn-keyword" else PASSWORD
    calls = 0

    async def init(con: asyncpg.Connection) -> None:
        nonlocal calls
        calls += 1
        if calls > 1:
            try:
                raise ValueError(f"cannot prepare with {secret}")
            except ValueError:
                raise RuntimeError("the init hook failed") from KeyError(f"cause {secret}")  # (the ValueError: context)

    caplog.set_level(logging.DEBUG)
    pool = await safepool.create_pool(min_size=1, max_size=2, init=init, **kwargs)
    try:
        async with pool.acquire():
            with pytest.raises(RuntimeError) as raised:
                async with pool.acquire():
                    pass
        seen = repr(pool.stats()) + repr((await pool.health(probe=False)).to_dict())
    finally:
        pool.terminate()
    text = _everything(raised.value) + _everything(raised.value.__context__)
    assert "cause " in text and "cannot prepare with " in text and "***" in text
    assert PASSWORD not in text + seen + _records(caplog)
