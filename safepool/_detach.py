"""Run a pool-owned coroutine in the awaiting task until that task is cancelled.

asyncpg's ``release()`` shields its reset (``asyncio.shield``): the reset runs
in a task of its own, so cancelling the caller cannot interrupt a statement
half-way. That costs a task and two extra loop iterations per release.
:func:`detached` gives the same guarantee without them: the caller's task
drives the coroutine itself (no task, no extra wake-up), and only if the
caller is cancelled (``task.cancel()``, ``asyncio.timeout``, ``wait_for``,
an anyio cancel scope) does the coroutine move, mid-await, to a task of the
pool's, which finishes it; the caller gets ``CancelledError`` at once, as
with ``asyncio.shield``.

The caller's task sees a stand-in for each future the coroutine awaits
(the driver itself): asyncio's ``Task`` accepts any object with
``_asyncio_future_blocking``, ``get_loop()`` (or, without it, a ``_loop``
attribute: ``asyncio.futures._get_loop``, which the driver uses, so the
Task's loop check costs no Python call), ``add_done_callback()``,
``cancel()`` and ``result()`` (the protocol ``Task.__step`` checks, in both
the C and the Python implementation, 3.11-3.13; uvloop uses asyncio's Task).
Cancelling the stand-in hands the coroutine over and never cancels the real
future, which belongs to the coroutine (asyncpg's protocol waiter). The
task's wake-up itself is registered on the real future, as without the
stand-in: the future wakes the task with its result or error (the Task's
wake-up reads ``future.result()`` and throws an error in), and the driver
passes an error on into the coroutine, whose ``await`` raises it.

Rule for the coroutines run this way: no ``asyncio.timeout()``/``wait_for``
inside (they would cancel the *caller's* task, found by ``current_task()``);
bound statements with asyncpg's own ``timeout=`` instead.
"""

from __future__ import annotations

import asyncio
import inspect
import sys
import warnings
from collections.abc import Callable, Coroutine, Generator
from contextvars import Context
from typing import Any, Generic, TypeVar

T = TypeVar("T")

# The exception being handled where the driver is awaited (3.11+: sys.exception).
_handling = sys.exception


def _closing(handled: BaseException) -> bool:
    """Whether ``handled`` (the exception being handled where a driver is
    awaited) is the ``GeneratorExit`` of a coroutine's ``close()``, in
    whose frame no wait can be made. Its traceback holds the frames it was
    raised in: a coroutine's (closed: its pending task garbage collected,
    or ``close()`` called), not only an async generator's (``aclose()``,
    awaited by a task: its waits are waited for). The coroutine's frame
    need not come first: a ``contextlib.asynccontextmanager`` whose
    ``finally:`` releases gets the closed coroutine's ``GeneratorExit``
    thrown in (``athrow``), its own frame then heading the traceback."""
    if not isinstance(handled, GeneratorExit):
        return False
    tb = handled.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_flags & inspect.CO_COROUTINE:
            return True
        tb = tb.tb_next
    return False


def closing_now() -> bool:
    """Whether the caller runs in a coroutine being closed (:func:`_closing`
    of the exception being handled), where no wait can be made. (The
    driver's await, on the hot path, tests for no exception inline first.)"""
    handled = _handling()
    return handled is not None and _closing(handled)


def retrieve(future: asyncio.Future[Any]) -> None:
    """A done callback that marks ``future``'s exception retrieved: its error
    is reported elsewhere (the pool's log), not also as asyncio's "Future
    exception was never retrieved" when nobody awaits it any more."""
    if not future.cancelled():
        future.exception()


def settle(future: asyncio.Future[None] | None, error: BaseException | None) -> None:
    """Resolve a caller's future unless its task gave up on it (cancelled)."""
    if future is None or future.done():
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)


Spawn = Callable[[Coroutine[Any, Any, Any]], object]

# A driver's ``first`` when its coroutine has not taken a step yet.
NOT_STARTED: Any = object()


