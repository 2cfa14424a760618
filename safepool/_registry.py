"""Every open pool in the process, and the hooks told of each new one.

Extensions (the pytest leak guard, exporters with ``live=True``) find pools
here without the application registering them. ``safepool.pool`` re-exports
:func:`live_pools` and :func:`on_pool_created`, their public home.
"""

from __future__ import annotations

import threading
import traceback
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING

from ._logging import guarded_logger
from .errors import check_callable, refuse_awaitable

if TYPE_CHECKING:
    from .pool import Pool

logger = guarded_logger("safepool")

# Weakly: a pool that is garbage is not listed.
_LIVE_POOLS: weakref.WeakSet[Pool] = weakref.WeakSet()
_CREATED_HOOKS: list[Callable[[Pool], None]] = []
# Exporters with live=True list the pools from their own thread: a pool
# added while another thread iterates the set failed that listing ("Set
# changed size during iteration"). Reentrant: a finalizer run by the
# garbage collector inside the listing may create a pool.
_LOCK = threading.RLock()


def live_pools() -> list[Pool]:
    """Pools created in this process that are not garbage yet (from any thread)."""
    with _LOCK:
        return list(_LIVE_POOLS)


def on_pool_created(callback: Callable[[Pool], None]) -> Callable[[], None]:
    """Call ``callback(pool)`` for every pool created from now on, at the end
    of its constructor (before it connects), in the creating thread. For
    extensions that watch every pool (the pytest leak guard, exporters with
    ``live=True``) without the application registering each one. An exception
    in the callback (``asyncio.CancelledError`` included; ``KeyboardInterrupt``
    and ``SystemExit`` propagate, as in asyncio's callbacks) is logged and
    swallowed.

    Returns a function that removes the callback (idempotent).

    :raises safepool.PoolTypeError: ``callback`` is not callable (taken
        unchecked, it failed, logged, at every later pool's creation), or is
        a coroutine function (called and not awaited, it would never run)."""
    check_callable("callback", callback, plain=True)
    _CREATED_HOOKS.append(callback)

    def remove() -> None:
        if callback in _CREATED_HOOKS:
            _CREATED_HOOKS.remove(callback)

    return remove


def register(pool: Pool) -> None:
    """A pool was constructed: list it, and call the created hooks."""
    with _LOCK:
        _LIVE_POOLS.add(pool)
    for callback in _CREATED_HOOKS.copy():  # a callback may remove itself
        try:
            refuse_awaitable("a pool-created hook", callback(pool))
        except (SystemExit, KeyboardInterrupt):
            raise  # (as asyncio's Handle._run)
        except BaseException:  # (CancelledError included, as an event listener's)
            logger.error(
                "pool %r: pool-created hook failed\n%s", pool.name, pool._reporter.redact(traceback.format_exc().rstrip()),
                extra={"event": "created_hook_failed", "pool": pool.name},
            )
