"""Acquire sites for bulkheads (``max_site_share``): who is acquiring.

A site is, in order: ``acquire(site="name")``; the name set by
:class:`site` for the current context (a context variable, so an ASGI
middleware can set it per route and every task it starts inherits it); else
the application function that called ``acquire()``, as ``module.qualname``,
found by walking frames (no stack is formatted) past safepool's, asyncpg's,
asyncio's and contextlib's own. Computed only when site caps are on.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import sys
from collections.abc import Callable
from contextvars import ContextVar, Token
from types import CodeType, TracebackType
from typing import Any, TypeVar

from ._stack import RESUMED, TASK_WRAPPERS, task_top
from .errors import PoolTypeError, PoolValueError, check_encodable, encodable

__all__ = ["site", "current_site", "caller_site"]

_current: ContextVar[str | None] = ContextVar("safepool_site", default=None)
# The tokens of the `with site(...)` blocks the current context is in,
# innermost last: kept per context, not on the site object, which concurrent
# tasks may share (a module-level `REPORTS = safepool.site("reports")`).
_entered: ContextVar[tuple[Token[str | None], ...]] = ContextVar("safepool_site_entered", default=())
F = TypeVar("F", bound=Callable[..., Any])

# Per code object: its site name, or "" for library frames to walk past.
# At most SITE_CACHE_SIZE entries, the oldest dropped first: code compiled
# at run time (exec(), templates, notebook cells) makes a new code object
# each time, and the cache would otherwise keep every one of them alive.
SITE_CACHE_SIZE = 4096
_site_of_code: dict[CodeType, str] = {}
_LIBRARIES = ("asyncpg", "asyncio", "contextlib", "functools", *TASK_WRAPPERS)


def _is_library(module: str) -> bool:
    top, _, rest = module.partition(".")
    if top == "safepool":
        # safepool's own modules; its subpackages (the replay demo) are applications.
        return "." not in rest
    return top in _LIBRARIES


def caller_site(depth: int = 1) -> str:
    """``module.qualname`` of the innermost application frame above the
    caller, within the running task: a task whose own coroutine is a
    library's (``asyncio.gather(pool.fetchval(...))``) is named by that
    coroutine, not by the code that runs the event loop."""
    frame = start = sys._getframe(depth)
    while frame is not None:
        code = frame.f_code
        name = _site_of_code.get(code)
        if name is None:
            module = str(frame.f_globals.get("__name__", "?"))
            # (encodable: a module named from undecodable bytes would label
            # the site metrics with a lone surrogate; review h262)
            name = "" if _is_library(module) else encodable(f"{module}.{code.co_qualname}")
            _remember(code, name)
        if name:
            return name
        back = frame.f_back
        if back is not None and code.co_flags & RESUMED and not back.f_code.co_flags & RESUMED:
            # The top of the task: the coroutine it runs, or, where that is
            # a task wrapper's (anyio's), the coroutine the wrapper runs.
            frame = task_top(start, frame)
            return encodable(f"{frame.f_globals.get('__name__', '?')}.{frame.f_code.co_qualname}")
        frame = back  # type: ignore[assignment]
    return "unknown"


def _remember(code: CodeType, name: str) -> None:
    if len(_site_of_code) >= SITE_CACHE_SIZE:
        try:
            del _site_of_code[next(iter(_site_of_code))]
        except (KeyError, RuntimeError, StopIteration):  # another thread (another pool's loop) got there first
            pass
    _site_of_code[code] = name


def current_site() -> str | None:
    """The name set by an enclosing :class:`site`, or None."""
    return _current.get()


class site:  # noqa: N801 - used like a function: `with safepool.site("checkout"):`
    """Name the acquire site of every ``acquire()`` in this context (and the
    tasks it starts), for ``max_site_share`` and per-site statistics.

    ``with safepool.site("GET /orders"): ...`` (``async with`` alike), or as a decorator of a sync or
    async function (an async generator function too: the site holds during
    its steps). One object may be shared (made once, at module level)
    and entered by concurrent tasks. An explicit ``acquire(site=...)`` wins
    over it.

    :raises safepool.PoolTypeError: (a ``TypeError``) ``name`` is not a
        string, or what it decorates is not callable.
    :raises safepool.PoolValueError: (a ``ValueError``) ``name`` is empty,
        or UTF-8 cannot encode it (a lone surrogate: it labels metrics).
    """

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        if not isinstance(name, str):
            raise PoolTypeError(f"a site name must be a non-empty string, got {name!r}")
        if not name:
            raise PoolValueError("a site name must be a non-empty string, got ''")
        self.name = check_encodable("a site name", name)  # (a metric label: review h262)

    def __enter__(self) -> site:
        _entered.set((*_entered.get(), _current.set(self.name)))
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        *outer, token = _entered.get()
        _entered.set(tuple(outer))
        _current.reset(token)

    # `async with safepool.site(...)` works too: the same as `with` (the site
    # is a context variable, set in the task that enters; nothing to await).
    # Without these, a newcomer's guess got Python's "does not support the
    # asynchronous context manager protocol" (review h218).
    async def __aenter__(self) -> site:
        return self.__enter__()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.__exit__(exc_type, exc, tb)

    def __call__(self, func: F) -> F:
        if not callable(func):
            # Taken, it made a wrapper that failed at each call ("'int'
            # object is not callable"), far from the mistake.
            raise PoolTypeError(f"safepool.site({self.name!r}) decorates a function, got {type(func).__name__}")
        name = self.name
        if inspect.isasyncgenfunction(func):
            # An async generator (a FastAPI dependency that yields a
            # connection, a row stream): the site holds during each of its
            # steps, and not in the consumer between them. (Wrapped as a sync
            # function, the site was gone before its first step.)

            @functools.wraps(func)
            async def run_steps(*args: Any, **kwargs: Any) -> Any:
                steps = func(*args, **kwargs)
                sent: Any = None
                thrown: BaseException | None = None
                try:
                    while True:
                        token = _current.set(name)
                        try:
                            if thrown is None:
                                item = await steps.asend(sent)
                            else:
                                error, thrown = thrown, None
                                item = await steps.athrow(error)
                        except StopAsyncIteration:
                            return
                        finally:
                            _current.reset(token)
                        try:
                            sent = yield item
                        except GeneratorExit:
                            raise
                        except BaseException as exc:  # athrow(): handed to the generator
                            sent, thrown = None, exc
                finally:
                    token = _current.set(name)
                    try:
                        await steps.aclose()
                    finally:
                        _current.reset(token)

            return run_steps  # type: ignore[return-value]
        if inspect.iscoroutinefunction(func):

            @functools.wraps(func)
            async def run_async(*args: Any, **kwargs: Any) -> Any:
                token = _current.set(name)
                try:
                    return await func(*args, **kwargs)
                finally:
                    _current.reset(token)

            return run_async  # type: ignore[return-value]

        @functools.wraps(func)
        def run(*args: Any, **kwargs: Any) -> Any:
            token = _current.set(name)
            try:
                result: Any = func(*args, **kwargs)
            finally:
                _current.reset(token)
            if type(result) is _GeneratorContextManager:
                # A function made by contextlib.asynccontextmanager: its
                # generator runs later, in __aenter__ and __aexit__, after
                # this call returned (the acquire in it got the caller's
                # site). The same object, made to run them under the site.
                _hold_site(result, name)
            return result

        return run  # type: ignore[return-value]

    def __repr__(self) -> str:
        return f"safepool.site({self.name!r})"


# contextlib's class for what an asynccontextmanager function returns (3.7+;
# a private name: None if a Python ever drops it, and the site then covers
# only the call, as for any other plain function).
_GeneratorContextManager: type | None = getattr(contextlib, "_AsyncGeneratorContextManager", None)


class _GeneratorContextManagerUnderSite(_GeneratorContextManager or object):  # type: ignore[misc]
    """An ``asynccontextmanager`` function's context manager, made by a
    function :class:`site` decorates: its generator's steps (``__aenter__``,
    ``__aexit__``) run with the site current. The object keeps its identity
    and stays an instance of contextlib's class; only these two methods
    change. (Used as a decorator, its ``_recreate_cm`` copies the site.)"""

    safepool_site: str

    async def __aenter__(self) -> Any:
        token = _current.set(self.safepool_site)
        try:
            return await super().__aenter__()
        finally:
            _current.reset(token)

    async def __aexit__(self, *exc_info: Any) -> Any:
        token = _current.set(self.safepool_site)
        try:
            return await super().__aexit__(*exc_info)
        finally:
            _current.reset(token)

    def _recreate_cm(self) -> Any:
        again = super()._recreate_cm()
        _hold_site(again, self.safepool_site)
        return again


def _hold_site(manager: Any, name: str) -> None:
    """Make contextlib's ``manager`` (an ``_AsyncGeneratorContextManager``)
    enter and exit under the site ``name``, in place: the same object."""
    manager.__class__ = _GeneratorContextManagerUnderSite
    manager.safepool_site = name