class _Driver(Generic[T]):
    """The awaitable :func:`detached` returns (awaited once). While the
    driven coroutine waits on a future, the caller's task waits on this
    object, which stands in for that future (one object for the whole
    reset: the hot path allocates nothing per step).

    The task's wake-up is registered on the real future itself (no callback
    of the driver's in between): the future wakes the task as it would
    without the driver, with the future's result or error, which the driver
    passes on to the coroutine. A cancel takes the wake-up off the future
    again (or, if the future is already done and the wake-up scheduled, lets
    that wake-up deliver the ``CancelledError``)."""

    __slots__ = ("_coro", "_spawn", "_then", "_then_args", "_raises", "_fut", "_loop", "_asyncio_future_blocking",
                 "_wakeup", "_context", "_cancelled", "_message", "_awaited", "_gen", "_quiet", "_quieted", "_first")

    # Set where first needed, not in __init__ (a store less each per release):
    # _loop at each step, before the task can read it (asyncio.futures.
    # _get_loop's fallback, where a future offers no get_loop(); no Python
    # call); _quieted at each step (its count of _quiet taken off the
    # future); _fut (the future the coroutine waits on) at each step too;
    # _wakeup and _context by add_done_callback(); _message by cancel();
    # _gen by the coroutine protocol's first call. All but _loop and
    # _context (read only once _wakeup is) are read with their default
    # (getattr), off the hot path.
    _loop: asyncio.AbstractEventLoop
    _fut: asyncio.Future[Any] | None
    _quieted: int
    _wakeup: Callable[[Any], object] | None
    _context: Context | None
    _message: Any
    _gen: Generator[Any, None, T]

    def __init__(
        self, coro: Coroutine[Any, Any, Any], spawn: Spawn, then: Callable[..., T] | None, then_args: tuple[Any, ...],
        raises: bool = False, quiet: Callable[[Any], object] | None = None, first: Any = NOT_STARTED,
    ) -> None:
        self._coro = coro
        # What ``coro``'s first step yielded, when the caller took that step
        # itself (a release sends its reset before its bookkeeping: see
        # Leaser.release); NOT_STARTED when the first await takes it.
        self._first = first
        # A done callback to keep off each future while this task drives
        # the coroutine, put back on the one it waits on at a hand-over
        # (_pg.waiter_completed_callback: asyncpg's, which only a cancel of
        # the future needs, and none reaches it through the driver).
        self._quiet = quiet
        self._spawn = spawn
        self._then = then
        # then's arguments with the error's place last, None: then(*then_args)
        # when the coroutine returned (the hot path: no tuple built then),
        # then(*then_args[:-1], error) when it raised.
        self._then_args = then_args
        # The caller's await raises what ``then`` returns, if not None (the
        # pool task's run drops it, as ever): a release's reset error.
        self._raises = raises
        # None until the first step: asyncio.isfuture() (ensure_future,
        # wait_for, gather) must see an awaitable to wrap in a task, not a
        # future. The Task sets it False after each step, as for a future.
        self._asyncio_future_blocking: bool | None = None
        self._cancelled = False  # the caller was cancelled: the coroutine is the pool's now
        # Awaited (or run as a coroutine) once: a second await raises, as a
        # coroutine's does (it must not report the reset's end twice).
        self._awaited = False

    # -- the future protocol asyncio's Task uses on what a coroutine yields

    def add_done_callback(self, fn: Callable[[Any], object], *, context: Context | None = None) -> None:
        # (Called by the task that waits on the driver: _fut is set.)
        self._wakeup = fn
        self._context = context
        self._fut.add_done_callback(fn, context=context)  # type: ignore[union-attr]

    def remove_done_callback(self, fn: Callable[[Any], object]) -> int:
        fut: asyncio.Future[Any] | None = getattr(self, "_fut", None)
        if getattr(self, "_wakeup", None) is fn and fut is not None:
            self._wakeup = None
            return fut.remove_done_callback(fn)
        return 0

    def done(self) -> bool:
        """True once cancelled (the pool's task has the statement). Not when
        the awaited future is done but the task has not resumed yet: the
        release ends when the task runs ``then`` (the connection's hand-on),
        as asyncpg's release, a shield's future, is not done before its
        inner task has run. anyio's cancel scopes read it (see ``__class__``)."""
        return self._cancelled

    def cancelled(self) -> bool:
        return self._cancelled

    @property  # type: ignore[misc]
    def __class__(self) -> type:
        """``asyncio.Future`` for ``isinstance()`` once a task waits on the
        driver (it stands in for the future the reset awaits), else
        ``_Driver``: anyio (4.x, ``CancelScope._deliver_cancellation``)
        cancels a task again at every loop pass unless it waits on a done
        ``asyncio.Future``, and each extra ``task.cancel()`` counts against
        ``asyncio.timeout``'s own, which then re-raises a bare
        ``CancelledError`` instead of ``TimeoutError`` (review h215; asyncpg's
        release waits on a real future, its shield's). ``type()`` is not
        affected, nor asyncio's Task, which does not ask."""
        return asyncio.Future if getattr(self, "_fut", None) is not None else _Driver

    def result(self) -> None:
        if self._cancelled:
            raise self._cancel_error()
        return None

    def _cancel_error(self) -> asyncio.CancelledError:
        # With the canceller's message, as a cancelled future raises it:
        # anyio's cancel scopes recognise their own cancellations by it.
        message = getattr(self, "_message", None)  # (set by cancel(): see the class's note)
        return asyncio.CancelledError() if message is None else asyncio.CancelledError(message)

    def cancel(self, msg: Any = None) -> bool:
        """The caller's task is being cancelled: hand the coroutine to the
        pool and wake the caller with ``CancelledError`` (True, as a future
        that was cancelled)."""
        fut: asyncio.Future[Any] | None = getattr(self, "_fut", None)
        if self._cancelled or fut is None:
            return False
        self._message = msg
        wakeup = getattr(self, "_wakeup", None)
        self.hand_over(fut)
        if wakeup is not None and not fut.done():
            # (If the future is done, it has scheduled the task's wake-up,
            # which finds the driver cancelled and raises: see __await__.)
            fut.get_loop().call_soon(wakeup, self, context=self._context)
        return True

    # -- the coroutine protocol (collections.abc.Coroutine), off the hot path:
    # asyncpg's __aexit__ and release() are coroutines, so programs hand them
    # to asyncio.create_task(), run_coroutine_threadsafe() or anyio's
    # start_soon(), which accept only a coroutine (``await`` uses __await__).

    def send(self, value: Any) -> Any:
        gen = getattr(self, "_gen", None)
        if gen is None:
            gen = self._gen = self.__await__()
        return gen.send(value)

    def throw(self, typ: Any, val: Any = None, tb: Any = None) -> Any:
        gen = getattr(self, "_gen", None)
        if gen is None:
            # Thrown into before its first step (a task cancelled before it
            # ran): a coroutine would run nothing, but the lease has ended,
            # so the reset is the pool's now.
            self.close()
            if val is None:
                raise typ
            raise val
        return gen.throw(typ, val, tb) if tb is not None or val is not None else gen.throw(typ)

    def close(self) -> None:
        gen = getattr(self, "_gen", None)
        if gen is not None:
            gen.close()
        elif not self._awaited:
            self._awaited = True
            self.hand_over(self._waits_on())

    def __del__(self) -> None:
        if not self._awaited:
            # Dropped unawaited (a forgotten ``await`` of ``__aexit__``): the
            # lease has ended, so the pool runs the statement (a reset never
            # started must not strand its slot), and says so, as Python does
            # for a coroutine never awaited. (One call per driver: the price
            # of never losing a connection to a missing await.)
            try:
                self.close()  # (unstarted: hands the statement over)
            finally:
                warnings.warn(
                    "a pool connection's release was never awaited: the pool ran its reset itself",
                    RuntimeWarning, stacklevel=1,
                )

    # -- driving

    def _waits_on(self) -> Any:
        """Before the first await: the future a started coroutine waits on
        (None: not started, or at a bare yield; either way the pool task's
        first ``send`` is what comes next)."""
        first = self._first
        return None if first is NOT_STARTED else first

    def hand_over(self, fut: asyncio.Future[Any] | None) -> None:
        """Let a pool task finish the coroutine from where it waits on
        ``fut``, and take the caller's wake-up off ``fut``."""
        if not self._cancelled:
            self._cancelled = True
            wakeup = getattr(self, "_wakeup", None)
            if wakeup is not None and fut is not None and not fut.done():
                fut.remove_done_callback(wakeup)
            quiet = self._quiet
            if getattr(self, "_quieted", 0) and quiet is not None and fut is not None and not fut.done():
                # The pool task's cancel (terminate()) cancels fut: the
                # callback must be there to tell the server.
                fut.add_done_callback(quiet)
            self._spawn(_finish(self._coro, fut, self._then, self._then_args))

    def __await__(self) -> Generator[Any, None, T]:
        if self._awaited:
            raise RuntimeError("cannot reuse already awaited coroutine")
        self._awaited = True
        handled = _handling()
        if handled is not None and _closing(handled):
            # Awaited where nothing can wait: a coroutine being closed
            # (``coro.close()``, or its pending task garbage collected)
            # releases in its GeneratorExit path. Its first wait would make
            # Python raise "coroutine ignored GeneratorExit" and leave the
            # statement half-way with no task to drive it: the pool's
            # finishes it (asyncpg's shield's task does the same there).
            self.hand_over(self._waits_on())
            return None  # type: ignore[return-value]  # (nothing to return: the caller is being closed)
        coro = self._coro
        error: BaseException | None = None
        fut = self._first  # (NOT_STARTED, or the first step's future: taken by the caller)
        while True:
            # Wait on what the last step yielded (unless none was taken),
            # then take the next step.
            if fut is not NOT_STARTED:
                if fut is None:  # a bare yield (asyncio.sleep(0))
                    try:
                        yield None
                    except BaseException:
                        self.hand_over(None)
                        raise
                else:
                    fut._asyncio_future_blocking = False
                    if self._quiet is not None:
                        self._quieted = fut.remove_done_callback(self._quiet)
                    self._fut = fut
                    self._loop = fut.get_loop()
                    self._asyncio_future_blocking = True
                    try:
                        yield self
                    except BaseException as exc:
                        if not self._cancelled and fut.done() and not isinstance(exc, GeneratorExit):
                            error = exc  # the future's error: the coroutine's own, as its await raises it
                        else:
                            # CancelledError after cancel() handed the coroutine over;
                            # anything else (GeneratorExit) hands it over now.
                            cancelled = self._cancelled
                            self.hand_over(fut)
                            if cancelled and not isinstance(exc, GeneratorExit):
                                # Cancelled: the first canceller's CancelledError, as a
                                # cancelled future's result() raises it, whatever the
                                # task throws in: the future's error, by a wake-up
                                # scheduled before the cancel (the pool task's now), or
                                # the message-less CancelledError of a later cancel
                                # (the Task's _must_cancel). anyio's scopes know their
                                # own cancellation by its message (review h206).
                                raise self._cancel_error() from None
                            raise
                    if self._cancelled:  # (not after the future's error: see above)
                        raise self._cancel_error()  # a wake-up the future scheduled before the cancel
            try:
                fut = coro.send(None) if error is None else coro.throw(error)
            except StopIteration as stop:
                then = self._then
                if then is None:
                    return stop.value  # type: ignore[no-any-return]
                result = then(*self._then_args)  # (its error's place: None)
                break
            except Exception as exc:
                then = self._then
                if then is None:
                    raise
                result = then(*self._then_args[:-1], exc)
                break
            error = None
        if result is not None and self._raises:
            if isinstance(result, asyncio.Future):
                # The release's outcome, later (Runner.reset_done): a failed
                # reset's error, raised once the connection is closed, or a
                # pool task's retry, which may succeed. Off the hot path.
                yield from result
                return None  # type: ignore[return-value]
            raise result  # type: ignore[misc]  # (outside the except block: the error's context stays its own)
        return result


