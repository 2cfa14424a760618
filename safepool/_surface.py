"""The pool's observation surface: what extensions use to watch a pool.

:class:`Observation` answers ``Pool``'s observation methods (docs/api.md,
"Observing a pool"): listeners, the options snapshot, leases and stats,
timing sinks, and calls onto the pool's loop from other threads. ``Pool``
keeps the public methods and their documentation and delegates here in one
line each. It reads the core and the reporter and never changes the books,
except to swap a distribution for one that also feeds timing sinks.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from . import _internals as _pg
from . import events as _events
from ._durations import validate_timeout
from ._histogram import Histogram, TeeHistogram
from ._options import PoolConfig
from ._reporting import DictListener, Reporter
from ._state import PoolState
from .errors import PoolTimeoutError, PoolTypeError, PoolValueError, check_callable
from .stats import LeaseInfo, PoolOptions, PoolStats, build_stats

_T = TypeVar("_T")
# add_timing_sink()'s kinds: the core's distribution each one tees.
_TIMINGS = {"wait": "wait_times", "lease": "lease_times", "connect": "connect_times"}


class Observation:
    """One pool's observation surface (``Pool`` delegates to it)."""

    __slots__ = ("config", "state", "reporter", "loop", "now", "release", "name")

    def __init__(
        self,
        config: PoolConfig,
        state: PoolState,
        reporter: Reporter,
        loop: asyncio.AbstractEventLoop,
        now: Callable[[], float],
        release: Callable[[Any], Awaitable[None]],
    ) -> None:
        self.config = config
        self.state = state
        self.reporter = reporter
        self.loop = loop
        self.now = now
        # Pool.release: release_lease() ends a lease as the application would.
        self.release = release
        self.name = config.name

    # ---------------------------------------------------------- listeners

    def add_event_listener(self, callback: Callable[[_events.PoolEvent], None]) -> None:
        check_callable("callback", callback, plain=True)
        self.reporter.listeners.append(callback)

    def remove_event_listener(self, callback: Callable[[_events.PoolEvent], None]) -> None:
        try:
            self.reporter.listeners.remove(callback)
        except ValueError:
            raise PoolValueError(f"{callback!r} is not a listener of this pool") from None

    def add_listener(self, callback: Callable[[dict[str, Any]], None]) -> None:
        check_callable("callback", callback, plain=True)
        self.reporter.listeners.append(DictListener(callback))

    def remove_listener(self, callback: Callable[[dict[str, Any]], None]) -> None:
        listeners = self.reporter.listeners
        for listener in listeners:
            if isinstance(listener, DictListener) and listener.callback == callback:
                listeners.remove(listener)
                return
        raise PoolValueError(f"{callback!r} is not a listener of this pool")

    # ---------------------------------------------------------- snapshots

    def options(self, capture_stack: bool) -> PoolOptions:
        config, state = self.config, self.state
        adaptive = config.adaptive
        return PoolOptions(
            name=self.name,
            min_size=state.min_size,
            max_size=state.max_size,
            init_size=config.init_size,
            max_queries=config.max_queries,
            max_inactive_connection_lifetime=state.max_inactive_lifetime,
            max_lifetime=state.max_lifetime,
            tcp_keepalive=config.tcp_keepalive,
            lease_timeout=config.lease_timeout,
            leak_warning_after=config.leak_warning_after,
            acquire_timeout=config.acquire_timeout,
            max_waiters=state.max_waiters,
            max_connecting=state.max_connecting,
            fail_fast=state.breaker_threshold is not None,
            wait_on_connect_error=state.wait_on_connect_error,
            reset_mode=config.reset_mode,
            reset_timeout=config.reset_timeout,
            backend_exit_timeout=config.backend_exit_timeout,
            capture_stack=capture_stack,
            max_site_share=config.max_site_share,
            queue_policy="fifo" if adaptive is None else "adaptive",
            queue_target=None if adaptive is None else adaptive.target,
            queue_interval=None if adaptive is None else adaptive.interval,
        )

    def stats(self) -> PoolStats:
        return build_stats(self.name, self.state, self.now(), self.reporter.describe)

    def leases(self, stacks: bool) -> list[LeaseInfo]:
        now = self.now()
        infos = []
        for lease in self.state.leases():
            info = self.reporter.lease_info(lease, now, stacks)
            connection = lease.slot.connection
            if lease.active and connection is not None and _pg.live_proxy(connection) is None:
                info = dataclasses.replace(info, collected=True)  # its reclaim is queued on the loop
            infos.append(info)
        infos.sort(key=lambda info: -info.age)
        return infos

    async def release_lease(self, lease_id: int) -> bool:
        for lease in self.state.leases():
            if lease.id == lease_id and lease.active and lease.slot.connection is not None:
                proxy = _pg.live_proxy(lease.slot.connection)
                if proxy is None:
                    return False
                # The proxy itself, not the connection's weak proxy to it: a
                # release that closes the connection (max_queries, an expired
                # generation) keeps a weak reference to it.
                await self.release(proxy._referent())
                return True
        return False

    # -------------------------------------------------------- timing sinks

    def add_timing_sink(self, kind: str, callback: Callable[[float], None]) -> None:
        field = self._timing_field(kind)
        check_callable("callback", callback, plain=True)
        state = self.state

        def install() -> None:
            current: Histogram = getattr(state, field)
            if not isinstance(current, TeeHistogram):
                current = TeeHistogram(
                    current, self.loop, f"pool {self.name!r}: a {kind} timing sink", self.name, self.reporter.redact
                )
                setattr(state, field, current)
            current.sinks.append(callback)

        self.on_loop(install)

    def remove_timing_sink(self, kind: str, callback: Callable[[float], None]) -> None:
        field = self._timing_field(kind)
        state = self.state

        def uninstall() -> None:
            current: Histogram = getattr(state, field)
            if isinstance(current, TeeHistogram):
                # The values recorded while it was installed go to it first
                # (its loop callback may not have run yet: a lease that ended
                # in the loop turn of an exporter's rename; review h208).
                current.flush()
                if callback in current.sinks:
                    current.sinks.remove(callback)
                if not current.sinks:
                    setattr(state, field, current.inner)  # the last sink gone: the plain histogram

        self.on_loop(uninstall)

    @staticmethod
    def _timing_field(kind: str) -> str:
        try:
            field = _TIMINGS.get(kind)
        except TypeError:  # unhashable (a list): a bare "unhashable type" error
            raise PoolTypeError(f"kind must be one of {sorted(_TIMINGS)}, got {kind!r}") from None
        if field is None:
            raise PoolValueError(f"kind must be one of {sorted(_TIMINGS)}, got {kind!r}")
        return field

    # ------------------------------------------------------- other threads

    def _on_loop_thread(self) -> bool:
        """Whether the pool's loop can be used directly from here: this is
        its thread, or it is not running (or closed)."""
        loop = self.loop
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        return running is loop or loop.is_closed() or not loop.is_running()

    def on_loop(self, action: Callable[[], None]) -> None:
        """Run ``action`` on the pool's loop thread: now if this is it (or the
        loop is not running), else soon."""
        if self._on_loop_thread():
            action()
        else:
            self.loop.call_soon_threadsafe(action)

    def call_threadsafe(self, function: Callable[[], _T], timeout: float | None) -> _T:
        # Checked here, on either thread: a negative or NaN timeout read as a
        # blocked loop, and a str passed whenever the answer came at once.
        timeout = validate_timeout("timeout", timeout)
        check_callable("function", function)
        if self._on_loop_thread():
            return function()
        result: concurrent.futures.Future[_T] = concurrent.futures.Future()

        def run() -> None:
            if not result.set_running_or_notify_cancel():
                return
            try:
                result.set_result(function())
            except BaseException as exc:
                result.set_exception(exc)

        self.loop.call_soon_threadsafe(run)
        try:
            return result.result(timeout)
        except concurrent.futures.TimeoutError:
            result.cancel()
            raise PoolTimeoutError(  # (a TimeoutError: asyncio's is the builtin)
                f"pool {self.name!r}: its event loop did not answer within {timeout}s"
            ) from None