async def already_ended(outcome: BaseException) -> Any:
    """A coroutine that ends as another one's first step did, which the
    caller took itself (``outcome``: the ``StopIteration`` of one that
    returned, else what it raised): for a :class:`_Driver`, which then
    ends as it would have had it taken that step."""
    if isinstance(outcome, StopIteration):
        return outcome.value
    raise outcome


def detached(
    coro: Coroutine[Any, Any, Any], spawn: Spawn, then: Callable[..., T] | None = None, *then_args: Any
) -> _Driver[T]:
    """Await ``coro`` in the current task; if the task is cancelled, ``coro``
    moves to ``spawn(...)`` (a pool task) and finishes there, and the caller
    gets ``CancelledError`` at once (``asyncio.shield``'s contract, without
    its task). The pool task's result is dropped: return errors, do not raise.

    With ``then``, the await returns ``then(*then_args, error)`` once
    ``coro`` ends, ``error`` being the ``Exception`` it raised or None (its
    value is dropped); in the pool task too, after a hand-over. (One
    coroutine frame less than a wrapper coroutine that catches the error.)"""
    return _Driver(coro, spawn, then, (*then_args, None))


async def _finish(
    coro: Coroutine[Any, Any, Any], fut: asyncio.Future[Any] | None, then: Callable[..., Any] | None,
    then_args: tuple[Any, ...],
) -> Any:
    if then is None:
        return await _Resume(coro, fut)
    try:
        await _Resume(coro, fut)
    except Exception as exc:
        return then(*then_args[:-1], exc)
    return then(*then_args)  # (the error's place, last: None; see _Driver)


class _Resume:
    """``await``s the rest of a started coroutine that waits on ``fut``
    (``yield from`` by hand): the pool task now waits on ``fut`` as the
    coroutine's own task would have, so cancelling the pool task
    (``terminate()``) reaches the coroutine as usual."""

    __slots__ = ("_coro", "_fut")

    def __init__(self, coro: Coroutine[Any, Any, Any], fut: asyncio.Future[Any] | None) -> None:
        self._coro = coro
        self._fut = fut

    def __await__(self) -> Generator[Any, None, Any]:
        # A GeneratorExit closes the coroutine and ends this, as ``yield
        # from`` does: the pool task itself is being closed (collected
        # pending after its loop shut down: nothing runs it any more), and
        # thrown in as an error the statement "failed" and the pool closed
        # its connection on the closed loop (review h280).
        coro = self._coro
        error: BaseException | None = None
        step: Any = self._fut
        if step is not None and not step.done():
            step._asyncio_future_blocking = True
            try:
                yield step
            except GeneratorExit:
                coro.close()
                raise
            except BaseException as exc:
                error = exc
        while True:
            try:
                step = coro.send(None) if error is None else coro.throw(error)
            except StopIteration as stop:
                return stop.value
            error = None
            try:
                yield step
            except GeneratorExit:
                coro.close()
                raise
            except BaseException as exc:
                error = exc


async def released() -> None:
    """What a release returns when there is nothing left to wait for: a
    coroutine that returns None at once, as asyncpg's ``release()`` is one
    (asyncpg 0.29-0.32), called afresh for each release. So it behaves as
    asyncpg's result does: awaited twice it raises ``RuntimeError("cannot
    reuse already awaited coroutine")``; ``asyncio.create_task()``,
    ``run_coroutine_threadsafe()`` and anyio's ``start_soon()`` run it; and
    dropped unawaited, Python warns that it was never awaited (the lease
    ended when release() was called: nothing is stranded). About 45 ns
    more per release than a resolved future (docs/performance.md)."""


async def loop_pass() -> None:
    """:func:`released` with a loop pass before it returns: suspends the
    awaiting task until the callbacks already ready have run. On a future
    resolved by a callback, not a bare yield (``asyncio.sleep(0)``'s): a
    task cancelled twice there gets the first cancel's ``CancelledError``,
    as a future's waiter does (a bare yield keeps the last one's message,
    and anyio cancels a task that waits on no future again at every pass:
    review h215)."""
    loop = asyncio.get_running_loop()
    future = loop.create_future()
    loop.call_soon(settle, future, None)
    await future
